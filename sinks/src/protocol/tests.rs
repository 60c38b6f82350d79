extern crate std;

use std::vec::Vec;

use super::*;
use crate::snapshot::CrashKind;

fn metadata(dump_id: u64, total_size: u64) -> DumpMetadata {
    let mut guest_name = heapless::String::new();
    guest_name.push_str("demo-guest").unwrap();
    let mut build_id = heapless::Vec::new();
    build_id.extend_from_slice(&[0xAB; 20]).unwrap();
    DumpMetadata {
        dump_id,
        sandbox_id: 7,
        guest_name,
        build_id,
        kind: CrashKind::Exception {
            vector: 14,
            error_code: 6,
        },
        timestamp_ns: 1_700_000_000_123_456_789,
        total_size,
    }
}

fn push(stream: &mut Vec<u8>, encode: impl FnOnce(&mut [u8]) -> Result<usize, EncodeError>) {
    let mut buffer = [0u8; 512];
    let length = encode(&mut buffer).unwrap();
    stream.extend_from_slice(&buffer[..length]);
}

/// A producer stream: hello, then two dumps mixing data and holes.
fn producer_stream() -> (Vec<u8>, Vec<u8>) {
    let mut stream = Vec::new();
    let mut logical = Vec::new();
    push(&mut stream, |b| encode_client_hello(42, b"secret", b));
    for dump_id in [1u64, 2] {
        let first: Vec<u8> = (0..100u32)
            .map(|i| (i * 7 + dump_id as u32) as u8)
            .collect();
        let second = b"tail bytes";
        let total = (first.len() + 4096 + second.len()) as u64;
        let mut dump = Vec::new();
        dump.extend_from_slice(&first);
        dump.resize(dump.len() + 4096, 0);
        dump.extend_from_slice(second);
        push(&mut stream, |b| encode_begin(&metadata(dump_id, total), b));
        push(&mut stream, |b| encode_data(&first, b));
        push(&mut stream, |b| encode_hole(4096, b));
        push(&mut stream, |b| encode_data(&[], b));
        push(&mut stream, |b| encode_data(second, b));
        push(&mut stream, |b| encode_end(total, crc32c(&dump), b));
        logical.extend_from_slice(&dump);
    }
    (stream, logical)
}

/// Messages with `Data` fragments merged, so that chunking does not change the result.
#[derive(Debug, PartialEq)]
enum Event {
    Client(ClientHello),
    Server(ServerHello),
    Begin(DumpMetadata),
    Data(Vec<u8>),
    Hole(u64),
    End(End),
    Ack(u64),
    Reject(Reject),
}

fn record(events: &mut Vec<Event>, message: Message<'_>) {
    let event = match message {
        Message::ClientHello(hello) => Event::Client(hello),
        Message::ServerHello(hello) => Event::Server(hello),
        Message::Begin(metadata) => Event::Begin(metadata),
        Message::Data(bytes) => {
            if let Some(Event::Data(previous)) = events.last_mut() {
                previous.extend_from_slice(bytes);
                return;
            }
            Event::Data(bytes.to_vec())
        }
        Message::Hole(length) => Event::Hole(length),
        Message::End(end) => Event::End(end),
        Message::Ack(id) => Event::Ack(id),
        Message::Reject(reject) => Event::Reject(reject),
    };
    events.push(event);
}

/// Feeds `chunks` to `decoder`, returning the events and the first error.
fn feed<'a>(
    decoder: &mut Decoder,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> (Vec<Event>, Option<DecodeError>) {
    let mut events = Vec::new();
    for chunk in chunks {
        let mut rest = chunk;
        while !rest.is_empty() {
            match decoder.decode(rest) {
                Ok((consumed, message)) => {
                    assert!(
                        consumed > 0 || message.is_some(),
                        "decoder made no progress"
                    );
                    assert!(consumed <= rest.len());
                    rest = &rest[consumed..];
                    if let Some(message) = message {
                        record(&mut events, message);
                    }
                }
                Err(error) => return (events, Some(error)),
            }
        }
    }
    (events, None)
}

fn collector() -> Decoder {
    Decoder::new(Role::Collector, Limits::default())
}

#[test]
fn decode_whole_stream() {
    let (stream, _) = producer_stream();
    let (events, error) = feed(&mut collector(), [&stream[..]]);
    assert_eq!(error, None);
    assert_eq!(events.len(), 1 + 2 * 6 - 2, "events: {events:?}");
    let Event::Client(hello) = &events[0] else {
        panic!("first event is {:?}", events[0]);
    };
    assert_eq!(hello.version, VERSION);
    assert_eq!(hello.producer_id, 42);
    assert_eq!(&hello.token[..], b"secret");
    assert_eq!(events[1], Event::Begin(metadata(1, 4206)));
    assert_eq!(events[3], Event::Hole(4096));
    let Event::End(end) = &events[5] else {
        panic!("sixth event is {:?}", events[5]);
    };
    assert_eq!(end.dump_id, 1);
    assert_eq!(end.total_length, 4206);
    assert!(end.checksum_matches());
}

#[test]
fn decode_split_at_every_byte() {
    let (stream, _) = producer_stream();
    let (expected, error) = feed(&mut collector(), [&stream[..]]);
    assert_eq!(error, None);
    for split in 0..=stream.len() {
        let (events, error) = feed(&mut collector(), [&stream[..split], &stream[split..]]);
        assert_eq!(error, None, "split at {split}");
        assert_eq!(events, expected, "split at {split}");
    }
}

#[test]
fn decode_one_byte_at_a_time() {
    let (stream, logical) = producer_stream();
    let (events, error) = feed(&mut collector(), stream.chunks(1));
    assert_eq!(error, None);
    let mut rebuilt = Vec::new();
    for event in &events {
        match event {
            Event::Data(bytes) => rebuilt.extend_from_slice(bytes),
            Event::Hole(length) => rebuilt.resize(rebuilt.len() + *length as usize, 0),
            _ => {}
        }
    }
    assert_eq!(rebuilt, logical);
}

#[test]
fn decode_producer_side() {
    let mut stream = Vec::new();
    let mut message = heapless::String::new();
    message.push_str("ok").unwrap();
    let hello = ServerHello {
        version: VERSION,
        status: HelloStatus::Accepted,
        max_dump_size: 1 << 30,
        message,
    };
    push(&mut stream, |b| encode_server_hello(&hello, b));
    push(&mut stream, |b| encode_ack(9, b));
    push(&mut stream, |b| {
        encode_reject(10, RejectReason::TooLarge, "dump too large", b)
    });
    for split in 0..=stream.len() {
        let mut decoder = Decoder::new(Role::Producer, Limits::default());
        let (events, error) = feed(&mut decoder, [&stream[..split], &stream[split..]]);
        assert_eq!(error, None);
        assert_eq!(events[0], Event::Server(hello.clone()));
        assert_eq!(events[1], Event::Ack(9));
        let Event::Reject(reject) = &events[2] else {
            panic!("third event is {:?}", events[2]);
        };
        assert_eq!(reject.dump_id, 10);
        assert_eq!(reject.reason, RejectReason::TooLarge);
        assert_eq!(reject.message.as_str(), "dump too large");
    }
}

#[test]
fn decode_rejected_hello_ends_conversation() {
    let mut stream = Vec::new();
    let hello = ServerHello {
        version: VERSION,
        status: HelloStatus::InvalidToken,
        max_dump_size: 0,
        message: heapless::String::new(),
    };
    push(&mut stream, |b| encode_server_hello(&hello, b));
    push(&mut stream, |b| encode_ack(1, b));
    let mut decoder = Decoder::new(Role::Producer, Limits::default());
    let (events, error) = feed(&mut decoder, [&stream[..]]);
    assert_eq!(events, [Event::Server(hello)]);
    assert_eq!(error, Some(DecodeError::Failed));
}

#[test]
fn crash_kinds_round_trip() {
    let kinds = [
        CrashKind::Exception {
            vector: 255,
            error_code: u64::MAX,
        },
        CrashKind::StackOverflow {
            address: 0xdead_b000,
        },
        CrashKind::Panic,
        CrashKind::TripleFault,
        CrashKind::InternalError,
        CrashKind::UnexpectedExit,
        CrashKind::Timeout,
        CrashKind::Cancelled,
        CrashKind::OnDemand,
    ];
    for kind in kinds {
        let mut stream = Vec::new();
        let mut meta = metadata(3, 0);
        meta.kind = kind;
        meta.guest_name.clear();
        meta.build_id.clear();
        push(&mut stream, |b| encode_client_hello(1, b"", b));
        push(&mut stream, |b| encode_begin(&meta, b));
        let (events, error) = feed(&mut collector(), [&stream[..]]);
        assert_eq!(error, None);
        assert_eq!(events[1], Event::Begin(meta));
    }
}

/// Stream that starts with a valid hello, followed by `frames`.
fn after_hello(frames: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut stream = Vec::new();
    push(&mut stream, |b| encode_client_hello(1, b"", b));
    frames(&mut stream);
    stream
}

fn first_error(decoder: &mut Decoder, stream: &[u8]) -> Option<DecodeError> {
    feed(decoder, [stream]).1
}

#[test]
fn limit_frame_size() {
    let stream = after_hello(|s| {
        push(s, |b| encode_begin(&metadata(1, 100), b));
        push(s, |b| encode_data(&[1; 65], b));
    });
    let limits = Limits {
        max_frame_size: 64,
        ..Limits::default()
    };
    let error = first_error(&mut Decoder::new(Role::Collector, limits), &stream);
    assert_eq!(
        error,
        Some(DecodeError::FrameTooLarge {
            length: 65,
            limit: 64
        })
    );
}

#[test]
fn limit_metadata_size() {
    let stream = after_hello(|s| push(s, |b| encode_begin(&metadata(1, 100), b)));
    let limits = Limits {
        max_metadata_size: 40,
        ..Limits::default()
    };
    let error = first_error(&mut Decoder::new(Role::Collector, limits), &stream);
    assert!(
        matches!(
            error,
            Some(DecodeError::MetadataTooLarge {
                frame_type: FrameType::Begin,
                limit: 40,
                ..
            })
        ),
        "{error:?}"
    );
}

#[test]
fn limit_control_payload_cap() {
    // A header announcing a huge control payload fails before any buffering.
    let mut stream = after_hello(|_| {});
    stream.extend_from_slice(&[FrameType::Begin as u8, 0, 0, 0]);
    stream.extend_from_slice(&u32::MAX.to_le_bytes());
    let limits = Limits {
        max_metadata_size: u32::MAX,
        ..Limits::default()
    };
    let error = first_error(&mut Decoder::new(Role::Collector, limits), &stream);
    assert_eq!(
        error,
        Some(DecodeError::MetadataTooLarge {
            frame_type: FrameType::Begin,
            length: u32::MAX,
            limit: MAX_CONTROL_PAYLOAD as u32
        })
    );
}

#[test]
fn limit_dump_size() {
    let stream = after_hello(|s| push(s, |b| encode_begin(&metadata(5, 1001), b)));
    let limits = Limits {
        max_dump_size: 1000,
        ..Limits::default()
    };
    let error = first_error(&mut Decoder::new(Role::Collector, limits), &stream);
    assert_eq!(
        error,
        Some(DecodeError::DumpTooLarge {
            dump_id: 5,
            total_size: 1001,
            limit: 1000
        })
    );
}

#[test]
fn overrun_by_data_and_hole() {
    let data = after_hello(|s| {
        push(s, |b| encode_begin(&metadata(1, 10), b));
        push(s, |b| encode_data(&[1; 11], b));
    });
    assert_eq!(
        first_error(&mut collector(), &data),
        Some(DecodeError::DumpOverrun {
            dump_id: 1,
            total_size: 10,
            attempted: 11
        })
    );
    let hole = after_hello(|s| {
        push(s, |b| encode_begin(&metadata(1, 10), b));
        push(s, |b| encode_data(&[1; 5], b));
        push(s, |b| encode_hole(u64::MAX, b));
    });
    assert_eq!(
        first_error(&mut collector(), &hole),
        Some(DecodeError::DumpOverrun {
            dump_id: 1,
            total_size: 10,
            attempted: u64::MAX
        })
    );
}

#[test]
fn end_length_mismatch() {
    let short = after_hello(|s| {
        push(s, |b| encode_begin(&metadata(1, 10), b));
        push(s, |b| encode_data(&[1; 9], b));
        push(s, |b| encode_end(10, 0, b));
    });
    assert_eq!(
        first_error(&mut collector(), &short),
        Some(DecodeError::LengthMismatch {
            dump_id: 1,
            total_size: 10,
            received: 9,
            end_length: 10
        })
    );
}

#[test]
fn end_reports_bad_checksum() {
    let stream = after_hello(|s| {
        push(s, |b| encode_begin(&metadata(1, 3), b));
        push(s, |b| encode_data(b"abc", b));
        push(s, |b| encode_end(3, crc32c(b"abd"), b));
    });
    let (events, error) = feed(&mut collector(), [&stream[..]]);
    assert_eq!(error, None);
    let Some(Event::End(end)) = events.last() else {
        panic!("last event is {:?}", events.last());
    };
    assert!(!end.checksum_matches());
    assert_eq!(end.computed_crc32c, crc32c(b"abc"));
}

#[test]
fn malformed_headers() {
    let cases: [(&[u8], DecodeError); 4] = [
        (
            &[0x7F, 0, 0, 0, 0, 0, 0, 0],
            DecodeError::UnknownFrameType(0x7F),
        ),
        (&[0x01, 1, 0, 0, 0, 0, 0, 0], DecodeError::ReservedNotZero),
        (
            &[0x10, 0, 0, 0, 0, 0, 0, 0],
            DecodeError::UnexpectedFrame {
                frame_type: FrameType::Begin,
                expected: "ClientHello",
            },
        ),
        (
            &[0x01, 0, 0, 0, 0, 0, 0, 0],
            DecodeError::InvalidLength {
                frame_type: FrameType::ClientHello,
                length: 0,
            },
        ),
    ];
    for (stream, expected) in cases {
        assert_eq!(first_error(&mut collector(), stream), Some(expected));
    }
}

#[test]
fn bad_magic() {
    let mut stream = Vec::new();
    push(&mut stream, |b| encode_client_hello(1, b"", b));
    stream[FRAME_HEADER_LEN] ^= 1;
    assert_eq!(
        first_error(&mut collector(), &stream),
        Some(DecodeError::BadMagic)
    );
}

#[test]
fn error_is_sticky() {
    let mut decoder = collector();
    assert!(decoder.decode(&[0xFF; 8]).is_err());
    let (stream, _) = producer_stream();
    assert_eq!(decoder.decode(&stream), Err(DecodeError::Failed));
}

#[test]
fn encode_buffer_too_small() {
    let mut buffer = [0u8; 20];
    assert_eq!(
        encode_begin(&metadata(1, 1), &mut buffer),
        Err(EncodeError::BufferTooSmall {
            needed: FRAME_HEADER_LEN + begin_payload_len(&metadata(1, 1)),
            available: 20
        })
    );
    assert_eq!(
        encode_client_hello(1, &[0; MAX_TOKEN + 1], &mut [0u8; 512]),
        Err(EncodeError::TokenTooLong {
            length: MAX_TOKEN + 1
        })
    );
    let mut small = [0u8; 7];
    assert!(encode_data_header(1, &mut small).is_err());
}

/// xorshift64 generator, so the property tests need no extra crate.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}

/// Feeds `stream` in random chunks to both roles; returns whether the collector accepted it all.
fn feed_randomly(random: &mut XorShift, stream: &[u8]) -> bool {
    let mut accepted = true;
    for role in [Role::Collector, Role::Producer] {
        let limits = Limits {
            max_frame_size: 1 + random.below(4096) as u32,
            max_metadata_size: random.below(300) as u32,
            max_dump_size: random.next() >> random.below(64),
        };
        let mut decoder = Decoder::new(role, limits);
        let mut rest = stream;
        let mut failed = false;
        while !rest.is_empty() {
            let chunk = &rest[..(1 + random.below(64)).min(rest.len())];
            match decoder.decode(chunk) {
                Ok((consumed, message)) => {
                    assert!(consumed > 0 || message.is_some());
                    assert!(consumed <= chunk.len());
                    if let Some(Message::Data(bytes)) = message {
                        assert!(bytes.len() <= limits.max_frame_size as usize);
                    }
                    rest = &rest[consumed..];
                }
                Err(_) => {
                    assert_eq!(decoder.decode(chunk), Err(DecodeError::Failed));
                    failed = true;
                    break;
                }
            }
        }
        if role == Role::Collector {
            accepted = !failed;
        }
    }
    accepted
}

#[test]
fn random_bytes_never_panic() {
    let mut random = XorShift(0x9E37_79B9_7F4A_7C15);
    for _ in 0..2000 {
        let length = random.below(600);
        let mut stream: Vec<u8> = (0..length).map(|_| random.next() as u8).collect();
        // Start half the inputs with a valid header byte so deeper states are reached.
        if random.below(2) == 0 && !stream.is_empty() {
            stream[0] = FrameType::ClientHello as u8;
        }
        feed_randomly(&mut random, &stream);
    }
}

#[test]
fn mutated_streams_never_panic() {
    let (valid, _) = producer_stream();
    let mut random = XorShift(0xD1B5_4A32_D192_ED03);
    let mut rejected = 0;
    for _ in 0..3000 {
        let mut stream = valid.clone();
        for _ in 0..1 + random.below(4) {
            let index = random.below(stream.len());
            stream[index] = random.next() as u8;
        }
        if random.below(4) == 0 {
            stream.truncate(random.below(stream.len()));
        }
        if !feed_randomly(&mut random, &stream) {
            rejected += 1;
        }
    }
    // Most single-byte changes hit a length, type or limit check.
    assert!(
        rejected > 100,
        "only {rejected} of 3000 mutated streams were rejected"
    );
}
