//! The one way out of the guest: an `out` to a host port.

/// Hands control to the host with an `out` to `port`. Returns when the host
/// resumes the vCPU.
///
/// The asm is a compiler barrier for memory (no `nomem`), so every store
/// before it is visible to the host. It also clobbers every caller-saved
/// register (`clobber_abi("C")`), so no value lives in an XMM register
/// across the exit: a new sandbox resumes a parked guest with the general
/// registers of the base image but a fresh FPU state.
#[inline(always)]
pub(crate) fn exit_to_host(port: u16) {
    // SAFETY: `out` from CPL3 is permitted because the host runs the guest
    // with RFLAGS.IOPL = 3; it only causes a VM exit and changes no guest
    // register or memory.
    unsafe {
        core::arch::asm!(
            "out dx, al",
            in("dx") port,
            in("al") 0u8,
            clobber_abi("C"),
            options(nostack, preserves_flags)
        );
    }
}

/// Reads the time-stamp counter, which CPL3 may read because the host leaves
/// CR4.TSD clear.
#[inline(always)]
pub(crate) fn read_tsc() -> u64 {
    // SAFETY: `rdtsc` only reads the counter into EDX:EAX.
    unsafe { core::arch::x86_64::_rdtsc() }
}
