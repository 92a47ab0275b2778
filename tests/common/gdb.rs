//! Driving `deja replay --gdb` with Debian's gdb in batch mode (tests/gdb_cli.rs and the
//! Linux trace's session in tests/linux.rs).

use super::{s, text};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A `deja replay --gdb` process and what it has said on stderr.
pub struct Stub {
    child: Child,
    /// Where it listens.
    pub addr: String,
    stderr: Arc<Mutex<String>>,
}

impl Stub {
    /// Starts the stub on `endpoint` (`127.0.0.1:0` picks a free port) and waits until it
    /// listens.
    pub fn start(trace: &Path, endpoint: &str, extra: &[&str]) -> Stub {
        let mut args = vec!["replay", "--gdb", endpoint];
        args.extend_from_slice(extra);
        args.push(s(trace));
        Stub::spawn(&args)
    }

    /// Starts `deja ARGS` (which must serve gdb) and waits until it listens.
    pub fn spawn(args: &[&str]) -> Stub {
        let mut child = Command::new(env!("CARGO_BIN_EXE_deja"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting deja");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = String::new();
        let addr = loop {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("deja ended before listening: {seen}"))
                .unwrap();
            seen.push_str(&line);
            seen.push('\n');
            if let Some(rest) = line.split("waiting for gdb on ").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        let stderr = Arc::new(Mutex::new(seen));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Stub {
            child,
            addr,
            stderr,
        }
    }

    /// Waits for the stub to end (gdb detached); its exit status and stderr.
    pub fn finish(mut self) -> (i32, String) {
        let started = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = self.child.kill();
                panic!(
                    "the stub did not end after gdb left: {}",
                    self.stderr.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut out = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        std::thread::sleep(Duration::from_millis(50));
        let err = self.stderr.lock().unwrap().clone();
        (status.code().expect("deja died of a signal"), err)
    }
}

/// Runs gdb in batch mode against `addr` with `commands` (one `-ex` each), then detaches.
pub fn gdb(addr: &str, commands: &[&str]) -> String {
    gdb_on("remote", addr, commands)
}

/// [`gdb`] through `target TARGET` (`remote` or `extended-remote`).
pub fn gdb_on(target: &str, addr: &str, commands: &[&str]) -> String {
    let mut cmd = Command::new("gdb");
    cmd.args(["-batch", "-nx", "-ex", "set pagination off", "-ex"])
        .arg(format!("target {target} {addr}"));
    for c in commands {
        cmd.arg("-ex").arg(c);
    }
    cmd.args(["-ex", "detach"]);
    let o = cmd
        .stdin(Stdio::null())
        .output()
        .expect("running gdb (install it: apt-get install gdb; .ci/run does)");
    let out = format!("{}{}", text(&o.stdout), text(&o.stderr));
    assert!(!out.contains("g packet"), "register packet trouble: {out}");
    assert!(!out.contains("Remote connection closed"), "{out}");
    out
}

/// Runs a gdb script file (for breakpoint commands) against `addr`.
pub fn gdb_script(addr: &str, dir: &Path, script: &str) -> String {
    let path = dir.join("script.gdb");
    std::fs::write(
        &path,
        format!("set pagination off\ntarget remote {addr}\n{script}\ndetach\n"),
    )
    .unwrap();
    let o = Command::new("gdb")
        .args(["-batch", "-nx", "-x", s(&path)])
        .stdin(Stdio::null())
        .output()
        .expect("running gdb (install it: apt-get install gdb; .ci/run does)");
    format!("{}{}", text(&o.stdout), text(&o.stderr))
}

/// Every `icount N` that `monitor when` printed, in order.
pub fn whens(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.strip_prefix("icount "))
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect()
}

/// Every value gdb printed as `$N = 0x...`, in order.
pub fn values(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.split(" = 0x").nth(1))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .collect()
}
