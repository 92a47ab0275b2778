//! A 16550A UART (COM1 at 0x3f8, IRQ 4) built on `vm_superio::Serial`.
//!
//! vm-superio supplies the registers, the 64-byte receive FIFO and the transmit path. deja
//! adds what a deterministic machine needs: input only from
//! [`Host::serial_input`](crate::Host::serial_input), taken when devices are polled and the
//! FIFO has room; an interrupt line driven as a level from the interrupt identification
//! (vm-superio's trigger is an edge notification meant for eventfds, so it is ignored); and
//! two corrections that make IIR follow the 16550 data sheet: a received-data interrupt
//! stays pending while the FIFO holds data and its enable bit is set (vm-superio clears it
//! on every RBR and IIR read), an IIR read clears the THR-empty interrupt only when that is
//! the one it reports, and disabling an interrupt in IER withdraws it.

use super::{Device, DeviceError, DeviceState, IoCtx};
use crate::cpu::EngineStats;
use serde::{Deserialize, Serialize};
use std::io::Write;
use vm_superio::Trigger;
use vm_superio::serial::{NoEvents, Serial as Uart, SerialState as UartState};

/// COM1's ports.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;
/// Size of the receive FIFO (vm-superio's).
pub const RX_FIFO_SIZE: usize = 64;

const THR: u8 = 0;
const IIR: u8 = 2;

const IER_RDA: u8 = 0x01;
const IER_THRE: u8 = 0x02;
const IIR_NONE: u8 = 0x01;
const IIR_THRE: u8 = 0x02;
const IIR_RDA: u8 = 0x04;
const IIR_FIFO_ENABLED: u8 = 0xc0;
const LCR_DLAB: u8 = 0x80;
const MCR_LOOP: u8 = 0x10;

/// Saved state of the UART.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte.
    pub divisor_low: u8,
    /// Divisor latch, high byte.
    pub divisor_high: u8,
    /// Interrupt enable register.
    pub ier: u8,
    /// Pending interrupts as vm-superio keeps them (bit 0 set: none).
    pub iir: u8,
    /// Line control register.
    pub lcr: u8,
    /// Line status register.
    pub lsr: u8,
    /// Modem control register.
    pub mcr: u8,
    /// Modem status register.
    pub msr: u8,
    /// Scratch register.
    pub scr: u8,
    /// Received bytes not yet read, oldest first.
    pub rx_fifo: Vec<u8>,
    /// Bytes the guest transmitted.
    pub tx_bytes: u64,
    /// The interrupt line's level.
    pub irq_level: bool,
}

impl SerialState {
    fn from_uart(s: &UartState, tx_bytes: u64, irq_level: bool) -> Self {
        Self {
            divisor_low: s.baud_divisor_low,
            divisor_high: s.baud_divisor_high,
            ier: s.interrupt_enable,
            iir: s.interrupt_identification,
            lcr: s.line_control,
            lsr: s.line_status,
            mcr: s.modem_control,
            msr: s.modem_status,
            scr: s.scratch,
            rx_fifo: s.in_buffer.clone(),
            tx_bytes,
            irq_level,
        }
    }

    fn to_uart(&self) -> UartState {
        UartState {
            baud_divisor_low: self.divisor_low,
            baud_divisor_high: self.divisor_high,
            interrupt_enable: self.ier,
            interrupt_identification: self.iir,
            line_control: self.lcr,
            line_status: self.lsr,
            modem_control: self.mcr,
            modem_status: self.msr,
            scratch: self.scr,
            in_buffer: self.rx_fifo.clone(),
        }
    }
}

/// vm-superio's interrupt notification, unused: the line follows IIR instead.
struct NoTrigger;

impl Trigger for NoTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

type Output = Box<dyn Write + Send>;

/// The COM1 UART.
pub struct Serial {
    uart: Uart<NoTrigger, NoEvents, Output>,
    tx_bytes: u64,
    irq_level: bool,
    rx_bytes: u64,
}

impl Serial {
    /// A UART in its reset state whose transmitted bytes go to `out`.
    pub fn new(out: Output) -> Self {
        Self {
            uart: Uart::new(NoTrigger, out),
            tx_bytes: 0,
            irq_level: false,
            rx_bytes: 0,
        }
    }

    /// Bytes the guest transmitted.
    pub fn bytes_written(&self) -> u64 {
        self.tx_bytes
    }

    /// Replaces the UART's registers, keeping its output.
    fn set_uart_state(&mut self, state: &UartState) -> Result<(), DeviceError> {
        let placeholder = Uart::new(NoTrigger, Box::new(std::io::sink()) as Output);
        let out = std::mem::replace(&mut self.uart, placeholder).into_writer();
        match Uart::from_state(state, NoTrigger, NoEvents, out) {
            Ok(uart) => {
                self.uart = uart;
                Ok(())
            }
            Err(e) => Err(DeviceError::InvalidState {
                device: "serial",
                detail: format!(
                    "{e} (receive FIFO holds {} bytes, at most {RX_FIFO_SIZE})",
                    state.in_buffer.len()
                ),
            }),
        }
    }

    /// Makes the pending interrupts agree with IER and the FIFO, then drives the line.
    fn update(&mut self, ctx: &mut IoCtx, iir_override: Option<u8>) {
        let mut st = self.uart.state();
        let mut pending =
            iir_override.unwrap_or(st.interrupt_identification) & (IIR_RDA | IIR_THRE);
        if st.interrupt_enable & IER_RDA != 0 && !st.in_buffer.is_empty() {
            pending |= IIR_RDA;
        } else {
            pending &= !IIR_RDA;
        }
        if st.interrupt_enable & IER_THRE == 0 {
            pending &= !IIR_THRE;
        }
        let iir = if pending == 0 { IIR_NONE } else { pending };
        if iir != st.interrupt_identification {
            st.interrupt_identification = iir;
            // Cannot fail: the FIFO came from the UART itself.
            let _ = self.set_uart_state(&st);
        }
        let level = iir & IIR_NONE == 0;
        if level != self.irq_level {
            self.irq_level = level;
            ctx.irq.set_irq(COM1_IRQ, level);
        }
    }

    fn read_reg(&mut self, ctx: &mut IoCtx, offset: u8) -> u8 {
        if offset == IIR {
            let pending = self.uart.state().interrupt_identification;
            let (id, after) = if pending & IIR_RDA != 0 {
                (IIR_RDA, pending)
            } else if pending & IIR_THRE != 0 {
                // Reading IIR acknowledges the THR-empty interrupt it reports.
                (IIR_THRE, pending & !IIR_THRE)
            } else {
                (IIR_NONE, pending)
            };
            self.update(ctx, Some(after));
            return IIR_FIFO_ENABLED | id;
        }
        let value = self.uart.read(offset);
        self.update(ctx, None);
        value
    }

    fn write_reg(&mut self, ctx: &mut IoCtx, offset: u8, value: u8) {
        let st = self.uart.state();
        let transmits =
            offset == THR && st.line_control & LCR_DLAB == 0 && st.modem_control & MCR_LOOP == 0;
        // Output errors lose the byte, as a disconnected line would; the guest cannot tell.
        if self.uart.write(offset, value).is_ok() && transmits {
            self.tx_bytes += 1;
        }
        self.update(ctx, None);
    }
}

impl Device for Serial {
    fn name(&self) -> &'static str {
        "serial"
    }

    fn read(&mut self, ctx: &mut IoCtx, addr: u64, data: &mut [u8]) {
        let offset = (addr & 7) as u8;
        let value = self.read_reg(ctx, offset);
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn write(&mut self, ctx: &mut IoCtx, addr: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            self.write_reg(ctx, (addr & 7) as u8, value);
        }
    }

    fn poll(&mut self, ctx: &mut IoCtx) {
        let st = self.uart.state();
        if st.modem_control & MCR_LOOP != 0 {
            // In loopback the receiver is disconnected from the line.
            return;
        }
        let mut room = self.uart.fifo_capacity();
        let mut got = false;
        while room > 0 {
            let Some(byte) = ctx.host.serial_input(ctx.pos) else {
                break;
            };
            // Cannot fail: there is room and the UART is not in loopback.
            let _ = self.uart.enqueue_raw_bytes(&[byte]);
            room -= 1;
            self.rx_bytes += 1;
            got = true;
        }
        if got {
            self.update(ctx, None);
        }
    }

    fn wants_input(&self) -> bool {
        true
    }

    fn add_stats(&self, stats: &mut EngineStats) {
        stats.add("serial.tx_bytes", self.tx_bytes);
        stats.add("serial.rx_bytes", self.rx_bytes);
    }

    fn save(&self) -> DeviceState {
        DeviceState::Serial(SerialState::from_uart(
            &self.uart.state(),
            self.tx_bytes,
            self.irq_level,
        ))
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        let DeviceState::Serial(s) = state else {
            return Err(DeviceError::WrongState {
                device: "serial",
                found: state.kind(),
            });
        };
        self.set_uart_state(&s.to_uart())?;
        self.tx_bytes = s.tx_bytes;
        self.irq_level = s.irq_level;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testutil::Bench;
    use std::sync::{Arc, Mutex};

    /// An output the test can read while the device owns it.
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

    const BASE: u64 = COM1_BASE as u64;
    const LSR: u64 = BASE + 5;

    fn setup() -> (Bench, Serial, SharedBuf) {
        let buf = SharedBuf::default();
        (Bench::new(), Serial::new(Box::new(buf.clone())), buf)
    }

    #[test]
    fn transmit_goes_to_the_output_and_is_counted() {
        let (mut b, mut s, buf) = setup();
        assert_eq!(b.inb(&mut s, LSR) & 0x60, 0x60, "THRE and TEMT");
        for &c in b"hi\n" {
            b.out(&mut s, BASE, c);
        }
        assert_eq!(&*buf.0.lock().unwrap(), b"hi\n");
        assert_eq!(s.bytes_written(), 3);
        // Divisor latch writes are not output.
        b.out(&mut s, BASE + 3, 0x80);
        b.out(&mut s, BASE, 0x01);
        b.out(&mut s, BASE + 1, 0x00);
        assert_eq!(b.inb(&mut s, BASE), 0x01);
        b.out(&mut s, BASE + 3, 0x03);
        assert_eq!(s.bytes_written(), 3);
        assert_eq!(buf.0.lock().unwrap().len(), 3);
        // Loopback: the byte comes back on the receiver, not the line.
        b.out(&mut s, BASE + 4, 0x10);
        b.out(&mut s, BASE, b'x');
        assert_eq!(b.inb(&mut s, LSR) & 1, 1);
        assert_eq!(b.inb(&mut s, BASE), b'x');
        assert_eq!(s.bytes_written(), 3);
    }

    #[test]
    fn scripted_input_is_received_with_irq4() {
        let (mut b, mut s, _) = setup();
        b.host.push_input(b"ab");
        b.poll(&mut s);
        assert_eq!(b.inb(&mut s, LSR) & 1, 1, "data ready");
        assert!(!b.lines.level[4], "receive interrupt not enabled yet");
        b.out(&mut s, BASE + 1, IER_RDA);
        assert!(b.lines.level[4], "enabling with data pending raises IRQ4");
        assert_eq!(b.inb(&mut s, BASE + 2), 0xc4);
        assert!(b.lines.level[4], "IIR read keeps received-data pending");
        assert_eq!(b.inb(&mut s, BASE), b'a');
        assert!(b.lines.level[4], "still data in the FIFO");
        assert_eq!(b.inb(&mut s, BASE), b'b');
        assert!(!b.lines.level[4]);
        assert_eq!(b.inb(&mut s, LSR) & 1, 0);
        assert_eq!(b.inb(&mut s, BASE + 2), 0xc1);
        b.host.push_input(b"c");
        b.poll(&mut s);
        assert!(b.lines.level[4]);
        assert_eq!(b.lines.rises[4], 2);
        b.out(&mut s, BASE + 1, 0);
        assert!(!b.lines.level[4], "disabling withdraws the interrupt");
    }

    #[test]
    fn input_waits_while_the_fifo_is_full() {
        let (mut b, mut s, _) = setup();
        let input: Vec<u8> = (0..100u8).collect();
        b.host.push_input(&input);
        b.poll(&mut s);
        assert_eq!(b.host.0.lock().unwrap().input.len(), 100 - RX_FIFO_SIZE);
        for i in 0..10 {
            assert_eq!(b.inb(&mut s, BASE), i);
        }
        b.poll(&mut s);
        assert_eq!(
            b.host.0.lock().unwrap().input.len(),
            100 - RX_FIFO_SIZE - 10
        );
        let rest: Vec<u8> = (0..RX_FIFO_SIZE).map(|_| b.inb(&mut s, BASE)).collect();
        assert_eq!(rest, (10..74u8).collect::<Vec<_>>());
    }

    #[test]
    fn thr_empty_interrupt_is_acknowledged_by_reading_iir() {
        let (mut b, mut s, _) = setup();
        b.out(&mut s, BASE + 1, IER_THRE);
        assert!(b.lines.level[4], "THR empty as soon as enabled");
        assert_eq!(b.inb(&mut s, BASE + 2), 0xc2);
        assert!(!b.lines.level[4]);
        assert_eq!(b.inb(&mut s, BASE + 2), 0xc1);
        b.out(&mut s, BASE, b'z');
        assert!(b.lines.level[4], "transmitting empties THR again");
        // Received data outranks THR empty; reading IIR then leaves THR empty pending.
        b.out(&mut s, BASE + 1, IER_THRE | IER_RDA);
        b.host.push_input(b"q");
        b.poll(&mut s);
        assert_eq!(b.inb(&mut s, BASE + 2), 0xc4);
        assert_eq!(b.inb(&mut s, BASE), b'q');
        assert_eq!(b.inb(&mut s, BASE + 2), 0xc2);
        assert_eq!(b.inb(&mut s, BASE + 2), 0xc1);
        assert!(!b.lines.level[4]);
    }

    #[test]
    fn save_restore_round_trip_and_mismatch() {
        let (mut b, mut s, _) = setup();
        b.out(&mut s, BASE + 7, 0x5a);
        b.out(&mut s, BASE + 1, IER_RDA);
        b.host.push_input(b"xyz");
        b.poll(&mut s);
        b.out(&mut s, BASE, b'!');
        let saved = s.save();
        let buf = SharedBuf::default();
        let mut t = Serial::new(Box::new(buf.clone()));
        t.restore(&saved).unwrap();
        assert_eq!(t.save(), saved);
        assert_eq!(t.bytes_written(), 1);
        assert_eq!(b.inb(&mut t, BASE + 7), 0x5a);
        assert_eq!(b.inb(&mut t, BASE), b'x');
        b.out(&mut t, BASE, b'?');
        assert_eq!(
            &*buf.0.lock().unwrap(),
            b"?",
            "output stays the new device's"
        );
        assert!(matches!(
            t.restore(&DeviceState::DebugExit),
            Err(DeviceError::WrongState {
                device: "serial",
                ..
            })
        ));
        let DeviceState::Serial(mut bad) = saved else {
            unreachable!()
        };
        bad.rx_fifo = vec![0; RX_FIFO_SIZE + 1];
        assert!(matches!(
            t.restore(&DeviceState::Serial(bad)),
            Err(DeviceError::InvalidState { .. })
        ));
    }
}
