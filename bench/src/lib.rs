//! The bench harness: nanobenchmarks (one guest operation in a loop) across engines and
//! MMU strategies, with engine, MMU and host perf counters per operation.
//!
//! A benchmark guest (see [`deja_guests::bench`]) marks the start and the end of its loop by
//! writing port [`BENCH_MARKER_PORT`](deja_guests::bench::BENCH_MARKER_PORT); the harness
//! puts a [`marker::BenchMarker`] device there, which stops the run at each mark, so host
//! time, engine counters and perf counters are read exactly around the loop. Per-operation
//! values are the deltas between the marks divided by the iteration count.

pub mod marker;
pub mod native;
pub mod perf;
pub mod qemu;
pub mod record;
pub mod results;
pub mod runner;

pub use results::{BenchResults, Machine, Measurement, Status, Summary};
pub use runner::{BenchConfig, BenchError, Column, Job, git_revision, machine, plan, run_job};
