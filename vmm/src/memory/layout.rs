//! Addresses of every region of guest memory.
//!
//! Below `IMAGE_BASE` sit the host's regions at fixed addresses: the boot
//! information page (the only one the guest may read), the ring-0 shim, its
//! stacks and the page tables, all supervisor-only. Above the guest image
//! follow the heap, the stack guard page, the stack and the two buffers,
//! sized by the sandbox configuration.

use sandcore_abi::layout::{
    BootInfo, ABI_VERSION, BOOT_INFO_ADDRESS, BOOT_MAGIC, IMAGE_BASE, PAGE_SIZE,
};

/// GDT (first half of the page) and TSS (second half).
pub const GDT_ADDRESS: u64 = 0x2000;
/// Offset of the TSS from [`GDT_ADDRESS`].
pub const TSS_ADDRESS: u64 = GDT_ADDRESS + 0x800;
/// IDT with 32 gates.
pub const IDT_ADDRESS: u64 = 0x3000;
/// Exception stubs, [`STUB_SIZE`] bytes each.
pub const STUBS_ADDRESS: u64 = 0x4000;
/// Bytes per exception stub.
pub const STUB_SIZE: u64 = 16;
/// Lowest byte of the ring-0 stack the CPU switches to on a fault from CPL3
/// (TSS.RSP0). 0x5000 below it stays unmapped as a guard.
pub const RING0_STACK_BASE: u64 = 0x6000;
/// Top of the ring-0 stack (exclusive).
pub const RING0_STACK_TOP: u64 = 0x8000;
/// Lowest byte of the IST1 stack for double faults, NMIs and machine checks;
/// 0x8000 below it stays unmapped as a guard.
pub const IST1_STACK_BASE: u64 = 0x9000;
/// Top of the IST1 stack (exclusive).
pub const IST1_STACK_TOP: u64 = 0xa000;
/// First page-table page (the PML4); the rest follow it.
pub const PAGE_TABLES_ADDRESS: u64 = 0x10000;

/// Largest guest memory the layout supports: its page tables must fit
/// between [`PAGE_TABLES_ADDRESS`] and the image base.
pub const MAX_MEMORY_SIZE: u64 = 1536 << 20;

/// Rounds `value` up to a multiple of the page size, or `None` on overflow.
pub fn page_align_up(value: u64) -> Option<u64> {
    value
        .checked_add(PAGE_SIZE - 1)
        .map(|v| v & !(PAGE_SIZE - 1))
}

/// Addresses and sizes of the regions the host places above the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    /// End of the guest image (page-aligned, exclusive).
    pub image_end: u64,
    /// First heap byte.
    pub heap_base: u64,
    /// Heap size in bytes.
    pub heap_size: u64,
    /// Unmapped page below the stack.
    pub stack_guard: u64,
    /// Lowest stack byte.
    pub stack_base: u64,
    /// Stack size in bytes.
    pub stack_size: u64,
    /// Input buffer address.
    pub input_base: u64,
    /// Input buffer size in bytes.
    pub input_size: u64,
    /// Output buffer address.
    pub output_base: u64,
    /// Output buffer size in bytes.
    pub output_size: u64,
    /// Total guest memory in bytes.
    pub memory_size: u64,
    /// Number of page-table pages starting at [`PAGE_TABLES_ADDRESS`].
    pub page_table_pages: u64,
}

/// Sizes requested by the configuration, already validated as page multiples.
#[derive(Clone, Copy, Debug)]
pub struct RegionSizes {
    /// Heap bytes.
    pub heap: u64,
    /// Stack bytes.
    pub stack: u64,
    /// Input buffer bytes.
    pub input: u64,
    /// Output buffer bytes.
    pub output: u64,
}

impl MemoryLayout {
    /// Places the regions after an image ending at `image_end`. Returns
    /// `None` if the total exceeds [`MAX_MEMORY_SIZE`].
    pub fn new(image_end: u64, sizes: RegionSizes) -> Option<MemoryLayout> {
        let image_end = page_align_up(image_end)?;
        let heap_base = image_end;
        let stack_guard = heap_base.checked_add(sizes.heap)?;
        let stack_base = stack_guard + PAGE_SIZE;
        let input_base = stack_base.checked_add(sizes.stack)?;
        let output_base = input_base.checked_add(sizes.input)?;
        let memory_size = output_base.checked_add(sizes.output)?;
        if memory_size > MAX_MEMORY_SIZE {
            return None;
        }
        Some(MemoryLayout {
            image_end,
            heap_base,
            heap_size: sizes.heap,
            stack_guard,
            stack_base,
            stack_size: sizes.stack,
            input_base,
            input_size: sizes.input,
            output_base,
            output_size: sizes.output,
            memory_size,
            page_table_pages: page_table_pages(memory_size),
        })
    }

    /// Initial stack pointer: the stack top minus one slot, as if a call had
    /// pushed a return address, so `_start` sees the ABI's stack alignment.
    /// The slot holds zero, which ends a debugger's backtrace.
    pub fn initial_stack_pointer(&self) -> u64 {
        self.stack_base + self.stack_size - 8
    }

    /// Boot information for the guest.
    pub fn boot_info(&self) -> BootInfo {
        BootInfo {
            magic: BOOT_MAGIC,
            abi_version: ABI_VERSION,
            reserved: 0,
            heap_base: self.heap_base,
            heap_size: self.heap_size,
            stack_base: self.stack_base,
            stack_size: self.stack_size,
            input_base: self.input_base,
            input_size: self.input_size,
            output_base: self.output_base,
            output_size: self.output_size,
            memory_size: self.memory_size,
        }
    }
}

/// Page-table pages to identity-map `memory_size` bytes with 4 KiB pages:
/// one PML4, one PDPT, one PD per GiB, one PT per 2 MiB.
pub const fn page_table_pages(memory_size: u64) -> u64 {
    let page_tables = memory_size.div_ceil(2 << 20);
    let page_directories = memory_size.div_ceil(1 << 30);
    2 + page_directories + page_tables
}

const _: () = {
    assert!(BOOT_INFO_ADDRESS < GDT_ADDRESS);
    assert!(PAGE_TABLES_ADDRESS + page_table_pages(MAX_MEMORY_SIZE) * PAGE_SIZE <= IMAGE_BASE);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_follow_the_image() {
        let sizes = RegionSizes {
            heap: 0x10_0000,
            stack: 0x1_0000,
            input: 0x1_0000,
            output: 0x1_0000,
        };
        let layout = MemoryLayout::new(0x41_8001, sizes).unwrap();
        assert_eq!(layout.heap_base, 0x41_9000);
        assert_eq!(layout.stack_guard, 0x51_9000);
        assert_eq!(layout.stack_base, 0x51_a000);
        assert_eq!(layout.input_base, 0x52_a000);
        assert_eq!(layout.output_base, 0x53_a000);
        assert_eq!(layout.memory_size, 0x54_a000);
        assert_eq!(layout.initial_stack_pointer() % 16, 8);
    }

    #[test]
    fn oversized_memory_is_rejected() {
        let sizes = RegionSizes {
            heap: MAX_MEMORY_SIZE,
            stack: 0x1000,
            input: 0x1000,
            output: 0x1000,
        };
        assert_eq!(MemoryLayout::new(IMAGE_BASE + 0x1000, sizes), None);
    }
}
