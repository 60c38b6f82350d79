//! Guest crashes, poisoning, restore, snapshots, cancellation and time
//! limits. Dumps are off, so these tests run with and without `crashdump`.
//! Every test runs on both transports, as `exit::<test>` and `polling::<test>`.

mod common;

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{assert_transport, demo_builder, demo_sandbox, expect_error, symbol_range};
use sandcore::{SandboxError, Transport};

/// Page-fault error code bits (Intel SDM Vol. 3A, 4.7).
const PF_PRESENT: u64 = 1 << 0;
const PF_WRITE: u64 = 1 << 1;
const PF_USER: u64 = 1 << 2;

/// The fields of a `GuestException`, for tests that expect one.
#[derive(Debug)]
struct Exception {
    vector: u8,
    name: &'static str,
    error_code: u64,
    rip: u64,
    cr2: u64,
}

fn expect_exception(error: &SandboxError) -> Exception {
    match error {
        SandboxError::GuestException {
            vector,
            name,
            error_code,
            rip,
            cr2,
            ..
        } => Exception {
            vector: *vector,
            name,
            error_code: *error_code,
            rip: *rip,
            cr2: *cr2,
        },
        other => panic!("expected GuestException, got {other:?}"),
    }
}

fn null_write_page_fault(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    let error = expect_error(sandbox.call::<()>("crash_null", ()), "crash_null");
    let exception = expect_exception(&error);
    let faulting_function = symbol_range("demo::null_level_3");

    assert_eq!(
        exception.vector, 14,
        "vector is {}, expected 14 (#PF): {exception:?}",
        exception.vector
    );
    assert_eq!(
        exception.cr2, 0,
        "CR2 is {:#x}, expected the null address",
        exception.cr2
    );
    assert!(
        faulting_function.contains(&exception.rip),
        "RIP {:#x} is outside null_level_3 ({:#x}..{:#x})",
        exception.rip,
        faulting_function.start,
        faulting_function.end
    );
    assert_eq!(
        exception.error_code & PF_WRITE,
        PF_WRITE,
        "error code {:#x} lacks the write bit",
        exception.error_code
    );
    assert_eq!(
        exception.error_code & PF_USER,
        PF_USER,
        "error code {:#x} lacks the user bit",
        exception.error_code
    );
    assert_eq!(
        exception.error_code & PF_PRESENT,
        0,
        "error code {:#x} has the present bit for an unmapped page",
        exception.error_code
    );
    assert!(error.poisons(), "a page fault does not count as poisoning");
    assert!(
        sandbox.is_poisoned(),
        "sandbox is not poisoned after a page fault"
    );
    assert_eq!(
        error.dump_id(),
        None,
        "a dump id was returned with dumps off"
    );

    let message = error.to_string();
    assert!(
        message.contains("vector 14"),
        "message does not name the vector: {message}"
    );
    assert!(
        message.contains(&format!("{:#x}", exception.rip)),
        "message does not name RIP: {message}"
    );
    assert!(
        message.contains("faulting address 0x0"),
        "message does not name the faulting address: {message}"
    );
}

fn write_code_page_fault(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    let error = expect_error(
        sandbox.call::<()>("crash_write_code", ()),
        "crash_write_code",
    );
    let exception = expect_exception(&error);
    let function = symbol_range("demo::crash_write_code");

    assert_eq!(
        exception.vector, 14,
        "vector is {}, expected 14 (#PF): {exception:?}",
        exception.vector
    );
    assert_eq!(
        exception.error_code & PF_WRITE,
        PF_WRITE,
        "error code {:#x} lacks the write bit",
        exception.error_code
    );
    assert_eq!(
        exception.error_code & PF_PRESENT,
        PF_PRESENT,
        "error code {:#x} lacks the present bit",
        exception.error_code
    );
    assert_eq!(
        exception.error_code & PF_USER,
        PF_USER,
        "error code {:#x} lacks the user bit",
        exception.error_code
    );
    assert!(
        function.contains(&exception.cr2),
        "CR2 {:#x} is outside crash_write_code ({:#x}..{:#x})",
        exception.cr2,
        function.start,
        function.end
    );
    assert!(
        function.contains(&exception.rip),
        "RIP {:#x} is outside crash_write_code ({:#x}..{:#x})",
        exception.rip,
        function.start,
        function.end
    );
}

fn write_shim_page_fault(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    let error = expect_error(
        sandbox.call::<()>("crash_write_shim", ()),
        "crash_write_shim",
    );
    let exception = expect_exception(&error);
    let function = symbol_range("demo::crash_write_shim");

    assert_eq!(
        exception.vector, 14,
        "vector is {}, expected 14 (#PF): {exception:?}",
        exception.vector
    );
    assert_eq!(
        exception.cr2, 0x2000,
        "CR2 is {:#x}, expected the GDT page 0x2000",
        exception.cr2
    );
    assert_eq!(
        exception.error_code,
        PF_USER | PF_WRITE | PF_PRESENT,
        "error code is {:#x}, expected 0x7 (user, write, present)",
        exception.error_code
    );
    assert!(
        function.contains(&exception.rip),
        "RIP {:#x} is outside crash_write_shim ({:#x}..{:#x})",
        exception.rip,
        function.start,
        function.end
    );
}

fn divide_error(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    let error = expect_error(
        sandbox.call::<()>("crash_divide_by_zero", ()),
        "crash_divide_by_zero",
    );
    let exception = expect_exception(&error);
    let function = symbol_range("demo::crash_divide_by_zero");

    assert_eq!(
        exception.vector, 0,
        "vector is {}, expected 0 (#DE): {exception:?}",
        exception.vector
    );
    assert_eq!(
        exception.error_code, 0,
        "#DE has error code {:#x}, expected none (0)",
        exception.error_code
    );
    assert!(
        function.contains(&exception.rip),
        "RIP {:#x} is outside crash_divide_by_zero ({:#x}..{:#x})",
        exception.rip,
        function.start,
        function.end
    );
    assert!(!exception.name.is_empty(), "exception name is empty");
}

fn invalid_opcode(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    let error = expect_error(sandbox.call::<()>("crash_ud2", ()), "crash_ud2");
    let exception = expect_exception(&error);
    let function = symbol_range("demo::crash_ud2");

    assert_eq!(
        exception.vector, 6,
        "vector is {}, expected 6 (#UD): {exception:?}",
        exception.vector
    );
    assert!(
        function.contains(&exception.rip),
        "RIP {:#x} is outside crash_ud2 ({:#x}..{:#x})",
        exception.rip,
        function.start,
        function.end
    );
}

fn stack_overflow(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    let error = expect_error(
        sandbox.call::<u64>("crash_stack_overflow", ()),
        "crash_stack_overflow",
    );
    let SandboxError::StackOverflow { rip, address, dump } = &error else {
        panic!("expected StackOverflow, got {error:?}");
    };
    let function = symbol_range("demo::recurse");

    assert!(
        function.contains(rip),
        "RIP {rip:#x} is outside recurse ({:#x}..{:#x})",
        function.start,
        function.end
    );
    assert_ne!(
        *address, 0,
        "faulting address is 0, expected the guard page"
    );
    assert_eq!(*dump, None, "a dump id was returned with dumps off");
    assert!(
        sandbox.is_poisoned(),
        "sandbox is not poisoned after a stack overflow"
    );
}

fn panic_message(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    let error = expect_error(sandbox.call::<i32>("crash_panic", ()), "crash_panic");
    let SandboxError::GuestPanic { message, .. } = &error else {
        panic!("expected GuestPanic, got {error:?}");
    };

    assert!(
        message.contains("ParseIntError") || message.contains("invalid digit"),
        "panic message does not contain the parse error: {message}"
    );
    assert!(
        message.contains("main.rs"),
        "panic message does not contain the location: {message}"
    );
    assert!(
        !message.ends_with("[truncated]"),
        "a short panic message was marked truncated: {message}"
    );
    assert!(
        sandbox.is_poisoned(),
        "sandbox is not poisoned after a panic"
    );
}

fn poisoned_until_restore(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    let crash = expect_error(sandbox.call::<()>("crash_ud2", ()), "crash_ud2");
    assert!(
        matches!(crash, SandboxError::GuestException { vector: 6, .. }),
        "expected #UD, got {crash:?}"
    );

    for attempt in 0..2 {
        let rejected = expect_error(
            sandbox.call::<i32>("add", (1i32, 2i32)),
            "call on a poisoned sandbox",
        );
        let SandboxError::Poisoned { cause } = &rejected else {
            panic!("attempt {attempt}: expected Poisoned, got {rejected:?}");
        };
        assert!(
            cause.contains("vector 6"),
            "attempt {attempt}: Poisoned cause does not describe the crash: {cause}"
        );
    }
    let snapshot = expect_error(sandbox.snapshot(), "snapshot of a poisoned sandbox");
    assert!(
        matches!(snapshot, SandboxError::Poisoned { .. }),
        "expected Poisoned from snapshot(), got {snapshot:?}"
    );

    sandbox.restore().expect("restore after a crash failed");
    assert!(
        !sandbox.is_poisoned(),
        "sandbox is still poisoned after restore"
    );
    let sum: i32 = sandbox
        .call("add", (1i32, 2i32))
        .expect("call after restore failed");
    assert_eq!(sum, 3, "add(1, 2) after restore returned {sum}");
}

fn restore_after_each_crash(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    let crashes = [
        "crash_null",
        "crash_write_code",
        "crash_write_shim",
        "crash_divide_by_zero",
        "crash_ud2",
        "crash_stack_overflow",
        "crash_panic",
    ];
    for function in crashes {
        let error = expect_error(sandbox.call::<sandcore::Value>(function, ()), function);
        assert!(
            error.poisons(),
            "{function} returned a non-poisoning error: {error:?}"
        );
        sandbox
            .restore()
            .unwrap_or_else(|error| panic!("restore after {function} failed: {error}"));

        let count: u64 = sandbox
            .call("increment", ())
            .unwrap_or_else(|error| panic!("increment after {function} failed: {error}"));
        assert_eq!(
            count, 1,
            "increment after {function} and restore returned {count}"
        );
        let echoed: String = sandbox
            .call("echo", ("still alive",))
            .expect("echo after restore failed");
        assert_eq!(
            echoed, "still alive",
            "echo after {function} and restore returned {echoed:?}"
        );
    }
}

fn restore_reverts_memory(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);

    let first: u64 = sandbox.call("increment", ()).expect("increment failed");
    let second: u64 = sandbox.call("increment", ()).expect("increment failed");
    assert_eq!(first, 1, "first increment returned {first}");
    assert_eq!(second, 2, "second increment returned {second}");

    sandbox.restore().expect("restore failed");
    let after: u64 = sandbox
        .call("increment", ())
        .expect("increment after restore failed");
    assert_eq!(
        after, 1,
        "increment after restore returned {after}, expected the counter reset"
    );
}

fn snapshot_restore_to(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    for _ in 0..3 {
        sandbox
            .call::<u64>("increment", ())
            .expect("increment failed");
    }
    let snapshot = sandbox.snapshot().expect("snapshot failed");

    let fourth: u64 = sandbox.call("increment", ()).expect("increment failed");
    assert_eq!(fourth, 4, "increment after the snapshot returned {fourth}");
    let crash = expect_error(sandbox.call::<()>("crash_null", ()), "crash_null");
    assert!(crash.poisons(), "crash_null did not poison: {crash:?}");

    sandbox.restore_to(&snapshot).expect("restore_to failed");
    assert!(
        !sandbox.is_poisoned(),
        "sandbox is still poisoned after restore_to"
    );
    let resumed: u64 = sandbox
        .call("increment", ())
        .expect("increment after restore_to failed");
    assert_eq!(
        resumed, 4,
        "increment after restore_to returned {resumed}, expected the snapshot's 3 plus one"
    );

    sandbox
        .restore_to(&snapshot)
        .expect("second restore_to failed");
    let again: u64 = sandbox
        .call("increment", ())
        .expect("increment after the second restore_to failed");
    assert_eq!(
        again, 4,
        "increment after the second restore_to returned {again}"
    );

    sandbox.restore().expect("restore to the base image failed");
    let base: u64 = sandbox
        .call("increment", ())
        .expect("increment after restore failed");
    assert_eq!(
        base, 1,
        "increment after restore to the base image returned {base}"
    );
}

fn snapshot_other_base_rejected(transport: Transport) {
    let mut first = demo_sandbox(transport);
    let mut second = demo_sandbox(transport);
    let snapshot = first.snapshot().expect("snapshot failed");

    let error = expect_error(
        second.restore_to(&snapshot),
        "restore_to with another base image's snapshot",
    );
    assert!(
        matches!(error, SandboxError::InvalidConfiguration(_)),
        "expected InvalidConfiguration, got {error:?}"
    );
    let count: u64 = second
        .call("increment", ())
        .expect("increment after the rejected restore_to failed");
    assert_eq!(
        count, 1,
        "increment after the rejected restore_to returned {count}"
    );
}

fn kill_cancels_spin(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    let handle = sandbox.interrupt_handle();
    let (started_sender, started) = mpsc::channel();

    let killer = thread::spawn(move || {
        let started_at: Instant = started.recv().expect("call thread did not start");
        thread::sleep(Duration::from_millis(50));
        let killed = handle.kill();
        (killed, started_at)
    });

    started_sender
        .send(Instant::now())
        .expect("kill thread is gone");
    let result = sandbox.call::<()>("spin", ());
    let returned_at = Instant::now();
    let (killed, started_at) = killer.join().expect("kill thread panicked");
    let elapsed = returned_at - started_at;

    assert!(killed, "kill() returned false while spin was running");
    let error = expect_error(result, "spin");
    assert!(
        matches!(error, SandboxError::Cancelled { .. }),
        "expected Cancelled, got {error:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(50),
        "spin returned after {elapsed:?}, before kill() was sent"
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "spin returned only after {elapsed:?}"
    );
    assert!(
        sandbox.is_poisoned(),
        "sandbox is not poisoned after Cancelled"
    );

    sandbox.restore().expect("restore after Cancelled failed");
    let sum: i32 = sandbox
        .call("add", (20i32, 22i32))
        .expect("call after Cancelled and restore failed");
    assert_eq!(sum, 42, "add(20, 22) after Cancelled returned {sum}");
}

fn kill_idle_returns_false(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    let handle = sandbox.interrupt_handle();
    assert!(!handle.kill(), "kill() before any call returned true");

    sandbox.call::<()>("noop", ()).expect("noop failed");
    assert!(!handle.kill(), "kill() after a finished call returned true");

    let count: u64 = sandbox
        .call("increment", ())
        .expect("a call after an idle kill() failed");
    assert_eq!(count, 1, "increment after an idle kill() returned {count}");
    assert!(
        !sandbox.is_poisoned(),
        "an idle kill() poisoned the sandbox"
    );
}

fn time_limit_stops_spin(transport: Transport) {
    let limit = Duration::from_millis(100);
    let mut sandbox = demo_builder(transport)
        .call_time_limit(limit)
        .build()
        .expect("building the sandbox failed");
    assert_transport(&sandbox, transport);

    let started = Instant::now();
    let error = expect_error(sandbox.call::<()>("spin", ()), "spin with a time limit");
    let elapsed = started.elapsed();

    let SandboxError::TimedOut {
        limit: reported, ..
    } = &error
    else {
        panic!("expected TimedOut, got {error:?}");
    };
    assert_eq!(*reported, limit, "TimedOut reports the limit {reported:?}");
    assert!(
        elapsed >= limit,
        "spin returned after {elapsed:?}, before the {limit:?} limit"
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "spin returned only after {elapsed:?}"
    );

    sandbox.restore().expect("restore after TimedOut failed");
    let count: u64 = sandbox
        .call("increment", ())
        .expect("a short call under the time limit failed");
    assert_eq!(count, 1, "increment after TimedOut returned {count}");
}

fn time_limit_spares_short_calls(transport: Transport) {
    let mut sandbox = demo_builder(transport)
        .call_time_limit(Duration::from_millis(500))
        .build()
        .expect("building the sandbox failed");
    assert_transport(&sandbox, transport);
    for round in 0..50u64 {
        let count: u64 = sandbox
            .call("increment", ())
            .expect("a short call under the time limit failed");
        assert_eq!(count, round + 1, "increment call {round} returned {count}");
    }
    // A deadline armed for an earlier call must not stop a later one.
    thread::sleep(Duration::from_millis(600));
    let sum: u64 = sandbox
        .call("sum_to", (1000u64,))
        .expect("call after the earlier deadlines passed failed");
    assert_eq!(sum, 500_500, "sum_to(1000) returned {sum}");
}

fn snapshot_moves_between_sandboxes(transport: Transport) {
    let mut first = demo_sandbox(transport);
    for _ in 0..3 {
        first
            .call::<u64>("increment", ())
            .expect("increment failed");
    }
    let snapshot = first.snapshot().expect("snapshot failed");
    let mut second = demo_builder(transport)
        .base_image(first.base_image())
        .build()
        .expect("building a sandbox from the base image failed");
    assert_transport(&second, transport);

    second
        .restore_to(&snapshot)
        .expect("restore_to on a sibling sandbox failed");
    let count: u64 = second
        .call("increment", ())
        .expect("increment after restore_to failed");
    assert_eq!(
        count, 4,
        "sibling sandbox counter is {count} after restore_to, expected the snapshot's 3 plus one"
    );

    let original: u64 = first
        .call("increment", ())
        .expect("increment on the first sandbox failed");
    assert_eq!(
        original, 4,
        "first sandbox counter is {original}; the sibling's call changed it"
    );
}

/// A fault that cannot be delivered (the IDT is zeroed by a test hook,
/// because guest code at CPL3 cannot reach it) shuts the vCPU down: the call
/// returns `TripleFault`, and restore() brings back the IDT and the vCPU.
fn triple_fault_then_restore(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    sandbox.corrupt_idt_for_tests();
    let error = expect_error(sandbox.call::<()>("crash_null", ()), "crash_null");
    assert!(
        matches!(error, SandboxError::TripleFault { .. }),
        "expected a triple fault, got {error:?}"
    );
    assert!(
        sandbox.is_poisoned(),
        "a triple fault must poison the sandbox"
    );

    sandbox
        .restore()
        .expect("restore after a triple fault failed");
    let sum: i32 = sandbox
        .call("add", (2i32, 3i32))
        .expect("add after restore failed");
    assert_eq!(sum, 5);
    let error = expect_error(
        sandbox.call::<()>("crash_null", ()),
        "crash_null after restore",
    );
    assert!(
        matches!(error, SandboxError::GuestException { vector: 14, .. }),
        "restore should bring the IDT back, got {error:?}"
    );
}

transport_tests!(
    triple_fault_then_restore,
    null_write_page_fault,
    write_code_page_fault,
    write_shim_page_fault,
    divide_error,
    invalid_opcode,
    stack_overflow,
    panic_message,
    poisoned_until_restore,
    restore_after_each_crash,
    restore_reverts_memory,
    snapshot_restore_to,
    snapshot_other_base_rejected,
    kill_cancels_spin,
    kill_idle_returns_false,
    time_limit_stops_spin,
    time_limit_spares_short_calls,
    snapshot_moves_between_sandboxes,
);
