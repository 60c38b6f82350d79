//! The memory functions the compiler emits calls to. A guest links without
//! libc (glibc's versions need IFUNC relocations that nothing here resolves),
//! so the runtime provides them with string instructions, which the compiler
//! cannot turn back into calls to these same functions.

use core::arch::asm;

/// Copies `count` bytes; the regions must not overlap.
///
/// # Safety
/// `dest` and `src` must be valid for `count` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, count: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges; DF is clear per the SysV ABI.
    unsafe {
        asm!("rep movsb", inout("rcx") count => _, inout("rdi") dest => _, inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dest
}

/// Copies `count` bytes; the regions may overlap.
///
/// # Safety
/// `dest` and `src` must be valid for `count` bytes.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, count: usize) -> *mut u8 {
    if (dest as usize) <= (src as usize) || (dest as usize) >= (src as usize).wrapping_add(count) {
        // SAFETY: a forward copy is correct when dest is below src or the
        // ranges do not overlap.
        return unsafe { memcpy(dest, src, count) };
    }
    // SAFETY: copy backwards from the last byte with DF set, then clear DF
    // again as the ABI requires.
    unsafe {
        asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") count => _,
            inout("rdi") dest.add(count - 1) => _,
            inout("rsi") src.add(count - 1) => _,
            options(nostack)
        );
    }
    dest
}

/// Fills `count` bytes with the low byte of `value`.
///
/// # Safety
/// `dest` must be valid for `count` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, count: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range.
    unsafe {
        asm!("rep stosb", inout("rcx") count => _, inout("rdi") dest => _, in("al") value as u8, options(nostack, preserves_flags));
    }
    dest
}

/// Compares `count` bytes and returns their difference at the first mismatch.
///
/// # Safety
/// `a` and `b` must be valid for `count` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, count: usize) -> i32 {
    let mut index = 0;
    while index < count {
        // SAFETY: index < count, inside both ranges. Volatile reads keep the
        // loop from being recognised as a memcmp idiom.
        let (x, y) = unsafe { (a.add(index).read_volatile(), b.add(index).read_volatile()) };
        if x != y {
            return x as i32 - y as i32;
        }
        index += 1;
    }
    0
}

/// Returns zero if the ranges are equal, nonzero otherwise.
///
/// # Safety
/// `a` and `b` must be valid for `count` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, count: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, count) }
}
