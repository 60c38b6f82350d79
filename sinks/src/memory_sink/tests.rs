//! Tests of the memory sink and of reading summaries back with `core_reader`.

use super::*;
use crate::core_reader::{notes, read_summary, CoreReadError};
use crate::elf_core::{write_core, CoreLayout};
use crate::snapshot::{
    CrashInfo, CrashKind, GuestMemorySource, MemoryRegion, RegionFlags, XSAVE_AREA_SIZE,
};

const BASE: u64 = 0x40_0000;
const PAGE: usize = 4096;

/// Guest memory of `pages` pages where every odd page is zero.
struct StripedSource(Vec<u8>);

impl StripedSource {
    fn new(pages: usize) -> Self {
        let mut bytes = vec![0u8; pages * PAGE];
        for page in (0..pages).step_by(2) {
            bytes[page * PAGE..(page + 1) * PAGE].fill(page as u8 + 1);
        }
        StripedSource(bytes)
    }
}

impl GuestMemorySource for StripedSource {
    fn region_bytes(&self, region: &MemoryRegion) -> Option<&[u8]> {
        let start = region.guest_address.checked_sub(BASE)? as usize;
        self.0.get(start..start + region.size as usize)
    }
}

fn crash(dump_id: u64, kind: CrashKind, pages: usize) -> CrashInfo {
    let mut info = CrashInfo {
        dump_id,
        sandbox_id: 3,
        timestamp_ns: 1_000 + dump_id,
        kind,
        registers: Default::default(),
        control: Default::default(),
        xsave: [0; XSAVE_AREA_SIZE],
        xcr0: 7,
        guest_name: heapless::String::new(),
        guest_path: heapless::String::new(),
        build_id: heapless::Vec::new(),
        function: heapless::String::new(),
        entry_point: BASE,
        message: heapless::String::new(),
        message_truncated: false,
        regions: heapless::Vec::new(),
    };
    info.registers.rip = 0x40_1234 + dump_id;
    info.registers.rsp = 0x7f_f000;
    info.control.cr2 = 0xbad0;
    info.guest_name.push_str("demo").unwrap();
    info.guest_path.push_str("/guests/demo").unwrap();
    info.build_id.extend_from_slice(&[1, 2, 3, 4]).unwrap();
    info.function.push_str("crash_panic").unwrap();
    info.message
        .push_str("panicked at 'boom' src/lib.rs:9:1")
        .unwrap();
    info.regions
        .push(MemoryRegion {
            guest_address: BASE,
            size: (pages * PAGE) as u64,
            flags: RegionFlags::READ | RegionFlags::WRITE,
            file_offset: 0,
        })
        .unwrap();
    info
}

fn store(sink: &mut MemorySink, dump_id: u64, pages: usize) {
    let source = StripedSource::new(pages);
    write_core(&crash(dump_id, CrashKind::Panic, pages), &source, sink).unwrap();
}

fn unlimited() -> MemorySinkLimits {
    MemorySinkLimits {
        max_dumps: 100,
        max_total_bytes: u64::MAX,
    }
}

#[test]
fn eviction_by_count() {
    let mut sink = MemorySink::new(MemorySinkLimits {
        max_dumps: 3,
        ..unlimited()
    });
    let dumps = sink.dumps();
    for dump_id in 1..=5 {
        store(&mut sink, dump_id, 2);
    }
    assert_eq!(dumps.dump_ids(), vec![3, 4, 5]);
    assert!(dumps.get(1).is_none(), "oldest dump was not evicted");
    assert!(dumps.get(2).is_none(), "second oldest dump was not evicted");
}

#[test]
fn eviction_by_bytes() {
    let mut probe = MemorySink::new(unlimited());
    store(&mut probe, 1, 4);
    let one_dump = probe.dumps().total_bytes();
    // Holes are not stored: 2 of the 4 pages are zero.
    let total_size = probe.dumps().latest().unwrap().total_size();
    assert_eq!(one_dump, total_size - 2 * PAGE as u64);

    let mut sink = MemorySink::new(MemorySinkLimits {
        max_dumps: 100,
        max_total_bytes: 2 * one_dump + one_dump / 2,
    });
    let dumps = sink.dumps();
    for dump_id in 1..=4 {
        store(&mut sink, dump_id, 4);
    }
    assert_eq!(dumps.dump_ids(), vec![3, 4]);
    assert_eq!(dumps.total_bytes(), 2 * one_dump);
}

#[test]
fn dump_larger_than_limit_rejected() {
    let mut sink = MemorySink::new(MemorySinkLimits {
        max_dumps: 4,
        max_total_bytes: 1000,
    });
    let source = StripedSource::new(2);
    let error = write_core(&crash(1, CrashKind::Panic, 2), &source, &mut sink).unwrap_err();
    let message = std::format!("{error}");
    assert!(message.contains("max_total_bytes = 1000"), "{message}");
    assert!(sink.dumps().is_empty());
}

#[test]
fn lookup_by_dump_id() {
    let mut sink = MemorySink::new(unlimited());
    let dumps = sink.dumps();
    for dump_id in [10, 20, 30] {
        store(&mut sink, dump_id, 2);
    }
    assert_eq!(dumps.len(), 3);
    assert_eq!(dumps.get(20).unwrap().dump_id(), 20);
    assert_eq!(
        dumps.get(20).unwrap().summary().unwrap().rip,
        0x40_1234 + 20
    );
    assert_eq!(dumps.latest().unwrap().dump_id(), 30);
    assert!(dumps.get(40).is_none());
}

#[test]
fn elf_bytes_expand_holes() {
    let pages = 6;
    let info = crash(7, CrashKind::Panic, pages);
    let source = StripedSource::new(pages);
    let mut sink = MemorySink::new(unlimited());
    write_core(&info, &source, &mut sink).unwrap();
    let dump = sink.dumps().get(7).unwrap();
    let core = dump.to_elf_bytes();
    let layout = CoreLayout::compute(&info, &source).unwrap();

    assert_eq!(core.len() as u64, layout.total_size);
    assert_eq!(dump.total_size(), layout.total_size);
    let memory = &core[layout.data_offset as usize..];
    assert!(
        memory == &source.0[..],
        "expanded memory differs from the guest's"
    );
    assert_eq!(dump.head().len() as u64, layout.data_offset + PAGE as u64);
}

#[test]
fn summary_parsed_from_notes() {
    let mut sink = MemorySink::new(unlimited());
    let info = crash(5, CrashKind::Panic, 2);
    write_core(&info, &StripedSource::new(2), &mut sink).unwrap();
    let dump = sink.dumps().get(5).unwrap();
    let summary = dump.summary().unwrap();

    assert_eq!(summary.kind, CrashKind::Panic);
    assert_eq!(summary.signal, 6);
    assert_eq!(summary.rip, 0x40_1234 + 5);
    assert_eq!(summary.rsp, 0x7f_f000);
    assert_eq!(summary.message, "panicked at 'boom' src/lib.rs:9:1");
    assert_eq!(summary.function, "crash_panic");
    assert_eq!(summary.build_id, &[1, 2, 3, 4]);
    assert_eq!(summary.guest_name, "demo");
    assert_eq!(summary.sandbox_id, 3);
    assert_eq!(summary.dump_id, 5);
    assert_eq!(summary.timestamp_ns, 1_005);
    assert!(!summary.message_truncated);
}

#[test]
fn summary_round_trips_every_kind() {
    let kinds = [
        CrashKind::Exception {
            vector: 14,
            error_code: 6,
        },
        CrashKind::Exception {
            vector: 6,
            error_code: 0,
        },
        CrashKind::StackOverflow { address: 0x7f_e000 },
        CrashKind::Panic,
        CrashKind::TripleFault,
        CrashKind::InternalError,
        CrashKind::UnexpectedExit,
        CrashKind::Timeout,
        CrashKind::Cancelled,
        CrashKind::OnDemand,
    ];
    for kind in kinds {
        let mut sink = MemorySink::new(unlimited());
        write_core(&crash(1, kind, 2), &StripedSource::new(2), &mut sink).unwrap();
        let dump = sink.dumps().latest().unwrap();
        let summary = dump.summary().unwrap();
        assert_eq!(summary.kind, kind);
        assert_eq!(summary.signal, kind.signal(), "signal of {kind:?}");
    }
}

#[test]
fn reader_rejects_damaged_input() {
    let mut sink = MemorySink::new(unlimited());
    store(&mut sink, 1, 2);
    let core = sink.dumps().latest().unwrap().to_elf_bytes();

    let error = read_summary(&core[..200]).unwrap_err();
    assert!(
        matches!(error, CoreReadError::Truncated { .. }),
        "{error:?}"
    );

    let mut not_elf = core.clone();
    not_elf[0] = 0;
    let error = read_summary(&not_elf).unwrap_err();
    assert_eq!(error, CoreReadError::NotCore { field: "magic" });

    let names: Vec<Vec<u8>> = notes(&core)
        .unwrap()
        .map(|note| note.unwrap().name.to_vec())
        .collect();
    assert_eq!(names.len(), 8);
    assert_eq!(names[7], b"SANDCORE");
}

#[test]
fn read_handle_works_across_threads() {
    let mut sink = MemorySink::new(MemorySinkLimits {
        max_dumps: 4,
        ..unlimited()
    });
    let dumps = sink.dumps();
    let reader = std::thread::spawn(move || {
        let mut seen = 0u64;
        while seen < 20 {
            if let Some(dump) = dumps.latest() {
                let summary = dump.summary().expect("stored dump does not parse");
                assert_eq!(summary.dump_id, dump.dump_id());
                seen = seen.max(dump.dump_id());
            }
            std::thread::yield_now();
        }
        seen
    });
    for dump_id in 1..=20 {
        store(&mut sink, dump_id, 2);
    }
    assert_eq!(reader.join().unwrap(), 20);
    assert_eq!(sink.dumps().dump_ids(), vec![17, 18, 19, 20]);
}

#[test]
fn aborted_dump_not_stored() {
    let mut sink = MemorySink::new(unlimited());
    let info = crash(1, CrashKind::Panic, 2);
    let layout = CoreLayout::compute(&info, &StripedSource::new(2)).unwrap();
    sink.begin(&crate::elf_core::dump_metadata(&info, &layout))
        .unwrap();
    sink.data(&[0u8; 64]).unwrap();
    sink.abort();
    assert!(sink.dumps().is_empty());
    let error = sink.finish().unwrap_err();
    assert_eq!(error.kind, SinkErrorKind::Protocol);
}
