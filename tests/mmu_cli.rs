//! `deja run --mmu`: bt's MMU strategy chosen on the command line (issue #7).

mod common;

use common::{deja, text};

/// The value of counter `name` in `--stats` output.
fn counter(stderr: &str, name: &str) -> Option<u64> {
    stderr.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        (words.next() == Some(name)).then(|| words.next()?.parse().ok())?
    })
}

#[test]
fn nested_runs_hello_with_two_dimensional_walks_and_tlb_without() {
    for (mmu, two_dimensional) in [("tlb", false), ("nested", true)] {
        let o = deja(&[
            "run",
            "--engine",
            "bt",
            "--mmu",
            mmu,
            "--stats",
            "guest:hello",
        ]);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{mmu}: {err}");
        assert!(text(&o.stdout).contains("Hello from deja"), "{mmu}");
        let walks = counter(&err, "mmu.walks").expect("mmu.walks in --stats");
        assert!(walks > 0, "{mmu}: {err}");
        let refs = counter(&err, "mmu.walk_refs").unwrap_or(0);
        assert_eq!(refs > 5 * walks, two_dimensional, "{mmu}: {err}");
    }
}

#[test]
fn unusable_or_unknown_strategies_are_refused_with_status_1_or_2() {
    let o = deja(&["run", "--engine", "bt", "--mmu", "shadow", "guest:hello"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("shadow MMU strategy"),
        "{}",
        text(&o.stderr)
    );
    let o = deja(&["run", "--engine", "kvm", "--mmu", "nested", "guest:hello"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("host's MMU"),
        "{}",
        text(&o.stderr)
    );
    let o = deja(&["run", "--engine", "bt", "--mmu", "ept", "guest:hello"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("expected shadow, nested or tlb"));
}
