//! KVM's own counters, read through the binary statistics interface (`KVM_GET_STATS_FD`).
//!
//! They show what the host did for the guest that deja cannot see: exits handled inside the
//! kernel, instructions the host emulated, and the shadow MMU's work (`pf_fixed`,
//! `pf_guest`, `mmu_*`), whose names bt's shadow MMU shares so that the two can be compared.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use thiserror::Error;

mod ioctls {
    #![allow(missing_docs)]
    // KVM_GET_STATS_FD: a file of binary statistics for a VM or vCPU fd.
    vmm_sys_util::ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);
}

/// Failures reading KVM's statistics.
#[derive(Debug, Error)]
pub enum StatsError {
    /// The host has no binary statistics (KVM before Linux 5.14) or refused.
    #[error("KVM_GET_STATS_FD failed: {0}")]
    Open(std::io::Error),
    /// Reading the statistics file failed.
    #[error("reading KVM statistics at offset {offset:#x}: {source}")]
    Read {
        /// Where in the file.
        offset: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file's layout does not make sense.
    #[error("malformed KVM statistics: {0}")]
    Malformed(String),
}

/// Size of `struct kvm_stats_desc` before its name.
const DESC_FIXED: usize = 16;
/// `KVM_STATS_TYPE_MASK`: the type bits of a descriptor's flags.
const TYPE_MASK: u32 = kvm_bindings::KVM_STATS_TYPE_MASK;
/// Cumulative, instant and peak values are single numbers; histograms are skipped.
const SINGLE_VALUE_TYPES: [u32; 3] = [
    kvm_bindings::KVM_STATS_TYPE_CUMULATIVE,
    kvm_bindings::KVM_STATS_TYPE_INSTANT,
    kvm_bindings::KVM_STATS_TYPE_PEAK,
];

/// One opened statistics file (of a VM or a vCPU) with its descriptors parsed once.
#[derive(Debug)]
pub struct StatsFile {
    file: File,
    data_offset: u64,
    /// (name, offset in the data block) of every single-valued statistic.
    fields: Vec<(String, u64)>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl StatsFile {
    /// Opens the statistics of the VM or vCPU behind `fd`.
    pub fn open(fd: &impl AsRawFd) -> Result<Self, StatsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new descriptor or -1.
        let raw = unsafe { vmm_sys_util::ioctl::ioctl(fd, ioctls::KVM_GET_STATS_FD()) };
        if raw < 0 {
            return Err(StatsError::Open(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(raw) };
        let read = |offset: u64, len: usize| -> Result<Vec<u8>, StatsError> {
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, offset)
                .map_err(|source| StatsError::Read { offset, source })?;
            Ok(buf)
        };
        let header = read(0, 24)?;
        let name_size = u32_at(&header, 4) as usize;
        let num_desc = u32_at(&header, 8) as usize;
        let desc_offset = u64::from(u32_at(&header, 16));
        let data_offset = u64::from(u32_at(&header, 20));
        if name_size == 0 || name_size > 4096 || num_desc > 100_000 {
            return Err(StatsError::Malformed(format!(
                "name size {name_size}, {num_desc} descriptors"
            )));
        }
        let desc_size = DESC_FIXED + name_size;
        let descs = read(desc_offset, desc_size * num_desc)?;
        let mut fields = Vec::new();
        for d in descs.chunks_exact(desc_size) {
            let flags = u32_at(d, 0);
            let size = u16::from_le_bytes([d[6], d[7]]);
            let offset = u64::from(u32_at(d, 8));
            let name_bytes = &d[DESC_FIXED..];
            let end = name_bytes.iter().position(|&b| b == 0).unwrap_or(name_size);
            let name = String::from_utf8_lossy(&name_bytes[..end]).into_owned();
            if size == 1 && SINGLE_VALUE_TYPES.contains(&(flags & TYPE_MASK)) {
                fields.push((name, offset));
            }
        }
        fields.sort();
        Ok(Self {
            file,
            data_offset,
            fields,
        })
    }

    /// Every single-valued statistic now, by name.
    pub fn read(&self) -> Result<BTreeMap<String, u64>, StatsError> {
        let mut out = BTreeMap::new();
        for (name, offset) in &self.fields {
            let at = self.data_offset + offset;
            let mut buf = [0u8; 8];
            self.file
                .read_exact_at(&mut buf, at)
                .map_err(|source| StatsError::Read { offset: at, source })?;
            out.insert(name.clone(), u64::from_le_bytes(buf));
        }
        Ok(out)
    }
}
