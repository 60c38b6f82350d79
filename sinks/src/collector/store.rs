//! Durable storage of received dumps: core files, JSON sidecars, the
//! deduplication index and retention.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::sink::{DumpMetadata, DumpSink, SinkError, SinkErrorKind, SinkReceipt};
use crate::spool::Directory;

/// Suffix of stored core files.
pub(crate) const CORE_SUFFIX: &str = ".core";
/// Suffix of metadata sidecars, which replace [`CORE_SUFFIX`].
pub(crate) const SIDECAR_SUFFIX: &str = ".json";
/// Prefix of files being written, never listed.
const TEMP_PREFIX: &str = ".tmp-";

/// Metadata sidecar stored next to each core file as `<stem>.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpSidecar {
    /// File name of the core, in the same directory.
    pub core_file: String,
    /// Dump id, unique within the producer.
    pub dump_id: u64,
    /// Producer id from the handshake, as 16 hexadecimal digits.
    pub producer_id: String,
    /// Sandbox id within the producer.
    pub sandbox_id: u64,
    /// Guest binary file name.
    pub guest: String,
    /// GNU build id of the guest binary in hexadecimal, empty if none.
    pub build_id: String,
    /// Crash kind name (`exception`, `panic`, …).
    pub crash_kind: String,
    /// Crash kind wire code.
    pub crash_kind_code: u32,
    /// Crash time, nanoseconds since the Unix epoch.
    pub timestamp_ns: u64,
    /// Logical size of the core in bytes.
    pub size: u64,
    /// CRC-32C of the core's logical bytes.
    pub crc32c: u32,
}

/// Replaces every byte outside `[A-Za-z0-9._]` with `_`, so a guest name is a safe file name part.
fn sanitize(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .take(64)
        .map(|ch| {
            if ch.is_ascii_alphanumeric() || ch == '.' || ch == '_' {
                ch
            } else {
                '_'
            }
        })
        .collect();
    if cleaned.is_empty() || cleaned.starts_with('.') {
        format!("guest{cleaned}")
    } else {
        cleaned
    }
}

/// Returns the stem `<guest>-<kind>-<unix seconds>-<producer id>-<dump id>` of a stored dump.
pub(crate) fn dump_stem(producer_id: u64, metadata: &DumpMetadata) -> String {
    format!(
        "{}-{}-{}-{producer_id:016x}-{:016x}",
        sanitize(&metadata.guest_name),
        metadata.kind.name(),
        metadata.timestamp_ns / 1_000_000_000,
        metadata.dump_id
    )
}

/// Fields recovered from a core file name made by [`dump_stem`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ParsedName {
    pub(crate) guest: String,
    pub(crate) crash_kind: String,
    pub(crate) timestamp_secs: u64,
    pub(crate) producer_id: u64,
    pub(crate) dump_id: u64,
}

/// Parses a core file name made by [`dump_stem`]; returns `None` for other names.
pub(crate) fn parse_core_name(file_name: &str) -> Option<ParsedName> {
    const KINDS: [&str; 9] = [
        "exception",
        "stack-overflow",
        "panic",
        "triple-fault",
        "internal-error",
        "unexpected-exit",
        "timeout",
        "cancelled",
        "on-demand",
    ];
    let stem = file_name.strip_suffix(CORE_SUFFIX)?;
    let mut fields = stem.rsplitn(4, '-');
    let dump_id = u64::from_str_radix(fields.next()?, 16).ok()?;
    let producer_id = u64::from_str_radix(fields.next()?, 16).ok()?;
    let timestamp_secs = fields.next()?.parse().ok()?;
    let guest_and_kind = fields.next()?;
    let crash_kind = KINDS
        .iter()
        .find(|kind| guest_and_kind.ends_with(&format!("-{kind}")))?;
    let guest = &guest_and_kind[..guest_and_kind.len() - crash_kind.len() - 1];
    Some(ParsedName {
        guest: guest.to_string(),
        crash_kind: crash_kind.to_string(),
        timestamp_secs,
        producer_id,
        dump_id,
    })
}

/// Writes one dump into the store directory: a temporary file created
/// exclusively with mode 0600 and never through a symlink, holes left sparse,
/// synced and renamed to its final name without replacing anything.
///
/// NOTE: this is the collector's own writer. The crate's file sink follows
/// the same publish rules; the collector can switch to it once both name
/// files the same way.
pub(crate) struct DirectorySink<'a> {
    directory: &'a Directory,
    final_name: String,
    temp_name: String,
    file: Option<File>,
    total_size: u64,
    written: u64,
}

impl<'a> DirectorySink<'a> {
    pub(crate) fn new(directory: &'a Directory, final_name: String) -> Self {
        DirectorySink {
            directory,
            temp_name: format!("{TEMP_PREFIX}{final_name}"),
            final_name,
            file: None,
            total_size: 0,
            written: 0,
        }
    }

    fn io_error(&self, action: &str, error: io::Error) -> SinkError {
        let kind = if error.raw_os_error() == Some(libc::ENOSPC) {
            SinkErrorKind::NoSpace
        } else {
            SinkErrorKind::Io
        };
        SinkError::new(
            kind,
            &format!(
                "failed to {action} {} in {}: {error}",
                self.temp_name,
                self.directory.path().display()
            ),
        )
    }

    fn file(&mut self) -> Result<&mut File, SinkError> {
        self.file.as_mut().ok_or_else(|| {
            SinkError::new(SinkErrorKind::Protocol, "collector store used before begin")
        })
    }

    fn advance(&mut self, length: u64) -> Result<(), SinkError> {
        let new_total = self.written.saturating_add(length);
        if new_total > self.total_size {
            return Err(SinkError::new(
                SinkErrorKind::Protocol,
                &format!(
                    "dump grows to {new_total} bytes, past its total size of {}",
                    self.total_size
                ),
            ));
        }
        self.written = new_total;
        Ok(())
    }
}

impl DumpSink for DirectorySink<'_> {
    fn begin(&mut self, metadata: &DumpMetadata) -> Result<(), SinkError> {
        let file = self
            .directory
            .create_file(&self.temp_name)
            .map_err(|error| self.io_error("create", error))?;
        self.file = Some(file);
        self.total_size = metadata.total_size;
        self.written = 0;
        Ok(())
    }

    fn data(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        self.advance(bytes.len() as u64)?;
        let result = self.file()?.write_all(bytes);
        result.map_err(|error| self.io_error("write", error))
    }

    fn hole(&mut self, length: u64) -> Result<(), SinkError> {
        self.advance(length)?;
        let offset = i64::try_from(length).map_err(|_| {
            SinkError::new(SinkErrorKind::Protocol, "hole longer than a file offset")
        })?;
        let result = self.file()?.seek(SeekFrom::Current(offset));
        result
            .map(|_| ())
            .map_err(|error| self.io_error("seek in", error))
    }

    fn finish(&mut self) -> Result<SinkReceipt, SinkError> {
        if self.written != self.total_size {
            return Err(SinkError::new(
                SinkErrorKind::Protocol,
                &format!(
                    "dump finished after {} of {} bytes",
                    self.written, self.total_size
                ),
            ));
        }
        let total_size = self.total_size;
        let file = self.file()?;
        // A trailing hole moves the offset without extending the file.
        let result = file.set_len(total_size).and_then(|()| file.sync_all());
        result.map_err(|error| self.io_error("sync", error))?;
        self.file = None;
        self.directory
            .rename_no_replace(&self.temp_name, &self.final_name)
            .map_err(|error| self.io_error("publish", error))?;
        self.temp_name.clear();
        self.directory
            .sync()
            .map_err(|error| self.io_error("sync directory of", error))?;
        let mut location = heapless::String::new();
        for ch in self.final_name.chars() {
            if location.push(ch).is_err() {
                break;
            }
        }
        Ok(SinkReceipt {
            location,
            bytes: total_size,
        })
    }

    fn abort(&mut self) {
        self.file = None;
        if !self.temp_name.is_empty() {
            let _ = self.directory.remove(&self.temp_name);
            self.temp_name.clear();
        }
    }

    fn name(&self) -> &str {
        "collector"
    }
}

impl Drop for DirectorySink<'_> {
    fn drop(&mut self) {
        if self.file.is_some() {
            self.abort();
        }
    }
}

/// Key under which the collector deduplicates dumps.
pub(crate) type DumpKey = (u64, u64);

#[derive(Debug, Default)]
struct IndexState {
    stored: HashMap<DumpKey, String>,
    in_progress: HashSet<DumpKey>,
}

/// Result of [`Store::claim`] for a dump key.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Claim {
    /// The caller now owns storing this dump and must call [`Store::release`].
    Owned,
    /// The dump is already stored under this file name.
    Stored(String),
}

/// The dump directory with its deduplication index.
pub(crate) struct Store {
    pub(crate) directory: Directory,
    index: Mutex<IndexState>,
    changed: Condvar,
    retention_lock: Mutex<()>,
}

impl Store {
    /// Opens the directory, deletes temporary files and rebuilds the index
    /// from sidecars and core file names.
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        let directory = Directory::open(path)?;
        let mut state = IndexState::default();
        for name in directory.names()? {
            if name.starts_with(TEMP_PREFIX) {
                tracing::warn!(file = %name, "deleting partial dump left by an earlier run");
                directory.remove(&name)?;
                continue;
            }
            if let Some(parsed) = parse_core_name(&name) {
                state
                    .stored
                    .insert((parsed.producer_id, parsed.dump_id), name.clone());
            } else if name.ends_with(SIDECAR_SUFFIX) {
                if let Some(sidecar) = read_sidecar(&directory, &name) {
                    if let Ok(producer_id) = u64::from_str_radix(&sidecar.producer_id, 16) {
                        state
                            .stored
                            .insert((producer_id, sidecar.dump_id), sidecar.core_file);
                    }
                }
            }
        }
        tracing::info!(
            directory = %path.display(),
            dumps = state.stored.len(),
            "collector dump index rebuilt"
        );
        Ok(Store {
            directory,
            index: Mutex::new(state),
            changed: Condvar::new(),
            retention_lock: Mutex::new(()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, IndexState> {
        self.index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Claims `key` for storing, waiting up to `timeout` while another
    /// connection stores the same dump. Returns `None` on timeout.
    pub(crate) fn claim(&self, key: DumpKey, timeout: Duration) -> Option<Claim> {
        let deadline = std::time::Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if let Some(name) = state.stored.get(&key) {
                return Some(Claim::Stored(name.clone()));
            }
            if !state.in_progress.contains(&key) {
                state.in_progress.insert(key);
                return Some(Claim::Owned);
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return None;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// Ends a claim; `stored_as` is the core file name if the dump is now durable.
    pub(crate) fn release(&self, key: DumpKey, stored_as: Option<String>) {
        let mut state = self.lock();
        state.in_progress.remove(&key);
        if let Some(name) = stored_as {
            state.stored.insert(key, name);
        }
        drop(state);
        self.changed.notify_all();
    }

    /// Writes `sidecar` as `<stem>.json` through a synced temporary file and rename.
    pub(crate) fn write_sidecar(&self, stem: &str, sidecar: &DumpSidecar) -> io::Result<()> {
        let final_name = format!("{stem}{SIDECAR_SUFFIX}");
        let temp_name = format!("{TEMP_PREFIX}{final_name}");
        let mut json = serde_json::to_vec_pretty(sidecar).map_err(io::Error::other)?;
        json.push(b'\n');
        let written = self.directory.create_file(&temp_name).and_then(|mut file| {
            file.write_all(&json)?;
            file.sync_all()
        });
        let published =
            written.and_then(|()| self.directory.rename_no_replace(&temp_name, &final_name));
        if let Err(error) = published {
            let _ = self.directory.remove(&temp_name);
            return Err(error);
        }
        self.directory.sync()
    }

    /// Deletes the oldest dumps until the directory meets `retention`,
    /// never deleting `keep` (the dump just stored).
    pub(crate) fn apply_retention(&self, retention: &super::Retention, keep: Option<&str>) {
        if retention.max_total_bytes.is_none()
            && retention.min_free_bytes.is_none()
            && retention.max_age.is_none()
        {
            return;
        }
        let _guard = self
            .retention_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut dumps = match super::listing::list_dumps(self.directory.path()) {
            Ok(dumps) => dumps,
            Err(error) => {
                tracing::warn!(error = %error, "failed to list dumps for retention");
                return;
            }
        };
        dumps.sort_by_key(|dump| dump.modified);
        let mut total: u64 = dumps.iter().map(|dump| dump.allocated_bytes).sum();
        let now = SystemTime::now();
        for dump in &dumps {
            if Some(dump.file_name.as_str()) == keep {
                continue;
            }
            let too_old = retention.max_age.is_some_and(|max_age| {
                now.duration_since(dump.modified)
                    .is_ok_and(|age| age > max_age)
            });
            let over_total = retention
                .max_total_bytes
                .is_some_and(|max_total| total > max_total);
            let low_space = retention.min_free_bytes.is_some_and(|min_free| {
                self.directory
                    .free_bytes()
                    .is_ok_and(|free| free < min_free)
            });
            if !(too_old || over_total || low_space) {
                continue;
            }
            if let Err(error) = self.directory.remove(&dump.file_name) {
                tracing::warn!(file = %dump.file_name, error = %error, "failed to delete dump for retention");
                continue;
            }
            if let Some(sidecar) = &dump.sidecar_file {
                let _ = self.directory.remove(sidecar);
            }
            total = total.saturating_sub(dump.allocated_bytes);
            tracing::info!(
                file = %dump.file_name,
                too_old,
                over_total,
                low_space,
                "deleted dump for retention"
            );
        }
        let _ = self.directory.sync();
    }
}

/// Reads and parses a sidecar; returns `None` (after a warning) if it is unreadable.
pub(crate) fn read_sidecar(directory: &Directory, name: &str) -> Option<DumpSidecar> {
    let parsed = directory.open_file(name).and_then(|file| {
        serde_json::from_reader(io::BufReader::new(file)).map_err(io::Error::other)
    });
    match parsed {
        Ok(sidecar) => Some(sidecar),
        Err(error) => {
            tracing::warn!(file = %name, error = %error, "ignoring unreadable dump sidecar");
            None
        }
    }
}

/// Returns the bytes a file occupies on disk (sparse holes excluded).
pub(crate) fn allocated_bytes(metadata: &std::fs::Metadata) -> u64 {
    metadata.blocks().saturating_mul(512)
}
