//! The trace format end to end: round trips, truncation, corruption, version checks, failing
//! sinks, fuzzing and seeking.

mod common;

use common::*;
use deja_traces::testing::FailingSink;
use deja_traces::*;

fn all_events<R: std::io::Read + std::io::Seek>(r: &mut TraceReader<R>) -> Vec<Event> {
    r.events().collect::<Result<Vec<_>, _>>().unwrap()
}

#[test]
fn events_checkpoints_and_memory_round_trip() {
    let rec = record(1, 2000, 500, small_frames());
    let mut r = open(&rec.bytes).unwrap();
    assert_eq!(*r.status(), TraceStatus::Complete);
    assert_eq!(*r.header(), header());
    assert_eq!(all_events(&mut r), rec.events);
    let footer = r.footer().unwrap().clone();
    assert_eq!(footer, rec.footer);
    assert_eq!(footer.events_total, 2000);
    assert_eq!(footer.event_counts.values().sum::<u64>(), 2000);
    assert_eq!(footer.exit.status, Some(3));
    assert!(
        footer.frames.len() > 50,
        "small frames: {}",
        footer.frames.len()
    );

    let cps = r.checkpoints().to_vec();
    assert_eq!(cps.len(), 4);
    assert!(cps[0].full && !cps[1].full);
    assert!(
        cps[1].pages < cps[0].pages + 4,
        "deltas store only changed pages"
    );
    for (k, cp) in cps.iter().enumerate() {
        let mem = r.memory_at(cp).unwrap();
        assert_eq!(mem, rec.memories[k], "memory at checkpoint {k}");
        let c = r.read_checkpoint(cp).unwrap();
        let input = &rec.checkpoint_inputs[k];
        assert_eq!(c.meta.position, input.position);
        assert_eq!(c.meta.cpu_state, input.cpu_state);
        assert_eq!(c.meta.device_state, input.device_state);
        assert_eq!(c.meta.state_digest, input.state_digest);
        assert_eq!(c.meta.event_index, 500 * k as u64);
        assert_eq!(c.pages.len() as u64, cp.pages);
        let after: Vec<Event> = r.events_after(cp).unwrap().map(Result::unwrap).collect();
        assert_eq!(after, rec.events[500 * k..], "events after checkpoint {k}");
    }

    let report = verify(&mut r).unwrap();
    assert!(report.ok, "{report}");
    assert_eq!(report.events, 2000);
    assert_eq!(report.checkpoints, 4);

    let st = stats(&mut r).unwrap();
    assert_eq!(st.events_total, 2000);
    assert_eq!(st.checkpoints.len(), 4);
    assert!(st.event_compression_ratio > 1.0, "{st}");
    assert_eq!(
        st.events_by_kind.values().map(|k| k.count).sum::<u64>(),
        2000
    );

    let mut out = Vec::new();
    let lines = dump(&mut r, &mut out, &DumpOptions::default()).unwrap();
    assert_eq!(lines, 2000);
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.lines().count(), 2001);
    assert!(
        text.lines()
            .nth(1)
            .unwrap()
            .contains(rec.events[0].kind.name())
    );
    let mut out = Vec::new();
    let opts = DumpOptions {
        kinds: vec!["interrupt".into()],
        checkpoints: true,
        ..Default::default()
    };
    let lines = dump(&mut r, &mut out, &opts).unwrap();
    let interrupts = footer.event_counts["interrupt"];
    assert_eq!(lines, interrupts + 4);

    let inf = info(&r);
    let text = inf.to_string();
    assert!(
        text.contains("guest:hello") && text.contains("complete"),
        "{text}"
    );
}

/// A sink that counts bytes and keeps none.
struct Counting(u64);
impl std::io::Write for Counting {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn writer_memory_stays_bounded_by_one_frame() {
    let opts = WriterOptions::default();
    let mut w = TraceWriter::new(Counting(0), "bounded", &header(), opts).unwrap();
    let mut rng = Rng(7);
    let mut pos = Position::default();
    let mut max_buffered = 0;
    for _ in 0..300_000 {
        pos.exits += 1;
        pos.icount += 100;
        w.push(&event(&mut rng, pos)).unwrap();
        max_buffered = max_buffered.max(w.buffered_bytes());
    }
    assert!(max_buffered < opts.frame_bytes + 256, "{max_buffered}");
    assert!(w.frames_written() > 10);
    let written_before_finish = w.bytes_written();
    assert!(written_before_finish > 1_000_000);
    let (sink, footer) = w.finish(FinishInfo::default().with_final(pos)).unwrap();
    assert_eq!(footer.events_total, 300_000);
    assert!(sink.0 > written_before_finish);
}

trait WithFinal {
    fn with_final(self, p: Position) -> Self;
}
impl WithFinal for FinishInfo {
    fn with_final(mut self, p: Position) -> Self {
        self.final_position = p;
        self
    }
}

#[test]
fn truncation_at_every_byte_keeps_every_whole_frame() {
    let rec = record(2, 60, 25, small_frames());
    let full = open(&rec.bytes).unwrap();
    let header_len = full.header_len() as usize;
    let frames = rec.footer.frames.clone();
    for cut in 0..rec.bytes.len() {
        let bytes = &rec.bytes[..cut];
        let mut r = match open(bytes) {
            Ok(r) => r,
            Err(e) => {
                assert!(cut < header_len, "cut {cut}: {e}");
                assert!(
                    matches!(e, ReadError::TruncatedHeader { .. }),
                    "cut {cut}: {e}"
                );
                continue;
            }
        };
        let whole: Vec<&FrameIndexEntry> = frames
            .iter()
            .filter(|f| {
                f.offset + (FRAME_HEADER_LEN as u64) + f.compressed_len as u64 <= cut as u64
            })
            .collect();
        match r.status() {
            TraceStatus::Truncated {
                whole_frames,
                valid_until,
                ..
            } => {
                assert_eq!(*whole_frames, whole.len() as u64, "cut {cut}");
                let end = whole
                    .last()
                    .map(|f| f.offset + FRAME_HEADER_LEN as u64 + f.compressed_len as u64)
                    .unwrap_or(header_len as u64);
                assert_eq!(*valid_until, end, "cut {cut}");
            }
            other => panic!("cut {cut}: status {other:?}"),
        }
        let expected_events: u64 = whole
            .iter()
            .filter(|f| f.kind == FrameKind::Events.to_byte())
            .map(|f| f.items as u64)
            .sum();
        let events = all_events(&mut r);
        assert_eq!(events.len() as u64, expected_events, "cut {cut}");
        assert_eq!(events[..], rec.events[..events.len()]);
        let expected_cps = whole
            .iter()
            .filter(|f| f.kind == FrameKind::Checkpoint.to_byte())
            .count();
        assert_eq!(r.checkpoints().len(), expected_cps, "cut {cut}");
        if let Some(cp) = r.checkpoints().last().copied() {
            assert_eq!(cp, rec.footer.checkpoints[cp.ordinal as usize]);
            if cut % 97 == 0 {
                assert_eq!(r.memory_at(&cp).unwrap(), rec.memories[cp.ordinal as usize]);
            }
        }
        let report = verify(&mut r).unwrap();
        assert!(!report.ok);
        assert_eq!(report.problems.len(), 1, "cut {cut}: {report}");
        assert!(report.problems[0].message.contains("truncated"));
    }
    // The whole file, of course, is complete.
    assert_eq!(*open(&rec.bytes).unwrap().status(), TraceStatus::Complete);
}

#[test]
fn bit_flips_are_reported_with_the_frame_number_and_offset() {
    let rec = record(3, 300, 100, small_frames());
    let mut rng = Rng(99);
    for f in &rec.footer.frames {
        let len = FRAME_HEADER_LEN as u64 + f.compressed_len as u64;
        // A flip in the header and a few in the payload of every frame.
        let mut spots = vec![f.offset + rng.below(FRAME_HEADER_LEN as u64)];
        for _ in 0..3 {
            spots.push(
                f.offset + FRAME_HEADER_LEN as u64 + rng.below(len - FRAME_HEADER_LEN as u64),
            );
        }
        for at in spots {
            let mut bytes = rec.bytes.clone();
            bytes[at as usize] ^= 1 << rng.below(8);
            let mut r = open(&bytes).unwrap();
            let report = verify(&mut r).unwrap();
            assert!(!report.ok);
            let p = &report.problems[0];
            assert_eq!(
                (p.frame, p.offset),
                (Some(f.seq), Some(f.offset)),
                "flip at {at}: {report}"
            );
            if at >= f.offset + FRAME_HEADER_LEN as u64 {
                assert!(p.message.contains("checksum mismatch"), "{p}");
            }
            if f.kind == FrameKind::Events.to_byte() {
                let err = r.events().find_map(Result::err).expect("an error");
                let text = err.to_string();
                assert!(
                    text.contains(&format!("frame {} at offset {}", f.seq, f.offset)),
                    "{text}"
                );
            }
        }
    }
}

#[test]
fn flips_in_header_footer_and_trailer_are_caught() {
    let rec = record(4, 100, 50, small_frames());
    let r = open(&rec.bytes).unwrap();
    let header_len = r.header_len() as usize;
    for at in [9usize, 13, 20, header_len - 3] {
        let mut bytes = rec.bytes.clone();
        bytes[at] ^= 0x10;
        assert!(open(&bytes).is_err(), "flip at {at}");
    }
    let n = rec.bytes.len();
    // Footer payload and trailer offset: the trace falls back to walking the frames and is
    // reported damaged, with every event still readable.
    for at in [n - 30, n - 20] {
        let mut bytes = rec.bytes.clone();
        bytes[at] ^= 0x04;
        let mut r = open(&bytes).unwrap();
        assert!(
            matches!(r.status(), TraceStatus::Damaged { .. }),
            "{:?}",
            r.status()
        );
        assert_eq!(all_events(&mut r), rec.events);
        assert_eq!(r.checkpoints(), &rec.footer.checkpoints[..]);
        assert!(!verify(&mut r).unwrap().ok);
    }
}

#[test]
fn unknown_versions_are_rejected_naming_both() {
    let rec = record(5, 10, 10, small_frames());
    for v in [0u32, FORMAT_VERSION + 1, 77] {
        let mut bytes = rec.bytes.clone();
        bytes[8..12].copy_from_slice(&v.to_le_bytes());
        let err = open(&bytes).err().expect("rejected");
        let text = err.to_string();
        assert!(text.contains(&format!("format version {v}")), "{text}");
        assert!(
            text.contains(&format!(
                "format versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}"
            )),
            "{text}"
        );
        assert_eq!(text.contains("newer deja"), v > FORMAT_VERSION, "{text}");
    }
    let err = open(b"ELF\x7f and other things").err().unwrap();
    assert!(err.to_string().contains("not a deja trace"), "{err}");
}

#[test]
fn a_failing_sink_leaves_every_complete_frame_readable() {
    let rec = record(6, 200, 80, small_frames());
    let total = rec.bytes.len();
    let mut budgets: Vec<usize> = (0..total).step_by(37).collect();
    budgets.extend([total - 1, total - 24, total - 25]);
    for budget in budgets {
        let result = write_through(budget);
        let (sink, err) = match result {
            Ok(_) => panic!("budget {budget} of {total} should fail"),
            Err(x) => x,
        };
        let text = err.to_string();
        let WriteError::Io {
            committed, frames, ..
        } = &err
        else {
            panic!("budget {budget}: {text}");
        };
        assert!(
            text.contains("test.trace") && text.contains("No space left"),
            "{text}"
        );
        assert!(text.contains(&format!("{committed} bytes")), "{text}");
        assert_eq!(sink.written.len(), budget);
        match open(&sink.written) {
            Err(e) => assert!(budget < 400, "budget {budget}: {e}"),
            Ok(mut r) => {
                let events = all_events(&mut r);
                let expected: u64 = rec.footer.frames
                    [..(*frames as usize).min(rec.footer.frames.len())]
                    .iter()
                    .filter(|f| f.kind == FrameKind::Events.to_byte())
                    .map(|f| f.items as u64)
                    .sum();
                assert_eq!(events.len() as u64, expected, "budget {budget}");
                assert_eq!(events[..], rec.events[..events.len()]);
                assert!(matches!(r.status(), TraceStatus::Truncated { .. }));
            }
        }
    }
}

/// Replays `record(6, …)`'s writes into a sink that fails after `budget` bytes.
fn write_through(budget: usize) -> Result<(), (FailingSink, WriteError)> {
    // Re-record with the same seed but into the failing sink; compare through the reader.
    let rec = record(6, 200, 80, small_frames());
    let r = open(&rec.bytes).unwrap();
    let mut w = match TraceWriter::new(
        FailingSink::new(budget),
        "test.trace",
        r.header(),
        small_frames(),
    ) {
        Ok(w) => w,
        Err(e) => {
            return Err((
                FailingSink {
                    written: rec.bytes[..budget].to_vec(),
                    budget: 0,
                },
                e,
            ));
        }
    };
    let mut reader = open(&rec.bytes).unwrap();
    let cps = reader.checkpoints().to_vec();
    let mut next_cp = 0;
    let events = all_events(&mut reader);
    let mut fail = None;
    for (i, e) in events.iter().enumerate() {
        while next_cp < cps.len() && cps[next_cp].event_index == i as u64 {
            let c = reader.read_checkpoint(&cps[next_cp]).unwrap();
            let input = CheckpointInput {
                position: c.meta.position,
                cpu_state: c.meta.cpu_state,
                device_state: c.meta.device_state,
                state_digest: c.meta.state_digest,
                full: c.meta.full,
            };
            if let Err(err) = w.checkpoint(input, c.pages.iter().map(|(n, p)| (*n, &p[..]))) {
                fail = Some(err);
                break;
            }
            next_cp += 1;
        }
        if fail.is_some() {
            break;
        }
        if let Err(err) = w.push(e) {
            fail = Some(err);
            break;
        }
    }
    let err = match fail {
        Some(e) => e,
        None => match w.finish(FinishInfo {
            final_position: rec.footer.final_position,
            final_state_digest: rec.footer.final_state_digest,
            serial_output_digest: rec.footer.serial_output_digest,
            serial_output_bytes: rec.footer.serial_output_bytes,
            exit: rec.footer.exit.clone(),
        }) {
            Ok(_) => return Ok(()),
            Err(e) => {
                // `finish` consumed the writer; rebuild the sink contents from the budget.
                return Err((
                    FailingSink {
                        written: rec.bytes[..budget].to_vec(),
                        budget: 0,
                    },
                    e,
                ));
            }
        },
    };
    // Writes after the failure are refused.
    let again = w.push(&events[0]).unwrap_err();
    assert!(matches!(again, WriteError::Failed { .. }), "{again}");
    let sink = extract(w);
    Err((sink, err))
}

fn extract(w: TraceWriter<FailingSink>) -> FailingSink {
    w.into_inner()
}

/// Format 8: `--embed-images` writes an image's bytes as image frames before the events,
/// over several frames when it is larger than one; a reader gives them back checked against
/// the header's record, with or without the footer, and the events, checkpoints, verify and
/// info read around them.
#[test]
fn embedded_images_read_back_checked_by_their_records() {
    let kernel: Vec<u8> = (0..MAX_FRAME_PAYLOAD + 5000)
        .map(|i| (i / 4096) as u8 ^ (i as u8))
        .collect();
    let initrd = b"an initrd".to_vec();
    let mut h = header();
    h.images = vec![
        ImageRecord::new("bzImage", &kernel, "Pvh", br#"{"format":"pvh"}"#.to_vec()),
        ImageRecord::new("initrd", &initrd, "initrd", Vec::new()),
        ImageRecord::new("not-embedded", b"elsewhere", "initrd", Vec::new()),
    ];
    let write = |h: &Header, images: &[(u32, &[u8])]| {
        let mut w = TraceWriter::new(Vec::new(), "t", h, small_frames()).unwrap();
        for &(i, b) in images {
            w.embed_image(i, b).unwrap();
        }
        let page = vec![7u8; PAGE_SIZE];
        let at = Position::new(10, 1);
        w.checkpoint(
            CheckpointInput {
                position: Position::new(0, 0),
                cpu_state: vec![1],
                device_state: vec![2],
                state_digest: None,
                full: true,
            },
            [(3u64, &page[..])],
        )
        .unwrap();
        w.event(at, EventKind::Entropy { value: 9 }).unwrap();
        let err = w.embed_image(1, b"late").unwrap_err().to_string();
        assert!(err.contains("before the first event"), "{err}");
        w.finish(FinishInfo::default().with_final(at)).unwrap().0
    };
    let bytes = write(&h, &[(0, &kernel), (1, &initrd)]);
    let header_len = open(&bytes).unwrap().header_len() as usize;
    // Whole, and cut before the footer (the frames are then found by scanning).
    let cut = bytes.len() - 100;
    for (what, b) in [("whole", &bytes[..]), ("without footer", &bytes[..cut])] {
        let mut r = open(b).unwrap();
        assert_eq!(r.format_version(), deja_traces::FORMAT_VERSION);
        assert!(
            r.embeds_image(0) && r.embeds_image(1) && !r.embeds_image(2),
            "{what}"
        );
        let image = FrameKind::Image.to_byte();
        assert_eq!(
            r.frames().iter().filter(|f| f.kind == image).count(),
            3,
            "{what}: the kernel spans two frames"
        );
        assert_eq!(r.embedded_image(0).unwrap().as_deref(), Some(&kernel[..]));
        assert_eq!(r.embedded_image(1).unwrap(), Some(initrd.clone()));
        assert_eq!(r.embedded_image(2).unwrap(), None);
        assert_eq!(r.embedded_image(7).unwrap(), None);
        let cp = r.checkpoints()[0];
        assert_eq!(r.memory_at(&cp).unwrap().page(3), Some(&[7u8; PAGE_SIZE]));
        let events: Vec<Event> = r.events().map(Result::unwrap).collect();
        assert_eq!(events.len(), 1, "{what}");
        let info = info(&r);
        assert_eq!(info.embedded_images, vec![0, 1]);
        assert!(info.to_string().contains("embedded"), "{info}");
        if what == "whole" {
            let report = verify(&mut r).unwrap();
            assert!(report.ok, "{report}");
        }
    }
    assert!(header_len < bytes.len());
    // Embedded bytes that are not the recorded image are refused, and verify says so.
    let mut wrong = h.clone();
    wrong.images[1] = ImageRecord::new("initrd", b"another initrd", "initrd", Vec::new());
    let bytes = write(&wrong, &[(1, &initrd)]);
    let mut r = open(&bytes).unwrap();
    let err = r.embedded_image(1).unwrap_err().to_string();
    assert!(err.contains("not the image recorded"), "{err}");
    let report = verify(&mut r).unwrap();
    assert!(!report.ok && report.to_string().contains("not the image recorded"));
    // An image frame for an image the header does not list.
    let bytes = write(&h, &[(5, &initrd)]);
    let mut r = open(&bytes).unwrap();
    let report = verify(&mut r).unwrap();
    assert!(
        !report.ok && report.to_string().contains("the header lists 3"),
        "{report}"
    );
}
