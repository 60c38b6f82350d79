//! Building sandboxes: guest, sizes, host functions, dump settings.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::base_image::BaseImage;
use crate::call::host_functions::{HostFunction, HostFunctions};
use crate::config::{SandboxConfiguration, Transport};
use crate::error::SandboxError;
use crate::guest_image::GuestImage;

use super::{PrintHandler, Sandbox};

enum GuestSource {
    None,
    File(PathBuf),
    Bytes(Vec<u8>, String),
    Base(Arc<BaseImage>),
}

/// Builds a [`Sandbox`]:
///
/// ```no_run
/// # fn main() -> Result<(), sandcore::SandboxError> {
/// let mut sandbox = sandcore::SandboxBuilder::new()
///     .guest_file("guest.elf")
///     .host_function("host_add", |a: i64, b: i64| a + b)
///     .build()?;
/// let sum: i32 = sandbox.call("add", (2i32, 3i32))?;
/// # Ok(()) }
/// ```
pub struct SandboxBuilder {
    guest: GuestSource,
    config: SandboxConfiguration,
    host_functions: HostFunctions,
    print_handler: Option<PrintHandler>,
    #[cfg(feature = "crashdump")]
    dump_dir: Option<PathBuf>,
    #[cfg(feature = "crashdump")]
    dump_worker: Option<crate::dump::DumpWorker>,
}

impl Default for SandboxBuilder {
    fn default() -> Self {
        SandboxBuilder::new()
    }
}

impl SandboxBuilder {
    /// Starts with the default configuration and no guest.
    pub fn new() -> SandboxBuilder {
        SandboxBuilder {
            guest: GuestSource::None,
            config: SandboxConfiguration::default(),
            host_functions: HostFunctions::default(),
            print_handler: None,
            #[cfg(feature = "crashdump")]
            dump_dir: None,
            #[cfg(feature = "crashdump")]
            dump_worker: None,
        }
    }

    /// Runs the guest binary at `path`.
    pub fn guest_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.guest = GuestSource::File(path.into());
        self
    }

    /// Runs a guest binary held in memory; `name` appears in logs and dumps.
    pub fn guest_bytes(mut self, bytes: impl Into<Vec<u8>>, name: &str) -> Self {
        self.guest = GuestSource::Bytes(bytes.into(), name.to_owned());
        self
    }

    /// Starts from an existing base image: no ELF load, no initialisation.
    /// Its sizes replace the ones set on this builder.
    pub fn base_image(mut self, base: Arc<BaseImage>) -> Self {
        self.guest = GuestSource::Base(base);
        self
    }

    /// Replaces the whole configuration.
    pub fn configuration(mut self, config: SandboxConfiguration) -> Self {
        self.config = config;
        self
    }

    /// Guest heap size in bytes (multiple of 4096).
    pub fn heap_size(mut self, bytes: u64) -> Self {
        self.config.heap_size = bytes;
        self
    }

    /// Guest stack size in bytes (multiple of 4096).
    pub fn stack_size(mut self, bytes: u64) -> Self {
        self.config.stack_size = bytes;
        self
    }

    /// Input buffer size in bytes, header included (multiple of 4096).
    pub fn input_buffer_size(mut self, bytes: u64) -> Self {
        self.config.input_buffer_size = bytes;
        self
    }

    /// Output buffer size in bytes, header included (multiple of 4096).
    pub fn output_buffer_size(mut self, bytes: u64) -> Self {
        self.config.output_buffer_size = bytes;
        self
    }

    /// Chooses how calls reach the guest (default [`Transport::Exit`]).
    pub fn transport(mut self, transport: Transport) -> Self {
        self.config.transport = transport;
        self
    }

    /// Stops any call that runs longer than `limit` with `TimedOut`.
    pub fn call_time_limit(mut self, limit: Duration) -> Self {
        self.config.call_time_limit = Some(limit);
        self
    }

    /// Registers a host function the guest calls by `name`. Parameters and
    /// result are any of the call types; a `Result<T, E>` return sends
    /// `E`'s text to the guest as an error.
    pub fn host_function<P, F: HostFunction<P>>(mut self, name: &str, function: F) -> Self {
        self.host_functions.insert(name, function.into_dyn());
        self
    }

    /// Receives the guest's debug prints; by default they are logged with
    /// `tracing` at info level, target `sandcore::guest`, with control
    /// characters escaped. A custom handler gets the guest's text unescaped.
    pub fn print_handler(mut self, handler: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.print_handler = Some(Arc::new(handler));
        self
    }

    /// Writes crash dumps for this sandbox (default: true when compiled in).
    /// Without the `crashdump` feature this setting has no effect.
    pub fn guest_core_dump(mut self, enabled: bool) -> Self {
        self.config.guest_core_dump = enabled;
        self
    }

    /// Also dumps calls that time out or are cancelled, to show where the guest hung.
    pub fn dump_on_timeout(mut self, enabled: bool) -> Self {
        self.config.dump_on_timeout = enabled;
        self
    }

    /// Directory for this sandbox's dump files, overriding
    /// `SANDCORE_CORE_DUMP_DIR`. Ignored when [`dump_worker`](Self::dump_worker) is set.
    #[cfg(feature = "crashdump")]
    pub fn dump_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dump_dir = Some(dir.into());
        self
    }

    /// Sends this sandbox's dumps to `worker` and its sinks instead of the
    /// process-wide default file worker.
    #[cfg(feature = "crashdump")]
    pub fn dump_worker(mut self, worker: &crate::dump::DumpWorker) -> Self {
        self.dump_worker = Some(worker.clone());
        self
    }

    /// Loads and initialises the guest (or reuses the base image) and
    /// creates the sandbox.
    pub fn build(self) -> Result<Sandbox, SandboxError> {
        self.config.validate()?;
        crate::vcpu::check_kvm()?;
        let base = match self.guest {
            GuestSource::None => return Err(SandboxError::InvalidConfiguration(
                "no guest given; call guest_file(), guest_bytes() or base_image() on the builder"
                    .into(),
            )),
            GuestSource::File(path) => {
                BaseImage::build(&GuestImage::from_file(&path)?, &self.config)?
            }
            GuestSource::Bytes(bytes, name) => {
                BaseImage::build(&GuestImage::from_bytes(bytes, &name)?, &self.config)?
            }
            GuestSource::Base(base) => base,
        };
        let mut config = base.config.clone();
        config.call_time_limit = self.config.call_time_limit;
        config.dump_on_timeout = self.config.dump_on_timeout;
        config.guest_core_dump = self.config.guest_core_dump;
        config.transport = self.config.transport;

        let print_handler = self.print_handler.unwrap_or_else(|| {
            Arc::new(|message: &str| tracing::info!(target: "sandcore::guest", "{}", message.escape_debug()))
        });

        #[cfg(feature = "crashdump")]
        let dumps = if config.guest_core_dump {
            let worker = match self.dump_worker {
                Some(worker) => worker,
                None => crate::dump::DumpWorker::for_directory(self.dump_dir.as_deref())?,
            };
            Some(worker.queue())
        } else {
            None
        };

        Sandbox::from_base(
            base,
            self.host_functions,
            print_handler,
            config,
            #[cfg(feature = "crashdump")]
            dumps,
        )
    }
}
