//! Runtime for Sandcore guests.
//!
//! A guest is a static `no_std` ELF that runs at CPL3 with no kernel under it.
//! This crate gives it what a kernel and libc would: the entry point, a heap,
//! a panic handler that reports to the host, calls to host functions, debug
//! printing, and the dispatch loop that runs the guest's registered
//! functions. It contains no privileged instruction; its only way to reach
//! the host is an `out` to one of the ports in `sandcore_abi::ports`.
//!
//! A guest registers its functions in a setup function named by
//! [`guest_main!`]:
//!
//! ```ignore
//! fn echo(message: &str) -> String { message.into() }
//!
//! fn setup(registry: &mut sandcore_guest::Registry) {
//!     sandcore_guest::register!(registry, echo(&str) -> String);
//! }
//! sandcore_guest::guest_main!(setup);
//! ```
#![no_std]
#![deny(missing_docs)]

extern crate alloc;

mod entry;
mod heap;
pub mod host;
mod memfuncs;
mod panic;
mod port;
pub mod registry;
mod shared;

pub use host::{call_host, print, HostCallError, HostValue};
pub use registry::{Arg, CallError, Registry, ReturnValue};
pub use sandcore_abi::Value;

#[doc(hidden)]
pub use entry::run as __run;

/// Defines the guest's entry point and names its setup function, which
/// registers the guest functions. The setup function runs once, during the
/// guest's initialisation; the host snapshots memory after it.
#[macro_export]
macro_rules! guest_main {
    ($setup:path) => {
        #[no_mangle]
        extern "C" fn _start(boot_info: u64) -> ! {
            $crate::__run(boot_info, $setup)
        }
    };
}
