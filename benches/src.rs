//! Shared code of the Sandcore benchmarks: the raw KVM floors in [`floor`]
//! and the helpers in [`support`]. The criterion targets live under
//! `benches/benches/`; BENCHMARKS.md at the repository root records a run.

pub mod floor;
pub mod support;
