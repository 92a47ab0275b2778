//! Machine state as traces talk about it, shared by the recorder and the replayer: the state
//! digest that record and replay compare, the snapshot a checkpoint stores and its restore
//! ([`state`]), and the facts of a run a trace records (its serial output, its machine and
//! image records, the guest-visible CPUID, how it ended).
//!
//! Dependencies point one way: machine and engines below, traces beside, recorder and
//! replayer above (neither depends on the other).

pub mod memory;
pub mod state;

pub use state::{MachineSnapshot, StateDigester, StateError, restore, snapshot, state_digest};

use deja_engine::RunEnd;
use deja_machine::MachineConfig;
use deja_machine::devices::StopRequest;
use deja_machine::loader::Image;
use deja_traces::{Digest, ImageRecord, MachineInfo};
use std::io::Write;
use std::sync::{Arc, Mutex};

/// What `Host::poll_quantum` answers under exit-synchronous delivery: devices are polled at
/// device exits only, so the answer is not an input and is not logged.
pub const NO_POLL_QUANTUM: u64 = 1 << 62;

/// The `load` text of an initrd's image record in a trace header (the record after its
/// kernel's).
pub const INITRD_LOAD: &str = "initrd";

/// The guest's serial output, teed: passed on to where it was going, and hashed.
#[derive(Default)]
pub struct SerialCapture {
    hasher: blake3::Hasher,
    total: u64,
    pending: Vec<u8>,
    keep: Option<Vec<u8>>,
    watch: Option<ConsoleWatch>,
}

/// Console lines matched against a pattern (`deja record --fail-on`): the first line that
/// matches is kept.
struct ConsoleWatch {
    pattern: regex::Regex,
    line: Vec<u8>,
    matched: Option<String>,
}

/// Longest console line a watch keeps (longer lines are matched by their first part).
const WATCH_LINE_MAX: usize = 4096;

impl ConsoleWatch {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.matched.is_some() {
                return;
            }
            if b == b'\n' {
                let text = String::from_utf8_lossy(&self.line);
                let text = text.trim_end_matches('\r');
                if self.pattern.is_match(text) {
                    self.matched = Some(text.to_string());
                }
                self.line.clear();
            } else if self.line.len() < WATCH_LINE_MAX {
                self.line.push(b);
            }
        }
    }
}

impl SerialCapture {
    /// Also matches every console line against `pattern`; see [`SerialCapture::matched`].
    pub fn watch_for(&mut self, pattern: regex::Regex) {
        self.watch = Some(ConsoleWatch {
            pattern,
            line: Vec::new(),
            matched: None,
        });
    }

    /// The first console line that matched the watched pattern, if any.
    pub fn matched(&self) -> Option<&str> {
        self.watch.as_ref()?.matched.as_deref()
    }

    /// A capture that also keeps every byte (for callers that inspect the output).
    pub fn keeping() -> Self {
        Self {
            keep: Some(Vec::new()),
            ..Self::default()
        }
    }

    /// Bytes since the last call.
    pub fn take_pending(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }

    /// BLAKE3 of all output so far.
    pub fn digest(&self) -> Digest {
        Digest::from(self.hasher.finalize())
    }

    /// Bytes of output so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Every byte, if this capture keeps them.
    pub fn kept(&self) -> Option<&[u8]> {
        self.keep.as_deref()
    }
}

/// A writer that feeds a [`SerialCapture`] and passes bytes on.
pub struct SerialTee {
    inner: Box<dyn Write + Send>,
    capture: Arc<Mutex<SerialCapture>>,
}

impl SerialTee {
    /// Tees `inner` into `capture`.
    pub fn new(inner: Box<dyn Write + Send>, capture: Arc<Mutex<SerialCapture>>) -> Self {
        Self { inner, capture }
    }
}

impl Write for SerialTee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        {
            let mut c = self.capture.lock().unwrap_or_else(|e| e.into_inner());
            c.hasher.update(buf);
            c.total += buf.len() as u64;
            c.pending.extend_from_slice(buf);
            if let Some(k) = &mut c.keep {
                k.extend_from_slice(buf);
            }
            if let Some(w) = &mut c.watch {
                w.feed(buf);
            }
        }
        // The guest's output is recorded whether or not the terminal takes it.
        let _ = self.inner.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.inner.flush();
        Ok(())
    }
}

/// Locks a serial capture, recovering from poisoning.
pub fn lock_capture(c: &Mutex<SerialCapture>) -> std::sync::MutexGuard<'_, SerialCapture> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// The machine's CPUID table in trace terms.
pub fn machine_info(config: &MachineConfig) -> MachineInfo {
    MachineInfo {
        ram_size: config.ram_size,
        cmdline: config.cmdline.clone(),
        cpuid: config.cpuid.entries.iter().map(trace_cpuid_entry).collect(),
        extra: serde_json::to_vec(config).unwrap_or_default(),
    }
}

/// A CPUID entry in trace terms.
pub fn trace_cpuid_entry(e: &deja_machine::cpuid::CpuidEntry) -> deja_traces::CpuidEntry {
    deja_traces::CpuidEntry {
        function: e.function,
        index: e.index,
        indexed: e.indexed,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
    }
}

/// A CPUID entry of a trace in the machine's terms.
pub fn machine_cpuid_entry(e: &deja_traces::CpuidEntry) -> deja_machine::cpuid::CpuidEntry {
    deja_machine::cpuid::CpuidEntry {
        function: e.function,
        index: e.index,
        indexed: e.indexed,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
    }
}

/// The CPUID answers a guest gets on `engine` with `table`, in trace terms (`None` when
/// the engine could not be probed; the recording goes on without them).
pub fn guest_cpuid(
    engine: deja_engine::EngineKind,
    table: &deja_machine::CpuidTable,
) -> Option<deja_traces::GuestCpuid> {
    let seen = deja_engine::guest_visible_cpuid(engine, table).ok()?;
    Some(deja_traces::GuestCpuid {
        source: seen.source,
        ring0: seen.ring0.iter().map(trace_cpuid_entry).collect(),
        ring3: seen.ring3.iter().map(trace_cpuid_entry).collect(),
    })
}

/// The image's record for the header: name, digest, and its load format.
pub fn image_record(image: &Image) -> ImageRecord {
    ImageRecord::new(
        &image.name,
        &image.bytes,
        &format!("{:?}", image.format),
        serde_json::to_vec(&image.format).unwrap_or_default(),
    )
}

/// Human-readable reason and process status of a run's end.
pub fn describe_end(end: &RunEnd) -> (Option<i32>, String) {
    let reason = match end {
        RunEnd::Stopped(StopRequest::DebugExit { value }) => format!("debug-exit {value:#x}"),
        RunEnd::Stopped(StopRequest::Reset { source }) => format!("reset ({source})"),
        RunEnd::Stopped(StopRequest::PowerOff) => "power off".into(),
        RunEnd::Stopped(StopRequest::Suspend) => "ACPI S3 suspend (not resumed: no reboot)".into(),
        RunEnd::Shutdown { reason, .. } => format!("shutdown: {reason}"),
        RunEnd::Timeout => "timeout".into(),
        RunEnd::InstructionLimit => "instruction limit".into(),
        RunEnd::Interrupted => "interrupted".into(),
    };
    let status = match end {
        RunEnd::Stopped(StopRequest::DebugExit { value }) => Some((value & 0xff) as i32),
        RunEnd::Stopped(_) => Some(0),
        _ => None,
    };
    (status, reason)
}
