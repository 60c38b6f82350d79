//! Demo guest: functions that do real work, and functions that crash in
//! every way the host must handle. The CLI, the integration tests and the
//! benchmarks call it.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;
use core::hint::black_box;
use core::sync::atomic::{AtomicU64, Ordering};
use sandcore_guest::{call_host, print, register, HostValue, Registry, Value};

/// Text the guest copies onto its heap during setup, so that a debugger can
/// find it in a crash dump.
const HEAP_SENTINEL: &str = "sandcore-heap-sentinel-7f3a";

/// Heap address of the sentinel copy, set once during setup.
static SENTINEL_ADDRESS: AtomicU64 = AtomicU64::new(0);

/// Incremented by `increment`; restore() must bring it back to zero.
static COUNTER: AtomicU64 = AtomicU64::new(0);

fn setup(registry: &mut Registry) {
    let sentinel = String::from(HEAP_SENTINEL).into_bytes();
    let mut with_nul = sentinel;
    with_nul.push(0);
    SENTINEL_ADDRESS.store(with_nul.leak().as_ptr() as u64, Ordering::Relaxed);

    register!(registry, noop());
    register!(registry, echo(&str) -> String);
    register!(registry, echo_bytes(&[u8]) -> Vec<u8>);
    register!(registry, echo_i32(i32) -> i32);
    register!(registry, echo_u32(u32) -> u32);
    register!(registry, echo_i64(i64) -> i64);
    register!(registry, echo_u64(u64) -> u64);
    register!(registry, echo_f32(f32) -> f32);
    register!(registry, echo_f64(f64) -> f64);
    register!(registry, echo_bool(bool) -> bool);
    register!(registry, add(i32, i32) -> i32);
    register!(registry, scale(f64, f64) -> f64);
    register!(registry, fnv1a(&[u8]) -> u64);
    register!(registry, sum_to(u64) -> u64);
    register!(registry, increment() -> u64);
    register!(registry, sentinel_address() -> u64);
    register!(registry, call_host_add(i64, i64) -> i64);
    register!(registry, print_message(&str));
    register!(registry, crash_null());
    register!(registry, crash_write_code());
    register!(registry, crash_write_shim());
    register!(registry, crash_divide_by_zero());
    register!(registry, crash_ud2());
    register!(registry, crash_stack_overflow() -> u64);
    register!(registry, crash_panic() -> i32);
    register!(registry, spin());
}

sandcore_guest::guest_main!(setup);

fn noop() {}

fn echo(message: &str) -> String {
    String::from(message)
}

fn echo_bytes(bytes: &[u8]) -> Vec<u8> {
    Vec::from(bytes)
}

fn echo_i32(value: i32) -> i32 {
    value
}

fn echo_u32(value: u32) -> u32 {
    value
}

fn echo_i64(value: i64) -> i64 {
    value
}

fn echo_u64(value: u64) -> u64 {
    value
}

fn echo_f32(value: f32) -> f32 {
    value
}

fn echo_f64(value: f64) -> f64 {
    value
}

fn echo_bool(value: bool) -> bool {
    value
}

fn add(a: i32, b: i32) -> i32 {
    a.wrapping_add(b)
}

/// Multiplies with SSE, which is why guest code must run at CPL3 here.
fn scale(value: f64, factor: f64) -> f64 {
    black_box(value) * black_box(factor)
}

/// 64-bit FNV-1a hash.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Sums 1..=n in a loop that the compiler cannot fold, so the call costs
/// real guest instructions.
fn sum_to(n: u64) -> u64 {
    let mut total: u64 = 0;
    let mut i: u64 = 1;
    while i <= n {
        total = black_box(total.wrapping_add(i));
        i += 1;
    }
    total
}

fn increment() -> u64 {
    COUNTER.fetch_add(1, Ordering::Relaxed) + 1
}

fn sentinel_address() -> u64 {
    SENTINEL_ADDRESS.load(Ordering::Relaxed)
}

fn call_host_add(a: i64, b: i64) -> i64 {
    match call_host("host_add", &[Value::I64(a), Value::I64(b)]) {
        Ok(HostValue::I64(sum)) => sum,
        Ok(other) => panic!("host_add returned {other:?}, expected an i64"),
        Err(error) => panic!("host_add failed: {error:?}"),
    }
}

fn print_message(message: &str) {
    print(message);
}

fn crash_null() {
    null_level_1(black_box(0));
}

#[inline(never)]
fn null_level_1(address: usize) {
    null_level_2(black_box(address));
    black_box(());
}

#[inline(never)]
fn null_level_2(address: usize) {
    null_level_3(black_box(address));
    black_box(());
}

#[inline(never)]
fn null_level_3(address: usize) {
    let pointer = address as *mut u64;
    // SAFETY: not sound, on purpose: the write faults on the unmapped page 0.
    unsafe { pointer.write_volatile(0xdead) };
}

#[inline(never)]
fn crash_write_code() {
    let code = crash_write_code as *const () as *mut u8;
    // SAFETY: not sound, on purpose: code pages are mapped read-only.
    unsafe { black_box(code).write_volatile(0x90) };
}

#[inline(never)]
fn crash_write_shim() {
    // 0x2000 holds the host's GDT, mapped supervisor-only.
    let shim = black_box(0x2000usize) as *mut u64;
    // SAFETY: not sound, on purpose: a CPL3 write to a supervisor page faults.
    unsafe { shim.write_volatile(0) };
}

#[inline(never)]
fn crash_divide_by_zero() {
    let divisor: u64 = black_box(0);
    // Rust checks `/` for zero and panics, so divide with the instruction
    // itself to raise #DE.
    // SAFETY: `div` only writes RAX and RDX, declared as outputs.
    unsafe {
        core::arch::asm!("div {0}", in(reg) divisor, inout("rax") 1u64 => _, inout("rdx") 0u64 => _);
    }
}

#[inline(never)]
fn crash_ud2() {
    // SAFETY: `ud2` raises #UD and does not return.
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}

#[inline(never)]
fn crash_stack_overflow() -> u64 {
    recurse(black_box(1))
}

/// Recursion with no base case; the local array makes each frame large, so
/// the stack guard page is reached quickly.
#[allow(unconditional_recursion)]
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let frame = black_box([depth; 32]);
    recurse(depth + 1).wrapping_add(frame[(depth % 32) as usize])
}

#[inline(never)]
fn crash_panic() -> i32 {
    let text = black_box("not a number");
    text.parse::<i32>().unwrap()
}

fn spin() {
    let mut turns: u64 = 0;
    loop {
        turns = black_box(turns.wrapping_add(1));
        core::hint::spin_loop();
    }
}
