//! The contract between a Sandcore host and its guests.
//!
//! Host and guest are built separately (the guest as a static `no_std` ELF),
//! so everything they must agree on lives here and nowhere else: where the
//! boot information sits, the I/O ports that end a VM exit, the layout of the
//! request and reply slots in shared memory, and the binary encoding of calls
//! and results. The crate uses only `core`, so both sides can depend on it.
#![no_std]
#![deny(missing_docs)]

pub mod encoding;
pub mod layout;
pub mod ports;
pub mod slot;

pub use encoding::{
    DecodeError, EncodeError, Reader, Reply, ReplyStatus, Value, ValueType, Writer,
};
