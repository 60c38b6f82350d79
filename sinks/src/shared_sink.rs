//! A sink the dump worker owns while the host keeps a handle to it.
//!
//! `DumpWorkerBuilder::sink` takes sinks by value, but a host often still
//! needs the sink afterwards: the socket sink's `wait_idle` and counters, or
//! a custom sink's state. [`SharedSink`] puts the sink behind a mutex that
//! the worker and the host share; the worker holds the lock for one call at
//! a time.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::sink::{DumpMetadata, DumpSink, SinkError, SinkReceipt};

/// A [`DumpSink`] shared between the dump worker and the host.
pub struct SharedSink<S> {
    inner: Arc<Mutex<S>>,
    name: String,
}

impl<S: DumpSink> SharedSink<S> {
    /// Wraps `sink`; its [`DumpSink::name`] is kept for receipts.
    pub fn new(sink: S) -> SharedSink<S> {
        let name = sink.name().to_owned();
        SharedSink {
            inner: Arc::new(Mutex::new(sink)),
            name,
        }
    }

    /// Locks the sink for the host's use (blocks while the worker writes to it).
    pub fn lock(&self) -> MutexGuard<'_, S> {
        // A panic inside a sink call leaves the sink as it was; keep using it.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<S> Clone for SharedSink<S> {
    fn clone(&self) -> Self {
        SharedSink {
            inner: Arc::clone(&self.inner),
            name: self.name.clone(),
        }
    }
}

impl<S: DumpSink> DumpSink for SharedSink<S> {
    fn begin(&mut self, metadata: &DumpMetadata) -> Result<(), SinkError> {
        self.lock().begin(metadata)
    }

    fn data(&mut self, bytes: &[u8]) -> Result<(), SinkError> {
        self.lock().data(bytes)
    }

    fn hole(&mut self, length: u64) -> Result<(), SinkError> {
        self.lock().hole(length)
    }

    fn finish(&mut self) -> Result<SinkReceipt, SinkError> {
        self.lock().finish()
    }

    fn abort(&mut self) {
        self.lock().abort()
    }

    fn name(&self) -> &str {
        &self.name
    }
}
