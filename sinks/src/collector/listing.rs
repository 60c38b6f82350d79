//! Reading a dump directory for `sandcore dumps list|info|gdb`.

use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::store::{
    allocated_bytes, parse_core_name, read_sidecar, DumpSidecar, CORE_SUFFIX, SIDECAR_SUFFIX,
};
use crate::spool::Directory;

/// One stored dump, from its sidecar or, when there is none, from its file name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpListing {
    /// File name of the core inside the directory.
    pub file_name: String,
    /// Full path of the core.
    pub path: PathBuf,
    /// File name of the sidecar, if one exists.
    pub sidecar_file: Option<String>,
    /// The parsed sidecar, if one exists and is valid.
    pub sidecar: Option<DumpSidecar>,
    /// Crash kind name, or `unknown` if neither sidecar nor file name gives it.
    pub crash_kind: String,
    /// Guest binary name, or `unknown`.
    pub guest: String,
    /// Crash time in nanoseconds since the Unix epoch: exact from the
    /// sidecar, whole seconds from the file name, `None` if neither has it.
    pub timestamp_ns: Option<u64>,
    /// Dump id, if known.
    pub dump_id: Option<u64>,
    /// Logical size of the core in bytes (the file length).
    pub size: u64,
    /// Bytes the core occupies on disk; smaller than `size` for sparse files.
    pub allocated_bytes: u64,
    /// Last modification time of the core, which is when it was stored.
    pub modified: SystemTime,
}

/// Lists the core files (`*.core`) in `directory`, oldest first by crash time.
pub fn list_dumps(directory: &Path) -> io::Result<Vec<DumpListing>> {
    let directory = Directory::open_existing(directory)?;
    let names = directory.names()?;
    let mut listings = Vec::new();
    for name in &names {
        if name.starts_with('.') || !name.ends_with(CORE_SUFFIX) {
            continue;
        }
        let Ok(metadata) = directory.open_file(name).and_then(|file| file.metadata()) else {
            continue;
        };
        if !metadata.is_file() {
            continue;
        }
        let stem = &name[..name.len() - CORE_SUFFIX.len()];
        let sidecar_name = format!("{stem}{SIDECAR_SUFFIX}");
        let has_sidecar = names.contains(&sidecar_name);
        let sidecar = if has_sidecar {
            read_sidecar(&directory, &sidecar_name)
        } else {
            None
        };
        let parsed = parse_core_name(name);
        let unknown = || "unknown".to_string();
        let listing = DumpListing {
            file_name: name.clone(),
            path: directory.path().join(name),
            sidecar_file: has_sidecar.then(|| sidecar_name.clone()),
            crash_kind: sidecar
                .as_ref()
                .map(|s| s.crash_kind.clone())
                .or_else(|| parsed.as_ref().map(|p| p.crash_kind.clone()))
                .unwrap_or_else(unknown),
            guest: sidecar
                .as_ref()
                .map(|s| s.guest.clone())
                .or_else(|| parsed.as_ref().map(|p| p.guest.clone()))
                .unwrap_or_else(unknown),
            timestamp_ns: sidecar.as_ref().map(|s| s.timestamp_ns).or_else(|| {
                parsed
                    .as_ref()
                    .map(|p| p.timestamp_secs.saturating_mul(1_000_000_000))
            }),
            dump_id: sidecar
                .as_ref()
                .map(|s| s.dump_id)
                .or_else(|| parsed.as_ref().map(|p| p.dump_id)),
            size: metadata.len(),
            allocated_bytes: allocated_bytes(&metadata),
            modified: metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            sidecar,
        };
        listings.push(listing);
    }
    listings.sort_by(|a, b| (a.timestamp_ns, &a.file_name).cmp(&(b.timestamp_ns, &b.file_name)));
    Ok(listings)
}

/// Finds one dump in `directory` by core file name, file stem, or dump id
/// (decimal, or hexadecimal with `0x`). Fails with `NotFound` if nothing
/// matches and `InvalidInput` if a dump id matches several dumps.
pub fn dump_info(directory: &Path, selector: &str) -> io::Result<DumpListing> {
    let listings = list_dumps(directory)?;
    if let Some(listing) = listings.iter().find(|listing| {
        listing.file_name == selector
            || listing.file_name.strip_suffix(CORE_SUFFIX) == Some(selector)
    }) {
        return Ok(listing.clone());
    }
    let dump_id = match selector.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => selector.parse().ok(),
    };
    let matches: Vec<&DumpListing> = listings
        .iter()
        .filter(|listing| dump_id.is_some() && listing.dump_id == dump_id)
        .collect();
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "no dump named {selector:?} in {}; run `sandcore dumps list` to see the names",
                directory.display()
            ),
        )),
        several => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "dump id {selector} matches {} dumps in {}; pass a file name instead",
                several.len(),
                directory.display()
            ),
        )),
    }
}

/// Returns the command that opens `dump` in gdb with `guest_binary`:
/// `gdb <guest_binary> <core>`. gdb matches the core to the binary by build id.
pub fn gdb_command(dump: &DumpListing, guest_binary: &Path) -> std::process::Command {
    let mut command = std::process::Command::new("gdb");
    command.arg(guest_binary).arg(&dump.path);
    command
}
