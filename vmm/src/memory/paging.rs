//! Identity-mapped 4-level page tables with 4 KiB pages.
//!
//! Leaf entries carry the region's permissions; the upper levels allow
//! everything, so the leaf alone decides. Accessed and dirty bits are set in
//! advance so the CPU never writes a page-table page: a write would make a
//! private copy of that page in every sandbox and cost time on restore.

use bitflags::bitflags;
use sandcore_abi::layout::PAGE_SIZE;

use super::layout::PAGE_TABLES_ADDRESS;

bitflags! {
    /// x86-64 page-table entry bits used here.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct PageFlags: u64 {
        /// Entry is valid.
        const PRESENT = 1 << 0;
        /// Writes allowed.
        const WRITABLE = 1 << 1;
        /// CPL3 access allowed; without it the page is supervisor-only.
        const USER = 1 << 2;
        /// Set by the CPU on access; preset here.
        const ACCESSED = 1 << 5;
        /// Set by the CPU on write; preset here for writable pages.
        const DIRTY = 1 << 6;
        /// Instruction fetches fault (needs EFER.NXE).
        const NO_EXECUTE = 1 << 63;
    }
}

impl PageFlags {
    /// Guest code: user, read and execute.
    pub const USER_CODE: PageFlags = PageFlags::PRESENT.union(PageFlags::USER);
    /// Guest read-only data.
    pub const USER_READ_ONLY: PageFlags = PageFlags::PRESENT
        .union(PageFlags::USER)
        .union(PageFlags::NO_EXECUTE);
    /// Guest data, heap, stack, buffers.
    pub const USER_DATA: PageFlags = PageFlags::USER_READ_ONLY.union(PageFlags::WRITABLE);
    /// Ring-0 code (exception stubs).
    pub const KERNEL_CODE: PageFlags = PageFlags::PRESENT;
    /// Ring-0 read-only data (IDT).
    pub const KERNEL_READ_ONLY: PageFlags = PageFlags::PRESENT.union(PageFlags::NO_EXECUTE);
    /// Ring-0 data (GDT, TSS, stacks).
    pub const KERNEL_DATA: PageFlags = PageFlags::KERNEL_READ_ONLY.union(PageFlags::WRITABLE);
}

/// A page-aligned guest range and its permissions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageMapping {
    /// First byte (page-aligned).
    pub start: u64,
    /// End (page-aligned, exclusive).
    pub end: u64,
    /// Leaf flags.
    pub flags: PageFlags,
}

const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;
const TABLE_FLAGS: PageFlags = PageFlags::PRESENT
    .union(PageFlags::WRITABLE)
    .union(PageFlags::USER)
    .union(PageFlags::ACCESSED);

/// Writes page tables for `memory_size` bytes into `memory` (guest memory
/// from address 0) and maps each of `mappings`; every other page stays
/// unmapped. Returns the guest address of the PML4, for CR3.
///
/// `memory` must hold `memory_size` bytes and the caller must have sized the
/// page-table area with `layout::page_table_pages(memory_size)`.
pub fn write_page_tables(memory: &mut [u8], memory_size: u64, mappings: &[PageMapping]) -> u64 {
    let directories = memory_size.div_ceil(1 << 30);
    let tables = memory_size.div_ceil(2 << 20);
    let pml4 = PAGE_TABLES_ADDRESS;
    let pdpt = pml4 + PAGE_SIZE;
    let first_directory = pdpt + PAGE_SIZE;
    let first_table = first_directory + directories * PAGE_SIZE;

    let mut write_entry = |table: u64, index: u64, value: u64| {
        let offset = (table + index * 8) as usize;
        memory[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
    };

    write_entry(pml4, 0, pdpt | TABLE_FLAGS.bits());
    for directory in 0..directories {
        write_entry(
            pdpt,
            directory,
            (first_directory + directory * PAGE_SIZE) | TABLE_FLAGS.bits(),
        );
    }
    for table in 0..tables {
        let directory = first_directory + (table / 512) * PAGE_SIZE;
        write_entry(
            directory,
            table % 512,
            (first_table + table * PAGE_SIZE) | TABLE_FLAGS.bits(),
        );
    }

    for mapping in mappings {
        let mut flags = mapping.flags | PageFlags::ACCESSED;
        if flags.contains(PageFlags::WRITABLE) {
            flags |= PageFlags::DIRTY;
        }
        let mut address = mapping.start;
        while address < mapping.end {
            let page = address / PAGE_SIZE;
            let table = first_table + (page / 512) * PAGE_SIZE;
            write_entry(table, page % 512, (address & ADDRESS_MASK) | flags.bits());
            address += PAGE_SIZE;
        }
    }
    pml4
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(memory: &[u8], address: u64) -> u64 {
        let offset = address as usize;
        u64::from_le_bytes(memory[offset..offset + 8].try_into().unwrap())
    }

    /// Walks the tables like the CPU and returns the leaf entry of `address`.
    fn leaf(memory: &[u8], cr3: u64, address: u64) -> u64 {
        let mut table = cr3;
        for shift in [39, 30, 21] {
            let e = entry(memory, table + ((address >> shift) & 511) * 8);
            assert_ne!(e & 1, 0, "upper level entry for {address:#x} not present");
            table = e & ADDRESS_MASK;
        }
        entry(memory, table + ((address >> 12) & 511) * 8)
    }

    #[test]
    fn mapped_pages_carry_their_flags() {
        let size = 8u64 << 20;
        let mut memory = vec![0u8; size as usize];
        let mappings = [
            PageMapping {
                start: 0x40_0000,
                end: 0x40_2000,
                flags: PageFlags::USER_CODE,
            },
            PageMapping {
                start: 0x60_0000,
                end: 0x60_1000,
                flags: PageFlags::USER_DATA,
            },
        ];
        let cr3 = write_page_tables(&mut memory, size, &mappings);

        let code = leaf(&memory, cr3, 0x40_1234);
        assert_eq!(code & ADDRESS_MASK, 0x40_1000);
        assert_eq!(code & PageFlags::USER.bits(), PageFlags::USER.bits());
        assert_eq!(code & PageFlags::WRITABLE.bits(), 0);
        assert_eq!(code & PageFlags::NO_EXECUTE.bits(), 0);

        let data = leaf(&memory, cr3, 0x60_0008);
        assert_ne!(data & PageFlags::NO_EXECUTE.bits(), 0);
        assert_ne!(data & PageFlags::DIRTY.bits(), 0);

        assert_eq!(leaf(&memory, cr3, 0), 0, "page 0 must stay unmapped");
        assert_eq!(leaf(&memory, cr3, 0x50_0000), 0);
    }
}
