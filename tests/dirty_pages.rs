//! Incremental digests and checkpoints miss no write (issue #11): on every corpus guest, on
//! bt under each MMU strategy and on kvm, the digest kept from dirty pages equals the digest
//! computed from all of memory at every sampled exit, and the incremental checkpoints laid
//! over each other rebuild memory exactly. A writer that bypassed the dirty bitmap (a store
//! path, a device's DMA, the page walker's accessed/dirty bits, KVM's guest mode) would make
//! a later digest differ.

use deja_engine::{EngineKind, MmuStrategy, RunEnd, RunObserver, RunOptions, build_vm_with};
use deja_machine::{ClockMode, Cpu, LiveHost, Machine, MachineConfig};
use deja_snapshot::state::{current_digest_scheme, for_each_resident_page};
use deja_snapshot::{StateDigester, snapshot, state_digest};
use std::time::Duration;

/// Guests that cannot run unattended: they wait for input on COM1.
const NEEDS_INPUT: &[&str] = &["echo"];

/// Compares the incremental digest with a full one every `every` exits, and checks that the
/// incremental checkpoints taken there rebuild memory.
struct Checker {
    digester: StateDigester,
    memory: deja_traces::MemoryImage,
    exits: u64,
    every: u64,
    compared: u64,
    failure: Option<String>,
}

impl Checker {
    fn check(&mut self, machine: &Machine, cpu: &mut dyn Cpu) {
        let state = cpu.state().unwrap();
        let full = state_digest(machine, &state, self.digester.scheme());
        let snap = snapshot(machine, cpu, 0, &mut self.digester, self.compared == 0).unwrap();
        let at = machine.position();
        if snap.digest != full {
            self.failure = Some(format!(
                "at {at:?}: incremental digest {} but all of memory gives {full}",
                snap.digest
            ));
            return;
        }
        for (n, page) in &snap.pages {
            self.memory.set_page(*n, page);
        }
        let mut wrong = None;
        let mut seen = 0usize;
        for_each_resident_page(machine, |n, page| {
            let zero = page.iter().all(|&b| b == 0);
            let kept = self.memory.page(n);
            let same = match kept {
                Some(k) => &k[..page.len()] == page,
                None => zero,
            };
            if !zero {
                seen += 1;
            }
            if !same && wrong.is_none() {
                wrong = Some(n);
            }
        });
        if let Some(n) = wrong {
            self.failure = Some(format!(
                "at {at:?}: page {n:#x} differs from the checkpoints laid over each other"
            ));
        }
        assert_eq!(seen, self.digester.memory().resident_pages(), "at {at:?}");
        self.compared += 1;
    }
}

impl RunObserver for Checker {
    fn between_exits(&mut self, machine: &mut Machine, cpu: &mut dyn Cpu, _next_poll: u64) -> bool {
        self.exits += 1;
        if self.exits.is_multiple_of(self.every) || self.exits < 8 {
            self.check(machine, cpu);
        }
        self.failure.is_none()
    }
}

fn check_guest(guest: &deja_guests::Guest, engine: EngineKind, mmu: Option<MmuStrategy>) -> u64 {
    let started = std::time::Instant::now();
    let image = guest.image().unwrap();
    let host = Box::new(LiveHost::new(ClockMode::Virtual));
    let what = format!(
        "{} on {engine}{}",
        guest.name,
        mmu.map(|m| format!("/{m}")).unwrap_or_default()
    );
    let mut vm = build_vm_with(
        engine,
        MachineConfig::default(),
        host,
        Box::new(std::io::sink()),
        &image,
        mmu,
    )
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut checker = Checker {
        digester: StateDigester::new(current_digest_scheme(&vm.machine)),
        memory: deja_traces::MemoryImage::new(),
        exits: 0,
        every: 97,
        compared: 0,
        failure: None,
    };
    let outcome = vm
        .run_observed(
            RunOptions {
                timeout: Some(Duration::from_secs(60)),
                max_instructions: Some(50_000_000),
            },
            &mut checker,
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    if let Some(f) = checker.failure {
        panic!("{what}: {f}");
    }
    assert!(
        !matches!(outcome.end, RunEnd::Interrupted),
        "{what}: {:?}",
        outcome.end
    );
    checker.check(&vm.machine, vm.cpu.as_mut());
    if let Some(f) = checker.failure {
        panic!("{what} at the end: {f}");
    }
    // The first refresh reads all memory (and on kvm the second too: dirty logging starts
    // at the first); every later one must come from the dirty pages alone, or this test
    // would compare full scans with full scans.
    let scans = checker.digester.memory().full_scans;
    assert!(
        scans <= 2,
        "{what}: {scans} of {} refreshes read all of memory",
        checker.compared
    );
    eprintln!(
        "{what}: {} comparisons, {:?}",
        checker.compared,
        started.elapsed()
    );
    checker.compared
}

#[test]
fn incremental_digests_and_checkpoints_match_all_of_memory_on_bt() {
    let mut compared = 0;
    for guest in deja_guests::all() {
        if NEEDS_INPUT.contains(&guest.name) {
            continue;
        }
        for mmu in [MmuStrategy::Shadow, MmuStrategy::Nested, MmuStrategy::Tlb] {
            compared += check_guest(guest, EngineKind::Bt, Some(mmu));
        }
    }
    assert!(compared > 100, "only {compared} comparisons");
}

#[test]
fn incremental_digests_and_checkpoints_match_all_of_memory_on_kvm() {
    if !deja_testkit::kvm_or_skip("incremental digests on kvm") {
        return;
    }
    let mut compared = 0;
    // Guests whose writes come from ring 3, ring 0, device DMA and REP string I/O.
    for name in ["hello", "timer", "string-io", "apic"] {
        let guest = deja_guests::find(name).unwrap();
        compared += check_guest(guest, EngineKind::Kvm, None);
    }
    assert!(compared > 20, "only {compared} comparisons");
}
