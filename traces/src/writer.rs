//! Streaming trace writer: events are encoded into a bounded buffer, compressed into a frame
//! when the buffer fills, written, and forgotten. Memory stays bounded by one frame plus the
//! index (a few dozen bytes per frame), whatever the length of the run.

use crate::frame::{FILE_PREFIX_LEN, FrameHeader, FrameKind, PAGE_ITEM_LEN, encode_trailer};
use crate::types::{
    CheckpointIndexEntry, CheckpointInput, CheckpointMeta, Event, EventKind, FinishInfo, Footer,
    FrameIndexEntry, Header, Position,
};
use crate::{FORMAT_VERSION, MAX_FRAME_PAYLOAD, MAX_HEADER_LEN, PAGE_SIZE};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use thiserror::Error;

/// Failures writing a trace. After any of them the writer refuses further work: the file
/// holds the header and every frame completed before the failure, and reads as a truncated
/// trace.
#[derive(Debug, Error)]
pub enum WriteError {
    /// The file could not be created.
    #[error("cannot create trace {name}: {source}")]
    Create {
        /// The file.
        name: String,
        /// Why.
        source: std::io::Error,
    },
    /// The sink refused bytes (e.g. the disk is full).
    #[error(
        "writing {what} of trace {name} at offset {offset} failed; the {committed} bytes before \
         it (header and {frames} whole frames) are intact: {source}"
    )]
    Io {
        /// The file.
        name: String,
        /// What was being written ("frame 12", "the header", "the trailer").
        what: String,
        /// Where it started.
        offset: u64,
        /// Bytes of whole frames (and header) already written.
        committed: u64,
        /// Whole frames already written.
        frames: u64,
        /// Why.
        source: std::io::Error,
    },
    /// An item could not be encoded.
    #[error("cannot encode {what} for trace {name}: {detail}")]
    Encode {
        /// The file.
        name: String,
        /// What.
        what: String,
        /// bincode's or zstd's explanation.
        detail: String,
    },
    /// An item is larger than a frame may be.
    #[error("{what} for trace {name} is {bytes} bytes, more than the frame limit {limit}")]
    TooLarge {
        /// The file.
        name: String,
        /// What.
        what: String,
        /// Its size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// Positions must never go backwards: a recorder bug, caught before it reaches the file.
    #[error("{what} at {got} for trace {name} is before the previous position {previous}")]
    PositionBackwards {
        /// The file.
        name: String,
        /// What was being written.
        what: String,
        /// The previous position.
        previous: Position,
        /// The offending one.
        got: Position,
    },
    /// A checkpoint page is not a page.
    #[error("checkpoint page {page} for trace {name} is {len} bytes, not {PAGE_SIZE}")]
    BadPage {
        /// The file.
        name: String,
        /// Page number.
        page: u64,
        /// Its length.
        len: usize,
    },
    /// The first checkpoint holds only changed pages, which leaves nothing to apply them to.
    #[error("the first checkpoint of trace {name} must be full (all non-zero pages)")]
    FirstCheckpointNotFull {
        /// The file.
        name: String,
    },
    /// An image was to be embedded after events or checkpoints.
    #[error("trace {name}: image {index} must be embedded before the first event")]
    ImageAfterEvents {
        /// The file.
        name: String,
        /// The image's index in the header.
        index: u32,
    },
    /// An earlier error left the writer unusable.
    #[error("trace {name} can no longer be written: {earlier}")]
    Failed {
        /// The file.
        name: String,
        /// The earlier error.
        earlier: String,
    },
}

/// How the writer cuts frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterOptions {
    /// An event frame is written once its encoded events reach this many bytes.
    pub frame_bytes: usize,
    /// … or this many events, whichever comes first.
    pub frame_events: u32,
    /// Pages per checkpoint page frame.
    pub pages_per_frame: u32,
    /// zstd level.
    pub compression_level: i32,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            frame_bytes: 64 << 10,
            frame_events: 16_384,
            pages_per_frame: 256,
            compression_level: 3,
        }
    }
}

/// Encodes the file header: magic, version, length, bincode header, checksum.
pub(crate) fn encode_file_header(header: &Header) -> Result<Vec<u8>, String> {
    let body = bincode::serde::encode_to_vec(header, crate::bincode_config())
        .map_err(|e| e.to_string())?;
    if body.len() > MAX_HEADER_LEN {
        return Err(format!(
            "the header is {} bytes, more than the limit {MAX_HEADER_LEN}",
            body.len()
        ));
    }
    let mut out = Vec::with_capacity(FILE_PREFIX_LEN + body.len() + 8);
    out.extend_from_slice(&crate::FILE_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    let sum = crate::checksum64(&[&out[8..]]);
    out.extend_from_slice(&sum.to_le_bytes());
    Ok(out)
}

/// Writes a trace to any sink, frame by frame.
pub struct TraceWriter<W: Write> {
    sink: Option<W>,
    name: String,
    opts: WriterOptions,
    compressor: zstd::bulk::Compressor<'static>,
    compressed: Vec<u8>,
    events: Vec<u8>,
    events_in_buffer: u32,
    buffer_first: Position,
    buffer_last: Position,
    last_position: Position,
    seq: u64,
    committed: u64,
    events_total: u64,
    counts: [u64; EventKind::NAMES.len()],
    frames: Vec<FrameIndexEntry>,
    checkpoints: Vec<CheckpointIndexEntry>,
    failed: Option<String>,
}

impl TraceWriter<File> {
    /// Creates (or truncates) a trace file and writes its header. Frames go straight to the
    /// file, one frame per write, so a crash loses at most the frame being written.
    pub fn create(
        path: impl AsRef<Path>,
        header: &Header,
        opts: WriterOptions,
    ) -> Result<Self, WriteError> {
        let name = path.as_ref().display().to_string();
        let file = File::create(path.as_ref()).map_err(|source| WriteError::Create {
            name: name.clone(),
            source,
        })?;
        Self::new(file, name, header, opts)
    }
}

impl<W: Write> TraceWriter<W> {
    /// Starts a trace on `sink` (named `name` in messages) by writing its header.
    pub fn new(
        sink: W,
        name: impl Into<String>,
        header: &Header,
        opts: WriterOptions,
    ) -> Result<Self, WriteError> {
        let name = name.into();
        let compressor = zstd::bulk::Compressor::new(opts.compression_level).map_err(|e| {
            WriteError::Encode {
                name: name.clone(),
                what: format!("a zstd compressor at level {}", opts.compression_level),
                detail: e.to_string(),
            }
        })?;
        let mut w = Self {
            sink: Some(sink),
            name,
            opts: WriterOptions {
                frame_bytes: opts.frame_bytes.clamp(1, MAX_FRAME_PAYLOAD / 2),
                frame_events: opts.frame_events.max(1),
                pages_per_frame: opts
                    .pages_per_frame
                    .clamp(1, (MAX_FRAME_PAYLOAD / PAGE_ITEM_LEN) as u32),
                ..opts
            },
            compressor,
            compressed: Vec::new(),
            events: Vec::new(),
            events_in_buffer: 0,
            buffer_first: Position::default(),
            buffer_last: Position::default(),
            last_position: Position::default(),
            seq: 0,
            committed: 0,
            events_total: 0,
            counts: [0; EventKind::NAMES.len()],
            frames: Vec::new(),
            checkpoints: Vec::new(),
            failed: None,
        };
        let bytes = encode_file_header(header).map_err(|detail| WriteError::Encode {
            name: w.name.clone(),
            what: "the header".into(),
            detail,
        })?;
        w.write_raw(&[&bytes], "the header")?;
        Ok(w)
    }

    /// The name used in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whole frames written so far.
    pub fn frames_written(&self) -> u64 {
        self.seq
    }

    /// Bytes of header and whole frames written so far.
    pub fn bytes_written(&self) -> u64 {
        self.committed
    }

    /// Events accepted so far (written or buffered).
    pub fn events_written(&self) -> u64 {
        self.events_total
    }

    /// Encoded bytes waiting for the next event frame: never more than one frame's worth.
    pub fn buffered_bytes(&self) -> usize {
        self.events.len()
    }

    /// The latest position seen (event or checkpoint).
    pub fn last_position(&self) -> Position {
        self.last_position
    }

    /// The checkpoints written so far.
    pub fn checkpoints(&self) -> &[CheckpointIndexEntry] {
        &self.checkpoints
    }

    fn check_usable(&self) -> Result<(), WriteError> {
        match &self.failed {
            Some(earlier) => Err(WriteError::Failed {
                name: self.name.clone(),
                earlier: earlier.clone(),
            }),
            None => Ok(()),
        }
    }

    fn check_position(&self, what: &str, at: Position) -> Result<(), WriteError> {
        if self.last_position.at_or_before(&at) {
            Ok(())
        } else {
            Err(WriteError::PositionBackwards {
                name: self.name.clone(),
                what: what.to_string(),
                previous: self.last_position,
                got: at,
            })
        }
    }

    /// Writes byte slices as one unit, tracking what is committed and poisoning the writer on
    /// failure.
    fn write_raw(&mut self, parts: &[&[u8]], what: &str) -> Result<(), WriteError> {
        let sink = self
            .sink
            .as_mut()
            .expect("the sink is present until finish");
        let mut result = Ok(());
        for p in parts {
            result = sink.write_all(p);
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            result = sink.flush();
        }
        match result {
            Ok(()) => {
                self.committed += parts.iter().map(|p| p.len() as u64).sum::<u64>();
                Ok(())
            }
            Err(source) => {
                let err = WriteError::Io {
                    name: self.name.clone(),
                    what: what.to_string(),
                    offset: self.committed,
                    committed: self.committed,
                    frames: self.seq,
                    source,
                };
                self.failed = Some(err.to_string());
                Err(err)
            }
        }
    }

    /// Compresses and writes one frame; returns its index entry.
    fn write_frame(
        &mut self,
        kind: FrameKind,
        first: Position,
        last: Position,
        items: u32,
        payload: &[u8],
    ) -> Result<FrameIndexEntry, WriteError> {
        if payload.len() > MAX_FRAME_PAYLOAD {
            return Err(WriteError::TooLarge {
                name: self.name.clone(),
                what: format!("a {} frame", kind.name()),
                bytes: payload.len(),
                limit: MAX_FRAME_PAYLOAD,
            });
        }
        self.compressed.clear();
        self.compressed
            .reserve(zstd::zstd_safe::compress_bound(payload.len()));
        self.compressor
            .compress_to_buffer(payload, &mut self.compressed)
            .map_err(|e| WriteError::Encode {
                name: self.name.clone(),
                what: format!("frame {}", self.seq),
                detail: e.to_string(),
            })?;
        let mut header = FrameHeader {
            kind,
            seq: self.seq,
            first,
            last,
            items,
            uncompressed_len: payload.len() as u32,
            compressed_len: self.compressed.len() as u32,
            checksum: 0,
        };
        header.checksum = header.compute_checksum(&self.compressed);
        let entry = FrameIndexEntry {
            offset: self.committed,
            seq: self.seq,
            kind: kind.to_byte(),
            first,
            last,
            items,
            compressed_len: header.compressed_len,
            uncompressed_len: header.uncompressed_len,
        };
        let compressed = std::mem::take(&mut self.compressed);
        let result = self.write_raw(
            &[&header.encode(), &compressed],
            &format!("frame {}", self.seq),
        );
        self.compressed = compressed;
        result?;
        self.seq += 1;
        Ok(entry)
    }

    /// Embeds the bytes of image `index` (its place in [`Header::images`]) as
    /// [`FrameKind::Image`] frames, so that a replay can load it without the file. Call it
    /// before the first event: a reader finds the images ahead of the events, and an image
    /// embedded later would sit between them.
    pub fn embed_image(&mut self, index: u32, bytes: &[u8]) -> Result<(), WriteError> {
        self.check_usable()?;
        if self.events_total != 0 || !self.checkpoints.is_empty() {
            return Err(WriteError::ImageAfterEvents {
                name: self.name.clone(),
                index,
            });
        }
        let at = Position::default();
        for chunk in bytes.chunks(MAX_FRAME_PAYLOAD) {
            let entry = self.write_frame(FrameKind::Image, at, at, index, chunk)?;
            self.frames.push(entry);
        }
        Ok(())
    }

    /// Logs one event. Positions must not go backwards.
    pub fn push(&mut self, event: &Event) -> Result<(), WriteError> {
        self.check_usable()?;
        self.check_position(&format!("a {} event", event.kind.name()), event.at)?;
        let before = self.events.len();
        // Positions are stored as deltas from the previous event in the frame (the first
        // event's delta is zero: its position is the frame header's `first`), which keeps
        // the large icounts of bt out of every event.
        let previous = if self.events_in_buffer == 0 {
            event.at
        } else {
            self.buffer_last
        };
        let wire = (
            event.at.icount - previous.icount,
            event.at.exits - previous.exits,
            &event.kind,
        );
        if let Err(e) =
            bincode::serde::encode_into_std_write(wire, &mut self.events, crate::bincode_config())
        {
            self.events.truncate(before);
            return Err(WriteError::Encode {
                name: self.name.clone(),
                what: format!("a {} event", event.kind.name()),
                detail: e.to_string(),
            });
        }
        let size = self.events.len() - before;
        if size > MAX_FRAME_PAYLOAD / 2 {
            self.events.truncate(before);
            return Err(WriteError::TooLarge {
                name: self.name.clone(),
                what: format!("a {} event", event.kind.name()),
                bytes: size,
                limit: MAX_FRAME_PAYLOAD / 2,
            });
        }
        if self.events_in_buffer == 0 {
            self.buffer_first = event.at;
        }
        self.buffer_last = event.at;
        self.events_in_buffer += 1;
        self.last_position = event.at;
        self.events_total += 1;
        self.counts[event.kind.tag() as usize] += 1;
        if self.events.len() >= self.opts.frame_bytes
            || self.events_in_buffer >= self.opts.frame_events
        {
            self.flush_frame()?;
        }
        Ok(())
    }

    /// Logs one event (convenience for [`TraceWriter::push`]).
    pub fn event(&mut self, at: Position, kind: EventKind) -> Result<(), WriteError> {
        self.push(&Event { at, kind })
    }

    /// Writes the buffered events as a frame now (no-op when none are buffered). Recorders
    /// call it to bound what a crash can lose.
    pub fn flush_frame(&mut self) -> Result<(), WriteError> {
        self.check_usable()?;
        if self.events_in_buffer == 0 {
            return Ok(());
        }
        let payload = std::mem::take(&mut self.events);
        let result = self.write_frame(
            FrameKind::Events,
            self.buffer_first,
            self.buffer_last,
            self.events_in_buffer,
            &payload,
        );
        self.events = payload;
        self.events.clear();
        self.events_in_buffer = 0;
        self.frames.push(result?);
        Ok(())
    }

    /// Writes a checkpoint: buffered events first, then the pages (`(page number, 4096
    /// bytes)`, streamed into frames of [`WriterOptions::pages_per_frame`]), then the
    /// metadata frame that commits them. A full checkpoint lists every non-zero page; a delta
    /// lists pages changed since the previous checkpoint (including pages that became zero).
    /// [`crate::PageTracker`] computes either.
    pub fn checkpoint<I, P>(
        &mut self,
        input: CheckpointInput,
        pages: I,
    ) -> Result<CheckpointIndexEntry, WriteError>
    where
        I: IntoIterator<Item = (u64, P)>,
        P: AsRef<[u8]>,
    {
        self.check_usable()?;
        self.check_position("a checkpoint", input.position)?;
        if self.checkpoints.is_empty() && !input.full {
            return Err(WriteError::FirstCheckpointNotFull {
                name: self.name.clone(),
            });
        }
        self.flush_frame()?;
        let first_offset = self.committed;
        let per_frame = self.opts.pages_per_frame as usize;
        let mut buf = Vec::with_capacity(per_frame * PAGE_ITEM_LEN);
        let mut in_frame = 0u32;
        let mut total_pages = 0u64;
        let mut page_frames = 0u64;
        let mut compressed_bytes = 0u64;
        for (page, bytes) in pages {
            let bytes = bytes.as_ref();
            if bytes.len() != PAGE_SIZE {
                let err = WriteError::BadPage {
                    name: self.name.clone(),
                    page,
                    len: bytes.len(),
                };
                if page_frames > 0 {
                    // Page frames of a checkpoint that will never be committed are already
                    // in the file; anything written after them would be misread.
                    self.failed = Some(format!("{err} (after {page_frames} page frames)"));
                }
                return Err(err);
            }
            buf.extend_from_slice(&page.to_le_bytes());
            buf.extend_from_slice(bytes);
            in_frame += 1;
            total_pages += 1;
            if in_frame as usize == per_frame {
                let e = self.write_frame(
                    FrameKind::CheckpointPages,
                    input.position,
                    input.position,
                    in_frame,
                    &buf,
                )?;
                compressed_bytes += e.compressed_len as u64;
                self.frames.push(e);
                page_frames += 1;
                buf.clear();
                in_frame = 0;
            }
        }
        if in_frame > 0 {
            let e = self.write_frame(
                FrameKind::CheckpointPages,
                input.position,
                input.position,
                in_frame,
                &buf,
            )?;
            compressed_bytes += e.compressed_len as u64;
            self.frames.push(e);
            page_frames += 1;
        }
        let meta = CheckpointMeta {
            ordinal: self.checkpoints.len() as u64,
            position: input.position,
            event_index: self.events_total,
            cpu_state: input.cpu_state,
            device_state: input.device_state,
            state_digest: input.state_digest,
            full: input.full,
            pages: total_pages,
            page_frames,
        };
        let payload =
            bincode::serde::encode_to_vec(&meta, crate::bincode_config()).map_err(|e| {
                WriteError::Encode {
                    name: self.name.clone(),
                    what: format!("checkpoint {}", meta.ordinal),
                    detail: e.to_string(),
                }
            })?;
        let e = self.write_frame(
            FrameKind::Checkpoint,
            input.position,
            input.position,
            1,
            &payload,
        )?;
        compressed_bytes += e.compressed_len as u64;
        self.frames.push(e);
        let entry = CheckpointIndexEntry {
            ordinal: meta.ordinal,
            position: meta.position,
            event_index: meta.event_index,
            first_offset,
            meta_offset: e.offset,
            meta_seq: e.seq,
            pages: total_pages,
            page_frames,
            full: meta.full,
            compressed_bytes,
        };
        self.checkpoints.push(entry);
        self.last_position = input.position;
        Ok(entry)
    }

    /// Gives up on the trace and returns the sink as it is: buffered events are not written
    /// and there is no footer, so the trace reads as truncated after its last whole frame.
    /// For callers that must stop after an error (and for tests of exactly that).
    pub fn into_inner(mut self) -> W {
        self.sink.take().expect("the sink is present until finish")
    }

    /// Ends the trace: buffered events, the footer frame, the trailer. Returns the sink and
    /// the footer written.
    pub fn finish(mut self, info: FinishInfo) -> Result<(W, Footer), WriteError> {
        self.flush_frame()?;
        self.check_position("the final position", info.final_position)?;
        let footer = Footer {
            frames: std::mem::take(&mut self.frames),
            checkpoints: std::mem::take(&mut self.checkpoints),
            final_position: info.final_position,
            final_state_digest: info.final_state_digest,
            serial_output_digest: info.serial_output_digest,
            serial_output_bytes: info.serial_output_bytes,
            exit: info.exit,
            event_counts: EventKind::NAMES
                .iter()
                .zip(self.counts)
                .filter(|(_, n)| *n > 0)
                .map(|(name, n)| (name.to_string(), n))
                .collect::<BTreeMap<_, _>>(),
            events_total: self.events_total,
        };
        let payload =
            bincode::serde::encode_to_vec(&footer, crate::bincode_config()).map_err(|e| {
                WriteError::Encode {
                    name: self.name.clone(),
                    what: "the footer".into(),
                    detail: e.to_string(),
                }
            })?;
        let last = footer.final_position;
        let first = footer.frames.first().map(|f| f.first).unwrap_or_default();
        let footer_entry = self.write_frame(FrameKind::Footer, first, last, 1, &payload)?;
        self.write_raw(&[&encode_trailer(footer_entry.offset)], "the trailer")?;
        let sink = self.sink.take().expect("the sink is present until finish");
        Ok((sink, footer))
    }
}

impl<W: Write> Drop for TraceWriter<W> {
    /// A writer dropped without `finish` (a panicking recorder) still writes the events it
    /// buffered, so the trace reads as truncated after them rather than losing them.
    fn drop(&mut self) {
        if self.sink.is_some() && self.failed.is_none() {
            let _ = self.flush_frame();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_frame_sizes_stay_within_the_reader_caps() {
        assert!(
            zstd::zstd_safe::compress_bound(MAX_FRAME_PAYLOAD)
                <= crate::frame::MAX_COMPRESSED_PAYLOAD
        );
    }

    /// A file header of an older `version`: this build's header (with the policy Stop, no
    /// guest CPUID and no host CPU: the zero bytes that end it) without the fields that
    /// version lacks, with its checksum.
    fn old_file_header(header: &Header, version: u32) -> Vec<u8> {
        let mut body = bincode::serde::encode_to_vec(header, crate::bincode_config()).unwrap();
        let missing = if version < 3 {
            5
        } else if version < crate::GUEST_CPUID_FORMAT {
            4
        } else if version < crate::FIRMWARE_REVISION_FORMAT {
            1
        } else {
            0
        };
        for _ in 0..missing {
            assert_eq!(
                body.pop(),
                Some(0),
                "the fields a version lacks end in zeros"
            );
        }
        let mut out = crate::FILE_MAGIC.to_vec();
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        let sum = crate::checksum64(&[&out[8..]]);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    #[test]
    fn headers_before_format_7_read_without_guest_cpuid_or_host_cpu() {
        use crate::{ClockMode, Delivery, GuestCpuid, HostCpu, MachineInfo, TraceReader};
        let mut header = Header::new(
            "bt",
            ClockMode::Virtual,
            Delivery::InstructionExact,
            MachineInfo::default(),
        );
        for version in 3..crate::GUEST_CPUID_FORMAT {
            let r = TraceReader::new(
                std::io::Cursor::new(old_file_header(&header, version)),
                "old.trace",
            )
            .unwrap();
            assert_eq!(r.format_version(), version);
            assert_eq!(*r.header(), header);
        }
        header.guest_cpuid = Some(GuestCpuid {
            source: "test".into(),
            ..GuestCpuid::default()
        });
        header.host_cpu = Some(HostCpu::detect());
        assert!(!header.host_cpu.as_ref().unwrap().vendor.is_empty());
        let new = encode_file_header(&header).unwrap();
        let r = TraceReader::new(std::io::Cursor::new(new), "new.trace").unwrap();
        assert_eq!(*r.header(), header);
    }

    #[test]
    fn headers_before_format_9_read_without_a_firmware_revision() {
        use crate::{ClockMode, Delivery, DigestScheme, MachineInfo, TraceReader};
        let mut header = Header::new(
            "bt",
            ClockMode::Host,
            Delivery::InstructionExact,
            MachineInfo::default(),
        );
        header.digest_scheme = Some(DigestScheme {
            version: 3,
            devices: vec!["pit".into()],
        });
        for version in crate::GUEST_CPUID_FORMAT..crate::FIRMWARE_REVISION_FORMAT {
            let r = TraceReader::new(
                std::io::Cursor::new(old_file_header(&header, version)),
                "old.trace",
            )
            .unwrap();
            assert_eq!(r.format_version(), version);
            assert_eq!(r.header().firmware_revision, None);
            assert_eq!(*r.header(), header);
        }
        header.firmware_revision = Some(2);
        let new = encode_file_header(&header).unwrap();
        let r = TraceReader::new(std::io::Cursor::new(new), "new.trace").unwrap();
        assert_eq!(r.format_version(), crate::FIRMWARE_REVISION_FORMAT);
        assert_eq!(r.header().firmware_revision, Some(2));
        assert_eq!(*r.header(), header);
    }

    #[test]
    fn format2_headers_read_with_a_reset_that_stops_the_run() {
        use crate::{ClockMode, Delivery, MachineInfo, ResetPolicy, TraceReader};
        let mut header = Header::new(
            "kvm",
            ClockMode::Host,
            Delivery::ExitSynchronous,
            MachineInfo {
                ram_size: 32 << 20,
                cmdline: "console=ttyS0".into(),
                ..MachineInfo::default()
            },
        );
        header.notes.insert("command".into(), "deja record".into());
        assert_eq!(header.on_reset, ResetPolicy::Stop);
        let old = old_file_header(&header, 2);
        let r = TraceReader::new(std::io::Cursor::new(old), "old.trace").unwrap();
        assert_eq!(r.format_version(), 2);
        assert_eq!(*r.header(), header);

        // This build's headers carry the policy.
        header.on_reset = ResetPolicy::Reboot;
        let new = encode_file_header(&header).unwrap();
        let r = TraceReader::new(std::io::Cursor::new(new), "new.trace").unwrap();
        assert_eq!(r.format_version(), FORMAT_VERSION);
        assert_eq!(r.header().on_reset, ResetPolicy::Reboot);
    }
}
