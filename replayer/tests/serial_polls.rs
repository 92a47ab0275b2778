//! Serial input polls that find nothing are not logged; the replay still answers every poll
//! exactly as the recording did, including runs of empty polls and bytes at one position.

use deja_machine::{ClockMode, Host, LiveHost, Position};
use deja_recorder::{RecordingHost, Shared};
use deja_replayer::{Player, ReplayingHost};
use deja_traces::{
    Delivery, EventKind, FinishInfo, Header, MachineInfo, TraceReader, TraceWriter, WriterOptions,
};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// A live host whose serial input answers come from a script.
struct Scripted {
    inner: LiveHost,
    input: VecDeque<Option<u8>>,
}

impl Host for Scripted {
    fn time_ns(&mut self, at: Position) -> u64 {
        self.inner.time_ns(at)
    }
    fn boot_wallclock(&mut self) -> i64 {
        self.inner.boot_wallclock()
    }
    fn serial_input(&mut self, _at: Position) -> Option<u8> {
        self.input.pop_front().flatten()
    }
    fn entropy(&mut self, at: Position) -> u64 {
        self.inner.entropy(at)
    }
    fn poll_quantum(&mut self, at: Position) -> u64 {
        self.inner.poll_quantum(at)
    }
    fn idle(&mut self, at: Position, deadline_ns: Option<u64>) {
        self.inner.idle(at, deadline_ns)
    }
}

/// A trace file in a fresh scratch directory and the recorder state that writes it, for a
/// bt recording on the virtual clock with `delivery`.
fn recording_to(
    dir: &str,
    name: &str,
    delivery: Delivery,
) -> (std::path::PathBuf, Arc<Mutex<Shared>>) {
    let dir = std::env::temp_dir().join(format!("{dir}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let header = Header::new(
        "bt",
        deja_traces::ClockMode::Virtual,
        delivery,
        MachineInfo::default(),
    );
    let writer = TraceWriter::new(
        Box::new(std::fs::File::create(&path).unwrap()) as deja_recorder::TraceSink,
        name,
        &header,
        WriterOptions::default(),
    )
    .unwrap();
    let shared = Arc::new(Mutex::new(Shared {
        writer: Some(writer),
        unwritten: 0,
        error: None,
        since_digest: 0,
        last: Default::default(),
        kicker: None,
        pending_empty_polls: None,
        pending_not_due: None,
        exits_only: delivery == Delivery::ExitSynchronous,
    }));
    (path, shared)
}

#[derive(Clone, Copy)]
enum Ask {
    Serial(Position),
    Time(Position),
}

#[test]
fn empty_polls_are_implied_and_replay_answers_every_poll_as_recorded() {
    let p = |icount, exits| Position { icount, exits };
    // (question, what the live host says to a serial poll)
    let script: Vec<(Ask, Option<u8>)> = vec![
        (Ask::Serial(p(10, 1)), None),
        (Ask::Serial(p(10, 1)), None),
        (Ask::Time(p(10, 1)), None),
        (Ask::Serial(p(20, 2)), None),
        (Ask::Serial(p(20, 2)), None),
        (Ask::Serial(p(20, 2)), Some(b'a')),
        (Ask::Serial(p(20, 2)), None),
        (Ask::Serial(p(20, 2)), Some(b'b')),
        (Ask::Serial(p(20, 2)), None),
        (Ask::Serial(p(30, 3)), Some(b'c')),
        (Ask::Time(p(40, 4)), None),
        (Ask::Serial(p(40, 4)), None),
    ];
    let (path, shared) = recording_to(
        "deja-serial-polls",
        "polls.trace",
        Delivery::InstructionExact,
    );
    let live = Scripted {
        inner: LiveHost::new(ClockMode::Virtual),
        input: script
            .iter()
            .filter(|(a, _)| matches!(a, Ask::Serial(_)))
            .map(|(_, b)| *b)
            .collect(),
    };
    let mut rec = RecordingHost::new(Box::new(live), shared.clone(), false, None);
    let mut recorded = Vec::new();
    for (ask, _) in &script {
        recorded.push(match *ask {
            Ask::Serial(at) => rec.serial_input(at).map(u64::from),
            Ask::Time(at) => Some(rec.time_ns(at)),
        });
    }
    let w = shared.lock().unwrap().writer.take().unwrap();
    w.finish(FinishInfo {
        final_position: deja_traces::Position::new(40, 4),
        ..FinishInfo::default()
    })
    .unwrap();

    // Logged: the bytes, the empty polls just before a byte at its own position (else a
    // replay could not tell them apart), and the time reads; no other empty poll.
    let mut r = TraceReader::open(&path).unwrap();
    let logged: Vec<(u64, String)> = r
        .events()
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.at.icount,
                e.kind.name().to_string() + &format!(" {}", e.kind),
            )
        })
        .collect();
    let serial: Vec<(u64, Option<u8>)> = TraceReader::open(&path)
        .unwrap()
        .events()
        .map(|e| e.unwrap())
        .filter_map(|e| match e.kind {
            EventKind::SerialInput { byte } => Some((e.at.icount, byte)),
            _ => None,
        })
        .collect();
    assert_eq!(
        serial,
        vec![
            (20, None),
            (20, None),
            (20, Some(b'a')),
            (20, None),
            (20, Some(b'b')),
            (30, Some(b'c')),
        ],
        "{logged:#?}"
    );
    assert_eq!(logged.len(), serial.len() + 2, "{logged:#?}");

    // Replay answers every question as recorded.
    let player = Arc::new(Mutex::new(Player::new(path.clone(), None, false)));
    player.lock().unwrap().set_compare_icount(true);
    let mut host = ReplayingHost::new(player.clone());
    for (i, (ask, _)) in script.iter().enumerate() {
        let got = match *ask {
            Ask::Serial(at) => host.serial_input(at).map(u64::from),
            Ask::Time(at) => Some(host.time_ns(at)),
        };
        assert_eq!(got, recorded[i], "question {i}");
    }
    assert!(player.lock().unwrap().take_mismatch().is_none());
}

/// Device polls that find the earliest deadline not due are not logged either; one is
/// logged (as a time read before its deadline) only when another time read follows at its
/// position with nothing in between, where a replay could not tell them apart.
#[test]
fn polls_before_the_deadline_are_implied_and_replay_answers_every_one_as_recorded() {
    #[derive(Clone, Copy)]
    enum Q {
        Due(Position, u64),
        Time(Position),
        Serial(Position),
    }
    let p = |icount, exits| Position { icount, exits };
    // The live host runs the virtual clock: icount + 1000 ns per exit.
    let script = [
        Q::Due(p(10, 1), 5000),
        Q::Time(p(10, 1)),
        Q::Due(p(20, 2), 5000),
        Q::Due(p(20, 2), 5000),
        Q::Due(p(20, 2), 2000),
        Q::Due(p(30, 3), 5000),
        Q::Serial(p(30, 3)),
        Q::Time(p(30, 3)),
        Q::Due(p(40, 4), 5000),
        Q::Time(p(50, 5)),
        Q::Due(p(60, 6), 6000),
    ];
    let (path, shared) = recording_to("deja-due-polls", "due.trace", Delivery::InstructionExact);
    let live = Scripted {
        inner: LiveHost::new(ClockMode::Virtual),
        input: VecDeque::from(vec![Some(b'x')]),
    };
    let mut rec = RecordingHost::new(Box::new(live), shared.clone(), false, None);
    let ask = |h: &mut dyn Host, q: Q| match q {
        Q::Due(at, d) => h.time_if_due(at, d),
        Q::Time(at) => Some(h.time_ns(at)),
        Q::Serial(at) => h.serial_input(at).map(u64::from),
    };
    let recorded: Vec<Option<u64>> = script.iter().map(|&q| ask(&mut rec, q)).collect();
    assert_eq!(
        recorded,
        vec![
            None,
            Some(1010),
            None,
            None,
            Some(2020),
            None,
            Some(u64::from(b'x')),
            Some(3030),
            None,
            Some(5050),
            Some(6060),
        ]
    );
    let w = shared.lock().unwrap().writer.take().unwrap();
    w.finish(FinishInfo {
        final_position: deja_traces::Position::new(60, 6),
        ..FinishInfo::default()
    })
    .unwrap();

    // Logged time reads: the not-due poll at 10 (a read follows it there), the read at 10,
    // the two not-due polls at 20 and the due one; at 30 the byte comes between the poll
    // and the read; the poll at 40 is implied; then 50 and the due poll at 60.
    let times: Vec<(u64, u64)> = TraceReader::open(&path)
        .unwrap()
        .events()
        .map(|e| e.unwrap())
        .filter_map(|e| match e.kind {
            EventKind::TimeRead { ns } => Some((e.at.icount, ns)),
            _ => None,
        })
        .collect();
    assert_eq!(
        times,
        vec![
            (10, 1010),
            (10, 1010),
            (20, 2020),
            (20, 2020),
            (20, 2020),
            (30, 3030),
            (50, 5050),
            (60, 6060)
        ]
    );

    let player = Arc::new(Mutex::new(Player::new(path.clone(), None, false)));
    player.lock().unwrap().set_compare_icount(true);
    let mut host = ReplayingHost::new(player.clone());
    for (i, &q) in script.iter().enumerate() {
        assert_eq!(ask(&mut host, q), recorded[i], "question {i}");
    }
    assert!(player.lock().unwrap().take_mismatch().is_none());
}

/// In an exit-synchronous recording a replay tells positions apart by exit ordinal only
/// (it may run on an engine that does not count instructions), so a not-due poll is
/// logged when a time read follows at its exit ordinal, whatever the instruction count.
#[test]
fn exit_synchronous_recordings_log_a_not_due_poll_before_a_read_at_its_exit() {
    let p = |icount, exits| Position { icount, exits };
    let (path, shared) = recording_to("deja-due-polls-x", "due-x.trace", Delivery::ExitSynchronous);
    let live = Scripted {
        inner: LiveHost::new(ClockMode::Virtual),
        input: VecDeque::new(),
    };
    let mut rec = RecordingHost::new(Box::new(live), shared.clone(), true, None);
    // A poll after the exit at instruction 10, then the guest reads the clock (RDTSC on bt)
    // two instructions later at the same exit ordinal.
    assert_eq!(rec.time_if_due(p(10, 1), 5000), None);
    assert_eq!(rec.time_ns(p(12, 1)), 1012);
    let w = shared.lock().unwrap().writer.take().unwrap();
    w.finish(FinishInfo {
        final_position: deja_traces::Position::new(12, 1),
        ..FinishInfo::default()
    })
    .unwrap();
    let times: Vec<(u64, u64)> = TraceReader::open(&path)
        .unwrap()
        .events()
        .map(|e| e.unwrap())
        .filter_map(|e| match e.kind {
            EventKind::TimeRead { ns } => Some((e.at.icount, ns)),
            _ => None,
        })
        .collect();
    assert_eq!(times, vec![(12, 1010), (12, 1012)]);

    let player = Arc::new(Mutex::new(Player::new(path.clone(), None, true)));
    let mut host = ReplayingHost::new(player.clone());
    assert_eq!(host.time_if_due(p(10, 1), 5000), None);
    assert_eq!(host.time_ns(p(12, 1)), 1012);
    let mut player = player.lock().unwrap();
    assert!(player.take_mismatch().is_none());
    assert!(player.peek().is_none(), "every logged read was asked for");
}
