//! ELF core serialization throughput into each sink, in logical core bytes
//! per second (holes count as their length): `write_core` of a synthetic
//! crash over 64 MiB of guest memory in which every other page is nonzero.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sandcore_benches::support::{TempDir, MIB};
use sandcore_sinks::collector::{Collector, CollectorConfig};
use sandcore_sinks::elf_core::write_core;
use sandcore_sinks::file_sink::{FileSink, FileSinkConfig};
use sandcore_sinks::memory_sink::{MemorySink, MemorySinkLimits};
use sandcore_sinks::snapshot::{
    CrashInfo, CrashKind, GuestMemorySource, MemoryRegion, RegionFlags, XSAVE_AREA_SIZE,
};
use sandcore_sinks::socket_sink::{Endpoint, SocketSink, SocketSinkConfig};

const PAGE: usize = 4096;
/// Guest memory of the synthetic crash.
const MEMORY_SIZE: usize = 64 << 20;
/// Guest address of the one memory region.
const REGION_ADDRESS: u64 = 0x10_0000;

/// Guest memory in which even pages are filled with a nonzero pattern and
/// odd pages are zero, so half the core is data and half is holes.
struct HalfFullMemory(Vec<u8>);

impl HalfFullMemory {
    fn new() -> HalfFullMemory {
        let mut bytes = vec![0u8; MEMORY_SIZE];
        for (index, page) in bytes
            .chunks_mut(PAGE)
            .enumerate()
            .filter(|(index, _)| index % 2 == 0)
        {
            page.fill((index % 251) as u8 | 1);
        }
        HalfFullMemory(bytes)
    }
}

impl GuestMemorySource for HalfFullMemory {
    fn region_bytes(&self, region: &MemoryRegion) -> Option<&[u8]> {
        let start = usize::try_from(region.guest_address.checked_sub(REGION_ADDRESS)?).ok()?;
        self.0
            .get(start..start.checked_add(usize::try_from(region.size).ok()?)?)
    }
}

fn crash_info(dump_id: u64) -> CrashInfo {
    let mut info = CrashInfo {
        dump_id,
        sandbox_id: 1,
        timestamp_ns: 1_800_000_000_000_000_000,
        kind: CrashKind::Exception {
            vector: 14,
            error_code: 6,
        },
        registers: Default::default(),
        control: Default::default(),
        xsave: [0; XSAVE_AREA_SIZE],
        xcr0: 7,
        guest_name: Default::default(),
        guest_path: Default::default(),
        build_id: Default::default(),
        function: Default::default(),
        entry_point: REGION_ADDRESS,
        message: Default::default(),
        message_truncated: false,
        regions: Default::default(),
    };
    info.guest_name.push_str("bench-guest").expect("name fits");
    info.function.push_str("crash_null").expect("name fits");
    info.registers.rip = REGION_ADDRESS + 0x40;
    info.regions
        .push(MemoryRegion {
            guest_address: REGION_ADDRESS,
            size: MEMORY_SIZE as u64,
            flags: RegionFlags::READ | RegionFlags::WRITE,
            file_offset: 0,
        })
        .expect("one region fits");
    info
}

fn sinks(c: &mut Criterion) {
    let memory = HalfFullMemory::new();
    let mut dump_id = 0u64;
    let mut next_info = move || {
        dump_id += 1;
        crash_info(dump_id)
    };

    let mut memory_sink = MemorySink::new(MemorySinkLimits {
        max_dumps: 2,
        max_total_bytes: 256 * MIB,
    });
    let core_size = write_core(&next_info(), &memory, &mut memory_sink)
        .expect("first core")
        .bytes;
    eprintln!(
        "sinks: core of {core_size} logical bytes, {} bytes of them page data",
        MEMORY_SIZE / 2
    );

    let mut group = c.benchmark_group("sinks");
    group.throughput(Throughput::Bytes(core_size));
    group.measurement_time(Duration::from_secs(4));

    group.bench_function("memory_sink", |b| {
        b.iter(|| write_core(&next_info(), &memory, &mut memory_sink).expect("core into memory"))
    });

    let file_directory = TempDir::new("sink-files").expect("creating the dump directory");
    let mut file_config = FileSinkConfig::new(file_directory.path());
    file_config.max_dumps = Some(2);
    let mut file_sink = FileSink::new(file_config);
    group.bench_function("file_sink_sparse", |b| {
        b.iter(|| write_core(&next_info(), &memory, &mut file_sink).expect("core into a file"))
    });

    let collector_directory =
        TempDir::new("sink-collector").expect("creating the collector directory");
    let mut collector_config = CollectorConfig::new(
        Endpoint::Unix(collector_directory.path().join("collector.sock")),
        collector_directory.path().join("dumps"),
    );
    collector_config.retention.max_total_bytes = Some(512 * MIB);
    let collector = Collector::bind(collector_config).expect("binding the collector");
    let endpoint = collector.local_endpoint().expect("collector endpoint");
    let shutdown = Arc::new(AtomicBool::new(false));
    let collector_thread = {
        let shutdown = Arc::clone(&shutdown);
        std::thread::spawn(move || collector.run(&shutdown))
    };
    let mut socket_sink = SocketSink::new(SocketSinkConfig::new(
        endpoint,
        collector_directory.path().join("spool"),
    ))
    .expect("creating the socket sink");
    // Timed until the collector has acknowledged the dump, not only until it is spooled.
    group.bench_function("socket_sink_to_collector_ack", |b| {
        b.iter(|| {
            write_core(&next_info(), &memory, &mut socket_sink).expect("core into the spool");
            assert!(
                socket_sink.wait_idle(Duration::from_secs(60)),
                "collector did not acknowledge the dump"
            );
        })
    });
    group.finish();

    eprintln!("sinks: socket sink stats {:?}", socket_sink.stats());
    drop(socket_sink);
    shutdown.store(true, Ordering::SeqCst);
    match collector_thread.join() {
        Ok(Ok(stats)) => eprintln!("sinks: collector stats {stats:?}"),
        Ok(Err(error)) => eprintln!("sinks: collector failed: {error}"),
        Err(_) => eprintln!("sinks: collector thread panicked"),
    }
}

criterion_group! {
    name = benches;
    config = sandcore_benches::support::criterion();
    targets = sinks
}
criterion_main!(benches);
