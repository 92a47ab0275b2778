//! The paging guests end to end through `deja run` (issue #7): `paging-access-*` (x86
//! paging's access rules against the guest's own model) in 32-bit, PAE and 4-level paging,
//! and the paging benchmarks (pgfault, forkwait, cr3switch, tlbmiss), under every bt MMU
//! strategy and under kvm in the paging modes the host's kvm runs.

mod common;

use common::{deja, kvm_available, s, scratch, text};

/// bt's MMU strategies.
const STRATEGIES: [&str; 3] = ["tlb", "nested", "shadow"];

/// The value of counter `name` in `--stats` output.
fn counter(stderr: &str, name: &str) -> Option<u64> {
    stderr.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        (words.next() == Some(name)).then(|| words.next()?.parse().ok())?
    })
}

/// Runs `guest:NAME` on bt with `mmu` and `--stats`.
fn run_bt(guest: &str, mmu: &str) -> (i32, String, String) {
    let o = deja(&[
        "run",
        "--engine",
        "bt",
        "--mmu",
        mmu,
        "--stats",
        &format!("guest:{guest}"),
    ]);
    (
        o.status.code().unwrap_or(-1),
        text(&o.stdout),
        text(&o.stderr),
    )
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
            let (status, out, err) = run_bt(guest, mmu);
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

/// The number of cases `paging-access-*` reports having passed (printed in hex).
fn cases_passed(stdout: &str) -> Option<u64> {
    let line = stdout.lines().find(|l| l.contains("cases passed"))?;
    let hex = line.split_whitespace().nth(1)?;
    u64::from_str_radix(hex, 16).ok()
}

#[test]
fn paging_access_passes_under_every_bt_strategy_in_every_paging_mode() {
    use deja_guests::paging_access::{Coverage, PagingMode, cases_per_state, guest_name};
    for mode in PagingMode::ALL {
        let guest = guest_name(mode, Coverage::Full);
        // deja's CPUID has NX and SMEP: all eight CR0.WP x EFER.NXE x CR4.SMEP states run.
        let expected = 8 * cases_per_state(mode, Coverage::Full);
        for mmu in STRATEGIES {
            let (status, out, err) = run_bt(&guest, mmu);
            assert_eq!(status, 0, "{guest} on bt/{mmu}: {out}{err}");
            assert_eq!(cases_passed(&out), Some(expected), "{guest} {mmu}: {out}");
            let faults = counter(&err, "mmu.pf_guest").unwrap_or(0);
            assert!(faults > expected / 4, "{guest} {mmu}: {faults} #PFs: {err}");
        }
    }
}

#[test]
fn paging_access_on_kvm_runs_the_paging_modes_the_host_runs() {
    use deja_guests::paging_access::{Coverage, PagingMode, cases_per_state, guest_name};
    use deja_kvm::host_info::{Flavour, HostInfo};
    let test = "paging_access_on_kvm_runs_the_paging_modes_the_host_runs";
    if !kvm_available(test) {
        return;
    }
    let pvm = HostInfo::detect_flavour_only() == Flavour::Pvm;
    for mode in PagingMode::ALL {
        if pvm && mode != PagingMode::FourLevel {
            println!(
                "SKIP: {test}: {}: this host's kvm is PVM, which runs only 4-level paging: \
                 32-bit and PAE paging end in shutdown",
                guest_name(mode, Coverage::Full)
            );
            continue;
        }
        // PVM emulates guest ring-0 code (about 1.5 us an instruction): the full 4-level run
        // takes about 40 s there, so it runs the reduced set (two CPU states, no D/G
        // variation, the PML4E of the upper levels); other hosts run everything.
        let coverage = if pvm {
            Coverage::Reduced
        } else {
            Coverage::Full
        };
        let guest = guest_name(mode, coverage);
        let o = deja(&["run", "--engine", "kvm", &format!("guest:{guest}")]);
        let out = text(&o.stdout);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{guest} on kvm: {out}{}",
            text(&o.stderr)
        );
        let states = if coverage == Coverage::Full { 8 } else { 2 };
        assert_eq!(
            cases_passed(&out),
            Some(states * cases_per_state(mode, coverage)),
            "{guest}: {out}"
        );
    }
}

#[test]
fn paging_guests_end_in_the_same_state_under_every_bt_strategy() {
    // Recorded with the virtual clock, so that device state does not depend on host time;
    // the strategies may differ in their counters only, never in what the guest sees.
    // paging-access-32 stands for its PAE and 4-level siblings (same harness, 4-8 times the
    // cases), which the test above runs under every strategy.
    let dir = scratch("paging-digests");
    for guest in [
        "paging-access-32",
        "bench-pgfault",
        "bench-forkwait",
        "bench-cr3switch",
        "bench-tlbmiss",
    ] {
        let mut digests = Vec::new();
        for mmu in STRATEGIES {
            let trace = dir.join(format!("{guest}-{mmu}.trace"));
            let o = deja(&[
                "record",
                "--engine",
                "bt",
                "--clock",
                "virtual",
                "--mmu",
                mmu,
                "-o",
                s(&trace),
                &format!("guest:{guest}"),
            ]);
            let err = text(&o.stderr);
            assert_eq!(o.status.code(), Some(0), "{guest} {mmu}: {err}");
            let info = deja(&["trace", "info", s(&trace)]);
            let info = text(&info.stdout);
            let state = info
                .lines()
                .find(|l| l.starts_with("state "))
                .unwrap_or_else(|| panic!("{guest} {mmu}: no final state in {info}"))
                .to_owned();
            assert!(info.contains("debug-exit 0x0"), "{guest} {mmu}: {info}");
            digests.push((mmu, state));
        }
        assert!(digests.len() >= 2, "{guest}");
        for (mmu, d) in &digests[1..] {
            assert_eq!(d, &digests[0].1, "{guest}: {mmu} vs {}", digests[0].0);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
