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
                    .map_err(|e| e.to_string());
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
