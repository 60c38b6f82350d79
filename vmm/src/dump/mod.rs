//! The dump pipeline after the vCPU thread: a bounded queue, one worker
//! thread per [`DumpWorker`], and the sinks it writes each core to.
//!
//! The vCPU thread only pushes a [`DumpRequest`]: registers plus a shared
//! handle to the crashed memory mapping, which is neither moved nor copied.
//! It uses `try_send`, so when the queue is full the dump is dropped, counted
//! and logged. Either way the guest call returns at once.

mod worker;

pub use worker::{flush_all, DumpReceipt, DumpStats, DumpWorker, DumpWorkerBuilder, SinkResult};
pub(crate) use worker::{DumpQueue, DumpRequest};

/// Default queue capacity in crash snapshots; further ones are dropped.
pub const DEFAULT_QUEUE_CAPACITY: usize = 16;
