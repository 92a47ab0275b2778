//! Test helpers for code that writes traces: sinks that fail the way disks do.

use std::io::{self, Write};

/// A sink that accepts `budget` bytes and then fails every write with "no space left on
/// device" (ENOSPC), after a partial write of whatever budget remained, as a full disk does.
#[derive(Debug, Clone, Default)]
pub struct FailingSink {
    /// Bytes accepted so far.
    pub written: Vec<u8>,
    /// Bytes still accepted.
    pub budget: usize,
}

impl FailingSink {
    /// A sink that accepts `budget` bytes.
    pub fn new(budget: usize) -> Self {
        Self {
            written: Vec::new(),
            budget,
        }
    }
}

impl Write for FailingSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.budget == 0 {
            return Err(io::Error::from_raw_os_error(libc_enospc()));
        }
        let n = buf.len().min(self.budget);
        self.written.extend_from_slice(&buf[..n]);
        self.budget -= n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// ENOSPC on every platform deja runs on (Linux).
const fn libc_enospc() -> i32 {
    28
}
