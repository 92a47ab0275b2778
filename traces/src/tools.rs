//! What `deja trace info|verify|dump|stats` print: structured, serde-serializable results
//! (the CLI offers `--json`) with `Display` impls for humans.

use crate::frame::FrameKind;
use crate::reader::{
    RawFrame, ReadError, TraceReader, TraceStatus, check_page_number, decode_events, decode_whole,
    page_items,
};
use crate::types::{
    CheckpointIndexEntry, CheckpointMeta, Digest, EventKind, ExitInfo, FrameIndexEntry, Header,
    Position,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Seek, Write};
use thiserror::Error;

/// Failures of the trace tools.
#[derive(Debug, Error)]
pub enum ToolError {
    /// Reading the trace failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// Writing the output failed.
    #[error("writing the dump: {0}")]
    Output(#[from] std::io::Error),
}

/// The footer's outcome fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeSummary {
    /// Final position.
    pub final_position: Position,
    /// Final state digest.
    pub final_state_digest: Option<Digest>,
    /// Digest of the guest's serial output.
    pub serial_output_digest: Option<Digest>,
    /// Bytes of serial output.
    pub serial_output_bytes: u64,
    /// How the run ended.
    pub exit: ExitInfo,
    /// Events by kind.
    pub event_counts: BTreeMap<String, u64>,
    /// All events.
    pub events_total: u64,
}

/// `deja trace info`: header and footer summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceInfo {
    /// The file.
    pub name: String,
    /// File size.
    pub file_bytes: u64,
    /// Format version.
    pub format_version: u32,
    /// Complete, truncated or damaged.
    pub status: TraceStatus,
    /// The header.
    pub header: Header,
    /// Frames before the footer (or the cut).
    pub frames: usize,
    /// Events in those frames (known from the frame index even without a footer).
    pub events: u64,
    /// Position of the last event or checkpoint in those frames.
    pub last_position: Position,
    /// Checkpoints.
    pub checkpoints: Vec<CheckpointIndexEntry>,
    /// The footer's outcome, if the trace has a footer.
    pub outcome: Option<OutcomeSummary>,
    /// The indices (in the header's images) of the images the trace embeds (format 8).
    pub embedded_images: Vec<usize>,
}

/// Summarizes a trace from its header and footer (or its frame index when it has no footer).
pub fn info<R: Read + Seek>(reader: &TraceReader<R>) -> TraceInfo {
    TraceInfo {
        name: reader.name().to_string(),
        file_bytes: reader.file_len(),
        format_version: reader.format_version(),
        status: reader.status().clone(),
        header: reader.header().clone(),
        frames: reader.frames().len(),
        events: reader
            .frames()
            .iter()
            .filter(|f| f.kind == FrameKind::Events.to_byte())
            .map(|f| f.items as u64)
            .sum(),
        last_position: reader.frames().last().map(|f| f.last).unwrap_or_default(),
        checkpoints: reader.checkpoints().to_vec(),
        embedded_images: (0..reader.header().images.len())
            .filter(|&i| reader.embeds_image(i))
            .collect(),
        outcome: reader.footer().map(|f| OutcomeSummary {
            final_position: f.final_position,
            final_state_digest: f.final_state_digest,
            serial_output_digest: f.serial_output_digest,
            serial_output_bytes: f.serial_output_bytes,
            exit: f.exit.clone(),
            event_counts: f.event_counts.clone(),
            events_total: f.events_total,
        }),
    }
}

fn opt_digest(d: &Option<Digest>) -> String {
    d.map(|d| d.to_hex()).unwrap_or_else(|| "-".into())
}

impl fmt::Display for TraceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = &self.header;
        writeln!(
            f,
            "trace        {} ({} bytes, format version {})",
            self.name, self.file_bytes, self.format_version
        )?;
        writeln!(f, "status       {}", self.status)?;
        writeln!(
            f,
            "recorded by  deja {} on {}, clock {:?}, delivery {:?}, on reset {:?}",
            h.deja_version, h.engine, h.clock, h.delivery, h.on_reset
        )?;
        writeln!(f, "created      {} (unix seconds)", h.created_unix_secs)?;
        writeln!(
            f,
            "machine      {} MiB RAM, cmdline {:?}, {} CPUID leaves",
            h.machine.ram_size >> 20,
            h.machine.cmdline,
            h.machine.cpuid.len()
        )?;
        match h.firmware_revision {
            Some(r) => writeln!(f, "firmware     table revision {r}")?,
            None => writeln!(
                f,
                "firmware     table revision 1 (the header predates the field)"
            )?,
        }
        for (i, img) in h.images.iter().enumerate() {
            writeln!(
                f,
                "image        {} ({} bytes, {}) blake3 {}{}",
                img.name,
                img.size,
                img.load,
                img.digest,
                if self.embedded_images.contains(&i) {
                    ", embedded"
                } else {
                    ""
                }
            )?;
        }
        writeln!(
            f,
            "options      digest every {} events, checkpoint every {} events, chaos seed {}",
            h.options.digest_interval,
            h.options.checkpoint_interval,
            h.options
                .chaos_seed
                .map(|s| s.to_string())
                .unwrap_or_else(|| "none".into())
        )?;
        if let Some(seen) = &h.guest_cpuid {
            for (ring, answers) in [(0, &seen.ring0), (3, &seen.ring3)] {
                // Leaves the table lists whose answer the guest saw otherwise.
                let differ: Vec<String> = answers
                    .iter()
                    .filter(|a| {
                        h.machine.cpuid.iter().any(|t| {
                            t.function == a.function
                                && (!t.indexed || t.index == a.index)
                                && (t.eax, t.ebx, t.ecx, t.edx) != (a.eax, a.ebx, a.ecx, a.edx)
                        })
                    })
                    .map(|a| format!("{:#x}.{}", a.function, a.index))
                    .collect();
                let verdict = if differ.is_empty() {
                    "as the table".to_string()
                } else {
                    format!("other than the table in leaves {}", differ.join(", "))
                };
                writeln!(
                    f,
                    "guest CPUID  ring {ring}: {} leaves probed, {verdict} (from {})",
                    answers.len(),
                    seen.source
                )?;
            }
        }
        if let Some(cpu) = &h.host_cpu {
            writeln!(f, "host CPU     {cpu}")?;
        }
        match &h.digest_scheme {
            Some(d) => writeln!(
                f,
                "digests      scheme {} over the CPU, memory and {} devices ({})",
                d.version,
                d.devices.len(),
                d.devices.join(", ")
            )?,
            None => writeln!(
                f,
                "digests      scheme 1 over the CPU, memory and every device, by position"
            )?,
        }
        for (k, v) in &h.notes {
            writeln!(f, "note         {k} = {v}")?;
        }
        writeln!(
            f,
            "frames       {} holding {} events, last at {}",
            self.frames, self.events, self.last_position
        )?;
        writeln!(f, "checkpoints  {}", self.checkpoints.len())?;
        for c in &self.checkpoints {
            writeln!(
                f,
                "  #{:<4} {} event {} {} pages{} ({} bytes compressed)",
                c.ordinal,
                c.position,
                c.event_index,
                c.pages,
                if c.full { " full" } else { "" },
                c.compressed_bytes
            )?;
        }
        match &self.outcome {
            Some(o) => {
                writeln!(f, "final        {}", o.final_position)?;
                writeln!(
                    f,
                    "exit         {} ({})",
                    o.exit
                        .status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "none".into()),
                    o.exit.reason
                )?;
                writeln!(f, "state        {}", opt_digest(&o.final_state_digest))?;
                writeln!(
                    f,
                    "serial out   {} bytes, blake3 {}",
                    o.serial_output_bytes,
                    opt_digest(&o.serial_output_digest)
                )?;
                write!(f, "events       {}", o.events_total)?;
                for (k, n) in &o.event_counts {
                    write!(f, " {k}={n}")?;
                }
                writeln!(f)
            }
            None => writeln!(f, "outcome      unknown (no footer)"),
        }
    }
}

/// One thing `verify` found wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyProblem {
    /// The frame, when the problem is in one.
    pub frame: Option<u64>,
    /// Its offset.
    pub offset: Option<u64>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for VerifyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.frame, self.offset) {
            (Some(n), Some(o)) => write!(f, "frame {n} at offset {o}: {}", self.message),
            (None, Some(o)) => write!(f, "offset {o}: {}", self.message),
            _ => write!(f, "{}", self.message),
        }
    }
}

/// `deja trace verify`: the result of checking everything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// The file.
    pub name: String,
    /// No problems and the trace is complete.
    pub ok: bool,
    /// Complete, truncated or damaged.
    pub status: TraceStatus,
    /// Frames whose checksum and contents were checked.
    pub frames_checked: u64,
    /// Events decoded.
    pub events: u64,
    /// Checkpoints checked.
    pub checkpoints: u64,
    /// Checkpoint pages read.
    pub pages: u64,
    /// Problems (the first [`MAX_PROBLEMS`]).
    pub problems: Vec<VerifyProblem>,
    /// Problems beyond those listed.
    pub problems_omitted: u64,
}

/// Problems listed in a report before the rest are only counted.
pub const MAX_PROBLEMS: usize = 100;

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} ({}): {} frames, {} events, {} checkpoints, {} pages checked",
            self.name,
            if self.ok { "OK" } else { "FAILED" },
            self.status,
            self.frames_checked,
            self.events,
            self.checkpoints,
            self.pages
        )?;
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        if self.problems_omitted > 0 {
            writeln!(f, "  … and {} more problems", self.problems_omitted)?;
        }
        Ok(())
    }
}

/// One step of a walk over every frame.
enum Step {
    Frame(u64, RawFrame),
    Bad(u64, u64, String),
}

/// Walks every frame from the first to the footer (or the cut), reading and checking each;
/// steps over damaged frames when their header still gives their length.
fn walk<R: Read + Seek>(
    reader: &mut TraceReader<R>,
    mut f: impl FnMut(&mut TraceReader<R>, Step) -> Result<(), ToolError>,
) -> Result<(), ToolError> {
    let mut offset = reader.header_len();
    let mut seq = 0u64;
    let end = reader.data_end();
    while offset < end {
        match reader.frame_at(offset, seq) {
            Ok(frame) => {
                let len = frame.header.frame_len();
                f(reader, Step::Frame(offset, frame))?;
                offset += len;
            }
            Err(ReadError::Frame { detail, .. }) => {
                f(reader, Step::Bad(seq, offset, detail))?;
                match reader.raw_header_at(offset)? {
                    Some(h) => offset += h.frame_len(),
                    None => {
                        f(
                            reader,
                            Step::Bad(
                                seq + 1,
                                offset,
                                "cannot find the next frame; stopped checking".into(),
                            ),
                        )?;
                        return Ok(());
                    }
                }
            }
            Err(e) => return Err(e.into()),
        }
        seq += 1;
    }
    Ok(())
}

/// Checks every checksum, sequence number, position order, checkpoint and the footer's
/// consistency with the frames. Only I/O failures are errors; everything else is a problem
/// in the report.
pub fn verify<R: Read + Seek>(reader: &mut TraceReader<R>) -> Result<VerifyReport, ReadError> {
    verify_with_progress(reader, &mut |_| {})
}

/// [`verify`], telling `progress` the file offset of each frame as it is checked (for
/// progress displays over long traces).
pub fn verify_with_progress<R: Read + Seek>(
    reader: &mut TraceReader<R>,
    progress: &mut dyn FnMut(u64),
) -> Result<VerifyReport, ReadError> {
    let mut problems: Vec<VerifyProblem> = Vec::new();
    let mut omitted = 0u64;
    let mut push = |frame: Option<u64>, offset: Option<u64>, message: String| {
        if problems.len() < MAX_PROBLEMS {
            problems.push(VerifyProblem {
                frame,
                offset,
                message,
            });
        } else {
            omitted += 1;
        }
    };
    let mut frames_seen: Vec<FrameIndexEntry> = Vec::new();
    let mut checkpoints_seen: Vec<CheckpointIndexEntry> = Vec::new();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let (mut events, mut pages, mut frames_checked) = (0u64, 0u64, 0u64);
    let mut last = Position::default();
    let mut run = (0u64, 0u64, 0u64, reader.header_len()); // pages, frames, bytes, first offset
    let ram_size = reader.header().machine.ram_size;
    let images = reader.header().images.len();
    let result = walk(reader, |_r, step| {
        match step {
            Step::Bad(seq, offset, detail) => push(Some(seq), Some(offset), detail),
            Step::Frame(offset, frame) => {
                progress(offset);
                frames_checked += 1;
                let h = frame.header;
                frames_seen.push(FrameIndexEntry {
                    offset,
                    seq: h.seq,
                    kind: h.kind.to_byte(),
                    first: h.first,
                    last: h.last,
                    items: h.items,
                    compressed_len: h.compressed_len,
                    uncompressed_len: h.uncompressed_len,
                });
                if !last.at_or_before(&h.first) {
                    push(
                        Some(h.seq),
                        Some(offset),
                        format!(
                            "frame starts at {}, before the previous position {last}",
                            h.first
                        ),
                    );
                }
                match h.kind {
                    FrameKind::Events => {
                        match decode_events(&h, &frame.payload) {
                            Ok(evs) => {
                                for (e, _) in &evs {
                                    *counts.entry(e.kind.name().to_string()).or_default() += 1;
                                }
                                events += evs.len() as u64;
                            }
                            Err(d) => push(Some(h.seq), Some(offset), d),
                        }
                        last = h.last;
                        run = (0, 0, 0, offset + h.frame_len());
                    }
                    FrameKind::CheckpointPages => {
                        run.0 += h.items as u64;
                        run.1 += 1;
                        run.2 += h.compressed_len as u64;
                        for (n, _) in page_items(&frame.payload) {
                            pages += 1;
                            if let Err(d) = check_page_number(ram_size, n) {
                                push(Some(h.seq), Some(offset), d);
                            }
                        }
                        if h.first != h.last {
                            push(
                                Some(h.seq),
                                Some(offset),
                                "a page frame spans more than one position".into(),
                            );
                        }
                    }
                    FrameKind::Checkpoint => {
                        match decode_whole::<CheckpointMeta>(&frame.payload, "checkpoint metadata")
                        {
                            Ok(meta) => {
                                let n = checkpoints_seen.len() as u64;
                                let mut bad = |m: String| push(Some(h.seq), Some(offset), m);
                                if meta.ordinal != n {
                                    bad(format!(
                                        "checkpoint ordinal {} where {n} was expected",
                                        meta.ordinal
                                    ));
                                }
                                if meta.position != h.first {
                                    bad(format!(
                                        "checkpoint at {} in a frame at {}",
                                        meta.position, h.first
                                    ));
                                }
                                if (meta.pages, meta.page_frames) != (run.0, run.1) {
                                    bad(format!(
                                        "checkpoint {} claims {} pages in {} frames; {} pages in {} frames precede it",
                                        meta.ordinal, meta.pages, meta.page_frames, run.0, run.1
                                    ));
                                }
                                if meta.event_index != events {
                                    bad(format!(
                                        "checkpoint {} says {} events precede it; {events} do",
                                        meta.ordinal, meta.event_index
                                    ));
                                }
                                if n == 0 && !meta.full {
                                    bad("the first checkpoint is not full".into());
                                }
                                checkpoints_seen.push(CheckpointIndexEntry {
                                    ordinal: meta.ordinal,
                                    position: meta.position,
                                    event_index: meta.event_index,
                                    first_offset: run.3,
                                    meta_offset: offset,
                                    meta_seq: h.seq,
                                    pages: meta.pages,
                                    page_frames: meta.page_frames,
                                    full: meta.full,
                                    compressed_bytes: run.2 + h.compressed_len as u64,
                                });
                            }
                            Err(d) => push(Some(h.seq), Some(offset), d),
                        }
                        last = h.last;
                        run = (0, 0, 0, offset + h.frame_len());
                    }
                    FrameKind::Image => {
                        if events != 0 || !checkpoints_seen.is_empty() {
                            push(
                                Some(h.seq),
                                Some(offset),
                                "an image frame after events or checkpoints".into(),
                            );
                        }
                        if h.items as usize >= images {
                            push(
                                Some(h.seq),
                                Some(offset),
                                format!(
                                    "an image frame for image {}, but the header lists {images}",
                                    h.items
                                ),
                            );
                        }
                        run = (0, 0, 0, offset + h.frame_len());
                    }
                    FrameKind::Footer => push(
                        Some(h.seq),
                        Some(offset),
                        "a footer frame before the end of the frames".into(),
                    ),
                }
            }
        }
        Ok(())
    });
    match result {
        Ok(()) => {}
        Err(ToolError::Read(e)) => return Err(e),
        Err(ToolError::Output(e)) => unreachable!("verify writes no output: {e}"),
    }
    for index in 0..images {
        // Reads nothing when the image is not embedded.
        if let Err(e) = reader.embedded_image(index) {
            push(None, None, e.to_string());
        }
    }
    let truncated = matches!(reader.status(), TraceStatus::Truncated { .. });
    if run.1 > 0 && !truncated {
        push(
            None,
            Some(run.3),
            format!("{} page frames at the end belong to no checkpoint", run.1),
        );
    }
    match reader.status().clone() {
        TraceStatus::Complete => {}
        TraceStatus::Truncated {
            valid_until,
            detail,
            ..
        } => push(
            None,
            Some(valid_until),
            format!("the trace is truncated: {detail}"),
        ),
        TraceStatus::Damaged { detail } => {
            push(None, None, format!("the trace is damaged: {detail}"))
        }
    }
    if let Some(footer) = reader.footer().cloned() {
        let mut bad = |m: String| push(None, None, format!("footer: {m}"));
        if footer.frames != frames_seen {
            let first_diff = footer
                .frames
                .iter()
                .zip(&frames_seen)
                .position(|(a, b)| a != b)
                .unwrap_or(footer.frames.len().min(frames_seen.len()));
            bad(format!(
                "its frame index ({} frames) differs from the frames ({}), first at index entry {first_diff}",
                footer.frames.len(),
                frames_seen.len()
            ));
        }
        if footer.checkpoints != checkpoints_seen {
            bad(format!(
                "its checkpoint index ({} checkpoints) differs from the checkpoints found ({})",
                footer.checkpoints.len(),
                checkpoints_seen.len()
            ));
        }
        if footer.events_total != events {
            bad(format!(
                "it counts {} events; the frames hold {events}",
                footer.events_total
            ));
        }
        if footer.event_counts != counts {
            bad(format!(
                "its counts by kind {:?} differ from the frames' {counts:?}",
                footer.event_counts
            ));
        }
        if !last.at_or_before(&footer.final_position) {
            bad(format!(
                "final position {} is before the last event or checkpoint at {last}",
                footer.final_position
            ));
        }
    }
    let ok = problems.is_empty() && omitted == 0 && *reader.status() == TraceStatus::Complete;
    Ok(VerifyReport {
        name: reader.name().to_string(),
        ok,
        status: reader.status().clone(),
        frames_checked,
        events,
        checkpoints: checkpoints_seen.len() as u64,
        pages,
        problems,
        problems_omitted: omitted,
    })
}

/// What `dump` prints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DumpOptions {
    /// Skip events before this position (not at or after it).
    pub from: Option<Position>,
    /// Stop after this many lines.
    pub limit: Option<u64>,
    /// Only these kinds (names from [`EventKind::NAMES`]); all when empty.
    pub kinds: Vec<String>,
    /// Also print a line for each checkpoint.
    pub checkpoints: bool,
}

/// `deja trace dump`: one line per event (`icount exits kind details`), optionally with
/// checkpoint lines, in file order. Returns the lines written. Stops with the error at the
/// first damaged frame, after printing everything before it.
pub fn dump<R: Read + Seek>(
    reader: &mut TraceReader<R>,
    out: &mut dyn Write,
    opts: &DumpOptions,
) -> Result<u64, ToolError> {
    writeln!(
        out,
        "# {:>10} {:>10} {:<12} details",
        "icount", "exits", "kind"
    )?;
    let mut lines = 0u64;
    let limit = opts.limit.unwrap_or(u64::MAX);
    let wanted = |at: Position| opts.from.is_none_or(|from| from.at_or_before(&at));
    let result = walk(reader, |_r, step| {
        if lines >= limit {
            return Ok(());
        }
        let (offset, frame) = match step {
            Step::Frame(o, f) => (o, f),
            Step::Bad(seq, offset, detail) => {
                return Err(ReadError::Frame {
                    name: String::new(),
                    frame: seq,
                    offset,
                    detail,
                }
                .into());
            }
        };
        let h = frame.header;
        match h.kind {
            FrameKind::Events => {
                let evs = decode_events(&h, &frame.payload).map_err(|detail| ReadError::Frame {
                    name: String::new(),
                    frame: h.seq,
                    offset,
                    detail,
                })?;
                for (e, _) in evs {
                    if lines >= limit {
                        break;
                    }
                    if wanted(e.at)
                        && (opts.kinds.is_empty() || opts.kinds.iter().any(|k| k == e.kind.name()))
                    {
                        writeln!(out, "{e}")?;
                        lines += 1;
                    }
                }
            }
            FrameKind::Checkpoint if opts.checkpoints && wanted(h.first) => {
                let meta: CheckpointMeta = decode_whole(&frame.payload, "checkpoint metadata")
                    .map_err(|detail| ReadError::Frame {
                        name: String::new(),
                        frame: h.seq,
                        offset,
                        detail,
                    })?;
                writeln!(
                    out,
                    "{:>12} {:>10} {:<12} #{} {} pages{}, cpu {} bytes, devices {} bytes{}",
                    meta.position.icount,
                    meta.position.exits,
                    "checkpoint",
                    meta.ordinal,
                    meta.pages,
                    if meta.full { " (full)" } else { "" },
                    meta.cpu_state.len(),
                    meta.device_state.len(),
                    meta.state_digest
                        .map(|d| format!(", digest {d}"))
                        .unwrap_or_default()
                )?;
                lines += 1;
            }
            _ => {}
        }
        Ok(())
    });
    // Frame errors raised inside the walk lack the file name; add it.
    match result {
        Err(ToolError::Read(ReadError::Frame {
            frame,
            offset,
            detail,
            ..
        })) => Err(ReadError::Frame {
            name: reader.name().to_string(),
            frame,
            offset,
            detail,
        }
        .into()),
        other => other.map(|()| lines),
    }
}

/// Sizes of one frame kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FrameKindStats {
    /// Frames.
    pub frames: u64,
    /// Payload bytes as stored.
    pub compressed_bytes: u64,
    /// Payload bytes decompressed.
    pub uncompressed_bytes: u64,
}

/// Counts and sizes of one event kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventKindStats {
    /// Events.
    pub count: u64,
    /// Their bincode bytes before compression.
    pub encoded_bytes: u64,
}

/// One checkpoint's sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointStats {
    /// Ordinal.
    pub ordinal: u64,
    /// Position.
    pub position: Position,
    /// Full image or delta.
    pub full: bool,
    /// Pages stored.
    pub pages: u64,
    /// Bytes of all its frames' payloads as stored.
    pub compressed_bytes: u64,
    /// CPU state blob bytes.
    pub cpu_state_bytes: u64,
    /// Device state blob bytes.
    pub device_state_bytes: u64,
    /// State digest.
    pub state_digest: Option<Digest>,
}

/// `deja trace stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceStats {
    /// The file.
    pub name: String,
    /// File size.
    pub file_bytes: u64,
    /// Header bytes.
    pub header_bytes: u64,
    /// Footer frame and trailer bytes.
    pub footer_bytes: u64,
    /// Complete, truncated or damaged.
    pub status: TraceStatus,
    /// Frames by kind name.
    pub frames_by_kind: BTreeMap<String, FrameKindStats>,
    /// Events.
    pub events_total: u64,
    /// Events by kind name.
    pub events_by_kind: BTreeMap<String, EventKindStats>,
    /// Stored (compressed, with frame headers) bytes of event frames per event.
    pub stored_bytes_per_event: f64,
    /// bincode bytes per event before compression.
    pub encoded_bytes_per_event: f64,
    /// Uncompressed / compressed payload bytes of event frames.
    pub event_compression_ratio: f64,
    /// Uncompressed / compressed payload bytes of all frames.
    pub overall_compression_ratio: f64,
    /// Checkpoints.
    pub checkpoints: Vec<CheckpointStats>,
    /// Final state digest (footer).
    pub final_state_digest: Option<Digest>,
    /// Serial output digest (footer).
    pub serial_output_digest: Option<Digest>,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// Reads every frame and measures it. Stops with the error at the first damaged frame.
pub fn stats<R: Read + Seek>(reader: &mut TraceReader<R>) -> Result<TraceStats, ReadError> {
    let mut by_frame: BTreeMap<String, FrameKindStats> = BTreeMap::new();
    let mut by_event: BTreeMap<String, EventKindStats> = BTreeMap::new();
    let mut checkpoints = Vec::new();
    let mut run_bytes = 0u64;
    let (mut events, mut encoded, mut event_frames_stored) = (0u64, 0u64, 0u64);
    let name = reader.name().to_string();
    let frame_err = |seq: u64, offset: u64, detail: String| ReadError::Frame {
        name: name.clone(),
        frame: seq,
        offset,
        detail,
    };
    let result = walk(reader, |_r, step| {
        let (offset, frame) = match step {
            Step::Frame(o, f) => (o, f),
            Step::Bad(seq, offset, detail) => return Err(frame_err(seq, offset, detail).into()),
        };
        let h = frame.header;
        let s = by_frame.entry(h.kind.name().to_string()).or_default();
        s.frames += 1;
        s.compressed_bytes += h.compressed_len as u64;
        s.uncompressed_bytes += h.uncompressed_len as u64;
        match h.kind {
            FrameKind::Events => {
                event_frames_stored += h.frame_len();
                let evs =
                    decode_events(&h, &frame.payload).map_err(|d| frame_err(h.seq, offset, d))?;
                for (e, size) in evs {
                    let k = by_event.entry(e.kind.name().to_string()).or_default();
                    k.count += 1;
                    k.encoded_bytes += size as u64;
                    events += 1;
                    encoded += size as u64;
                }
            }
            FrameKind::CheckpointPages => run_bytes += h.compressed_len as u64,
            FrameKind::Checkpoint => {
                let meta: CheckpointMeta = decode_whole(&frame.payload, "checkpoint metadata")
                    .map_err(|d| frame_err(h.seq, offset, d))?;
                checkpoints.push(CheckpointStats {
                    ordinal: meta.ordinal,
                    position: meta.position,
                    full: meta.full,
                    pages: meta.pages,
                    compressed_bytes: run_bytes + h.compressed_len as u64,
                    cpu_state_bytes: meta.cpu_state.len() as u64,
                    device_state_bytes: meta.device_state.len() as u64,
                    state_digest: meta.state_digest,
                });
                run_bytes = 0;
            }
            FrameKind::Footer | FrameKind::Image => {}
        }
        Ok(())
    });
    match result {
        Ok(()) => {}
        Err(ToolError::Read(e)) => return Err(e),
        Err(ToolError::Output(e)) => unreachable!("stats writes no output: {e}"),
    }
    let ev = by_frame
        .get(FrameKind::Events.name())
        .cloned()
        .unwrap_or_default();
    let (all_c, all_u) = by_frame.values().fold((0, 0), |(c, u), s| {
        (c + s.compressed_bytes, u + s.uncompressed_bytes)
    });
    Ok(TraceStats {
        name: reader.name().to_string(),
        file_bytes: reader.file_len(),
        header_bytes: reader.header_len(),
        footer_bytes: reader.file_len() - reader.data_end(),
        status: reader.status().clone(),
        frames_by_kind: by_frame,
        events_total: events,
        events_by_kind: by_event,
        stored_bytes_per_event: ratio(event_frames_stored, events),
        encoded_bytes_per_event: ratio(encoded, events),
        event_compression_ratio: ratio(ev.uncompressed_bytes, ev.compressed_bytes),
        overall_compression_ratio: ratio(all_u, all_c),
        checkpoints,
        final_state_digest: reader.footer().and_then(|f| f.final_state_digest),
        serial_output_digest: reader.footer().and_then(|f| f.serial_output_digest),
    })
}

impl fmt::Display for TraceStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "trace {} ({} bytes; header {}, footer+trailer {}; {})",
            self.name, self.file_bytes, self.header_bytes, self.footer_bytes, self.status
        )?;
        writeln!(
            f,
            "{:<18} {:>8} {:>14} {:>14} {:>7}",
            "frames", "count", "stored", "uncompressed", "ratio"
        )?;
        for (k, s) in &self.frames_by_kind {
            writeln!(
                f,
                "{k:<18} {:>8} {:>14} {:>14} {:>7.2}",
                s.frames,
                s.compressed_bytes,
                s.uncompressed_bytes,
                ratio(s.uncompressed_bytes, s.compressed_bytes)
            )?;
        }
        writeln!(
            f,
            "events {}: {:.2} stored bytes/event, {:.2} encoded bytes/event, compression {:.2}x (all frames {:.2}x)",
            self.events_total,
            self.stored_bytes_per_event,
            self.encoded_bytes_per_event,
            self.event_compression_ratio,
            self.overall_compression_ratio
        )?;
        for (k, s) in &self.events_by_kind {
            writeln!(
                f,
                "  {k:<14} {:>10} events {:>8.2} encoded bytes each",
                s.count,
                ratio(s.encoded_bytes, s.count)
            )?;
        }
        for c in &self.checkpoints {
            writeln!(
                f,
                "checkpoint #{} {} {} pages{} {} bytes stored, cpu {} B, devices {} B, digest {}",
                c.ordinal,
                c.position,
                c.pages,
                if c.full { " (full)" } else { "" },
                c.compressed_bytes,
                c.cpu_state_bytes,
                c.device_state_bytes,
                opt_digest(&c.state_digest)
            )?;
        }
        writeln!(f, "final state {}", opt_digest(&self.final_state_digest))?;
        writeln!(f, "serial out  {}", opt_digest(&self.serial_output_digest))
    }
}

/// Every event kind name, for CLI help and filters.
pub fn event_kind_names() -> &'static [&'static str] {
    &EventKind::NAMES
}
