//! The deja-pc machine: a [`Machine`] with the legacy PC devices at QEMU's `pc` addresses,
//! so that test kernels written for QEMU find what they expect.
//!
//! | device | ports | IRQ |
//! |---|---|---|
//! | 8259A pair (the irqchip) | 0x20-0x21, 0xa0-0xa1, ELCR 0x4d0-0x4d1 | |
//! | 8254 PIT + port B | 0x40-0x43, 0x61 | 0 |
//! | i8042 | 0x60, 0x64 | 1 |
//! | CMOS RTC | 0x70-0x71 | 8 |
//! | POST | 0x80 | |
//! | isa-debug-exit | 0xf4 | |
//! | COM1 16550A | 0x3f8-0x3ff | 4 |
//! | System control port A | 0x92 | |
//! | PCI config (i440FX, PIIX3), reset control | 0xcf8-0xcff | |
//! | fw_cfg | 0x510-0x511, DMA 0x514-0x51b | |
//! | ACPI PM1a, PM timer | 0x600-0x60b | 9 (SCI) |
//! | local APIC, I/O APIC (in the irqchip) | MMIO 0xfee00000, 0xfec00000 | |
//!
//! Optional devices (`MachineConfig::devices`, `--device NAME`), added after all of these:
//!
//! | device | ports, MMIO | IRQ |
//! |---|---|---|
//! | pc-testdev | 0xe0-0xe3, 0xe4 (flush), 0xe8-0xeb, 0x2000-0x2017; MMIO 0xff000000 (64 KiB) | drives 0-15 |
//!
//! Firmware tables are written into RAM when the machine is built, as its
//! [`crate::tables::FirmwareRevision`] says: ACPI (RSDP in 0xe0000..0xf0000) and, from
//! revision 2, SMBIOS (entry point at 0xf0000).

use crate::devices::acpi::{self, AcpiPm};
use crate::devices::debug_exit::DebugExit;
use crate::devices::fw_cfg::{self, FwCfg};
use crate::devices::i8042::I8042;
use crate::devices::lapic::Lapic;
use crate::devices::pc_irqchip::PcIrqchip;
use crate::devices::pc_testdev::{self, PcTestdev};
use crate::devices::pci::{self, PciHost};
use crate::devices::pic::{ELCR_BASE, MASTER_BASE, Pic, SLAVE_BASE};
use crate::devices::pit::{PIT_BASE, PORT_B, Pit};
use crate::devices::post::PostPort;
use crate::devices::reset::{PORT_92, Port92};
use crate::devices::rtc::Rtc;
use crate::devices::serial::{COM1_BASE, Serial};
use crate::devices::{DeviceState, i8042, rtc};
use crate::host::Host;
use crate::machine::{Machine, MachineConfig, MachineError, OptionalDevice};
use std::io::Write;

/// The POST diagnostic port.
pub const POST_PORT: u16 = 0x80;
/// QEMU's default isa-debug-exit port.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Builds the deja-pc machine: memory for `config`, the 8259A pair as interrupt controller,
/// and the PIT, RTC, COM1, i8042, POST port and isa-debug-exit. COM1's output goes to
/// `serial_out` (stdout, a file, a buffer).
pub fn build_pc(
    config: MachineConfig,
    host: Box<dyn Host>,
    serial_out: Box<dyn Write + Send>,
) -> Result<Machine, MachineError> {
    // The APICs start as firmware leaves them (LINT0 virtual wire), so PIC-only guests see
    // no difference from a bare 8259 pair.
    let irqchip = PcIrqchip::new(Box::new(Pic::new()), Lapic::firmware_handoff(0));
    let mut m = Machine::new(config, host, Box::new(irqchip))?;
    m.map_irqchip(
        &[(MASTER_BASE, 2), (SLAVE_BASE, 2), (ELCR_BASE, 2)],
        &PcIrqchip::mmio_ranges(),
    )?;
    m.add_device(Box::new(Pit::new()), &[(PIT_BASE, 4), (PORT_B, 1)], &[])?;
    m.add_device(
        Box::new(I8042::new()),
        &[(i8042::DATA_PORT, 1), (i8042::COMMAND_PORT, 1)],
        &[],
    )?;
    let rtc = Rtc::new(&m.layout);
    m.add_device(Box::new(rtc), &[(rtc::RTC_BASE, 2)], &[])?;
    m.add_device(Box::<PostPort>::default(), &[(POST_PORT, 1)], &[])?;
    m.add_device(Box::new(DebugExit), &[(DEBUG_EXIT_PORT, 1)], &[])?;
    m.add_device(Box::new(Serial::new(serial_out)), &[(COM1_BASE, 8)], &[])?;
    m.add_device(Box::<Port92>::default(), &[(PORT_92, 1)], &[])?;
    m.add_device(Box::new(PciHost::new()), &[pci::PORT_RANGE], &[])?;
    let fw_cfg = FwCfg::new(&m.config, &m.layout);
    m.add_device(
        Box::new(fw_cfg),
        &[fw_cfg::PIO_RANGE, fw_cfg::DMA_RANGE],
        &[],
    )?;
    m.add_device(Box::<AcpiPm>::default(), &[acpi::PM_RANGE], &[])?;
    crate::tables::install_firmware_tables(&m.mem, &m.layout, &m.config)?;
    add_optional_devices(&mut m)?;
    Ok(m)
}

/// Adds the devices `--device` asked for, after every standard one: the standard devices
/// keep their indices and snapshot keys, and a machine that asked for none is unchanged.
fn add_optional_devices(m: &mut Machine) -> Result<(), MachineError> {
    let wanted = m.config.devices.clone();
    for (i, &d) in wanted.iter().enumerate() {
        if wanted[..i].contains(&d) {
            return Err(MachineError::DuplicateDevice(d));
        }
        match d {
            OptionalDevice::PcTestdev => {
                m.add_device(
                    Box::new(PcTestdev::new()),
                    &pc_testdev::PIO_RANGES,
                    &[pc_testdev::MMIO_RANGE],
                )?;
            }
        }
    }
    Ok(())
}

/// The POST codes the guest wrote, oldest first (empty if the machine has no POST port).
pub fn post_codes(machine: &Machine) -> Vec<u8> {
    match machine.device("post").map(|d| d.save()) {
        Some(DeviceState::Post(p)) => p.history,
        _ => Vec::new(),
    }
}

/// Bytes the guest transmitted on COM1 (0 if the machine has no serial port).
pub fn serial_bytes_written(machine: &Machine) -> u64 {
    match machine.device("serial").map(|d| d.save()) {
        Some(DeviceState::Serial(s)) => s.tx_bytes,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::StopRequest;
    use crate::devices::pit::{PIT_HZ, ns_of_tick};
    use crate::devices::testutil::ScriptedHost;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn pc() -> (Machine, ScriptedHost, SharedBuf) {
        let host = ScriptedHost::default();
        host.0.lock().unwrap().wallclock = 1_795_467_886;
        let out = SharedBuf::default();
        let config = MachineConfig {
            ram_size: 16 << 20,
            ..MachineConfig::default()
        };
        let m = build_pc(config, Box::new(host.clone()), Box::new(out.clone())).unwrap();
        (m, host, out)
    }

    fn inb(m: &mut Machine, port: u16) -> u8 {
        let mut b = [0u8];
        m.pio_read(port, &mut b);
        b[0]
    }

    /// The PIC programming of the deja guests' runtime: vectors 0x20/0x28, then masks.
    fn init_pic(m: &mut Machine, master_mask: u8, slave_mask: u8) {
        for (port, v) in [
            (0x20, 0x11),
            (0xa0, 0x11),
            (0x21, 0x20),
            (0xa1, 0x28),
            (0x21, 0x04),
            (0xa1, 0x02),
            (0x21, 0x01),
            (0xa1, 0x01),
            (0x21, master_mask),
            (0xa1, slave_mask),
        ] {
            m.pio_write(port, &[v]);
        }
    }

    #[test]
    fn every_port_reaches_its_device_and_the_rest_read_all_ones() {
        let (mut m, _, _) = pc();
        let mapped: &[(u16, &str)] = &[
            (0x20, "pc-irqchip"),
            (0x21, "pc-irqchip"),
            (0xa0, "pc-irqchip"),
            (0xa1, "pc-irqchip"),
            (0x4d0, "pc-irqchip"),
            (0x4d1, "pc-irqchip"),
            (0x92, "port92"),
            (0xcfc, "pci"),
            (0xcf9, "pci"),
            (0x510, "fw_cfg"),
            (0x514, "fw_cfg"),
            (0x600, "acpi-pm"),
            (0x608, "acpi-pm"),
            (0x40, "pit"),
            (0x43, "pit"),
            (0x61, "pit"),
            (0x60, "i8042"),
            (0x64, "i8042"),
            (0x70, "rtc"),
            (0x71, "rtc"),
            (0x80, "post"),
            (0xf4, "debug-exit"),
            (0x3f8, "serial"),
            (0x3ff, "serial"),
        ];
        for &(port, name) in mapped {
            let key = format!("io.{name}.pio_read");
            let before = m.stats().get(&key);
            inb(&mut m, port);
            assert_eq!(m.stats().get(&key), before + 1, "port {port:#x} -> {name}");
        }
        for port in [
            0x22u16, 0x44, 0x62, 0x65, 0x72, 0x81, 0xf5, 0x3f7, 0x400, 0x4d2,
        ] {
            assert_eq!(inb(&mut m, port), 0xff, "port {port:#x}");
            assert_eq!(
                m.stats().get(&format!("io.unmapped_pio.{port:#06x}")),
                1,
                "port {port:#x}"
            );
        }
        // A few reset values that prove the right device answered.
        assert_eq!(inb(&mut m, 0x64), 0x18, "i8042 status");
        assert_eq!(inb(&mut m, 0x3fd), 0x60, "COM1 LSR");
        m.pio_write(0x70, &[0x0d]);
        assert_eq!(inb(&mut m, 0x71), 0x80, "RTC register D");
        m.pio_write(0x70, &[0x17]);
        assert_eq!(inb(&mut m, 0x71), 0x00, "15 MiB extended: 0x3c00");
        m.pio_write(0x70, &[0x18]);
        assert_eq!(inb(&mut m, 0x71), 0x3c);
    }

    /// The standard machine's devices, as every trace recorded so far names them.
    const STANDARD_KEYS: [&str; 11] = [
        "pc-irqchip",
        "pit",
        "i8042",
        "rtc",
        "post",
        "debug-exit",
        "serial",
        "port92",
        "pci",
        "fw_cfg",
        "acpi-pm",
    ];

    fn pc_with(devices: Vec<OptionalDevice>) -> Result<Machine, MachineError> {
        let config = MachineConfig {
            ram_size: 16 << 20,
            devices,
            ..MachineConfig::default()
        };
        build_pc(
            config,
            Box::<ScriptedHost>::default(),
            Box::new(std::io::sink()),
        )
    }

    #[test]
    fn without_optional_devices_the_machine_is_as_before() {
        let (m, _, _) = pc();
        assert_eq!(m.device_keys(), STANDARD_KEYS);
        // Nothing decodes the pc-testdev's ports or window.
        assert!(!m.is_mmio(pc_testdev::IOMEM_BASE));
        let (mut m, _, _) = pc();
        assert_eq!(inb(&mut m, 0xe0), 0xff);
        assert_eq!(inb(&mut m, 0x2000), 0xff);
        // The configuration's JSON (a trace header's `extra`) has no new field, and JSON
        // without it (every older trace) reads as a machine without optional devices.
        let json = serde_json::to_string(&m.config).unwrap();
        assert!(!json.contains("devices"), "{json}");
        // Nor the firmware revision, which a header holds in a field of its own: JSON alone
        // reads as revision 1, the tables of every trace before that field.
        assert!(!json.contains("firmware"), "{json}");
        let back: MachineConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back.firmware, crate::tables::FirmwareRevision::Rev1);
        assert_eq!(
            MachineConfig {
                firmware: m.config.firmware,
                ..back
            },
            m.config
        );
    }

    #[test]
    fn pc_testdev_is_added_last_and_named_in_the_config() {
        let m = pc_with(vec![OptionalDevice::PcTestdev]).unwrap();
        let mut want: Vec<String> = STANDARD_KEYS.iter().map(|k| k.to_string()).collect();
        want.push("pc-testdev".into());
        assert_eq!(m.device_keys(), want);
        assert!(m.is_mmio(pc_testdev::IOMEM_BASE));
        assert!(m.is_mmio(pc_testdev::IOMEM_BASE + pc_testdev::IOMEM_LEN - 1));
        assert!(!m.is_mmio(pc_testdev::IOMEM_BASE + pc_testdev::IOMEM_LEN));
        let json = serde_json::to_string(&m.config).unwrap();
        assert!(json.contains(r#""devices":["pc-testdev"]"#), "{json}");
        let back: MachineConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back.devices, vec![OptionalDevice::PcTestdev]);
        // Names: known ones parse, unknown ones list what there is, duplicates are refused.
        assert_eq!(
            "pc-testdev".parse::<OptionalDevice>().unwrap(),
            OptionalDevice::PcTestdev
        );
        let err = "isa-testdev"
            .parse::<OptionalDevice>()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("isa-testdev") && err.contains("pc-testdev"),
            "{err}"
        );
        assert!(matches!(
            pc_with(vec![OptionalDevice::PcTestdev, OptionalDevice::PcTestdev]),
            Err(MachineError::DuplicateDevice(OptionalDevice::PcTestdev))
        ));
    }

    #[test]
    fn pc_testdev_through_the_machine() {
        let mut m = pc_with(vec![OptionalDevice::PcTestdev]).unwrap();
        // Scratch register: dword at 0xe0, bytes back at 0xe8.
        m.pio_write(0xe0, &0x0403_0201u32.to_le_bytes());
        assert_eq!(
            (0xe8..0xec).map(|p| inb(&mut m, p)).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        // The window at every width, through the MMIO bus.
        for len in [1usize, 2, 4, 8] {
            let addr = pc_testdev::IOMEM_BASE + 0x40 * len as u64;
            let v = 0x8877_6655_4433_2211u64;
            m.mmio_write(addr, &v.to_le_bytes()[..len]);
            let mut b = [0u8; 8];
            m.mmio_read(addr, &mut b[..len]);
            assert_eq!(&b[..len], &v.to_le_bytes()[..len], "{len} bytes");
        }
        // IRQ 14 through the 8259 pair: raised by a write of 1, held, lowered by 0.
        init_pic(&mut m, 0xfb, !(1 << 6));
        m.pio_write(0x200e, &[1]);
        assert!(m.interrupt_pending());
        assert_eq!(m.acknowledge_interrupt(), 0x2e);
        m.pio_write(0xa0, &[0x20]);
        m.pio_write(0x20, &[0x20]);
        m.pio_write(0x200e, &[0]);
        assert!(!m.interrupt_pending());
        // The same line at the I/O APIC (8259s masked): pin 14, level triggered, vector
        // 0x51, so it stays asserted until the line drops.
        init_pic(&mut m, 0xff, 0xff);
        let ioapic = 0xfec0_0000u64;
        m.mmio_write(ioapic, &(0x10u32 + 2 * 14).to_le_bytes());
        m.mmio_write(ioapic + 0x10, &(0x51u32 | 1 << 15).to_le_bytes());
        m.pio_write(0x200e, &[0xff]);
        assert!(m.interrupt_pending());
        assert_eq!(m.acknowledge_interrupt(), 0x51);
        // The window and the scratch register survive a machine reset, as in QEMU.
        let boot = pc_with(vec![OptionalDevice::PcTestdev])
            .unwrap()
            .save_devices();
        m.reset_devices(&boot).unwrap();
        assert_eq!(inb(&mut m, 0xe3), 4);
        let mut b = [0u8; 1];
        m.mmio_read(pc_testdev::IOMEM_BASE + 0x40, &mut b);
        assert_eq!(b[0], 0x11);
    }

    #[test]
    fn fw_cfg_dma_honours_rom_as_cpu_stores_do() {
        use vm_memory::{Bytes, GuestAddress};
        let (mut m, _, _) = pc();
        let rom_at = 0xffff_0000u64;
        m.add_rom(rom_at, &[0x90; 0x1_0000]).unwrap();
        let transfer = |m: &mut Machine, target: u64| {
            let desc = 0x1000u64;
            let control =
                (u32::from(fw_cfg::key::SIGNATURE) << 16) | fw_cfg::dma::SELECT | fw_cfg::dma::READ;
            let mut raw = control.to_be_bytes().to_vec();
            raw.extend_from_slice(&4u32.to_be_bytes());
            raw.extend_from_slice(&target.to_be_bytes());
            m.mem.write_slice(&raw, GuestAddress(desc)).unwrap();
            m.pio_write(0x514, &((desc >> 32) as u32).to_be_bytes());
            m.pio_write(0x518, &(desc as u32).to_be_bytes());
            let mut status = [0u8; 4];
            m.mem.read_slice(&mut status, GuestAddress(desc)).unwrap();
            u32::from_be_bytes(status)
        };
        // Into RAM: the bytes land.
        assert_eq!(transfer(&mut m, 0x2000), 0);
        let mut got = [0u8; 4];
        m.mem.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
        assert_eq!(&got, b"QEMU");
        // Into the ROM: dropped, as a CPU store would be, and the ROM keeps its bytes.
        assert_eq!(transfer(&mut m, rom_at + 0x10), 0);
        m.mem
            .read_slice(&mut got, GuestAddress(rom_at + 0x10))
            .unwrap();
        assert_eq!(got, [0x90; 4]);
        // Where there is neither RAM nor ROM the transfer fails.
        assert_eq!(transfer(&mut m, 0xe000_0000), fw_cfg::dma::ERROR);
    }

    #[test]
    fn timer_path_pit_channel_0_through_the_pic() {
        let (mut m, host, _) = pc();
        init_pic(&mut m, !1, 0xff);
        let count: u32 = 4773; // 250 Hz
        m.pio_write(0x43, &[0x34]);
        m.pio_write(0x40, &[count as u8]);
        m.pio_write(0x40, &[(count >> 8) as u8]);
        // The guest halts: the machine idles to the next OUT0 edge and wakes with IRQ0.
        assert!(!m.interrupt_pending());
        let deadline = m.next_deadline().unwrap();
        assert_eq!(
            deadline,
            ns_of_tick(crate::devices::pit::ticks_at(0) + 4773)
        );
        m.idle();
        assert_eq!(host.0.lock().unwrap().now, deadline);
        assert!(m.interrupt_pending());
        assert_eq!(m.acknowledge_interrupt(), 0x20);
        assert!(!m.interrupt_pending());
        m.pio_write(0x20, &[0x20]);
        // One second of guest time in 100 us steps: 250 interrupts (one already taken).
        let mut taken = 1;
        for step in 1..=10_000u64 {
            host.set_now(step * 100_000);
            m.poll();
            if m.interrupt_pending() {
                assert_eq!(m.acknowledge_interrupt(), 0x20);
                m.pio_write(0x20, &[0x20]);
                taken += 1;
            }
        }
        let expected = (1_000_000_000u64 * PIT_HZ / 1_000_000_000) / u64::from(count);
        assert_eq!(taken, expected, "interrupts in one second at 250 Hz");
        // A guest that does not take the interrupt for 10 periods sees one, not ten.
        host.set_now(1_100_000_000);
        m.poll();
        assert!(m.interrupt_pending());
        assert_eq!(m.acknowledge_interrupt(), 0x20);
        assert!(!m.interrupt_pending());
    }

    #[test]
    fn echo_path_com1_input_raises_irq4_and_output_is_written() {
        let (mut m, host, out) = pc();
        init_pic(&mut m, !(1 << 4), 0xff);
        for (port, v) in [
            (0x3fb, 0x80),
            (0x3f8, 0x01),
            (0x3f9, 0x00),
            (0x3fb, 0x03),
            (0x3fa, 0x07),
            (0x3fc, 0x0b),
            (0x3f9, 0x01),
        ] {
            m.pio_write(port, &[v]);
        }
        m.poll();
        assert!(!m.interrupt_pending());
        host.push_input(b"hi\x04");
        m.poll();
        assert!(m.interrupt_pending());
        assert_eq!(m.acknowledge_interrupt(), 0x24);
        let mut got = Vec::new();
        while inb(&mut m, 0x3fd) & 1 != 0 {
            got.push(inb(&mut m, 0x3f8));
        }
        m.pio_write(0x20, &[0x20]);
        assert_eq!(got, b"hi\x04");
        assert!(!m.interrupt_pending());
        for &c in &got[..2] {
            m.pio_write(0x3f8, &[c]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        assert_eq!(serial_bytes_written(&m), 2);
        let stats = m.stats();
        assert_eq!(stats.get("serial.tx_bytes"), 2);
        assert_eq!(stats.get("serial.rx_bytes"), 3);
        assert_eq!(stats.get("pic.acknowledged"), 1);
        // More input later interrupts again.
        host.push_input(b"!");
        m.poll();
        assert_eq!(m.acknowledge_interrupt(), 0x24);
    }

    #[test]
    fn rtc_interrupt_arrives_through_the_slave() {
        let (mut m, host, _) = pc();
        init_pic(&mut m, !(1 << 2), !1);
        m.pio_write(0x70, &[0x0c]);
        inb(&mut m, 0x71);
        m.pio_write(0x70, &[0x0b]);
        m.pio_write(0x71, &[0x42]); // PIE, 24 h
        let deadline = m.next_deadline().unwrap();
        host.set_now(deadline);
        m.poll();
        assert_eq!(m.acknowledge_interrupt(), 0x28);
    }

    #[test]
    fn stops_post_codes_and_reset() {
        let (mut m, _, _) = pc();
        for c in [0x10u8, 0x20, 0x30] {
            m.pio_write(POST_PORT, &[c]);
        }
        assert_eq!(post_codes(&m), vec![0x10, 0x20, 0x30]);
        m.pio_write(0x64, &[0xfe]);
        assert_eq!(m.take_stop(), Some(StopRequest::Reset { source: "i8042" }));
        m.pio_write(DEBUG_EXIT_PORT, &[3]);
        assert_eq!(m.take_stop(), Some(StopRequest::DebugExit { value: 3 }));
    }

    #[test]
    fn apic_msrs_cr8_nmi_and_a_relocated_xapic_page_go_through_the_machine() {
        use crate::devices::lapic::GuestTsc;
        let (mut m, host, _) = pc();
        let read32 = |m: &mut Machine, addr: u64| {
            let mut d = [0u8; 4];
            m.mmio_read(addr, &mut d);
            u32::from_le_bytes(d)
        };
        assert!(m.handles_msr(0x1b) && m.handles_msr(0x6e0) && m.handles_msr(0x830));
        assert!(!m.handles_msr(0xc000_0080), "EFER stays with the CPU");
        assert_eq!(read32(&mut m, 0xfee0_0030), 0x0005_0014);
        // Relocate: the page answers at the new base only; the move back restores it.
        let exits = m.position().exits;
        m.wrmsr(0x1b, 0xfed0_0900, GuestTsc::BT).unwrap();
        assert_eq!(
            m.position().exits,
            exits + 1,
            "an APIC MSR write is a device exit"
        );
        assert!(m.is_mmio(0xfed0_0030) && !m.is_mmio(0xfee0_0030));
        assert_eq!(read32(&mut m, 0xfed0_0030), 0x0005_0014);
        assert_eq!(read32(&mut m, 0xfee0_0030), 0xffff_ffff);
        assert_eq!(m.rdmsr(0x1b).unwrap(), 0xfed0_0900);
        assert!(
            m.wrmsr(0x1b, 0xfed0_0901, GuestTsc::BT).is_err(),
            "reserved bit"
        );
        m.wrmsr(0x1b, 0xfee0_0900, GuestTsc::BT).unwrap();
        // x2APIC: MSRs work, the page is gone, a missing register faults.
        m.wrmsr(0x1b, 0xfee0_0d00, GuestTsc::BT).unwrap();
        assert_eq!(m.rdmsr(0x803).unwrap(), 0x0005_0014);
        assert!(!m.is_mmio(0xfee0_0030));
        assert!(m.rdmsr(0x831).is_err(), "no ICR high half in x2APIC mode");
        // CR8 is the TPR.
        m.set_cr8(3);
        assert_eq!(m.rdmsr(0x808).unwrap(), 0x30);
        assert_eq!(m.cr8(), Some(3));
        m.set_cr8(0);
        // NMI and INIT self-IPIs wait for the CPU; INIT resets the APIC but keeps its base.
        m.wrmsr(0x830, 1 << 18 | 4 << 8, GuestTsc::BT).unwrap();
        assert!(m.take_nmi());
        assert!(!m.take_nmi());
        m.wrmsr(0x80f, 0x1ff, GuestTsc::BT).unwrap();
        m.wrmsr(0x830, 1 << 18 | 5 << 8, GuestTsc::BT).unwrap();
        assert!(m.take_init());
        assert_eq!(
            m.rdmsr(0x80f).unwrap(),
            0xff,
            "SVR back to its power-on value"
        );
        assert_eq!(m.rdmsr(0x1b).unwrap(), 0xfee0_0d00);
        // TSC deadline with bt's TSC (guest ns) shifted by an IA32_TSC adjustment.
        m.wrmsr(0x832, 2 << 17 | 0x40, GuestTsc::BT).unwrap();
        host.set_now(1000);
        let tsc = GuestTsc {
            offset: 500,
            ..GuestTsc::BT
        };
        m.wrmsr(0x6e0, 500 + 3000, tsc).unwrap();
        assert_eq!(m.next_deadline(), Some(3000));
        assert_eq!(m.rdmsr(0x6e0).unwrap(), 3500);
    }

    #[test]
    fn machine_state_round_trips_and_rejects_a_shuffled_one() {
        let (mut m, host, _) = pc();
        init_pic(&mut m, 0, 0);
        m.pio_write(0x43, &[0x34]);
        m.pio_write(0x40, &[0x00]);
        m.pio_write(0x40, &[0x10]);
        host.push_input(b"x");
        host.set_now(5_000_000);
        m.poll();
        m.pio_write(0x80, &[0x42]);
        let saved = m.save_devices();
        let (mut n, _, _) = pc();
        n.restore_devices(&saved).unwrap();
        assert_eq!(n.save_devices(), saved);
        assert_eq!(n.next_deadline(), m.next_deadline());
        assert_eq!(n.interrupt_pending(), m.interrupt_pending());
        let mut shuffled = saved.clone();
        shuffled.swap(1, 2);
        assert!(matches!(
            n.restore_devices(&shuffled),
            Err(MachineError::Device(_))
        ));
    }
}
