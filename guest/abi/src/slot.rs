//! The request and reply slots: a header with a state word at the start of
//! each shared buffer, followed by the encoded payload.
//!
//! The input buffer carries call requests from host to guest. The output
//! buffer carries everything the guest sends: call replies, host-function
//! calls, and the panic message; the host writes host-function replies into
//! the output buffer too, because the input buffer still contains the arguments
//! the running guest function borrows.
//!
//! # Memory ordering
//!
//! The writer of a payload stores the payload and `length` first and then
//! the `state` with `Release`; the reader loads `state` with `Acquire` before
//! it reads `length` and the payload. With the exit transport the VM exit
//! itself orders the accesses, but both sides still follow this rule so that
//! the polling transport, where host and guest run at the same time on
//! different CPUs, drives the same guests without a change.
//!
//! The polling transport adds one handshake: a host thread that stops
//! spinning sets `host_waiting` and then re-reads the output `state`; the
//! guest stores the output `state` and then reads `host_waiting`. Both sides
//! use `SeqCst` for these two accesses, so at least one of them sees the
//! other's store and no wake-up is lost.
//!
//! Every field is untrusted for the host: it checks `state` against what it
//! expects and `length` against the buffer size before reading a byte.

use core::sync::atomic::{AtomicU32, AtomicU64};

/// Input slot is free: the host may write the next request.
pub const INPUT_EMPTY: u32 = 0;
/// Input slot contains a call request the guest has not finished.
pub const INPUT_CALL: u32 = 1;

/// Output slot is free.
pub const OUTPUT_EMPTY: u32 = 0;
/// Output slot contains the reply to the current call.
pub const OUTPUT_REPLY: u32 = 1;
/// Output slot holds a host-function call from the guest.
pub const OUTPUT_HOST_CALL: u32 = 2;
/// Output slot holds the host's reply to a host-function call.
pub const OUTPUT_HOST_REPLY: u32 = 3;
/// Output slot holds a panic message; the guest will not run again.
pub const OUTPUT_ABORT: u32 = 4;

/// Header at offset 0 of the input and the output buffer. The payload
/// follows at [`PAYLOAD_OFFSET`].
#[repr(C)]
pub struct SlotHeader {
    /// One of the `INPUT_*` or `OUTPUT_*` states.
    pub state: AtomicU32,
    /// Payload length in bytes.
    pub length: AtomicU32,
    /// Request sequence number: the host increments it per call, and the
    /// guest copies it into the reply, so a stale or forged reply is detected.
    pub sequence: AtomicU64,
    /// Input slot only: how long the guest spins for the next request before
    /// it parks with an `out`, in TSC ticks. Zero means park at once, which is
    /// the exit transport; the host sets it per sandbox.
    pub poll_idle_ticks: AtomicU64,
    /// Input slot only: nonzero while a host thread sleeps waiting for the
    /// output slot to change (polling transport). A guest that publishes a
    /// reply or a host-function call while it is set must `out` to
    /// [`PORT_NOTIFY`](crate::ports::PORT_NOTIFY) so the host can wake that thread.
    pub host_waiting: AtomicU64,
}

/// Offset of the payload from the start of a buffer, in bytes.
pub const PAYLOAD_OFFSET: usize = core::mem::size_of::<SlotHeader>();

/// Smallest buffer size the host accepts: header plus a useful payload.
pub const MIN_BUFFER_SIZE: u64 = 4096;
