//! Sending one dump to several sinks at once.
//!
//! [`FanOut`] is itself a [`DumpSink`], so the ELF writer streams a core once
//! and every attached sink receives the same calls. A sink that fails is sent
//! `abort`, dropped from the rest of the dump and reported on its own
//! outcome; the other sinks go on. The fan-out fails as a whole only when no
//! sink is left, so that the writer stops producing bytes that no sink receives.

use crate::elf_core::{write_core, CoreWriteError};
use crate::sink::{DumpMetadata, DumpSink, SinkError, SinkErrorKind, SinkReceipt};
use crate::snapshot::{CrashInfo, GuestMemorySource};

/// Maximum number of sinks one [`FanOut`] drives.
pub const MAX_FANOUT_SINKS: usize = 8;
/// Maximum bytes of a sink name kept in a [`SinkOutcome`].
pub const MAX_SINK_NAME: usize = 32;

/// Result of one dump on one sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkOutcome {
    /// The sink's [`DumpSink::name`], cut at [`MAX_SINK_NAME`] bytes.
    pub name: heapless::String<MAX_SINK_NAME>,
    /// The receipt from `finish`, or the first error the sink returned.
    pub result: Result<SinkReceipt, SinkError>,
}

/// Per-sink progress through the current dump.
///
/// The outcome is kept inline because `no_std` builds have no heap to box it in.
#[allow(clippy::large_enum_variant)]
enum SlotState {
    /// No dump started yet.
    Idle,
    /// The sink accepted every call so far.
    Active,
    /// The sink finished or failed; the outcome is final.
    Done(Result<SinkReceipt, SinkError>),
}

struct Slot<'a> {
    sink: &'a mut dyn DumpSink,
    state: SlotState,
}

/// A [`DumpSink`] that forwards each call to up to [`MAX_FANOUT_SINKS`] sinks.
pub struct FanOut<'a> {
    slots: heapless::Vec<Slot<'a>, MAX_FANOUT_SINKS>,
}

impl<'a> Default for FanOut<'a> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> FanOut<'a> {
    /// Creates a fan-out without sinks.
    pub fn new() -> Self {
        FanOut {
            slots: heapless::Vec::new(),
        }
    }

    /// Attaches `sink`. Fails with [`SinkErrorKind::Rejected`] when
    /// [`MAX_FANOUT_SINKS`] sinks are attached already.
    pub fn add(&mut self, sink: &'a mut dyn DumpSink) -> Result<(), SinkError> {
        let slot = Slot {
            sink,
            state: SlotState::Idle,
        };
        self.slots.push(slot).map_err(|_| {
            SinkError::new(
                SinkErrorKind::Rejected,
                "fan-out already has MAX_FANOUT_SINKS sinks; write to the others in a second pass",
            )
        })
    }

    /// Returns the number of attached sinks.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Returns true if no sink is attached.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Returns each sink's outcome of the last dump, in the order the sinks were added.
    ///
    /// A sink whose dump is still running, or that never saw `begin`, is
    /// reported as [`SinkErrorKind::Protocol`].
    pub fn outcomes(&self) -> heapless::Vec<SinkOutcome, MAX_FANOUT_SINKS> {
        let mut outcomes = heapless::Vec::new();
        for slot in &self.slots {
            let result = match &slot.state {
                SlotState::Done(result) => result.clone(),
                SlotState::Idle | SlotState::Active => Err(SinkError::new(
                    SinkErrorKind::Protocol,
                    "dump did not finish on this sink; call finish or abort first",
                )),
            };
            let outcome = SinkOutcome {
                name: short_name(slot.sink.name()),
                result,
            };
            // outcomes has the same capacity as slots.
            let _ = outcomes.push(outcome);
        }
        outcomes
    }

    /// Calls `operation` on every active sink; a sink that fails is aborted
    /// and keeps its error. Fails only when no sink is active afterwards.
    fn for_each_active(
        &mut self,
        mut operation: impl FnMut(&mut dyn DumpSink) -> Result<(), SinkError>,
    ) -> Result<(), SinkError> {
        let mut last_error = None;
        for slot in self.slots.iter_mut() {
            if !matches!(slot.state, SlotState::Active) {
                continue;
            }
            if let Err(error) = operation(&mut *slot.sink) {
                slot.sink.abort();
                last_error = Some(error.clone());
                slot.state = SlotState::Done(Err(error));
            }
        }
        let any_active = self
            .slots
            .iter()
            .any(|slot| matches!(slot.state, SlotState::Active));
        match (any_active, last_error) {
            (true, _) => Ok(()),
            (false, Some(error)) => Err(error),
            (false, None) => Err(all_failed()),
        }
    }
}

fn short_name(name: &str) -> heapless::String<MAX_SINK_NAME> {
    let mut short = heapless::String::new();
    for ch in name.chars() {
        if short.push(ch).is_err() {
            break;
        }
    }
    short
}

fn all_failed() -> SinkError {
    SinkError::new(
        SinkErrorKind::Rejected,
        "every sink of the fan-out failed or none is attached; see each sink's outcome",
    )
}

impl<'a> DumpSink for FanOut<'a> {
    fn begin(&mut self, metadata: &DumpMetadata) -> Result<(), SinkError> {
        for slot in self.slots.iter_mut() {
            slot.state = SlotState::Active;
        }
        self.for_each_active(|sink| sink.begin(metadata))
    }

    fn data(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        self.for_each_active(|sink| sink.data(bytes))
    }

    fn hole(&mut self, length: u64) -> Result<(), SinkError> {
        self.for_each_active(|sink| sink.hole(length))
    }

    /// Finishes every active sink and returns the first receipt, or an error
    /// if no sink finished. Each sink's own result is in [`FanOut::outcomes`].
    fn finish(&mut self) -> Result<SinkReceipt, SinkError> {
        let mut first_receipt = None;
        let mut last_error = None;
        for slot in self.slots.iter_mut() {
            if !matches!(slot.state, SlotState::Active) {
                continue;
            }
            let result = slot.sink.finish();
            match &result {
                Ok(receipt) if first_receipt.is_none() => first_receipt = Some(receipt.clone()),
                Ok(_) => {}
                Err(error) => last_error = Some(error.clone()),
            }
            slot.state = SlotState::Done(result);
        }
        match (first_receipt, last_error) {
            (Some(receipt), _) => Ok(receipt),
            (None, Some(error)) => Err(error),
            (None, None) => Err(all_failed()),
        }
    }

    fn abort(&mut self) {
        for slot in self.slots.iter_mut() {
            if matches!(slot.state, SlotState::Active) {
                slot.sink.abort();
                slot.state = SlotState::Done(Err(SinkError::new(
                    SinkErrorKind::Aborted,
                    "the core writer aborted the dump; see its error",
                )));
            }
        }
    }

    fn name(&self) -> &str {
        "fan-out"
    }
}

/// Writes the core of `info` once to every sink in `sinks` and returns each
/// sink's outcome, in order.
///
/// Fails only if the core's layout is invalid (then no sink was called) or
/// if more than [`MAX_FANOUT_SINKS`] sinks are given. A sink error, even on
/// every sink, is reported in the outcomes, not as `Err`.
pub fn write_core_to_all(
    info: &CrashInfo,
    source: &impl GuestMemorySource,
    sinks: &mut [&mut dyn DumpSink],
) -> Result<heapless::Vec<SinkOutcome, MAX_FANOUT_SINKS>, CoreWriteError> {
    let mut fan_out = FanOut::new();
    for sink in sinks.iter_mut() {
        fan_out.add(&mut **sink).map_err(CoreWriteError::Sink)?;
    }
    match write_core(info, source, &mut fan_out) {
        Ok(_) | Err(CoreWriteError::Sink(_)) | Err(CoreWriteError::SizeMismatch { .. }) => {
            Ok(fan_out.outcomes())
        }
        Err(error) => Err(error),
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use crate::snapshot::{CrashKind, MemoryRegion, RegionFlags, XSAVE_AREA_SIZE};

    /// Sink that counts bytes and fails once it has received `fail_after` bytes.
    struct CountingSink {
        name: &'static str,
        received: u64,
        fail_after: Option<u64>,
        aborted: bool,
        finished: bool,
    }

    impl CountingSink {
        fn new(name: &'static str, fail_after: Option<u64>) -> Self {
            CountingSink {
                name,
                received: 0,
                fail_after,
                aborted: false,
                finished: false,
            }
        }

        fn take(&mut self, length: u64) -> Result<(), SinkError> {
            self.received += length;
            match self.fail_after {
                Some(limit) if self.received > limit => Err(SinkError::new(
                    SinkErrorKind::NoSpace,
                    "counting sink: disk full at the test limit",
                )),
                _ => Ok(()),
            }
        }
    }

    impl DumpSink for CountingSink {
        fn begin(&mut self, _metadata: &DumpMetadata) -> Result<(), SinkError> {
            Ok(())
        }

        fn data(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
            self.take(bytes.len() as u64)
        }

        fn hole(&mut self, length: u64) -> Result<(), SinkError> {
            self.take(length)
        }

        fn finish(&mut self) -> Result<SinkReceipt, SinkError> {
            self.finished = true;
            let mut location = heapless::String::new();
            location.push_str(self.name).unwrap();
            Ok(SinkReceipt {
                location,
                bytes: self.received,
            })
        }

        fn abort(&mut self) {
            self.aborted = true;
        }

        fn name(&self) -> &str {
            self.name
        }
    }

    struct PatternSource(Vec<u8>);

    impl GuestMemorySource for PatternSource {
        fn region_bytes(&self, region: &MemoryRegion) -> Option<&[u8]> {
            let start = (region.guest_address - 0x10_0000) as usize;
            self.0.get(start..start + region.size as usize)
        }
    }

    fn crash() -> (CrashInfo, PatternSource) {
        let mut info = CrashInfo {
            dump_id: 1,
            sandbox_id: 2,
            timestamp_ns: 0,
            kind: CrashKind::Panic,
            registers: Default::default(),
            control: Default::default(),
            xsave: [0; XSAVE_AREA_SIZE],
            xcr0: 3,
            guest_name: heapless::String::new(),
            guest_path: heapless::String::new(),
            build_id: heapless::Vec::new(),
            function: heapless::String::new(),
            entry_point: 0,
            message: heapless::String::new(),
            message_truncated: false,
            regions: heapless::Vec::new(),
        };
        info.regions
            .push(MemoryRegion {
                guest_address: 0x10_0000,
                size: 0x4000,
                flags: RegionFlags::READ,
                file_offset: 0,
            })
            .unwrap();
        (info, PatternSource(vec![0x5a; 0x4000]))
    }

    #[test]
    fn failing_sink_does_not_stop_others() {
        let (info, source) = crash();
        let mut first = CountingSink::new("first", None);
        let mut failing = CountingSink::new("failing", Some(100));
        let mut last = CountingSink::new("last", None);
        let outcomes =
            write_core_to_all(&info, &source, &mut [&mut first, &mut failing, &mut last]).unwrap();

        assert_eq!(outcomes.len(), 3);
        assert_eq!(outcomes[0].name, "first");
        assert_eq!(outcomes[1].name, "failing");
        assert_eq!(outcomes[2].name, "last");
        let total = outcomes[0].result.as_ref().unwrap().bytes;
        assert!(
            total > 0x4000,
            "core of {total} bytes is smaller than its memory"
        );
        assert_eq!(outcomes[2].result.as_ref().unwrap().bytes, total);
        let error = outcomes[1].result.as_ref().unwrap_err();
        assert_eq!(error.kind, SinkErrorKind::NoSpace);
        assert!(failing.aborted, "failed sink was not sent abort");
        assert!(!failing.finished, "failed sink was sent finish");
        assert!(first.finished, "sink first was not sent finish");
        assert!(last.finished, "sink last was not sent finish");
        assert!(!first.aborted, "sink first was sent abort");
        assert!(!last.aborted, "sink last was sent abort");
    }

    #[test]
    fn all_sinks_failing_stops_writer() {
        let (info, source) = crash();
        let mut one = CountingSink::new("one", Some(10));
        let mut two = CountingSink::new("two", Some(20));
        let outcomes = write_core_to_all(&info, &source, &mut [&mut one, &mut two]).unwrap();

        assert!(outcomes.iter().all(|outcome| outcome.result.is_err()));
        // The writer sends headers in one-page chunks and stops after the
        // first chunk, which both sinks reject, long before the memory.
        assert_eq!(two.received, 4096, "writer went on after every sink failed");
        assert!(one.aborted, "sink one was not sent abort");
        assert!(two.aborted, "sink two was not sent abort");
    }

    #[test]
    fn invalid_layout_calls_no_sink() {
        let (mut info, source) = crash();
        info.regions[0].size = 0x8000;
        let mut only = CountingSink::new("only", None);
        let error = write_core_to_all(&info, &source, &mut [&mut only]).unwrap_err();
        assert!(
            matches!(error, CoreWriteError::MissingMemory { .. }),
            "{error:?}"
        );
        assert_eq!(only.received, 0);
    }

    #[test]
    fn too_many_sinks_rejected() {
        let (info, source) = crash();
        let mut sinks: Vec<CountingSink> = (0..MAX_FANOUT_SINKS + 1)
            .map(|_| CountingSink::new("extra", None))
            .collect();
        let mut references: Vec<&mut dyn DumpSink> = sinks
            .iter_mut()
            .map(|sink| sink as &mut dyn DumpSink)
            .collect();
        let error = write_core_to_all(&info, &source, &mut references).unwrap_err();
        assert!(
            matches!(error, CoreWriteError::Sink(ref e) if e.kind == SinkErrorKind::Rejected),
            "{error:?}"
        );
    }
}
