//! Global allocator over the heap region the host reserves.

use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

pub(crate) fn init(base: u64, size: u64) {
    // SAFETY: the host maps [base, base + size) read-write for the guest and
    // uses it for nothing else; `init` runs once, before any allocation.
    unsafe { HEAP.lock().init(base as *mut u8, size as usize) };
}
