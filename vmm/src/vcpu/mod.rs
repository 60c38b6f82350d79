//! KVM objects: the process-wide `/dev/kvm` handle, one VM with one vCPU per
//! sandbox, the vCPU's initial state, and the decoding of VM exits.

pub mod shim;

use std::sync::OnceLock;

use kvm_bindings::{
    kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region, kvm_xsave, CpuId,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use sandcore_abi::layout::BOOT_INFO_ADDRESS;

use crate::error::{kvm_error, SandboxError};
use crate::memory::layout::{GDT_ADDRESS, IDT_ADDRESS, TSS_ADDRESS};
use shim::{GDT_LIMIT, IDT_LIMIT, TSS_LIMIT, TSS_SELECTOR, USER_CODE_SELECTOR, USER_DATA_SELECTOR};

/// `/dev/kvm` and the CPUID it supports, opened once per process.
struct KvmContext {
    kvm: Kvm,
    cpuid: CpuId,
}

static CONTEXT: OnceLock<Result<KvmContext, String>> = OnceLock::new();

fn context() -> Result<&'static KvmContext, SandboxError> {
    let context = CONTEXT.get_or_init(|| {
        let kvm = Kvm::new().map_err(|error| format!("cannot open /dev/kvm: {error}"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|error| format!("KVM_GET_SUPPORTED_CPUID failed: {error}"))?;
        Ok(KvmContext { kvm, cpuid })
    });
    context
        .as_ref()
        .map_err(|reason| SandboxError::KvmUnavailable {
            reason: reason.clone(),
        })
}

/// Checks that KVM can be used, without creating anything.
pub fn check_kvm() -> Result<(), SandboxError> {
    context().map(|_| ())
}

/// One VM with one vCPU and one memory slot at guest address 0.
pub struct Vm {
    /// The vCPU. Declared before `vm` so it is closed first.
    pub vcpu: VcpuFd,
    /// The VM.
    pub vm: VmFd,
    /// KVM copies the general and special registers into `kvm_run` at every
    /// exit (`KVM_CAP_SYNC_REGS`), so the crash path reads them without the
    /// two ioctls (about 5 µs each here) that it would otherwise need.
    sync_regs: bool,
}

impl Vm {
    /// Creates a VM whose memory slot 0 maps `size` bytes at `host_address`.
    ///
    /// # Safety
    /// `host_address..host_address + size` must stay mapped for as long as
    /// the VM exists (it may be replaced by another mapping at the same address).
    pub unsafe fn new(host_address: *mut u8, size: u64) -> Result<Vm, SandboxError> {
        let context = context()?;
        let vm = context
            .kvm
            .create_vm()
            .map_err(kvm_error("KVM_CREATE_VM"))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: host_address as u64,
        };
        // SAFETY: the caller guarantees the host range stays mapped while
        // the VM lives; KVM reads and writes guest memory only through it.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_error("KVM_SET_USER_MEMORY_REGION"))?;
        let mut vcpu = vm.create_vcpu(0).map_err(kvm_error("KVM_CREATE_VCPU"))?;
        vcpu.set_cpuid2(&context.cpuid)
            .map_err(kvm_error("KVM_SET_CPUID2"))?;
        let sync_regs = context.kvm.check_extension(kvm_ioctls::Cap::SyncRegs);
        if sync_regs {
            vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
            vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::SystemRegister);
        }
        Ok(Vm {
            vcpu,
            vm,
            sync_regs,
        })
    }

    /// Points memory slot 0 at a new host range in place of the current one.
    ///
    /// Swapping the slot lets a sandbox exchange whole mappings: the old
    /// mapping leaves the VM without KVM walking its pages (deleting a slot
    /// zaps shadow pages wholesale, while an munmap or madvise of a mapped
    /// slot makes KVM's MMU notifier walk every page of the range).
    ///
    /// # Safety
    /// `host_address..host_address + size` must stay mapped while the VM
    /// uses it, that is until the next replace or the VM's drop.
    pub unsafe fn replace_memory(
        &self,
        host_address: *mut u8,
        size: u64,
    ) -> Result<(), SandboxError> {
        let delete = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 0,
            userspace_addr: 0,
        };
        let create = kvm_userspace_memory_region {
            slot: 0,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: host_address as u64,
        };
        // SAFETY: deleting the slot stops KVM from using the old range; the
        // caller guarantees the new range for as long as the slot exists.
        unsafe {
            self.vm
                .set_user_memory_region(delete)
                .map_err(kvm_error("KVM_SET_USER_MEMORY_REGION (delete)"))?;
            self.vm
                .set_user_memory_region(create)
                .map_err(kvm_error("KVM_SET_USER_MEMORY_REGION"))
        }
    }

    /// Registers as of the last exit: from `kvm_run` when KVM syncs them
    /// there, otherwise with `KVM_GET_REGS` and `KVM_GET_SREGS`. `None`
    /// where an ioctl failed.
    pub fn exit_registers(&self) -> (Option<kvm_regs>, Option<kvm_sregs>) {
        if self.sync_regs {
            let synced = self.vcpu.sync_regs();
            (Some(synced.regs), Some(synced.sregs))
        } else {
            (self.vcpu.get_regs().ok(), self.vcpu.get_sregs().ok())
        }
    }

    /// Returns a bitmap (one bit per 4 KiB page, 64 pages per word) of the
    /// guest pages written since the last call, and starts a new interval.
    /// Slot 0 logs dirty pages so that restore can discard exactly those.
    pub fn take_dirty_pages(&self, size: u64) -> Result<Vec<u64>, SandboxError> {
        self.vm
            .get_dirty_log(0, size as usize)
            .map_err(kvm_error("KVM_GET_DIRTY_LOG"))
    }

    /// Loads a full register state.
    pub fn set_state(&self, state: &VcpuState) -> Result<(), SandboxError> {
        self.vcpu
            .set_sregs(&state.sregs)
            .map_err(kvm_error("KVM_SET_SREGS"))?;
        self.vcpu
            .set_regs(&state.regs)
            .map_err(kvm_error("KVM_SET_REGS"))?;
        if let Some(region) = &state.xsave {
            let xsave = kvm_xsave {
                region: **region,
                ..Default::default()
            };
            // SAFETY: the region came from KVM_GET_XSAVE on a vCPU with the
            // same CPUID, so its size and features match this vCPU.
            unsafe { self.vcpu.set_xsave(&xsave) }.map_err(kvm_error("KVM_SET_XSAVE"))?;
        }
        Ok(())
    }

    /// Finishes the I/O instruction of the last exit without running any
    /// guest instruction. KVM completes a port access only on the next
    /// `KVM_RUN` (for `in` it then writes RAX), so a register reset before
    /// that would be partly overwritten.
    pub fn complete_pending_io(&mut self) -> Result<(), SandboxError> {
        self.vcpu.set_kvm_immediate_exit(1);
        let result = self.vcpu.run().map(|_| ());
        self.vcpu.set_kvm_immediate_exit(0);
        match result {
            Err(error) if error.errno() != libc::EINTR && error.errno() != libc::EAGAIN => {
                Err(SandboxError::Kvm {
                    operation: "KVM_RUN (completing pending I/O)",
                    source: error,
                })
            }
            _ => Ok(()),
        }
    }

    /// Reads the full register state.
    pub fn state(&self) -> Result<VcpuState, SandboxError> {
        Ok(VcpuState {
            regs: self.vcpu.get_regs().map_err(kvm_error("KVM_GET_REGS"))?,
            sregs: self.vcpu.get_sregs().map_err(kvm_error("KVM_GET_SREGS"))?,
            xsave: Some(Box::new(
                self.vcpu
                    .get_xsave()
                    .map_err(kvm_error("KVM_GET_XSAVE"))?
                    .region,
            )),
        })
    }

    /// Runs the vCPU until the next exit. Allocates nothing, because it is
    /// on the crash path too.
    pub fn run(&mut self) -> Exit {
        match self.vcpu.run() {
            Ok(VcpuExit::IoOut(port, _)) => Exit::Io(port),
            Ok(VcpuExit::Shutdown) => Exit::Shutdown,
            Ok(VcpuExit::Hlt) => Exit::Other {
                description: "HLT exit",
                detail: 0,
            },
            Ok(VcpuExit::InternalError) => {
                let run = self.vcpu.get_kvm_run();
                // SAFETY: KVM filled the `internal` member of the exit union
                // because the exit reason is KVM_EXIT_INTERNAL_ERROR.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                Exit::Other {
                    description: "KVM_EXIT_INTERNAL_ERROR (1 = emulation failure), suberror",
                    detail: suberror as u64,
                }
            }
            Ok(VcpuExit::FailEntry(reason, _)) => Exit::Other {
                description: "KVM_EXIT_FAIL_ENTRY, hardware entry failure reason",
                detail: reason,
            },
            Ok(VcpuExit::IoIn(port, _)) => Exit::Other {
                description: "port read from port",
                detail: port as u64,
            },
            Ok(VcpuExit::MmioRead(address, _)) => Exit::Other {
                description: "MMIO read at unbacked address",
                detail: address,
            },
            Ok(VcpuExit::MmioWrite(address, _)) => Exit::Other {
                description: "MMIO write at unbacked address",
                detail: address,
            },
            Ok(_) => Exit::Other {
                description: "unhandled KVM exit",
                detail: 0,
            },
            Err(error) if error.errno() == libc::EINTR || error.errno() == libc::EAGAIN => {
                Exit::Interrupted
            }
            Err(error) => Exit::Failed(error),
        }
    }

    /// Pointer to `kvm_run.immediate_exit`, for the interrupt handle. Valid
    /// as long as the vCPU lives.
    pub fn immediate_exit_pointer(&mut self) -> *mut u8 {
        &mut self.vcpu.get_kvm_run().immediate_exit as *mut u8
    }
}

/// Reason `KVM_RUN` returned.
#[derive(Debug)]
pub enum Exit {
    /// The guest wrote to a port.
    Io(u16),
    /// Triple fault.
    Shutdown,
    /// A signal or `immediate_exit` stopped the run.
    Interrupted,
    /// Any other exit.
    Other {
        /// What happened.
        description: &'static str,
        /// The exit's address, port or reason code.
        detail: u64,
    },
    /// `KVM_RUN` itself failed.
    Failed(kvm_ioctls::Error),
}

/// A complete vCPU register state.
#[derive(Clone)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// Legacy XSAVE area (`kvm_xsave.region`), restored so that MXCSR and
    /// the x87 control word match the image.
    pub xsave: Option<Box<[u32; 1024]>>,
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 11 } else { 3 },
        present: 1,
        dpl: (selector & 3) as u8,
        db: if code { 0 } else { 1 },
        s: 1,
        l: if code { 1 } else { 0 },
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_AM: u64 = 1 << 18;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
/// RFLAGS: reserved bit 1 plus IOPL 3, so the guest may use `out`.
const RFLAGS_IOPL3: u64 = 0x3002;

/// Initial state: 64-bit mode at CPL3 with paging on, the shim's GDT, IDT
/// and TSS loaded, at `entry` with `stack_pointer`, and the boot information
/// address in RDI (the first argument of `_start`).
pub fn initial_state(
    vm: &Vm,
    cr3: u64,
    entry: u64,
    stack_pointer: u64,
) -> Result<VcpuState, SandboxError> {
    let mut sregs = vm.vcpu.get_sregs().map_err(kvm_error("KVM_GET_SREGS"))?;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG;
    sregs.cr3 = cr3;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA | EFER_NXE;
    sregs.cs = segment(USER_CODE_SELECTOR, true);
    let data = segment(USER_DATA_SELECTOR, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_ADDRESS;
    sregs.gdt.limit = GDT_LIMIT;
    sregs.idt.base = IDT_ADDRESS;
    sregs.idt.limit = IDT_LIMIT;
    sregs.tr = kvm_segment {
        base: TSS_ADDRESS,
        limit: TSS_LIMIT,
        selector: TSS_SELECTOR,
        type_: 11, // busy 64-bit TSS
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let regs = kvm_regs {
        rip: entry,
        rsp: stack_pointer,
        rdi: BOOT_INFO_ADDRESS,
        rflags: RFLAGS_IOPL3,
        ..Default::default()
    };
    Ok(VcpuState {
        regs,
        sregs,
        xsave: None,
    })
}
