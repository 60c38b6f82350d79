//! A [`DumpSink`] that streams dumps to a collector over a Unix or TCP socket.
//!
//! [`SocketSink::begin`] to [`SocketSink::finish`] only write the dump into a
//! bounded on-disk [`Spool`], so the dump worker waits for the local disk but
//! never for the network or the collector. A background sender thread connects lazily, sends every
//! spooled dump in order, and deletes an entry only when the collector
//! acknowledges it, which the collector does only after the dump is durable.
//! After a lost connection it reconnects with capped exponential backoff and
//! jitter and sends every unacknowledged entry again. The collector
//! deduplicates by (producer id, dump id), so a resend after a lost `Ack` is
//! stored once.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::protocol::{
    self, Crc32c, Decoder, HelloStatus, Limits, Message, Role, FRAME_HEADER_LEN,
    MAX_CONTROL_PAYLOAD, MAX_TOKEN,
};
use crate::sink::{DumpMetadata, DumpSink, SinkError, SinkErrorKind, SinkReceipt};
use crate::spool::{Spool, SpoolConfig, SpoolEntry, SpoolError, SpoolWriter};

/// Largest `Data` frame payload the sink writes, in bytes.
pub const DATA_FRAME_SIZE: usize = 64 * 1024;

/// Collector address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix-domain stream socket at this path (`unix:PATH`).
    Unix(PathBuf),
    /// A TCP address (`tcp:HOST:PORT`).
    Tcp(String),
}

impl Endpoint {
    /// Parses `unix:PATH` or `tcp:HOST:PORT`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!(
                    "invalid endpoint {text:?}: missing socket path; expected unix:PATH"
                ));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(address) = text.strip_prefix("tcp:") {
            let valid_port = address
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid_port {
                return Err(format!(
                    "invalid endpoint {text:?}: expected tcp:HOST:PORT, for example tcp:127.0.0.1:7070"
                ));
            }
            return Ok(Endpoint::Tcp(address.to_string()));
        }
        Err(format!(
            "invalid endpoint {text:?}: expected unix:PATH or tcp:HOST:PORT"
        ))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Tcp(address) => write!(f, "tcp:{address}"),
        }
    }
}

/// A connected stream socket of either family.
#[derive(Debug)]
pub(crate) enum Connection {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Connection {
    fn connect(endpoint: &Endpoint, timeout: Duration) -> io::Result<Self> {
        match endpoint {
            Endpoint::Unix(path) => Ok(Connection::Unix(UnixStream::connect(path)?)),
            Endpoint::Tcp(address) => {
                let mut last_error = None;
                for socket_address in address.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&socket_address, timeout) {
                        Ok(stream) => {
                            stream.set_nodelay(true)?;
                            return Ok(Connection::Tcp(stream));
                        }
                        Err(error) => last_error = Some(error),
                    }
                }
                Err(last_error.unwrap_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{address} resolves to no address"),
                    )
                }))
            }
        }
    }

    pub(crate) fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Connection::Unix(stream) => stream.set_read_timeout(timeout),
            Connection::Tcp(stream) => stream.set_read_timeout(timeout),
        }
    }

    pub(crate) fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Connection::Unix(stream) => stream.set_write_timeout(timeout),
            Connection::Tcp(stream) => stream.set_write_timeout(timeout),
        }
    }

    pub(crate) fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Connection::Unix(stream) => stream.shutdown(std::net::Shutdown::Write),
            Connection::Tcp(stream) => stream.shutdown(std::net::Shutdown::Write),
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        match self {
            Connection::Unix(stream) => stream.read(buffer),
            Connection::Tcp(stream) => stream.read(buffer),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        match self {
            Connection::Unix(stream) => stream.write(buffer),
            Connection::Tcp(stream) => stream.write(buffer),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Connection::Unix(stream) => stream.flush(),
            Connection::Tcp(stream) => stream.flush(),
        }
    }
}

impl From<UnixStream> for Connection {
    fn from(stream: UnixStream) -> Self {
        Connection::Unix(stream)
    }
}

impl From<TcpStream> for Connection {
    fn from(stream: TcpStream) -> Self {
        Connection::Tcp(stream)
    }
}

/// Configuration of a [`SocketSink`].
#[derive(Clone)]
pub struct SocketSinkConfig {
    /// Collector address.
    pub endpoint: Endpoint,
    /// Spool directory and limits.
    pub spool: SpoolConfig,
    /// Shared token sent in the handshake, at most 64 bytes; `None` sends an empty token.
    pub token: Option<Vec<u8>>,
    /// Producer id sent in the handshake; `None` picks a random one. Default `None`.
    pub producer_id: Option<u64>,
    /// First wait after a failed connection or send. Default 100 ms.
    pub initial_backoff: Duration,
    /// Maximum wait between attempts; the wait doubles up to it. Default 10 s.
    pub max_backoff: Duration,
    /// Timeout for connecting and for each read or write. Default 10 s.
    pub io_timeout: Duration,
    /// Maximum wait for the collector's `Ack` or `Reject` after a dump is sent. Default 120 s.
    pub reply_timeout: Duration,
}

impl SocketSinkConfig {
    /// Creates a configuration with the defaults listed on each field.
    pub fn new(endpoint: Endpoint, spool_directory: impl Into<PathBuf>) -> Self {
        SocketSinkConfig {
            endpoint,
            spool: SpoolConfig::new(spool_directory),
            token: None,
            producer_id: None,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            io_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(120),
        }
    }
}

impl std::fmt::Debug for SocketSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketSinkConfig")
            .field("endpoint", &self.endpoint)
            .field("spool", &self.spool)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("producer_id", &self.producer_id)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("io_timeout", &self.io_timeout)
            .field("reply_timeout", &self.reply_timeout)
            .finish()
    }
}

/// Counters of a [`SocketSink`], as returned by [`SocketSink::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketSinkStats {
    /// Dumps sent completely to the collector, resends included.
    pub sent: u64,
    /// Dumps the collector acknowledged (and that were deleted from the spool).
    pub acked: u64,
    /// Dumps the sink rejected in `begin` or `data` because the spool was full.
    pub rejected_spool_full: u64,
    /// Dumps the collector rejected permanently, or that exceed its maximum dump size.
    pub rejected_by_collector: u64,
    /// Connection attempts made after a failed attempt or a lost connection.
    pub reconnects: u64,
    /// Handshakes that succeeded.
    pub connections: u64,
}

#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
    rejected_spool_full: AtomicU64,
    rejected_by_collector: AtomicU64,
    reconnects: AtomicU64,
    connections: AtomicU64,
}

/// The dump being written into the spool.
#[derive(Debug)]
struct CurrentDump {
    writer: SpoolWriter,
    dump_id: u64,
    total_size: u64,
    written: u64,
    crc: Crc32c,
}

/// Streams dumps to a collector through an on-disk spool. See the module docs.
#[derive(Debug)]
pub struct SocketSink {
    spool: Arc<Spool>,
    counters: Arc<Counters>,
    producer_id: u64,
    location: String,
    current: Option<CurrentDump>,
    sender: Option<JoinHandle<()>>,
}

/// Returns a producer id from the kernel's random source, or from the clock
/// and process id if `/dev/urandom` is unreadable.
fn random_producer_id() -> u64 {
    let mut bytes = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut file| file.read_exact(&mut bytes))
        .is_ok()
    {
        return u64::from_le_bytes(bytes);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ ((std::process::id() as u64) << 32)
}

fn sink_error(kind: SinkErrorKind, message: &str) -> SinkError {
    SinkError::new(kind, message)
}

impl SocketSink {
    /// Opens the spool (queueing dumps left by an earlier run) and starts the
    /// sender thread. Nothing connects until there is a dump to send.
    pub fn new(config: SocketSinkConfig) -> Result<Self, SinkError> {
        if let Some(token) = &config.token {
            if token.len() > MAX_TOKEN {
                return Err(sink_error(
                    SinkErrorKind::Protocol,
                    &format!(
                        "socket sink token is {} bytes, more than the maximum of {MAX_TOKEN}; use a shorter token",
                        token.len()
                    ),
                ));
            }
        }
        let spool = Spool::open(&config.spool)
            .map(Arc::new)
            .map_err(|error| sink_error(SinkErrorKind::Io, &error.to_string()))?;
        let producer_id = config.producer_id.unwrap_or_else(random_producer_id);
        let counters = Arc::new(Counters::default());
        let location = config.endpoint.to_string();
        let sender = Sender {
            config,
            spool: Arc::clone(&spool),
            counters: Arc::clone(&counters),
            random: producer_id | 1,
        };
        let sender = std::thread::Builder::new()
            .name("sandcore-dump-sender".into())
            .spawn(move || sender.run())
            .map_err(|error| {
                sink_error(
                    SinkErrorKind::Io,
                    &format!("failed to start the socket sink sender thread: {error}"),
                )
            })?;
        Ok(SocketSink {
            spool,
            counters,
            producer_id,
            location,
            current: None,
            sender: Some(sender),
        })
    }

    /// Returns the producer id sent in the handshake.
    pub fn producer_id(&self) -> u64 {
        self.producer_id
    }

    /// Returns a snapshot of the counters.
    pub fn stats(&self) -> SocketSinkStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        SocketSinkStats {
            sent: load(&self.counters.sent),
            acked: load(&self.counters.acked),
            rejected_spool_full: load(&self.counters.rejected_spool_full),
            rejected_by_collector: load(&self.counters.rejected_by_collector),
            reconnects: load(&self.counters.reconnects),
            connections: load(&self.counters.connections),
        }
    }

    /// Returns the number of dumps and bytes waiting in the spool.
    pub fn spool_usage(&self) -> (usize, u64) {
        self.spool.usage()
    }

    /// Waits until every spooled dump is acknowledged (or permanently
    /// rejected), at most `timeout`. Returns true if the spool is empty.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        self.spool.wait_empty(timeout)
    }

    fn spool_error(&mut self, dump_id: u64, error: SpoolError) -> SinkError {
        self.current = None;
        match error {
            SpoolError::Full { entries, bytes } => {
                self.counters
                    .rejected_spool_full
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    dump_id,
                    entries,
                    bytes,
                    "socket sink spool is full; dump rejected"
                );
                sink_error(SinkErrorKind::Rejected, &error.to_string())
            }
            SpoolError::Io { .. } => {
                tracing::warn!(dump_id, error = %error, "socket sink failed to spool dump");
                sink_error(SinkErrorKind::Io, &error.to_string())
            }
        }
    }

    fn current(&mut self, operation: &str) -> Result<&mut CurrentDump, SinkError> {
        self.current.as_mut().ok_or_else(|| {
            sink_error(
                SinkErrorKind::Protocol,
                &format!("socket sink {operation} called without begin; call begin first"),
            )
        })
    }

    /// Checks that `length` more logical bytes fit in the current dump.
    fn reserve(&mut self, operation: &str, length: u64) -> Result<(), SinkError> {
        let current = self.current(operation)?;
        let new_total = current.written.saturating_add(length);
        if new_total > current.total_size {
            let message = format!(
                "socket sink {operation} of {length} bytes takes dump {} to {new_total} bytes, past its total size of {}",
                current.dump_id, current.total_size
            );
            self.current = None;
            return Err(sink_error(SinkErrorKind::Protocol, &message));
        }
        Ok(())
    }

    fn write_spool(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        let current = self.current("write")?;
        let dump_id = current.dump_id;
        if let Err(error) = current.writer.write(bytes) {
            return Err(self.spool_error(dump_id, error));
        }
        Ok(())
    }
}

impl DumpSink for SocketSink {
    fn begin(&mut self, metadata: &DumpMetadata) -> Result<(), SinkError> {
        if let Some(current) = &self.current {
            return Err(sink_error(
                SinkErrorKind::Protocol,
                &format!(
                    "socket sink begin for dump {} while dump {} is open; call finish or abort first",
                    metadata.dump_id, current.dump_id
                ),
            ));
        }
        let writer = match self
            .spool
            .start(self.producer_id, metadata.dump_id, metadata.total_size)
        {
            Ok(writer) => writer,
            Err(error) => return Err(self.spool_error(metadata.dump_id, error)),
        };
        self.current = Some(CurrentDump {
            writer,
            dump_id: metadata.dump_id,
            total_size: metadata.total_size,
            written: 0,
            crc: Crc32c::new(),
        });
        let mut frame = [0u8; FRAME_HEADER_LEN + MAX_CONTROL_PAYLOAD];
        let length = protocol::encode_begin(metadata, &mut frame).map_err(|error| {
            sink_error(
                SinkErrorKind::Protocol,
                &format!("failed to encode Begin: {error}"),
            )
        })?;
        self.write_spool(&frame[..length])
    }

    fn data(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        self.reserve("data", bytes.len() as u64)?;
        for chunk in bytes.chunks(DATA_FRAME_SIZE) {
            let mut header = [0u8; FRAME_HEADER_LEN];
            // A chunk of at most DATA_FRAME_SIZE bytes always fits a frame header.
            let _ = protocol::encode_data_header(chunk.len(), &mut header);
            self.write_spool(&header)?;
            self.write_spool(chunk)?;
        }
        let current = self.current("data")?;
        current.crc.update(bytes);
        current.written += bytes.len() as u64;
        Ok(())
    }

    fn hole(&mut self, length: u64) -> Result<(), SinkError> {
        self.reserve("hole", length)?;
        let mut frame = [0u8; FRAME_HEADER_LEN + 8];
        let _ = protocol::encode_hole(length, &mut frame);
        self.write_spool(&frame)?;
        let current = self.current("hole")?;
        current.crc.update_zeros(length);
        current.written += length;
        Ok(())
    }

    fn finish(&mut self) -> Result<SinkReceipt, SinkError> {
        let Some(mut current) = self.current.take() else {
            return Err(sink_error(
                SinkErrorKind::Protocol,
                "socket sink finish called without begin; call begin first",
            ));
        };
        if current.written != current.total_size {
            return Err(sink_error(
                SinkErrorKind::Protocol,
                &format!(
                    "socket sink finish after {} of {} bytes of dump {}; send every byte before finish",
                    current.written, current.total_size, current.dump_id
                ),
            ));
        }
        let mut frame = [0u8; FRAME_HEADER_LEN + 12];
        let _ = protocol::encode_end(current.total_size, current.crc.value(), &mut frame);
        let dump_id = current.dump_id;
        let total_size = current.total_size;
        let committed = current
            .writer
            .write(&frame)
            .and_then(|()| current.writer.commit());
        if let Err(error) = committed {
            return Err(self.spool_error(dump_id, error));
        }
        tracing::debug!(dump_id, total_size, "dump spooled for sending");
        let mut location = heapless::String::new();
        for ch in self.location.chars() {
            if location.push(ch).is_err() {
                break;
            }
        }
        Ok(SinkReceipt {
            location,
            bytes: total_size,
        })
    }

    fn abort(&mut self) {
        // Dropping the writer deletes its temporary file.
        self.current = None;
    }

    fn name(&self) -> &str {
        "socket"
    }
}

impl Drop for SocketSink {
    fn drop(&mut self) {
        self.current = None;
        self.spool.close();
        if let Some(sender) = self.sender.take() {
            // The sender notices the closed spool within one read timeout slice.
            let _ = sender.join();
        }
    }
}

/// Result of sending one spool entry.
enum SendOutcome {
    /// The collector acknowledged the dump.
    Acked,
    /// The collector rejected the dump for good.
    RejectedPermanently,
    /// The collector rejected the dump for now; try again after a backoff.
    RejectedTransiently,
}

/// The background thread's state.
struct Sender {
    config: SocketSinkConfig,
    spool: Arc<Spool>,
    counters: Arc<Counters>,
    /// xorshift64 state for backoff jitter.
    random: u64,
}

/// An open, handshaken connection.
struct Session {
    connection: Connection,
    decoder: Decoder,
    producer_id: u64,
    max_dump_size: u64,
}

/// Granularity at which blocking reads notice that the sink is being dropped.
const READ_SLICE: Duration = Duration::from_millis(200);

impl Sender {
    fn run(mut self) {
        let mut session: Option<Session> = None;
        let mut backoff = self.config.initial_backoff;
        let mut failed_before = false;
        while let Some(entry) = self.spool.wait_for_entry(Duration::from_secs(3600)) {
            let result = self.send_entry(&mut session, &entry, &mut failed_before);
            match result {
                Ok(SendOutcome::Acked) | Ok(SendOutcome::RejectedPermanently) => {
                    backoff = self.config.initial_backoff;
                    if let Err(error) = self.spool.remove(&entry) {
                        tracing::warn!(
                            dump_id = entry.dump_id,
                            file = %entry.file_name,
                            error = %error,
                            "failed to delete spool entry; it will be sent again and deduplicated"
                        );
                    }
                    continue;
                }
                Ok(SendOutcome::RejectedTransiently) => {}
                Err(error) => {
                    if !self.spool.is_closed() {
                        tracing::warn!(
                            endpoint = %self.config.endpoint,
                            dump_id = entry.dump_id,
                            error = %error,
                            retry_in_ms = backoff.as_millis() as u64,
                            "failed to send dump to collector; will retry"
                        );
                    }
                    session = None;
                    failed_before = true;
                }
            }
            let wait = self.jittered(backoff);
            if !self.spool.sleep(wait) {
                break;
            }
            backoff = (backoff * 2).min(self.config.max_backoff);
        }
    }

    /// Returns a random duration in [backoff / 2, backoff].
    fn jittered(&mut self, backoff: Duration) -> Duration {
        self.random ^= self.random << 13;
        self.random ^= self.random >> 7;
        self.random ^= self.random << 17;
        let half = backoff / 2;
        let spread = half.as_nanos() as u64;
        let extra = if spread == 0 {
            0
        } else {
            self.random % (spread + 1)
        };
        half + Duration::from_nanos(extra)
    }

    fn send_entry(
        &mut self,
        session: &mut Option<Session>,
        entry: &SpoolEntry,
        failed_before: &mut bool,
    ) -> io::Result<SendOutcome> {
        if session
            .as_ref()
            .is_some_and(|open| open.producer_id != entry.producer_id)
        {
            // Entries left by an earlier run carry that run's producer id,
            // which goes in the handshake, so they need a connection of their own.
            *session = None;
        }
        if session.is_none() {
            if *failed_before {
                self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            *session = Some(self.connect(entry.producer_id)?);
            *failed_before = false;
        }
        let Some(open) = session.as_mut() else {
            return Err(io::Error::other("no connection"));
        };

        if entry.total_size > open.max_dump_size {
            self.counters
                .rejected_by_collector
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                dump_id = entry.dump_id,
                total_size = entry.total_size,
                max_dump_size = open.max_dump_size,
                "dump exceeds the collector's maximum dump size; dropping it from the spool"
            );
            return Ok(SendOutcome::RejectedPermanently);
        }

        let mut file = self.spool.open_entry(entry)?;
        let mut buffer = vec![0u8; DATA_FRAME_SIZE];
        loop {
            let read = file.read(&mut buffer)?;
            if read == 0 {
                break;
            }
            if let Err(error) = open.connection.write_all(&buffer[..read]) {
                // The collector may have replied with a Reject and closed;
                // read it before giving up on the connection.
                if let Ok(outcome) = self.read_reply(open, entry, Duration::from_millis(500)) {
                    return Ok(outcome);
                }
                return Err(error);
            }
        }
        open.connection.flush()?;
        self.counters.sent.fetch_add(1, Ordering::Relaxed);
        let timeout = self.config.reply_timeout;
        self.read_reply(open, entry, timeout)
    }

    fn read_reply(
        &self,
        session: &mut Session,
        entry: &SpoolEntry,
        timeout: Duration,
    ) -> io::Result<SendOutcome> {
        let message = read_message(
            &mut session.connection,
            &mut session.decoder,
            timeout,
            &self.spool,
        )?;
        match message {
            Reply::Ack(dump_id) if dump_id == entry.dump_id => {
                self.counters.acked.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(dump_id, "collector acknowledged dump");
                Ok(SendOutcome::Acked)
            }
            Reply::Reject(reject) if reject.dump_id == entry.dump_id => {
                let permanent = reject.reason.is_permanent();
                tracing::warn!(
                    dump_id = reject.dump_id,
                    reason = ?reject.reason,
                    message = %reject.message,
                    permanent,
                    "collector rejected dump"
                );
                if permanent {
                    self.counters
                        .rejected_by_collector
                        .fetch_add(1, Ordering::Relaxed);
                    Ok(SendOutcome::RejectedPermanently)
                } else {
                    Ok(SendOutcome::RejectedTransiently)
                }
            }
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "collector replied {other:?} while dump {} was waiting for its reply",
                    entry.dump_id
                ),
            )),
        }
    }

    fn connect(&self, producer_id: u64) -> io::Result<Session> {
        let mut connection = Connection::connect(&self.config.endpoint, self.config.io_timeout)?;
        connection.set_write_timeout(Some(self.config.io_timeout))?;
        let mut frame = [0u8; FRAME_HEADER_LEN + MAX_CONTROL_PAYLOAD];
        let token = self.config.token.as_deref().unwrap_or(&[]);
        let length = protocol::encode_client_hello(producer_id, token, &mut frame)
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error.to_string()))?;
        connection.write_all(&frame[..length])?;
        let mut decoder = Decoder::new(Role::Producer, Limits::default());
        let reply = read_message(
            &mut connection,
            &mut decoder,
            self.config.io_timeout,
            &self.spool,
        )?;
        let Reply::ServerHello(hello) = reply else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("collector sent {reply:?} instead of a handshake reply"),
            ));
        };
        if hello.status != HelloStatus::Accepted {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "collector rejected the handshake ({:?}): {}",
                    hello.status, hello.message
                ),
            ));
        }
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            endpoint = %self.config.endpoint,
            producer_id = format_args!("{producer_id:016x}"),
            "connected to collector"
        );
        Ok(Session {
            connection,
            decoder,
            producer_id,
            max_dump_size: hello.max_dump_size,
        })
    }
}

/// A message the producer receives, owned.
#[derive(Debug)]
enum Reply {
    ServerHello(protocol::ServerHello),
    Ack(u64),
    Reject(protocol::Reject),
}

/// Reads until one whole message arrives, at most `timeout`, giving up early
/// if the spool is closed.
fn read_message(
    connection: &mut Connection,
    decoder: &mut Decoder,
    timeout: Duration,
    spool: &Spool,
) -> io::Result<Reply> {
    let deadline = Instant::now() + timeout;
    // Reading one byte at a time leaves any later reply in the socket for the
    // next call, and replies are only a few dozen bytes.
    let mut buffer = [0u8; 1];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("timed out after {timeout:?} waiting for the collector's reply"),
            ));
        }
        if spool.is_closed() {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "socket sink is shutting down",
            ));
        }
        connection.set_read_timeout(Some((deadline - now).min(READ_SLICE)))?;
        let read = match connection.read(&mut buffer) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "collector closed the connection",
                ))
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
                continue
            }
            Err(error) => return Err(error),
        };
        let (_, message) = decoder
            .decode(&buffer[..read])
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error.to_string()))?;
        match message {
            None => {}
            Some(Message::ServerHello(hello)) => return Ok(Reply::ServerHello(hello)),
            Some(Message::Ack(dump_id)) => return Ok(Reply::Ack(dump_id)),
            Some(Message::Reject(reject)) => return Ok(Reply::Reject(reject)),
            Some(other) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("collector sent an unexpected message {other:?}"),
                ))
            }
        }
    }
}
