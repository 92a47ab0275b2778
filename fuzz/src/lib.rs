//! What the fuzz targets share: turning fuzzer bytes into traces the reader gets past its
//! checksums with, exercising every read path of a trace, restoring checkpoints into a
//! small machine, and building loader inputs. `seedgen` uses the same encodings to turn
//! real traces and images into seed inputs.
//!
//! Input forms (see README.md):
//! - a trace as written (`DEJATRAC`): read as is, then again with every checksum fixed, so
//!   mutations reach the decoding behind the checksums;
//! - a *plain* trace (`DEJAPLAN`): the same layout with every frame payload stored
//!   uncompressed; the harness compresses the payloads, fixes lengths, offsets and checksums,
//!   so mutations reach the bincode decoders behind zstd;
//! - a checkpoint (`checkpoint_restore`): trace format, CPU state, machine state and pages,
//!   length-prefixed (see [`CheckpointInput`]);
//! - a loader input (`image_loaders`): a selector byte, raw-load parameters, image bytes (see
//!   [`LoaderInput`]).

use deja_bt::BtCpu;
use deja_machine::loader::{self, EntryMode, Image, ImageFormat};
use deja_machine::{ClockMode, Cpu, LiveHost, Machine, MachineConfig, build_pc};
use deja_recorder::state;
use deja_traces::{
    DumpOptions, FILE_MAGIC, FRAME_HEADER_LEN, MemoryImage, TRAILER_LEN, TRAILER_MAGIC, TraceReader,
};
use std::io::Cursor;

/// The first eight bytes of a plain trace: a trace whose frame payloads are uncompressed.
pub const PLAIN_MAGIC: [u8; 8] = *b"DEJAPLAN";
/// RAM of the machines the targets build: small, so that building one is quick.
pub const FUZZ_RAM: u64 = 16 << 20;
/// How many checkpoints of one trace are read or restored at most.
const MAX_CHECKPOINTS: usize = 8;
/// File header bytes before the encoded header: magic, version, header length.
const FILE_PREFIX_LEN: usize = 16;
/// Largest payload decompressed when converting a trace to plain form.
const MAX_PAYLOAD: usize = deja_traces::MAX_FRAME_PAYLOAD;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// The trace format's checksum: the first 8 bytes of BLAKE3 over `parts`.
fn checksum64(parts: &[&[u8]]) -> u64 {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(p);
    }
    u64_at(h.finalize().as_bytes(), 0)
}

/// End of the file header (prefix, encoded header, checksum), if the bytes hold one.
fn header_end(b: &[u8]) -> Option<usize> {
    if b.len() < FILE_PREFIX_LEN {
        return None;
    }
    let end = FILE_PREFIX_LEN
        .checked_add(u32_at(b, 12) as usize)?
        .checked_add(8)?;
    (end <= b.len()).then_some(end)
}

/// Where the frames end: before the trailer if the file ends with one.
fn frames_end(b: &[u8], header_end: usize) -> usize {
    if b.len() >= header_end + TRAILER_LEN && b[b.len() - 8..] == TRAILER_MAGIC {
        b.len() - TRAILER_LEN
    } else {
        b.len()
    }
}

/// A copy of `bytes` with the header, frame and trailer checksums recomputed wherever the
/// layout can be followed, so a reader checks everything else.
pub fn fix_checksums(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let Some(hend) = header_end(&out) else {
        return out;
    };
    let sum = checksum64(&[&out[8..hend - 8]]);
    out[hend - 8..hend].copy_from_slice(&sum.to_le_bytes());
    let end = frames_end(&out, hend);
    if end < out.len() {
        let sum = checksum64(&[&out[end..end + 8]]);
        out[end + 8..end + 16].copy_from_slice(&sum.to_le_bytes());
    }
    let mut off = hend;
    while off + FRAME_HEADER_LEN <= end {
        let payload_end = off + FRAME_HEADER_LEN + u32_at(&out, off + 56) as usize;
        if payload_end > end {
            break;
        }
        let sum = checksum64(&[
            &out[off..off + 60],
            &out[off + FRAME_HEADER_LEN..payload_end],
        ]);
        out[off + 60..off + FRAME_HEADER_LEN].copy_from_slice(&sum.to_le_bytes());
        off = payload_end;
    }
    out
}

/// Rebuilds the trailer of a converted trace: the footer offset it names is moved with the
/// frames (`moved` maps old frame offsets to new ones).
fn push_trailer(out: &mut Vec<u8>, old_trailer: &[u8], moved: &[(u64, u64)]) {
    let old = u64_at(old_trailer, 0);
    let new = moved
        .iter()
        .find(|(from, _)| *from == old)
        .map_or(old, |(_, to)| *to);
    out.extend_from_slice(&new.to_le_bytes());
    out.extend_from_slice(&old_trailer[8..]);
}

/// A trace converted to plain form (payloads decompressed), or `None` if a payload does not
/// decompress. The inverse of [`from_plain`]; used to make seeds.
pub fn to_plain(trace: &[u8]) -> Option<Vec<u8>> {
    let hend = header_end(trace)?;
    let end = frames_end(trace, hend);
    let mut out = PLAIN_MAGIC.to_vec();
    out.extend_from_slice(&trace[8..hend]);
    let mut moved = Vec::new();
    let mut off = hend;
    while off + FRAME_HEADER_LEN <= end {
        let payload_end = off + FRAME_HEADER_LEN + u32_at(trace, off + 56) as usize;
        if payload_end > end {
            break;
        }
        let payload =
            zstd::bulk::decompress(&trace[off + FRAME_HEADER_LEN..payload_end], MAX_PAYLOAD)
                .ok()?;
        moved.push((off as u64, out.len() as u64));
        out.extend_from_slice(&trace[off..off + FRAME_HEADER_LEN]);
        out.extend_from_slice(&payload);
        off = payload_end;
    }
    if end < trace.len() {
        push_trailer(&mut out, &trace[end..], &moved);
    }
    Some(out)
}

/// A real trace from a plain one: each frame's payload (as many bytes as its uncompressed
/// length says, or what is left) is compressed, the compressed length and every checksum
/// set, and the trailer's footer offset moved with the frames. Bytes too short for a frame
/// stay at the end as they were.
pub fn from_plain(plain: &[u8]) -> Vec<u8> {
    let Some(hend) = header_end(plain) else {
        return plain.to_vec();
    };
    let end = frames_end(plain, hend);
    let mut out = FILE_MAGIC.to_vec();
    out.extend_from_slice(&plain[8..hend]);
    let mut moved = Vec::new();
    let mut off = hend;
    while off + FRAME_HEADER_LEN <= end {
        let start = off + FRAME_HEADER_LEN;
        let len = (u32_at(plain, off + 52) as usize).min(end - start);
        let compressed = zstd::bulk::compress(&plain[start..start + len], 1).unwrap_or_default();
        moved.push((off as u64, out.len() as u64));
        let mut header = [0u8; FRAME_HEADER_LEN];
        header.copy_from_slice(&plain[off..start]);
        header[56..60].copy_from_slice(&(compressed.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&compressed);
        off = start + len;
    }
    out.extend_from_slice(&plain[off..end]);
    if end < plain.len() {
        push_trailer(&mut out, &plain[end..], &moved);
    }
    fix_checksums(&out)
}

/// The traces a fuzz input stands for: a plain trace compressed, or a real one as is and
/// with its checksums fixed (when that changes anything).
pub fn traces_of(data: &[u8]) -> Vec<Vec<u8>> {
    if data.starts_with(&PLAIN_MAGIC) {
        return vec![from_plain(data)];
    }
    let fixed = fix_checksums(data);
    if fixed == data {
        vec![fixed]
    } else {
        vec![data.to_vec(), fixed]
    }
}

/// Opens `trace` and reads everything a `deja` command can: info, the header's machine
/// configuration and image formats, every event, checkpoints with their memory and the
/// events after them, verify, stats and dump. Errors are expected; panics are findings.
pub fn exercise_trace(trace: &[u8]) {
    let Ok(mut r) = TraceReader::new(Cursor::new(trace), "fuzz.trace") else {
        return;
    };
    let _ = deja_traces::info(&r).to_string();
    let header = r.header().clone();
    let _ = deja_replayer::machine_config(&header, "fuzz.trace");
    for image in &header.images {
        let _ = state::decode_json::<ImageFormat>(&image.load_spec, "image format");
    }
    for event in r.events() {
        if event.is_err() {
            break;
        }
    }
    let checkpoints = r.checkpoints().to_vec();
    for cp in checkpoints.iter().take(MAX_CHECKPOINTS) {
        let _ = r.nearest_checkpoint(cp.position);
        let _ = r.memory_at(cp);
        let _ = r.read_checkpoint(cp);
        if let Ok(events) = r.events_after(cp) {
            for event in events {
                if event.is_err() {
                    break;
                }
            }
        }
    }
    if let Ok(report) = deja_traces::verify(&mut r) {
        let _ = report.to_string();
    }
    if let Ok(stats) = deja_traces::stats(&mut r) {
        let _ = stats.to_string();
    }
    let opts = DumpOptions {
        checkpoints: true,
        ..DumpOptions::default()
    };
    let _ = deja_traces::dump(&mut r, &mut std::io::sink(), &opts);
}

/// A fresh deja-pc machine of [`FUZZ_RAM`] (serial output discarded) and a bt engine on it.
pub fn small_vm() -> (Machine, BtCpu) {
    let config = MachineConfig {
        ram_size: FUZZ_RAM,
        ..MachineConfig::default()
    };
    let host = Box::new(LiveHost::new(ClockMode::Virtual));
    let machine = build_pc(config, host, Box::new(std::io::sink())).expect("a 16 MiB deja-pc");
    let cpu = BtCpu::new(&machine).expect("a bt engine");
    (machine, cpu)
}

/// Restores a checkpoint into a fresh [`small_vm`] as `deja replay --seek` does, then takes
/// the state digest and the device diff of the restored machine.
pub fn restore(memory: &MemoryImage, cpu_state: &[u8], machine_state: &[u8], format: u32) {
    let (mut machine, mut cpu) = small_vm();
    if let Ok((_, state)) = state::restore(
        &mut machine,
        &mut cpu,
        memory,
        cpu_state,
        machine_state,
        format,
    ) {
        let _ = state::state_digest(&machine, &state, &state::current_digest_scheme(&machine));
        let _ = state::device_diff(&machine, machine_state, format);
        let _ = cpu.state();
    }
}

/// Restores every checkpoint (up to a few) of `trace`.
pub fn restore_checkpoints(trace: &[u8]) {
    let Ok(mut r) = TraceReader::new(Cursor::new(trace), "fuzz.trace") else {
        return;
    };
    let format = r.format_version();
    let checkpoints = r.checkpoints().to_vec();
    for cp in checkpoints.iter().take(MAX_CHECKPOINTS) {
        let (Ok(memory), Ok(checkpoint)) = (r.memory_at(cp), r.read_checkpoint(cp)) else {
            continue;
        };
        let meta = checkpoint.meta;
        restore(&memory, &meta.cpu_state, &meta.device_state, format);
    }
}

/// A checkpoint as `checkpoint_restore` takes it:
/// `format (u8) | cpu_len (u32 LE) | cpu_state | machine_len (u32 LE) | machine_state |
/// pages`, each page a page number (u64 LE) and up to 4096 bytes (the last may be short).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckpointInput {
    /// The trace format the CPU state was written in.
    pub format: u8,
    /// bincode `CpuState`.
    pub cpu_state: Vec<u8>,
    /// bincode `MachineSnapshot`.
    pub machine_state: Vec<u8>,
    /// Guest memory pages.
    pub pages: Vec<(u64, Vec<u8>)>,
}

impl CheckpointInput {
    /// Splits fuzzer bytes; `None` if they end inside a length or a blob.
    pub fn parse(data: &[u8]) -> Option<Self> {
        let (&format, rest) = data.split_first()?;
        let (cpu_state, rest) = take_blob(rest)?;
        let (machine_state, mut rest) = take_blob(rest)?;
        let mut pages = Vec::new();
        while rest.len() >= 8 {
            let n = u64_at(rest, 0);
            let len = (rest.len() - 8).min(deja_traces::PAGE_SIZE);
            pages.push((n, rest[8..8 + len].to_vec()));
            rest = &rest[8 + len..];
        }
        Some(Self {
            format,
            cpu_state: cpu_state.to_vec(),
            machine_state: machine_state.to_vec(),
            pages,
        })
    }

    /// The bytes [`CheckpointInput::parse`] reads back.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.format];
        for blob in [&self.cpu_state, &self.machine_state] {
            out.extend_from_slice(&(blob.len() as u32).to_le_bytes());
            out.extend_from_slice(blob);
        }
        for (n, page) in &self.pages {
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(page);
        }
        out
    }

    /// The pages as sparse memory.
    pub fn memory(&self) -> MemoryImage {
        let mut memory = MemoryImage::new();
        for (n, page) in &self.pages {
            memory.set_page(*n, page);
        }
        memory
    }
}

fn take_blob(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32_at(data.get(..4)?, 0) as usize;
    let rest = &data[4..];
    (len <= rest.len()).then(|| rest.split_at(len))
}

/// An image loader input as `image_loaders` takes it: `selector (u8) | load_addr (u64 LE) |
/// entry (u64 LE) | mode (u8) | image bytes`. The selector's low 3 bits (mod 5) choose the
/// format (raw, multiboot, firmware, firmware padded with zeros to whole 64 KiB, or detect),
/// bit 3 a 2 MiB machine instead of 16 MiB, bit 4 a kernel command line. The raw fields are
/// there (and ignored) for every format, so inputs keep one layout; after detection, an odd
/// mode boots a Linux kernel through its PVH entry (a bzImage through its payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderInput {
    /// Selector byte.
    pub selector: u8,
    /// Raw load address.
    pub load_addr: u64,
    /// Raw entry point.
    pub entry: u64,
    /// Raw entry mode (mod 3: real, protected, long); after detection, bit 0 asks for the
    /// PVH entry.
    pub mode: u8,
    /// The image.
    pub bytes: Vec<u8>,
}

/// Bytes before a [`LoaderInput`]'s image.
const LOADER_PREFIX: usize = 18;

impl LoaderInput {
    /// Splits fuzzer bytes; `None` if they are shorter than the fixed fields.
    pub fn parse(data: &[u8]) -> Option<Self> {
        if data.len() < LOADER_PREFIX {
            return None;
        }
        Some(Self {
            selector: data[0],
            load_addr: u64_at(data, 1),
            entry: u64_at(data, 9),
            mode: data[17],
            bytes: data[LOADER_PREFIX..].to_vec(),
        })
    }

    /// The input that loads `image` as its format says.
    pub fn from_image(image: &Image) -> Self {
        let (selector, load_addr, entry, mode) = match image.format {
            ImageFormat::Raw {
                load_addr,
                entry,
                mode,
            } => (0, load_addr, entry, mode as u8),
            ImageFormat::Multiboot => (1, 0, 0, 0),
            ImageFormat::Firmware => (2, 0, 0, 0),
            // Detection finds a bzImage by its setup header, a vmlinux by its PVH note.
            ImageFormat::Linux => (4, 0, 0, 0),
            // Mode 1 after detection: the PVH entry (a bzImage through its payload).
            ImageFormat::Pvh => (4, 0, 0, 1),
        };
        Self {
            selector,
            load_addr,
            entry,
            mode,
            bytes: image.bytes.clone(),
        }
    }

    /// The bytes [`LoaderInput::parse`] reads back.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.selector];
        out.extend_from_slice(&self.load_addr.to_le_bytes());
        out.extend_from_slice(&self.entry.to_le_bytes());
        out.push(self.mode);
        out.extend_from_slice(&self.bytes);
        out
    }

    /// The image to load, or `None` if detection finds no multiboot header.
    pub fn image(&self) -> Option<Image> {
        let name = "fuzz.img";
        let bytes = self.bytes.clone();
        Some(match (self.selector & 7) % 5 {
            0 => {
                let mode = [EntryMode::Real, EntryMode::Protected, EntryMode::Long]
                    [usize::from(self.mode % 3)];
                Image::raw(name, bytes, self.load_addr, self.entry, mode)
            }
            1 => Image::multiboot(name, bytes),
            2 => Image::firmware(name, bytes),
            3 => {
                let mut bytes = bytes;
                let rom = 64 << 10;
                bytes.resize(bytes.len().div_ceil(rom).max(1) * rom, 0);
                Image::firmware(name, bytes)
            }
            _ => {
                let mut image = Image::detect(name, bytes).ok()?;
                if self.mode & 1 != 0 {
                    let max = self.config().ram_size;
                    image.set_kernel_entry(loader::KernelEntry::Pvh, max).ok()?;
                }
                image
            }
        })
    }

    /// The machine configuration the selector chooses.
    pub fn config(&self) -> MachineConfig {
        MachineConfig {
            ram_size: if self.selector & 8 != 0 {
                2 << 20
            } else {
                FUZZ_RAM
            },
            cmdline: if self.selector & 16 != 0 {
                "console=ttyS0 deja.fuzz=1".into()
            } else {
                String::new()
            },
            ..MachineConfig::default()
        }
    }
}

/// Loads `image` into a fresh deja-pc machine of `config` as `deja run` does, starts a bt
/// engine in the state the loader chose, and loads the image again as after a reset.
pub fn load_image(config: MachineConfig, image: &Image) {
    let host = Box::new(LiveHost::new(ClockMode::Virtual));
    let Ok(mut machine) = build_pc(config, host, Box::new(std::io::sink())) else {
        return;
    };
    let Ok(state) = loader::load(&mut machine, image) else {
        return;
    };
    if let Ok(mut cpu) = BtCpu::new(&machine) {
        let _ = cpu.set_state(&state);
    }
    let _ = loader::reload(&mut machine, image);
}
