//! Debian's stock kernel (linux-image-amd64) with a busybox initramfs, booted on bt through
//! the x86 boot protocol and through its PVH entry: to /init, a command, and an ACPI
//! power-off. The kernel and busybox
//! are fetched with `apt-get download` on the first run (deja_testkit::debian_linux); when
//! they cannot be fetched the test fails saying why.

mod common;

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
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("debian-linux");
    let (kernel, busybox) = deja_testkit::debian_linux(&cache)
        .unwrap_or_else(|e| panic!("the Linux test needs Debian's kernel and busybox: {e}"));
    let dir = scratch("linux");
    let initrd = dir.join("initrd.cpio");
    std::fs::write(
        &initrd,
        initramfs(
            &busybox,
            "/bin/busybox --install -s /bin\n\
             mount -t proc proc /proc\n\
             echo \"init: reached, $(cat /proc/cmdline)\"\n\
             uname -sr\n\
             poweroff -f\n",
        ),
    )
    .unwrap();
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
