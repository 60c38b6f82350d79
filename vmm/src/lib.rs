//! Sandcore runs functions of a static `no_std` guest ELF inside KVM micro
//! VMs with no guest kernel, at the cost of one VM exit per call, and turns
//! guest crashes into ELF core dumps that gdb opens.
//!
//! ```no_run
//! use sandcore::SandboxBuilder;
//!
//! # fn main() -> Result<(), sandcore::SandboxError> {
//! let mut sandbox = SandboxBuilder::new()
//!     .guest_file(sandcore::demo_guest_path())
//!     .host_function("host_add", |a: i64, b: i64| a + b)
//!     .build()?;
//! let greeting: String = sandbox.call("echo", ("hello",))?;
//! assert_eq!(greeting, "hello");
//! # Ok(()) }
//! ```
//!
//! Modules follow the data. [`guest_image`] validates the binary,
//! [`memory`] lays out and maps guest memory, and [`vcpu`] owns KVM and the
//! ring-0 shim. [`base_image`] runs the guest's initialisation once, [`call`]
//! is the call path, [`crash`] decodes failures, and `dump` (feature
//! `crashdump`) turns them into core files.
#![deny(missing_docs)]

pub mod base_image;
pub mod call;
pub mod config;
pub mod crash;
#[cfg(feature = "crashdump")]
pub mod dump;
pub mod error;
pub mod guest_image;
pub mod interrupt;
pub mod memory;
mod sandbox;
pub mod vcpu;

pub use base_image::BaseImage;
pub use call::values::{Arguments, FromValue, IntoValue, ToArgument, Value};
pub use config::{SandboxConfiguration, Transport};
pub use error::{DumpId, SandboxError};
pub use guest_image::GuestBinaryError;
pub use interrupt::InterruptHandle;
pub use sandbox::{CallReport, PrintHandler, Sandbox, SandboxBuilder, Snapshot};

/// Path of the demo guest built with this crate (by its build script).
pub fn demo_guest_path() -> &'static str {
    env!("SANDCORE_DEMO_GUEST")
}

/// Path of the hostile test guest, which breaks the call protocol on purpose.
/// For Sandcore's own tests; not part of the stable API.
#[doc(hidden)]
pub fn hostile_guest_path() -> &'static str {
    env!("SANDCORE_HOSTILE_GUEST")
}

/// Returns the demo guest binary, embedded at build time.
pub fn demo_guest_bytes() -> &'static [u8] {
    include_bytes!(env!("SANDCORE_DEMO_GUEST"))
}

/// The README's embedding example, compiled and run as a doc test so the
/// README cannot drift from the API.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
