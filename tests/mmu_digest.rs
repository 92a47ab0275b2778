//! The three MMU strategies give the same guest-visible result on every corpus guest
//! (issue #7): the same final state digest (CPU, devices, every non-zero page of guest
//! memory — no engine counters), the same COM1 output and the same exit; only the counters
//! differ.

use deja_engine::{EngineKind, MmuStrategy, RunEnd, RunOptions, build_vm_with};
use deja_machine::{ClockMode, LiveHost, MachineConfig};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Guests that cannot run unattended: they wait for input on COM1.
const NEEDS_INPUT: &[&str] = &["echo"];

/// Serial output captured in memory.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a run leaves that the guest could see, and the counters it made.
struct Result {
    digest: String,
    serial: Vec<u8>,
    end: String,
    icount: u64,
    stats: deja_machine::EngineStats,
}

fn run(guest: &deja_guests::Guest, mmu: MmuStrategy) -> Result {
    let image = guest.image().unwrap();
    let serial = Capture::default();
    // The virtual clock makes time a function of guest progress, so runs are reproducible
    // without a trace.
    let host = Box::new(LiveHost::new(ClockMode::Virtual));
    let mut vm = build_vm_with(
        EngineKind::Bt,
        MachineConfig::default(),
        host,
        Box::new(serial.clone()),
        &image,
        Some(mmu),
    )
    .unwrap_or_else(|e| panic!("{} on {mmu}: {e}", guest.name));
    let outcome = vm
        .run(RunOptions {
            timeout: Some(Duration::from_secs(120)),
            max_instructions: None,
        })
        .unwrap_or_else(|e| panic!("{} on {mmu}: {e}", guest.name));
    assert!(
        !matches!(outcome.end, RunEnd::Timeout | RunEnd::Interrupted),
        "{} on {mmu}: {:?}",
        guest.name,
        outcome.end
    );
    let state = vm.cpu.state().unwrap();
    let scheme = deja_recorder::state::current_digest_scheme(&vm.machine);
    let digest = deja_recorder::state_digest(&vm.machine, &state, &scheme).to_string();
    let serial = serial.0.lock().unwrap().clone();
    Result {
        digest,
        serial,
        end: format!("{:?}", outcome.end),
        icount: outcome.icount,
        stats: outcome.stats,
    }
}

#[test]
fn every_corpus_guest_ends_in_the_same_state_under_every_mmu_strategy() {
    let mut compared = 0;
    for guest in deja_guests::all() {
        if NEEDS_INPUT.contains(&guest.name) {
            eprintln!("SKIP: {}: waits for COM1 input", guest.name);
            continue;
        }
        // One thread per strategy: the runs are independent machines.
        let results: Vec<(MmuStrategy, Result)> = std::thread::scope(|scope| {
            let runs: Vec<_> = MmuStrategy::ALL
                .into_iter()
                .map(|mmu| (mmu, scope.spawn(move || run(guest, mmu))))
                .collect();
            runs.into_iter()
                .map(|(mmu, h)| (mmu, h.join().expect("run thread")))
                .collect()
        });
        let (first, reference) = &results[0];
        for (mmu, r) in &results[1..] {
            let what = format!("{}: {first} vs {mmu}", guest.name);
            assert_eq!(r.end, reference.end, "{what}: how the run ended");
            assert_eq!(r.icount, reference.icount, "{what}: instructions retired");
            assert_eq!(
                r.serial,
                reference.serial,
                "{what}: COM1 output {:?} vs {:?}",
                String::from_utf8_lossy(&reference.serial),
                String::from_utf8_lossy(&r.serial)
            );
            assert_eq!(r.digest, reference.digest, "{what}: final state digest");
        }
        // The strategies really differed in how they translated.
        let walks: Vec<u64> = results
            .iter()
            .map(|(_, r)| r.stats.get("mmu.walks"))
            .collect();
        eprintln!(
            "{}: digest {} after {} instructions; walks shadow/nested/tlb {walks:?}",
            guest.name, reference.digest, reference.icount
        );
        compared += 1;
    }
    assert!(compared >= 10, "only {compared} guests compared");
}

#[test]
fn ptemod_makes_a_traced_pte_write_per_iteration_under_shadow_and_none_under_nested() {
    let guest = deja_guests::find("bench-ptemod").expect("bench-ptemod in the corpus");
    let shadow = run(guest, MmuStrategy::Shadow);
    let nested = run(guest, MmuStrategy::Nested);
    let iterations = 1000;
    let writes = shadow.stats.get("mmu.mmu_pte_write");
    assert!(
        writes >= iterations,
        "shadow: {writes} traced PTE writes for {iterations} iterations: {:?}",
        shadow.stats
    );
    assert_eq!(
        nested.stats.get("mmu.mmu_pte_write"),
        0,
        "{:?}",
        nested.stats
    );
    assert!(
        nested.stats.get("mmu.walk_refs") > nested.stats.get("mmu.walks"),
        "{:?}",
        nested.stats
    );
    assert_eq!(shadow.digest, nested.digest);
}
