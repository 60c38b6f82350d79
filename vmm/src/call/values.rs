//! Host-side values: what a caller passes to `Sandbox::call` and gets back.

use sandcore_abi::encoding::{EncodeError, Value as WireValue, Writer};

/// An owned value of one of the types a guest function can take or return.
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)]
pub enum Value {
    Void,
    I32(i32),
    U32(u32),
    I64(i64),
    U64(u64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Bytes(Vec<u8>),
}

impl Value {
    /// Borrows the value in its wire form.
    pub fn as_wire(&self) -> WireValue<'_> {
        match self {
            Value::Void => WireValue::Void,
            Value::I32(v) => WireValue::I32(*v),
            Value::U32(v) => WireValue::U32(*v),
            Value::I64(v) => WireValue::I64(*v),
            Value::U64(v) => WireValue::U64(*v),
            Value::F32(v) => WireValue::F32(*v),
            Value::F64(v) => WireValue::F64(*v),
            Value::Bool(v) => WireValue::Bool(*v),
            Value::String(s) => WireValue::String(s),
            Value::Bytes(b) => WireValue::Bytes(b),
        }
    }

    /// Copies a wire value.
    pub fn from_wire(value: WireValue<'_>) -> Value {
        match value {
            WireValue::Void => Value::Void,
            WireValue::I32(v) => Value::I32(v),
            WireValue::U32(v) => Value::U32(v),
            WireValue::I64(v) => Value::I64(v),
            WireValue::U64(v) => Value::U64(v),
            WireValue::F32(v) => Value::F32(v),
            WireValue::F64(v) => Value::F64(v),
            WireValue::Bool(v) => Value::Bool(v),
            WireValue::String(s) => Value::String(s.to_owned()),
            WireValue::Bytes(b) => Value::Bytes(b.to_vec()),
        }
    }

    /// Name of the value's type, for messages.
    pub fn type_name(&self) -> &'static str {
        self.as_wire().value_type().name()
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Void => f.write_str("()"),
            Value::I32(v) => write!(f, "{v}"),
            Value::U32(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::U64(v) => write!(f, "{v}"),
            Value::F32(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
            Value::String(s) => write!(f, "{s:?}"),
            Value::Bytes(b) => write!(f, "<{} bytes>", b.len()),
        }
    }
}

/// A single argument: anything that borrows as a wire value.
pub trait ToArgument {
    /// The value in wire form.
    fn to_wire(&self) -> WireValue<'_>;
}

macro_rules! argument_by_copy {
    ($($ty:ty => $variant:ident),*) => {$(
        impl ToArgument for $ty {
            fn to_wire(&self) -> WireValue<'_> { WireValue::$variant(*self) }
        }
    )*};
}
argument_by_copy!(i32 => I32, u32 => U32, i64 => I64, u64 => U64, f32 => F32, f64 => F64, bool => Bool);

impl ToArgument for &str {
    fn to_wire(&self) -> WireValue<'_> {
        WireValue::String(self)
    }
}

impl ToArgument for String {
    fn to_wire(&self) -> WireValue<'_> {
        WireValue::String(self)
    }
}

impl ToArgument for &[u8] {
    fn to_wire(&self) -> WireValue<'_> {
        WireValue::Bytes(self)
    }
}

impl ToArgument for Vec<u8> {
    fn to_wire(&self) -> WireValue<'_> {
        WireValue::Bytes(self)
    }
}

impl ToArgument for Value {
    fn to_wire(&self) -> WireValue<'_> {
        self.as_wire()
    }
}

/// The argument list of a call: a tuple of [`ToArgument`]s, or a slice of
/// [`Value`]s for calls built at run time.
pub trait Arguments {
    /// Number of arguments.
    fn count(&self) -> usize;
    /// Encodes every argument in order.
    fn encode(&self, writer: &mut Writer<'_>) -> Result<(), EncodeError>;
}

impl Arguments for () {
    fn count(&self) -> usize {
        0
    }
    fn encode(&self, _: &mut Writer<'_>) -> Result<(), EncodeError> {
        Ok(())
    }
}

macro_rules! arguments_for_tuple {
    ($count:expr; $($name:ident . $index:tt),+) => {
        impl<$($name: ToArgument),+> Arguments for ($($name,)+) {
            fn count(&self) -> usize { $count }
            fn encode(&self, writer: &mut Writer<'_>) -> Result<(), EncodeError> {
                $(writer.put_value(&self.$index.to_wire())?;)+
                Ok(())
            }
        }
    };
}
arguments_for_tuple!(1; A.0);
arguments_for_tuple!(2; A.0, B.1);
arguments_for_tuple!(3; A.0, B.1, C.2);
arguments_for_tuple!(4; A.0, B.1, C.2, D.3);
arguments_for_tuple!(5; A.0, B.1, C.2, D.3, E.4);
arguments_for_tuple!(6; A.0, B.1, C.2, D.3, E.4, F.5);

impl Arguments for [Value] {
    fn count(&self) -> usize {
        self.len()
    }
    fn encode(&self, writer: &mut Writer<'_>) -> Result<(), EncodeError> {
        for value in self {
            writer.put_value(&value.as_wire())?;
        }
        Ok(())
    }
}

impl Arguments for Vec<Value> {
    fn count(&self) -> usize {
        self.len()
    }
    fn encode(&self, writer: &mut Writer<'_>) -> Result<(), EncodeError> {
        self.as_slice().encode(writer)
    }
}

/// A type a guest call can return; also the parameter types of host functions.
pub trait FromValue: Sized {
    /// Name of the expected type, for messages.
    const TYPE_NAME: &'static str;
    /// Converts a wire value, or `None` if its type differs.
    fn from_wire(value: WireValue<'_>) -> Option<Self>;
}

macro_rules! from_value_by_copy {
    ($($ty:ty => $variant:ident, $name:literal),*) => {$(
        impl FromValue for $ty {
            const TYPE_NAME: &'static str = $name;
            fn from_wire(value: WireValue<'_>) -> Option<Self> {
                match value { WireValue::$variant(v) => Some(v), _ => None }
            }
        }
    )*};
}
from_value_by_copy!(
    i32 => I32, "i32", u32 => U32, "u32", i64 => I64, "i64", u64 => U64, "u64",
    f32 => F32, "f32", f64 => F64, "f64", bool => Bool, "bool"
);

impl FromValue for () {
    const TYPE_NAME: &'static str = "void";
    fn from_wire(value: WireValue<'_>) -> Option<Self> {
        matches!(value, WireValue::Void).then_some(())
    }
}

impl FromValue for String {
    const TYPE_NAME: &'static str = "string";
    fn from_wire(value: WireValue<'_>) -> Option<Self> {
        match value {
            WireValue::String(s) => Some(s.to_owned()),
            _ => None,
        }
    }
}

impl FromValue for Vec<u8> {
    const TYPE_NAME: &'static str = "bytes";
    fn from_wire(value: WireValue<'_>) -> Option<Self> {
        match value {
            WireValue::Bytes(b) => Some(b.to_vec()),
            _ => None,
        }
    }
}

impl FromValue for Value {
    const TYPE_NAME: &'static str = "any value";
    fn from_wire(value: WireValue<'_>) -> Option<Self> {
        Some(Value::from_wire(value))
    }
}

/// A type a host function can return.
pub trait IntoValue {
    /// Converts into an owned value.
    fn into_value(self) -> Value;
}

macro_rules! into_value {
    ($($ty:ty => $variant:ident),*) => {$(
        impl IntoValue for $ty {
            fn into_value(self) -> Value { Value::$variant(self) }
        }
    )*};
}
into_value!(i32 => I32, u32 => U32, i64 => I64, u64 => U64, f32 => F32, f64 => F64, bool => Bool, String => String, Vec<u8> => Bytes);

impl IntoValue for () {
    fn into_value(self) -> Value {
        Value::Void
    }
}

impl IntoValue for Value {
    fn into_value(self) -> Value {
        self
    }
}
