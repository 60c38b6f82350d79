//! The shared-memory polling floor: a guest spinning at CPL3 on a doorbell
//! word while its vCPU stays in `KVM_RUN` on a thread of its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use super::layout::{ANSWER_ADDRESS, DOORBELL_ADDRESS, OUT_PORT};
use super::{FloorError, Privilege, RawVm};

/// Spins between checks that the vCPU thread is still running, so that a
/// dead guest panics instead of hanging the benchmark.
const SPINS_PER_LIVENESS_CHECK: u32 = 1 << 24;

/// Doorbell value that makes the guest leave its loop with an `out`.
const STOP: u64 = u64::MAX;

/// The guest loop, at CPL3:
///
/// ```text
/// loop:  mov rax, [DOORBELL]     ; 8 bytes
///        cmp rax, rbx            ; 3
///        je  loop                ; 2, rel -13
///        mov rbx, rax            ; 3
///        mov [ANSWER], rax       ; 8
///        cmp rax, -1             ; 4
///        jne loop                ; 2, rel -30
///        out OUT_PORT, al        ; 2
///        jmp $                   ; 2
/// ```
const POLL_LOOP: [u8; 34] = {
    let bell = (DOORBELL_ADDRESS as u32).to_le_bytes();
    let answer = (ANSWER_ADDRESS as u32).to_le_bytes();
    [
        0x48,
        0x8b,
        0x04,
        0x25,
        bell[0],
        bell[1],
        bell[2],
        bell[3], //
        0x48,
        0x39,
        0xd8, //
        0x74,
        0xf3, //
        0x48,
        0x89,
        0xc3, //
        0x48,
        0x89,
        0x04,
        0x25,
        answer[0],
        answer[1],
        answer[2],
        answer[3], //
        0x48,
        0x83,
        0xf8,
        0xff, //
        0x75,
        0xe2, //
        0xe6,
        OUT_PORT as u8, //
        0xeb,
        0xfe,
    ]
};

/// A running polling guest. [`PollingGuest::stop`] (or drop) ends it.
pub struct PollingGuest {
    doorbell: *const AtomicU64,
    answer: *const AtomicU64,
    sequence: u64,
    thread: Option<JoinHandle<Result<RawVm, FloorError>>>,
}

impl PollingGuest {
    /// Creates the VM and starts its vCPU thread.
    pub fn start() -> Result<PollingGuest, FloorError> {
        let mut vm = RawVm::new(Privilege::Cpl3, &POLL_LOOP)?;
        let base = vm.host_address();
        // SAFETY: both words lie inside the 4 MiB guest memory, are 8-byte
        // aligned, and stay mapped until the vCPU thread returns the VM,
        // which `stop` waits for before the pointers can dangle.
        let (doorbell, answer) = unsafe {
            (
                base.add(DOORBELL_ADDRESS as usize).cast::<AtomicU64>(),
                base.add(ANSWER_ADDRESS as usize).cast::<AtomicU64>(),
            )
        };
        let thread = std::thread::Builder::new()
            .name("floor-vcpu".into())
            .spawn(move || {
                vm.run_to_port(OUT_PORT)?;
                Ok(vm)
            })?;
        Ok(PollingGuest {
            doorbell,
            answer,
            sequence: 0,
            thread: Some(thread),
        })
    }

    /// Rings the doorbell and spins until the guest copies it to the reply word.
    pub fn round_trip(&mut self) {
        self.sequence += 1;
        // SAFETY: see `start`; the guest is still running, so the memory is mapped.
        let (doorbell, answer) = unsafe { (&*self.doorbell, &*self.answer) };
        doorbell.store(self.sequence, Ordering::Release);
        let mut spins: u32 = 0;
        while answer.load(Ordering::Acquire) != self.sequence {
            std::hint::spin_loop();
            spins += 1;
            if spins == SPINS_PER_LIVENESS_CHECK {
                spins = 0;
                self.check_running();
            }
        }
    }

    fn check_running(&self) {
        if self
            .thread
            .as_ref()
            .is_some_and(|thread| thread.is_finished())
        {
            panic!(
                "the polling guest's vCPU thread stopped before replying to doorbell {}",
                self.sequence
            );
        }
    }

    /// Makes the guest leave its loop and waits for the vCPU thread.
    pub fn stop(mut self) -> Result<(), FloorError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), FloorError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        // SAFETY: see `start`; the VM is alive until the join below returns.
        unsafe { &*self.doorbell }.store(STOP, Ordering::Release);
        let vm = thread
            .join()
            .map_err(|_| "the polling guest's vCPU thread panicked")??;
        drop(vm);
        Ok(())
    }
}

impl Drop for PollingGuest {
    fn drop(&mut self) {
        if let Err(error) = self.finish() {
            eprintln!("stopping the polling guest failed: {error}");
        }
    }
}
