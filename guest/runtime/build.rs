//! Puts the guest linker script on the linker's search path, so every binary
//! that depends on this crate links with `-Tsandcore-guest.ld`.
use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    fs::copy("sandcore-guest.ld", out.join("sandcore-guest.ld"))
        .expect("copy sandcore-guest.ld to OUT_DIR");
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rerun-if-changed=sandcore-guest.ld");
}
