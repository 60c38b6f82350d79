//! Reading back the crash facts of a core that [`elf_core`](crate::elf_core) wrote.
//!
//! The reader needs only the head of the file: the ELF header, the program
//! headers (with the `PN_XNUM` section header) and the notes, which the
//! writer puts before any guest memory. So a caller can pass the bytes up to
//! the first hole of a stored dump instead of the whole core. It borrows
//! from the input and allocates nothing.

use core::fmt;

use crate::elf_core::records::*;
use crate::snapshot::{ControlRegisters, CrashKind};

/// Error from reading a core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoreReadError {
    /// The input ends before a structure it must contain.
    Truncated {
        /// Structure being read.
        what: &'static str,
        /// Byte offset the structure needs to reach.
        needed: u64,
        /// Length of the input.
        available: u64,
    },
    /// The input is not a little-endian ELF64 x86_64 core file.
    NotCore {
        /// Header field that differs.
        field: &'static str,
    },
    /// A note the Sandcore writer always writes is missing.
    MissingNote {
        /// Owner name and type of the note.
        note: &'static str,
    },
    /// A note has a size or content this reader does not accept.
    InvalidNote {
        /// Owner name and type of the note.
        note: &'static str,
        /// Rule the note breaks.
        reason: &'static str,
    },
}

impl fmt::Display for CoreReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreReadError::Truncated {
                what,
                needed,
                available,
            } => write!(
                f,
                "core is truncated: {what} needs {needed} bytes but only {available} are present; \
                 pass the complete head of the core"
            ),
            CoreReadError::NotCore { field } => write!(
                f,
                "input is not an ELF64 x86_64 core file (invalid {field}); pass a core written by Sandcore"
            ),
            CoreReadError::MissingNote { note } => write!(
                f,
                "core has no {note} note; it was not written by Sandcore or is damaged"
            ),
            CoreReadError::InvalidNote { note, reason } => {
                write!(f, "invalid {note} note: {reason}")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for CoreReadError {}

/// One note of a core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Note<'a> {
    /// Owner name without its NUL.
    pub name: &'a [u8],
    /// `n_type`.
    pub note_type: u32,
    /// Descriptor bytes, without padding.
    pub desc: &'a [u8],
}

/// Iterator over the notes of a `PT_NOTE` segment.
#[derive(Clone, Debug)]
pub struct NoteIter<'a> {
    remaining: &'a [u8],
}

impl<'a> Iterator for NoteIter<'a> {
    type Item = Result<Note<'a>, CoreReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining.is_empty() {
            return None;
        }
        let result = self.parse_one();
        if result.is_err() {
            self.remaining = &[];
        }
        Some(result)
    }
}

impl<'a> NoteIter<'a> {
    fn parse_one(&mut self) -> Result<Note<'a>, CoreReadError> {
        let bytes = self.remaining;
        let namesz = read_u32(bytes, 0, "note header")? as u64;
        let descsz = read_u32(bytes, 4, "note header")? as u64;
        let note_type = read_u32(bytes, 8, "note header")?;
        let name_end = 12 + namesz;
        let desc_start = 12 + align4(namesz);
        let desc_end = desc_start + descsz;
        let next = desc_start + align4(descsz);
        let name = slice(bytes, 12, name_end, "note name")?;
        let desc = slice(bytes, desc_start, desc_end, "note descriptor")?;
        let name = match name.split_last() {
            Some((0, without_nul)) => without_nul,
            _ => name,
        };
        self.remaining = bytes.get(next as usize..).unwrap_or(&[]);
        Ok(Note {
            name,
            note_type,
            desc,
        })
    }
}

fn slice<'a>(
    bytes: &'a [u8],
    start: u64,
    end: u64,
    what: &'static str,
) -> Result<&'a [u8], CoreReadError> {
    let truncated = CoreReadError::Truncated {
        what,
        needed: end,
        available: bytes.len() as u64,
    };
    if start > end || end > bytes.len() as u64 {
        return Err(truncated);
    }
    Ok(&bytes[start as usize..end as usize])
}

fn read_u16(bytes: &[u8], offset: u64, what: &'static str) -> Result<u16, CoreReadError> {
    let field = slice(bytes, offset, offset.saturating_add(2), what)?;
    Ok(u16::from_le_bytes([field[0], field[1]]))
}

fn read_u32(bytes: &[u8], offset: u64, what: &'static str) -> Result<u32, CoreReadError> {
    let field = slice(bytes, offset, offset.saturating_add(4), what)?;
    Ok(u32::from_le_bytes([field[0], field[1], field[2], field[3]]))
}

fn read_u64(bytes: &[u8], offset: u64, what: &'static str) -> Result<u64, CoreReadError> {
    let field = slice(bytes, offset, offset.saturating_add(8), what)?;
    let mut word = [0u8; 8];
    word.copy_from_slice(field);
    Ok(u64::from_le_bytes(word))
}

/// Returns the real number of program headers, following `PN_XNUM` to section header 0.
fn program_header_count(core: &[u8]) -> Result<u64, CoreReadError> {
    let e_phnum = read_u16(core, 56, "ELF header")?;
    if e_phnum != PN_XNUM {
        return Ok(u64::from(e_phnum));
    }
    let e_shoff = read_u64(core, 40, "ELF header")?;
    if e_shoff == 0 {
        return Err(CoreReadError::NotCore {
            field: "e_shoff (PN_XNUM without a section header)",
        });
    }
    Ok(u64::from(read_u32(
        core,
        e_shoff.saturating_add(44),
        "section header 0",
    )?))
}

/// Returns an iterator over the notes of the first `PT_NOTE` segment of `core`.
pub fn notes(core: &[u8]) -> Result<NoteIter<'_>, CoreReadError> {
    let ident = slice(core, 0, 16, "ELF identification")?;
    if &ident[..4] != b"\x7fELF" {
        return Err(CoreReadError::NotCore { field: "magic" });
    }
    if ident[4] != 2 {
        return Err(CoreReadError::NotCore { field: "EI_CLASS" });
    }
    if ident[5] != 1 {
        return Err(CoreReadError::NotCore { field: "EI_DATA" });
    }
    if read_u16(core, 16, "ELF header")? != ET_CORE {
        return Err(CoreReadError::NotCore { field: "e_type" });
    }
    if read_u16(core, 18, "ELF header")? != EM_X86_64 {
        return Err(CoreReadError::NotCore { field: "e_machine" });
    }
    if u64::from(read_u16(core, 54, "ELF header")?) != PHDR_SIZE {
        return Err(CoreReadError::NotCore {
            field: "e_phentsize",
        });
    }

    let e_phoff = read_u64(core, 32, "ELF header")?;
    let count = program_header_count(core)?;
    for index in 0..count {
        // Saturating: a hostile e_phoff near 2^64 must fail the bounds check,
        // not wrap around to a valid offset.
        let phdr = e_phoff.saturating_add(index.saturating_mul(PHDR_SIZE));
        if read_u32(core, phdr, "program header")? != PT_NOTE {
            continue;
        }
        let offset = read_u64(core, phdr.saturating_add(8), "program header")?;
        let size = read_u64(core, phdr.saturating_add(32), "program header")?;
        let segment = slice(core, offset, offset.saturating_add(size), "PT_NOTE segment")?;
        return Ok(NoteIter { remaining: segment });
    }
    Err(CoreReadError::MissingNote { note: "PT_NOTE" })
}

/// Crash facts read back from a core's `NT_PRSTATUS`, `NT_PRPSINFO`,
/// `NT_SIGINFO` and `SANDCORE` notes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoreSummary<'a> {
    /// Cause of the dump.
    pub kind: CrashKind,
    /// Signal number from `pr_cursig`.
    pub signal: u32,
    /// Instruction pointer at the crash.
    pub rip: u64,
    /// Stack pointer at the crash.
    pub rsp: u64,
    /// `si_addr` of `NT_SIGINFO`: the faulting address, 0 if none.
    pub fault_address: u64,
    /// Control registers and EFER.
    pub control: ControlRegisters,
    /// Sandbox id.
    pub sandbox_id: u64,
    /// Dump id.
    pub dump_id: u64,
    /// Crash time, nanoseconds since the Unix epoch.
    pub timestamp_ns: u64,
    /// Guest binary name from `pr_fname` (at most 15 bytes).
    pub guest_name: &'a str,
    /// GNU build id of the guest binary, empty if none.
    pub build_id: &'a [u8],
    /// Guest function that was running, empty if none.
    pub function: &'a str,
    /// Panic message, empty unless the guest panicked.
    pub message: &'a str,
    /// True if the guest's panic message was cut before it was stored.
    pub message_truncated: bool,
}

const PRSTATUS: &str = "CORE NT_PRSTATUS";
const PRPSINFO: &str = "CORE NT_PRPSINFO";
const SIGINFO: &str = "CORE NT_SIGINFO";
const SANDCORE: &str = "SANDCORE";

/// Reads the crash summary from the head of `core`.
pub fn read_summary(core: &[u8]) -> Result<CoreSummary<'_>, CoreReadError> {
    let mut prstatus = None;
    let mut prpsinfo = None;
    let mut siginfo = None;
    let mut sandcore = None;
    for note in notes(core)? {
        let note = note?;
        match (note.name, note.note_type) {
            (NOTE_NAME_CORE, NT_PRSTATUS) if prstatus.is_none() => prstatus = Some(note.desc),
            (NOTE_NAME_CORE, NT_PRPSINFO) => prpsinfo = Some(note.desc),
            (NOTE_NAME_CORE, NT_SIGINFO) => siginfo = Some(note.desc),
            (NOTE_NAME_SANDCORE, NT_SANDCORE_CRASH) => sandcore = Some(note.desc),
            _ => {}
        }
    }
    let prstatus = prstatus.ok_or(CoreReadError::MissingNote { note: PRSTATUS })?;
    let prpsinfo = prpsinfo.ok_or(CoreReadError::MissingNote { note: PRPSINFO })?;
    let siginfo = siginfo.ok_or(CoreReadError::MissingNote { note: SIGINFO })?;
    let sandcore = sandcore.ok_or(CoreReadError::MissingNote { note: SANDCORE })?;

    if prstatus.len() != PRSTATUS_SIZE {
        return Err(CoreReadError::InvalidNote {
            note: PRSTATUS,
            reason: "descriptor is not 336 bytes",
        });
    }
    if prpsinfo.len() != PRPSINFO_SIZE {
        return Err(CoreReadError::InvalidNote {
            note: PRPSINFO,
            reason: "descriptor is not 136 bytes",
        });
    }
    if siginfo.len() != SIGINFO_SIZE {
        return Err(CoreReadError::InvalidNote {
            note: SIGINFO,
            reason: "descriptor is not 128 bytes",
        });
    }

    let signal = read_u16(prstatus, 12, PRSTATUS)? as i16 as u32;
    let registers = PRSTATUS_REGS_OFFSET as u64;
    // pr_reg indexes of user_regs_struct: rip is the 17th word, rsp the 20th.
    let rip = read_u64(prstatus, registers + 16 * 8, PRSTATUS)?;
    let rsp = read_u64(prstatus, registers + 19 * 8, PRSTATUS)?;
    let fault_address = read_u64(siginfo, 16, SIGINFO)?;
    let guest_name = c_string(&prpsinfo[40..56]);
    let guest_name = core::str::from_utf8(guest_name).map_err(|_| CoreReadError::InvalidNote {
        note: PRPSINFO,
        reason: "pr_fname is not UTF-8",
    })?;

    read_sandcore(sandcore, signal, rip, rsp, fault_address, guest_name)
}

fn c_string(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

fn read_sandcore<'a>(
    desc: &'a [u8],
    signal: u32,
    rip: u64,
    rsp: u64,
    fault_address: u64,
    guest_name: &'a str,
) -> Result<CoreSummary<'a>, CoreReadError> {
    let version = read_u32(desc, 0, SANDCORE)?;
    if version != SANDCORE_NOTE_VERSION {
        return Err(CoreReadError::InvalidNote {
            note: SANDCORE,
            reason: "unknown layout version; update sandcore-sinks",
        });
    }
    let kind_code = read_u32(desc, 4, SANDCORE)?;
    let vector = read_u32(desc, 8, SANDCORE)?;
    let message_truncated = read_u32(desc, 12, SANDCORE)? != 0;
    let error_code = read_u64(desc, 16, SANDCORE)?;
    let control = ControlRegisters {
        cr0: read_u64(desc, 24, SANDCORE)?,
        cr2: read_u64(desc, 32, SANDCORE)?,
        cr3: read_u64(desc, 40, SANDCORE)?,
        cr4: read_u64(desc, 48, SANDCORE)?,
        efer: read_u64(desc, 56, SANDCORE)?,
    };
    let sandbox_id = read_u64(desc, 64, SANDCORE)?;
    let dump_id = read_u64(desc, 72, SANDCORE)?;
    let timestamp_ns = read_u64(desc, 80, SANDCORE)?;
    let build_id_len = u64::from(read_u32(desc, 88, SANDCORE)?);
    let function_len = u64::from(read_u32(desc, 92, SANDCORE)?);
    let message_len = u64::from(read_u32(desc, 96, SANDCORE)?);

    let build_start = SANDCORE_HEADER_SIZE as u64;
    let function_start = build_start + build_id_len;
    let message_start = function_start + function_len;
    let build_id = slice(desc, build_start, function_start, SANDCORE)?;
    let function = slice(desc, function_start, message_start, SANDCORE)?;
    let message = slice(desc, message_start, message_start + message_len, SANDCORE)?;
    let utf8 = |bytes, reason| {
        core::str::from_utf8(bytes).map_err(|_| CoreReadError::InvalidNote {
            note: SANDCORE,
            reason,
        })
    };

    let kind = crash_kind(kind_code, vector, error_code, fault_address).ok_or(
        CoreReadError::InvalidNote {
            note: SANDCORE,
            reason: "unknown crash kind code",
        },
    )?;
    Ok(CoreSummary {
        kind,
        signal,
        rip,
        rsp,
        fault_address,
        control,
        sandbox_id,
        dump_id,
        timestamp_ns,
        guest_name,
        build_id,
        function: utf8(function, "function name is not UTF-8")?,
        message: utf8(message, "panic message is not UTF-8")?,
        message_truncated,
    })
}

/// Rebuilds a [`CrashKind`] from its [`CrashKind::code`] and the note's other fields.
fn crash_kind(code: u32, vector: u32, error_code: u64, fault_address: u64) -> Option<CrashKind> {
    Some(match code {
        1 => CrashKind::Exception {
            vector: u8::try_from(vector).ok()?,
            error_code,
        },
        2 => CrashKind::StackOverflow {
            address: fault_address,
        },
        3 => CrashKind::Panic,
        4 => CrashKind::TripleFault,
        5 => CrashKind::InternalError,
        6 => CrashKind::UnexpectedExit,
        7 => CrashKind::Timeout,
        8 => CrashKind::Cancelled,
        9 => CrashKind::OnDemand,
        _ => return None,
    })
}

#[cfg(test)]
mod overflow_tests {
    use super::*;

    /// An ELF64 core header with every field valid except the one a test sets.
    fn header() -> [u8; 64] {
        let mut bytes = [0u8; 64];
        bytes[..4].copy_from_slice(b"\x7fELF");
        bytes[4] = 2;
        bytes[5] = 1;
        bytes[16..18].copy_from_slice(&ET_CORE.to_le_bytes());
        bytes[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        bytes[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        bytes
    }

    #[test]
    fn program_header_offset_near_end_of_range() {
        let mut core = header();
        core[32..40].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
        core[56..58].copy_from_slice(&1u16.to_le_bytes());
        assert!(matches!(notes(&core), Err(CoreReadError::Truncated { .. })));
    }

    #[test]
    fn section_header_offset_near_end_of_range() {
        let mut core = header();
        core[40..48].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
        core[56..58].copy_from_slice(&PN_XNUM.to_le_bytes());
        assert!(matches!(notes(&core), Err(CoreReadError::Truncated { .. })));
    }
}
