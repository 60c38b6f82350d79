//! The base image: guest memory right after the guest's one-time
//! initialisation, plus the vCPU state at that point.
//!
//! Building it loads the ELF (with `linux-loader`, into `vm-memory` guest
//! memory over a memfd), writes the page tables, the ring-0 shim and the boot
//! information, runs the guest until it parks for the first time, and seals
//! the memfd. Every sandbox of the guest then maps the sealed memfd privately
//! and starts from the saved vCPU state: no reload, no second init.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use linux_loader::loader::{elf::Elf, KernelLoader};
use sandcore_abi::layout::{BootInfo, BOOT_INFO_ADDRESS, IMAGE_BASE, PAGE_SIZE};
use sandcore_abi::ports::PORT_PARK;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::config::SandboxConfiguration;
use crate::crash::{exit_to_error, RawCrash};
use crate::error::{os_error, SandboxError};
use crate::guest_image::{GuestBinaryError, GuestImage};
use crate::memory::layout::{
    MemoryLayout, RegionSizes, GDT_ADDRESS, IDT_ADDRESS, IST1_STACK_BASE, IST1_STACK_TOP,
    PAGE_TABLES_ADDRESS, RING0_STACK_BASE, RING0_STACK_TOP, STUBS_ADDRESS,
};
use crate::memory::mapping::MemFile;
use crate::memory::paging::{write_page_tables, PageFlags, PageMapping};
use crate::vcpu::{initial_state, shim, Exit, VcpuState, Vm};

/// Guest memory and vCPU state after initialisation, shared by all sandboxes
/// of one guest and configuration.
pub struct BaseImage {
    pub(crate) id: u64,
    pub(crate) memory: Arc<MemFile>,
    pub(crate) layout: MemoryLayout,
    pub(crate) state: VcpuState,
    /// XCR0 the guest runs with. Constant: XSETBV faults at CPL3, so crash
    /// capture reads it from here instead of spending an ioctl.
    #[cfg_attr(not(feature = "crashdump"), allow(dead_code))]
    pub(crate) xcr0: u64,
    #[cfg_attr(not(feature = "crashdump"), allow(dead_code))]
    pub(crate) mappings: Vec<PageMapping>,
    #[cfg_attr(not(feature = "crashdump"), allow(dead_code))]
    pub(crate) image_segments: Vec<(PageMapping, u64)>,
    pub(crate) guest_name: String,
    #[cfg_attr(not(feature = "crashdump"), allow(dead_code))]
    pub(crate) guest_path: String,
    #[cfg_attr(not(feature = "crashdump"), allow(dead_code))]
    pub(crate) build_id: Vec<u8>,
    #[cfg_attr(not(feature = "crashdump"), allow(dead_code))]
    pub(crate) entry: u64,
    pub(crate) config: SandboxConfiguration,
}

impl std::fmt::Debug for BaseImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaseImage")
            .field("guest", &self.guest_name)
            .field("memory_size", &self.layout.memory_size)
            .finish_non_exhaustive()
    }
}

static NEXT_IMAGE_ID: AtomicU64 = AtomicU64::new(1);

impl BaseImage {
    /// Loads `image`, runs its initialisation and returns the sealed image.
    pub fn build(
        image: &GuestImage,
        config: &SandboxConfiguration,
    ) -> Result<Arc<BaseImage>, SandboxError> {
        config.validate()?;
        let sizes = RegionSizes {
            heap: config.heap_size,
            stack: config.stack_size,
            input: config.input_buffer_size,
            output: config.output_buffer_size,
        };
        let layout = MemoryLayout::new(image.end, sizes).ok_or_else(|| {
            SandboxError::InvalidConfiguration(format!(
                "guest image ({:#x} bytes) plus heap, stack and buffers exceed the guest memory limit of {} bytes",
                image.end - IMAGE_BASE,
                crate::memory::layout::MAX_MEMORY_SIZE
            ))
        })?;
        let memory = MemFile::create(&format!("sandcore-{}", image.name), layout.memory_size)
            .map_err(os_error("creating the guest memory memfd"))?;
        let (mappings, image_segments) = page_mappings(image, &layout);

        let guest_memory = load(image, &memory, &layout, &mappings)?;
        let (state, xcr0) = run_initialisation(image, &guest_memory, &layout)?;
        drop(guest_memory);
        memory
            .seal()
            .map_err(os_error("sealing the base image memfd"))?;

        Ok(Arc::new(BaseImage {
            id: NEXT_IMAGE_ID.fetch_add(1, Ordering::Relaxed),
            memory: Arc::new(memory),
            layout,
            state,
            xcr0,
            mappings,
            image_segments,
            guest_name: image.name.clone(),
            guest_path: image.path.clone(),
            build_id: image.build_id.clone(),
            entry: image.entry,
            config: config.clone(),
        }))
    }

    /// Guest memory size in bytes.
    pub fn memory_size(&self) -> u64 {
        self.layout.memory_size
    }

    /// Guest binary file name.
    pub fn guest_name(&self) -> &str {
        &self.guest_name
    }
}

/// Every mapped range with its permissions, and the image segments with
/// their file offsets.
fn page_mappings(
    image: &GuestImage,
    layout: &MemoryLayout,
) -> (Vec<PageMapping>, Vec<(PageMapping, u64)>) {
    let page = |start: u64, end: u64, flags: PageFlags| PageMapping { start, end, flags };
    let mut mappings = vec![
        page(
            BOOT_INFO_ADDRESS,
            BOOT_INFO_ADDRESS + PAGE_SIZE,
            PageFlags::USER_READ_ONLY,
        ),
        page(GDT_ADDRESS, GDT_ADDRESS + PAGE_SIZE, PageFlags::KERNEL_DATA),
        page(
            IDT_ADDRESS,
            IDT_ADDRESS + PAGE_SIZE,
            PageFlags::KERNEL_READ_ONLY,
        ),
        page(
            STUBS_ADDRESS,
            STUBS_ADDRESS + PAGE_SIZE,
            PageFlags::KERNEL_CODE,
        ),
        page(RING0_STACK_BASE, RING0_STACK_TOP, PageFlags::KERNEL_DATA),
        page(IST1_STACK_BASE, IST1_STACK_TOP, PageFlags::KERNEL_DATA),
    ];
    let mut image_segments = Vec::new();
    for segment in &image.segments {
        let flags = if segment.executable {
            PageFlags::USER_CODE
        } else if segment.writable {
            PageFlags::USER_DATA
        } else {
            PageFlags::USER_READ_ONLY
        };
        let mapping = page(segment.start, segment.end, flags);
        mappings.push(mapping);
        image_segments.push((mapping, segment.file_offset));
    }
    mappings.push(page(
        layout.heap_base,
        layout.heap_base + layout.heap_size,
        PageFlags::USER_DATA,
    ));
    mappings.push(page(
        layout.stack_base,
        layout.stack_base + layout.stack_size,
        PageFlags::USER_DATA,
    ));
    mappings.push(page(
        layout.input_base,
        layout.input_base + layout.input_size,
        PageFlags::USER_DATA,
    ));
    mappings.push(page(
        layout.output_base,
        layout.output_base + layout.output_size,
        PageFlags::USER_DATA,
    ));
    (mappings, image_segments)
}

/// Writes everything into the memfd through a shared `vm-memory` mapping.
fn load(
    image: &GuestImage,
    memory: &MemFile,
    layout: &MemoryLayout,
    mappings: &[PageMapping],
) -> Result<GuestMemoryMmap, SandboxError> {
    let file = memory
        .file()
        .try_clone()
        .map_err(os_error("duplicating the memfd"))?;
    let guest_memory = GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(0),
        layout.memory_size as usize,
        Some(FileOffset::new(file, 0)),
    )])
    .map_err(|error| SandboxError::Os {
        operation: "mapping guest memory",
        source: std::io::Error::other(error),
    })?;

    Elf::load(&guest_memory, None, &mut Cursor::new(&image.bytes), None)
        .map_err(|error| GuestBinaryError::Load(error.to_string()))?;

    // Host-owned area below the image: built in a buffer, then only the
    // pages that hold data are written, so the memfd stays sparse.
    let mut low = vec![0u8; IMAGE_BASE as usize];
    low[BOOT_INFO_ADDRESS as usize..][..std::mem::size_of::<BootInfo>()]
        .copy_from_slice(&boot_info_bytes(&layout.boot_info()));
    shim::write_shim(&mut low);
    let page_table_end = PAGE_TABLES_ADDRESS + layout.page_table_pages * PAGE_SIZE;
    let mut tables = vec![0u8; page_table_end as usize];
    write_page_tables(&mut tables, layout.memory_size, mappings);
    low[PAGE_TABLES_ADDRESS as usize..page_table_end as usize]
        .copy_from_slice(&tables[PAGE_TABLES_ADDRESS as usize..page_table_end as usize]);
    for (index, chunk) in low.chunks(PAGE_SIZE as usize).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            guest_memory
                .write_slice(chunk, GuestAddress(index as u64 * PAGE_SIZE))
                .map_err(|error| SandboxError::Os {
                    operation: "writing the host area",
                    source: std::io::Error::other(error),
                })?;
        }
    }
    Ok(guest_memory)
}

/// Bytes of `BootInfo` in its `repr(C)` layout (all fields little-endian).
fn boot_info_bytes(info: &BootInfo) -> [u8; std::mem::size_of::<BootInfo>()] {
    let mut bytes = [0u8; std::mem::size_of::<BootInfo>()];
    let fields: [(usize, &[u8]); 12] = [
        (0, &info.magic.to_le_bytes()),
        (8, &info.abi_version.to_le_bytes()),
        (12, &info.reserved.to_le_bytes()),
        (16, &info.heap_base.to_le_bytes()),
        (24, &info.heap_size.to_le_bytes()),
        (32, &info.stack_base.to_le_bytes()),
        (40, &info.stack_size.to_le_bytes()),
        (48, &info.input_base.to_le_bytes()),
        (56, &info.input_size.to_le_bytes()),
        (64, &info.output_base.to_le_bytes()),
        (72, &info.output_size.to_le_bytes()),
        (80, &info.memory_size.to_le_bytes()),
    ];
    for (offset, field) in fields {
        bytes[offset..offset + field.len()].copy_from_slice(field);
    }
    bytes
}

/// Runs the guest from its entry point until its first park and returns the
/// vCPU state there.
fn run_initialisation(
    image: &GuestImage,
    guest_memory: &GuestMemoryMmap,
    layout: &MemoryLayout,
) -> Result<(VcpuState, u64), SandboxError> {
    let host_address = guest_memory
        .get_host_address(GuestAddress(0))
        .map_err(|error| SandboxError::Os {
            operation: "finding guest memory",
            source: std::io::Error::other(error),
        })?;
    // SAFETY: `guest_memory` outlives the VM, which is dropped at the end of
    // this function.
    let mut vm = unsafe { Vm::new(host_address, layout.memory_size) }?;
    let start = initial_state(
        &vm,
        PAGE_TABLES_ADDRESS,
        image.entry,
        layout.initial_stack_pointer(),
    )?;
    vm.set_state(&start)?;

    let started = std::time::Instant::now();
    loop {
        let exit = vm.run();
        match exit {
            Exit::Io(PORT_PARK) => break,
            Exit::Interrupted => continue,
            other => {
                // SAFETY: the VM is stopped, so reading guest memory races with nothing.
                let memory = unsafe {
                    std::slice::from_raw_parts(host_address, layout.memory_size as usize)
                };
                let crash = RawCrash::from_exit(other, &vm, memory, layout, None);
                let error = exit_to_error(&crash);
                return Err(SandboxError::InitialisationFailed(Box::new(error)));
            }
        }
    }
    tracing::debug!(guest = %image.name, elapsed = ?started.elapsed(), "guest initialisation finished");
    let xcrs = vm
        .vcpu
        .get_xcrs()
        .map_err(crate::error::kvm_error("KVM_GET_XCRS"))?;
    let count = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
    // XCR0 is register 0; x87 state (bit 0) is always enabled.
    let xcr0 = xcrs.xcrs[..count]
        .iter()
        .find(|x| x.xcr == 0)
        .map_or(1, |x| x.value);
    Ok((vm.state()?, xcr0))
}
