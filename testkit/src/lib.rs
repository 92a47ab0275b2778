//! Test scaffolding shared by deja's crates (a dev-dependency only; it depends on nothing,
//! so every crate's tests can use it).
//!
//! The kvm engine is the oracle for bt's ring-3 semantics: tests that need `/dev/kvm` skip
//! visibly where the host has none, and with `DEJA_REQUIRE_KVM=1` (which `.ci/run` sets
//! whenever `/dev/kvm` exists) they fail instead, so the oracle cannot vanish from CI
//! unnoticed.

use std::fmt::Display;

/// The variable that turns a missing `/dev/kvm` from a skip into a failure.
pub const REQUIRE_KVM: &str = "DEJA_REQUIRE_KVM";

/// Whether a missing `/dev/kvm` must fail tests (`DEJA_REQUIRE_KVM=1`).
pub fn kvm_required() -> bool {
    std::env::var_os(REQUIRE_KVM).is_some_and(|v| v == "1")
}

/// A test cannot use `/dev/kvm` (`reason` says why): prints a visible `SKIP:` line naming
/// `test`, or panics when [`kvm_required`].
pub fn skip_without_kvm(test: &str, reason: impl Display) {
    assert!(
        !kvm_required(),
        "{test}: {REQUIRE_KVM}=1 but /dev/kvm cannot be used: {reason}"
    );
    println!("SKIP: {test}: /dev/kvm not available: {reason}");
}

/// Whether `/dev/kvm` can be opened for reading and writing; when not, skips `test` as
/// [`skip_without_kvm`] does (or fails it under `DEJA_REQUIRE_KVM=1`).
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            skip_without_kvm(test, e);
            false
        }
    }
}
