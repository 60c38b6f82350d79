//! The dump worker thread, its queue and its receipts.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use sandcore_abi::layout::PAGE_SIZE;
use sandcore_sinks::elf_core::write_core;
use sandcore_sinks::fanout::FanOut;
use sandcore_sinks::file_sink::{resolve_dump_dir, FileSink, FileSinkConfig};
use sandcore_sinks::sink::{DumpSink, SinkError, SinkErrorKind};
use sandcore_sinks::snapshot::{CrashInfo, CrashKind, GuestMemorySource, MemoryRegion};

use crate::error::{DumpId, SandboxError};
use crate::memory::mapping::Mapping;

use super::DEFAULT_QUEUE_CAPACITY;

/// Receipts kept per worker for [`DumpWorker::receipt`]; older ones are dropped.
const RECEIPTS_KEPT: usize = 1024;

/// One crash on its way to the sinks: what the vCPU thread captured, and the
/// crashed guest memory it shares with the sandbox until restore().
pub(crate) struct DumpRequest {
    pub(crate) info: Box<CrashInfo>,
    pub(crate) memory: Arc<Mapping>,
}

/// Result of one sink for one dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkResult {
    /// Sink name (`file`, `memory`, `socket`, or a custom sink's).
    pub sink: String,
    /// Location of the stored dump (a path, an address), or the sink's typed error.
    pub outcome: Result<String, SinkError>,
}

/// Outcome of one dump, available once the worker finished it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpReceipt {
    /// Dump id, as carried by the caller's error.
    pub dump_id: DumpId,
    /// Sandbox that crashed.
    pub sandbox_id: u64,
    /// Cause of the dump.
    pub kind: CrashKind,
    /// Logical size of the core in bytes (holes included).
    pub bytes: u64,
    /// Time from dequeue to the last sink's result.
    pub elapsed: Duration,
    /// Each sink's result, in the order the sinks were added.
    pub sinks: Vec<SinkResult>,
}

impl DumpReceipt {
    /// True if every sink stored the dump.
    pub fn succeeded(&self) -> bool {
        !self.sinks.is_empty() && self.sinks.iter().all(|s| s.outcome.is_ok())
    }

    /// Path of the dump file, if a file sink wrote one.
    pub fn file_path(&self) -> Option<PathBuf> {
        self.sinks
            .iter()
            .find(|s| s.sink == "file")
            .and_then(|s| s.outcome.as_ref().ok())
            .map(PathBuf::from)
    }
}

/// Counters of one worker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DumpStats {
    /// Dumps accepted into the queue.
    pub queued: u64,
    /// Dumps every sink stored.
    pub written: u64,
    /// Dumps at least one sink failed to store.
    pub failed: u64,
    /// Dumps dropped because the queue was full.
    pub dropped_queue_full: u64,
    /// Dumps dropped because the crashed memory could not be detached.
    pub dropped_capture_failed: u64,
}

type ReceiptCallback = Arc<dyn Fn(&DumpReceipt) + Send + Sync>;

struct Shared {
    sender: SyncSender<DumpRequest>,
    queued: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_capture_failed: AtomicU64,
    progress: Mutex<Progress>,
    finished: Condvar,
}

#[derive(Default)]
struct Progress {
    done: u64,
    written: u64,
    failed: u64,
    receipts: VecDeque<DumpReceipt>,
}

/// The vCPU side of a worker: assigns ids and pushes without blocking.
#[derive(Clone)]
pub(crate) struct DumpQueue {
    shared: Arc<Shared>,
}

/// Process-wide dump id counter. Ids never repeat across workers (the file
/// sink names temporary files by dump id) and, because the counter starts
/// at the wall-clock time in microseconds, not across restarts of a process
/// either: a collector deduplicates resent dumps by (producer id, dump id),
/// so a producer with a fixed id that restarted at 1 would lose its dumps.
fn dump_id_counter() -> &'static AtomicU64 {
    static NEXT_DUMP_ID: OnceLock<AtomicU64> = OnceLock::new();
    NEXT_DUMP_ID.get_or_init(|| {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |elapsed| elapsed.as_micros() as u64);
        AtomicU64::new(micros.max(1))
    })
}

impl DumpQueue {
    pub(crate) fn next_id(&self) -> DumpId {
        dump_id_counter().fetch_add(1, Ordering::Relaxed)
    }

    /// Pushes without blocking; on a full queue the request is dropped and counted.
    pub(crate) fn try_push(&self, request: DumpRequest) -> bool {
        let dump_id = request.info.dump_id;
        match self.shared.sender.try_send(request) {
            Ok(()) => {
                self.shared.queued.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Full(_)) => {
                let dropped = self
                    .shared
                    .dropped_queue_full
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                tracing::warn!(
                    dump_id,
                    dropped_total = dropped,
                    "dump queue full; crash dump dropped"
                );
                false
            }
            Err(TrySendError::Disconnected(_)) => {
                tracing::error!(dump_id, "dump worker thread is gone; crash dump dropped");
                false
            }
        }
    }

    pub(crate) fn count_capture_failure(&self) {
        self.shared
            .dropped_capture_failed
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// Builds a [`DumpWorker`] with its sinks.
pub struct DumpWorkerBuilder {
    sinks: Vec<Box<dyn DumpSink + Send>>,
    capacity: usize,
    on_receipt: Option<ReceiptCallback>,
}

impl Default for DumpWorkerBuilder {
    fn default() -> Self {
        DumpWorkerBuilder {
            sinks: Vec::new(),
            capacity: DEFAULT_QUEUE_CAPACITY,
            on_receipt: None,
        }
    }
}

impl DumpWorkerBuilder {
    /// Adds a sink; each dump goes to every sink (at most 8).
    pub fn sink(mut self, sink: impl DumpSink + Send + 'static) -> Self {
        self.sinks.push(Box::new(sink));
        self
    }

    /// Queue capacity in dumps (default 16); further crashes are dropped and counted.
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// Calls `callback` on the worker thread with each finished dump's receipt.
    pub fn on_receipt(mut self, callback: impl Fn(&DumpReceipt) + Send + Sync + 'static) -> Self {
        self.on_receipt = Some(Arc::new(callback));
        self
    }

    /// Starts the worker thread.
    pub fn build(self) -> Result<DumpWorker, SandboxError> {
        if self.sinks.is_empty() {
            return Err(SandboxError::InvalidConfiguration(
                "a dump worker needs at least one sink".into(),
            ));
        }
        if self.sinks.len() > sandcore_sinks::fanout::MAX_FANOUT_SINKS {
            return Err(SandboxError::InvalidConfiguration(format!(
                "{} sinks given; a dump worker takes at most {}",
                self.sinks.len(),
                sandcore_sinks::fanout::MAX_FANOUT_SINKS
            )));
        }
        // Initialised here, so the crash path never pays for it.
        dump_id_counter();
        let (sender, receiver) = sync_channel(self.capacity);
        let shared = Arc::new(Shared {
            sender,
            queued: AtomicU64::new(0),
            dropped_queue_full: AtomicU64::new(0),
            dropped_capture_failed: AtomicU64::new(0),
            progress: Mutex::new(Progress::default()),
            finished: Condvar::new(),
        });
        let worker_shared = Arc::clone(&shared);
        let sinks = self.sinks;
        let on_receipt = self.on_receipt;
        std::thread::Builder::new()
            .name("sandcore-dump".into())
            .spawn(move || run_worker(receiver, sinks, on_receipt, worker_shared))
            .map_err(|source| SandboxError::Os {
                operation: "starting the dump worker thread",
                source,
            })?;
        Ok(DumpWorker {
            owner: Arc::new(Owner { shared }),
        })
    }
}

/// Drains the queue when the last user handle goes away.
struct Owner {
    shared: Arc<Shared>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        wait_idle(&self.shared, None);
    }
}

/// A background thread that turns crash snapshots into ELF cores and hands
/// them to its sinks. Cheap to clone; dropping the last clone waits until
/// every queued dump is written.
#[derive(Clone)]
pub struct DumpWorker {
    owner: Arc<Owner>,
}

impl std::fmt::Debug for DumpWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DumpWorker")
            .field("stats", &self.stats())
            .finish()
    }
}

impl DumpWorker {
    /// Starts building a worker.
    pub fn builder() -> DumpWorkerBuilder {
        DumpWorkerBuilder::default()
    }

    /// Returns the process-wide file worker for `dir` (or, if `None`, for the
    /// directory from `SANDCORE_CORE_DUMP_DIR`, `HYPERLIGHT_CORE_DUMP_DIR` or
    /// the system temp directory). An unusable directory falls back to the
    /// temp directory with a logged warning.
    pub fn for_directory(dir: Option<&Path>) -> Result<DumpWorker, SandboxError> {
        let (directory, warning) = resolve_dump_dir(dir);
        if let Some(warning) = warning {
            tracing::warn!("{warning}");
        }
        let mut workers = DEFAULT_WORKERS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(worker) = workers.get(&directory) {
            return Ok(worker.clone());
        }
        let worker = DumpWorker::builder()
            .sink(FileSink::new(FileSinkConfig::new(directory.clone())))
            .build()?;
        tracing::info!(directory = %directory.display(), "crash dumps go to this directory");
        workers.insert(directory, worker.clone());
        Ok(worker)
    }

    pub(crate) fn queue(&self) -> DumpQueue {
        DumpQueue {
            shared: Arc::clone(&self.owner.shared),
        }
    }

    /// Counters: queued, written, failed and dropped dumps.
    pub fn stats(&self) -> DumpStats {
        let shared = &self.owner.shared;
        let progress = shared.progress.lock().unwrap_or_else(|p| p.into_inner());
        DumpStats {
            queued: shared.queued.load(Ordering::Relaxed),
            written: progress.written,
            failed: progress.failed,
            dropped_queue_full: shared.dropped_queue_full.load(Ordering::Relaxed),
            dropped_capture_failed: shared.dropped_capture_failed.load(Ordering::Relaxed),
        }
    }

    /// Returns the receipt of dump `dump_id`, if the worker has finished it.
    pub fn receipt(&self, dump_id: DumpId) -> Option<DumpReceipt> {
        let progress = self
            .owner
            .shared
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        progress
            .receipts
            .iter()
            .find(|r| r.dump_id == dump_id)
            .cloned()
    }

    /// Waits up to `timeout` for dump `dump_id` and returns its receipt.
    pub fn wait_for(&self, dump_id: DumpId, timeout: Duration) -> Option<DumpReceipt> {
        let shared = &self.owner.shared;
        let deadline = Instant::now() + timeout;
        let mut progress = shared.progress.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(receipt) = progress.receipts.iter().find(|r| r.dump_id == dump_id) {
                return Some(receipt.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            progress = shared
                .finished
                .wait_timeout(progress, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits until every queued dump is written, or `timeout` passes.
    /// Returns true if the queue is empty.
    pub fn flush(&self, timeout: Duration) -> bool {
        wait_idle(&self.owner.shared, Some(timeout))
    }
}

/// Process-wide file workers, one per dump directory. Statics are never
/// dropped, so a host that exits right after a crash calls [`flush_all`].
static DEFAULT_WORKERS: OnceLock<Mutex<HashMap<PathBuf, DumpWorker>>> = OnceLock::new();

/// Waits until every process-wide file worker (see
/// [`DumpWorker::for_directory`]) has written its queued dumps, or `timeout`
/// passes. Returns true if all queues are empty. Call it before the process
/// exits, or dumps still in a queue are lost.
pub fn flush_all(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let workers: Vec<DumpWorker> = match DEFAULT_WORKERS.get() {
        Some(workers) => workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect(),
        None => return true,
    };
    workers
        .iter()
        .all(|worker| worker.flush(deadline.saturating_duration_since(Instant::now())))
}

fn wait_idle(shared: &Shared, timeout: Option<Duration>) -> bool {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut progress = shared.progress.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if progress.done >= shared.queued.load(Ordering::SeqCst) {
            return true;
        }
        progress = match deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                shared
                    .finished
                    .wait_timeout(progress, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
            None => shared
                .finished
                .wait(progress)
                .unwrap_or_else(|p| p.into_inner()),
        };
    }
}

/// Guest memory of a crashed sandbox, with the kernel's record of
/// which pages were ever touched, so untouched pages become holes unread.
struct CapturedMemory {
    mapping: Arc<Mapping>,
    resident: Vec<u8>,
}

impl GuestMemorySource for CapturedMemory {
    fn region_bytes(&self, region: &MemoryRegion) -> Option<&[u8]> {
        let start = usize::try_from(region.guest_address).ok()?;
        let end = start.checked_add(usize::try_from(region.size).ok()?)?;
        self.mapping.as_slice().get(start..end)
    }

    fn page_may_be_nonzero(&self, guest_address: u64) -> bool {
        let page = (guest_address / PAGE_SIZE) as usize;
        self.resident.get(page).is_none_or(|flags| flags & 1 != 0)
    }
}

fn run_worker(
    receiver: Receiver<DumpRequest>,
    mut sinks: Vec<Box<dyn DumpSink + Send>>,
    on_receipt: Option<ReceiptCallback>,
    shared: Arc<Shared>,
) {
    while let Ok(request) = receiver.recv() {
        let receipt = write_one(request, &mut sinks);
        if let Some(callback) = &on_receipt {
            callback(&receipt);
        }
        let mut progress = shared.progress.lock().unwrap_or_else(|p| p.into_inner());
        progress.done += 1;
        if receipt.succeeded() {
            progress.written += 1;
        } else {
            progress.failed += 1;
        }
        if progress.receipts.len() == RECEIPTS_KEPT {
            progress.receipts.pop_front();
        }
        progress.receipts.push_back(receipt);
        drop(progress);
        shared.finished.notify_all();
    }
}

fn write_one(request: DumpRequest, sinks: &mut [Box<dyn DumpSink + Send>]) -> DumpReceipt {
    let started = Instant::now();
    let DumpRequest { info, memory } = request;
    let resident = memory.resident_pages().unwrap_or_default();
    let source = CapturedMemory {
        mapping: memory,
        resident,
    };

    let mut fan_out = FanOut::new();
    for sink in sinks.iter_mut() {
        // The builder caps the sink count at the fan-out's capacity.
        let _ = fan_out.add(sink.as_mut());
    }
    let written = write_core(&info, &source, &mut fan_out);
    let bytes = written.as_ref().map(|receipt| receipt.bytes).unwrap_or(0);
    let mut results: Vec<SinkResult> = fan_out
        .outcomes()
        .iter()
        .map(|outcome| SinkResult {
            sink: outcome.name.to_string(),
            outcome: outcome
                .result
                .as_ref()
                .map(|r| r.location.to_string())
                .map_err(Clone::clone),
        })
        .collect();
    if let Err(error) = &written {
        if results.is_empty() {
            let text = error.to_string();
            results.push(SinkResult {
                sink: "writer".into(),
                outcome: Err(SinkError::new(SinkErrorKind::Protocol, &text)),
            });
        }
    }
    let receipt = DumpReceipt {
        dump_id: info.dump_id,
        sandbox_id: info.sandbox_id,
        kind: info.kind,
        bytes,
        elapsed: started.elapsed(),
        sinks: results,
    };
    for result in &receipt.sinks {
        match &result.outcome {
            Ok(location) => {
                tracing::info!(dump_id = receipt.dump_id, sink = %result.sink, %location, bytes, "crash dump stored")
            }
            Err(error) => {
                tracing::error!(dump_id = receipt.dump_id, sink = %result.sink, %error, "crash dump not stored")
            }
        }
    }
    receipt
}
