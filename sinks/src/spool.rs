//! Bounded on-disk queue of encoded dumps waiting for the collector's `Ack`.
//!
//! Each entry is one file holding a dump exactly as it goes on the wire after
//! the handshake (`Begin`, `Data`, `Hole`, `End` frames), so sending it again
//! after a reconnect is a plain copy. An entry is written to a temporary file
//! created exclusively with mode 0600, synced, and renamed to its final name,
//! so a crash mid-write leaves only a temporary file, which the next
//! [`Spool::open`] deletes. Every file operation goes through a descriptor of
//! the spool directory with `O_NOFOLLOW`, so no symlink is followed.
//!
//! Final names are `<sequence>-<producer id>-<dump id>-<total size>.dump`
//! (hexadecimal), so the queue order and what the sender needs survive a
//! restart without reading the files.

use std::collections::VecDeque;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Prefix of temporary files, which [`Spool::open`] deletes.
const TEMP_PREFIX: &str = ".tmp-";
/// Suffix of complete entries.
const ENTRY_SUFFIX: &str = ".dump";

/// An open directory whose files are reached only through its descriptor.
#[derive(Debug)]
pub(crate) struct Directory {
    fd: OwnedFd,
    path: PathBuf,
}

fn c_name(name: &str) -> io::Result<CString> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid file name {name:?}: expected a plain name without '/'"),
        ));
    }
    CString::new(name).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid file name {name:?}: contains a NUL byte"),
        )
    })
}

fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

impl Directory {
    /// Opens `path` as a directory, creating it with mode 0700 if it is
    /// missing. Fails if `path` is a symlink.
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        match std::fs::symlink_metadata(path) {
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(path)?;
            }
            Err(error) => return Err(error),
        }
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
        // SAFETY: c_path is a valid NUL-terminated string that outlives the call.
        let fd = check(unsafe {
            libc::open(
                c_path.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: open returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Directory {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Opens an existing directory at `path`. Fails if it is missing or a symlink.
    pub(crate) fn open_existing(path: &Path) -> io::Result<Self> {
        std::fs::symlink_metadata(path).map_err(|error| {
            io::Error::new(
                error.kind(),
                format!("failed to open directory {}: {error}", path.display()),
            )
        })?;
        Self::open(path)
    }

    /// Returns the directory's path as opened.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Creates `name` exclusively with mode 0600 for writing, never through a symlink.
    pub(crate) fn create_file(&self, name: &str) -> io::Result<File> {
        let c_name = c_name(name)?;
        // SAFETY: the directory descriptor is open and c_name is NUL-terminated.
        let fd = check(unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c_name.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        })?;
        // SAFETY: openat returned a new descriptor that nothing else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Opens the regular file `name` for reading, never through a symlink.
    /// `O_NONBLOCK` keeps a FIFO planted under that name from blocking the
    /// open; anything but a regular file is then rejected.
    pub(crate) fn open_file(&self, name: &str) -> io::Result<File> {
        let c_name = c_name(name)?;
        // SAFETY: the directory descriptor is open and c_name is NUL-terminated.
        let fd = check(unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c_name.as_ptr(),
                libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        })?;
        // SAFETY: openat returned a new descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        if !file.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name} is not a regular file"),
            ));
        }
        Ok(file)
    }

    /// Renames `from` to `to`, failing if `to` exists.
    pub(crate) fn rename_no_replace(&self, from: &str, to: &str) -> io::Result<()> {
        let c_from = c_name(from)?;
        let c_to = c_name(to)?;
        let dir = self.fd.as_raw_fd();
        // SAFETY: both names are NUL-terminated and the descriptor is open.
        let result = unsafe {
            libc::renameat2(
                dir,
                c_from.as_ptr(),
                dir,
                c_to.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if result == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINVAL) {
            return Err(error);
        }
        // Some file systems do not support RENAME_NOREPLACE. A hard link
        // also fails when the target exists, so link and unlink instead.
        // SAFETY: as above.
        check(unsafe { libc::linkat(dir, c_from.as_ptr(), dir, c_to.as_ptr(), 0) })?;
        self.remove(from)
    }

    /// Deletes `name`.
    pub(crate) fn remove(&self, name: &str) -> io::Result<()> {
        let c_name = c_name(name)?;
        // SAFETY: the directory descriptor is open and c_name is NUL-terminated.
        check(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c_name.as_ptr(), 0) })?;
        Ok(())
    }

    /// Flushes the directory entry changes (creates, renames, deletes) to disk.
    pub(crate) fn sync(&self) -> io::Result<()> {
        // SAFETY: the descriptor is open.
        check(unsafe { libc::fsync(self.fd.as_raw_fd()) })?;
        Ok(())
    }

    /// Returns the bytes available to unprivileged users on the directory's file system.
    pub(crate) fn free_bytes(&self) -> io::Result<u64> {
        // SAFETY: statvfs is plain old data, so all-zero is a valid value.
        let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: the descriptor is open and `stats` is a valid out pointer.
        check(unsafe { libc::fstatvfs(self.fd.as_raw_fd(), &mut stats) })?;
        Ok((stats.f_bavail as u64).saturating_mul(stats.f_frsize as u64))
    }

    /// Returns the names of the directory's entries, skipping names that are not UTF-8.
    pub(crate) fn names(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.path)? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }
}

/// Limits and location of a spool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoolConfig {
    /// Directory of the spool; created with mode 0700 if missing. It must
    /// not be a symlink and must belong to one sink at a time.
    pub directory: PathBuf,
    /// Maximum number of dumps waiting, including the one being written. Default 64.
    pub max_entries: usize,
    /// Maximum total bytes of encoded dumps waiting, including the one being
    /// written. Holes take 16 bytes each. Default 1 GiB.
    pub max_bytes: u64,
}

impl SpoolConfig {
    /// Creates a configuration for `directory` with the default limits.
    pub fn new(directory: impl Into<PathBuf>) -> Self {
        SpoolConfig {
            directory: directory.into(),
            max_entries: 64,
            max_bytes: 1 << 30,
        }
    }
}

/// A spool operation failed.
#[derive(Debug)]
pub enum SpoolError {
    /// The spool has reached its entry or byte limit.
    Full {
        /// Entries waiting, including ones being written.
        entries: usize,
        /// Bytes waiting, including ones being written.
        bytes: u64,
    },
    /// A file operation failed.
    Io {
        /// Failed operation and path.
        context: String,
        /// The error.
        source: io::Error,
    },
}

impl std::fmt::Display for SpoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpoolError::Full { entries, bytes } => write!(
                f,
                "spool is full with {entries} dumps and {bytes} bytes waiting; start the collector or raise the spool limits"
            ),
            SpoolError::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for SpoolError {}

/// One complete dump waiting in the spool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoolEntry {
    /// Position in the queue; entries are sent in increasing order.
    pub sequence: u64,
    /// Producer id the dump was spooled under.
    pub producer_id: u64,
    /// Dump id.
    pub dump_id: u64,
    /// Logical size of the dump (data plus holes).
    pub total_size: u64,
    /// Size of the entry file in bytes.
    pub file_size: u64,
    /// File name inside the spool directory.
    pub file_name: String,
}

impl SpoolEntry {
    fn file_name_for(sequence: u64, producer_id: u64, dump_id: u64, total_size: u64) -> String {
        format!("{sequence:016x}-{producer_id:016x}-{dump_id:016x}-{total_size:x}{ENTRY_SUFFIX}")
    }

    /// Parses a final entry name; returns `None` for anything else.
    fn parse(file_name: &str, file_size: u64) -> Option<Self> {
        let stem = file_name.strip_suffix(ENTRY_SUFFIX)?;
        let mut fields = stem.split('-');
        let sequence = u64::from_str_radix(fields.next()?, 16).ok()?;
        let producer_id = u64::from_str_radix(fields.next()?, 16).ok()?;
        let dump_id = u64::from_str_radix(fields.next()?, 16).ok()?;
        let total_size = u64::from_str_radix(fields.next()?, 16).ok()?;
        if fields.next().is_some() {
            return None;
        }
        Some(SpoolEntry {
            sequence,
            producer_id,
            dump_id,
            total_size,
            file_size,
            file_name: file_name.to_string(),
        })
    }
}

#[derive(Debug, Default)]
struct SpoolState {
    entries: VecDeque<SpoolEntry>,
    /// Bytes of complete entries plus bytes written by open writers.
    bytes: u64,
    /// Writers not yet committed or dropped.
    writers: usize,
    next_sequence: u64,
    closed: bool,
}

/// A bounded queue of dump files in one directory. Shared between the
/// producing thread and the sender thread.
#[derive(Debug)]
pub struct Spool {
    directory: Directory,
    max_entries: usize,
    max_bytes: u64,
    state: Mutex<SpoolState>,
    changed: Condvar,
}

impl Spool {
    /// Opens or creates the spool, deletes temporary files left by a crash,
    /// and queues the complete entries found in the directory.
    pub fn open(config: &SpoolConfig) -> Result<Self, SpoolError> {
        let io_error = |context: &str, source| SpoolError::Io {
            context: format!("{context} {}", config.directory.display()),
            source,
        };
        let directory = Directory::open(&config.directory)
            .map_err(|error| io_error("failed to open spool directory", error))?;
        let names = directory
            .names()
            .map_err(|error| io_error("failed to list spool directory", error))?;
        let mut state = SpoolState::default();
        for name in names {
            if name.starts_with(TEMP_PREFIX) {
                tracing::warn!(file = %name, "deleting partial spool entry left by an earlier run");
                directory
                    .remove(&name)
                    .map_err(|error| io_error(&format!("failed to delete {name} in"), error))?;
                continue;
            }
            let file_size = match directory.open_file(&name).and_then(|file| file.metadata()) {
                Ok(metadata) if metadata.is_file() => metadata.len(),
                _ => continue,
            };
            if let Some(entry) = SpoolEntry::parse(&name, file_size) {
                state.bytes += entry.file_size;
                state.next_sequence = state.next_sequence.max(entry.sequence + 1);
                state.entries.push_back(entry);
            }
        }
        state
            .entries
            .make_contiguous()
            .sort_by_key(|entry| entry.sequence);
        if !state.entries.is_empty() {
            tracing::info!(
                directory = %config.directory.display(),
                entries = state.entries.len(),
                "found dumps spooled by an earlier run; they will be sent"
            );
        }
        Ok(Spool {
            directory,
            max_entries: config.max_entries,
            max_bytes: config.max_bytes,
            state: Mutex::new(state),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, SpoolState> {
        // A panic while holding the lock leaves counters that are still
        // consistent enough to keep going, so poisoning is ignored.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts writing a dump. Fails with [`SpoolError::Full`] without blocking
    /// when the spool is at its entry or byte limit.
    pub fn start(
        self: &Arc<Self>,
        producer_id: u64,
        dump_id: u64,
        total_size: u64,
    ) -> Result<SpoolWriter, SpoolError> {
        let sequence = {
            let mut state = self.lock();
            let entries = state.entries.len() + state.writers;
            if entries >= self.max_entries || state.bytes >= self.max_bytes {
                return Err(SpoolError::Full {
                    entries,
                    bytes: state.bytes,
                });
            }
            state.writers += 1;
            let sequence = state.next_sequence;
            state.next_sequence += 1;
            sequence
        };
        let temp_name = format!("{TEMP_PREFIX}{sequence:016x}{ENTRY_SUFFIX}");
        let file = match self.directory.create_file(&temp_name) {
            Ok(file) => file,
            Err(source) => {
                self.lock().writers -= 1;
                self.changed.notify_all();
                return Err(SpoolError::Io {
                    context: format!(
                        "failed to create {temp_name} in spool directory {}",
                        self.directory.path().display()
                    ),
                    source,
                });
            }
        };
        Ok(SpoolWriter {
            spool: Arc::clone(self),
            file: Some(BufWriter::with_capacity(64 * 1024, file)),
            temp_name,
            entry: SpoolEntry {
                sequence,
                producer_id,
                dump_id,
                total_size,
                file_size: 0,
                file_name: SpoolEntry::file_name_for(sequence, producer_id, dump_id, total_size),
            },
        })
    }

    /// Returns the oldest entry without removing it.
    pub fn front(&self) -> Option<SpoolEntry> {
        self.lock().entries.front().cloned()
    }

    /// Returns all entries in queue order.
    pub fn entries(&self) -> Vec<SpoolEntry> {
        self.lock().entries.iter().cloned().collect()
    }

    /// Opens an entry's file for sending.
    pub fn open_entry(&self, entry: &SpoolEntry) -> io::Result<File> {
        self.directory.open_file(&entry.file_name)
    }

    /// Deletes an entry (after the collector acknowledged or permanently rejected it).
    pub fn remove(&self, entry: &SpoolEntry) -> io::Result<()> {
        let result = self.directory.remove(&entry.file_name);
        let gone = match &result {
            Ok(()) => true,
            Err(error) => error.kind() == io::ErrorKind::NotFound,
        };
        if gone {
            let mut state = self.lock();
            if let Some(index) = state
                .entries
                .iter()
                .position(|e| e.sequence == entry.sequence)
            {
                state.entries.remove(index);
                state.bytes = state.bytes.saturating_sub(entry.file_size);
            }
            drop(state);
            self.changed.notify_all();
        }
        // The deletion need not be durable: an entry that reappears after a
        // crash is sent again and the collector deduplicates it.
        result
    }

    /// Waits until an entry is queued or [`Spool::close`] is called, at most `timeout`.
    pub fn wait_for_entry(&self, timeout: Duration) -> Option<SpoolEntry> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if state.closed {
                return None;
            }
            if let Some(entry) = state.entries.front() {
                return Some(entry.clone());
            }
            let now = Instant::now();
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

    /// Sleeps for `duration` unless [`Spool::close`] is called first; returns false if closed.
    pub fn sleep(&self, duration: Duration) -> bool {
        let deadline = Instant::now() + duration;
        let mut state = self.lock();
        loop {
            if state.closed {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// Waits until no entry is queued or being written, at most `timeout`.
    /// Returns true if the spool became empty.
    pub fn wait_empty(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if state.entries.is_empty() && state.writers == 0 {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// Marks the spool closed and wakes every waiter. Entries stay on disk.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    /// Returns true if [`Spool::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Returns the number of entries and bytes waiting, including open writers.
    pub fn usage(&self) -> (usize, u64) {
        let state = self.lock();
        (state.entries.len() + state.writers, state.bytes)
    }
}

/// Writes one dump into the spool. Dropping it without [`SpoolWriter::commit`]
/// deletes the temporary file.
#[derive(Debug)]
pub struct SpoolWriter {
    spool: Arc<Spool>,
    file: Option<BufWriter<File>>,
    temp_name: String,
    entry: SpoolEntry,
}

impl SpoolWriter {
    fn io_error(&self, action: &str, source: io::Error) -> SpoolError {
        SpoolError::Io {
            context: format!(
                "failed to {action} {} in spool directory {}",
                self.temp_name,
                self.spool.directory.path().display()
            ),
            source,
        }
    }

    /// Appends `bytes`, failing with [`SpoolError::Full`] if they would take the
    /// spool past its byte limit.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        {
            let mut state = self.spool.lock();
            let new_total = state.bytes.saturating_add(bytes.len() as u64);
            if new_total > self.spool.max_bytes {
                return Err(SpoolError::Full {
                    entries: state.entries.len() + state.writers,
                    bytes: state.bytes,
                });
            }
            state.bytes = new_total;
        }
        self.entry.file_size += bytes.len() as u64;
        let Some(file) = self.file.as_mut() else {
            return Err(self.io_error("write", io::Error::other("writer already closed")));
        };
        if let Err(error) = file.write_all(bytes) {
            return Err(self.io_error("write", error));
        }
        Ok(())
    }

    /// Syncs the file, publishes it under its final name and queues it for sending.
    pub fn commit(mut self) -> Result<SpoolEntry, SpoolError> {
        let Some(buffered) = self.file.take() else {
            return Err(self.io_error("commit", io::Error::other("writer already closed")));
        };
        let file = buffered
            .into_inner()
            .map_err(|error| self.io_error("write", error.into_error()))?;
        file.sync_all()
            .map_err(|error| self.io_error("sync", error))?;
        drop(file);
        let directory = &self.spool.directory;
        directory
            .rename_no_replace(&self.temp_name, &self.entry.file_name)
            .map_err(|error| self.io_error("publish", error))?;
        // From here on the entry exists under its final name, so Drop must not delete it.
        self.temp_name.clear();
        let synced = directory.sync();
        let entry = self.entry.clone();
        {
            let mut state = self.spool.lock();
            state.writers -= 1;
            state.entries.push_back(entry.clone());
        }
        self.spool.changed.notify_all();
        if let Err(error) = synced {
            tracing::warn!(
                directory = %directory.path().display(),
                error = %error,
                "failed to sync spool directory; a crash now could lose the newest entry"
            );
        }
        Ok(entry)
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        if self.temp_name.is_empty() {
            return;
        }
        drop(self.file.take());
        if let Err(error) = self.spool.directory.remove(&self.temp_name) {
            tracing::warn!(
                file = %self.temp_name,
                error = %error,
                "failed to delete aborted spool entry; the next start deletes it"
            );
        }
        {
            let mut state = self.spool.lock();
            state.writers -= 1;
            state.bytes = state.bytes.saturating_sub(self.entry.file_size);
        }
        self.spool.changed.notify_all();
    }
}
