//! `deja record`, `deja replay` and `deja trace` as a user runs them.

mod common;

use common::{code, deja, kvm_available, s, scratch, text};
use std::process::{Command, Stdio};

#[test]
fn record_then_replay_hello_on_bt_and_inspect_the_trace() {
    let dir = scratch("hello");
    let trace = dir.join("hello.trace");
    let o = deja(&[
        "record",
        "--engine",
        "bt",
        "guest:hello",
        "-o",
        s(&trace),
        "--mem",
        "32M",
    ]);
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    assert!(text(&o.stdout).contains("Hello from deja"));
    assert!(
        text(&o.stderr).contains("recorded guest:hello on bt"),
        "{}",
        text(&o.stderr)
    );

    let r = deja(&["replay", s(&trace)]);
    assert_eq!(code(&r), 0, "stderr: {}", text(&r.stderr));
    assert!(
        text(&r.stdout).starts_with("replay verified: "),
        "{}",
        text(&r.stdout)
    );

    let j = deja(&["replay", s(&trace), "--json"]);
    assert_eq!(code(&j), 0);
    let v: serde_json::Value = serde_json::from_slice(&j.stdout).unwrap();
    assert_eq!(v["verdict"], "Verified");
    let icount = v["icount"].as_u64().unwrap();
    assert!(icount > 100);

    let target = icount / 2;
    let u = deja(&[
        "replay",
        s(&trace),
        "--until",
        &target.to_string(),
        "--json",
    ]);
    assert_eq!(code(&u), 0, "stderr: {}", text(&u.stderr));
    let v: serde_json::Value = serde_json::from_slice(&u.stdout).unwrap();
    assert_eq!(v["verdict"]["ReachedUntil"]["at"]["icount"], target);
    assert!(
        v["verdict"]["ReachedUntil"]["state"]["rip"]
            .as_u64()
            .is_some()
    );

    for sub in ["info", "verify", "stats"] {
        let t = deja(&["trace", sub, s(&trace)]);
        assert_eq!(code(&t), 0, "trace {sub}: {}", text(&t.stderr));
        let tj = deja(&["trace", sub, s(&trace), "--json"]);
        assert_eq!(code(&tj), 0, "trace {sub} --json: {}", text(&tj.stderr));
        serde_json::from_slice::<serde_json::Value>(&tj.stdout).unwrap();
    }
    let d = deja(&["trace", "dump", s(&trace), "--kind", "end"]);
    assert_eq!(code(&d), 0);
    assert!(
        text(&d.stdout).contains("debug-exit"),
        "{}",
        text(&d.stdout)
    );
    let bad = deja(&["trace", "dump", s(&trace), "--kind", "nonsense"]);
    assert_eq!(code(&bad), 1);
    assert!(text(&bad.stderr).contains("unknown event kind"));
}

#[test]
fn a_truncated_trace_replays_what_it_holds_and_says_so() {
    let dir = scratch("truncated");
    let trace = dir.join("timer.trace");
    let o = deja(&[
        "record",
        "--engine",
        "bt",
        "--clock",
        "virtual",
        "guest:timer",
        "-o",
        s(&trace),
        "--mem",
        "32M",
        "--digest-interval",
        "64",
    ]);
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    let bytes = std::fs::read(&trace).unwrap();
    let cut = dir.join("cut.trace");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let r = deja(&["replay", s(&cut)]);
    assert_eq!(
        code(&r),
        4,
        "stdout {} stderr {}",
        text(&r.stdout),
        text(&r.stderr)
    );
    assert!(
        text(&r.stderr).contains("trace ends early"),
        "{}",
        text(&r.stderr)
    );
}

/// A recording stopped by a limit (here --max-instructions; Ctrl-C and --timeout end the
/// same way) whose footer is lost, even by one byte, replays to where it stopped and says
/// the trace ends early (exit 4), not that the replay diverged (exit 3).
#[test]
fn a_stopped_recording_that_lost_its_footer_ends_early_and_does_not_diverge() {
    let dir = scratch("lost-footer");
    let trace = dir.join("timer.trace");
    let o = deja(&[
        "record",
        "--engine",
        "bt",
        "--max-instructions",
        "5000",
        "guest:timer",
        "-o",
        s(&trace),
        "--mem",
        "32M",
    ]);
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    let whole = deja(&["replay", s(&trace)]);
    assert_eq!(code(&whole), 0, "stderr: {}", text(&whole.stderr));
    let bytes = std::fs::read(&trace).unwrap();
    for cut_bytes in [1, 16] {
        let cut = dir.join(format!("cut{cut_bytes}.trace"));
        std::fs::write(&cut, &bytes[..bytes.len() - cut_bytes]).unwrap();
        let r = deja(&["replay", s(&cut)]);
        let err = text(&r.stderr);
        assert_eq!(
            code(&r),
            4,
            "cut {cut_bytes}: stdout {} stderr {err}",
            text(&r.stdout)
        );
        assert!(err.contains("trace ends early"), "{err}");
        assert!(
            err.contains("icount 5000 "),
            "stops where the recording did: {err}"
        );
    }
}

#[test]
fn chaos_until_failure_keeps_a_racy_kernel_panic_that_replays_exactly() {
    let dir = scratch("racy");
    let trace = dir.join("racy.trace");
    let out = dir.join("racy.out");
    let o = deja(&[
        "record",
        "--engine",
        "bt",
        "--chaos",
        "--chaos-seed",
        "1",
        "--until-failure",
        "--attempts",
        "10",
        "guest:racy-kernel",
        "-o",
        s(&trace),
        "--serial-out",
        s(&out),
        "--mem",
        "32M",
    ]);
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("kept its trace"),
        "{}",
        text(&o.stderr)
    );
    let recorded = std::fs::read_to_string(&out).unwrap();
    assert!(recorded.contains("PANIC: lost update"), "{recorded}");
    let mut verdicts = Vec::new();
    for i in 0..2 {
        let replay_out = dir.join(format!("replay{i}.out"));
        let r = deja(&["replay", s(&trace), "--serial-out", s(&replay_out)]);
        assert_eq!(code(&r), 0, "stderr: {}", text(&r.stderr));
        assert_eq!(std::fs::read_to_string(&replay_out).unwrap(), recorded);
        verdicts.push(text(&r.stdout));
    }
    assert_eq!(verdicts[0], verdicts[1]);
    assert!(verdicts[0].starts_with("replay verified: "));

    // The README's workflow: the panic names the counter's address; --watch lists every
    // store to it and names the last; --until that icount shows the machine just before it.
    let addr = recorded
        .split("counter at ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {recorded}"));
    let w = deja(&["replay", "--watch", addr, s(&trace)]);
    assert_eq!(code(&w), 0, "stderr: {}", text(&w.stderr));
    let watched = text(&w.stdout);
    let hits: Vec<&str> = watched
        .lines()
        .filter(|l| l.starts_with("watch: icount "))
        .collect();
    assert!(hits.len() > 10, "{watched}");
    let summary = watched
        .lines()
        .find(|l| l.contains("deja replay --until "))
        .unwrap_or_else(|| panic!("no summary in {watched}"));
    let icount = summary
        .split("--until ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .unwrap();
    let last_rip = hits
        .last()
        .unwrap()
        .split("rip ")
        .nth(1)
        .and_then(|t| t.strip_suffix(':').or(t.split(':').next()))
        .unwrap()
        .to_string();
    assert!(
        hits.last()
            .unwrap()
            .starts_with(&format!("watch: icount {icount} ")),
        "{watched}"
    );
    let u = deja(&["replay", "--until", icount, "--json", s(&trace)]);
    assert_eq!(code(&u), 0, "stderr: {}", text(&u.stderr));
    let report: serde_json::Value = serde_json::from_slice(&u.stdout).unwrap();
    let state = &report["verdict"]["ReachedUntil"]["state"];
    assert_eq!(
        format!("{:#x}", state["rip"].as_u64().unwrap()),
        last_rip,
        "{report}"
    );
}

#[test]
fn a_kvm_recording_replays_on_bt() {
    if !kvm_available("a_kvm_recording_replays_on_bt") {
        return;
    }
    let dir = scratch("kvm");
    let trace = dir.join("hello.trace");
    let o = deja(&[
        "record",
        "--engine",
        "kvm",
        "guest:hello",
        "-o",
        s(&trace),
        "--mem",
        "32M",
    ]);
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    let r = deja(&["replay", s(&trace), "--engine", "bt"]);
    assert_eq!(
        code(&r),
        0,
        "stdout {} stderr {}",
        text(&r.stdout),
        text(&r.stderr)
    );
    assert!(
        text(&r.stderr).contains("recorded on kvm"),
        "{}",
        text(&r.stderr)
    );
    // The header records the CPUID the guest got (a probe guest on this host's kvm); where
    // the host overrode deja's table, the replay on bt says so before it starts.
    let info = text(&deja(&["trace", "info", s(&trace)]).stdout);
    assert!(info.contains("guest CPUID  ring 0"), "{info}");
    assert!(info.contains("host CPU"), "{info}");
    assert!(
        info.contains("digests      scheme 3 over the CPU, memory and 11 devices (pc-irqchip, pit"),
        "{info}"
    );
    assert_eq!(
        text(&r.stderr).contains("CPUID answers differ from the recording's"),
        info.contains("other than the table"),
        "{info}\n{}",
        text(&r.stderr)
    );
}

#[test]
fn sigterm_ends_a_recording_with_a_complete_trace_that_replays() {
    let dir = scratch("sigterm");
    let trace = dir.join("echo.trace");
    // echo waits for input forever; stdin stays open and silent.
    let mut child = Command::new(env!("CARGO_BIN_EXE_deja"))
        .args([
            "record",
            "--engine",
            "bt",
            "guest:echo",
            "-o",
            s(&trace),
            "--mem",
            "32M",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The trace file appears after the signal handler is in place; a SIGTERM from then on
    // stops the recording whenever it lands (before the recorder exists too).
    while !trace.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "deja record exited before creating its trace"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // SAFETY: kill with a pid we spawned and a valid signal number.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let o = child.wait_with_output().unwrap();
    assert_eq!(code(&o), 130, "stderr: {}", text(&o.stderr));
    let info = deja(&["trace", "info", s(&trace), "--json"]);
    assert_eq!(code(&info), 0);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["status"], "Complete", "{v}");
    assert_eq!(v["outcome"]["exit"]["reason"], "interrupted");
    let r = deja(&["replay", s(&trace)]);
    assert_eq!(
        code(&r),
        0,
        "stdout {} stderr {}",
        text(&r.stdout),
        text(&r.stderr)
    );
}

/// A SIGTERM that lands while `deja record` is still starting (here: reading a 256 MiB raw
/// image, long before any recorder or handler thread exists) stays pending and stops the
/// recording as soon as it starts: the trace is written. Before, it killed deja outright.
#[test]
fn a_sigterm_during_start_up_still_leaves_a_trace() {
    let dir = scratch("early-sigterm");
    let image = dir.join("big.bin");
    let trace = dir.join("big.trace");
    // `jmp $` at the start, then zeros: 256 MiB to read and load before recording starts.
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(256 << 20).unwrap();
    std::fs::write(&image, [0xeb, 0xfe]).unwrap();
    f.set_len(256 << 20).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_deja"))
        .args([
            "record",
            "--engine",
            "bt",
            "--mem",
            "512M",
            "--raw",
            "0x100000",
            "--mode",
            "protected",
            s(&image),
            "-o",
            s(&trace),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until deja's main has blocked SIGINT and SIGTERM (its first act), then signal at
    // once: deja has yet to read the image (its resident memory is far below the image's
    // 256 MiB), so no handler thread or recorder exists yet.
    let status = format!("/proc/{}/status", child.id());
    let field = |text: &str, name: &str| -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    let rss_kib = loop {
        let text = std::fs::read_to_string(&status).unwrap_or_default();
        let blocked = field(&text, "SigBlk:")
            .and_then(|m| u64::from_str_radix(&m, 16).ok())
            .unwrap_or(0);
        let stop_signals = (1 << (libc::SIGINT - 1)) | (1 << (libc::SIGTERM - 1));
        if blocked & stop_signals == stop_signals {
            break field(&text, "VmRSS:")
                .and_then(|v| v.trim_end_matches(" kB").trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
        std::thread::yield_now();
    };
    assert!(
        rss_kib < 128 << 10,
        "the signals were blocked only after the image was read ({rss_kib} KiB resident)"
    );
    assert!(
        !trace.exists(),
        "the recording started too soon to test start-up"
    );
    // SAFETY: kill with a pid we spawned and a valid signal number.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let o = child.wait_with_output().unwrap();
    assert_eq!(code(&o), 130, "stderr: {}", text(&o.stderr));
    let info = deja(&["trace", "info", s(&trace), "--json"]);
    assert_eq!(code(&info), 0, "{}", text(&info.stderr));
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["status"], "Complete", "{v}");
    assert_eq!(v["outcome"]["exit"]["reason"], "interrupted");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_full_disk_ends_the_recording_and_says_what_was_kept() {
    if !std::path::Path::new("/dev/full").exists() {
        println!("SKIP: a_full_disk_ends_the_recording_and_says_what_was_kept: no /dev/full");
        return;
    }
    let o = deja(&[
        "record",
        "--engine",
        "bt",
        "guest:hello",
        "-o",
        "/dev/full",
        "--mem",
        "32M",
        "--serial-out",
        "/dev/null",
    ]);
    assert_eq!(code(&o), 1, "stderr: {}", text(&o.stderr));
    let err = text(&o.stderr);
    // /dev/full refuses even the header; a disk filling up mid-recording is the library
    // test a_full_disk_keeps_every_whole_frame_and_says_so (replayer/tests/record_replay.rs).
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("whole frames) are intact"), "{err}");
}

#[test]
fn recordings_reboot_like_run_and_replays_follow_the_header() {
    // `deja record` reboots at a reset as `deja run` does (the reset guest boots five
    // times and passes); --no-reboot ends the recording at the first reset (0xcf9). The
    // trace's header says which, and `deja replay` (which takes no such flag) follows it.
    let dir = scratch("reset");
    let mut engines = vec!["bt"];
    if kvm_available("recordings_reboot_like_run_and_replays_follow_the_header on kvm") {
        engines.push("kvm");
    }
    for engine in engines {
        for (no_reboot, policy, last_boot, gone) in [
            (false, "Reboot", "reset: boot 4", "nothing"),
            (true, "Stop", "reset: boot 0", "reset: boot 1"),
        ] {
            let trace = dir.join(format!("reset-{engine}-{policy}.trace"));
            let mut args = vec![
                "record",
                "--engine",
                engine,
                "--clock",
                "virtual",
                "--mem",
                "32M",
                "--timeout",
                "60",
                "guest:reset",
                "-o",
                s(&trace),
            ];
            if no_reboot {
                args.push("--no-reboot");
            }
            let o = deja(&args);
            let out = text(&o.stdout);
            assert_eq!(code(&o), 0, "{engine} {policy}: {out}{}", text(&o.stderr));
            assert!(
                out.contains(last_boot) && !out.contains(gone),
                "{engine} {policy}: {out}"
            );
            let i = deja(&["trace", "info", s(&trace)]);
            assert!(
                text(&i.stdout).contains(&format!("on reset {policy}")),
                "{}",
                text(&i.stdout)
            );
            let r = deja(&["replay", s(&trace), "--json"]);
            assert_eq!(code(&r), 0, "{engine} {policy}: {}", text(&r.stderr));
            let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
            assert_eq!(v["verdict"], "Verified", "{engine} {policy}: {v}");
            assert_eq!(v["exit_status"], 0, "{engine} {policy}: {v}");
        }
    }
}

/// `--fail-on`: a console line that matches is the failure. The guest runs on for the grace
/// period of device exits, then the recording stops there, is kept by --until-failure, says
/// why, and replays verified to that position. A pattern that never matches keeps nothing.
#[test]
fn a_console_line_matching_fail_on_is_a_kept_failure_that_replays() {
    let dir = scratch("fail-on");
    let trace = dir.join("timer.trace");
    let record = |pattern: &str| {
        deja(&[
            "record",
            "--engine",
            "bt",
            "--clock",
            "virtual",
            "--until-failure",
            "--attempts",
            "2",
            "--fail-on",
            pattern,
            "--fail-grace-exits",
            "3",
            "guest:timer",
            "-o",
            s(&trace),
            "--serial-out",
            s(&dir.join("serial.txt")),
            "--json",
            s(&dir.join("summary.json")),
        ])
    };
    let o = record(r"^timer: \d+ interrupts");
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(
        err.contains("attempt 1: the console matched --fail-on: timer: 50 interrupts"),
        "{err}"
    );
    assert!(err.contains("kept its trace"), "{err}");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
    assert!(
        summary["end"]
            .as_str()
            .unwrap()
            .starts_with("the console matched"),
        "{summary}"
    );
    // It stopped 3 exits after the line, before the guest's own end ("timer: PASS").
    let serial = std::fs::read_to_string(dir.join("serial.txt")).unwrap();
    assert!(!serial.contains("PASS"), "{serial}");
    let r = deja(&["replay", s(&trace)]);
    assert_eq!(code(&r), 0, "{}", text(&r.stderr));
    assert!(
        text(&r.stdout).contains("replay verified"),
        "{}",
        text(&r.stdout)
    );

    std::fs::remove_file(&trace).unwrap();
    let o = record("no such line");
    assert_eq!(code(&o), 4, "stderr: {}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("no failure in 2 attempts"),
        "{}",
        text(&o.stderr)
    );
    assert!(!trace.exists());
}

/// `--device pc-testdev`: the recording's header names the device, so `deja replay` (which
/// takes no `--device`) rebuilds the same machine and verifies; on kvm too, replayed on bt.
#[test]
fn a_recording_with_the_pc_testdev_replays_verified() {
    let pass = deja_guests::testdev::PASS_LINE;
    let mut engines = vec!["bt"];
    if kvm_available("a_recording_with_the_pc_testdev_replays_verified") {
        engines.push("kvm");
    }
    for engine in engines {
        let dir = scratch(&format!("pc-testdev-{engine}"));
        let trace = dir.join("testdev.trace");
        let o = deja(&[
            "record",
            "--engine",
            engine,
            "--device",
            "pc-testdev",
            "guest:pc-testdev",
            "-o",
            s(&trace),
            "--mem",
            "32M",
        ]);
        assert_eq!(code(&o), 0, "{engine}: stderr: {}", text(&o.stderr));
        assert!(
            text(&o.stdout).contains(pass),
            "{engine}: {}",
            text(&o.stdout)
        );
        for replay_engine in ["bt", engine] {
            let r = deja(&["replay", s(&trace), "--engine", replay_engine, "--json"]);
            assert_eq!(
                code(&r),
                0,
                "{engine} -> {replay_engine}: stdout {} stderr {}",
                text(&r.stdout),
                text(&r.stderr)
            );
            let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
            assert_eq!(v["verdict"], "Verified", "{engine} -> {replay_engine}");
        }
    }
}

/// The x86-64-v2 instructions (SSE3..SSE4.2, POPCNT, CMPXCHG16B, LAHF/SAHF, then
/// CLFLUSHOPT/CLWB) and UMIP's faults, recorded on bt, replay verified: the SSE levels run
/// through the host FPU path, and the replay must get the same bits.
#[test]
fn recordings_of_the_cpu_feature_guests_replay_verified() {
    for (guest, pass) in [
        ("x86-64-v2", deja_guests::x86_64_v2::PASS_LINE),
        ("umip", "umip: PASS"),
        ("xsave", "xsave: PASS"),
    ] {
        let dir = scratch(guest);
        let trace = dir.join("feature.trace");
        let image = format!("guest:{guest}");
        let o = deja(&[
            "record",
            "--engine",
            "bt",
            &image,
            "-o",
            s(&trace),
            "--mem",
            "32M",
        ]);
        assert_eq!(code(&o), 0, "{guest}: stderr: {}", text(&o.stderr));
        assert!(
            text(&o.stdout).contains(pass),
            "{guest}: {}",
            text(&o.stdout)
        );
        let r = deja(&["replay", s(&trace), "--json"]);
        assert_eq!(code(&r), 0, "{guest}: stderr: {}", text(&r.stderr));
        let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
        assert_eq!(v["verdict"], "Verified", "{guest}");
    }
}

/// An unknown `--device` is refused before anything runs, naming the devices there are.
#[test]
fn an_unknown_device_is_refused_with_the_known_ones() {
    for cmd in ["run", "record"] {
        let o = deja(&[cmd, "--device", "isa-testdev", "guest:hello"]);
        assert_eq!(code(&o), 2, "{cmd}: {}", text(&o.stderr));
        let err = text(&o.stderr);
        assert!(
            err.contains("isa-testdev") && err.contains("pc-testdev"),
            "{cmd}: {err}"
        );
    }
}

/// `--kernel-entry pvh` is part of the run's identity: a bzImage recorded through its PVH
/// entry (its payload's vmlinux) replays through it, and the trace says so. The image's
/// boot-protocol entry is a HLT with interrupts off, so a replay that took it would
/// diverge at once.
#[test]
fn a_bzimage_recorded_through_pvh_replays_through_pvh() {
    let dir = scratch("pvh-entry");
    // 32-bit: mov al, 0; mov dx, 0xf4; out dx, al; hlt (debug-exit 0).
    let vmlinux = deja_testkit::vmlinux(&[0xb0, 0x00, 0x66, 0xba, 0xf4, 0x00, 0xee, 0xf4]);
    let bz = dir.join("bzImage");
    std::fs::write(&bz, deja_testkit::bzimage_with_payload(&vmlinux)).unwrap();
    let trace = dir.join("pvh.trace");
    let o = deja(&[
        "record",
        "--engine",
        "bt",
        "--kernel-entry",
        "pvh",
        s(&bz),
        "-o",
        s(&trace),
        "--mem",
        "32M",
    ]);
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    let info = deja(&["trace", "info", s(&trace)]);
    assert!(text(&info.stdout).contains("Pvh"), "{}", text(&info.stdout));
    let r = deja(&["replay", s(&trace), "--json"]);
    assert_eq!(code(&r), 0, "{}", text(&r.stderr));
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(v["verdict"], "Verified");
    assert_eq!(
        v["icount"], 3,
        "mov, mov, out: the PVH entry's code up to debug-exit"
    );
    // The same file through the boot protocol is another run: it halts at its 64-bit entry.
    let b = deja(&[
        "run",
        "--engine",
        "bt",
        "--kernel-entry",
        "boot-protocol",
        "--timeout",
        "1",
        s(&bz),
        "--mem",
        "32M",
    ]);
    assert_eq!(code(&b), 124, "stderr: {}", text(&b.stderr));
    // A vmlinux has no boot-protocol entry; --kernel-entry needs a Linux kernel.
    let vml = dir.join("vmlinux");
    std::fs::write(&vml, &vmlinux).unwrap();
    let v = deja(&["run", "--kernel-entry", "boot-protocol", s(&vml)]);
    assert_eq!(code(&v), 1);
    assert!(
        text(&v.stderr).contains("no boot-protocol entry"),
        "{}",
        text(&v.stderr)
    );
    let g = deja(&["run", "--kernel-entry", "pvh", "guest:hello"]);
    assert_eq!(code(&g), 1);
    assert!(
        text(&g.stderr).contains("goes with a Linux kernel"),
        "{}",
        text(&g.stderr)
    );
}

/// `--embed-images` (trace format 8): the kernel and initrd travel in the trace, so the
/// trace replays where the files are missing or are other files; without it, such a
/// replay is refused naming the file.
#[test]
fn a_trace_with_embedded_images_replays_without_the_files() {
    let dir = scratch("embed-images");
    // 32-bit PVH entry: mov esi, [ebx+16]; mov esi, [esi]; mov al, [esi]; mov dx, 0xf4;
    // out dx, al; hlt (debug-exit with the initrd's first byte).
    let entry = [
        0x8b, 0x73, 0x10, 0x8b, 0x36, 0x8a, 0x06, 0x66, 0xba, 0xf4, 0x00, 0xee, 0xf4,
    ];
    let bz = dir.join("bzImage");
    let rd = dir.join("initrd");
    let bz_bytes = deja_testkit::bzimage_with_payload(&deja_testkit::vmlinux(&entry));
    let record = |trace: &std::path::Path, embed: bool| {
        std::fs::write(&bz, &bz_bytes).unwrap();
        std::fs::write(&rd, b"\x00 initrd bytes").unwrap();
        let mut args = vec![
            "record",
            "--engine",
            "bt",
            "--kernel-entry",
            "pvh",
            "--initrd",
            s(&rd),
            s(&bz),
            "-o",
            s(trace),
            "--mem",
            "32M",
        ];
        if embed {
            args.push("--embed-images");
        }
        let o = deja(&args);
        assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    };
    let embedded = dir.join("embedded.trace");
    let plain = dir.join("plain.trace");
    record(&embedded, true);
    record(&plain, false);
    let info = text(&deja(&["trace", "info", s(&embedded)]).stdout);
    // Image frames came with format 8; this build writes its newest format.
    assert!(
        info.contains(&format!("format version {}", deja_traces::FORMAT_VERSION)),
        "{info}"
    );
    assert_eq!(info.matches(", embedded").count(), 2, "{info}");
    let v = deja(&["trace", "verify", s(&embedded)]);
    assert_eq!(code(&v), 0, "{}", text(&v.stdout));
    // The files gone, then other files at their paths.
    std::fs::remove_file(&bz).unwrap();
    std::fs::remove_file(&rd).unwrap();
    for round in ["missing", "other files"] {
        let r = deja(&["replay", s(&embedded), "--json"]);
        assert_eq!(code(&r), 0, "{round}: {}", text(&r.stderr));
        let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
        assert_eq!(v["verdict"], "Verified", "{round}");
        let p = deja(&["replay", s(&plain)]);
        assert_ne!(code(&p), 0, "{round}");
        assert!(
            text(&p.stderr).contains(s(&bz)),
            "{round}: {}",
            text(&p.stderr)
        );
        std::fs::write(&bz, b"another kernel").unwrap();
        std::fs::write(&rd, b"\x01 another initrd").unwrap();
    }
}
