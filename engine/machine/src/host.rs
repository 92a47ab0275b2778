//! The nondeterminism boundary: everything the guest can observe that does not follow from
//! the image and the configuration passes through [`Host`].
//!
//! Devices and engines never read the host clock, stdin or randomness themselves. The live
//! host answers from the real world; a recording host (recorder crate) answers the same way
//! and logs each answer with its [`Position`]; a replaying host answers from the log.

use serde::{Deserialize, Serialize};
use std::io::Read;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

/// Where in the guest's execution something happened.
///
/// `icount` is exact on bt (retired guest instructions) and stays 0 on kvm, which cannot count
/// on hosts without a PMU. `exits` is the device-exit ordinal: guest-initiated device accesses
/// (port I/O, MMIO to a device, machine MSRs, HLT) so far, which is the same on both engines.
///
/// Every element of a string instruction is one access, so `REP INSB` with CX = 3000 makes
/// 3000 exits on both engines, though KVM hands them over in batches and bt one by one.
/// Where the run loop polls devices and delivers interrupts is decided by the exit-group rule
/// ([`crate::exit_group`]): a device exit after which the next instruction is a REP string
/// instruction with a non-zero count leaves its group open, and the engine runs on without
/// polls, deliveries, observer calls or kicks until the group's last exit (for a string I/O
/// instruction, its last element's). So the exits where the run loop acts, and the
/// positions of everything logged there, are the same on both engines.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Position {
    /// Retired guest instructions (bt only).
    pub icount: u64,
    /// Device exits so far (both engines).
    pub exits: u64,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "icount {} exit #{}", self.icount, self.exits)
    }
}

/// The one interface through which the host's nondeterminism reaches a guest.
pub trait Host: Send {
    /// Guest-visible monotonic time in nanoseconds since the machine was created.
    fn time_ns(&mut self, at: Position) -> u64;
    /// Wall-clock time when the machine was created, in seconds since the Unix epoch.
    /// Asked once, by the CMOS RTC.
    fn boot_wallclock(&mut self) -> i64;
    /// One byte of external input for the serial port, if one has arrived.
    fn serial_input(&mut self, at: Position) -> Option<u8>;
    /// 64 bits of entropy (RDRAND/RDSEED, entropy devices).
    fn entropy(&mut self, at: Position) -> u64;
    /// Instructions the engine may run before it next polls devices for due events
    /// (timer expiries, input). Engines that cannot count instructions poll at every exit.
    fn poll_quantum(&mut self, at: Position) -> u64;
    /// The guest is idle (halted) until `deadline_ns` of guest time, or until external
    /// input arrives when `deadline_ns` is `None`. Live hosts wait; virtual clocks jump.
    fn idle(&mut self, at: Position, deadline_ns: Option<u64>);
    /// The CPU took external interrupt `vector` here (the machine calls it at interrupt
    /// acknowledge). Not a question: live hosts ignore it; recording hosts log it so a
    /// replay can check that every interrupt lands at the same position.
    fn interrupt_delivered(&mut self, _at: Position, _vector: u8) {}
    /// Guest time, if it has reached `deadline_ns`; `None` if it has not. A device poll asks
    /// this instead of [`Host::time_ns`]: a poll before the earliest device deadline changes
    /// nothing the guest can see, so a recording host need log only the answers that
    /// reached it (most polls of an armed timer find it not yet due). Hosts that log nothing
    /// keep this default.
    fn time_if_due(&mut self, at: Position, deadline_ns: u64) -> Option<u64> {
        let now = self.time_ns(at);
        (now >= deadline_ns).then_some(now)
    }
}

/// How a live host tells time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClockMode {
    /// Host monotonic time: real, and therefore worth recording.
    Host,
    /// Time derived from the guest's own progress (1 ns per instruction, 1 µs per device
    /// exit, idle periods skipped): reproducible without a trace.
    Virtual,
}

/// Nanoseconds of virtual time each device exit is worth.
pub const VIRTUAL_NS_PER_EXIT: u64 = 1_000;
/// The live host's default poll quantum in instructions.
pub const DEFAULT_POLL_QUANTUM: u64 = 20_000;
/// The longest a live host sleeps in one idle call, so that stop requests stay responsive.
const MAX_IDLE_SLEEP: Duration = Duration::from_millis(50);

/// Answers from the real host: its clock, stdin and entropy.
pub struct LiveHost {
    clock: ClockMode,
    start: Instant,
    virtual_skip_ns: u64,
    input: Option<Receiver<u8>>,
    pending_input: Option<u8>,
    poll_quantum: u64,
}

impl LiveHost {
    /// A live host with the given clock. Serial input is only read once
    /// [`LiveHost::with_stdin`] is called, so tests never touch the terminal.
    pub fn new(clock: ClockMode) -> Self {
        Self {
            clock,
            start: Instant::now(),
            virtual_skip_ns: 0,
            input: None,
            pending_input: None,
            poll_quantum: DEFAULT_POLL_QUANTUM,
        }
    }

    /// Feeds serial input from the process's stdin, read by a background thread.
    pub fn with_stdin(self) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("deja-stdin".into())
            .spawn(move || {
                let mut stdin = std::io::stdin().lock();
                let mut buf = [0u8; 256];
                while let Ok(n) = stdin.read(&mut buf) {
                    if n == 0 || buf[..n].iter().any(|&b| tx.send(b).is_err()) {
                        break;
                    }
                }
            })
            .expect("spawning the stdin reader thread");
        self.with_input(rx)
    }

    /// Feeds serial input from any channel (tests, scripted input).
    pub fn with_input(mut self, input: Receiver<u8>) -> Self {
        self.input = Some(input);
        self
    }

    /// Sets how many instructions bt runs between device polls.
    pub fn with_poll_quantum(mut self, quantum: u64) -> Self {
        self.poll_quantum = quantum.max(1);
        self
    }

    /// The clock this host uses.
    pub fn clock(&self) -> ClockMode {
        self.clock
    }
}

impl Host for LiveHost {
    fn time_ns(&mut self, at: Position) -> u64 {
        match self.clock {
            ClockMode::Host => self.start.elapsed().as_nanos() as u64,
            ClockMode::Virtual => at
                .icount
                .saturating_add(at.exits.saturating_mul(VIRTUAL_NS_PER_EXIT))
                .saturating_add(self.virtual_skip_ns),
        }
    }

    fn boot_wallclock(&mut self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }

    fn serial_input(&mut self, _at: Position) -> Option<u8> {
        if let Some(b) = self.pending_input.take() {
            return Some(b);
        }
        match self.input.as_ref()?.try_recv() {
            Ok(b) => Some(b),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => {
                self.input = None;
                None
            }
        }
    }

    fn entropy(&mut self, _at: Position) -> u64 {
        let mut buf = [0u8; 8];
        // SAFETY: getrandom writes at most `buf.len()` bytes into the valid buffer we own.
        let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n != buf.len() as isize {
            // getrandom cannot fail for 8 bytes once the pool is initialised; fall back to the
            // clock rather than aborting the guest.
            return self.start.elapsed().as_nanos() as u64 ^ 0x9e37_79b9_7f4a_7c15;
        }
        u64::from_le_bytes(buf)
    }

    fn poll_quantum(&mut self, _at: Position) -> u64 {
        self.poll_quantum
    }

    fn idle(&mut self, at: Position, deadline_ns: Option<u64>) {
        let now = self.time_ns(at);
        match self.clock {
            ClockMode::Virtual => {
                if let Some(deadline) = deadline_ns {
                    self.virtual_skip_ns += deadline.saturating_sub(now);
                } else if let Some(rx) = &self.input {
                    // Nothing will ever happen but input: wait for it, time stands still.
                    if let Ok(b) = rx.recv_timeout(MAX_IDLE_SLEEP) {
                        self.pending_input = Some(b);
                    }
                }
            }
            ClockMode::Host => {
                let wait = deadline_ns
                    .map(|d| Duration::from_nanos(d.saturating_sub(now)))
                    .unwrap_or(MAX_IDLE_SLEEP)
                    .min(MAX_IDLE_SLEEP);
                match &self.input {
                    Some(rx) if self.pending_input.is_none() => match rx.recv_timeout(wait) {
                        Ok(b) => self.pending_input = Some(b),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => self.input = None,
                    },
                    _ => std::thread::sleep(wait),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_clock_follows_progress_and_skips_idle_time() {
        let mut h = LiveHost::new(ClockMode::Virtual);
        let p = Position {
            icount: 5000,
            exits: 2,
        };
        assert_eq!(h.time_ns(p), 5000 + 2 * VIRTUAL_NS_PER_EXIT);
        h.idle(p, Some(1_000_000));
        assert_eq!(h.time_ns(p), 1_000_000);
    }

    #[test]
    fn scripted_input_arrives_in_order() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut h = LiveHost::new(ClockMode::Virtual).with_input(rx);
        tx.send(b'a').unwrap();
        tx.send(b'b').unwrap();
        let p = Position::default();
        assert_eq!(h.serial_input(p), Some(b'a'));
        assert_eq!(h.serial_input(p), Some(b'b'));
        assert_eq!(h.serial_input(p), None);
    }

    #[test]
    fn entropy_differs_between_calls() {
        let mut h = LiveHost::new(ClockMode::Host);
        let p = Position::default();
        assert_ne!(h.entropy(p), h.entropy(p));
    }
}
