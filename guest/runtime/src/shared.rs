//! Access to the boot information and the two shared buffers.

use core::sync::atomic::{AtomicU64, Ordering};
use sandcore_abi::layout::{BootInfo, BOOT_MAGIC};
use sandcore_abi::slot::{SlotHeader, PAYLOAD_OFFSET};

/// Address of the boot information, set once by the entry point.
static BOOT_INFO: AtomicU64 = AtomicU64::new(0);

pub(crate) fn set_boot_info(address: u64) {
    BOOT_INFO.store(address, Ordering::Relaxed);
}

pub(crate) fn boot_info() -> &'static BootInfo {
    let address = BOOT_INFO.load(Ordering::Relaxed);
    // SAFETY: the host maps a BootInfo at this address read-only for the
    // guest's whole life, and the entry point stored it before any caller.
    let info = unsafe { &*(address as *const BootInfo) };
    if info.magic != BOOT_MAGIC {
        // Without valid boot information there is no buffer to report into.
        unreachable_without_host();
    }
    info
}

fn unreachable_without_host() -> ! {
    // SAFETY: `ud2` raises #UD, which the host's exception stub reports.
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}

/// One shared buffer: its header and its payload area.
pub(crate) struct Buffer {
    base: u64,
    size: u64,
}

impl Buffer {
    pub(crate) fn input() -> Buffer {
        let info = boot_info();
        Buffer {
            base: info.input_base,
            size: info.input_size,
        }
    }

    pub(crate) fn output() -> Buffer {
        let info = boot_info();
        Buffer {
            base: info.output_base,
            size: info.output_size,
        }
    }

    pub(crate) fn header(&self) -> &'static SlotHeader {
        // SAFETY: the host maps each buffer read-write for the guest, at
        // least MIN_BUFFER_SIZE bytes long, and starting with a SlotHeader
        // whose fields are atomics, so shared access is sound.
        unsafe { &*(self.base as *const SlotHeader) }
    }

    /// Payload area. The host may write it only while the guest does not
    /// read it (see the slot protocol), so handing out a slice is sound.
    pub(crate) fn payload(&self) -> &'static [u8] {
        // SAFETY: the range lies inside the buffer mapped for the guest.
        unsafe {
            core::slice::from_raw_parts(
                (self.base as usize + PAYLOAD_OFFSET) as *const u8,
                self.payload_capacity(),
            )
        }
    }

    #[allow(clippy::mut_from_ref)]
    pub(crate) fn payload_mut(&self) -> &'static mut [u8] {
        // SAFETY: as for `payload`; the guest is single-threaded and writes
        // the payload only while it owns the slot.
        unsafe {
            core::slice::from_raw_parts_mut(
                (self.base as usize + PAYLOAD_OFFSET) as *mut u8,
                self.payload_capacity(),
            )
        }
    }

    pub(crate) fn payload_capacity(&self) -> usize {
        (self.size as usize).saturating_sub(PAYLOAD_OFFSET)
    }

    /// Returns the payload bytes the header's length names, clamped to the
    /// buffer so that a bad length cannot read past it.
    pub(crate) fn received(&self) -> &'static [u8] {
        let length = self.header().length.load(Ordering::Relaxed) as usize;
        let payload = self.payload();
        &payload[..length.min(payload.len())]
    }
}
