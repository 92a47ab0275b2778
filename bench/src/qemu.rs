//! The qemu-tcg column: the same benchmark guest image run under `qemu-system-x86_64
//! -accel tcg`, the peer a user would otherwise pick.
//!
//! How the loop is timed: QEMU's `isa-debugcon` device is put on the bench-marker port
//! (0xe8) with a `udp` character device behind it, so every byte the guest writes there is
//! sent, synchronously from the vCPU thread, as one datagram to a loopback socket of the
//! harness. The harness asks the kernel to stamp each datagram on arrival
//! (`SO_TIMESTAMPNS`) and takes the loop's time as the difference of the two marks'
//! stamps: the loop is timed exactly, as on deja's engines (boot, QEMU's start-up and exit
//! stay outside), and how late the harness gets to read a datagram on a loaded machine
//! does not matter. (A pipe read by the harness was tried first: on this shared 2-core
//! machine the reader was sometimes scheduled after both marks had arrived, giving loops
//! of "0.3 ns per CPUID".) The other option, running N and 2N iterations and subtracting
//! whole-process times, needs two runs per sample and carries QEMU's start-up jitter (tens
//! of milliseconds) into every number.
//!
//! How the guest is started: the guests are raw images entered in real mode at
//! [`LOAD_ADDR`]. QEMU's generic `loader` device puts the image there, and a 64 KiB
//! firmware ROM (`-bios`) whose reset vector is a far jump to `0000:LOAD_ADDR` starts it
//! (QEMU resets with A20 enabled, as deja-pc does). The guest ends through isa-debug-exit
//! at 0xf4, as on deja-pc: a write of 0 makes QEMU exit with status 1.

use deja_guests::LOAD_ADDR;
use deja_guests::bench::{BENCH_MARKER_PORT, Bench, MARK_END, MARK_START};
use std::io::Read;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use thiserror::Error;

/// The QEMU binary the column runs.
pub const QEMU: &str = "qemu-system-x86_64";
/// Size of the firmware ROM: QEMU wants a multiple of 64 KiB.
const ROM_SIZE: usize = 0x1_0000;
/// Offset of the reset vector (physical 0xffff_fff0) in a 64 KiB ROM.
const RESET_VECTOR: usize = ROM_SIZE - 0x10;
/// How long one QEMU run may take before it is killed.
const TIMEOUT: Duration = Duration::from_secs(120);
/// How often the harness checks, while waiting for a mark, whether QEMU is still running.
const POLL: Duration = Duration::from_millis(200);

/// Why a qemu-tcg measurement could not be made.
#[derive(Debug, Error)]
pub enum QemuError {
    /// `qemu-system-x86_64` is not on PATH.
    #[error("{QEMU} is not on PATH")]
    NotInstalled,
    /// The benchmark guest could not be assembled.
    #[error("building bench-{bench}: {message}")]
    Guest {
        /// The benchmark.
        bench: &'static str,
        /// The assembler's or linker's message.
        message: String,
    },
    /// A scratch file could not be written or QEMU could not be started.
    #[error("{what} ({path}): {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or program.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// QEMU ran, but the marks did not come as expected or it exited badly.
    #[error("{QEMU} run of bench-{bench}: {message}; stderr: {stderr}")]
    Run {
        /// The benchmark.
        bench: &'static str,
        /// What went wrong (marks seen, exit status).
        message: String,
        /// QEMU's standard error, trimmed.
        stderr: String,
    },
}

/// Whether `program` is an executable file in a directory of PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// The first line of `qemu-system-x86_64 --version`, when it is installed.
pub fn version() -> Option<String> {
    let out = Command::new(QEMU).arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next()?.trim();
    (!first.is_empty()).then(|| first.to_string())
}

/// The 64 KiB firmware ROM: all HLT, with a far jump to `0000:LOAD_ADDR` at the reset
/// vector.
pub fn boot_rom() -> Vec<u8> {
    let mut rom = vec![0xf4u8; ROM_SIZE];
    let offset = LOAD_ADDR as u16; // below 64 KiB: segment 0
    rom[RESET_VECTOR] = 0xea; // JMP ptr16:16
    rom[RESET_VECTOR + 1..RESET_VECTOR + 3].copy_from_slice(&offset.to_le_bytes());
    rom[RESET_VECTOR + 3..RESET_VECTOR + 5].copy_from_slice(&0u16.to_le_bytes());
    rom
}

/// The command line that runs `image`, sending each byte written to the marker port as a
/// datagram to `mark_port` on the loopback interface.
pub fn command(image: &Path, rom: &Path, mark_port: u16) -> Command {
    let mut cmd = Command::new(QEMU);
    cmd.args([
        "-accel",
        "tcg",
        "-machine",
        "pc",
        "-m",
        "16M",
        "-nodefaults",
    ])
    .args(["-display", "none", "-serial", "null", "-monitor", "none"])
    .arg("-chardev")
    .arg(format!(
        "udp,id=bench-mark,host=127.0.0.1,port={mark_port},localaddr=127.0.0.1,localport=0"
    ))
    .arg("-device")
    .arg(format!(
        "isa-debugcon,iobase={BENCH_MARKER_PORT:#x},chardev=bench-mark"
    ))
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
    .arg("-bios")
    .arg(rom)
    .arg("-device")
    .arg(format!(
        "loader,file={},addr={LOAD_ADDR:#x},force-raw=on",
        image.display()
    ));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Scratch files of one run, removed when dropped.
struct Scratch {
    dir: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> QemuError {
    let path = path.to_path_buf();
    move |source| QemuError::Io { what, path, source }
}

/// Runs `bench` with `iterations` operations under QEMU's TCG and returns the host time
/// between the start and the end mark.
pub fn run(bench: Bench, iterations: u32) -> Result<Duration, QemuError> {
    if !on_path(QEMU) {
        return Err(QemuError::NotInstalled);
    }
    let name = bench.name();
    let image = bench.image(iterations).map_err(|e| QemuError::Guest {
        bench: name,
        message: e.to_string(),
    })?;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let scratch = Scratch {
        dir: std::env::temp_dir().join(format!("deja-bench-qemu-{}-{n}", std::process::id())),
    };
    std::fs::create_dir_all(&scratch.dir).map_err(io("creating", &scratch.dir))?;
    let image_path = scratch.dir.join(format!("bench-{name}.bin"));
    let rom_path = scratch.dir.join("boot-rom.bin");
    std::fs::write(&image_path, &image.bytes).map_err(io("writing", &image_path))?;
    std::fs::write(&rom_path, boot_rom()).map_err(io("writing", &rom_path))?;
    let socket = MarkSocket::bind()
        .and_then(|s| Ok((s.port()?, s)))
        .map_err(io("binding the mark socket", Path::new("127.0.0.1")));
    let (port, socket) = socket?;
    let mut child = command(&image_path, &rom_path, port)
        .spawn()
        .map_err(io("starting", Path::new(QEMU)))?;
    let result = time_marks(&socket, &mut child);
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().map_err(io("waiting for", Path::new(QEMU)));
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let fail = |message: String| QemuError::Run {
        bench: name,
        message,
        stderr: stderr.trim().to_string(),
    };
    let elapsed = result.map_err(&fail)?;
    // isa-debug-exit: the guest's write of 0 (pass) ends QEMU with status (0 << 1) | 1.
    match status?.code() {
        Some(1) => Ok(elapsed),
        other => Err(fail(format!(
            "exited with {other:?} after the end mark (the guest passes with status 1)"
        ))),
    }
}

/// The harness's end of the marker channel: a UDP socket on the loopback interface whose
/// datagrams carry the kernel's receive timestamp (`SO_TIMESTAMPNS`).
struct MarkSocket {
    socket: UdpSocket,
}

impl MarkSocket {
    fn bind() -> std::io::Result<Self> {
        let socket = UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
        let on: libc::c_int = 1;
        // SAFETY: the fd is the open socket's; the option value is a live c_int of the size
        // passed.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                (&raw const on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        socket.set_read_timeout(Some(POLL))?;
        Ok(Self { socket })
    }

    fn port(&self) -> std::io::Result<u16> {
        Ok(self.socket.local_addr()?.port())
    }

    /// The next datagram's first byte and kernel receive time, or `None` when none came
    /// within [`POLL`].
    fn recv(&self) -> std::io::Result<Option<(u8, Duration)>> {
        let mut buf = [0u8; 64];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // u64s, so that the control buffer is aligned for cmsghdr.
        let mut control = [0u64; 16];
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: msg points at the live iovec and control buffer above, with their sizes.
        let n = unsafe { libc::recvmsg(self.socket.as_raw_fd(), &raw mut msg, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Ok(None),
                _ => Err(e),
            };
        }
        if n == 0 {
            return Ok(None);
        }
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR walk the control buffer recvmsg filled, within
        // msg_controllen; the timestamp is read unaligned from inside that buffer.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET
                    && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS
                {
                    let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                    let at = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
                    return Ok(Some((buf[0], at)));
                }
                cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
            }
        }
        Err(std::io::Error::other(
            "a mark datagram came without its SO_TIMESTAMPNS receive time",
        ))
    }
}

/// Waits for the start and the end mark; the kernel-stamped time between them.
fn time_marks(socket: &MarkSocket, child: &mut Child) -> Result<Duration, String> {
    let deadline = Instant::now() + TIMEOUT;
    let mut next = |what: &str, want: u8| -> Result<Duration, String> {
        loop {
            match socket.recv() {
                Ok(Some((b, at))) if b == want => return Ok(at),
                Ok(Some((b, _))) => {
                    return Err(format!(
                        "expected the {what} mark {want:#04x} on port {BENCH_MARKER_PORT:#x}, \
                         got {b:#04x}"
                    ));
                }
                Ok(None) => {}
                Err(e) => return Err(format!("receiving the {what} mark: {e}")),
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("QEMU exited ({status}) before the {what} mark"));
            }
            if Instant::now() > deadline {
                return Err(format!("no {what} mark within {TIMEOUT:?}"));
            }
        }
    };
    let start = next("start", MARK_START)?;
    let end = next("end", MARK_END)?;
    end.checked_sub(start)
        .ok_or_else(|| format!("the end mark's time {end:?} precedes the start's {start:?}"))
}

/// Boots a Linux `kernel` with `initrd` and command line `append` in `mem_bytes` of RAM
/// under QEMU's TCG, as `deja run` boots it on deja-pc, and returns the host time from
/// starting QEMU to its exit (the guest powering off). The workload must end by itself.
pub fn boot_linux(
    kernel: &Path,
    initrd: Option<&Path>,
    append: &str,
    mem_bytes: u64,
    timeout: Duration,
) -> Result<Duration, QemuError> {
    const NAME: &str = "linux-boot";
    if !on_path(QEMU) {
        return Err(QemuError::NotInstalled);
    }
    let console =
        std::env::temp_dir().join(format!("deja-bench-qemu-linux-{}.txt", std::process::id()));
    let mut cmd = Command::new(QEMU);
    cmd.args([
        "-accel",
        "tcg",
        "-machine",
        "pc",
        "-cpu",
        "qemu64",
        "-nodefaults",
    ])
    .args(["-display", "none", "-monitor", "none", "-serial"])
    .arg(format!("file:{}", console.display()))
    .args(["-no-reboot", "-m"])
    .arg(format!("{}M", mem_bytes >> 20))
    .arg("-kernel")
    .arg(kernel)
    .arg("-append")
    .arg(append);
    if let Some(initrd) = initrd {
        cmd.arg("-initrd").arg(initrd);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(io("starting", Path::new(QEMU)))?;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .map_err(io("waiting for", Path::new(QEMU)))?
        {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(QemuError::Run {
                bench: NAME,
                message: format!("no power-off within {timeout:?}"),
                stderr: String::new(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = started.elapsed();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    let _ = std::fs::remove_file(&console);
    if !status.success() {
        return Err(QemuError::Run {
            bench: NAME,
            message: format!("exited with {status}"),
            stderr: stderr.trim().to_string(),
        });
    }
    // A panic with panic=-1 also ends QEMU cleanly (-no-reboot): only a power-off counts.
    if !text.contains("reboot: Power down") {
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        return Err(QemuError::Run {
            bench: NAME,
            message: format!("the guest did not power off; console ends {tail:?}"),
            stderr: stderr.trim().to_string(),
        });
    }
    Ok(elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_rom_jumps_to_the_image_from_the_reset_vector() {
        let rom = boot_rom();
        assert_eq!(rom.len() % 0x1_0000, 0);
        // JMP FAR 0000:7C00 at physical 0xffff_fff0.
        assert_eq!(
            &rom[RESET_VECTOR..RESET_VECTOR + 5],
            &[0xea, 0x00, 0x7c, 0x00, 0x00]
        );
        let decoded = iced_x86::Decoder::with_ip(16, &rom[RESET_VECTOR..], 0xfff0, 0).decode();
        assert_eq!(decoded.mnemonic(), iced_x86::Mnemonic::Jmp);
        assert_eq!(
            (decoded.far_branch_selector(), decoded.far_branch16()),
            (0, LOAD_ADDR as u16)
        );
    }

    #[test]
    fn the_command_puts_debugcon_on_the_marker_port_and_loads_the_image() {
        let cmd = command(Path::new("/tmp/img.bin"), Path::new("/tmp/rom.bin"), 4321);
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = args.join(" ");
        assert!(line.contains("-accel tcg"), "{line}");
        assert!(
            line.contains("isa-debugcon,iobase=0xe8,chardev=bench-mark"),
            "{line}"
        );
        assert!(line.contains("isa-debug-exit,iobase=0xf4"), "{line}");
        assert!(
            line.contains("udp,id=bench-mark,host=127.0.0.1,port=4321"),
            "{line}"
        );
        assert!(
            line.contains("loader,file=/tmp/img.bin,addr=0x7c00,force-raw=on"),
            "{line}"
        );
    }
}
