//! Malformed guest binaries: byte-level edits of the real demo ELF must be
//! rejected with the matching `GuestBinaryError`, and messages that name the
//! offending value. Oversized configurations are rejected the same way.

mod common;

use common::{demo_guest, expect_error, require_kvm};
use sandcore::{GuestBinaryError, SandboxBuilder, SandboxError};

const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const IMAGE_BASE: u64 = 0x40_0000;

/// ELF64 header field offsets (System V gABI).
const E_TYPE: usize = 16;
const E_MACHINE: usize = 18;
const E_ENTRY: usize = 24;
const E_PHOFF: usize = 32;
const E_PHNUM: usize = 56;
const PHDR_SIZE: usize = 56;

/// One program header of the demo guest, with the file offset of its entry.
#[derive(Clone, Copy, Debug)]
struct ProgramHeader {
    at: usize,
    kind: u32,
    flags: u32,
    offset: u64,
    address: u64,
    file_size: u64,
    memory_size: u64,
}

fn read_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap())
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

fn write_u16(bytes: &mut [u8], at: usize, value: u16) {
    bytes[at..at + 2].copy_from_slice(&value.to_le_bytes());
}

fn write_u64(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

fn demo_elf() -> Vec<u8> {
    sandcore::demo_guest_bytes().to_vec()
}

fn program_headers(bytes: &[u8]) -> Vec<ProgramHeader> {
    let table = read_u64(bytes, E_PHOFF) as usize;
    let count = read_u16(bytes, E_PHNUM) as usize;
    (0..count)
        .map(|index| {
            let at = table + index * PHDR_SIZE;
            ProgramHeader {
                at,
                kind: read_u32(bytes, at),
                flags: read_u32(bytes, at + 4),
                offset: read_u64(bytes, at + 8),
                address: read_u64(bytes, at + 16),
                file_size: read_u64(bytes, at + 32),
                memory_size: read_u64(bytes, at + 40),
            }
        })
        .collect()
}

/// Returns the index and header of the first PT_LOAD segment that `wanted` accepts.
fn find_load(bytes: &[u8], wanted: impl Fn(&ProgramHeader) -> bool) -> (usize, ProgramHeader) {
    program_headers(bytes)
        .into_iter()
        .enumerate()
        .find(|(_, header)| header.kind == PT_LOAD && wanted(header))
        .expect("the demo guest lacks the PT_LOAD segment this test edits")
}

/// Builds a sandbox from `bytes` and returns the guest binary error it must
/// fail with, and the message callers see.
fn rejection(bytes: Vec<u8>) -> (GuestBinaryError, String) {
    require_kvm();
    let result = SandboxBuilder::new()
        .guest_bytes(bytes, "bad")
        .guest_core_dump(false)
        .build();
    let error = expect_error(result, "building a sandbox from a malformed guest");
    let message = error.to_string();
    match error {
        SandboxError::InvalidGuestBinary(error) => (error, message),
        other => panic!("expected InvalidGuestBinary, got {other:?}"),
    }
}

fn assert_message_contains(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "message does not contain {part:?}: {message}"
        );
    }
}

#[test]
fn demo_elf_accepted() {
    require_kvm();
    let mut sandbox = SandboxBuilder::new()
        .guest_bytes(demo_elf(), "demo")
        .guest_core_dump(false)
        .build()
        .expect("the unmodified demo guest was rejected");
    let sum: i32 = sandbox
        .call("add", (2i32, 2i32))
        .expect("add on the unmodified demo guest failed");
    assert_eq!(sum, 4, "add(2, 2) returned {sum}");
}

#[test]
fn empty_file() {
    let (error, message) = rejection(Vec::new());
    assert_eq!(
        error,
        GuestBinaryError::TooSmall { size: 0 },
        "wrong error for an empty file"
    );
    assert_message_contains(&message, &["0 bytes", "64-byte"]);
}

#[test]
fn short_file() {
    let (error, message) = rejection(demo_elf()[..63].to_vec());
    assert_eq!(
        error,
        GuestBinaryError::TooSmall { size: 63 },
        "wrong error for a 63-byte file"
    );
    assert_message_contains(&message, &["63 bytes"]);
}

#[test]
fn not_elf() {
    let mut bytes = demo_elf();
    bytes[..4].copy_from_slice(b"MZ\x90\x00");
    let (error, message) = rejection(bytes);
    assert_eq!(
        error,
        GuestBinaryError::NotElf {
            magic: *b"MZ\x90\x00"
        },
        "wrong error for a PE magic"
    );
    assert_message_contains(&message, &["not an ELF file", "4d, 5a, 90, 00"]);
}

#[test]
fn class_32_bit() {
    let mut bytes = demo_elf();
    bytes[4] = 1;
    let (error, message) = rejection(bytes);
    assert_eq!(
        error,
        GuestBinaryError::WrongClass { class: 1 },
        "wrong error for ELFCLASS32"
    );
    assert_message_contains(&message, &["class 1", "64-bit"]);
}

#[test]
fn big_endian() {
    let mut bytes = demo_elf();
    bytes[5] = 2;
    let (error, message) = rejection(bytes);
    assert_eq!(
        error,
        GuestBinaryError::WrongEndianness { encoding: 2 },
        "wrong error for ELFDATA2MSB"
    );
    assert_message_contains(&message, &["encoding 2", "little-endian"]);
}

#[test]
fn wrong_machine() {
    let mut bytes = demo_elf();
    write_u16(&mut bytes, E_MACHINE, 183); // EM_AARCH64
    let (error, message) = rejection(bytes);
    assert_eq!(
        error,
        GuestBinaryError::WrongMachine { machine: 183 },
        "wrong error for EM_AARCH64"
    );
    assert_message_contains(&message, &["machine 183", "62"]);
}

#[test]
fn shared_object_type() {
    let mut bytes = demo_elf();
    write_u16(&mut bytes, E_TYPE, 3); // ET_DYN
    let (error, message) = rejection(bytes);
    assert_eq!(
        error,
        GuestBinaryError::WrongType { kind: 3 },
        "wrong error for ET_DYN"
    );
    assert_message_contains(&message, &["type 3"]);
}

#[test]
fn truncated_in_segment() {
    let bytes = demo_elf();
    let (index, text) = find_load(&bytes, |header| header.flags & PF_X != 0);
    let cut = (text.offset + text.file_size / 2) as usize;
    let (error, message) = rejection(bytes[..cut].to_vec());

    let expected = GuestBinaryError::SegmentOutsideFile {
        index,
        offset: text.offset,
        end: text.offset + text.file_size,
        file_size: cut,
    };
    assert_eq!(
        error, expected,
        "wrong error for a file cut inside segment {index}"
    );
    assert_message_contains(
        &message,
        &[
            &format!("segment {index}"),
            &format!("{:#x}", text.offset + text.file_size),
            &cut.to_string(),
        ],
    );
}

#[test]
fn headers_outside_file() {
    let mut bytes = demo_elf();
    let offset = bytes.len() as u64 - 10;
    write_u64(&mut bytes, E_PHOFF, offset);
    let count = read_u16(&bytes, E_PHNUM);
    let file_size = bytes.len();
    let (error, message) = rejection(bytes);

    let expected = GuestBinaryError::BadProgramHeaders {
        offset,
        count,
        entry_size: PHDR_SIZE as u16,
        file_size,
    };
    assert_eq!(
        error, expected,
        "wrong error for a program header table past the end"
    );
    assert_message_contains(
        &message,
        &[
            &format!("offset {offset}"),
            &format!("{count} entries"),
            &file_size.to_string(),
        ],
    );
}

#[test]
fn header_count_overflows() {
    let mut bytes = demo_elf();
    write_u64(&mut bytes, E_PHOFF, u64::MAX - 8);
    let (error, message) = rejection(bytes);
    assert!(
        matches!(error, GuestBinaryError::BadProgramHeaders { .. }),
        "expected BadProgramHeaders, got {error:?}"
    );
    assert_message_contains(&message, &[&(u64::MAX - 8).to_string()]);
}

#[test]
fn segment_below_image_base() {
    let mut bytes = demo_elf();
    let (index, first) = find_load(&bytes, |_| true);
    write_u64(&mut bytes, first.at + 16, 0x1000);
    let (error, message) = rejection(bytes);

    let expected = GuestBinaryError::SegmentOutsideMemory {
        index,
        start: 0x1000,
        end: 0x1000 + first.memory_size,
    };
    assert_eq!(error, expected, "wrong error for a segment at 0x1000");
    assert_message_contains(
        &message,
        &[
            &format!("segment {index}"),
            "0x1000",
            &format!("{IMAGE_BASE:#x}"),
        ],
    );
}

#[test]
fn segment_past_memory_end() {
    let mut bytes = demo_elf();
    let (index, data) = find_load(&bytes, |header| header.flags & PF_W != 0);
    let address = u64::MAX - 0xfff;
    write_u64(&mut bytes, data.at + 16, address);
    let (error, message) = rejection(bytes);
    assert!(
        matches!(error, GuestBinaryError::SegmentOutsideMemory { index: i, start, .. } if i == index && start == address),
        "expected SegmentOutsideMemory for segment {index} at {address:#x}, got {error:?}"
    );
    assert_message_contains(
        &message,
        &[&format!("segment {index}"), &format!("{address:#x}")],
    );
}

#[test]
fn overlapping_segments() {
    let mut bytes = demo_elf();
    let (text_index, text) = find_load(&bytes, |header| header.flags & PF_X != 0);
    let (data_index, data) = find_load(&bytes, |header| header.flags & PF_W != 0);
    // Move the writable segment into the middle of the code segment.
    let moved_to = text.address + 0x4000;
    assert!(
        moved_to < text.address + text.memory_size,
        "the demo guest's code segment is too small for this test"
    );
    write_u64(&mut bytes, data.at + 16, moved_to);
    let (error, message) = rejection(bytes);

    let expected = GuestBinaryError::OverlappingSegments {
        first: text_index,
        second: data_index,
        page: moved_to,
    };
    assert_eq!(error, expected, "wrong error for overlapping segments");
    assert_message_contains(
        &message,
        &[
            &format!("segments {text_index} and {data_index}"),
            &format!("{moved_to:#x}"),
        ],
    );
}

#[test]
fn entry_outside_code() {
    let mut bytes = demo_elf();
    let (_, read_only) = find_load(&bytes, |header| {
        header.flags & (PF_X | PF_W) == 0 && header.address > IMAGE_BASE
    });
    let entry = read_only.address;
    write_u64(&mut bytes, E_ENTRY, entry);
    let (error, message) = rejection(bytes);

    assert_eq!(
        error,
        GuestBinaryError::EntryOutsideImage { entry },
        "wrong error for an entry in a non-executable segment"
    );
    assert_message_contains(&message, &[&format!("{entry:#x}")]);
}

#[test]
fn entry_outside_segments() {
    let mut bytes = demo_elf();
    write_u64(&mut bytes, E_ENTRY, 0x1000);
    let (error, message) = rejection(bytes);
    assert_eq!(
        error,
        GuestBinaryError::EntryOutsideImage { entry: 0x1000 },
        "wrong error for an entry outside every segment"
    );
    assert_message_contains(&message, &["0x1000"]);
}

#[test]
fn file_size_over_memory_size() {
    let mut bytes = demo_elf();
    let (index, text) = find_load(&bytes, |header| header.flags & PF_X != 0);
    let memory_size = text.file_size - 0x100;
    write_u64(&mut bytes, text.at + 40, memory_size);
    let (error, message) = rejection(bytes);

    let expected = GuestBinaryError::SegmentFileLargerThanMemory {
        index,
        file_size: text.file_size,
        memory_size,
    };
    assert_eq!(error, expected, "wrong error for p_filesz > p_memsz");
    assert_message_contains(
        &message,
        &[
            &format!("segment {index}"),
            &format!("{:#x}", text.file_size),
            &format!("{memory_size:#x}"),
        ],
    );
}

#[test]
fn no_loadable_segment() {
    let mut bytes = demo_elf();
    for header in program_headers(&bytes) {
        if header.kind == PT_LOAD {
            bytes[header.at..header.at + 4].copy_from_slice(&0u32.to_le_bytes());
        }
    }
    let (error, message) = rejection(bytes);
    assert_eq!(
        error,
        GuestBinaryError::NoLoadableSegment,
        "wrong error for a binary without PT_LOAD"
    );
    assert_message_contains(&message, &["no loadable segment"]);
}

#[test]
fn missing_file() {
    require_kvm();
    let path = std::env::temp_dir().join(format!("sandcore-missing-guest-{}", std::process::id()));
    let result = SandboxBuilder::new()
        .guest_file(&path)
        .guest_core_dump(false)
        .build();
    let error = expect_error(result, "building a sandbox from a missing file");
    let SandboxError::InvalidGuestBinary(GuestBinaryError::Read { path: reported, .. }) = &error
    else {
        panic!("expected InvalidGuestBinary(Read), got {error:?}");
    };
    assert_eq!(reported, &path, "Read error names {reported:?}");
    let message = error.to_string();
    assert!(
        message.contains(&path.display().to_string()),
        "message does not name the path: {message}"
    );
}

#[test]
fn huge_heap_rejected() {
    require_kvm();
    let heap_size: u64 = 2 << 30;
    let result = SandboxBuilder::new()
        .guest_file(demo_guest())
        .heap_size(heap_size)
        .guest_core_dump(false)
        .build();
    let error = expect_error(result, "building a sandbox with a 2 GiB heap");

    let SandboxError::InvalidConfiguration(message) = &error else {
        panic!("expected InvalidConfiguration, got {error:?}");
    };
    assert!(
        message.contains("heap_size"),
        "message does not name the field: {message}"
    );
    assert!(
        message.contains(&heap_size.to_string()),
        "message does not name the value: {message}"
    );
    assert!(
        message.contains("limit"),
        "message does not name the limit: {message}"
    );
}

#[test]
fn heap_at_limit_rejected() {
    require_kvm();
    // Heap alone at the 1536 MiB guest memory limit leaves no room for the rest.
    let heap_size: u64 = 1536 << 20;
    let result = SandboxBuilder::new()
        .guest_file(demo_guest())
        .heap_size(heap_size)
        .guest_core_dump(false)
        .build();
    let error = expect_error(result, "building a sandbox with a heap at the memory limit");

    let SandboxError::InvalidConfiguration(message) = &error else {
        panic!("expected InvalidConfiguration, got {error:?}");
    };
    assert!(
        message.contains(&(1536u64 << 20).to_string()),
        "message does not name the limit: {message}"
    );
}

#[test]
fn unaligned_stack_rejected() {
    require_kvm();
    let result = SandboxBuilder::new()
        .guest_file(demo_guest())
        .stack_size(100_000)
        .guest_core_dump(false)
        .build();
    let error = expect_error(result, "building a sandbox with an unaligned stack");
    let SandboxError::InvalidConfiguration(message) = &error else {
        panic!("expected InvalidConfiguration, got {error:?}");
    };
    assert!(
        message.contains("stack_size = 100000"),
        "message does not name the field and value: {message}"
    );
}

#[test]
fn segment_address_and_offset_misaligned() {
    let mut bytes = demo_elf();
    let (index, data) = find_load(&bytes, |header| header.flags & 2 != 0);
    let address = data.address + 1;
    write_u64(&mut bytes, data.at + 16, address);
    let (error, message) = rejection(bytes);

    let expected = GuestBinaryError::SegmentMisaligned {
        index,
        address,
        offset: data.offset,
    };
    assert_eq!(error, expected, "wrong error for p_vaddr {address:#x}");
    assert_message_contains(
        &message,
        &[&format!("segment {index}"), &format!("{address:#x}")],
    );
}

#[test]
fn writable_code_segment() {
    let mut bytes = demo_elf();
    let (index, code) = find_load(&bytes, |header| header.flags & 1 != 0);
    // PF_R | PF_W | PF_X
    bytes[code.at + 4..code.at + 8].copy_from_slice(&7u32.to_le_bytes());
    let (error, message) = rejection(bytes);

    let expected = GuestBinaryError::WritableAndExecutable {
        index,
        address: code.address,
    };
    assert_eq!(error, expected, "wrong error for an RWX segment");
    assert_message_contains(
        &message,
        &[&format!("segment {index}"), "writable and executable"],
    );
}
