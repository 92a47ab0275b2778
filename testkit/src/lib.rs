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

/// A minimal bzImage for loader tests: a setup header of boot protocol 2.15 (one setup
/// sector, 64-bit entry, relocatable, preferred address 16 MiB, `init_size` 1 MiB) whose
/// protected-mode kernel is `code64` at offset 0x200, where the 64-bit entry is.
pub fn bzimage(code64: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 1024 + 0x200];
    let put16 =
        |b: &mut Vec<u8>, at: usize, v: u16| b[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 =
        |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    b[0x1f1] = 1; // setup_sects: the kernel starts at (1 + 1) * 512
    put16(&mut b, 0x1fe, 0xaa55);
    b[0x201] = 0x6a; // the header runs to 0x202 + 0x6a = 0x26c
    b[0x202..0x206].copy_from_slice(b"HdrS");
    put16(&mut b, 0x206, 0x020f);
    b[0x211] = 1; // LOADED_HIGH
    put32(&mut b, 0x214, 0x10_0000);
    put32(&mut b, 0x22c, 0x7fff_ffff); // initrd_addr_max
    put32(&mut b, 0x230, 0x20_0000); // kernel_alignment
    b[0x234] = 1; // relocatable
    put16(&mut b, 0x236, 1); // XLF_KERNEL_64
    put32(&mut b, 0x238, 0x7ff); // cmdline_size
    b[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes()); // pref_address
    put32(&mut b, 0x260, 0x10_0000); // init_size
    b.extend_from_slice(code64);
    b
}
