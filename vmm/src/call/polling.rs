//! The polling transport: a dedicated thread keeps the vCPU in `KVM_RUN`
//! while the guest spins on the input slot, so a hot call needs no VM exit.
//!
//! The caller writes the request and spins on the output slot's state word;
//! host-function calls are served by that same caller thread through the
//! output slot. After a bounded spin the caller sleeps on a futex and sets
//! `host_waiting`, and the guest then exits once with `PORT_NOTIFY` after
//! publishing, so the vCPU thread can wake it. After `idle_spin` without a
//! request the guest parks with an `out`; the vCPU thread then sleeps until
//! the next call wakes it, which costs that call one exit.
//!
//! The vCPU thread never decodes a crash. On any exit it does not handle
//! (fault, panic, stop request), it releases the vCPU and hands the exit to
//! the caller, which runs the same crash path as the exit transport.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sandcore_abi::ports::{PORT_NOTIFY, PORT_PARK};
use sandcore_abi::slot::INPUT_CALL;

use crate::call::slots::Slot;
use crate::error::SandboxError;
use crate::interrupt::InterruptState;
use crate::vcpu::{Exit, Vm};

/// Command word values for the vCPU thread.
const RUN: u32 = 0;
const PAUSE: u32 = 1;
const STOP: u32 = 2;

/// Spin iterations of the caller before it sleeps on the futex. About
/// 20–50 µs here: long enough for any call that needs no host work, short
/// enough that a slow call does not burn a core.
pub(crate) const CALLER_SPIN_LIMIT: u32 = 20_000;

/// Maximum futex sleep of a waiting caller before it re-checks the slot.
/// Only matters if a guest fails to notify; normal wake-ups are immediate.
pub(crate) const CALLER_SLEEP: Duration = Duration::from_millis(20);

/// State shared by a polling sandbox and its vCPU thread.
pub(crate) struct PollShared {
    vm: Mutex<Vm>,
    command: AtomicU32,
    /// Bumped to wake the vCPU thread (new call, new command).
    wake_seq: AtomicU32,
    /// Bumped by the vCPU thread to wake a sleeping caller.
    pub(crate) notify_seq: AtomicU32,
    /// The guest parked and the vCPU thread sleeps.
    parked: AtomicBool,
    /// The vCPU thread is outside its run loop and holds no lock.
    halted: AtomicBool,
    /// An exit the vCPU thread did not handle, for the caller's crash path,
    /// with the generation of the call it happened in.
    pending_exit: Mutex<Option<(Exit, u64)>>,
    pub(crate) exit_ready: AtomicBool,
    /// The input slot; replaced when the sandbox swaps its memory mapping.
    input: Mutex<Slot>,
    interrupt: Arc<InterruptState>,
    thread_id: AtomicU64,
    tid: AtomicI32,
}

/// The vCPU of a polling sandbox and the thread that runs it.
pub(crate) struct PollingVcpu {
    pub(crate) shared: Arc<PollShared>,
    thread: Option<JoinHandle<()>>,
}

impl PollingVcpu {
    /// Starts the vCPU thread; it waits in the halted state until `resume`.
    pub(crate) fn start(
        vm: Vm,
        input: Slot,
        interrupt: Arc<InterruptState>,
    ) -> Result<PollingVcpu, SandboxError> {
        let shared = Arc::new(PollShared {
            vm: Mutex::new(vm),
            command: AtomicU32::new(PAUSE),
            wake_seq: AtomicU32::new(0),
            notify_seq: AtomicU32::new(0),
            parked: AtomicBool::new(false),
            halted: AtomicBool::new(false),
            pending_exit: Mutex::new(None),
            exit_ready: AtomicBool::new(false),
            input: Mutex::new(input),
            interrupt,
            thread_id: AtomicU64::new(0),
            tid: AtomicI32::new(0),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("sandcore-vcpu".into())
            .spawn(move || vcpu_thread(&thread_shared))
            .map_err(|source| SandboxError::Os {
                operation: "starting the vCPU thread",
                source,
            })?;
        let vcpu = PollingVcpu {
            shared,
            thread: Some(thread),
        };
        vcpu.wait_halted();
        Ok(vcpu)
    }

    /// Returns the vCPU thread's pthread id, for interrupt signals.
    pub(crate) fn thread_id(&self) -> libc::pthread_t {
        self.shared.thread_id.load(Ordering::SeqCst)
    }

    /// Returns the vCPU thread's kernel thread id (for `/proc/self/task/<tid>`).
    pub(crate) fn tid(&self) -> i32 {
        self.shared.tid.load(Ordering::SeqCst)
    }

    /// Stops the vCPU thread's run loop and returns the vCPU for exclusive
    /// use. The thread stays halted until [`PollingVcpu::resume`].
    pub(crate) fn pause(&self) -> MutexGuard<'_, Vm> {
        if self.shared.command.swap(PAUSE, Ordering::SeqCst) == RUN {
            self.kick();
            self.wait_halted();
        }
        self.shared.vm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets the vCPU thread run the guest again.
    pub(crate) fn resume(&self) {
        self.shared.halted.store(false, Ordering::SeqCst);
        self.shared.command.store(RUN, Ordering::SeqCst);
        self.wake();
    }

    /// Points the vCPU thread at the input slot of a new memory mapping.
    /// Called only while the thread is paused.
    pub(crate) fn set_input(&self, input: Slot) {
        *self.shared.input.lock().unwrap_or_else(|p| p.into_inner()) = input;
    }

    /// Wakes the vCPU thread if the guest parked; returns true if it did,
    /// which means this call pays one exit.
    pub(crate) fn wake_if_parked(&self) -> bool {
        if self.shared.parked.load(Ordering::SeqCst) {
            self.wake();
            true
        } else {
            false
        }
    }

    /// Takes the exit the vCPU thread handed over, if any, with the
    /// generation of the call that was running when it happened.
    pub(crate) fn take_exit(&self) -> Option<(Exit, u64)> {
        if !self.shared.exit_ready.swap(false, Ordering::SeqCst) {
            return None;
        }
        self.shared
            .pending_exit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn wake(&self) {
        self.shared.wake_seq.fetch_add(1, Ordering::SeqCst);
        futex_wake(&self.shared.wake_seq);
    }

    fn kick(&self) {
        self.wake();
        self.shared.interrupt.kick(self.thread_id());
    }

    fn wait_halted(&self) {
        loop {
            let seen = self.shared.notify_seq.load(Ordering::SeqCst);
            if self.shared.halted.load(Ordering::SeqCst) {
                return;
            }
            futex_wait(
                &self.shared.notify_seq,
                seen,
                Some(Duration::from_millis(10)),
            );
        }
    }
}

impl PollingVcpu {
    /// Stops and joins the vCPU thread. Must run while the interrupt state
    /// still has the vCPU's `immediate_exit`, because a guest spinning in `KVM_RUN` only
    /// leaves it through a kick.
    pub(crate) fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.shared.command.store(STOP, Ordering::SeqCst);
        self.kick();
        if thread.join().is_err() {
            tracing::error!("the vCPU thread panicked");
        }
    }
}

impl Drop for PollingVcpu {
    fn drop(&mut self) {
        self.stop();
    }
}

fn notify(shared: &PollShared) {
    shared.notify_seq.fetch_add(1, Ordering::SeqCst);
    futex_wake(&shared.notify_seq);
}

fn vcpu_thread(shared: &PollShared) {
    // SAFETY: pthread_self and gettid have no preconditions.
    let (thread, tid) = unsafe { (libc::pthread_self(), libc::gettid()) };
    shared.thread_id.store(thread, Ordering::SeqCst);
    shared.tid.store(tid, Ordering::SeqCst);
    loop {
        loop {
            let seen = shared.wake_seq.load(Ordering::SeqCst);
            match shared.command.load(Ordering::SeqCst) {
                STOP => {
                    shared.halted.store(true, Ordering::SeqCst);
                    notify(shared);
                    return;
                }
                RUN => break,
                _ => {
                    shared.halted.store(true, Ordering::SeqCst);
                    notify(shared);
                    futex_wait(&shared.wake_seq, seen, None);
                }
            }
        }
        let mut vm = shared.vm.lock().unwrap_or_else(|p| p.into_inner());
        let unhandled = run_until_unhandled(shared, &mut vm);
        drop(vm);
        if let Some(exit) = unhandled {
            let exit = (exit, shared.interrupt.generation());
            *shared
                .pending_exit
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(exit);
            let _ = shared
                .command
                .compare_exchange(RUN, PAUSE, Ordering::SeqCst, Ordering::SeqCst);
            shared.exit_ready.store(true, Ordering::SeqCst);
        }
        shared.halted.store(true, Ordering::SeqCst);
        notify(shared);
    }
}

/// Runs the guest until an exit the caller must handle (returned) or a
/// pause or stop command (`None`).
fn run_until_unhandled(shared: &PollShared, vm: &mut Vm) -> Option<Exit> {
    loop {
        // Clearing immediate_exit first and checking the flags after it
        // means a stop or pause requested at any point is seen here or
        // makes the next KVM_RUN return at once.
        vm.vcpu.set_kvm_immediate_exit(0);
        if shared.command.load(Ordering::SeqCst) != RUN {
            return None;
        }
        if shared.interrupt.stop_reason().is_some() {
            return Some(Exit::Interrupted);
        }
        match vm.run() {
            Exit::Io(PORT_PARK) => park(shared),
            Exit::Io(PORT_NOTIFY) => notify(shared),
            Exit::Interrupted => {
                if shared.interrupt.stop_reason().is_some() {
                    return Some(Exit::Interrupted);
                }
            }
            exit => return Some(exit),
        }
    }
}

/// Sleeps while the guest is parked and no call or command is pending.
fn park(shared: &PollShared) {
    shared.parked.store(true, Ordering::SeqCst);
    loop {
        let seen = shared.wake_seq.load(Ordering::SeqCst);
        let input = *shared.input.lock().unwrap_or_else(|p| p.into_inner());
        let call_pending = input.header().state.load(Ordering::SeqCst) == INPUT_CALL;
        if call_pending
            || shared.command.load(Ordering::SeqCst) != RUN
            || shared.interrupt.stop_reason().is_some()
        {
            break;
        }
        futex_wait(&shared.wake_seq, seen, None);
    }
    shared.parked.store(false, Ordering::SeqCst);
}

/// Sleeps while `word` equals `expected`, up to `timeout`.
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let timespec = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as _,
    });
    let timeout_pointer = timespec
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: FUTEX_WAIT reads the aligned u32 behind `word` and the optional
    // timespec, both valid for the call; EINTR, EAGAIN and ETIMEDOUT just
    // return to the caller's loop.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            timeout_pointer,
        );
    }
}

/// Wakes every thread sleeping on `word`.
pub(crate) fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE only uses the address as a key.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX,
        );
    }
}

/// Converts an idle time into TSC ticks, the unit the guest measures in.
pub(crate) fn idle_ticks(idle: Duration) -> u64 {
    let ticks = (idle.as_secs_f64() * tsc_hz()) as u64;
    ticks.max(1)
}

/// TSC frequency in Hz, calibrated once against the monotonic clock.
fn tsc_hz() -> f64 {
    static HZ: OnceLock<f64> = OnceLock::new();
    *HZ.get_or_init(|| {
        let start = Instant::now();
        // SAFETY: rdtsc has no preconditions.
        let first = unsafe { core::arch::x86_64::_rdtsc() };
        while start.elapsed() < Duration::from_millis(10) {
            std::hint::spin_loop();
        }
        // SAFETY: as above.
        let last = unsafe { core::arch::x86_64::_rdtsc() };
        (last - first) as f64 / start.elapsed().as_secs_f64()
    })
}
