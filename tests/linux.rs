//! Debian's stock kernel (linux-image-amd64) with a busybox initramfs, booted on bt through
//! the x86 boot protocol: to /init, a command, and an ACPI power-off. The kernel and busybox
//! are fetched with `apt-get download` on the first run (deja_testkit::debian_linux); when
//! they cannot be fetched the test fails saying why.

mod common;

use common::{code, s, scratch, text};
use deja_testkit::Cpio;

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

#[test]
fn debians_kernel_boots_to_init_on_bt_and_powers_off() {
    let cache = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("debian-linux");
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
    let serial = dir.join("serial.txt");
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
        "--initrd",
        s(&initrd),
        "--append",
        "console=ttyS0 panic=-1 deja.marker=1",
        "--serial-out",
        s(&serial),
        s(&kernel),
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
        "stderr: {}\nconsole (last lines, reversed):\n{tail}",
        text(&o.stderr)
    );
    assert!(
        console.contains("init: reached, console=ttyS0 panic=-1 deja.marker=1"),
        "{tail}"
    );
    assert!(console.contains("Linux 6.1."), "{tail}");
    assert!(console.contains("reboot: Power down"), "{tail}");
}
