//! The machine state a trace talks about: the digest that record and replay compare, and the
//! snapshot a checkpoint stores (CPU state, device states, position, poll schedule, memory).
//!
//! Both are defined by content only, so they are the same whichever engine produced them:
//! the CPU part of the digest covers the architectural core both engines keep identically
//! (not engine-private MSR lists or descriptor-cache bits), and memory counts every non-zero
//! page by number and contents.

use deja_machine::cpu::{
    DescriptorTable, FpuState, PendingDebug, PendingEvents, X87ErrorPins, Xcr0,
};
use deja_machine::devices::DeviceState;
use deja_machine::vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use deja_machine::{Cpu, CpuError, CpuState, Machine, MachineError, Position, Segment};
use deja_traces::{Digest, DigestScheme, PAGE_SIZE};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use thiserror::Error;

/// Failures reading or restoring machine state.
#[derive(Debug, Error)]
pub enum StateError {
    /// The engine could not report or take its state.
    #[error("CPU state: {0}")]
    Cpu(#[from] CpuError),
    /// The devices refused a saved state.
    #[error("device state: {0}")]
    Machine(#[from] MachineError),
    /// A saved blob does not decode.
    #[error("cannot decode the {what}: {detail}")]
    Decode {
        /// Which blob.
        what: &'static str,
        /// bincode's explanation.
        detail: String,
    },
    /// A checkpoint holds a device this machine does not have.
    #[error("the checkpoint holds the state of a device {device:?} this machine does not have")]
    UnknownDevice {
        /// The device's key.
        device: String,
    },
    /// A device's saved state has a layout version this build does not read.
    #[error(
        "the checkpoint holds state layout {found} of device {device:?}; this build reads \
         layout {supported}"
    )]
    DeviceVersion {
        /// The device's key.
        device: String,
        /// The version in the checkpoint.
        found: u32,
        /// The version this build's device writes and reads.
        supported: u32,
    },
    /// A trace's digest scheme that this build or this machine cannot compute.
    #[error("{detail}")]
    DigestScheme {
        /// What is wrong.
        detail: String,
    },
    /// A CPU state layout this build does not read (a newer deja wrote it).
    #[error(
        "the checkpoint's CPU state has layout {found}; this build reads layouts 3 to {CPU_STATE_LAYOUT}"
    )]
    CpuLayout {
        /// The layout version found.
        found: u32,
    },
    /// A page of a checkpoint lies outside guest memory.
    #[error("checkpoint page number {page:#x} is not a page of this machine's RAM or ROM")]
    PageOutsideMemory {
        /// The page number.
        page: u64,
    },
    /// The engine cannot be moved to the checkpoint's instruction count.
    #[error(
        "the {engine} engine cannot seek: its instruction count is {actual} after restoring a \
         checkpoint at icount {wanted}"
    )]
    CannotSeek {
        /// The engine.
        engine: &'static str,
        /// The checkpoint's icount.
        wanted: u64,
        /// What the engine reports.
        actual: u64,
    },
}

/// Everything but the CPU and memory that a checkpoint must hold to resume a run exactly
/// (trace format [`VERSIONED_STATE_FORMAT`] on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSnapshot {
    /// The position (icount and device-exit ordinal).
    pub position: deja_traces::Position,
    /// When the run loop next polls devices (instruction-counting engines).
    pub next_poll: u64,
    /// Every device's state by its key ([`Machine::device_keys`]). A device the machine has
    /// but the snapshot lacks (added to deja later) keeps its boot state on restore.
    pub devices: BTreeMap<String, DeviceBlob>,
}

/// One device's saved state with the layout version its device wrote
/// ([`deja_machine::devices::Device::state_version`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceBlob {
    /// The layout version.
    pub version: u32,
    /// The state, bincode.
    pub state: Vec<u8>,
}

/// A machine snapshot as trace formats 1-6 stored it: device states by position.
#[derive(Deserialize)]
struct PositionalMachineSnapshot {
    position: deja_traces::Position,
    next_poll: u64,
    devices: Vec<DeviceState>,
}

/// The first trace format whose checkpoints carry versioned state: the CPU state with its
/// own layout version ([`CPU_STATE_LAYOUT`]), device states by name with each device's
/// version ([`MachineSnapshot`]). Adding a CPU field or a device is then no format change.
pub const VERSIONED_STATE_FORMAT: u32 = 7;
// The recorder writes checkpoints of this build's layout under the writer's format.
const _: () = assert!(deja_traces::FORMAT_VERSION >= VERSIONED_STATE_FORMAT);

/// The CPU state layout this build writes: 3 is formats 1-3 (up to
/// [`CpuState::pending`]), 4 adds [`CpuState::pending_debug`], 5 adds
/// [`CpuState::x87_error_pins`], 6 adds [`CpuState::xcr0`]. A new `CpuState` field bumps it, keeps the previous layout
/// as a struct with a `From` conversion, and leaves the trace format alone.
pub const CPU_STATE_LAYOUT: u32 = 6;

/// A machine snapshot decoded from any trace format: device states by key, so that restore
/// and diffs need not know the format.
pub struct DecodedMachineState {
    /// The position.
    pub position: deja_traces::Position,
    /// The poll schedule.
    pub next_poll: u64,
    /// Device states by key, each with its layout version.
    pub devices: BTreeMap<String, (u32, DeviceState)>,
}

/// Decodes a checkpoint's machine state written under trace format `format`. Formats 1-6
/// stored devices by position: they are named with this machine's keys (the device set
/// must then be the recording's, as it always was).
pub fn decode_machine_state(
    bytes: &[u8],
    format: u32,
    machine: &Machine,
) -> Result<DecodedMachineState, StateError> {
    if format < VERSIONED_STATE_FORMAT {
        let old: PositionalMachineSnapshot = decode(bytes, "machine state")?;
        let keys = machine.device_keys();
        if old.devices.len() != keys.len() {
            return Err(StateError::Machine(MachineError::DeviceCountMismatch {
                expected: keys.len(),
                found: old.devices.len(),
            }));
        }
        return Ok(DecodedMachineState {
            position: old.position,
            next_poll: old.next_poll,
            devices: keys
                .into_iter()
                .zip(old.devices.into_iter().map(|d| (1, d)))
                .collect(),
        });
    }
    let snap: MachineSnapshot = decode(bytes, "machine state")?;
    let mut devices = BTreeMap::new();
    for (key, blob) in snap.devices {
        let state: DeviceState = bincode::serde::decode_from_slice(&blob.state, bincode_config())
            .map(|(v, _)| v)
            .map_err(|e| StateError::Decode {
                what: "device state",
                detail: format!("{key}: {e}"),
            })?;
        devices.insert(key, (blob.version, state));
    }
    Ok(DecodedMachineState {
        position: snap.position,
        next_poll: snap.next_poll,
        devices,
    })
}

/// Every device's state by key, as this build writes it.
fn save_machine_state(machine: &Machine, next_poll: u64) -> MachineSnapshot {
    let devices = machine
        .device_keys()
        .into_iter()
        .zip(machine.device_state_versions())
        .zip(machine.save_devices())
        .map(|((key, version), state)| {
            let blob = DeviceBlob {
                version,
                state: encode(&state),
            };
            (key, blob)
        })
        .collect();
    MachineSnapshot {
        position: trace_position(machine.position()),
        next_poll,
        devices,
    }
}

/// Restores the devices a decoded snapshot holds; a device it lacks keeps its state (the
/// machine is freshly built, so its boot state).
fn restore_devices(machine: &mut Machine, decoded: &DecodedMachineState) -> Result<(), StateError> {
    let keys = machine.device_keys();
    if let Some(unknown) = decoded.devices.keys().find(|k| !keys.contains(k)) {
        return Err(StateError::UnknownDevice {
            device: unknown.clone(),
        });
    }
    let versions = machine.device_state_versions();
    for (i, key) in keys.iter().enumerate() {
        if let Some((version, state)) = decoded.devices.get(key) {
            if *version != versions[i] {
                return Err(StateError::DeviceVersion {
                    device: key.clone(),
                    found: *version,
                    supported: versions[i],
                });
            }
            machine.restore_device(i, state)?;
        }
    }
    Ok(())
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
}

/// Encodes a value for a checkpoint blob.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Encoding plain in-memory structures into a Vec cannot fail.
    bincode::serde::encode_to_vec(value, bincode_config()).unwrap_or_default()
}

/// Decodes a checkpoint blob.
pub fn decode<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T, StateError> {
    bincode::serde::decode_from_slice(bytes, bincode_config())
        .map(|(v, _)| v)
        .map_err(|e| StateError::Decode {
            what,
            detail: e.to_string(),
        })
}

/// The first trace format whose checkpoints hold [`CpuState::pending_debug`].
pub const PENDING_DEBUG_FORMAT: u32 = 4;
/// The first trace format whose checkpoints hold [`CpuState::x87_error_pins`].
pub const X87_ERROR_PINS_FORMAT: u32 = 5;

/// Encodes a CPU state for a checkpoint: its layout version, then the state.
pub fn encode_cpu_state(state: &CpuState) -> Vec<u8> {
    encode(&(CPU_STATE_LAYOUT, state))
}

/// Decodes a checkpoint's CPU state, written by a recorder of trace format `format` (the
/// trace's [`deja_traces::TraceReader::format_version`]). From format
/// [`VERSIONED_STATE_FORMAT`] the blob names its own layout; before, the format implies
/// it: formats 1-3 end the state before [`CpuState::pending_debug`] (read as "no #DB trap
/// pending"), format 4 before [`CpuState::x87_error_pins`] (read as FERR# and IGNNE#
/// inactive). The whole blob must be used, so a blob of one layout never passes for
/// another.
pub fn decode_cpu_state(bytes: &[u8], format: u32) -> Result<CpuState, StateError> {
    let (layout, body) = if format >= VERSIONED_STATE_FORMAT {
        let (layout, used): (u32, usize) =
            bincode::serde::decode_from_slice(bytes, bincode_config()).map_err(|e| {
                StateError::Decode {
                    what: "CPU state layout",
                    detail: e.to_string(),
                }
            })?;
        (layout, &bytes[used..])
    } else if format < PENDING_DEBUG_FORMAT {
        (3, bytes)
    } else if format < X87_ERROR_PINS_FORMAT {
        (4, bytes)
    } else {
        (5, bytes)
    };
    let what = match layout {
        3 => "CPU state (layout 3, trace formats 1-3)",
        4 => "CPU state (layout 4, trace format 4)",
        5 => "CPU state (layout 5)",
        _ => "CPU state",
    };
    let fail = |detail: String| StateError::Decode { what, detail };
    let config = bincode_config();
    let (state, used) = match layout {
        3 => bincode::serde::decode_from_slice::<CpuStateFormat3, _>(body, config)
            .map(|(s, n)| (CpuState::from(s), n)),
        4 => bincode::serde::decode_from_slice::<CpuStateFormat4, _>(body, config)
            .map(|(s, n)| (CpuState::from(s), n)),
        5 => bincode::serde::decode_from_slice::<CpuStateLayout5, _>(body, config)
            .map(|(s, n)| (CpuState::from(s), n)),
        CPU_STATE_LAYOUT => bincode::serde::decode_from_slice::<CpuState, _>(body, config),
        found => return Err(StateError::CpuLayout { found }),
    }
    .map_err(|e| fail(e.to_string()))?;
    if used != body.len() {
        return Err(fail(format!(
            "{} of its {} bytes are left over (a state of another layout?)",
            body.len() - used,
            body.len()
        )));
    }
    Ok(state)
}

/// [`CpuState`] as trace formats 1-3 encoded it: every field up to [`CpuState::pending`].
#[derive(Deserialize)]
struct CpuStateFormat3 {
    gpr: [u64; 16],
    rip: u64,
    rflags: u64,
    seg: [Segment; 6],
    tr: Segment,
    ldtr: Segment,
    gdtr: DescriptorTable,
    idtr: DescriptorTable,
    cr0: u64,
    cr2: u64,
    cr3: u64,
    cr4: u64,
    cr8: u64,
    efer: u64,
    msrs: BTreeMap<u32, u64>,
    dr: [u64; 4],
    dr6: u64,
    dr7: u64,
    fpu: FpuState,
    pending: PendingEvents,
}

/// [`CpuState`] as trace format 4 encoded it: the format 1-3 fields, then
/// [`CpuState::pending_debug`] (bincode puts a nested struct's fields in line, so this is
/// the flat layout).
#[derive(Deserialize)]
struct CpuStateFormat4 {
    base: CpuStateFormat3,
    pending_debug: PendingDebug,
}

/// [`CpuState`] as layout 5 encoded it (trace formats 5-8 before XSAVE): the layout-4
/// fields, then [`CpuState::x87_error_pins`].
#[derive(Deserialize)]
struct CpuStateLayout5 {
    base: CpuStateFormat4,
    x87_error_pins: X87ErrorPins,
}

impl From<CpuStateLayout5> for CpuState {
    fn from(o: CpuStateLayout5) -> Self {
        let mut state = CpuState::from(o.base);
        state.x87_error_pins = o.x87_error_pins;
        state
    }
}

impl From<CpuStateFormat4> for CpuState {
    fn from(o: CpuStateFormat4) -> Self {
        let mut state = CpuState::from(o.base);
        state.pending_debug = o.pending_debug;
        state
    }
}

impl From<CpuStateFormat3> for CpuState {
    fn from(o: CpuStateFormat3) -> Self {
        CpuState {
            gpr: o.gpr,
            rip: o.rip,
            rflags: o.rflags,
            seg: o.seg,
            tr: o.tr,
            ldtr: o.ldtr,
            gdtr: o.gdtr,
            idtr: o.idtr,
            cr0: o.cr0,
            cr2: o.cr2,
            cr3: o.cr3,
            cr4: o.cr4,
            cr8: o.cr8,
            efer: o.efer,
            msrs: o.msrs,
            dr: o.dr,
            dr6: o.dr6,
            dr7: o.dr7,
            fpu: o.fpu,
            pending: o.pending,
            // Those recorders dropped a pending trap: none is the best reading.
            pending_debug: PendingDebug::default(),
            // They raised #MF whatever CR0.NE said: FERR# was never asserted.
            x87_error_pins: X87ErrorPins::default(),
            // Their CPUs had no XSETBV: XCR0 kept its reset value.
            xcr0: Xcr0::RESET,
        }
    }
}

/// Decodes a JSON blob of the header (machine configuration, image format).
pub fn decode_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T, StateError> {
    serde_json::from_slice(bytes).map_err(|e| StateError::Decode {
        what,
        detail: e.to_string(),
    })
}

/// The machine's position in trace terms.
pub fn trace_position(p: Position) -> deja_traces::Position {
    deja_traces::Position::new(p.icount, p.exits)
}

/// The architectural core of a CPU state that both engines report identically: what the
/// state digest covers.
fn cpu_core(s: &CpuState) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    let mut put = |v: u64| out.extend_from_slice(&v.to_le_bytes());
    for r in s.gpr {
        put(r);
    }
    put(s.rip);
    // Arithmetic, control and system flags; RF and the reserved bits are left out.
    put(s.rflags & 0x0024_7fd5 | 0x2);
    for sg in &s.seg {
        put(u64::from(sg.selector));
        put(sg.base);
    }
    put(s.cr0 & 0xe005_002f);
    put(s.cr3);
    put(s.cr4);
    put(s.efer & 0xd01);
    put(s.gdtr.base);
    put(u64::from(s.gdtr.limit));
    put(s.idtr.base);
    put(u64::from(s.idtr.limit));
    put(u64::from(s.fpu.mxcsr));
    for x in &s.fpu.xmm {
        out.extend_from_slice(x);
    }
    // XCR0 only once a guest changed it, so the digests of every state from before it
    // existed (and of guests that never use XSETBV) are what they were.
    if s.xcr0 != Xcr0::RESET {
        out.extend_from_slice(b"xcr0");
        out.extend_from_slice(&s.xcr0.0.to_le_bytes());
    }
    out
}

/// The registers of an [`deja_traces::EventKind::Registers`] event, in
/// [`deja_traces::REGISTER_NAMES`] order, masked as the state digest masks them.
pub fn register_values(s: &CpuState) -> Vec<u64> {
    let mut v = s.gpr.to_vec();
    v.extend([
        s.rip,
        s.rflags & 0x0024_7fd5 | 0x2,
        s.cr0 & 0xe005_002f,
        s.cr3,
        s.cr4,
        s.efer & 0xd01,
    ]);
    v
}

/// Differences `name: recorded -> replayed` between logged register values and a state.
pub fn register_diff(recorded: &[u64], replayed: &CpuState) -> Vec<String> {
    deja_traces::REGISTER_NAMES
        .iter()
        .zip(recorded.iter().zip(register_values(replayed)))
        .filter(|(_, (r, a))| **r != *a)
        .map(|(n, (r, a))| format!("{n}: {r:#x} -> {a:#x}"))
        .collect()
}

/// Where guest memory differs from a checkpoint's memory image (absent pages are zero):
/// for each differing page, its first differing bytes `recorded -> replayed`, at most
/// `limit` pages (then a count of the rest).
pub fn memory_diff(
    machine: &Machine,
    recorded: &deja_traces::MemoryImage,
    limit: usize,
) -> Vec<String> {
    use deja_machine::vm_memory::Bytes;
    let mut pages: std::collections::BTreeSet<u64> = recorded.pages().map(|(n, _)| n).collect();
    for_each_resident_page(machine, |n, page| {
        if !is_zero(page) {
            pages.insert(n);
        }
    });
    let zero = [0u8; PAGE_SIZE];
    let mut out = Vec::new();
    let mut differing = 0usize;
    for n in pages {
        let want = recorded.page(n).map_or(&zero[..], |p| &p[..]);
        let mut have = [0u8; PAGE_SIZE];
        let Ok(addr) = ram_page_address(machine, n) else {
            continue;
        };
        if machine.mem.read_slice(&mut have, addr).is_err() {
            continue;
        }
        let Some(first) = (0..PAGE_SIZE).find(|&i| want[i] != have[i]) else {
            continue;
        };
        differing += 1;
        if out.len() < limit {
            let last = (first..PAGE_SIZE)
                .rfind(|&i| want[i] != have[i])
                .unwrap_or(first);
            let end = (last + 1).min(first + 16);
            let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>();
            out.push(format!(
                "{:#x}: {} differing bytes in {:#x}..{:#x}; from {:#x}: {} -> {}",
                n * PAGE_SIZE as u64,
                (first..=last).filter(|&i| want[i] != have[i]).count(),
                n * PAGE_SIZE as u64 + first as u64,
                n * PAGE_SIZE as u64 + last as u64 + 1,
                n * PAGE_SIZE as u64 + first as u64,
                hex(&want[first..end]).join(" "),
                hex(&have[first..end]).join(" ")
            ));
        }
    }
    if differing > out.len() {
        out.push(format!("... and {} more pages", differing - out.len()));
    }
    out
}

/// Which devices' states differ from a checkpoint's machine snapshot blob (written under
/// trace format `format`).
pub fn device_diff(machine: &Machine, machine_state: &[u8], format: u32) -> Vec<String> {
    let decoded = match decode_machine_state(machine_state, format, machine) {
        Ok(d) => d,
        Err(e) => return vec![format!("the recorded machine state does not decode: {e}")],
    };
    let short = |d: &DeviceState| {
        let t = format!("{d:?}");
        if t.len() > 240 {
            format!("{}...", &t[..t.floor_char_boundary(240)])
        } else {
            t
        }
    };
    let now: BTreeMap<String, DeviceState> = machine
        .device_keys()
        .into_iter()
        .zip(machine.save_devices())
        .collect();
    let keys: std::collections::BTreeSet<&String> =
        decoded.devices.keys().chain(now.keys()).collect();
    let mut out = Vec::new();
    for key in keys {
        match (decoded.devices.get(key).map(|(_, d)| d), now.get(key)) {
            (Some(a), Some(b)) if a == b => {}
            (Some(a), Some(b)) => out.push(format!("{key}: {} -> {}", short(a), short(b))),
            (Some(a), None) => out.push(format!("{key}: {} -> missing", short(a))),
            (None, Some(_)) => {}
            (None, None) => {}
        }
    }
    out
}

/// Calls `f` with the number and contents of every resident page of guest memory (RAM and
/// ROM), in ascending order. Pages the host never backed are zero and are skipped without
/// being read, so a mostly untouched guest costs little whatever its RAM size. The guest
/// must not be running (callers are on the vCPU thread between exits).
pub fn for_each_resident_page(machine: &Machine, mut f: impl FnMut(u64, &[u8])) {
    let mut regions: Vec<_> = machine.mem.iter().collect();
    regions.sort_by_key(|r| r.start_addr().0);
    for region in regions {
        let start = region.start_addr().0;
        let len = region.len() as usize;
        let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) else {
            continue;
        };
        let pages = len.div_ceil(PAGE_SIZE);
        let mut resident = vec![0u8; pages];
        // SAFETY: `host..host+len` is the region's own mapping, which `machine.mem` keeps
        // alive; mincore only reads the page tables and writes `pages` bytes into `resident`.
        let rc = unsafe { libc::mincore(host.cast(), len, resident.as_mut_ptr()) };
        if rc != 0 {
            // Cannot tell residency: treat every page as resident (correct, slower).
            resident.fill(1);
        }
        for (i, r) in resident.iter().enumerate() {
            if r & 1 == 0 {
                continue;
            }
            let off = i * PAGE_SIZE;
            let n = PAGE_SIZE.min(len - off);
            // SAFETY: `off + n <= len` lies inside the mapping; the guest is not running, so
            // nothing writes the page while this shared view exists.
            let page = unsafe { std::slice::from_raw_parts(host.add(off), n) };
            f((start + off as u64) / PAGE_SIZE as u64, page);
        }
    }
}

fn is_zero(page: &[u8]) -> bool {
    page.iter().all(|&b| b == 0)
}

/// The digest scheme this build records with: version 3 over every device of `machine`.
pub fn current_digest_scheme(machine: &Machine) -> DigestScheme {
    DigestScheme {
        version: 3,
        devices: machine.device_keys(),
    }
}

/// The digest scheme a trace's header names (traces before format 7 have none: scheme 1).
pub fn recorded_digest_scheme(header: &deja_traces::Header) -> DigestScheme {
    header.digest_scheme.clone().unwrap_or(DigestScheme {
        version: 1,
        devices: Vec::new(),
    })
}

/// Checks that this build computes `scheme` and that `machine` has every device it covers
/// (before a replay starts, so that no digest fails for a reason that is not the guest's).
pub fn check_digest_scheme(machine: &Machine, scheme: &DigestScheme) -> Result<(), StateError> {
    if !(1..=3).contains(&scheme.version) {
        return Err(StateError::DigestScheme {
            detail: format!(
                "the trace's digests use scheme {}; this build computes schemes 1 to 3",
                scheme.version
            ),
        });
    }
    let keys = machine.device_keys();
    if let Some(missing) = scheme.devices.iter().find(|d| !keys.contains(d)) {
        return Err(StateError::DigestScheme {
            detail: format!(
                "the trace's digests cover a device {missing:?} this machine does not have"
            ),
        });
    }
    Ok(())
}

/// The state digest under `scheme`, computed from scratch: BLAKE3 over the CPU's
/// architectural core, the devices, and guest memory. Identical machines on either engine
/// give identical digests. Scheme 1 digests every device's state in machine order (what
/// traces before format 7 hold); schemes 2 and 3 each device the scheme lists by its own
/// [`deja_machine::devices::Device::digest`], so devices beyond the list do not count.
/// Schemes 1 and 2 hash every non-zero page (number and contents) in order; scheme 3 hashes
/// the lane-wise sum of per-page hashes ([`crate::memory`]), which [`StateDigester`] keeps
/// current from the pages written, so its digests cost what changed rather than RAM size.
pub fn state_digest(machine: &Machine, cpu: &CpuState, scheme: &DigestScheme) -> Digest {
    let sum = (scheme.version >= 3).then(|| crate::memory::full_memory_sum(machine));
    digest_with(machine, cpu, scheme, sum)
}

/// [`state_digest`] with scheme 3's memory sum given (`None` for schemes 1 and 2, which
/// hash memory here).
fn digest_with(
    machine: &Machine,
    cpu: &CpuState,
    scheme: &DigestScheme,
    memory_sum: Option<crate::memory::PageHash>,
) -> Digest {
    let mut h = blake3::Hasher::new();
    if scheme.version == 1 {
        h.update(b"deja-state-v1\0");
        h.update(&cpu_core(cpu));
        h.update(&encode(&machine.save_devices()));
    } else {
        h.update(if scheme.version == 2 {
            b"deja-state-v2\0"
        } else {
            b"deja-state-v3\0"
        });
        h.update(&cpu_core(cpu));
        let keys = machine.device_keys();
        for key in &scheme.devices {
            // A device the machine lacks was refused by check_digest_scheme before the run.
            let digest = keys
                .iter()
                .position(|k| k == key)
                .and_then(|i| machine.device_digest(i))
                .unwrap_or([0; 32]);
            h.update(key.as_bytes());
            h.update(&[0]);
            h.update(&digest);
        }
    }
    match memory_sum {
        Some(sum) => {
            for lane in sum {
                h.update(&lane.to_le_bytes());
            }
        }
        None => for_each_resident_page(machine, |n, page| {
            if !is_zero(page) {
                h.update(&n.to_le_bytes());
                h.update(page);
            }
        }),
    }
    Digest::from(h.finalize())
}

/// Computes a run's state digests under its scheme, and keeps the page hashes that make
/// scheme 3's digests and incremental checkpoints cost in proportion to the pages written
/// since the last one (the recorder and the replayer each own one for a run).
#[derive(Debug)]
pub struct StateDigester {
    scheme: DigestScheme,
    memory: crate::memory::MemoryHashes,
}

impl StateDigester {
    /// A digester for `scheme`; its first digest reads all of memory.
    pub fn new(scheme: DigestScheme) -> Self {
        Self {
            scheme,
            memory: crate::memory::MemoryHashes::new(),
        }
    }

    /// The scheme the digests follow.
    pub fn scheme(&self) -> &DigestScheme {
        &self.scheme
    }

    /// The page hashes (for their counters).
    pub fn memory(&self) -> &crate::memory::MemoryHashes {
        &self.memory
    }

    /// Memory was rewritten in a way the dirty bitmap may not show (a machine reset or a
    /// restore into a machine that ran): the next digest reads all of it.
    pub fn invalidate(&mut self) {
        self.memory.invalidate();
    }

    /// Brings the page hashes up to date and returns the pages changed since the last
    /// checkpoint or call ([`crate::memory::MemoryHashes::take_changed`]), or `None` when
    /// the hashes knew nothing before this refresh (a fresh or invalidated digester), so
    /// that any page may have changed.
    pub fn take_changed_pages(
        &mut self,
        machine: &Machine,
        cpu: &mut dyn Cpu,
    ) -> Option<std::collections::BTreeSet<u64>> {
        let primed = self.memory.primed();
        self.memory.refresh(machine, cpu);
        let changed = self.memory.take_changed();
        primed.then_some(changed)
    }

    /// The state digest of `machine` with CPU state `state` (`cpu`'s, which is asked for
    /// the pages its guest wrote).
    pub fn digest(&mut self, machine: &Machine, cpu: &mut dyn Cpu, state: &CpuState) -> Digest {
        self.memory.refresh(machine, cpu);
        if self.scheme.version >= 3 {
            digest_with(machine, state, &self.scheme, Some(self.memory.sum()))
        } else {
            state_digest(machine, state, &self.scheme)
        }
    }
}

/// What a checkpoint holds, ready for [`deja_traces::TraceWriter::checkpoint`].
pub struct Snapshot {
    /// The position.
    pub position: deja_traces::Position,
    /// bincode [`CpuState`].
    pub cpu_state: Vec<u8>,
    /// bincode [`MachineSnapshot`].
    pub machine_state: Vec<u8>,
    /// The state digest.
    pub digest: Digest,
    /// Pages changed since the previous checkpoint (every non-zero page when full).
    pub pages: Vec<(u64, Vec<u8>)>,
}

/// Takes a snapshot: CPU, devices, the state digest under the digester's scheme, and the
/// pages changed since the previous checkpoint (every non-zero page when `full`).
pub fn snapshot(
    machine: &Machine,
    cpu: &mut dyn Cpu,
    next_poll: u64,
    digester: &mut StateDigester,
    full: bool,
) -> Result<Snapshot, StateError> {
    let state = cpu.state()?;
    let position = trace_position(machine.position());
    let digest = digester.digest(machine, cpu, &state);
    let pages = digester.memory.checkpoint_pages(machine, full);
    Ok(Snapshot {
        position,
        cpu_state: encode_cpu_state(&state),
        machine_state: encode(&save_machine_state(machine, next_poll)),
        digest,
        pages,
    })
}

/// The guest-physical address of page `n` of RAM or ROM (a checkpoint holds every resident
/// page, ROM too), or an error when a trace names a page this machine does not have (a page number whose address does not even fit in 64 bits
/// must not wrap onto a real page).
fn ram_page_address(
    machine: &Machine,
    n: u64,
) -> Result<deja_machine::vm_memory::GuestAddress, StateError> {
    n.checked_mul(PAGE_SIZE as u64)
        .filter(|&addr| machine.layout.is_ram(addr) || machine.layout.is_rom(addr))
        .map(deja_machine::vm_memory::GuestAddress)
        .ok_or(StateError::PageOutsideMemory { page: n })
}

/// Restores a checkpoint into a freshly built machine: memory (every resident page not in
/// `memory` is zeroed), CPU state and icount, devices, position. Returns the poll schedule
/// to give [`deja_engine::Vm::set_next_poll`] and the restored CPU state. `format` is the
/// trace's format version (see [`decode_cpu_state`]).
pub fn restore(
    machine: &mut Machine,
    cpu: &mut dyn Cpu,
    memory: &deja_traces::MemoryImage,
    cpu_state: &[u8],
    machine_state: &[u8],
    format: u32,
) -> Result<(u64, CpuState), StateError> {
    let state = decode_cpu_state(cpu_state, format)?;
    let snap = decode_machine_state(machine_state, format, machine)?;
    let mut stale = Vec::new();
    for_each_resident_page(machine, |n, page| {
        if memory.page(n).is_none() && !is_zero(page) {
            stale.push(n);
        }
    });
    let pages = stale
        .into_iter()
        .map(|n| (n, None))
        .chain(memory.pages().map(|(n, p)| (n, Some(&p[..]))));
    write_pages(machine, pages)?;
    restore_decoded(machine, cpu, &state, &snap)
}

/// Writes pages of guest memory: `(n, Some(bytes))` page `n` with `bytes`, `(n, None)` with
/// zeros. Every page number is checked before anything is written: a bad list changes
/// nothing.
pub fn write_pages<'a>(
    machine: &mut Machine,
    pages: impl IntoIterator<Item = (u64, Option<&'a [u8]>)>,
) -> Result<(), StateError> {
    let pages: Vec<(u64, Option<&[u8]>)> = pages.into_iter().collect();
    for &(n, _) in &pages {
        ram_page_address(machine, n)?;
    }
    use deja_machine::vm_memory::Bytes;
    let zero = [0u8; PAGE_SIZE];
    for (n, bytes) in pages {
        machine
            .mem
            .write_slice(bytes.unwrap_or(&zero), ram_page_address(machine, n)?)
            .map_err(|_| StateError::PageOutsideMemory { page: n })?;
    }
    Ok(())
}

/// Restores a decoded checkpoint's CPU state ([`decode_cpu_state`]), devices and position
/// ([`decode_machine_state`]) into a machine whose memory the caller has already brought to
/// the checkpoint's (a debugger's session rewrites only the pages that differ; decode
/// first, so that a bad checkpoint is refused before memory changes). Returns what
/// [`restore`] returns.
pub fn restore_decoded(
    machine: &mut Machine,
    cpu: &mut dyn Cpu,
    state: &CpuState,
    snap: &DecodedMachineState,
) -> Result<(u64, CpuState), StateError> {
    cpu.set_state(state)?;
    restore_devices(machine, snap)?;
    machine.set_position(Position {
        icount: snap.position.icount,
        exits: snap.position.exits,
    });
    if cpu.counts_instructions() {
        cpu.set_icount(snap.position.icount);
        if cpu.icount() != snap.position.icount {
            return Err(StateError::CannotSeek {
                engine: cpu.name(),
                wanted: snap.position.icount,
                actual: cpu.icount(),
            });
        }
    }
    Ok((snap.next_poll, state.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint CPU state as the format-3 recorder encoded it (before `pending_debug`):
    /// `CpuState::reset()` with RAX = 0x12345678, RIP = 0x2010, DR6 = 0xffff4ff0 and the
    /// interrupt shadow set, bytes produced by the build of commit 5ba0d6c.
    const FORMAT3_CPU_STATE: &[&str] = &[
        "fc7856341200fb000600000000000000000000000000fb1020020000fbffff030001010000000000fb00f0fc",
        "0000fffffbffff0b00010100000000000000fbffff0300010100000000000000fbffff030001010000000000",
        "0000fbffff0300010100000000000000fbffff0300010100000000000000fbffff0b00000100000000000000",
        "fbffff02000001000000000000fbffff00fbfffffc100000600000000000021bfc0009e0fefb7702fd060407",
        "000604070000000000fcf04ffffffb0004fb7f03000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "000000000000000000000000000000000000000000fb801f0000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000001000000",
    ];

    fn format3_bytes() -> Vec<u8> {
        let hex: String = FORMAT3_CPU_STATE.concat();
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    fn expected_format3_state() -> CpuState {
        let mut s = CpuState::reset();
        s.gpr[0] = 0x1234_5678;
        s.rip = 0x2010;
        s.dr6 = 0xffff_4ff0;
        s.pending.interrupt_shadow = true;
        s
    }

    #[test]
    fn format_1_to_3_checkpoints_decode_with_their_layout_and_no_pending_debug_trap() {
        let old = format3_bytes();
        for format in 1..PENDING_DEBUG_FORMAT {
            let s = decode_cpu_state(&old, format).unwrap();
            assert!(
                s == expected_format3_state(),
                "format {format}: {:#?}",
                expected_format3_state().diff(&s)
            );
            assert!(!s.pending_debug.any());
        }
        let err = decode_cpu_state(&old, PENDING_DEBUG_FORMAT).unwrap_err();
        assert!(
            err.to_string().contains("CPU state"),
            "an old blob read as format 4 fails: {err}"
        );
    }

    /// A state as layout 5 (trace formats 5 and 6, bare) encoded it: everything up to
    /// [`CpuState::x87_error_pins`], XCR0 being the field layout 6 appended.
    fn layout5_bytes(s: &CpuState) -> Vec<u8> {
        let full = encode(s);
        let tail = encode(&s.xcr0).len();
        full[..full.len() - tail].to_vec()
    }

    #[test]
    fn current_checkpoints_carry_the_pending_debug_trap() {
        let mut s = expected_format3_state();
        s.pending_debug = PendingDebug {
            trap: 0x4001,
            after_shadow: 0x4000,
        };
        let bytes = layout5_bytes(&s);
        assert_eq!(decode_cpu_state(&bytes, 6).unwrap(), s);
        assert_eq!(
            decode_cpu_state(&encode_cpu_state(&s), deja_traces::FORMAT_VERSION).unwrap(),
            s
        );
        const { assert!(deja_traces::FORMAT_VERSION >= X87_ERROR_PINS_FORMAT) };
        let err = decode_cpu_state(&bytes, 3).unwrap_err().to_string();
        assert!(err.contains("left over"), "{err}");
        // Without a trap or pins and with XCR0 at reset, the new layout is the old one plus
        // four empty fields and XCR0's one byte.
        let plain = encode(&expected_format3_state());
        assert_eq!(plain[..plain.len() - 5], format3_bytes()[..]);
        assert_eq!(plain[plain.len() - 1], 1, "XCR0 = 1");
    }

    /// A checkpoint holds every resident page, the firmware ROM's too: it restores into a
    /// machine built the same way (ROM pages are pages of the machine, not outside it).
    #[test]
    fn checkpoints_of_a_firmware_machine_restore_with_their_rom_pages() {
        use deja_engine::{EngineKind, build_vm};
        use deja_machine::loader::Image;
        let mut rom = vec![0xf4u8; 64 << 10]; // HLT everywhere; the reset vector too.
        rom[0xfff0] = 0xf4;
        let image = Image::firmware("rom.bin", rom);
        let vm = || {
            let config = deja_machine::MachineConfig {
                ram_size: 16 << 20,
                ..Default::default()
            };
            let host = Box::new(deja_machine::LiveHost::new(
                deja_machine::ClockMode::Virtual,
            ));
            build_vm(
                EngineKind::Bt,
                config,
                host,
                Box::new(std::io::sink()),
                &image,
            )
            .unwrap()
        };
        let mut a = vm();
        let scheme = current_digest_scheme(&a.machine);
        let mut digester = StateDigester::new(scheme.clone());
        let snap = snapshot(&a.machine, a.cpu.as_mut(), 0, &mut digester, true).unwrap();
        assert!(
            snap.pages
                .iter()
                .any(|(n, _)| a.machine.layout.is_rom(n * PAGE_SIZE as u64)),
            "the ROM's pages are resident and in the checkpoint"
        );
        let mut memory = deja_traces::MemoryImage::new();
        for (n, p) in &snap.pages {
            memory.set_page(*n, p);
        }
        let mut b = vm();
        let (_, state) = restore(
            &mut b.machine,
            b.cpu.as_mut(),
            &memory,
            &snap.cpu_state,
            &snap.machine_state,
            deja_traces::FORMAT_VERSION,
        )
        .unwrap();
        assert_eq!(state_digest(&b.machine, &state, &scheme), snap.digest);
    }

    /// From format 7 the CPU blob names its layout: a blob of an older layout (as a future
    /// build keeps writing after adding a field) reads through its `From` conversion under
    /// any trace format, and a newer layout than this build knows is refused by name.
    #[test]
    fn cpu_state_blobs_carry_their_layout_version() {
        let mut layout3 = encode(&3u32);
        layout3.extend(format3_bytes());
        let s = decode_cpu_state(&layout3, VERSIONED_STATE_FORMAT).unwrap();
        assert!(
            s == expected_format3_state(),
            "{:#?}",
            expected_format3_state().diff(&s)
        );
        let mut layout9 = encode(&9u32);
        layout9.extend(format3_bytes());
        let err = decode_cpu_state(&layout9, VERSIONED_STATE_FORMAT).unwrap_err();
        assert!(matches!(err, StateError::CpuLayout { found: 9 }), "{err}");
        // Without the prefix, a format-7 reader must not take a bare state for one.
        assert!(decode_cpu_state(&encode(&expected_format3_state()), 7).is_err());
    }

    /// Layout 6 added XCR0: a layout-5 blob (formats 5 and 6 bare, 7 and 8 with the prefix)
    /// reads as XCR0 = 1, the reset value; layout 6 keeps what XSETBV wrote; and XCR0 enters
    /// the state digest only once it differs from 1, so old recordings' digests still match.
    #[test]
    fn layout_5_states_read_with_xcr0_at_reset_and_the_digest_sees_xcr0_only_when_set() {
        let mut pins = expected_format3_state();
        pins.pending_debug.trap = 0x4000;
        pins.x87_error_pins.ferr = true;
        let mut body = format3_bytes();
        body.extend(encode(&pins.pending_debug));
        body.extend(encode(&pins.x87_error_pins));
        let mut prefixed = encode(&5u32);
        prefixed.extend(&body);
        for (bytes, format) in [(&body, 5), (&body, 6), (&prefixed, 7), (&prefixed, 8)] {
            let s = decode_cpu_state(bytes, format).unwrap();
            assert_eq!(s.xcr0, Xcr0::RESET, "format {format}");
            assert!(s == pins, "format {format}: {:#?}", pins.diff(&s));
        }
        let mut sse = pins.clone();
        sse.xcr0 = Xcr0(Xcr0::X87 | Xcr0::SSE);
        let back = decode_cpu_state(&encode_cpu_state(&sse), deja_traces::FORMAT_VERSION).unwrap();
        assert_eq!(back.xcr0, sse.xcr0);
        let mut before = cpu_core(&pins);
        assert_eq!(
            cpu_core(&{
                let mut p = pins.clone();
                p.xcr0 = Xcr0::RESET;
                p
            }),
            before
        );
        before.extend_from_slice(b"xcr0");
        before.extend_from_slice(&3u64.to_le_bytes());
        assert_eq!(cpu_core(&sse), before);
    }

    /// A pc machine on bt, for the device-state tests.
    fn pc_vm() -> deja_engine::Vm {
        let image = deja_machine::loader::Image::raw(
            "spin.bin",
            vec![0xeb, 0xfe],
            0x7c00,
            0x7c00,
            deja_machine::loader::EntryMode::Real,
        );
        let config = deja_machine::MachineConfig {
            ram_size: 16 << 20,
            ..Default::default()
        };
        let host = Box::new(deja_machine::LiveHost::new(
            deja_machine::ClockMode::Virtual,
        ));
        deja_engine::build_vm(
            deja_engine::EngineKind::Bt,
            config,
            host,
            Box::new(std::io::sink()),
            &image,
        )
        .unwrap()
    }

    /// Device states are stored by name: a checkpoint without some device (one deja added
    /// after the recording) restores the others and leaves that one in its boot state; a
    /// device this machine does not have, or a layout version it does not read, is refused
    /// by name.
    #[test]
    fn device_states_are_stored_by_name_with_their_versions() {
        let mut a = pc_vm();
        a.machine.pio_write(0x80, &[0x42]); // the POST port keeps its history
        let keys = a.machine.device_keys();
        assert_eq!(keys[0], "pc-irqchip");
        assert!(keys.contains(&"post".to_string()) && keys.contains(&"serial".to_string()));
        let scheme = current_digest_scheme(&a.machine);
        let mut digester = StateDigester::new(scheme.clone());
        let snap = snapshot(&a.machine, a.cpu.as_mut(), 7, &mut digester, true).unwrap();
        let mut memory = deja_traces::MemoryImage::new();
        for (n, p) in &snap.pages {
            memory.set_page(*n, p);
        }
        let mut stored: MachineSnapshot = decode(&snap.machine_state, "test").unwrap();
        assert_eq!(stored.devices.len(), keys.len());
        assert_eq!(stored.devices["post"].version, 1);

        let restore_into = |stored: &MachineSnapshot| {
            let mut b = pc_vm();
            let r = restore(
                &mut b.machine,
                b.cpu.as_mut(),
                &memory,
                &snap.cpu_state,
                &encode(stored),
                deja_traces::FORMAT_VERSION,
            );
            (b, r)
        };
        let (b, r) = restore_into(&stored);
        assert_eq!(r.unwrap().0, 7);
        assert_eq!(deja_machine::pc::post_codes(&b.machine), [0x42]);

        stored.devices.remove("post");
        let (b, r) = restore_into(&stored);
        r.unwrap();
        assert!(
            deja_machine::pc::post_codes(&b.machine).is_empty(),
            "boot state"
        );

        let mut extra = stored.clone();
        extra.devices.insert(
            "floppy".into(),
            DeviceBlob {
                version: 1,
                state: encode(&DeviceState::DebugExit),
            },
        );
        let err = restore_into(&extra).1.unwrap_err();
        assert!(
            matches!(&err, StateError::UnknownDevice { device } if device == "floppy"),
            "{err}"
        );

        stored.devices.get_mut("serial").unwrap().version = 2;
        let err = restore_into(&stored).1.unwrap_err();
        assert!(
            matches!(&err, StateError::DeviceVersion { device, found: 2, supported: 1 } if device == "serial"),
            "{err}"
        );
    }

    #[test]
    fn format_4_checkpoints_decode_with_their_layout_and_inactive_x87_error_pins() {
        // A format-4 blob: the format-3 fields, then the pending trap (BS), nothing after.
        let trap = PendingDebug {
            trap: 0x4000,
            after_shadow: 0,
        };
        let mut old = format3_bytes();
        old.extend(encode(&trap));
        let s = decode_cpu_state(&old, 4).unwrap();
        let mut want = expected_format3_state();
        want.pending_debug = trap;
        assert!(s == want, "{:#?}", want.diff(&s));
        assert_eq!(s.x87_error_pins, X87ErrorPins::default());
        assert!(
            decode_cpu_state(&old, 5).is_err(),
            "a format-4 blob is not format 5"
        );
        assert!(decode_cpu_state(&old, 3).is_err(), "nor format 3");
        let mut now = want.clone();
        now.x87_error_pins = X87ErrorPins {
            ferr: true,
            ignne: true,
        };
        assert_eq!(decode_cpu_state(&layout5_bytes(&now), 5).unwrap(), now);
    }
}
