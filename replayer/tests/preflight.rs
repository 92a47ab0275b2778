//! What a replay says before it starts: other CPUID answers than the guest got while
//! recording (a guest may branch on them), and another host CPU (x87 on the host FPU).

use deja_engine::EngineKind;
use deja_machine::CpuidTable;
use deja_recorder::{guest_cpuid, machine_info};
use deja_replayer::preflight_warnings;
use deja_traces::{ClockMode, Delivery, Header, HostCpu};

fn header() -> Header {
    let config = deja_machine::MachineConfig::default();
    let mut h = Header::new(
        "bt",
        ClockMode::Virtual,
        Delivery::InstructionExact,
        machine_info(&config),
    );
    h.guest_cpuid = guest_cpuid(EngineKind::Bt, &config.cpuid);
    h.host_cpu = Some(HostCpu::detect());
    h
}

#[test]
fn a_bt_trace_replayed_on_bt_on_this_host_needs_no_warning() {
    let h = header();
    assert_eq!(
        h.guest_cpuid.as_ref().unwrap().ring0.len(),
        CpuidTable::deja_default().probe_leaves().len()
    );
    assert_eq!(preflight_warnings(&h, EngineKind::Bt), Vec::<String>::new());
}

#[test]
fn other_cpuid_answers_are_named_leaf_by_leaf_before_the_replay() {
    let mut h = header();
    // As a PVM host answered a kvm recording's guest: host bits in leaf 1 ECX, both rings.
    let seen = h.guest_cpuid.as_mut().unwrap();
    seen.source = "a probe guest on kvm".into();
    for answers in [&mut seen.ring0, &mut seen.ring3] {
        let leaf1 = answers.iter_mut().find(|e| e.function == 1).unwrap();
        leaf1.ecx = 0xf7f8_3203;
    }
    let w = preflight_warnings(&h, EngineKind::Bt);
    assert_eq!(w.len(), 2, "{w:?}");
    let now = CpuidTable::deja_default().lookup(1, 0)[2];
    for (ring, text) in [0, 3].iter().zip(&w) {
        assert!(text.contains(&format!("ring-{ring} CPUID")), "{text}");
        assert!(
            text.contains(&format!("leaf 0x1.0: ecx f7f83203 recorded, {now:08x} now")),
            "{text}"
        );
        assert!(text.contains("a probe guest on kvm"), "{text}");
        assert!(
            !text.contains("leaf 0x7"),
            "only the differing leaves: {text}"
        );
    }
}

#[test]
fn another_host_cpu_model_is_named() {
    let mut h = header();
    let cpu = h.host_cpu.as_mut().unwrap();
    cpu.model ^= 1;
    let w = preflight_warnings(&h, EngineKind::Bt);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("x87 transcendental"), "{}", w[0]);
    // Traces from before format 7 say nothing about either: no warning.
    h.host_cpu = None;
    h.guest_cpuid = None;
    assert!(preflight_warnings(&h, EngineKind::Bt).is_empty());
}

/// The machine a replay builds has the firmware tables the trace names: revision 1 when the
/// header predates the field (every such recording had it), and an unknown revision is
/// refused, naming it, before anything runs.
#[test]
fn the_firmware_revision_comes_from_the_header() {
    use deja_machine::tables::FirmwareRevision;
    let mut h = header();
    assert_eq!(h.firmware_revision, None);
    let config = deja_replayer::machine_config(&h, "old.trace").unwrap();
    assert_eq!(config.firmware, FirmwareRevision::Rev1);
    for r in FirmwareRevision::ALL {
        h.firmware_revision = Some(r.number());
        let config = deja_replayer::machine_config(&h, "new.trace").unwrap();
        assert_eq!(config.firmware, r);
    }
    h.firmware_revision = Some(7);
    let err = deja_replayer::machine_config(&h, "future.trace")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("future.trace") && err.contains("firmware table revision 7 is unknown"),
        "{err}"
    );
}
