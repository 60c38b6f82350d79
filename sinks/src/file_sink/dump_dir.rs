//! Choosing the directory the file sink writes to.

use std::ffi::{CString, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Environment variable that sets the dump directory.
pub const DUMP_DIR_ENV: &str = "SANDCORE_CORE_DUMP_DIR";
/// Environment variable read when [`DUMP_DIR_ENV`] is unset, for
/// compatibility with Hyperlight's name.
pub const DUMP_DIR_ENV_ALIAS: &str = "HYPERLIGHT_CORE_DUMP_DIR";

/// Returns the dump directory and, if the requested one is unusable, a warning.
///
/// The directory is, in order: `configured`, the [`DUMP_DIR_ENV`] variable,
/// the [`DUMP_DIR_ENV_ALIAS`] variable, and `std::env::temp_dir()`. Empty
/// variables count as unset. A directory that is missing, not a directory or
/// not writable is replaced by `temp_dir()`, and the warning names the path,
/// where it came from and why it was rejected.
pub fn resolve_dump_dir(configured: Option<&Path>) -> (PathBuf, Option<String>) {
    resolve_dump_dir_with(configured, |name| std::env::var_os(name))
}

/// Resolves the directory as [`resolve_dump_dir`] does, reading variables through `env`.
pub fn resolve_dump_dir_with(
    configured: Option<&Path>,
    env: impl Fn(&str) -> Option<OsString>,
) -> (PathBuf, Option<String>) {
    let fallback = std::env::temp_dir();
    let from_env = |name: &'static str| {
        env(name)
            .filter(|value| !value.is_empty())
            .map(|value| (PathBuf::from(value), name))
    };
    let requested = match configured {
        Some(path) => Some((path.to_path_buf(), "the sandbox configuration")),
        None => from_env(DUMP_DIR_ENV).or_else(|| from_env(DUMP_DIR_ENV_ALIAS)),
    };
    let Some((path, origin)) = requested else {
        return (fallback, None);
    };
    match check_usable(&path) {
        Ok(()) => (path, None),
        Err(reason) => {
            let warning = format!(
                "core dump directory {} (from {origin}) {reason}; writing dumps to {} instead",
                path.display(),
                fallback.display()
            );
            (fallback, Some(warning))
        }
    }
}

/// Returns why `path` cannot hold dumps, if it cannot.
fn check_usable(path: &Path) -> Result<(), String> {
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err("does not exist".to_string())
        }
        Err(error) => return Err(format!("cannot be read: {error}")),
    };
    if !metadata.is_dir() {
        return Err("is not a directory".to_string());
    }
    let c_path =
        CString::new(path.as_os_str().as_bytes()).map_err(|_| "contains a NUL byte".to_string())?;
    // SAFETY: `c_path` is a NUL-terminated string that outlives the call;
    // access(2) only reads it.
    let result = unsafe { libc::access(c_path.as_ptr(), libc::W_OK | libc::X_OK) };
    if result != 0 {
        return Err(format!("is not writable: {}", io::Error::last_os_error()));
    }
    Ok(())
}
