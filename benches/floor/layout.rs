//! Guest memory layout of the raw floor VMs and the tables written into it.
//!
//! 4 MiB of guest memory, identity-mapped. The first 2 MiB use 4 KiB pages,
//! so page 0 stays unmapped (a null write faults) and the ring-0 tables are
//! supervisor-only. The second 2 MiB are one user large page.

pub const MEMORY_SIZE: usize = 4 << 20;

pub const PML4_ADDRESS: u64 = 0x1000;
const PDPT_ADDRESS: u64 = 0x2000;
const PD_ADDRESS: u64 = 0x3000;
const PT_ADDRESS: u64 = 0x4000;
pub const GDT_ADDRESS: u64 = 0x5000;
pub const TSS_ADDRESS: u64 = 0x5800;
pub const IDT_ADDRESS: u64 = 0x6000;
const STUBS_ADDRESS: u64 = 0x7000;
const STUB_SIZE: u64 = 16;
const RING0_STACK_TOP: u64 = 0xf000;
/// Pages from here up to `SUPERVISOR_END` hold the ring-0 tables, stubs and stack.
const SUPERVISOR_START: u64 = GDT_ADDRESS;
const SUPERVISOR_END: u64 = RING0_STACK_TOP;
pub const CODE_ADDRESS: u64 = 0x10000;
pub const USER_STACK_TOP: u64 = 0x10_0000;
/// Host-to-guest word of the polling floor.
pub const DOORBELL_ADDRESS: u64 = 0x18_0000;
/// Guest-to-host word of the polling floor, on its own cache line.
pub const ANSWER_ADDRESS: u64 = 0x18_0040;

/// Port of the guest loops' `out`.
pub const OUT_PORT: u16 = 0x10;
/// Port the exception stubs write to.
pub const EXCEPTION_PORT: u16 = 0x20;

pub const KERNEL_CODE_SELECTOR: u16 = 0x08;
pub const KERNEL_DATA_SELECTOR: u16 = 0x10;
pub const USER_DATA_SELECTOR: u16 = 0x18 | 3;
pub const USER_CODE_SELECTOR: u16 = 0x20 | 3;
pub const TSS_SELECTOR: u16 = 0x28;
pub const GDT_LIMIT: u16 = 7 * 8 - 1;
pub const IDT_LIMIT: u16 = 32 * 16 - 1;
/// The I/O permission bitmap starts right after the 104-byte 64-bit TSS.
const IO_BITMAP_OFFSET: u64 = 0x68;
/// Ports the bitmap covers, all allowed.
const IO_BITMAP_PORTS: u64 = 1024;
/// TSS, bitmap and the bitmap's closing 0xff byte.
pub const TSS_LIMIT: u32 = (IO_BITMAP_OFFSET + IO_BITMAP_PORTS / 8) as u32;

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_AM: u64 = 1 << 18;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;
pub const RFLAGS_RESERVED: u64 = 1 << 1;
pub const RFLAGS_IOPL3: u64 = 3 << 12;

const PAGE_PRESENT: u64 = 1 << 0;
const PAGE_WRITABLE: u64 = 1 << 1;
const PAGE_USER: u64 = 1 << 2;
const PAGE_LARGE: u64 = 1 << 7;

/// GDT descriptors with the accessed bit set, so the CPU never writes the GDT.
const GDT_ENTRIES: [u64; 5] = [
    0,
    0x0020_9b00_0000_0000, // kernel code: present, DPL 0, 64-bit
    0x0000_9300_0000_0000, // kernel data: present, DPL 0, writable
    0x0000_f300_0000_0000, // user data: present, DPL 3, writable
    0x0020_fb00_0000_0000, // user code: present, DPL 3, 64-bit
];

fn put(memory: &mut [u8], address: u64, bytes: &[u8]) {
    memory[address as usize..][..bytes.len()].copy_from_slice(bytes);
}

fn put_u64(memory: &mut [u8], address: u64, value: u64) {
    put(memory, address, &value.to_le_bytes());
}

/// Writes page tables, GDT, TSS with I/O bitmap, IDT and the exception
/// stubs into zeroed guest memory.
pub fn write_guest_tables(memory: &mut [u8]) {
    let table_flags = PAGE_PRESENT | PAGE_WRITABLE | PAGE_USER;
    put_u64(memory, PML4_ADDRESS, PDPT_ADDRESS | table_flags);
    put_u64(memory, PDPT_ADDRESS, PD_ADDRESS | table_flags);
    put_u64(memory, PD_ADDRESS, PT_ADDRESS | table_flags);
    put_u64(memory, PD_ADDRESS + 8, 0x20_0000 | table_flags | PAGE_LARGE);
    // Page 0 stays unmapped.
    for page in 1..512u64 {
        let address = page << 12;
        let supervisor = (SUPERVISOR_START..SUPERVISOR_END).contains(&address);
        let flags = if supervisor {
            PAGE_PRESENT | PAGE_WRITABLE
        } else {
            table_flags
        };
        put_u64(memory, PT_ADDRESS + page * 8, address | flags);
    }

    for (index, entry) in GDT_ENTRIES.iter().enumerate() {
        put_u64(memory, GDT_ADDRESS + index as u64 * 8, *entry);
    }
    let tss_low = (TSS_LIMIT as u64 & 0xffff)
        | ((TSS_ADDRESS & 0xff_ffff) << 16)
        | (0x89 << 40) // present, 64-bit available TSS
        | (((TSS_ADDRESS >> 24) & 0xff) << 56);
    put_u64(memory, GDT_ADDRESS + 5 * 8, tss_low);
    put_u64(memory, GDT_ADDRESS + 6 * 8, TSS_ADDRESS >> 32);

    // RSP0, then the I/O bitmap: all-zero bits allow every covered port.
    put_u64(memory, TSS_ADDRESS + 4, RING0_STACK_TOP);
    put(
        memory,
        TSS_ADDRESS + 102,
        &(IO_BITMAP_OFFSET as u16).to_le_bytes(),
    );
    put(
        memory,
        TSS_ADDRESS + IO_BITMAP_OFFSET + IO_BITMAP_PORTS / 8,
        &[0xff],
    );

    for vector in 0..32u8 {
        let stub = STUBS_ADDRESS + vector as u64 * STUB_SIZE;
        put(memory, stub, &stub_code(vector));
        let low = (stub & 0xffff)
            | ((KERNEL_CODE_SELECTOR as u64) << 16)
            | (0x8e << 40) // present, DPL 0, 64-bit interrupt gate
            | (((stub >> 16) & 0xffff) << 48);
        put_u64(memory, IDT_ADDRESS + vector as u64 * 16, low);
        put_u64(memory, IDT_ADDRESS + vector as u64 * 16 + 8, stub >> 32);
    }
}

/// `[push 0]; push vector; out EXCEPTION_PORT, al; hlt; jmp to the hlt`,
/// the same four emulated instructions as Sandcore's shim.
fn stub_code(vector: u8) -> Vec<u8> {
    let has_error_code = matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30);
    let mut code = Vec::with_capacity(STUB_SIZE as usize);
    if !has_error_code {
        code.extend_from_slice(&[0x6a, 0x00]);
    }
    code.extend_from_slice(&[0x6a, vector, 0xe6, EXCEPTION_PORT as u8, 0xf4, 0xeb, 0xfd]);
    code
}
