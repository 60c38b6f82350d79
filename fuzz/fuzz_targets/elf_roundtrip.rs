//! Fuzz target: the streaming ELF core writer and the core reader, round trip.
//!
//! The input is decoded into a `CrashInfo` with up to 32 memory regions and a
//! guest memory buffer of zero, sparse and random pages. The target writes the
//! core into a sink that checks the `DumpSink` call order and expands holes
//! into zero bytes, then parses the file back: ELF header, program headers,
//! every `PT_LOAD` against the source bytes and the notes through
//! `core_reader::read_summary`. A deliberately broken region list must fail
//! before `begin`. The reader also gets the raw input, the core cut at an
//! input-chosen length and the core with input-chosen bytes patched, and must
//! return an error rather than panic on all of them.
//!
//! With the `libfuzzer` feature (the default) this is a cargo-fuzz target.
//! Without it, it is a plain program that runs the same check over the files
//! given as arguments, or over built-in seed inputs when given none.
#![cfg_attr(feature = "libfuzzer", no_main)]

use std::borrow::Cow;
use std::collections::BTreeSet;

use sandcore_sinks::core_reader::{self, CoreSummary};
use sandcore_sinks::elf_core::records::{
    EHDR_SIZE, EM_X86_64, ET_CORE, PAGE_SIZE, PF_R, PF_W, PF_X, PHDR_SIZE, PN_XNUM, PT_LOAD,
    PT_NOTE,
};
use sandcore_sinks::elf_core::{self, CoreLayout, CoreWriteError, MAX_DATA_CHUNK};
use sandcore_sinks::sink::{DumpMetadata, DumpSink, SinkError, SinkReceipt};
use sandcore_sinks::snapshot::{
    ControlRegisters, CrashInfo, CrashKind, GuestMemorySource, MemoryRegion, RegionFlags,
    Registers, MAX_REGIONS, XSAVE_AREA_SIZE,
};

/// XCR0 values of common CPUs: x87 only, SSE, AVX, AVX-512.
const COMMON_XCR0: [u64; 4] = [0x1, 0x3, 0x7, 0xe7];
/// Maximum pages of one generated region.
const MAX_REGION_PAGES: u64 = 16;
const PAGE: usize = PAGE_SIZE as usize;

/// Reads fuzz input front to back; once it is used up, every read returns zeros.
struct Input<'a> {
    bytes: &'a [u8],
}

impl Input<'_> {
    fn take(&mut self, count: usize) -> &[u8] {
        let count = count.min(self.bytes.len());
        let (head, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        head
    }

    fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u64(&mut self) -> u64 {
        let mut word = [0u8; 8];
        let bytes = self.take(8);
        word[..bytes.len()].copy_from_slice(bytes);
        u64::from_le_bytes(word)
    }

    /// Takes a length byte and that many bytes, as lossy UTF-8.
    fn text(&mut self) -> Cow<'_, str> {
        let length = usize::from(self.u8()) * 3;
        String::from_utf8_lossy(self.take(length))
    }
}

/// Copies `text` into a fixed-capacity string, cut on a character boundary.
/// Returns the string and whether it was cut.
fn truncate<const N: usize>(text: &str) -> (heapless::String<N>, bool) {
    let mut stored = heapless::String::new();
    for ch in text.chars() {
        if stored.push(ch).is_err() {
            return (stored, true);
        }
    }
    (stored, false)
}

fn crash_kind(input: &mut Input) -> CrashKind {
    match input.u8() % 9 {
        0 => CrashKind::Exception {
            vector: input.u8(),
            error_code: input.u64(),
        },
        1 => CrashKind::StackOverflow {
            address: input.u64(),
        },
        2 => CrashKind::Panic,
        3 => CrashKind::TripleFault,
        4 => CrashKind::InternalError,
        5 => CrashKind::UnexpectedExit,
        6 => CrashKind::Timeout,
        7 => CrashKind::Cancelled,
        _ => CrashKind::OnDemand,
    }
}

fn registers(input: &mut Input) -> Registers {
    Registers {
        rax: input.u64(),
        rbx: input.u64(),
        rcx: input.u64(),
        rdx: input.u64(),
        rsi: input.u64(),
        rdi: input.u64(),
        rbp: input.u64(),
        rsp: input.u64(),
        r8: input.u64(),
        r9: input.u64(),
        r10: input.u64(),
        r11: input.u64(),
        r12: input.u64(),
        r13: input.u64(),
        r14: input.u64(),
        r15: input.u64(),
        rip: input.u64(),
        rflags: input.u64(),
        cs: input.u64(),
        ss: input.u64(),
        ds: input.u64(),
        es: input.u64(),
        fs: input.u64(),
        gs: input.u64(),
        fs_base: input.u64(),
        gs_base: input.u64(),
    }
}

fn control_registers(input: &mut Input) -> ControlRegisters {
    ControlRegisters {
        cr0: input.u64(),
        cr2: input.u64(),
        cr3: input.u64(),
        cr4: input.u64(),
        efer: input.u64(),
    }
}

fn crash_info(input: &mut Input) -> CrashInfo {
    let dump_id = input.u64();
    let sandbox_id = input.u64();
    let timestamp_ns = input.u64();
    let kind = crash_kind(input);
    let registers = registers(input);
    let control = control_registers(input);

    let mut xsave = [0u8; XSAVE_AREA_SIZE];
    // A seed byte fills the area with a pattern so XSTATE_BV and the
    // component areas are nonzero without spending 4096 input bytes.
    let pattern = input.u8();
    for (index, byte) in xsave.iter_mut().enumerate() {
        *byte = pattern.wrapping_mul(index as u8).wrapping_add(pattern);
    }
    let xcr0_choice = input.u8();
    let xcr0 = match COMMON_XCR0.get(usize::from(xcr0_choice)) {
        Some(&common) => common,
        None => input.u64(),
    };

    let (guest_name, _) = truncate(&input.text());
    let (guest_path, _) = truncate(&input.text());
    let (function, _) = truncate(&input.text());
    let (message, message_cut) = truncate(&input.text());
    let message_truncated = message_cut || input.u8() & 1 != 0;
    let build_id_length = usize::from(input.u8()) % 33;
    let mut build_id = heapless::Vec::new();
    for &byte in input.take(build_id_length) {
        build_id.push(byte).expect("build id has at most 32 bytes");
    }

    CrashInfo {
        dump_id,
        sandbox_id,
        timestamp_ns,
        kind,
        registers,
        control,
        xsave,
        xcr0,
        guest_name,
        guest_path,
        build_id,
        function,
        entry_point: input.u64(),
        message,
        message_truncated,
        regions: heapless::Vec::new(),
    }
}

/// Guest memory over one buffer that contains every generated region back to back.
struct BufferSource {
    /// (guest address, size, offset in `memory`) of each backed range.
    ranges: Vec<(u64, u64, usize)>,
    memory: Vec<u8>,
    /// Guest addresses of zero pages that `page_may_be_nonzero` reports as zero.
    known_zero_pages: BTreeSet<u64>,
}

impl GuestMemorySource for BufferSource {
    fn region_bytes(&self, region: &MemoryRegion) -> Option<&[u8]> {
        let end = region.guest_address.checked_add(region.size)?;
        self.ranges
            .iter()
            .find(|&&(address, size, _)| region.guest_address >= address && end <= address + size)
            .map(|&(address, _, offset)| {
                let start = offset + (region.guest_address - address) as usize;
                &self.memory[start..start + region.size as usize]
            })
    }

    fn page_may_be_nonzero(&self, guest_address: u64) -> bool {
        !self.known_zero_pages.contains(&guest_address)
    }
}

/// Appends one page to `memory`: zero (often), one nonzero byte, or input bytes.
/// Returns true if the page is all zero.
fn push_page(input: &mut Input, memory: &mut Vec<u8>) -> bool {
    let start = memory.len();
    memory.resize(start + PAGE, 0);
    let page = &mut memory[start..];
    match input.u8() % 8 {
        0..=3 => {}
        4 | 5 => {
            // One nonzero byte, often at the first or last position, to
            // catch zero-page detection that skips part of the page.
            let position = match input.u8() % 3 {
                0 => 0,
                1 => PAGE - 1,
                _ => usize::from(input.u16()) % PAGE,
            };
            page[position] = input.u8() | 1;
        }
        _ => {
            let fill_length = usize::from(input.u8());
            let fill = input.take(fill_length);
            for (index, byte) in page.iter_mut().enumerate() {
                let from_input = fill.get(index % fill.len().max(1)).copied().unwrap_or(0);
                *byte = from_input ^ (index as u8);
            }
            // The XOR with the index can cancel the input out, so force one byte.
            page[0] |= 0x80;
        }
    }
    page.iter().all(|&byte| byte == 0)
}

/// Builds sorted, non-overlapping, page-aligned regions and their memory.
fn regions_and_memory(input: &mut Input, info: &mut CrashInfo) -> BufferSource {
    let count = usize::from(input.u8()) % (MAX_REGIONS + 1);
    let mut address = match input.u8() % 4 {
        // Near the top of the address space, to reach end-of-range arithmetic.
        0 => (u64::MAX - input.u64() % (1 << 24)) & !(PAGE_SIZE - 1),
        1 => input.u64() & !(PAGE_SIZE - 1),
        _ => (input.u64() & 0x0000_7fff_ffff_ffff) & !(PAGE_SIZE - 1),
    };
    let mut source = BufferSource {
        ranges: Vec::new(),
        memory: Vec::new(),
        known_zero_pages: BTreeSet::new(),
    };
    for index in 0..count {
        let gap_pages = match input.u8() % 4 {
            0 => 0,
            1 => 1,
            2 => u64::from(input.u16()),
            _ => input.u64() % (1 << 36),
        };
        if index > 0 {
            let Some(next) = address.checked_add(gap_pages * PAGE_SIZE) else {
                break;
            };
            address = next;
        }
        let pages = 1 + u64::from(input.u8()) % MAX_REGION_PAGES;
        let size = pages * PAGE_SIZE;
        // A region must end at or below u64::MAX; the writer rejects 2^64 as an end.
        let Some(end) = address.checked_add(size) else {
            break;
        };
        let flags = RegionFlags::from_bits_truncate(u32::from(input.u8()));
        let file_offset = u64::from(input.u16()) * PAGE_SIZE;
        let offset = source.memory.len();
        for page in 0..pages {
            let is_zero = push_page(input, &mut source.memory);
            if is_zero && input.u8() & 1 != 0 {
                source.known_zero_pages.insert(address + page * PAGE_SIZE);
            }
        }
        source.ranges.push((address, size, offset));
        info.regions
            .push(MemoryRegion {
                guest_address: address,
                size,
                flags,
                file_offset,
            })
            .expect("at most MAX_REGIONS regions");
        address = end;
    }
    source
}

/// Breaks one rule of the region list. Returns false if there was nothing to break.
fn break_regions(input: &mut Input, info: &mut CrashInfo, source: &mut BufferSource) -> bool {
    if info.regions.is_empty() {
        return false;
    }
    let index = usize::from(input.u8()) % info.regions.len();
    let previous = index.checked_sub(1).map(|previous| info.regions[previous]);
    let region = &mut info.regions[index];
    match input.u8() % 6 {
        0 => region.size = 0,
        1 => region.guest_address += 1 + u64::from(input.u16()) % (PAGE_SIZE - 1),
        2 => region.size -= 1 + u64::from(input.u16()) % (PAGE_SIZE - 1),
        3 => {
            // Moves the region into its predecessor, or past the end of the
            // address space for the first one.
            match previous {
                Some(previous) => {
                    region.guest_address = previous.guest_address + previous.size - PAGE_SIZE
                }
                None => {
                    region.guest_address = !(PAGE_SIZE - 1);
                    region.size = 2 * PAGE_SIZE;
                }
            }
        }
        4 => {
            // Bytes the source does not have.
            let address = region.guest_address;
            source.ranges.retain(|&(start, _, _)| start != address);
        }
        _ => region.size += PAGE_SIZE * (1 + u64::from(input.u8())),
    }
    true
}

#[derive(Debug, PartialEq, Eq)]
enum SinkState {
    Idle,
    Writing,
    Finished,
    Aborted,
}

/// Sink that stores the core in memory, writing holes as zero bytes, and
/// panics on any call that breaks the `DumpSink` contract.
struct CollectingSink {
    state: SinkState,
    metadata: Option<DumpMetadata>,
    bytes: Vec<u8>,
}

impl CollectingSink {
    fn new() -> Self {
        CollectingSink {
            state: SinkState::Idle,
            metadata: None,
            bytes: Vec::new(),
        }
    }

    fn total_size(&self) -> u64 {
        self.metadata.as_ref().expect("begin was called").total_size
    }

    fn append_check(&self, length: u64) {
        assert_eq!(
            self.state,
            SinkState::Writing,
            "data or hole outside a dump"
        );
        let end = self.bytes.len() as u64 + length;
        assert!(
            end <= self.total_size(),
            "writer sent {end} bytes, more than total_size {}",
            self.total_size()
        );
    }
}

impl DumpSink for CollectingSink {
    fn begin(&mut self, metadata: &DumpMetadata) -> Result<(), SinkError> {
        assert_eq!(self.state, SinkState::Idle, "begin called twice");
        self.state = SinkState::Writing;
        self.metadata = Some(metadata.clone());
        Ok(())
    }

    fn data(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        assert!(!bytes.is_empty(), "empty data chunk");
        assert!(
            bytes.len() <= MAX_DATA_CHUNK,
            "data chunk of {} bytes",
            bytes.len()
        );
        self.append_check(bytes.len() as u64);
        self.bytes.extend_from_slice(bytes);
        Ok(())
    }

    fn hole(&mut self, length: u64) -> Result<(), SinkError> {
        assert!(length > 0, "empty hole");
        assert_eq!(
            length % PAGE_SIZE,
            0,
            "hole of {length} bytes is not whole pages"
        );
        self.append_check(length);
        let end = self.bytes.len() + length as usize;
        self.bytes.resize(end, 0);
        Ok(())
    }

    fn finish(&mut self) -> Result<SinkReceipt, SinkError> {
        assert_eq!(self.state, SinkState::Writing, "finish outside a dump");
        assert_eq!(
            self.bytes.len() as u64,
            self.total_size(),
            "finish before total_size bytes"
        );
        self.state = SinkState::Finished;
        let mut location = heapless::String::new();
        location
            .push_str("memory")
            .expect("\"memory\" fits the 256-byte receipt location");
        Ok(SinkReceipt {
            location,
            bytes: self.bytes.len() as u64,
        })
    }

    fn abort(&mut self) {
        assert_eq!(self.state, SinkState::Writing, "abort outside a dump");
        self.state = SinkState::Aborted;
    }

    fn name(&self) -> &str {
        "memory"
    }
}

fn read_u16(bytes: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes(bytes[offset..offset + 2].try_into().unwrap())
}

fn read_u32(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
}

fn read_u64(bytes: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
}

/// Checks the ELF header and program headers of `core` against `info` and
/// `source`, and returns the end offset of the `PT_NOTE` segment.
fn check_elf(core: &[u8], info: &CrashInfo, source: &BufferSource, layout: &CoreLayout) -> usize {
    assert_eq!(&core[..4], b"\x7fELF", "ELF magic");
    assert_eq!(core[4], 2, "EI_CLASS is ELFCLASS64");
    assert_eq!(core[5], 1, "EI_DATA is ELFDATA2LSB");
    assert_eq!(read_u16(core, 16), ET_CORE, "e_type");
    assert_eq!(read_u16(core, 18), EM_X86_64, "e_machine");
    assert_eq!(read_u64(core, 32), EHDR_SIZE, "e_phoff");
    assert_eq!(u64::from(read_u16(core, 54)), PHDR_SIZE, "e_phentsize");

    let expected_count = 1 + info.regions.len() as u64;
    let e_phnum = read_u16(core, 56);
    let count = if e_phnum == PN_XNUM {
        let e_shoff = read_u64(core, 40) as usize;
        assert_ne!(e_shoff, 0, "PN_XNUM without a section header");
        u64::from(read_u32(core, e_shoff + 44))
    } else {
        assert_eq!(read_u16(core, 60), 0, "e_shnum without PN_XNUM");
        u64::from(e_phnum)
    };
    assert_eq!(count, expected_count, "program header count");
    assert_eq!(
        e_phnum == PN_XNUM,
        layout.uses_extended_numbering,
        "PN_XNUM use"
    );

    let phdr = |index: usize| EHDR_SIZE as usize + index * PHDR_SIZE as usize;
    assert_eq!(
        read_u32(core, phdr(0)),
        PT_NOTE,
        "first program header is PT_NOTE"
    );
    let notes_offset = read_u64(core, phdr(0) + 8);
    let notes_size = read_u64(core, phdr(0) + 32);
    assert_eq!(notes_offset, layout.notes_offset, "PT_NOTE p_offset");
    assert_eq!(notes_size, layout.notes_size, "PT_NOTE p_filesz");

    let mut previous_end = layout.data_offset;
    for (index, region) in info.regions.iter().enumerate() {
        let header = phdr(index + 1);
        assert_eq!(
            read_u32(core, header),
            PT_LOAD,
            "program header {} type",
            index + 1
        );
        let mut p_flags = 0;
        if region.flags.contains(RegionFlags::READ) {
            p_flags |= PF_R;
        }
        if region.flags.contains(RegionFlags::WRITE) {
            p_flags |= PF_W;
        }
        if region.flags.contains(RegionFlags::EXECUTE) {
            p_flags |= PF_X;
        }
        assert_eq!(
            read_u32(core, header + 4),
            p_flags,
            "PT_LOAD {index} p_flags"
        );
        let p_offset = read_u64(core, header + 8);
        assert_eq!(
            read_u64(core, header + 16),
            region.guest_address,
            "PT_LOAD {index} p_vaddr"
        );
        let p_filesz = read_u64(core, header + 32);
        assert_eq!(p_filesz, region.size, "PT_LOAD {index} p_filesz");
        assert_eq!(
            read_u64(core, header + 40),
            region.size,
            "PT_LOAD {index} p_memsz"
        );
        assert_eq!(
            p_offset % PAGE_SIZE,
            0,
            "PT_LOAD {index} p_offset is not page-aligned"
        );
        assert_eq!(
            p_offset, previous_end,
            "PT_LOAD {index} does not follow the previous segment"
        );
        previous_end = p_offset + p_filesz;

        let file_bytes = &core[p_offset as usize..previous_end as usize];
        let source_bytes = source
            .region_bytes(region)
            .expect("source has every region");
        assert!(
            file_bytes == source_bytes,
            "PT_LOAD {index} bytes differ from guest memory"
        );
    }
    assert_eq!(
        previous_end,
        core.len() as u64,
        "last segment ends at the end of the file"
    );
    (notes_offset + notes_size) as usize
}

fn check_summary(summary: &CoreSummary, info: &CrashInfo) {
    assert_eq!(summary.kind, info.kind, "kind");
    assert_eq!(summary.signal, info.kind.signal(), "signal");
    assert_eq!(summary.rip, info.registers.rip, "rip");
    assert_eq!(summary.rsp, info.registers.rsp, "rsp");
    assert_eq!(summary.fault_address, info.fault_address(), "fault address");
    assert_eq!(summary.control, info.control, "control registers");
    assert_eq!(summary.sandbox_id, info.sandbox_id, "sandbox id");
    assert_eq!(summary.dump_id, info.dump_id, "dump id");
    assert_eq!(summary.timestamp_ns, info.timestamp_ns, "timestamp");
    assert!(
        info.guest_name.starts_with(summary.guest_name),
        "guest name prefix"
    );
    assert!(
        summary.guest_name.len() <= 15,
        "pr_fname holds at most 15 bytes"
    );
    assert_eq!(summary.build_id, &info.build_id[..], "build id");
    assert_eq!(summary.function, info.function.as_str(), "function");
    assert_eq!(summary.message, info.message.as_str(), "message");
    assert_eq!(
        summary.message_truncated, info.message_truncated,
        "message_truncated"
    );
}

/// Runs the reader over `bytes`. It may fail but must not panic.
fn read_untrusted(bytes: &[u8]) {
    let _ = core_reader::read_summary(bytes);
    if let Ok(notes) = core_reader::notes(bytes) {
        let _ = notes.count();
    }
}

fn check(data: &[u8]) {
    read_untrusted(data);

    let mut input = Input { bytes: data };
    let mode = input.u8();
    let mut info = crash_info(&mut input);
    let mut source = regions_and_memory(&mut input, &mut info);
    let broken = mode & 0x0f == 0 && break_regions(&mut input, &mut info, &mut source);

    let mut sink = CollectingSink::new();
    let result = elf_core::write_core(&info, &source, &mut sink);
    if broken {
        assert!(
            matches!(
                result,
                Err(CoreWriteError::InvalidRegion { .. } | CoreWriteError::MissingMemory { .. })
            ),
            "broken region list returned {result:?}"
        );
        assert_eq!(
            sink.state,
            SinkState::Idle,
            "sink was called for a broken region list"
        );
        return;
    }

    let receipt = match result {
        Ok(receipt) => receipt,
        Err(error) => panic!("write_core failed on valid input: {error}"),
    };
    assert_eq!(sink.state, SinkState::Finished);
    let layout = CoreLayout::compute(&info, &source).expect("layout of valid regions");
    let metadata = sink.metadata.as_ref().expect("begin was called");
    assert_eq!(
        metadata,
        &elf_core::dump_metadata(&info, &layout),
        "metadata"
    );
    assert_eq!(metadata.total_size, layout.total_size, "total_size");
    assert_eq!(receipt.bytes, layout.total_size, "receipt bytes");

    let core = &sink.bytes;
    let notes_end = check_elf(core, &info, &source, &layout);
    let summary = core_reader::read_summary(core).expect("reader accepts the written core");
    check_summary(&summary, &info);
    let mut note_count = 0;
    for note in core_reader::notes(core).expect("notes of the written core") {
        note.expect("note of the written core");
        note_count += 1;
    }
    assert_eq!(note_count, 8, "note count");

    // The reader needs only the head of the core, up to the end of the notes.
    let cut = usize::from(input.u16()) % (notes_end + 1);
    let head = &core[..cut.max(notes_end)];
    core_reader::read_summary(head).expect("reader accepts the head of the core");
    read_untrusted(&core[..cut]);

    // Damage the head: the reader may reject it but must not panic.
    let mut damaged = core[..notes_end].to_vec();
    let patches = input.u8() % 8;
    for _ in 0..patches {
        let offset = usize::from(input.u16()) % damaged.len();
        let selector = input.u8();
        if selector & 1 == 0 {
            let width = 1 + usize::from(selector >> 1) % 8;
            for byte in damaged.iter_mut().skip(offset).take(width) {
                *byte = input.u8();
            }
            continue;
        }
        // Offsets and sizes near the top of u64 reach the reader's bounds arithmetic.
        let word = match (selector >> 1) % 4 {
            0 => u64::MAX - u64::from(input.u8()),
            1 => u64::MAX - u64::from(input.u16()) * 8,
            2 => 1 << 63,
            _ => u64::from(u16::MAX),
        };
        let aligned = offset & !7;
        for (byte, value) in damaged.iter_mut().skip(aligned).zip(word.to_le_bytes()) {
            *byte = value;
        }
    }
    read_untrusted(&damaged);
}

#[cfg(feature = "libfuzzer")]
libfuzzer_sys::fuzz_target!(|data: &[u8]| check(data));

#[cfg(not(feature = "libfuzzer"))]
fn main() {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    if paths.is_empty() {
        let mut patterned = vec![0u8; 4096];
        for (index, byte) in patterned.iter_mut().enumerate() {
            *byte = (index * 7 + 3) as u8;
        }
        let seeds: [&[u8]; 4] = [&[], &[0xFF; 64], &[0x11; 2048], &patterned];
        for seed in seeds {
            check(seed);
        }
        println!("checked {} built-in seeds", seeds.len());
        return;
    }
    for path in &paths {
        let input =
            std::fs::read(path).unwrap_or_else(|error| panic!("failed to read {path}: {error}"));
        check(&input);
    }
    println!("checked {} inputs", paths.len());
}
