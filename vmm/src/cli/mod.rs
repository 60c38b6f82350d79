//! The subcommands of the `sandcore` binary, one module each, and what they share.

#[cfg(feature = "crashdump")]
pub mod collect;
pub mod demo;
#[cfg(feature = "crashdump")]
pub mod dumps;
pub mod run;

use std::fmt;
use std::path::Path;

use sandcore::{SandboxBuilder, SandboxError};

/// Name the embedded demo guest runs under; dumps carry it as their guest name.
pub const DEMO_GUEST_NAME: &str = "demo";

/// A failed subcommand: the message to print and the exit status.
#[derive(Debug)]
pub enum CliError {
    /// The command line is invalid (exit status 2).
    Usage(String),
    /// The guest or an operation failed (exit status 1).
    Failure(String),
}

impl CliError {
    /// Returns the process exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Failure(_) => 1,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Usage(message) | CliError::Failure(message) => f.write_str(message),
        }
    }
}

impl From<SandboxError> for CliError {
    /// Maps an invalid sandbox configuration (a size given on the command
    /// line) to a usage error and every other sandbox error to a failure.
    fn from(error: SandboxError) -> Self {
        match error {
            SandboxError::InvalidConfiguration(_) => CliError::Usage(error.to_string()),
            other => CliError::Failure(other.to_string()),
        }
    }
}

/// Returns a builder for the guest at `guest`, or for the embedded demo guest if `None`.
pub fn builder_for_guest(guest: Option<&Path>) -> SandboxBuilder {
    match guest {
        Some(path) => SandboxBuilder::new().guest_file(path),
        None => SandboxBuilder::new().guest_bytes(sandcore::demo_guest_bytes(), DEMO_GUEST_NAME),
    }
}

#[cfg(feature = "crashdump")]
/// Returns a file holding the embedded demo guest, for gdb.
///
/// That is the build output at [`sandcore::demo_guest_path`] while it still
/// contains the same bytes as this binary's embedded copy. Otherwise (the guest
/// was rebuilt or the binary runs on another machine) the embedded bytes are
/// written to `sandcore-demo-guest` in `directory`, replacing an older copy.
pub fn demo_guest_file(directory: &Path) -> std::io::Result<std::path::PathBuf> {
    let embedded = sandcore::demo_guest_bytes();
    let build_output = std::path::PathBuf::from(sandcore::demo_guest_path());
    if std::fs::read(&build_output).is_ok_and(|bytes| bytes == embedded) {
        return Ok(build_output);
    }

    let target = directory.join("sandcore-demo-guest");
    if std::fs::read(&target).is_ok_and(|bytes| bytes == embedded) {
        return Ok(target);
    }
    // Write under a fresh name and rename, so a file or symlink another user
    // placed at the final name is replaced, never written through.
    let temporary = directory.join(format!(".sandcore-demo-guest-{}.tmp", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temporary)
        .and_then(|mut file| std::io::Write::write_all(&mut file, embedded))
        .and_then(|()| std::fs::rename(&temporary, &target));
    if let Err(error) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(error);
    }
    Ok(target)
}

#[cfg(feature = "crashdump")]
/// Formats `timestamp_ns` (nanoseconds since the Unix epoch) as
/// `YYYY-MM-DD HH:MM:SS UTC`.
pub fn format_utc(timestamp_ns: u64) -> String {
    let seconds = timestamp_ns / 1_000_000_000;
    let days = (seconds / 86_400) as i64;
    let of_day = seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

#[cfg(feature = "crashdump")]
use sandcore_sinks::file_sink::civil_from_days;

#[cfg(feature = "crashdump")]
/// Formats a byte count with a binary unit, for example `1.5 MiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(feature = "crashdump")]
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(
            format_utc(951_782_400_000_000_000),
            "2000-02-29 00:00:00 UTC"
        );
        assert_eq!(
            format_utc(1_700_000_000_999_999_999),
            "2023-11-14 22:13:20 UTC"
        );
    }

    #[test]
    fn byte_formatting() {
        assert_eq!(format_bytes(0), "0 bytes");
        assert_eq!(format_bytes(1023), "1023 bytes");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(4 << 30), "4.0 GiB");
    }
}
