//! The result format of `deja bench --json` (read back by `deja report`).

use deja_kvm::host_info::HostInfo;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The version of this format; readers refuse other major versions.
pub const FORMAT_VERSION: u32 = 1;

/// One `deja bench` run: where and from what it ran, and every measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchResults {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// deja's version.
    pub deja_version: String,
    /// `git rev-parse HEAD` of the working directory, when it is a git checkout.
    pub git_revision: Option<String>,
    /// When the run started, seconds since the Unix epoch.
    pub started_unix: u64,
    /// The host the numbers come from.
    pub machine: Machine,
    /// Every benchmark x column (engine and MMU strategy, native, qemu-tcg).
    pub measurements: Vec<Measurement>,
    /// Record/replay costs per guest (`deja bench --record-replay`; see [`crate::record`]).
    /// Absent from files written without it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub record_replay: Vec<crate::record::RecordReplayMeasurement>,
}

/// The host: KVM flavour and capabilities (as `deja info` reports them) and basics. The
/// fields after `host` were added later; older files read back with them empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// `uname -srm`-like kernel description.
    pub kernel: String,
    /// Logical CPUs available to the process.
    pub cpus: usize,
    /// What `deja info` detects.
    pub host: HostInfo,
    /// Physical memory (MemTotal), bytes.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// The 1, 5 and 15 minute load averages when the run started: numbers from a loaded
    /// machine are noisy, and readers should know.
    #[serde(default)]
    pub load_average: Option<[f64; 3]>,
    /// How deja was built (`release` or `debug`): a debug build's bt is several times slower.
    #[serde(default)]
    pub build_profile: Option<String>,
    /// `qemu-system-x86_64 --version`'s first line, when QEMU is installed (the qemu-tcg
    /// column's peer).
    #[serde(default)]
    pub qemu_version: Option<String>,
}

/// Whether a measurement ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum Status {
    /// It ran; the numbers are valid.
    Ok,
    /// It could not run here; the reason says why (no /dev/kvm, strategy not implemented).
    Skipped {
        /// Why.
        reason: String,
    },
    /// It ran and failed (guest exit status, engine error).
    Failed {
        /// What happened.
        error: String,
    },
}

/// Median, minimum and maximum over the repeats.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The median (the mean of the middle two for an even count).
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
}

impl Summary {
    /// The summary of `values` (`None` when empty or when a value is not a number).
    pub fn of(values: &[f64]) -> Option<Summary> {
        if values.is_empty() || values.iter().any(|v| v.is_nan()) {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        };
        Some(Summary {
            median,
            min: v[0],
            max: v[v.len() - 1],
        })
    }
}

/// A host perf counter per operation, or why it is unavailable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerfValue {
    /// The event (`task-clock-ns`, `page-faults`, `cycles`, ...).
    pub event: String,
    /// Median per operation over the repeats, when it could be counted.
    pub per_op: Option<f64>,
    /// `perf_event_open`'s error, when it could not.
    pub unavailable: Option<String>,
}

/// One benchmark in one column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// The benchmark's name (`in`, `call-ret`, ...).
    pub bench: String,
    /// `bt`, `kvm`, `native` or `qemu-tcg`.
    pub engine: String,
    /// The MMU strategy (`tlb`, `shadow`, `nested` for bt; `host` for kvm, native, qemu).
    pub mmu: String,
    /// Whether it ran.
    #[serde(flatten)]
    pub status: Status,
    /// Operations per repeat.
    pub iterations: u64,
    /// Repeats measured.
    pub repeats: u32,
    /// Host nanoseconds per operation.
    pub ns_per_op: Option<Summary>,
    /// Exits per operation by reason (`exit.*`, median over the repeats).
    pub exits_per_op: BTreeMap<String, f64>,
    /// Every other engine and machine counter that moved, per operation (translation cache
    /// `bt.*`, MMU `mmu.*`, device accesses `io.*`, KVM's own `kvm.stat.*`).
    pub counters_per_op: BTreeMap<String, f64>,
    /// Host perf-event counters per operation.
    pub perf: Vec<PerfValue>,
}

impl Measurement {
    /// A measurement that did not run, with the reason.
    pub fn skipped(bench: &str, engine: &str, mmu: &str, reason: impl Into<String>) -> Self {
        Self {
            bench: bench.into(),
            engine: engine.into(),
            mmu: mmu.into(),
            status: Status::Skipped {
                reason: reason.into(),
            },
            iterations: 0,
            repeats: 0,
            ns_per_op: None,
            exits_per_op: BTreeMap::new(),
            counters_per_op: BTreeMap::new(),
            perf: Vec::new(),
        }
    }

    /// The column's label: `engine` or `engine/mmu`.
    pub fn column(&self) -> String {
        if self.mmu == "host" {
            self.engine.clone()
        } else {
            format!("{}/{}", self.engine, self.mmu)
        }
    }
}

impl BenchResults {
    /// Reads results from JSON, naming what is wrong.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Writes results as pretty JSON.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_takes_median_min_and_max() {
        type Case<'a> = (&'a [f64], Option<(f64, f64, f64)>);
        let cases: &[Case] = &[
            (&[], None),
            (&[3.0], Some((3.0, 3.0, 3.0))),
            (&[5.0, 1.0, 3.0], Some((3.0, 1.0, 5.0))),
            (&[4.0, 1.0, 2.0, 10.0], Some((3.0, 1.0, 10.0))),
            (&[1.0, f64::NAN], None),
        ];
        for (values, want) in cases {
            let got = Summary::of(values).map(|s| (s.median, s.min, s.max));
            assert_eq!(got, *want, "{values:?}");
        }
    }
}
