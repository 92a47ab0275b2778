//! The firmware tables deja-pc leaves in guest memory before the first instruction (and
//! writes again at each machine reset), and their revisions.
//!
//! The tables are guest memory, which every state digest of a trace covers, and a guest
//! may read any byte of them: changing what they hold would make every older trace diverge
//! on replay. So their content is versioned as a whole by [`FirmwareRevision`]: a recording
//! gets [`FirmwareRevision::LATEST`] and names it in its trace header (format 9's
//! `firmware_revision`); a replay builds the machine with the revision the trace names, and
//! a trace without one (format 8 and older) with [`FirmwareRevision::Rev1`], the tables
//! every such trace was recorded with. A change to any table's bytes is a new revision,
//! the older ones' code paths kept behind it.

pub mod aml;
pub mod smbios;

use crate::devices::acpi::{self, AcpiError, AcpiLayout};
use crate::machine::MachineConfig;
use crate::memory::{GuestRam, MemoryLayout};
use smbios::{SmbiosError, SmbiosLayout};
use thiserror::Error;

/// A revision of everything the firmware tables put in guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FirmwareRevision {
    /// ACPI only: RSDP, RSDT, XSDT, FADT, FACS, MADT, and a DSDT holding `_S5` alone. What
    /// every trace before format 9 was recorded with.
    Rev1 = 1,
    /// Revision 1 with a DSDT that also describes the PCI host bridge (`\_SB.PCI0`, its
    /// bus, I/O and memory windows), the legacy devices behind its ISA bridge as PNP
    /// devices (keyboard controller, COM1, RTC, PIT) and `_S3`; and SMBIOS 2.8 tables in the
    /// F-segment.
    #[default]
    Rev2 = 2,
}

impl FirmwareRevision {
    /// What new machines get.
    pub const LATEST: Self = Self::Rev2;
    /// Every revision, oldest first.
    pub const ALL: [Self; 2] = [Self::Rev1, Self::Rev2];

    /// The revision's number, as a trace header stores it.
    pub fn number(self) -> u32 {
        self as u32
    }

    /// The revision numbered `n` (a trace header's), if this build knows it.
    pub fn from_number(n: u32) -> Result<Self, TablesError> {
        Self::ALL
            .into_iter()
            .find(|r| r.number() == n)
            .ok_or(TablesError::UnknownRevision {
                found: n,
                latest: Self::LATEST.number(),
            })
    }
}

impl std::fmt::Display for FirmwareRevision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.number())
    }
}

/// Failures writing the tables.
#[derive(Debug, Error)]
pub enum TablesError {
    /// The ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// The SMBIOS tables could not be written.
    #[error(transparent)]
    Smbios(#[from] SmbiosError),
    /// A trace names a revision this build does not know (a newer deja recorded it).
    #[error(
        "firmware table revision {found} is unknown to this build of deja (it knows 1 to \
         {latest}); replay the trace with the deja that recorded it or a newer one"
    )]
    UnknownRevision {
        /// The revision asked for.
        found: u32,
        /// The newest this build knows.
        latest: u32,
    },
}

/// Where the tables went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirmwareLayout {
    /// The ACPI tables.
    pub acpi: AcpiLayout,
    /// The SMBIOS tables (revision 2 on).
    pub smbios: Option<SmbiosLayout>,
}

/// Writes the tables of `config.firmware` for a machine with `layout`.
pub fn install_firmware_tables(
    mem: &GuestRam,
    layout: &MemoryLayout,
    config: &MachineConfig,
) -> Result<FirmwareLayout, TablesError> {
    let revision = config.firmware;
    let acpi = acpi::install_acpi_tables(mem, layout, revision)?;
    let smbios = match revision {
        FirmwareRevision::Rev1 => None,
        FirmwareRevision::Rev2 => Some(smbios::install_smbios(
            mem,
            layout,
            revision.number(),
            &config.cpuid,
        )?),
    };
    Ok(FirmwareLayout { acpi, smbios })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn revisions_round_trip_through_their_numbers() {
        for r in FirmwareRevision::ALL {
            assert_eq!(FirmwareRevision::from_number(r.number()).unwrap(), r);
        }
        assert_eq!(FirmwareRevision::LATEST, FirmwareRevision::default());
        assert_eq!(
            FirmwareRevision::ALL.last(),
            Some(&FirmwareRevision::LATEST)
        );
        for n in [0, 3, u32::MAX] {
            let e = FirmwareRevision::from_number(n).unwrap_err().to_string();
            assert!(e.contains(&format!("revision {n} is unknown")), "{e}");
            assert!(e.contains("1 to 2"), "{e}");
        }
    }

    fn fseg(rev: FirmwareRevision) -> Vec<u8> {
        let config = MachineConfig {
            ram_size: 16 << 20,
            firmware: rev,
            ..MachineConfig::default()
        };
        let layout = MemoryLayout::pc(config.ram_size).unwrap();
        let mem = layout.allocate().unwrap();
        let l = install_firmware_tables(&mem, &layout, &config).unwrap();
        assert_eq!(l.smbios.is_some(), rev >= FirmwareRevision::Rev2);
        let mut b = vec![0u8; 0x1_0000];
        mem.read_slice(&mut b, GuestAddress(smbios::ENTRY_ADDR))
            .unwrap();
        b
    }

    #[test]
    fn smbios_is_written_from_revision_2_only() {
        assert!(fseg(FirmwareRevision::Rev1).iter().all(|&b| b == 0));
        let f = fseg(FirmwareRevision::Rev2);
        let at = (0..f.len())
            .step_by(16)
            .find(|&a| &f[a..a + 4] == b"_SM_")
            .expect("an SMBIOS entry point in the F-segment");
        assert_eq!(&f[at + 16..at + 21], b"_DMI_");
    }
}
