//! I/O ports the guest writes to with `out` to hand control to the host.
//!
//! An `out` from CPL3 is allowed because the host starts the vCPU with
//! `RFLAGS.IOPL` = 3. Each port means one thing, so the host can tell the
//! reason for an exit from `KVM_EXIT_IO` alone, without another ioctl.

/// The guest is idle and waits for the next request. The first such exit ends
/// the guest's one-time initialisation; later ones follow a published reply.
pub const PORT_PARK: u16 = 0x10;
/// The guest has put a host-function call into the output slot.
pub const PORT_HOST_CALL: u16 = 0x11;
/// The guest panicked; the message is in the output slot. It never resumes.
pub const PORT_ABORT: u16 = 0x12;
/// The guest published a reply or host-function call while a host thread
/// sleeps waiting for it (polling transport only); the guest continues
/// right after the exit.
pub const PORT_NOTIFY: u16 = 0x13;
/// Written by the host's ring-0 exception stubs, never by guest code. The
/// vector and the CPU's exception frame are on the ring-0 stack.
pub const PORT_EXCEPTION: u16 = 0x20;
