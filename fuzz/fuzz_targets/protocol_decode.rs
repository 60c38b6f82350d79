//! Fuzz target: the stream protocol decoder, in both roles, over arbitrary
//! bytes cut into arbitrary chunks. The decoder must never panic, must make
//! progress on every non-empty chunk and must stay failed after an error.
//!
//! With the `libfuzzer` feature (the default) this is a cargo-fuzz target.
//! Without it, it is a plain program that runs the same check over the files
//! given as arguments, or over built-in seed inputs when given none.
#![cfg_attr(feature = "libfuzzer", no_main)]

use sandcore_sinks::protocol::{DecodeError, Decoder, Limits, Message, Role};

fn check(input: &[u8]) {
    let Some((&control, stream)) = input.split_first() else {
        return;
    };
    // The first byte picks the role, the chunk size and tight or loose limits.
    let role = if control & 1 == 0 {
        Role::Collector
    } else {
        Role::Producer
    };
    let chunk_size = 1 + (control as usize >> 2) % 32;
    let limits = if control & 2 == 0 {
        Limits::default()
    } else {
        Limits {
            max_frame_size: 64,
            max_metadata_size: 96,
            max_dump_size: 4096,
        }
    };
    let mut decoder = Decoder::new(role, limits);
    for chunk in stream.chunks(chunk_size) {
        let mut rest = chunk;
        while !rest.is_empty() {
            match decoder.decode(rest) {
                Ok((consumed, message)) => {
                    assert!(consumed <= rest.len());
                    assert!(consumed > 0 || message.is_some());
                    if let Some(Message::Data(bytes)) = message {
                        assert!(bytes.len() <= limits.max_frame_size as usize);
                    }
                    rest = &rest[consumed..];
                }
                Err(_) => {
                    assert_eq!(decoder.decode(rest), Err(DecodeError::Failed));
                    return;
                }
            }
        }
    }
}

#[cfg(feature = "libfuzzer")]
libfuzzer_sys::fuzz_target!(|data: &[u8]| check(data));

#[cfg(not(feature = "libfuzzer"))]
fn main() {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    if paths.is_empty() {
        let seeds: [&[u8]; 3] = [
            b"\x00\x01\x00\x00\x00\x13\x00\x00\x00SANDCORE\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00",
            b"\x01\x02\x00\x00\x00\x0c\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
            &[0xFF; 64],
        ];
        for seed in seeds {
            check(seed);
        }
        println!("checked {} built-in seeds", seeds.len());
        return;
    }
    for path in &paths {
        let input =
            std::fs::read(path).unwrap_or_else(|error| panic!("failed to read {path}: {error}"));
        check(&input);
    }
    println!("checked {} inputs", paths.len());
}
