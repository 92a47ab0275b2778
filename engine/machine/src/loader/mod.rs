//! Loaders: how an image gets into guest memory and what CPU state it starts with.
//!
//! The formats, as QEMU offers them: a raw image at an address with an entry mode, a
//! multiboot v1 kernel (`-kernel`), a firmware ROM started from the reset vector
//! (`-bios`), and a Linux kernel through the boot protocol (a bzImage) or its PVH entry (a
//! vmlinux, or the vmlinux in a bzImage's payload). An image file may carry a JSON sidecar (`IMAGE.json`) describing its
//! [`ImageFormat`], which is how `deja guests build` writes the built-in guests.
//!
//! Order of use: build the [`Machine`], call [`load`] (which may add a ROM region to guest
//! memory, so it must come before any engine exists), create the engine from the machine,
//! then give it the returned [`CpuState`] with `Cpu::set_state`.
//!
//! The fixed guest addresses the loaders write to (GDT, page tables, stack, multiboot
//! information) are the constants of [`boot`] and [`multiboot`]; every loader refuses an
//! image that would overlap what it needs there, rather than silently overwriting either.

pub mod boot;
pub mod elf;
pub mod firmware;
pub mod linux;
pub mod multiboot;
pub mod payload;
pub mod pvh;
pub mod raw;

use crate::cpu::CpuState;
use crate::machine::{Machine, MachineError};
use crate::memory::MemoryLayout;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

/// The CPU mode a raw image is entered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryMode {
    /// Real mode, CS:IP derived from the entry address.
    Real,
    /// 32-bit protected mode with flat segments, paging off.
    Protected,
    /// 64-bit long mode with identity-mapped page tables and a GDT built by deja.
    Long,
}

impl EntryMode {
    /// The mode's name as the CLI and sidecars spell it.
    pub fn name(self) -> &'static str {
        match self {
            EntryMode::Real => "real",
            EntryMode::Protected => "protected",
            EntryMode::Long => "long",
        }
    }
}

impl std::str::FromStr for EntryMode {
    type Err = LoadError;

    /// Parses `real`, `protected` or `long` (what `--mode` takes).
    fn from_str(s: &str) -> Result<Self, LoadError> {
        match s {
            "real" => Ok(EntryMode::Real),
            "protected" => Ok(EntryMode::Protected),
            "long" => Ok(EntryMode::Long),
            other => Err(LoadError::BadEntryMode {
                text: other.to_string(),
            }),
        }
    }
}

/// How an image is loaded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "lowercase", deny_unknown_fields)]
pub enum ImageFormat {
    /// Bytes copied to `load_addr`, entered at `entry` in `mode`.
    Raw {
        /// Guest-physical address of the first byte.
        load_addr: u64,
        /// Guest-physical entry point.
        entry: u64,
        /// CPU mode at entry.
        mode: EntryMode,
    },
    /// A multiboot v1 kernel (ELF, or a.out kludge), loaded as QEMU's `-kernel` does.
    Multiboot,
    /// A firmware ROM mapped below 4 GiB (and aliased below 1 MiB), entered at the reset
    /// vector.
    Firmware,
    /// A Linux bzImage, entered through the x86 boot protocol's 64-bit entry with the
    /// machine's command line and the image's initrd.
    Linux,
    /// A Linux kernel entered at its PVH entry (32-bit, paging off, `hvm_start_info`) with
    /// the machine's command line and the image's initrd: an ELF64 vmlinux, or a bzImage
    /// whose payload holds one (`--kernel-entry pvh`; its decompressor never runs).
    Pvh,
}

/// Which entry of a Linux kernel boots it (`--kernel-entry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelEntry {
    /// The x86 boot protocol's 64-bit entry (a bzImage only).
    BootProtocol,
    /// The PVH entry (a vmlinux, or a bzImage through its payload).
    Pvh,
}

impl KernelEntry {
    /// The entry's name as `--kernel-entry` spells it.
    pub fn name(self) -> &'static str {
        match self {
            KernelEntry::BootProtocol => "boot-protocol",
            KernelEntry::Pvh => "pvh",
        }
    }
}

impl std::str::FromStr for KernelEntry {
    type Err = LoadError;

    /// Parses `boot-protocol` or `pvh`.
    fn from_str(s: &str) -> Result<Self, LoadError> {
        match s {
            "boot-protocol" => Ok(KernelEntry::BootProtocol),
            "pvh" => Ok(KernelEntry::Pvh),
            other => Err(LoadError::BadKernelEntry {
                text: other.to_string(),
            }),
        }
    }
}

impl ImageFormat {
    /// Parses a sidecar's JSON. Fields the format does not have are refused (a misspelt
    /// `entry` must not silently become the default), including on formats without fields,
    /// which serde's `deny_unknown_fields` lets through for an internally tagged enum.
    pub fn from_sidecar(text: &[u8]) -> Result<Self, serde_json::Error> {
        // Parsed directly first, which refuses a field given twice (a `Value` keeps the last).
        let format: ImageFormat = serde_json::from_slice(text)?;
        let value: serde_json::Value = serde_json::from_slice(text)?;
        let known = serde_json::to_value(&format)?;
        if let (Some(given), Some(known)) = (value.as_object(), known.as_object())
            && let Some(field) = given.keys().find(|k| !known.contains_key(*k))
        {
            return Err(serde::de::Error::custom(format!(
                "unknown field `{field}` for format {:?}",
                known.get("format").and_then(|f| f.as_str()).unwrap_or("?")
            )));
        }
        Ok(format)
    }
}

/// An image ready to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Name for messages (file name or `guest:NAME`).
    pub name: String,
    /// The image's bytes.
    pub bytes: Vec<u8>,
    /// How to load it.
    pub format: ImageFormat,
    /// The initial RAM disk a Linux kernel gets (`--initrd`), part of the run's identity
    /// as the kernel is.
    pub initrd: Option<Box<Image>>,
}

/// An image as a user names it (`deja run IMAGE [--bios | --raw ADDR ...]`): a built-in
/// guest, or a file with what is known of its format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRequest {
    /// `guest:NAME`, one of the built-in guests.
    Builtin(String),
    /// A file; `format` when the command line said what it is (`--bios`, `--raw`), else
    /// its sidecar or its multiboot header says.
    File {
        /// The file.
        path: PathBuf,
        /// The format given on the command line.
        format: Option<ImageFormat>,
    },
}

impl ImageRequest {
    /// `guest:NAME` names a built-in guest; anything else is a file path.
    pub fn new(name: &str, format: Option<ImageFormat>) -> Self {
        match name.strip_prefix("guest:") {
            Some(guest) => ImageRequest::Builtin(guest.to_string()),
            None => ImageRequest::File {
                path: PathBuf::from(name),
                format,
            },
        }
    }

    /// The image: a built-in guest from `builtin` (which says why when it has none of that
    /// name), or the file read with [`read_file_bounded`].
    pub fn resolve(
        &self,
        builtin: &dyn Fn(&str) -> Result<Image, String>,
    ) -> Result<Image, LoadError> {
        match self {
            ImageRequest::Builtin(name) => builtin(name).map_err(|reason| LoadError::Builtin {
                name: name.clone(),
                reason,
            }),
            ImageRequest::File { path, format: None } => Image::from_file(path),
            ImageRequest::File {
                path,
                format: Some(format),
            } => Ok(Image {
                initrd: None,
                name: path.display().to_string(),
                bytes: read_file_bounded(path, MAX_IMAGE_FILE)?,
                format: format.clone(),
            }),
        }
    }
}

/// Largest image file [`Image::from_file`] reads: nothing larger fits below 4 GiB.
pub const MAX_IMAGE_FILE: u64 = crate::memory::FOUR_GIB;
/// Largest sidecar [`Image::from_file`] reads (a sidecar is a few dozen bytes).
pub const MAX_SIDECAR_FILE: u64 = 64 << 10;

/// Everything that can go wrong while reading or loading an image. Messages say what is
/// wrong, where (offsets, addresses, field names) and, where it helps, what to do instead.
#[derive(Debug, Error)]
pub enum LoadError {
    /// A built-in guest could not be had.
    #[error("guest:{name}: {reason}")]
    Builtin {
        /// The name after `guest:`.
        name: String,
        /// Why not.
        reason: String,
    },
    /// The image has no bytes.
    #[error("image {name} is empty")]
    Empty {
        /// The image's name.
        name: String,
    },
    /// Something the loader must write does not lie entirely in RAM.
    #[error(
        "{what} at {start:#x}..{end:#x} is not entirely in RAM (RAM is {ram}; \
         {hint})"
    )]
    NotInRam {
        /// What was to be placed (e.g. "image hello.bin").
        what: String,
        /// First address.
        start: u64,
        /// One past the last address.
        end: u64,
        /// The RAM ranges of this machine, for the message.
        ram: String,
        /// Why (VGA hole, above RAM, ...).
        hint: String,
    },
    /// The image would overwrite a structure the loader builds at a fixed address.
    #[error(
        "{what} at {start:#x}..{end:#x} overlaps {other} at {other_start:#x}..{other_end:#x}, \
         which the {format} loader writes there; load it elsewhere"
    )]
    Overlap {
        /// What was to be placed.
        what: String,
        /// First address.
        start: u64,
        /// One past the last address.
        end: u64,
        /// The loader's structure (e.g. "the GDT").
        other: &'static str,
        /// Its first address.
        other_start: u64,
        /// One past its last address.
        other_end: u64,
        /// Which loader (raw protected, raw long, multiboot).
        format: &'static str,
    },
    /// The entry point is not in RAM.
    #[error("entry point {entry:#x} of {name} is not in RAM (RAM is {ram})")]
    EntryNotInRam {
        /// The image's name.
        name: String,
        /// The entry point.
        entry: u64,
        /// The RAM ranges of this machine.
        ram: String,
    },
    /// A real-mode entry point above what CS:IP can reach (0x10ffef with A20 on).
    #[error(
        "real-mode entry point {entry:#x} is beyond what CS:IP can reach (at most 0x10ffef); \
         use --mode protected or long, or a lower address"
    )]
    RealModeEntryUnreachable {
        /// The entry point.
        entry: u64,
    },
    /// No 4 KiB of free RAM for the initial stack.
    #[error("no free 4 KiB of RAM for the initial stack of {name} (tried {tried})")]
    NoRoomForStack {
        /// The image's name.
        name: String,
        /// The candidate stack ranges tried.
        tried: String,
    },
    /// A `--mode` value that is not an entry mode.
    #[error("unknown entry mode {text:?}: expected real, protected or long")]
    BadEntryMode {
        /// What was given.
        text: String,
    },
    /// No multiboot header in the first 8 KiB.
    #[error(
        "{name}: no multiboot header (magic 0x1badb002 at a 4-byte aligned offset below \
         {searched:#x}); {advice}"
    )]
    NotMultiboot {
        /// The image's name.
        name: String,
        /// How many bytes were searched.
        searched: usize,
        /// Why a header was expected, and what to do instead.
        advice: String,
    },
    /// A multiboot magic was found but no header around it has a valid checksum.
    #[error(
        "{name}: multiboot header at offset {offset:#x} has a bad checksum: flags {flags:#x}, \
         checksum {checksum:#x}, magic + flags + checksum = {sum:#x} (must be 0)"
    )]
    MultibootChecksum {
        /// The image's name.
        name: String,
        /// Offset of the first magic found.
        offset: usize,
        /// Its flags field.
        flags: u32,
        /// Its checksum field.
        checksum: u32,
        /// The 32-bit sum that should have been zero.
        sum: u32,
    },
    /// A bzImage that the boot protocol cannot load.
    #[error("{name}: {problem}")]
    BzImage {
        /// The image's name.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// A kernel that cannot be booted through its PVH entry.
    #[error("{name}: {problem}")]
    Pvh {
        /// The image's name.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// A `--kernel-entry` value that is not an entry.
    #[error("unknown kernel entry {text:?}: expected boot-protocol or pvh")]
    BadKernelEntry {
        /// What was given.
        text: String,
    },
    /// A `--kernel-entry` that the image cannot be booted through.
    #[error("{name}: {problem}")]
    KernelEntry {
        /// The image's name.
        name: String,
        /// Why not, and what to do instead.
        problem: String,
    },
    /// A multiboot header field is inconsistent (a.out kludge addresses, truncation).
    #[error("{name}: multiboot header at offset {offset:#x}: {problem}")]
    MultibootHeader {
        /// The image's name.
        name: String,
        /// Offset of the header in the file.
        offset: usize,
        /// What is wrong, naming the field and its value.
        problem: String,
    },
    /// QEMU refuses 64-bit multiboot ELF kernels with exactly this message.
    #[error("{name}: Cannot load x86-64 image, give a 32bit one.")]
    X86_64Multiboot {
        /// The image's name.
        name: String,
    },
    /// The ELF file is malformed.
    #[error("{name}: {source}")]
    Elf {
        /// The image's name.
        name: String,
        /// What is wrong.
        source: elf::ElfError,
    },
    /// The command line cannot be passed to the guest.
    #[error("the kernel command line contains a NUL byte at offset {offset}")]
    CmdlineNul {
        /// Where the NUL is.
        offset: usize,
    },
    /// A firmware ROM of a size deja (like QEMU) does not accept.
    #[error(
        "firmware {name} is {size:#x} bytes; a ROM must be a non-zero multiple of 64 KiB and at \
         most {max:#x} bytes (as QEMU's -bios requires)"
    )]
    RomSize {
        /// The image's name.
        name: String,
        /// Its size.
        size: u64,
        /// The largest accepted size.
        max: u64,
    },
    /// The machine refused a ROM mapping.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// Writing guest memory failed (an address that was checked to be RAM was not).
    #[error("writing {len:#x} bytes of guest memory at {addr:#x} failed: {detail}")]
    GuestWrite {
        /// Guest-physical address.
        addr: u64,
        /// Length in bytes.
        len: u64,
        /// What vm-memory said.
        detail: String,
    },
    /// An image or sidecar file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A path that does not name a regular file (a device, a FIFO, a directory, or a
    /// symbolic link to one): reading it could block or never end.
    #[error(
        "{path}: not a regular file ({kind}); deja reads images and traces from regular files only"
    )]
    NotRegularFile {
        /// The path given.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// A file is larger than deja can load.
    #[error("{path}: {size:#x} bytes is larger than the {max:#x} bytes deja reads")]
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// A sidecar does not hold an [`ImageFormat`].
    #[error(
        "{path}: not a valid image description: {source} (expected e.g. \
         {{\"format\":\"raw\",\"load_addr\":4096,\"entry\":4096,\"mode\":\"real\"}}, \
         {{\"format\":\"multiboot\"}} or {{\"format\":\"firmware\"}})"
    )]
    Sidecar {
        /// The sidecar file.
        path: PathBuf,
        /// What serde_json said.
        source: serde_json::Error,
    },
}

impl Image {
    /// A raw image: `bytes` at `load_addr`, entered at `entry` in `mode`.
    pub fn raw(
        name: impl Into<String>,
        bytes: Vec<u8>,
        load_addr: u64,
        entry: u64,
        mode: EntryMode,
    ) -> Self {
        Self {
            initrd: None,
            name: name.into(),
            bytes,
            format: ImageFormat::Raw {
                load_addr,
                entry,
                mode,
            },
        }
    }

    /// A multiboot kernel.
    pub fn multiboot(name: impl Into<String>, bytes: Vec<u8>) -> Self {
        Self {
            initrd: None,
            name: name.into(),
            bytes,
            format: ImageFormat::Multiboot,
        }
    }

    /// A firmware ROM (what `--bios FILE` gives).
    pub fn firmware(name: impl Into<String>, bytes: Vec<u8>) -> Self {
        Self {
            initrd: None,
            name: name.into(),
            bytes,
            format: ImageFormat::Firmware,
        }
    }

    /// Names `bytes` as an image when nobody said what it is: a multiboot kernel if it has a
    /// valid multiboot header, else an error that says how to describe it.
    pub fn detect(name: impl Into<String>, bytes: Vec<u8>) -> Result<Self, LoadError> {
        let name = name.into();
        if bytes.is_empty() {
            return Err(LoadError::Empty { name });
        }
        if linux::is_bzimage(&bytes) {
            return Ok(Self {
                name,
                bytes,
                format: ImageFormat::Linux,
                initrd: None,
            });
        }
        // A 64-bit ELF is a vmlinux when it has a PVH entry; else it may still carry a
        // multiboot header (which the multiboot loader refuses as QEMU does).
        let elf64 = elf::is_elf64_x86_64(&bytes);
        if elf64 {
            // A malformed ELF64 with a multiboot header is the multiboot loader's to refuse
            // (with QEMU's message); without one, what is wrong with it is the answer.
            let parsed = match elf::parse_elf64(&bytes) {
                Ok(parsed) => parsed,
                Err(_) if multiboot::find_header(&name, &bytes).is_ok() => {
                    return Ok(Self::multiboot(name, bytes));
                }
                Err(source) => return Err(LoadError::Elf { name, source }),
            };
            if pvh::entry_note(&name, &parsed)?.is_some() {
                return Ok(Self {
                    name,
                    bytes,
                    format: ImageFormat::Pvh,
                    initrd: None,
                });
            }
        }
        multiboot::find_header(&name, &bytes).map_err(|e| match e {
            LoadError::NotMultiboot { name, searched, .. } => LoadError::NotMultiboot {
                advice: if elf64 {
                    "it is a 64-bit ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY, \
                     which Linux has with CONFIG_PVH=y); boot a Linux kernel as its bzImage or \
                     a vmlinux built with CONFIG_PVH"
                        .to_string()
                } else {
                    format!(
                        "there is no sidecar {name}.json either; say what the file is with \
                         --bios FILE, or --raw ADDR --entry ADDR --mode real|protected|long, \
                         or write a sidecar"
                    )
                },
                name,
                searched,
            },
            other => other,
        })?;
        Ok(Self::multiboot(name, bytes))
    }

    /// Whether this is a Linux kernel (booted through the boot protocol or PVH), which takes
    /// an initrd and a `--kernel-entry`.
    pub fn is_linux(&self) -> bool {
        matches!(self.format, ImageFormat::Linux | ImageFormat::Pvh)
    }

    /// Chooses the entry a Linux kernel boots through: a bzImage takes either (PVH through
    /// its payload, checked here so that a kernel without a PVH entry is refused before the
    /// run); a vmlinux has only its PVH entry.
    pub fn set_kernel_entry(&mut self, entry: KernelEntry, max: u64) -> Result<(), LoadError> {
        let refuse = |problem: String| LoadError::KernelEntry {
            name: self.name.clone(),
            problem,
        };
        match (&self.format, entry) {
            (ImageFormat::Linux, KernelEntry::BootProtocol)
            | (ImageFormat::Pvh, KernelEntry::Pvh) => {}
            (ImageFormat::Linux, KernelEntry::Pvh) => {
                pvh::parse(&self.name, &pvh::vmlinux(&self.name, &self.bytes, max)?)?;
                self.format = ImageFormat::Pvh;
            }
            (ImageFormat::Pvh, KernelEntry::BootProtocol) if linux::is_bzimage(&self.bytes) => {
                self.format = ImageFormat::Linux;
            }
            (ImageFormat::Pvh, KernelEntry::BootProtocol) => {
                return Err(refuse(
                    "a vmlinux has no boot-protocol entry (that is the bzImage's setup code); \
                     boot it with --kernel-entry pvh, or boot the bzImage"
                        .into(),
                ));
            }
            (other, _) => {
                return Err(refuse(format!(
                    "--kernel-entry {} goes with a Linux kernel (a bzImage or a vmlinux); this \
                     image is loaded as {other:?}",
                    entry.name()
                )));
            }
        }
        Ok(())
    }

    /// Reads an image file. If `PATH.json` exists it says what the file is (the serde form
    /// of [`ImageFormat`]); otherwise a file with a multiboot header is a multiboot kernel;
    /// anything else is an error explaining the options (`--bios`, `--raw`, a sidecar).
    pub fn from_file(path: &Path) -> Result<Self, LoadError> {
        let name = path.display().to_string();
        let bytes = read_file_bounded(path, MAX_IMAGE_FILE)?;
        let sidecar = sidecar_path(path);
        match std::fs::symlink_metadata(&sidecar) {
            Ok(_) => {
                let text = read_file_bounded(&sidecar, MAX_SIDECAR_FILE)?;
                let format =
                    ImageFormat::from_sidecar(&text).map_err(|source| LoadError::Sidecar {
                        path: sidecar.clone(),
                        source,
                    })?;
                if bytes.is_empty() {
                    return Err(LoadError::Empty { name });
                }
                Ok(Self {
                    initrd: None,
                    name,
                    bytes,
                    format,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::detect(name, bytes),
            Err(source) => Err(LoadError::Io {
                path: sidecar,
                source,
            }),
        }
    }

    /// Writes the bytes to `path` and the format to `PATH.json`, so that
    /// [`Image::from_file`] reads back the same image (what `deja guests build` does).
    /// Returns the sidecar's path.
    pub fn write_with_sidecar(&self, path: &Path) -> Result<PathBuf, LoadError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LoadError::Io { path, source }
        };
        std::fs::write(path, &self.bytes).map_err(io(path))?;
        let sidecar = sidecar_path(path);
        let mut json =
            serde_json::to_string_pretty(&self.format).map_err(|source| LoadError::Sidecar {
                path: sidecar.clone(),
                source,
            })?;
        json.push('\n');
        std::fs::write(&sidecar, json).map_err(io(&sidecar))?;
        Ok(sidecar)
    }
}

/// `PATH.json`: the sidecar that describes the image at `path`.
pub fn sidecar_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".json");
    PathBuf::from(s)
}

/// Reads a whole file of at most `max` bytes. Only regular files (or links to one) are
/// read, so that a device such as `/dev/zero` or a FIFO can neither grow memory without
/// bound nor block; the size is checked before reading, and the read itself is capped in
/// case the file grows meanwhile.
pub fn read_file_bounded(path: &Path, max: u64) -> Result<Vec<u8>, LoadError> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let check = |meta: std::fs::Metadata| {
        let t = meta.file_type();
        let kind = if t.is_file() {
            return Ok(meta.len());
        } else if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_char_device() {
            "a character device"
        } else if t.is_block_device() {
            "a block device"
        } else if t.is_socket() {
            "a socket"
        } else {
            "not a file"
        };
        Err(LoadError::NotRegularFile {
            path: path.to_path_buf(),
            kind,
        })
    };
    check(std::fs::metadata(path).map_err(io)?)?;
    // O_NONBLOCK: should the path be swapped for a FIFO after the check, opening it must
    // not wait for a writer (the type is checked again on the open file).
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io)?;
    let size = check(file.metadata().map_err(io)?)?;
    let too_large = |size| LoadError::FileTooLarge {
        path: path.to_path_buf(),
        size,
        max,
    };
    if size > max {
        return Err(too_large(size));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > max {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Writes `image` (and whatever its entry mode needs: GDT, page tables, multiboot
/// information, ROM mapping) into the machine's memory and returns the CPU state to start
/// from. Call it before creating the engine: a firmware image adds a ROM region.
pub fn load(machine: &mut Machine, image: &Image) -> Result<CpuState, LoadError> {
    if image.bytes.is_empty() {
        return Err(LoadError::Empty {
            name: image.name.clone(),
        });
    }
    match image.format {
        ImageFormat::Raw {
            load_addr,
            entry,
            mode,
        } => raw::load(machine, image, load_addr, entry, mode),
        ImageFormat::Multiboot => multiboot::load(machine, image),
        ImageFormat::Firmware => firmware::load(machine, image),
        ImageFormat::Linux => linux::load(machine, image, image.initrd.as_deref()),
        ImageFormat::Pvh => pvh::load(machine, image, image.initrd.as_deref()),
    }
}

/// Loads `image` again after a machine reset, as at boot, into a machine it was
/// [`load`]ed into: raw, multiboot and Linux images (kernel and initrd) are written again; a firmware ROM, still
/// mapped, gets its low alias rewritten and restarts at the reset vector.
pub fn reload(machine: &mut Machine, image: &Image) -> Result<CpuState, LoadError> {
    match image.format {
        ImageFormat::Firmware => firmware::reload(machine, image),
        _ => load(machine, image),
    }
}

/// The RAM ranges as `0x0..0xa0000, 0xc0000..0x10000000`, for messages.
pub(crate) fn describe_ram(layout: &MemoryLayout) -> String {
    layout
        .ranges
        .iter()
        .map(|r| format!("{:#x}..{:#x}", r.start, r.end()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks that `[start, end)` lies inside one RAM range.
pub(crate) fn ensure_ram(
    layout: &MemoryLayout,
    what: impl FnOnce() -> String,
    start: u64,
    end: u64,
) -> Result<(), LoadError> {
    if start < end
        && layout
            .ranges
            .iter()
            .any(|r| r.start <= start && end <= r.end())
    {
        return Ok(());
    }
    let top = layout.ranges.last().map_or(0, |r| r.end());
    let hint = if start < crate::memory::VGA_HOLE_END && crate::memory::VGA_HOLE_START < end {
        "the legacy VGA window 0xa0000..0xc0000 is not RAM".to_string()
    } else if end > top {
        format!("RAM ends at {top:#x}; give the machine more memory or load it lower")
    } else {
        "it falls in a hole between RAM ranges".to_string()
    };
    Err(LoadError::NotInRam {
        what: what(),
        start,
        end,
        ram: describe_ram(layout),
        hint,
    })
}

/// Writes `bytes` at `addr` (already checked to be RAM).
pub(crate) fn write(machine: &Machine, addr: u64, bytes: &[u8]) -> Result<(), LoadError> {
    machine
        .mem
        .write_slice(bytes, GuestAddress(addr))
        .map_err(|e| LoadError::GuestWrite {
            addr,
            len: bytes.len() as u64,
            detail: e.to_string(),
        })
}

/// Zero-fills `[addr, addr + len)` (already checked to be RAM) without allocating `len`.
pub(crate) fn zero(machine: &Machine, addr: u64, len: u64) -> Result<(), LoadError> {
    static ZEROS: [u8; 4096] = [0; 4096];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZEROS.len() as u64);
        write(machine, addr + done, &ZEROS[..n as usize])?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod testutil;

#[cfg(test)]
mod tests;
