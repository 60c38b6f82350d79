//! Helpers shared by the integration tests: KVM check, sandbox builders for
//! the demo guest, and symbol lookup in the demo guest's ELF.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::fmt::Debug;
use std::ops::Range;
use std::process::Command;

use sandcore::{Sandbox, SandboxBuilder, SandboxError};

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

/// Starts a builder for the demo guest with `host_add` registered and crash
/// dumps off, so that the test works with and without the `crashdump` feature.
pub fn demo_builder() -> SandboxBuilder {
    require_kvm();
    SandboxBuilder::new()
        .guest_file(sandcore::demo_guest_path())
        .host_function("host_add", |a: i64, b: i64| a.wrapping_add(b))
        .guest_core_dump(false)
}

/// Builds a demo guest sandbox with [`demo_builder`]'s settings.
pub fn demo_sandbox() -> Sandbox {
    demo_builder()
        .build()
        .expect("building the demo guest sandbox failed")
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
    let path = sandcore::demo_guest_path();
    let output = Command::new("nm")
        .args(["-C", "-S", path])
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
