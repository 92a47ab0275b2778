//! Host perf-event counters around the measured loop: the software counters every Linux
//! host has, and the hardware ones where the host exposes them (often not inside a VM).

use perf_event::events::{Cache, CacheOp, CacheResult, Event, Hardware, Software, WhichCache};
use perf_event::{Builder, Counter};

/// The events the harness tries, with the names results use.
pub fn events() -> Vec<(&'static str, Event)> {
    vec![
        ("task-clock-ns", Software::TASK_CLOCK.into()),
        ("page-faults", Software::PAGE_FAULTS.into()),
        ("context-switches", Software::CONTEXT_SWITCHES.into()),
        ("cycles", Hardware::CPU_CYCLES.into()),
        ("instructions", Hardware::INSTRUCTIONS.into()),
        (
            "dtlb-load-misses",
            Cache {
                which: WhichCache::DTLB,
                operation: CacheOp::READ,
                result: CacheResult::MISS,
            }
            .into(),
        ),
    ]
}

/// Whether `event` (a name from [`events`]) is a kernel software counter, which every
/// Linux host has.
fn is_software(event: &str) -> bool {
    matches!(event, "task-clock-ns" | "page-faults" | "context-switches")
}

/// Why `perf_event_open` refused `event`, in words a reader can act on, followed by the
/// OS error.
pub fn explain(event: &str, error: &std::io::Error) -> String {
    let has_pmu = std::fs::read_dir("/sys/bus/event_source/devices").is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("cpu"))
    });
    let why = match error.raw_os_error() {
        Some(libc::ENOENT | libc::EOPNOTSUPP | libc::ENODEV) if !is_software(event) && !has_pmu => {
            "the kernel has no hardware PMU (no cpu* under /sys/bus/event_source/devices; \
             usual inside a VM whose hypervisor exposes no virtual PMU)"
                .to_string()
        }
        Some(libc::ENOENT | libc::EOPNOTSUPP | libc::ENODEV) => {
            "this host's PMU does not count this event".to_string()
        }
        Some(libc::EACCES | libc::EPERM) => format!(
            "not permitted: kernel.perf_event_paranoid is {} and the process lacks \
             CAP_PERFMON",
            std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
                .map_or("unknown".into(), |s| s.trim().to_string())
        ),
        _ => "perf_event_open failed".to_string(),
    };
    format!("{why}: {error}")
}

/// The counters of one measurement: each event either counting or unavailable with the
/// reason `perf_event_open` gave.
pub struct PerfSet {
    counters: Vec<(&'static str, Result<Counter, String>)>,
}

impl PerfSet {
    /// Opens (and enables) every event on the calling thread.
    pub fn open() -> Self {
        let counters = events()
            .into_iter()
            .map(|(name, event)| {
                let counter = Builder::new()
                    .kind(event)
                    .build()
                    .and_then(|mut c| c.enable().map(|()| c))
                    .map_err(|e| explain(name, &e));
                (name, counter)
            })
            .collect();
        Self { counters }
    }

    /// Current values (`Err(reason)` for unavailable events), in [`events`] order.
    pub fn read(&mut self) -> Vec<(&'static str, Result<u64, String>)> {
        self.counters
            .iter_mut()
            .map(|(name, c)| {
                let v = match c {
                    Ok(c) => c.read().map_err(|e| format!("reading: {e}")),
                    Err(e) => Err(e.clone()),
                };
                (*name, v)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_explained_and_keep_the_os_error() {
        let cases: &[(&str, i32, &str)] = &[
            ("cycles", libc::EACCES, "perf_event_paranoid"),
            ("task-clock-ns", libc::EPERM, "CAP_PERFMON"),
            ("task-clock-ns", libc::ENOENT, "does not count this event"),
            ("cycles", libc::EINVAL, "perf_event_open failed"),
        ];
        for &(event, errno, want) in cases {
            let error = std::io::Error::from_raw_os_error(errno);
            let text = explain(event, &error);
            assert!(text.contains(want), "{event} {errno}: {text}");
            assert!(text.ends_with(&error.to_string()), "{text}");
        }
        // A hardware event the host cannot count: either no PMU at all or not this event.
        let text = explain("cycles", &std::io::Error::from_raw_os_error(libc::ENOENT));
        assert!(
            text.contains("no hardware PMU") || text.contains("does not count"),
            "{text}"
        );
    }
}
