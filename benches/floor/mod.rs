//! Raw KVM floors: the same exits, faults and round trips that Sandcore
//! uses, driven directly through `kvm-ioctls` with no Sandcore code between
//! the benchmark and the ioctl. Each Sandcore figure is compared with the
//! floor measured in the same run.
//!
//! The guest setup is the minimum that works on kvm-pvm: 64-bit mode with
//! paging, a GDT, a TSS with an I/O permission bitmap, an IDT with one
//! ring-0 stub per exception vector, and hand-assembled guest loops. The
//! bitmap matters: kvm-pvm runs CPL3 code with the hardware IOPL at 0, so
//! without a bitmap that allows the port, `out` at CPL3 raises #GP even with
//! RFLAGS.IOPL = 3.

mod layout;
mod polling;

use std::error::Error;
use std::sync::OnceLock;

use criterion::measurement::WallTime;
use criterion::BenchmarkGroup;
use kvm_bindings::{
    kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

pub use layout::{EXCEPTION_PORT, OUT_PORT};
pub use polling::PollingGuest;

use layout::*;

/// Error type of the floor setup; every failure here is fatal for a benchmark.
pub type FloorError = Box<dyn Error + Send + Sync>;

/// `out OUT_PORT, al; jmp back`: one port-I/O exit per `KVM_RUN`.
pub const OUT_LOOP: &[u8] = &[0xe6, OUT_PORT as u8, 0xeb, 0xfc];

/// `xor rax, rax; mov [rax], rax`: a page fault on the unmapped page 0.
pub const NULL_WRITE: &[u8] = &[0x48, 0x31, 0xc0, 0x48, 0x89, 0x00];

/// Privilege level the guest code starts at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Privilege {
    /// Ring 0: every instruction is emulated on kvm-pvm.
    Cpl0,
    /// Ring 3: native on kvm-pvm.
    Cpl3,
}

/// `/dev/kvm` and its supported CPUID, opened once per process.
struct KvmContext {
    kvm: Kvm,
    cpuid: CpuId,
}

fn context() -> &'static KvmContext {
    static CONTEXT: OnceLock<KvmContext> = OnceLock::new();
    CONTEXT.get_or_init(|| {
        let kvm =
            Kvm::new().expect("cannot open /dev/kvm; the floors need read-write access to it");
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .expect("KVM_GET_SUPPORTED_CPUID failed");
        KvmContext { kvm, cpuid }
    })
}

/// Anonymous shared memory that backs a raw VM's memory slot.
struct HostMemory {
    address: *mut u8,
    size: usize,
}

// SAFETY: the mapping is plain process memory owned by this value. It is
// unmapped only in Drop, so moving the owner to another thread is sound.
unsafe impl Send for HostMemory {}

impl HostMemory {
    fn new(size: usize) -> Result<HostMemory, FloorError> {
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(format!(
                "mmap of {size} bytes of guest memory failed: {}",
                std::io::Error::last_os_error()
            )
            .into());
        }
        Ok(HostMemory {
            address: address.cast(),
            size,
        })
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `address..address + size` is mapped read-write for the
        // lifetime of `self`, and `&mut self` rules out other references.
        unsafe { std::slice::from_raw_parts_mut(self.address, self.size) }
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range mapped in `new`. The VM that used
        // it is closed first (field order of the owners).
        unsafe { libc::munmap(self.address.cast(), self.size) };
    }
}

/// A VM with one vCPU and one memory slot, nothing else set up. The floor
/// for creating a sandbox.
pub struct BareVm {
    /// The vCPU, closed before the VM.
    pub vcpu: VcpuFd,
    /// The VM.
    pub vm: VmFd,
    _memory: HostMemory,
}

/// Creates a VM with a `memory_size`-byte slot of untouched anonymous
/// memory and one vCPU with the host's supported CPUID, as Sandcore does.
pub fn create_bare_vm(memory_size: usize) -> Result<BareVm, FloorError> {
    let context = context();
    let memory = HostMemory::new(memory_size)?;
    let vm = context.kvm.create_vm()?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: memory_size as u64,
        userspace_addr: memory.address as u64,
    };
    // SAFETY: the memory lives in the returned BareVm and is unmapped after
    // the VM and vCPU are closed (field order).
    unsafe { vm.set_user_memory_region(region) }?;
    let vcpu = vm.create_vcpu(0)?;
    vcpu.set_cpuid2(&context.cpuid)?;
    Ok(BareVm {
        vcpu,
        vm,
        _memory: memory,
    })
}

/// A VM running hand-assembled guest code at a chosen privilege level, with
/// page tables, GDT, TSS (I/O bitmap included), IDT and exception stubs.
pub struct RawVm {
    /// The vCPU, closed before the VM.
    pub vcpu: VcpuFd,
    /// The VM.
    pub vm: VmFd,
    memory: HostMemory,
    initial_regs: kvm_regs,
    initial_sregs: kvm_sregs,
}

impl RawVm {
    /// Creates the VM with `code` at the code address, ready to run at `privilege`.
    pub fn new(privilege: Privilege, code: &[u8]) -> Result<RawVm, FloorError> {
        let context = context();
        let mut memory = HostMemory::new(MEMORY_SIZE)?;
        write_guest_tables(memory.bytes_mut());
        memory.bytes_mut()[CODE_ADDRESS as usize..][..code.len()].copy_from_slice(code);

        let vm = context.kvm.create_vm()?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: MEMORY_SIZE as u64,
            userspace_addr: memory.address as u64,
        };
        // SAFETY: the memory lives in the returned RawVm and is unmapped
        // after the VM and vCPU are closed (field order).
        unsafe { vm.set_user_memory_region(region) }?;
        let vcpu = vm.create_vcpu(0)?;
        vcpu.set_cpuid2(&context.cpuid)?;

        let initial_sregs = initial_sregs(vcpu.get_sregs()?, privilege);
        let initial_regs = kvm_regs {
            rip: CODE_ADDRESS,
            rsp: USER_STACK_TOP,
            rflags: match privilege {
                Privilege::Cpl0 => RFLAGS_RESERVED,
                Privilege::Cpl3 => RFLAGS_RESERVED | RFLAGS_IOPL3,
            },
            ..Default::default()
        };
        let raw = RawVm {
            vcpu,
            vm,
            memory,
            initial_regs,
            initial_sregs,
        };
        raw.reset()?;
        Ok(raw)
    }

    /// Loads the initial segment, control and general registers again
    /// (`KVM_SET_SREGS` + `KVM_SET_REGS`), as after a fault.
    pub fn reset(&self) -> Result<(), FloorError> {
        self.vcpu.set_sregs(&self.initial_sregs)?;
        self.vcpu.set_regs(&self.initial_regs)?;
        Ok(())
    }

    /// Runs the vCPU and checks that it stopped with an `out` to `port`.
    pub fn run_to_port(&mut self, port: u16) -> Result<(), FloorError> {
        match self.vcpu.run()? {
            VcpuExit::IoOut(exit_port, _) if exit_port == port => Ok(()),
            other => Err(format!("expected an out to port {port:#x}, got {other:?}").into()),
        }
    }

    /// Host address of guest physical address 0.
    fn host_address(&self) -> *mut u8 {
        self.memory.address
    }
}

fn initial_sregs(mut sregs: kvm_sregs, privilege: Privilege) -> kvm_sregs {
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG;
    sregs.cr3 = PML4_ADDRESS;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA | EFER_NXE;
    let (code, data) = match privilege {
        Privilege::Cpl0 => (KERNEL_CODE_SELECTOR, KERNEL_DATA_SELECTOR),
        Privilege::Cpl3 => (USER_CODE_SELECTOR, USER_DATA_SELECTOR),
    };
    sregs.cs = segment(code, true);
    sregs.ds = segment(data, false);
    sregs.es = sregs.ds;
    sregs.fs = sregs.ds;
    sregs.gs = sregs.ds;
    sregs.ss = sregs.ds;
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
        ..Default::default()
    };
    sregs
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 11 } else { 3 },
        present: 1,
        dpl: (selector & 3) as u8,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        ..Default::default()
    }
}

/// Adds the exit-transport floor: `KVM_RUN` round trips with a port-I/O
/// exit from a CPL3 `out; jmp` loop.
pub fn bench_cpl3_exit(group: &mut BenchmarkGroup<'_, WallTime>, name: &str) {
    bench_exit(group, name, Privilege::Cpl3);
}

/// Adds `KVM_RUN` round trips with a port-I/O exit from a CPL0 `out; jmp` loop.
pub fn bench_cpl0_exit(group: &mut BenchmarkGroup<'_, WallTime>, name: &str) {
    bench_exit(group, name, Privilege::Cpl0);
}

fn bench_exit(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, privilege: Privilege) {
    let mut vm = RawVm::new(privilege, OUT_LOOP).expect("creating the out-loop VM");
    group.bench_function(name, |b| {
        b.iter(|| vm.run_to_port(OUT_PORT).expect("out-loop exit"))
    });
}

/// Adds the crash-path floor: reset RIP/RSP/CS/SS (`KVM_SET_SREGS` +
/// `KVM_SET_REGS`), then `KVM_RUN` through a CPL3 page fault, the IDT and
/// the ring-0 stub to its `out` exit. A new VM per fault would measure VM
/// creation instead, so the vCPU is reset and reused.
pub fn bench_cpl3_fault(group: &mut BenchmarkGroup<'_, WallTime>, name: &str) {
    let mut vm = RawVm::new(Privilege::Cpl3, NULL_WRITE).expect("creating the fault VM");
    group.bench_function(name, |b| {
        b.iter(|| {
            vm.reset().expect("register reset");
            vm.run_to_port(EXCEPTION_PORT)
                .expect("fault delivered to the stub");
        })
    });
}

/// Adds the register reset alone (`KVM_SET_SREGS` + `KVM_SET_REGS`), to
/// subtract from the fault floor.
pub fn bench_register_reset(group: &mut BenchmarkGroup<'_, WallTime>, name: &str) {
    let vm = RawVm::new(Privilege::Cpl3, NULL_WRITE).expect("creating the reset VM");
    group.bench_function(name, |b| b.iter(|| vm.reset().expect("register reset")));
}

/// Adds one vCPU register read (`KVM_GET_REGS`).
pub fn bench_get_regs(group: &mut BenchmarkGroup<'_, WallTime>, name: &str) {
    let vm = RawVm::new(Privilege::Cpl3, OUT_LOOP).expect("creating the VM");
    group.bench_function(name, |b| {
        b.iter(|| vm.vcpu.get_regs().expect("KVM_GET_REGS"))
    });
}

/// Adds creating a bare VM (slot of `memory_size` bytes, one vCPU, CPUID).
/// Only the creation is timed; closing the VM happens outside the timer.
pub fn bench_vm_create(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, memory_size: usize) {
    group.bench_function(name, |b| {
        b.iter_custom(|iterations| {
            let mut total = std::time::Duration::ZERO;
            for _ in 0..iterations {
                let started = std::time::Instant::now();
                let vm = create_bare_vm(memory_size).expect("creating a bare VM");
                total += started.elapsed();
                drop(vm);
            }
            total
        })
    });
}

/// Adds the polling floor: a host thread writes a doorbell in guest memory
/// and spins until the guest, spinning at CPL3 on its own vCPU thread,
/// writes the reply word.
pub fn bench_shared_memory_round_trip(group: &mut BenchmarkGroup<'_, WallTime>, name: &str) {
    let mut guest = PollingGuest::start().expect("starting the polling guest");
    group.bench_function(name, |b| b.iter(|| guest.round_trip()));
    guest.stop().expect("stopping the polling guest");
}
