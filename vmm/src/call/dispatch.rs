//! The exit transport's call loop: write the request, run the vCPU, serve
//! host calls, read the reply. A call without host calls costs exactly one
//! `KVM_RUN` and no other vCPU ioctl.

use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;

use sandcore_abi::encoding::{EncodeError, Reader, Reply, ReplyStatus, Value as WireValue, Writer};
use sandcore_abi::ports::{PORT_HOST_CALL, PORT_PARK};
use sandcore_abi::slot::{
    INPUT_CALL, OUTPUT_EMPTY, OUTPUT_HOST_CALL, OUTPUT_HOST_REPLY, OUTPUT_REPLY,
};

use crate::call::polling::{futex_wait, CALLER_SLEEP, CALLER_SPIN_LIMIT};
use crate::call::values::{Arguments, FromValue};
use crate::crash::{exit_to_error, RawCrash};
use crate::error::SandboxError;
use crate::interrupt::{Deadline, StopReason};
use crate::sandbox::{CallReport, Sandbox, VcpuOwner};
use crate::vcpu::Exit;

/// Name of the host function behind the guest runtime's `print`.
pub const PRINT_FUNCTION: &str = "__sandcore_print";

impl Sandbox {
    /// Calls the guest function `function` with `arguments` (a tuple such as
    /// `(1i32, "text")`, or a `Vec<Value>`) and returns its result as `R`.
    ///
    /// A crash returns its typed error, carrying the dump id when a dump was
    /// queued, and poisons the sandbox until [`Sandbox::restore`].
    pub fn call<R: FromValue>(
        &mut self,
        function: &str,
        arguments: impl Arguments,
    ) -> Result<R, SandboxError> {
        self.call_dyn(function, &arguments)
    }

    fn call_dyn<R: FromValue, A: Arguments + ?Sized>(
        &mut self,
        function: &str,
        arguments: &A,
    ) -> Result<R, SandboxError> {
        if let Some(cause) = &self.poisoned {
            return Err(SandboxError::Poisoned {
                cause: cause.clone(),
            });
        }
        self.write_request(function, arguments)?;
        self.last_call = CallReport {
            polling: matches!(self.vcpu, VcpuOwner::Thread(_)),
            ..CallReport::default()
        };
        let outcome = match &self.vcpu {
            VcpuOwner::Local(_) => self.run_call(),
            VcpuOwner::Thread(_) => self.run_polling_call(),
        };
        if let Err(error) = outcome {
            if error.poisons() {
                self.poisoned = Some(error.to_string());
            }
            return Err(error);
        }
        self.read_reply(function).inspect_err(|error| {
            if error.poisons() {
                self.poisoned = Some(error.to_string());
            }
        })
    }

    fn write_request<A: Arguments + ?Sized>(
        &mut self,
        function: &str,
        arguments: &A,
    ) -> Result<(), SandboxError> {
        let input = self.input;
        // SAFETY: the vCPU is not running, so the guest does not touch the payload.
        let payload = unsafe { input.payload_mut() };
        let mut writer = Writer::new(payload);
        let encoded = writer
            .put_call_header(function, arguments.count())
            .and_then(|()| arguments.encode(&mut writer));
        if let Err(error) = encoded {
            return Err(match error {
                EncodeError::BufferTooSmall { .. } => {
                    let mut measure = vec![0u8; 0];
                    let needed = encoded_size(function, arguments, &mut measure);
                    SandboxError::RequestTooLarge {
                        function: function.into(),
                        needed,
                        available: input.capacity(),
                    }
                }
                other => SandboxError::ArgumentMismatch {
                    function: function.into(),
                    message: other.to_string(),
                },
            });
        }
        let length = writer.position();
        self.sequence += 1;
        self.function.clear();
        for ch in function.chars() {
            if self.function.push(ch).is_err() {
                break;
            }
        }
        let header = input.header();
        header.length.store(length as u32, Ordering::Relaxed);
        header.sequence.store(self.sequence, Ordering::Relaxed);
        self.output
            .header()
            .state
            .store(OUTPUT_EMPTY, Ordering::Relaxed);
        // SeqCst, not just Release: the polling transport's vCPU thread
        // checks this word after announcing that it parks (see polling.rs).
        header.state.store(INPUT_CALL, Ordering::SeqCst);
        Ok(())
    }

    /// Runs the vCPU until the guest parks with a reply, serving host calls.
    fn run_call(&mut self) -> Result<(), SandboxError> {
        let generation = self.interrupt.begin_call(None);
        let _deadline = self
            .config
            .call_time_limit
            .map(|limit| Deadline::arm(&self.interrupt, generation, limit));
        let result = loop {
            let VcpuOwner::Local(vm) = &mut self.vcpu else {
                unreachable!("run_call is only used with the exit transport")
            };
            vm.vcpu.set_kvm_immediate_exit(0);
            if let Some(reason) = self.interrupt.stop_reason() {
                break Err(self.crash(Exit::Interrupted, Some(reason)));
            }
            match vm.run() {
                Exit::Io(PORT_PARK) => break self.check_reply_published(),
                Exit::Io(PORT_HOST_CALL) => {
                    self.last_call.host_calls += 1;
                    if let Err(error) = self.serve_host_call() {
                        break Err(error);
                    }
                }
                Exit::Interrupted => {
                    if let Some(reason) = self.interrupt.stop_reason() {
                        break Err(self.crash(Exit::Interrupted, Some(reason)));
                    }
                    // A stray signal: run again.
                }
                exit => break Err(self.crash(exit, None)),
            }
        };
        self.interrupt.end_call();
        result
    }

    /// Polling transport: wakes a parked guest, then spins (and later
    /// sleeps) on the output slot, serving host calls, until the reply.
    fn run_polling_call(&mut self) -> Result<(), SandboxError> {
        let VcpuOwner::Thread(polling) = &self.vcpu else {
            unreachable!("run_polling_call is only used with the polling transport")
        };
        let generation = self.interrupt.begin_call(Some(polling.thread_id()));
        let _deadline = self
            .config
            .call_time_limit
            .map(|limit| Deadline::arm(&self.interrupt, generation, limit));
        self.last_call.woke_guest = polling.wake_if_parked();

        let mut spins: u32 = 0;
        let result = loop {
            let VcpuOwner::Thread(polling) = &self.vcpu else {
                unreachable!()
            };
            let output_state = self.output.header().state.load(Ordering::Acquire);
            if output_state == OUTPUT_REPLY {
                break self.check_reply_published();
            }
            if output_state == OUTPUT_HOST_CALL {
                self.last_call.host_calls += 1;
                if let Err(error) = self.serve_host_call() {
                    break Err(error);
                }
                spins = 0;
                continue;
            }
            if let Some((exit, exit_generation)) = polling.take_exit() {
                if matches!(exit, Exit::Interrupted) && exit_generation != generation {
                    // A stop aimed at an earlier call, which had returned
                    // before the vCPU thread handed its exit over.
                    polling.resume();
                    continue;
                }
                let stop = self.interrupt.stop_reason();
                break Err(self.crash_polling(exit, stop));
            }
            if let Some(reason) = self.interrupt.stop_reason() {
                // A guest that cleared its own input slot leaves the vCPU
                // thread asleep in park(), where the signal never reaches
                // it. So the caller stops the call itself, and crash()
                // pauses the thread.
                break Err(self.crash_polling(Exit::Interrupted, Some(reason)));
            }
            spins += 1;
            if spins < CALLER_SPIN_LIMIT {
                std::hint::spin_loop();
                continue;
            }
            // Slow path: announce the wait, re-check, then sleep until the
            // guest's PORT_NOTIFY exit or the vCPU thread's hand-over.
            self.last_call.slept = true;
            let shared = &polling.shared;
            let seen = shared.notify_seq.load(Ordering::SeqCst);
            let waiting = &self.input.header().host_waiting;
            waiting.store(1, Ordering::SeqCst);
            let state = self.output.header().state.load(Ordering::SeqCst);
            if state == OUTPUT_EMPTY && !shared.exit_ready.load(Ordering::SeqCst) {
                futex_wait(&shared.notify_seq, seen, Some(CALLER_SLEEP));
            }
            waiting.store(0, Ordering::SeqCst);
        };
        self.interrupt.end_call();
        result
    }

    fn check_reply_published(&self) -> Result<(), SandboxError> {
        let header = self.output.header();
        let state = header.state.load(Ordering::Acquire);
        let sequence = header.sequence.load(Ordering::Relaxed);
        if state != OUTPUT_REPLY {
            return Err(SandboxError::ProtocolViolation {
                reason: format!("guest parked with output slot state {state}, expected a reply ({OUTPUT_REPLY})"),
            });
        }
        if sequence != self.sequence {
            return Err(SandboxError::ProtocolViolation {
                reason: format!(
                    "guest replied to request {sequence}, but request {} is pending",
                    self.sequence
                ),
            });
        }
        Ok(())
    }

    fn read_reply<R: FromValue>(&mut self, function: &str) -> Result<R, SandboxError> {
        let output = self.output;
        let too_long = |claimed: usize| SandboxError::ProtocolViolation {
            reason: format!(
                "reply length {claimed} exceeds the output buffer's {} bytes",
                output.capacity()
            ),
        };
        let bytes = if matches!(self.vcpu, VcpuOwner::Thread(_)) {
            output.copy_received(&mut self.received).map_err(too_long)?;
            self.received.as_slice()
        } else {
            // SAFETY: the guest is parked, so the output payload is stable.
            unsafe { output.received() }.map_err(too_long)?
        };
        let reply =
            Reader::new(bytes)
                .reply()
                .map_err(|error| SandboxError::ProtocolViolation {
                    reason: format!("reply of {function:?} cannot be decoded: {error}"),
                })?;
        match reply {
            Reply::Ok(value) => {
                R::from_wire(value).ok_or_else(|| SandboxError::ReturnTypeMismatch {
                    function: function.into(),
                    expected: R::TYPE_NAME,
                    actual: value.value_type().name(),
                })
            }
            Reply::Error(ReplyStatus::UnknownFunction, _) => Err(SandboxError::UnknownFunction {
                name: function.into(),
            }),
            Reply::Error(ReplyStatus::ArgumentMismatch, message) => {
                Err(SandboxError::ArgumentMismatch {
                    function: function.into(),
                    message: message.into(),
                })
            }
            Reply::Error(ReplyStatus::ReplyTooLarge, message) => Err(SandboxError::ReplyTooLarge {
                function: function.into(),
                message: message.into(),
            }),
            Reply::Error(status, message) => Err(SandboxError::ProtocolViolation {
                reason: format!("guest answered {function:?} with status {status:?}: {message}"),
            }),
        }
    }

    /// Runs the host function the guest asked for and writes its reply into
    /// the output slot. Failures of the function go back to the guest; only
    /// a broken request fails the call.
    fn serve_host_call(&mut self) -> Result<(), SandboxError> {
        let output = self.output;
        let header = output.header();
        let state = header.state.load(Ordering::Acquire);
        if state != OUTPUT_HOST_CALL {
            return Err(SandboxError::ProtocolViolation {
                reason: format!("guest made a host call with output slot state {state}, expected {OUTPUT_HOST_CALL}"),
            });
        }
        // Copied, because on the polling transport the guest runs while the
        // host decodes; the vector's capacity is reused across calls.
        let mut request = std::mem::take(&mut self.received);
        let copied = output.copy_received(&mut request);
        let outcome = match copied {
            Ok(()) => self.answer_host_call(&request),
            Err(claimed) => Err(SandboxError::ProtocolViolation {
                reason: format!(
                    "host call length {claimed} exceeds the output buffer's {} bytes",
                    output.capacity()
                ),
            }),
        };
        self.received = request;
        outcome
    }

    /// Decodes a host-function request, runs the function and writes its
    /// reply into the output slot.
    fn answer_host_call(&self, request: &[u8]) -> Result<(), SandboxError> {
        let output = self.output;
        let header = output.header();
        let (name, result) = {
            let mut reader = Reader::new(request);
            let decoded = reader.call_header().and_then(|(name, count)| {
                let arguments = (0..count)
                    .map(|_| reader.value())
                    .collect::<Result<Vec<WireValue<'_>>, _>>()?;
                reader.finish()?;
                Ok((name, arguments))
            });
            let (name, arguments) = decoded.map_err(|error| SandboxError::ProtocolViolation {
                reason: format!("host call request cannot be decoded: {error}"),
            })?;
            (name.to_owned(), self.invoke_host_function(name, &arguments))
        };

        // SAFETY: as above; the request was copied out before this write.
        let payload = unsafe { output.payload_mut() };
        let mut writer = Writer::new(payload);
        let written = match &result {
            Ok(value) => writer.put_ok_reply(&value.as_wire()),
            Err((status, message)) => writer.put_error_reply(*status, message),
        };
        if written.is_err() {
            writer = Writer::new(payload);
            let mut message = String::new();
            let _ = write!(
                message,
                "result of host function {name:?} does not fit into the output buffer"
            );
            writer
                .put_error_reply(ReplyStatus::ReplyTooLarge, &message)
                .map_err(|error| SandboxError::ProtocolViolation {
                    reason: error.to_string(),
                })?;
        }
        header
            .length
            .store(writer.position() as u32, Ordering::Relaxed);
        header.state.store(OUTPUT_HOST_REPLY, Ordering::Release);
        Ok(())
    }

    fn invoke_host_function(
        &self,
        name: &str,
        arguments: &[WireValue<'_>],
    ) -> Result<crate::call::values::Value, (ReplyStatus, String)> {
        if name == PRINT_FUNCTION {
            if let [WireValue::String(message)] = arguments {
                (self.print_handler)(message);
                return Ok(crate::call::values::Value::Void);
            }
            return Err((
                ReplyStatus::ArgumentMismatch,
                "print takes one string".into(),
            ));
        }
        let Some(function) = self.host_functions.get(name) else {
            return Err((
                ReplyStatus::UnknownFunction,
                format!("no host function named {name:?}"),
            ));
        };
        match catch_unwind(AssertUnwindSafe(|| function(arguments))) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(message)) => Err((ReplyStatus::HostFunctionFailed, message)),
            Err(_) => {
                tracing::error!(sandbox = self.id, function = name, "host function panicked");
                Err((
                    ReplyStatus::HostFunctionFailed,
                    format!("host function {name:?} panicked"),
                ))
            }
        }
    }

    /// Polling transport: runs the crash path, then drops an exit the vCPU
    /// thread may have handed over meanwhile, so that it cannot fail the
    /// next call.
    fn crash_polling(&mut self, exit: Exit, stop: Option<StopReason>) -> SandboxError {
        let error = self.crash(exit, stop);
        if let VcpuOwner::Thread(polling) = &self.vcpu {
            let _ = polling.take_exit();
        }
        error
    }

    /// Decodes a crash, queues its dump and returns the caller's error.
    pub(crate) fn crash(&mut self, exit: Exit, stop: Option<StopReason>) -> SandboxError {
        let mapping = &self.mapping;
        let layout = &self.base.layout;
        let mut raw = self
            .vcpu
            .with_vm(|vm| RawCrash::from_exit(exit, vm, mapping.as_slice(), layout, stop));
        raw.time_limit = self.config.call_time_limit;
        #[cfg(feature = "crashdump")]
        let dump = self.capture_dump(&raw);
        #[cfg_attr(not(feature = "crashdump"), allow(unused_mut))]
        let mut error = exit_to_error(&raw);
        #[cfg(feature = "crashdump")]
        if let Some(id) = dump {
            error.set_dump(id);
        }
        tracing::warn!(sandbox = self.id, function = %self.function, %error, "guest call failed");
        error
    }
}

/// Size in bytes of the encoded request, for the error message.
fn encoded_size<A: Arguments + ?Sized>(
    function: &str,
    arguments: &A,
    scratch: &mut Vec<u8>,
) -> usize {
    let mut size = 4096;
    loop {
        scratch.resize(size, 0);
        let mut writer = Writer::new(scratch);
        if writer
            .put_call_header(function, arguments.count())
            .and_then(|()| arguments.encode(&mut writer))
            .is_ok()
        {
            return writer.position();
        }
        if size > u32::MAX as usize {
            return size;
        }
        size *= 2;
    }
}
