//! The bt engine's MMU strategies chosen through [`deja_engine::build_vm_with`]: the
//! hello guest (which runs in long mode with paging on) gives the same output and exit on
//! `shadow`, `tlb` and `nested`, the nested strategy's two-dimensional walks show in the counters,
//! and the strategies an engine cannot use are refused with a reason.

mod common;

use common::SharedBuffer;
use deja_engine::{BuildError, EngineKind, MmuStrategy, RunEnd, RunOptions, build_vm_with};
use deja_machine::devices::StopRequest;
use deja_machine::{ClockMode, LiveHost, MachineConfig};
use std::time::Duration;

fn build(
    engine: EngineKind,
    mmu: Option<MmuStrategy>,
    serial: &SharedBuffer,
) -> Result<deja_engine::Vm, BuildError> {
    let image = deja_guests::find("hello")
        .expect("the hello guest")
        .image()
        .expect("hello's image");
    build_vm_with(
        engine,
        MachineConfig {
            ram_size: 16 << 20,
            ..MachineConfig::default()
        },
        Box::new(LiveHost::new(ClockMode::Virtual)),
        Box::new(serial.clone()),
        &image,
        mmu,
    )
}

#[test]
fn hello_runs_the_same_on_every_strategy_and_nested_walks_in_two_dimensions() {
    let mut texts = Vec::new();
    for strategy in MmuStrategy::ALL {
        let serial = SharedBuffer::default();
        let mut vm = build(EngineKind::Bt, Some(strategy), &serial).expect("bt builds");
        let outcome = vm
            .run(RunOptions {
                timeout: Some(Duration::from_secs(20)),
                max_instructions: None,
            })
            .expect("hello runs");
        let text = serial.text();
        assert_eq!(
            outcome.end,
            RunEnd::Stopped(StopRequest::DebugExit { value: 0 }),
            "{strategy}: {text}"
        );
        assert_eq!(text, deja_guests::hello::GREETING, "{strategy}");
        let stats = vm.stats();
        let walks = stats.get("mmu.walks");
        let refs = stats.get("mmu.walk_refs");
        println!("{strategy}: mmu.walks {walks}, mmu.walk_refs {refs}");
        assert!(
            walks > 0,
            "{strategy}: the guest runs with paging on: {stats:?}"
        );
        if strategy == MmuStrategy::Nested {
            // Every guest reference costs an EPT walk too: more than 5 references a walk.
            assert!(refs > 5 * walks, "{stats:?}");
        } else {
            assert_eq!(refs, 0, "{stats:?}");
        }
        texts.push(text);
    }
    assert_eq!(texts[0], texts[1]);
    assert_eq!(texts[0], texts[2]);
}

#[test]
fn strategies_an_engine_cannot_use_are_refused_with_a_reason() {
    let serial = SharedBuffer::default();
    let err = build(EngineKind::Kvm, Some(MmuStrategy::Nested), &serial)
        .err()
        .expect("kvm takes no strategy");
    assert!(err.to_string().contains("host's MMU"), "{err}");
    let err = build(EngineKind::Kvm, Some(MmuStrategy::Shadow), &serial)
        .err()
        .expect("kvm takes no strategy");
    assert!(err.to_string().contains("shadow"), "{err}");
}
