//! Sandbox sizes and limits, with defaults and validation.

use std::time::Duration;

use sandcore_abi::layout::PAGE_SIZE;
use sandcore_abi::slot::MIN_BUFFER_SIZE;

use crate::error::SandboxError;
use crate::memory::layout::MAX_MEMORY_SIZE;

/// Default heap size: 4 MiB.
pub const DEFAULT_HEAP_SIZE: u64 = 4 << 20;
/// Default stack size: 256 KiB.
pub const DEFAULT_STACK_SIZE: u64 = 256 << 10;
/// Default input buffer size (header included): 128 KiB, room for a 64 KiB argument.
pub const DEFAULT_INPUT_BUFFER_SIZE: u64 = 128 << 10;
/// Default output buffer size (header included): 128 KiB.
pub const DEFAULT_OUTPUT_BUFFER_SIZE: u64 = 128 << 10;
/// Smallest stack accepted: 16 KiB, below which the runtime's own frames do not fit.
pub const MIN_STACK_SIZE: u64 = 16 << 10;
/// Smallest heap accepted: 64 KiB.
pub const MIN_HEAP_SIZE: u64 = 64 << 10;

/// Way calls reach the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// The vCPU runs on the calling thread; each call costs one VM exit.
    #[default]
    Exit,
    /// A dedicated vCPU thread keeps the guest spinning on the request slot,
    /// so a hot call costs no exit. After `idle_spin` without a call the
    /// guest parks and the thread sleeps; the next call wakes it with one exit.
    Polling {
        /// How long the guest spins for the next call before it parks.
        idle_spin: Duration,
    },
}

/// Sizes and limits of a sandbox. All sizes are bytes and must be multiples
/// of 4096.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxConfiguration {
    /// Guest heap.
    pub heap_size: u64,
    /// Guest stack (a guard page below it is added).
    pub stack_size: u64,
    /// Input buffer, slot header included.
    pub input_buffer_size: u64,
    /// Output buffer, slot header included.
    pub output_buffer_size: u64,
    /// Time limit per call; `None` lets calls run until cancelled.
    pub call_time_limit: Option<Duration>,
    /// Write a crash dump when a call times out or is cancelled, to show
    /// where the guest hung.
    pub dump_on_timeout: bool,
    /// Write crash dumps for this sandbox (only with the `crashdump` feature).
    pub guest_core_dump: bool,
    /// Way calls reach the guest.
    pub transport: Transport,
}

impl Default for SandboxConfiguration {
    fn default() -> Self {
        SandboxConfiguration {
            heap_size: DEFAULT_HEAP_SIZE,
            stack_size: DEFAULT_STACK_SIZE,
            input_buffer_size: DEFAULT_INPUT_BUFFER_SIZE,
            output_buffer_size: DEFAULT_OUTPUT_BUFFER_SIZE,
            call_time_limit: None,
            dump_on_timeout: false,
            guest_core_dump: cfg!(feature = "crashdump"),
            transport: Transport::Exit,
        }
    }
}

impl SandboxConfiguration {
    /// Checks every size; the error names the field, its value and the rule.
    pub fn validate(&self) -> Result<(), SandboxError> {
        let checks = [
            ("heap_size", self.heap_size, MIN_HEAP_SIZE),
            ("stack_size", self.stack_size, MIN_STACK_SIZE),
            ("input_buffer_size", self.input_buffer_size, MIN_BUFFER_SIZE),
            (
                "output_buffer_size",
                self.output_buffer_size,
                MIN_BUFFER_SIZE,
            ),
        ];
        for (field, value, minimum) in checks {
            if value % PAGE_SIZE != 0 {
                return Err(SandboxError::InvalidConfiguration(format!(
                    "{field} = {value} is not a multiple of the 4096-byte page size"
                )));
            }
            if value < minimum {
                return Err(SandboxError::InvalidConfiguration(format!(
                    "{field} = {value} is below the minimum of {minimum} bytes"
                )));
            }
            if value > MAX_MEMORY_SIZE {
                return Err(SandboxError::InvalidConfiguration(format!(
                    "{field} = {value} exceeds the guest memory limit of {MAX_MEMORY_SIZE} bytes"
                )));
            }
        }
        if self.input_buffer_size > u32::MAX as u64 || self.output_buffer_size > u32::MAX as u64 {
            return Err(SandboxError::InvalidConfiguration(
                "buffer sizes must stay below 4 GiB because slot lengths are 32-bit".into(),
            ));
        }
        if self.transport
            == (Transport::Polling {
                idle_spin: Duration::ZERO,
            })
        {
            return Err(SandboxError::InvalidConfiguration(
                "Transport::Polling with idle_spin = 0 would park after every call; use Transport::Exit instead".into(),
            ));
        }
        if self.call_time_limit == Some(Duration::ZERO) {
            return Err(SandboxError::InvalidConfiguration(
                "call_time_limit = 0 would stop every call; use None for no limit".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        SandboxConfiguration::default().validate().unwrap();
    }

    #[test]
    fn unaligned_heap_names_the_field() {
        let config = SandboxConfiguration {
            heap_size: 5000,
            ..Default::default()
        };
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains("heap_size = 5000"), "{message}");
    }

    #[test]
    fn tiny_stack_is_rejected() {
        let config = SandboxConfiguration {
            stack_size: 4096,
            ..Default::default()
        };
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains("stack_size = 4096 is below"), "{message}");
    }
}
