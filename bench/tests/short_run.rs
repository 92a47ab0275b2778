//! A short bench run through the real engines: the counters per operation must make sense.

use deja_bench::runner::{self, BenchConfig, Column};
use deja_bench::{BenchResults, Measurement, Status};
use deja_engine::EngineKind;

fn short_run(filter: &str, columns: Vec<Column>) -> Vec<Measurement> {
    let config = BenchConfig {
        columns,
        mmus: vec!["tlb".into(), "nested".into()],
        filter: Some(filter.into()),
        repeat: 2,
        iterations: Some(40),
        tier: deja_engine::Tier::default(),
    };
    runner::plan(&config)
        .unwrap()
        .iter()
        .map(|job| runner::run_job(job, &config))
        .collect()
}

fn find<'a>(ms: &'a [Measurement], bench: &str, column: &str) -> &'a Measurement {
    ms.iter()
        .find(|m| m.bench == bench && m.column() == column)
        .unwrap_or_else(|| panic!("no {bench} on {column} in {ms:#?}"))
}

#[test]
fn in_on_bt_makes_one_unclaimed_port_access_per_operation() {
    let ms = short_run("in", vec![Column::Engine(EngineKind::Bt)]);
    let m = find(&ms, "in", "bt/tlb");
    assert_eq!(m.status, Status::Ok, "{m:#?}");
    assert_eq!((m.iterations, m.repeats), (40, 2));
    // Exactly one access per IN: the loop makes no other device access.
    assert_eq!(m.counters_per_op.get("io.unmapped_pio.0x00ec"), Some(&1.0));
    // IN, DEC, JNZ.
    assert_eq!(m.counters_per_op.get("bt.instructions"), Some(&3.0));
    assert!(m.ns_per_op.unwrap().median > 0.0);
    assert!(
        m.perf
            .iter()
            .any(|p| p.event == "task-clock-ns" && p.per_op.is_some_and(|v| v > 0.0)),
        "{:?}",
        m.perf
    );
    // The nested MMU makes the same accesses; only its MMU counters differ.
    let nested = find(&ms, "in", "bt/nested");
    assert_eq!(nested.status, Status::Ok, "{nested:#?}");
    assert_eq!(
        nested.counters_per_op.get("io.unmapped_pio.0x00ec"),
        Some(&1.0)
    );
}

#[test]
fn in_on_kvm_exits_to_userspace_at_least_once_per_operation() {
    let ms = short_run("in", vec![Column::Engine(EngineKind::Kvm)]);
    let m = find(&ms, "in", "kvm");
    if let Status::Skipped { reason } = &m.status {
        deja_testkit::skip_without_kvm(
            "in_on_kvm_exits_to_userspace_at_least_once_per_operation",
            reason,
        );
        return;
    }
    assert_eq!(m.status, Status::Ok, "{m:#?}");
    let io_in = m.exits_per_op.get("exit.io_in").copied().unwrap_or(0.0);
    assert!(io_in >= 1.0, "{:?}", m.exits_per_op);
    // The end mark's own OUT is taken out of the deltas.
    assert_eq!(
        m.exits_per_op.get("exit.io_out"),
        None,
        "{:?}",
        m.exits_per_op
    );
}

#[test]
fn compute_loops_make_no_device_access_and_have_a_native_column() {
    let ms = short_run("call", vec![Column::Engine(EngineKind::Bt), Column::Native]);
    for bench in ["call-ret", "call"] {
        let bt = find(&ms, bench, "bt/tlb");
        assert_eq!(bt.status, Status::Ok, "{bt:#?}");
        assert!(
            !bt.counters_per_op.keys().any(|k| k.starts_with("io.")),
            "{:?}",
            bt.counters_per_op
        );
        let native = find(&ms, bench, "native");
        assert_eq!(native.status, Status::Ok);
        assert!(native.ns_per_op.unwrap().min > 0.0);
    }
    // CALL, RET, DEC, JNZ; three nested calls with arithmetic: 13.
    let per_op = |b| find(&ms, b, "bt/tlb").counters_per_op["bt.instructions"];
    assert_eq!((per_op("call-ret"), per_op("call")), (4.0, 13.0));
}

#[test]
fn results_round_trip_through_json() {
    let mut ms = short_run("cpuid", vec![Column::Engine(EngineKind::Bt)]);
    ms.push(Measurement::skipped(
        "cpuid",
        "qemu-tcg",
        "host",
        "qemu-system-x86_64 is not on PATH",
    ));
    // JSON keeps these exactly (dyadic fractions), so equality is exact.
    for m in &mut ms {
        if let Some(s) = &mut m.ns_per_op {
            s.median = 12.5;
            s.min = 10.25;
            s.max = 20.0;
        }
        for v in m.counters_per_op.values_mut() {
            *v = (*v * 1024.0).round() / 1024.0;
        }
        for p in &mut m.perf {
            p.per_op = p.per_op.map(|v| (v * 1024.0).round() / 1024.0);
        }
    }
    let results = BenchResults {
        format_version: deja_bench::results::FORMAT_VERSION,
        deja_version: "0.1.0".into(),
        git_revision: runner::git_revision(),
        started_unix: 1_795_000_000,
        machine: runner::machine(),
        measurements: ms,
        record_replay: Vec::new(),
    };
    let text = results.to_json().unwrap();
    assert_eq!(BenchResults::from_json(&text).unwrap(), results);
    assert!(text.contains("\"status\": \"skipped\""), "{text}");
    assert!(BenchResults::from_json("{\"format_version\": 1}").is_err());
    // Files written before the machine description grew still read back.
    let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let machine = value["machine"].as_object_mut().unwrap();
    for field in [
        "memory_bytes",
        "load_average",
        "build_profile",
        "qemu_version",
    ] {
        assert!(machine.remove(field).is_some(), "{field} is not written");
    }
    let old = BenchResults::from_json(&value.to_string()).unwrap();
    assert_eq!(old.machine.build_profile, None);
    assert_eq!(old.measurements, results.measurements);
}

#[test]
fn bad_names_are_refused() {
    let config = BenchConfig {
        mmus: vec!["ept".into()],
        ..BenchConfig::default()
    };
    assert!(
        runner::plan(&config)
            .unwrap_err()
            .to_string()
            .contains("ept")
    );
    assert!(Column::parse("vmware").is_err());
    let config = BenchConfig {
        filter: Some("no-such".into()),
        ..BenchConfig::default()
    };
    assert!(runner::plan(&config).is_err());
}

#[test]
fn paging_benchmarks_count_their_mmu_events_under_every_strategy() {
    let config = BenchConfig {
        columns: vec![Column::Engine(EngineKind::Bt)],
        mmus: vec!["tlb".into(), "shadow".into(), "nested".into()],
        filter: Some("p".into()), // ptemod, pgfault (and cpuid)
        repeat: 1,
        iterations: Some(30),
        tier: deja_engine::Tier::default(),
    };
    let ms: Vec<Measurement> = runner::plan(&config)
        .unwrap()
        .iter()
        .map(|job| runner::run_job(job, &config))
        .collect();
    for mmu in ["tlb", "shadow", "nested"] {
        let column = format!("bt/{mmu}");
        let ptemod = find(&ms, "ptemod", &column);
        assert_eq!(ptemod.status, Status::Ok, "{ptemod:#?}");
        assert_eq!(
            ptemod.counters_per_op.get("mmu.invlpg"),
            Some(&1.0),
            "{column}: {:?}",
            ptemod.counters_per_op
        );
        let pgfault = find(&ms, "pgfault", &column);
        assert_eq!(pgfault.status, Status::Ok, "{pgfault:#?}");
        assert_eq!(
            pgfault.counters_per_op.get("mmu.pf_guest"),
            Some(&1.0),
            "{column}: {:?}",
            pgfault.counters_per_op
        );
    }
}

#[test]
fn self_modifying_code_makes_bt_retranslate_every_operation() {
    let ms = short_run("smc", vec![Column::Engine(EngineKind::Bt)]);
    let m = find(&ms, "smc", "bt/tlb");
    assert_eq!(m.status, Status::Ok, "{m:#?}");
    let invalidations = m.counters_per_op.get("bt.invalidations").copied();
    assert!(invalidations >= Some(1.0), "{:?}", m.counters_per_op);
    let translated = m.counters_per_op.get("bt.blocks_translated").copied();
    assert!(translated >= Some(1.0), "{:?}", m.counters_per_op);
}

#[test]
fn hlt_wake_halts_once_woken_by_one_timer_interrupt_per_operation() {
    let ms = short_run(
        "hlt-wake",
        vec![
            Column::Engine(EngineKind::Bt),
            Column::Engine(EngineKind::Kvm),
        ],
    );
    let bt = find(&ms, "hlt-wake", "bt/tlb");
    assert_eq!(bt.status, Status::Ok, "{bt:#?}");
    // One halt, one interrupt acknowledged at the LAPIC (the 8259As are masked, and the
    // guest sends no IPI: only its one-shot timer can wake it), two LAPIC writes (the
    // timer's initial count and EOI).
    for (counter, want) in [
        ("io.hlt", 1.0),
        ("lapic.acknowledged", 1.0),
        ("io.pc-irqchip.mmio_write", 2.0),
    ] {
        assert_eq!(
            bt.counters_per_op.get(counter),
            Some(&want),
            "{counter}: {:?}",
            bt.counters_per_op
        );
    }
    let kvm = find(&ms, "hlt-wake", "kvm");
    if let Status::Skipped { reason } = &kvm.status {
        deja_testkit::skip_without_kvm(
            "hlt_wake_halts_once_woken_by_one_timer_interrupt_per_operation",
            reason,
        );
        return;
    }
    assert_eq!(kvm.status, Status::Ok, "{kvm:#?}");
    assert_eq!(
        kvm.exits_per_op.get("exit.mmio_write"),
        Some(&2.0),
        "{kvm:?}"
    );
    assert!(kvm.exits_per_op.get("exit.hlt") >= Some(&1.0), "{kvm:?}");
    assert_eq!(
        kvm.counters_per_op.get("lapic.acknowledged"),
        Some(&1.0),
        "{kvm:?}"
    );
}

#[test]
fn qemu_tcg_times_the_marked_loop_when_installed() {
    let config = BenchConfig {
        columns: vec![Column::QemuTcg],
        mmus: vec!["tlb".into()],
        filter: Some("cpuid".into()),
        repeat: 1,
        iterations: Some(2000),
        tier: deja_engine::Tier::default(),
    };
    let jobs = runner::plan(&config).unwrap();
    assert_eq!(jobs.len(), 1);
    let m = runner::run_job(&jobs[0], &config);
    if !deja_bench::qemu::on_path(deja_bench::qemu::QEMU) {
        println!(
            "SKIP: qemu_tcg_times_the_marked_loop_when_installed: qemu-system-x86_64 not on PATH"
        );
        assert_eq!(
            m.status,
            Status::Skipped {
                reason: "qemu-system-x86_64 is not on PATH".into()
            }
        );
        return;
    }
    assert_eq!(m.status, Status::Ok, "{m:#?}");
    assert_eq!((m.engine.as_str(), m.iterations), ("qemu-tcg", 2000));
    assert!(m.ns_per_op.unwrap().min > 0.0, "{m:?}");
}

#[test]
fn ptemod_traces_page_table_writes_under_shadow_and_not_under_nested() {
    let config = BenchConfig {
        columns: vec![Column::Engine(EngineKind::Bt)],
        mmus: vec!["shadow".into(), "nested".into()],
        filter: Some("ptemod".into()),
        repeat: 1,
        iterations: Some(40),
        tier: deja_engine::Tier::default(),
    };
    let ms: Vec<Measurement> = runner::plan(&config)
        .unwrap()
        .iter()
        .map(|job| runner::run_job(job, &config))
        .collect();
    let nested = find(&ms, "ptemod", "bt/nested");
    assert_eq!(nested.status, Status::Ok, "{nested:#?}");
    // The EPT/NPT model traces nothing: no page-table write is intercepted.
    assert_eq!(
        nested.counters_per_op.get("mmu.mmu_pte_write"),
        None,
        "{:?}",
        nested.counters_per_op
    );
    let shadow = find(&ms, "ptemod", "bt/shadow");
    assert_eq!(shadow.status, Status::Ok, "{shadow:#?}");
    // The XOR into the live PTE hits a write-tracked page-table page.
    let writes = shadow.counters_per_op.get("mmu.mmu_pte_write").copied();
    assert!(writes >= Some(1.0), "{:?}", shadow.counters_per_op);
}
