//! The `deja` program as a user runs it: exit codes, output, error messages.

mod common;

use common::{code, deja, kvm_available, s, scratch, text};
use std::path::Path;

#[test]
fn guests_list_names_the_corpus() {
    let o = deja(&["guests", "list"]);
    assert_eq!(code(&o), 0);
    for name in ["hello", "echo", "timer"] {
        assert!(
            text(&o.stdout).contains(name),
            "{name} missing from {}",
            text(&o.stdout)
        );
    }
}

#[test]
fn hello_on_bt_prints_and_exits_with_the_guest_status() {
    let o = deja(&["run", "--engine", "bt", "guest:hello"]);
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    assert!(text(&o.stdout).contains("Hello from deja"));
}

#[test]
fn hello_on_kvm_prints_and_exits_with_the_guest_status() {
    if !kvm_available("hello_on_kvm") {
        return;
    }
    let o = deja(&["run", "--engine", "kvm", "guest:hello"]);
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    assert!(text(&o.stdout).contains("Hello from deja"));
}

#[test]
fn json_summary_and_stats_describe_the_run() {
    let dir = scratch("json");
    let serial = dir.join("serial.txt");
    let o = deja(&[
        "run",
        "--engine",
        "bt",
        "--stats",
        "--json",
        "-",
        "--serial-out",
        serial.to_str().unwrap(),
        "guest:hello",
    ]);
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is JSON");
    assert_eq!(v["engine"], "bt");
    assert_eq!(v["exit_status"], 0);
    assert!(v["icount"].as_u64().unwrap() > 100);
    assert!(v["stats"]["bt.blocks_translated"].as_u64().unwrap() > 0);
    assert!(text(&o.stderr).contains("bt.lookup_hits"));
    assert!(
        std::fs::read_to_string(&serial)
            .unwrap()
            .contains("Hello from deja")
    );
}

#[test]
fn built_images_run_from_files_with_their_sidecars() {
    let dir = scratch("build");
    let o = deja(&["guests", "build", "--out", dir.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    let hello = dir.join("hello.img");
    assert!(hello.exists() && dir.join("hello.img.json").exists());
    let o = deja(&["run", "--engine", "bt", hello.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    assert!(text(&o.stdout).contains("Hello from deja"));
}

#[test]
fn bad_inputs_get_exit_status_1_and_say_why() {
    let dir = scratch("bad");
    let junk = dir.join("junk.bin");
    std::fs::write(&junk, [0x42u8; 300]).unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["run", "guest:nope"], "no built-in guest named \"nope\""),
        (
            &["run", "/nonexistent/deja/image"],
            "/nonexistent/deja/image",
        ),
        (&["run", junk.to_str().unwrap()], "no multiboot header"),
        (&["run", "--mem", "1M", "guest:hello"], "out of range"),
    ];
    for (args, needle) in cases {
        let o = deja(args);
        assert_eq!(code(&o), 1, "{args:?}: stderr {}", text(&o.stderr));
        assert!(
            text(&o.stderr).contains(needle),
            "{args:?}: {}",
            text(&o.stderr)
        );
    }
    let o = deja(&["run", "--mem", "lots", "guest:hello"]);
    assert_eq!(code(&o), 2, "clap usage errors exit 2");
}

/// A multiboot kernel (a.out kludge, loaded at 1 MiB) whose code writes `status` to the
/// isa-debug-exit port.
fn multiboot_kernel(status: u8) -> Vec<u8> {
    const MAGIC: u32 = 0x1bad_b002;
    const FLAGS: u32 = 1 << 16;
    let mut k = Vec::new();
    for field in [
        MAGIC,
        FLAGS,
        0u32.wrapping_sub(MAGIC.wrapping_add(FLAGS)),
        0x10_0000, // header_addr
        0x10_0000, // load_addr
        0,         // load_end_addr: the whole file
        0,         // bss_end_addr: none
        0x10_0020, // entry_addr: the code below
    ] {
        k.extend_from_slice(&field.to_le_bytes());
    }
    // mov al, status; out 0xf4, al; hlt
    k.extend_from_slice(&[0xb0, status, 0xe6, 0xf4, 0xf4]);
    k
}

/// `--kernel FILE` boots a kernel as QEMU's -kernel does, the same as the positional IMAGE;
/// both at once, or a file that is not a kernel, are refused saying why.
#[test]
fn kernel_is_given_with_kernel_or_as_image_but_not_both() {
    let dir = scratch("kernel-flag");
    let kernel = dir.join("kernel.mb");
    std::fs::write(&kernel, multiboot_kernel(0x2a)).unwrap();
    let k = kernel.to_str().unwrap();
    for args in [
        &["run", "--engine", "bt", "--kernel", k][..],
        &["run", "--engine", "bt", k],
    ] {
        let o = deja(args);
        assert_eq!(code(&o), 0x2a, "{args:?}: {}", text(&o.stderr));
    }
    let o = deja(&["run", "--engine", "bt", "--kernel", k, "guest:hello"]);
    assert_eq!(code(&o), 1, "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(
        err.contains("both IMAGE (guest:hello) and --kernel") && err.contains("one way only"),
        "{err}"
    );
    // Not a kernel: a raw image with its sidecar.
    let o = deja(&["guests", "build", "--out", dir.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let hello = dir.join("hello.img");
    let o = deja(&["run", "--engine", "bt", "--kernel", hello.to_str().unwrap()]);
    assert_eq!(code(&o), 1, "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("--kernel takes a Linux kernel"),
        "{}",
        text(&o.stderr)
    );
    // Neither: clap's usage error.
    let o = deja(&["run", "--engine", "bt"]);
    assert_eq!(code(&o), 2, "{}", text(&o.stderr));
    // A recording boots --kernel too, and its replay finds the file by its recorded name.
    let trace = dir.join("kernel.trace");
    let o = deja(&[
        "record",
        "--engine",
        "bt",
        "--kernel",
        k,
        "-o",
        trace.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 0x2a, "{}", text(&o.stderr));
    let o = deja(&["replay", trace.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    // The trace names the firmware tables this build writes.
    let o = deja(&["trace", "info", trace.to_str().unwrap()]);
    assert!(
        text(&o.stdout).contains("firmware     table revision 2"),
        "{}",
        text(&o.stdout)
    );
}

/// Devices and FIFOs as images are refused before reading (they would grow memory without
/// bound or block forever); so is a file too large to load.
#[test]
fn special_and_oversized_image_files_are_refused_at_once() {
    let dir = scratch("special");
    let fifo = dir.join("fifo");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    let big = dir.join("big.bin");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(5 << 30)
        .unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &["run", "--bios", "/dev/zero"],
            "not a regular file (a character device)",
        ),
        (
            &["run", "--raw", "0x7c00", "--mode", "real", "/dev/zero"],
            "a character device",
        ),
        (
            &["run", "--raw", "0x7c00", "--mode", "real", s(&fifo)],
            "a FIFO",
        ),
        (&["run", s(&fifo)], "a FIFO"),
        (&["run", "--bios", s(&big)], "larger than"),
    ];
    for (args, needle) in cases {
        let started = std::time::Instant::now();
        let o = deja(args);
        assert_eq!(code(&o), 1, "{args:?}: stderr {}", text(&o.stderr));
        assert!(
            text(&o.stderr).contains(needle),
            "{args:?}: {}",
            text(&o.stderr)
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "{args:?}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `jmp $` at 0x7c00: only the time limit ends it.
#[test]
fn a_spinning_guest_is_stopped_by_the_timeout_with_status_124() {
    let dir = scratch("spin");
    let img = dir.join("spin.bin");
    std::fs::write(&img, [0xeb, 0xfe]).unwrap();
    let mut engines = vec!["bt"];
    if kvm_available("spin on kvm") {
        engines.push("kvm");
    }
    for engine in engines {
        let o = deja(&[
            "run",
            "--engine",
            engine,
            "--timeout",
            "0.3",
            "--raw",
            "0x7c00",
            "--mode",
            "real",
            img.to_str().unwrap(),
        ]);
        assert_eq!(code(&o), 124, "{engine}: stderr {}", text(&o.stderr));
        assert!(
            text(&o.stderr).contains("time limit"),
            "{engine}: {}",
            text(&o.stderr)
        );
    }
}

/// 32-bit protected mode, IDT limit 0, UD2: #UD, #GP, #DF, shutdown. (UD2 rather than INT3
/// because this host's KVM (PVM) cannot emulate INT3 in ring 0, and in real mode it does not
/// check the IVT limit; engine/kvm's tests pin both down.)
#[test]
fn a_triple_fault_exits_125_and_prints_the_cpu_state() {
    let dir = scratch("triple");
    let img = dir.join("triple.bin");
    let mut bytes = vec![0x0f, 0x01, 0x1d, 0x10, 0x7c, 0, 0, 0x0f, 0x0b]; // lidt [0x7c10]; ud2
    bytes.resize(0x16, 0); // the IDTR image at 0x7c10: limit 0, base 0
    std::fs::write(&img, &bytes).unwrap();
    let mut engines = vec!["bt"];
    if kvm_available("triple fault on kvm") {
        engines.push("kvm");
    }
    for engine in engines {
        let o = deja(&[
            "run",
            "--no-reboot",
            "--engine",
            engine,
            "--timeout",
            "10",
            "--raw",
            "0x7c00",
            "--mode",
            "protected",
            img.to_str().unwrap(),
        ]);
        let err = text(&o.stderr);
        assert_eq!(code(&o), 125, "{engine}: stderr {err}");
        assert!(
            err.contains("shut down") && err.contains("RIP="),
            "{engine}: {err}"
        );
    }
}

#[test]
fn info_reports_the_host_as_json() {
    let o = deja(&["info", "--json", "--no-probe"]);
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is JSON");
    assert!(v["host"]["flavour"].is_string() || v["host"]["flavour"].is_object());
    assert_eq!(v["engines"]["bt"], true);
    assert_eq!(v["engines"]["kvm"], Path::new("/dev/kvm").exists());
}

#[test]
fn run_reboots_on_reset_unless_no_reboot() {
    // By default (as QEMU) a reset request reboots: the reset guest counts five boots in
    // CMOS and passes. With --no-reboot the run ends at the first reset (0xcf9).
    let o = deja(&["run", "--engine", "bt", "--timeout", "30", "guest:reset"]);
    let out = text(&o.stdout);
    assert_eq!(code(&o), 0, "{out}{}", text(&o.stderr));
    assert!(
        out.contains("reset: boot 4") && out.contains("reset: PASS"),
        "{out}"
    );
    let o = deja(&[
        "run",
        "--no-reboot",
        "-v",
        "--engine",
        "bt",
        "--timeout",
        "30",
        "guest:reset",
    ]);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(code(&o), 0, "{out}{err}");
    assert!(
        out.contains("reset: boot 0") && !out.contains("reset: boot 1"),
        "{out}"
    );
    assert!(err.contains("guest reset the machine (port 0xcf9"), "{err}");
}

/// `deja trace info | head` and friends: when stdout's reader has gone away, deja ends
/// quietly (printing commands by SIGPIPE, as other Unix tools; commands that run guests keep
/// going and exit with their usual status) and never panics.
#[test]
fn a_closed_stdout_ends_deja_quietly() {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::ExitStatusExt;
    let dir = scratch("epipe");
    let trace = dir.join("hello.trace");
    let o = deja(&["record", "--engine", "bt", "guest:hello", "-o", s(&trace)]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let t = s(&trace);
    let cases: [(&[&str], Option<i32>); 9] = [
        (&["trace", "info", t], None),
        (&["trace", "stats", t], None),
        (&["trace", "verify", t], None),
        (&["trace", "dump", t], None),
        (&["guests", "list"], None),
        (&["info"], None),
        (&["replay", t], Some(0)),
        (&["replay", "--serial-out", "-", "--json", t], Some(0)),
        (
            &["run", "--engine", "bt", "--json", "-", "guest:hello"],
            Some(0),
        ),
    ];
    for (args, status) in cases {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe() writes.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: pipe() just returned these descriptors; each is owned exactly once here.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        drop(read);
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_deja"))
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::from(write))
            .output()
            .unwrap();
        let err = text(&o.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        match status {
            None => assert_eq!(o.status.signal(), Some(libc::SIGPIPE), "{args:?}: {err}"),
            Some(c) => assert_eq!(o.status.code(), Some(c), "{args:?}: {err}"),
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
