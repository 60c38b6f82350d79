//! The call path: typed arguments and results on the host side, their
//! encoding into the shared buffers, and host functions the guest calls.

pub mod dispatch;
pub mod host_functions;
pub mod polling;
pub mod slots;
pub mod values;
