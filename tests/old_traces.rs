//! Traces written by older deja builds still read, verify and replay verified.
//!
//! The files in tests/data were recorded by the deja binary of the last commit that wrote
//! each format version (built from that commit in a temporary worktree):
//! - format 1: 544bc8c (the commit before beb92f4 added the `registers` event):
//!   `format1-timer-bt.trace` (guest:timer on bt, host clock, one checkpoint) and
//!   `format1-hello-kvm.trace` (guest:hello on kvm, exit-synchronous);
//! - format 2: 15ea65b (the commit before 54360e4 added the header's reset policy):
//!   `format2-timer-bt.trace` (guest:timer on bt, host clock, digests every 256 events with a
//!   checkpoint at every other one, so it holds `registers` events);
//! - format 8: 643c8d6 (the last commit before the trace header named a firmware table
//!   revision): `format8-platform-bt.trace` (guest:platform on bt, host clock, digests every
//!   256 events, each with a checkpoint), `deja record --engine bt --digest-interval 256
//!   --checkpoint-min-instructions 0 guest:platform`. The guest reads the ACPI tables, and
//!   every digest covers their pages, so it replays verified only with the tables it was
//!   recorded with.
//!
//! Every replay here runs on bt (a kvm trace replays on bt), so none needs /dev/kvm.

mod common;

use common::{code, deja, text};
use std::path::PathBuf;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// The count of events of `kind` on `deja trace info`'s `events` line.
fn event_count(info: &str, kind: &str) -> u64 {
    info.lines()
        .find(|l| l.starts_with("events "))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{kind}=")))
        })
        .map_or(0, |n| n.parse().unwrap())
}

/// Checks `trace info`, `trace verify` and a verified `replay` on bt of an old trace; returns
/// the replay's JSON report.
fn check(name: &str, version: u32) -> serde_json::Value {
    let path = data(name);
    let p = path.to_str().unwrap();

    let info = deja(&["trace", "info", p]);
    assert_eq!(code(&info), 0, "{name}: {}", text(&info.stderr));
    let info = text(&info.stdout);
    assert!(
        info.contains(&format!("format version {version})")),
        "{name}:\n{info}"
    );
    assert!(info.contains("status       complete"), "{name}:\n{info}");
    // Format 1 and 2 headers end before the reset policy: they read as what they did.
    if version < 3 {
        assert!(info.contains("on reset Stop"), "{name}:\n{info}");
    }

    let verify = deja(&["trace", "verify", p]);
    assert_eq!(code(&verify), 0, "{name}: {}", text(&verify.stderr));
    assert!(
        text(&verify.stdout).contains(": OK (complete)"),
        "{name}: {}",
        text(&verify.stdout)
    );

    let replay = deja(&["replay", p, "--engine", "bt", "--json"]);
    assert_eq!(code(&replay), 0, "{name}: {}", text(&replay.stderr));
    let report: serde_json::Value = serde_json::from_slice(&replay.stdout)
        .unwrap_or_else(|e| panic!("{name}: {e}: {}", text(&replay.stdout)));
    assert_eq!(report["verdict"], "Verified", "{name}: {report}");
    assert_eq!(report["exit_status"], 0, "{name}: {report}");
    // Every digest the recording took was checked, and the final digest matched the footer
    // (a Verified verdict needs it).
    assert_eq!(
        report["digests_checked"].as_u64().unwrap(),
        event_count(&info, "state-digest"),
        "{name}: {report}\n{info}"
    );
    assert!(
        info.contains(&format!(
            "state        {}",
            report["final_digest"].as_str().unwrap()
        )),
        "{name}: final digest {} not the footer's:\n{info}",
        report["final_digest"]
    );
    report
}

#[test]
fn a_format_1_bt_trace_replays_verified_and_seeks_from_its_checkpoint() {
    let report = check("format1-timer-bt.trace", 1);
    assert!(report["digests_checked"].as_u64().unwrap() >= 1);
    let icount = report["icount"].as_u64().unwrap();

    // --until past the checkpoint restores the old checkpoint's CPU, device and memory
    // state and replays the rest from there.
    let path = data("format1-timer-bt.trace");
    let u = deja(&[
        "replay",
        path.to_str().unwrap(),
        "--until",
        &(icount - 10).to_string(),
        "--json",
    ]);
    assert_eq!(code(&u), 0, "{}", text(&u.stderr));
    let v: serde_json::Value = serde_json::from_slice(&u.stdout).unwrap();
    assert_eq!(
        v["verdict"]["ReachedUntil"]["at"]["icount"],
        icount - 10,
        "{v}"
    );
    assert!(v["started_from"]["icount"].as_u64().is_some(), "{v}");
}

#[test]
fn a_format_1_kvm_trace_replays_verified_on_bt() {
    let report = check("format1-hello-kvm.trace", 1);
    assert_eq!(report["recorded_engine"], "kvm");
}

#[test]
fn a_format_2_trace_with_registers_events_replays_verified() {
    let report = check("format2-timer-bt.trace", 2);
    // Digests without a checkpoint logged the registers (format 2's new event); the replay
    // compared them too.
    let info = text(
        &deja(&[
            "trace",
            "info",
            data("format2-timer-bt.trace").to_str().unwrap(),
        ])
        .stdout,
    );
    assert!(event_count(&info, "registers") >= 1, "{info}");
    assert!(report["digests_checked"].as_u64().unwrap() >= 2, "{report}");
}

#[test]
fn a_format_8_trace_replays_with_the_firmware_tables_it_was_recorded_with() {
    let name = "format8-platform-bt.trace";
    let report = check(name, 8);
    assert!(
        report["digests_checked"].as_u64().unwrap() >= 10,
        "{report}"
    );
    // The console the guest wrote from the tables it read, checked against the recording.
    let p = data(name);
    let replay = deja(&["replay", p.to_str().unwrap(), "--serial-out", "-"]);
    assert_eq!(code(&replay), 0, "{}", text(&replay.stderr));
    assert!(
        text(&replay.stdout).contains("platform: ACPI RSDP and RSDT checksums; tables FACP APIC"),
        "{}",
        text(&replay.stdout)
    );
    // A seek restores a checkpoint (its pages hold the tables) and replays on from there.
    let icount = report["icount"].as_u64().unwrap();
    let u = deja(&[
        "replay",
        p.to_str().unwrap(),
        "--until",
        &(icount - 100).to_string(),
        "--json",
    ]);
    assert_eq!(code(&u), 0, "{}", text(&u.stderr));
    let v: serde_json::Value = serde_json::from_slice(&u.stdout).unwrap();
    assert!(v["started_from"]["icount"].as_u64().is_some(), "{v}");
}
