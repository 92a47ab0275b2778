//! `deja bench` and `deja report` as a user runs them: a tiny run on bt, its JSON, and a
//! report made from it.

mod common;

use common::{code, deja, s, scratch, text};
use deja_bench::{BenchResults, Status};

#[test]
fn bench_writes_results_that_report_turns_into_plots_and_tables() {
    let dir = scratch("bench-report");
    let json = dir.join("results.json");
    let o = deja(&[
        "bench",
        "--engines",
        "bt",
        "--mmu",
        "tlb,nested",
        "--filter",
        "cpuid",
        "--repeat",
        "2",
        "--iterations",
        "50",
        "--json",
        s(&json),
    ]);
    assert_eq!(code(&o), 0, "{}{}", text(&o.stdout), text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.contains("cpuid") && out.contains("bt/nested"), "{out}");
    let results = BenchResults::from_json(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let columns: Vec<String> = results.measurements.iter().map(|m| m.column()).collect();
    assert_eq!(columns, ["bt/tlb", "bt/nested"]);
    for m in &results.measurements {
        assert_eq!(m.status, Status::Ok, "{m:?}");
        assert_eq!((m.iterations, m.repeats), (50, 2));
        // XOR EAX, EAX; CPUID; DEC; JNZ.
        assert_eq!(
            m.counters_per_op.get("bt.instructions"),
            Some(&4.0),
            "{m:?}"
        );
    }
    assert!(results.machine.build_profile.is_some());
    assert!(results.machine.load_average.is_some());

    let report = dir.join("report");
    let o = deja(&["report", s(&json), "-o", s(&report)]);
    assert_eq!(code(&o), 0, "{}{}", text(&o.stdout), text(&o.stderr));
    for file in [
        "ns_per_op.svg",
        "ns_per_op.png",
        "exits_per_op.svg",
        "summary.md",
        "index.html",
    ] {
        assert!(report.join(file).is_file(), "{file} missing");
    }
    let summary = std::fs::read_to_string(report.join("summary.md")).unwrap();
    assert!(summary.contains("| cpuid |"), "{summary}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bench_refuses_unknown_names_with_the_known_ones() {
    let o = deja(&["bench", "--engines", "vmware"]);
    assert_ne!(code(&o), 0);
    assert!(
        text(&o.stderr).contains("known: bt, kvm"),
        "{}",
        text(&o.stderr)
    );
    let o = deja(&["bench", "--mmu", "ept"]);
    assert_ne!(code(&o), 0);
    assert!(text(&o.stderr).contains("ept"), "{}", text(&o.stderr));
}
