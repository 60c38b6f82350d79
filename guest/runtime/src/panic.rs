//! Panic handler: reports the message and location to the host and stops.

use core::fmt::Write;
use core::sync::atomic::Ordering;
use sandcore_abi::ports::PORT_ABORT;
use sandcore_abi::slot::OUTPUT_ABORT;

use crate::port::exit_to_host;
use crate::shared::Buffer;

/// Formats into a byte slice and drops what does not fit.
struct Truncating<'a> {
    buffer: &'a mut [u8],
    length: usize,
}

impl Write for Truncating<'_> {
    fn write_str(&mut self, text: &str) -> core::fmt::Result {
        let room = self.buffer.len() - self.length;
        let mut take = text.len().min(room);
        while !text.is_char_boundary(take) {
            take -= 1;
        }
        self.buffer[self.length..self.length + take].copy_from_slice(&text.as_bytes()[..take]);
        self.length += take;
        Ok(())
    }
}

#[panic_handler]
fn on_panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let output = Buffer::output();
    let mut message = Truncating {
        buffer: output.payload_mut(),
        length: 0,
    };
    let _ = write!(message, "{}", info.message());
    if let Some(location) = info.location() {
        let _ = write!(
            message,
            " at {}:{}:{}",
            location.file(),
            location.line(),
            location.column()
        );
    }
    let header = output.header();
    header
        .length
        .store(message.length as u32, Ordering::Relaxed);
    header.state.store(OUTPUT_ABORT, Ordering::Release);
    loop {
        // The host never resumes an aborted guest; loop in case it does.
        exit_to_host(PORT_ABORT);
    }
}

/// Referenced by `core`, which is built with unwinding; never called
/// because guests build with `panic = "abort"`.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

/// Referenced by landing pads in the prebuilt `core`; unreachable because a
/// guest never unwinds. Raises #UD if it is ever reached.
#[no_mangle]
extern "C" fn _Unwind_Resume() -> ! {
    // SAFETY: `ud2` raises #UD, which the host reports as a crash.
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}
