//! Calls from the guest to functions the host registered.

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;
use sandcore_abi::encoding::{Reader, Reply, ReplyStatus, Value, Writer};
use sandcore_abi::ports::PORT_HOST_CALL;
use sandcore_abi::slot::{OUTPUT_HOST_CALL, OUTPUT_HOST_REPLY};

use crate::port::exit_to_host;
use crate::shared::Buffer;

/// Name of the host function behind [`print`]; the host always provides it.
pub const PRINT_FUNCTION: &str = "__sandcore_print";

/// A value returned by a host function, owned because the output buffer it
/// arrived in is reused by the next call.
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)]
pub enum HostValue {
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

/// Why a host-function call failed.
#[derive(Clone, Debug, PartialEq)]
pub enum HostCallError {
    /// The request does not fit into the output buffer.
    RequestTooLarge,
    /// The host returned an error status with this message.
    Failed(ReplyStatus, String),
    /// The host's reply could not be decoded.
    MalformedReply,
}

/// Calls the host function `name` with `arguments` and returns its result.
///
/// With the exit transport this costs one VM exit; with the polling transport
/// the waiting host thread serves it with no exit.
pub fn call_host(name: &str, arguments: &[Value<'_>]) -> Result<HostValue, HostCallError> {
    let output = Buffer::output();
    let header = output.header();

    let mut writer = Writer::new(output.payload_mut());
    writer
        .put_call_header(name, arguments.len())
        .map_err(|_| HostCallError::RequestTooLarge)?;
    for argument in arguments {
        writer
            .put_value(argument)
            .map_err(|_| HostCallError::RequestTooLarge)?;
    }
    header
        .length
        .store(writer.position() as u32, Ordering::Relaxed);
    header.state.store(OUTPUT_HOST_CALL, Ordering::SeqCst);

    let input = Buffer::input();
    let polling = input.header().poll_idle_ticks.load(Ordering::Relaxed) != 0;
    if polling {
        crate::entry::notify_waiting_host(&input);
        while header.state.load(Ordering::Acquire) != OUTPUT_HOST_REPLY {
            core::hint::spin_loop();
        }
    } else {
        exit_to_host(PORT_HOST_CALL);
        if header.state.load(Ordering::Acquire) != OUTPUT_HOST_REPLY {
            return Err(HostCallError::MalformedReply);
        }
    }

    let reply = Reader::new(output.received())
        .reply()
        .map_err(|_| HostCallError::MalformedReply)?;
    match reply {
        Reply::Ok(value) => Ok(to_owned(value)),
        Reply::Error(status, message) => Err(HostCallError::Failed(status, message.into())),
    }
}

fn to_owned(value: Value<'_>) -> HostValue {
    match value {
        Value::Void => HostValue::Void,
        Value::I32(v) => HostValue::I32(v),
        Value::U32(v) => HostValue::U32(v),
        Value::I64(v) => HostValue::I64(v),
        Value::U64(v) => HostValue::U64(v),
        Value::F32(v) => HostValue::F32(v),
        Value::F64(v) => HostValue::F64(v),
        Value::Bool(v) => HostValue::Bool(v),
        Value::String(s) => HostValue::String(s.into()),
        Value::Bytes(b) => HostValue::Bytes(b.into()),
    }
}

/// Sends `message` to the host's debug output. Errors are ignored, because a
/// debug print has no one to report them to.
pub fn print(message: &str) {
    let _ = call_host(PRINT_FUNCTION, &[Value::String(message)]);
}
