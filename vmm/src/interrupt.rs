//! Stopping a running call from another thread: cancellation and time limits.
//!
//! A call in `KVM_RUN` is stopped by setting `kvm_run.immediate_exit` and
//! sending the vCPU thread a signal. The signal makes a running `KVM_RUN`
//! return `EINTR`; `immediate_exit` covers the window just before the thread
//! enters `KVM_RUN`, where a signal alone would be lost.
//!
//! One atomic word contains the call's generation, a running bit and the stop
//! reason, so a stop request aimed at one call can never stop the next one.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once, OnceLock, Weak};
use std::time::{Duration, Instant};

const RUNNING: u64 = 1;
const CANCEL: u64 = 2;
const TIMEOUT: u64 = 4;
const FLAG_BITS: u32 = 3;

/// Offset from `SIGRTMIN` of the signal that kicks a vCPU thread out of
/// `KVM_RUN`. Its handler does nothing; the interruption is the point.
pub const INTERRUPT_SIGNAL_OFFSET: i32 = 2;

/// Reason a call stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// [`InterruptHandle::kill`].
    Cancelled,
    /// The call's time limit passed.
    TimedOut,
}

/// State shared between a sandbox and its interrupt handles.
pub(crate) struct InterruptState {
    word: AtomicU64,
    thread: AtomicU64,
    /// `kvm_run.immediate_exit` of the vCPU; `None` once the vCPU is gone.
    immediate_exit: Mutex<Option<ImmediateExit>>,
}

struct ImmediateExit(*mut u8);

// SAFETY: the pointer targets the vCPU's kvm_run mapping, which stays mapped
// until the sandbox clears this field under the mutex before closing the vCPU.
unsafe impl Send for ImmediateExit {}

impl InterruptState {
    pub(crate) fn new(immediate_exit: *mut u8) -> Arc<InterruptState> {
        install_signal_handler();
        Arc::new(InterruptState {
            word: AtomicU64::new(0),
            thread: AtomicU64::new(0),
            immediate_exit: Mutex::new(Some(ImmediateExit(immediate_exit))),
        })
    }

    /// Marks the start of a call whose `KVM_RUN` happens on `thread` (the
    /// current thread if `None`). Returns the call's generation, for time limits.
    pub(crate) fn begin_call(&self, thread: Option<libc::pthread_t>) -> u64 {
        // SAFETY: pthread_self has no preconditions.
        let thread = thread.unwrap_or_else(|| unsafe { libc::pthread_self() });
        self.thread.store(thread, Ordering::SeqCst);
        let generation = self.word.load(Ordering::SeqCst) >> FLAG_BITS;
        self.word
            .store((generation << FLAG_BITS) | RUNNING, Ordering::SeqCst);
        generation
    }

    /// Marks the end of the current call, so late stop requests miss it.
    pub(crate) fn end_call(&self) {
        let generation = self.word.load(Ordering::SeqCst) >> FLAG_BITS;
        self.word
            .store((generation + 1) << FLAG_BITS, Ordering::SeqCst);
    }

    /// Returns the generation of the current (or, between calls, the next) call.
    pub(crate) fn generation(&self) -> u64 {
        self.word.load(Ordering::SeqCst) >> FLAG_BITS
    }

    /// Returns the stop reason of the current call, if one was requested.
    pub(crate) fn stop_reason(&self) -> Option<StopReason> {
        let word = self.word.load(Ordering::SeqCst);
        if word & CANCEL != 0 {
            Some(StopReason::Cancelled)
        } else if word & TIMEOUT != 0 {
            Some(StopReason::TimedOut)
        } else {
            None
        }
    }

    /// Requests a stop of call `generation` (or of whatever call runs, if
    /// `None`). Returns false if that call is not running.
    fn stop(&self, generation: Option<u64>, flag: u64) -> bool {
        let mut word = self.word.load(Ordering::SeqCst);
        loop {
            let running = word & RUNNING != 0;
            let same_call = generation.is_none_or(|g| g == word >> FLAG_BITS);
            if !running || !same_call {
                return false;
            }
            match self
                .word
                .compare_exchange(word, word | flag, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break,
                Err(current) => word = current,
            }
        }
        let guard = self
            .immediate_exit
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(ImmediateExit(pointer)) = guard.as_ref() {
            // SAFETY: the vCPU is alive while the field is Some (checked
            // under the lock); KVM reads this byte at the next KVM_RUN entry.
            unsafe { pointer.write_volatile(1) };
            let thread = self.thread.load(Ordering::SeqCst);
            // NOTE: if the call ends and its thread exits between the check
            // above and this line, the signal goes to a stale thread id.
            // SAFETY: the thread id was stored by the thread running the call.
            unsafe { libc::pthread_kill(thread, libc::SIGRTMIN() + INTERRUPT_SIGNAL_OFFSET) };
        }
        true
    }

    /// Makes `thread`'s current or next `KVM_RUN` return at once, whatever
    /// the call state; the polling transport uses it to pause its vCPU thread.
    pub(crate) fn kick(&self, thread: libc::pthread_t) {
        let guard = self
            .immediate_exit
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(ImmediateExit(pointer)) = guard.as_ref() {
            // SAFETY: as in `stop`: the vCPU is alive while the field is Some.
            unsafe { pointer.write_volatile(1) };
            // SAFETY: `thread` is the polling sandbox's vCPU thread, which
            // runs until the sandbox joins it after the last kick.
            unsafe { libc::pthread_kill(thread, libc::SIGRTMIN() + INTERRUPT_SIGNAL_OFFSET) };
        }
    }

    /// Forgets the vCPU; called before the vCPU is closed.
    pub(crate) fn detach(&self) {
        let mut guard = self
            .immediate_exit
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *guard = None;
    }
}

/// Stops a running call of one sandbox from any thread.
#[derive(Clone)]
pub struct InterruptHandle {
    pub(crate) state: Arc<InterruptState>,
}

impl InterruptHandle {
    /// Stops the call in progress with [`SandboxError::Cancelled`](crate::SandboxError::Cancelled).
    /// Returns false if no call was running. The sandbox is poisoned afterwards.
    pub fn kill(&self) -> bool {
        self.state.stop(None, CANCEL)
    }
}

impl std::fmt::Debug for InterruptHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterruptHandle").finish_non_exhaustive()
    }
}

extern "C" fn on_interrupt_signal(_: libc::c_int) {}

fn install_signal_handler() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: installs a handler that does nothing, which is
        // async-signal-safe; SA_RESTART keeps other syscalls of the thread
        // from failing with EINTR (KVM_RUN still returns EINTR).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_interrupt_signal as *const () as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(
                libc::SIGRTMIN() + INTERRUPT_SIGNAL_OFFSET,
                &action,
                std::ptr::null_mut(),
            );
        }
    });
}

/// One process-wide thread that fires call time limits.
struct Watchdog {
    queue: Mutex<WatchdogQueue>,
    wakeup: Condvar,
}

#[derive(Default)]
struct WatchdogQueue {
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    armed: HashMap<u64, (Weak<InterruptState>, u64)>,
    next_id: u64,
}

fn watchdog() -> &'static Watchdog {
    static WATCHDOG: OnceLock<&'static Watchdog> = OnceLock::new();
    WATCHDOG.get_or_init(|| {
        let watchdog: &'static Watchdog = Box::leak(Box::new(Watchdog {
            queue: Mutex::new(WatchdogQueue::default()),
            wakeup: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("sandcore-watchdog".into())
            .spawn(move || watchdog.run())
            .expect("failed to start the sandcore-watchdog thread");
        watchdog
    })
}

impl Watchdog {
    fn run(&self) {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let now = Instant::now();
            while let Some(Reverse((deadline, id))) = queue.deadlines.peek().copied() {
                if deadline > now {
                    break;
                }
                queue.deadlines.pop();
                if let Some((state, generation)) = queue.armed.remove(&id) {
                    if let Some(state) = state.upgrade() {
                        state.stop(Some(generation), TIMEOUT);
                    }
                }
            }
            let wait = queue
                .deadlines
                .peek()
                .map(|Reverse((deadline, _))| deadline.saturating_duration_since(now));
            queue = match wait {
                Some(wait) => {
                    self.wakeup
                        .wait_timeout(queue, wait)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => self.wakeup.wait(queue).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }
}

/// A time limit armed for one call; disarmed on drop.
pub(crate) struct Deadline {
    id: u64,
}

impl Deadline {
    pub(crate) fn arm(state: &Arc<InterruptState>, generation: u64, limit: Duration) -> Deadline {
        let watchdog = watchdog();
        let mut queue = watchdog.queue.lock().unwrap_or_else(|p| p.into_inner());
        queue.next_id += 1;
        let id = queue.next_id;
        queue.deadlines.push(Reverse((Instant::now() + limit, id)));
        queue.armed.insert(id, (Arc::downgrade(state), generation));
        watchdog.wakeup.notify_one();
        Deadline { id }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        let mut queue = watchdog().queue.lock().unwrap_or_else(|p| p.into_inner());
        queue.armed.remove(&self.id);
    }
}
