//! Frame encoders. Each writes one whole frame into a caller buffer and
//! returns the number of bytes written.

use super::{
    begin_payload_len, FrameType, HelloStatus, RejectReason, ServerHello, CLIENT_HELLO_FIXED_LEN,
    END_LEN, FRAME_HEADER_LEN, MAGIC, MAX_REASON_MESSAGE, MAX_TOKEN, REJECT_FIXED_LEN,
    SERVER_HELLO_FIXED_LEN, VERSION,
};
use crate::sink::DumpMetadata;
use crate::snapshot::CrashKind;

/// A frame could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// The output buffer is shorter than the frame.
    BufferTooSmall {
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes the buffer has.
        available: usize,
    },
    /// The token is longer than [`MAX_TOKEN`] bytes.
    TokenTooLong {
        /// Length of the token given.
        length: usize,
    },
    /// A data payload is longer than a frame can carry (`u32::MAX` bytes).
    PayloadTooLong {
        /// Length of the payload given.
        length: usize,
    },
}

impl core::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            EncodeError::BufferTooSmall { needed, available } => write!(
                f,
                "frame needs {needed} bytes but the output buffer has {available}; pass a larger buffer"
            ),
            EncodeError::TokenTooLong { length } => write!(
                f,
                "token is {length} bytes, more than the maximum of {MAX_TOKEN}; use a shorter token"
            ),
            EncodeError::PayloadTooLong { length } => write!(
                f,
                "data payload is {length} bytes, more than one frame carries; split it into smaller frames"
            ),
        }
    }
}

/// Sequential writer over a buffer whose length was checked up front.
struct Writer<'a> {
    buffer: &'a mut [u8],
    position: usize,
}

impl<'a> Writer<'a> {
    /// Starts a frame of `frame_type` with `payload_len` bytes of payload,
    /// checking that the whole frame fits in `buffer`.
    fn frame(
        buffer: &'a mut [u8],
        frame_type: FrameType,
        payload_len: usize,
    ) -> Result<Self, EncodeError> {
        let needed = FRAME_HEADER_LEN + payload_len;
        if buffer.len() < needed {
            return Err(EncodeError::BufferTooSmall {
                needed,
                available: buffer.len(),
            });
        }
        let length = u32::try_from(payload_len).map_err(|_| EncodeError::PayloadTooLong {
            length: payload_len,
        })?;
        let mut writer = Writer {
            buffer,
            position: 0,
        };
        writer.bytes(&[frame_type as u8, 0, 0, 0]);
        writer.bytes(&length.to_le_bytes());
        Ok(writer)
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.buffer[self.position..self.position + bytes.len()].copy_from_slice(bytes);
        self.position += bytes.len();
    }

    fn finish(self) -> usize {
        self.position
    }
}

/// Returns the longest prefix of `text` of at most `max` bytes that ends on a character boundary.
fn truncate_str(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Encodes a `ClientHello` for `producer_id` with `token` (empty for none).
pub fn encode_client_hello(
    producer_id: u64,
    token: &[u8],
    buffer: &mut [u8],
) -> Result<usize, EncodeError> {
    if token.len() > MAX_TOKEN {
        return Err(EncodeError::TokenTooLong {
            length: token.len(),
        });
    }
    let mut writer = Writer::frame(
        buffer,
        FrameType::ClientHello,
        CLIENT_HELLO_FIXED_LEN + token.len(),
    )?;
    writer.bytes(&MAGIC);
    writer.bytes(&VERSION.to_le_bytes());
    writer.bytes(&producer_id.to_le_bytes());
    writer.bytes(&[token.len() as u8]);
    writer.bytes(token);
    Ok(writer.finish())
}

/// Encodes a `ServerHello`; a message longer than [`MAX_REASON_MESSAGE`] bytes is cut.
pub fn encode_server_hello(hello: &ServerHello, buffer: &mut [u8]) -> Result<usize, EncodeError> {
    let message = truncate_str(&hello.message, MAX_REASON_MESSAGE);
    let mut writer = Writer::frame(
        buffer,
        FrameType::ServerHello,
        SERVER_HELLO_FIXED_LEN + message.len(),
    )?;
    writer.bytes(&hello.version.to_le_bytes());
    writer.bytes(&[HelloStatus::code(hello.status)]);
    writer.bytes(&hello.max_dump_size.to_le_bytes());
    writer.bytes(&[message.len() as u8]);
    writer.bytes(message.as_bytes());
    Ok(writer.finish())
}

/// Returns the wire code and the two detail words of a crash kind.
pub(crate) fn crash_kind_to_wire(kind: &CrashKind) -> (u32, u64, u64) {
    match *kind {
        CrashKind::Exception { vector, error_code } => (kind.code(), vector as u64, error_code),
        CrashKind::StackOverflow { address } => (kind.code(), address, 0),
        _ => (kind.code(), 0, 0),
    }
}

/// Encodes a `Begin` frame carrying `metadata`.
pub fn encode_begin(metadata: &DumpMetadata, buffer: &mut [u8]) -> Result<usize, EncodeError> {
    let (code, detail, error_code) = crash_kind_to_wire(&metadata.kind);
    let mut writer = Writer::frame(buffer, FrameType::Begin, begin_payload_len(metadata))?;
    writer.bytes(&metadata.dump_id.to_le_bytes());
    writer.bytes(&metadata.sandbox_id.to_le_bytes());
    writer.bytes(&metadata.timestamp_ns.to_le_bytes());
    writer.bytes(&metadata.total_size.to_le_bytes());
    writer.bytes(&code.to_le_bytes());
    writer.bytes(&detail.to_le_bytes());
    writer.bytes(&error_code.to_le_bytes());
    // Both fit in a byte: their capacities are MAX_GUEST_NAME (64) and MAX_BUILD_ID (32).
    writer.bytes(&[metadata.guest_name.len() as u8]);
    writer.bytes(metadata.guest_name.as_bytes());
    writer.bytes(&[metadata.build_id.len() as u8]);
    writer.bytes(&metadata.build_id);
    Ok(writer.finish())
}

/// Encodes only the header of a `Data` frame whose payload of `payload_len`
/// bytes the caller sends next, so large payloads are not copied.
pub fn encode_data_header(payload_len: usize, buffer: &mut [u8]) -> Result<usize, EncodeError> {
    if buffer.len() < FRAME_HEADER_LEN {
        return Err(EncodeError::BufferTooSmall {
            needed: FRAME_HEADER_LEN,
            available: buffer.len(),
        });
    }
    let length = u32::try_from(payload_len).map_err(|_| EncodeError::PayloadTooLong {
        length: payload_len,
    })?;
    buffer[..4].copy_from_slice(&[FrameType::Data as u8, 0, 0, 0]);
    buffer[4..8].copy_from_slice(&length.to_le_bytes());
    Ok(FRAME_HEADER_LEN)
}

/// Encodes a whole `Data` frame carrying `payload`.
pub fn encode_data(payload: &[u8], buffer: &mut [u8]) -> Result<usize, EncodeError> {
    let mut writer = Writer::frame(buffer, FrameType::Data, payload.len())?;
    writer.bytes(payload);
    Ok(writer.finish())
}

/// Encodes a `Hole` frame: `length` zero bytes.
pub fn encode_hole(length: u64, buffer: &mut [u8]) -> Result<usize, EncodeError> {
    let mut writer = Writer::frame(buffer, FrameType::Hole, 8)?;
    writer.bytes(&length.to_le_bytes());
    Ok(writer.finish())
}

/// Encodes an `End` frame with the dump's total logical length and CRC-32C.
pub fn encode_end(total_length: u64, crc32c: u32, buffer: &mut [u8]) -> Result<usize, EncodeError> {
    let mut writer = Writer::frame(buffer, FrameType::End, END_LEN)?;
    writer.bytes(&total_length.to_le_bytes());
    writer.bytes(&crc32c.to_le_bytes());
    Ok(writer.finish())
}

/// Encodes an `Ack` for `dump_id`.
pub fn encode_ack(dump_id: u64, buffer: &mut [u8]) -> Result<usize, EncodeError> {
    let mut writer = Writer::frame(buffer, FrameType::Ack, 8)?;
    writer.bytes(&dump_id.to_le_bytes());
    Ok(writer.finish())
}

/// Encodes a `Reject` for `dump_id`; a message longer than
/// [`MAX_REASON_MESSAGE`] bytes is cut.
pub fn encode_reject(
    dump_id: u64,
    reason: RejectReason,
    message: &str,
    buffer: &mut [u8],
) -> Result<usize, EncodeError> {
    let message = truncate_str(message, MAX_REASON_MESSAGE);
    let mut writer = Writer::frame(buffer, FrameType::Reject, REJECT_FIXED_LEN + message.len())?;
    writer.bytes(&dump_id.to_le_bytes());
    writer.bytes(&reason.code().to_le_bytes());
    writer.bytes(&[message.len() as u8]);
    writer.bytes(message.as_bytes());
    Ok(writer.finish())
}
