//! Compact binary encoding of calls and results.
//!
//! A call request is `[name length: u8][name: UTF-8][argument count: u8]`
//! followed by that many values. A reply is `[status: u8]` followed by one
//! value when the status is [`ReplyStatus::Ok`], or by a message
//! (`[length: u16][UTF-8]`) for any other status. A value is `[type: u8]`
//! and its payload: 4 or 8 little-endian bytes for numbers, one byte for
//! `bool` (0 or 1), `[length: u32][bytes]` for strings and byte arrays, and
//! nothing for `void`. Host-function calls from the guest use the same
//! request and reply encoding.
//!
//! Both sides decode input from the other side, so the [`Reader`] checks
//! every length against the bytes it was given and never panics.

/// Maximum length of a function name in bytes.
pub const MAX_NAME_LENGTH: usize = 255;
/// Maximum number of arguments of one call.
pub const MAX_ARGUMENTS: usize = 255;

/// Type tag of an encoded value.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum ValueType {
    Void = 0,
    I32 = 1,
    U32 = 2,
    I64 = 3,
    U64 = 4,
    F32 = 5,
    F64 = 6,
    Bool = 7,
    String = 8,
    Bytes = 9,
}

impl ValueType {
    /// Converts a tag byte, or `None` if it is not a known type.
    pub fn from_tag(tag: u8) -> Option<ValueType> {
        Some(match tag {
            0 => ValueType::Void,
            1 => ValueType::I32,
            2 => ValueType::U32,
            3 => ValueType::I64,
            4 => ValueType::U64,
            5 => ValueType::F32,
            6 => ValueType::F64,
            7 => ValueType::Bool,
            8 => ValueType::String,
            9 => ValueType::Bytes,
            _ => return None,
        })
    }

    /// Returns the Rust-style name of the type, for error messages.
    pub fn name(self) -> &'static str {
        match self {
            ValueType::Void => "void",
            ValueType::I32 => "i32",
            ValueType::U32 => "u32",
            ValueType::I64 => "i64",
            ValueType::U64 => "u64",
            ValueType::F32 => "f32",
            ValueType::F64 => "f64",
            ValueType::Bool => "bool",
            ValueType::String => "string",
            ValueType::Bytes => "bytes",
        }
    }
}

/// A decoded value that borrows strings and byte arrays from the buffer.
#[derive(Clone, Copy, Debug, PartialEq)]
#[allow(missing_docs)]
pub enum Value<'a> {
    Void,
    I32(i32),
    U32(u32),
    I64(i64),
    U64(u64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(&'a str),
    Bytes(&'a [u8]),
}

impl Value<'_> {
    /// Returns the type tag of the value.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::Void => ValueType::Void,
            Value::I32(_) => ValueType::I32,
            Value::U32(_) => ValueType::U32,
            Value::I64(_) => ValueType::I64,
            Value::U64(_) => ValueType::U64,
            Value::F32(_) => ValueType::F32,
            Value::F64(_) => ValueType::F64,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Bytes(_) => ValueType::Bytes,
        }
    }
}

/// Status byte at the start of a reply.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyStatus {
    /// The call returned; one value follows.
    Ok = 0,
    /// No function of the requested name is registered.
    UnknownFunction = 1,
    /// The arguments do not match the function's parameters.
    ArgumentMismatch = 2,
    /// The request could not be decoded.
    MalformedRequest = 3,
    /// The result did not fit into the reply buffer.
    ReplyTooLarge = 4,
    /// A host function returned an error (host-function replies only).
    HostFunctionFailed = 5,
}

impl ReplyStatus {
    /// Converts a status byte, or `None` if it is not a known status.
    pub fn from_byte(byte: u8) -> Option<ReplyStatus> {
        Some(match byte {
            0 => ReplyStatus::Ok,
            1 => ReplyStatus::UnknownFunction,
            2 => ReplyStatus::ArgumentMismatch,
            3 => ReplyStatus::MalformedRequest,
            4 => ReplyStatus::ReplyTooLarge,
            5 => ReplyStatus::HostFunctionFailed,
            _ => return None,
        })
    }
}

/// Failure to encode: the buffer is too small or a length does not fit its field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// The encoded data needs `needed` bytes but only `available` remain.
    BufferTooSmall {
        /// Bytes the write needs.
        needed: usize,
        /// Bytes left in the buffer.
        available: usize,
    },
    /// A function name is longer than [`MAX_NAME_LENGTH`].
    NameTooLong(usize),
    /// More than [`MAX_ARGUMENTS`] arguments.
    TooManyArguments(usize),
    /// A string or byte array is longer than `u32::MAX` bytes.
    ValueTooLong(usize),
}

impl core::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            EncodeError::BufferTooSmall { needed, available } => write!(
                f,
                "encoded data needs {needed} bytes but the buffer has {available} left; increase the buffer size"
            ),
            EncodeError::NameTooLong(len) => write!(
                f,
                "function name is {len} bytes long, the maximum is {MAX_NAME_LENGTH}"
            ),
            EncodeError::TooManyArguments(count) => write!(
                f,
                "{count} arguments given, the maximum is {MAX_ARGUMENTS}"
            ),
            EncodeError::ValueTooLong(len) => {
                write!(f, "value of {len} bytes is longer than the 4 GiB limit")
            }
        }
    }
}

/// Failure to decode bytes from the other side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The data ended `needed` bytes early at `offset`.
    Truncated {
        /// Offset of the read that failed.
        offset: usize,
        /// Bytes the read needed.
        needed: usize,
    },
    /// An unknown type tag at `offset`.
    UnknownType {
        /// Offset of the tag.
        offset: usize,
        /// The tag byte.
        tag: u8,
    },
    /// An unknown reply status byte.
    UnknownStatus(u8),
    /// A `bool` byte other than 0 or 1 at `offset`.
    InvalidBool {
        /// Offset of the byte.
        offset: usize,
    },
    /// A string or name that is not valid UTF-8, at `offset`.
    InvalidUtf8 {
        /// Offset of the string's first byte.
        offset: usize,
    },
    /// Bytes left over after the last value.
    TrailingBytes {
        /// Number of unread bytes.
        count: usize,
    },
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DecodeError::Truncated { offset, needed } => {
                write!(
                    f,
                    "data truncated at offset {offset}: {needed} more bytes expected"
                )
            }
            DecodeError::UnknownType { offset, tag } => {
                write!(f, "unknown value type tag {tag} at offset {offset}")
            }
            DecodeError::UnknownStatus(status) => write!(f, "unknown reply status {status}"),
            DecodeError::InvalidBool { offset } => {
                write!(f, "invalid bool at offset {offset}: expected 0 or 1")
            }
            DecodeError::InvalidUtf8 { offset } => {
                write!(f, "invalid UTF-8 in string at offset {offset}")
            }
            DecodeError::TrailingBytes { count } => {
                write!(f, "{count} unexpected bytes after the last value")
            }
        }
    }
}

/// Appends encoded data to a byte buffer, checking every write against its end.
pub struct Writer<'a> {
    buffer: &'a mut [u8],
    position: usize,
}

impl<'a> Writer<'a> {
    /// Starts writing at the beginning of `buffer`.
    pub fn new(buffer: &'a mut [u8]) -> Self {
        Writer {
            buffer,
            position: 0,
        }
    }

    /// Returns the number of bytes written so far.
    pub fn position(&self) -> usize {
        self.position
    }

    /// Appends raw bytes.
    pub fn put_bytes(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        let available = self.buffer.len() - self.position;
        if bytes.len() > available {
            return Err(EncodeError::BufferTooSmall {
                needed: bytes.len(),
                available,
            });
        }
        self.buffer[self.position..self.position + bytes.len()].copy_from_slice(bytes);
        self.position += bytes.len();
        Ok(())
    }

    /// Appends one byte.
    pub fn put_u8(&mut self, byte: u8) -> Result<(), EncodeError> {
        self.put_bytes(&[byte])
    }

    /// Appends a call header: the function name and the number of arguments
    /// that the caller then appends with [`Writer::put_value`].
    pub fn put_call_header(
        &mut self,
        name: &str,
        argument_count: usize,
    ) -> Result<(), EncodeError> {
        if name.len() > MAX_NAME_LENGTH {
            return Err(EncodeError::NameTooLong(name.len()));
        }
        if argument_count > MAX_ARGUMENTS {
            return Err(EncodeError::TooManyArguments(argument_count));
        }
        self.put_u8(name.len() as u8)?;
        self.put_bytes(name.as_bytes())?;
        self.put_u8(argument_count as u8)
    }

    /// Appends one tagged value.
    pub fn put_value(&mut self, value: &Value<'_>) -> Result<(), EncodeError> {
        self.put_u8(value.value_type() as u8)?;
        match *value {
            Value::Void => Ok(()),
            Value::I32(v) => self.put_bytes(&v.to_le_bytes()),
            Value::U32(v) => self.put_bytes(&v.to_le_bytes()),
            Value::I64(v) => self.put_bytes(&v.to_le_bytes()),
            Value::U64(v) => self.put_bytes(&v.to_le_bytes()),
            Value::F32(v) => self.put_bytes(&v.to_le_bytes()),
            Value::F64(v) => self.put_bytes(&v.to_le_bytes()),
            Value::Bool(v) => self.put_u8(v as u8),
            Value::String(s) => self.put_blob(s.as_bytes()),
            Value::Bytes(b) => self.put_blob(b),
        }
    }

    /// Appends a successful reply carrying `value`.
    pub fn put_ok_reply(&mut self, value: &Value<'_>) -> Result<(), EncodeError> {
        self.put_u8(ReplyStatus::Ok as u8)?;
        self.put_value(value)
    }

    /// Appends an error reply; a message longer than 65,535 bytes is cut.
    pub fn put_error_reply(
        &mut self,
        status: ReplyStatus,
        message: &str,
    ) -> Result<(), EncodeError> {
        let mut end = message.len().min(u16::MAX as usize);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        self.put_u8(status as u8)?;
        self.put_bytes(&(end as u16).to_le_bytes())?;
        self.put_bytes(&message.as_bytes()[..end])
    }

    fn put_blob(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        let length =
            u32::try_from(bytes.len()).map_err(|_| EncodeError::ValueTooLong(bytes.len()))?;
        self.put_bytes(&length.to_le_bytes())?;
        self.put_bytes(bytes)
    }
}

/// A decoded reply: a value, or an error status with its message.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Reply<'a> {
    /// The call returned this value.
    Ok(Value<'a>),
    /// The call failed with this status (never [`ReplyStatus::Ok`]) and message.
    Error(ReplyStatus, &'a str),
}

/// Reads encoded data from untrusted bytes, checking every length.
#[derive(Clone)]
pub struct Reader<'a> {
    data: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    /// Starts reading at the beginning of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data, position: 0 }
    }

    /// Returns the offset of the next byte to read.
    pub fn position(&self) -> usize {
        self.position
    }

    /// Fails unless every byte has been read.
    pub fn finish(&self) -> Result<(), DecodeError> {
        let count = self.data.len() - self.position;
        if count == 0 {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes { count })
        }
    }

    fn take(&mut self, count: usize) -> Result<&'a [u8], DecodeError> {
        let available = self.data.len() - self.position;
        if count > available {
            return Err(DecodeError::Truncated {
                offset: self.position,
                needed: count - available,
            });
        }
        let bytes = &self.data[self.position..self.position + count];
        self.position += count;
        Ok(bytes)
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    fn take_u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn take_str(&mut self, length: usize) -> Result<&'a str, DecodeError> {
        let offset = self.position;
        let bytes = self.take(length)?;
        core::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8 { offset })
    }

    /// Reads a call header and returns the function name and argument count.
    pub fn call_header(&mut self) -> Result<(&'a str, usize), DecodeError> {
        let name_length = self.take_u8()? as usize;
        let name = self.take_str(name_length)?;
        let count = self.take_u8()? as usize;
        Ok((name, count))
    }

    /// Reads one tagged value.
    pub fn value(&mut self) -> Result<Value<'a>, DecodeError> {
        let offset = self.position;
        let tag = self.take_u8()?;
        let value_type =
            ValueType::from_tag(tag).ok_or(DecodeError::UnknownType { offset, tag })?;
        Ok(match value_type {
            ValueType::Void => Value::Void,
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.take_array()?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.take_array()?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.take_array()?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.take_array()?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.take_array()?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.take_array()?)),
            ValueType::Bool => {
                let at = self.position;
                match self.take_u8()? {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    _ => return Err(DecodeError::InvalidBool { offset: at }),
                }
            }
            ValueType::String => {
                let length = u32::from_le_bytes(self.take_array()?) as usize;
                Value::String(self.take_str(length)?)
            }
            ValueType::Bytes => {
                let length = u32::from_le_bytes(self.take_array()?) as usize;
                Value::Bytes(self.take(length)?)
            }
        })
    }

    /// Reads a complete reply and checks that nothing follows it.
    pub fn reply(&mut self) -> Result<Reply<'a>, DecodeError> {
        let status_byte = self.take_u8()?;
        let status =
            ReplyStatus::from_byte(status_byte).ok_or(DecodeError::UnknownStatus(status_byte))?;
        let reply = if status == ReplyStatus::Ok {
            Reply::Ok(self.value()?)
        } else {
            let length = u16::from_le_bytes(self.take_array()?) as usize;
            Reply::Error(status, self.take_str(length)?)
        };
        self.finish()?;
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_round_trip() {
        let mut buffer = [0u8; 256];
        let mut writer = Writer::new(&mut buffer);
        let values = [
            Value::I32(-7),
            Value::U32(7),
            Value::I64(i64::MIN),
            Value::U64(u64::MAX),
            Value::F32(1.5),
            Value::F64(-2.25),
            Value::Bool(true),
            Value::String("héllo"),
            Value::Bytes(&[1, 2, 3]),
            Value::Void,
        ];
        writer.put_call_header("echo", values.len()).unwrap();
        for value in &values {
            writer.put_value(value).unwrap();
        }
        let length = writer.position();

        let mut reader = Reader::new(&buffer[..length]);
        let (name, count) = reader.call_header().unwrap();
        assert_eq!(name, "echo");
        assert_eq!(count, values.len());
        for expected in &values {
            assert_eq!(reader.value().unwrap(), *expected);
        }
        assert_eq!(reader.finish(), Ok(()));
    }

    #[test]
    fn reply_round_trip() {
        let mut buffer = [0u8; 64];
        let mut writer = Writer::new(&mut buffer);
        writer
            .put_error_reply(ReplyStatus::UnknownFunction, "nope")
            .unwrap();
        let length = writer.position();
        let reply = Reader::new(&buffer[..length]).reply().unwrap();
        assert_eq!(reply, Reply::Error(ReplyStatus::UnknownFunction, "nope"));
    }

    #[test]
    fn truncated_string_is_rejected() {
        // Tag 8 (string) claiming 1000 bytes with only 2 present.
        let data = [8u8, 0xe8, 0x03, 0, 0, b'a', b'b'];
        let error = Reader::new(&data).value().unwrap_err();
        assert_eq!(
            error,
            DecodeError::Truncated {
                offset: 5,
                needed: 998
            }
        );
    }

    #[test]
    fn writer_reports_overflow() {
        let mut buffer = [0u8; 4];
        let mut writer = Writer::new(&mut buffer);
        let error = writer.put_value(&Value::U64(1)).unwrap_err();
        assert_eq!(
            error,
            EncodeError::BufferTooSmall {
                needed: 8,
                available: 3
            }
        );
    }

    #[test]
    fn every_prefix_of_garbage_decodes_without_panic() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut data = [0u8; 512];
        for _ in 0..2000 {
            for byte in data.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *byte = state as u8;
            }
            let length = (state % 512) as usize;
            let mut reader = Reader::new(&data[..length]);
            let _ = reader.call_header();
            while reader.value().is_ok() {}
            let _ = Reader::new(&data[..length]).reply();
        }
    }
}
