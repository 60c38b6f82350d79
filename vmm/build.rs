//! Builds the guest workspace (`../guest`) with its own no_std flags, so that
//! `cargo build`, `cargo test` and `cargo run` at the root need no extra step.
//!
//! The nested cargo must not see this build's environment: cargo passes
//! `CARGO_*`, `RUSTFLAGS` and friends to build scripts, and a nested cargo
//! would apply them to the guest. It also reads `.cargo/config.toml` from its
//! working directory, which is why it runs inside `guest/`.
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let guest_dir = manifest_dir
        .join("../guest")
        .canonicalize()
        .expect("guest/ next to vmm/");
    let target_dir = match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir).join("guest"),
        None => manifest_dir.join("../target/guest"),
    };

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&guest_dir)
        .args(["build", "--release", "--locked", "--target-dir"])
        .arg(&target_dir)
        .env_clear();
    for key in [
        "PATH",
        "HOME",
        "CARGO_HOME",
        "RUSTUP_HOME",
        "RUSTUP_TOOLCHAIN",
        "TMPDIR",
    ] {
        if let Some(value) = env::var_os(key) {
            command.env(key, value);
        }
    }
    let status = command
        .status()
        .expect("failed to start cargo for the guest workspace");
    assert!(
        status.success(),
        "building the guest workspace in {} failed",
        guest_dir.display()
    );

    for (guest, variable) in [
        ("demo", "SANDCORE_DEMO_GUEST"),
        ("hostile", "SANDCORE_HOSTILE_GUEST"),
    ] {
        let path = target_dir
            .join("x86_64-unknown-linux-gnu/release")
            .join(guest);
        assert!(path.is_file(), "guest build produced no {}", path.display());
        println!("cargo:rustc-env={variable}={}", path.display());
    }

    rerun_if_changed(&guest_dir);
}

/// Registers every source file of the guest workspace, skipping its target.
fn rerun_if_changed(dir: &Path) {
    for entry in std::fs::read_dir(dir).expect("read guest/").flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" {
            continue;
        }
        if path.is_dir() {
            rerun_if_changed(&path);
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}
