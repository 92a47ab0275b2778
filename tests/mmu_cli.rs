//! `deja run --mmu`: bt's MMU strategy chosen on the command line (issue #7).

mod common;

use common::{code, deja, s, scratch, text};

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

#[test]
fn a_trace_recorded_under_one_strategy_replays_verified_under_the_others() {
    let dir = scratch("mmu-replay");
    for (guest, recorded) in [
        ("timer", "shadow"),
        ("bench-ptemod", "shadow"),
        ("bench-pgfault", "tlb"),
    ] {
        let trace = dir.join(format!("{guest}-{recorded}.trace"));
        let o = deja(&[
            "record",
            "--engine",
            "bt",
            "--mmu",
            recorded,
            // The timer guest checks PIT ticks against wall time: virtual time keeps the
            // check independent of how slow recording is on a loaded host.
            "--clock",
            "virtual",
            "-o",
            s(&trace),
            &format!("guest:{guest}"),
        ]);
        assert_eq!(code(&o), 0, "{guest}: record: {}", text(&o.stderr));
        for replayed in ["shadow", "nested", "tlb"] {
            let o = deja(&["replay", "--mmu", replayed, "--json", s(&trace)]);
            let out = text(&o.stdout);
            assert_eq!(
                code(&o),
                0,
                "{guest} recorded under {recorded}, replayed under {replayed}: {out} {}",
                text(&o.stderr)
            );
            assert!(
                out.contains("\"Verified\""),
                "{guest}: {recorded} -> {replayed}: {out}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
