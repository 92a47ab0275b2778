//! Hostile input never panics; seeking finds the right checkpoint; the writer refuses bad
//! input instead of writing a trace that cannot replay.

mod common;

use common::*;
use deja_traces::*;

/// Runs every reader entry point over `bytes`; returns the events when everything read
/// cleanly and `verify` passed.
fn exercise(bytes: &[u8]) -> Option<Vec<Event>> {
    let mut r = open(bytes).ok()?;
    let _ = info(&r).to_string();
    let events: Result<Vec<Event>, _> = r.events().collect();
    for cp in r.checkpoints().to_vec() {
        let _ = r.memory_at(&cp);
        if let Ok(mut it) = r.events_after(&cp) {
            let _ = it.next();
        }
    }
    let _ = r.nearest_checkpoint(Position::new(u64::MAX, u64::MAX));
    let _ = stats(&mut r);
    let _ = dump(&mut r, &mut std::io::sink(), &DumpOptions::default());
    let report = verify(&mut r).ok()?;
    match (events, report.ok) {
        (Ok(e), true) => Some(e),
        _ => None,
    }
}

#[test]
fn random_bytes_and_mutated_traces_never_panic_or_pass() {
    let rec = record(11, 120, 40, small_frames());
    let mut rng = Rng(0x5eed);
    // Pure noise, with and without a valid prefix.
    let mut prefix = rec.bytes[..16].to_vec();
    prefix.truncate(12);
    for i in 0..1500 {
        let len = rng.below(600) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if i % 2 == 0 {
            let n = prefix.len().min(bytes.len());
            bytes[..n].copy_from_slice(&prefix[..n]);
        }
        assert!(exercise(&bytes).is_none(), "noise {i} passed verification");
    }
    // Mutations of a valid trace: flips, overwrites, cuts, splices, insertions.
    for i in 0..1500 {
        let mut bytes = rec.bytes.clone();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(bytes.len() as u64) as usize;
            match rng.below(5) {
                0 => bytes[at] ^= 1 << rng.below(8),
                1 => bytes[at] = rng.next() as u8,
                2 => bytes.truncate(at.max(1)),
                3 => {
                    let n = rng.below(16) as usize;
                    let junk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                    bytes.splice(at..at, junk);
                }
                _ => {
                    let end = (at + rng.below(64) as usize).min(bytes.len());
                    bytes.drain(at..end);
                }
            }
        }
        if bytes == rec.bytes {
            continue;
        }
        // Anything that still verifies must be the original run (every byte is covered by
        // a checksum, so this only happens if the mutation cancelled out).
        if let Some(events) = exercise(&bytes) {
            assert_eq!(
                events, rec.events,
                "mutation {i} verified with different events"
            );
        }
    }
}

#[test]
fn hostile_lengths_do_not_allocate() {
    // A valid header followed by a frame header claiming the largest allowed payloads.
    let rec = record(12, 5, 5, small_frames());
    let r = open(&rec.bytes).unwrap();
    let start = r.header_len() as usize;
    let mut bytes = rec.bytes[..start].to_vec();
    let mut fh = vec![0u8; FRAME_HEADER_LEN];
    fh[..4].copy_from_slice(b"DJFR");
    fh[4] = 1;
    fh[48..52].copy_from_slice(&u32::MAX.to_le_bytes());
    fh[52..56].copy_from_slice(&(MAX_FRAME_PAYLOAD as u32).to_le_bytes());
    fh[56..60].copy_from_slice(&(MAX_FRAME_PAYLOAD as u32).to_le_bytes());
    bytes.extend_from_slice(&fh);
    bytes.extend_from_slice(&[0u8; 100]);
    let mut r = open(&bytes).unwrap();
    assert!(
        matches!(r.status(), TraceStatus::Truncated { .. }),
        "{:?}",
        r.status()
    );
    assert_eq!(r.events().count(), 0);
    // A header length beyond the cap is rejected before reading it.
    let mut bytes = rec.bytes.clone();
    bytes[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    let err = open(&bytes).err().unwrap();
    assert!(err.to_string().contains("exceeds the limit"), "{err}");
}

#[test]
fn nearest_checkpoint_is_the_last_at_or_before() {
    let mut w = TraceWriter::new(Vec::new(), "seek", &header(), small_frames()).unwrap();
    let page = [7u8; PAGE_SIZE];
    let mut expected = Vec::new();
    for (i, exits) in [10u64, 20, 30].iter().enumerate() {
        w.event(
            Position::new(exits * 100 - 5, exits - 1),
            EventKind::TimeRead { ns: i as u64 },
        )
        .unwrap();
        let cp = w
            .checkpoint(
                CheckpointInput {
                    position: Position::new(exits * 100, *exits),
                    cpu_state: vec![i as u8],
                    device_state: vec![],
                    state_digest: None,
                    full: i == 0,
                },
                [(i as u64, &page[..])],
            )
            .unwrap();
        expected.push(cp);
    }
    let (bytes, _) = w
        .finish(FinishInfo {
            final_position: Position::new(4000, 40),
            ..Default::default()
        })
        .unwrap();
    let mut r = open(&bytes).unwrap();
    assert_eq!(r.checkpoints(), &expected[..]);
    let at = |i, e| r.nearest_checkpoint(Position::new(i, e)).map(|c| c.ordinal);
    assert_eq!(at(999, 9), None);
    assert_eq!(at(1000, 10), Some(0));
    assert_eq!(at(1999, 19), Some(0));
    assert_eq!(at(2000, 20), Some(1));
    assert_eq!(at(2500, 25), Some(1));
    assert_eq!(at(u64::MAX, u64::MAX), Some(2));
    // icount not yet reached although exits are: not at or before.
    assert_eq!(at(1500, 35), Some(0));
    let cp = r.nearest_checkpoint(Position::new(2500, 25)).unwrap();
    let c = r.read_checkpoint(&cp).unwrap();
    assert_eq!(c.meta.cpu_state, vec![1]);
    let mem = r.memory_at(&cp).unwrap();
    assert_eq!(mem.pages().map(|(n, _)| n).collect::<Vec<_>>(), vec![0, 1]);
    let after: Vec<Event> = r.events_after(&cp).unwrap().map(Result::unwrap).collect();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].kind, EventKind::TimeRead { ns: 2 });
    // kvm-style positions (icount always 0) seek by exits alone.
    let mut w = TraceWriter::new(Vec::new(), "kvm", &header(), small_frames()).unwrap();
    for exits in [0u64, 5, 9] {
        w.checkpoint(
            CheckpointInput {
                position: Position::new(0, exits),
                cpu_state: vec![],
                device_state: vec![],
                state_digest: None,
                full: exits == 0,
            },
            std::iter::empty::<(u64, &[u8])>(),
        )
        .unwrap();
    }
    let (bytes, _) = w
        .finish(FinishInfo::default().tap_final(Position::new(0, 9)))
        .unwrap();
    let r = open(&bytes).unwrap();
    assert_eq!(
        r.nearest_checkpoint(Position::new(0, 7)).unwrap().ordinal,
        1
    );
}

trait TapFinal {
    fn tap_final(self, p: Position) -> Self;
}
impl TapFinal for FinishInfo {
    fn tap_final(mut self, p: Position) -> Self {
        self.final_position = p;
        self
    }
}

#[test]
fn writer_refuses_what_could_not_replay() {
    let mut w = TraceWriter::new(Vec::new(), "bad", &header(), small_frames()).unwrap();
    w.event(Position::new(10, 2), EventKind::Entropy { value: 1 })
        .unwrap();
    let e = w
        .event(Position::new(9, 3), EventKind::Entropy { value: 2 })
        .unwrap_err();
    assert!(matches!(e, WriteError::PositionBackwards { .. }), "{e}");
    assert!(e.to_string().contains("icount 9 exit #3"), "{e}");
    let cp = |full| CheckpointInput {
        position: Position::new(10, 2),
        cpu_state: vec![],
        device_state: vec![],
        state_digest: None,
        full,
    };
    let e = w
        .checkpoint(cp(false), std::iter::empty::<(u64, &[u8])>())
        .unwrap_err();
    assert!(
        matches!(e, WriteError::FirstCheckpointNotFull { .. }),
        "{e}"
    );
    let e = w
        .checkpoint(cp(true), [(3u64, &[1u8; 100][..])])
        .unwrap_err();
    assert!(
        e.to_string().contains("page 3") && e.to_string().contains("100 bytes"),
        "{e}"
    );
    let huge = EventKind::SerialOutput {
        bytes: vec![b'x'; MAX_FRAME_PAYLOAD],
    };
    let e = w.event(Position::new(10, 2), huge).unwrap_err();
    assert!(matches!(e, WriteError::TooLarge { .. }), "{e}");
    // A bad page after whole page frames were written poisons the writer: those frames
    // belong to a checkpoint that can never be committed.
    {
        let mut w2 = TraceWriter::new(Vec::new(), "bad2", &header(), small_frames()).unwrap();
        let good = [1u8; PAGE_SIZE];
        let pages = (0..10u64).map(|n| (n, if n == 7 { &good[..9] } else { &good[..] }));
        assert!(matches!(
            w2.checkpoint(cp(true), pages),
            Err(WriteError::BadPage { .. })
        ));
        let e = w2
            .event(Position::new(11, 2), EventKind::Entropy { value: 3 })
            .unwrap_err();
        assert!(matches!(e, WriteError::Failed { .. }), "{e}");
    }
    // The writer is still usable after refusing input (nothing was written).
    w.event(Position::new(11, 2), EventKind::Entropy { value: 3 })
        .unwrap();
    let (bytes, footer) = w
        .finish(FinishInfo::default().tap_final(Position::new(11, 2)))
        .unwrap();
    assert_eq!(footer.events_total, 2);
    let mut r = open(&bytes).unwrap();
    assert!(verify(&mut r).unwrap().ok);
}

#[test]
fn a_zero_filled_tail_reads_as_truncation() {
    let rec = record(13, 100, 50, small_frames());
    let cut = rec.footer.frames[5].offset as usize + 3;
    let mut bytes = rec.bytes[..cut].to_vec();
    bytes.resize(cut + 5000, 0);
    let mut r = open(&bytes).unwrap();
    match r.status() {
        TraceStatus::Truncated { whole_frames, .. } => assert_eq!(*whole_frames, 5),
        s => panic!("{s:?}"),
    }
    assert!(r.events().all(|e| e.is_ok()));
}

#[test]
fn dropping_a_writer_keeps_its_buffered_events() {
    let mut buf = Vec::new();
    {
        let cursor = std::io::Cursor::new(&mut buf);
        let mut w =
            TraceWriter::new(cursor, "dropped", &header(), WriterOptions::default()).unwrap();
        for i in 0..10 {
            w.event(Position::new(i, i), EventKind::TimeRead { ns: i })
                .unwrap();
        }
    }
    let mut r = open(&buf).unwrap();
    assert!(matches!(r.status(), TraceStatus::Truncated { .. }));
    assert_eq!(r.events().count(), 10);
}

#[test]
fn digests_print_as_hex_in_json_like_formats() {
    let d = Digest::of(b"abc");
    assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
    assert_eq!(d.to_hex().len(), 64);
    assert!(d.to_hex().starts_with("6437b3ac"));
}

#[test]
fn files_on_disk_round_trip_and_json_output_is_readable() {
    let dir = std::env::temp_dir().join(format!("deja-traces-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("run.trace");
    let mut h = Header::new(
        "kvm",
        ClockMode::Host,
        Delivery::ExitSynchronous,
        MachineInfo {
            ram_size: 1 << 20,
            ..Default::default()
        },
    );
    h.images.push(ImageRecord::new(
        "guest:x",
        b"\x90\xf4",
        "raw at 0x1000",
        vec![],
    ));
    assert!(h.images[0].matches(b"\x90\xf4") && !h.images[0].matches(b"\x90\x90"));
    let mut w = TraceWriter::create(&path, &h, WriterOptions::default()).unwrap();
    w.checkpoint(
        CheckpointInput {
            position: Position::default(),
            cpu_state: vec![1, 2],
            device_state: vec![3],
            state_digest: None,
            full: true,
        },
        [(0u64, &[0x55u8; PAGE_SIZE][..])],
    )
    .unwrap();
    for exits in 1..=1000u64 {
        w.event(
            Position::new(0, exits),
            EventKind::TimeRead { ns: exits * 1000 },
        )
        .unwrap();
    }
    w.finish(FinishInfo {
        final_position: Position::new(0, 1000),
        final_state_digest: Some(Digest::of(b"s")),
        ..Default::default()
    })
    .unwrap();
    let mut r = TraceReader::open(&path).unwrap();
    assert_eq!(r.header(), &h);
    assert_eq!(r.events().count(), 1000);
    let inf = info(&r);
    assert_eq!(inf.events, 1000);
    assert_eq!(inf.last_position, Position::new(0, 1000));
    let json = serde_json::to_value(&inf).unwrap();
    assert_eq!(
        json["header"]["images"][0]["digest"],
        Digest::of(b"\x90\xf4").to_hex()
    );
    assert_eq!(
        json["outcome"]["final_state_digest"],
        Digest::of(b"s").to_hex()
    );
    let back: TraceInfo = serde_json::from_value(json).unwrap();
    assert_eq!(back, inf);
    let report = verify(&mut r).unwrap();
    assert!(
        serde_json::to_string(&report)
            .unwrap()
            .contains("\"ok\":true")
    );
    let st = stats(&mut r).unwrap();
    assert!(
        serde_json::to_string(&st)
            .unwrap()
            .contains("events_by_kind")
    );
    // A missing file names itself.
    let err = TraceReader::open(dir.join("missing.trace")).err().unwrap();
    assert!(err.to_string().contains("missing.trace"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An event's tag is its bincode variant index (what the trace stores), and exactly the
/// first six kinds are `Host` answers.
#[test]
fn event_tags_are_the_stored_variant_indices() {
    let mut rng = Rng(7);
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..2000 {
        let e = event(&mut rng, Position::new(i, i));
        let bytes = bincode::serde::encode_to_vec(&e.kind, bincode::config::standard()).unwrap();
        assert_eq!(bytes[0], e.kind.tag() as u8, "{e}");
        assert_eq!(EventKind::NAMES[e.kind.tag() as usize], e.kind.name());
        seen.insert(e.kind.tag());
    }
    assert!(seen.len() >= 11, "{seen:?}");
    let answers: Vec<EventTag> = EventTag::ALL
        .into_iter()
        .filter(|t| t.is_host_answer())
        .collect();
    assert_eq!(
        answers,
        [
            EventTag::TimeRead,
            EventTag::BootWallclock,
            EventTag::SerialInput,
            EventTag::Entropy,
            EventTag::PollQuantum,
            EventTag::Idle
        ]
    );
}
