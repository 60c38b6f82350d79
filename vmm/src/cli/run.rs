//! `sandcore run`: calls one guest function with typed arguments.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use sandcore::{SandboxError, Value};

use super::CliError;

/// Time to wait for the dump of a crashed call to be written.
#[cfg(feature = "crashdump")]
const DUMP_WAIT: Duration = Duration::from_secs(10);

#[derive(Args)]
#[command(after_help = "ARGUMENT TYPES:\n  \
    i32:5  u32:5  i64:-1  u64:7  f32:1.5  f64:2.5  bool:true  str:hello  bytes:48656c6c6f (hexadecimal)\n  \
    A value without a known prefix is a string. Use str:VALUE for strings that contain a colon.\n\n\
    Crash dumps go to $SANDCORE_CORE_DUMP_DIR, or to the system temp directory if it is unset.\n\
    Exit status: 0 on success, 1 if the call or the sandbox failed, 2 for invalid usage.")]
pub struct RunArgs {
    /// Guest ELF to load [default: the demo guest embedded in this binary].
    #[arg(long, value_name = "FILE")]
    pub guest: Option<PathBuf>,

    /// Guest function to call.
    #[arg(value_name = "FUNCTION")]
    pub function: String,

    /// Arguments, each TYPE:VALUE (see ARGUMENT TYPES below).
    #[arg(value_name = "ARGS", allow_negative_numbers = true)]
    pub arguments: Vec<String>,

    /// Time limit of the call in milliseconds. A longer call fails as timed out [default: no limit].
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub time_limit: Option<u64>,

    /// Guest heap size in bytes, a multiple of 4096 and at least 65536 [default: 4194304 (4 MiB)].
    #[arg(long, value_name = "BYTES")]
    pub heap_size: Option<u64>,

    /// Also write a crash dump when the call times out, to show where the guest hung.
    #[arg(long)]
    pub dump_on_timeout: bool,
}

/// Runs `sandcore run`.
pub fn run(args: &RunArgs) -> Result<(), CliError> {
    let arguments = args
        .arguments
        .iter()
        .map(|text| parse_argument(text))
        .collect::<Result<Vec<Value>, String>>()
        .map_err(CliError::Usage)?;

    let mut builder = super::builder_for_guest(args.guest.as_deref());
    if let Some(milliseconds) = args.time_limit {
        builder = builder.call_time_limit(Duration::from_millis(milliseconds));
    }
    if let Some(bytes) = args.heap_size {
        builder = builder.heap_size(bytes);
    }
    // The demo guest's call_host_add needs it; other guests ignore it.
    builder = builder
        .dump_on_timeout(args.dump_on_timeout)
        .host_function("host_add", |a: i64, b: i64| a.wrapping_add(b));
    #[cfg(feature = "crashdump")]
    let worker = sandcore::dump::DumpWorker::for_directory(None)?;
    #[cfg(feature = "crashdump")]
    {
        builder = builder.dump_worker(&worker);
    }

    let mut sandbox = builder.build()?;
    match sandbox.call::<Value>(&args.function, arguments) {
        Ok(value) => {
            println!("{value}");
            Ok(())
        }
        Err(error) => {
            #[cfg(feature = "crashdump")]
            report_dump(&worker, &error);
            Err(CliError::Failure(call_error_message(
                &args.function,
                &error,
            )))
        }
    }
}

fn call_error_message(function: &str, error: &SandboxError) -> String {
    match error {
        SandboxError::UnknownFunction { .. } => {
            format!("{error}; check the name, the demo guest's functions are listed in guest/demo/src/main.rs")
        }
        _ => format!("call to {function:?} failed: {error}"),
    }
}

/// Prints where the dump of a crashed call went, after the worker wrote it.
#[cfg(feature = "crashdump")]
fn report_dump(worker: &sandcore::dump::DumpWorker, error: &SandboxError) {
    let Some(dump_id) = error.dump_id() else {
        return;
    };
    match worker.wait_for(dump_id, DUMP_WAIT) {
        Some(receipt) => match receipt.file_path() {
            Some(path) => eprintln!("crash dump: {}", path.display()),
            None => eprintln!(
                "crash dump {dump_id} was not stored; see the log above for the sink's error"
            ),
        },
        None => eprintln!(
            "crash dump {dump_id} was not written within {} s",
            DUMP_WAIT.as_secs()
        ),
    }
}

/// Parses one `TYPE:VALUE` argument. A value without a known type prefix is a string.
pub fn parse_argument(text: &str) -> Result<Value, String> {
    let Some((prefix, value)) = text.split_once(':') else {
        return Ok(Value::String(text.to_owned()));
    };
    let invalid = |expected: &str| {
        format!("invalid argument '{text}': expected {expected} after '{prefix}:'")
    };
    let parsed = match prefix {
        "i32" => Value::I32(value.parse().map_err(|_| invalid("a 32-bit integer"))?),
        "u32" => Value::U32(
            value
                .parse()
                .map_err(|_| invalid("an unsigned 32-bit integer"))?,
        ),
        "i64" => Value::I64(value.parse().map_err(|_| invalid("a 64-bit integer"))?),
        "u64" => Value::U64(
            value
                .parse()
                .map_err(|_| invalid("an unsigned 64-bit integer"))?,
        ),
        "f32" => Value::F32(
            value
                .parse()
                .map_err(|_| invalid("a 32-bit floating-point number"))?,
        ),
        "f64" => Value::F64(
            value
                .parse()
                .map_err(|_| invalid("a 64-bit floating-point number"))?,
        ),
        "bool" => Value::Bool(value.parse().map_err(|_| invalid("true or false"))?),
        "str" => Value::String(value.to_owned()),
        "bytes" => Value::Bytes(
            parse_hex(value).map_err(|reason| invalid(&format!("hexadecimal bytes ({reason})")))?,
        ),
        // Not a type prefix: the whole text, colon included, is a string.
        _ => Value::String(text.to_owned()),
    };
    Ok(parsed)
}

/// Decodes hexadecimal text such as `48656c6c6f`. An empty text is zero bytes.
fn parse_hex(text: &str) -> Result<Vec<u8>, String> {
    if let Some(bad) = text.chars().find(|ch| !ch.is_ascii_hexdigit()) {
        return Err(format!("'{bad}' is not a hexadecimal digit"));
    }
    if text.len() % 2 == 1 {
        return Err(format!("odd number of digits: {}", text.len()));
    }
    let digit = |byte: u8| (byte as char).to_digit(16).unwrap_or(0) as u8;
    Ok(text
        .as_bytes()
        .chunks(2)
        .map(|pair| digit(pair[0]) << 4 | digit(pair[1]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_arguments() {
        let cases = [
            ("i32:-5", Value::I32(-5)),
            ("u32:5", Value::U32(5)),
            ("i64:-1", Value::I64(-1)),
            ("u64:18446744073709551615", Value::U64(u64::MAX)),
            ("f32:1.5", Value::F32(1.5)),
            ("f64:2.5", Value::F64(2.5)),
            ("bool:true", Value::Bool(true)),
            ("bool:false", Value::Bool(false)),
            ("str:a:b", Value::String("a:b".into())),
            ("str:", Value::String(String::new())),
            ("bytes:00ff10", Value::Bytes(vec![0, 0xff, 0x10])),
            ("bytes:ABcd", Value::Bytes(vec![0xab, 0xcd])),
            ("bytes:", Value::Bytes(Vec::new())),
            ("hello", Value::String("hello".into())),
            ("-5", Value::String("-5".into())),
            ("http://x", Value::String("http://x".into())),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_argument(text), Ok(expected), "argument {text}");
        }
    }

    #[test]
    fn invalid_typed_arguments() {
        let cases = [
            ("i32:x", "invalid argument 'i32:x': expected a 32-bit integer after 'i32:'"),
            ("i32:4294967296", "invalid argument 'i32:4294967296': expected a 32-bit integer after 'i32:'"),
            ("u32:-1", "invalid argument 'u32:-1': expected an unsigned 32-bit integer after 'u32:'"),
            ("bool:yes", "invalid argument 'bool:yes': expected true or false after 'bool:'"),
            ("f64:", "invalid argument 'f64:': expected a 64-bit floating-point number after 'f64:'"),
            ("bytes:abc", "invalid argument 'bytes:abc': expected hexadecimal bytes (odd number of digits: 3) after 'bytes:'"),
            ("bytes:zz", "invalid argument 'bytes:zz': expected hexadecimal bytes ('z' is not a hexadecimal digit) after 'bytes:'"),
            ("bytes:+f", "invalid argument 'bytes:+f': expected hexadecimal bytes ('+' is not a hexadecimal digit) after 'bytes:'"),
            ("bytes:é1", "invalid argument 'bytes:é1': expected hexadecimal bytes ('é' is not a hexadecimal digit) after 'bytes:'"),
        ];
        for (text, message) in cases {
            assert_eq!(
                parse_argument(text),
                Err(message.to_string()),
                "argument {text}"
            );
        }
    }
}
