//! The dump pipeline after the vCPU thread: a bounded queue, one worker
//! thread per [`DumpWorker`], and the sinks it writes each core to.
//!
//! The vCPU thread only pushes a [`DumpRequest`] (registers plus the crashed
//! memory mapping, moved, not copied) with `try_send`; when the queue is full
//! the dump is dropped, counted and logged, and the guest call returns at
//! once either way. The worker serializes the ELF core once and streams it to
//! every sink through a fan-out, so one failing sink does not stop the others.

mod worker;

pub use worker::{flush_all, DumpReceipt, DumpStats, DumpWorker, DumpWorkerBuilder, SinkResult};
pub(crate) use worker::{DumpQueue, DumpRequest};

/// Default number of crash snapshots the queue holds before dropping new ones.
pub const DEFAULT_QUEUE_CAPACITY: usize = 16;
