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
    for (mmu, two_dimensional) in [("tlb", false), ("nested", true), ("shadow", false)] {
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
fn shadow_is_the_default_and_stats_print_every_kvm_named_counter() {
    for args in [
        &["run", "--engine", "bt", "--stats", "guest:bench-ptemod"][..],
        &[
            "run",
            "--engine",
            "bt",
            "--mmu",
            "shadow",
            "--stats",
            "guest:bench-ptemod",
        ][..],
    ] {
        let o = deja(args);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {err}");
        for name in [
            "mmu.pf_fixed",
            "mmu.pf_guest",
            "mmu.mmu_pte_write",
            "mmu.mmu_pte_updated",
            "mmu.mmu_flooded",
            "mmu.mmu_shadow_zapped",
            "mmu.mmu_recycled",
            "mmu.mmu_cache_miss",
            "mmu.mmu_unsync",
            "mmu.tlb_flush",
            "mmu.invlpg",
            "mmu.tlb_hit",
            "mmu.tlb_miss",
        ] {
            assert!(
                counter(&err, name).is_some(),
                "{args:?}: no {name} in {err}"
            );
        }
        // bench-ptemod rewrites a live PTE and INVLPGs it 1000 times.
        assert!(counter(&err, "mmu.mmu_pte_write").unwrap() >= 1000, "{err}");
        assert!(counter(&err, "mmu.invlpg").unwrap() >= 1000, "{err}");
        assert!(counter(&err, "mmu.pf_fixed").unwrap() > 0, "{err}");
    }
}

#[test]
fn unusable_or_unknown_strategies_are_refused_with_status_1_or_2() {
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
