//! A guest that breaks the call protocol on purpose: bad lengths, garbage
//! replies, wrong sequence numbers and states, unknown ports, privileged
//! instructions. Each must end in a typed error, never a host panic or a
//! read outside the shared buffers, and restore() must bring the sandbox back.

mod common;

use common::require_kvm;
use sandcore::{SandboxBuilder, SandboxError, Transport};
use std::time::Duration;

fn hostile(transport: Transport) -> sandcore::Sandbox {
    require_kvm();
    SandboxBuilder::new()
        .guest_file(sandcore::hostile_guest_path())
        .guest_core_dump(false)
        .transport(transport)
        .build()
        .expect("creating a sandbox of the hostile guest failed")
}

fn transports() -> [Transport; 2] {
    [
        Transport::Exit,
        Transport::Polling {
            idle_spin: Duration::from_millis(50),
        },
    ]
}

/// Calls `function`, expects an error, checks it with `check`, then checks
/// that the sandbox is poisoned and that restore() heals it.
fn expect_failure(function: &str, check: impl Fn(&SandboxError) -> bool) {
    for transport in transports() {
        let mut sandbox = hostile(transport);
        let error = sandbox
            .call::<()>(function, ())
            .expect_err(&format!("{function} on {transport:?} should fail"));
        assert!(
            check(&error),
            "{function} on {transport:?} gave an unexpected error: {error:?}"
        );
        assert!(
            sandbox.is_poisoned(),
            "{function} on {transport:?} should poison the sandbox"
        );
        sandbox.restore().expect("restore failed");
        let calls: u32 = sandbox
            .call("healthy", ())
            .expect("healthy after restore failed");
        assert_eq!(
            calls, 1,
            "{function} on {transport:?}: restore should reset the guest's counter"
        );
    }
}

fn violation_mentions(error: &SandboxError, text: &str) -> bool {
    matches!(error, SandboxError::ProtocolViolation { reason } if reason.contains(text))
}

#[test]
fn reply_length_beyond_buffer() {
    expect_failure("reply_length_too_large", |e| {
        violation_mentions(e, "exceeds the output buffer")
    });
}

#[test]
fn undecodable_reply() {
    expect_failure("reply_garbage", |e| {
        violation_mentions(e, "cannot be decoded")
    });
}

#[test]
fn reply_to_another_request() {
    expect_failure("reply_wrong_sequence", |e| {
        violation_mentions(e, "replied to request")
    });
}

#[test]
fn park_without_reply() {
    // On the polling transport the host waits for a reply the guest never
    // publishes, so only the exit transport is checked here; the time-limit
    // test below covers the polling case.
    let mut sandbox = hostile(Transport::Exit);
    let error = sandbox
        .call::<()>("park_without_reply", ())
        .expect_err("should fail");
    assert!(
        violation_mentions(&error, "output slot state 0"),
        "{error:?}"
    );
}

#[test]
fn silent_guest_stopped_by_time_limit() {
    require_kvm();
    let mut sandbox = SandboxBuilder::new()
        .guest_file(sandcore::hostile_guest_path())
        .guest_core_dump(false)
        .transport(Transport::Polling {
            idle_spin: Duration::from_millis(50),
        })
        .call_time_limit(Duration::from_millis(200))
        .build()
        .expect("creating the sandbox failed");
    let error = sandbox
        .call::<()>("park_without_reply", ())
        .expect_err("should time out");
    assert!(matches!(error, SandboxError::TimedOut { .. }), "{error:?}");
    sandbox.restore().expect("restore failed");
    let calls: u32 = sandbox
        .call("healthy", ())
        .expect("healthy after restore failed");
    assert_eq!(calls, 1);
}

#[test]
fn host_call_length_beyond_buffer() {
    let mut sandbox = hostile(Transport::Exit);
    let error = sandbox
        .call::<()>("host_call_length_too_large", ())
        .expect_err("should fail");
    assert!(violation_mentions(&error, "host call length"), "{error:?}");
}

#[test]
fn undecodable_host_call() {
    let mut sandbox = hostile(Transport::Exit);
    let error = sandbox
        .call::<()>("host_call_garbage", ())
        .expect_err("should fail");
    assert!(
        violation_mentions(&error, "host call request cannot be decoded"),
        "{error:?}"
    );
}

#[test]
fn host_call_in_wrong_state() {
    let mut sandbox = hostile(Transport::Exit);
    let error = sandbox
        .call::<()>("host_call_wrong_state", ())
        .expect_err("should fail");
    assert!(
        violation_mentions(&error, "host call with output slot state"),
        "{error:?}"
    );
}

#[test]
fn abort_without_message() {
    expect_failure(
        "abort_without_message",
        |e| matches!(e, SandboxError::UnexpectedExit { description, .. } if description.contains("without an abort message")),
    );
}

#[test]
fn abort_length_beyond_buffer() {
    expect_failure(
        "abort_length_too_large",
        |e| matches!(e, SandboxError::GuestPanic { message, .. } if message.starts_with("oops\u{fffd}") && message.ends_with("[truncated]")),
    );
}

#[test]
fn write_to_unknown_port() {
    expect_failure(
        "unknown_port",
        |e| matches!(e, SandboxError::UnexpectedExit { description, .. } if description.contains("unknown I/O port 0x99")),
    );
}

#[test]
fn read_from_port() {
    expect_failure(
        "port_read",
        |e| matches!(e, SandboxError::UnexpectedExit { description, .. } if description.contains("port read")),
    );
}

#[test]
fn privileged_instruction_faults() {
    expect_failure("privileged_instruction", |e| {
        matches!(e, SandboxError::GuestException { vector: 13, .. })
    });
}

/// Builds a polling sandbox of the hostile guest with `limit` as time limit.
fn hostile_polling(limit: Option<Duration>) -> sandcore::Sandbox {
    require_kvm();
    let mut builder = SandboxBuilder::new()
        .guest_file(sandcore::hostile_guest_path())
        .guest_core_dump(false)
        .transport(Transport::Polling {
            idle_spin: Duration::from_millis(50),
        });
    if let Some(limit) = limit {
        builder = builder.call_time_limit(limit);
    }
    builder.build().expect("creating the sandbox failed")
}

#[test]
fn parked_guest_stopped_by_time_limit() {
    let mut sandbox = hostile_polling(Some(Duration::from_millis(200)));
    let started = std::time::Instant::now();
    let error = sandbox
        .call::<()>("clear_input_and_park", ())
        .expect_err("should time out");
    assert!(matches!(error, SandboxError::TimedOut { .. }), "{error:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the time limit took {:?}",
        started.elapsed()
    );
    sandbox.restore().expect("restore failed");
    let calls: u32 = sandbox
        .call("healthy", ())
        .expect("healthy after restore failed");
    assert_eq!(calls, 1);
}

#[test]
fn parked_guest_stopped_by_kill() {
    let mut sandbox = hostile_polling(None);
    let handle = sandbox.interrupt_handle();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        handle.kill()
    });
    let error = sandbox
        .call::<()>("clear_input_and_park", ())
        .expect_err("should be cancelled");
    assert!(
        killer.join().expect("killer thread panicked"),
        "kill found no running call"
    );
    assert!(matches!(error, SandboxError::Cancelled { .. }), "{error:?}");
}
