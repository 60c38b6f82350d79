//! Guest calls through real KVM: every parameter and return type, host
//! functions, guest prints, call errors and sandboxes from one base image.
//! Every test runs on both transports, as `exit::<test>` and `polling::<test>`.

mod common;

use std::sync::{Arc, Mutex};

use common::{assert_transport, demo_builder, demo_guest, demo_sandbox, expect_error, require_kvm};
use sandcore::{SandboxBuilder, SandboxError, Transport, Value};

/// 64-bit FNV-1a, computed on the host to check the guest's `fnv1a`.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Bytes that are not all equal, so a reordering or truncation shows.
fn patterned_bytes(length: usize) -> Vec<u8> {
    (0..length)
        .map(|i| (i.wrapping_mul(31).wrapping_add(i >> 8) ^ 0x5a) as u8)
        .collect()
}

fn i32_round_trips(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    for value in [0, 1, -1, 42, i32::MIN, i32::MAX] {
        let echoed: i32 = sandbox.call("echo_i32", (value,)).expect("echo_i32 failed");
        assert_eq!(echoed, value, "echo_i32({value}) returned {echoed}");
    }
}

fn u32_round_trips(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    for value in [0, 1, 0x8000_0000, u32::MAX - 1, u32::MAX] {
        let echoed: u32 = sandbox.call("echo_u32", (value,)).expect("echo_u32 failed");
        assert_eq!(echoed, value, "echo_u32({value}) returned {echoed}");
    }
}

fn i64_round_trips(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    for value in [0, -1, i64::from(i32::MIN) - 1, i64::MIN, i64::MAX] {
        let echoed: i64 = sandbox.call("echo_i64", (value,)).expect("echo_i64 failed");
        assert_eq!(echoed, value, "echo_i64({value}) returned {echoed}");
    }
}

fn u64_round_trips(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    for value in [0, 1, u64::from(u32::MAX) + 1, 1 << 63, u64::MAX] {
        let echoed: u64 = sandbox.call("echo_u64", (value,)).expect("echo_u64 failed");
        assert_eq!(echoed, value, "echo_u64({value}) returned {echoed}");
    }
}

fn f32_bits_round_trip(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    let values = [
        0.0f32,
        -0.0,
        1.5,
        f32::MIN_POSITIVE,
        f32::from_bits(1), // smallest subnormal
        f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0x7fc0_1234), // quiet NaN with a payload
        f32::from_bits(0xffc0_0001), // negative quiet NaN
        f32::from_bits(0x7f80_0001), // signalling NaN
    ];
    for value in values {
        let echoed: f32 = sandbox.call("echo_f32", (value,)).expect("echo_f32 failed");
        assert_eq!(
            echoed.to_bits(),
            value.to_bits(),
            "echo_f32 changed the bits {:#010x} into {:#010x}",
            value.to_bits(),
            echoed.to_bits()
        );
    }
}

fn f64_bits_round_trip(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    let values = [
        0.0f64,
        -0.0,
        std::f64::consts::PI,
        f64::MIN_POSITIVE,
        f64::from_bits(1), // smallest subnormal
        f64::MAX,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
        f64::from_bits(0x7ff8_0000_dead_beef), // quiet NaN with a payload
        f64::from_bits(0xfff8_0000_0000_0001), // negative quiet NaN
        f64::from_bits(0x7ff0_0000_0000_0001), // signalling NaN
    ];
    for value in values {
        let echoed: f64 = sandbox.call("echo_f64", (value,)).expect("echo_f64 failed");
        assert_eq!(
            echoed.to_bits(),
            value.to_bits(),
            "echo_f64 changed the bits {:#018x} into {:#018x}",
            value.to_bits(),
            echoed.to_bits()
        );
    }
}

fn scale_multiplies_in_guest(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);

    let product: f64 = sandbox
        .call("scale", (1.5f64, -4.0f64))
        .expect("scale failed");
    assert_eq!(product, -6.0, "scale(1.5, -4.0) returned {product}");

    let negative_zero: f64 = sandbox
        .call("scale", (0.0f64, -1.0f64))
        .expect("scale failed");
    assert_eq!(
        negative_zero.to_bits(),
        (-0.0f64).to_bits(),
        "scale(0.0, -1.0) returned {negative_zero}, expected -0.0"
    );
}

fn bool_round_trips(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    for value in [true, false] {
        let echoed: bool = sandbox
            .call("echo_bool", (value,))
            .expect("echo_bool failed");
        assert_eq!(echoed, value, "echo_bool({value}) returned {echoed}");
    }
}

fn string_round_trips(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    let texts = [
        "hello",
        "",
        "héllo wörld ✓ 日本語 🦀",
        "embedded\0nul and\nnewline",
        &"x".repeat(10_000),
    ];
    for text in texts {
        let echoed: String = sandbox.call("echo", (text,)).expect("echo failed");
        assert_eq!(
            echoed.len(),
            text.len(),
            "echo changed the length of a {}-byte string",
            text.len()
        );
        assert_eq!(echoed, text, "echo returned a different string");
    }
}

fn bytes_round_trip(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    for length in [0usize, 1, 4095, 4096, 64 << 10] {
        let bytes = patterned_bytes(length);
        let echoed: Vec<u8> = sandbox
            .call("echo_bytes", (bytes.clone(),))
            .expect("echo_bytes failed");
        assert_eq!(
            echoed.len(),
            length,
            "echo_bytes returned {} bytes for {length}",
            echoed.len()
        );
        assert!(
            echoed == bytes,
            "echo_bytes changed the content of a {length}-byte argument"
        );
    }
}

fn void_return(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);

    let result: () = sandbox.call("noop", ()).expect("noop failed");
    assert_eq!(result, (), "noop returned a value");

    let as_value: Value = sandbox.call("noop", ()).expect("noop failed");
    assert_eq!(
        as_value,
        Value::Void,
        "noop returned {as_value:?}, expected Value::Void"
    );
}

fn add_wraps_like_guest(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);

    let sum: i32 = sandbox.call("add", (2i32, 3i32)).expect("add failed");
    assert_eq!(sum, 5, "add(2, 3) returned {sum}");

    let wrapped: i32 = sandbox.call("add", (i32::MAX, 1i32)).expect("add failed");
    assert_eq!(
        wrapped,
        i32::MIN,
        "add(i32::MAX, 1) returned {wrapped}, expected wrapping to i32::MIN"
    );
}

fn values_from_vec(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    let arguments = vec![Value::I32(-7), Value::I32(10)];
    let sum: Value = sandbox
        .call("add", arguments)
        .expect("add with Vec<Value> arguments failed");
    assert_eq!(sum, Value::I32(3), "add(-7, 10) returned {sum:?}");
}

fn fnv1a_matches_host(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    let inputs: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"a".to_vec(),
        b"foobar".to_vec(),
        patterned_bytes(50_000),
    ];
    for input in inputs {
        let hash: u64 = sandbox
            .call("fnv1a", (input.clone(),))
            .expect("fnv1a failed");
        let expected = fnv1a(&input);
        assert_eq!(
            hash,
            expected,
            "guest fnv1a of {} bytes is {hash:#x}, host computes {expected:#x}",
            input.len()
        );
    }

    // Published FNV-1a 64 test vector.
    let foobar: u64 = sandbox
        .call("fnv1a", (b"foobar".to_vec(),))
        .expect("fnv1a failed");
    assert_eq!(
        foobar, 0x85944171f73967e8,
        "fnv1a(\"foobar\") is {foobar:#x}"
    );
}

fn sum_to_matches_formula(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    let n: u64 = 100_000;
    let sum: u64 = sandbox.call("sum_to", (n,)).expect("sum_to failed");
    assert_eq!(sum, n * (n + 1) / 2, "sum_to({n}) returned {sum}");

    let zero: u64 = sandbox.call("sum_to", (0u64,)).expect("sum_to failed");
    assert_eq!(zero, 0, "sum_to(0) returned {zero}");
}

fn host_function_call(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);

    let sum: i64 = sandbox
        .call("call_host_add", (40i64, 2i64))
        .expect("call_host_add failed");
    assert_eq!(sum, 42, "call_host_add(40, 2) returned {sum}");

    let extreme: i64 = sandbox
        .call("call_host_add", (i64::MIN, -1i64))
        .expect("call_host_add failed");
    assert_eq!(
        extreme,
        i64::MAX,
        "call_host_add(i64::MIN, -1) returned {extreme}, expected the host's wrapping sum"
    );
}

fn host_function_sees_arguments(transport: Transport) {
    require_kvm();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorder = Arc::clone(&seen);
    let mut sandbox = SandboxBuilder::new()
        .guest_file(demo_guest())
        .host_function("host_add", move |a: i64, b: i64| {
            recorder.lock().unwrap().push((a, b));
            a * 1000 + b
        })
        .guest_core_dump(false)
        .transport(transport)
        .build()
        .expect("building the sandbox failed");
    assert_transport(&sandbox, transport);

    let result: i64 = sandbox
        .call("call_host_add", (7i64, 9i64))
        .expect("call_host_add failed");
    assert_eq!(
        result, 7009,
        "call_host_add returned {result}, expected the host function's result"
    );

    let calls = seen.lock().unwrap().clone();
    assert_eq!(calls, vec![(7, 9)], "host function saw the calls {calls:?}");
}

fn host_error_reaches_guest(transport: Transport) {
    require_kvm();
    let mut sandbox = SandboxBuilder::new()
        .guest_file(demo_guest())
        .host_function("host_add", |_: i64, _: i64| -> Result<i64, String> {
            Err("quota-exceeded-5113".into())
        })
        .guest_core_dump(false)
        .transport(transport)
        .build()
        .expect("building the sandbox failed");
    assert_transport(&sandbox, transport);

    let error = expect_error(
        sandbox.call::<i64>("call_host_add", (1i64, 2i64)),
        "call_host_add with a failing host function",
    );
    let SandboxError::GuestPanic { message, .. } = &error else {
        panic!("expected GuestPanic, got {error:?}");
    };
    assert!(
        message.contains("quota-exceeded-5113"),
        "guest panic message lacks the host error text: {message}"
    );
    assert!(
        message.contains("host_add failed"),
        "guest panic message lacks the guest's own text: {message}"
    );
    assert!(
        sandbox.is_poisoned(),
        "sandbox is not poisoned after the guest panicked"
    );
}

fn missing_host_function(transport: Transport) {
    require_kvm();
    let mut sandbox = SandboxBuilder::new()
        .guest_file(demo_guest())
        .guest_core_dump(false)
        .transport(transport)
        .build()
        .expect("building the sandbox failed");
    assert_transport(&sandbox, transport);

    let error = expect_error(
        sandbox.call::<i64>("call_host_add", (1i64, 2i64)),
        "call_host_add without host_add",
    );
    let SandboxError::GuestPanic { message, .. } = &error else {
        panic!("expected GuestPanic, got {error:?}");
    };
    assert!(
        message.contains("host_add"),
        "guest panic message does not name host_add: {message}"
    );
}

fn unknown_function(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);

    let error = expect_error(
        sandbox.call::<()>("no_such_function", ()),
        "calling an unknown function",
    );
    let SandboxError::UnknownFunction { name } = &error else {
        panic!("expected UnknownFunction, got {error:?}");
    };
    assert_eq!(name, "no_such_function", "UnknownFunction names {name:?}");
    assert!(
        !sandbox.is_poisoned(),
        "an unknown function poisoned the sandbox"
    );

    let sum: i32 = sandbox
        .call("add", (1i32, 1i32))
        .expect("call after UnknownFunction failed");
    assert_eq!(sum, 2, "add(1, 1) after UnknownFunction returned {sum}");
}

fn wrong_argument_count(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);

    let error = expect_error(sandbox.call::<i32>("add", (1i32,)), "add with one argument");
    let SandboxError::ArgumentMismatch { function, message } = &error else {
        panic!("expected ArgumentMismatch, got {error:?}");
    };
    assert_eq!(function, "add", "ArgumentMismatch names {function:?}");
    assert!(
        message.contains('1') && message.contains('2'),
        "message does not give the given and expected counts: {message}"
    );

    let too_many = expect_error(
        sandbox.call::<()>("noop", (1i32,)),
        "noop with one argument",
    );
    assert!(
        matches!(too_many, SandboxError::ArgumentMismatch { .. }),
        "expected ArgumentMismatch, got {too_many:?}"
    );
    assert!(
        !sandbox.is_poisoned(),
        "an argument mismatch poisoned the sandbox"
    );
}

fn wrong_argument_type(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);

    let error = expect_error(
        sandbox.call::<i32>("echo_i32", ("seven",)),
        "echo_i32 with a string",
    );
    let SandboxError::ArgumentMismatch { function, message } = &error else {
        panic!("expected ArgumentMismatch, got {error:?}");
    };
    assert_eq!(function, "echo_i32", "ArgumentMismatch names {function:?}");
    assert!(
        message.contains("string"),
        "message does not name the given type: {message}"
    );
    assert!(
        message.contains("i32"),
        "message does not name the expected type: {message}"
    );

    let unsigned = expect_error(
        sandbox.call::<i32>("echo_i32", (7u32,)),
        "echo_i32 with a u32",
    );
    assert!(
        matches!(unsigned, SandboxError::ArgumentMismatch { .. }),
        "expected ArgumentMismatch, got {unsigned:?}"
    );

    let echoed: i32 = sandbox
        .call("echo_i32", (7i32,))
        .expect("call after ArgumentMismatch failed");
    assert_eq!(
        echoed, 7,
        "echo_i32(7) after ArgumentMismatch returned {echoed}"
    );
}

fn wrong_return_type(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);

    let error = expect_error(
        sandbox.call::<String>("echo_i32", (5i32,)),
        "echo_i32 read as a string",
    );
    let SandboxError::ReturnTypeMismatch {
        function,
        expected,
        actual,
    } = &error
    else {
        panic!("expected ReturnTypeMismatch, got {error:?}");
    };
    assert_eq!(
        function, "echo_i32",
        "ReturnTypeMismatch names {function:?}"
    );
    assert_eq!(
        *expected, "string",
        "ReturnTypeMismatch expected type is {expected:?}"
    );
    assert_eq!(
        *actual, "i32",
        "ReturnTypeMismatch actual type is {actual:?}"
    );

    let void = expect_error(sandbox.call::<u64>("noop", ()), "noop read as u64");
    assert!(
        matches!(void, SandboxError::ReturnTypeMismatch { .. }),
        "expected ReturnTypeMismatch, got {void:?}"
    );
    assert!(
        !sandbox.is_poisoned(),
        "a return type mismatch poisoned the sandbox"
    );
}

fn request_too_large(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    let bytes = vec![0xabu8; 200 << 10];

    let error = expect_error(
        sandbox.call::<Vec<u8>>("echo_bytes", (bytes,)),
        "echo_bytes with 200 KiB",
    );
    let SandboxError::RequestTooLarge {
        function,
        needed,
        available,
    } = &error
    else {
        panic!("expected RequestTooLarge, got {error:?}");
    };
    assert_eq!(function, "echo_bytes", "RequestTooLarge names {function:?}");
    assert!(
        *needed >= 200 << 10,
        "needed = {needed} is less than the 200 KiB argument"
    );
    assert!(
        *needed < (200 << 10) + 4096,
        "needed = {needed} is far more than the 200 KiB argument"
    );
    assert!(
        *available < 128 << 10,
        "available = {available} is not below the 128 KiB input buffer"
    );
    assert!(
        *available > 120 << 10,
        "available = {available} is far below the 128 KiB input buffer"
    );
    assert!(
        !sandbox.is_poisoned(),
        "a request that was never sent poisoned the sandbox"
    );

    let hash: u64 = sandbox
        .call("fnv1a", (b"foobar".to_vec(),))
        .expect("call after RequestTooLarge failed");
    assert_eq!(
        hash,
        fnv1a(b"foobar"),
        "fnv1a after RequestTooLarge returned {hash:#x}"
    );
}

fn print_reaches_handler(transport: Transport) {
    let printed = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = Arc::clone(&printed);
    let mut sandbox = demo_builder(transport)
        .print_handler(move |message| sink.lock().unwrap().push(message.to_owned()))
        .build()
        .expect("building the sandbox failed");
    assert_transport(&sandbox, transport);

    let result: () = sandbox
        .call("print_message", ("hello from the guest ✓",))
        .expect("print_message failed");
    assert_eq!(result, (), "print_message returned a value");
    sandbox
        .call::<()>("print_message", ("",))
        .expect("print_message with an empty string failed");

    let messages = printed.lock().unwrap().clone();
    assert_eq!(messages.len(), 2, "print handler received {messages:?}");
    assert_eq!(
        messages[0], "hello from the guest ✓",
        "first print was {:?}",
        messages[0]
    );
    assert_eq!(messages[1], "", "second print was {:?}", messages[1]);
}

fn base_image_sandboxes_independent(transport: Transport) {
    let mut first = demo_sandbox(transport);
    let base = first.base_image();

    let mut others: Vec<_> = (0..4)
        .map(|index| {
            SandboxBuilder::new()
                .base_image(Arc::clone(&base))
                .host_function("host_add", |a: i64, b: i64| a + b)
                .guest_core_dump(false)
                .transport(transport)
                .build()
                .unwrap_or_else(|error| {
                    panic!("building sandbox {index} from the base image failed: {error}")
                })
        })
        .collect();
    for sandbox in &others {
        assert_transport(sandbox, transport);
    }

    for (index, sandbox) in others.iter_mut().enumerate() {
        for _ in 0..=index {
            sandbox
                .call::<u64>("increment", ())
                .expect("increment failed");
        }
    }
    let first_count: u64 = first
        .call("increment", ())
        .expect("increment on the first sandbox failed");
    assert_eq!(
        first_count, 1,
        "first sandbox counter is {first_count}; it saw increments of the others"
    );

    for (index, sandbox) in others.iter_mut().enumerate() {
        let count: u64 = sandbox.call("increment", ()).expect("increment failed");
        let expected = index as u64 + 2;
        assert_eq!(
            count, expected,
            "sandbox {index} counter is {count}, expected {expected}"
        );
    }

    let ids: Vec<u64> = others.iter().map(|sandbox| sandbox.id()).collect();
    for (index, id) in ids.iter().enumerate() {
        assert_ne!(
            *id,
            first.id(),
            "sandbox {index} has the id of the first sandbox"
        );
        assert!(!ids[..index].contains(id), "sandbox {index} reuses id {id}");
    }

    let sum: i64 = others[0]
        .call("call_host_add", (20i64, 22i64))
        .expect("call_host_add on a base-image sandbox failed");
    assert_eq!(
        sum, 42,
        "call_host_add on a base-image sandbox returned {sum}"
    );
}

fn many_calls_one_sandbox(transport: Transport) {
    let mut sandbox = demo_sandbox(transport);
    for round in 0..1000u64 {
        let count: u64 = sandbox.call("increment", ()).expect("increment failed");
        assert_eq!(count, round + 1, "increment call {round} returned {count}");
    }
}

fn reply_too_large(transport: Transport) {
    let mut sandbox = demo_builder(transport)
        .input_buffer_size(512 << 10)
        .build()
        .expect("building the sandbox failed");
    assert_transport(&sandbox, transport);
    let bytes = patterned_bytes(200 << 10);

    let error = expect_error(
        sandbox.call::<Vec<u8>>("echo_bytes", (bytes,)),
        "echo_bytes with a reply larger than the output buffer",
    );
    let SandboxError::ReplyTooLarge { function, .. } = &error else {
        panic!("expected ReplyTooLarge, got {error:?}");
    };
    assert_eq!(function, "echo_bytes", "ReplyTooLarge names {function:?}");

    let echoed: Vec<u8> = sandbox
        .call("echo_bytes", (vec![1u8, 2, 3],))
        .expect("a small call after ReplyTooLarge failed");
    assert_eq!(
        echoed,
        [1, 2, 3],
        "echo_bytes after ReplyTooLarge returned {echoed:?}"
    );
}

fn host_panic_reaches_guest(transport: Transport) {
    require_kvm();
    let mut sandbox = SandboxBuilder::new()
        .guest_file(demo_guest())
        .host_function("host_add", |_: i64, _: i64| -> i64 {
            panic!("host function bug")
        })
        .guest_core_dump(false)
        .transport(transport)
        .build()
        .expect("building the sandbox failed");
    assert_transport(&sandbox, transport);

    let error = expect_error(
        sandbox.call::<i64>("call_host_add", (1i64, 2i64)),
        "call_host_add with a panicking host function",
    );
    let SandboxError::GuestPanic { message, .. } = &error else {
        panic!("expected GuestPanic, got {error:?}");
    };
    assert!(
        message.contains("panicked"),
        "guest panic message does not report the host panic: {message}"
    );
    assert!(
        message.contains("host_add"),
        "guest panic message does not name host_add: {message}"
    );
}

fn kill_after_drop_is_false(transport: Transport) {
    let sandbox = demo_sandbox(transport);
    let handle = sandbox.interrupt_handle();
    drop(sandbox);
    assert!(!handle.kill(), "kill() on a dropped sandbox returned true");
}

transport_tests!(
    i32_round_trips,
    u32_round_trips,
    i64_round_trips,
    u64_round_trips,
    f32_bits_round_trip,
    f64_bits_round_trip,
    scale_multiplies_in_guest,
    bool_round_trips,
    string_round_trips,
    bytes_round_trip,
    void_return,
    add_wraps_like_guest,
    values_from_vec,
    fnv1a_matches_host,
    sum_to_matches_formula,
    host_function_call,
    host_function_sees_arguments,
    host_error_reaches_guest,
    missing_host_function,
    unknown_function,
    wrong_argument_count,
    wrong_argument_type,
    wrong_return_type,
    request_too_large,
    print_reaches_handler,
    base_image_sandboxes_independent,
    many_calls_one_sandbox,
    reply_too_large,
    host_panic_reaches_guest,
    kill_after_drop_is_false,
);
