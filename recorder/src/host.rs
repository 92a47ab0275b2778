//! The recording [`Host`]: answers from a live host and logs every answer, with its position,
//! straight into the trace writer.

use crate::state::trace_position;
use deja_machine::{Host, Kicker, Position};
use deja_traces::{Event, EventKind, TraceWriter};
use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};

use deja_snapshot::NO_POLL_QUANTUM;

/// A sink for trace bytes (a file, or anything a test wants).
pub type TraceSink = Box<dyn Write + Send>;

/// The trace writer and the recording's bookkeeping, shared by the recording host (which
/// logs answers) and the recorder (which adds digests and checkpoints between exits).
pub struct Shared {
    /// The writer; `None` before the header is written and once finished.
    pub writer: Option<TraceWriter<TraceSink>>,
    /// Events asked for while there was no writer (they are lost: an error if any).
    pub unwritten: u64,
    /// The first write error: the recording stops at the next exit and says so.
    pub error: Option<deja_traces::WriteError>,
    /// Events logged since the last state digest.
    pub since_digest: u64,
    /// Position of the last event logged.
    pub last: deja_traces::Position,
    /// Stops the CPU when writing fails.
    pub kicker: Option<Kicker>,
    /// Serial input polls answered "nothing" not logged yet: where, and how many. A
    /// replay answers "nothing" to every poll whose position the next logged event does
    /// not match, so these are logged only when a byte arrives at that same position with
    /// no other event in between (where the replay could not tell them apart).
    pub pending_empty_polls: Option<(deja_traces::Position, u64)>,
    /// Device polls that found the earliest deadline not yet due, not logged yet: where,
    /// and the times they read. A replay answers "not due" to every poll whose position the
    /// next logged time read does not match, so these are logged (as time reads before the
    /// deadline) only when another time read follows at that same position with no other
    /// event in between.
    pub pending_not_due: Option<(deja_traces::Position, Vec<u64>)>,
    /// Whether a replay tells positions apart by exit ordinal only (exit-synchronous
    /// recordings, which replay on engines that do not count instructions): then the
    /// pending polls above are "at the same position" as anything at their exit ordinal.
    pub exits_only: bool,
}

impl Shared {
    /// Whether a replay would take `a` and `b` for the same position.
    pub fn same_position(&self, a: deja_traces::Position, b: deja_traces::Position) -> bool {
        same_position(self.exits_only, a, b)
    }

    /// Logs one event (after a write error: drops it; the error is already kept).
    pub fn log(&mut self, at: deja_traces::Position, kind: EventKind) {
        let exits_only = self.exits_only;
        if self.error.is_some() {
            return;
        }
        let Some(w) = self.writer.as_mut() else {
            self.unwritten += 1;
            return;
        };
        // Events whose position the host cannot know (boot wallclock) take the last one.
        let at = if self.last.at_or_before(&at) {
            at
        } else {
            self.last
        };
        if let Some((pos, reads)) = self.pending_not_due.take()
            && same_position(exits_only, pos, at)
            && matches!(kind, EventKind::TimeRead { .. })
        {
            for ns in reads {
                if let Err(e) = w.push(&Event::new(at, EventKind::TimeRead { ns })) {
                    self.error = Some(e);
                    if let Some(k) = &self.kicker {
                        k.kick();
                    }
                    return;
                }
                self.since_digest += 1;
            }
        }
        if let Some((pos, n)) = self.pending_empty_polls.take()
            && same_position(exits_only, pos, at)
            && matches!(kind, EventKind::SerialInput { byte: Some(_) })
        {
            for _ in 0..n {
                if let Err(e) = w.push(&Event::new(at, EventKind::SerialInput { byte: None })) {
                    self.error = Some(e);
                    if let Some(k) = &self.kicker {
                        k.kick();
                    }
                    return;
                }
                self.since_digest += 1;
            }
        }
        match w.push(&Event::new(at, kind)) {
            Ok(()) => {
                self.last = at;
                self.since_digest += 1;
            }
            Err(e) => {
                self.error = Some(e);
                if let Some(k) = &self.kicker {
                    k.kick();
                }
            }
        }
    }
}

/// Whether a replay would take `a` and `b` for the same position: by exit ordinal, and
/// by instruction count unless `exits_only`.
fn same_position(exits_only: bool, a: deja_traces::Position, b: deja_traces::Position) -> bool {
    a.exits == b.exits && (exits_only || a.icount == b.icount)
}

/// Locks the shared state, recovering it if a panicking thread poisoned the lock (the data
/// is a writer and counters, still consistent).
pub fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// A small deterministic generator (splitmix64) for chaos perturbations: the seed is in the
/// trace header, every value it produces is in the trace.
#[derive(Debug, Clone)]
pub struct Chaos {
    state: u64,
    /// Poll quanta are drawn from `1..=max_quantum`.
    pub max_quantum: u64,
}

impl Chaos {
    /// A generator from `seed`, drawing poll quanta up to `max_quantum` instructions.
    pub fn new(seed: u64, max_quantum: u64) -> Self {
        Self {
            state: seed,
            max_quantum: max_quantum.max(1),
        }
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// The next poll quantum. Mostly short, sometimes long, so interrupts land at widely
    /// different instruction boundaries from one attempt to the next.
    pub fn quantum(&mut self) -> u64 {
        let r = self.next();
        let span = if r & 3 == 0 {
            self.max_quantum
        } else {
            (self.max_quantum / 16).max(1)
        };
        1 + (r >> 8) % span
    }
}

/// The recording host: every answer of the live host it wraps is logged with its position.
pub struct RecordingHost {
    live: Box<dyn Host>,
    shared: Arc<Mutex<Shared>>,
    exit_synchronous: bool,
    chaos: Option<Chaos>,
}

impl RecordingHost {
    /// Wraps `live`. Under exit-synchronous delivery the poll quantum is not asked of the
    /// live host (devices are polled at exits only); with `chaos` it is drawn at random.
    pub fn new(
        live: Box<dyn Host>,
        shared: Arc<Mutex<Shared>>,
        exit_synchronous: bool,
        chaos: Option<Chaos>,
    ) -> Self {
        Self {
            live,
            shared,
            exit_synchronous,
            chaos,
        }
    }

    fn log(&self, at: Position, kind: EventKind) {
        lock(&self.shared).log(trace_position(at), kind);
    }
}

impl Host for RecordingHost {
    fn time_ns(&mut self, at: Position) -> u64 {
        let ns = self.live.time_ns(at);
        self.log(at, EventKind::TimeRead { ns });
        ns
    }

    fn boot_wallclock(&mut self) -> i64 {
        let secs = self.live.boot_wallclock();
        let at = lock(&self.shared).last;
        lock(&self.shared).log(at, EventKind::BootWallclock { secs });
        secs
    }

    fn serial_input(&mut self, at: Position) -> Option<u8> {
        let byte = self.live.serial_input(at);
        if byte.is_some() {
            self.log(at, EventKind::SerialInput { byte });
        } else {
            // Most polls find nothing (an idle guest polls its UART at every device poll):
            // those are implied by the absence of a byte in the trace.
            let at = trace_position(at);
            let mut s = lock(&self.shared);
            s.pending_empty_polls = match s.pending_empty_polls {
                Some((pos, n)) if s.same_position(pos, at) => Some((pos, n + 1)),
                _ => Some((at, 1)),
            };
        }
        byte
    }

    fn entropy(&mut self, at: Position) -> u64 {
        let value = self.live.entropy(at);
        self.log(at, EventKind::Entropy { value });
        value
    }

    fn poll_quantum(&mut self, at: Position) -> u64 {
        if self.exit_synchronous {
            return NO_POLL_QUANTUM;
        }
        let instructions = match &mut self.chaos {
            Some(c) => {
                let q = c.quantum();
                self.log(
                    at,
                    EventKind::Chaos {
                        perturbation: "poll-quantum".into(),
                        value: q,
                    },
                );
                q
            }
            None => self.live.poll_quantum(at),
        };
        self.log(at, EventKind::PollQuantum { instructions });
        instructions
    }

    fn idle(&mut self, at: Position, deadline_ns: Option<u64>) {
        self.live.idle(at, deadline_ns);
        let resumed_ns = self.live.time_ns(at);
        self.log(
            at,
            EventKind::Idle {
                deadline_ns,
                resumed_ns,
            },
        );
    }

    fn interrupt_delivered(&mut self, at: Position, vector: u8) {
        self.log(at, EventKind::Interrupt { vector });
    }

    fn time_if_due(&mut self, at: Position, deadline_ns: u64) -> Option<u64> {
        let ns = self.live.time_ns(at);
        if ns >= deadline_ns {
            self.log(at, EventKind::TimeRead { ns });
            return Some(ns);
        }
        // Not due: implied by the absence of a time read here in the trace.
        let at = trace_position(at);
        let mut s = lock(&self.shared);
        let same = s
            .pending_not_due
            .as_ref()
            .is_some_and(|(pos, _)| s.same_position(*pos, at));
        match &mut s.pending_not_due {
            Some((_, reads)) if same => reads.push(ns),
            pending => *pending = Some((at, vec![ns])),
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chaos_quanta_are_reproducible_from_the_seed_and_stay_in_range() {
        let mut a = Chaos::new(7, 1000);
        let mut b = Chaos::new(7, 1000);
        let xs: Vec<u64> = (0..200).map(|_| a.quantum()).collect();
        let ys: Vec<u64> = (0..200).map(|_| b.quantum()).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|&q| (1..=1000).contains(&q)));
        let distinct: std::collections::BTreeSet<_> = xs.iter().collect();
        assert!(distinct.len() > 50, "{} distinct quanta", distinct.len());
        let mut c = Chaos::new(8, 1000);
        assert_ne!(xs, (0..200).map(|_| c.quantum()).collect::<Vec<_>>());
    }
}
