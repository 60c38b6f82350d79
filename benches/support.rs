//! Helpers shared by the criterion targets: one short criterion
//! configuration, temporary directories, and a count of the guest pages a
//! sandbox has dirtied.

use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};

/// Criterion settings for every target, chosen so that the whole suite runs
/// in a few minutes on two cores: 10 samples, 1 s warm-up, 3 s of
/// measurement per case. Command-line options still override them.
pub fn criterion() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .without_plots()
        .configure_from_args()
}

/// Lowers a group's measurement time for cases whose iterations take
/// milliseconds, where 10 samples of a few iterations each are enough.
pub fn shorten(group: &mut BenchmarkGroup<'_, WallTime>) {
    group.measurement_time(Duration::from_secs(2));
    group.warm_up_time(Duration::from_millis(500));
}

/// One mebibyte.
pub const MIB: u64 = 1 << 20;

/// A directory under the system temp directory, removed with its contents on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `sandcore-bench-<label>-<pid>` under the temp directory, emptying an old one.
    pub fn new(label: &str) -> std::io::Result<TempDir> {
        let path =
            std::env::temp_dir().join(format!("sandcore-bench-{label}-{}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::create_dir_all(&path)?;
        Ok(TempDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.path) {
            eprintln!("failed to remove {}: {error}", self.path.display());
        }
    }
}

/// Sums `Private_Dirty` over this process's mappings of Sandcore guest
/// memfds (named `memfd:sandcore-…`) and returns it in 4 KiB pages. With
/// one sandbox alive this is the number of guest pages it wrote since its
/// last restore: the base image is mapped `MAP_PRIVATE`, so every written
/// page is a private copy. Returns `None` if `/proc/self/smaps` is unreadable.
pub fn sandbox_private_dirty_pages() -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut in_guest_mapping = false;
    let mut kibibytes = 0;
    for line in smaps.lines() {
        if let Some(value) = line.strip_prefix("Private_Dirty:") {
            if in_guest_mapping {
                kibibytes += value
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()?;
            }
        } else if line
            .split_whitespace()
            .next()
            .is_some_and(|first| first.contains('-') && !first.ends_with(':'))
        {
            // A mapping header: "start-end perms offset dev inode [path]".
            in_guest_mapping = line.contains("memfd:sandcore-");
        }
    }
    Some(kibibytes / 4)
}
