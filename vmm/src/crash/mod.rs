//! The crash path on the vCPU thread: decode why the guest stopped, read the
//! registers of the faulting instruction, and turn it into a typed error.
//!
//! [`RawCrash::from_exit`] runs between the VM exit and the dump queue push,
//! so it allocates nothing: the panic message and exit description live in
//! fixed-capacity `heapless` strings. The error for the caller, which does
//! allocate, is built afterwards by [`exit_to_error`].

#[cfg(feature = "crashdump")]
pub mod capture;

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use kvm_bindings::{kvm_regs, kvm_sregs};
use sandcore_abi::layout::PAGE_SIZE;
use sandcore_abi::ports::{PORT_ABORT, PORT_EXCEPTION};
use sandcore_abi::slot::{SlotHeader, OUTPUT_ABORT, PAYLOAD_OFFSET};

use crate::error::SandboxError;
use crate::interrupt::StopReason;
use crate::memory::layout::{MemoryLayout, IST1_STACK_TOP, RING0_STACK_TOP};
use crate::vcpu::{shim, Exit, Vm};

/// Maximum bytes of a guest panic message kept.
pub const MAX_PANIC_MESSAGE: usize = 512;

/// The frame on the ring-0 stack: what the stub pushed, then what the CPU pushed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExceptionFrame {
    /// Vector the stub pushed.
    pub vector: u8,
    /// Error code (the CPU's, or the stub's zero).
    pub error_code: u64,
    /// Faulting instruction.
    pub rip: u64,
    /// Code segment at the fault.
    pub cs: u64,
    /// RFLAGS at the fault.
    pub rflags: u64,
    /// Stack pointer at the fault.
    pub rsp: u64,
    /// Stack segment at the fault.
    pub ss: u64,
}

/// Cause of a guest stop, decoded without allocating.
// The panic message is inline on purpose: boxing it would allocate on the
// crash path.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum CrashCause {
    /// CPU exception.
    Exception(ExceptionFrame),
    /// Page fault on the stack guard page.
    StackOverflow(ExceptionFrame),
    /// Guest panic with its message; `truncated` if cut.
    Panic {
        /// Message and location.
        message: heapless::String<MAX_PANIC_MESSAGE>,
        /// The guest's message was longer than what is kept.
        truncated: bool,
    },
    /// Triple fault.
    TripleFault,
    /// Any exit the host does not accept.
    Unexpected(heapless::String<160>),
    /// Stopped through an interrupt handle.
    Cancelled,
    /// Call time limit passed.
    TimedOut,
    /// The host asked for a dump of a live sandbox (never an error).
    OnDemand,
}

/// A decoded crash with the register state read right after the exit.
#[derive(Clone, Debug)]
pub struct RawCrash {
    /// What happened.
    pub cause: CrashCause,
    /// General registers from `KVM_GET_REGS`, if the ioctl worked.
    pub regs: Option<kvm_regs>,
    /// Special registers from `KVM_GET_SREGS`, if the ioctl worked.
    pub sregs: Option<kvm_sregs>,
    /// Time limit of the call, for the error message.
    pub time_limit: Option<std::time::Duration>,
}

impl RawCrash {
    /// Decodes `exit`. `memory` is the whole guest memory (the vCPU is stopped).
    pub fn from_exit(
        exit: Exit,
        vm: &Vm,
        memory: &[u8],
        layout: &MemoryLayout,
        stop: Option<StopReason>,
    ) -> RawCrash {
        let (regs, sregs) = vm.exit_registers();
        let cause = match exit {
            Exit::Io(PORT_EXCEPTION) => {
                decode_exception(regs.as_ref(), sregs.as_ref(), memory, layout)
            }
            Exit::Io(PORT_ABORT) => decode_panic(memory, layout),
            Exit::Io(port) => unexpected(format_args!("guest wrote to unknown I/O port {port:#x}")),
            Exit::Shutdown => CrashCause::TripleFault,
            Exit::Interrupted => match stop {
                Some(StopReason::TimedOut) => CrashCause::TimedOut,
                _ => CrashCause::Cancelled,
            },
            Exit::Other {
                description,
                detail,
            } => unexpected(format_args!("{description} {detail:#x}")),
            Exit::Failed(error) => {
                unexpected(format_args!("KVM_RUN failed with errno {}", error.errno()))
            }
        };
        RawCrash {
            cause,
            regs,
            sregs,
            time_limit: None,
        }
    }

    /// Registers as gdb should see them: the CPU's frame for exceptions,
    /// `KVM_GET_REGS` otherwise.
    pub fn faulting_rip(&self) -> u64 {
        match &self.cause {
            CrashCause::Exception(frame) | CrashCause::StackOverflow(frame) => frame.rip,
            _ => self.regs.map(|r| r.rip).unwrap_or(0),
        }
    }
}

fn unexpected(text: std::fmt::Arguments<'_>) -> CrashCause {
    let mut description = heapless::String::new();
    // A description longer than the capacity is cut; the start names the exit.
    let _ = description.write_fmt(text);
    CrashCause::Unexpected(description)
}

fn read_u64(memory: &[u8], address: u64) -> Option<u64> {
    let start = usize::try_from(address).ok()?;
    let bytes = memory.get(start..start.checked_add(8)?)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// Frame size: vector and error code from the stub, then RIP, CS, RFLAGS,
/// RSP and SS from the CPU.
const FRAME_BYTES: u64 = 7 * 8;

fn decode_exception(
    regs: Option<&kvm_regs>,
    sregs: Option<&kvm_sregs>,
    memory: &[u8],
    layout: &MemoryLayout,
) -> CrashCause {
    let Some(regs) = regs else {
        return unexpected(format_args!("exception exit, but KVM_GET_REGS failed"));
    };
    // The stub leaves RSP exactly at the frame. Any other value means the
    // stub itself faulted or the guest jumped into it; neither is trusted.
    if regs.rsp != RING0_STACK_TOP - FRAME_BYTES && regs.rsp != IST1_STACK_TOP - FRAME_BYTES {
        return unexpected(format_args!(
            "exception exit with ring-0 RSP {:#x} not at a frame",
            regs.rsp
        ));
    }
    let field = |index: u64| read_u64(memory, regs.rsp + index * 8).unwrap_or(0);
    let vector = field(0);
    if vector >= 32 || shim::frame_stack_top(vector as u8) != regs.rsp + FRAME_BYTES {
        return unexpected(format_args!(
            "exception exit with vector {vector} on the wrong stack"
        ));
    }
    let frame = ExceptionFrame {
        vector: vector as u8,
        error_code: field(1),
        rip: field(2),
        cs: field(3),
        rflags: field(4),
        rsp: field(5),
        ss: field(6),
    };
    let cr2 = sregs.map(|s| s.cr2).unwrap_or(0);
    let on_guard = (layout.stack_guard..layout.stack_guard + PAGE_SIZE).contains(&cr2);
    if frame.vector == 14 && on_guard {
        CrashCause::StackOverflow(frame)
    } else {
        CrashCause::Exception(frame)
    }
}

fn decode_panic(memory: &[u8], layout: &MemoryLayout) -> CrashCause {
    let base = layout.output_base as usize;
    let capacity = layout.output_size as usize - PAYLOAD_OFFSET;
    let header_bytes = &memory[base..base + PAYLOAD_OFFSET];
    // SAFETY: the output buffer starts page-aligned with a SlotHeader, whose
    // fields are atomics; the vCPU is stopped.
    let header = unsafe { &*(header_bytes.as_ptr() as *const SlotHeader) };
    if header.state.load(Ordering::Acquire) != OUTPUT_ABORT {
        return unexpected(format_args!(
            "guest wrote to the abort port without an abort message"
        ));
    }
    let claimed = header.length.load(Ordering::Relaxed) as usize;
    let length = claimed.min(capacity);
    let text = &memory[base + PAYLOAD_OFFSET..base + PAYLOAD_OFFSET + length];
    let mut message = heapless::String::new();
    // A message that fills the buffer was probably cut by the guest.
    let mut truncated = claimed >= capacity;
    for chunk in text.utf8_chunks() {
        for ch in chunk
            .valid()
            .chars()
            .chain((!chunk.invalid().is_empty()).then_some('\u{fffd}'))
        {
            if message.push(ch).is_err() {
                truncated = true;
                break;
            }
        }
    }
    CrashCause::Panic { message, truncated }
}

/// Builds the caller's error for a crash.
pub fn exit_to_error(crash: &RawCrash) -> SandboxError {
    match &crash.cause {
        CrashCause::Exception(frame) => SandboxError::GuestException {
            vector: frame.vector,
            name: shim::exception_name(frame.vector),
            error_code: frame.error_code,
            rip: frame.rip,
            cr2: crash.sregs.map(|s| s.cr2).unwrap_or(0),
            dump: None,
        },
        CrashCause::StackOverflow(frame) => SandboxError::StackOverflow {
            rip: frame.rip,
            address: crash.sregs.map(|s| s.cr2).unwrap_or(0),
            dump: None,
        },
        CrashCause::Panic { message, truncated } => SandboxError::GuestPanic {
            message: if *truncated {
                format!("{message} [truncated]")
            } else {
                message.to_string()
            },
            dump: None,
        },
        CrashCause::TripleFault => SandboxError::TripleFault {
            rip: crash.faulting_rip(),
            dump: None,
        },
        CrashCause::Unexpected(description) => SandboxError::UnexpectedExit {
            description: description.to_string(),
            dump: None,
        },
        CrashCause::Cancelled => SandboxError::Cancelled { dump: None },
        CrashCause::TimedOut => SandboxError::TimedOut {
            limit: crash.time_limit.unwrap_or_default(),
            dump: None,
        },
        CrashCause::OnDemand => SandboxError::UnexpectedExit {
            description: "on-demand dump".into(),
            dump: None,
        },
    }
}
