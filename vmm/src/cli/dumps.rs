//! `sandcore dumps list|info|gdb`: reads a dump directory.
//!
//! Both the file sink and the collector store `*.core` files. Collector dumps
//! carry a JSON sidecar and a file name with the crash kind, while file-sink
//! names carry neither, so this module reads kind, guest and time from the
//! core's notes whenever the listing does not know them.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use sandcore_sinks::collector::{dump_info, gdb_command, list_dumps, DumpListing};
use sandcore_sinks::core_reader::{notes, read_summary, CoreReadError};
use sandcore_sinks::elf_core::records::{NOTE_NAME_CORE, NT_FILE};
use sandcore_sinks::file_sink::resolve_dump_dir;
use sandcore_sinks::snapshot::CrashKind;

use super::{format_bytes, format_utc, CliError, DEMO_GUEST_NAME};

/// Bytes of a core read first for its notes. A core of the demo guest has
/// its notes end at byte 3,000 or so, so this first read usually suffices.
const HEAD_BYTES: u64 = 64 << 10;
/// Maximum bytes read for the notes of one core, so a damaged header cannot make
/// the command read a whole multi-gigabyte file.
const MAX_HEAD_BYTES: u64 = 16 << 20;

#[derive(Args)]
pub struct DumpsArgs {
    #[command(subcommand)]
    pub command: DumpsCommand,
}

#[derive(Subcommand)]
pub enum DumpsCommand {
    /// List the dumps in a directory, oldest first.
    List {
        #[command(flatten)]
        directory: DirectoryArg,
    },
    /// Show the crash summary of one dump: kind, signal, registers, guest, time, size, panic message.
    Info {
        /// Dump to show: core file name, file name without .core, dump id, or a path to a core file.
        #[arg(value_name = "DUMP")]
        dump: String,
        #[command(flatten)]
        directory: DirectoryArg,
    },
    /// Open one dump in gdb together with its guest binary.
    Gdb {
        /// Dump to open: core file name, file name without .core, dump id, or a path to a core file.
        #[arg(value_name = "DUMP")]
        dump: String,
        #[command(flatten)]
        directory: DirectoryArg,
        /// Guest ELF the dump came from [default: found from the dump's guest name and path].
        #[arg(long, value_name = "FILE")]
        guest: Option<PathBuf>,
        /// Print the gdb command instead of running it.
        #[arg(long)]
        print_command: bool,
    },
}

#[derive(Args)]
pub struct DirectoryArg {
    /// Dump directory [default: $SANDCORE_CORE_DUMP_DIR, else $HYPERLIGHT_CORE_DUMP_DIR, else the system temp directory].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

impl DirectoryArg {
    fn resolve(&self) -> PathBuf {
        match &self.dir {
            Some(dir) => dir.clone(),
            None => {
                let (directory, warning) = resolve_dump_dir(None);
                if let Some(warning) = warning {
                    tracing::warn!("{warning}");
                }
                directory
            }
        }
    }
}

/// Runs `sandcore dumps`.
pub fn run(args: &DumpsArgs) -> Result<(), CliError> {
    match &args.command {
        DumpsCommand::List { directory } => list(&directory.resolve()),
        DumpsCommand::Info { dump, directory } => info(&directory.resolve(), dump),
        DumpsCommand::Gdb {
            dump,
            directory,
            guest,
            print_command,
        } => gdb(&directory.resolve(), dump, guest.as_deref(), *print_command),
    }
}

fn list(directory: &Path) -> Result<(), CliError> {
    let listings = list_dumps(directory).map_err(|error| {
        CliError::Failure(format!(
            "failed to list dumps in {}: {error}",
            directory.display()
        ))
    })?;
    if listings.is_empty() {
        println!("no dumps in {}", directory.display());
        return Ok(());
    }
    let mut rows: Vec<(&DumpListing, Details)> = listings
        .iter()
        .map(|listing| (listing, Details::of(listing)))
        .collect();
    // File-sink names do not start with the crash time, so sort again by the
    // times read from the cores.
    rows.sort_by(|(a, a_details), (b, b_details)| {
        (a_details.timestamp_ns, &a.file_name).cmp(&(b_details.timestamp_ns, &b.file_name))
    });
    println!(
        "{:<58} {:<16} {:<16} {:<23} {:>10}",
        "FILE", "KIND", "GUEST", "TIME", "SIZE"
    );
    for (listing, details) in &rows {
        println!(
            "{:<58} {:<16} {:<16} {:<23} {:>10}",
            listing.file_name,
            details.kind,
            details.guest,
            details
                .timestamp_ns
                .map(format_utc)
                .unwrap_or_else(|| "unknown".into()),
            format_bytes(listing.size)
        );
    }
    let noun = if listings.len() == 1 { "dump" } else { "dumps" };
    println!("{} {noun} in {}", listings.len(), directory.display());
    Ok(())
}

fn info(directory: &Path, selector: &str) -> Result<(), CliError> {
    let listing = find_dump(directory, selector)?;
    let head = read_head(&listing.path)?;
    let summary = read_summary(&head).map_err(|error| {
        CliError::Failure(format!(
            "failed to read the crash summary of {}: {error}",
            listing.path.display()
        ))
    })?;

    println!("file:           {}", listing.path.display());
    println!("kind:           {}", describe_kind(&summary.kind));
    println!(
        "signal:         {} ({})",
        summary.signal,
        signal_name(summary.signal)
    );
    println!("RIP:            {:#018x}", summary.rip);
    println!("RSP:            {:#018x}", summary.rsp);
    if summary.fault_address != 0 {
        println!("fault address:  {:#018x}", summary.fault_address);
    }
    println!("guest:          {}", summary.guest_name);
    if let Some(path) = guest_path(&head) {
        println!("guest path:     {path}");
    }
    if !summary.build_id.is_empty() {
        println!("build id:       {}", hex(summary.build_id));
    }
    if !summary.function.is_empty() {
        println!("function:       {}", summary.function);
    }
    println!("time:           {}", format_utc(summary.timestamp_ns));
    println!(
        "size:           {} logical, {} on disk",
        format_bytes(listing.size),
        format_bytes(listing.allocated_bytes)
    );
    println!("sandbox id:     {}", summary.sandbox_id);
    println!("dump id:        {}", summary.dump_id);
    if let Some(sidecar) = &listing.sidecar_file {
        println!("sidecar:        {sidecar}");
    }
    if !summary.message.is_empty() {
        let truncated = if summary.message_truncated {
            " (truncated)"
        } else {
            ""
        };
        println!("panic message:  {}{truncated}", summary.message);
    }
    Ok(())
}

fn gdb(
    directory: &Path,
    selector: &str,
    guest: Option<&Path>,
    print_command: bool,
) -> Result<(), CliError> {
    let listing = find_dump(directory, selector)?;
    let guest = match guest {
        Some(guest) => guest.to_path_buf(),
        None => find_guest(&listing)?,
    };
    if !guest.is_file() {
        return Err(CliError::Usage(format!(
            "guest binary {} does not exist; pass --guest FILE",
            guest.display()
        )));
    }
    let mut command = gdb_command(&listing, &guest);
    if print_command {
        println!("gdb {} {}", guest.display(), listing.path.display());
        return Ok(());
    }
    let status = command.status().map_err(|error| {
        let hint = if error.kind() == std::io::ErrorKind::NotFound {
            "; install gdb"
        } else {
            ""
        };
        CliError::Failure(format!(
            "failed to start gdb{hint} ({error}); the command is: gdb {} {}",
            guest.display(),
            listing.path.display()
        ))
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(CliError::Failure(format!("gdb exited with {status}")))
    }
}

/// Finds the dump `selector` names: a path to a core file, or a name or id in `directory`.
fn find_dump(directory: &Path, selector: &str) -> Result<DumpListing, CliError> {
    let as_path = Path::new(selector);
    let (directory, selector) = match (as_path.parent(), as_path.file_name()) {
        (Some(parent), Some(name)) if selector.contains('/') => {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            (parent.to_path_buf(), name.to_string_lossy().into_owned())
        }
        _ => (directory.to_path_buf(), selector.to_owned()),
    };
    match dump_info(&directory, &selector) {
        Ok(listing) => Ok(listing),
        Err(error) => {
            // File-sink names carry no dump id, so a numeric selector is
            // also looked up in the cores' own notes.
            if let Ok(dump_id) = selector.parse::<u64>() {
                if let Some(listing) = find_by_dump_id(&directory, dump_id) {
                    return Ok(listing);
                }
            }
            Err(CliError::Failure(error.to_string()))
        }
    }
}

/// Returns the dump in `directory` whose `SANDCORE` note has `dump_id`.
fn find_by_dump_id(directory: &Path, dump_id: u64) -> Option<DumpListing> {
    let listings = list_dumps(directory).ok()?;
    listings.into_iter().find(|listing| {
        read_head(&listing.path)
            .ok()
            .and_then(|head| read_summary(&head).ok().map(|summary| summary.dump_id))
            == Some(dump_id)
    })
}

/// Returns the guest binary of a dump: the demo guest for guest name `demo`,
/// else the guest path recorded in the core's `NT_FILE` note if that file exists.
fn find_guest(listing: &DumpListing) -> Result<PathBuf, CliError> {
    let head = read_head(&listing.path)?;
    let guest_name = match read_summary(&head) {
        Ok(summary) => summary.guest_name.to_owned(),
        Err(_) => Details::of(listing).guest,
    };
    let recorded_path = guest_path(&head);
    let is_demo = guest_name == DEMO_GUEST_NAME
        && recorded_path
            .as_deref()
            .is_none_or(|path| path == format!("<memory>/{DEMO_GUEST_NAME}"));
    if is_demo {
        let directory = listing.path.parent().unwrap_or(Path::new("."));
        return super::demo_guest_file(directory).map_err(|error| {
            CliError::Failure(format!(
                "failed to write the demo guest next to the dump ({error}); pass --guest {}",
                sandcore::demo_guest_path()
            ))
        });
    }
    if let Some(path) = recorded_path
        .map(PathBuf::from)
        .filter(|path| path.is_file())
    {
        return Ok(path);
    }
    Err(CliError::Usage(format!(
        "the guest binary of {} (guest {guest_name:?}) is unknown; pass --guest FILE with the binary the sandbox ran",
        listing.file_name
    )))
}

/// Kind, guest and time of a listed dump, taken from the core's notes when
/// the sidecar and the file name do not give them.
struct Details {
    kind: String,
    guest: String,
    timestamp_ns: Option<u64>,
}

impl Details {
    fn of(listing: &DumpListing) -> Details {
        let mut details = Details {
            kind: listing.crash_kind.clone(),
            guest: listing.guest.clone(),
            timestamp_ns: listing.timestamp_ns,
        };
        if listing.sidecar.is_some() && details.timestamp_ns.is_some() {
            return details;
        }
        let Ok(head) = read_head(&listing.path) else {
            return details;
        };
        let Ok(summary) = read_summary(&head) else {
            return details;
        };
        details.kind = summary.kind.name().to_owned();
        details.guest = summary.guest_name.to_owned();
        details.timestamp_ns = Some(summary.timestamp_ns);
        details
    }
}

/// Opens `path` only if it is a regular file. `O_NONBLOCK` keeps a FIFO
/// named like a dump (anyone can create one in `/tmp`) from blocking the open.
fn open_regular(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// Reads the head of a core, enough for its notes.
fn read_head(path: &Path) -> Result<Vec<u8>, CliError> {
    let failed = |error: std::io::Error| {
        CliError::Failure(format!("failed to read {}: {error}", path.display()))
    };
    let mut limit = HEAD_BYTES;
    loop {
        let mut head = Vec::new();
        open_regular(path)
            .and_then(|file| file.take(limit).read_to_end(&mut head))
            .map_err(failed)?;
        let needed = match needed_length(&head) {
            Some(needed)
                if needed > limit && (head.len() as u64) == limit && needed <= MAX_HEAD_BYTES =>
            {
                needed
            }
            _ => return Ok(head),
        };
        limit = needed;
    }
}

/// Returns the length the summary needs if `head` is too short for it.
fn needed_length(head: &[u8]) -> Option<u64> {
    match read_summary(head) {
        Err(CoreReadError::Truncated { needed, .. }) => Some(needed),
        _ => None,
    }
}

/// Returns the first path of the core's `NT_FILE` note: the guest path the
/// sandbox was given, `<memory>/NAME` for a guest loaded from bytes.
fn guest_path(head: &[u8]) -> Option<String> {
    let note = notes(head)
        .ok()?
        .filter_map(Result::ok)
        .find(|note| note.name == NOTE_NAME_CORE && note.note_type == NT_FILE)?;
    // Layout: count, page size, `count` (start, end, offset) triples, then paths.
    let count = u64::from_le_bytes(note.desc.get(..8)?.try_into().ok()?);
    let paths_start = usize::try_from(count.checked_mul(24)?.checked_add(16)?).ok()?;
    let paths = note.desc.get(paths_start..)?;
    let first = paths.split(|&byte| byte == 0).next()?;
    (!first.is_empty()).then(|| String::from_utf8_lossy(first).into_owned())
}

fn describe_kind(kind: &CrashKind) -> String {
    match *kind {
        CrashKind::Exception { vector, error_code } => format!(
            "exception: {} (vector {vector}, error code {error_code:#x})",
            sandcore::vcpu::shim::exception_name(vector)
        ),
        CrashKind::StackOverflow { address } => {
            format!("stack overflow (write to {address:#x} hit the guard page)")
        }
        other => other.name().to_owned(),
    }
}

fn signal_name(signal: u32) -> &'static str {
    match signal {
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        19 => "SIGSTOP",
        _ => "unknown signal",
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
