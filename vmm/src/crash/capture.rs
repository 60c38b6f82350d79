//! Crash capture for the dump pipeline (feature `crashdump`).
//!
//! Runs on the vCPU thread right after the exit: it reads XSAVE and XCR0,
//! fills a [`CrashInfo`] from fixed-capacity fields, moves the crashed
//! memory mapping out of the sandbox and pushes both onto the dump queue.
//! It allocates nothing: the boxed `CrashInfo` (5.6 KiB, boxed so the queue
//! entry stays small) is allocated ahead, when the sandbox is created or
//! restored, and taken here.

use std::time::{SystemTime, UNIX_EPOCH};

use sandcore_sinks::snapshot::{
    ControlRegisters, CrashInfo, CrashKind, MemoryRegion, RegionFlags, Registers, XSAVE_AREA_SIZE,
};

use crate::crash::{CrashCause, RawCrash};
use crate::dump::DumpRequest;
use crate::error::DumpId;
use crate::memory::mapping::{Mapping, MemFile};
use crate::memory::paging::{PageFlags, PageMapping};
use crate::sandbox::Sandbox;
use std::sync::Arc;

impl Sandbox {
    /// Queues a dump of `crash` if dumps are on for this sandbox and this
    /// kind of failure. Returns the dump id, or `None` if nothing was queued.
    pub(crate) fn capture_dump(&mut self, crash: &RawCrash) -> Option<DumpId> {
        // An Arc clone: no allocation.
        let queue = self.dumps.clone()?;
        let stopped = matches!(crash.cause, CrashCause::Cancelled | CrashCause::TimedOut);
        if stopped && !self.config.dump_on_timeout {
            return None;
        }
        let Some(mut info) = self.spare_crash_info.take() else {
            // Only after a capture that was not followed by restore().
            tracing::warn!(
                sandbox = self.id,
                "no crash record reserved; crash dump skipped"
            );
            return None;
        };
        *info = CrashInfo {
            dump_id: 0,
            sandbox_id: self.id,
            timestamp_ns: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0),
            kind: crash_kind(crash),
            registers: registers(crash),
            control: crash
                .sregs
                .map(|s| ControlRegisters {
                    cr0: s.cr0,
                    cr2: s.cr2,
                    cr3: s.cr3,
                    cr4: s.cr4,
                    efer: s.efer,
                })
                .unwrap_or_default(),
            xsave: [0; XSAVE_AREA_SIZE],
            xcr0: 0,
            guest_name: heapless::String::new(),
            guest_path: heapless::String::new(),
            build_id: heapless::Vec::new(),
            function: heapless::String::new(),
            entry_point: self.base.entry,
            message: heapless::String::new(),
            message_truncated: false,
            regions: heapless::Vec::new(),
        };
        let xsave = self.with_vm(|vm| vm.vcpu.get_xsave().ok());
        if let Some(xsave) = xsave {
            for (chunk, word) in info.xsave.chunks_exact_mut(4).zip(xsave.region.iter()) {
                chunk.copy_from_slice(&word.to_le_bytes());
            }
        }
        info.xcr0 = self.base.xcr0;
        push_truncated(&mut info.guest_name, &self.base.guest_name);
        push_truncated(&mut info.guest_path, &self.base.guest_path);
        push_truncated(&mut info.function, &self.function);
        for &byte in self.base.build_id.iter().take(info.build_id.capacity()) {
            let _ = info.build_id.push(byte);
        }
        if let CrashCause::Panic { message, truncated } = &crash.cause {
            push_truncated(&mut info.message, message);
            info.message_truncated = *truncated;
        }
        self.fill_regions(&mut info);

        let memory = match self.capture_memory(crash) {
            Ok(memory) => memory,
            Err(error) => {
                queue.count_capture_failure();
                tracing::error!(sandbox = self.id, %error, "cannot move crashed guest memory out of the sandbox; crash dump dropped");
                return None;
            }
        };
        let dump_id = queue.next_id();
        info.dump_id = dump_id;
        queue
            .try_push(DumpRequest { info, memory })
            .then_some(dump_id)
    }

    /// Shares the crashed memory with the dump worker; an on-demand dump of
    /// a live sandbox copies it instead, because the sandbox keeps running.
    fn capture_memory(&mut self, crash: &RawCrash) -> std::io::Result<Arc<Mapping>> {
        if matches!(crash.cause, CrashCause::OnDemand) {
            let copy = MemFile::from_mapping("sandcore-dump", &self.mapping)?;
            Ok(Arc::new(Mapping::new(Arc::new(copy))?))
        } else {
            // An Arc clone: the poisoned sandbox runs no guest code until
            // restore(), which leaves this mapping to the worker if it is
            // still reading.
            Ok(Arc::clone(&self.mapping))
        }
    }

    /// Reserves the crash record the next capture fills, outside the crash path.
    pub(crate) fn reserve_crash_info(&mut self) {
        if self.dumps.is_some() && self.spare_crash_info.is_none() {
            self.spare_crash_info = Some(Box::new(CrashInfo {
                dump_id: 0,
                sandbox_id: self.id,
                timestamp_ns: 0,
                kind: CrashKind::OnDemand,
                registers: Registers::default(),
                control: ControlRegisters::default(),
                xsave: [0; XSAVE_AREA_SIZE],
                xcr0: 0,
                guest_name: heapless::String::new(),
                guest_path: heapless::String::new(),
                build_id: heapless::Vec::new(),
                function: heapless::String::new(),
                entry_point: 0,
                message: heapless::String::new(),
                message_truncated: false,
                regions: heapless::Vec::new(),
            }));
        }
    }

    /// Writes a dump of this live sandbox without ending it: registers at
    /// the point where the guest waits for calls, and a copy of its memory.
    /// Returns the dump id; the worker's receipt tells where it went.
    pub fn dump(&mut self) -> Result<DumpId, crate::error::SandboxError> {
        use crate::error::SandboxError;
        if self.dumps.is_none() {
            return Err(SandboxError::InvalidConfiguration(
                "crash dumps are off for this sandbox; enable guest_core_dump on the builder"
                    .into(),
            ));
        }
        if let Some(cause) = &self.poisoned {
            return Err(SandboxError::Poisoned {
                cause: cause.clone(),
            });
        }
        let (regs, sregs) = self.with_vm(|vm| (vm.vcpu.get_regs().ok(), vm.vcpu.get_sregs().ok()));
        let raw = RawCrash {
            cause: CrashCause::OnDemand,
            regs,
            sregs,
            time_limit: None,
        };
        self.reserve_crash_info();
        let dump_id = self.capture_dump(&raw);
        self.reserve_crash_info();
        self.start_polling();
        dump_id.ok_or_else(|| SandboxError::Os {
            operation: "queueing an on-demand dump",
            source: std::io::Error::other(
                "the dump queue is full or the memory copy failed; see the log",
            ),
        })
    }

    /// Lists every mapped range, merging neighbours with the same rights;
    /// image segments keep their file offsets for `NT_FILE`.
    fn fill_regions(&self, info: &mut CrashInfo) {
        let image: &[(PageMapping, u64)] = &self.base.image_segments;
        for mapping in &self.base.mappings {
            let image_offset = image
                .iter()
                .find(|(m, _)| m == mapping)
                .map(|(_, offset)| *offset);
            let mut flags = RegionFlags::READ;
            if mapping.flags.contains(PageFlags::WRITABLE) {
                flags |= RegionFlags::WRITE;
            }
            if !mapping.flags.contains(PageFlags::NO_EXECUTE) {
                flags |= RegionFlags::EXECUTE;
            }
            if image_offset.is_some() {
                flags |= RegionFlags::IMAGE;
            }
            let region = MemoryRegion {
                guest_address: mapping.start,
                size: mapping.end - mapping.start,
                flags,
                file_offset: image_offset.unwrap_or(0),
            };
            if let Some(last) = info.regions.last_mut() {
                let adjacent = last.guest_address + last.size == region.guest_address;
                if adjacent && last.flags == flags && !flags.contains(RegionFlags::IMAGE) {
                    last.size += region.size;
                    continue;
                }
            }
            if info.regions.push(region).is_err() {
                tracing::warn!(
                    sandbox = self.id,
                    "more than {} memory regions; the rest is left out of the dump",
                    info.regions.capacity()
                );
                break;
            }
        }
    }
}

fn push_truncated<const N: usize>(target: &mut heapless::String<N>, text: &str) {
    for ch in text.chars() {
        if target.push(ch).is_err() {
            break;
        }
    }
}

fn crash_kind(crash: &RawCrash) -> CrashKind {
    match &crash.cause {
        CrashCause::Exception(frame) => CrashKind::Exception {
            vector: frame.vector,
            error_code: frame.error_code,
        },
        CrashCause::StackOverflow(_) => CrashKind::StackOverflow {
            address: crash.sregs.map(|s| s.cr2).unwrap_or(0),
        },
        CrashCause::Panic { .. } => CrashKind::Panic,
        CrashCause::TripleFault => CrashKind::TripleFault,
        CrashCause::Unexpected(_) => CrashKind::UnexpectedExit,
        CrashCause::Cancelled => CrashKind::Cancelled,
        CrashCause::TimedOut => CrashKind::Timeout,
        CrashCause::OnDemand => CrashKind::OnDemand,
    }
}

/// Registers of the faulting instruction: the CPU's exception frame for
/// RIP/CS/RFLAGS/RSP/SS when there is one, `KVM_GET_REGS` for the rest.
fn registers(crash: &RawCrash) -> Registers {
    let mut registers = Registers::default();
    if let Some(r) = crash.regs {
        registers = Registers {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rbp: r.rbp,
            rsp: r.rsp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
            ..Registers::default()
        };
    }
    if let Some(s) = crash.sregs {
        registers.cs = s.cs.selector as u64;
        registers.ss = s.ss.selector as u64;
        registers.ds = s.ds.selector as u64;
        registers.es = s.es.selector as u64;
        registers.fs = s.fs.selector as u64;
        registers.gs = s.gs.selector as u64;
        registers.fs_base = s.fs.base;
        registers.gs_base = s.gs.base;
    }
    if let CrashCause::Exception(frame) | CrashCause::StackOverflow(frame) = &crash.cause {
        registers.rip = frame.rip;
        registers.cs = frame.cs;
        registers.rflags = frame.rflags;
        registers.rsp = frame.rsp;
        registers.ss = frame.ss;
    }
    registers
}
