//! Validation of a guest binary before anything is loaded.
//!
//! `linux-loader` copies the segments into guest memory, but it trusts the
//! file's layout more than a sandbox may: here every header field is checked
//! against the file and the guest address space first, so a malformed or
//! hostile binary gets an error that names the field, never a panic.

use std::path::{Path, PathBuf};

use sandcore_abi::layout::{IMAGE_BASE, PAGE_SIZE};

use crate::memory::layout::{page_align_up, MAX_MEMORY_SIZE};

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const NT_GNU_BUILD_ID: u32 = 3;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;

/// Reason a guest binary was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuestBinaryError {
    /// The file is shorter than an ELF header.
    #[error("guest binary is {size} bytes, shorter than the 64-byte ELF64 header; is the file truncated?")]
    TooSmall {
        /// File size.
        size: usize,
    },
    /// The file does not start with the ELF magic.
    #[error("guest binary is not an ELF file (magic {magic:02x?}); build the guest with the sandcore-guest runtime")]
    NotElf {
        /// First four bytes.
        magic: [u8; 4],
    },
    /// Not ELFCLASS64.
    #[error("guest binary has ELF class {class}, expected 2 (64-bit)")]
    WrongClass {
        /// `e_ident[EI_CLASS]`.
        class: u8,
    },
    /// Not little-endian.
    #[error("guest binary has ELF data encoding {encoding}, expected 1 (little-endian)")]
    WrongEndianness {
        /// `e_ident[EI_DATA]`.
        encoding: u8,
    },
    /// Not x86-64.
    #[error("guest binary is for ELF machine {machine}, expected 62 (x86-64)")]
    WrongMachine {
        /// `e_machine`.
        machine: u16,
    },
    /// Not a static executable.
    #[error("guest binary has ELF type {kind}, expected 2 (a static, non-PIE executable)")]
    WrongType {
        /// `e_type`.
        kind: u16,
    },
    /// Program header table outside the file or with an unexpected entry size.
    #[error("guest binary's program headers (offset {offset}, {count} entries of {entry_size} bytes) do not fit in its {file_size} bytes")]
    BadProgramHeaders {
        /// `e_phoff`.
        offset: u64,
        /// `e_phnum`.
        count: u16,
        /// `e_phentsize`.
        entry_size: u16,
        /// File size.
        file_size: usize,
    },
    /// A segment's file range lies outside the file.
    #[error("segment {index} claims file bytes {offset:#x}..{end:#x}, past the end of the {file_size}-byte guest binary")]
    SegmentOutsideFile {
        /// Program header index.
        index: usize,
        /// `p_offset`.
        offset: u64,
        /// `p_offset + p_filesz`.
        end: u64,
        /// File size.
        file_size: usize,
    },
    /// A segment's memory size is smaller than its file size.
    #[error("segment {index} has p_filesz {file_size:#x} larger than p_memsz {memory_size:#x}")]
    SegmentFileLargerThanMemory {
        /// Program header index.
        index: usize,
        /// `p_filesz`.
        file_size: u64,
        /// `p_memsz`.
        memory_size: u64,
    },
    /// A segment lies outside the guest image range.
    #[error("segment {index} at {start:#x}..{end:#x} lies outside guest memory for images ({IMAGE_BASE:#x}..{MAX_MEMORY_SIZE:#x}); link the guest with sandcore-guest.ld")]
    SegmentOutsideMemory {
        /// Program header index.
        index: usize,
        /// First address.
        start: u64,
        /// End address (exclusive).
        end: u64,
    },
    /// Two loadable segments share a page.
    #[error("segments {first} and {second} overlap (both use page {page:#x}); each segment needs its own pages for its permissions")]
    OverlappingSegments {
        /// Earlier program header index.
        first: usize,
        /// Later program header index.
        second: usize,
        /// A shared page.
        page: u64,
    },
    /// A segment's address and file offset differ modulo the page size, so
    /// its bytes cannot be mapped page by page.
    #[error("segment {index} has p_vaddr {address:#x} and p_offset {offset:#x}, which differ modulo 4096; link the guest with sandcore-guest.ld")]
    SegmentMisaligned {
        /// Program header index.
        index: usize,
        /// `p_vaddr`.
        address: u64,
        /// `p_offset`.
        offset: u64,
    },
    /// A segment is both writable and executable.
    #[error("segment {index} at {address:#x} is writable and executable; Sandcore maps code read-only, so split it into a code and a data segment")]
    WritableAndExecutable {
        /// Program header index.
        index: usize,
        /// `p_vaddr`.
        address: u64,
    },
    /// No PT_LOAD segment.
    #[error("guest binary has no loadable segment")]
    NoLoadableSegment,
    /// The entry point is not in an executable segment.
    #[error("entry point {entry:#x} is not inside an executable segment of the guest binary")]
    EntryOutsideImage {
        /// `e_entry`.
        entry: u64,
    },
    /// linux-loader failed to copy the image.
    #[error("loading the guest binary into guest memory failed: {0}")]
    Load(String),
    /// The file could not be read.
    #[error("cannot read guest binary {path}: {message}")]
    Read {
        /// Path given.
        path: PathBuf,
        /// OS error text.
        message: String,
    },
}

/// One loadable segment, as validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Page-aligned start address.
    pub start: u64,
    /// Page-aligned end address (exclusive).
    pub end: u64,
    /// Writable.
    pub writable: bool,
    /// Executable.
    pub executable: bool,
    /// File offset of `start` (page-aligned like `start`).
    pub file_offset: u64,
}

/// A validated guest binary.
#[derive(Clone, Debug)]
pub struct GuestImage {
    /// The file's bytes.
    pub bytes: Vec<u8>,
    /// File name, for logs and dump names.
    pub name: String,
    /// Path it was read from, or `<memory>`.
    pub path: String,
    /// Entry point.
    pub entry: u64,
    /// Loadable segments in address order.
    pub segments: Vec<Segment>,
    /// GNU build id, empty if the binary has none.
    pub build_id: Vec<u8>,
    /// End of the last segment, page-aligned.
    pub end: u64,
}

fn read_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

struct ProgramHeader {
    kind: u32,
    flags: u32,
    offset: u64,
    address: u64,
    file_size: u64,
    memory_size: u64,
}

impl GuestImage {
    /// Reads and validates the guest binary at `path`.
    pub fn from_file(path: &Path) -> Result<GuestImage, GuestBinaryError> {
        let bytes = std::fs::read(path).map_err(|error| GuestBinaryError::Read {
            path: path.to_path_buf(),
            message: error.to_string(),
        })?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "guest".into());
        // Recorded absolute, so gdb finds the binary from any directory.
        let recorded = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        GuestImage::parse(bytes, name, recorded.display().to_string())
    }

    /// Validates a guest binary held in memory.
    pub fn from_bytes(bytes: Vec<u8>, name: &str) -> Result<GuestImage, GuestBinaryError> {
        GuestImage::parse(bytes, name.to_string(), format!("<memory>/{name}"))
    }

    fn parse(bytes: Vec<u8>, name: String, path: String) -> Result<GuestImage, GuestBinaryError> {
        if bytes.len() < EHDR_SIZE {
            return Err(GuestBinaryError::TooSmall { size: bytes.len() });
        }
        let magic: [u8; 4] = bytes[..4].try_into().expect("4 bytes");
        if magic != *b"\x7fELF" {
            return Err(GuestBinaryError::NotElf { magic });
        }
        if bytes[4] != 2 {
            return Err(GuestBinaryError::WrongClass { class: bytes[4] });
        }
        if bytes[5] != 1 {
            return Err(GuestBinaryError::WrongEndianness { encoding: bytes[5] });
        }
        let kind = read_u16(&bytes, 16);
        if kind != 2 {
            return Err(GuestBinaryError::WrongType { kind });
        }
        let machine = read_u16(&bytes, 18);
        if machine != 62 {
            return Err(GuestBinaryError::WrongMachine { machine });
        }
        let entry = read_u64(&bytes, 24);
        let headers = program_headers(&bytes)?;

        let mut segments: Vec<(usize, Segment)> = Vec::new();
        let mut build_id = Vec::new();
        for (index, header) in headers.iter().enumerate() {
            let file_end = header.offset.checked_add(header.file_size);
            if file_end.is_none_or(|end| end > bytes.len() as u64) {
                return Err(GuestBinaryError::SegmentOutsideFile {
                    index,
                    offset: header.offset,
                    end: header.offset.saturating_add(header.file_size),
                    file_size: bytes.len(),
                });
            }
            if header.kind == PT_NOTE && build_id.is_empty() {
                build_id = find_build_id(
                    &bytes[header.offset as usize..(header.offset + header.file_size) as usize],
                );
            }
            if header.kind != PT_LOAD || header.memory_size == 0 {
                continue;
            }
            if header.address % PAGE_SIZE != header.offset % PAGE_SIZE {
                return Err(GuestBinaryError::SegmentMisaligned {
                    index,
                    address: header.address,
                    offset: header.offset,
                });
            }
            if header.flags & PF_W != 0 && header.flags & PF_X != 0 {
                return Err(GuestBinaryError::WritableAndExecutable {
                    index,
                    address: header.address,
                });
            }
            if header.file_size > header.memory_size {
                return Err(GuestBinaryError::SegmentFileLargerThanMemory {
                    index,
                    file_size: header.file_size,
                    memory_size: header.memory_size,
                });
            }
            let end = header
                .address
                .checked_add(header.memory_size)
                .and_then(page_align_up);
            let start = header.address & !(PAGE_SIZE - 1);
            let Some(end) = end.filter(|&end| start >= IMAGE_BASE && end <= MAX_MEMORY_SIZE) else {
                return Err(GuestBinaryError::SegmentOutsideMemory {
                    index,
                    start: header.address,
                    end: header.address.saturating_add(header.memory_size),
                });
            };
            segments.push((
                index,
                Segment {
                    start,
                    end,
                    writable: header.flags & PF_W != 0,
                    executable: header.flags & PF_X != 0,
                    file_offset: header.offset & !(PAGE_SIZE - 1),
                },
            ));
        }
        if segments.is_empty() {
            return Err(GuestBinaryError::NoLoadableSegment);
        }
        segments.sort_by_key(|(_, segment)| segment.start);
        for pair in segments.windows(2) {
            let (first, a) = pair[0];
            let (second, b) = pair[1];
            if b.start < a.end {
                return Err(GuestBinaryError::OverlappingSegments {
                    first,
                    second,
                    page: b.start,
                });
            }
        }
        let segments: Vec<Segment> = segments.into_iter().map(|(_, segment)| segment).collect();
        if !segments
            .iter()
            .any(|s| s.executable && (s.start..s.end).contains(&entry))
        {
            return Err(GuestBinaryError::EntryOutsideImage { entry });
        }
        let end = segments.last().expect("at least one segment").end;
        Ok(GuestImage {
            bytes,
            name,
            path,
            entry,
            segments,
            build_id,
            end,
        })
    }
}

fn program_headers(bytes: &[u8]) -> Result<Vec<ProgramHeader>, GuestBinaryError> {
    let offset = read_u64(bytes, 32);
    let entry_size = read_u16(bytes, 54);
    let count = read_u16(bytes, 56);
    let table_end = (count as u64)
        .checked_mul(PHDR_SIZE as u64)
        .and_then(|size| size.checked_add(offset));
    if entry_size as usize != PHDR_SIZE || table_end.is_none_or(|end| end > bytes.len() as u64) {
        return Err(GuestBinaryError::BadProgramHeaders {
            offset,
            count,
            entry_size,
            file_size: bytes.len(),
        });
    }
    Ok((0..count as usize)
        .map(|index| {
            let at = offset as usize + index * PHDR_SIZE;
            ProgramHeader {
                kind: read_u32(bytes, at),
                flags: read_u32(bytes, at + 4),
                offset: read_u64(bytes, at + 8),
                address: read_u64(bytes, at + 16),
                file_size: read_u64(bytes, at + 32),
                memory_size: read_u64(bytes, at + 40),
            }
        })
        .collect())
}

/// Returns the descriptor of the first GNU build-id note in `notes`.
fn find_build_id(notes: &[u8]) -> Vec<u8> {
    let mut at = 0usize;
    while at + 12 <= notes.len() {
        let name_size = read_u32(notes, at) as usize;
        let desc_size = read_u32(notes, at + 4) as usize;
        let kind = read_u32(notes, at + 8);
        let name_start = at + 12;
        let desc_start = name_start.saturating_add(name_size.next_multiple_of(4));
        let desc_end = desc_start.saturating_add(desc_size);
        if desc_end > notes.len() {
            break;
        }
        if kind == NT_GNU_BUILD_ID && &notes[name_start..name_start + name_size] == b"GNU\0" {
            return notes[desc_start..desc_end].to_vec();
        }
        at = desc_start.saturating_add(desc_size.next_multiple_of(4));
    }
    Vec::new()
}
