//! Crash snapshots and where they go.
//!
//! The `no_std` core holds the data model of a crash ([`snapshot`]), the
//! [`DumpSink`](sink::DumpSink) trait that receives one dump as metadata plus
//! a forward-only stream of chunks and holes, and the streaming ELF core
//! writer. It is split from the VMM so that the same writer and protocol run
//! in the VMM's dump worker, in the collector and in fuzz targets, and so that
//! a host can plug in its own sink without depending on KVM.
//!
//! The `alloc` and `std` features add the sinks that need them: in-memory,
//! file and socket sinks and the collector server.
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(missing_docs)]
// SinkError is a fixed-capacity value of about 280 bytes so that sinks work
// without an allocator, so it cannot be boxed to shrink the Err variant.
#![allow(clippy::result_large_err)]

#[cfg(feature = "alloc")]
extern crate alloc;

#[cfg(feature = "std")]
pub mod collector;
pub mod core_reader;
pub mod elf_core;
pub mod fanout;
#[cfg(feature = "std")]
pub mod file_sink;
#[cfg(feature = "alloc")]
pub mod memory_sink;
pub mod protocol;
#[cfg(feature = "std")]
pub mod shared_sink;
pub mod sink;
pub mod snapshot;
#[cfg(feature = "std")]
pub mod socket_sink;
#[cfg(feature = "std")]
pub mod spool;
