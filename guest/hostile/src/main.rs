//! Hostile guest: each function writes something into the shared slots that
//! breaks the call protocol, then hands control to the host the way a
//! correct guest would. The host must answer every one with an error, never
//! a panic or a read outside the buffers.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, Ordering};
use sandcore_abi::layout::{BootInfo, BOOT_INFO_ADDRESS};
use sandcore_abi::ports::{PORT_ABORT, PORT_HOST_CALL, PORT_PARK};
use sandcore_abi::slot::{
    SlotHeader, OUTPUT_ABORT, OUTPUT_EMPTY, OUTPUT_HOST_CALL, OUTPUT_REPLY, PAYLOAD_OFFSET,
};
use sandcore_guest::{register, Registry};

fn boot_info() -> &'static BootInfo {
    // SAFETY: the host maps the boot information read-only at this address.
    unsafe { &*(BOOT_INFO_ADDRESS as *const BootInfo) }
}

fn input() -> &'static SlotHeader {
    // SAFETY: the input buffer starts with a SlotHeader of atomics.
    unsafe { &*(boot_info().input_base as *const SlotHeader) }
}

fn output() -> &'static SlotHeader {
    // SAFETY: the output buffer starts with a SlotHeader of atomics.
    unsafe { &*(boot_info().output_base as *const SlotHeader) }
}

fn output_payload() -> &'static mut [u8] {
    let info = boot_info();
    // SAFETY: the payload follows the header inside the output buffer.
    unsafe {
        core::slice::from_raw_parts_mut(
            (info.output_base as usize + PAYLOAD_OFFSET) as *mut u8,
            info.output_size as usize - PAYLOAD_OFFSET,
        )
    }
}

fn exit(port: u16) {
    // SAFETY: `out` is allowed at CPL3 with IOPL 3 and only exits to the host.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") 0u8, clobber_abi("C"), options(nostack))
    };
}

/// Exits to `port` forever, so the bad slot contents stay as written even on
/// the polling transport, where the host reads them while the guest runs.
fn exit_forever(port: u16) -> ! {
    loop {
        exit(port);
    }
}

/// Publishes `length`, `state` and `sequence` in the output slot and parks.
fn publish(state: u32, length: u32, sequence: u64) {
    let header = output();
    header.length.store(length, Ordering::Relaxed);
    header.sequence.store(sequence, Ordering::Relaxed);
    header.state.store(state, Ordering::SeqCst);
}

fn current_sequence() -> u64 {
    input().sequence.load(Ordering::Relaxed)
}

fn reply_length_too_large() {
    publish(OUTPUT_REPLY, u32::MAX, current_sequence());
    exit_forever(PORT_PARK);
}

fn reply_garbage() {
    output_payload()[..16].copy_from_slice(&[0xee; 16]);
    publish(OUTPUT_REPLY, 16, current_sequence());
    exit_forever(PORT_PARK);
}

fn reply_wrong_sequence() {
    output_payload()[..2].copy_from_slice(&[0, 0]);
    publish(OUTPUT_REPLY, 2, current_sequence().wrapping_add(7));
    exit_forever(PORT_PARK);
}

fn park_without_reply() {
    publish(OUTPUT_EMPTY, 0, current_sequence());
    exit_forever(PORT_PARK);
}

fn host_call_length_too_large() {
    publish(OUTPUT_HOST_CALL, u32::MAX - 3, 0);
    exit_forever(PORT_HOST_CALL);
}

fn host_call_garbage() {
    output_payload()[..8].copy_from_slice(&[0xff; 8]);
    publish(OUTPUT_HOST_CALL, 8, 0);
    exit_forever(PORT_HOST_CALL);
}

fn host_call_wrong_state() {
    publish(OUTPUT_REPLY, 0, 0);
    exit_forever(PORT_HOST_CALL);
}

fn abort_without_message() {
    publish(OUTPUT_EMPTY, 0, 0);
    exit_forever(PORT_ABORT);
}

fn abort_length_too_large() {
    output_payload()[..5].copy_from_slice(b"oops\xff");
    publish(OUTPUT_ABORT, u32::MAX, 0);
    exit_forever(PORT_ABORT);
}

/// Marks its own request as taken and parks: the polling transport's vCPU
/// thread then sleeps as if idle, and only the host's stop can end the call.
fn clear_input_and_park() {
    input().state.store(0, Ordering::SeqCst);
    exit_forever(PORT_PARK);
}

fn unknown_port() {
    exit_forever(0x99);
}

fn port_read() {
    // SAFETY: `in` is allowed at CPL3 with IOPL 3 and only exits to the host.
    unsafe { core::arch::asm!("in al, dx", in("dx") 0x10u16, out("al") _, options(nostack)) };
}

fn privileged_instruction() {
    // SAFETY: `hlt` at CPL3 raises #GP, which is the point.
    unsafe { core::arch::asm!("hlt") };
}

/// Counts calls, so a test can check that restore() brought it back.
static CALLS: AtomicU32 = AtomicU32::new(0);

fn healthy() -> u32 {
    CALLS.fetch_add(1, Ordering::Relaxed) + 1
}

fn setup(registry: &mut Registry) {
    register!(registry, reply_length_too_large());
    register!(registry, reply_garbage());
    register!(registry, reply_wrong_sequence());
    register!(registry, park_without_reply());
    register!(registry, host_call_length_too_large());
    register!(registry, host_call_garbage());
    register!(registry, host_call_wrong_state());
    register!(registry, abort_without_message());
    register!(registry, abort_length_too_large());
    register!(registry, unknown_port());
    register!(registry, clear_input_and_park());
    register!(registry, port_read());
    register!(registry, privileged_instruction());
    register!(registry, healthy() -> u32);
}

sandcore_guest::guest_main!(setup);
