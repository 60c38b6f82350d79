//! Incremental decoder for both directions of the stream protocol.

use super::{
    ClientHello, Crc32c, End, FrameType, HelloStatus, Reject, RejectReason, ServerHello,
    BEGIN_FIXED_LEN, CLIENT_HELLO_FIXED_LEN, END_LEN, FRAME_HEADER_LEN, MAGIC, MAX_CONTROL_PAYLOAD,
    REJECT_FIXED_LEN, SERVER_HELLO_FIXED_LEN,
};
use crate::sink::DumpMetadata;
use crate::snapshot::{CrashKind, MAX_BUILD_ID, MAX_GUEST_NAME};

/// Limits the decoder enforces on untrusted input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Maximum payload bytes of one `Data` frame. Default 1 MiB.
    pub max_frame_size: u32,
    /// Maximum payload bytes of any other frame, including the `Begin`
    /// metadata. Values above [`MAX_CONTROL_PAYLOAD`] act as
    /// [`MAX_CONTROL_PAYLOAD`]. Default [`MAX_CONTROL_PAYLOAD`].
    pub max_metadata_size: u32,
    /// Maximum logical bytes (data plus holes) of one dump. Default 16 GiB.
    pub max_dump_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_size: 1 << 20,
            max_metadata_size: MAX_CONTROL_PAYLOAD as u32,
            max_dump_size: 16 << 30,
        }
    }
}

/// Which side's messages a decoder reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The collector's decoder: reads `ClientHello`, then `Begin`, `Data`,
    /// `Hole` and `End` frames from a producer.
    Collector,
    /// The producer's decoder: reads `ServerHello`, then `Ack` and `Reject`.
    Producer,
}

/// One decoded message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// A producer's handshake.
    ClientHello(ClientHello),
    /// The collector's handshake reply.
    ServerHello(ServerHello),
    /// Start of a dump.
    Begin(DumpMetadata),
    /// Bytes of the current dump, borrowed from the input. One `Data` frame
    /// may arrive as several of these when it spans input chunks.
    Data(&'a [u8]),
    /// A run of zero bytes in the current dump.
    Hole(u64),
    /// End of the current dump; length already checked, CRC for the caller to judge.
    End(End),
    /// The collector stored the dump with this id.
    Ack(u64),
    /// The collector did not store a dump.
    Reject(Reject),
}

/// Malformed or over-limit input. After an error the decoder stays failed and
/// the connection must be closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The frame type byte is not a known type.
    UnknownFrameType(u8),
    /// A reserved header byte is not zero.
    ReservedNotZero,
    /// A `Data` payload is larger than [`Limits::max_frame_size`].
    FrameTooLarge {
        /// Payload length in the header.
        length: u32,
        /// The limit.
        limit: u32,
    },
    /// A control payload is larger than [`Limits::max_metadata_size`].
    MetadataTooLarge {
        /// Type of the frame.
        frame_type: FrameType,
        /// Payload length in the header.
        length: u32,
        /// The limit.
        limit: u32,
    },
    /// A control payload's length does not match its content.
    InvalidLength {
        /// Type of the frame.
        frame_type: FrameType,
        /// Payload length in the header.
        length: u32,
    },
    /// The `ClientHello` does not start with [`MAGIC`]: the peer is not a Sandcore producer.
    BadMagic,
    /// A frame arrived that is not valid at this point of the conversation.
    UnexpectedFrame {
        /// Type of the frame.
        frame_type: FrameType,
        /// What the decoder expected instead.
        expected: &'static str,
    },
    /// A guest name or message is not valid UTF-8.
    InvalidUtf8 {
        /// Type of the frame.
        frame_type: FrameType,
    },
    /// The crash kind code or its detail is out of range.
    InvalidCrashKind {
        /// The crash kind code.
        code: u32,
    },
    /// A dump's total size is larger than [`Limits::max_dump_size`].
    DumpTooLarge {
        /// Id of the dump.
        dump_id: u64,
        /// Total size from its `Begin`.
        total_size: u64,
        /// The limit.
        limit: u64,
    },
    /// `Data` and `Hole` frames went past the total size in `Begin`.
    DumpOverrun {
        /// Id of the dump.
        dump_id: u64,
        /// Total size from its `Begin`.
        total_size: u64,
        /// Logical bytes the frame would bring it to.
        attempted: u64,
    },
    /// `End` came with a length that differs from the total size or from the bytes received.
    LengthMismatch {
        /// Id of the dump.
        dump_id: u64,
        /// Total size from its `Begin`.
        total_size: u64,
        /// Logical bytes received.
        received: u64,
        /// Length in the `End` frame.
        end_length: u64,
    },
    /// The decoder already returned an error; the connection must be closed.
    Failed,
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            DecodeError::UnknownFrameType(byte) => {
                write!(f, "unknown frame type 0x{byte:02x}; the peer speaks another protocol or version")
            }
            DecodeError::ReservedNotZero => {
                f.write_str("reserved frame header bytes are not zero; the peer speaks another protocol or version")
            }
            DecodeError::FrameTooLarge { length, limit } => write!(
                f,
                "data frame of {length} bytes exceeds the maximum frame size of {limit}; send smaller frames or raise the limit"
            ),
            DecodeError::MetadataTooLarge { frame_type, length, limit } => write!(
                f,
                "{frame_type:?} frame of {length} bytes exceeds the maximum metadata size of {limit}"
            ),
            DecodeError::InvalidLength { frame_type, length } => {
                write!(f, "{frame_type:?} frame has invalid payload length {length}")
            }
            DecodeError::BadMagic => {
                f.write_str("handshake does not start with the Sandcore magic; the peer is not a Sandcore producer")
            }
            DecodeError::UnexpectedFrame { frame_type, expected } => {
                write!(f, "unexpected {frame_type:?} frame, expected {expected}")
            }
            DecodeError::InvalidUtf8 { frame_type } => {
                write!(f, "{frame_type:?} frame contains text that is not valid UTF-8")
            }
            DecodeError::InvalidCrashKind { code } => write!(f, "invalid crash kind code {code}"),
            DecodeError::DumpTooLarge { dump_id, total_size, limit } => write!(
                f,
                "dump {dump_id} of {total_size} bytes exceeds the maximum dump size of {limit} bytes; raise the collector's maximum dump size"
            ),
            DecodeError::DumpOverrun { dump_id, total_size, attempted } => write!(
                f,
                "dump {dump_id} sent {attempted} bytes, more than its declared total size of {total_size}"
            ),
            DecodeError::LengthMismatch { dump_id, total_size, received, end_length } => write!(
                f,
                "dump {dump_id} ended with length {end_length} after {received} bytes received, but declared {total_size}"
            ),
            DecodeError::Failed => f.write_str("decoder already failed; close the connection"),
        }
    }
}

/// Where the decoder is in the conversation.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// Waiting for the handshake frame.
    Handshake,
    /// Between dumps (collector) or after the handshake (producer).
    Ready,
    /// Inside a dump, between `Begin` and `End`.
    InDump {
        dump_id: u64,
        total_size: u64,
        received: u64,
    },
    /// An error was returned.
    Failed,
}

/// Where the decoder is inside the current frame.
#[derive(Clone, Copy, Debug)]
enum FramePosition {
    /// Reading the header; `filled` bytes of it are buffered.
    Header { filled: usize },
    /// Buffering a control payload of `length` bytes.
    Control {
        frame_type: FrameType,
        length: usize,
        filled: usize,
    },
    /// Passing through `remaining` bytes of a `Data` payload.
    Data { remaining: u32 },
}

/// Incremental decoder: feed it byte chunks of any size, get whole messages.
///
/// It holds at most one frame header and one control payload
/// ([`MAX_CONTROL_PAYLOAD`] bytes) inline and never allocates. `Data`
/// payloads pass through as slices of the input.
#[derive(Clone, Debug)]
pub struct Decoder {
    role: Role,
    limits: Limits,
    phase: Phase,
    position: FramePosition,
    header: [u8; FRAME_HEADER_LEN],
    control: [u8; MAX_CONTROL_PAYLOAD],
    crc: Crc32c,
}

impl Decoder {
    /// Creates a decoder for the messages `role` receives, enforcing `limits`.
    pub fn new(role: Role, limits: Limits) -> Self {
        Decoder {
            role,
            limits,
            phase: Phase::Handshake,
            position: FramePosition::Header { filled: 0 },
            header: [0; FRAME_HEADER_LEN],
            control: [0; MAX_CONTROL_PAYLOAD],
            crc: Crc32c::new(),
        }
    }

    /// Returns the limits this decoder enforces.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Returns the id of the dump between its `Begin` and `End`, if any.
    pub fn current_dump(&self) -> Option<u64> {
        match self.phase {
            Phase::InDump { dump_id, .. } => Some(dump_id),
            _ => None,
        }
    }

    /// Returns true if no partial frame is buffered, so the peer may close here.
    pub fn is_at_frame_boundary(&self) -> bool {
        matches!(self.position, FramePosition::Header { filled: 0 })
    }

    /// Decodes from `input` until one message is complete or the input is used up.
    ///
    /// Returns the number of bytes consumed and the message, if one completed.
    /// Call again with the unconsumed rest. When `input` is not empty, the
    /// call consumes at least one byte or returns an error.
    pub fn decode<'a>(
        &mut self,
        input: &'a [u8],
    ) -> Result<(usize, Option<Message<'a>>), DecodeError> {
        if matches!(self.phase, Phase::Failed) {
            return Err(DecodeError::Failed);
        }
        let result = self.decode_inner(input);
        if result.is_err() {
            self.phase = Phase::Failed;
        }
        result
    }

    fn decode_inner<'a>(
        &mut self,
        input: &'a [u8],
    ) -> Result<(usize, Option<Message<'a>>), DecodeError> {
        let mut consumed = 0;
        while consumed < input.len() {
            let rest = &input[consumed..];
            match self.position {
                FramePosition::Header { filled } => {
                    let take = (FRAME_HEADER_LEN - filled).min(rest.len());
                    self.header[filled..filled + take].copy_from_slice(&rest[..take]);
                    consumed += take;
                    if filled + take < FRAME_HEADER_LEN {
                        self.position = FramePosition::Header {
                            filled: filled + take,
                        };
                        continue;
                    }
                    self.start_frame()?;
                    if let FramePosition::Control { length: 0, .. } = self.position {
                        // No control frame is valid with an empty payload;
                        // parse_control reports the length error.
                        return Ok((consumed, Some(self.finish_control()?)));
                    }
                }
                FramePosition::Control {
                    frame_type,
                    length,
                    filled,
                } => {
                    let take = (length - filled).min(rest.len());
                    self.control[filled..filled + take].copy_from_slice(&rest[..take]);
                    consumed += take;
                    if filled + take < length {
                        self.position = FramePosition::Control {
                            frame_type,
                            length,
                            filled: filled + take,
                        };
                        continue;
                    }
                    return Ok((consumed, Some(self.finish_control()?)));
                }
                FramePosition::Data { remaining } => {
                    let take = (remaining as usize).min(rest.len());
                    let bytes = &rest[..take];
                    consumed += take;
                    self.crc.update(bytes);
                    if let Phase::InDump { received, .. } = &mut self.phase {
                        // start_frame checked that the whole frame fits in total_size.
                        *received += take as u64;
                    }
                    let remaining = remaining - take as u32;
                    self.position = if remaining == 0 {
                        FramePosition::Header { filled: 0 }
                    } else {
                        FramePosition::Data { remaining }
                    };
                    return Ok((consumed, Some(Message::Data(bytes))));
                }
            }
        }
        Ok((consumed, None))
    }

    /// Validates a complete header and sets up reading its payload.
    fn start_frame(&mut self) -> Result<(), DecodeError> {
        let type_byte = self.header[0];
        let frame_type =
            FrameType::from_byte(type_byte).ok_or(DecodeError::UnknownFrameType(type_byte))?;
        if self.header[1..4] != [0, 0, 0] {
            return Err(DecodeError::ReservedNotZero);
        }
        let length = u32::from_le_bytes([
            self.header[4],
            self.header[5],
            self.header[6],
            self.header[7],
        ]);
        self.check_expected(frame_type)?;

        if frame_type == FrameType::Data {
            if length > self.limits.max_frame_size {
                return Err(DecodeError::FrameTooLarge {
                    length,
                    limit: self.limits.max_frame_size,
                });
            }
            if let Phase::InDump {
                dump_id,
                total_size,
                received,
            } = self.phase
            {
                let attempted = received.saturating_add(length as u64);
                if attempted > total_size {
                    return Err(DecodeError::DumpOverrun {
                        dump_id,
                        total_size,
                        attempted,
                    });
                }
            }
            self.position = if length == 0 {
                FramePosition::Header { filled: 0 }
            } else {
                FramePosition::Data { remaining: length }
            };
            return Ok(());
        }

        let limit = self
            .limits
            .max_metadata_size
            .min(MAX_CONTROL_PAYLOAD as u32);
        if length > limit {
            return Err(DecodeError::MetadataTooLarge {
                frame_type,
                length,
                limit,
            });
        }
        self.position = FramePosition::Control {
            frame_type,
            length: length as usize,
            filled: 0,
        };
        Ok(())
    }

    /// Rejects frames that the role and phase do not allow.
    fn check_expected(&self, frame_type: FrameType) -> Result<(), DecodeError> {
        let expected = match (self.role, self.phase) {
            (Role::Collector, Phase::Handshake) => {
                if frame_type == FrameType::ClientHello {
                    return Ok(());
                }
                "ClientHello"
            }
            (Role::Collector, Phase::Ready) => {
                if frame_type == FrameType::Begin {
                    return Ok(());
                }
                "Begin"
            }
            (Role::Collector, Phase::InDump { .. }) => {
                if matches!(
                    frame_type,
                    FrameType::Data | FrameType::Hole | FrameType::End
                ) {
                    return Ok(());
                }
                "Data, Hole or End"
            }
            (Role::Producer, Phase::Handshake) => {
                if frame_type == FrameType::ServerHello {
                    return Ok(());
                }
                "ServerHello"
            }
            (Role::Producer, Phase::Ready) => {
                if matches!(frame_type, FrameType::Ack | FrameType::Reject) {
                    return Ok(());
                }
                "Ack or Reject"
            }
            (Role::Producer, Phase::InDump { .. }) | (_, Phase::Failed) => "nothing",
        };
        Err(DecodeError::UnexpectedFrame {
            frame_type,
            expected,
        })
    }

    /// Parses the buffered control payload and advances the conversation.
    fn finish_control(&mut self) -> Result<Message<'static>, DecodeError> {
        let FramePosition::Control {
            frame_type, length, ..
        } = self.position
        else {
            return Err(DecodeError::Failed);
        };
        self.position = FramePosition::Header { filled: 0 };
        let mut payload = Payload {
            bytes: &self.control[..length],
            frame_type,
        };
        let message = match frame_type {
            FrameType::ClientHello => {
                let hello = payload.client_hello()?;
                self.phase = Phase::Ready;
                Message::ClientHello(hello)
            }
            FrameType::ServerHello => {
                let hello = payload.server_hello()?;
                // A rejected handshake leaves the decoder expecting nothing
                // more; the producer closes the connection.
                self.phase = if hello.status == HelloStatus::Accepted {
                    Phase::Ready
                } else {
                    Phase::Failed
                };
                Message::ServerHello(hello)
            }
            FrameType::Begin => {
                let metadata = payload.begin()?;
                if metadata.total_size > self.limits.max_dump_size {
                    return Err(DecodeError::DumpTooLarge {
                        dump_id: metadata.dump_id,
                        total_size: metadata.total_size,
                        limit: self.limits.max_dump_size,
                    });
                }
                self.phase = Phase::InDump {
                    dump_id: metadata.dump_id,
                    total_size: metadata.total_size,
                    received: 0,
                };
                self.crc = Crc32c::new();
                Message::Begin(metadata)
            }
            FrameType::Hole => {
                let hole = payload.exact(8)?.u64();
                if let Phase::InDump {
                    dump_id,
                    total_size,
                    received,
                } = &mut self.phase
                {
                    let attempted = received.saturating_add(hole);
                    if attempted > *total_size {
                        return Err(DecodeError::DumpOverrun {
                            dump_id: *dump_id,
                            total_size: *total_size,
                            attempted,
                        });
                    }
                    *received = attempted;
                }
                self.crc.update_zeros(hole);
                Message::Hole(hole)
            }
            FrameType::End => {
                let fields = payload.exact(END_LEN)?;
                let end_length = fields.u64();
                let crc32c = fields.u32();
                let Phase::InDump {
                    dump_id,
                    total_size,
                    received,
                } = self.phase
                else {
                    return Err(DecodeError::Failed);
                };
                if end_length != total_size || received != total_size {
                    return Err(DecodeError::LengthMismatch {
                        dump_id,
                        total_size,
                        received,
                        end_length,
                    });
                }
                self.phase = Phase::Ready;
                Message::End(End {
                    dump_id,
                    total_length: end_length,
                    crc32c,
                    computed_crc32c: self.crc.value(),
                })
            }
            FrameType::Ack => Message::Ack(payload.exact(8)?.u64()),
            FrameType::Reject => Message::Reject(payload.reject()?),
            // start_frame routes Data frames to FramePosition::Data.
            FrameType::Data => return Err(DecodeError::Failed),
        };
        Ok(message)
    }
}

/// Cursor over a complete control payload; every read is bounds-checked by
/// the length checks that precede it.
struct Payload<'a> {
    bytes: &'a [u8],
    frame_type: FrameType,
}

impl<'a> Payload<'a> {
    fn invalid_length(&self) -> DecodeError {
        DecodeError::InvalidLength {
            frame_type: self.frame_type,
            length: self.bytes.len() as u32,
        }
    }

    /// Checks that exactly `length` bytes remain.
    fn exact(&mut self, length: usize) -> Result<&mut Self, DecodeError> {
        if self.bytes.len() != length {
            return Err(self.invalid_length());
        }
        Ok(self)
    }

    /// Checks that at least `length` bytes remain.
    fn at_least(&mut self, length: usize) -> Result<(), DecodeError> {
        if self.bytes.len() < length {
            return Err(self.invalid_length());
        }
        Ok(())
    }

    fn take(&mut self, length: usize) -> &'a [u8] {
        let (head, tail) = self.bytes.split_at(length);
        self.bytes = tail;
        head
    }

    fn u8(&mut self) -> u8 {
        self.take(1)[0]
    }

    fn u16(&mut self) -> u16 {
        let bytes = self.take(2);
        u16::from_le_bytes([bytes[0], bytes[1]])
    }

    fn u32(&mut self) -> u32 {
        let mut bytes = [0; 4];
        bytes.copy_from_slice(self.take(4));
        u32::from_le_bytes(bytes)
    }

    fn u64(&mut self) -> u64 {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(self.take(8));
        u64::from_le_bytes(bytes)
    }

    /// Reads a length byte and that many bytes, which must be all that is left
    /// or leave at least `after` bytes.
    fn counted(&mut self, max: usize, after: usize) -> Result<&'a [u8], DecodeError> {
        self.at_least(1)?;
        let length = self.u8() as usize;
        if length > max {
            return Err(self.invalid_length());
        }
        self.at_least(length + after)?;
        Ok(self.take(length))
    }

    fn text<const N: usize>(&self, bytes: &[u8]) -> Result<heapless::String<N>, DecodeError> {
        let invalid = DecodeError::InvalidUtf8 {
            frame_type: self.frame_type,
        };
        let text = core::str::from_utf8(bytes).map_err(|_| invalid)?;
        let mut string = heapless::String::new();
        // Callers bound `bytes` by N before calling.
        string.push_str(text).map_err(|_| self.invalid_length())?;
        Ok(string)
    }

    fn client_hello(&mut self) -> Result<ClientHello, DecodeError> {
        self.at_least(CLIENT_HELLO_FIXED_LEN)?;
        if self.take(MAGIC.len()) != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let version = self.u16();
        let producer_id = self.u64();
        let token_bytes = self.counted(super::MAX_TOKEN, 0)?;
        if !self.bytes.is_empty() {
            return Err(self.invalid_length());
        }
        let mut token = heapless::Vec::new();
        token
            .extend_from_slice(token_bytes)
            .map_err(|_| self.invalid_length())?;
        Ok(ClientHello {
            version,
            producer_id,
            token,
        })
    }

    fn server_hello(&mut self) -> Result<ServerHello, DecodeError> {
        self.at_least(SERVER_HELLO_FIXED_LEN)?;
        let version = self.u16();
        let status = HelloStatus::from_code(self.u8());
        let max_dump_size = self.u64();
        let message_bytes = self.counted(super::MAX_REASON_MESSAGE, 0)?;
        if !self.bytes.is_empty() {
            return Err(self.invalid_length());
        }
        Ok(ServerHello {
            version,
            status,
            max_dump_size,
            message: self.text(message_bytes)?,
        })
    }

    fn reject(&mut self) -> Result<Reject, DecodeError> {
        self.at_least(REJECT_FIXED_LEN)?;
        let dump_id = self.u64();
        let reason = RejectReason::from_code(self.u16());
        let message_bytes = self.counted(super::MAX_REASON_MESSAGE, 0)?;
        if !self.bytes.is_empty() {
            return Err(self.invalid_length());
        }
        Ok(Reject {
            dump_id,
            reason,
            message: self.text(message_bytes)?,
        })
    }

    fn begin(&mut self) -> Result<DumpMetadata, DecodeError> {
        self.at_least(BEGIN_FIXED_LEN)?;
        let dump_id = self.u64();
        let sandbox_id = self.u64();
        let timestamp_ns = self.u64();
        let total_size = self.u64();
        let code = self.u32();
        let detail = self.u64();
        let error_code = self.u64();
        let kind = crash_kind_from_wire(code, detail, error_code)?;
        let name_bytes = self.counted(MAX_GUEST_NAME, 1)?;
        let guest_name = self.text(name_bytes)?;
        let build_id_bytes = self.counted(MAX_BUILD_ID, 0)?;
        if !self.bytes.is_empty() {
            return Err(self.invalid_length());
        }
        let mut build_id = heapless::Vec::new();
        build_id
            .extend_from_slice(build_id_bytes)
            .map_err(|_| self.invalid_length())?;
        Ok(DumpMetadata {
            dump_id,
            sandbox_id,
            guest_name,
            build_id,
            kind,
            timestamp_ns,
            total_size,
        })
    }
}

/// Rebuilds a crash kind from its wire code and detail words.
pub(crate) fn crash_kind_from_wire(
    code: u32,
    detail: u64,
    error_code: u64,
) -> Result<CrashKind, DecodeError> {
    let invalid = DecodeError::InvalidCrashKind { code };
    let kind = match code {
        1 => CrashKind::Exception {
            vector: u8::try_from(detail).map_err(|_| invalid)?,
            error_code,
        },
        2 => CrashKind::StackOverflow { address: detail },
        3 => CrashKind::Panic,
        4 => CrashKind::TripleFault,
        5 => CrashKind::InternalError,
        6 => CrashKind::UnexpectedExit,
        7 => CrashKind::Timeout,
        8 => CrashKind::Cancelled,
        9 => CrashKind::OnDemand,
        _ => return Err(invalid),
    };
    Ok(kind)
}
