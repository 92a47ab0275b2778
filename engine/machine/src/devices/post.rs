//! The POST diagnostic port 0x80: firmware and kernels write progress codes there (and use
//! it as an I/O delay). deja keeps every value so `--verbose` can show them.

use super::{Device, DeviceError, DeviceState, IoCtx};
use serde::{Deserialize, Serialize};

/// How many POST codes are kept (the oldest are dropped beyond this).
pub const POST_HISTORY: usize = 4096;

/// Saved state of the POST port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostState {
    /// The last value written (what a POST card would display).
    pub last: u8,
    /// Values written, oldest first (bounded by [`POST_HISTORY`]).
    pub history: Vec<u8>,
    /// Writes in total, including those dropped from `history`.
    pub writes: u64,
}

/// The POST port device.
#[derive(Debug, Default)]
pub struct PostPort {
    state: PostState,
}

impl PostPort {
    /// The codes written so far, oldest first.
    pub fn codes(&self) -> &[u8] {
        &self.state.history
    }
}

impl Device for PostPort {
    fn name(&self) -> &'static str {
        "post"
    }

    fn read(&mut self, _ctx: &mut IoCtx, _addr: u64, data: &mut [u8]) {
        // QEMU's port 0x80 is a write-only ioport; reads see the last value, as POST cards.
        data.fill(self.state.last);
    }

    fn write(&mut self, _ctx: &mut IoCtx, _addr: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        self.state.last = value;
        self.state.writes += 1;
        if self.state.history.len() == POST_HISTORY {
            self.state.history.remove(0);
        }
        self.state.history.push(value);
    }

    fn save(&self) -> DeviceState {
        DeviceState::Post(self.state.clone())
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        match state {
            DeviceState::Post(s) => {
                self.state = s.clone();
                Ok(())
            }
            other => Err(DeviceError::WrongState {
                device: "post",
                found: other.kind(),
            }),
        }
    }
}
