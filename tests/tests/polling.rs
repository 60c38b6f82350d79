//! Behaviour only the polling transport has: hot calls, parking after the
//! idle time, waking a parked guest, the caller's sleep, and the vCPU thread's
//! life. Crash, restore and interrupt behaviour common to both transports is
//! covered by the transport-parameterised tests.

mod common;

use std::time::Duration;

use common::{demo_builder, require_kvm};
use sandcore::{Sandbox, Transport};

fn polling_sandbox(idle_spin: Duration) -> Sandbox {
    require_kvm();
    demo_builder(Transport::Polling { idle_spin })
        .build()
        .expect("creating a polling sandbox of the demo guest failed")
}

/// CPU time (user + system) of thread `tid` of this process, in clock ticks.
fn thread_cpu_ticks(tid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
        .unwrap_or_else(|error| panic!("reading the stat of thread {tid} failed: {error}"));
    // Fields after the command name, which ends with the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("stat has a command name") + 2..]
        .split(' ')
        .collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    let user: u64 = fields[11].parse().expect("utime is a number");
    let system: u64 = fields[12].parse().expect("stime is a number");
    user + system
}

#[test]
fn back_to_back_calls_are_hot() {
    let mut sandbox = polling_sandbox(Duration::from_secs(1));
    let _: () = sandbox.call("noop", ()).expect("first noop failed");
    let sum: i32 = sandbox.call("add", (20i32, 22i32)).expect("add failed");
    let report = sandbox.last_call_report();
    assert_eq!(sum, 42);
    assert!(report.polling, "report should say polling: {report:?}");
    assert!(
        !report.woke_guest,
        "a call right after another must find the guest spinning: {report:?}"
    );
}

#[test]
fn parked_guest_wakes_and_answers() {
    let mut sandbox = polling_sandbox(Duration::from_millis(20));
    let _: () = sandbox.call("noop", ()).expect("first noop failed");
    std::thread::sleep(Duration::from_millis(200));
    let echoed: String = sandbox
        .call("echo", ("after a nap",))
        .expect("echo after parking failed");
    let report = sandbox.last_call_report();
    assert_eq!(echoed, "after a nap");
    assert!(
        report.woke_guest,
        "the guest should have parked after 20 ms idle: {report:?}"
    );
}

#[test]
fn hot_vcpu_thread_spins() {
    // The counterpart of the idle test: proves that CPU time is measured.
    let mut sandbox = polling_sandbox(Duration::from_secs(5));
    let tid = sandbox
        .vcpu_thread_id()
        .expect("a polling sandbox has a vCPU thread");
    let _: () = sandbox.call("noop", ()).expect("noop failed");
    let before = thread_cpu_ticks(tid);
    std::thread::sleep(Duration::from_millis(400));
    let spinning = thread_cpu_ticks(tid) - before;
    // 400 ms of spinning is 40 ticks on an idle core; allow for a loaded machine.
    assert!(
        spinning >= 5,
        "the vCPU thread should burn CPU while hot, used {spinning} ticks in 400 ms"
    );
}

#[test]
fn idle_vcpu_thread_stops_spinning() {
    let mut sandbox = polling_sandbox(Duration::from_millis(50));
    let tid = sandbox
        .vcpu_thread_id()
        .expect("a polling sandbox has a vCPU thread");
    let _: () = sandbox.call("noop", ()).expect("noop failed");
    // Well after the idle time the guest has parked and the thread sleeps.
    std::thread::sleep(Duration::from_millis(300));
    let parked_start = thread_cpu_ticks(tid);
    std::thread::sleep(Duration::from_millis(500));
    let parked = thread_cpu_ticks(tid) - parked_start;
    assert!(
        parked <= 1,
        "the parked vCPU thread used {parked} ticks of CPU in 500 ms"
    );
}

#[test]
fn host_call_needs_no_exit() {
    let mut sandbox = polling_sandbox(Duration::from_secs(1));
    let _: () = sandbox.call("noop", ()).expect("noop failed");
    let sum: i64 = sandbox
        .call("call_host_add", (40i64, 2i64))
        .expect("call_host_add failed");
    let report = sandbox.last_call_report();
    assert_eq!(sum, 42);
    assert_eq!(report.host_calls, 1, "{report:?}");
    assert!(!report.woke_guest, "{report:?}");
}

#[test]
fn long_call_sleeps_then_wakes() {
    let mut sandbox = polling_sandbox(Duration::from_secs(1));
    // About 0.1–0.3 s of guest work: far beyond the caller's spin budget.
    let n: u64 = 500_000_000;
    let total: u64 = sandbox.call("sum_to", (n,)).expect("sum_to failed");
    let report = sandbox.last_call_report();
    assert_eq!(total, n * (n + 1) / 2);
    assert!(
        report.slept,
        "the caller should have stopped spinning: {report:?}"
    );
}

#[test]
fn drop_joins_vcpu_thread() {
    let sandbox = polling_sandbox(Duration::from_secs(10));
    let tid = sandbox
        .vcpu_thread_id()
        .expect("a polling sandbox has a vCPU thread");
    let task = format!("/proc/self/task/{tid}");
    assert!(
        std::path::Path::new(&task).exists(),
        "{task} should exist while the sandbox lives"
    );
    drop(sandbox);
    assert!(
        !std::path::Path::new(&task).exists(),
        "{task} still exists after drop"
    );
}

#[test]
fn exit_transport_has_no_vcpu_thread() {
    require_kvm();
    let sandbox = demo_builder(Transport::Exit)
        .build()
        .expect("creating an exit-transport sandbox failed");
    assert_eq!(sandbox.vcpu_thread_id(), None);
}

#[test]
fn late_kill_spares_next_call() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    let mut sandbox = polling_sandbox(Duration::from_secs(1));
    let handle = sandbox.interrupt_handle();
    // The killer kills once per round, after a varying delay, and then
    // reports the round as done, so no kill is in flight after that.
    let request = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let killer = {
        let (request, done) = (Arc::clone(&request), Arc::clone(&done));
        std::thread::spawn(move || loop {
            let round = request.load(Ordering::SeqCst);
            if round == u64::MAX {
                return;
            }
            if round > done.load(Ordering::SeqCst) {
                for _ in 0..(round % 300) {
                    std::hint::spin_loop();
                }
                handle.kill();
                done.store(round, Ordering::SeqCst);
            }
        })
    };
    let mut stray = 0;
    for round in 1..=1500u64 {
        request.store(round, Ordering::SeqCst);
        let aimed = sandbox.call::<u64>("sum_to", (50u64,));
        while done.load(Ordering::SeqCst) < round {
            std::hint::spin_loop();
        }
        if aimed.is_err() {
            sandbox
                .restore()
                .expect("restore after a cancelled call failed");
            continue;
        }
        match sandbox.call::<u64>("sum_to", (50u64,)) {
            Ok(total) => assert_eq!(total, 1275),
            Err(error) => {
                stray += 1;
                eprintln!("round {round}: a call no kill aimed at failed: {error}");
                sandbox.restore().expect("restore failed");
            }
        }
    }
    request.store(u64::MAX, Ordering::SeqCst);
    killer.join().expect("killer thread panicked");
    assert_eq!(
        stray, 0,
        "kills aimed at a finished call cancelled the next call"
    );
}
