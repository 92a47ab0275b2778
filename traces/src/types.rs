//! The records a trace holds: header, events, checkpoint metadata and footer.
//!
//! All of these are bincode-encoded in the file, so fields are only ever appended to the end
//! of an enum (new event kinds) together with a format version bump; readers reject versions
//! they do not know instead of guessing.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;

/// Where in the guest's execution something happened; the same meaning as the machine's
/// `Position` (kept separate so this crate does not depend on the engines).
///
/// `icount` is exact on bt and 0 on kvm; `exits` counts guest-initiated device accesses and
/// is the same on both engines.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Position {
    /// Retired guest instructions (bt only).
    pub icount: u64,
    /// Device exits so far (both engines).
    pub exits: u64,
}

impl Position {
    /// A position from its two counters.
    pub const fn new(icount: u64, exits: u64) -> Self {
        Self { icount, exits }
    }

    /// Whether `self` is at or before `other` in execution order. Both counters only grow, so
    /// "before" means neither counter is larger (the derived `Ord` is lexicographic and would
    /// call icount 5/exit 9 earlier than icount 6/exit 1 even when that is impossible).
    pub fn at_or_before(&self, other: &Position) -> bool {
        self.icount <= other.icount && self.exits <= other.exits
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "icount {} exit #{}", self.icount, self.exits)
    }
}

/// A BLAKE3 digest. Printed and serialized to JSON as hex; stored as 32 raw bytes.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// The digest as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.to_string()
    }

    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Option<Self> {
        let text = text.as_bytes();
        if text.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in text.chunks(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(Self(out))
    }
}

impl From<blake3::Hash> for Digest {
    fn from(h: blake3::Hash) -> Self {
        Self(*h.as_bytes())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_hex())
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let text = String::deserialize(d)?;
            Digest::from_hex(&text).ok_or_else(|| {
                serde::de::Error::custom(format!("not a 64-digit hex digest: {text:?}"))
            })
        } else {
            Ok(Self(<[u8; 32]>::deserialize(d)?))
        }
    }
}

/// How the recording host told time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClockMode {
    /// Host monotonic time.
    Host,
    /// Time derived from guest progress.
    Virtual,
}

/// How asynchronous events (interrupts, input) were delivered, which the replayer must
/// reproduce and verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Delivery {
    /// Only at device exits (kvm without a PMU): positions are exit ordinals.
    ExitSynchronous,
    /// At exact instruction boundaries (bt): positions carry an exact icount.
    InstructionExact,
}

/// One CPUID leaf, as the machine's CPUID table holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// EAX input.
    pub function: u32,
    /// ECX input; only meaningful when `indexed`.
    pub index: u32,
    /// Whether the leaf has ECX-selected subleaves.
    pub indexed: bool,
    /// EAX output.
    pub eax: u32,
    /// EBX output.
    pub ebx: u32,
    /// ECX output.
    pub ecx: u32,
    /// EDX output.
    pub edx: u32,
}

/// The CPUID answers the guest actually got while recording, ring 0 and ring 3 apart: a
/// host may answer some leaves itself whatever table deja gives it (KVM under PVM answers
/// ring-3 CPUID natively, and overrides some leaves in ring 0 too), and a guest that sees
/// other feature bits can take other paths on another engine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestCpuid {
    /// How the answers were learned (e.g. "a probe guest on kvm", "deja's table (bt)").
    pub source: String,
    /// Each probed leaf as ring-0 code saw it.
    pub ring0: Vec<CpuidEntry>,
    /// Each probed leaf as ring-3 code saw it.
    pub ring3: Vec<CpuidEntry>,
}

/// The host CPU a trace was recorded on. Guest-visible results can depend on it even on
/// bt (x87 transcendentals run on the host FPU), so a replay on another model warns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCpu {
    /// CPUID vendor string ("GenuineIntel", "AuthenticAMD").
    pub vendor: String,
    /// Display family (base + extended).
    pub family: u32,
    /// Display model (base + extended).
    pub model: u32,
    /// Stepping.
    pub stepping: u32,
    /// The brand string.
    pub name: String,
}

impl HostCpu {
    /// This machine's CPU, from the CPUID instruction.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::__cpuid;
            let words =
                |r: [u32; 4]| -> Vec<u8> { r.iter().flat_map(|w| w.to_le_bytes()).collect() };
            let text = |b: &[u8]| {
                String::from_utf8_lossy(b)
                    .trim_matches(char::from(0))
                    .trim()
                    .to_string()
            };
            // CPUID exists on every x86-64 CPU (safe to call since Rust 1.87).
            let leaf = |f: u32| __cpuid(f);
            let l0 = leaf(0);
            let vendor = text(&words([l0.ebx, l0.edx, l0.ecx, 0])[..12]);
            let l1 = leaf(1);
            let base_family = (l1.eax >> 8) & 0xf;
            let family = base_family
                + if base_family == 0xf {
                    (l1.eax >> 20) & 0xff
                } else {
                    0
                };
            let model = ((l1.eax >> 4) & 0xf)
                | if base_family == 0x6 || base_family == 0xf {
                    ((l1.eax >> 16) & 0xf) << 4
                } else {
                    0
                };
            let name = if leaf(0x8000_0000).eax >= 0x8000_0004 {
                let mut b = Vec::new();
                for f in 0x8000_0002..=0x8000_0004 {
                    let r = leaf(f);
                    b.extend(words([r.eax, r.ebx, r.ecx, r.edx]));
                }
                text(&b)
            } else {
                String::new()
            };
            Self {
                vendor,
                family,
                model,
                stepping: l1.eax & 0xf,
                name,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Self::default()
    }
}

impl std::fmt::Display for HostCpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} family {:#x} model {:#x} stepping {}",
            self.vendor, self.family, self.model, self.stepping
        )?;
        if !self.name.is_empty() {
            write!(f, " ({})", self.name)?;
        }
        Ok(())
    }
}

/// How a trace's state digests were computed. Version 1 (traces before format 7, which
/// have no scheme): the CPU core, the bincode of every device's state in machine order, and
/// memory. Version 2: the CPU core, each listed device's own digest in list order, and
/// memory; devices a later machine has beyond the list are not covered, so adding a device
/// to deja does not break the digests of older traces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestScheme {
    /// The scheme's version.
    pub version: u32,
    /// The devices covered, by their snapshot keys.
    pub devices: Vec<String>,
}

/// The machine configuration the run was recorded with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineInfo {
    /// Guest RAM in bytes.
    pub ram_size: u64,
    /// Kernel command line.
    pub cmdline: String,
    /// The CPUID table both engines present.
    pub cpuid: Vec<CpuidEntry>,
    /// Anything else the recorder needs to rebuild the machine exactly, encoded by it. This
    /// crate never interprets it.
    pub extra: Vec<u8>,
}

/// One loaded image: the replayer finds the image by name and refuses it unless the digest
/// matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// File name or `guest:NAME`.
    pub name: String,
    /// Length in bytes.
    pub size: u64,
    /// BLAKE3 of the image's bytes.
    pub digest: Digest,
    /// How it was loaded, for humans (e.g. "raw at 0x7c00, real mode", "multiboot").
    pub load: String,
    /// How it was loaded, encoded by the recorder for the replayer; opaque here.
    pub load_spec: Vec<u8>,
}

/// Options the recording ran with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingOptions {
    /// A [`EventKind::StateDigest`] every this many events (0: never).
    pub digest_interval: u64,
    /// A checkpoint every this many events (0: none besides those asked for).
    pub checkpoint_interval: u64,
    /// Seed of the chaos perturbations, if chaos mode was on.
    pub chaos_seed: Option<u64>,
}

/// What the machine does when the guest resets it (0xcf9, port 0x92, the keyboard
/// controller, a triple fault), which a replay must repeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResetPolicy {
    /// The run ends at the first reset (`--no-reboot`). Traces of format 1 and 2, which do
    /// not say, were all recorded this way.
    #[default]
    Stop,
    /// The machine reboots and the run goes on (QEMU's default).
    Reboot,
}

/// Everything known before the first instruction runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The deja version that recorded the trace.
    pub deja_version: String,
    /// The engine it was recorded on ("kvm", "bt").
    pub engine: String,
    /// How the host told time.
    pub clock: ClockMode,
    /// How asynchronous events were delivered.
    pub delivery: Delivery,
    /// The machine.
    pub machine: MachineInfo,
    /// Every loaded image, in load order.
    pub images: Vec<ImageRecord>,
    /// Recording options.
    pub options: RecordingOptions,
    /// When the recording started, seconds since the Unix epoch. Metadata only: the guest
    /// never sees it (its boot wallclock is an event).
    pub created_unix_secs: i64,
    /// Free-form facts about the recording host (e.g. "host.virt" = "PVM"), for humans.
    pub notes: BTreeMap<String, String>,
    /// What a guest reset did. Format version 3 (older headers end before it and read as
    /// [`ResetPolicy::Stop`]).
    pub on_reset: ResetPolicy,
    /// The CPUID answers the guest got. Format version 7 ([`crate::GUEST_CPUID_FORMAT`];
    /// older headers read as `None`).
    pub guest_cpuid: Option<GuestCpuid>,
    /// The recording host's CPU. Format version 7 (older headers read as `None`).
    pub host_cpu: Option<HostCpu>,
    /// How state digests were computed. Format version 7 (older headers read as `None`:
    /// scheme 1).
    pub digest_scheme: Option<DigestScheme>,
    /// The revision of the firmware tables (ACPI, SMBIOS) the machine had in guest memory,
    /// which a replay must write again byte for byte. Format version 9
    /// ([`crate::FIRMWARE_REVISION_FORMAT`]; older headers read as `None`: revision 1, the
    /// tables every earlier recording had).
    pub firmware_revision: Option<u32>,
}

impl Header {
    /// A header for a recording starting now with this build's version, no images and
    /// default options; the recorder fills in the rest.
    pub fn new(engine: &str, clock: ClockMode, delivery: Delivery, machine: MachineInfo) -> Self {
        let created_unix_secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        Self {
            deja_version: crate::DEJA_VERSION.to_string(),
            engine: engine.to_string(),
            clock,
            delivery,
            machine,
            images: Vec::new(),
            options: RecordingOptions::default(),
            created_unix_secs,
            notes: BTreeMap::new(),
            on_reset: ResetPolicy::Stop,
            guest_cpuid: None,
            host_cpu: None,
            digest_scheme: None,
            firmware_revision: None,
        }
    }
}

impl ImageRecord {
    /// The record of an image with these bytes (size and digest computed here).
    pub fn new(name: &str, bytes: &[u8], load: &str, load_spec: Vec<u8>) -> Self {
        Self {
            name: name.to_string(),
            size: bytes.len() as u64,
            digest: Digest::of(bytes),
            load: load.to_string(),
            load_spec,
        }
    }

    /// Whether `bytes` are this image (same length and digest): the replayer's check before
    /// loading an image found by name.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        self.size == bytes.len() as u64 && self.digest == Digest::of(bytes)
    }
}

/// One logged fact with its position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Where it happened.
    pub at: Position,
    /// What happened.
    pub kind: EventKind,
}

impl Event {
    /// An event at a position.
    pub fn new(at: Position, kind: EventKind) -> Self {
        Self { at, kind }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>12} {:>10} {}",
            self.at.icount, self.at.exits, self.kind
        )
    }
}

/// What an event says. The first six are the `Host` answers (what replay feeds back); the
/// rest are recorder-side facts used to verify a replay and explain a run.
///
/// New kinds are only ever appended (bincode numbers variants by order), together with a
/// format version bump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum EventKind {
    /// `Host::time_ns` answered `ns`.
    TimeRead {
        /// Guest-visible nanoseconds.
        ns: u64,
    },
    /// `Host::boot_wallclock` answered `secs`.
    BootWallclock {
        /// Seconds since the Unix epoch.
        secs: i64,
    },
    /// `Host::serial_input` answered `byte`. Polls that found nothing are logged only
    /// just before a byte that arrived at the same position with no event in between; a
    /// replay answers "nothing" to every poll the next event does not match.
    SerialInput {
        /// The byte, or `None` when nothing had arrived.
        byte: Option<u8>,
    },
    /// `Host::entropy` answered `value`.
    Entropy {
        /// The 64 random bits.
        value: u64,
    },
    /// `Host::poll_quantum` answered `instructions`.
    PollQuantum {
        /// Instructions until the next device poll.
        instructions: u64,
    },
    /// `Host::idle` was called; guest time afterwards read `resumed_ns`.
    Idle {
        /// The deadline the guest idled until (`None`: until input).
        deadline_ns: Option<u64>,
        /// Guest time when the idle call returned.
        resumed_ns: u64,
    },
    /// An interrupt was delivered to the CPU here.
    Interrupt {
        /// Its vector.
        vector: u8,
    },
    /// BLAKE3 of CPU state, memory and devices here: replay compares.
    StateDigest {
        /// The digest.
        digest: Digest,
    },
    /// Bytes the guest wrote to its serial port since the previous such event.
    SerialOutput {
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// Chaos mode perturbed the run here.
    Chaos {
        /// Which perturbation (e.g. "delay-interrupt", "poll-quantum").
        perturbation: String,
        /// Its parameter.
        value: u64,
    },
    /// The run ended here.
    End {
        /// The process exit status the run maps to, if it ended in one.
        status: Option<i32>,
        /// Why it ended (e.g. "debug-exit 0x10", "triple fault", "interrupted").
        reason: String,
    },
    /// The CPU's main registers where a state digest was taken without a checkpoint (a
    /// checkpoint holds the whole CPU state), logged just before the digest, so a replay
    /// that diverges there shows which registers differ. Format version 2.
    Registers {
        /// Values in [`REGISTER_NAMES`] order.
        values: Vec<u64>,
    },
}

/// The registers a [`EventKind::Registers`] event holds, in order: exactly the CPU
/// registers the state digest covers besides segments, descriptor tables and SSE state.
pub const REGISTER_NAMES: [&str; 22] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15", "rip", "rflags", "cr0", "cr3", "cr4", "efer",
];

/// Which kind an event is, without its data: what a replaying host asks for and what counts
/// and dumps group by. The discriminants are the variants' bincode indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum EventTag {
    /// [`EventKind::TimeRead`].
    TimeRead = 0,
    /// [`EventKind::BootWallclock`].
    BootWallclock = 1,
    /// [`EventKind::SerialInput`].
    SerialInput = 2,
    /// [`EventKind::Entropy`].
    Entropy = 3,
    /// [`EventKind::PollQuantum`].
    PollQuantum = 4,
    /// [`EventKind::Idle`].
    Idle = 5,
    /// [`EventKind::Interrupt`].
    Interrupt = 6,
    /// [`EventKind::StateDigest`].
    StateDigest = 7,
    /// [`EventKind::SerialOutput`].
    SerialOutput = 8,
    /// [`EventKind::Chaos`].
    Chaos = 9,
    /// [`EventKind::End`].
    End = 10,
    /// [`EventKind::Registers`].
    Registers = 11,
}

impl EventTag {
    /// Every tag, in variant order.
    pub const ALL: [EventTag; 12] = [
        EventTag::TimeRead,
        EventTag::BootWallclock,
        EventTag::SerialInput,
        EventTag::Entropy,
        EventTag::PollQuantum,
        EventTag::Idle,
        EventTag::Interrupt,
        EventTag::StateDigest,
        EventTag::SerialOutput,
        EventTag::Chaos,
        EventTag::End,
        EventTag::Registers,
    ];

    /// A short stable name, used for counts and dumps (the footer's event counts are keyed
    /// by it, so it never changes).
    pub const fn name(self) -> &'static str {
        match self {
            EventTag::TimeRead => "time",
            EventTag::BootWallclock => "wallclock",
            EventTag::SerialInput => "serial-in",
            EventTag::Entropy => "entropy",
            EventTag::PollQuantum => "poll-quantum",
            EventTag::Idle => "idle",
            EventTag::Interrupt => "interrupt",
            EventTag::StateDigest => "state-digest",
            EventTag::SerialOutput => "serial-out",
            EventTag::Chaos => "chaos",
            EventTag::End => "end",
            EventTag::Registers => "registers",
        }
    }

    /// Whether events of this kind are `Host` answers, which a replaying host hands back;
    /// the others are recorder-side facts that a replay checks.
    pub const fn is_host_answer(self) -> bool {
        match self {
            EventTag::TimeRead
            | EventTag::BootWallclock
            | EventTag::SerialInput
            | EventTag::Entropy
            | EventTag::PollQuantum
            | EventTag::Idle => true,
            EventTag::Interrupt
            | EventTag::StateDigest
            | EventTag::SerialOutput
            | EventTag::Chaos
            | EventTag::End
            | EventTag::Registers => false,
        }
    }
}

impl EventKind {
    /// Every kind name, in variant order.
    pub const NAMES: [&'static str; EventTag::ALL.len()] = {
        let mut names = [""; EventTag::ALL.len()];
        let mut i = 0;
        while i < names.len() {
            names[i] = EventTag::ALL[i].name();
            i += 1;
        }
        names
    };

    /// A short stable name, used for counts and dumps.
    pub fn name(&self) -> &'static str {
        self.tag().name()
    }

    /// Which kind this is.
    pub fn tag(&self) -> EventTag {
        match self {
            EventKind::TimeRead { .. } => EventTag::TimeRead,
            EventKind::BootWallclock { .. } => EventTag::BootWallclock,
            EventKind::SerialInput { .. } => EventTag::SerialInput,
            EventKind::Entropy { .. } => EventTag::Entropy,
            EventKind::PollQuantum { .. } => EventTag::PollQuantum,
            EventKind::Idle { .. } => EventTag::Idle,
            EventKind::Interrupt { .. } => EventTag::Interrupt,
            EventKind::StateDigest { .. } => EventTag::StateDigest,
            EventKind::SerialOutput { .. } => EventTag::SerialOutput,
            EventKind::Chaos { .. } => EventTag::Chaos,
            EventKind::End { .. } => EventTag::End,
            EventKind::Registers { .. } => EventTag::Registers,
        }
    }

    /// Whether this is one of the `Host` answers a replaying host hands back.
    pub fn is_host_answer(&self) -> bool {
        self.tag().is_host_answer()
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<12} ", self.name())?;
        match self {
            EventKind::TimeRead { ns } => write!(f, "{ns} ns"),
            EventKind::BootWallclock { secs } => write!(f, "{secs} s"),
            EventKind::SerialInput { byte: Some(b) } => {
                write!(f, "0x{b:02x} {:?}", *b as char)
            }
            EventKind::SerialInput { byte: None } => write!(f, "none"),
            EventKind::Entropy { value } => write!(f, "0x{value:016x}"),
            EventKind::PollQuantum { instructions } => write!(f, "{instructions} instructions"),
            EventKind::Idle {
                deadline_ns,
                resumed_ns,
            } => match deadline_ns {
                Some(d) => write!(f, "until {d} ns, resumed at {resumed_ns} ns"),
                None => write!(f, "until input, resumed at {resumed_ns} ns"),
            },
            EventKind::Interrupt { vector } => write!(f, "vector 0x{vector:02x}"),
            EventKind::StateDigest { digest } => write!(f, "{digest}"),
            EventKind::SerialOutput { bytes } => {
                write!(
                    f,
                    "{} bytes {:?}",
                    bytes.len(),
                    String::from_utf8_lossy(bytes)
                )
            }
            EventKind::Chaos {
                perturbation,
                value,
            } => write!(f, "{perturbation} {value}"),
            EventKind::End { status, reason } => match status {
                Some(s) => write!(f, "status {s}: {reason}"),
                None => write!(f, "{reason}"),
            },
            EventKind::Registers { values } => {
                let named: Vec<String> = REGISTER_NAMES
                    .iter()
                    .zip(values)
                    .map(|(n, v)| format!("{n}={v:#x}"))
                    .collect();
                write!(f, "{}", named.join(" "))
            }
        }
    }
}

/// What the caller hands [`crate::TraceWriter::checkpoint`] besides the memory pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointInput {
    /// Where the checkpoint was taken.
    pub position: Position,
    /// The engine-independent CPU state, encoded by the caller.
    pub cpu_state: Vec<u8>,
    /// All device states, encoded by the caller.
    pub device_state: Vec<u8>,
    /// BLAKE3 of CPU state, memory and devices at this point, if the caller computed it.
    pub state_digest: Option<Digest>,
    /// Whether the pages are all non-zero pages of memory (a full image) rather than only
    /// those changed since the previous checkpoint. The first checkpoint must be full.
    pub full: bool,
}

/// A committed checkpoint's metadata, stored in its Checkpoint frame after its pages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Checkpoint ordinal (0, 1, …).
    pub ordinal: u64,
    /// Where it was taken.
    pub position: Position,
    /// Events written before it: replay resumes with event number `event_index`.
    pub event_index: u64,
    /// CPU state blob.
    pub cpu_state: Vec<u8>,
    /// Device state blob.
    pub device_state: Vec<u8>,
    /// State digest, if known.
    pub state_digest: Option<Digest>,
    /// Whether the pages form a full image.
    pub full: bool,
    /// Pages stored.
    pub pages: u64,
    /// CheckpointPages frames holding them (immediately before this frame).
    pub page_frames: u64,
}

/// One frame in the footer's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameIndexEntry {
    /// Offset of the frame header in the file.
    pub offset: u64,
    /// Sequence number.
    pub seq: u64,
    /// Frame kind (the [`crate::FrameKind`] byte).
    pub kind: u8,
    /// First position covered.
    pub first: Position,
    /// Last position covered.
    pub last: Position,
    /// Items in the frame.
    pub items: u32,
    /// Compressed payload length.
    pub compressed_len: u32,
    /// Uncompressed payload length.
    pub uncompressed_len: u32,
}

/// One checkpoint in the index: enough to seek to it without reading anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointIndexEntry {
    /// Checkpoint ordinal.
    pub ordinal: u64,
    /// Where it was taken.
    pub position: Position,
    /// Events before it.
    pub event_index: u64,
    /// Offset of the first of its page frames (or of its Checkpoint frame if it has none).
    pub first_offset: u64,
    /// Offset of its Checkpoint frame.
    pub meta_offset: u64,
    /// Sequence number of its Checkpoint frame.
    pub meta_seq: u64,
    /// Pages it stores.
    pub pages: u64,
    /// Page frames.
    pub page_frames: u64,
    /// Whether it is a full image.
    pub full: bool,
    /// Compressed bytes of all its frames' payloads.
    pub compressed_bytes: u64,
}

/// How the run ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Process exit status, if the run produced one.
    pub status: Option<i32>,
    /// Why it ended.
    pub reason: String,
}

/// What the caller knows at the end, for [`crate::TraceWriter::finish`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FinishInfo {
    /// The final position.
    pub final_position: Position,
    /// BLAKE3 of the final CPU state, memory and devices.
    pub final_state_digest: Option<Digest>,
    /// BLAKE3 of everything the guest wrote to its serial port.
    pub serial_output_digest: Option<Digest>,
    /// How many bytes that was.
    pub serial_output_bytes: u64,
    /// How the run ended.
    pub exit: ExitInfo,
}

/// The last frame: an index of everything before it and the run's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Footer {
    /// Every frame before the footer, in file order.
    pub frames: Vec<FrameIndexEntry>,
    /// Every checkpoint, in order.
    pub checkpoints: Vec<CheckpointIndexEntry>,
    /// The final position.
    pub final_position: Position,
    /// BLAKE3 of the final state.
    pub final_state_digest: Option<Digest>,
    /// BLAKE3 of the guest's serial output.
    pub serial_output_digest: Option<Digest>,
    /// Bytes of serial output.
    pub serial_output_bytes: u64,
    /// How the run ended.
    pub exit: ExitInfo,
    /// Events by kind name.
    pub event_counts: BTreeMap<String, u64>,
    /// All events.
    pub events_total: u64,
}
