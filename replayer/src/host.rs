//! The replaying [`Host`]: answers from the trace, in order, and checks that each question
//! comes at the recorded position and is of the recorded kind.

use deja_machine::{CpuState, Host, Kicker};
use deja_snapshot::NO_POLL_QUANTUM;
use deja_snapshot::state::trace_position;
use deja_traces::{CheckpointIndexEntry, Event, EventKind, EventTag, Position, TraceReader};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};

/// Events decoded ahead of the replay by the reader thread.
const READ_AHEAD: usize = 8192;
/// Traces with at most this many events are decoded whole before the run instead of by a
/// reader thread: a short replay then neither waits for a thread to open the file and
/// decode its first frame, nor pays a channel hand-off per event (at most a few MiB).
pub const PRELOAD_MAX_EVENTS: u64 = 1 << 16;

/// The first mismatch a replay met.
#[derive(Debug, Clone)]
pub struct Mismatch {
    /// Where the replay was.
    pub at: Position,
    /// The expected event's index.
    pub event_index: u64,
    /// The expected event's position, if there was one.
    pub expected_at: Option<Position>,
    /// What the trace holds.
    pub expected: String,
    /// What happened instead.
    pub actual: String,
    /// The replay's CPU state there, if the observer read it.
    pub state: Option<CpuState>,
    /// Register differences `name: recorded -> replayed`, when the trace logged the
    /// registers there.
    pub register_diff: Vec<String>,
    /// A note on what was compared and matched, for the report.
    pub note: Option<String>,
}

enum Item {
    Event(Event),
    Error(String),
}

/// Where the events come from.
enum Source {
    /// A reader thread, a bounded channel ahead of the replay.
    Thread(Receiver<Item>),
    /// Decoded before the run.
    Preloaded(std::vec::IntoIter<Item>),
    /// Decoded once and shared (a replay session restarts from many points): the events and
    /// the index of the next one.
    Shared(Arc<Vec<Event>>, usize),
}

impl Source {
    /// The next item; `None` once the trace holds no more.
    fn next(&mut self) -> Option<Item> {
        match self {
            Source::Thread(rx) => rx.recv().ok(),
            Source::Preloaded(items) => items.next(),
            Source::Shared(events, next) => {
                let e = events.get(*next)?.clone();
                *next += 1;
                Some(Item::Event(e))
            }
        }
    }
}

/// The trace's events as the replay consumes them, and what went wrong.
pub struct Player {
    source: Source,
    peeked: Option<Event>,
    ended: Option<String>,
    consumed: u64,
    last: Position,
    compare_icount: bool,
    exit_sync: bool,
    mismatch: Option<Mismatch>,
    kicker: Option<Kicker>,
    last_time: u64,
    polls_log_due_times_only: bool,
}

impl Player {
    /// Reads the events of the trace at `path` on a background thread (from just after
    /// `checkpoint`, when given).
    pub fn new(path: PathBuf, checkpoint: Option<CheckpointIndexEntry>, exit_sync: bool) -> Self {
        let (tx, rx) = sync_channel(READ_AHEAD);
        let _ = std::thread::Builder::new()
            .name("deja-replay-events".into())
            .spawn(move || {
                let mut reader = match TraceReader::open(&path) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Item::Error(e.to_string()));
                        return;
                    }
                };
                let events = match &checkpoint {
                    Some(cp) => match reader.events_after(cp) {
                        Ok(ev) => ev,
                        Err(e) => {
                            let _ = tx.send(Item::Error(e.to_string()));
                            return;
                        }
                    },
                    None => reader.events(),
                };
                for e in events {
                    let item = match e {
                        Ok(e) => Item::Event(e),
                        Err(e) => Item::Error(e.to_string()),
                    };
                    if tx.send(item).is_err() {
                        return;
                    }
                }
            });
        Self::with_source(Source::Thread(rx), checkpoint, exit_sync)
    }

    /// Decodes the events of `reader` (from just after `checkpoint`, when given) now, on
    /// this thread: for short traces (see [`PRELOAD_MAX_EVENTS`]), where starting a reader
    /// thread and handing each event over costs more than the replay itself.
    pub fn preloaded<R: std::io::Read + std::io::Seek>(
        reader: &mut TraceReader<R>,
        checkpoint: Option<CheckpointIndexEntry>,
        exit_sync: bool,
    ) -> Self {
        let to_item = |e: Result<Event, deja_traces::ReadError>| match e {
            Ok(e) => Item::Event(e),
            Err(e) => Item::Error(e.to_string()),
        };
        let items: Vec<Item> = match &checkpoint {
            Some(cp) => match reader.events_after(cp) {
                Ok(events) => events.map(to_item).collect(),
                Err(e) => vec![Item::Error(e.to_string())],
            },
            None => reader.events().map(to_item).collect(),
        };
        Self::with_source(Source::Preloaded(items.into_iter()), checkpoint, exit_sync)
    }

    /// Plays `events` (all of a trace's) from index `first`, where the replay stands at
    /// `at`, without copying them.
    pub fn from_shared(
        events: Arc<Vec<Event>>,
        first: usize,
        at: Position,
        exit_sync: bool,
    ) -> Self {
        let mut p = Self::with_source(Source::Shared(events, first), None, exit_sync);
        p.consumed = first as u64;
        p.last = at;
        p
    }

    fn with_source(
        source: Source,
        checkpoint: Option<CheckpointIndexEntry>,
        exit_sync: bool,
    ) -> Self {
        Self {
            source,
            peeked: None,
            ended: None,
            consumed: checkpoint.map_or(0, |c| c.event_index),
            last: checkpoint.map_or(Position::default(), |c| c.position),
            compare_icount: false,
            exit_sync,
            mismatch: None,
            kicker: None,
            last_time: 0,
            polls_log_due_times_only: true,
        }
    }

    /// Whether the trace logs a device poll's time read only when the earliest deadline had
    /// passed (format [`deja_traces::DUE_POLLS_FORMAT`] on). Older traces logged every
    /// poll's read, and each one is handed back as it was, due or not, so the devices catch
    /// up exactly as they did when recorded.
    pub fn set_polls_log_due_times_only(&mut self, on: bool) {
        self.polls_log_due_times_only = on;
    }

    /// Whether positions must match in instruction count too (both sides count them).
    pub fn set_compare_icount(&mut self, on: bool) {
        self.compare_icount = on;
    }

    /// The kicker that stops the CPU at the first mismatch.
    pub fn set_kicker(&mut self, kicker: Kicker) {
        self.kicker = Some(kicker);
    }

    /// The next event, without consuming it (`None` at the end of the trace).
    pub fn peek(&mut self) -> Option<&Event> {
        if self.peeked.is_none() && self.ended.is_none() {
            match self.source.next() {
                Some(Item::Event(e)) => self.peeked = Some(e),
                Some(Item::Error(e)) => self.ended = Some(e),
                None => self.ended = Some(String::new()),
            }
        }
        self.peeked.as_ref()
    }

    /// Consumes the peeked event.
    pub fn consume(&mut self) {
        if let Some(e) = self.peeked.take() {
            self.last = e.at;
            self.consumed += 1;
        }
    }

    /// Events consumed so far (the index of the next one).
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Position of the last event consumed.
    pub fn last_position(&self) -> Position {
        self.last
    }

    /// Whether a recorded position is the replay's position.
    pub fn same_position(&self, recorded: Position, actual: Position) -> bool {
        recorded.exits == actual.exits && (!self.compare_icount || recorded.icount == actual.icount)
    }

    /// Whether the replay has gone past a recorded position.
    pub fn passed(&self, recorded: Position, actual: Position) -> bool {
        recorded.exits < actual.exits || (self.compare_icount && recorded.icount < actual.icount)
    }

    /// Takes a recorded time answer. Guest time never runs backwards on a live host (both
    /// clocks are monotonic), so a trace whose time does is damaged or crafted: devices
    /// would compute negative intervals from it. It is refused as a divergence and the
    /// previous time stands.
    fn accept_time(&mut self, at: Position, ns: u64) -> u64 {
        if ns < self.last_time {
            self.diverge(
                at,
                format!("a time read at or after {} ns", self.last_time),
                format!("the trace's time read of {ns} ns, earlier than the one before"),
            );
            return self.last_time;
        }
        self.last_time = ns;
        ns
    }

    /// Records the first mismatch and stops the CPU.
    pub fn diverge(&mut self, at: Position, expected: String, actual: String) {
        if self.mismatch.is_some() {
            return;
        }
        self.mismatch = Some(Mismatch {
            at,
            event_index: self.consumed,
            expected_at: self.peeked.as_ref().map(|e| e.at),
            expected,
            actual,
            state: None,
            register_diff: Vec::new(),
            note: None,
        });
        if let Some(k) = &self.kicker {
            k.kick();
        }
    }

    /// Attaches a register diff to the mismatch.
    pub fn set_register_diff(&mut self, diff: Vec<String>) {
        if let Some(m) = &mut self.mismatch {
            m.register_diff = diff;
        }
    }

    /// Attaches a note to the mismatch.
    pub fn set_note(&mut self, note: String) {
        if let Some(m) = &mut self.mismatch {
            m.note = Some(note);
        }
    }

    /// Attaches the replay's CPU state to the mismatch.
    pub fn set_state(&mut self, state: CpuState) {
        if let Some(m) = &mut self.mismatch {
            m.state = Some(state);
        }
    }

    /// Takes the mismatch, if any.
    pub fn take_mismatch(&mut self) -> Option<Mismatch> {
        self.mismatch.take()
    }

    /// Why the trace ended before the run did (truncated or damaged), if it did. A trace
    /// that simply holds no more events after its End event is not "ended early".
    pub fn trace_end(&self) -> Option<String> {
        match &self.ended {
            Some(e) if e.is_empty() => Some("the trace ends after its last whole frame".into()),
            Some(e) => Some(e.clone()),
            None => None,
        }
    }

    /// Whether the replay must stop (mismatch or end of trace).
    pub fn stopped(&self) -> bool {
        self.mismatch.is_some() || self.ended.is_some()
    }

    fn stop_at_end(&mut self) {
        if let Some(k) = &self.kicker {
            k.kick();
        }
    }

    /// The recorded answer to a question of kind `ordinal` asked at `at`, or `None` after a
    /// mismatch (which is recorded) or at the end of the trace.
    fn answer(
        &mut self,
        at: Position,
        tag: EventTag,
        asked: &str,
        check_position: bool,
    ) -> Option<EventKind> {
        if self.mismatch.is_some() {
            return None;
        }
        loop {
            let Some(e) = self.peek().cloned() else {
                self.stop_at_end();
                return None;
            };
            if let EventKind::Chaos { .. } = e.kind {
                self.consume();
                continue;
            }
            if e.kind.tag() == tag && (!check_position || self.same_position(e.at, at)) {
                self.consume();
                return Some(e.kind);
            }
            self.diverge(
                at,
                format!("{} at {}", e.kind, e.at),
                format!("{asked} at {at}"),
            );
            return None;
        }
    }
}

/// Locks the player, recovering from poisoning.
pub fn lock(p: &Mutex<Player>) -> MutexGuard<'_, Player> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// The replaying host: never touches the real world.
pub struct ReplayingHost {
    player: Arc<Mutex<Player>>,
}

impl ReplayingHost {
    /// A host answering from `player`.
    pub fn new(player: Arc<Mutex<Player>>) -> Self {
        Self { player }
    }
}

impl Host for ReplayingHost {
    fn time_ns(&mut self, at: deja_machine::Position) -> u64 {
        let mut p = lock(&self.player);
        match p.answer(trace_position(at), EventTag::TimeRead, "a time read", true) {
            Some(EventKind::TimeRead { ns }) => p.accept_time(trace_position(at), ns),
            _ => p.last_time,
        }
    }

    fn boot_wallclock(&mut self) -> i64 {
        let mut p = lock(&self.player);
        let at = p.last;
        match p.answer(at, EventTag::BootWallclock, "the boot wallclock", false) {
            Some(EventKind::BootWallclock { secs }) => secs,
            _ => 0,
        }
    }

    fn time_if_due(&mut self, at: deja_machine::Position, deadline_ns: u64) -> Option<u64> {
        // Polls that found the deadline not due are not logged (see the recorder's
        // pending_not_due): a poll gets the next event if it is a time read logged right
        // here, else "not due". A logged read before the deadline is such a poll, logged
        // because another time read followed at the same position.
        let mut p = lock(&self.player);
        if p.mismatch.is_some() {
            return None;
        }
        let at = trace_position(at);
        loop {
            match p.peek().cloned() {
                Some(Event {
                    kind: EventKind::Chaos { .. },
                    ..
                }) => p.consume(),
                Some(Event {
                    at: logged,
                    kind: EventKind::TimeRead { ns },
                }) if p.same_position(logged, at) => {
                    p.consume();
                    let ns = p.accept_time(at, ns);
                    if p.mismatch.is_some() {
                        return None;
                    }
                    let due = ns >= deadline_ns || !p.polls_log_due_times_only;
                    return due.then_some(ns);
                }
                _ => return None,
            }
        }
    }

    fn serial_input(&mut self, at: deja_machine::Position) -> Option<u8> {
        // Polls that found nothing are not logged (see the recorder's pending_empty_polls):
        // a poll gets the next event if it is a serial input logged right here, else nothing.
        let mut p = lock(&self.player);
        if p.mismatch.is_some() {
            return None;
        }
        let at = trace_position(at);
        loop {
            match p.peek().cloned() {
                Some(Event {
                    kind: EventKind::Chaos { .. },
                    ..
                }) => p.consume(),
                Some(Event {
                    at: logged,
                    kind: EventKind::SerialInput { byte },
                }) if p.same_position(logged, at) => {
                    p.consume();
                    return byte;
                }
                _ => return None,
            }
        }
    }

    fn entropy(&mut self, at: deja_machine::Position) -> u64 {
        let mut p = lock(&self.player);
        match p.answer(
            trace_position(at),
            EventTag::Entropy,
            "an entropy read",
            true,
        ) {
            Some(EventKind::Entropy { value }) => value,
            _ => 0,
        }
    }

    fn poll_quantum(&mut self, at: deja_machine::Position) -> u64 {
        let mut p = lock(&self.player);
        if p.exit_sync {
            return NO_POLL_QUANTUM;
        }
        match p.answer(
            trace_position(at),
            EventTag::PollQuantum,
            "a poll quantum",
            true,
        ) {
            Some(EventKind::PollQuantum { instructions }) => instructions.max(1),
            _ => NO_POLL_QUANTUM,
        }
    }

    fn idle(&mut self, at: deja_machine::Position, deadline_ns: Option<u64>) {
        let mut p = lock(&self.player);
        let at = trace_position(at);
        if let Some(EventKind::Idle {
            deadline_ns: recorded,
            ..
        }) = p.answer(at, EventTag::Idle, "an idle period", true)
            && recorded != deadline_ns
        {
            let fmt = |d: Option<u64>| d.map_or("input".to_string(), |d| format!("{d} ns"));
            p.diverge(
                at,
                format!("idle until {}", fmt(recorded)),
                format!("idle until {}", fmt(deadline_ns)),
            );
        }
    }

    fn interrupt_delivered(&mut self, at: deja_machine::Position, vector: u8) {
        let mut p = lock(&self.player);
        let at = trace_position(at);
        if let Some(EventKind::Interrupt { vector: recorded }) = p.answer(
            at,
            EventTag::Interrupt,
            &format!("interrupt vector {vector:#04x}"),
            true,
        ) && recorded != vector
        {
            p.diverge(
                at,
                format!("interrupt vector {recorded:#04x}"),
                format!("interrupt vector {vector:#04x}"),
            );
        }
    }
}
