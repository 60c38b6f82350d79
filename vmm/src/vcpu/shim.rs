//! The ring-0 shim: GDT, TSS, IDT and one exception stub per vector.
//!
//! It is the only code that runs at CPL0, and it runs only when guest code
//! faults. On this machine's kvm-pvm every CPL0 instruction is emulated (about
//! 1 µs each), so a stub is four instructions: push a zero error code where
//! the CPU pushes none, push the vector, `out` to the exception port, `hlt`.
//! It touches no general register, so `KVM_GET_REGS` afterwards returns the
//! faulting instruction's registers, and the CPU's own frame on the ring-0
//! stack gives RIP, CS, RFLAGS, RSP and SS. The stub never returns: the host
//! resets the vCPU after a fault.

use sandcore_abi::ports::PORT_EXCEPTION;

use crate::memory::layout::{
    GDT_ADDRESS, IDT_ADDRESS, IST1_STACK_TOP, RING0_STACK_TOP, STUBS_ADDRESS, STUB_SIZE,
    TSS_ADDRESS,
};

/// Kernel code segment selector.
pub const KERNEL_CODE_SELECTOR: u16 = 0x08;
/// Kernel data segment selector.
pub const KERNEL_DATA_SELECTOR: u16 = 0x10;
/// User data segment selector (RPL 3).
pub const USER_DATA_SELECTOR: u16 = 0x18 | 3;
/// User code segment selector (RPL 3).
pub const USER_CODE_SELECTOR: u16 = 0x20 | 3;
/// TSS selector.
pub const TSS_SELECTOR: u16 = 0x28;
/// Bytes of the GDT in use (null, four segments, a 16-byte TSS descriptor).
pub const GDT_LIMIT: u16 = 7 * 8 - 1;
/// Bytes of the IDT in use (32 gates of 16 bytes).
pub const IDT_LIMIT: u16 = 32 * 16 - 1;
/// Offset of the I/O permission bitmap in the TSS, right after the 104-byte
/// 64-bit TSS.
const IO_BITMAP_OFFSET: u64 = 0x68;
/// Ports the I/O bitmap covers (all allowed): every Sandcore port is below it.
const IO_BITMAP_PORTS: u64 = 1024;
/// TSS limit: the TSS, the I/O bitmap and the bitmap's closing 0xff byte.
pub const TSS_LIMIT: u32 = (IO_BITMAP_OFFSET + IO_BITMAP_PORTS / 8) as u32;

/// Vectors for which the CPU pushes an error code.
pub fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// Vectors delivered on the IST1 stack: they can arrive when the ring-0
/// stack itself is unusable.
fn uses_ist1(vector: u8) -> bool {
    matches!(vector, 2 | 8 | 18)
}

/// Descriptors with the accessed bit already set, so the CPU never writes
/// the GDT when it loads a selector.
const GDT_ENTRIES: [u64; 5] = [
    0,
    0x0020_9b00_0000_0000, // kernel code: present, DPL 0, 64-bit
    0x0000_9300_0000_0000, // kernel data: present, DPL 0, writable
    0x0000_f300_0000_0000, // user data: present, DPL 3, writable
    0x0020_fb00_0000_0000, // user code: present, DPL 3, 64-bit
];

/// Writes GDT, TSS, IDT and stubs into `memory` (guest memory from address 0).
pub fn write_shim(memory: &mut [u8]) {
    let mut put = |address: u64, bytes: &[u8]| {
        let start = address as usize;
        memory[start..start + bytes.len()].copy_from_slice(bytes);
    };

    for (index, entry) in GDT_ENTRIES.iter().enumerate() {
        put(GDT_ADDRESS + index as u64 * 8, &entry.to_le_bytes());
    }
    let tss = TSS_ADDRESS;
    let tss_low = (TSS_LIMIT as u64 & 0xffff)
        | ((tss & 0xff_ffff) << 16)
        | (0x89u64 << 40) // present, 64-bit available TSS
        | (((tss >> 24) & 0xff) << 56);
    put(GDT_ADDRESS + 5 * 8, &tss_low.to_le_bytes());
    put(GDT_ADDRESS + 6 * 8, &(tss >> 32).to_le_bytes());

    // TSS: RSP0 at offset 4, IST1 at offset 36, and an I/O permission
    // bitmap that allows the low ports. RFLAGS.IOPL = 3 should make the
    // bitmap moot, but kvm-pvm runs CPL3 code with the hardware IOPL at 0
    // and checks `out` against this bitmap, so without it every port write
    // raises #GP (seen on this project's development machine, 2026-12).
    put(tss + 4, &RING0_STACK_TOP.to_le_bytes());
    put(tss + 36, &IST1_STACK_TOP.to_le_bytes());
    put(tss + 102, &(IO_BITMAP_OFFSET as u16).to_le_bytes());
    put(tss + IO_BITMAP_OFFSET + IO_BITMAP_PORTS / 8, &[0xff]);

    for vector in 0..32u8 {
        let stub = STUBS_ADDRESS + vector as u64 * STUB_SIZE;
        put(stub, &stub_code(vector));
        put(IDT_ADDRESS + vector as u64 * 16, &gate(vector, stub));
    }
}

/// `[push 0]; push vector; out PORT_EXCEPTION, al; hlt; jmp to the hlt`.
fn stub_code(vector: u8) -> [u8; STUB_SIZE as usize] {
    let mut code = [0xccu8; STUB_SIZE as usize];
    let mut at = 0;
    let mut emit = |bytes: &[u8]| {
        code[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    if !has_error_code(vector) {
        emit(&[0x6a, 0x00]);
    }
    emit(&[0x6a, vector]);
    emit(&[0xe6, PORT_EXCEPTION as u8]);
    emit(&[0xf4, 0xeb, 0xfd]);
    code
}

/// Encodes a 64-bit interrupt gate to `handler`. Gates are DPL 0 except
/// #BP, so that `int3` in guest code raises #BP rather than #GP.
fn gate(vector: u8, handler: u64) -> [u8; 16] {
    let dpl: u64 = if vector == 3 { 3 } else { 0 };
    let ist: u64 = if uses_ist1(vector) { 1 } else { 0 };
    let low = (handler & 0xffff)
        | ((KERNEL_CODE_SELECTOR as u64) << 16)
        | (ist << 32)
        | ((0x8e | (dpl << 5)) << 40) // present, interrupt gate
        | (((handler >> 16) & 0xffff) << 48);
    let high = handler >> 32;
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&low.to_le_bytes());
    bytes[8..].copy_from_slice(&high.to_le_bytes());
    bytes
}

/// Top of the stack the CPU pushed the frame for `vector` onto.
pub fn frame_stack_top(vector: u8) -> u64 {
    if uses_ist1(vector) {
        IST1_STACK_TOP
    } else {
        RING0_STACK_TOP
    }
}

/// x86 exception names, for error messages.
pub fn exception_name(vector: u8) -> &'static str {
    match vector {
        0 => "divide error (#DE)",
        1 => "debug (#DB)",
        2 => "non-maskable interrupt",
        3 => "breakpoint (#BP)",
        4 => "overflow (#OF)",
        5 => "bound range exceeded (#BR)",
        6 => "invalid opcode (#UD)",
        7 => "device not available (#NM)",
        8 => "double fault (#DF)",
        10 => "invalid TSS (#TS)",
        11 => "segment not present (#NP)",
        12 => "stack-segment fault (#SS)",
        13 => "general protection fault (#GP)",
        14 => "page fault (#PF)",
        16 => "x87 floating-point error (#MF)",
        17 => "alignment check (#AC)",
        18 => "machine check (#MC)",
        19 => "SIMD floating-point exception (#XM)",
        20 => "virtualization exception (#VE)",
        21 => "control protection exception (#CP)",
        _ => "reserved exception",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_fault_stub_pushes_only_the_vector() {
        let code = stub_code(14);
        assert_eq!(&code[..7], &[0x6a, 14, 0xe6, 0x20, 0xf4, 0xeb, 0xfd]);
    }

    #[test]
    fn divide_error_stub_pushes_a_zero_error_code() {
        let code = stub_code(0);
        assert_eq!(&code[..4], &[0x6a, 0x00, 0x6a, 0x00]);
    }

    #[test]
    fn double_fault_gate_uses_ist1() {
        let bytes = gate(8, 0x4080);
        assert_eq!(bytes[4] & 7, 1);
        assert_eq!(bytes[5], 0x8e);
    }
}
