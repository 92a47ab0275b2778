//! The PC platform guests (issue #6) on both engines, each recorded and replayed with
//! matching digests: the local APIC (xAPIC and x2APIC timers, relocation, CR8, self-IPIs,
//! NMI, the I/O APIC routing the PIT), the TSC-deadline timer, fw_cfg, ACPI tables, the PM
//! timer and the PCI bus, and machine resets (0xcf9, port 0x92, i8042, triple fault) that
//! reboot the machine.
//!
//! A recording is a live run, so each round trip also runs the guest on its engine; the
//! guest checks itself and exits 0 through isa-debug-exit.

use deja_engine::{EngineKind, RunEnd, build_vm};
use deja_machine::devices::StopRequest;
use deja_machine::loader::Image;
use deja_machine::{ClockMode, LiveHost, MachineConfig};
use deja_recorder::{RecordOptions, RecordOutcome, Recorder, SerialCapture};
use deja_replayer::{ReplayOptions, ReplayReport, Verdict, replay};
use deja_traces::ResetPolicy;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("deja-platform-rr-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// The command line the `platform` guest reads back through fw_cfg.
const CMDLINE: &str = "console=ttyS0 deja-platform";

fn config() -> MachineConfig {
    MachineConfig {
        ram_size: 32 << 20,
        cmdline: CMDLINE.to_string(),
        ..MachineConfig::default()
    }
}

fn kvm_usable(test: &str) -> bool {
    match build_vm(
        EngineKind::Kvm,
        config(),
        Box::new(LiveHost::new(ClockMode::Virtual)),
        Box::new(std::io::sink()),
        &deja_guests::find("hello").unwrap().image().unwrap(),
    ) {
        Ok(_) => true,
        Err(deja_engine::BuildError::EngineUnavailable { reason, .. }) => {
            deja_testkit::skip_without_kvm(test, &reason);
            false
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

fn record(
    engine: EngineKind,
    guest: &str,
    clock: ClockMode,
    path: &Path,
) -> (RecordOutcome, String) {
    let image = deja_guests::find(guest).unwrap().image().unwrap();
    record_image(engine, &image, clock, path)
}

fn record_image(
    engine: EngineKind,
    image: &Image,
    clock: ClockMode,
    path: &Path,
) -> (RecordOutcome, String) {
    let mut opts = RecordOptions::new(engine, clock);
    opts.digest_interval = 64;
    opts.run.timeout = Some(Duration::from_secs(60));
    // Resets reboot (the reset guests count their boots); the header tells the replay.
    opts.on_reset = ResetPolicy::Reboot;
    let serial = Arc::new(Mutex::new(SerialCapture::keeping()));
    let outcome = Recorder::new(
        image,
        &config(),
        Box::new(LiveHost::new(clock)),
        Box::new(std::fs::File::create(path).unwrap()),
        &path.display().to_string(),
        Box::new(std::io::sink()),
        serial.clone(),
        opts,
        |host, out| build_vm(engine, config(), host, out, image),
    )
    .unwrap()
    .run()
    .unwrap();
    let text = String::from_utf8_lossy(serial.lock().unwrap().kept().unwrap()).to_string();
    (outcome, text)
}

fn replay_on(engine: EngineKind, path: &Path) -> ReplayReport {
    replay_with(engine, path, None)
}

/// Replays `path`; `image` is the image when it is not a built-in guest.
fn replay_with(engine: EngineKind, path: &Path, image: Option<&Image>) -> ReplayReport {
    replay(
        path,
        &ReplayOptions {
            engine,
            until: None,
            seek: false,
            timeout: Some(Duration::from_secs(60)),
            watch: Vec::new(),
            translate: Vec::new(),
        },
        &|name| match image {
            // Images are found by their recorded name without the `guest:` prefix.
            Some(i) if i.name.strip_prefix("guest:") == Some(name) => Some(i.clone()),
            _ => deja_guests::find(name).and_then(|g| g.image().ok()),
        },
        Box::new(std::io::sink()),
        Box::new(move |cfg, image, host, out| {
            // Whether a reset reboots comes from the trace's header, not from here.
            build_vm(engine, cfg.clone(), host, out, image).map_err(|e| e.to_string())
        }),
    )
    .unwrap()
}

/// Records `guest` on `rec`, checks it passed, and replays it on each of `replays`.
fn round_trip(rec: EngineKind, replays: &[EngineKind], guest: &str, clock: ClockMode) -> String {
    let path = tmp(&format!("{guest}-{rec}-{clock:?}.trace"));
    let (outcome, text) = record(rec, guest, clock, &path);
    // A guest that measures time against the host's clock may find the host did not run
    // it (exit 4, INCONCLUSIVE, saying why); the replay must reproduce that too.
    let status = if text.contains(&format!("{guest}: INCONCLUSIVE")) {
        println!("{guest} on {rec} was inconclusive (a loaded host): {text}");
        deja_guests::EXIT_INCONCLUSIVE
    } else {
        deja_guests::EXIT_PASS
    };
    assert_eq!(
        outcome.run.end,
        RunEnd::Stopped(StopRequest::DebugExit {
            value: u32::from(status)
        }),
        "{guest} on {rec}: {text}"
    );
    assert!(
        status != deja_guests::EXIT_PASS || text.contains(&format!("{guest}: PASS")),
        "{guest} on {rec}: {text}"
    );
    for &e in replays {
        let r = replay_on(e, &path);
        assert!(
            matches!(r.verdict, Verdict::Verified),
            "{guest} recorded on {rec}, replayed on {e}: {r}"
        );
        assert_eq!(r.final_digest, outcome.final_digest, "{guest} {rec} -> {e}");
        assert_eq!(
            r.exit_status,
            Some(i32::from(status)),
            "{guest} {rec} -> {e}"
        );
    }
    let _ = std::fs::remove_file(&path);
    text
}

#[test]
fn apic_guest_on_bt_records_and_replays() {
    let text = round_trip(EngineKind::Bt, &[EngineKind::Bt], "apic", ClockMode::Host);
    for line in [
        "xAPIC one-shot",
        "periodic timer fired 3 times",
        "relocation",
        "CR8 held a self-IPI back",
        "NMI self-IPI",
        "I/O APIC pin 2",
        "I/O APIC NMI entry woke CLI; HLT",
        "x2APIC one-shot",
        "x2APIC SELF IPI and NMI",
    ] {
        assert!(text.contains(line), "{line:?} missing: {text}");
    }
}

#[test]
fn apic_tsc_deadline_guest_on_bt_records_and_replays() {
    round_trip(
        EngineKind::Bt,
        &[EngineKind::Bt],
        "apic-tsc-deadline",
        ClockMode::Host,
    );
}

#[test]
fn platform_guest_on_bt_records_and_replays() {
    let text = round_trip(
        EngineKind::Bt,
        &[EngineKind::Bt],
        "platform",
        ClockMode::Virtual,
    );
    check_platform_text(&text);
}

/// What `platform` prints that the test can check against the machine's configuration.
fn check_platform_text(text: &str) {
    for line in [
        "ram 32 MiB".to_string(),
        format!("cmdline [{CMDLINE}]"),
        "DMA read it".to_string(),
        "tables FACP APIC".to_string(),
    ] {
        assert!(text.contains(&line), "{line:?} missing: {text}");
    }
    // The PCI scan comes after the PM timer measurement, which a loaded host may leave
    // inconclusive.
    assert!(
        text.contains("INCONCLUSIVE") || text.contains("8086:1237 i440FX"),
        "{text}"
    );
}

#[test]
fn reset_guest_reboots_four_times_on_bt_and_replays() {
    let text = round_trip(
        EngineKind::Bt,
        &[EngineKind::Bt],
        "reset",
        ClockMode::Virtual,
    );
    assert!(text.contains("reset: boot 4"), "{text}");
}

#[test]
fn platform_guests_on_kvm_record_and_replay() {
    if !kvm_usable("platform_guests_on_kvm_record_and_replay") {
        return;
    }
    // Exit-synchronous kvm traces replay on kvm and on bt.
    let both = [EngineKind::Kvm, EngineKind::Bt];
    round_trip(EngineKind::Kvm, &both, "apic", ClockMode::Host);
    let text = round_trip(EngineKind::Kvm, &both, "platform", ClockMode::Host);
    check_platform_text(&text);
    let text = round_trip(EngineKind::Kvm, &both, "reset", ClockMode::Host);
    assert!(text.contains("reset: boot 4"), "{text}");
}

#[test]
fn tsc_deadline_guest_runs_on_kvm() {
    if !kvm_usable("tsc_deadline_guest_runs_on_kvm") {
        return;
    }
    // Recorded but not replayed: under KVM the guest's RDTSC returns the host's TSC without
    // an exit (KVM gives userspace no RDTSC exiting, and PVM ignores TSC writes), so the
    // deadline the guest computes, the registers and APIC state holding it, and the guest's
    // own "fired no earlier than the deadline" check all follow host time, which a replay
    // cannot reproduce. Logging the engine's TSC sample at the WRMSR does not help: tried,
    // the replayed guest writes a deadline from its new RDTSC, ~11 ms of host TSC later than
    // the recorded sample, and idles until another time (divergence at its first idle).
    let path = tmp("apic-tsc-deadline-kvm.trace");
    let (outcome, text) = record(EngineKind::Kvm, "apic-tsc-deadline", ClockMode::Host, &path);
    assert_eq!(
        outcome.run.end,
        RunEnd::Stopped(StopRequest::DebugExit { value: 0 }),
        "{text}"
    );
    assert!(text.contains("apic-tsc-deadline: PASS"), "{text}");
    let _ = std::fs::remove_file(&path);
}

/// A 64 KiB firmware ROM (started at the reset vector) that counts its boots in CMOS and,
/// on the first, enables x2APIC and sends itself an INIT IPI from real mode. The CPU must
/// come back through the reset vector, in its INIT state (CR0 = 0x60000010), with the APIC
/// reset (SVR back to 0xff) but its base (x2APIC mode) kept. It then resets the machine
/// through 0xcf9, and on the third boot finds the APIC in xAPIC mode again and exits 0.
fn self_init_firmware() -> Image {
    use iced_x86::code_asm::*;
    const COUNTER: i32 = 0x5e;
    let mut a = CodeAssembler::new(16).unwrap();
    let mut fail = a.create_label();
    let mut second = a.create_label();
    let mut third = a.create_label();
    a.cli().unwrap();
    a.mov(al, COUNTER).unwrap();
    a.out(0x70, al).unwrap();
    a.in_(al, 0x71).unwrap();
    a.mov(bl, al).unwrap();
    a.inc(al).unwrap();
    a.mov(cl, al).unwrap();
    a.mov(al, COUNTER).unwrap();
    a.out(0x70, al).unwrap();
    a.mov(al, cl).unwrap();
    a.out(0x71, al).unwrap();
    a.mov(al, bl).unwrap();
    a.out(0x80, al).unwrap(); // POST code: the boot number
    a.cmp(bl, 0).unwrap();
    a.jne(second).unwrap();
    // First boot: x2APIC on, software enabled, INIT (edge) to APIC ID 0.
    a.mov(ecx, 0x1b).unwrap();
    a.rdmsr().unwrap();
    a.or(eax, 0xc00).unwrap();
    a.wrmsr().unwrap();
    a.mov(ecx, 0x80f).unwrap();
    a.mov(eax, 0x1ff).unwrap();
    a.xor(edx, edx).unwrap();
    a.wrmsr().unwrap();
    a.mov(ecx, 0x830).unwrap();
    a.mov(eax, 0x4500).unwrap();
    a.xor(edx, edx).unwrap();
    a.wrmsr().unwrap();
    a.jmp(fail).unwrap(); // not reached: the INIT is taken before the next instruction
    a.set_label(&mut second).unwrap();
    a.cmp(bl, 1).unwrap();
    a.jne(third).unwrap();
    a.mov(eax, cr0).unwrap();
    a.cmp(eax, 0x6000_0010).unwrap();
    a.jne(fail).unwrap();
    a.mov(ecx, 0x80f).unwrap();
    a.rdmsr().unwrap();
    a.cmp(eax, 0xff).unwrap();
    a.jne(fail).unwrap();
    a.mov(ecx, 0x1b).unwrap();
    a.rdmsr().unwrap();
    a.test(eax, 0x400).unwrap();
    a.jz(fail).unwrap();
    // Then a machine reset through 0xcf9: the ROM starts over from the reset vector.
    a.mov(dx, 0xcf9).unwrap();
    a.mov(al, 0x06).unwrap();
    a.out(dx, al).unwrap();
    a.jmp(fail).unwrap();
    // Third boot: a reset (unlike INIT) puts the APIC back in xAPIC mode at 0xfee00000.
    a.set_label(&mut third).unwrap();
    a.cmp(bl, 2).unwrap();
    a.jne(fail).unwrap();
    a.mov(ecx, 0x1b).unwrap();
    a.rdmsr().unwrap();
    a.cmp(eax, 0xfee0_0900u32 as i32).unwrap();
    a.jne(fail).unwrap();
    a.mov(al, 0).unwrap();
    a.out(0xf4, al).unwrap();
    a.set_label(&mut fail).unwrap();
    a.mov(al, 1).unwrap();
    a.out(0xf4, al).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(0).unwrap();
    let mut rom = vec![0xf4u8; 0x1_0000];
    rom[..code.len()].copy_from_slice(&code);
    // The reset vector (F000:FFF0): jmp far F000:0000, into the ROM's alias below 1 MiB.
    rom[0xfff0..0xfff5].copy_from_slice(&[0xea, 0x00, 0x00, 0x00, 0xf0]);
    Image::firmware("guest:self-init-rom", rom)
}

#[test]
fn self_init_and_a_machine_reset_restart_firmware_at_the_reset_vector_on_both_engines() {
    let image = self_init_firmware();
    let mut engines = vec![EngineKind::Bt];
    if kvm_usable(
        "self_init_and_a_machine_reset_restart_firmware_at_the_reset_vector_on_both_engines",
    ) {
        engines.push(EngineKind::Kvm);
    }
    for rec in engines {
        let path = tmp(&format!("self-init-{rec}.trace"));
        let (outcome, _) = record_image(rec, &image, ClockMode::Virtual, &path);
        assert_eq!(
            outcome.run.end,
            RunEnd::Stopped(StopRequest::DebugExit { value: 0 }),
            "self-INIT on {rec}"
        );
        assert_eq!(outcome.run.stats.get("io.inits_delivered"), 1, "on {rec}");
        assert_eq!(outcome.run.stats.get("machine.resets"), 1, "on {rec}");
        let r = replay_with(rec, &path, Some(&image));
        assert!(matches!(r.verdict, Verdict::Verified), "{rec}: {r}");
        assert_eq!(r.final_digest, outcome.final_digest, "self-INIT {rec}");
        let _ = std::fs::remove_file(&path);
    }
}

/// A real-mode guest that suspends to RAM (ACPI S3) and checks the resume: it stores the
/// waking vector (0x1100) in the FACS and a marker in RAM, writes SLP_TYP 1 | SLP_EN to
/// PM1a_CNT, and exits 0xee if the write was ignored; resumed at 0110:0000, it exits 0x42
/// if the marker survived (0xef otherwise).
fn s3_image() -> Image {
    use deja_machine::devices::acpi::{FACS_ADDR, FACS_WAKING_VECTOR, PM1A_CNT_BLK};
    let facs_seg = (FACS_ADDR >> 4) as u16;
    let vec_off = ((FACS_ADDR & 0xf) + FACS_WAKING_VECTOR) as u16;
    let mut code = Vec::new();
    code.push(0xb8); // mov ax, facs_seg
    code.extend_from_slice(&facs_seg.to_le_bytes());
    code.extend_from_slice(&[0x8e, 0xd8]); // mov ds, ax
    code.extend_from_slice(&[0x66, 0xc7, 0x06]); // mov dword [vec_off], 0x1100
    code.extend_from_slice(&vec_off.to_le_bytes());
    code.extend_from_slice(&0x1100u32.to_le_bytes());
    code.extend_from_slice(&[0x31, 0xc0, 0x8e, 0xd8]); // xor ax, ax; mov ds, ax
    code.extend_from_slice(&[0xc7, 0x06, 0x00, 0x06, 0x34, 0x12]); // mov word [0x600], 0x1234
    code.push(0xba); // mov dx, PM1a_CNT
    code.extend_from_slice(&PM1A_CNT_BLK.to_le_bytes());
    code.extend_from_slice(&[0xb8, 0x00, 0x24]); // mov ax, SLP_EN | SLP_TYP 1
    code.push(0xef); // out dx, ax
    code.extend_from_slice(&[0xb0, 0xee, 0xe6, 0xf4, 0xf4]); // mov al, 0xee; out 0xf4, al; hlt
    code.resize(0x100, 0xf4);
    code.extend_from_slice(&[
        0x31, 0xc0, 0x8e, 0xd8, // xor ax, ax; mov ds, ax
        0x81, 0x3e, 0x00, 0x06, 0x34, 0x12, // cmp word [0x600], 0x1234
        0x75, 0x04, // jne fail
        0xb0, 0x42, 0xe6, 0xf4, // mov al, 0x42; out 0xf4, al
        0xb0, 0xef, 0xe6, 0xf4, 0xf4, // fail: mov al, 0xef; out 0xf4, al; hlt
    ]);
    Image::raw(
        "guest:s3-resume",
        code,
        0x1000,
        0x1000,
        deja_machine::loader::EntryMode::Real,
    )
}

fn s3_round_trip(rec: EngineKind) {
    let image = s3_image();
    let path = tmp(&format!("s3-{rec}.trace"));
    let (outcome, _) = record_image(rec, &image, ClockMode::Virtual, &path);
    assert_eq!(
        outcome.run.end,
        RunEnd::Stopped(StopRequest::DebugExit { value: 0x42 }),
        "S3 on {rec}: resumed at the waking vector with RAM kept"
    );
    let r = replay_with(EngineKind::Bt, &path, Some(&image));
    assert!(
        matches!(r.verdict, Verdict::Verified),
        "S3 {rec} -> bt: {r}"
    );
    assert_eq!(r.final_digest, outcome.final_digest);
    assert_eq!(r.exit_status, Some(0x42));
    let _ = std::fs::remove_file(&path);
}

#[test]
fn acpi_s3_resumes_at_the_facs_waking_vector_and_replays_on_bt() {
    s3_round_trip(EngineKind::Bt);
}

#[test]
fn acpi_s3_on_kvm_resumes_at_the_facs_waking_vector_and_replays_on_bt() {
    if kvm_usable("acpi_s3_on_kvm") {
        s3_round_trip(EngineKind::Kvm);
    }
}
