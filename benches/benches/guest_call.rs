//! Guest calls through a sandbox, beside three raw floors of the same run.
//! The CPL3 exit round trip is the floor of the exit transport, the
//! shared-memory round trip that of the polling transport, and a thread
//! spawn + join that of the first call on a new thread.
//!
//! Every case runs once per transport through `bench_transport`: the exit
//! transport, and the polling transport kept hot (`polling/…`), plus one
//! polling call that first has to wake a parked guest.

use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use sandcore::{Sandbox, SandboxBuilder, Transport};
use sandcore_benches::floor;

/// Argument of `sum_to`: 100,000 guest loop iterations.
const SUM_TO_N: u64 = 100_000;

/// Spin time of the hot polling sandbox: longer than any gap between two
/// iterations, so the guest parks only between criterion cases.
const HOT_IDLE_SPIN: Duration = Duration::from_millis(50);

/// Spin time of the parking polling sandbox, and the untimed sleep before
/// each of its calls (twice as long), so that every call finds the guest parked.
const PARKING_IDLE_SPIN: Duration = Duration::from_millis(1);

fn demo_sandbox(builder: SandboxBuilder) -> Sandbox {
    builder
        .guest_file(sandcore::demo_guest_path())
        .host_function("host_add", |a: i64, b: i64| a + b)
        .build()
        .expect("building the demo sandbox")
}

/// Adds every guest-call case for one transport, named `<transport>/<case>`.
fn bench_transport(
    group: &mut BenchmarkGroup<'_, WallTime>,
    transport: &str,
    mut sandbox: Sandbox,
) {
    group.bench_function(format!("{transport}/noop"), |b| {
        b.iter(|| sandbox.call::<()>("noop", ()).expect("noop"))
    });

    for (label, size) in [("echo_bytes_1KiB", 1 << 10), ("echo_bytes_64KiB", 64 << 10)] {
        let input = vec![0xa5u8; size];
        group.bench_function(format!("{transport}/{label}"), |b| {
            b.iter(|| {
                let output: Vec<u8> = sandbox
                    .call("echo_bytes", (input.as_slice(),))
                    .expect("echo_bytes");
                assert_eq!(output.len(), size);
                output
            })
        });
    }

    group.bench_function(format!("{transport}/call_host_add"), |b| {
        b.iter(|| {
            let sum: i64 = sandbox
                .call("call_host_add", (2i64, 3i64))
                .expect("call_host_add");
            assert_eq!(sum, 5);
        })
    });

    group.bench_function(format!("{transport}/sum_to_100000"), |b| {
        b.iter(|| {
            let sum: u64 = sandbox.call("sum_to", (SUM_TO_N,)).expect("sum_to");
            assert_eq!(sum, SUM_TO_N * (SUM_TO_N + 1) / 2);
        })
    });

    // A Sandbox is Send, so it moves into a fresh thread for each call and
    // comes back through join. The vCPU's first KVM_RUN on that thread is
    // what this case shows; spawn + join cost is the `floor/thread_spawn_join` case.
    let mut parked = Some(sandbox);
    group.bench_function(format!("{transport}/first_call_on_new_thread"), |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                let mut moved = parked
                    .take()
                    .expect("the sandbox is back from the last thread");
                let started = Instant::now();
                let returned = std::thread::spawn(move || {
                    moved.call::<()>("noop", ()).expect("noop on a new thread");
                    moved
                })
                .join()
                .expect("the calling thread panicked");
                total += started.elapsed();
                parked = Some(returned);
            }
            total
        })
    });
}

fn bench_thread_spawn_join(group: &mut BenchmarkGroup<'_, WallTime>, name: &str) {
    group.bench_function(name, |b| {
        b.iter(|| std::thread::spawn(|| ()).join().expect("empty thread"))
    });
}

/// Times a no-op call on a polling sandbox whose guest has parked: the
/// call wakes the vCPU thread and costs one exit.
fn bench_parked_call(group: &mut BenchmarkGroup<'_, WallTime>, name: &str) {
    let parking = Transport::Polling {
        idle_spin: PARKING_IDLE_SPIN,
    };
    let mut sandbox = demo_sandbox(SandboxBuilder::new().transport(parking));
    // Each timed call follows an untimed sleep of 2 ms; 0.2 s of timed calls
    // keeps the case to a few seconds of wall time.
    group.measurement_time(Duration::from_millis(200));
    group.bench_function(name, |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                std::thread::sleep(PARKING_IDLE_SPIN * 2);
                let started = Instant::now();
                sandbox.call::<()>("noop", ()).expect("noop");
                total += started.elapsed();
            }
            total
        })
    });
}

fn guest_call(c: &mut Criterion) {
    let mut group = c.benchmark_group("guest_call");
    floor::bench_cpl3_exit(&mut group, "floor/cpl3_exit");
    floor::bench_shared_memory_round_trip(&mut group, "floor/shared_memory_round_trip");
    bench_thread_spawn_join(&mut group, "floor/thread_spawn_join");

    bench_transport(&mut group, "exit", demo_sandbox(SandboxBuilder::new()));
    let hot = Transport::Polling {
        idle_spin: HOT_IDLE_SPIN,
    };
    bench_transport(
        &mut group,
        "polling",
        demo_sandbox(SandboxBuilder::new().transport(hot)),
    );
    bench_parked_call(&mut group, "polling/noop_waking_parked_guest");
    group.finish();
}

criterion_group! {
    name = benches;
    config = sandcore_benches::support::criterion();
    targets = guest_call
}
criterion_main!(benches);
