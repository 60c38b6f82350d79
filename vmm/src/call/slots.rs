//! Host access to the request and reply slots in guest memory.
//!
//! The addresses come from the host's own layout, never from the guest, and
//! stay valid for the sandbox's life because its mapping never moves. Every
//! length read from a header is clamped against the buffer before use.

use std::sync::atomic::Ordering;

use sandcore_abi::slot::{SlotHeader, PAYLOAD_OFFSET};

use crate::memory::layout::MemoryLayout;
use crate::memory::mapping::Mapping;

/// One shared buffer seen from the host.
#[derive(Clone, Copy)]
pub struct Slot {
    base: *mut u8,
    size: usize,
}

// SAFETY: a Slot is an address into the sandbox's guest mapping; the sandbox
// decides which thread touches it and when.
unsafe impl Send for Slot {}
// SAFETY: see Send; the header fields are atomics.
unsafe impl Sync for Slot {}

impl Slot {
    /// Returns the input buffer of a sandbox running on `mapping`.
    pub fn input(mapping: &Mapping, layout: &MemoryLayout) -> Slot {
        Slot::within(mapping, layout.input_base, layout.input_size)
    }

    /// Returns the output buffer of a sandbox running on `mapping`.
    pub fn output(mapping: &Mapping, layout: &MemoryLayout) -> Slot {
        Slot::within(mapping, layout.output_base, layout.output_size)
    }

    fn within(mapping: &Mapping, address: u64, size: u64) -> Slot {
        let end = address.checked_add(size).expect("buffer end overflows");
        assert!(
            end <= mapping.size() as u64,
            "buffer {address:#x}+{size:#x} lies outside guest memory"
        );
        // SAFETY: the assert above keeps the offset inside the mapping.
        Slot {
            base: unsafe { mapping.host_address().add(address as usize) },
            size: size as usize,
        }
    }

    /// Returns the slot header.
    pub fn header(&self) -> &SlotHeader {
        // SAFETY: the buffer starts page-aligned with a SlotHeader made of
        // atomics, so shared access from host and guest is sound.
        unsafe { &*(self.base as *const SlotHeader) }
    }

    /// Payload capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.size - PAYLOAD_OFFSET
    }

    /// Returns the payload area for writing.
    ///
    /// # Safety
    /// The guest must not access the payload while the slice lives (the vCPU
    /// is stopped, or the slot state gives the payload to the host).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn payload_mut(&self) -> &mut [u8] {
        // SAFETY: the range lies inside the buffer; exclusivity is the caller's.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(PAYLOAD_OFFSET), self.capacity()) }
    }

    /// Returns the payload bytes the header claims, or `Err(claimed)` if the claimed
    /// length exceeds the buffer.
    ///
    /// # Safety
    /// As for [`Slot::payload_mut`].
    pub unsafe fn received(&self) -> Result<&[u8], usize> {
        let claimed = self.header().length.load(Ordering::Relaxed) as usize;
        if claimed > self.capacity() {
            return Err(claimed);
        }
        // SAFETY: claimed <= capacity, inside the buffer.
        Ok(unsafe { std::slice::from_raw_parts(self.base.add(PAYLOAD_OFFSET), claimed) })
    }

    /// Copies the payload bytes the header claims into `into` (reusing its
    /// capacity), reading the length once and guest memory with volatile
    /// loads. The polling transport decodes the copy, because the guest runs
    /// while the host reads and could change the bytes under the decoder.
    /// Returns `Err(claimed)` if the claimed length exceeds the buffer.
    pub fn copy_received(&self, into: &mut Vec<u8>) -> Result<(), usize> {
        let claimed = self.header().length.load(Ordering::Relaxed) as usize;
        if claimed > self.capacity() {
            return Err(claimed);
        }
        into.clear();
        into.reserve(claimed);
        // SAFETY: claimed <= capacity, so every read stays inside the
        // payload; volatile reads make no assumption about concurrent writes.
        unsafe {
            let source = self.base.add(PAYLOAD_OFFSET);
            for index in 0..claimed {
                into.push(source.add(index).read_volatile());
            }
        }
        Ok(())
    }
}
