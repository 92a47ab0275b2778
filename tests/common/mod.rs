//! Running the `deja` binary from integration tests.
#![allow(dead_code)] // each test file uses its own subset

pub mod gdb;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Runs `deja` with `args`, stdin closed, and captures its output.
pub fn deja(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deja"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running deja")
}

/// The exit status (a test failure if deja died of a signal).
pub fn code(o: &Output) -> i32 {
    o.status.code().expect("deja exited by signal")
}

/// Output bytes as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A fresh per-process scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("deja-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A path as `&str` for an argument list.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Whether /dev/kvm can be used; prints a visible SKIP line naming `test` when it cannot
/// (and fails under `DEJA_REQUIRE_KVM=1`).
pub fn kvm_available(test: &str) -> bool {
    deja_testkit::kvm_or_skip(test)
}
