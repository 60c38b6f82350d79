//! `sandcore collect`: receives crash dumps from socket sinks until SIGINT or SIGTERM.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Args;
use sandcore_sinks::collector::{self, CollectorConfig, Retention};
use sandcore_sinks::protocol::MAX_TOKEN;
use sandcore_sinks::socket_sink::Endpoint;

use super::CliError;

/// Shutdown request, set by the SIGINT and SIGTERM handler and polled by the collector.
static SHUTDOWN: AtomicBool = AtomicBool::new(false);

/// Returns the library's defaults, which `--help` shows and unset options take.
fn defaults() -> CollectorConfig {
    CollectorConfig::new(Endpoint::Tcp(String::new()), PathBuf::new())
}

#[derive(Args)]
#[command(
    after_help = "Stops on SIGINT or SIGTERM after the connections in progress end; a second signal ends \
                        the process at once. Prints the connection and dump counts on exit."
)]
pub struct CollectArgs {
    /// Endpoint to listen on: unix:PATH or tcp:HOST:PORT.
    #[arg(long, value_name = "ENDPOINT", value_parser = Endpoint::parse)]
    pub listen: Endpoint,

    /// Directory for the dumps and their JSON sidecars; created with mode 0700 if missing.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,

    /// File with the token producers must send (at most 64 bytes, one trailing newline
    /// is removed) [default: no token, any producer that can connect may store dumps].
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Maximum logical size of one dump in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = defaults().max_dump_size)]
    pub max_dump_size: u64,

    /// Maximum payload of one data frame in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = defaults().max_frame_size)]
    pub max_frame_size: u32,

    /// Seconds a connection may stay silent before it is closed.
    #[arg(long, value_name = "SECONDS", default_value_t = defaults().idle_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout: u64,

    /// Maximum connections served at once; more are refused as busy.
    #[arg(long, value_name = "COUNT", default_value_t = defaults().max_connections)]
    pub max_connections: usize,

    /// Maximum bytes all stored cores may occupy on disk; the oldest go first [default: no limit].
    #[arg(long, value_name = "BYTES")]
    pub max_total_bytes: Option<u64>,

    /// Free bytes to keep on the directory's file system, deleting the oldest dumps [default: no limit].
    #[arg(long, value_name = "BYTES")]
    pub min_free_bytes: Option<u64>,

    /// Maximum age of a stored dump in seconds; older dumps are deleted [default: no limit].
    #[arg(long, value_name = "SECONDS")]
    pub max_age: Option<u64>,
}

/// Runs `sandcore collect`.
pub fn run(args: &CollectArgs) -> Result<(), CliError> {
    let mut config = CollectorConfig::new(args.listen.clone(), &args.dir);
    config.token = args.token_file.as_deref().map(read_token).transpose()?;
    config.max_dump_size = args.max_dump_size;
    config.max_frame_size = args.max_frame_size;
    config.idle_timeout = Duration::from_secs(args.idle_timeout);
    config.max_connections = args.max_connections;
    config.retention = Retention {
        max_total_bytes: args.max_total_bytes,
        min_free_bytes: args.min_free_bytes,
        max_age: args.max_age.map(Duration::from_secs),
    };

    install_shutdown_handlers()?;
    let stats = collector::serve(config, &SHUTDOWN).map_err(|error| {
        CliError::Failure(format!("collector on {} failed: {error}", args.listen))
    })?;
    println!(
        "collector stopped: {} connections, {} dumps stored, {} duplicates, {} rejected, {} protocol errors",
        stats.connections, stats.stored, stats.duplicates, stats.rejected, stats.protocol_errors
    );
    Ok(())
}

/// Reads the token from `path`, without one trailing newline (`\n` or `\r\n`).
fn read_token(path: &Path) -> Result<Vec<u8>, CliError> {
    let metadata = std::fs::metadata(path).map_err(|error| {
        CliError::Usage(format!(
            "failed to read token file {}: {error}",
            path.display()
        ))
    })?;
    let mode = metadata.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            file = %path.display(),
            mode = format_args!("{:04o}", mode & 0o7777),
            "token file is accessible to group or other users; run chmod 600 on it"
        );
    }
    let mut token = std::fs::read(path).map_err(|error| {
        CliError::Usage(format!(
            "failed to read token file {}: {error}",
            path.display()
        ))
    })?;
    if token.last() == Some(&b'\n') {
        token.pop();
        if token.last() == Some(&b'\r') {
            token.pop();
        }
    }
    if token.is_empty() {
        return Err(CliError::Usage(format!(
            "token file {} is empty; write the token into it or omit --token-file",
            path.display()
        )));
    }
    if token.len() > MAX_TOKEN {
        return Err(CliError::Usage(format!(
            "token in {} is {} bytes long; the maximum is {MAX_TOKEN} bytes",
            path.display(),
            token.len()
        )));
    }
    Ok(token)
}

extern "C" fn request_shutdown(_signal: libc::c_int) {
    // The handler only stores to an atomic, which is async-signal-safe.
    SHUTDOWN.store(true, Ordering::SeqCst);
}

/// Sets SIGINT and SIGTERM to request shutdown. `SA_RESETHAND` restores the
/// default action after the first signal, so a second one ends the process.
fn install_shutdown_handlers() -> Result<(), CliError> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: an all-zero sigaction is a valid value (no flags, empty
        // mask) that the fields below complete.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = request_shutdown as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART | libc::SA_RESETHAND;
        // SAFETY: `action.sa_mask` is a valid sigset_t owned by this frame.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: `action` is fully initialised, the handler only stores to
        // an atomic, and a null old-action pointer is allowed.
        let result = unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) };
        if result != 0 {
            return Err(CliError::Failure(format!(
                "failed to install the handler for signal {signal}: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}
