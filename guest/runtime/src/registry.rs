//! The table of guest functions and the dispatch of one call request.

use alloc::string::String;
use alloc::vec::Vec;
use sandcore_abi::encoding::{Reader, ReplyStatus, Value, ValueType, Writer};

/// Reads the arguments of one call in order.
pub struct Arguments<'a> {
    reader: Reader<'a>,
    remaining: usize,
    index: usize,
}

/// Reason a call could not run; the host turns it into a typed error.
#[derive(Debug)]
pub enum CallError {
    /// Wrong number or type of arguments; the text names which.
    ArgumentMismatch(String),
    /// The request bytes could not be decoded.
    Malformed(String),
    /// The result does not fit into the output buffer.
    ReplyTooLarge(String),
}

impl<'a> Arguments<'a> {
    /// Decodes the next argument as `T`.
    pub fn next_argument<T: Arg<'a>>(&mut self) -> Result<T, CallError> {
        if self.remaining == 0 {
            return Err(CallError::ArgumentMismatch(alloc::format!(
                "expected type {} for argument {}, but only {} arguments were given",
                T::TYPE.name(),
                self.index,
                self.index
            )));
        }
        let value = self
            .reader
            .value()
            .map_err(|e| CallError::Malformed(alloc::format!("{e}")))?;
        let index = self.index;
        self.remaining -= 1;
        self.index += 1;
        T::from_value(value).ok_or_else(|| {
            CallError::ArgumentMismatch(alloc::format!(
                "argument {index} has type {}, expected {}",
                value.value_type().name(),
                T::TYPE.name()
            ))
        })
    }

    /// Fails unless exactly `count` arguments were given.
    pub fn expect_count(&self, count: usize) -> Result<(), CallError> {
        if self.remaining != count {
            return Err(CallError::ArgumentMismatch(alloc::format!(
                "{} arguments given, the function takes {count}",
                self.remaining
            )));
        }
        Ok(())
    }
}

/// A parameter type of a guest function.
pub trait Arg<'a>: Sized {
    /// Type tag expected on the wire.
    const TYPE: ValueType;
    /// Converts a decoded value, or `None` if its type differs.
    fn from_value(value: Value<'a>) -> Option<Self>;
}

macro_rules! arg_by_copy {
    ($($ty:ty => $variant:ident),*) => {$(
        impl<'a> Arg<'a> for $ty {
            const TYPE: ValueType = ValueType::$variant;
            fn from_value(value: Value<'a>) -> Option<Self> {
                match value { Value::$variant(v) => Some(v), _ => None }
            }
        }
    )*};
}
arg_by_copy!(i32 => I32, u32 => U32, i64 => I64, u64 => U64, f32 => F32, f64 => F64, bool => Bool);

impl<'a> Arg<'a> for &'a str {
    const TYPE: ValueType = ValueType::String;
    fn from_value(value: Value<'a>) -> Option<Self> {
        match value {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

impl<'a> Arg<'a> for &'a [u8] {
    const TYPE: ValueType = ValueType::Bytes;
    fn from_value(value: Value<'a>) -> Option<Self> {
        match value {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }
}

impl<'a> Arg<'a> for String {
    const TYPE: ValueType = ValueType::String;
    fn from_value(value: Value<'a>) -> Option<Self> {
        <&str>::from_value(value).map(String::from)
    }
}

impl<'a> Arg<'a> for Vec<u8> {
    const TYPE: ValueType = ValueType::Bytes;
    fn from_value(value: Value<'a>) -> Option<Self> {
        <&[u8]>::from_value(value).map(Vec::from)
    }
}

/// A return type of a guest function.
pub trait ReturnValue {
    /// Converts the result into a value to encode.
    fn to_value(&self) -> Value<'_>;
}

macro_rules! return_by_copy {
    ($($ty:ty => $variant:ident),*) => {$(
        impl ReturnValue for $ty {
            fn to_value(&self) -> Value<'_> { Value::$variant(*self) }
        }
    )*};
}
return_by_copy!(i32 => I32, u32 => U32, i64 => I64, u64 => U64, f32 => F32, f64 => F64, bool => Bool);

impl ReturnValue for () {
    fn to_value(&self) -> Value<'_> {
        Value::Void
    }
}

impl ReturnValue for String {
    fn to_value(&self) -> Value<'_> {
        Value::String(self)
    }
}

impl ReturnValue for &str {
    fn to_value(&self) -> Value<'_> {
        Value::String(self)
    }
}

impl ReturnValue for Vec<u8> {
    fn to_value(&self) -> Value<'_> {
        Value::Bytes(self)
    }
}

/// Type-erased guest function: decodes its arguments, runs, encodes its
/// result into the writer.
pub type Handler = for<'a, 'b> fn(&mut Arguments<'a>, &mut Writer<'b>) -> Result<(), CallError>;

/// The guest's functions by name.
pub struct Registry {
    entries: Vec<(&'static str, Handler)>,
}

impl Registry {
    pub(crate) fn new() -> Self {
        Registry {
            entries: Vec::new(),
        }
    }

    /// Registers `handler` under `name`; a later registration of the same
    /// name replaces the earlier one. Use [`register!`](crate::register).
    pub fn add(&mut self, name: &'static str, handler: Handler) {
        if let Some(entry) = self.entries.iter_mut().find(|(n, _)| *n == name) {
            entry.1 = handler;
        } else {
            self.entries.push((name, handler));
        }
    }

    /// Runs the call in `request` and writes the reply into `reply`.
    /// Returns the reply length in bytes.
    pub(crate) fn dispatch(&self, request: &[u8], reply: &mut [u8]) -> usize {
        let mut reader = Reader::new(request);
        let (name, count) = match reader.call_header() {
            Ok(header) => header,
            Err(error) => {
                return write_error(
                    reply,
                    ReplyStatus::MalformedRequest,
                    &alloc::format!("{error}"),
                );
            }
        };
        let Some((_, handler)) = self.entries.iter().find(|(n, _)| *n == name) else {
            return write_error(reply, ReplyStatus::UnknownFunction, name);
        };

        let mut arguments = Arguments {
            reader,
            remaining: count,
            index: 0,
        };
        let mut writer = Writer::new(reply);
        match handler(&mut arguments, &mut writer) {
            Ok(()) => writer.position(),
            Err(CallError::ArgumentMismatch(text)) => {
                write_error(reply, ReplyStatus::ArgumentMismatch, &text)
            }
            Err(CallError::Malformed(text)) => {
                write_error(reply, ReplyStatus::MalformedRequest, &text)
            }
            Err(CallError::ReplyTooLarge(text)) => {
                write_error(reply, ReplyStatus::ReplyTooLarge, &text)
            }
        }
    }
}

fn write_error(reply: &mut [u8], status: ReplyStatus, message: &str) -> usize {
    let mut writer = Writer::new(reply);
    // A reply buffer smaller than the error is the host's configuration
    // error; the host then gets an empty, undecodable reply and reports it.
    match writer.put_error_reply(status, message) {
        Ok(()) => writer.position(),
        Err(_) => 0,
    }
}

/// Encodes a function's result, or reports that it does not fit.
#[doc(hidden)]
pub fn write_result<R: ReturnValue>(writer: &mut Writer<'_>, result: &R) -> Result<(), CallError> {
    writer
        .put_ok_reply(&result.to_value())
        .map_err(|error| CallError::ReplyTooLarge(alloc::format!("{error}")))
}

/// Registers guest functions in one line each, with their parameter types:
///
/// ```ignore
/// register!(registry, echo(&str) -> String);
/// register!(registry, add(i32, i32) -> i32);
/// register!(registry, noop());
/// ```
#[macro_export]
macro_rules! register {
    ($registry:expr, $function:ident ( $($arg:ty),* ) $(-> $ret:ty)?) => {
        $registry.add(stringify!($function), |arguments, writer| {
            let parameter_names: &[&str] = &[$(stringify!($arg)),*];
            arguments.expect_count(parameter_names.len())?;
            let result $(: $ret)? = $function($(arguments.next_argument::<$arg>()?),*);
            $crate::registry::write_result(writer, &result)
        })
    };
}
