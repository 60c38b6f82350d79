//! Guest entry point and the dispatch loop.

use core::sync::atomic::Ordering;
use sandcore_abi::ports::{PORT_NOTIFY, PORT_PARK};
use sandcore_abi::slot::{INPUT_CALL, INPUT_EMPTY, OUTPUT_REPLY};

use crate::port::{exit_to_host, read_tsc};
use crate::registry::Registry;
use crate::shared::{self, Buffer};

/// Initialises the runtime, runs the guest's setup function once, then serves
/// calls forever. The first park signals the host that initialisation is done.
pub fn run(boot_info: u64, setup: fn(&mut Registry)) -> ! {
    shared::set_boot_info(boot_info);
    let info = shared::boot_info();
    crate::heap::init(info.heap_base, info.heap_size);

    let mut registry = Registry::new();
    setup(&mut registry);

    let input = Buffer::input();
    let output = Buffer::output();
    loop {
        wait_for_call(&input);
        let header = input.header();
        let request = input.received();
        let length = registry.dispatch(request, output.payload_mut());

        let out_header = output.header();
        out_header
            .sequence
            .store(header.sequence.load(Ordering::Relaxed), Ordering::Relaxed);
        out_header.length.store(length as u32, Ordering::Relaxed);
        header.state.store(INPUT_EMPTY, Ordering::Relaxed);
        out_header.state.store(OUTPUT_REPLY, Ordering::SeqCst);
        notify_waiting_host(&input);
    }
}

/// With the polling transport, exits once if a host thread sleeps waiting
/// for the output slot; see the handshake in `sandcore_abi::slot`.
pub(crate) fn notify_waiting_host(input: &Buffer) {
    let header = input.header();
    if header.poll_idle_ticks.load(Ordering::Relaxed) != 0
        && header.host_waiting.load(Ordering::SeqCst) != 0
    {
        exit_to_host(PORT_NOTIFY);
    }
}

/// Waits until the input slot has a call. With a zero idle time (the exit
/// transport) the guest parks at once and reads no clock; otherwise it spins
/// on the state word for up to the idle time and parks after that.
fn wait_for_call(input: &Buffer) {
    let header = input.header();
    loop {
        if header.state.load(Ordering::Acquire) == INPUT_CALL {
            return;
        }
        let idle_ticks = header.poll_idle_ticks.load(Ordering::Relaxed);
        if idle_ticks == 0 {
            exit_to_host(PORT_PARK);
            continue;
        }
        let idle_since = read_tsc();
        while read_tsc().wrapping_sub(idle_since) <= idle_ticks {
            if header.state.load(Ordering::Acquire) == INPUT_CALL {
                return;
            }
            core::hint::spin_loop();
        }
        exit_to_host(PORT_PARK);
    }
}
