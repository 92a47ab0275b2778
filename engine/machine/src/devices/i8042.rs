//! The i8042 keyboard controller at 0x60 (data) and 0x64 (status/command), with no keyboard
//! or mouse attached: enough for kernels to probe it, use its output port (A20 gate, reset
//! line) and reset the machine through it, as on QEMU's `pc`.
//!
//! Reset is requested with the pulse command 0xfe (any 0xf0-0xff pulse with bit 0 clear) or
//! by writing the output port with bit 0 (the CPU reset line, active low) clear. The A20 bit
//! is kept and reported but memory is never wrapped at 1 MiB: deja-pc runs with A20 enabled.

use super::{Device, DeviceError, DeviceState, IoCtx, StopRequest};
use serde::{Deserialize, Serialize};

/// The data port.
pub const DATA_PORT: u16 = 0x60;
/// The status (read) and command (write) port.
pub const COMMAND_PORT: u16 = 0x64;
/// The keyboard's interrupt line.
pub const KBD_IRQ: u32 = 1;
/// The mouse's interrupt line.
pub const AUX_IRQ: u32 = 12;

/// Status: output buffer full.
pub const STATUS_OBF: u8 = 0x01;
/// Status: system flag (set by a passed self-test or the command byte).
pub const STATUS_SYS: u8 = 0x04;
/// Status: the last write was to the command port.
pub const STATUS_CMD: u8 = 0x08;
/// Status: keyboard not inhibited.
pub const STATUS_UNLOCKED: u8 = 0x10;
/// Status: the output buffer holds mouse data.
pub const STATUS_AUX_OBF: u8 = 0x20;

/// Command byte: keyboard interrupt enable.
const MODE_KBD_INT: u8 = 0x01;
/// Command byte: mouse interrupt enable.
const MODE_AUX_INT: u8 = 0x02;
/// Command byte: system flag.
const MODE_SYS: u8 = 0x04;
/// Command byte: keyboard disabled.
const MODE_KBD_DISABLED: u8 = 0x10;
/// Command byte: mouse disabled.
const MODE_AUX_DISABLED: u8 = 0x20;

/// Output port: CPU reset line (active low).
pub const OUT_RESET: u8 = 0x01;
/// Output port: A20 gate.
pub const OUT_A20: u8 = 0x02;

/// Saved state of the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// Status register bits other than the output-buffer flags.
    pub status: u8,
    /// The command byte (controller RAM byte 0).
    pub mode: u8,
    /// The output port.
    pub output_port: u8,
    /// The output buffer, if full, and whether it holds mouse data.
    pub output: Option<(u8, bool)>,
    /// What the data port returns when the buffer is empty (the last byte read).
    pub last_output: u8,
    /// A command waiting for its data byte.
    pub pending_command: Option<u8>,
}

impl Default for I8042State {
    fn default() -> Self {
        Self {
            status: STATUS_CMD | STATUS_UNLOCKED,
            mode: MODE_KBD_INT | MODE_AUX_INT,
            output_port: 0xcc | OUT_A20 | OUT_RESET,
            output: None,
            last_output: 0,
            pending_command: None,
        }
    }
}

/// The keyboard controller.
#[derive(Debug, Default)]
pub struct I8042 {
    state: I8042State,
}

impl I8042 {
    /// A controller in QEMU's reset state: interrupts enabled, A20 on, nothing to read.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the A20 gate is on.
    pub fn a20(&self) -> bool {
        self.state.output_port & OUT_A20 != 0
    }

    fn reply(&mut self, value: u8) {
        self.state.output = Some((value, false));
    }

    fn update_irq(&self, ctx: &mut IoCtx) {
        let (kbd, aux) = match self.state.output {
            Some((_, false)) => (self.state.mode & MODE_KBD_INT != 0, false),
            Some((_, true)) => (false, self.state.mode & MODE_AUX_INT != 0),
            None => (false, false),
        };
        ctx.irq.set_irq(KBD_IRQ, kbd);
        ctx.irq.set_irq(AUX_IRQ, aux);
    }

    fn reset(ctx: &mut IoCtx) {
        *ctx.stop = Some(StopRequest::Reset { source: "i8042" });
    }

    fn write_output_port(&mut self, ctx: &mut IoCtx, value: u8) {
        self.state.output_port = value;
        if value & OUT_RESET == 0 {
            Self::reset(ctx);
        }
    }

    fn command(&mut self, ctx: &mut IoCtx, cmd: u8) {
        self.state.pending_command = None;
        match cmd {
            0x20 => self.reply(self.state.mode),
            // Other controller RAM bytes are not kept.
            0x21..=0x3f => self.reply(0),
            0x60..=0x7f | 0xd1..=0xd4 => self.state.pending_command = Some(cmd),
            0xa7 => self.state.mode |= MODE_AUX_DISABLED,
            0xa8 => self.state.mode &= !MODE_AUX_DISABLED,
            // Interface tests pass: 0 means no clock or data line stuck.
            0xa9 | 0xab => self.reply(0x00),
            0xaa => {
                self.state.status |= STATUS_SYS;
                self.reply(0x55);
            }
            0xad => self.state.mode |= MODE_KBD_DISABLED,
            0xae => self.state.mode &= !MODE_KBD_DISABLED,
            // Input port: keyboard not inhibited.
            0xc0 => self.reply(0x80),
            0xd0 => {
                let mut port = self.state.output_port & !0x30;
                match self.state.output {
                    Some((_, false)) => port |= 0x10,
                    Some((_, true)) => port |= 0x20,
                    None => {}
                }
                self.reply(port);
            }
            0xdd => self.state.output_port &= !OUT_A20,
            0xdf => self.state.output_port |= OUT_A20,
            0xe0 => self.reply(0x00),
            // Pulse output port bits 0-3 low for 6 us: bit 0 is the reset line.
            0xf0..=0xff if cmd & 1 == 0 => Self::reset(ctx),
            _ => {}
        }
    }

    fn data(&mut self, ctx: &mut IoCtx, value: u8) {
        match self.state.pending_command.take() {
            Some(0x60) => {
                self.state.mode = value;
                self.state.status = (self.state.status & !STATUS_SYS) | (value & MODE_SYS);
            }
            // Controller RAM bytes 1-31 are not kept.
            Some(0x61..=0x7f) => {}
            Some(0xd1) => self.write_output_port(ctx, value),
            Some(0xd2) => self.state.output = Some((value, false)),
            Some(0xd3) => self.state.output = Some((value, true)),
            // 0xd4 (to the mouse) and plain data (to the keyboard): nothing is attached, so
            // nothing answers.
            _ => {}
        }
    }

    fn status(&self) -> u8 {
        let obf = match self.state.output {
            Some((_, false)) => STATUS_OBF,
            Some((_, true)) => STATUS_OBF | STATUS_AUX_OBF,
            None => 0,
        };
        (self.state.status & !(STATUS_OBF | STATUS_AUX_OBF)) | obf
    }
}

impl Device for I8042 {
    fn name(&self) -> &'static str {
        "i8042"
    }

    fn read(&mut self, ctx: &mut IoCtx, addr: u64, data: &mut [u8]) {
        let value = match addr as u16 {
            DATA_PORT => {
                if let Some((v, _)) = self.state.output.take() {
                    self.state.last_output = v;
                }
                self.update_irq(ctx);
                self.state.last_output
            }
            COMMAND_PORT => self.status(),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, ctx: &mut IoCtx, addr: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match addr as u16 {
            DATA_PORT => {
                self.state.status &= !STATUS_CMD;
                self.data(ctx, value);
            }
            COMMAND_PORT => {
                self.state.status |= STATUS_CMD;
                self.command(ctx, value);
            }
            _ => {}
        }
        self.update_irq(ctx);
    }

    fn save(&self) -> DeviceState {
        DeviceState::I8042(self.state.clone())
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        let DeviceState::I8042(s) = state else {
            return Err(DeviceError::WrongState {
                device: "i8042",
                found: state.kind(),
            });
        };
        if let Some(cmd) = s.pending_command
            && !matches!(cmd, 0x60..=0x7f | 0xd1..=0xd4)
        {
            return Err(DeviceError::InvalidState {
                device: "i8042",
                detail: format!("command {cmd:#04x} takes no data byte"),
            });
        }
        self.state = s.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testutil::Bench;

    const D: u64 = DATA_PORT as u64;
    const C: u64 = COMMAND_PORT as u64;

    #[test]
    fn commands_answer_through_the_output_buffer() {
        // (command, expected reply)
        let table: &[(u8, u8)] = &[(0xaa, 0x55), (0xab, 0x00), (0xa9, 0x00), (0x20, 0x03)];
        for &(cmd, reply) in table {
            let mut b = Bench::new();
            let mut k = I8042::new();
            assert_eq!(b.inb(&mut k, C) & STATUS_OBF, 0);
            b.out(&mut k, C, cmd);
            let st = b.inb(&mut k, C);
            assert_eq!(
                st & (STATUS_OBF | STATUS_CMD),
                STATUS_OBF | STATUS_CMD,
                "{cmd:#x}"
            );
            assert!(
                b.lines.level[1],
                "{cmd:#x}: IRQ1 with keyboard interrupts enabled"
            );
            assert_eq!(b.inb(&mut k, D), reply, "{cmd:#x}");
            assert_eq!(b.inb(&mut k, C) & STATUS_OBF, 0);
            assert!(!b.lines.level[1]);
        }
    }

    #[test]
    fn command_byte_round_trips_and_sets_the_system_flag() {
        let mut b = Bench::new();
        let mut k = I8042::new();
        b.out(&mut k, C, 0x60);
        b.out(&mut k, D, 0x44);
        assert_eq!(b.inb(&mut k, C) & (STATUS_SYS | STATUS_CMD), STATUS_SYS);
        b.out(&mut k, C, 0x20);
        assert!(!b.lines.level[1], "keyboard interrupt disabled");
        assert_eq!(b.inb(&mut k, D), 0x44);
        b.out(&mut k, C, 0xad);
        b.out(&mut k, C, 0xa7);
        b.out(&mut k, C, 0x20);
        assert_eq!(b.inb(&mut k, D), 0x74);
    }

    #[test]
    fn output_port_carries_a20_and_reset() {
        let mut b = Bench::new();
        let mut k = I8042::new();
        b.out(&mut k, C, 0xd0);
        assert_eq!(b.inb(&mut k, D), 0xcf);
        b.out(&mut k, C, 0xdd);
        assert!(!k.a20());
        b.out(&mut k, C, 0xd1);
        b.out(&mut k, D, 0xcf);
        assert!(k.a20());
        assert!(b.stop.is_none());
        b.out(&mut k, C, 0xd1);
        b.out(&mut k, D, 0xce);
        assert_eq!(b.stop, Some(StopRequest::Reset { source: "i8042" }));
    }

    #[test]
    fn pulse_commands_reset_only_with_bit_0_clear() {
        for (cmd, resets) in [(0xfe, true), (0xf0, true), (0xff, false), (0xfd, false)] {
            let mut b = Bench::new();
            let mut k = I8042::new();
            b.out(&mut k, C, cmd);
            assert_eq!(b.stop.is_some(), resets, "{cmd:#x}");
        }
    }

    #[test]
    fn keyboard_data_gets_no_answer_and_echo_commands_fill_the_buffer() {
        let mut b = Bench::new();
        let mut k = I8042::new();
        b.out(&mut k, D, 0xf2); // identify keyboard: nobody there
        assert_eq!(b.inb(&mut k, C) & STATUS_OBF, 0);
        b.out(&mut k, C, 0xd3);
        b.out(&mut k, D, 0x42);
        assert_eq!(b.inb(&mut k, C) & 0x21, 0x21, "mouse data");
        assert!(b.lines.level[12]);
        assert_eq!(b.inb(&mut k, D), 0x42);
        assert_eq!(b.inb(&mut k, D), 0x42, "empty buffer repeats the last byte");
    }

    #[test]
    fn save_restore_round_trip_and_mismatch() {
        let mut b = Bench::new();
        let mut k = I8042::new();
        b.out(&mut k, C, 0xaa);
        b.out(&mut k, C, 0x60);
        let saved = k.save();
        let mut l = I8042::new();
        l.restore(&saved).unwrap();
        assert_eq!(l.save(), saved);
        b.out(&mut l, D, 0x00);
        b.out(&mut l, C, 0x20);
        assert_eq!(b.inb(&mut l, D), 0x00);
        assert!(matches!(
            l.restore(&DeviceState::DebugExit),
            Err(DeviceError::WrongState {
                device: "i8042",
                ..
            })
        ));
        let DeviceState::I8042(mut bad) = saved else {
            unreachable!()
        };
        bad.pending_command = Some(0xaa);
        assert!(l.restore(&DeviceState::I8042(bad)).is_err());
    }
}
