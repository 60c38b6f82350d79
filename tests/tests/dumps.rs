//! Crash dumps read back with real gdb and readelf: backtraces, registers,
//! signals, fault addresses and guest heap contents, plus the file's mode,
//! sparseness and notes, a second in-memory sink and an unwritable directory.
//! The tests of crashes and their cores run on both transports, as
//! `exit::<test>` and `polling::<test>`. The file and sink checks run on the
//! exit transport only, because the transport does not reach the core writer.
#![cfg(feature = "crashdump")]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{assert_transport, demo_guest, expect_error, require_kvm, transport_name};
use sandcore::dump::{DumpReceipt, DumpWorker};
use sandcore::{Sandbox, SandboxBuilder, SandboxError, Transport};
use sandcore_sinks::file_sink::{FileSink, FileSinkConfig};
use sandcore_sinks::memory_sink::{MemorySink, MemorySinkLimits};
use sandcore_sinks::sink::SinkErrorKind;

/// Text the demo guest copies onto its heap during setup.
const HEAP_SENTINEL: &str = "sandcore-heap-sentinel-7f3a";
/// Time allowed for the worker to write one dump.
const DUMP_TIMEOUT: Duration = Duration::from_secs(30);

/// Linux signal number of SIGSEGV on x86-64 (`signal(7)`), as `pr_cursig` records it.
const SIGSEGV: u32 = 11;

/// A dump directory of one test, removed when the test ends.
struct DumpDirectory {
    path: PathBuf,
}

impl DumpDirectory {
    fn new(test: &str) -> DumpDirectory {
        let path =
            std::env::temp_dir().join(format!("sandcore-dumps-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|error| panic!("creating {} failed: {error}", path.display()));
        DumpDirectory { path }
    }
}

impl Drop for DumpDirectory {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A sandbox whose dumps go through its own worker with a file sink.
struct DumpingSandbox {
    sandbox: Sandbox,
    worker: DumpWorker,
    directory: DumpDirectory,
}

fn file_worker(directory: &Path) -> DumpWorker {
    DumpWorker::builder()
        .sink(FileSink::new(FileSinkConfig::new(directory)))
        .build()
        .expect("building the dump worker failed")
}

/// Builds a sandbox on `transport` whose dumps go to a directory named
/// after `test` and the transport, so that both variants of a test can run
/// at the same time.
fn dumping_sandbox(test: &str, transport: Transport) -> DumpingSandbox {
    require_kvm();
    let directory = DumpDirectory::new(&format!("{test}-{}", transport_name(transport)));
    let worker = file_worker(&directory.path);
    let sandbox = SandboxBuilder::new()
        .guest_file(demo_guest())
        .host_function("host_add", |a: i64, b: i64| a + b)
        .dump_dir(&directory.path)
        .dump_worker(&worker)
        .transport(transport)
        .build()
        .expect("building the sandbox failed");
    assert_transport(&sandbox, transport);
    DumpingSandbox {
        sandbox,
        worker,
        directory,
    }
}

/// One crash written to a core file, with what the test needs to check it.
struct CrashDump {
    error: SandboxError,
    receipt: DumpReceipt,
    core: PathBuf,
    sentinel: u64,
    // Kept so that the directory outlives the checks.
    _fixture: DumpingSandbox,
}

/// Calls `function` on `transport`, which must crash, and waits for its core file.
fn crash_dump(test: &str, function: &str, transport: Transport) -> CrashDump {
    let mut fixture = dumping_sandbox(test, transport);
    let sentinel: u64 = fixture
        .sandbox
        .call("sentinel_address", ())
        .expect("sentinel_address failed");
    assert_ne!(sentinel, 0, "sentinel_address returned 0");

    let error = expect_error(
        fixture.sandbox.call::<sandcore::Value>(function, ()),
        function,
    );
    let dump_id = error
        .dump_id()
        .unwrap_or_else(|| panic!("{function} returned no dump id: {error:?}"));
    let receipt = fixture
        .worker
        .wait_for(dump_id, DUMP_TIMEOUT)
        .unwrap_or_else(|| {
            panic!("dump {dump_id} of {function} was not written within {DUMP_TIMEOUT:?}")
        });
    assert!(
        receipt.succeeded(),
        "dump {dump_id} of {function} failed: {receipt:?}"
    );
    assert_eq!(
        receipt.dump_id, dump_id,
        "receipt is for dump {}",
        receipt.dump_id
    );
    assert_eq!(
        receipt.sandbox_id,
        fixture.sandbox.id(),
        "receipt names sandbox {}",
        receipt.sandbox_id
    );
    let core = receipt
        .file_path()
        .unwrap_or_else(|| panic!("receipt of dump {dump_id} has no file path: {receipt:?}"));
    assert!(
        core.starts_with(&fixture.directory.path),
        "core {} is outside the test's dump directory {}",
        core.display(),
        fixture.directory.path.display()
    );
    CrashDump {
        error,
        receipt,
        core,
        sentinel,
        _fixture: fixture,
    }
}

/// Runs gdb in batch mode on the demo guest and `core` and returns its
/// standard output and standard error together.
fn run_gdb(core: &Path, commands: &[String]) -> String {
    let mut command = Command::new("gdb");
    command.args(["-batch", "-nx"]);
    for line in commands {
        command.args(["-ex", line]);
    }
    command.arg(demo_guest()).arg(core);
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("running gdb failed: {error}; install gdb"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "gdb exited with {}:\n{text}",
        output.status
    );
    text
}

/// Returns the gdb commands every crash test runs.
fn standard_commands(sentinel: u64) -> Vec<String> {
    vec![
        "bt".into(),
        "info registers rip".into(),
        "print/x $_siginfo._sifields._sigfault.si_addr".into(),
        format!("x/s {sentinel:#x}"),
    ]
}

/// Returns the value gdb prints for `info registers rip`.
fn gdb_rip(output: &str) -> u64 {
    let line = output
        .lines()
        .find(|line| line.starts_with("rip"))
        .unwrap_or_else(|| panic!("gdb printed no rip line:\n{output}"));
    let value = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("malformed rip line: {line}"));
    parse_hex(value)
}

/// Returns the value gdb prints for the `print/x ... si_addr` command.
fn gdb_fault_address(output: &str) -> u64 {
    let line = output
        .lines()
        .find(|line| line.starts_with('$') && line.contains(" = "))
        .unwrap_or_else(|| panic!("gdb printed no si_addr value:\n{output}"));
    let value = line
        .rsplit(" = ")
        .next()
        .expect("split always yields one part");
    parse_hex(value.trim())
}

fn parse_hex(text: &str) -> u64 {
    let digits = text
        .strip_prefix("0x")
        .unwrap_or_else(|| panic!("{text:?} is not a hex number"));
    u64::from_str_radix(digits, 16)
        .unwrap_or_else(|error| panic!("{text:?} is not a hex number: {error}"))
}

/// Returns every gdb output line that mentions a warning. No warning is
/// exempt, because gdb 13.1 prints none for these cores and the demo guest.
fn gdb_warnings(output: &str) -> Vec<&str> {
    output
        .lines()
        .filter(|line| line.to_lowercase().contains("warning"))
        .collect()
}

fn assert_terminated_with(output: &str, signal: &str) {
    let expected = format!("Program terminated with signal {signal}");
    assert!(
        output.contains(&expected),
        "gdb output lacks {expected:?}:\n{output}"
    );
}

fn assert_sentinel(output: &str, sentinel: u64) {
    let expected = format!("{sentinel:#x}:");
    let line = output
        .lines()
        .find(|line| line.starts_with(&expected))
        .unwrap_or_else(|| panic!("gdb printed no x/s line for {sentinel:#x}:\n{output}"));
    assert!(
        line.contains(&format!("\"{HEAP_SENTINEL}\"")),
        "x/s at the sentinel address printed {line:?}"
    );
}

fn assert_no_gdb_warnings(output: &str) {
    let warnings = gdb_warnings(output);
    assert!(
        warnings.is_empty(),
        "gdb warned about the core:\n{}\n\nfull output:\n{output}",
        warnings.join("\n")
    );
}

/// Returns the function of one `bt` line such as
/// `#3  0x00000000004040a9 in demo::null_level_2 (address=<optimized out>) at demo/src/main.rs:162`.
fn frame_function(line: &str) -> Option<&str> {
    let after_number = line
        .strip_prefix('#')?
        .trim_start_matches(|c: char| c.is_ascii_digit())
        .trim_start();
    let function_start = match after_number.strip_prefix("0x") {
        Some(address_digits) => address_digits.split_once(" in ")?.1,
        None => after_number,
    };
    function_start.split(" (").next()
}

/// Returns the `demo::` functions of gdb's `bt` output, innermost first.
/// Frames of inlined `core` functions are left out, and so is the frame line
/// gdb prints when it loads the core.
fn demo_frames(output: &str) -> Vec<String> {
    let lines: Vec<&str> = output.lines().collect();
    let backtrace_start = lines
        .iter()
        .rposition(|line| line.starts_with("#0 "))
        .unwrap_or_else(|| panic!("gdb printed no backtrace:\n{output}"));
    lines[backtrace_start..]
        .iter()
        .take_while(|line| line.starts_with('#'))
        .filter_map(|line| frame_function(line))
        .filter(|function| function.starts_with("demo::"))
        .map(str::to_owned)
        .collect()
}

fn assert_innermost_frames(output: &str, expected: &[&str]) {
    let frames = demo_frames(output);
    assert!(
        frames.len() >= expected.len(),
        "backtrace has the demo frames {frames:?}, expected at least {expected:?}:\n{output}"
    );
    for (depth, name) in expected.iter().enumerate() {
        assert_eq!(
            frames[depth], *name,
            "demo frame {depth} is {}, expected {name}; all demo frames: {frames:?}",
            frames[depth]
        );
    }
}

fn null_write_backtrace(transport: Transport) {
    let dump = crash_dump("null", "crash_null", transport);
    let SandboxError::GuestException {
        vector: 14,
        rip,
        cr2,
        ..
    } = dump.error
    else {
        panic!("expected a page fault, got {:?}", dump.error);
    };
    let output = run_gdb(&dump.core, &standard_commands(dump.sentinel));

    assert_terminated_with(&output, "SIGSEGV");
    assert_innermost_frames(
        &output,
        &[
            "demo::null_level_3",
            "demo::null_level_2",
            "demo::null_level_1",
            "demo::crash_null",
        ],
    );
    assert_eq!(
        gdb_rip(&output),
        rip,
        "gdb's rip differs from the error's RIP {rip:#x}"
    );
    assert_eq!(
        gdb_fault_address(&output),
        cr2,
        "gdb's si_addr differs from CR2 {cr2:#x}"
    );
    assert_sentinel(&output, dump.sentinel);
    assert_no_gdb_warnings(&output);
}

fn write_code_dump(transport: Transport) {
    let dump = crash_dump("write-code", "crash_write_code", transport);
    let SandboxError::GuestException {
        vector: 14,
        rip,
        cr2,
        ..
    } = dump.error
    else {
        panic!("expected a page fault, got {:?}", dump.error);
    };
    let output = run_gdb(&dump.core, &standard_commands(dump.sentinel));

    assert_terminated_with(&output, "SIGSEGV");
    assert_innermost_frames(&output, &["demo::crash_write_code"]);
    assert_eq!(
        gdb_rip(&output),
        rip,
        "gdb's rip differs from the error's RIP {rip:#x}"
    );
    assert_eq!(
        gdb_fault_address(&output),
        cr2,
        "gdb's si_addr differs from CR2 {cr2:#x}"
    );
    assert_sentinel(&output, dump.sentinel);
    assert_no_gdb_warnings(&output);
}

fn write_shim_dump(transport: Transport) {
    let dump = crash_dump("write-shim", "crash_write_shim", transport);
    let SandboxError::GuestException {
        vector: 14,
        rip,
        cr2,
        ..
    } = dump.error
    else {
        panic!("expected a page fault, got {:?}", dump.error);
    };
    let output = run_gdb(&dump.core, &standard_commands(dump.sentinel));

    assert_terminated_with(&output, "SIGSEGV");
    assert_innermost_frames(&output, &["demo::crash_write_shim"]);
    assert_eq!(
        gdb_rip(&output),
        rip,
        "gdb's rip differs from the error's RIP {rip:#x}"
    );
    assert_eq!(
        gdb_fault_address(&output),
        0x2000,
        "gdb's si_addr is not the GDT page 0x2000"
    );
    assert_eq!(cr2, 0x2000, "the error's CR2 is {cr2:#x}, expected 0x2000");
    assert_sentinel(&output, dump.sentinel);
    assert_no_gdb_warnings(&output);
}

fn divide_error_dump(transport: Transport) {
    let dump = crash_dump("divide", "crash_divide_by_zero", transport);
    let SandboxError::GuestException { vector: 0, rip, .. } = dump.error else {
        panic!("expected a divide error, got {:?}", dump.error);
    };
    let output = run_gdb(&dump.core, &standard_commands(dump.sentinel));

    assert_terminated_with(&output, "SIGFPE");
    assert_innermost_frames(&output, &["demo::crash_divide_by_zero"]);
    assert_eq!(
        gdb_rip(&output),
        rip,
        "gdb's rip differs from the error's RIP {rip:#x}"
    );
    assert_sentinel(&output, dump.sentinel);
    assert_no_gdb_warnings(&output);
}

fn invalid_opcode_dump(transport: Transport) {
    let dump = crash_dump("ud2", "crash_ud2", transport);
    let SandboxError::GuestException { vector: 6, rip, .. } = dump.error else {
        panic!("expected an invalid opcode, got {:?}", dump.error);
    };
    let output = run_gdb(&dump.core, &standard_commands(dump.sentinel));

    assert_terminated_with(&output, "SIGILL");
    assert_innermost_frames(&output, &["demo::crash_ud2"]);
    assert_eq!(
        gdb_rip(&output),
        rip,
        "gdb's rip differs from the error's RIP {rip:#x}"
    );
    assert_sentinel(&output, dump.sentinel);
    assert_no_gdb_warnings(&output);
}

fn stack_overflow_dump(transport: Transport) {
    let dump = crash_dump("stack-overflow", "crash_stack_overflow", transport);
    let SandboxError::StackOverflow { rip, address, .. } = dump.error else {
        panic!("expected a stack overflow, got {:?}", dump.error);
    };
    let output = run_gdb(&dump.core, &standard_commands(dump.sentinel));

    assert_terminated_with(&output, "SIGSEGV");
    assert_innermost_frames(&output, &["demo::recurse", "demo::recurse"]);
    assert_eq!(
        gdb_rip(&output),
        rip,
        "gdb's rip differs from the error's RIP {rip:#x}"
    );
    assert_eq!(
        gdb_fault_address(&output),
        address,
        "gdb's si_addr differs from the guard page address {address:#x}"
    );
    assert_sentinel(&output, dump.sentinel);
    assert_no_gdb_warnings(&output);
}

fn panic_dump(transport: Transport) {
    let dump = crash_dump("panic", "crash_panic", transport);
    assert!(
        matches!(dump.error, SandboxError::GuestPanic { .. }),
        "expected a guest panic, got {:?}",
        dump.error
    );
    let output = run_gdb(&dump.core, &standard_commands(dump.sentinel));

    assert_terminated_with(&output, "SIGABRT");
    let frames = demo_frames(&output);
    assert!(
        frames.iter().any(|frame| frame == "demo::crash_panic"),
        "backtrace lacks crash_panic: {frames:?}\n{output}"
    );
    assert_sentinel(&output, dump.sentinel);
    assert_no_gdb_warnings(&output);
}

fn timeout_dump_shows_spin(transport: Transport) {
    require_kvm();
    let directory = DumpDirectory::new(&format!("timeout-{}", transport_name(transport)));
    let worker = file_worker(&directory.path);
    let mut sandbox = SandboxBuilder::new()
        .guest_file(demo_guest())
        .call_time_limit(Duration::from_millis(100))
        .dump_on_timeout(true)
        .dump_worker(&worker)
        .transport(transport)
        .build()
        .expect("building the sandbox failed");
    assert_transport(&sandbox, transport);
    let sentinel: u64 = sandbox
        .call("sentinel_address", ())
        .expect("sentinel_address failed");

    let error = expect_error(sandbox.call::<()>("spin", ()), "spin with a time limit");
    assert!(
        matches!(error, SandboxError::TimedOut { .. }),
        "expected TimedOut, got {error:?}"
    );
    let dump_id = error
        .dump_id()
        .expect("TimedOut with dump_on_timeout carries no dump id");
    let receipt = worker
        .wait_for(dump_id, DUMP_TIMEOUT)
        .expect("timeout dump was not written in time");
    let core = receipt
        .file_path()
        .unwrap_or_else(|| panic!("receipt has no file path: {receipt:?}"));
    let output = run_gdb(&core, &["bt".to_string(), format!("x/s {sentinel:#x}")]);

    let frames = demo_frames(&output);
    assert_eq!(
        frames.first().map(String::as_str),
        Some("demo::spin"),
        "innermost demo frame is not spin: {frames:?}\n{output}"
    );
    assert_sentinel(&output, sentinel);
    assert_no_gdb_warnings(&output);
}

#[test]
fn core_file_mode_and_holes() {
    let dump = crash_dump("file", "crash_null", Transport::Exit);
    let metadata = std::fs::metadata(&dump.core).expect("reading the core's metadata failed");

    assert_eq!(
        metadata.permissions().mode() & 0o777,
        0o600,
        "core mode is {:o}",
        metadata.permissions().mode() & 0o777
    );
    assert_eq!(
        metadata.len(),
        dump.receipt.bytes,
        "file size differs from the receipt's {} bytes",
        dump.receipt.bytes
    );
    let allocated = metadata.blocks() * 512;
    assert!(
        allocated * 8 < metadata.len(),
        "core allocates {allocated} bytes of its {} bytes; expected a sparse file with holes for untouched guest memory",
        metadata.len()
    );
}

#[test]
fn core_notes_sizes() {
    let dump = crash_dump("notes", "crash_null", Transport::Exit);
    let output = Command::new("readelf")
        .arg("-nW")
        .arg(&dump.core)
        .output()
        .expect("running readelf failed; install binutils");
    let text = String::from_utf8_lossy(&output.stdout);
    let errors = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "readelf -n failed: {errors}");
    assert!(
        errors.trim().is_empty(),
        "readelf -n printed warnings or errors: {errors}"
    );

    for (note, size) in [
        ("NT_PRSTATUS", "0x00000150"),
        ("NT_PRPSINFO", "0x00000088"),
        ("NT_SIGINFO", "0x00000080"),
        ("NT_FPREGSET", "0x00000200"),
    ] {
        let line = text
            .lines()
            .find(|line| line.contains(note))
            .unwrap_or_else(|| panic!("readelf -n lists no {note}:\n{text}"));
        assert!(
            line.contains(size),
            "{note} does not have size {size}: {line}"
        );
    }
    assert!(
        text.contains("NT_X86_XSTATE"),
        "readelf -n lists no NT_X86_XSTATE:\n{text}"
    );
}

fn memory_sink_second_copy(transport: Transport) {
    require_kvm();
    let directory = DumpDirectory::new(&format!("memory-{}", transport_name(transport)));
    let memory_sink = MemorySink::new(MemorySinkLimits {
        max_dumps: 4,
        max_total_bytes: 64 << 20,
    });
    let stored_dumps = memory_sink.dumps();
    let worker = DumpWorker::builder()
        .sink(FileSink::new(FileSinkConfig::new(&directory.path)))
        .sink(memory_sink)
        .build()
        .expect("building the dump worker failed");
    let mut sandbox = SandboxBuilder::new()
        .guest_file(demo_guest())
        .dump_worker(&worker)
        .transport(transport)
        .build()
        .expect("building the sandbox failed");
    assert_transport(&sandbox, transport);

    let error = expect_error(sandbox.call::<()>("crash_null", ()), "crash_null");
    let SandboxError::GuestException {
        vector: 14,
        rip,
        cr2,
        ..
    } = error
    else {
        panic!("expected a page fault, got {error:?}");
    };
    let dump_id = error.dump_id().expect("crash_null returned no dump id");
    let receipt = worker
        .wait_for(dump_id, DUMP_TIMEOUT)
        .expect("dump was not written in time");

    let sink_names: Vec<&str> = receipt
        .sinks
        .iter()
        .map(|result| result.sink.as_str())
        .collect();
    assert_eq!(
        sink_names,
        ["file", "memory"],
        "receipt lists the sinks {sink_names:?}"
    );
    for result in &receipt.sinks {
        assert!(
            result.outcome.is_ok(),
            "sink {} failed: {:?}",
            result.sink,
            result.outcome
        );
    }
    assert!(
        receipt.succeeded(),
        "receipt does not count as a success: {receipt:?}"
    );

    let stored = stored_dumps.get(dump_id).unwrap_or_else(|| {
        panic!(
            "memory sink has no dump {dump_id}; it has {:?}",
            stored_dumps.dump_ids()
        )
    });
    let summary = stored
        .summary()
        .expect("reading the summary from the stored dump failed");
    assert_eq!(
        summary.signal, SIGSEGV,
        "summary signal is {}",
        summary.signal
    );
    assert_eq!(
        summary.rip, rip,
        "summary rip {:#x} differs from the error's RIP {rip:#x}",
        summary.rip
    );
    assert_eq!(
        summary.fault_address, cr2,
        "summary fault address {:#x} differs from CR2 {cr2:#x}",
        summary.fault_address
    );
    assert_eq!(
        summary.dump_id, dump_id,
        "summary names dump {}",
        summary.dump_id
    );
    assert_eq!(
        summary.sandbox_id,
        sandbox.id(),
        "summary names sandbox {}",
        summary.sandbox_id
    );
    assert_eq!(
        summary.function, "crash_null",
        "summary names the function {:?}",
        summary.function
    );
    assert_eq!(
        stored.total_size(),
        receipt.bytes,
        "stored dump is {} bytes, the receipt says {}",
        stored.total_size(),
        receipt.bytes
    );

    let core = receipt.file_path().expect("receipt has no file path");
    let file_bytes = std::fs::read(&core)
        .unwrap_or_else(|error| panic!("reading {} failed: {error}", core.display()));
    assert!(
        file_bytes == stored.to_elf_bytes(),
        "the file and memory sinks stored different bytes"
    );
}

#[test]
fn unwritable_directory_fails_receipt() {
    require_kvm();
    let directory = DumpDirectory::new("unwritable");
    let blocker = directory.path.join("regular-file");
    std::fs::write(&blocker, b"not a directory").expect("creating the blocking file failed");
    let unusable = blocker.join("dumps");
    let memory_sink = MemorySink::new(MemorySinkLimits::default());
    let stored_dumps = memory_sink.dumps();
    let worker = DumpWorker::builder()
        .sink(FileSink::new(FileSinkConfig::new(&unusable)))
        .sink(memory_sink)
        .build()
        .expect("building the dump worker failed");
    let mut sandbox = SandboxBuilder::new()
        .guest_file(demo_guest())
        .dump_worker(&worker)
        .build()
        .expect("building the sandbox failed");

    let started = Instant::now();
    let error = expect_error(sandbox.call::<()>("crash_ud2", ()), "crash_ud2");
    let elapsed = started.elapsed();
    assert!(
        matches!(error, SandboxError::GuestException { vector: 6, .. }),
        "expected #UD, got {error:?}"
    );
    // The call only queues the dump, so a failing sink must not delay it.
    assert!(
        elapsed < Duration::from_secs(1),
        "the crashing call took {elapsed:?}"
    );

    let dump_id = error.dump_id().expect("crash_ud2 returned no dump id");
    let receipt = worker
        .wait_for(dump_id, DUMP_TIMEOUT)
        .expect("the failed dump got no receipt in time");
    assert!(
        !receipt.succeeded(),
        "receipt reports success for an unusable directory: {receipt:?}"
    );
    assert_eq!(
        receipt.file_path(),
        None,
        "receipt names a file for an unusable directory"
    );

    let file_result = receipt
        .sinks
        .iter()
        .find(|result| result.sink == "file")
        .expect("receipt lacks the file sink");
    let Err(sink_error) = &file_result.outcome else {
        panic!("file sink reported success: {:?}", file_result.outcome);
    };
    assert_eq!(
        sink_error.kind,
        SinkErrorKind::Io,
        "file sink error kind is {:?}: {sink_error}",
        sink_error.kind
    );
    assert!(
        sink_error.message.contains(&*unusable.to_string_lossy()),
        "file sink error does not name the directory: {sink_error}"
    );

    let memory_result = receipt
        .sinks
        .iter()
        .find(|result| result.sink == "memory")
        .expect("receipt lacks the memory sink");
    assert!(
        memory_result.outcome.is_ok(),
        "the memory sink failed with the file sink: {:?}",
        memory_result.outcome
    );
    assert!(
        stored_dumps.get(dump_id).is_some(),
        "memory sink did not keep dump {dump_id}"
    );

    let stats = worker.stats();
    assert_eq!(
        stats.failed, 1,
        "worker counts {} failed dumps",
        stats.failed
    );
    assert_eq!(
        stats.written, 0,
        "worker counts {} written dumps",
        stats.written
    );
}

fn restore_after_dumped_crash(transport: Transport) {
    let mut fixture = dumping_sandbox("restore", transport);
    let first: u64 = fixture
        .sandbox
        .call("increment", ())
        .expect("increment failed");
    assert_eq!(first, 1, "first increment returned {first}");

    for round in 0..3 {
        let error = expect_error(fixture.sandbox.call::<()>("crash_null", ()), "crash_null");
        let dump_id = error
            .dump_id()
            .unwrap_or_else(|| panic!("round {round}: no dump id: {error:?}"));
        fixture
            .sandbox
            .restore()
            .unwrap_or_else(|error| panic!("round {round}: restore failed: {error}"));

        let count: u64 = fixture
            .sandbox
            .call("increment", ())
            .unwrap_or_else(|error| {
                panic!("round {round}: increment after restore failed: {error}")
            });
        assert_eq!(
            count, 1,
            "round {round}: increment after restore returned {count}"
        );

        let receipt = fixture
            .worker
            .wait_for(dump_id, DUMP_TIMEOUT)
            .unwrap_or_else(|| panic!("round {round}: dump {dump_id} was not written in time"));
        assert!(
            receipt.succeeded(),
            "round {round}: dump failed: {receipt:?}"
        );
    }

    let snapshot = fixture
        .sandbox
        .snapshot()
        .expect("snapshot after dumped crashes failed");
    let second: u64 = fixture
        .sandbox
        .call("increment", ())
        .expect("increment failed");
    assert_eq!(second, 2, "increment after the snapshot returned {second}");
    fixture
        .sandbox
        .restore_to(&snapshot)
        .expect("restore_to failed");
    let resumed: u64 = fixture
        .sandbox
        .call("increment", ())
        .expect("increment after restore_to failed");
    assert_eq!(resumed, 2, "increment after restore_to returned {resumed}");
}

/// Restores right after the crash, while the worker may still read the
/// crashed memory: the sandbox must run on fresh memory at once, and the
/// dump must still show the crash, not the restored state.
fn restore_while_dump_is_written(transport: Transport) {
    require_kvm();
    let memory_sink = MemorySink::new(MemorySinkLimits {
        max_dumps: 16,
        max_total_bytes: 256 << 20,
    });
    let stored_dumps = memory_sink.dumps();
    let worker = DumpWorker::builder()
        .sink(memory_sink)
        .build()
        .expect("building the dump worker failed");
    let mut sandbox = SandboxBuilder::new()
        .guest_file(demo_guest())
        .dump_worker(&worker)
        .transport(transport)
        .build()
        .expect("building the sandbox failed");
    assert_transport(&sandbox, transport);

    let mut dumps = Vec::new();
    for round in 1..=5u64 {
        let counted: u64 = sandbox.call("increment", ()).expect("increment failed");
        assert_eq!(
            counted, 1,
            "round {round}: restore should reset the counter"
        );
        let error = expect_error(sandbox.call::<()>("crash_null", ()), "crash_null");
        let SandboxError::GuestException { rip, .. } = error else {
            panic!("expected a page fault, got {error:?}");
        };
        dumps.push((error.dump_id().expect("no dump id"), rip));
        sandbox
            .restore()
            .expect("restore right after the crash failed");
    }
    for (dump_id, rip) in dumps {
        worker
            .wait_for(dump_id, DUMP_TIMEOUT)
            .expect("dump was not written in time");
        let stored = stored_dumps
            .get(dump_id)
            .expect("dump missing from the memory sink");
        let summary = stored.summary().expect("dump summary unreadable");
        assert_eq!(summary.rip, rip, "dump {dump_id} shows another RIP");
        assert_eq!(summary.signal, 11, "dump {dump_id} shows another signal");
    }
}

/// Returns the bytes of every `PT_LOAD` segment of an ELF core, in order.
fn load_segments(core: &[u8]) -> Vec<u8> {
    let u16_at = |at: usize| u16::from_le_bytes(core[at..at + 2].try_into().unwrap()) as usize;
    let u64_at = |at: usize| u64::from_le_bytes(core[at..at + 8].try_into().unwrap()) as usize;
    let table = u64_at(32);
    let mut bytes = Vec::new();
    for index in 0..u16_at(56) {
        let header = table + index * 56;
        if u32::from_le_bytes(core[header..header + 4].try_into().unwrap()) == 1 {
            let offset = u64_at(header + 8);
            bytes.extend_from_slice(&core[offset..offset + u64_at(header + 32)]);
        }
    }
    bytes
}

/// Compares guest memory, through on-demand dumps, of a fresh sandbox and
/// of the same sandbox after calls, a crash and a restore: every byte the
/// guest or the host wrote must be back to the base image.
fn restore_leaves_no_write_behind(transport: Transport) {
    require_kvm();
    let memory_sink = MemorySink::new(MemorySinkLimits {
        max_dumps: 4,
        max_total_bytes: 256 << 20,
    });
    let stored_dumps = memory_sink.dumps();
    let worker = DumpWorker::builder()
        .sink(memory_sink)
        .build()
        .expect("building the dump worker failed");
    let mut sandbox = SandboxBuilder::new()
        .guest_file(demo_guest())
        .host_function("host_add", |a: i64, b: i64| a.wrapping_add(b))
        .dump_worker(&worker)
        .transport(transport)
        .build()
        .expect("building the sandbox failed");
    assert_transport(&sandbox, transport);

    let fresh_id = sandbox.dump().expect("dump of the fresh sandbox failed");
    let payload = vec![0x5au8; 64 << 10];
    let echoed: Vec<u8> = sandbox
        .call("echo_bytes", (payload.clone(),))
        .expect("echo_bytes failed");
    assert_eq!(echoed, payload);
    let _: u64 = sandbox.call("increment", ()).expect("increment failed");
    let _: i64 = sandbox
        .call("call_host_add", (1i64, 2i64))
        .expect("call_host_add failed");
    let _ = expect_error(
        sandbox.call::<()>("crash_stack_overflow", ()),
        "crash_stack_overflow",
    );
    sandbox.restore().expect("restore failed");
    let restored_id = sandbox.dump().expect("dump of the restored sandbox failed");

    for id in [fresh_id, restored_id] {
        worker
            .wait_for(id, DUMP_TIMEOUT)
            .expect("dump was not written in time");
    }
    let fresh = load_segments(
        &stored_dumps
            .get(fresh_id)
            .expect("fresh dump missing")
            .to_elf_bytes(),
    );
    let restored = load_segments(
        &stored_dumps
            .get(restored_id)
            .expect("restored dump missing")
            .to_elf_bytes(),
    );
    assert_eq!(
        fresh.len(),
        restored.len(),
        "the dumps cover different memory"
    );
    let first_difference = fresh.iter().zip(&restored).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "guest memory differs after restore");
}

/// A triple fault (the IDT zeroed by a test hook, because CPL3 code cannot
/// reach it) is dumped like any crash, with the registers KVM reports.
fn triple_fault_dump(transport: Transport) {
    let mut fixture = dumping_sandbox("triple-fault", transport);
    let sentinel: u64 = fixture
        .sandbox
        .call("sentinel_address", ())
        .expect("sentinel_address failed");
    fixture.sandbox.corrupt_idt_for_tests();
    let error = expect_error(fixture.sandbox.call::<()>("crash_null", ()), "crash_null");
    let SandboxError::TripleFault { rip, .. } = error else {
        panic!("expected a triple fault, got {error:?}");
    };
    let dump_id = error.dump_id().expect("the triple fault queued no dump");
    let receipt = fixture
        .worker
        .wait_for(dump_id, DUMP_TIMEOUT)
        .expect("dump was not written in time");
    assert!(receipt.succeeded(), "dump failed: {receipt:?}");
    let core = receipt.file_path().expect("receipt has no file path");
    let output = run_gdb(&core, &standard_commands(sentinel));

    assert_terminated_with(&output, "SIGSEGV");
    assert_eq!(
        gdb_rip(&output),
        rip,
        "gdb's rip differs from the error's RIP {rip:#x}"
    );
    assert_sentinel(&output, sentinel);
    assert_no_gdb_warnings(&output);
}

transport_tests!(
    null_write_backtrace,
    write_code_dump,
    write_shim_dump,
    divide_error_dump,
    invalid_opcode_dump,
    stack_overflow_dump,
    panic_dump,
    timeout_dump_shows_spin,
    memory_sink_second_copy,
    restore_after_dumped_crash,
    restore_while_dump_is_written,
    restore_leaves_no_write_behind,
    triple_fault_dump,
);
