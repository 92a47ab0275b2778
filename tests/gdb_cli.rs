//! `deja replay --gdb` driven by Debian's gdb in batch mode, and by raw protocol packets.
//!
//! gdb must be installed (`.ci/run` installs it when missing): these tests fail, not skip,
//! without it.

mod common;

use common::gdb::{Stub, gdb, gdb_on, gdb_script, values, whens};
use common::{code, deja, s, scratch, text};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The racy kernel's trace (chaos seed 1 fails on its first attempt) and its console.
fn racy_trace(name: &str) -> (PathBuf, String) {
    racy_trace_with(name, &[])
}

/// [`racy_trace`] with more `deja record` arguments.
fn racy_trace_with(name: &str, extra: &[&str]) -> (PathBuf, String) {
    let dir = scratch(name);
    let trace = dir.join("racy.trace");
    let out = dir.join("racy.out");
    let args = [
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
    ]
    .into_iter()
    .chain(extra.iter().copied())
    .collect::<Vec<_>>();
    let o = deja(&args);
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    (trace, std::fs::read_to_string(&out).unwrap())
}

/// Where the trace ends (its instruction count): recordings run in real time, so each
/// recording of the racy kernel has its own length.
fn end_icount(trace: &Path) -> u64 {
    let r = deja(&["replay", "--json", s(trace)]);
    assert_eq!(code(&r), 0, "{}", text(&r.stderr));
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    v["icount"].as_u64().unwrap()
}

/// The recorded machine's CPU state at `icount` (`deja replay --until`).
fn state_at(trace: &Path, icount: u64) -> serde_json::Value {
    let u = deja(&["replay", "--until", &icount.to_string(), "--json", s(trace)]);
    assert_eq!(code(&u), 0, "{}", text(&u.stderr));
    let report: serde_json::Value = serde_json::from_slice(&u.stdout).unwrap();
    report["verdict"]["ReachedUntil"]["state"].clone()
}

/// `deja replay --watch ADDR`: every store as (icount, rip), and the summary's icount.
fn watch_listing(trace: &Path, addr: &str) -> (Vec<(u64, u64)>, u64) {
    let w = deja(&["replay", "--watch", addr, s(trace)]);
    assert_eq!(code(&w), 0, "stderr: {}", text(&w.stderr));
    let listing = text(&w.stdout);
    let hits: Vec<(u64, u64)> = listing
        .lines()
        .filter_map(|l| l.strip_prefix("watch: icount "))
        .filter_map(|l| {
            let (icount, rest) = l.split_once(" rip 0x")?;
            let rip = rest.split(':').next()?;
            Some((icount.parse().ok()?, u64::from_str_radix(rip, 16).ok()?))
        })
        .collect();
    let last = listing
        .split("deja replay --until ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .unwrap_or_else(|| panic!("no summary in {listing}"))
        .parse()
        .unwrap();
    (hits, last)
}

/// The counter's address, from the panic message.
fn counter_address(console: &str) -> String {
    console
        .split("counter at ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {console}"))
        .to_string()
}

#[test]
fn a_watchpoint_and_reverse_continue_from_the_panic_find_the_lost_update() {
    // Dense checkpoints in the trace: going back restores them (the other tests have none
    // and go back through the session's own snapshots).
    let (trace, console) = racy_trace_with(
        "gdb-watch",
        &["--digest-interval", "20", "--checkpoint-every", "1"],
    );
    let info = text(&deja(&["trace", "info", s(&trace)]).stdout);
    assert!(
        info.lines()
            .any(|l| l.starts_with("checkpoints") && !l.trim_end().ends_with(" 0")),
        "{info}"
    );
    let addr = counter_address(&console);
    let (hits, last) = watch_listing(&trace, &addr);
    let last_rip = hits.last().unwrap().1;
    assert_eq!(hits.last().unwrap().0, last);

    let console_out = trace.with_extension("console");
    let stub = Stub::start(&trace, "127.0.0.1:0", &["--serial-out", s(&console_out)]);
    let watch = format!("watch *(long*){addr}");
    let out = gdb(
        &stub.addr,
        &[
            "continue",
            "monitor when",
            &watch,
            "reverse-continue",
            "monitor when",
            "p/x $rip",
            // Forward again: the same store, now with it done.
            "continue",
            "monitor when",
        ],
    );
    let (status, err) = stub.finish();
    assert_eq!(status, 0, "{err}");
    assert!(out.contains("No more reverse-execution history"), "{out}");
    let w = whens(&out);
    let end = w[0];
    assert!(end > last, "{out}");
    assert_eq!(
        w[1], last,
        "reverse-continue stops before the last store: {out}"
    );
    assert_eq!(values(&out)[0], last_rip, "{out}");
    assert_eq!(
        w[2],
        last + 1,
        "forward, the watchpoint stops after it: {out}"
    );
    assert!(out.contains("Hardware watchpoint 1"), "{out}");
    assert!(err.contains("all matched"), "{err}");
    // The console once, though the session replayed parts of it several times.
    assert_eq!(std::fs::read_to_string(&console_out).unwrap(), console);
}

/// Read and access watchpoints on bt: `rwatch` stops after each instruction that loads the
/// counter (and never at a store), `reverse-continue` stops before the last such load; `awatch`
/// stops at loads and at every store `deja replay --watch` lists, in order.
#[test]
fn rwatch_and_awatch_stop_at_loads_and_stores() {
    let (trace, console) = racy_trace("gdb-rwatch");
    let addr = counter_address(&console);
    let (stores, _) = watch_listing(&trace, &addr);
    let stub = Stub::start(&trace, "127.0.0.1:0", &[]);
    let rwatch = format!("rwatch *(long*){addr}");
    let out = gdb(
        &stub.addr,
        &[
            &rwatch,
            "continue",
            "monitor when",
            "continue",
            "monitor when",
            "continue",
            "monitor when",
            "reverse-continue",
            "monitor when",
            "x/i $pc",
            "reverse-continue",
            "monitor when",
        ],
    );
    let (status, err) = stub.finish();
    assert_eq!(status, 0, "{err}");
    assert!(out.contains("Hardware read watchpoint 1"), "{out}");
    assert!(out.contains("Value = "), "{out}");
    let w = whens(&out);
    assert_eq!(w.len(), 5, "{out}");
    assert!(w[0] < w[1] && w[1] < w[2], "{out}");
    // Forward, after each loading instruction; backward, before the last one.
    assert_eq!(w[3], w[2] - 1, "{out}");
    assert_eq!(w[4], w[1] - 1, "{out}");
    // The instruction there reads memory, and it is none of the stores.
    let insn = out
        .lines()
        .find(|l| l.starts_with("=> "))
        .unwrap_or_else(|| panic!("no x/i line: {out}"));
    assert!(insn.contains('(') || insn.contains("0x"), "{insn}");
    for &at in &w[..3] {
        assert!(
            stores.iter().all(|&(icount, _)| icount != at - 1),
            "rwatch stopped at a store (icount {}): {out}",
            at - 1
        );
    }
    assert!(err.contains("all matched"), "{err}");

    // An access watchpoint: loads and stores, every store --watch lists among them.
    let stub = Stub::start(&trace, "127.0.0.1:0", &[]);
    let awatch = format!("awatch *(long*){addr}");
    let mut cmds = vec![awatch.as_str()];
    for _ in 0..12 {
        cmds.extend(["continue", "monitor when"]);
    }
    let out = gdb(&stub.addr, &cmds);
    let (status, err) = stub.finish();
    assert_eq!(status, 0, "{err}");
    assert!(
        out.contains("Hardware access (read/write) watchpoint 1"),
        "{out}"
    );
    let w = whens(&out);
    assert_eq!(w.len(), 12, "{out}");
    let last = *w.last().unwrap();
    let stored: Vec<u64> = stores
        .iter()
        .map(|&(icount, _)| icount + 1)
        .filter(|&i| i <= last)
        .collect();
    assert!(
        !stored.is_empty(),
        "no store among the first accesses: {out}"
    );
    for s in &stored {
        assert!(
            w.contains(s),
            "awatch missed the store ending at {s}: {w:?}"
        );
    }
    assert!(w.len() > stored.len(), "awatch saw no load: {w:?}");
    assert!(err.contains("all matched"), "{err}");
}

/// `target extended-remote`: `run N` restarts the replay at instruction count N (as `monitor
/// seek N`) and, as gdb's `run` does, runs on to the next breakpoint; `starti N` stops at N;
/// without arguments (gdb reuses the last ones unless `set args` cleared them) they restart
/// at the start; `kill` keeps the session for the next one.
#[test]
fn run_n_under_extended_remote_restarts_at_instruction_n() {
    let (trace, console) = racy_trace("gdb-run");
    let mid = end_icount(&trace) / 2;
    let state = state_at(&trace, mid);
    let rip = state["rip"].as_u64().unwrap();
    // The first execution of task A's store at or after `mid`, where `run mid` stops.
    let (stores, _) = watch_listing(&trace, &counter_address(&console));
    let store_rip = stores.last().unwrap().1;
    let first_after = stores
        .iter()
        .find(|&&(icount, r)| r == store_rip && icount > mid)
        .unwrap()
        .0;
    let stub = Stub::start(&trace, "127.0.0.1:0", &[]);
    let (starti_mid, run_mid) = (format!("starti {mid}"), format!("run {mid}"));
    let brk = format!("break *{store_rip:#x}");
    let out = gdb_on(
        "extended-remote",
        &stub.addr,
        &[
            "monitor seek 1000",
            &starti_mid,
            "monitor when",
            "p/x $rip",
            &brk,
            &run_mid,
            "monitor when",
            "kill",
            "delete",
            // gdb keeps the last arguments: cleared, `starti` starts at the start.
            "set args",
            "starti",
            "monitor when",
            "starti 0x100",
            "monitor when",
        ],
    );
    let (status, err) = stub.finish();
    assert_eq!(status, 0, "{err}");
    assert_eq!(whens(&out), vec![mid, first_after, 0, 0x100], "{out}");
    assert_eq!(values(&out)[0], rip, "{out}");
    assert!(err.contains("all matched"), "{err}");
}

#[test]
fn reverse_stepi_then_stepi_returns_to_the_same_state() {
    let (trace, _) = racy_trace("gdb-steps");
    let at = end_icount(&trace) * 3 / 4;
    let seek = format!("monitor seek {at}");
    let stub = Stub::start(&trace, "127.0.0.1:0", &[]);
    let out = gdb(
        &stub.addr,
        &[
            &seek,
            "maint flush register-cache",
            "monitor when",
            "echo ---start\\n",
            "info registers",
            "echo ---back\\n",
            "reverse-stepi 300",
            "monitor when",
            "info registers",
            "echo ---forward\\n",
            "stepi 300",
            "monitor when",
            "info registers",
            "echo ---end\\n",
        ],
    );
    let (status, err) = stub.finish();
    assert_eq!(status, 0, "{err}");
    assert_eq!(whens(&out), vec![at, at - 300, at], "{out}");
    let section = |from: &str, to: &str| -> String {
        let start = out.find(from).map_or(0, |i| i + from.len());
        let end = out[start..].find(to).map_or(out.len(), |i| start + i);
        out[start..end]
            .lines()
            .filter(|l| l.starts_with(|c: char| c.is_ascii_lowercase()) && l.contains("0x"))
            .filter(|l| !l.starts_with("icount"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let before = section("---start", "---back");
    let back = section("---back", "---forward");
    let after = section("---forward", "---end");
    assert!(before.contains("rip"), "{out}");
    assert_ne!(
        before, back,
        "300 instructions back is another state: {out}"
    );
    assert_eq!(before, after, "{out}");
}

#[test]
fn breakpoints_by_address_hit_where_the_instruction_runs() {
    let (trace, console) = racy_trace("gdb-break");
    let addr = counter_address(&console);
    let (hits, _) = watch_listing(&trace, &addr);
    // Task A's store: every time it runs, it is one of the stores --watch lists.
    let store_rip = hits.last().unwrap().1;
    let expected: Vec<u64> = hits
        .iter()
        .filter(|h| h.1 == store_rip)
        .map(|h| h.0)
        .collect();
    assert!(expected.len() > 10);
    let stub = Stub::start(&trace, "127.0.0.1:0", &[]);
    let dir = scratch("gdb-break-script");
    let out = gdb_script(
        &stub.addr,
        &dir,
        &format!(
            "break *{store_rip:#x}\ncommands\nsilent\nmonitor when\ncontinue\nend\ncontinue\n\
             info breakpoints\n"
        ),
    );
    let (status, err) = stub.finish();
    assert_eq!(status, 0, "{err}");
    assert_eq!(whens(&out), expected, "{out}");
    assert!(
        out.contains(&format!("breakpoint already hit {} times", expected.len())),
        "{out}"
    );
    // Nothing was planted in guest memory: the replay checked its digests all the way.
    assert!(err.contains("all matched"), "{err}");

    // Backwards from the end, the same breakpoint stops at the last executions, latest
    // first.
    let stub = Stub::start(&trace, "127.0.0.1:0", &[]);
    let out = gdb(
        &stub.addr,
        &[
            "continue",
            &format!("break *{store_rip:#x}"),
            "reverse-continue",
            "monitor when",
            "reverse-continue",
            "monitor when",
            "p/x $rip",
        ],
    );
    let (status, err) = stub.finish();
    assert_eq!(status, 0, "{err}");
    let n = expected.len();
    assert_eq!(whens(&out), vec![expected[n - 1], expected[n - 2]], "{out}");
    assert_eq!(values(&out), vec![store_rip], "{out}");
}

#[test]
fn monitor_seek_and_mode_switches_keep_one_register_packet() {
    let (trace, _) = racy_trace("gdb-seek");
    let mid = end_icount(&trace) / 2;
    // The recorded state there, for comparison: the kernel is in long mode by then.
    let state = state_at(&trace, mid);
    assert_ne!(state["efer"].as_u64().unwrap() & 0x400, 0, "{state}");
    let rip = state["rip"].as_u64().unwrap();
    let rsp = state["gpr"][4].as_u64().unwrap();
    let cr3 = state["cr3"].as_u64().unwrap();

    let seek_mid = format!("monitor seek {mid}");
    let stub = Stub::start(&trace, "127.0.0.1:0", &[]);
    let out = gdb(
        &stub.addr,
        &[
            // Real mode at the start.
            "p/x $cr0",
            "p/x $efer",
            &seek_mid,
            "maint flush register-cache",
            "monitor when",
            "p/x $rip",
            "p/x $rsp",
            "p/x $cr3",
            "p/x $cr0",
            "p/x $efer",
            // Back to real mode, then forward again.
            "monitor seek 10",
            "maint flush register-cache",
            "p/x $cr0",
            &seek_mid,
            "maint flush register-cache",
            "p/x $rip",
            "monitor checkpoint",
            "monitor seek 20",
            "monitor restart 0",
            "monitor when",
        ],
    );
    let (status, err) = stub.finish();
    assert_eq!(status, 0, "{err}");
    let v = values(&out);
    assert_eq!(v[0] & 1, 0, "starts in real mode: {out}");
    assert_eq!(v[1], 0, "{out}");
    assert_eq!(&v[2..5], &[rip, rsp, cr3], "{out}");
    assert_eq!(
        v[5] & 0x8000_0001,
        0x8000_0001,
        "paged protected mode: {out}"
    );
    assert_ne!(v[6] & 0x400, 0, "long mode active: {out}");
    assert_eq!(v[7] & 1, 0, "real mode again: {out}");
    assert_eq!(v[8], rip, "{out}");
    assert_eq!(whens(&out), vec![mid, mid], "{out}");
    assert!(
        out.contains(&format!("checkpoint 0 at icount {mid}")),
        "{out}"
    );
}

#[test]
fn writes_are_refused_and_the_replay_still_verifies() {
    let (trace, _) = racy_trace("gdb-writes");
    let seek = format!("monitor seek {}", end_icount(&trace) / 2);
    let stub = Stub::start(&trace, "127.0.0.1:0", &[]);
    let out = gdb(
        &stub.addr,
        &[
            &seek,
            "maint flush register-cache",
            "set $rax = 5",
            "set *(char*)0x98000 = 1",
            "p $rax == 5",
            "continue",
            "monitor digests",
        ],
    );
    let (status, err) = stub.finish();
    assert_eq!(status, 0, "{err}");
    assert!(out.contains("Could not write register"), "{out}");
    assert!(
        out.contains("Cannot access memory at address 0x98000"),
        "{out}"
    );
    assert!(out.contains("$1 = 0"), "rax unchanged: {out}");
    assert!(err.contains("refused to write registers"), "{err}");
    assert!(
        err.contains("refused to write 1 bytes of memory at 0x98000"),
        "{err}"
    );
    assert!(out.contains("state digests checked, all matched"), "{out}");
    // And the trace replays as before.
    let r = deja(&["replay", s(&trace)]);
    assert_eq!(code(&r), 0, "{}", text(&r.stderr));
}

#[test]
fn stamped_serial_lines_name_an_icount_gdb_can_seek_to() {
    let (trace, console) = racy_trace("gdb-stamp");
    let r = deja(&["replay", "--stamp", "--serial-out", "-", "-q", s(&trace)]);
    assert_eq!(code(&r), 0, "{}", text(&r.stderr));
    let stdout = text(&r.stdout);
    let stamped: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("[icount "))
        .collect();
    assert_eq!(stamped.len(), console.lines().count(), "{stdout}");
    let panic = stamped
        .iter()
        .find(|l| l.contains("PANIC"))
        .unwrap_or_else(|| panic!("{stdout}"));
    let icount: u64 = panic["[icount ".len()..panic.find(']').unwrap()]
        .parse()
        .unwrap();
    // Each stamp is the position of the exit that wrote the line's first byte: just
    // before it, that byte is still to be written.
    let stub = Stub::start(&trace, "127.0.0.1:0", &[]);
    let out = gdb(
        &stub.addr,
        &[&format!("monitor seek {icount}"), "monitor when"],
    );
    let (status, err) = stub.finish();
    assert_eq!(status, 0, "{err}");
    assert_eq!(whens(&out), vec![icount], "{out}");
}

/// One remote-protocol packet with its checksum.
fn packet(body: &str) -> Vec<u8> {
    let sum = body.bytes().fold(0u8, |a, b| a.wrapping_add(b));
    format!("${body}#{sum:02x}").into_bytes()
}

/// Reads one reply packet's body (skipping acks), or `None` on timeout or close.
fn reply(conn: &mut impl Read) -> Option<String> {
    let mut body = Vec::new();
    let mut in_packet = false;
    let mut byte = [0u8; 1];
    loop {
        if conn.read(&mut byte).ok()? == 0 {
            return None;
        }
        match (in_packet, byte[0]) {
            (false, b'$') => in_packet = true,
            (false, _) => {}
            (true, b'#') => {
                let mut sum = [0u8; 2];
                conn.read_exact(&mut sum).ok()?;
                return Some(String::from_utf8_lossy(&body).into_owned());
            }
            (true, b) => body.push(b),
        }
    }
}

#[test]
fn malformed_and_unusual_packets_never_bring_the_stub_down() {
    let (trace, _) = racy_trace("gdb-protocol");
    let dir = scratch("gdb-protocol-sock");
    let sock = dir.join("gdb.sock");
    let stub = Stub::start(&trace, s(&sock), &[]);
    let mut conn = std::os::unix::net::UnixStream::connect(&sock).expect("connecting");
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // (packet, what the reply must start with; "" when any reply will do).
    let table: &[(&str, &str)] = &[
        ("qSupported:multiprocess+;swbreak+;hwbreak+", "PacketSize="),
        ("?", "T05"),
        ("g", ""),
        ("qXfer:features:read:target.xml:0,fff", "m<?xml"),
        ("qFrobnicate", ""),
        ("vFrobnicate", ""),
        ("m7c00,10", ""),
        ("m0,ffffffffffffffff", ""),
        ("mffffffffffffffff,ffffffffffffffff", ""),
        ("m", "E"),
        ("mzz,zz", "E"),
        ("m7c00", "E"),
        ("M98000,1:00", "E"),
        ("X98000,0:", "OK"),
        ("G00", "E"),
        ("P0=0000000000000000", ""),
        ("p9999", ""),
        ("Z9,7c00,1", ""),
        ("Z0,zz,1", ""),
        ("Z2,98000,0", ""),
        ("Z2,fffffffffffff000,8", ""),
        ("Z3,98000,8", ""),
        ("vCont;x", ""),
        ("vCont?", "vCont"),
        ("qRcmd,", ""),
        ("qRcmd,7a7a", "O"),
        ("qRcmd,7365656b20787878", ""),
        ("Hg0", ""),
        ("T1", ""),
        ("", ""),
    ];
    let mut transcript = String::new();
    for (p, want) in table {
        conn.write_all(&packet(p)).unwrap();
        let mut r = reply(&mut conn).unwrap_or_else(|| panic!("no reply to {p:?}: {transcript}"));
        // Monitor output comes as O packets before the final reply.
        let mut console = false;
        while p.starts_with("qRcmd") && r.starts_with('O') && r != "OK" {
            console = true;
            r = reply(&mut conn).unwrap_or_else(|| panic!("no reply to {p:?}"));
        }
        if *want == "O" {
            assert!(console, "{p:?}: no console output\n{transcript}");
        }
        let want = if *want == "O" { "OK" } else { *want };
        transcript.push_str(&format!("{p:?} -> {:?}\n", &r[..r.len().min(60)]));
        assert!(r.starts_with(want), "{p:?} answered {r:?}\n{transcript}");
    }
    // A packet with a bad checksum is nacked, and the stub goes on.
    conn.write_all(b"$g#00").unwrap();
    let mut nack = [0u8; 1];
    conn.read_exact(&mut nack).unwrap();
    assert_eq!(nack[0], b'-', "{transcript}");
    // Still answering, then detach ends the session cleanly.
    conn.write_all(&packet("?")).unwrap();
    assert!(reply(&mut conn).is_some_and(|r| r.starts_with('T')));
    conn.write_all(&packet("D")).unwrap();
    let _ = reply(&mut conn);
    drop(conn);
    let (status, err) = stub.finish();
    assert_eq!(status, 0, "{err}\n{transcript}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_kvm_recording_is_debugged_on_bt() {
    if !common::kvm_available("a_kvm_recording_is_debugged_on_bt") {
        return;
    }
    let dir = scratch("gdb-kvm");
    let trace = dir.join("hello.trace");
    let o = deja(&["record", "guest:hello", "-o", s(&trace), "--mem", "32M"]);
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    let stub = Stub::start(&trace, "127.0.0.1:0", &[]);
    let out = gdb(
        &stub.addr,
        &["continue", "monitor when", "reverse-stepi", "monitor when"],
    );
    let (status, err) = stub.finish();
    assert_eq!(status, 0, "{err}");
    assert!(err.contains("debugging the kvm recording on bt"), "{err}");
    let w = whens(&out);
    assert!(
        w[0] > 100,
        "bt counts the kvm recording's instructions: {out}"
    );
    assert_eq!(w[1], w[0] - 1, "{out}");
    assert!(err.contains("all matched"), "{err}");
}

#[test]
fn a_live_run_is_debugged_forward_only() {
    let stub = Stub::spawn(&[
        "run",
        "--gdb",
        "127.0.0.1:0",
        "--engine",
        "bt",
        "--mem",
        "32M",
        "guest:racy-kernel",
    ]);
    let out = gdb(
        &stub.addr,
        &[
            "stepi 3",
            "monitor when",
            "break *0x7ddf",
            "continue",
            "monitor when",
            "p/x $rip",
            "delete",
            "watch *(long*)0x98000",
            "continue",
            "monitor when",
            "reverse-stepi",
            "monitor seek 5",
            "delete",
            "continue",
        ],
    );
    let (status, err) = stub.finish();
    assert_eq!(status, 0, "{err}");
    let w = whens(&out);
    assert_eq!(w[0], 3, "{out}");
    assert_eq!(values(&out), vec![0x7ddf], "{out}");
    assert_eq!(
        w[2],
        w[1] + 1,
        "the watchpoint stops right after the store: {out}"
    );
    assert!(out.contains("Hardware watchpoint 2"), "{out}");
    assert!(
        out.contains("Target remote does not support this command"),
        "no reverse execution on a live run: {out}"
    );
    assert!(out.contains("a live run goes forward only"), "{out}");
    assert!(out.contains("exited normally"), "{out}");
}

#[test]
fn ctrl_c_stops_a_running_guest() {
    // A live run of the racy kernel takes millions of instructions: gdb's Ctrl-C (0x03)
    // arrives while it runs and stops it with SIGINT; the session goes on.
    let stub = Stub::spawn(&[
        "run",
        "--gdb",
        "127.0.0.1:0",
        "--engine",
        "bt",
        "--mem",
        "32M",
        "--serial-out",
        "/dev/null",
        "guest:racy-kernel",
    ]);
    let mut conn = std::net::TcpStream::connect(&stub.addr).expect("connecting");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    conn.write_all(&packet("qSupported:swbreak+")).unwrap();
    assert!(reply(&mut conn).is_some_and(|r| r.starts_with("PacketSize")));
    let mut running = packet("c");
    running.push(0x03);
    conn.write_all(&running).unwrap();
    let stop = reply(&mut conn).expect("a stop reply");
    assert!(
        stop.starts_with("T02") || stop.starts_with("S02"),
        "SIGINT expected, got {stop:?}"
    );
    conn.write_all(&packet("qRcmd,7768656e")).unwrap(); // "when"
    // The output may come in several `O` packets: strip each one's marker before joining.
    let mut hex = String::new();
    while let Some(r) = reply(&mut conn) {
        if r == "OK" {
            break;
        }
        hex.push_str(r.strip_prefix('O').unwrap_or(&r));
    }
    let text: String = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap() as char)
        .collect();
    let icount: u64 = text
        .strip_prefix("icount ")
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{text:?}"));
    assert!(icount > 0, "{text}");
    // gdb going away without a detach ends the session as a detach does.
    drop(conn);
    let (status, err) = stub.finish();
    assert_eq!(status, 0, "{err}");
    assert!(err.contains("gdb session ended"), "{err}");
}
