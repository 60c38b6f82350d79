//! Memfd-backed guest memory and the private mappings sandboxes run on.
//!
//! A [`MemFile`] is an immutable image of guest memory: the base image after
//! the guest's one-time initialisation, or a user snapshot. A sandbox runs on
//! a [`Mapping`] of it with `MAP_PRIVATE`, so guest writes land in private
//! copy-on-write pages and one image serves every sandbox of the guest.
//!
//! - restore: `madvise(MADV_DONTNEED)` on the pages KVM's dirty log names
//!   drops their private copies ([`Mapping::reset_dirty`]), so the work
//!   follows the pages the guest dirtied, not the memory size;
//! - switch image: `mmap(MAP_FIXED)` of another [`MemFile`] over the same
//!   range, which replaces it without ever leaving a hole;
//! - crash capture: the sandbox shares its mapping with the dump worker
//!   (an `Arc`), so the crash path moves and copies nothing. A restore that
//!   finds the worker still reading gives the sandbox a fresh mapping and
//!   moves the KVM memory slot to it.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
use std::sync::Arc;

use sandcore_abi::layout::PAGE_SIZE;

/// An immutable memfd holding one image of guest memory.
#[derive(Debug)]
pub struct MemFile {
    file: File,
    size: u64,
}

impl MemFile {
    /// Creates an empty (all-zero, sparse) memfd of `size` bytes that allows
    /// sealing.
    pub fn create(name: &str, size: u64) -> io::Result<MemFile> {
        let name = CString::new(name)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "memfd name contains NUL"))?;
        // SAFETY: `name` is a valid C string; memfd_create returns a new fd
        // or -1 and touches no memory of ours.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        Ok(MemFile { file, size })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Returns the underlying file, for building the image through a shared mapping.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Forbids any further change to the contents or size, so every sandbox
    /// mapping this image reads the same bytes. Fails if a shared writable
    /// mapping still exists.
    pub fn seal(&self) -> io::Result<()> {
        let seals =
            libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on our own fd with integer arguments.
        let result = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Creates a sealed image with the current contents of `mapping`,
    /// copying only the pages that may hold data.
    pub fn from_mapping(name: &str, mapping: &Mapping) -> io::Result<MemFile> {
        let image = MemFile::create(name, mapping.size() as u64)?;
        let resident = mapping.resident_pages()?;
        let bytes = mapping.as_slice();
        for (index, &flag) in resident.iter().enumerate() {
            if flag & 1 == 0 {
                continue;
            }
            let offset = index * PAGE_SIZE as usize;
            let page = &bytes[offset..offset + PAGE_SIZE as usize];
            if page.iter().any(|&b| b != 0) {
                image.file.write_all_at(page, offset as u64)?;
            }
        }
        image.seal()?;
        Ok(image)
    }
}

/// A private (copy-on-write) mapping of a [`MemFile`], owned exclusively.
#[derive(Debug)]
pub struct Mapping {
    address: NonNull<u8>,
    size: usize,
    backing: Arc<MemFile>,
}

// SAFETY: the mapping is plain memory owned by this value; moving it to
// another thread moves that ownership.
unsafe impl Send for Mapping {}
// SAFETY: shared references only read through `as_slice`; writes need
// `&mut self` or go through KVM, which the sandbox serialises.
unsafe impl Sync for Mapping {}

fn map_private(address: Option<NonNull<u8>>, backing: &MemFile) -> io::Result<NonNull<u8>> {
    let (hint, fixed) = match address {
        Some(address) => (address.as_ptr().cast(), libc::MAP_FIXED),
        None => (std::ptr::null_mut(), 0),
    };
    // SAFETY: maps our own memfd. With MAP_FIXED the range is one this
    // module owns (a Mapping being replaced), so no foreign memory is lost.
    let result = unsafe {
        libc::mmap(
            hint,
            backing.size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE | fixed,
            backing.file.as_raw_fd(),
            0,
        )
    };
    if result == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(result.cast()).ok_or_else(|| io::Error::other("mmap returned a null mapping"))
}

impl Mapping {
    /// Maps `backing` privately at an address the kernel chooses.
    pub fn new(backing: Arc<MemFile>) -> io::Result<Mapping> {
        let address = map_private(None, &backing)?;
        Ok(Mapping {
            address,
            size: backing.size as usize,
            backing,
        })
    }

    /// Host address of guest address 0.
    pub fn host_address(&self) -> *mut u8 {
        self.address.as_ptr()
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Returns the image this mapping was made from.
    pub fn backing(&self) -> &Arc<MemFile> {
        &self.backing
    }

    /// Guest memory as bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the range is mapped readable for the life of `self`. The
        // guest may change bytes concurrently only while a vCPU runs, and
        // the sandbox never reads through this slice during a KVM_RUN.
        unsafe { std::slice::from_raw_parts(self.address.as_ptr(), self.size) }
    }

    /// Drops every private page, so the memory equals the backing image again.
    pub fn reset(&self) -> io::Result<()> {
        // SAFETY: the range is our own mapping; MADV_DONTNEED on a private
        // file mapping only discards our private copies.
        let result =
            unsafe { libc::madvise(self.address.as_ptr().cast(), self.size, libc::MADV_DONTNEED) };
        if result != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Drops the private copies of the pages set in `dirty` (one bit per
    /// page, as `KVM_GET_DIRTY_LOG` returns them) and of every page in
    /// `also` (guest address ranges the host itself wrote). Only those
    /// ranges are passed to `madvise`, so KVM's MMU notifier walks them and
    /// not the whole mapping.
    pub fn reset_dirty(&self, dirty: &[u64], also: &[(u64, u64)]) -> io::Result<()> {
        let pages = self.size / PAGE_SIZE as usize;
        let mut marked = dirty.to_vec();
        marked.resize(pages.div_ceil(64), 0);
        for &(address, length) in also {
            let first = (address / PAGE_SIZE) as usize;
            let end = (address + length).div_ceil(PAGE_SIZE) as usize;
            for page in first..end.min(pages) {
                marked[page / 64] |= 1 << (page % 64);
            }
        }
        let is_marked = |page: usize| marked[page / 64] & (1 << (page % 64)) != 0;
        let mut page = 0;
        while page < pages {
            if marked[page / 64] == 0 {
                page = (page / 64 + 1) * 64;
                continue;
            }
            if !is_marked(page) {
                page += 1;
                continue;
            }
            let start = page;
            while page < pages && is_marked(page) {
                page += 1;
            }
            let offset = start * PAGE_SIZE as usize;
            let length = (page - start) * PAGE_SIZE as usize;
            // SAFETY: the run lies inside our own mapping; MADV_DONTNEED on a
            // private file mapping only discards our private copies.
            let result = unsafe {
                libc::madvise(
                    self.address.as_ptr().add(offset).cast(),
                    length,
                    libc::MADV_DONTNEED,
                )
            };
            if result != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Replaces the contents with a fresh private mapping of `backing` at the
    /// same address, in one `mmap(MAP_FIXED)` that never leaves the range
    /// unmapped. `backing` must have the same size.
    pub fn switch_backing(&mut self, backing: Arc<MemFile>) -> io::Result<()> {
        if backing.size as usize != self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "image of {} bytes cannot replace a mapping of {} bytes",
                    backing.size, self.size
                ),
            ));
        }
        map_private(Some(self.address), &backing)?;
        self.backing = backing;
        Ok(())
    }

    /// One byte per page; bit 0 is set where the page may hold data (it is
    /// private to this mapping or cached from the backing file). Pages with
    /// bit 0 clear were never written and read as zero.
    pub fn resident_pages(&self) -> io::Result<Vec<u8>> {
        let mut flags = vec![0u8; self.size.div_ceil(PAGE_SIZE as usize)];
        // SAFETY: `flags` has one byte per page of the range, which is ours.
        let result =
            unsafe { libc::mincore(self.address.as_ptr().cast(), self.size, flags.as_mut_ptr()) };
        if result != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(flags)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps the range this value owns; nothing refers to it
        // after drop (the sandbox removes the KVM slot first).
        unsafe { libc::munmap(self.address.as_ptr().cast(), self.size) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(mapping: &Mapping, offset: usize, value: u8) {
        // SAFETY: offset is inside the mapping in these tests.
        unsafe { mapping.host_address().add(offset).write(value) };
    }

    #[test]
    fn reset_reverts_private_writes() {
        let image = Arc::new(MemFile::create("test", 64 * 1024).unwrap());
        image.file().write_all_at(&[7], 4096).unwrap();
        image.seal().unwrap();
        let mapping = Mapping::new(Arc::clone(&image)).unwrap();
        write(&mapping, 4096, 9);
        assert_eq!(mapping.as_slice()[4096], 9);
        mapping.reset().unwrap();
        assert_eq!(mapping.as_slice()[4096], 7);
    }

    #[test]
    fn snapshot_image_keeps_written_pages() {
        let image = Arc::new(MemFile::create("test", 64 * 1024).unwrap());
        image.seal().unwrap();
        let mut mapping = Mapping::new(Arc::clone(&image)).unwrap();
        write(&mapping, 12288, 5);
        let snapshot = Arc::new(MemFile::from_mapping("snap", &mapping).unwrap());
        mapping.reset().unwrap();
        assert_eq!(mapping.as_slice()[12288], 0);
        mapping.switch_backing(snapshot).unwrap();
        assert_eq!(mapping.as_slice()[12288], 5);
    }

    #[test]
    fn reset_dirty_reverts_only_marked_pages() {
        let image = Arc::new(MemFile::create("test", 256 * 4096).unwrap());
        image.seal().unwrap();
        let mapping = Mapping::new(Arc::clone(&image)).unwrap();
        for page in [3usize, 64, 65, 200] {
            write(&mapping, page * 4096, 9);
        }
        let mut dirty = vec![0u64; 4];
        dirty[0] |= 1 << 3;
        dirty[1] |= 0b11;
        mapping.reset_dirty(&dirty, &[(200 * 4096, 1)]).unwrap();
        for page in [3usize, 64, 65, 200] {
            assert_eq!(
                mapping.as_slice()[page * 4096],
                0,
                "page {page} kept its write"
            );
        }

        write(&mapping, 7 * 4096, 5);
        mapping.reset_dirty(&[0; 4], &[]).unwrap();
        assert_eq!(
            mapping.as_slice()[7 * 4096],
            5,
            "an unmarked page was discarded"
        );
    }
}
