//! Stream protocol between a socket sink and the collector (`no_std`, no allocation).
//!
//! A connection starts with a handshake: the producer sends a
//! [`ClientHello`] (magic, protocol version, producer id, optional shared
//! token) and the collector answers with a [`ServerHello`] that accepts the
//! version or gives the rejection reason. Then, per dump, the producer sends
//! `Begin` (the [`DumpMetadata`]), any number of `Data` and `Hole` frames
//! that cover exactly `total_size` bytes, and `End` with the total logical
//! length and the CRC-32C of the logical bytes (holes count as zeros). The
//! collector answers each dump with `Ack` once the dump is durable, or with
//! [`Reject`].
//!
//! Every frame is an 8-byte header followed by its payload:
//!
//! | bytes | field |
//! |---|---|
//! | 0 | frame type ([`FrameType`]) |
//! | 1..4 | reserved, must be zero |
//! | 4..8 | payload length, `u32` little-endian |
//!
//! All integers are little-endian. Encoders write into caller buffers and
//! [`Decoder`] parses arbitrary chunks incrementally, so neither allocates.

mod crc32c;
mod decoder;
mod encode;
#[cfg(test)]
mod tests;

pub use self::crc32c::{crc32c, Crc32c};
pub use self::decoder::{DecodeError, Decoder, Limits, Message, Role};
pub use self::encode::{
    encode_ack, encode_begin, encode_client_hello, encode_data, encode_data_header, encode_end,
    encode_hole, encode_reject, encode_server_hello, EncodeError,
};

use crate::sink::DumpMetadata;

/// First bytes of a [`ClientHello`] payload.
pub const MAGIC: [u8; 8] = *b"SANDCORE";
/// Protocol version this crate speaks.
pub const VERSION: u16 = 1;
/// Bytes of a frame header.
pub const FRAME_HEADER_LEN: usize = 8;
/// Maximum bytes of the shared token in a [`ClientHello`].
pub const MAX_TOKEN: usize = 64;
/// Maximum bytes of the text in a [`ServerHello`] or [`Reject`].
pub const MAX_REASON_MESSAGE: usize = 128;
/// Size of the decoder's buffer for every frame except `Data`, and so the
/// largest metadata (`Begin`) payload it accepts.
pub const MAX_CONTROL_PAYLOAD: usize = 256;

/// Fixed part of a `Begin` payload: dump id, sandbox id, timestamp, total size,
/// crash kind code, two crash kind details, guest name length, build id length.
pub(crate) const BEGIN_FIXED_LEN: usize = 8 * 4 + 4 + 8 * 2 + 1 + 1;
/// `ClientHello` payload without the token: magic, version, producer id, token length.
pub(crate) const CLIENT_HELLO_FIXED_LEN: usize = 8 + 2 + 8 + 1;
/// `ServerHello` payload without the message: version, status, max dump size, message length.
pub(crate) const SERVER_HELLO_FIXED_LEN: usize = 2 + 1 + 8 + 1;
/// `Reject` payload without the message: dump id, reason, message length.
pub(crate) const REJECT_FIXED_LEN: usize = 8 + 2 + 1;
/// `End` payload: total logical length and CRC-32C.
pub(crate) const END_LEN: usize = 8 + 4;

/// Type byte of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// Producer handshake.
    ClientHello = 0x01,
    /// Collector handshake reply.
    ServerHello = 0x02,
    /// Start of a dump, with its metadata.
    Begin = 0x10,
    /// Bytes of the current dump.
    Data = 0x11,
    /// A run of zero bytes in the current dump (payload: `u64` length).
    Hole = 0x12,
    /// End of the current dump (payload: `u64` length, `u32` CRC-32C).
    End = 0x13,
    /// The collector stored a dump durably (payload: `u64` dump id).
    Ack = 0x20,
    /// The collector did not store a dump.
    Reject = 0x21,
}

impl FrameType {
    /// Returns the frame type for a type byte, or `None` if the byte is unknown.
    pub fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            0x01 => FrameType::ClientHello,
            0x02 => FrameType::ServerHello,
            0x10 => FrameType::Begin,
            0x11 => FrameType::Data,
            0x12 => FrameType::Hole,
            0x13 => FrameType::End,
            0x20 => FrameType::Ack,
            0x21 => FrameType::Reject,
            _ => return None,
        })
    }
}

/// The producer's handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientHello {
    /// Protocol version the producer speaks.
    pub version: u16,
    /// Id of the producing process; the collector deduplicates dumps by
    /// (producer id, dump id).
    pub producer_id: u64,
    /// Shared token, empty if none is configured.
    pub token: heapless::Vec<u8, MAX_TOKEN>,
}

/// Outcome of a handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelloStatus {
    /// The collector accepts the connection at the version in [`ServerHello::version`].
    Accepted,
    /// The collector does not speak the producer's version.
    UnsupportedVersion,
    /// The token is missing or wrong.
    InvalidToken,
    /// The collector is shutting down or has too many connections; retry later.
    Unavailable,
    /// A status code this crate does not know.
    Unknown(u8),
}

impl HelloStatus {
    /// Returns the wire code.
    pub fn code(self) -> u8 {
        match self {
            HelloStatus::Accepted => 0,
            HelloStatus::UnsupportedVersion => 1,
            HelloStatus::InvalidToken => 2,
            HelloStatus::Unavailable => 3,
            HelloStatus::Unknown(code) => code,
        }
    }

    /// Returns the status for a wire code.
    pub fn from_code(code: u8) -> Self {
        match code {
            0 => HelloStatus::Accepted,
            1 => HelloStatus::UnsupportedVersion,
            2 => HelloStatus::InvalidToken,
            3 => HelloStatus::Unavailable,
            other => HelloStatus::Unknown(other),
        }
    }
}

/// The collector's handshake reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerHello {
    /// Protocol version the collector uses for this connection.
    pub version: u16,
    /// Whether the connection is accepted.
    pub status: HelloStatus,
    /// Largest dump, in logical bytes, the collector stores; producers drop
    /// larger dumps without sending them.
    pub max_dump_size: u64,
    /// Reason text for a rejection, empty when accepted.
    pub message: heapless::String<MAX_REASON_MESSAGE>,
}

/// Why the collector did not store a dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// The dump is larger than the collector's maximum dump size.
    TooLarge,
    /// The CRC-32C in `End` does not match the bytes received.
    ChecksumMismatch,
    /// The collector failed to store the dump (disk full, I/O error); retry later.
    Storage,
    /// The metadata is invalid.
    InvalidMetadata,
    /// The collector is shutting down; retry later.
    ShuttingDown,
    /// A reason code this crate does not know.
    Unknown(u16),
}

impl RejectReason {
    /// Returns the wire code.
    pub fn code(self) -> u16 {
        match self {
            RejectReason::TooLarge => 1,
            RejectReason::ChecksumMismatch => 2,
            RejectReason::Storage => 3,
            RejectReason::InvalidMetadata => 4,
            RejectReason::ShuttingDown => 5,
            RejectReason::Unknown(code) => code,
        }
    }

    /// Returns the reason for a wire code.
    pub fn from_code(code: u16) -> Self {
        match code {
            1 => RejectReason::TooLarge,
            2 => RejectReason::ChecksumMismatch,
            3 => RejectReason::Storage,
            4 => RejectReason::InvalidMetadata,
            5 => RejectReason::ShuttingDown,
            other => RejectReason::Unknown(other),
        }
    }

    /// Returns true if sending the same dump again cannot succeed, so the
    /// producer should drop it instead of retrying.
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            RejectReason::TooLarge | RejectReason::ChecksumMismatch | RejectReason::InvalidMetadata
        )
    }
}

/// The collector's refusal of one dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    /// Id of the rejected dump.
    pub dump_id: u64,
    /// Why it was rejected.
    pub reason: RejectReason,
    /// Short human-readable detail.
    pub message: heapless::String<MAX_REASON_MESSAGE>,
}

/// The end of a dump as the decoder saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct End {
    /// Id of the dump that ended (from its `Begin`).
    pub dump_id: u64,
    /// Total logical length the producer sent in `End`; the decoder has
    /// checked it equals the `Begin` total size and the bytes received.
    pub total_length: u64,
    /// CRC-32C the producer sent.
    pub crc32c: u32,
    /// CRC-32C of the bytes the decoder received, holes as zeros.
    pub computed_crc32c: u32,
}

impl End {
    /// Returns true if the producer's CRC matches the bytes received.
    pub fn checksum_matches(&self) -> bool {
        self.crc32c == self.computed_crc32c
    }
}

/// Returns the metadata size of a `Begin` frame payload for `metadata`.
pub fn begin_payload_len(metadata: &DumpMetadata) -> usize {
    BEGIN_FIXED_LEN + metadata.guest_name.len() + metadata.build_id.len()
}
