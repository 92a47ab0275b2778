//! The paging guests end to end through `deja run`: the paging benchmarks (pgfault,
//! forkwait, cr3switch, tlbmiss) under every bt MMU strategy and under kvm (issue #7).

mod common;

use common::{deja, kvm_available, text};

/// bt's MMU strategies. `shadow` is checked where the engine accepts it; while it refuses
/// the strategy the test says so on a SKIP line.
const STRATEGIES: [&str; 3] = ["tlb", "nested", "shadow"];

/// The value of counter `name` in `--stats` output.
fn counter(stderr: &str, name: &str) -> Option<u64> {
    stderr.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        (words.next() == Some(name)).then(|| words.next()?.parse().ok())?
    })
}

/// Runs `guest:NAME` on bt with `mmu` and `--stats`; `None` (after a SKIP line) when this
/// build refuses the strategy.
fn run_bt(guest: &str, mmu: &str) -> Option<(i32, String, String)> {
    let o = deja(&[
        "run",
        "--engine",
        "bt",
        "--mmu",
        mmu,
        "--stats",
        &format!("guest:{guest}"),
    ]);
    let err = text(&o.stderr);
    if mmu == "shadow" && o.status.code() == Some(1) && err.contains("shadow MMU strategy") {
        println!("SKIP: {guest} on bt/shadow: this build refuses the strategy: {err}");
        return None;
    }
    Some((o.status.code().unwrap_or(-1), text(&o.stdout), err))
}

#[test]
fn paging_benchmarks_exit_0_under_every_bt_strategy_with_their_faults_counted() {
    // (guest, pf_guest, invlpg) the guest's own work implies for its 1000 iterations.
    let expected = [
        ("bench-pgfault", 1000, 1000),
        ("bench-forkwait", 2000, 2000),
        ("bench-cr3switch", 0, 0),
        ("bench-tlbmiss", 0, 0),
    ];
    for (guest, pf_guest, invlpg) in expected {
        for mmu in STRATEGIES {
            let Some((status, out, err)) = run_bt(guest, mmu) else {
                continue;
            };
            assert_eq!(status, 0, "{guest} on bt/{mmu}: {out}{err}");
            assert_eq!(
                counter(&err, "mmu.pf_guest"),
                Some(pf_guest),
                "{guest} {mmu}: {err}"
            );
            assert_eq!(
                counter(&err, "mmu.invlpg"),
                Some(invlpg),
                "{guest} {mmu}: {err}"
            );
            let misses = counter(&err, "mmu.tlb_miss").unwrap_or(0);
            if guest == "bench-tlbmiss" {
                // 8192 loads over 4096 pages: each page is new to any TLB smaller than that.
                assert!(misses >= 4096, "{guest} {mmu}: {err}");
            }
        }
    }
}

#[test]
fn paging_benchmarks_exit_0_on_kvm() {
    if !kvm_available("paging_benchmarks_exit_0_on_kvm") {
        return;
    }
    for guest in [
        "bench-pgfault",
        "bench-forkwait",
        "bench-cr3switch",
        "bench-tlbmiss",
    ] {
        let o = deja(&["run", "--engine", "kvm", &format!("guest:{guest}")]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{guest} on kvm: {}{}",
            text(&o.stdout),
            text(&o.stderr)
        );
    }
}
