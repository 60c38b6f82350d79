//! Helpers shared by the integration tests: KVM check, sandbox builders for
//! the demo guest on either transport, the macro that runs a test on both
//! transports, and symbol lookup in the demo guest's ELF.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::fmt::Debug;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use sandcore::{Sandbox, SandboxBuilder, SandboxError, Transport};

/// How long a polling guest spins for the next call before it parks. Calls
/// made back to back stay on the hot path, and a test that sleeps longer
/// than this also wakes a parked guest. Short, so that idle vCPU threads of
/// tests running in parallel stop burning CPU soon.
pub const POLLING_IDLE_SPIN: Duration = Duration::from_millis(50);

/// Returns the polling transport that the transport-parameterised tests use.
pub fn polling_transport() -> Transport {
    Transport::Polling {
        idle_spin: POLLING_IDLE_SPIN,
    }
}

/// Returns every transport, for tests that loop over them.
pub fn transports() -> [Transport; 2] {
    [Transport::Exit, polling_transport()]
}

/// Returns `exit` or `polling`, for file names and messages.
pub fn transport_name(transport: Transport) -> &'static str {
    match transport {
        Transport::Exit => "exit",
        Transport::Polling { .. } => "polling",
    }
}

/// Defines each listed function `name(transport: Transport)` as two tests,
/// `exit::name` and `polling::name`, so that a failure names its transport.
///
/// ```ignore
/// fn adds(transport: Transport) { /* ... */ }
/// transport_tests!(adds);
/// ```
#[macro_export]
macro_rules! transport_tests {
    ($($test:ident),+ $(,)?) => {
        /// The tests on `Transport::Exit`: each call is one VM exit.
        mod exit {
            $(
                #[test]
                fn $test() {
                    super::$test(sandcore::Transport::Exit);
                }
            )+
        }

        /// The tests on `Transport::Polling` with `common::POLLING_IDLE_SPIN`.
        mod polling {
            $(
                #[test]
                fn $test() {
                    super::$test($crate::common::polling_transport());
                }
            )+
        }
    };
}

/// Panics unless `sandbox` runs on `transport`: a polling sandbox has a vCPU
/// thread, an exit sandbox runs the vCPU on the calling thread.
pub fn assert_transport(sandbox: &Sandbox, transport: Transport) {
    let has_thread = sandbox.vcpu_thread_id().is_some();
    let expects_thread = matches!(transport, Transport::Polling { .. });
    assert_eq!(
        has_thread,
        expects_thread,
        "sandbox {} should run on the {} transport, but vcpu_thread_id() is {:?}",
        sandbox.id(),
        transport_name(transport),
        sandbox.vcpu_thread_id()
    );
}

/// Panics unless `/dev/kvm` opens read-write, so that a machine without KVM
/// fails these tests instead of passing them.
pub fn require_kvm() {
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    if let Err(error) = opened {
        panic!("these tests need /dev/kvm (read-write): opening it failed with {error}");
    }
}

/// Returns the path of a private copy of the demo guest that this test
/// binary embedded at compile time.
///
/// Tests load the guest from this copy and give it to `nm` and gdb, because
/// a concurrent `cargo build` may rewrite the file at
/// `sandcore::demo_guest_path()` between a crash and the check that reads it.
/// The copy is named by a hash of its bytes, so each guest version is written once.
pub fn demo_guest() -> &'static Path {
    static COPY: OnceLock<PathBuf> = OnceLock::new();
    COPY.get_or_init(|| {
        let bytes = sandcore::demo_guest_bytes();
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for &byte in bytes {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        let directory = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let path = directory.join(format!("demo-guest-{hash:016x}.elf"));
        if std::fs::read(&path).is_ok_and(|existing| existing == bytes) {
            return path;
        }
        // Write under a unique name, then rename, so that test binaries
        // running at the same time never see a half-written file.
        let partial = directory.join(format!(
            "demo-guest-{hash:016x}.{}.partial",
            std::process::id()
        ));
        std::fs::write(&partial, bytes)
            .unwrap_or_else(|error| panic!("writing {} failed: {error}", partial.display()));
        std::fs::rename(&partial, &path).unwrap_or_else(|error| {
            panic!(
                "renaming {} to {} failed: {error}",
                partial.display(),
                path.display()
            )
        });
        path
    })
}

/// Starts a builder for the demo guest on `transport` with `host_add`
/// registered and crash dumps off, so that the test works with and without
/// the `crashdump` feature.
pub fn demo_builder(transport: Transport) -> SandboxBuilder {
    require_kvm();
    SandboxBuilder::new()
        .guest_file(demo_guest())
        .host_function("host_add", |a: i64, b: i64| a.wrapping_add(b))
        .guest_core_dump(false)
        .transport(transport)
}

/// Builds a demo guest sandbox with [`demo_builder`]'s settings and checks
/// that it runs on `transport`.
pub fn demo_sandbox(transport: Transport) -> Sandbox {
    let sandbox = demo_builder(transport).build().unwrap_or_else(|error| {
        panic!(
            "building the demo guest sandbox on the {} transport failed: {error}",
            transport_name(transport)
        )
    });
    assert_transport(&sandbox, transport);
    sandbox
}

/// Returns the error of `result`, panicking with `what` and the value if it is `Ok`.
pub fn expect_error<T: Debug>(result: Result<T, SandboxError>, what: &str) -> SandboxError {
    match result {
        Ok(value) => panic!("{what}: expected an error, got Ok({value:?})"),
        Err(error) => error,
    }
}

/// Returns the address range of the function `name` (demangled, for example
/// `demo::null_level_3`) in the demo guest, read with `nm -C -S`.
pub fn symbol_range(name: &str) -> Range<u64> {
    let path = demo_guest().display().to_string();
    let output = Command::new("nm")
        .args(["-C", "-S", &path])
        .output()
        .unwrap_or_else(|error| panic!("running nm on {path} failed: {error}; install binutils"));
    assert!(
        output.status.success(),
        "nm -C -S {path} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let listing = String::from_utf8_lossy(&output.stdout);
    for line in listing.lines() {
        // Each line is "<address> <size> <type> <name>". Symbols without a size have three fields.
        let fields: Vec<&str> = line.splitn(4, ' ').collect();
        if fields.len() != 4 || fields[3] != name {
            continue;
        }
        let start = u64::from_str_radix(fields[0], 16).expect("nm printed a non-hex address");
        let size = u64::from_str_radix(fields[1], 16).expect("nm printed a non-hex size");
        assert!(size > 0, "symbol {name} in {path} has size 0");
        return start..start + size;
    }
    panic!("symbol {name} not found in `nm -C -S {path}`");
}
