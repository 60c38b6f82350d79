//! The crash path with crash dumps on, beside the raw fault floor of the
//! same run: a CPL3 page fault delivered through a ring-0 stub to an `out`
//! exit, with the register reset that a re-run needs.
//!
//! Cases per guest heap size (16 MiB, 256 MiB, 1 GiB):
//! - `crash_to_error`: `crash_null` until `call` returns the error. The dump
//!   worker (one `MemorySink`) is idle when the crash happens, because each
//!   iteration waits untimed for it to finish the previous dump.
//! - `restore_after_crash`: `restore()` alone, after an untimed crash.
//! - `crash_and_restore`: both, the figure to set against the fault floor,
//!   which also resets registers before each fault.
//! - `noop_after_restore`: a no-op call right after `restore()`, the cost of
//!   faulting guest pages in again that every first call after a restore pays.
//!
//! And end-to-end cases at 16 MiB and 1 GiB: crash until the `FileSink`
//! receipt (the core file is durable under its final name), and crash until
//! a local collector has acknowledged the dump sent by a `SocketSink`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use sandcore::dump::DumpWorker;
use sandcore::{DumpId, Sandbox, SandboxBuilder};
use sandcore_benches::floor;
use sandcore_benches::support::{self, TempDir, MIB};
use sandcore_sinks::collector::{Collector, CollectorConfig};
use sandcore_sinks::file_sink::{FileSink, FileSinkConfig};
use sandcore_sinks::memory_sink::{MemorySink, MemorySinkLimits};
use sandcore_sinks::shared_sink::SharedSink;
use sandcore_sinks::socket_sink::{Endpoint, SocketSink, SocketSinkConfig};

/// Guest heap sizes of the `crash_to_error` cases. The largest total guest
/// memory Sandcore accepts is 1536 MiB.
const CRASH_HEAPS: [u64; 3] = [16 * MIB, 256 * MIB, 1024 * MIB];

/// Guest heap sizes of the end-to-end cases.
const END_TO_END_HEAPS: [u64; 2] = [16 * MIB, 1024 * MIB];

/// Maximum wait for one dump to be written or acknowledged.
const DUMP_TIMEOUT: Duration = Duration::from_secs(60);

fn crash_sandbox(heap: u64, worker: &DumpWorker) -> Sandbox {
    SandboxBuilder::new()
        .guest_file(sandcore::demo_guest_path())
        .heap_size(heap)
        .dump_worker(worker)
        .build()
        .expect("building the demo sandbox")
}

/// Calls `crash_null` and returns the id of the dump the crash queued.
fn crash(sandbox: &mut Sandbox) -> DumpId {
    let error = sandbox
        .call::<()>("crash_null", ())
        .expect_err("crash_null returned without a crash");
    error.dump_id().unwrap_or_else(|| {
        panic!("the crash queued no dump (queue full or capture failed): {error}")
    })
}

fn heap_label(heap: u64) -> String {
    format!("heap_{}MiB", heap / MIB)
}

fn crash_to_error(c: &mut Criterion) {
    let mut group = c.benchmark_group("crash");
    floor::bench_cpl3_fault(&mut group, "floor/cpl3_fault_to_stub_exit_with_reset");
    floor::bench_register_reset(&mut group, "floor/register_reset");
    // Each timed crash is followed by an untimed wait for the dump worker,
    // so a short measurement time keeps the wall time of a case to seconds.
    group.measurement_time(Duration::from_secs(1));

    let worker = DumpWorker::builder()
        .sink(MemorySink::new(MemorySinkLimits::default()))
        .build()
        .expect("starting the dump worker");
    for heap in CRASH_HEAPS {
        let mut sandbox = crash_sandbox(heap, &worker);
        eprintln!(
            "crash/{}: guest memory {} bytes",
            heap_label(heap),
            sandbox.base_image().memory_size()
        );
        let label = heap_label(heap);

        group.bench_function(format!("{label}/crash_to_error"), |b| {
            b.iter_custom(|iterations| {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    let started = Instant::now();
                    let dump = crash(&mut sandbox);
                    total += started.elapsed();
                    worker
                        .wait_for(dump, DUMP_TIMEOUT)
                        .expect("memory dump finished");
                    sandbox.restore().expect("restore");
                    // Untimed: fault the pages a call touches back in, so the
                    // timed crash measures the crash path, not the first
                    // call after a restore (that is `noop_after_restore`).
                    sandbox.call::<()>("noop", ()).expect("noop");
                }
                total
            })
        });

        group.bench_function(format!("{label}/restore_after_crash"), |b| {
            b.iter_custom(|iterations| {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    let dump = crash(&mut sandbox);
                    worker
                        .wait_for(dump, DUMP_TIMEOUT)
                        .expect("memory dump finished");
                    let started = Instant::now();
                    sandbox.restore().expect("restore");
                    total += started.elapsed();
                }
                total
            })
        });

        group.bench_function(format!("{label}/crash_and_restore"), |b| {
            b.iter_custom(|iterations| {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    let started = Instant::now();
                    let dump = crash(&mut sandbox);
                    sandbox.restore().expect("restore");
                    total += started.elapsed();
                    worker
                        .wait_for(dump, DUMP_TIMEOUT)
                        .expect("memory dump finished");
                }
                total
            })
        });

        // The first call after a restore runs on a fresh private mapping, so
        // every page it touches faults in again (host and shadow page
        // tables). `crash_to_error` pays this too; this case shows it alone.
        group.bench_function(format!("{label}/noop_after_restore"), |b| {
            b.iter_custom(|iterations| {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    sandbox.restore().expect("restore");
                    let started = Instant::now();
                    sandbox.call::<()>("noop", ()).expect("noop");
                    total += started.elapsed();
                }
                total
            })
        });
    }
    let stats = worker.stats();
    eprintln!("crash: memory dump worker stats {stats:?}");
    group.finish();
}

/// Times crash → `finish` of every sink of `worker` (its receipt), with the
/// restore untimed.
fn bench_crash_to_receipt(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    sandbox: &mut Sandbox,
    worker: &DumpWorker,
) {
    group.bench_function(name, |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                let started = Instant::now();
                let dump = crash(sandbox);
                let receipt = worker
                    .wait_for(dump, DUMP_TIMEOUT)
                    .expect("dump receipt within the timeout");
                total += started.elapsed();
                assert!(receipt.succeeded(), "dump {dump} failed: {receipt:?}");
                sandbox.restore().expect("restore");
            }
            total
        })
    });
}

fn crash_to_file(c: &mut Criterion) {
    let mut group = c.benchmark_group("crash_to_file");
    support::shorten(&mut group);
    let directory = TempDir::new("file-dumps").expect("creating the dump directory");
    let mut config = FileSinkConfig::new(directory.path());
    config.max_dumps = Some(4);
    let worker = DumpWorker::builder()
        .sink(FileSink::new(config))
        .build()
        .expect("starting the dump worker");
    for heap in END_TO_END_HEAPS {
        let mut sandbox = crash_sandbox(heap, &worker);
        bench_crash_to_receipt(
            &mut group,
            &format!("{}/crash_to_durable_file", heap_label(heap)),
            &mut sandbox,
            &worker,
        );
    }
    group.finish();
}

fn crash_to_collector(c: &mut Criterion) {
    let mut group = c.benchmark_group("crash_to_collector");
    support::shorten(&mut group);
    let directory = TempDir::new("collector").expect("creating the collector directory");
    let mut config = CollectorConfig::new(
        Endpoint::Unix(directory.path().join("collector.sock")),
        directory.path().join("dumps"),
    );
    config.retention.max_total_bytes = Some(512 * MIB);
    let collector = Collector::bind(config).expect("binding the collector");
    let endpoint = collector.local_endpoint().expect("collector endpoint");
    let shutdown = Arc::new(AtomicBool::new(false));
    let collector_thread = {
        let shutdown = Arc::clone(&shutdown);
        std::thread::spawn(move || collector.run(&shutdown))
    };

    // The worker drives one handle of the shared sink. The benchmark keeps
    // the other to wait until the collector has acknowledged each dump.
    let socket_sink = SocketSink::new(SocketSinkConfig::new(
        endpoint,
        directory.path().join("spool"),
    ))
    .expect("creating the socket sink");
    let sink = SharedSink::new(socket_sink);
    let worker = DumpWorker::builder()
        .sink(sink.clone())
        .build()
        .expect("starting the dump worker");
    for heap in END_TO_END_HEAPS {
        let mut sandbox = crash_sandbox(heap, &worker);
        let name = format!("{}/crash_to_collector_ack", heap_label(heap));
        group.bench_function(name, |b| {
            b.iter_custom(|iterations| {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    let started = Instant::now();
                    let dump = crash(&mut sandbox);
                    let receipt = worker
                        .wait_for(dump, DUMP_TIMEOUT)
                        .expect("dump spooled within the timeout");
                    assert!(receipt.succeeded(), "dump {dump} failed: {receipt:?}");
                    assert!(
                        sink.lock().wait_idle(DUMP_TIMEOUT),
                        "collector did not acknowledge dump {dump}"
                    );
                    total += started.elapsed();
                    sandbox.restore().expect("restore");
                }
                total
            })
        });
    }
    eprintln!(
        "crash_to_collector: socket sink stats {:?}",
        sink.lock().stats()
    );
    drop(worker);
    shutdown.store(true, Ordering::SeqCst);
    match collector_thread.join() {
        Ok(Ok(stats)) => eprintln!("crash_to_collector: collector stats {stats:?}"),
        Ok(Err(error)) => eprintln!("crash_to_collector: collector failed: {error}"),
        Err(_) => eprintln!("crash_to_collector: collector thread panicked"),
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = sandcore_benches::support::criterion();
    targets = crash_to_error, crash_to_file, crash_to_collector
}
criterion_main!(benches);
