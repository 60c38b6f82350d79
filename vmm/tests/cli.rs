//! Runs the built `sandcore` binary. Tests that start a guest need read-write
//! access to /dev/kvm and fail, not skip, without it. Most tests check
//! crash dumps, so the file needs the `crashdump` feature.
#![cfg(feature = "crashdump")]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const BINARY: &str = env!("CARGO_BIN_EXE_sandcore");

/// Fails the calling test with a clear message when KVM is unusable.
fn require_kvm() {
    if let Err(error) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs read-write access to /dev/kvm, which failed to open: {error}");
    }
}

/// A directory under the system temp directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let unique = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "sandcore-cli-{}-{unique}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).expect("create temp dir");
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Returns a `sandcore` command whose dumps go to `dump_dir`.
fn sandcore(dump_dir: &Path) -> Command {
    let mut command = Command::new(BINARY);
    command
        .env("SANDCORE_CORE_DUMP_DIR", dump_dir)
        .env_remove("RUST_LOG");
    command
}

fn run(command: &mut Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = command.output().expect("start sandcore");
    let stdout = String::from_utf8_lossy(&stdout).into_owned();
    let stderr = String::from_utf8_lossy(&stderr).into_owned();
    let code = status
        .code()
        .unwrap_or_else(|| panic!("sandcore ended by a signal: {status}\nstderr:\n{stderr}"));
    (code, stdout, stderr)
}

fn core_files(directory: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(directory)
        .expect("read dump dir")
        .map(|entry| {
            entry
                .expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".core"))
        .collect();
    names.sort();
    names
}

#[test]
fn demo_calls_crashes_and_restores() {
    require_kvm();
    let dumps = TempDir::new("demo");
    let (code, stdout, stderr) = run(sandcore(dumps.path()).args(["demo", "--repetitions", "20"]));

    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains(r#"echo("hello from the host")  "hello from the host""#),
        "{stdout}"
    );
    assert!(
        stdout.contains("call_host_add(40, 2)") && stdout.contains(" 42 "),
        "{stdout}"
    );
    assert!(
        stdout.contains("sum_to(100000)") && stdout.contains("5000050000"),
        "{stdout}"
    );
    assert!(stdout.contains("guest: hello from the guest"), "{stdout}");
    assert!(
        stdout.contains("error: guest raised page fault"),
        "{stdout}"
    );
    assert!(stdout.contains("open it in gdb: gdb "), "{stdout}");
    assert!(
        stdout.contains("next call before restore: sandbox is poisoned"),
        "{stdout}"
    );
    assert!(
        stdout.contains(r#"after restore: echo("alive after restore") = "alive after restore""#),
        "{stdout}"
    );
    assert_eq!(core_files(dumps.path()).len(), 1, "{stdout}");
}

#[test]
fn run_add_prints_sum() {
    require_kvm();
    let dumps = TempDir::new("add");
    let (code, stdout, stderr) = run(sandcore(dumps.path()).args(["run", "add", "i32:2", "i32:3"]));

    assert_eq!(code, 0, "stderr:\n{stderr}");
    assert_eq!(stdout, "5\n");
}

#[test]
fn run_prints_each_value_type() {
    require_kvm();
    let dumps = TempDir::new("types");
    let cases: [(&[&str], &str); 9] = [
        (&["echo", "hello"], "\"hello\"\n"),
        (&["echo", "str:a:b"], "\"a:b\"\n"),
        (&["echo_i64", "i64:-1"], "-1\n"),
        (
            &["echo_u64", "u64:18446744073709551615"],
            "18446744073709551615\n",
        ),
        (&["echo_u32", "u32:7"], "7\n"),
        (&["echo_f32", "f32:1.5"], "1.5\n"),
        (&["scale", "f64:2.5", "f64:-2"], "-5\n"),
        (&["echo_bytes", "bytes:00ff10"], "<3 bytes>\n"),
        (&["noop"], "()\n"),
    ];
    for (arguments, expected) in cases {
        let (code, stdout, stderr) = run(sandcore(dumps.path()).arg("run").args(arguments));
        assert_eq!(code, 0, "arguments {arguments:?}, stderr:\n{stderr}");
        assert_eq!(stdout, expected, "arguments {arguments:?}");
    }
}

#[test]
fn run_crash_null_fails_with_dump() {
    require_kvm();
    let dumps = TempDir::new("crash");
    let (code, stdout, stderr) = run(sandcore(dumps.path()).args(["run", "crash_null"]));

    assert_eq!(code, 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.contains("page fault"), "{stderr}");
    assert!(stderr.contains("crash dump: "), "{stderr}");
    assert_eq!(core_files(dumps.path()).len(), 1);
}

#[test]
fn run_unknown_function_fails() {
    require_kvm();
    let dumps = TempDir::new("unknown");
    let (code, _, stderr) = run(sandcore(dumps.path()).args(["run", "no_such_function"]));

    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("guest has no function named \"no_such_function\""),
        "{stderr}"
    );
}

#[test]
fn run_time_limit_stops_spin() {
    require_kvm();
    let dumps = TempDir::new("spin");
    let started = Instant::now();
    let (code, _, stderr) =
        run(sandcore(dumps.path()).args(["run", "spin", "--time-limit", "100"]));

    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("timed out after 100ms"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn run_bad_argument_exits_2() {
    let dumps = TempDir::new("bad-argument");
    let cases = [
        ("i32:x", "invalid argument 'i32:x': expected a 32-bit integer after 'i32:'"),
        ("bool:maybe", "invalid argument 'bool:maybe': expected true or false after 'bool:'"),
        ("bytes:0", "invalid argument 'bytes:0': expected hexadecimal bytes (odd number of digits: 1) after 'bytes:'"),
    ];
    for (argument, message) in cases {
        let (code, stdout, stderr) =
            run(sandcore(dumps.path()).args(["run", "add", argument, "i32:3"]));
        assert_eq!(code, 2, "argument {argument}, stderr:\n{stderr}");
        assert!(
            stderr.contains(message),
            "argument {argument}, stderr:\n{stderr}"
        );
        assert!(stdout.is_empty(), "argument {argument}, stdout:\n{stdout}");
    }
}

#[test]
fn run_bad_options_exit_2() {
    let dumps = TempDir::new("bad-options");
    let (code, _, stderr) = run(sandcore(dumps.path()).args(["run", "add", "--heap-size", "1000"]));
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("heap_size = 1000 is not a multiple of the 4096-byte page size"),
        "{stderr}"
    );

    let (code, _, stderr) = run(sandcore(dumps.path()).args(["run", "add", "--time-limit", "0"]));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--time-limit"), "{stderr}");

    let (code, _, stderr) = run(sandcore(dumps.path()).args(["run"]));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("<FUNCTION>"), "{stderr}");
}

#[test]
fn run_missing_guest_file_fails() {
    require_kvm();
    let dumps = TempDir::new("missing-guest");
    let missing = dumps.path().join("no-such-guest.elf");
    let (code, _, stderr) = run(sandcore(dumps.path())
        .arg("run")
        .arg("--guest")
        .arg(&missing)
        .arg("noop"));

    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("no-such-guest.elf"), "{stderr}");
}

#[test]
fn dumps_list_info_gdb_of_crash() {
    require_kvm();
    let dumps = TempDir::new("list");
    let (code, _, stderr) = run(sandcore(dumps.path()).args(["run", "crash_null"]));
    assert_eq!(code, 1, "{stderr}");
    let cores = core_files(dumps.path());
    assert_eq!(cores.len(), 1);
    let core = &cores[0];

    let (code, stdout, stderr) = run(Command::new(BINARY)
        .args(["dumps", "list", "--dir"])
        .arg(dumps.path()));
    assert_eq!(code, 0, "{stderr}");
    let row = stdout
        .lines()
        .find(|line| line.starts_with(core.as_str()))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(row.contains(" exception "), "{row}");
    assert!(row.contains(" demo "), "{row}");
    assert!(row.contains(" UTC "), "{row}");
    assert!(stdout.contains("1 dump in "), "{stdout}");

    let (code, stdout, stderr) = run(Command::new(BINARY)
        .args(["dumps", "info", core, "--dir"])
        .arg(dumps.path()));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("kind:           exception: page fault (#PF) (vector 14"),
        "{stdout}"
    );
    assert!(stdout.contains("signal:         11 (SIGSEGV)"), "{stdout}");
    assert!(stdout.contains("function:       crash_null"), "{stdout}");
    assert!(stdout.contains("guest:          demo"), "{stdout}");

    // The dump id printed by `info` selects the same dump.
    let dump_id = stdout
        .lines()
        .find_map(|line| line.strip_prefix("dump id:"))
        .map(|id| id.trim().to_owned())
        .unwrap_or_else(|| panic!("{stdout}"));
    let (code, by_id, stderr) = run(Command::new(BINARY)
        .args(["dumps", "info", &dump_id, "--dir"])
        .arg(dumps.path()));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(by_id, stdout, "info by dump id shows another dump");

    // A path selects the dump without --dir.
    let (code, stdout, stderr) = run(Command::new(BINARY)
        .args(["dumps", "info"])
        .arg(dumps.path().join(core)));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("RIP:"), "{stdout}");

    let (code, stdout, stderr) = run(Command::new(BINARY)
        .args(["dumps", "gdb", "--print-command", core, "--dir"])
        .arg(dumps.path()));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("gdb "), "{stdout}");
    assert!(
        stdout
            .trim_end()
            .ends_with(&dumps.path().join(core).display().to_string()),
        "{stdout}"
    );

    let (code, _, stderr) = run(Command::new(BINARY)
        .args(["dumps", "info", "missing.core", "--dir"])
        .arg(dumps.path()));
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("no dump named \"missing.core\""),
        "{stderr}"
    );
}

#[test]
fn dumps_gdb_finds_guest_file() {
    require_kvm();
    let dumps = TempDir::new("guest-file");
    let guest = dumps.path().join("other-guest");
    std::fs::copy(sandcore::demo_guest_path(), &guest).expect("copy the demo guest");
    let (code, _, stderr) = run(sandcore(dumps.path())
        .arg("run")
        .arg("--guest")
        .arg(&guest)
        .arg("crash_ud2"));
    assert_eq!(code, 1, "{stderr}");
    let core = core_files(dumps.path()).pop().expect("one dump");

    let (code, stdout, stderr) = run(Command::new(BINARY)
        .args(["dumps", "gdb", "--print-command", &core, "--dir"])
        .arg(dumps.path()));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with(&format!("gdb {} ", guest.display())),
        "{stdout}"
    );

    std::fs::remove_file(&guest).expect("remove the guest copy");
    let (code, stdout, stderr) = run(Command::new(BINARY)
        .args(["dumps", "gdb", "--print-command", &core, "--dir"])
        .arg(dumps.path()));
    assert_eq!(code, 2, "{stdout}");
    assert!(stderr.contains("is unknown; pass --guest FILE"), "{stderr}");
}

#[test]
fn dumps_list_of_empty_and_missing_dirs() {
    let empty = TempDir::new("empty");
    let (code, stdout, stderr) = run(Command::new(BINARY)
        .args(["dumps", "list", "--dir"])
        .arg(empty.path()));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("no dumps in "), "{stdout}");

    let missing = empty.path().join("missing");
    let (code, _, stderr) = run(Command::new(BINARY)
        .args(["dumps", "list", "--dir"])
        .arg(&missing));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("missing"), "{stderr}");
}

#[test]
fn help_of_every_subcommand() {
    let commands: [&[&str]; 8] = [
        &[],
        &["demo"],
        &["run"],
        &["collect"],
        &["dumps"],
        &["dumps", "list"],
        &["dumps", "info"],
        &["dumps", "gdb"],
    ];
    for command in commands {
        let (code, stdout, stderr) = run(Command::new(BINARY).args(command).arg("--help"));
        assert_eq!(code, 0, "command {command:?}, stderr:\n{stderr}");
        assert!(
            stdout.contains("Usage: sandcore"),
            "command {command:?}:\n{stdout}"
        );
    }

    let (_, stdout, _) = run(Command::new(BINARY).args(["collect", "--help"]));
    assert!(stdout.contains("--max-dump-size <BYTES>"), "{stdout}");
    assert!(stdout.contains("[default: 4294967296]"), "{stdout}");
    assert!(stdout.contains("--max-age <SECONDS>"), "{stdout}");

    let (code, stdout, _) = run(Command::new(BINARY).arg("--version"));
    assert_eq!(code, 0);
    assert!(stdout.starts_with("sandcore "), "{stdout}");
}

/// Waits up to 10 s for `path` to exist.
fn wait_for_path(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if let Some(status) = child.try_wait().expect("poll the collector") {
            panic!("collector exited early with {status}");
        }
        assert!(
            Instant::now() < deadline,
            "collector did not create {} within 10 s",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn collect_stops_on_sigterm() {
    let work = TempDir::new("collect");
    let socket = work.path().join("collector.sock");
    let token = work.path().join("token");
    std::fs::write(&token, "secret-token\n").expect("write token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("chmod token");

    let mut child = Command::new(BINARY)
        .args(["collect", "--listen"])
        .arg(format!("unix:{}", socket.display()))
        .arg("--dir")
        .arg(work.path().join("store"))
        .arg("--token-file")
        .arg(&token)
        .args(["--max-age", "3600"])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the collector");
    wait_for_path(&socket, &mut child);

    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill() only sends a signal, to the child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let output = child.wait_with_output().expect("wait for the collector");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);

    assert_eq!(output.status.code(), Some(0), "stderr:\n{stderr}");
    assert!(
        stdout.contains("collector stopped: 0 connections, 0 dumps stored"),
        "{stdout}"
    );
    assert!(
        stderr.contains("token file is accessible to group or other users"),
        "{stderr}"
    );
    assert!(!stderr.contains("secret-token"), "{stderr}");
    assert!(!socket.exists(), "the collector left its socket behind");
}

#[test]
fn collect_rejects_bad_input() {
    let work = TempDir::new("collect-bad");
    let (code, _, stderr) = run(Command::new(BINARY)
        .args(["collect", "--listen", "udp:1.2.3.4:5", "--dir"])
        .arg(work.path()));
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("expected unix:PATH or tcp:HOST:PORT"),
        "{stderr}"
    );

    let empty_token = work.path().join("empty-token");
    std::fs::write(&empty_token, "\n").expect("write token");
    let (code, _, stderr) = run(Command::new(BINARY)
        .args(["collect", "--listen", "tcp:127.0.0.1:0", "--dir"])
        .arg(work.path())
        .arg("--token-file")
        .arg(&empty_token));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("is empty"), "{stderr}");

    let long_token = work.path().join("long-token");
    std::fs::write(&long_token, "x".repeat(65)).expect("write token");
    let (code, _, stderr) = run(Command::new(BINARY)
        .args(["collect", "--listen", "tcp:127.0.0.1:0", "--dir"])
        .arg(work.path())
        .arg("--token-file")
        .arg(&long_token));
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("65 bytes long; the maximum is 64 bytes"),
        "{stderr}"
    );
}
