//! Socket sink and collector over real loopback sockets, in a temporary directory.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use sandcore_sinks::collector::{list_dumps, Collector, CollectorConfig, CollectorStats};
use sandcore_sinks::protocol::{
    self, Decoder, HelloStatus, Limits, Message, RejectReason, Role, ServerHello,
};
use sandcore_sinks::sink::{DumpMetadata, DumpSink, SinkErrorKind};
use sandcore_sinks::snapshot::CrashKind;
use sandcore_sinks::socket_sink::{Endpoint, SocketSink, SocketSinkConfig};

const WAIT: Duration = Duration::from_secs(20);

/// A directory under the system temp directory, deleted on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "sandcore-stream-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A collector running on its own thread.
struct Running {
    shutdown: Arc<AtomicBool>,
    thread: Option<JoinHandle<CollectorStats>>,
    endpoint: Endpoint,
}

impl Running {
    fn start(config: CollectorConfig) -> Self {
        let collector = Collector::bind(config).unwrap();
        let endpoint = collector.local_endpoint().unwrap();
        let shutdown = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&shutdown);
        let thread = std::thread::spawn(move || collector.run(&flag).unwrap());
        Running {
            shutdown,
            thread: Some(thread),
            endpoint,
        }
    }

    fn stop(mut self) -> CollectorStats {
        self.shutdown.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn metadata(dump_id: u64, total_size: u64) -> DumpMetadata {
    let mut guest_name = heapless::String::new();
    guest_name.push_str("demo").unwrap();
    let mut build_id = heapless::Vec::new();
    build_id.extend_from_slice(&[0x5A; 20]).unwrap();
    DumpMetadata {
        dump_id,
        sandbox_id: 3,
        guest_name,
        build_id,
        kind: CrashKind::Exception {
            vector: 14,
            error_code: 4,
        },
        timestamp_ns: 1_700_000_000_000_000_000 + dump_id,
        total_size,
    }
}

/// Builds one synthetic dump as sink calls: `Ok(bytes)` is data, `Err(length)` a hole.
fn dump_parts(dump_id: u64, data_size: usize) -> Vec<Result<Vec<u8>, u64>> {
    let pattern = |length: usize, salt: u64| -> Vec<u8> {
        (0..length)
            .map(|i| (i as u64).wrapping_mul(31).wrapping_add(salt * 7) as u8)
            .collect()
    };
    vec![
        Ok(pattern(data_size, dump_id)),
        Err(8192),
        Ok(pattern(5000, dump_id + 1)),
        Err(4096),
    ]
}

fn logical_bytes(parts: &[Result<Vec<u8>, u64>]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for part in parts {
        match part {
            Ok(data) => bytes.extend_from_slice(data),
            Err(length) => bytes.resize(bytes.len() + *length as usize, 0),
        }
    }
    bytes
}

/// Writes one dump through the DumpSink trait; returns its logical bytes.
fn produce(sink: &mut dyn DumpSink, dump_id: u64, data_size: usize) -> Vec<u8> {
    let parts = dump_parts(dump_id, data_size);
    let logical = logical_bytes(&parts);
    sink.begin(&metadata(dump_id, logical.len() as u64))
        .unwrap();
    for part in &parts {
        match part {
            Ok(data) => {
                for chunk in data.chunks(3000) {
                    sink.data(chunk).unwrap();
                }
            }
            Err(length) => sink.hole(*length).unwrap(),
        }
    }
    sink.finish().unwrap();
    logical
}

fn sink_config(endpoint: Endpoint, spool: &Path) -> SocketSinkConfig {
    let mut config = SocketSinkConfig::new(endpoint, spool);
    config.initial_backoff = Duration::from_millis(20);
    config.max_backoff = Duration::from_millis(200);
    config
}

/// Checks that `dir` contains exactly one core per expected dump id, byte-identical.
fn assert_stored(dir: &Path, expected: &[(u64, Vec<u8>)]) {
    let listings = list_dumps(dir).unwrap();
    assert_eq!(
        listings.len(),
        expected.len(),
        "stored: {:?}",
        listings.iter().map(|l| &l.file_name).collect::<Vec<_>>()
    );
    for (dump_id, bytes) in expected {
        let matching: Vec<_> = listings
            .iter()
            .filter(|listing| listing.dump_id == Some(*dump_id))
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "dump {dump_id} stored {} times",
            matching.len()
        );
        let stored = std::fs::read(&matching[0].path).unwrap();
        assert!(
            stored == *bytes,
            "dump {dump_id} differs from what was produced"
        );
        let sidecar = matching[0].sidecar.as_ref().expect("sidecar missing");
        assert_eq!(sidecar.size, bytes.len() as u64);
        assert_eq!(sidecar.crc32c, protocol::crc32c(bytes));
        assert_eq!(sidecar.guest, "demo");
        assert_eq!(sidecar.crash_kind, "exception");
    }
}

fn file_mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn unix_dumps_arrive_identical() {
    let temp = TempDir::new("identical");
    let collector = Running::start(CollectorConfig::new(
        Endpoint::Unix(temp.join("collector.sock")),
        temp.join("dumps"),
    ));
    let mut sink =
        SocketSink::new(sink_config(collector.endpoint.clone(), &temp.join("spool"))).unwrap();
    let mut expected = Vec::new();
    for dump_id in 1..=3u64 {
        expected.push((
            dump_id,
            produce(&mut sink, dump_id, 200_000 + dump_id as usize),
        ));
    }
    assert!(
        sink.wait_idle(WAIT),
        "spool not drained: {:?}",
        sink.stats()
    );
    let stats = sink.stats();
    assert_eq!(stats.acked, 3);
    assert_eq!(stats.sent, 3);
    assert_eq!(stats.rejected_spool_full, 0);
    assert_stored(&temp.join("dumps"), &expected);
    for listing in list_dumps(&temp.join("dumps")).unwrap() {
        assert_eq!(file_mode(&listing.path), 0o600, "{}", listing.file_name);
    }
    drop(sink);
    let stats = collector.stop();
    assert_eq!(stats.stored, 3);
    assert_eq!(stats.duplicates, 0);
}

#[test]
fn tcp_dumps_arrive_identical() {
    let temp = TempDir::new("tcp");
    let mut config = CollectorConfig::new(Endpoint::Tcp("127.0.0.1:0".into()), temp.join("dumps"));
    config.token = Some(b"tcp-token".to_vec());
    let collector = Running::start(config);
    let mut sink_settings = sink_config(collector.endpoint.clone(), &temp.join("spool"));
    sink_settings.token = Some(b"tcp-token".to_vec());
    let mut sink = SocketSink::new(sink_settings).unwrap();
    let expected = vec![(7, produce(&mut sink, 7, 1_000_000))];
    assert!(
        sink.wait_idle(WAIT),
        "spool not drained: {:?}",
        sink.stats()
    );
    assert_stored(&temp.join("dumps"), &expected);
}

#[test]
fn collector_down_then_started() {
    let temp = TempDir::new("down");
    let socket = temp.join("collector.sock");
    let mut sink = SocketSink::new(sink_config(
        Endpoint::Unix(socket.clone()),
        &temp.join("spool"),
    ))
    .unwrap();
    let mut expected = Vec::new();
    for dump_id in 1..=5u64 {
        expected.push((dump_id, produce(&mut sink, dump_id, 10_000)));
    }
    assert!(!sink.wait_idle(Duration::from_millis(300)));
    assert_eq!(sink.spool_usage().0, 5);
    assert!(sink.stats().reconnects > 0, "{:?}", sink.stats());

    let collector = Running::start(CollectorConfig::new(
        Endpoint::Unix(socket),
        temp.join("dumps"),
    ));
    assert!(
        sink.wait_idle(WAIT),
        "spool not drained: {:?}",
        sink.stats()
    );
    assert_stored(&temp.join("dumps"), &expected);
    assert_eq!(collector.stop().stored, 5);
}

#[test]
fn spool_survives_sink_restart() {
    let temp = TempDir::new("spool-restart");
    let socket = temp.join("collector.sock");
    let mut expected = Vec::new();
    {
        let mut sink = SocketSink::new(sink_config(
            Endpoint::Unix(socket.clone()),
            &temp.join("spool"),
        ))
        .unwrap();
        expected.push((1, produce(&mut sink, 1, 5000)));
        // An aborted dump must leave nothing behind.
        sink.begin(&metadata(2, 100)).unwrap();
        sink.data(&[1; 50]).unwrap();
        sink.abort();
    }
    let collector = Running::start(CollectorConfig::new(
        Endpoint::Unix(socket.clone()),
        temp.join("dumps"),
    ));
    let sink = SocketSink::new(sink_config(Endpoint::Unix(socket), &temp.join("spool"))).unwrap();
    assert!(
        sink.wait_idle(WAIT),
        "spool not drained: {:?}",
        sink.stats()
    );
    assert_stored(&temp.join("dumps"), &expected);
    drop(collector);
}

#[test]
fn collector_restart_mid_stream() {
    let temp = TempDir::new("restart");
    let socket = temp.join("collector.sock");
    let config = CollectorConfig::new(Endpoint::Unix(socket.clone()), temp.join("dumps"));
    let collector = Running::start(config.clone());
    let mut sink =
        SocketSink::new(sink_config(Endpoint::Unix(socket), &temp.join("spool"))).unwrap();
    let mut expected = Vec::new();
    expected.push((1, produce(&mut sink, 1, 10_000)));
    assert!(sink.wait_idle(WAIT));
    // Large dumps so that the stop lands while one is on the wire.
    for dump_id in 2..=4u64 {
        expected.push((dump_id, produce(&mut sink, dump_id, 8 << 20)));
    }
    std::thread::sleep(Duration::from_millis(30));
    collector.stop();
    expected.push((5, produce(&mut sink, 5, 10_000)));

    let collector = Running::start(config);
    assert!(
        sink.wait_idle(WAIT),
        "spool not drained: {:?}",
        sink.stats()
    );
    assert_stored(&temp.join("dumps"), &expected);
    drop(sink);
    drop(collector);
    let leftovers: Vec<_> = std::fs::read_dir(temp.join("dumps"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn spool_full_rejects_without_blocking() {
    let temp = TempDir::new("full");
    let mut config = sink_config(
        Endpoint::Unix(temp.join("nobody.sock")),
        &temp.join("spool"),
    );
    config.spool.max_entries = 2;
    let mut sink = SocketSink::new(config).unwrap();
    produce(&mut sink, 1, 100);
    produce(&mut sink, 2, 100);
    let error = sink.begin(&metadata(3, 10)).unwrap_err();
    assert_eq!(error.kind, SinkErrorKind::Rejected);
    assert!(error.message.contains("spool is full"), "{}", error.message);
    assert_eq!(sink.stats().rejected_spool_full, 1);
    let spool_files = std::fs::read_dir(temp.join("spool")).unwrap().count();
    assert_eq!(spool_files, 2);
    for entry in std::fs::read_dir(temp.join("spool")).unwrap() {
        assert_eq!(file_mode(&entry.unwrap().path()), 0o600);
    }
}

/// A hand-driven producer connection for sending invalid input.
struct RawClient {
    stream: UnixStream,
    decoder: Decoder,
}

impl RawClient {
    fn connect(endpoint: &Endpoint) -> Self {
        let Endpoint::Unix(path) = endpoint else {
            panic!("raw client needs a Unix endpoint");
        };
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        RawClient {
            stream,
            decoder: Decoder::new(Role::Producer, Limits::default()),
        }
    }

    fn send(&mut self, encode: impl FnOnce(&mut [u8]) -> Result<usize, protocol::EncodeError>) {
        let mut buffer = vec![0u8; 70_000];
        let length = encode(&mut buffer).unwrap();
        self.stream.write_all(&buffer[..length]).unwrap();
    }

    fn hello(&mut self, producer_id: u64, token: &[u8]) -> ServerHello {
        self.send(|b| protocol::encode_client_hello(producer_id, token, b));
        match self.receive() {
            Some(Reply::Hello(hello)) => hello,
            other => panic!("expected a handshake reply, got {other:?}"),
        }
    }

    /// Returns the next reply, or `None` if the collector closed the connection.
    fn receive(&mut self) -> Option<Reply> {
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            match self.decoder.decode(&byte).unwrap().1 {
                None => continue,
                Some(Message::ServerHello(hello)) => return Some(Reply::Hello(hello)),
                Some(Message::Ack(id)) => return Some(Reply::Ack(id)),
                Some(Message::Reject(reject)) => {
                    return Some(Reply::Reject(reject.dump_id, reject.reason))
                }
                Some(other) => panic!("unexpected message {other:?}"),
            }
        }
    }

    /// Sends one whole dump of `bytes` without holes.
    fn send_dump(&mut self, dump_id: u64, bytes: &[u8]) {
        self.send(|b| protocol::encode_begin(&metadata(dump_id, bytes.len() as u64), b));
        for chunk in bytes.chunks(60_000) {
            self.send(|b| protocol::encode_data(chunk, b));
        }
        self.send(|b| protocol::encode_end(bytes.len() as u64, protocol::crc32c(bytes), b));
    }
}

#[derive(Debug, PartialEq)]
enum Reply {
    Hello(ServerHello),
    Ack(u64),
    Reject(u64, RejectReason),
}

#[test]
fn resend_is_stored_once() {
    let temp = TempDir::new("dedup");
    let config = CollectorConfig::new(Endpoint::Unix(temp.join("c.sock")), temp.join("dumps"));
    let collector = Running::start(config.clone());
    let bytes: Vec<u8> = (0..50_000u32).map(|i| i as u8).collect();
    for _ in 0..2 {
        let mut client = RawClient::connect(&collector.endpoint);
        assert_eq!(client.hello(99, b"").status, HelloStatus::Accepted);
        client.send_dump(1, &bytes);
        assert_eq!(client.receive(), Some(Reply::Ack(1)));
    }
    let stats = collector.stop();
    assert_eq!(stats.stored, 1);
    assert_eq!(stats.duplicates, 1);

    // A restarted collector rebuilds its index from the directory.
    let collector = Running::start(config);
    let mut client = RawClient::connect(&collector.endpoint);
    client.hello(99, b"");
    client.send_dump(1, &bytes);
    assert_eq!(client.receive(), Some(Reply::Ack(1)));
    // The same dump id from another producer is a different dump.
    let mut other = RawClient::connect(&collector.endpoint);
    other.hello(100, b"");
    other.send_dump(1, &bytes);
    assert_eq!(other.receive(), Some(Reply::Ack(1)));
    let stats = collector.stop();
    assert_eq!(stats.duplicates, 1);
    assert_eq!(stats.stored, 1);
    assert_eq!(list_dumps(&temp.join("dumps")).unwrap().len(), 2);
}

#[test]
fn bad_clients_rejected_while_serving() {
    let temp = TempDir::new("bad");
    let mut config = CollectorConfig::new(Endpoint::Unix(temp.join("c.sock")), temp.join("dumps"));
    config.token = Some(b"right-token".to_vec());
    config.max_dump_size = 1 << 20;
    let collector = Running::start(config);

    // A good producer streams while the bad clients connect.
    let endpoint = collector.endpoint.clone();
    let spool = temp.join("spool");
    let good = std::thread::spawn(move || {
        let mut settings = sink_config(endpoint, &spool);
        settings.token = Some(b"right-token".to_vec());
        let mut sink = SocketSink::new(settings).unwrap();
        let mut expected = Vec::new();
        for dump_id in 1..=4u64 {
            expected.push((dump_id, produce(&mut sink, dump_id, 100_000)));
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            sink.wait_idle(WAIT),
            "spool not drained: {:?}",
            sink.stats()
        );
        expected
    });

    let mut wrong_token = RawClient::connect(&collector.endpoint);
    assert_eq!(
        wrong_token.hello(1, b"wrong-token").status,
        HelloStatus::InvalidToken
    );
    assert_eq!(wrong_token.receive(), None);

    let mut oversized = RawClient::connect(&collector.endpoint);
    assert_eq!(
        oversized.hello(2, b"right-token").status,
        HelloStatus::Accepted
    );
    oversized.send(|b| protocol::encode_begin(&metadata(77, (1 << 20) + 1), b));
    assert_eq!(
        oversized.receive(),
        Some(Reply::Reject(77, RejectReason::TooLarge))
    );

    let mut bad_checksum = RawClient::connect(&collector.endpoint);
    bad_checksum.hello(3, b"right-token");
    bad_checksum.send(|b| protocol::encode_begin(&metadata(5, 4), b));
    bad_checksum.send(|b| protocol::encode_data(b"abcd", b));
    bad_checksum.send(|b| protocol::encode_end(4, protocol::crc32c(b"abce"), b));
    assert_eq!(
        bad_checksum.receive(),
        Some(Reply::Reject(5, RejectReason::ChecksumMismatch))
    );

    let mut garbage = RawClient::connect(&collector.endpoint);
    let mut random = 0x2545_F491_4F6C_DD1Du64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            random as u8
        })
        .collect();
    let _ = garbage.stream.write_all(&noise);
    assert_eq!(garbage.receive(), None, "collector answered garbage");

    let expected = good.join().unwrap();
    let stats = collector.stop();
    assert_stored(&temp.join("dumps"), &expected);
    assert_eq!(stats.stored, 4);
    assert!(stats.rejected >= 2, "{stats:?}");
    assert!(stats.protocol_errors >= 2, "{stats:?}");
}

#[test]
fn sink_drops_dump_over_collector_limit() {
    let temp = TempDir::new("limit");
    let mut config = CollectorConfig::new(Endpoint::Unix(temp.join("c.sock")), temp.join("dumps"));
    config.max_dump_size = 100_000;
    let collector = Running::start(config);
    let mut sink =
        SocketSink::new(sink_config(collector.endpoint.clone(), &temp.join("spool"))).unwrap();
    produce(&mut sink, 1, 200_000);
    let small = produce(&mut sink, 2, 1000);
    assert!(
        sink.wait_idle(WAIT),
        "spool not drained: {:?}",
        sink.stats()
    );
    assert_eq!(sink.stats().rejected_by_collector, 1);
    assert_stored(&temp.join("dumps"), &[(2, small)]);
}
