//! ACPI for the deja-pc machine: the tables firmware would leave in memory (RSDP, RSDT,
//! XSDT, FADT, FACS, DSDT, MADT), laid out as QEMU's `pc` describes itself, and the PIIX4
//! power-management registers they point at: the PM1a event and control blocks and the
//! 3.579545 MHz PM timer at QEMU's ports (base 0x600), SCI on IRQ 9.
//!
//! Tables go in the BIOS area below the ROM (0xe0000..0xf0000), where the operating system
//! searches for the RSDP; everything in them (checksums, lengths, addresses) is computed
//! from the layout, so a parser can walk them from the RSDP alone. What the DSDT holds
//! depends on the machine's [`FirmwareRevision`] (`_S5` alone in revision 1; the PCI host
//! bridge, the legacy PNP devices and `_S3` too from revision 2), encoded with
//! [`crate::tables::aml`].

use super::{Device, DeviceError, DeviceState, IoCtx, StopRequest};
use crate::memory::GuestRam;
use crate::memory::MemoryLayout;
use crate::tables::FirmwareRevision;
use crate::tables::aml::{self, AmlError};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

/// First byte of the area the tables are written to (16-byte aligned, searched for the
/// RSDP by operating systems).
pub const ACPI_REGION_START: u64 = 0xe_0000;
/// End of the area the tables may use (the firmware ROM alias starts here).
pub const ACPI_REGION_END: u64 = 0xf_0000;
/// PIIX4 PM I/O base, as QEMU's `pc` programs it.
pub const PM_BASE: u16 = 0x600;
/// PM1a event block (status at +0, enable at +2).
pub const PM1A_EVT_BLK: u16 = PM_BASE;
/// PM1a control block.
pub const PM1A_CNT_BLK: u16 = PM_BASE + 4;
/// PM timer block.
pub const PM_TMR_BLK: u16 = PM_BASE + 8;
/// Ports the PM device answers `(start, len)`.
pub const PM_RANGE: (u16, u16) = (PM_BASE, 12);
/// The SCI's ISA IRQ (level, active high, as QEMU's MADT override says).
pub const SCI_IRQ: u8 = 9;
/// PM timer frequency in Hz.
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// The local APIC's physical address.
pub const LAPIC_ADDRESS: u32 = 0xfee0_0000;
/// The I/O APIC's physical address.
pub const IOAPIC_ADDRESS: u32 = 0xfec0_0000;
/// The sleep type the DSDT's `_S5` names (QEMU's PIIX4: 0 is soft-off).
pub const SLP_TYP_S5: u16 = 0;
/// The sleep type of suspend-to-RAM (S3): what QEMU's PIIX4 DSDT names in `_S3`.
pub const SLP_TYP_S3: u16 = 1;
/// Where the FACS goes (the first 64-byte boundary after the RSDP), which holds the
/// waking vector an S3 resume enters.
pub const FACS_ADDR: u64 = (ACPI_REGION_START + 36).next_multiple_of(64);
/// Offset of Firmware_Waking_Vector in the FACS.
pub const FACS_WAKING_VECTOR: u64 = 12;

/// PM1 status/enable bit: PM timer MSB toggled.
pub const PM1_TMR: u16 = 1 << 0;
/// PM1 control bit: SCI (ACPI mode) enabled.
pub const PM1_SCI_EN: u16 = 1 << 0;
/// PM1 control bit: enter the sleep state in SLP_TYP.
pub const PM1_SLP_EN: u16 = 1 << 13;
/// FADT flag: the PM timer is 32 bits wide (24 otherwise).
pub const FADT_TMR_VAL_EXT: u32 = 1 << 8;

/// Failures writing the tables.
#[derive(Debug, Error)]
pub enum AcpiError {
    /// The table area is not RAM in this layout.
    #[error("ACPI table area {start:#x}..{end:#x} is not RAM in this memory layout")]
    NotRam {
        /// Start of the area.
        start: u64,
        /// End of the area.
        end: u64,
    },
    /// A firmware ROM covers part of the area (firmware builds its own tables then).
    #[error(
        "ACPI table area {start:#x}..{end:#x} overlaps firmware ROM at {rom_start:#x}..{rom_end:#x}"
    )]
    InRom {
        /// Start of the area.
        start: u64,
        /// End of the area.
        end: u64,
        /// Start of the ROM.
        rom_start: u64,
        /// End of the ROM.
        rom_end: u64,
    },
    /// The tables do not fit the area.
    #[error("ACPI tables need {needed:#x} bytes, the area at {start:#x} holds {available:#x}")]
    TooLarge {
        /// Start of the area.
        start: u64,
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// The DSDT's AML could not be encoded.
    #[error("encoding the DSDT: {0}")]
    Aml(#[from] AmlError),
    /// Guest memory refused the write.
    #[error("writing {len:#x} bytes of ACPI tables at {addr:#x} failed: {source}")]
    Write {
        /// Where.
        addr: u64,
        /// How much.
        len: usize,
        /// What vm-memory reported.
        source: vm_memory::GuestMemoryError,
    },
}

/// Choices in the tables.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiOptions {
    /// Describe (and build) a 32-bit PM timer instead of PIIX4's 24-bit one.
    pub pm_timer_32bit: bool,
}

/// Where each table went (so loaders can reserve the area in memory maps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiLayout {
    /// Root System Description Pointer.
    pub rsdp: u64,
    /// Firmware ACPI Control Structure.
    pub facs: u64,
    /// Differentiated System Description Table.
    pub dsdt: u64,
    /// Fixed ACPI Description Table.
    pub fadt: u64,
    /// Multiple APIC Description Table.
    pub madt: u64,
    /// Root System Description Table (32-bit pointers).
    pub rsdt: u64,
    /// Extended System Description Table (64-bit pointers).
    pub xsdt: u64,
    /// One past the last byte written.
    pub end: u64,
}

const OEM_ID: &[u8; 6] = b"DEJA  ";
const OEM_TABLE_ID: &[u8; 8] = b"DEJAPC  ";
const CREATOR_ID: &[u8; 4] = b"DEJA";

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)))
}

/// A table with the standard 36-byte header; length and checksum are set by `finish`.
fn table(signature: &[u8; 4], revision: u8) -> Vec<u8> {
    let mut t = Vec::with_capacity(256);
    t.extend_from_slice(signature);
    t.extend_from_slice(&[0; 4]); // length
    t.push(revision);
    t.push(0); // checksum
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t
}

fn finish(mut t: Vec<u8>) -> Vec<u8> {
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    t[9] = 0;
    t[9] = checksum(&t);
    t
}

/// A Generic Address Structure in system I/O space.
fn gas_io(port: u16, bit_width: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O
    g[1] = bit_width;
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn put(t: &mut [u8], at: usize, bytes: &[u8]) {
    t[at..at + bytes.len()].copy_from_slice(bytes);
}

/// The DSDT of table revision `revision` for a machine with `layout`.
fn dsdt(revision: FirmwareRevision, layout: &MemoryLayout) -> Result<Vec<u8>, AcpiError> {
    let mut t = table(b"DSDT", 1);
    let sleep_state = |typ: u16| {
        let typ = aml::integer(u32::from(typ));
        // PM1a and PM1b SLP_TYP (deja has no PM1b block), then two reserved.
        aml::package(&[typ.clone(), typ, aml::integer(0), aml::integer(0)])
    };
    match revision {
        // Name (_S5, Package (4) { Zero, Zero, Zero, Zero }) alone.
        FirmwareRevision::Rev1 => {}
        FirmwareRevision::Rev2 => {
            t.extend(aml::scope("\\_SB", &pci0(layout)?)?);
            t.extend(aml::name("_S3", &sleep_state(SLP_TYP_S3)?)?);
        }
    }
    t.extend(aml::name("_S5", &sleep_state(SLP_TYP_S5)?)?);
    Ok(finish(t))
}

/// `Device (PCI0)`: the i440FX host bridge as QEMU's `pc` describes it, so that an OS
/// enumerates PCI through ACPI. Its `_CRS` gives bus 0-0xff, the configuration ports, the
/// I/O windows on either side of them, the legacy VGA window and the 32-bit MMIO window
/// from the end of low RAM to the I/O APIC. No `_PRT`: no function on the bus raises an
/// interrupt (deja has no PCI device besides the two bridges). The PIIX3 ISA bridge at
/// 00:01.0 holds the legacy devices deja-pc has.
fn pci0(layout: &MemoryLayout) -> Result<Vec<u8>, AcpiError> {
    use aml::resource::{dword_memory, io, template, word_bus_number, word_io};
    let mmio_start = u32::try_from(layout.below_4g).unwrap_or(u32::MAX);
    let mut crs = vec![
        word_bus_number(0, 0xff),
        io(super::pci::PORT_RANGE.0, super::pci::PORT_RANGE.0, 1, 8),
        word_io(0, super::pci::PORT_RANGE.0 - 1),
        word_io(0x0d00, 0xffff),
        dword_memory(
            crate::memory::VGA_HOLE_START as u32,
            crate::memory::VGA_HOLE_END as u32 - 1,
            true,
        ),
    ];
    if mmio_start < IOAPIC_ADDRESS {
        crs.push(dword_memory(mmio_start, IOAPIC_ADDRESS - 1, false));
    }
    let mut body = aml::name("_HID", &aml::eisa_id("PNP0A03")?)?;
    // No `_ADR` besides the `_HID` (ACPI 6.5 6.1: one or the other), unlike QEMU's.
    body.extend(aml::name("_UID", &aml::integer(0))?);
    body.extend(aml::name("_CRS", &template(&crs)?)?);
    body.extend(aml::device("ISA", &isa_devices()?)?);
    Ok(aml::device("PCI0", &body)?)
}

/// The PIIX3 function (`_ADR` device 1, function 0) and the legacy devices behind it, as PNP
/// devices with the ports and ISA IRQs deja-pc gives them: the i8042 keyboard controller
/// (no mouse is attached, so no PS/2 mouse device), COM1, the RTC and the PIT.
fn isa_devices() -> Result<Vec<u8>, AcpiError> {
    use super::{i8042, pit, rtc, serial};
    use aml::resource::{io, irq_no_flags, template};
    let fixed = |port: u16, len: u16| io(port, port, 1, len as u8);
    let dev = |name: &str, hid: &str, uid: Option<u32>, crs: Vec<Vec<u8>>| {
        let mut body = aml::name("_HID", &aml::eisa_id(hid)?)?;
        if let Some(uid) = uid {
            body.extend(aml::name("_UID", &aml::integer(uid))?);
        }
        body.extend(aml::name("_CRS", &template(&crs)?)?);
        Ok::<_, AcpiError>(aml::device(name, &body)?)
    };
    let mut body = aml::name("_ADR", &aml::integer(1 << 16))?;
    body.extend(dev(
        "KBD",
        "PNP0303",
        None,
        vec![
            fixed(i8042::DATA_PORT, 1),
            fixed(i8042::COMMAND_PORT, 1),
            irq_no_flags(&[i8042::KBD_IRQ as u8])?,
        ],
    )?);
    body.extend(dev(
        "COM1",
        "PNP0501",
        Some(1),
        vec![
            fixed(serial::COM1_BASE, 8),
            irq_no_flags(&[serial::COM1_IRQ as u8])?,
        ],
    )?);
    body.extend(dev(
        "RTC",
        "PNP0B00",
        None,
        vec![
            fixed(rtc::RTC_BASE, 2),
            irq_no_flags(&[rtc::RTC_IRQ as u8])?,
        ],
    )?);
    body.extend(dev(
        "TIMR",
        "PNP0100",
        None,
        vec![
            fixed(pit::PIT_BASE, 4),
            irq_no_flags(&[pit::PIT_IRQ as u8])?,
        ],
    )?);
    Ok(body)
}

fn facs() -> Vec<u8> {
    let mut f = vec![0u8; 64];
    f[0..4].copy_from_slice(b"FACS");
    f[4..8].copy_from_slice(&64u32.to_le_bytes());
    f[32] = 1; // version (ACPI 2.0)
    f
}

fn fadt(facs: u64, dsdt: u64, options: &AcpiOptions) -> Vec<u8> {
    let mut t = table(b"FACP", 3);
    t.resize(244, 0);
    put(&mut t, 36, &(facs as u32).to_le_bytes());
    put(&mut t, 40, &(dsdt as u32).to_le_bytes());
    put(&mut t, 46, &u16::from(SCI_IRQ).to_le_bytes());
    // SMI_CMD = 0: ACPI mode is always on (SCI_EN reads 1), no handover needed.
    put(&mut t, 56, &u32::from(PM1A_EVT_BLK).to_le_bytes());
    put(&mut t, 64, &u32::from(PM1A_CNT_BLK).to_le_bytes());
    put(&mut t, 76, &u32::from(PM_TMR_BLK).to_le_bytes());
    t[88] = 4; // PM1_EVT_LEN
    t[89] = 2; // PM1_CNT_LEN
    t[91] = 4; // PM_TMR_LEN
    put(&mut t, 96, &0x0fffu16.to_le_bytes()); // no C2
    put(&mut t, 98, &0x0fffu16.to_le_bytes()); // no C3
    t[108] = 0x32; // CMOS century register
    put(&mut t, 109, &0x0003u16.to_le_bytes()); // legacy devices, 8042
    let mut flags: u32 = 1 << 0 // WBINVD
        | 1 << 2 // PROC_C1
        | 1 << 5 // SLP_BUTTON (no fixed sleep button)
        | 1 << 7 // RTC_S4
        | 1 << 10 // RESET_REG_SUP
        | 1 << 15; // USE_PLATFORM_CLOCK
    if options.pm_timer_32bit {
        flags |= FADT_TMR_VAL_EXT;
    }
    put(&mut t, 112, &flags.to_le_bytes());
    put(&mut t, 116, &gas_io(super::reset::PORT_CF9, 8));
    t[128] = 0x06; // reset value: hard reset
    put(&mut t, 132, &facs.to_le_bytes());
    put(&mut t, 140, &dsdt.to_le_bytes());
    put(&mut t, 148, &gas_io(PM1A_EVT_BLK, 32));
    put(&mut t, 172, &gas_io(PM1A_CNT_BLK, 16));
    put(&mut t, 208, &gas_io(PM_TMR_BLK, 32));
    finish(t)
}

fn madt() -> Vec<u8> {
    let mut t = table(b"APIC", 1);
    t.extend_from_slice(&LAPIC_ADDRESS.to_le_bytes());
    t.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: dual 8259s present
    // Processor local APIC: UID 0, APIC ID 0, enabled.
    t.extend_from_slice(&[0, 8, 0, 0, 1, 0, 0, 0]);
    // I/O APIC: ID 0, address, GSI base 0.
    t.extend_from_slice(&[1, 12, 0, 0]);
    t.extend_from_slice(&IOAPIC_ADDRESS.to_le_bytes());
    t.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt source overrides as QEMU's pc: IRQ0 -> GSI 2 (bus default polarity and
    // trigger), and the PCI-routable IRQs 5, 9, 10, 11 level-triggered active high.
    let mut iso = |irq: u8, gsi: u32, flags: u16| {
        t.extend_from_slice(&[2, 10, 0, irq]);
        t.extend_from_slice(&gsi.to_le_bytes());
        t.extend_from_slice(&flags.to_le_bytes());
    };
    iso(0, 2, 0);
    for irq in [5u8, 9, 10, 11] {
        iso(irq, u32::from(irq), 0x000d);
    }
    // Local APIC NMI: all processors, LINT1.
    t.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    finish(t)
}

fn align(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// Writes the tables of table revision `revision` that QEMU's `pc` would have with one CPU
/// and the PM timer QEMU has.
pub fn install_acpi_tables(
    mem: &GuestRam,
    layout: &MemoryLayout,
    revision: FirmwareRevision,
) -> Result<AcpiLayout, AcpiError> {
    install_acpi_tables_with(mem, layout, revision, &AcpiOptions::default())
}

/// Writes the tables with explicit [`AcpiOptions`].
pub fn install_acpi_tables_with(
    mem: &GuestRam,
    layout: &MemoryLayout,
    revision: FirmwareRevision,
    options: &AcpiOptions,
) -> Result<AcpiLayout, AcpiError> {
    let (start, end) = (ACPI_REGION_START, ACPI_REGION_END);
    if !layout.is_ram(start) || !layout.is_ram(end - 1) {
        return Err(AcpiError::NotRam { start, end });
    }
    if let Some(rom) = layout.rom.iter().find(|r| r.start < end && r.end() > start) {
        return Err(AcpiError::InRom {
            start,
            end,
            rom_start: rom.start,
            rom_end: rom.end(),
        });
    }
    let rsdp = start;
    let facs_at = align(rsdp + 36, 64);
    debug_assert_eq!(facs_at, FACS_ADDR);
    let dsdt_at = align(facs_at + 64, 16);
    let dsdt = dsdt(revision, layout)?;
    let fadt_at = align(dsdt_at + dsdt.len() as u64, 16);
    let fadt = fadt(facs_at, dsdt_at, options);
    let madt_at = align(fadt_at + fadt.len() as u64, 16);
    let madt = madt();
    let rsdt_at = align(madt_at + madt.len() as u64, 16);
    let mut rsdt = table(b"RSDT", 1);
    for p in [fadt_at, madt_at] {
        rsdt.extend_from_slice(&(p as u32).to_le_bytes());
    }
    let rsdt = finish(rsdt);
    let xsdt_at = align(rsdt_at + rsdt.len() as u64, 16);
    let mut xsdt = table(b"XSDT", 1);
    for p in [fadt_at, madt_at] {
        xsdt.extend_from_slice(&p.to_le_bytes());
    }
    let xsdt = finish(xsdt);
    let table_end = xsdt_at + xsdt.len() as u64;
    if table_end > end {
        return Err(AcpiError::TooLarge {
            start,
            needed: table_end - start,
            available: end - start,
        });
    }

    let mut rsdp_bytes = Vec::with_capacity(36);
    rsdp_bytes.extend_from_slice(b"RSD PTR ");
    rsdp_bytes.push(0);
    rsdp_bytes.extend_from_slice(OEM_ID);
    rsdp_bytes.push(2); // revision: ACPI 2.0+, XSDT present
    rsdp_bytes.extend_from_slice(&(rsdt_at as u32).to_le_bytes());
    rsdp_bytes.extend_from_slice(&36u32.to_le_bytes());
    rsdp_bytes.extend_from_slice(&xsdt_at.to_le_bytes());
    rsdp_bytes.extend_from_slice(&[0; 4]);
    rsdp_bytes[8] = checksum(&rsdp_bytes[..20]);
    rsdp_bytes[32] = checksum(&rsdp_bytes);

    let mut image = vec![0u8; (table_end - start) as usize];
    for (at, bytes) in [
        (rsdp, rsdp_bytes),
        (facs_at, facs()),
        (dsdt_at, dsdt),
        (fadt_at, fadt),
        (madt_at, madt),
        (rsdt_at, rsdt),
        (xsdt_at, xsdt),
    ] {
        let off = (at - start) as usize;
        image[off..off + bytes.len()].copy_from_slice(&bytes);
    }
    mem.write_slice(&image, GuestAddress(start))
        .map_err(|source| AcpiError::Write {
            addr: start,
            len: image.len(),
            source,
        })?;
    Ok(AcpiLayout {
        rsdp,
        facs: facs_at,
        dsdt: dsdt_at,
        fadt: fadt_at,
        madt: madt_at,
        rsdt: rsdt_at,
        xsdt: xsdt_at,
        end: table_end,
    })
}

/// Saved state of the PM registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {
    /// PM1 status bits other than TMR_STS.
    pub pm1_sts: u16,
    /// PM1 enable.
    pub pm1_en: u16,
    /// PM1 control.
    pub pm1_cnt: u16,
    /// Timer ticks when TMR_STS was last cleared (it is set when the MSB toggles after).
    pub tmr_sts_cleared_at: u64,
    /// TMR_STS latched set.
    pub tmr_sts: bool,
    /// Whether the SCI line is driven high.
    pub sci: bool,
    /// 32-bit timer (FADT TMR_VAL_EXT) instead of 24-bit.
    pub timer_32bit: bool,
}

/// The PIIX4 PM1a event/control blocks and PM timer.
#[derive(Debug)]
pub struct AcpiPm {
    state: AcpiPmState,
}

impl Default for AcpiPm {
    fn default() -> Self {
        Self::new(&AcpiOptions::default())
    }
}

/// PM timer ticks at `ns` of guest time.
pub fn pm_ticks(ns: u64) -> u64 {
    (u128::from(ns) * u128::from(PM_TIMER_HZ) / 1_000_000_000) as u64
}

/// The first guest time (ns) at which the PM timer has counted `ticks`.
fn ticks_to_ns(ticks: u64) -> u64 {
    let ns = (u128::from(ticks) * 1_000_000_000).div_ceil(u128::from(PM_TIMER_HZ));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

impl AcpiPm {
    /// PM registers matching the tables written with `options`; ACPI mode (SCI_EN) is on,
    /// because the FADT has no SMI command port to switch it.
    pub fn new(options: &AcpiOptions) -> Self {
        Self {
            state: AcpiPmState {
                pm1_sts: 0,
                pm1_en: 0,
                pm1_cnt: PM1_SCI_EN,
                tmr_sts_cleared_at: 0,
                tmr_sts: false,
                sci: false,
                timer_32bit: options.pm_timer_32bit,
            },
        }
    }

    fn msb_period(&self) -> u64 {
        if self.state.timer_32bit {
            1 << 31
        } else {
            1 << 23
        }
    }

    /// The counter value at `ticks`.
    fn counter(&self, ticks: u64) -> u32 {
        if self.state.timer_32bit {
            ticks as u32
        } else {
            (ticks & 0xff_ffff) as u32
        }
    }

    /// Latches TMR_STS if the counter's MSB toggled since it was last cleared, and drives
    /// the SCI from the enabled status bits.
    fn update(&mut self, ctx: &mut IoCtx) {
        let ticks = pm_ticks(ctx.now());
        let period = self.msb_period();
        if ticks / period != self.state.tmr_sts_cleared_at / period {
            self.state.tmr_sts = true;
        }
        let sts = self.pm1_sts();
        let sci = self.state.pm1_cnt & PM1_SCI_EN != 0 && sts & self.state.pm1_en != 0;
        if sci != self.state.sci {
            self.state.sci = sci;
            ctx.irq.set_irq(u32::from(SCI_IRQ), sci);
        }
    }

    fn pm1_sts(&self) -> u16 {
        self.state.pm1_sts | if self.state.tmr_sts { PM1_TMR } else { 0 }
    }

    /// Value of the 16-bit register at `reg` (0 status, 2 enable, 4 control).
    fn reg16(&self, reg: u16) -> u16 {
        match reg {
            0 => self.pm1_sts(),
            2 => self.state.pm1_en,
            4 => self.state.pm1_cnt & !PM1_SLP_EN,
            _ => 0,
        }
    }

    fn write16(&mut self, ctx: &mut IoCtx, reg: u16, value: u16, written: u16) {
        match reg {
            0 => {
                let clear = value & written;
                if clear & PM1_TMR != 0 {
                    self.state.tmr_sts = false;
                    self.state.tmr_sts_cleared_at = pm_ticks(ctx.now());
                }
                self.state.pm1_sts &= !clear;
            }
            2 => self.state.pm1_en = (self.state.pm1_en & !written) | (value & written),
            4 => {
                let v = (self.state.pm1_cnt & !written) | (value & written);
                self.state.pm1_cnt = v & !PM1_SLP_EN;
                let slp_typ = (v >> 10) & 7;
                if v & PM1_SLP_EN != 0 && slp_typ == SLP_TYP_S5 {
                    *ctx.stop = Some(StopRequest::PowerOff);
                } else if v & PM1_SLP_EN != 0 && slp_typ == SLP_TYP_S3 {
                    *ctx.stop = Some(StopRequest::Suspend);
                }
            }
            _ => {}
        }
    }
}

impl Device for AcpiPm {
    fn name(&self) -> &'static str {
        "acpi-pm"
    }

    fn read(&mut self, ctx: &mut IoCtx, addr: u64, data: &mut [u8]) {
        self.update(ctx);
        let timer = self.counter(pm_ticks(ctx.now())).to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            let off = (addr as u16).wrapping_sub(PM_BASE).wrapping_add(i as u16);
            *b = match off {
                0..=5 => self.reg16(off & !1).to_le_bytes()[usize::from(off & 1)],
                8..=11 => timer[usize::from(off - 8)],
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, ctx: &mut IoCtx, addr: u64, data: &[u8]) {
        self.update(ctx);
        let base = (addr as u16).wrapping_sub(PM_BASE);
        // Gather the bytes written into each 16-bit register, then apply each once.
        for reg in [0u16, 2, 4] {
            let (mut value, mut written) = (0u16, 0u16);
            for (i, &b) in data.iter().enumerate() {
                let off = base.wrapping_add(i as u16);
                if off & !1 == reg {
                    let shift = 8 * (off & 1);
                    value |= u16::from(b) << shift;
                    written |= 0xff << shift;
                }
            }
            if written != 0 {
                self.write16(ctx, reg, value, written);
            }
        }
        self.update(ctx);
    }

    fn poll(&mut self, ctx: &mut IoCtx) {
        // TMR_STS is computed from the clock when read, so the clock only needs asking here
        // when its toggle must raise the SCI (keeps recorded traces free of idle reads).
        if self.state.pm1_en & PM1_TMR != 0 && !self.state.tmr_sts {
            self.update(ctx);
        }
    }

    fn next_deadline(&self) -> Option<u64> {
        if self.state.pm1_en & PM1_TMR == 0 || self.state.tmr_sts {
            return None;
        }
        let period = self.msb_period();
        Some(ticks_to_ns(
            (self.state.tmr_sts_cleared_at / period + 1) * period,
        ))
    }

    fn save(&self) -> DeviceState {
        DeviceState::AcpiPm(self.state)
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        match state {
            DeviceState::AcpiPm(s) => {
                self.state = *s;
                Ok(())
            }
            other => Err(DeviceError::WrongState {
                device: "acpi-pm",
                found: other.kind(),
            }),
        }
    }
}

/// Firmware_Waking_Vector of the FACS at [`FACS_ADDR`]: where an S3 resume enters, in real
/// mode (0: the OS set none, and the firmware boots normally).
pub fn waking_vector(mem: &GuestRam) -> u32 {
    mem.read_obj::<u32>(GuestAddress(FACS_ADDR + FACS_WAKING_VECTOR))
        .unwrap_or(0)
}

/// The CPU state an S3 resume starts in, as SeaBIOS leaves it for the OS: real mode at
/// `vector` as segment `vector >> 4`, offset `vector & 0xf` (ACPI 6.5 5.2.10), data
/// segments 0. (SeaBIOS resumes through Firmware_Waking_Vector only, never through
/// X_Firmware_Waking_Vector, and so does deja.)
pub fn resume_state(vector: u32) -> crate::cpu::CpuState {
    use crate::cpu::{Segment, seg};
    let mut s = crate::cpu::CpuState::reset();
    for (i, sg) in s.seg.iter_mut().enumerate() {
        *sg = Segment::real_mode(0, i == seg::CS);
    }
    s.seg[seg::CS] = Segment::real_mode((vector >> 4) as u16, true);
    s.rip = u64::from(vector & 0xf);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::scripted_host::Rig;

    fn bytes(rig: &Rig, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        rig.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// A table read back and checked: signature, length and checksum.
    fn sdt(rig: &Rig, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
        let head = bytes(rig, addr, 36);
        assert_eq!(&head[0..4], sig, "signature at {addr:#x}");
        let len = u32_at(&head, 4) as usize;
        assert!(len >= 36, "{sig:?} length {len}");
        let t = bytes(rig, addr, len);
        assert_eq!(
            t.iter().fold(0u8, |a, &b| a.wrapping_add(b)),
            0,
            "{sig:?} checksum"
        );
        t
    }

    /// Finds the RSDP as an OS does: "RSD PTR " on a 16-byte boundary in 0xe0000-0xfffff.
    fn find_rsdp(rig: &Rig) -> u64 {
        (0xe_0000u64..0x10_0000)
            .step_by(16)
            .find(|&a| bytes(rig, a, 8) == b"RSD PTR ")
            .expect("RSDP in the BIOS area")
    }

    fn installed(options: AcpiOptions) -> (Rig, AcpiLayout) {
        let rig = Rig::new(16 << 20);
        let l = install_acpi_tables_with(&rig.mem, &rig.layout, FirmwareRevision::Rev1, &options)
            .unwrap();
        (rig, l)
    }

    #[test]
    fn tables_parse_back_from_the_rsdp() {
        let (rig, l) = installed(AcpiOptions::default());
        let rsdp_at = find_rsdp(&rig);
        assert_eq!(rsdp_at, l.rsdp);
        let rsdp = bytes(&rig, rsdp_at, 36);
        let sum = |b: &[u8]| b.iter().fold(0u8, |a, &x| a.wrapping_add(x));
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "revision");
        assert_eq!(u32_at(&rsdp, 20), 36);

        let rsdt = sdt(&rig, u64::from(u32_at(&rsdp, 16)), b"RSDT");
        let xsdt = sdt(&rig, u64_at(&rsdp, 24), b"XSDT");
        let from_rsdt: Vec<u64> = rsdt[36..]
            .chunks(4)
            .map(|c| u64::from(u32_at(c, 0)))
            .collect();
        let from_xsdt: Vec<u64> = xsdt[36..].chunks(8).map(|c| u64_at(c, 0)).collect();
        assert_eq!(from_rsdt, from_xsdt);
        let sigs: Vec<Vec<u8>> = from_xsdt.iter().map(|&a| bytes(&rig, a, 4)).collect();
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);

        let fadt = sdt(&rig, from_xsdt[0], b"FACP");
        assert_eq!(fadt.len(), 244);
        assert_eq!(fadt[8], 3, "FADT revision");
        // (offset, width, expected)
        let fields: &[(usize, usize, u64)] = &[
            (46, 2, 9),      // SCI_INT
            (48, 4, 0),      // SMI_CMD
            (56, 4, 0x600),  // PM1a_EVT_BLK
            (64, 4, 0x604),  // PM1a_CNT_BLK
            (76, 4, 0x608),  // PM_TMR_BLK
            (80, 4, 0),      // GPE0_BLK
            (88, 1, 4),      // PM1_EVT_LEN
            (89, 1, 2),      // PM1_CNT_LEN
            (91, 1, 4),      // PM_TMR_LEN
            (108, 1, 0x32),  // CENTURY
            (128, 1, 6),     // RESET_VALUE
            (152, 8, 0x600), // X_PM1a_EVT_BLK.address
            (176, 8, 0x604), // X_PM1a_CNT_BLK.address
            (212, 8, 0x608), // X_PM_TMR_BLK.address
            (120, 8, 0xcf9), // RESET_REG.address
        ];
        for &(at, w, want) in fields {
            let mut v = [0u8; 8];
            v[..w].copy_from_slice(&fadt[at..at + w]);
            assert_eq!(u64::from_le_bytes(v), want, "FADT offset {at}");
        }
        assert_eq!(fadt[208], 1, "PM timer in system I/O space");
        assert_eq!(fadt[209], 32, "PM timer GAS width");
        assert_eq!(u32_at(&fadt, 112) & FADT_TMR_VAL_EXT, 0, "24-bit timer");
        assert_eq!(
            u32_at(&fadt, 40) as u64,
            u64_at(&fadt, 140),
            "DSDT == X_DSDT"
        );
        assert_eq!(
            u32_at(&fadt, 36) as u64,
            u64_at(&fadt, 132),
            "FACS == X_FACS"
        );

        let facs_at = u64_at(&fadt, 132);
        assert_eq!(facs_at % 64, 0);
        let facs = bytes(&rig, facs_at, 64);
        assert_eq!(&facs[0..4], b"FACS");
        assert_eq!(u32_at(&facs, 4), 64);

        let dsdt = sdt(&rig, u64_at(&fadt, 140), b"DSDT");
        let s5 = dsdt.windows(4).position(|w| w == b"_S5_").expect("_S5_");
        assert_eq!(dsdt[s5 - 1], 0x08, "NameOp");
        assert_eq!(&dsdt[s5 + 4..s5 + 8], &[0x12, 0x06, 0x04, SLP_TYP_S5 as u8]);
        assert_eq!(s5 + 4 + 7, dsdt.len(), "package fills the body exactly");
        assert!(l.end <= ACPI_REGION_END);
    }

    /// A data object of the AML subset deja's DSDT uses.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Value {
        Int(u32),
        Pkg(Vec<Value>),
        Buf(Vec<u8>),
    }

    /// Reads a PkgLength at `*at`; returns the end of the package it opens.
    fn read_pkg_length(b: &[u8], at: &mut usize) -> usize {
        let start = *at;
        let lead = b[start];
        let extra = usize::from(lead >> 6);
        let mut len = usize::from(if extra == 0 { lead & 0x3f } else { lead & 0xf });
        for i in 0..extra {
            len |= usize::from(b[start + 1 + i]) << (4 + 8 * i);
        }
        *at = start + 1 + extra;
        start + len
    }

    /// Reads a NameString at `*at` as dotted text (`\_SB_.PCI0`, `_HID`).
    fn read_name(b: &[u8], at: &mut usize) -> String {
        let mut out = String::new();
        while b[*at] == b'\\' || b[*at] == b'^' {
            out.push(b[*at] as char);
            *at += 1;
        }
        let count = match b[*at] {
            0x2e => {
                *at += 1;
                2
            }
            0x2f => {
                *at += 2;
                usize::from(b[*at - 1])
            }
            _ => 1,
        };
        let segs: Vec<String> = (0..count)
            .map(|i| String::from_utf8(b[*at + 4 * i..*at + 4 * i + 4].to_vec()).unwrap())
            .collect();
        *at += 4 * count;
        out + &segs.join(".")
    }

    fn read_value(b: &[u8], at: &mut usize) -> Value {
        let op = b[*at];
        *at += 1;
        let int = |at: &mut usize, n: usize| {
            let mut v = [0u8; 4];
            v[..n].copy_from_slice(&b[*at..*at + n]);
            *at += n;
            Value::Int(u32::from_le_bytes(v))
        };
        match op {
            0x00 => Value::Int(0),
            0x01 => Value::Int(1),
            0x0a => int(at, 1),
            0x0b => int(at, 2),
            0x0c => int(at, 4),
            0x12 => {
                let end = read_pkg_length(b, at);
                let n = b[*at];
                *at += 1;
                let items = (0..n).map(|_| read_value(b, at)).collect();
                assert_eq!(*at, end, "package length");
                Value::Pkg(items)
            }
            0x11 => {
                let end = read_pkg_length(b, at);
                let Value::Int(size) = read_value(b, at) else {
                    panic!("buffer size")
                };
                let bytes = b[*at..end].to_vec();
                assert_eq!(bytes.len(), size as usize, "buffer size");
                *at = end;
                Value::Buf(bytes)
            }
            other => panic!("unexpected data object opcode {other:#x} at {}", *at - 1),
        }
    }

    /// Walks a term list of Name, Scope and Device terms; every Name with its full path.
    fn read_terms(b: &[u8], scope: &str, out: &mut Vec<(String, Value)>) {
        let join = |name: &str| {
            if name.starts_with('\\') {
                name.to_string()
            } else if scope == "\\" {
                format!("\\{name}")
            } else {
                format!("{scope}.{name}")
            }
        };
        let mut at = 0;
        while at < b.len() {
            match b[at] {
                0x08 => {
                    at += 1;
                    let name = join(&read_name(b, &mut at));
                    out.push((name, read_value(b, &mut at)));
                }
                0x10 | 0x5b => {
                    at += if b[at] == 0x5b {
                        assert_eq!(b[at + 1], 0x82, "DeviceOp");
                        2
                    } else {
                        1
                    };
                    let end = read_pkg_length(b, &mut at);
                    let name = join(&read_name(b, &mut at));
                    out.push((name.clone(), Value::Pkg(Vec::new())));
                    read_terms(&b[at..end], &name, out);
                    at = end;
                }
                other => panic!("unexpected term opcode {other:#x} at {at}"),
            }
        }
    }

    /// The descriptors of a resource template: (tag byte, the descriptor's bytes).
    fn descriptors(buf: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            let len = if buf[at] & 0x80 == 0 {
                1 + usize::from(buf[at] & 7)
            } else {
                3 + usize::from(u16::from_le_bytes([buf[at + 1], buf[at + 2]]))
            };
            out.push(buf[at..at + len].to_vec());
            if buf[at] == 0x79 {
                assert_eq!(at + len, buf.len(), "the end tag ends the template");
                return out;
            }
            at += len;
        }
    }

    fn dsdt_names(rev: FirmwareRevision, ram: u64) -> Vec<(String, Value)> {
        let rig = Rig::new(ram);
        let l = install_acpi_tables(&rig.mem, &rig.layout, rev).unwrap();
        let dsdt = sdt(&rig, l.dsdt, b"DSDT");
        let mut names = Vec::new();
        read_terms(&dsdt[36..], "\\", &mut names);
        names
    }

    fn value<'a>(names: &'a [(String, Value)], path: &str) -> &'a Value {
        &names
            .iter()
            .find(|(n, _)| n == path)
            .unwrap_or_else(|| panic!("no {path} in {names:?}"))
            .1
    }

    fn io(port: u16, len: u8) -> Vec<u8> {
        let p = port.to_le_bytes();
        vec![0x47, 1, p[0], p[1], p[0], p[1], 1, len]
    }

    fn irq(n: u8) -> Vec<u8> {
        let m = (1u16 << n).to_le_bytes();
        vec![0x22, m[0], m[1]]
    }

    #[test]
    fn revision_1_dsdt_holds_s5_alone_as_it_always_did() {
        let rig = Rig::new(16 << 20);
        let l = install_acpi_tables(&rig.mem, &rig.layout, FirmwareRevision::Rev1).unwrap();
        let dsdt = sdt(&rig, l.dsdt, b"DSDT");
        assert_eq!(dsdt.len(), 48);
        assert_eq!(
            &dsdt[36..],
            &[0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x04, 0, 0, 0, 0]
        );
        // The layout every older trace has: the same addresses.
        assert_eq!(
            (l.rsdp, l.facs, l.dsdt, l.fadt, l.madt, l.rsdt, l.xsdt),
            (
                0xe0000, 0xe0040, 0xe0080, 0xe00b0, 0xe01b0, 0xe0230, 0xe0260
            )
        );
    }

    #[test]
    fn revision_2_dsdt_describes_the_pci_root_bridge_and_the_legacy_devices() {
        let names = dsdt_names(FirmwareRevision::Rev2, 16 << 20);
        let paths: Vec<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            paths,
            [
                "\\_SB_",
                "\\_SB_.PCI0",
                "\\_SB_.PCI0._HID",
                "\\_SB_.PCI0._UID",
                "\\_SB_.PCI0._CRS",
                "\\_SB_.PCI0.ISA_",
                "\\_SB_.PCI0.ISA_._ADR",
                "\\_SB_.PCI0.ISA_.KBD_",
                "\\_SB_.PCI0.ISA_.KBD_._HID",
                "\\_SB_.PCI0.ISA_.KBD_._CRS",
                "\\_SB_.PCI0.ISA_.COM1",
                "\\_SB_.PCI0.ISA_.COM1._HID",
                "\\_SB_.PCI0.ISA_.COM1._UID",
                "\\_SB_.PCI0.ISA_.COM1._CRS",
                "\\_SB_.PCI0.ISA_.RTC_",
                "\\_SB_.PCI0.ISA_.RTC_._HID",
                "\\_SB_.PCI0.ISA_.RTC_._CRS",
                "\\_SB_.PCI0.ISA_.TIMR",
                "\\_SB_.PCI0.ISA_.TIMR._HID",
                "\\_SB_.PCI0.ISA_.TIMR._CRS",
                "\\_S3_",
                "\\_S5_",
            ]
        );
        // Sleep states: S3 is SLP_TYP 1, S5 SLP_TYP 0, as the PM device implements them.
        let pkg = |v: u32| {
            Value::Pkg(vec![
                Value::Int(v),
                Value::Int(v),
                Value::Int(0),
                Value::Int(0),
            ])
        };
        assert_eq!(*value(&names, "\\_S3_"), pkg(u32::from(SLP_TYP_S3)));
        assert_eq!(*value(&names, "\\_S5_"), pkg(u32::from(SLP_TYP_S5)));
        // The host bridge: EisaId("PNP0A03"), and its windows for 16 MiB of RAM.
        assert_eq!(*value(&names, "\\_SB_.PCI0._HID"), Value::Int(0x030a_d041));
        let Value::Buf(crs) = value(&names, "\\_SB_.PCI0._CRS") else {
            panic!("_CRS is a buffer")
        };
        let d = descriptors(crs);
        let word = |ty: u8, flags: u8, min: u16, max: u16| {
            let mut v = vec![0x88, 13, 0, ty, 0x0c, flags, 0, 0];
            for x in [min, max, 0, max - min + 1] {
                v.extend_from_slice(&x.to_le_bytes());
            }
            v
        };
        let dword = |flags: u8, min: u32, max: u32| {
            let mut v = vec![0x87, 23, 0, 0, 0x0c, flags, 0, 0, 0, 0];
            for x in [min, max, 0, max - min + 1] {
                v.extend_from_slice(&x.to_le_bytes());
            }
            v
        };
        assert_eq!(
            d,
            [
                word(2, 0, 0, 0xff),
                io(0xcf8, 8),
                word(1, 3, 0, 0xcf7),
                word(1, 3, 0xd00, 0xffff),
                dword(3, 0xa_0000, 0xb_ffff),
                dword(1, 16 << 20, 0xfebf_ffff),
                vec![0x79, 0],
            ]
        );
        // The PIIX3 at 00:01.0 and the devices behind it.
        assert_eq!(
            *value(&names, "\\_SB_.PCI0.ISA_._ADR"),
            Value::Int(0x1_0000)
        );
        let isa = "\\_SB_.PCI0.ISA_";
        for (dev, hid, crs) in [
            (
                "KBD_",
                0x0303_d041u32,
                vec![io(0x60, 1), io(0x64, 1), irq(1)],
            ),
            ("COM1", 0x0105_d041, vec![io(0x3f8, 8), irq(4)]),
            ("RTC_", 0x000b_d041, vec![io(0x70, 2), irq(8)]),
            ("TIMR", 0x0001_d041, vec![io(0x40, 4), irq(0)]),
        ] {
            assert_eq!(
                *value(&names, &format!("{isa}.{dev}._HID")),
                Value::Int(hid),
                "{dev}"
            );
            let Value::Buf(b) = value(&names, &format!("{isa}.{dev}._CRS")) else {
                panic!("{dev} _CRS")
            };
            let mut want = crs;
            want.push(vec![0x79, 0]);
            assert_eq!(descriptors(b), want, "{dev}");
        }
    }

    #[test]
    fn the_mmio_window_follows_low_ram_and_the_tables_still_fit() {
        for (ram, start) in [
            (512u64 << 20, 0x2000_0000u32),
            (3 << 30, 0xc000_0000),
            (6 << 30, 0xc000_0000),
        ] {
            let layout = MemoryLayout::pc(ram).unwrap();
            let crs = pci0(&layout).unwrap();
            let window = dword_window(&crs);
            assert_eq!(window, Some((start, 0xfebf_ffff)), "{ram:#x}");
        }
        let rig = Rig::new(16 << 20);
        let l = install_acpi_tables(&rig.mem, &rig.layout, FirmwareRevision::LATEST).unwrap();
        assert!(l.end <= ACPI_REGION_END);
        // The FADT, MADT and root tables follow the longer DSDT, each still checksummed.
        for (at, sig) in [
            (l.fadt, b"FACP"),
            (l.madt, b"APIC"),
            (l.rsdt, b"RSDT"),
            (l.xsdt, b"XSDT"),
        ] {
            sdt(&rig, at, sig);
        }
    }

    /// The last non-cacheable DWordMemory window in `aml`'s bytes: (min, max).
    fn dword_window(aml: &[u8]) -> Option<(u32, u32)> {
        aml.windows(26)
            .filter(|w| w[..6] == [0x87, 23, 0, 0, 0x0c, 0x01])
            .map(|w| (u32_at(w, 10), u32_at(w, 14)))
            .next_back()
    }

    #[test]
    fn madt_describes_one_cpu_the_ioapic_and_qemu_overrides() {
        let (rig, l) = installed(AcpiOptions::default());
        let madt = sdt(&rig, l.madt, b"APIC");
        assert_eq!(u32_at(&madt, 36), 0xfee0_0000);
        assert_eq!(u32_at(&madt, 40), 1, "PCAT_COMPAT");
        let mut entries = Vec::new();
        let mut at = 44;
        while at < madt.len() {
            let (ty, len) = (madt[at], usize::from(madt[at + 1]));
            assert!(len >= 2 && at + len <= madt.len(), "entry at {at}");
            entries.push((ty, madt[at + 2..at + len].to_vec()));
            at += len;
        }
        assert_eq!(at, madt.len());
        let lapics: Vec<_> = entries.iter().filter(|e| e.0 == 0).collect();
        assert_eq!(lapics.len(), 1);
        assert_eq!(lapics[0].1, vec![0, 0, 1, 0, 0, 0]);
        let ioapics: Vec<_> = entries.iter().filter(|e| e.0 == 1).collect();
        assert_eq!(ioapics.len(), 1);
        assert_eq!(u32_at(&ioapics[0].1, 2), 0xfec0_0000);
        assert_eq!(u32_at(&ioapics[0].1, 6), 0);
        let isos: Vec<(u8, u32, u16)> = entries
            .iter()
            .filter(|e| e.0 == 2)
            .map(|e| {
                (
                    e.1[1],
                    u32_at(&e.1, 2),
                    u16::from_le_bytes([e.1[6], e.1[7]]),
                )
            })
            .collect();
        assert_eq!(
            isos,
            vec![
                (0, 2, 0),
                (5, 5, 0xd),
                (9, 9, 0xd),
                (10, 10, 0xd),
                (11, 11, 0xd)
            ]
        );
        let nmis: Vec<_> = entries.iter().filter(|e| e.0 == 4).collect();
        assert_eq!(nmis.len(), 1);
        assert_eq!(nmis[0].1, vec![0xff, 0, 0, 1]);
    }

    #[test]
    fn thirty_two_bit_timer_is_described() {
        let (rig, l) = installed(AcpiOptions {
            pm_timer_32bit: true,
        });
        let fadt = sdt(&rig, l.fadt, b"FACP");
        assert_ne!(u32_at(&fadt, 112) & FADT_TMR_VAL_EXT, 0);
    }

    fn read_port(pm: &mut AcpiPm, rig: &mut Rig, port: u16, len: usize) -> u32 {
        let mut b = [0u8; 4];
        pm.read(&mut rig.ctx(), u64::from(port), &mut b[..len]);
        u32::from_le_bytes(b)
    }

    #[test]
    fn pm_timer_counts_at_3_579545_mhz_and_wraps() {
        // (ns, 24-bit value, 32-bit value)
        let cases: &[(u64, u32, u32)] = &[
            (0, 0, 0),
            (1_000, 3, 3),
            (1_000_000_000, 3_579_545 & 0xff_ffff, 3_579_545),
            (10_000_000_000, (35_795_450 & 0xff_ffff), 35_795_450),
            // 2^32 ticks later the 32-bit counter wraps too.
            (1_199_886_000_000, 0x0001_332b, 0x0001_332b),
        ];
        for &(ns, v24, v32) in cases {
            for (wide, want) in [(false, v24), (true, v32)] {
                let mut rig = Rig::new(4 << 20);
                let mut pm = AcpiPm::new(&AcpiOptions {
                    pm_timer_32bit: wide,
                });
                rig.host.now_ns = ns;
                assert_eq!(
                    pm_ticks(ns) as u32 & if wide { !0 } else { 0xff_ffff },
                    want
                );
                assert_eq!(
                    read_port(&mut pm, &mut rig, 0x608, 4),
                    want,
                    "{ns} ns wide {wide}"
                );
                // Byte reads see the same counter.
                assert_eq!(read_port(&mut pm, &mut rig, 0x609, 1), (want >> 8) & 0xff);
            }
        }
    }

    #[test]
    fn timer_status_latches_on_msb_toggle_and_raises_sci_when_enabled() {
        let mut rig = Rig::new(4 << 20);
        let mut pm = AcpiPm::default();
        let toggle_ns = ticks_to_ns(1 << 23);
        assert_eq!(pm.next_deadline(), None, "TMR_EN clear");
        pm.write(&mut rig.ctx(), 0x602, &PM1_TMR.to_le_bytes());
        assert_eq!(pm.next_deadline(), Some(toggle_ns));
        rig.host.now_ns = toggle_ns - 1;
        pm.poll(&mut rig.ctx());
        assert_eq!(read_port(&mut pm, &mut rig, 0x600, 2), 0);
        assert!(!rig.lines.level(9));
        rig.host.now_ns = toggle_ns;
        pm.poll(&mut rig.ctx());
        assert_eq!(read_port(&mut pm, &mut rig, 0x600, 2), 1);
        assert!(rig.lines.level(9), "SCI asserted");
        assert_eq!(pm.next_deadline(), None);
        // Writing 0 leaves it; writing 1 clears it and drops the SCI.
        pm.write(&mut rig.ctx(), 0x600, &[0, 0]);
        assert_eq!(read_port(&mut pm, &mut rig, 0x600, 2), 1);
        pm.write(&mut rig.ctx(), 0x600, &[1, 0]);
        assert_eq!(read_port(&mut pm, &mut rig, 0x600, 2), 0);
        assert!(!rig.lines.level(9));
        assert_eq!(pm.next_deadline(), Some(ticks_to_ns(2 << 23)));
        // A status bit with SCI_EN clear does not raise the SCI.
        pm.write(&mut rig.ctx(), 0x604, &[0, 0]);
        rig.host.now_ns = ticks_to_ns(2 << 23);
        pm.poll(&mut rig.ctx());
        assert_eq!(read_port(&mut pm, &mut rig, 0x600, 2), 1);
        assert!(!rig.lines.level(9));
    }

    #[test]
    fn sleep_enable_with_s5_powers_off() {
        // (value written to PM1a_CNT as bytes, power off expected, control read back)
        let s5 = PM1_SLP_EN | SLP_TYP_S5 << 10 | PM1_SCI_EN;
        let cases: &[(&[u8], bool, u32)] = &[
            (&[0x01, 0x00], false, 0x0001),
            (&s5.to_le_bytes(), true, 0x0001),
            // S3 (SLP_TYP 1) suspends instead: no power-off.
            (&(PM1_SLP_EN | 1 << 10 | 1).to_le_bytes(), false, 0x0401),
            // A byte write to the high half only: SLP_TYP 0 with SLP_EN.
            (&[(PM1_SLP_EN >> 8) as u8], true, 0x0001),
        ];
        for &(bytes, off, read_back) in cases {
            let mut rig = Rig::new(4 << 20);
            let mut pm = AcpiPm::default();
            let port = if bytes.len() == 1 { 0x605 } else { 0x604 };
            pm.write(&mut rig.ctx(), port, bytes);
            assert_eq!(rig.stop == Some(StopRequest::PowerOff), off, "{bytes:x?}");
            assert_eq!(
                read_port(&mut pm, &mut rig, 0x604, 2),
                read_back,
                "{bytes:x?}"
            );
        }
    }

    #[test]
    fn pm_save_restore_round_trip() {
        let mut rig = Rig::new(4 << 20);
        let mut pm = AcpiPm::new(&AcpiOptions {
            pm_timer_32bit: true,
        });
        pm.write(&mut rig.ctx(), 0x602, &[1, 0]);
        rig.host.now_ns = 5_000_000_000;
        let saved = pm.save();
        let mut other = AcpiPm::default();
        other.restore(&saved).unwrap();
        assert_eq!(other.save(), saved);
        assert_eq!(
            read_port(&mut other, &mut rig, 0x608, 4),
            pm_ticks(5_000_000_000) as u32
        );
        assert!(other.restore(&DeviceState::DebugExit).is_err());
    }

    #[test]
    fn install_reports_layouts_without_room() {
        let rig = Rig::new(4 << 20);
        let mut layout = rig.layout.clone();
        layout.ranges.retain(|r| r.start == 0);
        assert!(matches!(
            install_acpi_tables(&rig.mem, &layout, FirmwareRevision::LATEST),
            Err(AcpiError::NotRam { .. })
        ));
        let mut layout = rig.layout.clone();
        layout.rom.push(crate::memory::RamRange {
            start: 0xe_0000,
            len: 0x2_0000,
        });
        assert!(matches!(
            install_acpi_tables(&rig.mem, &layout, FirmwareRevision::LATEST),
            Err(AcpiError::InRom {
                rom_start: 0xe_0000,
                ..
            })
        ));
    }
}
