//! A sink that writes each dump as a sparse ELF core file in a directory.
//!
//! A dump is either complete under its final name or absent:
//!
//! 1. `begin` checks the free space of the directory and creates a temporary
//!    file `.sandcore-{pid}-{dump_id}.core.tmp` with `O_CREAT | O_EXCL |
//!    O_NOFOLLOW` and mode 0600, so an existing file or symlink at that name
//!    is never followed or reused;
//! 2. `data` writes, `hole` seeks forward so that the file system stores no
//!    blocks for zero pages;
//! 3. `finish` sets the final length, fsyncs the file, renames it with
//!    `renameat2(RENAME_NOREPLACE)` so that an existing dump is never
//!    replaced, fsyncs the directory, and then applies retention.
//!
//! Any failure removes the temporary file. Final names sort by crash time
//! within one guest and sandbox: `{guest}-{sandbox_id}-{YYYYMMDDTHHMMSS.mmmZ}-{seq:06}.core`.

mod dump_dir;
#[cfg(test)]
mod tests;

pub use dump_dir::{resolve_dump_dir, resolve_dump_dir_with, DUMP_DIR_ENV, DUMP_DIR_ENV_ALIAS};

use std::ffi::CString;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use crate::sink::{DumpMetadata, DumpSink, SinkError, SinkErrorKind, SinkReceipt};

/// Process-wide sequence number of dump file names.
static NEXT_SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// Maximum attempts to publish a dump under a fresh sequence number when
/// another file already has the name (another process wrote in the same millisecond).
const MAX_PUBLISH_ATTEMPTS: u32 = 16;

/// Configuration of a [`FileSink`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSinkConfig {
    /// Directory the dumps are written to. It must exist.
    pub directory: PathBuf,
    /// Maximum number of `*.core` files kept in the directory, or no limit.
    pub max_dumps: Option<usize>,
    /// Maximum disk usage in bytes (allocated blocks, so holes do not count)
    /// of all `*.core` files in the directory, or no limit.
    pub max_total_bytes: Option<u64>,
    /// Minimum free bytes for unprivileged users (`statvfs` `f_bavail`) the
    /// directory must have for a dump to start, or no minimum.
    pub min_free_bytes: Option<u64>,
}

impl FileSinkConfig {
    /// Creates a configuration for `directory` without limits.
    pub fn new(directory: impl Into<PathBuf>) -> Self {
        FileSinkConfig {
            directory: directory.into(),
            max_dumps: None,
            max_total_bytes: None,
            min_free_bytes: None,
        }
    }
}

/// A [`DumpSink`] that writes each dump to its own file in a directory.
pub struct FileSink {
    config: FileSinkConfig,
    current: Option<InProgress>,
}

struct InProgress {
    file: File,
    temp_path: PathBuf,
    metadata: DumpMetadata,
    position: u64,
}

impl FileSink {
    /// Creates a sink with `config`. The directory is checked on each `begin`.
    pub fn new(config: FileSinkConfig) -> Self {
        FileSink {
            config,
            current: None,
        }
    }

    /// Returns the configuration.
    pub fn config(&self) -> &FileSinkConfig {
        &self.config
    }

    /// Returns the temporary path a dump is written to before it is published.
    pub fn temp_path(&self, dump_id: u64) -> PathBuf {
        self.config.directory.join(format!(
            ".sandcore-{}-{dump_id}.core.tmp",
            std::process::id()
        ))
    }

    fn check_free_space(&self) -> Result<(), SinkError> {
        let Some(min_free_bytes) = self.config.min_free_bytes else {
            return Ok(());
        };
        let directory = &self.config.directory;
        let free = free_bytes(directory)
            .map_err(|error| io_error("failed to read free space of", directory, &error))?;
        if free < min_free_bytes {
            return Err(SinkError::new(
                SinkErrorKind::NoSpace,
                &format!(
                    "dump directory {} has {free} bytes free, below the minimum of {min_free_bytes}; \
                     free space there or lower min_free_bytes",
                    directory.display()
                ),
            ));
        }
        Ok(())
    }

    /// Fails the current dump: removes its temporary file and returns `error`.
    fn fail(&mut self, error: SinkError) -> SinkError {
        self.abort();
        error
    }

    fn publish(&mut self, progress: InProgress) -> Result<PathBuf, SinkError> {
        let InProgress {
            file,
            temp_path,
            metadata,
            position,
        } = progress;
        let cleanup = |error: SinkError| {
            let _ = std::fs::remove_file(&temp_path);
            error
        };

        if position != metadata.total_size {
            return Err(cleanup(SinkError::new(
                SinkErrorKind::Protocol,
                &format!(
                    "file sink: dump {} ended after {position} of {} bytes; the producer must send the whole core",
                    metadata.dump_id, metadata.total_size
                ),
            )));
        }
        // A trailing hole only moved the file offset: set_len gives the file its size.
        file.set_len(position)
            .map_err(|error| cleanup(io_error("failed to set the size of", &temp_path, &error)))?;
        file.sync_all()
            .map_err(|error| cleanup(io_error("failed to fsync", &temp_path, &error)))?;
        drop(file);

        let mut attempt = 0;
        let final_path = loop {
            let sequence = NEXT_SEQUENCE.fetch_add(1, Ordering::Relaxed);
            let candidate = self
                .config
                .directory
                .join(dump_file_name(&metadata, sequence));
            match rename_no_replace(&temp_path, &candidate) {
                Ok(()) => break candidate,
                Err(error)
                    if error.kind() == io::ErrorKind::AlreadyExists
                        && attempt + 1 < MAX_PUBLISH_ATTEMPTS =>
                {
                    attempt += 1;
                }
                Err(error) => {
                    return Err(cleanup(io_error("failed to publish", &candidate, &error)))
                }
            }
        };

        let directory = &self.config.directory;
        File::open(directory)
            .and_then(|handle| handle.sync_all())
            .map_err(|error| {
                let operation = format!(
                    "published {} but failed to fsync its directory",
                    final_path.display()
                );
                io_error(&operation, directory, &error)
            })?;
        Ok(final_path)
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        self.abort();
    }
}

impl DumpSink for FileSink {
    fn begin(&mut self, metadata: &DumpMetadata) -> Result<(), SinkError> {
        self.abort();
        self.check_free_space()?;
        let temp_path = self.temp_path(metadata.dump_id);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temp_path)
            .map_err(|error| io_error("failed to create", &temp_path, &error))?;
        self.current = Some(InProgress {
            file,
            temp_path,
            metadata: metadata.clone(),
            position: 0,
        });
        Ok(())
    }

    fn data(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        let progress = in_progress(&mut self.current, "data")?;
        match progress.file.write_all(bytes) {
            Ok(()) => {
                progress.position += bytes.len() as u64;
                Ok(())
            }
            Err(error) => {
                let error = io_error("failed to write", &progress.temp_path, &error);
                Err(self.fail(error))
            }
        }
    }

    fn hole(&mut self, length: u64) -> Result<(), SinkError> {
        let progress = in_progress(&mut self.current, "hole")?;
        let Ok(offset) = i64::try_from(length) else {
            let error = SinkError::new(
                SinkErrorKind::Protocol,
                &format!("file sink: hole of {length} bytes exceeds the maximum file offset"),
            );
            return Err(self.fail(error));
        };
        match progress.file.seek(SeekFrom::Current(offset)) {
            Ok(_) => {
                progress.position += length;
                Ok(())
            }
            Err(error) => {
                let error = io_error("failed to seek in", &progress.temp_path, &error);
                Err(self.fail(error))
            }
        }
    }

    fn finish(&mut self) -> Result<SinkReceipt, SinkError> {
        let progress = self.current.take().ok_or_else(|| {
            SinkError::new(
                SinkErrorKind::Protocol,
                "file sink: finish called without begin",
            )
        })?;
        let bytes = progress.position;
        let final_path = self.publish(progress)?;
        // The dump is durable at this point, so a retention failure is
        // logged and does not fail it.
        if let Err(error) = apply_retention(&self.config, &final_path) {
            tracing::warn!(
                directory = %self.config.directory.display(),
                %error,
                "dump retention failed; old dumps were kept"
            );
        }

        let mut location = heapless::String::new();
        for ch in final_path.to_string_lossy().chars() {
            if location.push(ch).is_err() {
                break;
            }
        }
        Ok(SinkReceipt { location, bytes })
    }

    fn abort(&mut self) {
        if let Some(progress) = self.current.take() {
            drop(progress.file);
            let _ = std::fs::remove_file(&progress.temp_path);
        }
    }

    fn name(&self) -> &str {
        "file"
    }
}

fn in_progress<'a>(
    current: &'a mut Option<InProgress>,
    call: &str,
) -> Result<&'a mut InProgress, SinkError> {
    current.as_mut().ok_or_else(|| {
        SinkError::new(
            SinkErrorKind::Protocol,
            &format!("file sink: {call} called without begin"),
        )
    })
}

/// Builds a sink error naming the operation, the path and the OS error;
/// ENOSPC and EDQUOT become [`SinkErrorKind::NoSpace`].
fn io_error(operation: &str, path: &Path, error: &io::Error) -> SinkError {
    let kind = match error.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => SinkErrorKind::NoSpace,
        _ => SinkErrorKind::Io,
    };
    SinkError::new(kind, &format!("{operation} {}: {error}", path.display()))
}

/// Returns the bytes available to unprivileged users on the file system of `path`.
fn free_bytes(path: &Path) -> io::Result<u64> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a NUL-terminated string that outlives the call, and
    // `stats` points to writable memory of the size of `struct statvfs`,
    // which the kernel fills completely on success.
    let result = unsafe { libc::statvfs(c_path.as_ptr(), stats.as_mut_ptr()) };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialized `stats`.
    let stats = unsafe { stats.assume_init() };
    // fsblkcnt_t and c_ulong are narrower than u64 on some 32-bit targets.
    #[allow(clippy::useless_conversion)]
    let (available_blocks, fragment_size) = (u64::from(stats.f_bavail), u64::from(stats.f_frsize));
    Ok(available_blocks.saturating_mul(fragment_size))
}

/// Renames `from` to `to`, failing with `AlreadyExists` instead of replacing `to`.
///
/// Uses `renameat2(RENAME_NOREPLACE)`; on file systems without it, falls
/// back to `link` plus `unlink`, which also never replaces an existing file.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    let invalid = |_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte");
    let c_from = CString::new(from.as_os_str().as_bytes()).map_err(invalid)?;
    let c_to = CString::new(to.as_os_str().as_bytes()).map_err(invalid)?;
    // SAFETY: both paths are NUL-terminated strings that outlive the call;
    // AT_FDCWD makes relative paths relative to the working directory.
    let result = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c_from.as_ptr(),
            libc::AT_FDCWD,
            c_to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if result == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        _ => Err(error),
    }
}

/// Returns `{guest}-{sandbox_id}-{YYYYMMDDTHHMMSS.mmmZ}-{sequence:06}.core`
/// for the crash time in `metadata`.
pub fn dump_file_name(metadata: &DumpMetadata, sequence: u64) -> String {
    let mut name = sanitize_guest_name(&metadata.guest_name);
    let _ = write!(name, "-{}-", metadata.sandbox_id);
    write_utc_timestamp(&mut name, metadata.timestamp_ns);
    let _ = write!(name, "-{sequence:06}.core");
    name
}

/// Replaces every character outside `[A-Za-z0-9._-]` with `_`, and a leading
/// dot with `_` so that dumps are never hidden files; an empty name becomes `guest`.
fn sanitize_guest_name(guest_name: &str) -> String {
    let mut name: String = guest_name
        .chars()
        .map(|ch| match ch {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '.' | '_' | '-' => ch,
            _ => '_',
        })
        .collect();
    if name.starts_with('.') {
        name.replace_range(..1, "_");
    }
    if name.is_empty() {
        name.push_str("guest");
    }
    name
}

/// Appends `timestamp_ns` (nanoseconds since the Unix epoch) as `YYYYMMDDTHHMMSS.mmmZ`.
fn write_utc_timestamp(out: &mut String, timestamp_ns: u64) {
    let millis = timestamp_ns / 1_000_000;
    let seconds = millis / 1000;
    let days = (seconds / 86_400) as i64;
    let second_of_day = seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    let _ = write!(
        out,
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}.{:03}Z",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60,
        millis % 1000
    );
}

/// Converts days since 1970-01-01 to a proleptic Gregorian (year, month, day),
/// by Howard Hinnant's `civil_from_days` algorithm. Public so that tools
/// printing dump times use the same calendar as dump file names.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// One `*.core` file considered by retention.
struct CoreFile {
    path: PathBuf,
    modified: SystemTime,
    allocated_bytes: u64,
}

/// Removes the oldest `*.core` files of the directory until the count and
/// byte limits hold. The dump just published at `keep` is never removed.
fn apply_retention(config: &FileSinkConfig, keep: &Path) -> Result<(), SinkError> {
    if config.max_dumps.is_none() && config.max_total_bytes.is_none() {
        return Ok(());
    }
    let directory = &config.directory;
    let entries = std::fs::read_dir(directory)
        .map_err(|error| io_error("failed to list dump directory", directory, &error))?;
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|extension| extension != "core") {
            continue;
        }
        // symlink_metadata: a symlink named *.core is neither followed nor removed.
        let Ok(metadata) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !metadata.file_type().is_file() {
            continue;
        }
        files.push(CoreFile {
            path,
            modified: metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            allocated_bytes: metadata.blocks() * 512,
        });
    }
    files.sort_by(|a, b| {
        a.modified
            .cmp(&b.modified)
            .then_with(|| a.path.cmp(&b.path))
    });

    let mut count = files.len();
    let mut total: u64 = files.iter().map(|file| file.allocated_bytes).sum();
    let max_dumps = config.max_dumps.unwrap_or(usize::MAX);
    let max_total_bytes = config.max_total_bytes.unwrap_or(u64::MAX);
    for file in &files {
        if count <= max_dumps && total <= max_total_bytes {
            break;
        }
        if file.path == keep {
            continue;
        }
        match std::fs::remove_file(&file.path) {
            Ok(()) => {
                count -= 1;
                total -= file.allocated_bytes;
            }
            // Another process removed it first.
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                count -= 1;
                total -= file.allocated_bytes;
            }
            Err(error) => return Err(io_error("failed to remove old dump", &file.path, &error)),
        }
    }
    Ok(())
}
