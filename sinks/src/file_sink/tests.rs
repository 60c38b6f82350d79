//! Tests of the file sink on real files in a directory under `temp_dir()`.

use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::atomic::AtomicUsize;

use super::*;
use crate::core_reader::read_summary;
use crate::elf_core::{dump_metadata, write_core, CoreLayout};
use crate::memory_sink::{MemorySink, MemorySinkLimits};
use crate::snapshot::{
    CrashInfo, CrashKind, GuestMemorySource, MemoryRegion, RegionFlags, XSAVE_AREA_SIZE,
};

const BASE: u64 = 0x10_0000;
const PAGE: usize = 4096;
/// Pages of guest memory per test dump; only the first is non-zero.
const PAGES: usize = 1024;

/// A directory under `temp_dir()` that is removed when the test ends.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "sandcore-file-sink-{}-{name}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TestDir(path)
    }

    fn core_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| {
                path.extension()
                    .is_some_and(|extension| extension == "core")
            })
            .collect();
        files.sort();
        files
    }

    fn entry_names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Guest memory whose first page is 0x77 and whose other pages are zero.
struct MostlyZero(Vec<u8>);

impl MostlyZero {
    fn new() -> Self {
        let mut bytes = vec![0u8; PAGES * PAGE];
        bytes[..PAGE].fill(0x77);
        MostlyZero(bytes)
    }
}

impl GuestMemorySource for MostlyZero {
    fn region_bytes(&self, region: &MemoryRegion) -> Option<&[u8]> {
        let start = region.guest_address.checked_sub(BASE)? as usize;
        self.0.get(start..start + region.size as usize)
    }
}

fn crash(dump_id: u64) -> CrashInfo {
    let mut info = CrashInfo {
        dump_id,
        sandbox_id: 9,
        timestamp_ns: 1_700_000_000_123_456_789,
        kind: CrashKind::Exception {
            vector: 13,
            error_code: 0,
        },
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
    info.guest_name.push_str("demo guest").unwrap();
    info.registers.rip = 0x10_0040;
    info.regions
        .push(MemoryRegion {
            guest_address: BASE,
            size: (PAGES * PAGE) as u64,
            flags: RegionFlags::READ | RegionFlags::WRITE,
            file_offset: 0,
        })
        .unwrap();
    info
}

fn write_dump(sink: &mut FileSink, dump_id: u64) -> PathBuf {
    let receipt = write_core(&crash(dump_id), &MostlyZero::new(), sink).unwrap();
    PathBuf::from(receipt.location.as_str())
}

#[test]
fn dump_file_mode_and_sparseness() {
    let dir = TestDir::new("mode");
    let mut sink = FileSink::new(FileSinkConfig::new(&dir.0));
    let path = write_dump(&mut sink, 1);

    assert_eq!(dir.core_files(), vec![path.clone()]);
    let metadata = std::fs::metadata(&path).unwrap();
    assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
    let layout = CoreLayout::compute(&crash(1), &MostlyZero::new()).unwrap();
    assert_eq!(metadata.len(), layout.total_size);
    let allocated = metadata.blocks() * 512;
    assert!(
        allocated < metadata.len() / 8,
        "{allocated} bytes allocated for a {} byte dump that is mostly holes",
        metadata.len()
    );

    // The file has the same bytes as the in-memory sink's expanded core.
    let mut memory = MemorySink::new(MemorySinkLimits::default());
    write_core(&crash(1), &MostlyZero::new(), &mut memory).unwrap();
    let expected = memory.dumps().latest().unwrap().to_elf_bytes();
    let written = std::fs::read(&path).unwrap();
    assert!(written == expected, "file content differs from the core");
    assert_eq!(read_summary(&written).unwrap().rip, 0x10_0040);
}

#[test]
fn dump_file_name_format() {
    let layout = CoreLayout::compute(&crash(1), &MostlyZero::new()).unwrap();
    let metadata = dump_metadata(&crash(1), &layout);
    assert_eq!(
        dump_file_name(&metadata, 42),
        "demo_guest-9-20231114T221320.123Z-000042.core"
    );
    assert_eq!(sanitize_guest_name("../etc/passwd"), "_._etc_passwd");
    assert_eq!(sanitize_guest_name(".hidden"), "_hidden");
    assert_eq!(sanitize_guest_name(""), "guest");
    assert_eq!(sanitize_guest_name("Ok-1.2_x"), "Ok-1.2_x");

    let mut text = String::new();
    write_utc_timestamp(&mut text, 0);
    assert_eq!(text, "19700101T000000.000Z");
    text.clear();
    // 2024-02-29 23:59:59.999 UTC, a leap day.
    write_utc_timestamp(&mut text, 1_709_251_199_999_000_000);
    assert_eq!(text, "20240229T235959.999Z");
}

#[test]
fn same_crash_twice_gets_two_names() {
    let dir = TestDir::new("unique");
    let mut sink = FileSink::new(FileSinkConfig::new(&dir.0));
    let first = write_dump(&mut sink, 1);
    let second = write_dump(&mut sink, 2);
    assert_ne!(first, second);
    assert_eq!(dir.core_files().len(), 2);
}

#[test]
fn abort_leaves_no_file() {
    let dir = TestDir::new("abort");
    let mut sink = FileSink::new(FileSinkConfig::new(&dir.0));
    let layout = CoreLayout::compute(&crash(1), &MostlyZero::new()).unwrap();
    sink.begin(&dump_metadata(&crash(1), &layout)).unwrap();
    sink.data(&[1u8; 100]).unwrap();
    assert!(
        sink.temp_path(1).exists(),
        "temporary file missing while writing"
    );
    sink.abort();

    assert!(
        dir.entry_names().is_empty(),
        "left behind: {:?}",
        dir.entry_names()
    );
}

/// Sink wrapper that fails after `limit` bytes and forwards everything else.
struct FailingAfter<'a> {
    inner: &'a mut FileSink,
    remaining: u64,
}

impl DumpSink for FailingAfter<'_> {
    fn begin(&mut self, metadata: &DumpMetadata) -> Result<(), SinkError> {
        self.inner.begin(metadata)
    }

    fn data(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        if bytes.len() as u64 > self.remaining {
            return Err(SinkError::new(SinkErrorKind::Io, "injected write failure"));
        }
        self.remaining -= bytes.len() as u64;
        self.inner.data(bytes)
    }

    fn hole(&mut self, length: u64) -> Result<(), SinkError> {
        self.inner.hole(length)
    }

    fn finish(&mut self) -> Result<SinkReceipt, SinkError> {
        self.inner.finish()
    }

    fn abort(&mut self) {
        self.inner.abort()
    }

    fn name(&self) -> &str {
        "failing"
    }
}

#[test]
fn write_failure_leaves_no_file() {
    let dir = TestDir::new("failure");
    let mut sink = FileSink::new(FileSinkConfig::new(&dir.0));
    let mut failing = FailingAfter {
        inner: &mut sink,
        remaining: 5000,
    };
    let error = write_core(&crash(1), &MostlyZero::new(), &mut failing).unwrap_err();
    assert!(std::format!("{error}").contains("injected write failure"));
    assert!(
        dir.entry_names().is_empty(),
        "left behind: {:?}",
        dir.entry_names()
    );
}

#[test]
fn short_dump_rejected_at_finish() {
    let dir = TestDir::new("short");
    let mut sink = FileSink::new(FileSinkConfig::new(&dir.0));
    let layout = CoreLayout::compute(&crash(1), &MostlyZero::new()).unwrap();
    sink.begin(&dump_metadata(&crash(1), &layout)).unwrap();
    sink.data(&[1u8; 100]).unwrap();
    let error = sink.finish().unwrap_err();

    assert_eq!(error.kind, SinkErrorKind::Protocol);
    assert!(
        error.message.contains("ended after 100 of"),
        "{}",
        error.message
    );
    assert!(
        dir.entry_names().is_empty(),
        "left behind: {:?}",
        dir.entry_names()
    );
}

#[test]
fn symlink_at_temp_path_not_followed() {
    let dir = TestDir::new("symlink");
    let victim = dir.0.join("victim.txt");
    std::fs::write(&victim, b"keep me").unwrap();
    let mut sink = FileSink::new(FileSinkConfig::new(&dir.0));
    let temp_path = sink.temp_path(1);
    std::os::unix::fs::symlink(&victim, &temp_path).unwrap();

    let error = write_core(&crash(1), &MostlyZero::new(), &mut sink).unwrap_err();
    let message = std::format!("{error}");
    assert!(message.contains(&*temp_path.to_string_lossy()), "{message}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    assert!(std::fs::symlink_metadata(&temp_path)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(dir.core_files().is_empty());
}

#[test]
fn retention_by_count() {
    let dir = TestDir::new("count");
    std::fs::write(dir.0.join("notes.txt"), b"not a dump").unwrap();
    let mut config = FileSinkConfig::new(&dir.0);
    config.max_dumps = Some(2);
    let mut sink = FileSink::new(config);
    let mut paths = Vec::new();
    for dump_id in 1..=4 {
        paths.push(write_dump(&mut sink, dump_id));
    }

    let kept = dir.core_files();
    assert_eq!(kept.len(), 2);
    assert!(kept.contains(&paths[2]), "third dump was removed");
    assert!(kept.contains(&paths[3]), "newest dump was removed");
    assert!(
        dir.0.join("notes.txt").exists(),
        "retention removed a file that is not a dump"
    );
}

#[test]
fn retention_by_bytes() {
    let dir = TestDir::new("bytes");
    let mut probe = FileSink::new(FileSinkConfig::new(&dir.0));
    let first = write_dump(&mut probe, 100);
    let one_dump = std::fs::metadata(&first).unwrap().blocks() * 512;
    std::fs::remove_file(&first).unwrap();

    let mut config = FileSinkConfig::new(&dir.0);
    config.max_total_bytes = Some(2 * one_dump + one_dump / 2);
    let mut sink = FileSink::new(config);
    let mut paths = Vec::new();
    for dump_id in 1..=4 {
        paths.push(write_dump(&mut sink, dump_id));
    }

    assert_eq!(dir.core_files().len(), 2);
    assert!(paths[3].exists(), "newest dump was removed");
    assert!(!paths[0].exists(), "oldest dump was kept");
}

#[test]
fn min_free_space_rejects_begin() {
    let dir = TestDir::new("free");
    let mut config = FileSinkConfig::new(&dir.0);
    config.min_free_bytes = Some(u64::MAX);
    let mut sink = FileSink::new(config);
    let error = write_core(&crash(1), &MostlyZero::new(), &mut sink).unwrap_err();

    let crate::elf_core::CoreWriteError::Sink(error) = error else {
        panic!("expected a sink error, got {error:?}");
    };
    assert_eq!(error.kind, SinkErrorKind::NoSpace);
    assert!(
        error.message.contains(&*dir.0.to_string_lossy()),
        "{}",
        error.message
    );
    assert!(
        error
            .message
            .contains("below the minimum of 18446744073709551615"),
        "{}",
        error.message
    );
    assert!(dir.entry_names().is_empty());
}

fn env_of(pairs: &[(&str, &Path)]) -> impl Fn(&str) -> Option<OsString> {
    let pairs: Vec<(String, OsString)> = pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.as_os_str().to_owned()))
        .collect();
    move |name| {
        pairs
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
    }
}

#[test]
fn dump_dir_precedence() {
    let primary = TestDir::new("primary");
    let alias = TestDir::new("alias");
    let configured = TestDir::new("configured");
    let both = env_of(&[(DUMP_DIR_ENV, &primary.0), (DUMP_DIR_ENV_ALIAS, &alias.0)]);

    assert_eq!(
        resolve_dump_dir_with(Some(&configured.0), &both),
        (configured.0.clone(), None)
    );
    assert_eq!(
        resolve_dump_dir_with(None, &both),
        (primary.0.clone(), None)
    );
    let alias_only = env_of(&[(DUMP_DIR_ENV_ALIAS, &alias.0)]);
    assert_eq!(
        resolve_dump_dir_with(None, &alias_only),
        (alias.0.clone(), None)
    );
    assert_eq!(
        resolve_dump_dir_with(None, env_of(&[])),
        (std::env::temp_dir(), None)
    );
    let empty = env_of(&[(DUMP_DIR_ENV, Path::new(""))]);
    assert_eq!(
        resolve_dump_dir_with(None, &empty),
        (std::env::temp_dir(), None)
    );
}

#[test]
fn dump_dir_missing_falls_back() {
    let dir = TestDir::new("missing");
    let missing = dir.0.join("does-not-exist");
    let (path, warning) = resolve_dump_dir_with(None, env_of(&[(DUMP_DIR_ENV, &missing)]));

    assert_eq!(path, std::env::temp_dir());
    let warning = warning.expect("no warning for a missing directory");
    assert!(warning.contains(&*missing.to_string_lossy()), "{warning}");
    assert!(warning.contains("does not exist"), "{warning}");
    assert!(warning.contains(DUMP_DIR_ENV), "{warning}");
}

#[test]
fn dump_dir_file_falls_back() {
    let dir = TestDir::new("file");
    let file = dir.0.join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let (path, warning) = resolve_dump_dir_with(None, env_of(&[(DUMP_DIR_ENV_ALIAS, &file)]));

    assert_eq!(path, std::env::temp_dir());
    let warning = warning.expect("no warning for a file in place of a directory");
    assert!(warning.contains(&*file.to_string_lossy()), "{warning}");
    assert!(warning.contains("is not a directory"), "{warning}");
    assert!(warning.contains(DUMP_DIR_ENV_ALIAS), "{warning}");
}

#[test]
fn dump_dir_reads_process_environment() {
    // The only test that changes these variables, so no other test races with it.
    let dir = TestDir::new("env");
    let missing = dir.0.join("gone");
    std::env::set_var(DUMP_DIR_ENV, &missing);
    let (path, warning) = resolve_dump_dir(None);
    std::env::set_var(DUMP_DIR_ENV, &dir.0);
    let (usable, no_warning) = resolve_dump_dir(None);
    std::env::remove_var(DUMP_DIR_ENV);

    assert_eq!(path, std::env::temp_dir());
    assert!(warning.is_some_and(|text| text.contains("does not exist")));
    assert_eq!(usable, dir.0);
    assert_eq!(no_warning, None);
}
