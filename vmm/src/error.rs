//! Errors of the sandbox API.

use std::time::Duration;

use crate::guest_image::GuestBinaryError;

/// Identifier of a crash dump queued to the dump worker.
pub type DumpId = u64;

/// Everything that can go wrong when creating or calling a sandbox.
///
/// Text that comes from the guest (panic messages, argument errors) is
/// untrusted: `Display` escapes it, so a guest cannot put newlines or
/// terminal escape sequences into the host's logs. The fields keep it raw.
///
/// Crash variants carry the id of the crash dump when one was queued, so the
/// caller can match the error to the dump's receipt.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// `/dev/kvm` cannot be opened or lacks a capability Sandcore needs.
    #[error("KVM is not available ({reason}); Sandcore needs Linux on x86_64 with read-write access to /dev/kvm")]
    KvmUnavailable {
        /// What failed.
        reason: String,
    },
    /// A KVM ioctl failed.
    #[error("KVM operation {operation} failed: {source}")]
    Kvm {
        /// The ioctl or step.
        operation: &'static str,
        /// The OS error.
        source: kvm_ioctls::Error,
    },
    /// An OS call other than a KVM ioctl failed.
    #[error("{operation} failed: {source}")]
    Os {
        /// Operation that failed.
        operation: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The guest binary was rejected.
    #[error(transparent)]
    InvalidGuestBinary(#[from] GuestBinaryError),
    /// A configuration value is out of range.
    #[error("invalid sandbox configuration: {0}")]
    InvalidConfiguration(String),
    /// The guest did not finish its one-time initialisation.
    #[error("guest initialisation failed: {0}")]
    InitialisationFailed(Box<SandboxError>),
    /// No guest function of this name is registered.
    #[error("guest has no function named {name:?}")]
    UnknownFunction {
        /// Requested name.
        name: String,
    },
    /// The arguments do not match the guest function's parameters.
    #[error("arguments do not match guest function {function:?}: {}", message.escape_debug())]
    ArgumentMismatch {
        /// Function called.
        function: String,
        /// Guest's description of the mismatch.
        message: String,
    },
    /// The guest returned a value of another type than requested.
    #[error(
        "guest function {function:?} returned type {actual}, but the caller expected {expected}"
    )]
    ReturnTypeMismatch {
        /// Function called.
        function: String,
        /// Type the caller asked for.
        expected: &'static str,
        /// Type the guest returned.
        actual: &'static str,
    },
    /// The encoded request does not fit into the input buffer.
    #[error("call to {function:?} needs {needed} bytes but the input buffer has room for {available}; raise input_buffer_size")]
    RequestTooLarge {
        /// Function called.
        function: String,
        /// Bytes the request needs.
        needed: usize,
        /// Payload bytes available.
        available: usize,
    },
    /// The guest's result did not fit into the output buffer.
    #[error("result of guest function {function:?} does not fit into the output buffer ({}); raise output_buffer_size", message.escape_debug())]
    ReplyTooLarge {
        /// Function called.
        function: String,
        /// Guest's description.
        message: String,
    },
    /// The guest wrote something into shared memory that breaks the protocol.
    #[error("guest broke the call protocol: {}", reason.escape_debug())]
    ProtocolViolation {
        /// Description of the violation, with the offending value.
        reason: String,
    },
    /// The guest panicked.
    #[error("guest panicked: {}", message.escape_debug())]
    GuestPanic {
        /// Message and location (`… at src/main.rs:10:5`).
        message: String,
        /// Crash dump queued, if any.
        dump: Option<DumpId>,
    },
    /// A CPU exception in guest code.
    #[error("guest raised {name} (vector {vector}, error code {error_code:#x}) at RIP {rip:#x}{}", cr2_text(*vector, *cr2))]
    GuestException {
        /// Exception vector.
        vector: u8,
        /// Exception name.
        name: &'static str,
        /// Error code the CPU pushed (0 where it pushes none).
        error_code: u64,
        /// Address of the faulting instruction.
        rip: u64,
        /// CR2 (the faulting address of a page fault).
        cr2: u64,
        /// Crash dump queued, if any.
        dump: Option<DumpId>,
    },
    /// The guest ran off the bottom of its stack.
    #[error("guest stack overflow at RIP {rip:#x}: write to {address:#x} hit the guard page below the stack; raise stack_size or fix the recursion")]
    StackOverflow {
        /// Faulting instruction.
        rip: u64,
        /// Faulting address (CR2).
        address: u64,
        /// Crash dump queued, if any.
        dump: Option<DumpId>,
    },
    /// The vCPU shut down (triple fault).
    #[error("guest triple-faulted (vCPU shutdown) at RIP {rip:#x}")]
    TripleFault {
        /// RIP KVM reported.
        rip: u64,
        /// Crash dump queued, if any.
        dump: Option<DumpId>,
    },
    /// A VM exit the host does not accept.
    #[error("unexpected VM exit: {description}")]
    UnexpectedExit {
        /// The exit and its details.
        description: String,
        /// Crash dump queued, if any.
        dump: Option<DumpId>,
    },
    /// The call was stopped through an [`InterruptHandle`](crate::InterruptHandle).
    #[error("guest call was cancelled")]
    Cancelled {
        /// Crash dump queued, if any.
        dump: Option<DumpId>,
    },
    /// The call exceeded its time limit.
    #[error("guest call timed out after {limit:?}")]
    TimedOut {
        /// The limit.
        limit: Duration,
        /// Crash dump queued, if any.
        dump: Option<DumpId>,
    },
    /// The sandbox crashed earlier and refuses to run from a corrupt state.
    #[error("sandbox is poisoned by an earlier failure ({cause}); call restore() before calling it again")]
    Poisoned {
        /// The failure that poisoned it.
        cause: String,
    },
}

fn cr2_text(vector: u8, cr2: u64) -> String {
    if vector == 14 {
        format!(", faulting address {cr2:#x}")
    } else {
        String::new()
    }
}

impl SandboxError {
    /// Returns the id of the crash dump queued for this failure, if any.
    pub fn dump_id(&self) -> Option<DumpId> {
        match self {
            SandboxError::GuestPanic { dump, .. }
            | SandboxError::GuestException { dump, .. }
            | SandboxError::StackOverflow { dump, .. }
            | SandboxError::TripleFault { dump, .. }
            | SandboxError::UnexpectedExit { dump, .. }
            | SandboxError::Cancelled { dump }
            | SandboxError::TimedOut { dump, .. } => *dump,
            _ => None,
        }
    }

    /// True for failures that leave the guest in an unknown state, after
    /// which the sandbox needs `restore()`.
    pub fn poisons(&self) -> bool {
        matches!(
            self,
            SandboxError::GuestPanic { .. }
                | SandboxError::GuestException { .. }
                | SandboxError::StackOverflow { .. }
                | SandboxError::TripleFault { .. }
                | SandboxError::UnexpectedExit { .. }
                | SandboxError::Cancelled { .. }
                | SandboxError::TimedOut { .. }
                | SandboxError::ProtocolViolation { .. }
                | SandboxError::Kvm { .. }
        )
    }

    #[cfg_attr(not(feature = "crashdump"), allow(dead_code))]
    pub(crate) fn set_dump(&mut self, id: DumpId) {
        match self {
            SandboxError::GuestPanic { dump, .. }
            | SandboxError::GuestException { dump, .. }
            | SandboxError::StackOverflow { dump, .. }
            | SandboxError::TripleFault { dump, .. }
            | SandboxError::UnexpectedExit { dump, .. }
            | SandboxError::Cancelled { dump }
            | SandboxError::TimedOut { dump, .. } => *dump = Some(id),
            _ => {}
        }
    }
}

pub(crate) fn kvm_error(operation: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SandboxError {
    move |source| SandboxError::Kvm { operation, source }
}

pub(crate) fn os_error(operation: &'static str) -> impl FnOnce(std::io::Error) -> SandboxError {
    move |source| SandboxError::Os { operation, source }
}
