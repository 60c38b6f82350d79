//! The collector server: receives dumps from socket sinks and stores them.
//!
//! [`serve`] listens on a Unix or TCP endpoint and serves each connection on
//! its own thread. Per connection it checks the handshake token in constant
//! time, enforces the maximum dump size, verifies each dump's CRC-32C,
//! stores the dump as `<stem>.core` with a `<stem>.json` sidecar, and sends
//! `Ack` only after both are synced and renamed into place. Dumps are
//! deduplicated by (producer id, dump id) with an index rebuilt from the
//! directory at startup, so a resend after a lost `Ack` is acknowledged
//! without storing it twice, also across collector restarts.
//!
//! [`list_dumps`], [`dump_info`] and [`gdb_command`] read a dump directory
//! for the `sandcore dumps` commands.

mod listing;
mod store;

pub use self::listing::{dump_info, gdb_command, list_dumps, DumpListing};
pub use self::store::DumpSidecar;

use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use self::store::{dump_stem, Claim, DirectorySink, DumpKey, Store, CORE_SUFFIX};
use crate::protocol::{
    self, DecodeError, Decoder, HelloStatus, Limits, Message, RejectReason, Role, ServerHello,
    FRAME_HEADER_LEN, MAX_CONTROL_PAYLOAD, VERSION,
};
use crate::sink::{DumpMetadata, DumpSink};
use crate::socket_sink::{Connection, Endpoint};

/// Retention rules applied at startup and after each stored dump. The
/// oldest dumps (by file modification time) go first; the dump just stored
/// is never deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Maximum bytes all core files may occupy on disk. Default: no limit.
    pub max_total_bytes: Option<u64>,
    /// Minimum free bytes to keep on the directory's file system. Default: no limit.
    pub min_free_bytes: Option<u64>,
    /// Maximum age of a stored dump. Default: no limit.
    pub max_age: Option<Duration>,
}

/// Configuration of [`serve`].
#[derive(Clone)]
pub struct CollectorConfig {
    /// Listening endpoint. A stale Unix socket file at the path is replaced.
    pub listen: Endpoint,
    /// Directory for dumps and sidecars; created with mode 0700 if missing.
    pub dump_dir: PathBuf,
    /// Shared token producers must send, at most 64 bytes. `None` accepts any
    /// producer. Default `None`.
    pub token: Option<Vec<u8>>,
    /// Maximum logical size of one dump in bytes. Default 4 GiB.
    pub max_dump_size: u64,
    /// Maximum payload of one `Data` frame in bytes. Default 1 MiB.
    pub max_frame_size: u32,
    /// A connection that sends nothing for this long is closed. Default 60 s.
    pub idle_timeout: Duration,
    /// Maximum connections served at once; more get an `Unavailable` handshake. Default 64.
    pub max_connections: usize,
    /// Retention rules. Default: keep everything.
    pub retention: Retention,
}

impl CollectorConfig {
    /// Creates a configuration with the defaults listed on each field.
    pub fn new(listen: Endpoint, dump_dir: impl Into<PathBuf>) -> Self {
        CollectorConfig {
            listen,
            dump_dir: dump_dir.into(),
            token: None,
            max_dump_size: 4 << 30,
            max_frame_size: 1 << 20,
            idle_timeout: Duration::from_secs(60),
            max_connections: 64,
            retention: Retention::default(),
        }
    }
}

impl std::fmt::Debug for CollectorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollectorConfig")
            .field("listen", &self.listen)
            .field("dump_dir", &self.dump_dir)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("max_dump_size", &self.max_dump_size)
            .field("max_frame_size", &self.max_frame_size)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_connections", &self.max_connections)
            .field("retention", &self.retention)
            .finish()
    }
}

/// Counters of a collector run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CollectorStats {
    /// Connections accepted.
    pub connections: u64,
    /// Dumps stored and acknowledged.
    pub stored: u64,
    /// Resent dumps acknowledged without storing them again.
    pub duplicates: u64,
    /// Dumps rejected (size, checksum, storage failure).
    pub rejected: u64,
    /// Connections closed for a bad handshake or malformed input.
    pub protocol_errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    stored: AtomicU64,
    duplicates: AtomicU64,
    rejected: AtomicU64,
    protocol_errors: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> CollectorStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        CollectorStats {
            connections: load(&self.connections),
            stored: load(&self.stored),
            duplicates: load(&self.duplicates),
            rejected: load(&self.rejected),
            protocol_errors: load(&self.protocol_errors),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

/// A bound collector, ready to [`Collector::run`].
pub struct Collector {
    config: CollectorConfig,
    listener: Listener,
    store: Arc<Store>,
    counters: Arc<Counters>,
}

/// How often blocked accepts and reads check the shutdown flag.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

impl Collector {
    /// Opens the dump directory, rebuilds the deduplication index, applies
    /// retention and binds the listening socket.
    pub fn bind(config: CollectorConfig) -> io::Result<Self> {
        if config
            .token
            .as_ref()
            .is_some_and(|token| token.len() > protocol::MAX_TOKEN)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "collector token is longer than {} bytes; use a shorter token",
                    protocol::MAX_TOKEN
                ),
            ));
        }
        let store = Store::open(&config.dump_dir).map_err(|error| {
            io::Error::new(
                error.kind(),
                format!(
                    "failed to open dump directory {}: {error}",
                    config.dump_dir.display()
                ),
            )
        })?;
        store.apply_retention(&config.retention, None);
        let listener = match &config.listen {
            Endpoint::Unix(path) => {
                remove_stale_socket(path)?;
                let listener = UnixListener::bind(path).map_err(|error| {
                    io::Error::new(
                        error.kind(),
                        format!("failed to listen on {}: {error}", config.listen),
                    )
                })?;
                listener.set_nonblocking(true)?;
                Listener::Unix(listener, path.clone())
            }
            Endpoint::Tcp(address) => {
                let listener = TcpListener::bind(address.as_str()).map_err(|error| {
                    io::Error::new(
                        error.kind(),
                        format!("failed to listen on {}: {error}", config.listen),
                    )
                })?;
                listener.set_nonblocking(true)?;
                Listener::Tcp(listener)
            }
        };
        if config.token.is_none() {
            tracing::warn!(endpoint = %config.listen, "collector has no token; any client that can connect may store dumps");
        }
        Ok(Collector {
            config,
            listener,
            store: Arc::new(store),
            counters: Arc::new(Counters::default()),
        })
    }

    /// Returns the endpoint actually bound (with the real port for `tcp:…:0`).
    pub fn local_endpoint(&self) -> io::Result<Endpoint> {
        match &self.listener {
            Listener::Unix(_, path) => Ok(Endpoint::Unix(path.clone())),
            Listener::Tcp(listener) => Ok(Endpoint::Tcp(listener.local_addr()?.to_string())),
        }
    }

    /// Returns the counters so far.
    pub fn stats(&self) -> CollectorStats {
        self.counters.snapshot()
    }

    /// Serves connections until `shutdown` is set, then waits for the
    /// connection threads. A dump in progress at shutdown is discarded
    /// without `Ack`, so its producer sends it again; every acknowledged
    /// dump is already durable.
    pub fn run(&self, shutdown: &AtomicBool) -> io::Result<CollectorStats> {
        tracing::info!(
            endpoint = %self.local_endpoint()?,
            directory = %self.config.dump_dir.display(),
            max_dump_size = self.config.max_dump_size,
            "collector listening"
        );
        let active = Arc::new(AtomicUsize::new(0));
        std::thread::scope(|scope| -> io::Result<()> {
            while !shutdown.load(Ordering::SeqCst) {
                let accepted = match &self.listener {
                    Listener::Unix(listener, _) => listener
                        .accept()
                        .map(|(stream, _)| (Connection::from(stream), "unix".to_string())),
                    Listener::Tcp(listener) => listener
                        .accept()
                        .map(|(stream, peer)| (Connection::from(stream), peer.to_string())),
                };
                let (connection, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(POLL_INTERVAL);
                        continue;
                    }
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                    Err(error) => {
                        // Running out of descriptors is transient; keep serving.
                        tracing::warn!(error = %error, "failed to accept a connection");
                        std::thread::sleep(POLL_INTERVAL);
                        continue;
                    }
                };
                bump(&self.counters.connections);
                let handler = ConnectionHandler {
                    config: &self.config,
                    store: &self.store,
                    counters: &self.counters,
                    shutdown,
                    peer,
                };
                if active.fetch_add(1, Ordering::SeqCst) >= self.config.max_connections {
                    active.fetch_sub(1, Ordering::SeqCst);
                    tracing::warn!(peer = %handler.peer, max_connections = self.config.max_connections, "too many connections; refusing one");
                    handler.refuse_busy(connection);
                    continue;
                }
                let active = Arc::clone(&active);
                std::thread::Builder::new()
                    .name("sandcore-collector-connection".into())
                    .spawn_scoped(scope, move || {
                        handler.serve(connection);
                        active.fetch_sub(1, Ordering::SeqCst);
                    })?;
            }
            Ok(())
        })?;
        if let Listener::Unix(_, path) = &self.listener {
            let _ = std::fs::remove_file(path);
        }
        let stats = self.counters.snapshot();
        tracing::info!(?stats, "collector stopped");
        Ok(stats)
    }
}

/// Binds and runs a collector until `shutdown` is set. See [`Collector::run`].
pub fn serve(config: CollectorConfig, shutdown: &AtomicBool) -> io::Result<CollectorStats> {
    Collector::bind(config)?.run(shutdown)
}

/// Deletes a Unix socket file at `path` that no process listens on. Fails if
/// the path is something other than a socket, or a live collector owns it.
fn remove_stale_socket(path: &std::path::Path) -> io::Result<()> {
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !metadata.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; remove it or choose another path",
                path.display()
            ),
        ));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "another process already listens on {}; stop it or choose another path",
                path.display()
            ),
        ));
    }
    std::fs::remove_file(path)
}

/// Compares two byte strings in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// Handling of the dump being received.
enum DumpState<'a> {
    /// Written through this sink; the claim on `key` is held.
    Storing {
        sink: DirectorySink<'a>,
        stem: String,
        key: DumpKey,
        metadata: Box<DumpMetadata>,
    },
    /// Already stored under this name; bytes are discarded and `End` is acknowledged.
    Duplicate { file_name: String },
    /// Storing failed; bytes are discarded and `End` is rejected.
    Failed {
        reason: RejectReason,
        message: String,
    },
}

struct ConnectionHandler<'a> {
    config: &'a CollectorConfig,
    store: &'a Store,
    counters: &'a Counters,
    shutdown: &'a AtomicBool,
    peer: String,
}

/// Reason a connection ended early.
enum Close {
    /// The peer closed or timed out, or the collector is shutting down.
    Quiet,
    /// Reply with these bytes, then close after draining the peer's input.
    Reply(Vec<u8>),
}

impl<'a> ConnectionHandler<'a> {
    fn server_hello(&self, status: HelloStatus, message: &str) -> Vec<u8> {
        let mut text = heapless::String::new();
        for ch in message.chars() {
            if text.push(ch).is_err() {
                break;
            }
        }
        let hello = ServerHello {
            version: VERSION,
            status,
            max_dump_size: self.config.max_dump_size,
            message: text,
        };
        let mut frame = [0u8; FRAME_HEADER_LEN + MAX_CONTROL_PAYLOAD];
        let length = protocol::encode_server_hello(&hello, &mut frame).unwrap_or(0);
        frame[..length].to_vec()
    }

    fn reject(&self, dump_id: u64, reason: RejectReason, message: &str) -> Vec<u8> {
        bump(&self.counters.rejected);
        tracing::warn!(peer = %self.peer, dump_id, ?reason, message, "rejected dump");
        let mut frame = [0u8; FRAME_HEADER_LEN + MAX_CONTROL_PAYLOAD];
        let length = protocol::encode_reject(dump_id, reason, message, &mut frame).unwrap_or(0);
        frame[..length].to_vec()
    }

    fn refuse_busy(&self, mut connection: Connection) {
        let hello = self.server_hello(
            HelloStatus::Unavailable,
            "collector has too many connections; retry later",
        );
        let _ = connection.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = connection.write_all(&hello);
    }

    fn serve(&self, mut connection: Connection) {
        tracing::debug!(peer = %self.peer, "connection opened");
        let mut state = None;
        let outcome = self.exchange(&mut connection, &mut state);
        if let Some(state) = state {
            self.discard(state);
        }
        if let Err(Close::Reply(bytes)) = outcome {
            let _ = connection.set_write_timeout(Some(Duration::from_secs(5)));
            let _ = connection.write_all(&bytes);
            linger(&mut connection);
        }
        tracing::debug!(peer = %self.peer, "connection closed");
    }

    /// Releases an unfinished dump: deletes its temporary file and its claim.
    fn discard(&self, state: DumpState<'_>) {
        if let DumpState::Storing {
            mut sink,
            key,
            metadata,
            ..
        } = state
        {
            sink.abort();
            self.store.release(key, None);
            tracing::warn!(peer = %self.peer, dump_id = metadata.dump_id, "discarded incomplete dump");
        }
    }

    fn exchange(
        &self,
        connection: &mut Connection,
        state: &mut Option<DumpState<'a>>,
    ) -> Result<(), Close> {
        let limits = Limits {
            max_frame_size: self.config.max_frame_size,
            max_dump_size: self.config.max_dump_size,
            ..Limits::default()
        };
        let mut decoder = Decoder::new(Role::Collector, limits);
        let mut producer_id = 0u64;
        let mut buffer = vec![0u8; 64 * 1024];
        let _ = connection.set_read_timeout(Some(POLL_INTERVAL));
        let _ = connection.set_write_timeout(Some(self.config.idle_timeout));
        let mut last_input = Instant::now();
        loop {
            if self.shutdown.load(Ordering::SeqCst) {
                return Err(Close::Quiet);
            }
            let read = match connection.read(&mut buffer) {
                Ok(0) => {
                    if state.is_some() || !decoder.is_at_frame_boundary() {
                        tracing::warn!(peer = %self.peer, "producer closed the connection in the middle of a dump");
                    }
                    return Err(Close::Quiet);
                }
                Ok(read) => read,
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    if last_input.elapsed() > self.config.idle_timeout {
                        tracing::warn!(peer = %self.peer, timeout = ?self.config.idle_timeout, "closing idle connection");
                        return Err(Close::Quiet);
                    }
                    continue;
                }
                Err(error) => {
                    tracing::warn!(peer = %self.peer, error = %error, "connection read failed");
                    return Err(Close::Quiet);
                }
            };
            last_input = Instant::now();
            let mut rest = &buffer[..read];
            while !rest.is_empty() {
                let (consumed, message) = match decoder.decode(rest) {
                    Ok(decoded) => decoded,
                    Err(error) => return Err(self.decode_failed(error)),
                };
                rest = &rest[consumed..];
                let Some(message) = message else { continue };
                let reply = self.handle(message, &mut producer_id, state)?;
                if let Some(reply) = reply {
                    if let Err(error) = connection.write_all(&reply) {
                        tracing::warn!(peer = %self.peer, error = %error, "failed to send reply");
                        return Err(Close::Quiet);
                    }
                }
            }
        }
    }

    fn decode_failed(&self, error: DecodeError) -> Close {
        bump(&self.counters.protocol_errors);
        tracing::warn!(peer = %self.peer, error = %error, "closing connection after malformed input");
        match error {
            DecodeError::DumpTooLarge { dump_id, .. } => {
                Close::Reply(self.reject(dump_id, RejectReason::TooLarge, &error.to_string()))
            }
            _ => Close::Quiet,
        }
    }

    /// Acts on one message; returns bytes to send back, if any.
    fn handle(
        &self,
        message: Message<'_>,
        producer_id: &mut u64,
        state: &mut Option<DumpState<'a>>,
    ) -> Result<Option<Vec<u8>>, Close> {
        match message {
            Message::ClientHello(hello) => {
                if hello.version != VERSION {
                    bump(&self.counters.protocol_errors);
                    tracing::warn!(peer = %self.peer, version = hello.version, "rejected handshake with unsupported protocol version");
                    return Err(Close::Reply(self.server_hello(
                        HelloStatus::UnsupportedVersion,
                        &format!("collector speaks protocol version {VERSION} only"),
                    )));
                }
                let token_valid = match &self.config.token {
                    Some(expected) => constant_time_eq(&hello.token, expected),
                    None => true,
                };
                if !token_valid {
                    bump(&self.counters.protocol_errors);
                    tracing::warn!(peer = %self.peer, producer_id = format_args!("{:016x}", hello.producer_id), "rejected handshake with invalid token");
                    return Err(Close::Reply(self.server_hello(
                        HelloStatus::InvalidToken,
                        "invalid token; configure the collector's token on the socket sink",
                    )));
                }
                *producer_id = hello.producer_id;
                tracing::info!(peer = %self.peer, producer_id = format_args!("{producer_id:016x}"), "producer connected");
                Ok(Some(self.server_hello(HelloStatus::Accepted, "")))
            }
            Message::Begin(metadata) => {
                *state = Some(self.begin_dump(*producer_id, metadata));
                Ok(None)
            }
            Message::Data(bytes) => {
                if let Some(DumpState::Storing { sink, .. }) = state.as_mut() {
                    if let Err(error) = sink.data(bytes) {
                        self.fail_storage(state, &error.to_string());
                    }
                }
                Ok(None)
            }
            Message::Hole(length) => {
                if let Some(DumpState::Storing { sink, .. }) = state.as_mut() {
                    if let Err(error) = sink.hole(length) {
                        self.fail_storage(state, &error.to_string());
                    }
                }
                Ok(None)
            }
            Message::End(end) => {
                let Some(current) = state.take() else {
                    return Err(Close::Quiet);
                };
                Ok(Some(self.end_dump(*producer_id, current, end)))
            }
            // The collector's decoder only yields producer messages.
            Message::ServerHello(_) | Message::Ack(_) | Message::Reject(_) => Err(Close::Quiet),
        }
    }

    fn begin_dump(&self, producer_id: u64, metadata: DumpMetadata) -> DumpState<'a> {
        let key = (producer_id, metadata.dump_id);
        tracing::info!(
            peer = %self.peer,
            producer_id = format_args!("{producer_id:016x}"),
            dump_id = metadata.dump_id,
            total_size = metadata.total_size,
            kind = metadata.kind.name(),
            "receiving dump"
        );
        match self.store.claim(key, self.config.idle_timeout) {
            Some(Claim::Stored(file_name)) => DumpState::Duplicate { file_name },
            None => DumpState::Failed {
                reason: RejectReason::Storage,
                message: "another connection is still storing this dump; retry later".into(),
            },
            Some(Claim::Owned) => {
                let stem = dump_stem(producer_id, &metadata);
                let mut sink =
                    DirectorySink::new(&self.store.directory, format!("{stem}{CORE_SUFFIX}"));
                if let Err(error) = sink.begin(&metadata) {
                    self.store.release(key, None);
                    return DumpState::Failed {
                        reason: RejectReason::Storage,
                        message: error.to_string(),
                    };
                }
                DumpState::Storing {
                    sink,
                    stem,
                    key,
                    metadata: Box::new(metadata),
                }
            }
        }
    }

    fn fail_storage(&self, state: &mut Option<DumpState<'a>>, message: &str) {
        if let Some(previous) = state.take() {
            self.discard(previous);
        }
        *state = Some(DumpState::Failed {
            reason: RejectReason::Storage,
            message: message.to_string(),
        });
    }

    fn end_dump(&self, producer_id: u64, state: DumpState<'a>, end: protocol::End) -> Vec<u8> {
        let mut frame = [0u8; FRAME_HEADER_LEN + 8];
        let ack = |frame: &mut [u8]| {
            let length = protocol::encode_ack(end.dump_id, frame).unwrap_or(0);
            frame[..length].to_vec()
        };
        match state {
            DumpState::Duplicate { file_name } => {
                bump(&self.counters.duplicates);
                tracing::info!(peer = %self.peer, dump_id = end.dump_id, file = %file_name, "acknowledged resent dump that is already stored");
                ack(&mut frame)
            }
            DumpState::Failed { reason, message } => self.reject(end.dump_id, reason, &message),
            DumpState::Storing {
                mut sink,
                stem,
                key,
                metadata,
            } => {
                if !end.checksum_matches() {
                    sink.abort();
                    self.store.release(key, None);
                    let message = format!(
                        "CRC-32C mismatch: producer sent {:08x}, bytes received give {:08x}",
                        end.crc32c, end.computed_crc32c
                    );
                    return self.reject(end.dump_id, RejectReason::ChecksumMismatch, &message);
                }
                let stored = sink
                    .finish()
                    .map_err(|error| error.to_string())
                    .and_then(|receipt| {
                        let sidecar = DumpSidecar {
                            core_file: receipt.location.to_string(),
                            dump_id: metadata.dump_id,
                            producer_id: format!("{producer_id:016x}"),
                            sandbox_id: metadata.sandbox_id,
                            guest: metadata.guest_name.to_string(),
                            build_id: metadata
                                .build_id
                                .iter()
                                .map(|byte| format!("{byte:02x}"))
                                .collect(),
                            crash_kind: metadata.kind.name().to_string(),
                            crash_kind_code: metadata.kind.code(),
                            timestamp_ns: metadata.timestamp_ns,
                            size: metadata.total_size,
                            crc32c: end.crc32c,
                        };
                        self.store
                            .write_sidecar(&stem, &sidecar)
                            .map(|()| sidecar.core_file)
                            .map_err(|error| {
                                format!("failed to write sidecar {stem}.json: {error}")
                            })
                    });
                match stored {
                    Ok(core_file) => {
                        self.store.release(key, Some(core_file.clone()));
                        bump(&self.counters.stored);
                        tracing::info!(
                            peer = %self.peer,
                            producer_id = format_args!("{producer_id:016x}"),
                            dump_id = end.dump_id,
                            file = %core_file,
                            size = end.total_length,
                            "stored dump"
                        );
                        self.store
                            .apply_retention(&self.config.retention, Some(&core_file));
                        ack(&mut frame)
                    }
                    Err(message) => {
                        // NOTE: if only the sidecar failed, the core stays under
                        // its final name and the next start indexes it by name,
                        // so a resend after a restart is acknowledged as a duplicate.
                        self.store.release(key, None);
                        self.reject(end.dump_id, RejectReason::Storage, &message)
                    }
                }
            }
        }
    }
}

/// Reads and discards the peer's input for a short while after a final
/// reply, so that closing does not reset the connection before the peer
/// reads the reply.
fn linger(connection: &mut Connection) {
    let _ = connection.shutdown_write();
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buffer = [0u8; 16 * 1024];
    let _ = connection.set_read_timeout(Some(POLL_INTERVAL));
    while Instant::now() < deadline {
        match connection.read(&mut buffer) {
            Ok(0) => return,
            Ok(_) => {}
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::store::{parse_core_name, ParsedName};
    use super::*;

    #[test]
    fn token_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn core_name_round_trip() {
        let mut metadata = DumpMetadata {
            dump_id: 0x2a,
            sandbox_id: 1,
            guest_name: heapless::String::new(),
            build_id: heapless::Vec::new(),
            kind: crate::snapshot::CrashKind::StackOverflow { address: 0 },
            timestamp_ns: 1_700_000_000_999_999_999,
            total_size: 0,
        };
        metadata.guest_name.push_str("my guest-v2").unwrap();
        let name = format!("{}{CORE_SUFFIX}", dump_stem(0xfeed, &metadata));
        assert_eq!(
            name,
            "my_guest_v2-stack-overflow-1700000000-000000000000feed-000000000000002a.core"
        );
        assert_eq!(
            parse_core_name(&name),
            Some(ParsedName {
                guest: "my_guest_v2".into(),
                crash_kind: "stack-overflow".into(),
                timestamp_secs: 1_700_000_000,
                producer_id: 0xfeed,
                dump_id: 0x2a,
            })
        );
        assert_eq!(parse_core_name("notes.core"), None);
        assert_eq!(parse_core_name("x-panic-1-2-3.json"), None);
    }
}
