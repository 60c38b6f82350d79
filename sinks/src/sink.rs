//! The contract between the dump worker and the places dumps go.
//!
//! A sink receives one dump at a time, in this order:
//!
//! 1. [`DumpSink::begin`] with the dump's [`DumpMetadata`], including the
//!    total logical size of the core in bytes;
//! 2. any number of [`DumpSink::data`] and [`DumpSink::hole`] calls that
//!    together cover exactly `total_size` bytes, in file order, forward only;
//! 3. [`DumpSink::finish`] if every byte was produced, or [`DumpSink::abort`]
//!    if the producer failed part way.
//!
//! Chunk sizes are not fixed: a `data` call may carry anything from one byte
//! to several megabytes, and a sink must not assume page alignment. A hole is
//! a run of zero bytes the sink may store sparsely; its length is a multiple
//! of 4096 in the ELF writer's output, but sinks must accept any length.
//!
//! An error from `begin`, `data` or `hole` ends the dump for that sink: the
//! producer stops sending to it and calls `abort`. The worker reports the
//! error on the dump's receipt, counts it and logs it; it never retries a
//! sink by itself (the socket sink retries internally through its spool).

use crate::snapshot::CrashKind;

/// Metadata sent ahead of a dump's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpMetadata {
    /// Dump id, unique within the producing process.
    pub dump_id: u64,
    /// Sandbox id, unique within the producing process.
    pub sandbox_id: u64,
    /// Guest binary file name.
    pub guest_name: heapless::String<{ crate::snapshot::MAX_GUEST_NAME }>,
    /// GNU build id of the guest binary, empty if none.
    pub build_id: heapless::Vec<u8, { crate::snapshot::MAX_BUILD_ID }>,
    /// Cause of the dump.
    pub kind: CrashKind,
    /// Wall-clock time of the crash, nanoseconds since the Unix epoch.
    pub timestamp_ns: u64,
    /// Logical size of the core in bytes (data plus holes).
    pub total_size: u64,
}

/// Broad class of a sink failure, so callers can react without parsing text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkErrorKind {
    /// An I/O operation failed (the message names it).
    Io,
    /// The target storage is full or below its minimum free space.
    NoSpace,
    /// The sink refused the dump (limit exceeded, spool full, rejected by the collector).
    Rejected,
    /// The sink was used out of order (for example `data` before `begin`).
    Protocol,
    /// The producer aborted the dump.
    Aborted,
}

/// Maximum bytes of a [`SinkError`] message.
pub const MAX_ERROR_MESSAGE: usize = 256;

/// A typed sink failure with a human-readable message.
///
/// The message names the value that failed (path, address, limit) and, where
/// there is one, the fix. It is fixed-capacity so that `no_std` sinks can build it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkError {
    /// Broad class of the failure.
    pub kind: SinkErrorKind,
    /// Description of the failure: what failed, on which value, and the fix.
    pub message: heapless::String<MAX_ERROR_MESSAGE>,
}

impl SinkError {
    /// Builds an error, cutting `message` at [`MAX_ERROR_MESSAGE`] bytes on a character boundary.
    pub fn new(kind: SinkErrorKind, message: &str) -> Self {
        let mut text = heapless::String::new();
        for ch in message.chars() {
            if text.push(ch).is_err() {
                break;
            }
        }
        SinkError {
            kind,
            message: text,
        }
    }
}

impl core::fmt::Display for SinkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.message)
    }
}

#[cfg(feature = "std")]
impl std::error::Error for SinkError {}

/// Report of a sink for a dump it stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkReceipt {
    /// Location of the dump: a file path, `memory`, or the collector address.
    pub location: heapless::String<{ crate::snapshot::MAX_GUEST_PATH }>,
    /// Bytes the sink stored or sent (holes count as their length).
    pub bytes: u64,
}

/// Receives dumps as a forward-only stream. See the module docs for the contract.
pub trait DumpSink {
    /// Starts a dump. Errors end the dump for this sink.
    fn begin(&mut self, metadata: &DumpMetadata) -> Result<(), SinkError>;

    /// Appends bytes of the core.
    fn data(&mut self, bytes: &[u8]) -> Result<(), SinkError>;

    /// Appends `length` zero bytes that the sink may store as a hole.
    fn hole(&mut self, length: u64) -> Result<(), SinkError>;

    /// Ends the dump after exactly `total_size` bytes; the dump is durable or
    /// delivered when this returns `Ok`.
    fn finish(&mut self) -> Result<SinkReceipt, SinkError>;

    /// Drops a partial dump. Must leave nothing under a final name.
    fn abort(&mut self);

    /// Short name for logs and receipts (`file`, `memory`, `socket`).
    fn name(&self) -> &str;
}
