//! Byte layouts of the ELF records and note descriptors in a Sandcore core.
//!
//! Every record is a `#[repr(C)]` struct of little-endian, alignment-1 fields
//! (`zerocopy::byteorder`), so the struct has no padding and
//! `IntoBytes::as_bytes` gives the exact on-disk bytes on any host. Explicit
//! `_pad` fields stand where the C structs of Linux have implicit padding.
//! The size of each record is checked at compile time against the size the
//! Linux x86_64 ABI gives it.

use zerocopy::byteorder::little_endian::{I16, I32, U16, U32, U64};
use zerocopy::{Immutable, IntoBytes, KnownLayout};

/// ELF file header size (`sizeof(Elf64_Ehdr)`).
pub const EHDR_SIZE: u64 = 64;
/// Program header size (`sizeof(Elf64_Phdr)`).
pub const PHDR_SIZE: u64 = 56;
/// Section header size (`sizeof(Elf64_Shdr)`).
pub const SHDR_SIZE: u64 = 64;
/// Page size of the guest and of the file's data alignment, in bytes.
pub const PAGE_SIZE: u64 = 4096;

/// `e_type` of a core file.
pub const ET_CORE: u16 = 4;
/// `e_machine` of x86_64.
pub const EM_X86_64: u16 = 62;
/// `e_phnum` value meaning "the real count is in section header 0's `sh_info`".
pub const PN_XNUM: u16 = 0xffff;
/// Program header type of a loadable segment.
pub const PT_LOAD: u32 = 1;
/// Program header type of a note segment.
pub const PT_NOTE: u32 = 4;
/// Segment is executable.
pub const PF_X: u32 = 1;
/// Segment is writable.
pub const PF_W: u32 = 2;
/// Segment is readable.
pub const PF_R: u32 = 4;

/// Note type of `struct elf_prstatus`.
pub const NT_PRSTATUS: u32 = 1;
/// Note type of the FXSAVE image (`user_i387_struct`).
pub const NT_FPREGSET: u32 = 2;
/// Note type of `struct elf_prpsinfo`.
pub const NT_PRPSINFO: u32 = 3;
/// Note type of the auxiliary vector.
pub const NT_AUXV: u32 = 6;
/// Note type of the mapped-files table.
pub const NT_FILE: u32 = 0x4649_4c45;
/// Note type of `siginfo_t`.
pub const NT_SIGINFO: u32 = 0x5349_4749;
/// Note type of the XSAVE area (owner `LINUX`).
pub const NT_X86_XSTATE: u32 = 0x202;
/// Note type of the Sandcore crash record (owner `SANDCORE`): the ASCII
/// bytes `SCRH`.
///
/// BFD (and so gdb) parses every note whose owner it does not know by its
/// type alone, so a small type such as 1 would be taken for `NT_PRSTATUS`.
/// A four-character code like `NT_FILE`'s stays clear of the Linux types.
pub const NT_SANDCORE_CRASH: u32 = 0x5343_5248;

/// Owner name of the Linux-defined core notes, without its NUL.
pub const NOTE_NAME_CORE: &[u8] = b"CORE";
/// Owner name of `NT_X86_XSTATE`, without its NUL.
pub const NOTE_NAME_LINUX: &[u8] = b"LINUX";
/// Owner name of the Sandcore crash record, without its NUL.
pub const NOTE_NAME_SANDCORE: &[u8] = b"SANDCORE";

/// `AT_NULL`: end of the auxiliary vector.
pub const AT_NULL: u64 = 0;
/// `AT_PAGESZ`: page size.
pub const AT_PAGESZ: u64 = 6;
/// `AT_ENTRY`: program entry point.
pub const AT_ENTRY: u64 = 9;

/// Size in bytes of `struct elf_prstatus` on x86_64.
pub const PRSTATUS_SIZE: usize = 336;
/// Offset of `pr_reg` inside `struct elf_prstatus`.
pub const PRSTATUS_REGS_OFFSET: usize = 112;
/// Size in bytes of `struct elf_prpsinfo` on x86_64.
pub const PRPSINFO_SIZE: usize = 136;
/// Size in bytes of `siginfo_t`.
pub const SIGINFO_SIZE: usize = 128;
/// Byte offset in the XSAVE area where Linux and gdb store XCR0
/// (inside the FXSAVE `sw_reserved` bytes).
pub const XSTATE_XCR0_OFFSET: usize = 464;

/// Version of the `SANDCORE` note layout written by this crate.
pub const SANDCORE_NOTE_VERSION: u32 = 1;
/// `SandcoreNoteHeader::vector` value for crashes that are not CPU exceptions.
pub const NO_VECTOR: u32 = u32::MAX;

/// `Elf64_Ehdr`.
#[derive(IntoBytes, Immutable, KnownLayout, Default)]
#[repr(C)]
#[allow(missing_docs)]
pub struct ElfHeader {
    pub e_ident: [u8; 16],
    pub e_type: U16,
    pub e_machine: U16,
    pub e_version: U32,
    pub e_entry: U64,
    pub e_phoff: U64,
    pub e_shoff: U64,
    pub e_flags: U32,
    pub e_ehsize: U16,
    pub e_phentsize: U16,
    pub e_phnum: U16,
    pub e_shentsize: U16,
    pub e_shnum: U16,
    pub e_shstrndx: U16,
}

/// `Elf64_Phdr`.
#[derive(IntoBytes, Immutable, KnownLayout, Default)]
#[repr(C)]
#[allow(missing_docs)]
pub struct ProgramHeader {
    pub p_type: U32,
    pub p_flags: U32,
    pub p_offset: U64,
    pub p_vaddr: U64,
    pub p_paddr: U64,
    pub p_filesz: U64,
    pub p_memsz: U64,
    pub p_align: U64,
}

/// `Elf64_Shdr`, used only for the `PN_XNUM` extension.
#[derive(IntoBytes, Immutable, KnownLayout, Default)]
#[repr(C)]
#[allow(missing_docs)]
pub struct SectionHeader {
    pub sh_name: U32,
    pub sh_type: U32,
    pub sh_flags: U64,
    pub sh_addr: U64,
    pub sh_offset: U64,
    pub sh_size: U64,
    pub sh_link: U32,
    pub sh_info: U32,
    pub sh_addralign: U64,
    pub sh_entsize: U64,
}

/// `Elf64_Nhdr`: the 12 bytes in front of each note's name and descriptor.
#[derive(IntoBytes, Immutable, KnownLayout, Default)]
#[repr(C)]
#[allow(missing_docs)]
pub struct NoteHeader {
    pub n_namesz: U32,
    pub n_descsz: U32,
    pub n_type: U32,
}

/// `struct user_regs_struct` of x86_64, in the kernel's field order.
#[derive(IntoBytes, Immutable, KnownLayout, Default)]
#[repr(C)]
#[allow(missing_docs)]
pub struct UserRegs {
    pub r15: U64,
    pub r14: U64,
    pub r13: U64,
    pub r12: U64,
    pub rbp: U64,
    pub rbx: U64,
    pub r11: U64,
    pub r10: U64,
    pub r9: U64,
    pub r8: U64,
    pub rax: U64,
    pub rcx: U64,
    pub rdx: U64,
    pub rsi: U64,
    pub rdi: U64,
    /// System call number on syscall entry; -1 outside a system call.
    pub orig_rax: U64,
    pub rip: U64,
    pub cs: U64,
    pub eflags: U64,
    pub rsp: U64,
    pub ss: U64,
    pub fs_base: U64,
    pub gs_base: U64,
    pub ds: U64,
    pub es: U64,
    pub fs: U64,
    pub gs: U64,
}

/// `struct elf_prstatus` of x86_64 (`NT_PRSTATUS`).
#[derive(IntoBytes, Immutable, KnownLayout, Default)]
#[repr(C)]
#[allow(missing_docs)]
pub struct PrStatus {
    pub si_signo: I32,
    pub si_code: I32,
    pub si_errno: I32,
    pub pr_cursig: I16,
    pub _pad0: [u8; 2],
    pub pr_sigpend: U64,
    pub pr_sighold: U64,
    pub pr_pid: I32,
    pub pr_ppid: I32,
    pub pr_pgrp: I32,
    pub pr_sid: I32,
    /// `pr_utime`, `pr_stime`, `pr_cutime`, `pr_cstime`: four `struct timeval`.
    pub times: [U64; 8],
    pub pr_reg: UserRegs,
    pub pr_fpvalid: I32,
    pub _pad1: [u8; 4],
}

/// `struct elf_prpsinfo` of x86_64 (`NT_PRPSINFO`).
#[derive(IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
#[allow(missing_docs)]
pub struct PrPsInfo {
    pub pr_state: u8,
    pub pr_sname: u8,
    pub pr_zomb: u8,
    pub pr_nice: u8,
    pub _pad0: [u8; 4],
    pub pr_flag: U64,
    pub pr_uid: U32,
    pub pr_gid: U32,
    pub pr_pid: I32,
    pub pr_ppid: I32,
    pub pr_pgrp: I32,
    pub pr_sid: I32,
    /// Program name, NUL-terminated.
    pub pr_fname: [u8; 16],
    /// Command line, NUL-terminated.
    pub pr_psargs: [u8; 80],
}

/// The fields of `siginfo_t` a fault sets, padded to the kernel's 128 bytes (`NT_SIGINFO`).
#[derive(IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
#[allow(missing_docs)]
pub struct SigInfo {
    pub si_signo: I32,
    pub si_errno: I32,
    pub si_code: I32,
    pub _pad0: [u8; 4],
    /// First word of the union: the faulting address for SIGSEGV, SIGBUS, SIGILL and SIGFPE.
    pub si_addr: U64,
    pub _rest: [u8; 104],
}

/// One `(type, value)` pair of the auxiliary vector (`NT_AUXV`).
#[derive(IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
#[allow(missing_docs)]
pub struct AuxvEntry {
    pub a_type: U64,
    pub a_val: U64,
}

/// One mapping of `NT_FILE`: guest address range and file offset in pages.
#[derive(IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
#[allow(missing_docs)]
pub struct FileMapping {
    pub start: U64,
    pub end: U64,
    pub page_offset: U64,
}

/// Fixed-size head of the `SANDCORE` note descriptor (version 1), 104 bytes.
///
/// It is followed by `build_id_len` bytes of GNU build id,
/// `function_len` bytes of guest function name and `message_len` bytes of
/// panic message, all UTF-8 or raw bytes without NUL terminators, and then
/// the note's padding to 4 bytes.
#[derive(IntoBytes, Immutable, KnownLayout, Default)]
#[repr(C)]
pub struct SandcoreNoteHeader {
    /// Layout version, [`SANDCORE_NOTE_VERSION`].
    pub version: U32,
    /// `CrashKind::code()`.
    pub kind: U32,
    /// Exception vector, or [`NO_VECTOR`].
    pub vector: U32,
    /// 1 if the panic message was cut at `MAX_MESSAGE` bytes, else 0.
    pub message_truncated: U32,
    /// Error code the CPU pushed, 0 if none.
    pub error_code: U64,
    /// CR0.
    pub cr0: U64,
    /// CR2 (last page-fault address).
    pub cr2: U64,
    /// CR3.
    pub cr3: U64,
    /// CR4.
    pub cr4: U64,
    /// EFER MSR.
    pub efer: U64,
    /// Sandbox id.
    pub sandbox_id: U64,
    /// Dump id.
    pub dump_id: U64,
    /// Crash time, nanoseconds since the Unix epoch.
    pub timestamp_ns: U64,
    /// Length of the build id that follows the header.
    pub build_id_len: U32,
    /// Length of the function name that follows the build id.
    pub function_len: U32,
    /// Length of the panic message that follows the function name.
    pub message_len: U32,
    /// Zero.
    pub reserved: U32,
}

/// Size in bytes of [`SandcoreNoteHeader`].
pub const SANDCORE_HEADER_SIZE: usize = 104;

const _: () = assert!(core::mem::size_of::<ElfHeader>() == EHDR_SIZE as usize);
const _: () = assert!(core::mem::size_of::<ProgramHeader>() == PHDR_SIZE as usize);
const _: () = assert!(core::mem::size_of::<SectionHeader>() == SHDR_SIZE as usize);
const _: () = assert!(core::mem::size_of::<NoteHeader>() == 12);
const _: () = assert!(core::mem::size_of::<UserRegs>() == 27 * 8);
const _: () = assert!(core::mem::size_of::<PrStatus>() == PRSTATUS_SIZE);
const _: () = assert!(core::mem::offset_of!(PrStatus, pr_reg) == PRSTATUS_REGS_OFFSET);
const _: () = assert!(core::mem::size_of::<PrPsInfo>() == PRPSINFO_SIZE);
const _: () = assert!(core::mem::size_of::<SigInfo>() == SIGINFO_SIZE);
const _: () = assert!(core::mem::size_of::<SandcoreNoteHeader>() == SANDCORE_HEADER_SIZE);

/// Returns the size of the note name field: the name, its NUL, and padding to 4.
pub const fn padded_name_size(name: &[u8]) -> u64 {
    align4(name.len() as u64 + 1)
}

/// Rounds `value` up to a multiple of 4.
pub const fn align4(value: u64) -> u64 {
    (value + 3) & !3
}

/// Returns the total size of a note: header, padded name and padded descriptor.
pub const fn note_size(name: &[u8], descsz: u64) -> u64 {
    12 + padded_name_size(name) + align4(descsz)
}

/// One XSAVE state component in the standard (non-compacted) format:
/// its XCR0 bit, byte offset and size.
struct XsaveComponent {
    bit: u32,
    offset: usize,
    size: usize,
}

/// Standard-format XSAVE offsets and sizes of the user state components,
/// as CPUID leaf 0xD reports them on Intel and AMD processors (Intel SDM
/// vol. 1, section 13.4, and table 13-1 of the 2023 edition). Bits 0 and 1
/// (x87, SSE) live in the 512-byte legacy area, and the 64-byte XSAVE
/// header follows it.
const XSAVE_COMPONENTS: [XsaveComponent; 9] = [
    XsaveComponent {
        bit: 2,
        offset: 576,
        size: 256,
    }, // AVX (YMM_Hi128)
    XsaveComponent {
        bit: 3,
        offset: 960,
        size: 64,
    }, // MPX BNDREGS
    XsaveComponent {
        bit: 4,
        offset: 1024,
        size: 64,
    }, // MPX BNDCSR
    XsaveComponent {
        bit: 5,
        offset: 1088,
        size: 64,
    }, // AVX-512 opmask
    XsaveComponent {
        bit: 6,
        offset: 1152,
        size: 512,
    }, // AVX-512 ZMM_Hi256
    XsaveComponent {
        bit: 7,
        offset: 1664,
        size: 1024,
    }, // AVX-512 Hi16_ZMM
    XsaveComponent {
        bit: 9,
        offset: 2688,
        size: 8,
    }, // PKRU
    XsaveComponent {
        bit: 17,
        offset: 2752,
        size: 64,
    }, // AMX XTILECFG
    XsaveComponent {
        bit: 18,
        offset: 2816,
        size: 8192,
    }, // AMX XTILEDATA
];

/// Size of the legacy FXSAVE area plus the XSAVE header.
const XSAVE_BASE_SIZE: usize = 576;

/// Returns the XSAVE area size in bytes that `xcr0` implies and the XCR0
/// value to record, given that only `available` bytes of XSAVE area exist.
///
/// Components whose state would end beyond `available` (AMX tile data does
/// not fit the 4096-byte `KVM_GET_XSAVE` area) are dropped from the returned
/// XCR0, so a reader never looks past the written area. Bits of XCR0 that
/// name no user component above are kept but add no size.
pub fn xsave_layout(xcr0: u64, available: usize) -> (usize, u64) {
    let mut size = XSAVE_BASE_SIZE;
    let mut recorded = xcr0;
    for component in XSAVE_COMPONENTS.iter() {
        if xcr0 & (1 << component.bit) == 0 {
            continue;
        }
        let end = component.offset + component.size;
        if end > available {
            recorded &= !(1u64 << component.bit);
        } else if end > size {
            size = end;
        }
    }
    (size, recorded)
}
