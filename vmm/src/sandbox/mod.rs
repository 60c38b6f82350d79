//! A sandbox: one VM and vCPU running one guest on a private mapping of a
//! base image.

mod builder;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use builder::SandboxBuilder;

use crate::base_image::BaseImage;
use crate::call::host_functions::HostFunctions;
use crate::call::polling::{idle_ticks, PollingVcpu};
use crate::call::slots::Slot;
use crate::config::{SandboxConfiguration, Transport};
use crate::error::{os_error, SandboxError};
use crate::interrupt::{InterruptHandle, InterruptState};
use crate::memory::mapping::{Mapping, MemFile};
use crate::vcpu::{VcpuState, Vm};

/// Owner of the vCPU: the calling thread, or the polling transport's thread.
pub(crate) enum VcpuOwner {
    Local(Vm),
    Thread(PollingVcpu),
}

impl VcpuOwner {
    /// Runs `operation` on the vCPU while the guest is stopped; see
    /// [`Sandbox::with_vm`].
    pub(crate) fn with_vm<R>(&mut self, operation: impl FnOnce(&mut Vm) -> R) -> R {
        match self {
            VcpuOwner::Local(vm) => operation(vm),
            VcpuOwner::Thread(polling) => operation(&mut polling.pause()),
        }
    }
}

/// Outcome details of the last call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallReport {
    /// The call ran on the polling transport.
    pub polling: bool,
    /// The guest had parked, so the call woke it with one VM exit. Always
    /// false on the exit transport, where every call is one exit.
    pub woke_guest: bool,
    /// The caller stopped spinning and slept before the reply came.
    pub slept: bool,
    /// Host-function calls served during the call.
    pub host_calls: u32,
}

/// Receives the guest's debug prints.
pub type PrintHandler = Arc<dyn Fn(&str) + Send + Sync>;

static NEXT_SANDBOX_ID: AtomicU64 = AtomicU64::new(1);

/// A running guest whose functions the host calls with [`Sandbox::call`].
///
/// Calls run the vCPU on the calling thread. After a crash the sandbox is
/// poisoned and refuses calls until [`Sandbox::restore`].
pub struct Sandbox {
    // Field order is drop order: the vCPU (and its thread) and the VM close
    // before the memory they map is unmapped.
    pub(crate) vcpu: VcpuOwner,
    /// Guest memory, shared with the dump worker after a crash.
    pub(crate) mapping: Arc<Mapping>,
    pub(crate) base: Arc<BaseImage>,
    pub(crate) input: Slot,
    pub(crate) output: Slot,
    pub(crate) host_functions: HostFunctions,
    pub(crate) print_handler: PrintHandler,
    pub(crate) config: SandboxConfiguration,
    pub(crate) poisoned: Option<String>,
    pub(crate) sequence: u64,
    pub(crate) interrupt: Arc<InterruptState>,
    pub(crate) id: u64,
    pub(crate) function: heapless::String<64>,
    pub(crate) last_call: CallReport,
    /// Host copy of a reply or host-function request, reused across calls.
    pub(crate) received: Vec<u8>,
    /// Pages outside the two buffers that the host wrote since the last
    /// restore (KVM's dirty log records only guest writes), as (address, length).
    pub(crate) host_written: Vec<(u64, u64)>,
    #[cfg(feature = "crashdump")]
    pub(crate) dumps: Option<crate::dump::DumpQueue>,
    /// Crash record for the next capture, allocated outside the crash path.
    #[cfg(feature = "crashdump")]
    pub(crate) spare_crash_info: Option<Box<sandcore_sinks::snapshot::CrashInfo>>,
}

/// A saved point of one sandbox's memory and vCPU state, to return to with
/// [`Sandbox::restore_to`]. Any sandbox of the same base image accepts it.
#[derive(Clone)]
pub struct Snapshot {
    base_id: u64,
    memory: Arc<MemFile>,
    state: VcpuState,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("base_image", &self.base_id)
            .finish_non_exhaustive()
    }
}

impl Sandbox {
    pub(crate) fn from_base(
        base: Arc<BaseImage>,
        host_functions: HostFunctions,
        print_handler: PrintHandler,
        config: SandboxConfiguration,
        #[cfg(feature = "crashdump")] dumps: Option<crate::dump::DumpQueue>,
    ) -> Result<Sandbox, SandboxError> {
        let mapping = Arc::new(
            Mapping::new(Arc::clone(&base.memory)).map_err(os_error("mapping the base image"))?,
        );
        // SAFETY: the mapping lives in the same Sandbox and is dropped after
        // the VM (field order); swap_memory moves the slot to a new mapping
        // before it gives the old one up.
        let mut vm = unsafe { Vm::new(mapping.host_address(), base.layout.memory_size) }?;
        vm.set_state(&base.state)?;
        let interrupt = InterruptState::new(vm.immediate_exit_pointer());
        let input = Slot::input(&mapping, &base.layout);
        let output = Slot::output(&mapping, &base.layout);
        let vcpu = match config.transport {
            Transport::Exit => VcpuOwner::Local(vm),
            Transport::Polling { .. } => {
                VcpuOwner::Thread(PollingVcpu::start(vm, input, Arc::clone(&interrupt))?)
            }
        };
        let id = NEXT_SANDBOX_ID.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(sandbox = id, guest = %base.guest_name, transport = ?config.transport, "sandbox created");
        #[cfg_attr(not(feature = "crashdump"), allow(unused_mut))]
        let mut sandbox = Sandbox {
            vcpu,
            mapping,
            base,
            input,
            output,
            host_functions,
            print_handler,
            config,
            poisoned: None,
            sequence: 0,
            interrupt,
            id,
            function: heapless::String::new(),
            last_call: CallReport::default(),
            received: Vec::with_capacity(output.capacity()),
            host_written: Vec::new(),
            #[cfg(feature = "crashdump")]
            dumps,
            #[cfg(feature = "crashdump")]
            spare_crash_info: None,
        };
        #[cfg(feature = "crashdump")]
        sandbox.reserve_crash_info();
        sandbox.start_polling();
        Ok(sandbox)
    }

    /// Tells the guest how long to spin for requests (zero on the exit
    /// transport) and lets a polling vCPU thread run. Needed after every
    /// change of memory image, because an image contains the idle time of the
    /// sandbox it was taken from.
    pub(crate) fn start_polling(&self) {
        let header = self.input.header();
        header.host_waiting.store(0, Ordering::SeqCst);
        match (&self.vcpu, self.config.transport) {
            (VcpuOwner::Thread(polling), Transport::Polling { idle_spin }) => {
                header
                    .poll_idle_ticks
                    .store(idle_ticks(idle_spin), Ordering::SeqCst);
                polling.resume();
            }
            _ => header.poll_idle_ticks.store(0, Ordering::SeqCst),
        }
    }

    /// Runs `operation` on the vCPU while the guest is stopped. The polling
    /// transport's thread is paused until [`Sandbox::start_polling`].
    pub(crate) fn with_vm<R>(&mut self, operation: impl FnOnce(&mut Vm) -> R) -> R {
        self.vcpu.with_vm(operation)
    }

    /// Returns how the last call went: hot or woke the guest, host calls served.
    pub fn last_call_report(&self) -> CallReport {
        self.last_call
    }

    /// Kernel thread id of the polling transport's vCPU thread, or `None`
    /// on the exit transport (the vCPU runs on the calling thread).
    pub fn vcpu_thread_id(&self) -> Option<i32> {
        match &self.vcpu {
            VcpuOwner::Local(_) => None,
            VcpuOwner::Thread(polling) => Some(polling.tid()),
        }
    }

    /// Process-unique id of this sandbox, used in logs and dump names.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Returns the base image, to create more sandboxes of the same guest cheaply.
    pub fn base_image(&self) -> Arc<BaseImage> {
        Arc::clone(&self.base)
    }

    /// Returns a handle that stops this sandbox's running call from another thread.
    pub fn interrupt_handle(&self) -> InterruptHandle {
        InterruptHandle {
            state: Arc::clone(&self.interrupt),
        }
    }

    /// True after a crash, until [`Sandbox::restore`].
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// Returns guest memory and vCPU to the base image (the state right after
    /// the guest's initialisation) and clears the poisoned flag. The cost
    /// grows with the pages the guest dirtied, not with the memory size.
    pub fn restore(&mut self) -> Result<(), SandboxError> {
        let base = Arc::clone(&self.base.memory);
        let state = self.base.state.clone();
        self.reset_to(base, &state)
    }

    /// Returns to `snapshot`, taken earlier from a sandbox of the same base image.
    pub fn restore_to(&mut self, snapshot: &Snapshot) -> Result<(), SandboxError> {
        if snapshot.base_id != self.base.id {
            return Err(SandboxError::InvalidConfiguration(
                "snapshot belongs to a sandbox of another base image; restore it into a sandbox created from the same base image".into(),
            ));
        }
        self.reset_to(Arc::clone(&snapshot.memory), &snapshot.state)
    }

    fn reset_to(&mut self, memory: Arc<MemFile>, state: &VcpuState) -> Result<(), SandboxError> {
        // Pauses a polling vCPU thread, so the guest does not run while its
        // memory is replaced.
        self.with_vm(|_| ());
        // The pages the guest wrote since the last restore, from KVM's dirty
        // log, plus the two buffers the host writes itself.
        let size = self.base.layout.memory_size;
        let dirty = self.vcpu.with_vm(|vm| vm.take_dirty_pages(size))?;
        let layout = &self.base.layout;
        let mut host_written = vec![
            (layout.input_base, layout.input_size),
            (layout.output_base, layout.output_size),
        ];
        host_written.append(&mut self.host_written);
        match Arc::get_mut(&mut self.mapping) {
            Some(mapping) if Arc::ptr_eq(mapping.backing(), &memory) => mapping
                .reset_dirty(&dirty, &host_written)
                .map_err(os_error("discarding private guest pages (madvise)"))?,
            Some(mapping) => mapping
                .switch_backing(memory)
                .map_err(os_error("mapping the restore image"))?,
            None => {
                // The dump worker still reads the crashed memory, so it
                // keeps that mapping and the sandbox moves to a fresh one.
                // Moving the KVM slot costs about 0.2 ms here, which is why
                // the other cases reset in place.
                let fresh = Mapping::new(memory).map_err(os_error("mapping the restore image"))?;
                self.swap_memory(Arc::new(fresh))?;
            }
        }
        self.with_vm(|vm| {
            vm.complete_pending_io()?;
            vm.set_state(state)
        })?;
        self.poisoned = None;
        #[cfg(feature = "crashdump")]
        self.reserve_crash_info();
        self.start_polling();
        Ok(())
    }

    /// Makes `mapping` the guest memory and returns the previous mapping,
    /// which the VM no longer references. Pauses a polling vCPU thread
    /// until [`Sandbox::start_polling`]. If KVM refuses the new slot, the
    /// sandbox is left without memory and poisoned.
    pub(crate) fn swap_memory(
        &mut self,
        mapping: Arc<Mapping>,
    ) -> Result<Arc<Mapping>, SandboxError> {
        let address = mapping.host_address();
        let size = mapping.size() as u64;
        // SAFETY: `mapping` becomes `self.mapping` below and lives until the
        // next swap or the sandbox's drop, after the VM (field order).
        let replaced = self.with_vm(|vm| unsafe { vm.replace_memory(address, size) });
        if let Err(error) = replaced {
            self.poisoned = Some(format!("guest memory could not be replaced: {error}"));
            return Err(error);
        }
        let previous = std::mem::replace(&mut self.mapping, mapping);
        self.input = Slot::input(&self.mapping, &self.base.layout);
        self.output = Slot::output(&self.mapping, &self.base.layout);
        if let VcpuOwner::Thread(polling) = &self.vcpu {
            polling.set_input(self.input);
        }
        Ok(previous)
    }

    /// Zeroes the IDT in this sandbox's memory, so that the guest's next
    /// fault cannot be delivered and ends in a triple fault. For Sandcore's
    /// tests: a guest at CPL3 cannot reach the IDT, so this is the only way
    /// to produce a real `KVM_EXIT_SHUTDOWN`. `restore()` undoes it.
    #[doc(hidden)]
    pub fn corrupt_idt_for_tests(&mut self) {
        use crate::memory::layout::IDT_ADDRESS;
        use sandcore_abi::layout::PAGE_SIZE;
        self.with_vm(|_| ());
        // SAFETY: the IDT page lies inside the mapping and the guest is
        // stopped; the write goes to this sandbox's private copy.
        unsafe {
            std::ptr::write_bytes(
                self.mapping.host_address().add(IDT_ADDRESS as usize),
                0,
                PAGE_SIZE as usize,
            );
        }
        self.host_written.push((IDT_ADDRESS, PAGE_SIZE));
        self.start_polling();
    }

    /// Saves the current guest memory and vCPU state. Copies only the pages
    /// that may hold data.
    pub fn snapshot(&mut self) -> Result<Snapshot, SandboxError> {
        if let Some(cause) = &self.poisoned {
            return Err(SandboxError::Poisoned {
                cause: cause.clone(),
            });
        }
        let state = self.with_vm(|vm| vm.state());
        let memory = MemFile::from_mapping("sandcore-snapshot", &self.mapping);
        self.start_polling();
        let memory = memory.map_err(os_error("copying guest memory into a snapshot"))?;
        Ok(Snapshot {
            base_id: self.base.id,
            memory: Arc::new(memory),
            state: state?,
        })
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let VcpuOwner::Thread(polling) = &mut self.vcpu {
            polling.stop();
        }
        self.interrupt.detach();
    }
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("id", &self.id)
            .field("guest", &self.base.guest_name)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}
