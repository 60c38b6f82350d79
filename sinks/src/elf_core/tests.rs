//! Tests of the ELF core writer, reading its output back with the `object` crate.

use object::elf;
use object::read::elf::{FileHeader, ProgramHeader as _};
use object::LittleEndian;

use super::records::*;
use super::*;
use crate::sink::{DumpMetadata, DumpSink, SinkError, SinkErrorKind, SinkReceipt};
use crate::snapshot::{ControlRegisters, Registers};

/// One call the writer made on the sink.
#[derive(Clone, Debug, PartialEq, Eq)]
enum SinkCall {
    Begin,
    Data(usize),
    Hole(u64),
    Finish,
    Abort,
}

/// Sink that stores the core in memory and records every call.
struct CollectingSink {
    bytes: Vec<u8>,
    calls: Vec<SinkCall>,
    metadata: Option<DumpMetadata>,
    /// When false, holes are counted but not stored, and data after the
    /// first hole is dropped (for cores too large to expand).
    expand_holes: bool,
    seen_hole: bool,
    position: u64,
    /// Fail the `data` call that would cross this file offset.
    fail_at: Option<u64>,
}

impl CollectingSink {
    fn new() -> Self {
        CollectingSink {
            bytes: Vec::new(),
            calls: Vec::new(),
            metadata: None,
            expand_holes: true,
            seen_hole: false,
            position: 0,
            fail_at: None,
        }
    }
}

impl DumpSink for CollectingSink {
    fn begin(&mut self, metadata: &DumpMetadata) -> Result<(), SinkError> {
        self.calls.push(SinkCall::Begin);
        self.metadata = Some(metadata.clone());
        Ok(())
    }

    fn data(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        if let Some(limit) = self.fail_at {
            if self.position + bytes.len() as u64 > limit {
                return Err(SinkError::new(
                    SinkErrorKind::Io,
                    "test sink: injected failure",
                ));
            }
        }
        self.calls.push(SinkCall::Data(bytes.len()));
        if self.expand_holes || !self.seen_hole {
            self.bytes.extend_from_slice(bytes);
        }
        self.position += bytes.len() as u64;
        Ok(())
    }

    fn hole(&mut self, length: u64) -> Result<(), SinkError> {
        self.calls.push(SinkCall::Hole(length));
        if self.expand_holes {
            self.bytes.resize(self.bytes.len() + length as usize, 0);
        }
        self.seen_hole = true;
        self.position += length;
        Ok(())
    }

    fn finish(&mut self) -> Result<SinkReceipt, SinkError> {
        self.calls.push(SinkCall::Finish);
        let mut location = heapless::String::new();
        location.push_str("test").unwrap();
        Ok(SinkReceipt {
            location,
            bytes: self.position,
        })
    }

    fn abort(&mut self) {
        self.calls.push(SinkCall::Abort);
    }

    fn name(&self) -> &str {
        "collecting"
    }
}

/// Guest memory backed by one buffer that starts at `base`.
struct BufferSource {
    base: u64,
    bytes: Vec<u8>,
    /// Pages the source reports as known-zero without their bytes being checked.
    known_zero: Vec<u64>,
}

impl GuestMemorySource for BufferSource {
    fn region_bytes(&self, region: &MemoryRegion) -> Option<&[u8]> {
        let start = region.guest_address.checked_sub(self.base)? as usize;
        self.bytes.get(start..start + region.size as usize)
    }

    fn page_may_be_nonzero(&self, guest_address: u64) -> bool {
        !self.known_zero.contains(&guest_address)
    }
}

const BASE: u64 = 0x20_0000;
const PAGE: usize = 4096;

fn registers() -> Registers {
    Registers {
        rax: 0x1111_0000_0000_00a0,
        rbx: 0x1111_0000_0000_00b0,
        rcx: 0x1111_0000_0000_00c0,
        rdx: 0x1111_0000_0000_00d0,
        rsi: 0x1111_0000_0000_0051,
        rdi: 0x1111_0000_0000_00d1,
        rbp: 0x1111_0000_0000_00bb,
        rsp: 0x0000_0000_001f_f000,
        r8: 0x1111_0000_0000_0008,
        r9: 0x1111_0000_0000_0009,
        r10: 0x1111_0000_0000_0010,
        r11: 0x1111_0000_0000_0011,
        r12: 0x1111_0000_0000_0012,
        r13: 0x1111_0000_0000_0013,
        r14: 0x1111_0000_0000_0014,
        r15: 0x1111_0000_0000_0015,
        rip: 0x0000_0000_0020_1234,
        rflags: 0x10246,
        cs: 0x23,
        ss: 0x1b,
        ds: 0x1b,
        es: 0x1c,
        fs: 0x1d,
        gs: 0x1e,
        fs_base: 0x7000,
        gs_base: 0x8000,
    }
}

/// A page-fault crash with three regions: an image page, an RW data region
/// of four pages whose middle two are zero, and a known-zero stack page.
fn page_fault_info() -> (CrashInfo, BufferSource) {
    let mut xsave = [0u8; XSAVE_AREA_SIZE];
    for (index, byte) in xsave.iter_mut().enumerate() {
        *byte = (index % 251) as u8 + 1;
    }
    let mut info = CrashInfo {
        dump_id: 42,
        sandbox_id: 7,
        timestamp_ns: 1_700_000_000_123_456_789,
        kind: CrashKind::Exception {
            vector: 14,
            error_code: 0x6,
        },
        registers: registers(),
        control: ControlRegisters {
            cr0: 0x8000_0033,
            cr2: 0xdead_b000,
            cr3: 0x1000,
            cr4: 0x6a0,
            efer: 0xd01,
        },
        xsave,
        xcr0: 7,
        guest_name: heapless::String::new(),
        guest_path: heapless::String::new(),
        build_id: heapless::Vec::new(),
        function: heapless::String::new(),
        entry_point: 0x20_1000,
        message: heapless::String::new(),
        message_truncated: false,
        regions: heapless::Vec::new(),
    };
    info.guest_name
        .push_str("demo-guest-with-a-long-name")
        .unwrap();
    info.guest_path.push_str("/opt/guests/demo.elf").unwrap();
    info.build_id.extend_from_slice(&[0xab; 20]).unwrap();
    info.function.push_str("crash_null").unwrap();
    info.message
        .push_str("panicked at src/main.rs:3:5")
        .unwrap();

    let regions = [
        (
            BASE,
            1,
            RegionFlags::READ | RegionFlags::EXECUTE | RegionFlags::IMAGE,
            0x1000,
        ),
        (
            BASE + 0x1000,
            4,
            RegionFlags::READ | RegionFlags::WRITE | RegionFlags::IMAGE,
            0x2000,
        ),
        (BASE + 0x5000, 1, RegionFlags::READ | RegionFlags::WRITE, 0),
    ];
    for (address, pages, flags, file_offset) in regions {
        info.regions
            .push(MemoryRegion {
                guest_address: address,
                size: pages * PAGE as u64,
                flags,
                file_offset,
            })
            .unwrap();
    }

    let mut bytes = vec![0u8; 6 * PAGE];
    bytes[..PAGE].fill(0xcc);
    bytes[PAGE..2 * PAGE].fill(0x11);
    bytes[4 * PAGE..5 * PAGE].fill(0x44);
    // Non-zero bytes that the writer must not read: the source says the page is zero.
    bytes[5 * PAGE..].fill(0x55);
    let source = BufferSource {
        base: BASE,
        bytes,
        known_zero: vec![BASE + 0x5000],
    };
    (info, source)
}

fn write(info: &CrashInfo, source: &BufferSource) -> CollectingSink {
    let mut sink = CollectingSink::new();
    write_core(info, source, &mut sink).expect("write_core failed");
    sink
}

/// Returns (name, n_namesz, n_type, desc) of every note in the core.
fn notes(core: &[u8]) -> Vec<(Vec<u8>, u32, u32, Vec<u8>)> {
    let header = elf::FileHeader64::<LittleEndian>::parse(core).unwrap();
    let endian = header.endian().unwrap();
    let mut found = Vec::new();
    for phdr in header.program_headers(endian, core).unwrap() {
        if let Some(mut iter) = phdr.notes(endian, core).unwrap() {
            while let Some(note) = iter.next().unwrap() {
                found.push((
                    note.name().to_vec(),
                    note.n_namesz(endian),
                    note.n_type(endian).0,
                    note.desc().to_vec(),
                ));
            }
        }
    }
    found
}

fn note_desc(core: &[u8], note_type: u32) -> Vec<u8> {
    notes(core)
        .into_iter()
        .find(|note| note.2 == note_type)
        .map(|note| note.3)
        .unwrap_or_else(|| panic!("note type {note_type:#x} missing"))
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
}

fn i32_at(bytes: &[u8], offset: usize) -> i32 {
    i32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
}

#[test]
fn elf_header_fields() {
    let (info, source) = page_fault_info();
    let sink = write(&info, &source);
    let core = &sink.bytes;
    let header = elf::FileHeader64::<LittleEndian>::parse(&core[..]).unwrap();
    let endian = header.endian().unwrap();

    assert_eq!(&header.e_ident.magic, &elf::ELFMAG);
    assert_eq!(header.e_ident.class, elf::ELFCLASS64);
    assert_eq!(header.e_ident.data, elf::ELFDATA2LSB);
    assert_eq!(header.e_ident.os_abi, elf::ELFOSABI_NONE);
    assert_eq!(header.e_type.get(endian), elf::ET_CORE);
    assert_eq!(header.e_machine.get(endian), elf::EM_X86_64);
    assert_eq!(header.e_phoff.get(endian), 64);
    assert_eq!(header.e_phentsize.get(endian), 56);
    assert_eq!(header.e_phnum.get(endian), 4);
    assert_eq!(header.e_shnum.get(endian), 0);
    assert_eq!(header.e_shoff.get(endian), 0);
}

#[test]
fn program_headers_match_regions() {
    let (info, source) = page_fault_info();
    let sink = write(&info, &source);
    let core = &sink.bytes;
    let layout = CoreLayout::compute(&info, &source).unwrap();
    let header = elf::FileHeader64::<LittleEndian>::parse(&core[..]).unwrap();
    let endian = header.endian().unwrap();
    let phdrs = header.program_headers(endian, &core[..]).unwrap();

    assert_eq!(core.len() as u64, layout.total_size);
    assert_eq!(
        sink.metadata.as_ref().unwrap().total_size,
        layout.total_size
    );
    assert_eq!(phdrs.len(), 4);

    let note = &phdrs[0];
    assert_eq!(note.p_type(endian), elf::PT_NOTE);
    assert_eq!(note.p_align(endian), 4);
    assert_eq!(note.p_offset(endian), layout.notes_offset);
    assert_eq!(note.p_filesz(endian), layout.notes_size);

    let expected_flags = [
        elf::PF_R | elf::PF_X,
        elf::PF_R | elf::PF_W,
        elf::PF_R | elf::PF_W,
    ];
    let mut previous_end = 0;
    for (index, (phdr, region)) in phdrs[1..].iter().zip(&info.regions).enumerate() {
        assert_eq!(phdr.p_type(endian), elf::PT_LOAD, "segment {index}");
        assert_eq!(
            phdr.p_vaddr(endian),
            region.guest_address,
            "segment {index}"
        );
        assert_eq!(
            phdr.p_paddr(endian),
            region.guest_address,
            "segment {index}"
        );
        assert_eq!(phdr.p_filesz(endian), region.size, "segment {index}");
        assert_eq!(phdr.p_memsz(endian), region.size, "segment {index}");
        assert_eq!(phdr.p_align(endian), 4096, "segment {index}");
        assert_eq!(
            phdr.p_flags(endian),
            expected_flags[index],
            "segment {index}"
        );
        let offset = phdr.p_offset(endian);
        assert_eq!(offset % 4096, 0, "segment {index}");
        assert!(offset >= previous_end, "segment {index} overlaps");
        previous_end = offset + region.size;

        let start = offset as usize;
        let file_bytes = &core[start..start + region.size as usize];
        let guest_start = (region.guest_address - BASE) as usize;
        if index < 2 {
            let guest_bytes = &source.bytes[guest_start..guest_start + region.size as usize];
            assert!(
                file_bytes == guest_bytes,
                "segment {index} data differs from guest memory"
            );
        } else {
            assert!(
                file_bytes.iter().all(|&b| b == 0),
                "known-zero page was not written as zeros"
            );
        }
    }
    assert_eq!(previous_end, layout.total_size);
}

#[test]
fn notes_in_kernel_order() {
    let (info, source) = page_fault_info();
    let sink = write(&info, &source);
    let found = notes(&sink.bytes);
    let summary: Vec<(&[u8], u32, u32, usize)> = found
        .iter()
        .map(|(name, namesz, n_type, desc)| (&name[..], *namesz, *n_type, desc.len()))
        .collect();

    let path_len = info.guest_path.len() + 1;
    let file_size = 16 + 2 * (24 + path_len);
    let sandcore_size = 104 + 20 + info.function.len() + info.message.len();
    let expected: Vec<(&[u8], u32, u32, usize)> = vec![
        (b"CORE", 5, NT_PRSTATUS, 336),
        (b"CORE", 5, NT_PRPSINFO, 136),
        (b"CORE", 5, NT_SIGINFO, 128),
        (b"CORE", 5, NT_AUXV, 48),
        (b"CORE", 5, NT_FILE, file_size),
        (b"CORE", 5, NT_FPREGSET, 512),
        (b"LINUX", 6, NT_X86_XSTATE, 832),
        (b"SANDCORE", 9, NT_SANDCORE_CRASH, sandcore_size),
    ];
    assert_eq!(summary, expected);
}

#[test]
fn prstatus_registers_and_signal() {
    let (info, source) = page_fault_info();
    let sink = write(&info, &source);
    let prstatus = note_desc(&sink.bytes, NT_PRSTATUS);
    let r = registers();

    assert_eq!(i32_at(&prstatus, 0), 11, "si_signo");
    assert_eq!(
        i16::from_le_bytes([prstatus[12], prstatus[13]]),
        11,
        "pr_cursig"
    );
    assert_eq!(i32_at(&prstatus, 32), 1, "pr_pid");
    assert_eq!(i32_at(&prstatus, 328), 1, "pr_fpvalid");

    let expected = [
        ("r15", r.r15),
        ("r14", r.r14),
        ("r13", r.r13),
        ("r12", r.r12),
        ("rbp", r.rbp),
        ("rbx", r.rbx),
        ("r11", r.r11),
        ("r10", r.r10),
        ("r9", r.r9),
        ("r8", r.r8),
        ("rax", r.rax),
        ("rcx", r.rcx),
        ("rdx", r.rdx),
        ("rsi", r.rsi),
        ("rdi", r.rdi),
        ("orig_rax", u64::MAX),
        ("rip", r.rip),
        ("cs", r.cs),
        ("eflags", r.rflags),
        ("rsp", r.rsp),
        ("ss", r.ss),
        ("fs_base", r.fs_base),
        ("gs_base", r.gs_base),
        ("ds", r.ds),
        ("es", r.es),
        ("fs", r.fs),
        ("gs", r.gs),
    ];
    for (index, (name, value)) in expected.iter().enumerate() {
        assert_eq!(
            u64_at(&prstatus, 112 + index * 8),
            *value,
            "register {name}"
        );
    }
}

#[test]
fn prpsinfo_names_guest_and_function() {
    let (info, source) = page_fault_info();
    let sink = write(&info, &source);
    let prpsinfo = note_desc(&sink.bytes, NT_PRPSINFO);

    assert_eq!(prpsinfo[1], b'R', "pr_sname");
    assert_eq!(i32_at(&prpsinfo, 24), 1, "pr_pid");
    assert_eq!(
        &prpsinfo[40..56],
        b"demo-guest-with\0",
        "pr_fname keeps 15 bytes and a NUL"
    );
    let psargs = &prpsinfo[56..136];
    let text_len = psargs.iter().position(|&b| b == 0).unwrap();
    assert_eq!(&psargs[..text_len], b"/opt/guests/demo.elf crash_null");
}

#[test]
fn siginfo_has_fault_address() {
    let (info, source) = page_fault_info();
    let sink = write(&info, &source);
    let siginfo = note_desc(&sink.bytes, NT_SIGINFO);

    assert_eq!(i32_at(&siginfo, 0), 11, "si_signo");
    assert_eq!(
        i32_at(&siginfo, 8),
        1,
        "si_code SEGV_MAPERR for a not-present page"
    );
    assert_eq!(u64_at(&siginfo, 16), 0xdead_b000, "si_addr");
}

#[test]
fn siginfo_code_for_protection_fault() {
    let (mut info, source) = page_fault_info();
    info.kind = CrashKind::Exception {
        vector: 14,
        error_code: 0x7,
    };
    let sink = write(&info, &source);
    let siginfo = note_desc(&sink.bytes, NT_SIGINFO);
    assert_eq!(
        i32_at(&siginfo, 8),
        2,
        "si_code SEGV_ACCERR for a present page"
    );
}

#[test]
fn panic_signal_and_no_address() {
    let (mut info, source) = page_fault_info();
    info.kind = CrashKind::Panic;
    let sink = write(&info, &source);
    let prstatus = note_desc(&sink.bytes, NT_PRSTATUS);
    let siginfo = note_desc(&sink.bytes, NT_SIGINFO);

    assert_eq!(
        i16::from_le_bytes([prstatus[12], prstatus[13]]),
        6,
        "pr_cursig SIGABRT"
    );
    assert_eq!(i32_at(&siginfo, 0), 6, "si_signo");
    assert_eq!(u64_at(&siginfo, 16), 0, "si_addr");
}

#[test]
fn auxv_and_file_notes() {
    let (info, source) = page_fault_info();
    let sink = write(&info, &source);

    let auxv = note_desc(&sink.bytes, NT_AUXV);
    let pairs: Vec<u64> = (0..6).map(|index| u64_at(&auxv, index * 8)).collect();
    assert_eq!(pairs, vec![9, 0x20_1000, 6, 4096, 0, 0]);

    let file = note_desc(&sink.bytes, NT_FILE);
    assert_eq!(u64_at(&file, 0), 2, "mapping count");
    assert_eq!(u64_at(&file, 8), 4096, "page size");
    assert_eq!(
        (u64_at(&file, 16), u64_at(&file, 24), u64_at(&file, 32)),
        (BASE, BASE + 0x1000, 1)
    );
    assert_eq!(
        (u64_at(&file, 40), u64_at(&file, 48), u64_at(&file, 56)),
        (BASE + 0x1000, BASE + 0x5000, 2)
    );
    let names = &file[64..];
    assert_eq!(names, b"/opt/guests/demo.elf\0/opt/guests/demo.elf\0");
}

#[test]
fn fpregset_is_fxsave_image() {
    let (info, source) = page_fault_info();
    let sink = write(&info, &source);
    let fpregset = note_desc(&sink.bytes, NT_FPREGSET);
    assert!(fpregset[..] == info.xsave[..512]);
}

fn xstate_for(xcr0: u64) -> Vec<u8> {
    let (mut info, source) = page_fault_info();
    info.xcr0 = xcr0;
    let sink = write(&info, &source);
    note_desc(&sink.bytes, NT_X86_XSTATE)
}

#[test]
fn xstate_size_for_sse() {
    let xstate = xstate_for(3);
    assert_eq!(xstate.len(), 576);
    assert_eq!(u64_at(&xstate, 464), 3, "XCR0 at byte 464");
}

#[test]
fn xstate_size_for_avx() {
    let (info, _) = page_fault_info();
    let xstate = xstate_for(7);
    assert_eq!(xstate.len(), 832);
    assert_eq!(u64_at(&xstate, 464), 7, "XCR0 at byte 464");
    assert!(xstate[..464] == info.xsave[..464], "legacy area copied");
    assert!(
        xstate[472..512].iter().all(|&b| b == 0),
        "sw_reserved after XCR0 is zero"
    );
    assert_eq!(
        u64_at(&xstate, 512),
        u64_at(&info.xsave, 512) & 7,
        "XSTATE_BV limited to XCR0"
    );
    assert!(
        xstate[520..832] == info.xsave[520..832],
        "header rest and AVX state copied"
    );
}

#[test]
fn xstate_size_for_avx512_and_amx() {
    // x87|SSE|AVX|opmask|ZMM_Hi256|Hi16_ZMM|PKRU ends at 2696 bytes.
    let avx512 = 0x2e7;
    assert_eq!(xstate_for(avx512).len(), 2696);
    // AMX tile data (bit 18) does not fit the 4096-byte area: it is dropped
    // from the recorded XCR0, and tile config (bit 17) ends at 2816.
    let amx = avx512 | (1 << 17) | (1 << 18);
    let xstate = xstate_for(amx);
    assert_eq!(xstate.len(), 2816);
    assert_eq!(u64_at(&xstate, 464), amx & !(1 << 18));
}

#[test]
fn sandcore_note_fields() {
    let (mut info, source) = page_fault_info();
    info.message_truncated = true;
    let sink = write(&info, &source);
    let note = note_desc(&sink.bytes, NT_SANDCORE_CRASH);

    assert_eq!(u32_at(&note, 0), SANDCORE_NOTE_VERSION, "version");
    assert_eq!(u32_at(&note, 4), 1, "kind code of Exception");
    assert_eq!(u32_at(&note, 8), 14, "vector");
    assert_eq!(u32_at(&note, 12), 1, "message_truncated");
    assert_eq!(u64_at(&note, 16), 0x6, "error code");
    assert_eq!(u64_at(&note, 24), 0x8000_0033, "cr0");
    assert_eq!(u64_at(&note, 32), 0xdead_b000, "cr2");
    assert_eq!(u64_at(&note, 40), 0x1000, "cr3");
    assert_eq!(u64_at(&note, 48), 0x6a0, "cr4");
    assert_eq!(u64_at(&note, 56), 0xd01, "efer");
    assert_eq!(u64_at(&note, 64), 7, "sandbox id");
    assert_eq!(u64_at(&note, 72), 42, "dump id");
    assert_eq!(u64_at(&note, 80), 1_700_000_000_123_456_789, "timestamp");
    assert_eq!(u32_at(&note, 88), 20, "build id length");
    assert_eq!(u32_at(&note, 92), 10, "function length");
    assert_eq!(u32_at(&note, 96), 27, "message length");
    assert_eq!(&note[104..124], &[0xab; 20][..]);
    assert_eq!(&note[124..134], b"crash_null");
    assert_eq!(&note[134..161], b"panicked at src/main.rs:3:5");
}

#[test]
fn zero_pages_become_merged_holes() {
    let (info, source) = page_fault_info();
    let sink = write(&info, &source);
    let layout = CoreLayout::compute(&info, &source).unwrap();

    let memory_calls: Vec<SinkCall> = {
        let mut position = 0u64;
        let mut calls = Vec::new();
        for call in &sink.calls {
            let before = position;
            match call {
                SinkCall::Data(length) => position += *length as u64,
                SinkCall::Hole(length) => position += length,
                _ => {}
            }
            if before >= layout.data_offset {
                calls.push(call.clone());
            }
        }
        calls
    };
    // Image page and first data page (one call per region), two zero pages
    // merged into one hole, a data page, then the known-zero stack page.
    assert_eq!(
        memory_calls,
        vec![
            SinkCall::Data(PAGE),
            SinkCall::Data(PAGE),
            SinkCall::Hole(2 * PAGE as u64),
            SinkCall::Data(PAGE),
            SinkCall::Hole(PAGE as u64),
            SinkCall::Finish,
        ]
    );
    assert_eq!(sink.calls.first(), Some(&SinkCall::Begin));
}

#[test]
fn holes_merge_across_regions() {
    let (mut info, mut source) = page_fault_info();
    source.bytes[4 * PAGE..5 * PAGE].fill(0);
    let sink = write(&info, &source);
    let holes: Vec<&SinkCall> = sink
        .calls
        .iter()
        .filter(|call| matches!(call, SinkCall::Hole(_)))
        .collect();
    assert_eq!(holes, vec![&SinkCall::Hole(4 * PAGE as u64)]);

    info.regions.clear();
    let sink = write(&info, &source);
    let layout = CoreLayout::compute(&info, &source).unwrap();
    assert_eq!(
        sink.bytes.len() as u64,
        layout.data_offset,
        "a core without regions ends after its notes"
    );
}

/// Memory source where every region is one page of zeros and every page is known zero.
struct AllZeroSource;

static ZEROS: [u8; PAGE] = [0; PAGE];

impl GuestMemorySource for AllZeroSource {
    fn region_bytes(&self, region: &MemoryRegion) -> Option<&[u8]> {
        ZEROS.get(..region.size as usize)
    }

    fn page_may_be_nonzero(&self, _guest_address: u64) -> bool {
        false
    }
}

#[test]
fn extended_numbering_beyond_65534_segments() {
    const REGIONS: usize = 70_000;
    let (info, _) = page_fault_info();
    let regions: Vec<MemoryRegion> = (0..REGIONS as u64)
        .map(|index| MemoryRegion {
            guest_address: 0x10_0000 + index * 0x2000,
            size: 4096,
            flags: RegionFlags::READ,
            file_offset: 0,
        })
        .collect();
    let mut sink = CollectingSink::new();
    sink.expand_holes = false;
    write_core_with_regions(&info, &regions, &AllZeroSource, &mut sink).unwrap();

    let core = &sink.bytes;
    let layout = CoreLayout::compute_with_regions(&info, &regions, &AllZeroSource).unwrap();
    assert!(layout.uses_extended_numbering);
    assert_eq!(
        core.len() as u64,
        layout.data_offset,
        "all memory was sent as holes"
    );
    assert_eq!(sink.position, layout.total_size);

    let header = elf::FileHeader64::<LittleEndian>::parse(&core[..]).unwrap();
    let endian = header.endian().unwrap();
    assert_eq!(header.e_phnum.get(endian), 0xffff, "e_phnum is PN_XNUM");
    assert_eq!(header.e_shnum.get(endian), 1);
    assert_eq!(header.e_shstrndx.get(endian).0, 0);
    let shoff = header.e_shoff.get(endian) as usize;
    assert_eq!(
        u32_at(core, shoff + 44),
        (REGIONS + 1) as u32,
        "sh_info is the real count"
    );
    assert_eq!(
        header.phnum(endian, &core[..]).unwrap() as usize,
        REGIONS + 1
    );

    let phdrs = header.program_headers(endian, &core[..]).unwrap();
    assert_eq!(phdrs.len(), REGIONS + 1);
    let last = &phdrs[REGIONS];
    assert_eq!(last.p_vaddr(endian), regions[REGIONS - 1].guest_address);
    assert_eq!(last.p_offset(endian), layout.total_size - 4096);
    assert_eq!(notes(core).len(), 8);
    assert_eq!(
        sink.calls
            .iter()
            .filter(|call| matches!(call, SinkCall::Hole(_)))
            .count(),
        1,
        "all zero pages merge into one hole"
    );
}

#[test]
fn invalid_region_rejected_before_begin() {
    let (mut info, source) = page_fault_info();
    info.regions[1].guest_address += 1;
    let mut sink = CollectingSink::new();
    let error = write_core(&info, &source, &mut sink).unwrap_err();
    assert!(
        matches!(error, CoreWriteError::InvalidRegion { index: 1, .. }),
        "{error:?}"
    );
    assert!(sink.calls.is_empty());

    let (mut info, source) = page_fault_info();
    info.regions[2].guest_address = BASE;
    let error = write_core(&info, &source, &mut CollectingSink::new()).unwrap_err();
    assert!(
        matches!(error, CoreWriteError::InvalidRegion { index: 2, .. }),
        "{error:?}"
    );

    let (mut info, source) = page_fault_info();
    info.regions[2].size += 4096;
    let error = write_core(&info, &source, &mut CollectingSink::new()).unwrap_err();
    assert!(
        matches!(error, CoreWriteError::MissingMemory { index: 2, .. }),
        "{error:?}"
    );
    let message = std::format!("{error}");
    assert!(message.contains("0x205000"), "{message}");
}

#[test]
fn sink_failure_aborts_dump() {
    let (info, source) = page_fault_info();
    let mut sink = CollectingSink::new();
    sink.fail_at = Some(5000);
    let error = write_core(&info, &source, &mut sink).unwrap_err();
    assert!(
        matches!(error, CoreWriteError::Sink(ref e) if e.kind == SinkErrorKind::Io),
        "{error:?}"
    );
    assert_eq!(sink.calls.last(), Some(&SinkCall::Abort));
    assert!(!sink.calls.contains(&SinkCall::Finish));
}

#[test]
fn readelf_lists_note_sizes() {
    let (info, source) = page_fault_info();
    let sink = write(&info, &source);
    let path = std::env::temp_dir().join(std::format!(
        "sandcore-elf-core-test-{}.core",
        std::process::id()
    ));
    std::fs::write(&path, &sink.bytes).unwrap();
    let output = std::process::Command::new("readelf")
        .arg("-n")
        .arg(&path)
        .output();
    std::fs::remove_file(&path).unwrap();
    let output = output.expect("readelf is not installed; install binutils");
    assert!(
        output.status.success(),
        "readelf failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);

    for (owner, size, description) in [
        ("CORE", "0x00000150", "NT_PRSTATUS"),
        ("CORE", "0x00000088", "NT_PRPSINFO"),
        ("CORE", "0x00000080", "NT_SIGINFO"),
        ("CORE", "0x00000030", "NT_AUXV"),
        ("CORE", "0x00000200", "NT_FPREGSET"),
        ("LINUX", "0x00000340", "NT_X86_XSTATE"),
    ] {
        let found = text.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.first() == Some(&owner)
                && fields.get(1) == Some(&size)
                && fields.get(2) == Some(&description)
        });
        assert!(
            found,
            "readelf -n does not list {owner} {size} {description}:\n{text}"
        );
    }
    assert!(
        text.contains("SANDCORE"),
        "readelf -n does not list the SANDCORE note:\n{text}"
    );
    // NOTE: readelf 2.40 of Debian prints "Cannot decode 64-bit note in
    // 32-bit build" for NT_FILE, so the paths are checked through gdb instead.
}

#[test]
fn gdb_reads_signal_registers_and_mappings() {
    let (info, source) = page_fault_info();
    let sink = write(&info, &source);
    let path = std::env::temp_dir().join(std::format!(
        "sandcore-elf-core-gdb-{}.core",
        std::process::id()
    ));
    std::fs::write(&path, &sink.bytes).unwrap();
    let output = std::process::Command::new("gdb")
        .args(["-nx", "-batch"])
        .args(["-ex", "info registers rip rsp rax r15 eflags"])
        .args(["-ex", "print/x $_siginfo._sifields._sigfault.si_addr"])
        .args(["-ex", "print $xmm0.v4_int32[0]"])
        .args(["-ex", "info proc mappings"])
        .arg("-core")
        .arg(&path)
        .output();
    std::fs::remove_file(&path).unwrap();
    let output = output.expect("gdb is not installed; install gdb");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);

    for expected in [
        "Core was generated by `/opt/guests/demo.elf crash_null'",
        "Program terminated with signal SIGSEGV",
        "0x201234",
        "0x1ff000",
        "0x11110000000000a0",
        "0x1111000000000015",
        "0xdeadb000",
        "0x201000           0x205000     0x4000     0x2000 /opt/guests/demo.elf",
        // XMM0 is bytes 160..164 of the FXSAVE image: 0xa4a3a2a1 in the test pattern.
        "$2 = -1532779871",
    ] {
        assert!(
            text.contains(expected),
            "gdb output lacks {expected:?}:\n{text}"
        );
    }
    // The only expected warning: the guest binary named in NT_FILE does not exist here.
    let warnings: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("warning") && !line.contains("Can't open file"))
        .collect();
    assert!(warnings.is_empty(), "gdb warned:\n{text}");
}
