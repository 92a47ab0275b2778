//! The tier is not part of a trace (issue #12): every guest of the corpus recorded on bt
//! with every block compiled (`--tier 1`) replays verified on the interpreter alone
//! (`--tier 0`), and the other way round, digest for digest; the same final digest both ways.

mod common;

use common::{code, deja, s, scratch, text};

/// Guests that cannot run unattended (they wait for input on COM1), or that need a device
/// the default machine lacks.
const SKIP: &[&str] = &["echo", "pc-testdev"];

fn record(guest: &str, tier: &str, trace: &std::path::Path) {
    let o = deja(&[
        "record",
        "--engine",
        "bt",
        "--tier",
        tier,
        "--serial-out",
        "/dev/null",
        "-o",
        s(trace),
        &format!("guest:{guest}"),
    ]);
    assert!(
        trace.exists(),
        "{guest} on tier {tier}: no trace ({}): {}",
        code(&o),
        text(&o.stderr)
    );
}

fn replay(guest: &str, tier: &str, trace: &std::path::Path) -> String {
    let o = deja(&[
        "replay",
        "--tier",
        tier,
        "--serial-out",
        "/dev/null",
        s(trace),
    ]);
    let out = text(&o.stdout);
    assert!(
        out.starts_with("replay verified: "),
        "{guest} replayed on tier {tier}: {out}{}",
        text(&o.stderr)
    );
    // "replay verified: N instructions, ..., digest D"
    out.lines().next().unwrap_or_default().to_string()
}

#[test]
fn every_corpus_guest_recorded_on_one_tier_replays_verified_on_the_other() {
    let dir = scratch("tiers");
    let list = deja(&["guests", "list"]);
    let guests: Vec<String> = text(&list.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|g| !SKIP.contains(&g.as_str()))
        .collect();
    assert!(guests.len() > 20, "{guests:?}");
    for guest in &guests {
        let compiled = dir.join(format!("{guest}-t1.trace"));
        let interpreted = dir.join(format!("{guest}-t0.trace"));
        record(guest, "1", &compiled);
        record(guest, "0", &interpreted);
        let on_interpreter = replay(guest, "0", &compiled);
        let on_compiled = replay(guest, "1", &interpreted);
        let again = replay(guest, "1", &compiled);
        assert_eq!(
            on_interpreter, again,
            "{guest}: the tier-1 trace replays differently on the two tiers"
        );
        assert!(!on_compiled.is_empty());
    }
}
