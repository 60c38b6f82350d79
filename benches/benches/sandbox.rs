//! Sandbox creation and restore, beside the raw floors of the same run:
//! bare VM creation for `create`, and the vCPU register reset for `restore`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use sandcore::{BaseImage, Sandbox, SandboxBuilder};
use sandcore_benches::floor;
use sandcore_benches::support::{self, MIB};

/// Guest heap sizes of the restore cases. The guest memory is the heap plus
/// about 0.5–3 MiB of stack, buffers, image and page tables; the run prints
/// the exact sizes.
const RESTORE_HEAPS: [u64; 2] = [16 * MIB, 256 * MIB];

/// Pages of `echo_bytes` input per restore case. Each call writes the input
/// into the input buffer, copies it into a heap `Vec` and writes it to the
/// output buffer, so it dirties about three times as many guest pages, plus
/// a few stack and header pages. The run prints the measured count.
const DIRTY_INPUT_PAGES: [usize; 3] = [1, 16, 256];

/// Buffers that hold a 1 MiB `echo_bytes` argument and its reply.
const RESTORE_BUFFER_SIZE: u64 = 2 * MIB;

fn build_demo(builder: SandboxBuilder) -> Sandbox {
    builder
        .guest_file(sandcore::demo_guest_path())
        .build()
        .expect("building the demo sandbox")
}

/// Times `create` only; dropping the sandbox happens outside the timer.
fn bench_create(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    create: impl Fn() -> Sandbox,
) {
    group.bench_function(name, |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                let started = Instant::now();
                let sandbox = create();
                total += started.elapsed();
                drop(sandbox);
            }
            total
        })
    });
}

fn sandbox_create(c: &mut Criterion) {
    let mut group = c.benchmark_group("sandbox_create");
    let template = build_demo(SandboxBuilder::new());
    let base: Arc<BaseImage> = template.base_image();
    let memory_size = base.memory_size();
    eprintln!("sandbox_create: default demo sandbox has {memory_size} bytes of guest memory");
    drop(template);

    floor::bench_vm_create(&mut group, "floor/bare_vm_create", memory_size as usize);
    bench_create(&mut group, "from_guest_file", || {
        build_demo(SandboxBuilder::new())
    });
    bench_create(&mut group, "from_base_image", || {
        SandboxBuilder::new()
            .base_image(Arc::clone(&base))
            .build()
            .expect("sandbox from the base image")
    });
    group.finish();
}

fn sandbox_restore(c: &mut Criterion) {
    let mut group = c.benchmark_group("sandbox_restore");
    floor::bench_register_reset(&mut group, "floor/register_reset");

    for heap in RESTORE_HEAPS {
        let mut sandbox = build_demo(
            SandboxBuilder::new()
                .heap_size(heap)
                .input_buffer_size(RESTORE_BUFFER_SIZE)
                .output_buffer_size(RESTORE_BUFFER_SIZE),
        );
        let memory_size = sandbox.base_image().memory_size();
        let heap_label = format!("heap_{}MiB", heap / MIB);

        bench_restore_after(
            &mut group,
            &format!("{heap_label}/after_noop"),
            &mut sandbox,
            memory_size,
            |sandbox| {
                sandbox.call::<()>("noop", ()).expect("noop");
            },
        );
        for pages in DIRTY_INPUT_PAGES {
            let input = vec![0x5au8; pages * 4096];
            let name = format!("{heap_label}/after_echo_{pages}_pages");
            bench_restore_after(&mut group, &name, &mut sandbox, memory_size, |sandbox| {
                let output: Vec<u8> = sandbox
                    .call("echo_bytes", (input.as_slice(),))
                    .expect("echo_bytes");
                assert_eq!(output.len(), input.len());
            });
        }
    }
    group.finish();
}

/// Times `restore()` after `dirty` ran, untimed, before each one.
fn bench_restore_after(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    sandbox: &mut Sandbox,
    memory_size: u64,
    mut dirty: impl FnMut(&mut Sandbox),
) {
    sandbox.restore().expect("restore");
    dirty(sandbox);
    match support::sandbox_private_dirty_pages() {
        Some(pages) => eprintln!("sandbox_restore/{name}: guest memory {memory_size} bytes, {pages} private dirty pages before restore"),
        None => eprintln!("sandbox_restore/{name}: /proc/self/smaps unreadable, dirty page count unknown"),
    }
    group.bench_function(name, |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                dirty(sandbox);
                let started = Instant::now();
                sandbox.restore().expect("restore");
                total += started.elapsed();
            }
            total
        })
    });
}

criterion_group! {
    name = benches;
    config = sandcore_benches::support::criterion();
    targets = sandbox_create, sandbox_restore
}
criterion_main!(benches);
