//! A sink that keeps the most recent dumps in memory.
//!
//! The dump worker drives [`MemorySink`]. Other threads use the cloneable
//! read handle [`MemoryDumps`] at the same time: to list dumps, look one up
//! by id, and get it as ELF bytes or as a [`CoreSummary`] parsed from its
//! notes. Finished dumps are immutable and shared through `Arc`, so a
//! reader keeps a dump alive after the sink evicts it.
//!
//! A dump is stored compactly: its data bytes in one buffer and its holes as
//! (offset, length) pairs, so zero pages cost no memory until a caller asks
//! for the expanded ELF bytes.

use alloc::collections::VecDeque;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt::Write as _;

use crate::core_reader::{read_summary, CoreReadError, CoreSummary};
use crate::sink::{DumpMetadata, DumpSink, SinkError, SinkErrorKind, SinkReceipt};

/// Bounds on what a [`MemorySink`] keeps. The oldest dump is evicted first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemorySinkLimits {
    /// Maximum number of dumps kept.
    pub max_dumps: usize,
    /// Maximum stored bytes over all kept dumps. Holes are not stored and do
    /// not count. A single dump larger than this is rejected.
    pub max_total_bytes: u64,
}

impl Default for MemorySinkLimits {
    /// Keeps 8 dumps and 256 MiB of stored bytes.
    fn default() -> Self {
        MemorySinkLimits {
            max_dumps: 8,
            max_total_bytes: 256 << 20,
        }
    }
}

/// One finished dump.
#[derive(Debug)]
pub struct StoredDump {
    metadata: DumpMetadata,
    /// All bytes sent through `data`, in file order.
    data: Vec<u8>,
    /// (file offset, length) of each hole, in file order.
    holes: Vec<(u64, u64)>,
}

impl StoredDump {
    /// Returns the metadata the dump began with.
    pub fn metadata(&self) -> &DumpMetadata {
        &self.metadata
    }

    /// Returns the dump id.
    pub fn dump_id(&self) -> u64 {
        self.metadata.dump_id
    }

    /// Returns the size of the core file in bytes, holes included.
    pub fn total_size(&self) -> u64 {
        self.metadata.total_size
    }

    /// Returns the bytes this dump occupies in memory (its data, not its holes).
    pub fn stored_bytes(&self) -> u64 {
        self.data.len() as u64
    }

    /// Returns the complete ELF core with every hole expanded to zeros.
    pub fn to_elf_bytes(&self) -> Vec<u8> {
        let mut core = Vec::with_capacity(self.metadata.total_size as usize);
        let mut data = &self.data[..];
        for &(offset, length) in &self.holes {
            let before = (offset as usize).saturating_sub(core.len()).min(data.len());
            core.extend_from_slice(&data[..before]);
            data = &data[before..];
            core.resize(core.len() + length as usize, 0);
        }
        core.extend_from_slice(data);
        core
    }

    /// Returns the bytes before the first hole: the headers and notes of the
    /// core, without copying.
    pub fn head(&self) -> &[u8] {
        match self.holes.first() {
            Some(&(offset, _)) => &self.data[..offset as usize],
            None => &self.data,
        }
    }

    /// Parses the crash summary from the dump's notes.
    pub fn summary(&self) -> Result<CoreSummary<'_>, CoreReadError> {
        read_summary(self.head())
    }
}

struct Store {
    limits: MemorySinkLimits,
    dumps: VecDeque<Arc<StoredDump>>,
    total_bytes: u64,
}

impl Store {
    fn insert(&mut self, dump: Arc<StoredDump>) {
        self.total_bytes += dump.stored_bytes();
        self.dumps.push_back(dump);
        while self.dumps.len() > self.limits.max_dumps
            || self.total_bytes > self.limits.max_total_bytes
        {
            match self.dumps.pop_front() {
                Some(oldest) => self.total_bytes -= oldest.stored_bytes(),
                None => break,
            }
        }
    }
}

/// A [`DumpSink`] that keeps the most recent dumps in memory, within [`MemorySinkLimits`].
pub struct MemorySink {
    store: Arc<Lock<Store>>,
    current: Option<InProgress>,
}

struct InProgress {
    dump: StoredDump,
    received: u64,
}

impl MemorySink {
    /// Creates an empty sink with `limits`.
    pub fn new(limits: MemorySinkLimits) -> Self {
        let store = Store {
            limits,
            dumps: VecDeque::new(),
            total_bytes: 0,
        };
        MemorySink {
            store: Arc::new(Lock::new(store)),
            current: None,
        }
    }

    /// Returns a read handle that stays valid after the sink is dropped.
    pub fn dumps(&self) -> MemoryDumps {
        MemoryDumps {
            store: Arc::clone(&self.store),
        }
    }

    fn max_total_bytes(&self) -> u64 {
        self.store.with(|store| store.limits.max_total_bytes)
    }

    fn in_progress(&mut self, call: &str) -> Result<&mut InProgress, SinkError> {
        self.current.as_mut().ok_or_else(|| {
            let mut message = heapless::String::<96>::new();
            let _ = write!(message, "memory sink: {call} called without begin");
            SinkError::new(SinkErrorKind::Protocol, &message)
        })
    }

    fn check_size(&mut self, length: u64, is_data: bool) -> Result<(), SinkError> {
        let max_total_bytes = self.max_total_bytes();
        let progress = self.in_progress(if is_data { "data" } else { "hole" })?;
        let total_size = progress.dump.metadata.total_size;
        if progress.received + length > total_size {
            return Err(sized_error(
                SinkErrorKind::Protocol,
                format_args!(
                    "memory sink: dump {} sent {} bytes past its total size of {total_size}",
                    progress.dump.metadata.dump_id,
                    progress.received + length - total_size
                ),
            ));
        }
        let stored = progress.dump.data.len() as u64 + if is_data { length } else { 0 };
        if stored > max_total_bytes {
            return Err(sized_error(
                SinkErrorKind::Rejected,
                format_args!(
                    "memory sink: dump {} needs more than max_total_bytes = {max_total_bytes}; \
                     raise the limit or use a file sink",
                    progress.dump.metadata.dump_id
                ),
            ));
        }
        Ok(())
    }
}

fn sized_error(kind: SinkErrorKind, arguments: core::fmt::Arguments<'_>) -> SinkError {
    let mut message = heapless::String::<{ crate::sink::MAX_ERROR_MESSAGE }>::new();
    // A message longer than the capacity is cut, which write! reports as an error.
    let _ = message.write_fmt(arguments);
    SinkError::new(kind, &message)
}

impl DumpSink for MemorySink {
    fn begin(&mut self, metadata: &DumpMetadata) -> Result<(), SinkError> {
        self.current = Some(InProgress {
            dump: StoredDump {
                metadata: metadata.clone(),
                data: Vec::new(),
                holes: Vec::new(),
            },
            received: 0,
        });
        Ok(())
    }

    fn data(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        self.check_size(bytes.len() as u64, true)?;
        let progress = self.in_progress("data")?;
        progress.dump.data.extend_from_slice(bytes);
        progress.received += bytes.len() as u64;
        Ok(())
    }

    fn hole(&mut self, length: u64) -> Result<(), SinkError> {
        self.check_size(length, false)?;
        let progress = self.in_progress("hole")?;
        match progress.dump.holes.last_mut() {
            Some((offset, previous)) if *offset + *previous == progress.received => {
                *previous += length
            }
            _ => progress.dump.holes.push((progress.received, length)),
        }
        progress.received += length;
        Ok(())
    }

    fn finish(&mut self) -> Result<SinkReceipt, SinkError> {
        let progress = self.current.take().ok_or_else(|| {
            SinkError::new(
                SinkErrorKind::Protocol,
                "memory sink: finish called without begin",
            )
        })?;
        let total_size = progress.dump.metadata.total_size;
        if progress.received != total_size {
            return Err(sized_error(
                SinkErrorKind::Protocol,
                format_args!(
                    "memory sink: dump {} ended after {} of {total_size} bytes",
                    progress.dump.metadata.dump_id, progress.received
                ),
            ));
        }
        let dump = Arc::new(progress.dump);
        self.store.with(|store| store.insert(dump));

        let mut location = heapless::String::new();
        let _ = location.push_str("memory");
        Ok(SinkReceipt {
            location,
            bytes: total_size,
        })
    }

    fn abort(&mut self) {
        self.current = None;
    }

    fn name(&self) -> &str {
        "memory"
    }
}

/// Cloneable, thread-safe read handle on the dumps of a [`MemorySink`].
#[derive(Clone)]
pub struct MemoryDumps {
    store: Arc<Lock<Store>>,
}

impl MemoryDumps {
    /// Returns the dump with `dump_id`, if it is still kept.
    pub fn get(&self, dump_id: u64) -> Option<Arc<StoredDump>> {
        self.store.with(|store| {
            store
                .dumps
                .iter()
                .find(|dump| dump.dump_id() == dump_id)
                .cloned()
        })
    }

    /// Returns the most recently finished dump.
    pub fn latest(&self) -> Option<Arc<StoredDump>> {
        self.store.with(|store| store.dumps.back().cloned())
    }

    /// Returns the ids of the kept dumps, oldest first.
    pub fn dump_ids(&self) -> Vec<u64> {
        self.store
            .with(|store| store.dumps.iter().map(|dump| dump.dump_id()).collect())
    }

    /// Returns the number of kept dumps.
    pub fn len(&self) -> usize {
        self.store.with(|store| store.dumps.len())
    }

    /// Returns true if no dump is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns the stored bytes of all kept dumps.
    pub fn total_bytes(&self) -> u64 {
        self.store.with(|store| store.total_bytes)
    }
}

#[cfg(not(feature = "std"))]
use spin_lock::Lock;
#[cfg(feature = "std")]
use std_lock::Lock;

#[cfg(feature = "std")]
mod std_lock {
    /// `std::sync::Mutex` behind the same closure API as the `no_std` spin lock.
    pub struct Lock<T>(std::sync::Mutex<T>);

    impl<T> Lock<T> {
        pub fn new(value: T) -> Self {
            Lock(std::sync::Mutex::new(value))
        }

        pub fn with<R>(&self, operation: impl FnOnce(&mut T) -> R) -> R {
            // The store stays consistent if a reader panicked while holding
            // the lock, because every update completes before it unlocks.
            let mut guard = self
                .0
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            operation(&mut guard)
        }
    }
}

#[cfg(not(feature = "std"))]
mod spin_lock {
    use core::cell::UnsafeCell;
    use core::sync::atomic::{AtomicBool, Ordering};

    /// Minimal spin lock for `alloc` builds without `std`.
    pub struct Lock<T> {
        locked: AtomicBool,
        value: UnsafeCell<T>,
    }

    // SAFETY: `value` is reached only through `with`, which owns `locked` while it runs,
    // so at most one thread accesses it at a time; T moves between threads,
    // hence the `T: Send` bound.
    unsafe impl<T: Send> Sync for Lock<T> {}

    /// Releases the lock when dropped, also on unwinding.
    struct Guard<'a>(&'a AtomicBool);

    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Release);
        }
    }

    impl<T> Lock<T> {
        pub fn new(value: T) -> Self {
            Lock {
                locked: AtomicBool::new(false),
                value: UnsafeCell::new(value),
            }
        }

        pub fn with<R>(&self, operation: impl FnOnce(&mut T) -> R) -> R {
            while self
                .locked
                .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                core::hint::spin_loop();
            }
            let _guard = Guard(&self.locked);
            // SAFETY: the compare-exchange above set `locked`, and only
            // `_guard` clears it, after this reference is gone, so no other
            // reference to the value exists.
            operation(unsafe { &mut *self.value.get() })
        }
    }
}

#[cfg(all(test, feature = "std"))]
mod tests;
