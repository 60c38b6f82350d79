//! The state of a crashed (or paused) guest, as the vCPU thread captured it.
//!
//! Everything here is fixed-capacity so that the VMM can fill a
//! [`CrashSnapshot`] between the VM exit and the queue push without touching
//! the heap. Guest memory is not copied into the snapshot: it is reached
//! through a [`GuestMemorySource`], which the VMM implements over the mapping
//! it shares with the crashed sandbox until that sandbox is restored.

use bitflags::bitflags;

/// Maximum number of guest memory regions a snapshot describes.
pub const MAX_REGIONS: usize = 32;
/// Maximum bytes of panic message kept; longer messages are cut and flagged.
pub const MAX_MESSAGE: usize = 512;
/// Maximum bytes of a guest name (file name of the guest binary).
pub const MAX_GUEST_NAME: usize = 64;
/// Maximum bytes of the guest binary path recorded in the core.
pub const MAX_GUEST_PATH: usize = 256;
/// Maximum bytes of the guest function name recorded in the core.
pub const MAX_FUNCTION_NAME: usize = 64;
/// Maximum bytes of a GNU build id (SHA-1 is 20, some linkers use up to 32).
pub const MAX_BUILD_ID: usize = 32;
/// Size in bytes of the XSAVE area KVM returns (`struct kvm_xsave`).
pub const XSAVE_AREA_SIZE: usize = 4096;
/// Size in bytes of the legacy FXSAVE image at the start of an XSAVE area.
pub const FXSAVE_SIZE: usize = 512;

/// General-purpose and segment registers at the faulting instruction.
///
/// RIP, CS, RFLAGS, RSP and SS come from the frame the CPU pushed on the
/// ring-0 stack when the crash was a CPU exception; the rest from
/// `KVM_GET_REGS`/`KVM_GET_SREGS`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Registers {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub rsp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
    pub cs: u64,
    pub ss: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
    pub fs_base: u64,
    pub gs_base: u64,
}

/// Control registers and EFER, from `KVM_GET_SREGS`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct ControlRegisters {
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

/// Cause of a dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashKind {
    /// A CPU exception delivered through the ring-0 shim.
    Exception {
        /// Exception vector (0–31).
        vector: u8,
        /// Error code the CPU pushed, or 0 for vectors without one.
        error_code: u64,
    },
    /// A page fault on the stack guard page.
    StackOverflow {
        /// Faulting address (CR2).
        address: u64,
    },
    /// The guest's panic handler reported a panic.
    Panic,
    /// The vCPU shut down (triple fault).
    TripleFault,
    /// KVM reported an internal or emulation error.
    InternalError,
    /// The guest made an exit the host does not accept (unknown port, MMIO).
    UnexpectedExit,
    /// The call exceeded its time limit.
    Timeout,
    /// The call was stopped through an interrupt handle.
    Cancelled,
    /// The host asked for a dump of a live sandbox.
    OnDemand,
}

impl CrashKind {
    /// Returns the POSIX signal number gdb shows as the cause of termination.
    pub fn signal(&self) -> u32 {
        const SIGILL: u32 = 4;
        const SIGTRAP: u32 = 5;
        const SIGABRT: u32 = 6;
        const SIGBUS: u32 = 7;
        const SIGFPE: u32 = 8;
        const SIGKILL: u32 = 9;
        const SIGSEGV: u32 = 11;
        const SIGSTOP: u32 = 19;
        match *self {
            CrashKind::Exception { vector, .. } => match vector {
                0 | 16 | 19 => SIGFPE,
                1 | 3 => SIGTRAP,
                6 => SIGILL,
                17 => SIGBUS,
                _ => SIGSEGV,
            },
            CrashKind::StackOverflow { .. } => SIGSEGV,
            CrashKind::Panic => SIGABRT,
            CrashKind::TripleFault | CrashKind::InternalError | CrashKind::UnexpectedExit => {
                SIGSEGV
            }
            CrashKind::Timeout | CrashKind::Cancelled => SIGKILL,
            CrashKind::OnDemand => SIGSTOP,
        }
    }

    /// Returns a stable numeric code for the `SANDCORE` note and the stream protocol.
    pub fn code(&self) -> u32 {
        match self {
            CrashKind::Exception { .. } => 1,
            CrashKind::StackOverflow { .. } => 2,
            CrashKind::Panic => 3,
            CrashKind::TripleFault => 4,
            CrashKind::InternalError => 5,
            CrashKind::UnexpectedExit => 6,
            CrashKind::Timeout => 7,
            CrashKind::Cancelled => 8,
            CrashKind::OnDemand => 9,
        }
    }

    /// Returns a short lowercase name (`exception`, `panic`, …) for file names and listings.
    pub fn name(&self) -> &'static str {
        match self {
            CrashKind::Exception { .. } => "exception",
            CrashKind::StackOverflow { .. } => "stack-overflow",
            CrashKind::Panic => "panic",
            CrashKind::TripleFault => "triple-fault",
            CrashKind::InternalError => "internal-error",
            CrashKind::UnexpectedExit => "unexpected-exit",
            CrashKind::Timeout => "timeout",
            CrashKind::Cancelled => "cancelled",
            CrashKind::OnDemand => "on-demand",
        }
    }
}

bitflags! {
    /// Access rights of a guest memory region, as mapped in the guest page tables.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct RegionFlags: u32 {
        /// Readable (every mapped region is).
        const READ = 1 << 0;
        /// Writable.
        const WRITE = 1 << 1;
        /// Executable.
        const EXECUTE = 1 << 2;
        /// Mapped from a segment of the guest binary (listed in `NT_FILE`).
        const IMAGE = 1 << 3;
    }
}

/// One contiguous range of guest memory with uniform access rights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Guest address of the first byte (page-aligned).
    pub guest_address: u64,
    /// Length in bytes (a multiple of 4096).
    pub size: u64,
    /// Access rights.
    pub flags: RegionFlags,
    /// Offset of the region's first byte in the guest binary, for image regions.
    pub file_offset: u64,
}

/// Read access to the guest memory a snapshot owns.
///
/// The VMM implements it over the mapping it took from the crashed sandbox;
/// tests implement it over a byte buffer.
pub trait GuestMemorySource {
    /// Returns the bytes of `region`, or `None` if the region lies outside the
    /// memory this source owns.
    fn region_bytes(&self, region: &MemoryRegion) -> Option<&[u8]>;

    /// Returns `false` if the page at `guest_address` is known to be all zero
    /// without reading it (never written, not backed). Sources that cannot
    /// tell return `true`; the writer then checks the bytes.
    fn page_may_be_nonzero(&self, guest_address: u64) -> bool {
        let _ = guest_address;
        true
    }
}

/// Everything the dump pipeline needs to write one core, except guest memory.
///
/// Fixed-capacity so that the vCPU thread can fill it without allocating.
#[derive(Clone, Debug)]
pub struct CrashInfo {
    /// Dump id, unique within the process (the worker assigns it).
    pub dump_id: u64,
    /// Sandbox id, unique within the process.
    pub sandbox_id: u64,
    /// Wall-clock time of the crash, nanoseconds since the Unix epoch.
    pub timestamp_ns: u64,
    /// Cause of the dump.
    pub kind: CrashKind,
    /// Registers at the faulting instruction.
    pub registers: Registers,
    /// Control registers and EFER.
    pub control: ControlRegisters,
    /// Raw XSAVE area from `KVM_GET_XSAVE` (its first 512 bytes are the FXSAVE image).
    pub xsave: [u8; XSAVE_AREA_SIZE],
    /// XCR0 from `KVM_GET_XCRS`; selects the XSAVE size written to the core.
    pub xcr0: u64,
    /// Guest binary file name, for `NT_PRPSINFO` and dump file names.
    pub guest_name: heapless::String<MAX_GUEST_NAME>,
    /// Guest binary path as given to the VMM, for `NT_FILE`.
    pub guest_path: heapless::String<MAX_GUEST_PATH>,
    /// GNU build id of the guest binary, empty if it has none.
    pub build_id: heapless::Vec<u8, MAX_BUILD_ID>,
    /// Name of the guest function that was running, empty if none.
    pub function: heapless::String<MAX_FUNCTION_NAME>,
    /// Guest entry point, for `NT_AUXV`.
    pub entry_point: u64,
    /// Panic message and location, empty unless the guest panicked.
    pub message: heapless::String<MAX_MESSAGE>,
    /// True if the guest's message was longer than [`MAX_MESSAGE`] and was cut.
    pub message_truncated: bool,
    /// Guest memory ranges to dump, in ascending address order, non-overlapping.
    pub regions: heapless::Vec<MemoryRegion, MAX_REGIONS>,
}

impl CrashInfo {
    /// Returns the faulting address for `NT_SIGINFO`: CR2 for page faults and
    /// stack overflows, 0 otherwise.
    pub fn fault_address(&self) -> u64 {
        match self.kind {
            CrashKind::Exception { vector: 14, .. } => self.control.cr2,
            CrashKind::StackOverflow { address } => address,
            _ => 0,
        }
    }
}
