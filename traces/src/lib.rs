//! The deja trace format: everything a recording needs to replay a run bit for bit.
//!
//! A trace is one append-only file:
//!
//! ```text
//! file header   magic "DEJATRAC", format version (u32 LE), header length (u32 LE),
//!               bincode [`Header`], 64-bit BLAKE3 prefix of version..header
//! frames        each: 68-byte fixed [`FrameHeader`] + zstd-compressed payload
//!                 Events           bincode (icount delta, exits delta, [`EventKind`]) per
//!                                  event; deltas from the previous event, the first
//!                                  event is at the frame's first position
//!                 CheckpointPages  raw (page number u64 LE, 4096 bytes) items
//!                 Checkpoint       bincode [`CheckpointMeta`]; commits the pages before it
//!                 Footer           bincode [`Footer`] (always the last frame)
//! trailer       footer offset (u64 LE), 64-bit BLAKE3 prefix of it, magic "DEJAEND\0"
//! ```
//!
//! Every frame's checksum covers its fixed header and its compressed payload, so any bit flip
//! is caught and reported with the frame's sequence number and offset. A trace cut short (a
//! crash, a full disk) has no trailer; readers then walk the frames and everything up to the
//! last whole frame stays readable.
//!
//! Recording: [`TraceWriter::create`] with a [`Header`], then [`TraceWriter::push`] every
//! `Host` answer (and recorder facts) with its [`Position`], [`TraceWriter::checkpoint`] now
//! and then (pages from a [`PageTracker`]), and [`TraceWriter::finish`].
//!
//! Replaying from position P: [`TraceReader::open`], [`TraceReader::nearest_checkpoint`]`(P)`,
//! [`TraceReader::memory_at`] (copy its pages into zeroed guest memory),
//! [`TraceReader::read_checkpoint`] for the CPU and device blobs, then
//! [`TraceReader::events_after`] the checkpoint. From the start: [`TraceReader::events`].
//!
//! This crate knows nothing of engines: machine-specific state (CPU state, device state) is
//! carried as opaque blobs the recorder encodes, and everything a human wants to see in
//! `deja trace info` (machine configuration, CPUID table, images) is held in plain types here.

mod frame;
pub mod memory;
pub mod reader;
pub mod testing;
pub mod tools;
mod types;
pub mod writer;

pub use frame::{FRAME_HEADER_LEN, FrameHeader, FrameKind, TRAILER_LEN};
pub use memory::{MemoryImage, PageTracker};
pub use reader::{Checkpoint, Events, ReadError, TraceReader, TraceStatus};
pub use tools::{DumpOptions, TraceInfo, TraceStats, VerifyReport, dump, info, stats, verify};
pub use types::*;
pub use writer::{TraceWriter, WriteError, WriterOptions};

/// The first eight bytes of every trace file.
pub const FILE_MAGIC: [u8; 8] = *b"DEJATRAC";
/// The last eight bytes of a trace that was finished properly.
pub const TRAILER_MAGIC: [u8; 8] = *b"DEJAEND\0";
/// The format version this build writes, and the newest it reads. Version 2 added the
/// [`EventKind::Registers`] event; version 3 the header's
/// [`Header::on_reset`] at its end; version 4 a pending debug trap at the end of the CPU
/// state a checkpoint holds (the engines' `CpuState::pending_debug`; the blob is opaque to
/// this crate, and the recorder's `state::decode_cpu_state` reads the format 1-3 layout);
/// version 5 the x87 FERR#/IGNNE# pins after it (`CpuState::x87_error_pins`); version 6
/// ([`DUE_POLLS_FORMAT`]) logs a device poll's time read only when a deadline had passed;
/// version 7 ([`GUEST_CPUID_FORMAT`]) adds [`Header::guest_cpuid`], [`Header::host_cpu`] and
/// [`Header::digest_scheme`] at the header's end, and checkpoints of versioned state (the
/// snapshot crate's `VERSIONED_STATE_FORMAT`); version 8 ([`EMBEDDED_IMAGES_FORMAT`]) image
/// frames ([`FrameKind::Image`]) holding the images' bytes; version 9
/// ([`FIRMWARE_REVISION_FORMAT`]) [`Header::firmware_revision`] at the header's end. Older
/// traces still read (their headers with `on_reset` = [`ResetPolicy::Stop`], what every
/// recording did then, no CPUID or host CPU, and no firmware revision).
pub const FORMAT_VERSION: u32 = 9;
/// The first format version whose header names the revision of the firmware tables the
/// machine had ([`Header::firmware_revision`]); older traces were all recorded with
/// revision 1.
pub const FIRMWARE_REVISION_FORMAT: u32 = 9;
/// The first format version whose traces may embed the images they boot
/// ([`FrameKind::Image`] frames, written before any event).
pub const EMBEDDED_IMAGES_FORMAT: u32 = 8;
/// The first format version whose header records the CPUID answers the guest got and the
/// recording host's CPU.
pub const GUEST_CPUID_FORMAT: u32 = 7;
/// The first format version in which a device poll's time read is logged only when the
/// machine's earliest device deadline had passed (`Host::time_if_due`); a logged read
/// before the deadline is a poll that found nothing due, logged only because another time
/// read followed at the same position. Before it, every poll of a machine with a deadline
/// logged its read, and a replay hands each back as it was.
pub const DUE_POLLS_FORMAT: u32 = 6;
/// The oldest format version this build reads.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// The deja version compiled into this crate, for [`Header::deja_version`].
pub const DEJA_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Guest page size: checkpoints store memory in pages of this many bytes.
pub const PAGE_SIZE: usize = 4096;
/// The largest uncompressed frame payload a reader accepts (and a writer produces). Every
/// length read from a file is checked against a cap like this before anything is allocated.
pub const MAX_FRAME_PAYLOAD: usize = 16 << 20;
/// The largest encoded header a reader accepts.
pub const MAX_HEADER_LEN: usize = 1 << 20;

/// The bincode configuration of every encoded item: variable-length integers (small events),
/// and a decode limit so a hostile length prefix cannot make the reader allocate without bound.
pub(crate) fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_PAYLOAD>()
}

/// The 64-bit prefix of a BLAKE3 hash, the checksum of frames, header and trailer.
pub(crate) fn checksum64(parts: &[&[u8]]) -> u64 {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(p);
    }
    let bytes = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes.as_bytes()[..8]);
    u64::from_le_bytes(first)
}
