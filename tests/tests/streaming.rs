//! Real crashes of the demo guest streamed through one dump worker to a file
//! sink and to a socket sink, which delivers them over a Unix socket to a
//! collector: the collector must store each core byte for byte as the file
//! sink wrote it, also when it starts only after the crashes were spooled.
#![cfg(feature = "crashdump")]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use common::{demo_guest, expect_error, require_kvm};
use sandcore::dump::{DumpReceipt, DumpWorker};
use sandcore::{DumpId, Sandbox, SandboxBuilder};
use sandcore_sinks::collector::{list_dumps, Collector, CollectorConfig, CollectorStats};
use sandcore_sinks::file_sink::{FileSink, FileSinkConfig};
use sandcore_sinks::shared_sink::SharedSink;
use sandcore_sinks::socket_sink::{Endpoint, SocketSink, SocketSinkConfig};

/// Time allowed for the worker to write one dump to both sinks.
const DUMP_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed for the socket sink to deliver every spooled dump.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Producer id the socket sink sends, so that the test can find its dumps.
const PRODUCER_ID: u64 = 0x5a4d_c0de_0000_0001;
/// Three crash functions of the demo guest, each a different kind of failure.
const CRASHES: [&str; 3] = ["crash_null", "crash_divide_by_zero", "crash_panic"];

/// A test's directories (file sink, spool, collector) and the collector's
/// socket, removed when the test ends.
struct TestDirectory {
    root: PathBuf,
}

impl TestDirectory {
    fn new(test: &str) -> TestDirectory {
        let root =
            std::env::temp_dir().join(format!("sandcore-streaming-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let files = root.join("files");
        std::fs::create_dir_all(&files)
            .unwrap_or_else(|error| panic!("creating {} failed: {error}", files.display()));
        TestDirectory { root }
    }

    fn files(&self) -> PathBuf {
        self.root.join("files")
    }

    fn spool(&self) -> PathBuf {
        self.root.join("spool")
    }

    fn collector(&self) -> PathBuf {
        self.root.join("collector")
    }

    fn socket(&self) -> PathBuf {
        self.root.join("collector.sock")
    }
}

impl Drop for TestDirectory {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

type SharedSocketSink = SharedSink<SocketSink>;

/// A collector serving on its own thread until [`RunningCollector::stop`].
struct RunningCollector {
    shutdown: Arc<AtomicBool>,
    thread: Option<JoinHandle<std::io::Result<CollectorStats>>>,
}

impl RunningCollector {
    /// Binds a collector on the test's Unix socket, storing into its
    /// collector directory, and runs it on a new thread.
    fn start(directory: &TestDirectory) -> RunningCollector {
        let config =
            CollectorConfig::new(Endpoint::Unix(directory.socket()), directory.collector());
        let collector = Collector::bind(config).unwrap_or_else(|error| {
            panic!(
                "binding the collector on {} failed: {error}",
                directory.socket().display()
            )
        });
        let shutdown = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&shutdown);
        let thread = std::thread::Builder::new()
            .name("test-collector".into())
            .spawn(move || collector.run(&flag))
            .expect("starting the collector thread failed");
        RunningCollector {
            shutdown,
            thread: Some(thread),
        }
    }

    /// Stops the collector and returns its counters.
    fn stop(mut self) -> CollectorStats {
        self.shutdown.store(true, Ordering::SeqCst);
        let thread = self.thread.take().expect("the collector runs until stop");
        thread
            .join()
            .expect("the collector thread panicked")
            .expect("the collector failed")
    }
}

impl Drop for RunningCollector {
    fn drop(&mut self) {
        // Stops the thread when a test fails before calling stop().
        self.shutdown.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A sandbox whose dumps go through one worker to a file sink and a socket sink.
struct StreamingSandbox {
    sandbox: Sandbox,
    worker: DumpWorker,
    socket_sink: SharedSocketSink,
}

fn streaming_sandbox(directory: &TestDirectory) -> StreamingSandbox {
    require_kvm();
    let mut config = SocketSinkConfig::new(Endpoint::Unix(directory.socket()), directory.spool());
    config.producer_id = Some(PRODUCER_ID);
    // Retries after 10 to 200 ms (jittered, doubling backoff) while the
    // collector is missing, so that a late collector gets the dumps soon.
    config.initial_backoff = Duration::from_millis(20);
    config.max_backoff = Duration::from_millis(200);
    let socket_sink = SocketSink::new(config).expect("creating the socket sink failed");
    let socket_sink = SharedSocketSink::new(socket_sink);

    let worker = DumpWorker::builder()
        .sink(FileSink::new(FileSinkConfig::new(directory.files())))
        .sink(socket_sink.clone())
        .build()
        .expect("building the dump worker failed");
    let sandbox = SandboxBuilder::new()
        .guest_file(demo_guest())
        .host_function("host_add", |a: i64, b: i64| a.wrapping_add(b))
        .dump_worker(&worker)
        .build()
        .expect("building the sandbox failed");
    StreamingSandbox {
        sandbox,
        worker,
        socket_sink,
    }
}

/// Calls each of [`CRASHES`], restoring after each, and returns every dump's
/// receipt once both sinks finished it, keyed by dump id.
fn crash_three_times(fixture: &mut StreamingSandbox) -> HashMap<DumpId, DumpReceipt> {
    let mut dump_ids = Vec::new();
    for function in CRASHES {
        let error = expect_error(
            fixture.sandbox.call::<sandcore::Value>(function, ()),
            function,
        );
        let dump_id = error
            .dump_id()
            .unwrap_or_else(|| panic!("{function} returned no dump id: {error:?}"));
        dump_ids.push((function, dump_id));
        fixture
            .sandbox
            .restore()
            .unwrap_or_else(|error| panic!("restore after {function} failed: {error}"));
    }

    let mut receipts = HashMap::new();
    for (function, dump_id) in dump_ids {
        let receipt = fixture
            .worker
            .wait_for(dump_id, DUMP_TIMEOUT)
            .unwrap_or_else(|| {
                panic!("dump {dump_id} of {function} was not written within {DUMP_TIMEOUT:?}")
            });
        let sink_names: Vec<&str> = receipt
            .sinks
            .iter()
            .map(|result| result.sink.as_str())
            .collect();
        assert_eq!(
            sink_names,
            ["file", "socket"],
            "receipt of dump {dump_id} lists the sinks {sink_names:?}"
        );
        assert!(
            receipt.succeeded(),
            "dump {dump_id} of {function} failed: {receipt:?}"
        );
        let previous = receipts.insert(dump_id, receipt);
        assert!(previous.is_none(), "two crashes returned dump id {dump_id}");
    }
    receipts
}

/// Reads a whole core file, holes as zeros.
fn read_core(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|error| panic!("reading {} failed: {error}", path.display()))
}

/// Returns the spool's finished entries (`*.dump`) still on disk.
fn spooled_files(spool: &Path) -> Vec<String> {
    let entries = std::fs::read_dir(spool)
        .unwrap_or_else(|error| panic!("listing {} failed: {error}", spool.display()));
    entries
        .map(|entry| {
            entry
                .expect("reading a spool directory entry failed")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".dump"))
        .collect()
}

/// Checks that the collector stored each dump of `receipts` exactly once,
/// with a sidecar naming this producer, and byte-identical to the file sink's core.
fn assert_collector_matches_files(
    collector_directory: &Path,
    receipts: &HashMap<DumpId, DumpReceipt>,
) {
    let listings = list_dumps(collector_directory).unwrap_or_else(|error| {
        panic!(
            "listing the collector's dumps in {} failed: {error}",
            collector_directory.display()
        )
    });
    let names: Vec<&str> = listings
        .iter()
        .map(|listing| listing.file_name.as_str())
        .collect();
    assert_eq!(
        listings.len(),
        receipts.len(),
        "the collector stored {} cores for {} dumps: {names:?}",
        listings.len(),
        receipts.len()
    );

    for (dump_id, receipt) in receipts {
        let stored: Vec<_> = listings
            .iter()
            .filter(|listing| listing.dump_id == Some(*dump_id))
            .collect();
        assert_eq!(
            stored.len(),
            1,
            "the collector stored dump {dump_id} {} times: {names:?}",
            stored.len()
        );
        let listing = stored[0];
        let sidecar = listing
            .sidecar
            .as_ref()
            .unwrap_or_else(|| panic!("{} has no readable sidecar", listing.file_name));
        assert_eq!(
            sidecar.dump_id, *dump_id,
            "sidecar of {} names dump {}",
            listing.file_name, sidecar.dump_id
        );
        assert_eq!(
            sidecar.producer_id,
            format!("{PRODUCER_ID:016x}"),
            "sidecar of {} names producer {}",
            listing.file_name,
            sidecar.producer_id
        );
        assert_eq!(
            sidecar.sandbox_id, receipt.sandbox_id,
            "sidecar of {} names sandbox {}",
            listing.file_name, sidecar.sandbox_id
        );
        assert_eq!(
            sidecar.size, receipt.bytes,
            "sidecar of {} gives {} bytes, the receipt {}",
            listing.file_name, sidecar.size, receipt.bytes
        );

        let file_core = receipt
            .file_path()
            .unwrap_or_else(|| panic!("receipt of dump {dump_id} has no file path: {receipt:?}"));
        let file_bytes = read_core(&file_core);
        let collector_bytes = read_core(&listing.path);
        assert_eq!(
            file_bytes.len() as u64,
            receipt.bytes,
            "{} is {} bytes, the receipt says {}",
            file_core.display(),
            file_bytes.len(),
            receipt.bytes
        );
        assert_eq!(
            collector_bytes.len(),
            file_bytes.len(),
            "the collector's core of dump {dump_id} is {} bytes, the file sink's {}",
            collector_bytes.len(),
            file_bytes.len()
        );
        if let Some(offset) = file_bytes
            .iter()
            .zip(&collector_bytes)
            .position(|(file, collector)| file != collector)
        {
            panic!(
                "the cores of dump {dump_id} differ first at byte {offset:#x}: {} and {}",
                file_core.display(),
                listing.path.display()
            );
        }
    }
}

#[test]
fn collector_matches_file_sink() {
    let directory = TestDirectory::new("live");
    let collector = RunningCollector::start(&directory);
    let mut fixture = streaming_sandbox(&directory);

    let receipts = crash_three_times(&mut fixture);
    let delivered = fixture.socket_sink.lock().wait_idle(DELIVERY_TIMEOUT);
    let stats = fixture.socket_sink.lock().stats();
    assert!(
        delivered,
        "the socket sink did not deliver its spool within {DELIVERY_TIMEOUT:?}: {stats:?}"
    );
    assert_eq!(stats.acked, 3, "the collector acknowledged {stats:?}");
    assert_eq!(
        stats.rejected_by_collector, 0,
        "the collector rejected dumps: {stats:?}"
    );
    let left = spooled_files(&directory.spool());
    assert!(left.is_empty(), "the spool still holds {left:?}");

    assert_collector_matches_files(&directory.collector(), &receipts);

    drop(fixture);
    let collector_stats = collector.stop();
    assert_eq!(
        collector_stats.stored, 3,
        "collector counters: {collector_stats:?}"
    );
    assert_eq!(
        collector_stats.rejected, 0,
        "collector counters: {collector_stats:?}"
    );
}

#[test]
fn late_collector_gets_spooled_dumps() {
    let directory = TestDirectory::new("late");
    let mut fixture = streaming_sandbox(&directory);

    let receipts = crash_three_times(&mut fixture);
    let (spooled, _) = fixture.socket_sink.lock().spool_usage();
    assert_eq!(
        spooled, 3,
        "the spool holds {spooled} dumps before the collector starts"
    );
    let spooled_names = spooled_files(&directory.spool());
    assert_eq!(
        spooled_names.len(),
        3,
        "the spool directory holds {spooled_names:?}"
    );
    // Gives the sender time to fail at least once against the missing socket.
    std::thread::sleep(Duration::from_millis(100));
    let before = fixture.socket_sink.lock().stats();
    assert_eq!(
        before.acked, 0,
        "dumps were acknowledged without a collector: {before:?}"
    );
    assert_eq!(
        before.connections, 0,
        "the sink connected without a collector: {before:?}"
    );

    let collector = RunningCollector::start(&directory);
    let delivered = fixture.socket_sink.lock().wait_idle(DELIVERY_TIMEOUT);
    let after = fixture.socket_sink.lock().stats();
    assert!(
        delivered,
        "the socket sink did not deliver its spool within {DELIVERY_TIMEOUT:?} after the collector started: {after:?}"
    );
    assert_eq!(after.acked, 3, "the collector acknowledged {after:?}");
    assert!(
        after.reconnects >= 1,
        "the sink never retried before the collector started: {after:?}"
    );
    let left = spooled_files(&directory.spool());
    assert!(left.is_empty(), "the spool still holds {left:?}");

    assert_collector_matches_files(&directory.collector(), &receipts);

    drop(fixture);
    let collector_stats = collector.stop();
    assert_eq!(
        collector_stats.stored, 3,
        "collector counters: {collector_stats:?}"
    );
    assert_eq!(
        collector_stats.rejected, 0,
        "collector counters: {collector_stats:?}"
    );
}
