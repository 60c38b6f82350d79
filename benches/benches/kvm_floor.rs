//! Raw KVM floors on this machine, with no Sandcore code involved. The cases
//! are exit round trips from CPL3 and CPL0, a register read, a CPL3 fault
//! through a ring-0 stub, bare VM creation, and a shared-memory round trip
//! with a guest spinning at CPL3.

use criterion::{criterion_group, criterion_main, Criterion};
use sandcore_benches::floor;

/// Memory slot size of the bare VM: 8 MiB, about a default sandbox (4 MiB
/// heap plus stack, buffers, tables and image).
const BARE_VM_MEMORY: usize = 8 << 20;

fn kvm_floor(c: &mut Criterion) {
    let mut group = c.benchmark_group("kvm_floor");
    floor::bench_cpl3_exit(&mut group, "cpl3_out_exit");
    floor::bench_cpl0_exit(&mut group, "cpl0_out_exit");
    floor::bench_get_regs(&mut group, "get_regs");
    floor::bench_register_reset(&mut group, "register_reset");
    floor::bench_cpl3_fault(&mut group, "cpl3_fault_to_stub_exit_with_reset");
    floor::bench_vm_create(&mut group, "bare_vm_create", BARE_VM_MEMORY);
    floor::bench_shared_memory_round_trip(&mut group, "shared_memory_round_trip");
    group.finish();
}

criterion_group! {
    name = benches;
    config = sandcore_benches::support::criterion();
    targets = kvm_floor
}
criterion_main!(benches);
