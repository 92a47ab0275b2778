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

/// Where [`vmlinux`] loads its code and enters it: the physical address Linux links at.
pub const VMLINUX_ENTRY: u64 = 0x100_0000;
/// Bytes of zero-filled bss [`vmlinux`]'s segment has after its code.
pub const VMLINUX_BSS: u64 = 0x1000;

/// A minimal `vmlinux` for PVH loader tests: an x86-64 ELF64 executable with one PT_LOAD
/// segment holding `code32` at physical [`VMLINUX_ENTRY`] (virtual address in the kernel's
/// high mapping, as Linux links it) followed by [`VMLINUX_BSS`] bytes of bss, and a PT_NOTE
/// segment whose "Xen" note of type 18 (XEN_ELFNOTE_PHYS32_ENTRY, 8-byte descriptor as
/// Linux writes it) names [`VMLINUX_ENTRY`] as the 32-bit PVH entry.
pub fn vmlinux(code32: &[u8]) -> Vec<u8> {
    const PHOFF: usize = 64;
    const NOTE: usize = PHOFF + 2 * 56;
    const CODE: usize = 0x100;
    let mut b = vec![0u8; CODE];
    let put = |b: &mut Vec<u8>, at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
    put(&mut b, 0, b"\x7fELF\x02\x01\x01");
    put(&mut b, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut b, 18, &62u16.to_le_bytes()); // EM_X86_64
    put(&mut b, 20, &1u32.to_le_bytes());
    put(&mut b, 24, &VMLINUX_ENTRY.to_le_bytes());
    put(&mut b, 32, &(PHOFF as u64).to_le_bytes());
    put(&mut b, 52, &64u16.to_le_bytes()); // e_ehsize
    put(&mut b, 54, &56u16.to_le_bytes()); // e_phentsize
    put(&mut b, 56, &2u16.to_le_bytes()); // e_phnum
    let phdr = |b: &mut Vec<u8>, at: usize, f: [u64; 6], p_type: u32, flags: u32| {
        put(b, at, &p_type.to_le_bytes());
        put(b, at + 4, &flags.to_le_bytes());
        for (i, v) in f.iter().enumerate() {
            put(b, at + 8 + i * 8, &v.to_le_bytes());
        }
    };
    let len = code32.len() as u64;
    let vaddr = 0xffff_ffff_8000_0000 + VMLINUX_ENTRY;
    // p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
    let load = [
        CODE as u64,
        vaddr,
        VMLINUX_ENTRY,
        len,
        len + VMLINUX_BSS,
        0x20_0000,
    ];
    phdr(&mut b, PHOFF, load, 1, 7);
    phdr(&mut b, PHOFF + 56, [NOTE as u64, 0, 0, 24, 24, 4], 4, 4);
    put(&mut b, NOTE, &4u32.to_le_bytes()); // n_namesz
    put(&mut b, NOTE + 4, &8u32.to_le_bytes()); // n_descsz
    put(&mut b, NOTE + 8, &18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    put(&mut b, NOTE + 12, b"Xen\0");
    put(&mut b, NOTE + 16, &VMLINUX_ENTRY.to_le_bytes());
    b.extend_from_slice(code32);
    b
}

/// A [`bzimage`] whose setup header names `payload` (appended after its kernel code) as its
/// compressed vmlinux, as `payload_offset` and `payload_length` do in a real one.
pub fn bzimage_with_payload(payload: &[u8]) -> Vec<u8> {
    let mut b = bzimage(&[0xf4]);
    let offset = (b.len() - 1024) as u32; // from the protected-mode kernel at 0x400
    b[0x248..0x24c].copy_from_slice(&offset.to_le_bytes());
    b[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(payload);
    // Linux appends the uncompressed size after an xz or zstd stream.
    b.extend_from_slice(&[0x12, 0x34, 0, 0]);
    b
}

/// A `cpio` archive in the "newc" format, as the kernel unpacks an initramfs.
#[derive(Debug, Default)]
pub struct Cpio {
    bytes: Vec<u8>,
    next_inode: u32,
}

impl Cpio {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.next_inode += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            self.next_inode,
            mode,
            0,
            0,
            nlink,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.bytes.extend_from_slice(b"070701");
        for f in fields {
            self.bytes.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    /// A directory.
    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(name, 0o040755, &[], (0, 0));
        self
    }

    /// A regular file with permission bits `perm`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> &mut Self {
        self.entry(name, 0o100000 | perm, data, (0, 0));
        self
    }

    /// A character device node.
    pub fn char_device(&mut self, name: &str, major: u32, minor: u32) -> &mut Self {
        self.entry(name, 0o020600, &[], (major, minor));
        self
    }

    /// The archive, with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.bytes
    }
}

/// Runs `cmd` in `dir`; its standard output, or what failed with its standard error.
fn run_in(dir: &std::path::Path, cmd: &mut std::process::Command) -> Result<String, String> {
    let out = cmd
        .current_dir(dir)
        .output()
        .map_err(|e| format!("running {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Debian's stock kernel and busybox, fetched once with `apt-get download` into `cache`
/// (reused when present): the bzImage and the static busybox binary. Errors say what failed
/// (a Linux test then fails with that message; it never passes by skipping).
pub fn debian_linux(
    cache: &std::path::Path,
) -> Result<(std::path::PathBuf, std::path::PathBuf), String> {
    use std::process::Command;
    std::fs::create_dir_all(cache).map_err(|e| format!("creating {}: {e}", cache.display()))?;
    let find = |dir: &std::path::Path, prefix: &str| -> Option<std::path::PathBuf> {
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(prefix))
            })
    };
    let run = |cmd: &mut Command| run_in(cache, cmd);
    let boot = cache.join("root/boot");
    let busybox = cache.join("root/bin/busybox");
    if find(&boot, "vmlinuz-").is_none() || !busybox.exists() {
        // linux-image-amd64 is a metapackage: its dependency is the kernel of the day.
        let depends = run(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
        let kernel = depends
            .lines()
            .find_map(|l| l.trim().strip_prefix("Depends: "))
            .filter(|p| p.starts_with("linux-image-"))
            .ok_or_else(|| {
                format!("apt-cache depends linux-image-amd64 named no kernel: {depends}")
            })?
            .to_string();
        run(Command::new("apt-get").args(["download", &kernel, "busybox-static"]))?;
        for deb in ["linux-image-", "busybox-static"] {
            let path =
                find(cache, deb).ok_or_else(|| format!("apt-get download left no {deb}*.deb"))?;
            run(Command::new("dpkg-deb").arg("-x").arg(&path).arg("root"))?;
        }
    }
    let kernel =
        find(&boot, "vmlinuz-").ok_or_else(|| format!("no vmlinuz in {}", boot.display()))?;
    Ok((kernel, busybox))
}

/// The kernel headers that build modules for `kernel` (a `vmlinuz-RELEASE` from
/// [`debian_linux`]): Debian's `linux-headers-RELEASE` package and the packages it needs
/// (its `-common` tree and `linux-kbuild`), fetched once with `apt-get download` into
/// `cache` and unpacked there. Returns the directory to give `make -C`. Debian's headers
/// Makefile includes the common tree by its installed path; the unpacked copy is pointed at
/// its neighbour in `cache` instead.
pub fn debian_linux_headers(
    cache: &std::path::Path,
    kernel: &std::path::Path,
) -> Result<std::path::PathBuf, String> {
    use std::process::Command;
    let release = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .ok_or_else(|| format!("{} is not a vmlinuz-RELEASE file", kernel.display()))?;
    let root = cache.join("root");
    let src = root.join("usr/src");
    let headers = src.join(format!("linux-headers-{release}"));
    let run = |cmd: &mut Command| run_in(cache, cmd);
    if !headers.join("Makefile").exists() {
        let package = format!("linux-headers-{release}");
        let depends = run(Command::new("apt-cache").args(["depends", &package]))?;
        let mut packages = vec![package.clone()];
        packages.extend(
            depends
                .lines()
                .filter_map(|l| l.trim().strip_prefix("Depends: "))
                .filter(|p| p.starts_with("linux-headers-") || p.starts_with("linux-kbuild-"))
                .map(str::to_string),
        );
        run(Command::new("apt-get").arg("download").args(&packages))?;
        for p in &packages {
            let deb = std::fs::read_dir(cache)
                .map_err(|e| format!("reading {}: {e}", cache.display()))?
                .flatten()
                .map(|e| e.path())
                .find(|d| {
                    d.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&format!("{p}_")) && n.ends_with(".deb"))
                })
                .ok_or_else(|| format!("apt-get download left no {p}_*.deb"))?;
            run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg("root"))?;
        }
    }
    let makefile = headers.join("Makefile");
    let text = std::fs::read_to_string(&makefile)
        .map_err(|e| format!("reading {}: {e}", makefile.display()))?;
    if text.contains("include /usr/src/") {
        let fixed = text.replace("include /usr/src/", &format!("include {}/", src.display()));
        std::fs::write(&makefile, fixed)
            .map_err(|e| format!("writing {}: {e}", makefile.display()))?;
    }
    Ok(headers)
}
