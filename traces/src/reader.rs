//! Trace reader: validates the header, finds the footer from the trailer (or walks the frames
//! of a trace cut short), iterates events, reads checkpoints and reconstructs memory.
//!
//! Nothing read from the file is trusted: every length is capped before allocating, every
//! payload is checked against its frame checksum before it is decompressed, and bincode
//! decodes with a size limit.

use crate::frame::{
    FILE_PREFIX_LEN, FRAME_HEADER_LEN, FrameHeader, FrameKind, PAGE_ITEM_LEN, TRAILER_LEN,
    decode_trailer,
};
use crate::memory::MemoryImage;
use crate::types::{
    CheckpointIndexEntry, CheckpointMeta, Event, EventKind, Footer, FrameIndexEntry, Header,
    Position,
};
use crate::{FILE_MAGIC, FORMAT_VERSION, MAX_HEADER_LEN, OLDEST_FORMAT_VERSION, PAGE_SIZE};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use thiserror::Error;

/// Failures reading a trace.
#[derive(Debug, Error)]
pub enum ReadError {
    /// The file could not be opened or read.
    #[error("reading trace {name} at offset {offset}: {source}")]
    Io {
        /// The file.
        name: String,
        /// Where.
        offset: u64,
        /// Why.
        source: std::io::Error,
    },
    /// The file does not start with the trace magic.
    #[error("{name} is not a deja trace: it starts with {found:02x?}, not \"DEJATRAC\"")]
    NotATrace {
        /// The file.
        name: String,
        /// Its first bytes.
        found: Vec<u8>,
    },
    /// The format version is not one this build reads.
    #[error(
        "trace {name} has format version {found}, but this deja reads format versions \
         {OLDEST_FORMAT_VERSION} to {supported}{}",
        if *found > *supported { " (it was written by a newer deja)" } else { "" }
    )]
    UnsupportedVersion {
        /// The file.
        name: String,
        /// The file's version.
        found: u32,
        /// The version this build supports.
        supported: u32,
    },
    /// The file ends inside its header.
    #[error("trace {name} is {len} bytes long, too short for its header ({needed} bytes)")]
    TruncatedHeader {
        /// The file.
        name: String,
        /// File length.
        len: u64,
        /// Bytes the header needs.
        needed: u64,
    },
    /// The header is damaged.
    #[error("trace {name} has a damaged header: {detail}")]
    BadHeader {
        /// The file.
        name: String,
        /// What is wrong.
        detail: String,
    },
    /// A frame is damaged (checksum mismatch, bad magic, bad lengths, undecodable payload).
    #[error("trace {name}: frame {frame} at offset {offset}: {detail}")]
    Frame {
        /// The file.
        name: String,
        /// The frame's sequence number (the one expected at that place).
        frame: u64,
        /// Offset of its header.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// A checkpoint asked for is not in the trace.
    #[error("trace {name} has no checkpoint {ordinal} (it has {count})")]
    NoSuchCheckpoint {
        /// The file.
        name: String,
        /// Ordinal asked for.
        ordinal: u64,
        /// Checkpoints present.
        count: usize,
    },
}

/// Whether the trace was finished properly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TraceStatus {
    /// Footer and trailer present and valid.
    Complete,
    /// The trace ends early (no trailer): everything before `valid_until` is whole frames.
    Truncated {
        /// End of the last whole frame.
        valid_until: u64,
        /// Whole frames.
        whole_frames: u64,
        /// What the reader found at the cut.
        detail: String,
    },
    /// The footer or a frame is damaged; the reader walked the frames instead. Reading
    /// events reports the damaged frame when it gets there.
    Damaged {
        /// What is wrong.
        detail: String,
    },
}

impl std::fmt::Display for TraceStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TraceStatus::Complete => write!(f, "complete"),
            TraceStatus::Truncated {
                valid_until,
                whole_frames,
                detail,
            } => write!(
                f,
                "truncated: {whole_frames} whole frames, valid up to offset {valid_until} ({detail})"
            ),
            TraceStatus::Damaged { detail } => write!(f, "damaged: {detail}"),
        }
    }
}

/// A checkpoint with its pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Its metadata (position, CPU and device state blobs).
    pub meta: CheckpointMeta,
    /// The pages it stores, in file order.
    pub pages: Vec<(u64, Box<[u8; PAGE_SIZE]>)>,
}

/// Why a footer is not usable.
struct FooterProblem {
    damaged: bool,
    detail: String,
}

/// A frame as read: header and decompressed payload.
pub(crate) struct RawFrame {
    pub header: FrameHeader,
    pub payload: Vec<u8>,
}

/// Reads a trace from any seekable source.
pub struct TraceReader<R> {
    src: R,
    name: String,
    file_len: u64,
    format_version: u32,
    header: Header,
    header_bytes: u64,
    data_end: u64,
    footer: Option<Footer>,
    status: TraceStatus,
    frames: Vec<FrameIndexEntry>,
    checkpoints: Vec<CheckpointIndexEntry>,
    decompressor: zstd::bulk::Decompressor<'static>,
    compressed: Vec<u8>,
}

impl TraceReader<BufReader<File>> {
    /// Opens a trace file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ReadError> {
        let name = path.as_ref().display().to_string();
        let io = |source| ReadError::Io {
            name: name.clone(),
            offset: 0,
            source,
        };
        // A trace is read with seeks and by its length: a FIFO or device would block or
        // never end, so only regular files (or links to one) are opened.
        if !std::fs::metadata(path.as_ref()).map_err(io)?.is_file() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file (a device, FIFO or directory); traces are read from regular files only",
            )));
        }
        let file = File::open(path.as_ref()).map_err(io)?;
        Self::new(BufReader::with_capacity(128 << 10, file), name)
    }
}

/// Decodes the events of an Events frame payload, with each event's encoded size.
pub(crate) fn decode_events(
    header: &FrameHeader,
    payload: &[u8],
) -> Result<Vec<(Event, usize)>, String> {
    let mut out = Vec::with_capacity((header.items as usize).min(payload.len()));
    let mut rest = payload;
    let mut previous = header.first;
    for i in 0..header.items {
        let ((d_icount, d_exits, kind), used): ((u64, u64, EventKind), usize) =
            bincode::serde::decode_from_slice(rest, crate::bincode_config())
                .map_err(|e| format!("event {i} of {} does not decode: {e}", header.items))?;
        let at = match (
            previous.icount.checked_add(d_icount),
            previous.exits.checked_add(d_exits),
        ) {
            (Some(icount), Some(exits)) => Position { icount, exits },
            _ => {
                return Err(format!(
                    "event {i}'s position delta (+{d_icount}, +{d_exits}) overflows from {previous}"
                ));
            }
        };
        let event = Event { at, kind };
        if !event.at.at_or_before(&header.last) {
            return Err(format!(
                "event {i} is at {}, outside the order (previous {previous}, frame ends at {})",
                event.at, header.last
            ));
        }
        previous = event.at;
        rest = &rest[used..];
        out.push((event, used));
    }
    if !rest.is_empty() {
        return Err(format!(
            "{} bytes left over after {} events",
            rest.len(),
            header.items
        ));
    }
    if let (Some(first), Some(last)) = (out.first(), out.last())
        && (first.0.at != header.first || last.0.at != header.last)
    {
        return Err(format!(
            "events span {}..{} but the frame header says {}..{}",
            first.0.at, last.0.at, header.first, header.last
        ));
    }
    Ok(out)
}

/// Decodes a bincode item that must fill the payload exactly.
pub(crate) fn decode_whole<T: serde::de::DeserializeOwned>(
    payload: &[u8],
    what: &str,
) -> Result<T, String> {
    let (value, used): (T, usize) =
        bincode::serde::decode_from_slice(payload, crate::bincode_config())
            .map_err(|e| format!("{what} does not decode: {e}"))?;
    if used != payload.len() {
        return Err(format!(
            "{} bytes left over after {what}",
            payload.len() - used
        ));
    }
    Ok(value)
}

/// Checks a checkpoint's page number against the machine the header describes: whatever
/// the layout, `ram_size` bytes of RAM lie below 4 GiB + `ram_size`, so a page beyond that
/// (or one whose address does not fit in 64 bits) is not guest memory.
pub(crate) fn check_page_number(ram_size: u64, page: u64) -> Result<(), String> {
    const FOUR_GIB: u64 = 1 << 32;
    let limit = FOUR_GIB.saturating_add(ram_size) / PAGE_SIZE as u64;
    if page >= limit {
        return Err(format!(
            "checkpoint page number {page:#x} lies beyond the guest memory of a machine with \
             {ram_size:#x} bytes of RAM (pages below {limit:#x})"
        ));
    }
    Ok(())
}

/// Splits a CheckpointPages payload into pages.
pub(crate) fn page_items(payload: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    payload.chunks_exact(PAGE_ITEM_LEN).map(|item| {
        let mut n = [0u8; 8];
        n.copy_from_slice(&item[..8]);
        (u64::from_le_bytes(n), &item[8..])
    })
}

impl<R: Read + Seek> TraceReader<R> {
    /// Reads and validates the header, then the footer (or walks the frames when the trace
    /// has none). `name` is used in messages.
    pub fn new(mut src: R, name: impl Into<String>) -> Result<Self, ReadError> {
        let name = name.into();
        let io = |offset: u64, name: &str| {
            let name = name.to_string();
            move |source| ReadError::Io {
                name,
                offset,
                source,
            }
        };
        let file_len = src.seek(SeekFrom::End(0)).map_err(io(0, &name))?;
        let mut prefix = [0u8; FILE_PREFIX_LEN];
        let available = (file_len as usize).min(FILE_PREFIX_LEN);
        src.seek(SeekFrom::Start(0)).map_err(io(0, &name))?;
        src.read_exact(&mut prefix[..available])
            .map_err(io(0, &name))?;
        let magic_len = available.min(FILE_MAGIC.len());
        if prefix[..magic_len] != FILE_MAGIC[..magic_len] {
            return Err(ReadError::NotATrace {
                name,
                found: prefix[..magic_len].to_vec(),
            });
        }
        if available < FILE_PREFIX_LEN {
            return Err(ReadError::TruncatedHeader {
                name,
                len: file_len,
                needed: FILE_PREFIX_LEN as u64,
            });
        }
        let version = u32::from_le_bytes([prefix[8], prefix[9], prefix[10], prefix[11]]);
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(ReadError::UnsupportedVersion {
                name,
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let header_len = u32::from_le_bytes([prefix[12], prefix[13], prefix[14], prefix[15]]);
        if header_len as usize > MAX_HEADER_LEN {
            return Err(ReadError::BadHeader {
                name,
                detail: format!("header length {header_len} exceeds the limit {MAX_HEADER_LEN}"),
            });
        }
        let header_bytes = FILE_PREFIX_LEN as u64 + header_len as u64 + 8;
        if file_len < header_bytes {
            return Err(ReadError::TruncatedHeader {
                name,
                len: file_len,
                needed: header_bytes,
            });
        }
        let mut body = vec![0u8; header_len as usize + 8];
        src.read_exact(&mut body)
            .map_err(io(FILE_PREFIX_LEN as u64, &name))?;
        let (body, sum) = body.split_at(header_len as usize);
        let stored = u64::from_le_bytes(sum.try_into().expect("8 bytes"));
        if stored != crate::checksum64(&[&prefix[8..], body]) {
            return Err(ReadError::BadHeader {
                name,
                detail: "checksum mismatch".into(),
            });
        }
        // Older headers end early: a zero byte is the variant index of ResetPolicy::Stop (what
        // recordings before version 3 did at a reset), and of `None` for each Option added
        // since (version 7: guest CPUID, host CPU, digest scheme; version 9: the firmware
        // revision).
        let missing = if version < 3 {
            5
        } else if version < crate::GUEST_CPUID_FORMAT {
            4
        } else if version < crate::FIRMWARE_REVISION_FORMAT {
            1
        } else {
            0
        };
        let padded;
        let body = if missing > 0 {
            padded = [body, &[0u8; 5][..missing]].concat();
            &padded[..]
        } else {
            body
        };
        let header: Header =
            decode_whole(body, "the header").map_err(|detail| ReadError::BadHeader {
                name: name.clone(),
                detail,
            })?;
        let decompressor = zstd::bulk::Decompressor::new().map_err(io(0, &name))?;
        let mut reader = Self {
            format_version: version,
            src,
            name,
            file_len,
            header,
            header_bytes,
            data_end: file_len,
            footer: None,
            status: TraceStatus::Complete,
            frames: Vec::new(),
            checkpoints: Vec::new(),
            decompressor,
            compressed: Vec::new(),
        };
        match reader.load_footer()? {
            Ok(()) => {}
            Err(problem) => reader.scan(problem)?,
        }
        Ok(reader)
    }

    /// The name used in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The footer, if the trace was finished.
    pub fn footer(&self) -> Option<&Footer> {
        self.footer.as_ref()
    }

    /// Whether the trace is complete, truncated or damaged.
    pub fn status(&self) -> &TraceStatus {
        &self.status
    }

    /// The format version the file was written in.
    pub fn format_version(&self) -> u32 {
        self.format_version
    }

    /// The file's length in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Bytes taken by the file header.
    pub fn header_len(&self) -> u64 {
        self.header_bytes
    }

    /// Where the frames before the footer (or the cut) end.
    pub fn data_end(&self) -> u64 {
        self.data_end
    }

    /// The frame index: from the footer, or built by walking the frames.
    pub fn frames(&self) -> &[FrameIndexEntry] {
        &self.frames
    }

    /// The checkpoints, in order.
    pub fn checkpoints(&self) -> &[CheckpointIndexEntry] {
        &self.checkpoints
    }

    /// The latest checkpoint at or before `at` (both counters no larger), where replay
    /// towards `at` should start.
    pub fn nearest_checkpoint(&self, at: Position) -> Option<CheckpointIndexEntry> {
        self.checkpoints
            .iter()
            .rev()
            .find(|c| c.position.at_or_before(&at))
            .copied()
    }

    fn io_error(&self, offset: u64) -> impl FnOnce(std::io::Error) -> ReadError + '_ {
        move |source| ReadError::Io {
            name: self.name.clone(),
            offset,
            source,
        }
    }

    pub(crate) fn frame_error(&self, frame: u64, offset: u64, detail: String) -> ReadError {
        ReadError::Frame {
            name: self.name.clone(),
            frame,
            offset,
            detail,
        }
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), std::io::Error> {
        self.src.seek(SeekFrom::Start(offset))?;
        self.src.read_exact(buf)
    }

    /// Reads and checks the frame header at `offset` (expected to be frame `seq`).
    pub(crate) fn frame_header_at(
        &mut self,
        offset: u64,
        seq: u64,
    ) -> Result<FrameHeader, ReadError> {
        if offset + FRAME_HEADER_LEN as u64 > self.file_len {
            return Err(self.frame_error(
                seq,
                offset,
                format!(
                    "the file ends {} bytes into the {FRAME_HEADER_LEN}-byte frame header",
                    self.file_len.saturating_sub(offset)
                ),
            ));
        }
        let mut b = [0u8; FRAME_HEADER_LEN];
        if let Err(e) = self.read_at(offset, &mut b) {
            return Err(self.io_error(offset)(e));
        }
        let h =
            FrameHeader::decode(&b).map_err(|p| self.frame_error(seq, offset, p.to_string()))?;
        if h.seq != seq {
            return Err(self.frame_error(
                seq,
                offset,
                format!("sequence number is {}, expected {seq}", h.seq),
            ));
        }
        if offset + h.frame_len() > self.file_len {
            return Err(self.frame_error(
                seq,
                offset,
                format!(
                    "the frame is {} bytes but the file ends after {}",
                    h.frame_len(),
                    self.file_len - offset
                ),
            ));
        }
        Ok(h)
    }

    /// Reads the frame header at `offset` without checking its sequence number; `None` when
    /// it is not a plausible header or the frame does not fit in the file. Used to step over
    /// a damaged frame and keep checking the rest.
    pub(crate) fn raw_header_at(&mut self, offset: u64) -> Result<Option<FrameHeader>, ReadError> {
        if offset + FRAME_HEADER_LEN as u64 > self.file_len {
            return Ok(None);
        }
        let mut b = [0u8; FRAME_HEADER_LEN];
        if let Err(e) = self.read_at(offset, &mut b) {
            return Err(self.io_error(offset)(e));
        }
        Ok(FrameHeader::decode(&b)
            .ok()
            .filter(|h| offset + h.frame_len() <= self.file_len))
    }

    /// Reads frame `seq` at `offset`: header, checksum, decompression.
    pub(crate) fn frame_at(&mut self, offset: u64, seq: u64) -> Result<RawFrame, ReadError> {
        let header = self.frame_header_at(offset, seq)?;
        // The length is capped by the header check and by the file's size.
        self.compressed.resize(header.compressed_len as usize, 0);
        let mut compressed = std::mem::take(&mut self.compressed);
        let read = self.read_at(offset + FRAME_HEADER_LEN as u64, &mut compressed);
        let result = match read {
            Err(e) => Err(self.io_error(offset)(e)),
            Ok(()) => self.check_and_decompress(offset, &header, &compressed),
        };
        self.compressed = compressed;
        Ok(RawFrame {
            header,
            payload: result?,
        })
    }

    fn check_and_decompress(
        &mut self,
        offset: u64,
        header: &FrameHeader,
        compressed: &[u8],
    ) -> Result<Vec<u8>, ReadError> {
        let actual = header.compute_checksum(compressed);
        if actual != header.checksum {
            return Err(self.frame_error(
                header.seq,
                offset,
                format!(
                    "checksum mismatch: stored {:016x}, computed {actual:016x}",
                    header.checksum
                ),
            ));
        }
        let mut payload = Vec::with_capacity(header.uncompressed_len as usize);
        match self
            .decompressor
            .decompress_to_buffer(compressed, &mut payload)
        {
            Ok(n) if n == header.uncompressed_len as usize => Ok(payload),
            Ok(n) => Err(self.frame_error(
                header.seq,
                offset,
                format!(
                    "payload decompresses to {n} bytes, header says {}",
                    header.uncompressed_len
                ),
            )),
            Err(e) => Err(self.frame_error(
                header.seq,
                offset,
                format!("payload does not decompress: {e}"),
            )),
        }
    }

    /// Uses the trailer to find and read the footer. The outer error is I/O; the inner one
    /// says why the footer cannot be used (then the caller walks the frames): a missing
    /// trailer means the trace was cut short, anything else that it is damaged.
    fn load_footer(&mut self) -> Result<Result<(), FooterProblem>, ReadError> {
        match self.load_footer_inner()? {
            Ok(()) => Ok(Ok(())),
            Err(detail) if detail.starts_with("no trailer") => Ok(Err(FooterProblem {
                damaged: false,
                detail,
            })),
            Err(detail) => Ok(Err(FooterProblem {
                damaged: true,
                detail,
            })),
        }
    }

    fn load_footer_inner(&mut self) -> Result<Result<(), String>, ReadError> {
        let min = self.header_bytes + (FRAME_HEADER_LEN + TRAILER_LEN) as u64;
        if self.file_len < min {
            return Ok(Err("no trailer: the file is too short to have one".into()));
        }
        let trailer_at = self.file_len - TRAILER_LEN as u64;
        let mut t = [0u8; TRAILER_LEN];
        if let Err(e) = self.read_at(trailer_at, &mut t) {
            return Err(self.io_error(trailer_at)(e));
        }
        if t[16..] != crate::TRAILER_MAGIC {
            return Ok(Err("no trailer".into()));
        }
        let Some(footer_at) = decode_trailer(&t) else {
            return Ok(Err("the trailer's checksum does not match".into()));
        };
        if footer_at < self.header_bytes || footer_at > trailer_at {
            return Ok(Err(format!(
                "the trailer points at offset {footer_at}, outside the frames"
            )));
        }
        // The footer's sequence number is the number of frames before it, which we only
        // learn from its header; read it unchecked first.
        let mut b = [0u8; FRAME_HEADER_LEN];
        if footer_at + FRAME_HEADER_LEN as u64 > trailer_at {
            return Ok(Err("the trailer points past the footer's end".into()));
        }
        if let Err(e) = self.read_at(footer_at, &mut b) {
            return Err(self.io_error(footer_at)(e));
        }
        let seq = match FrameHeader::decode(&b) {
            Ok(h) => h.seq,
            Err(p) => return Ok(Err(format!("footer frame at offset {footer_at}: {p}"))),
        };
        let frame = match self.frame_at(footer_at, seq) {
            Ok(f) => f,
            Err(ReadError::Frame { detail, .. }) => {
                return Ok(Err(format!(
                    "footer frame {seq} at offset {footer_at}: {detail}"
                )));
            }
            Err(e) => return Err(e),
        };
        if frame.header.kind != FrameKind::Footer
            || footer_at + frame.header.frame_len() != trailer_at
        {
            return Ok(Err(format!(
                "the trailer points at a {} frame at offset {footer_at} that does not end at \
                 the trailer",
                frame.header.kind.name()
            )));
        }
        let footer: Footer = match decode_whole(&frame.payload, "the footer") {
            Ok(f) => f,
            Err(e) => return Ok(Err(format!("footer frame {seq}: {e}"))),
        };
        // The index must stay inside the frames: later reads trust its offsets only as far
        // as the frame checks go, but a wild index would make every lookup fail confusingly.
        if footer.frames.len() as u64 != seq
            || footer
                .frames
                .iter()
                .any(|f| f.offset < self.header_bytes || f.offset >= footer_at)
            || footer.checkpoints.iter().any(|c| {
                c.meta_offset < self.header_bytes
                    || c.meta_offset >= footer_at
                    || c.first_offset > c.meta_offset
            })
        {
            return Ok(Err(format!(
                "footer frame {seq}: its index does not match the file ({} frames listed, \
                 {seq} before the footer)",
                footer.frames.len()
            )));
        }
        self.data_end = footer_at;
        self.frames = footer.frames.clone();
        self.checkpoints = footer.checkpoints.clone();
        self.footer = Some(footer);
        self.status = TraceStatus::Complete;
        Ok(Ok(()))
    }

    /// Whether every byte from `offset` to the end is zero (a crash can leave a zero-filled
    /// tail where the file system had extended the file).
    fn zero_tail(&mut self, offset: u64) -> Result<bool, ReadError> {
        let mut at = offset;
        let mut buf = vec![0u8; 64 << 10];
        while at < self.file_len {
            let n = ((self.file_len - at) as usize).min(buf.len());
            if let Err(e) = self.read_at(at, &mut buf[..n]) {
                return Err(self.io_error(at)(e));
            }
            if buf[..n].iter().any(|&b| b != 0) {
                return Ok(false);
            }
            at += n as u64;
        }
        Ok(true)
    }

    /// Walks frame headers from the start to build the index of a trace without a usable
    /// footer, and finds where it was cut.
    fn scan(&mut self, problem: FooterProblem) -> Result<(), ReadError> {
        let (damaged_footer, why) = (problem.damaged, problem.detail);
        let mut offset = self.header_bytes;
        let mut seq = 0u64;
        let mut events = 0u64;
        let mut pages_run: (u64, u64, u64, u64) = (0, 0, 0, offset); // pages, frames, bytes, first
        let cut: Result<String, String> = loop {
            if offset == self.file_len {
                break Ok(match seq {
                    0 => format!("{why}; the file ends after the header"),
                    n => format!("{why}; the file ends after frame {}", n - 1),
                });
            }
            if self.file_len - offset < FRAME_HEADER_LEN as u64 {
                if self.zero_tail(offset)? {
                    break Ok(format!("{why}; zero-filled tail at offset {offset}"));
                }
                break Ok(format!(
                    "{why}; partial frame header ({} of {FRAME_HEADER_LEN} bytes) at offset \
                     {offset}",
                    self.file_len - offset
                ));
            }
            let header = match self.frame_header_at(offset, seq) {
                Ok(h) => h,
                Err(ReadError::Frame { detail, .. }) => {
                    let mut b = [0u8; FRAME_HEADER_LEN];
                    if let Err(e) = self.read_at(offset, &mut b) {
                        return Err(self.io_error(offset)(e));
                    }
                    match FrameHeader::decode(&b) {
                        Ok(h) if h.seq == seq && offset + h.frame_len() > self.file_len => {
                            break Ok(format!(
                                "{why}; frame {seq} at offset {offset} is cut short: {detail}"
                            ));
                        }
                        Err(_) if self.zero_tail(offset + FRAME_HEADER_LEN as u64)? => {
                            break Ok(format!(
                                "{why}; a partial frame header and a zero-filled tail at offset \
                                 {offset}"
                            ));
                        }
                        _ => break Err(format!("frame {seq} at offset {offset}: {detail}")),
                    }
                }
                Err(e) => return Err(e),
            };
            if header.kind == FrameKind::Footer {
                break Ok(format!(
                    "{why}; footer frame {seq} at offset {offset} has no valid trailer after it"
                ));
            }
            self.frames.push(FrameIndexEntry {
                offset,
                seq,
                kind: header.kind.to_byte(),
                first: header.first,
                last: header.last,
                items: header.items,
                compressed_len: header.compressed_len,
                uncompressed_len: header.uncompressed_len,
            });
            match header.kind {
                FrameKind::Events => {
                    events += header.items as u64;
                    pages_run = (0, 0, 0, offset + header.frame_len());
                }
                FrameKind::CheckpointPages => {
                    pages_run.0 += header.items as u64;
                    pages_run.1 += 1;
                    pages_run.2 += header.compressed_len as u64;
                }
                FrameKind::Checkpoint => {
                    let meta = match self.frame_at(offset, seq).and_then(|f| {
                        decode_whole::<CheckpointMeta>(&f.payload, "checkpoint metadata")
                            .map_err(|d| self.frame_error(seq, offset, d))
                    }) {
                        Ok(m) => m,
                        Err(ReadError::Frame { detail, .. }) => {
                            break Err(format!("frame {seq} at offset {offset}: {detail}"));
                        }
                        Err(e) => return Err(e),
                    };
                    self.checkpoints.push(CheckpointIndexEntry {
                        ordinal: meta.ordinal,
                        position: meta.position,
                        event_index: events,
                        first_offset: pages_run.3,
                        meta_offset: offset,
                        meta_seq: seq,
                        pages: pages_run.0,
                        page_frames: pages_run.1,
                        full: meta.full,
                        compressed_bytes: pages_run.2 + header.compressed_len as u64,
                    });
                    pages_run = (0, 0, 0, offset + header.frame_len());
                }
                FrameKind::Image => pages_run = (0, 0, 0, offset + header.frame_len()),
                FrameKind::Footer => unreachable!("handled above"),
            }
            offset += header.frame_len();
            seq += 1;
        };
        match cut {
            Ok(detail) if !damaged_footer => {
                self.data_end = offset;
                self.status = TraceStatus::Truncated {
                    valid_until: offset,
                    whole_frames: seq,
                    detail,
                };
            }
            Ok(detail) => {
                self.data_end = offset;
                self.status = TraceStatus::Damaged { detail };
            }
            Err(detail) => {
                // Leave the damaged frame inside the readable range so that reading events
                // reports it rather than silently stopping.
                self.data_end = self.file_len;
                self.status = TraceStatus::Damaged {
                    detail: if damaged_footer {
                        format!("{why}; {detail}")
                    } else {
                        detail
                    },
                };
            }
        }
        Ok(())
    }

    /// Whether the trace embeds the bytes of image `index` of its header (format 8,
    /// `deja record --embed-images`).
    pub fn embeds_image(&self, index: usize) -> bool {
        let image = FrameKind::Image.to_byte();
        self.frames
            .iter()
            .any(|f| f.kind == image && f.items as usize == index)
    }

    /// The embedded bytes of image `index`, checked against its record in the header (size
    /// and BLAKE3 digest); `None` when the trace does not embed it.
    pub fn embedded_image(&mut self, index: usize) -> Result<Option<Vec<u8>>, ReadError> {
        let image = FrameKind::Image.to_byte();
        let frames: Vec<(u64, u64)> = self
            .frames
            .iter()
            .filter(|f| f.kind == image && f.items as usize == index)
            .map(|f| (f.offset, f.seq))
            .collect();
        let Some(&(first_offset, first_seq)) = frames.first() else {
            return Ok(None);
        };
        let Some(record) = self.header.images.get(index).cloned() else {
            return Err(self.frame_error(
                first_seq,
                first_offset,
                format!(
                    "an image frame for image {index}, but the header lists {} images",
                    self.header.images.len()
                ),
            ));
        };
        let mut bytes = Vec::new();
        for (offset, seq) in frames {
            let frame = self.frame_at(offset, seq)?;
            if bytes.len() as u64 + frame.payload.len() as u64 > record.size {
                return Err(self.frame_error(
                    seq,
                    offset,
                    format!(
                        "image {index} ({}) is embedded with more than its recorded {} bytes",
                        record.name, record.size
                    ),
                ));
            }
            bytes.extend_from_slice(&frame.payload);
        }
        if !record.matches(&bytes) {
            return Err(self.frame_error(
                first_seq,
                first_offset,
                format!(
                    "the embedded bytes of image {index} ({}) are not the image recorded \
                     ({} bytes, BLAKE3 {}; embedded {} bytes, BLAKE3 {})",
                    record.name,
                    record.size,
                    record.digest,
                    bytes.len(),
                    crate::Digest::of(&bytes)
                ),
            ));
        }
        Ok(Some(bytes))
    }

    /// All events, in order.
    pub fn events(&mut self) -> Events<'_, R> {
        let start = self.header_bytes;
        Events::new(self, start, 0)
    }

    /// The last event of the last whole events frame, read without reading the others: a
    /// trace cut before its footer still says where the recording ended when its `End`
    /// event made it to disk.
    pub fn last_event(&mut self) -> Result<Option<Event>, ReadError> {
        let Some(last) = self
            .frames
            .iter()
            .rev()
            .find(|f| f.kind == FrameKind::Events.to_byte())
            .copied()
        else {
            return Ok(None);
        };
        let frame = self.frame_at(last.offset, last.seq)?;
        let events = decode_events(&frame.header, &frame.payload)
            .map_err(|d| self.frame_error(last.seq, last.offset, d))?;
        Ok(events.into_iter().last().map(|(e, _)| e))
    }

    /// The events after a checkpoint: where replay resumes once the checkpoint is restored.
    pub fn events_after(
        &mut self,
        checkpoint: &CheckpointIndexEntry,
    ) -> Result<Events<'_, R>, ReadError> {
        let h = self.frame_header_at(checkpoint.meta_offset, checkpoint.meta_seq)?;
        if h.kind != FrameKind::Checkpoint {
            return Err(self.frame_error(
                checkpoint.meta_seq,
                checkpoint.meta_offset,
                format!(
                    "expected checkpoint {}, found a {} frame",
                    checkpoint.ordinal,
                    h.kind.name()
                ),
            ));
        }
        Ok(Events::new(
            self,
            checkpoint.meta_offset + h.frame_len(),
            checkpoint.meta_seq + 1,
        ))
    }

    /// Reads a checkpoint's metadata and calls `page` for each stored page, in file order,
    /// without holding more than one frame of pages.
    pub fn for_each_checkpoint_page(
        &mut self,
        checkpoint: &CheckpointIndexEntry,
        mut page: impl FnMut(u64, &[u8]),
    ) -> Result<CheckpointMeta, ReadError> {
        let meta_frame = self.frame_at(checkpoint.meta_offset, checkpoint.meta_seq)?;
        let (mo, ms) = (checkpoint.meta_offset, checkpoint.meta_seq);
        if meta_frame.header.kind != FrameKind::Checkpoint {
            return Err(self.frame_error(
                ms,
                mo,
                format!(
                    "expected checkpoint {}, found a {} frame",
                    checkpoint.ordinal,
                    meta_frame.header.kind.name()
                ),
            ));
        }
        let meta: CheckpointMeta = decode_whole(&meta_frame.payload, "checkpoint metadata")
            .map_err(|d| self.frame_error(ms, mo, d))?;
        if meta.page_frames > ms {
            return Err(self.frame_error(
                ms,
                mo,
                format!(
                    "checkpoint claims {} page frames but only {ms} frames precede it",
                    meta.page_frames
                ),
            ));
        }
        let mut offset = checkpoint.first_offset;
        let mut seq = ms - meta.page_frames;
        let mut pages = 0u64;
        while seq < ms {
            let f = self.frame_at(offset, seq)?;
            if f.header.kind != FrameKind::CheckpointPages {
                return Err(self.frame_error(
                    seq,
                    offset,
                    format!(
                        "expected pages of checkpoint {}, found a {} frame",
                        meta.ordinal,
                        f.header.kind.name()
                    ),
                ));
            }
            let ram_size = self.header.machine.ram_size;
            for (n, bytes) in page_items(&f.payload) {
                check_page_number(ram_size, n).map_err(|d| self.frame_error(seq, offset, d))?;
                page(n, bytes);
                pages += 1;
            }
            offset += f.header.frame_len();
            seq += 1;
        }
        if offset != mo || pages != meta.pages {
            return Err(self.frame_error(
                ms,
                mo,
                format!(
                    "checkpoint {} claims {} pages in {} frames; found {pages} ending at offset {offset}",
                    meta.ordinal, meta.pages, meta.page_frames
                ),
            ));
        }
        Ok(meta)
    }

    /// Reads a checkpoint with its pages.
    pub fn read_checkpoint(
        &mut self,
        checkpoint: &CheckpointIndexEntry,
    ) -> Result<Checkpoint, ReadError> {
        let mut pages = Vec::new();
        let meta = self.for_each_checkpoint_page(checkpoint, |n, bytes| {
            let mut page = Box::new([0u8; PAGE_SIZE]);
            page.copy_from_slice(bytes);
            pages.push((n, page));
        })?;
        Ok(Checkpoint { meta, pages })
    }

    /// Guest memory as it was at a checkpoint: the latest full checkpoint at or before it,
    /// then every delta after that, in order. Absent pages are zero.
    pub fn memory_at(
        &mut self,
        checkpoint: &CheckpointIndexEntry,
    ) -> Result<MemoryImage, ReadError> {
        let k = self
            .checkpoints
            .iter()
            .position(|c| c == checkpoint)
            .ok_or_else(|| ReadError::NoSuchCheckpoint {
                name: self.name.clone(),
                ordinal: checkpoint.ordinal,
                count: self.checkpoints.len(),
            })?;
        let base = self.checkpoints[..=k]
            .iter()
            .rposition(|c| c.full)
            .ok_or_else(|| {
                self.frame_error(
                    checkpoint.meta_seq,
                    checkpoint.meta_offset,
                    "no full checkpoint precedes this one, so its memory cannot be rebuilt".into(),
                )
            })?;
        let mut image = MemoryImage::new();
        for i in base..=k {
            let c = self.checkpoints[i];
            self.for_each_checkpoint_page(&c, |n, bytes| image.set_page(n, bytes))?;
        }
        Ok(image)
    }
}

/// Iterator over events in file order; yields an error (then stops) at the first damaged
/// frame. A truncated trace simply ends after its last whole frame. Checkpoint frames are
/// stepped over by their headers without reading their payloads (`verify` checks those).
pub struct Events<'a, R> {
    reader: &'a mut TraceReader<R>,
    offset: u64,
    seq: u64,
    pending: std::vec::IntoIter<Event>,
    previous: Position,
    done: bool,
}

impl<'a, R: Read + Seek> Events<'a, R> {
    fn new(reader: &'a mut TraceReader<R>, offset: u64, seq: u64) -> Self {
        Self {
            reader,
            offset,
            seq,
            pending: Vec::new().into_iter(),
            previous: Position::default(),
            done: false,
        }
    }

    fn next_frame(&mut self) -> Result<bool, ReadError> {
        while self.offset < self.reader.data_end {
            let (offset, seq) = (self.offset, self.seq);
            let header = self.reader.frame_header_at(offset, seq)?;
            self.offset += header.frame_len();
            self.seq += 1;
            if header.kind == FrameKind::Footer {
                return Err(self.reader.frame_error(
                    seq,
                    offset,
                    "a footer frame before the end of the frames".into(),
                ));
            }
            if header.kind != FrameKind::Events {
                continue;
            }
            let frame = self.reader.frame_at(offset, seq)?;
            let events = decode_events(&frame.header, &frame.payload)
                .map_err(|d| self.reader.frame_error(seq, offset, d))?;
            if let Some((first, _)) = events.first()
                && !self.previous.at_or_before(&first.at)
            {
                return Err(self.reader.frame_error(
                    seq,
                    offset,
                    format!(
                        "first event at {} is before the previous frame's last event at {}",
                        first.at, self.previous
                    ),
                ));
            }
            if let Some((last, _)) = events.last() {
                self.previous = last.at;
            }
            self.pending = events
                .into_iter()
                .map(|(e, _)| e)
                .collect::<Vec<_>>()
                .into_iter();
            return Ok(true);
        }
        Ok(false)
    }
}

impl<R: Read + Seek> Iterator for Events<'_, R> {
    type Item = Result<Event, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(e) = self.pending.next() {
                return Some(Ok(e));
            }
            if self.done {
                return None;
            }
            match self.next_frame() {
                Ok(true) => {}
                Ok(false) => {
                    self.done = true;
                    return None;
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}
