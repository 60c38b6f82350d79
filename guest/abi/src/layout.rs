//! Fixed addresses and the boot information block.
//!
//! Guest virtual addresses equal guest physical addresses. The host owns
//! everything below [`IMAGE_BASE`] (page tables, the ring-0 shim and its
//! stacks, all supervisor-only except the boot information page). The guest
//! image is linked at [`IMAGE_BASE`]; heap, stack and the two buffers follow
//! it at addresses the host chooses and publishes in [`BootInfo`].

/// Size of a guest page in bytes.
pub const PAGE_SIZE: u64 = 4096;

/// Guest address of the read-only [`BootInfo`] page.
pub const BOOT_INFO_ADDRESS: u64 = 0x1000;

/// Guest address the guest image is linked at (see the guest linker script).
pub const IMAGE_BASE: u64 = 0x40_0000;

/// Value of [`BootInfo::magic`]: "SANDCORE" in little-endian ASCII.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"SANDCORE");

/// Version of this ABI; the host refuses guests built against another one.
pub const ABI_VERSION: u32 = 1;

/// Where the guest finds its memory regions. The host writes it before the
/// guest starts; the guest only reads it (the page is mapped read-only).
///
/// All addresses are guest addresses and page-aligned; all sizes are bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`] of the host.
    pub abi_version: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// First byte of the heap.
    pub heap_base: u64,
    /// Heap size.
    pub heap_size: u64,
    /// Lowest byte of the stack; the page below it is an unmapped guard page.
    pub stack_base: u64,
    /// Stack size; the initial stack pointer is `stack_base + stack_size`.
    pub stack_size: u64,
    /// First byte of the input buffer (host to guest), starting with a slot header.
    pub input_base: u64,
    /// Input buffer size, header included.
    pub input_size: u64,
    /// First byte of the output buffer (guest to host), starting with a slot header.
    pub output_base: u64,
    /// Output buffer size, header included.
    pub output_size: u64,
    /// Total guest memory size.
    pub memory_size: u64,
}
