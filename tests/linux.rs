//! Debian's stock kernel (linux-image-amd64) with a busybox initramfs, booted on bt through
//! the x86 boot protocol and through its PVH entry: to /init, a command, and an ACPI
//! power-off. The kernel and busybox
//! are fetched with `apt-get download` on the first run (deja_testkit::debian_linux); when
//! they cannot be fetched the test fails saying why.

mod common;

use common::gdb::{Stub, gdb, whens};
use common::{code, s, scratch, text};
use deja_testkit::Cpio;
use std::path::Path;

/// An initramfs whose /init is `script` run by busybox's shell.
fn initramfs(busybox: &std::path::Path, script: &str) -> Vec<u8> {
    let mut cpio = Cpio::new();
    cpio.dir("bin")
        .dir("dev")
        .dir("proc")
        .dir("sys")
        .char_device("dev/console", 5, 1)
        .file("bin/busybox", 0o755, &std::fs::read(busybox).unwrap())
        .file(
            "init",
            0o755,
            format!("#!/bin/busybox sh\n{script}").as_bytes(),
        );
    cpio.finish()
}

/// Debian's kernel and busybox from the test cache (fetched on first use): the cache, the
/// bzImage and busybox. A fetch that fails fails the test with its reason.
fn debian() -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("debian-linux");
    let (kernel, busybox) = deja_testkit::debian_linux(&cache)
        .unwrap_or_else(|e| panic!("the Linux test needs Debian's kernel and busybox: {e}"));
    (cache, kernel, busybox)
}

/// Writes [`initramfs`] of `script` to `dir/initrd.cpio`; returns its path.
fn write_initramfs(dir: &Path, busybox: &Path, script: &str) -> std::path::PathBuf {
    let initrd = dir.join("initrd.cpio");
    std::fs::write(&initrd, initramfs(busybox, script)).unwrap();
    initrd
}

/// How one boot of Debian's kernel went.
struct Boot {
    /// The COM1 output.
    console: String,
    /// Instructions to power-off.
    icount: u64,
    /// Host seconds.
    seconds: f64,
}

/// Boots `kernel` with `initrd` on bt through `entry` (`--kernel-entry`) to /init, runs a
/// command and powers off; checks the console says so.
fn boot_to_init(kernel: &Path, initrd: &Path, entry: &str) -> Boot {
    let dir = scratch(&format!("linux-{entry}"));
    let serial = dir.join("serial.txt");
    let json = dir.join("summary.json");
    let o = common::deja(&[
        "run",
        "--engine",
        "bt",
        "--mem",
        "512M",
        "--clock",
        "virtual",
        "--timeout",
        "900",
        "--kernel-entry",
        entry,
        "--initrd",
        s(initrd),
        "--append",
        "console=ttyS0 panic=-1 deja.marker=1",
        "--serial-out",
        s(&serial),
        "--json",
        s(&json),
        s(kernel),
    ]);
    let console = std::fs::read_to_string(&serial).unwrap_or_default();
    let tail: String = console
        .lines()
        .rev()
        .take(30)
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        code(&o),
        0,
        "{entry}: stderr: {}\nconsole (last lines, reversed):\n{tail}",
        text(&o.stderr)
    );
    assert!(
        console.contains("init: reached, console=ttyS0 panic=-1 deja.marker=1"),
        "{entry}: {tail}"
    );
    assert!(console.contains("Linux 6.1."), "{entry}: {tail}");
    assert!(console.contains("reboot: Power down"), "{entry}: {tail}");
    // deja's CPUID reports XSAVE with the x87 and SSE components: the kernel uses them.
    for feature in [
        "0x001: 'x87 floating point registers'",
        "0x002: 'SSE registers'",
    ] {
        assert!(
            console.contains(&format!("x86/fpu: Supporting XSAVE feature {feature}")),
            "{entry}: no XSAVE feature {feature}: {tail}"
        );
    }
    // The firmware tables (revision 2): SMBIOS names the machine, the DSDT's PCI0 is how
    // Linux finds PCI, with the windows its _CRS gives, and the legacy devices under it are
    // PNP devices the drivers bind through ACPI.
    let head: String = console.lines().take(400).collect::<Vec<_>>().join("\n");
    for line in [
        "DMI: deja deja-pc, BIOS rev 2 ",
        "ACPI: PM: (supports S0 S3 S5)",
        "ACPI: PCI Root Bridge [PCI0] (domain 0000 [bus 00-ff])",
        "pci_bus 0000:00: root bus resource [io  0x0d00-0xffff window]",
        "pci_bus 0000:00: root bus resource [mem 0x20000000-0xfebfffff window]",
        "pci 0000:00:01.0: [8086:7000]",
        "i8042: PNP: PS/2 Controller [PNP0303:KBD] at 0x60,0x64 irq 1",
    ] {
        assert!(console.contains(line), "{entry}: no {line:?} in:\n{head}");
    }
    // COM1 and the RTC bind through PNP: their devices are named 00:NN.
    assert!(
        console
            .lines()
            .any(|l| l.contains("] 00:0") && l.contains("ttyS0 at I/O 0x3f8 (irq = 4")),
        "{entry}: COM1 is not a PNP device:\n{head}"
    );
    assert!(
        console.contains("rtc_cmos 00:0"),
        "{entry}: the RTC is not a PNP device:\n{head}"
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    Boot {
        console,
        icount: summary["icount"].as_u64().unwrap(),
        seconds: summary["elapsed_seconds"].as_f64().unwrap(),
    }
}

/// Debian's bzImage boots to /init through both entries: the boot protocol's (its
/// decompressor, then the kernel) and PVH's (deja decompresses the payload and enters the
/// vmlinux at its PVH note, as `-kernel vmlinux` does on QEMU or Firecracker), side by side.
/// PVH skips the decompressor, most of the boot's instructions; the test prints both
/// counts.
#[test]
fn debians_kernel_boots_to_init_on_bt_through_both_entries_and_powers_off() {
    let (_, kernel, busybox) = debian();
    let dir = scratch("linux");
    let initrd = write_initramfs(
        &dir,
        &busybox,
        "/bin/busybox --install -s /bin\n\
             mount -t proc proc /proc\n\
             echo \"init: reached, $(cat /proc/cmdline)\"\n\
             uname -sr\n\
             poweroff -f\n",
    );
    let (bp, pvh) = std::thread::scope(|t| {
        let bp = t.spawn(|| boot_to_init(&kernel, &initrd, "boot-protocol"));
        let pvh = t.spawn(|| boot_to_init(&kernel, &initrd, "pvh"));
        (bp.join(), pvh.join())
    });
    let (bp, pvh) = (
        bp.unwrap_or_else(|e| std::panic::resume_unwind(e)),
        pvh.unwrap_or_else(|e| std::panic::resume_unwind(e)),
    );
    // The decompressor speaks only through the boot protocol.
    assert!(
        bp.console.contains("Decompressing Linux") || bp.icount > pvh.icount,
        "{}",
        bp.console
    );
    let fewer = 100.0 * (1.0 - pvh.icount as f64 / bp.icount as f64);
    println!(
        "Debian {} to /init and power-off on bt: boot protocol {} instructions ({:.1} s), \
         PVH {} instructions ({:.1} s): {fewer:.0}% fewer",
        kernel.display(),
        bp.icount,
        bp.seconds,
        pvh.icount,
        pvh.seconds
    );
    assert!(
        pvh.icount * 2 < bp.icount,
        "PVH should skip most of the boot (the decompressor): {} vs {}",
        pvh.icount,
        bp.icount
    );
}

/// Builds `tests/data/race-module` against `headers` in `dir`; returns the module.
fn build_race_module(headers: &std::path::Path, dir: &std::path::Path) -> std::path::PathBuf {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/race-module");
    let build = dir.join("race-module");
    std::fs::create_dir_all(&build).unwrap();
    for f in ["race.c", "Kbuild"] {
        std::fs::copy(src.join(f), build.join(f)).unwrap();
    }
    let out = std::process::Command::new("make")
        .arg("-C")
        .arg(headers)
        .arg(format!("M={}", build.display()))
        .arg("modules")
        .output()
        .expect("running make");
    assert!(
        out.status.success(),
        "building the race module against {} failed:\n{}\n{}",
        headers.display(),
        text(&out.stdout),
        text(&out.stderr)
    );
    build.join("race.ko")
}

/// The module's symbols as /proc/kallsyms listed them on the console: (address, name).
fn module_symbols(console: &str) -> Vec<(u64, String)> {
    let mut syms: Vec<(u64, String)> = console
        .lines()
        .filter(|l| l.trim_end().ends_with("[race]"))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let addr = u64::from_str_radix(f.next()?, 16).ok()?;
            let name = f.nth(1)?.to_string();
            Some((addr, name))
        })
        .collect();
    syms.sort();
    syms
}

/// The end-to-end story: a module with a real race (a timer and a /proc write
/// handler doing an unlocked read-modify-write), built against Debian's headers for the very
/// kernel, loaded by the initramfs; `deja record --until-failure --fail-on WARNING:` keeps
/// the run where the module's check fired; the replay verifies, and `--watch-virtual` at the
/// variable's address (printed by the module at load) names the store that lost the update:
/// the write handler storing a stale value over the timer's increment.
#[test]
fn a_modules_race_is_recorded_until_failure_and_watch_names_the_lost_update() {
    let (cache, kernel, busybox) = debian();
    let headers = deja_testkit::debian_linux_headers(&cache, &kernel)
        .unwrap_or_else(|e| panic!("the module test needs Debian's kernel headers: {e}"));
    let dir = scratch("linux-race");
    let module = build_race_module(&headers, &dir);
    let mut cpio = Cpio::new();
    cpio.dir("bin")
        .dir("dev")
        .dir("proc")
        .dir("sys")
        .char_device("dev/console", 5, 1)
        .file("bin/busybox", 0o755, &std::fs::read(&busybox).unwrap())
        .file("race.ko", 0o644, &std::fs::read(&module).unwrap())
        .file(
            "init",
            0o755,
            b"#!/bin/busybox sh\n\
              /bin/busybox --install -s /bin\n\
              mount -t proc proc /proc\n\
              mount -t sysfs sysfs /sys\n\
              insmod /race.ko\n\
              grep '\\[race\\]' /proc/kallsyms\n\
              for s in .text .data .bss; do echo \"race-section $s $(cat /sys/module/race/sections/$s)\"; done\n\
              i=0\n\
              while [ $i -lt 2000 ]; do echo 1 > /proc/race; i=$((i+1)); done\n\
              echo race: done\n\
              poweroff -f\n",
        );
    let initrd = dir.join("initrd.cpio");
    std::fs::write(&initrd, cpio.finish()).unwrap();
    let trace = dir.join("race.trace");
    let serial = dir.join("serial.txt");
    let o = common::deja(&[
        "record",
        "--engine",
        "bt",
        "--mem",
        "512M",
        "--clock",
        "virtual",
        "--kernel-entry",
        "pvh",
        "--until-failure",
        "--attempts",
        "3",
        "--fail-on",
        "WARNING:",
        "--timeout",
        "900",
        "--initrd",
        s(&initrd),
        "--append",
        "console=ttyS0 panic=-1",
        "--serial-out",
        s(&serial),
        "-q",
        "-o",
        s(&trace),
        s(&kernel),
    ]);
    let console = std::fs::read_to_string(&serial).unwrap_or_default();
    let tail: String = console
        .lines()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        console.contains("race: lost update"),
        "exit {}: {}\nconsole (last lines, reversed):\n{tail}",
        code(&o),
        text(&o.stderr)
    );
    let address = console
        .lines()
        .find_map(|l| l.split("race: race_counter at ").nth(1))
        .map(|a| u64::from_str_radix(a.trim(), 16).unwrap())
        .unwrap_or_else(|| panic!("the module printed no address:\n{tail}"));
    let symbols = module_symbols(&console);
    let race_write = symbols
        .iter()
        .position(|(_, n)| n == "race_write")
        .unwrap_or_else(|| panic!("no race_write in the console's kallsyms: {symbols:?}"));
    let (write_start, write_end) = (
        symbols[race_write].0,
        symbols.get(race_write + 1).map_or(u64::MAX, |s| s.0),
    );

    // The replay verifies, and the watch names every store to the counter.
    let watch = format!("{address:#x}");
    let r = common::deja(&["replay", "-q", "--watch-virtual", &watch, s(&trace)]);
    let out = text(&r.stdout);
    assert_eq!(
        code(&r),
        0,
        "{}\n{}",
        text(&r.stderr),
        out.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    assert!(out.contains("replay verified"), "{}", text(&r.stderr));
    // The lost update: the handler's store of a value the counter already held (the timer
    // had incremented it since the handler read it), right after the timer's store.
    // Before the module loaded, the counter's physical page belonged to someone else: the
    // stores that matter are the module's own (its code lies between its first and last
    // symbols).
    let rip = |l: &str| {
        let r = l.split(" rip ").nth(1).unwrap().split(':').next().unwrap();
        u64::from_str_radix(r.trim_start_matches("0x"), 16).unwrap()
    };
    let module_code = symbols[0].0..symbols[symbols.len() - 1].0 + 0x1000;
    let hits: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("watch: icount ") && module_code.contains(&rip(l)))
        .collect();
    let lost = hits
        .iter()
        .position(|l| l.ends_with("(unchanged)"))
        .unwrap_or_else(|| {
            panic!(
                "no store lost an update among the module's {} stores",
                hits.len()
            )
        });
    let lost_rip = rip(hits[lost]);
    assert!(
        (write_start..write_end).contains(&lost_rip),
        "the lost update's store at {lost_rip:#x} is not in race_write ({write_start:#x}..{write_end:#x}): {}",
        hits[lost]
    );
    assert!(
        lost > 0 && !(write_start..write_end).contains(&rip(hits[lost - 1])),
        "the store before the lost update is the timer's: {}",
        hits[lost - 1]
    );
    // --until that store's icount shows the machine just before it, at the storing RIP.
    let icount = hits[lost]
        .strip_prefix("watch: icount ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap();
    let u = common::deja(&["replay", "-q", "--until", icount, s(&trace)]);
    assert_eq!(code(&u), 0, "{}", text(&u.stderr));
    // The state goes to stderr with the verdict.
    assert!(
        text(&u.stderr).contains(&format!("RIP={lost_rip:016x}")),
        "the state at {icount} is not at {lost_rip:#x}: {}",
        text(&u.stderr)
    );

    // The same story in gdb over the same trace, as a kernel developer debugs it: the
    // module's symbols loaded at the addresses the kernel gave its sections (init printed
    // /sys/module/race/sections), then backwards from just after the lost update's store.
    // Debian's vmlinuz carries no symbols (they ship in a separate -dbg package), so the
    // kernel's own frames stay `??`; the module, built here with debug info, names its
    // functions, lines and variables.
    let sections: Vec<(&str, &str)> = console
        .lines()
        .filter_map(|l| l.strip_prefix("race-section "))
        .filter_map(|l| l.trim().split_once(' '))
        .collect();
    for name in [".text", ".bss"] {
        assert!(
            sections
                .iter()
                .any(|(n, a)| *n == name && a.starts_with("0x")),
            "init printed no {name} address: {sections:?}\n{tail}"
        );
    }
    let add_symbols = format!(
        "add-symbol-file {} {}",
        module.display(),
        sections
            .iter()
            .map(|(n, a)| format!("-s {n} {a}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let lost_icount: u64 = icount.parse().unwrap();
    let tick_icount: u64 = hits[lost - 1]
        .strip_prefix("watch: icount ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    // The value the lost update stored (the value the counter already held).
    let stored = hits[lost]
        .split(" -> 0x")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .map(|v| u64::from_str_radix(v, 16).unwrap())
        .unwrap();
    let source = std::fs::read_to_string(module.with_file_name("race.c")).unwrap();
    let line_of = |needle: &str| {
        1 + source
            .lines()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("race.c has no {needle:?}"))
    };
    let (write_line, tick_line) = (
        line_of("WRITE_ONCE(race_counter, seen + 1)"),
        line_of("race_counter++"),
    );
    let started = std::time::Instant::now();
    let stub = Stub::start(&trace, "127.0.0.1:0", &[]);
    let opened = started.elapsed();
    let seek = format!("monitor seek {}", lost_icount + 1);
    let out = gdb(
        &stub.addr,
        &[
            // Restores from the trace's checkpoints can outlast gdb's 2 s default.
            "set remotetimeout 600",
            &add_symbols,
            "p/x &race_counter",
            &seek,
            "maint flush register-cache",
            // An access watchpoint stops at the lost update's store itself: it wrote the
            // value the counter held.
            "awatch race_counter",
            "reverse-continue",
            "monitor when",
            "info line *$pc",
            "p race_counter",
            "delete",
            // A write watchpoint stops where the value last changed: the timer's increment,
            // the update that was lost.
            "watch race_counter",
            "reverse-continue",
            "monitor when",
            "info line *$pc",
            "p race_counter",
            "bt 1",
            "monitor stats",
        ],
    );
    let (status, err) = stub.finish();
    let session = started.elapsed();
    println!(
        "gdb over the Linux trace: the stub opened it in {:.1} s; the whole session (symbols, \
         a seek, two reverse-continues) took {:.1} s",
        opened.as_secs_f64(),
        session.as_secs_f64()
    );
    assert_eq!(status, 0, "{err}\n{out}");
    assert!(
        out.contains(&format!("= 0x{address:x}")),
        "gdb's race_counter is not at the printed {address:#x}: {out}"
    );
    assert_eq!(whens(&out), vec![lost_icount, tick_icount], "{out}");
    for (line, function) in [(write_line, "race_write"), (tick_line, "race_tick")] {
        assert!(
            out.contains(&format!("Line {line} of \"")) && out.contains(&format!("<{function}+")),
            "no stop at race.c:{line} in {function}: {out}"
        );
    }
    let printed: Vec<u64> = out
        .lines()
        .filter(|l| l.starts_with('$'))
        .filter_map(|l| l.split(" = ").nth(1)?.trim().parse().ok())
        .collect();
    assert_eq!(printed, vec![stored, stored - 1], "{out}");
    assert!(out.contains("race_tick ("), "{out}");
    assert!(err.contains("all matched"), "{err}");
}

/// Records the boot (through PVH) on `clock`, replays it, and returns the trace, the
/// recording's console and the replay's JSON report.
fn record_and_replay(
    kernel: &Path,
    initrd: &Path,
    clock: &str,
) -> (std::path::PathBuf, String, serde_json::Value) {
    let dir = scratch(&format!("linux-rr-{clock}"));
    let trace = dir.join("boot.trace");
    let (rec_serial, rep_serial) = (dir.join("record.txt"), dir.join("replay.txt"));
    let o = common::deja(&[
        "record",
        "--engine",
        "bt",
        "--mem",
        "512M",
        "--clock",
        clock,
        "--timeout",
        "900",
        "--kernel-entry",
        "pvh",
        "--initrd",
        s(initrd),
        "--append",
        "console=ttyS0 panic=-1",
        "--serial-out",
        s(&rec_serial),
        "-q",
        "-o",
        s(&trace),
        s(kernel),
    ]);
    let console = std::fs::read_to_string(&rec_serial).unwrap_or_default();
    assert_eq!(code(&o), 0, "{clock}: {}\n{console}", text(&o.stderr));
    assert!(console.contains("init: reached"), "{clock}: {console}");
    let r = common::deja(&[
        "replay",
        "-q",
        "--json",
        "--serial-out",
        s(&rep_serial),
        s(&trace),
    ]);
    assert_eq!(code(&r), 0, "{clock}: {}", text(&r.stderr));
    let report: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(report["verdict"], "Verified", "{clock}: {report}");
    assert_eq!(
        std::fs::read_to_string(&rep_serial).unwrap(),
        console,
        "{clock}: the replay's console differs from the recording's"
    );
    (trace, console, report)
}

/// Record and replay at Linux scale, on both clocks: the host-clock recording boots to init
/// as a plain run does, each replay verifies every digest and prints the same console, and
/// `--until` at three points of the boot (seeking from the nearest checkpoint) gives the same
/// state, digest included, as a replay from the start stopped there.
#[test]
fn a_linux_boot_records_and_replays_on_both_clocks_and_seeks_to_the_same_state() {
    let (_, kernel, busybox) = debian();
    let dir = scratch("linux-rr");
    let initrd = write_initramfs(
        &dir,
        &busybox,
        "/bin/busybox --install -s /bin\n\
             mount -t proc proc /proc\n\
             echo \"init: reached, $(cat /proc/cmdline)\"\n\
             poweroff -f\n",
    );
    let (virt, host) = std::thread::scope(|t| {
        let v = t.spawn(|| record_and_replay(&kernel, &initrd, "virtual"));
        let h = t.spawn(|| record_and_replay(&kernel, &initrd, "host"));
        (v.join(), h.join())
    });
    let (trace, _, report) = virt.unwrap_or_else(|e| std::panic::resume_unwind(e));
    host.unwrap_or_else(|e| std::panic::resume_unwind(e));
    let icount = report["icount"].as_u64().unwrap();
    for quarter in 1..=3 {
        let n = (icount / 4 * quarter).to_string();
        let seek = common::deja(&["replay", "-q", "--json", "--until", &n, s(&trace)]);
        let start = common::deja(&[
            "replay",
            "-q",
            "--json",
            "--from-start",
            "--until",
            &n,
            s(&trace),
        ]);
        let (seek, start): (serde_json::Value, serde_json::Value) = (
            serde_json::from_slice(&seek.stdout).unwrap(),
            serde_json::from_slice(&start.stdout).unwrap(),
        );
        assert!(
            seek["started_from"].is_object(),
            "no checkpoint before {n}: {seek}"
        );
        assert!(start["started_from"].is_null(), "{start}");
        assert_eq!(seek["final_digest"], start["final_digest"], "at {n}");
        assert_eq!(seek["verdict"], start["verdict"], "at {n}");
        assert_eq!(
            seek["icount"].as_u64(),
            Some(icount / 4 * quarter),
            "{seek}"
        );
    }
}

/// Commands typed into the guest's shell on COM1 run, as on a serial console: the shell's
/// answers come back on the console. The commands are sent once init says it is ready
/// (a UART's FIFO is emptied when the kernel's driver takes the port, as on hardware).
#[test]
fn commands_piped_into_the_guest_shell_give_their_output() {
    use std::io::{BufRead, Write};
    let (_, kernel, busybox) = debian();
    let dir = scratch("linux-shell");
    let initrd = write_initramfs(
        &dir,
        &busybox,
        "/bin/busybox --install -s /bin\n\
             mount -t proc proc /proc\n\
             echo init: ready for commands\n\
             exec sh\n",
    );
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_deja"))
        .args(["run", "--engine", "bt", "--mem", "512M", "--timeout", "900"])
        .args([
            "--kernel-entry",
            "pvh",
            "--append",
            "console=ttyS0 panic=-1",
        ])
        .arg("--initrd")
        .arg(&initrd)
        .arg(&kernel)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting deja run");
    let mut stdin = child.stdin.take().unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut console = String::new();
    let mut sent = false;
    for line in stdout.lines() {
        let line = line.unwrap_or_default();
        console.push_str(&line);
        console.push('\n');
        if !sent && line.contains("init: ready for commands") {
            stdin
                .write_all(b"echo piped-$((6*7)) $(cat /proc/sys/kernel/osrelease)\npoweroff -f\n")
                .unwrap();
            stdin.flush().unwrap();
            sent = true;
        }
    }
    let status = child.wait().unwrap();
    let tail: String = console
        .lines()
        .rev()
        .take(20)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(sent, "init never said it was ready:\n{tail}");
    assert!(status.success(), "{status}:\n{tail}");
    assert!(
        console.lines().any(|l| l.starts_with("piped-42 6.1.")),
        "the shell's answer is missing:\n{tail}"
    );
    assert!(console.contains("reboot: Power down"), "{tail}");
}
