//! Streaming ELF core writer.
//!
//! A core is written in two passes over the snapshot, and neither keeps the
//! core in memory:
//!
//! 1. [`CoreLayout::compute`] validates the memory regions and computes the
//!    size of every header and note, the offset of every segment and the
//!    total size of the file. It reads no guest memory.
//! 2. [`write_core`] sends the file to a [`DumpSink`] front to back through
//!    `begin`, `data`, `hole` and `finish`. Headers and notes go through a
//!    one-page stack buffer, guest pages go straight from the source, and runs
//!    of zero pages become holes.
//!
//! The file is what `gdb` and `readelf` expect of a Linux x86_64 core:
//!
//! | part | content |
//! |---|---|
//! | ELF header | `ET_CORE`, `EM_X86_64`, ELFOSABI_NONE |
//! | program headers | one `PT_NOTE` (`p_align` 4), then one `PT_LOAD` per region in address order (`p_align` 4096) |
//! | section header | only when there are more than 65,534 program headers: `e_phnum` is `PN_XNUM` and `sh_info` has the real count |
//! | notes | `NT_PRSTATUS`, `NT_PRPSINFO`, `NT_SIGINFO`, `NT_AUXV`, `NT_FILE`, `NT_FPREGSET`, `NT_X86_XSTATE`, `SANDCORE` |
//! | segment data | each region's bytes, starting on a page boundary |
//!
//! The notes follow the order in which the Linux kernel writes them, because
//! gdb and elfutils take the registers of the first thread from the first
//! `NT_PRSTATUS`. The layout of the `SANDCORE` note is
//! [`records::SandcoreNoteHeader`] followed by the build id, function name and
//! panic message bytes.

pub mod records;

#[cfg(all(test, feature = "std"))]
mod tests;

use core::fmt;

use zerocopy::byteorder::little_endian::{I16, I32, U16, U32, U64};
use zerocopy::IntoBytes;

use crate::sink::{DumpMetadata, DumpSink, SinkError, SinkReceipt};
use crate::snapshot::{
    CrashInfo, CrashKind, GuestMemorySource, MemoryRegion, RegionFlags, FXSAVE_SIZE,
    XSAVE_AREA_SIZE,
};
use records::*;

/// Maximum bytes passed to one [`DumpSink::data`] call for guest memory, so
/// that sinks which frame or copy chunks see bounded sizes.
pub const MAX_DATA_CHUNK: usize = 1 << 20;

/// Maximum number of program headers the ELF format can count: `PT_NOTE`
/// plus `u32::MAX - 1` regions (`sh_info` is 32 bits).
const MAX_PROGRAM_HEADERS: u64 = u32::MAX as u64;

/// Maximum bytes of `pr_fname`, without its NUL (the kernel's `TASK_COMM_LEN` is 16).
const FNAME_MAX: usize = 15;
/// Maximum bytes of `pr_psargs`, without its NUL (the kernel's `ELF_PRARGSZ` is 80).
const PSARGS_MAX: usize = 79;

/// Error from writing a core.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoreWriteError {
    /// A memory region is not page-aligned, is empty, overlaps or precedes
    /// the previous region, or wraps the address space.
    InvalidRegion {
        /// Index of the region in the list.
        index: usize,
        /// Guest address of the region.
        address: u64,
        /// Size of the region in bytes.
        size: u64,
        /// Rule the region breaks.
        reason: &'static str,
    },
    /// The memory source returned no bytes, or the wrong number of bytes, for a region.
    MissingMemory {
        /// Index of the region in the list.
        index: usize,
        /// Guest address of the region.
        address: u64,
        /// Size of the region in bytes.
        size: u64,
    },
    /// More regions than an ELF file can count.
    TooManyRegions {
        /// Number of regions requested.
        count: usize,
    },
    /// A sink rejected the dump; the sink was sent `abort`.
    Sink(SinkError),
    /// The writer produced a different number of bytes than the layout
    /// promised. This is a bug in the writer; the sink was sent `abort`.
    SizeMismatch {
        /// Bytes the layout promised.
        expected: u64,
        /// Bytes the writer produced.
        written: u64,
    },
}

impl fmt::Display for CoreWriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreWriteError::InvalidRegion {
                index,
                address,
                size,
                reason,
            } => write!(
                f,
                "invalid memory region {index} at {address:#x} of {size:#x} bytes: {reason}; \
                 pass page-aligned, non-empty regions in ascending address order"
            ),
            CoreWriteError::MissingMemory {
                index,
                address,
                size,
            } => write!(
                f,
                "memory source has no {size:#x} bytes for region {index} at {address:#x}; \
                 list only regions the source owns"
            ),
            CoreWriteError::TooManyRegions { count } => write!(
                f,
                "{count} memory regions exceed the ELF limit of {} program headers; merge adjacent regions",
                MAX_PROGRAM_HEADERS
            ),
            CoreWriteError::Sink(error) => write!(f, "dump sink failed: {error}"),
            CoreWriteError::SizeMismatch { expected, written } => write!(
                f,
                "core writer produced {written} bytes but its layout promised {expected}; \
                 this is a bug in the core writer, please report it"
            ),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for CoreWriteError {}

impl From<SinkError> for CoreWriteError {
    fn from(error: SinkError) -> Self {
        CoreWriteError::Sink(error)
    }
}

/// Sizes and offsets of every part of one core file, computed before any byte is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoreLayout {
    /// Number of program headers: the `PT_NOTE` plus one `PT_LOAD` per region.
    pub program_header_count: u64,
    /// True if the count exceeds 65,534 and the file uses `PN_XNUM` with one section header.
    pub uses_extended_numbering: bool,
    /// File offset of the section header, when `uses_extended_numbering`.
    pub section_header_offset: u64,
    /// File offset of the first note.
    pub notes_offset: u64,
    /// Total bytes of all notes (the `PT_NOTE` segment's `p_filesz`).
    pub notes_size: u64,
    /// Descriptor size of `NT_FILE`.
    pub file_note_size: u64,
    /// Number of image regions listed in `NT_FILE`.
    pub file_mapping_count: u64,
    /// Descriptor size of `NT_X86_XSTATE`, implied by XCR0.
    pub xstate_size: u64,
    /// XCR0 as recorded at byte 464 of `NT_X86_XSTATE`: the snapshot's XCR0
    /// without components that do not fit the captured XSAVE area.
    pub recorded_xcr0: u64,
    /// Descriptor size of the `SANDCORE` note.
    pub sandcore_note_size: u64,
    /// File offset of the first region's data (a multiple of 4096).
    pub data_offset: u64,
    /// Total size of the core in bytes, holes included.
    pub total_size: u64,
}

impl CoreLayout {
    /// Computes the layout of the core for `info` and its `info.regions`.
    ///
    /// Checks that the regions are page-aligned, non-empty, in ascending
    /// order without overlap, and that `source` has the bytes of each. Reads
    /// no guest memory beyond asking for the regions' slices.
    pub fn compute(
        info: &CrashInfo,
        source: &impl GuestMemorySource,
    ) -> Result<CoreLayout, CoreWriteError> {
        Self::compute_with_regions(info, &info.regions, source)
    }

    /// Computes the layout as [`CoreLayout::compute`] does, for `regions`
    /// in place of `info.regions`.
    ///
    /// This serves callers with more than `MAX_REGIONS` regions.
    pub fn compute_with_regions(
        info: &CrashInfo,
        regions: &[MemoryRegion],
        source: &impl GuestMemorySource,
    ) -> Result<CoreLayout, CoreWriteError> {
        validate_regions(regions, source)?;

        let program_header_count = 1 + regions.len() as u64;
        if program_header_count > MAX_PROGRAM_HEADERS {
            return Err(CoreWriteError::TooManyRegions {
                count: regions.len(),
            });
        }
        let uses_extended_numbering = program_header_count >= u64::from(PN_XNUM);
        let headers_end = EHDR_SIZE + program_header_count * PHDR_SIZE;
        let (section_header_offset, notes_offset) = if uses_extended_numbering {
            (headers_end, headers_end + SHDR_SIZE)
        } else {
            (0, headers_end)
        };

        let mut file_mapping_count = 0u64;
        for region in regions {
            if region.flags.contains(RegionFlags::IMAGE) {
                file_mapping_count += 1;
            }
        }
        let path_size = info.guest_path.len() as u64 + 1;
        let file_note_size = 16 + file_mapping_count * (24 + path_size);

        let (xstate_size, recorded_xcr0) = xsave_layout(info.xcr0, XSAVE_AREA_SIZE);
        let sandcore_note_size =
            (SANDCORE_HEADER_SIZE + info.build_id.len() + info.function.len() + info.message.len())
                as u64;

        let notes_size = note_size(NOTE_NAME_CORE, PRSTATUS_SIZE as u64)
            + note_size(NOTE_NAME_CORE, PRPSINFO_SIZE as u64)
            + note_size(NOTE_NAME_CORE, SIGINFO_SIZE as u64)
            + note_size(NOTE_NAME_CORE, AUXV_SIZE)
            + note_size(NOTE_NAME_CORE, file_note_size)
            + note_size(NOTE_NAME_CORE, FXSAVE_SIZE as u64)
            + note_size(NOTE_NAME_LINUX, xstate_size as u64)
            + note_size(NOTE_NAME_SANDCORE, sandcore_note_size);

        let data_offset = align_page(notes_offset + notes_size);
        let memory_size: u64 = regions.iter().map(|region| region.size).sum();

        Ok(CoreLayout {
            program_header_count,
            uses_extended_numbering,
            section_header_offset,
            notes_offset,
            notes_size,
            file_note_size,
            file_mapping_count,
            xstate_size: xstate_size as u64,
            recorded_xcr0,
            sandcore_note_size,
            data_offset,
            total_size: data_offset + memory_size,
        })
    }
}

/// Descriptor size of `NT_AUXV`: `AT_ENTRY`, `AT_PAGESZ`, `AT_NULL`.
const AUXV_SIZE: u64 = 3 * 16;

fn align_page(value: u64) -> u64 {
    (value + PAGE_SIZE - 1) & !(PAGE_SIZE - 1)
}

fn validate_regions(
    regions: &[MemoryRegion],
    source: &impl GuestMemorySource,
) -> Result<(), CoreWriteError> {
    let mut previous_end = 0u64;
    for (index, region) in regions.iter().enumerate() {
        let invalid = |reason| CoreWriteError::InvalidRegion {
            index,
            address: region.guest_address,
            size: region.size,
            reason,
        };
        if region.size == 0 {
            return Err(invalid("size is zero"));
        }
        if region.guest_address % PAGE_SIZE != 0 || region.size % PAGE_SIZE != 0 {
            return Err(invalid("address or size is not a multiple of 4096"));
        }
        let Some(end) = region.guest_address.checked_add(region.size) else {
            return Err(invalid("region wraps past the end of the address space"));
        };
        if index > 0 && region.guest_address < previous_end {
            return Err(invalid(
                "region starts below the end of the previous region",
            ));
        }
        previous_end = end;

        let available = source.region_bytes(region).map(<[u8]>::len);
        if available != Some(region.size as usize) {
            return Err(CoreWriteError::MissingMemory {
                index,
                address: region.guest_address,
                size: region.size,
            });
        }
    }
    Ok(())
}

/// Builds the metadata a sink receives ahead of the core's bytes.
pub fn dump_metadata(info: &CrashInfo, layout: &CoreLayout) -> DumpMetadata {
    let mut guest_name = heapless::String::new();
    // Both strings have capacity MAX_GUEST_NAME, so the copy cannot fail.
    let _ = guest_name.push_str(&info.guest_name);
    DumpMetadata {
        dump_id: info.dump_id,
        sandbox_id: info.sandbox_id,
        guest_name,
        build_id: info.build_id.clone(),
        kind: info.kind,
        timestamp_ns: info.timestamp_ns,
        total_size: layout.total_size,
    }
}

/// Writes the ELF core of `info` and the guest memory of `info.regions` to `sink`.
///
/// Calls `begin`, then `data` and `hole` front to back, then `finish`. If
/// layout validation fails, the sink is not called at all. If the sink
/// returns an error after `begin`, the writer calls `abort` and returns
/// [`CoreWriteError::Sink`].
pub fn write_core(
    info: &CrashInfo,
    source: &impl GuestMemorySource,
    sink: &mut (impl DumpSink + ?Sized),
) -> Result<SinkReceipt, CoreWriteError> {
    write_core_with_regions(info, &info.regions, source, sink)
}

/// Writes a core as [`write_core`] does, for `regions` in place of `info.regions`.
pub fn write_core_with_regions(
    info: &CrashInfo,
    regions: &[MemoryRegion],
    source: &impl GuestMemorySource,
    sink: &mut (impl DumpSink + ?Sized),
) -> Result<SinkReceipt, CoreWriteError> {
    let layout = CoreLayout::compute_with_regions(info, regions, source)?;
    sink.begin(&dump_metadata(info, &layout))?;

    let result = write_body(info, regions, source, &layout, sink);
    match result {
        Ok(()) => sink.finish().map_err(CoreWriteError::Sink),
        Err(error) => {
            sink.abort();
            Err(error)
        }
    }
}

fn write_body(
    info: &CrashInfo,
    regions: &[MemoryRegion],
    source: &impl GuestMemorySource,
    layout: &CoreLayout,
    sink: &mut (impl DumpSink + ?Sized),
) -> Result<(), CoreWriteError> {
    let mut out = ChunkWriter::new(sink);

    write_headers(&mut out, regions, layout)?;
    write_notes(&mut out, info, regions, layout)?;
    out.zeros(layout.data_offset - out.position())?;
    for region in regions {
        write_region(&mut out, region, source)?;
    }
    out.flush()?;

    if out.position() != layout.total_size {
        return Err(CoreWriteError::SizeMismatch {
            expected: layout.total_size,
            written: out.position(),
        });
    }
    Ok(())
}

fn write_headers(
    out: &mut ChunkWriter<'_, impl DumpSink + ?Sized>,
    regions: &[MemoryRegion],
    layout: &CoreLayout,
) -> Result<(), CoreWriteError> {
    let mut e_ident = [0u8; 16];
    e_ident[..4].copy_from_slice(b"\x7fELF");
    e_ident[4] = 2; // ELFCLASS64
    e_ident[5] = 1; // ELFDATA2LSB
    e_ident[6] = 1; // EV_CURRENT
    e_ident[7] = 0; // ELFOSABI_NONE

    let (e_phnum, e_shoff, e_shnum, e_shentsize) = if layout.uses_extended_numbering {
        (PN_XNUM, layout.section_header_offset, 1, SHDR_SIZE as u16)
    } else {
        (layout.program_header_count as u16, 0, 0, 0)
    };
    let header = ElfHeader {
        e_ident,
        e_type: U16::new(ET_CORE),
        e_machine: U16::new(EM_X86_64),
        e_version: U32::new(1),
        e_entry: U64::new(0),
        e_phoff: U64::new(EHDR_SIZE),
        e_shoff: U64::new(e_shoff),
        e_flags: U32::new(0),
        e_ehsize: U16::new(EHDR_SIZE as u16),
        e_phentsize: U16::new(PHDR_SIZE as u16),
        e_phnum: U16::new(e_phnum),
        e_shentsize: U16::new(e_shentsize),
        e_shnum: U16::new(e_shnum),
        e_shstrndx: U16::new(0), // SHN_UNDEF
    };
    out.write(header.as_bytes())?;

    let note = ProgramHeader {
        p_type: U32::new(PT_NOTE),
        p_flags: U32::new(0),
        p_offset: U64::new(layout.notes_offset),
        p_filesz: U64::new(layout.notes_size),
        p_align: U64::new(4),
        ..Default::default()
    };
    out.write(note.as_bytes())?;

    let mut offset = layout.data_offset;
    for region in regions {
        let load = ProgramHeader {
            p_type: U32::new(PT_LOAD),
            p_flags: U32::new(segment_flags(region.flags)),
            p_offset: U64::new(offset),
            p_vaddr: U64::new(region.guest_address),
            p_paddr: U64::new(region.guest_address),
            p_filesz: U64::new(region.size),
            p_memsz: U64::new(region.size),
            p_align: U64::new(PAGE_SIZE),
        };
        out.write(load.as_bytes())?;
        offset += region.size;
    }

    if layout.uses_extended_numbering {
        // The Linux kernel's extended numbering: sh_size contains e_shnum,
        // sh_link e_shstrndx and sh_info the real program header count.
        let section = SectionHeader {
            sh_size: U64::new(1),
            sh_info: U32::new(layout.program_header_count as u32),
            ..Default::default()
        };
        out.write(section.as_bytes())?;
    }
    Ok(())
}

fn segment_flags(flags: RegionFlags) -> u32 {
    let mut p_flags = 0;
    if flags.contains(RegionFlags::READ) {
        p_flags |= PF_R;
    }
    if flags.contains(RegionFlags::WRITE) {
        p_flags |= PF_W;
    }
    if flags.contains(RegionFlags::EXECUTE) {
        p_flags |= PF_X;
    }
    p_flags
}

fn write_note_header(
    out: &mut ChunkWriter<'_, impl DumpSink + ?Sized>,
    name: &[u8],
    note_type: u32,
    descsz: u64,
) -> Result<(), CoreWriteError> {
    let header = NoteHeader {
        n_namesz: U32::new(name.len() as u32 + 1),
        n_descsz: U32::new(descsz as u32),
        n_type: U32::new(note_type),
    };
    out.write(header.as_bytes())?;
    out.write(name)?;
    out.zeros(padded_name_size(name) - name.len() as u64)
}

/// Writes a note whose descriptor is one slice.
fn write_note(
    out: &mut ChunkWriter<'_, impl DumpSink + ?Sized>,
    name: &[u8],
    note_type: u32,
    desc: &[u8],
) -> Result<(), CoreWriteError> {
    write_note_header(out, name, note_type, desc.len() as u64)?;
    out.write(desc)?;
    out.zeros(align4(desc.len() as u64) - desc.len() as u64)
}

fn write_notes(
    out: &mut ChunkWriter<'_, impl DumpSink + ?Sized>,
    info: &CrashInfo,
    regions: &[MemoryRegion],
    layout: &CoreLayout,
) -> Result<(), CoreWriteError> {
    let signal = info.kind.signal() as i32;

    write_note(
        out,
        NOTE_NAME_CORE,
        NT_PRSTATUS,
        prstatus(info, signal).as_bytes(),
    )?;
    write_note(out, NOTE_NAME_CORE, NT_PRPSINFO, prpsinfo(info).as_bytes())?;
    write_note(
        out,
        NOTE_NAME_CORE,
        NT_SIGINFO,
        siginfo(info, signal).as_bytes(),
    )?;

    let auxv = [
        AuxvEntry {
            a_type: U64::new(AT_ENTRY),
            a_val: U64::new(info.entry_point),
        },
        AuxvEntry {
            a_type: U64::new(AT_PAGESZ),
            a_val: U64::new(PAGE_SIZE),
        },
        AuxvEntry {
            a_type: U64::new(AT_NULL),
            a_val: U64::new(0),
        },
    ];
    write_note(out, NOTE_NAME_CORE, NT_AUXV, auxv.as_bytes())?;

    write_file_note(out, info, regions, layout)?;

    write_note(out, NOTE_NAME_CORE, NT_FPREGSET, &info.xsave[..FXSAVE_SIZE])?;

    // NT_X86_XSTATE: the captured area up to the size XCR0 implies, with
    // XCR0 in the software-reserved bytes 464..472 and zeros up to 512.
    let xstate_size = layout.xstate_size as usize;
    write_note_header(out, NOTE_NAME_LINUX, NT_X86_XSTATE, layout.xstate_size)?;
    out.write(&info.xsave[..XSTATE_XCR0_OFFSET])?;
    out.write(&layout.recorded_xcr0.to_le_bytes())?;
    out.zeros((FXSAVE_SIZE - XSTATE_XCR0_OFFSET - 8) as u64)?;
    write_xstate_tail(
        out,
        &info.xsave[FXSAVE_SIZE..xstate_size],
        layout.recorded_xcr0,
    )?;
    out.zeros(align4(layout.xstate_size) - layout.xstate_size)?;

    write_sandcore_note(out, info, layout)
}

/// Writes the XSAVE header and extended state, with XSTATE_BV (the first
/// header word) limited to the components in `recorded_xcr0`.
fn write_xstate_tail(
    out: &mut ChunkWriter<'_, impl DumpSink + ?Sized>,
    tail: &[u8],
    recorded_xcr0: u64,
) -> Result<(), CoreWriteError> {
    let mut xstate_bv = [0u8; 8];
    xstate_bv.copy_from_slice(&tail[..8]);
    let xstate_bv = u64::from_le_bytes(xstate_bv) & recorded_xcr0;
    out.write(&xstate_bv.to_le_bytes())?;
    out.write(&tail[8..])
}

fn prstatus(info: &CrashInfo, signal: i32) -> PrStatus {
    let r = &info.registers;
    PrStatus {
        si_signo: I32::new(signal),
        pr_cursig: I16::new(signal as i16),
        pr_pid: I32::new(1),
        pr_pgrp: I32::new(1),
        pr_sid: I32::new(1),
        pr_reg: UserRegs {
            r15: U64::new(r.r15),
            r14: U64::new(r.r14),
            r13: U64::new(r.r13),
            r12: U64::new(r.r12),
            rbp: U64::new(r.rbp),
            rbx: U64::new(r.rbx),
            r11: U64::new(r.r11),
            r10: U64::new(r.r10),
            r9: U64::new(r.r9),
            r8: U64::new(r.r8),
            rax: U64::new(r.rax),
            rcx: U64::new(r.rcx),
            rdx: U64::new(r.rdx),
            rsi: U64::new(r.rsi),
            rdi: U64::new(r.rdi),
            orig_rax: U64::new(u64::MAX),
            rip: U64::new(r.rip),
            cs: U64::new(r.cs),
            eflags: U64::new(r.rflags),
            rsp: U64::new(r.rsp),
            ss: U64::new(r.ss),
            fs_base: U64::new(r.fs_base),
            gs_base: U64::new(r.gs_base),
            ds: U64::new(r.ds),
            es: U64::new(r.es),
            fs: U64::new(r.fs),
            gs: U64::new(r.gs),
        },
        pr_fpvalid: I32::new(1),
        ..Default::default()
    }
}

/// Copies at most `max` bytes of `text` into `field`, cut on a character
/// boundary; the rest of `field` stays zero, so the string stays NUL-terminated.
fn copy_c_string(field: &mut [u8], text: &str, max: usize) -> usize {
    let mut length = text.len().min(max);
    while !text.is_char_boundary(length) {
        length -= 1;
    }
    field[..length].copy_from_slice(&text.as_bytes()[..length]);
    length
}

fn prpsinfo(info: &CrashInfo) -> PrPsInfo {
    let mut pr_fname = [0u8; 16];
    copy_c_string(&mut pr_fname, &info.guest_name, FNAME_MAX);

    let mut pr_psargs = [0u8; 80];
    let used = copy_c_string(&mut pr_psargs, &info.guest_path, PSARGS_MAX);
    if !info.function.is_empty() && used < PSARGS_MAX {
        pr_psargs[used] = b' ';
        copy_c_string(
            &mut pr_psargs[used + 1..],
            &info.function,
            PSARGS_MAX - used - 1,
        );
    }

    PrPsInfo {
        pr_state: 0,
        pr_sname: b'R',
        pr_zomb: 0,
        pr_nice: 0,
        _pad0: [0; 4],
        pr_flag: U64::new(0),
        pr_uid: U32::new(0),
        pr_gid: U32::new(0),
        pr_pid: I32::new(1),
        pr_ppid: I32::new(0),
        pr_pgrp: I32::new(1),
        pr_sid: I32::new(1),
        pr_fname,
        pr_psargs,
    }
}

/// Returns `si_code` as Linux x86_64 would set it for the same fault.
fn signal_code(kind: &CrashKind) -> i32 {
    const SEGV_MAPERR: i32 = 1;
    const SEGV_ACCERR: i32 = 2;
    const FPE_INTDIV: i32 = 1;
    const ILL_ILLOPN: i32 = 2;
    const TRAP_BRKPT: i32 = 1;
    const SI_KERNEL: i32 = 0x80;
    match *kind {
        // Error code bit 0 is set when the page was present: an access
        // rights violation rather than a missing mapping.
        CrashKind::Exception {
            vector: 14,
            error_code,
        } if error_code & 1 != 0 => SEGV_ACCERR,
        CrashKind::Exception { vector: 14, .. } => SEGV_MAPERR,
        CrashKind::StackOverflow { .. } => SEGV_MAPERR,
        CrashKind::Exception { vector: 0, .. } => FPE_INTDIV,
        CrashKind::Exception { vector: 6, .. } => ILL_ILLOPN,
        CrashKind::Exception { vector: 1 | 3, .. } => TRAP_BRKPT,
        CrashKind::Exception { .. } => SI_KERNEL,
        _ => 0, // SI_USER
    }
}

fn siginfo(info: &CrashInfo, signal: i32) -> SigInfo {
    SigInfo {
        si_signo: I32::new(signal),
        si_errno: I32::new(0),
        si_code: I32::new(signal_code(&info.kind)),
        _pad0: [0; 4],
        si_addr: U64::new(info.fault_address()),
        _rest: [0; 104],
    }
}

/// Writes `NT_FILE`: count, page size, one (start, end, page offset) triple
/// per image region, then one NUL-terminated path per triple.
fn write_file_note(
    out: &mut ChunkWriter<'_, impl DumpSink + ?Sized>,
    info: &CrashInfo,
    regions: &[MemoryRegion],
    layout: &CoreLayout,
) -> Result<(), CoreWriteError> {
    write_note_header(out, NOTE_NAME_CORE, NT_FILE, layout.file_note_size)?;
    out.write(&layout.file_mapping_count.to_le_bytes())?;
    out.write(&PAGE_SIZE.to_le_bytes())?;
    let images = || {
        regions
            .iter()
            .filter(|region| region.flags.contains(RegionFlags::IMAGE))
    };
    for region in images() {
        let mapping = FileMapping {
            start: U64::new(region.guest_address),
            end: U64::new(region.guest_address + region.size),
            page_offset: U64::new(region.file_offset / PAGE_SIZE),
        };
        out.write(mapping.as_bytes())?;
    }
    for _ in images() {
        out.write(info.guest_path.as_bytes())?;
        out.write(&[0])?;
    }
    out.zeros(align4(layout.file_note_size) - layout.file_note_size)
}

fn write_sandcore_note(
    out: &mut ChunkWriter<'_, impl DumpSink + ?Sized>,
    info: &CrashInfo,
    layout: &CoreLayout,
) -> Result<(), CoreWriteError> {
    let (vector, error_code) = match info.kind {
        CrashKind::Exception { vector, error_code } => (u32::from(vector), error_code),
        CrashKind::StackOverflow { .. } => (14, 0),
        _ => (NO_VECTOR, 0),
    };
    let control = &info.control;
    let header = SandcoreNoteHeader {
        version: U32::new(SANDCORE_NOTE_VERSION),
        kind: U32::new(info.kind.code()),
        vector: U32::new(vector),
        message_truncated: U32::new(u32::from(info.message_truncated)),
        error_code: U64::new(error_code),
        cr0: U64::new(control.cr0),
        cr2: U64::new(control.cr2),
        cr3: U64::new(control.cr3),
        cr4: U64::new(control.cr4),
        efer: U64::new(control.efer),
        sandbox_id: U64::new(info.sandbox_id),
        dump_id: U64::new(info.dump_id),
        timestamp_ns: U64::new(info.timestamp_ns),
        build_id_len: U32::new(info.build_id.len() as u32),
        function_len: U32::new(info.function.len() as u32),
        message_len: U32::new(info.message.len() as u32),
        reserved: U32::new(0),
    };
    write_note_header(
        out,
        NOTE_NAME_SANDCORE,
        NT_SANDCORE_CRASH,
        layout.sandcore_note_size,
    )?;
    out.write(header.as_bytes())?;
    out.write(&info.build_id)?;
    out.write(info.function.as_bytes())?;
    out.write(info.message.as_bytes())?;
    out.zeros(align4(layout.sandcore_note_size) - layout.sandcore_note_size)
}

/// Sends a region's pages, turning each run of zero pages into one hole.
fn write_region(
    out: &mut ChunkWriter<'_, impl DumpSink + ?Sized>,
    region: &MemoryRegion,
    source: &impl GuestMemorySource,
) -> Result<(), CoreWriteError> {
    // validate_regions checked that the source has exactly region.size bytes.
    let bytes = source.region_bytes(region).unwrap_or_default();
    let page = PAGE_SIZE as usize;
    let mut data_start = 0usize;
    let mut offset = 0usize;
    while offset < bytes.len() {
        let address = region.guest_address + offset as u64;
        let page_bytes = &bytes[offset..offset + page];
        let is_zero = !source.page_may_be_nonzero(address) || is_zero_page(page_bytes);
        if is_zero {
            out.write_guest(&bytes[data_start..offset])?;
            out.hole(PAGE_SIZE)?;
            data_start = offset + page;
        }
        offset += page;
    }
    out.write_guest(&bytes[data_start..])
}

fn is_zero_page(bytes: &[u8]) -> bool {
    // Comparing u64 words lets the compiler vectorize the scan.
    bytes.chunks_exact(8).all(|word| {
        u64::from_ne_bytes([
            word[0], word[1], word[2], word[3], word[4], word[5], word[6], word[7],
        ]) == 0
    })
}

/// Forward-only writer over a sink that batches small writes in a one-page
/// buffer and merges consecutive holes.
struct ChunkWriter<'s, S: DumpSink + ?Sized> {
    sink: &'s mut S,
    buffer: [u8; PAGE_SIZE as usize],
    buffered: usize,
    pending_hole: u64,
    /// Bytes handed to the sink plus bytes buffered or pending.
    position: u64,
}

/// One page of zeros, the source of padding bytes.
static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

impl<'s, S: DumpSink + ?Sized> ChunkWriter<'s, S> {
    fn new(sink: &'s mut S) -> Self {
        ChunkWriter {
            sink,
            buffer: [0; PAGE_SIZE as usize],
            buffered: 0,
            pending_hole: 0,
            position: 0,
        }
    }

    fn position(&self) -> u64 {
        self.position
    }

    /// Appends header or note bytes through the buffer.
    fn write(&mut self, mut bytes: &[u8]) -> Result<(), CoreWriteError> {
        self.flush_hole()?;
        self.position += bytes.len() as u64;
        while !bytes.is_empty() {
            let take = bytes.len().min(self.buffer.len() - self.buffered);
            self.buffer[self.buffered..self.buffered + take].copy_from_slice(&bytes[..take]);
            self.buffered += take;
            bytes = &bytes[take..];
            if self.buffered == self.buffer.len() {
                self.flush_buffer()?;
            }
        }
        Ok(())
    }

    /// Appends `length` zero bytes of padding as data (holes are reserved for whole pages).
    fn zeros(&mut self, mut length: u64) -> Result<(), CoreWriteError> {
        while length > 0 {
            let take = length.min(PAGE_SIZE);
            self.write(&ZERO_PAGE[..take as usize])?;
            length -= take;
        }
        Ok(())
    }

    /// Appends guest memory straight to the sink in chunks of at most [`MAX_DATA_CHUNK`].
    fn write_guest(&mut self, bytes: &[u8]) -> Result<(), CoreWriteError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.flush()?;
        for chunk in bytes.chunks(MAX_DATA_CHUNK) {
            self.sink.data(chunk)?;
        }
        self.position += bytes.len() as u64;
        Ok(())
    }

    fn hole(&mut self, length: u64) -> Result<(), CoreWriteError> {
        self.flush_buffer()?;
        self.pending_hole += length;
        self.position += length;
        Ok(())
    }

    fn flush_buffer(&mut self) -> Result<(), CoreWriteError> {
        if self.buffered > 0 {
            let buffered = self.buffered;
            self.buffered = 0;
            self.sink.data(&self.buffer[..buffered])?;
        }
        Ok(())
    }

    fn flush_hole(&mut self) -> Result<(), CoreWriteError> {
        if self.pending_hole > 0 {
            let length = self.pending_hole;
            self.pending_hole = 0;
            self.sink.hole(length)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), CoreWriteError> {
        self.flush_buffer()?;
        self.flush_hole()
    }
}
