//! Loaders: how an image gets into guest memory and what CPU state it starts with.
//!
//! Three formats, as QEMU offers them: a raw image at an address with an entry mode, a
//! multiboot v1 kernel (`-kernel`), and a firmware ROM started from the reset vector
//! (`-bios`). An image file may carry a JSON sidecar (`IMAGE.json`) describing its
//! [`ImageFormat`], which is how `deja guests build` writes the built-in guests.

use serde::{Deserialize, Serialize};

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

/// How an image is loaded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "lowercase")]
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
}
