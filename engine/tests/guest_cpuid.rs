//! The CPUID answers guests get on each engine: bt from deja's table; kvm whatever the host
//! answers, learned by a probe guest (what `deja info` reports and a trace header records).

mod common;

use deja_engine::{EngineKind, guest_visible_cpuid};
use deja_machine::CpuidTable;

#[test]
fn bt_answers_every_probed_leaf_from_the_table() {
    let table = CpuidTable::deja_default();
    let seen = guest_visible_cpuid(EngineKind::Bt, &table).unwrap();
    assert_eq!(seen.ring0, seen.ring3);
    assert_eq!(seen.ring0.len(), table.probe_leaves().len());
    assert!(table.differences(&seen.ring0).is_empty());
}

#[test]
fn kvm_probes_give_one_stable_answer_per_leaf_and_name_the_overrides() {
    if !common::kvm_usable("kvm_probes_give_one_stable_answer_per_leaf_and_name_the_overrides") {
        return;
    }
    let table = CpuidTable::deja_default();
    let first = guest_visible_cpuid(EngineKind::Kvm, &table).unwrap();
    let again = guest_visible_cpuid(EngineKind::Kvm, &table).unwrap();
    assert_eq!(first, again, "the probe is deterministic on one host");
    let leaves = table.probe_leaves();
    for answers in [&first.ring0, &first.ring3] {
        let asked: Vec<(u32, u32)> = answers.iter().map(|e| (e.function, e.index)).collect();
        assert_eq!(asked, leaves);
    }
    // Whatever else the host overrides, ring-0 code sees the vendor KVM_SET_CPUID2 gave, on
    // every flavour deja knows (PVM too).
    let leaf0 = first.ring0[0];
    assert_eq!((leaf0.function, leaf0.index), (0, 0));
    assert_eq!(
        [leaf0.ebx, leaf0.ecx, leaf0.edx],
        table.lookup(0, 0)[1..],
        "ring-0 vendor"
    );
    let overridden: Vec<String> = table
        .differences(&first.ring0)
        .iter()
        .map(|d| d.to_string())
        .collect();
    println!("kvm ring-0 CPUID overrides on this host: {overridden:?}");
}
