//! `deja bench --record-replay`'s measurements on a short guest: the fields must agree with
//! the trace they describe and with each other (no timed assertions: only consistency).

use deja_bench::Status;
use deja_bench::record::{RecordBenchConfig, measure, table};

#[test]
fn record_replay_measurements_describe_the_trace_and_agree_with_each_other() {
    let config = RecordBenchConfig {
        guests: vec!["timer".into()],
        repeat: 2,
        ..RecordBenchConfig::default()
    };
    let m = measure("timer", &config);
    assert_eq!(m.status, Status::Ok, "{m:#?}");
    assert_eq!((m.engine.as_str(), m.clock.as_str()), ("bt", "virtual"));
    assert_eq!(m.repeats, 2);
    assert!(m.icount > 1000 && m.exits > 10, "{m:#?}");
    // At least an interrupt and a time read per timer tick (51 of them); polls that find
    // no deadline due log nothing, so events no longer follow exits.
    assert!(m.events > 100, "{m:#?}");
    assert!(m.trace_bytes > 0 && m.guest_ns > 0, "{m:#?}");
    let [plain, record, replay] = m.ns_per_instruction.unwrap();
    assert!(plain > 0.0 && record > 0.0 && replay > 0.0);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(1.0);
    assert!(close(m.record_overhead.unwrap(), record / plain - 1.0));
    assert!(close(m.replay_speed.unwrap(), record / replay));
    let guest_s = m.guest_ns as f64 / 1e9;
    assert!(close(
        m.trace_bytes_per_guest_second.unwrap(),
        m.trace_bytes as f64 / guest_s
    ));
    assert!(close(
        m.trace_bytes_per_event.unwrap(),
        m.trace_bytes as f64 / m.events as f64
    ));
    let t = table(std::slice::from_ref(&m));
    assert!(t.lines().nth(1).unwrap().starts_with("timer"), "{t}");

    let missing = measure("no-such-guest", &config);
    assert!(
        matches!(&missing.status, Status::Failed { error } if error.contains("no-such-guest")),
        "{missing:#?}"
    );
}
