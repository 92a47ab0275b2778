//! The machine's own counters: typed fields bumped on every device exit without allocating,
//! and named only when someone reads them ([`crate::machine::Machine::stats`]).
//!
//! Counters of accesses to unbacked addresses are bounded: a guest chooses those addresses,
//! so a map with one entry per distinct address would let it grow deja's memory without
//! limit (a REP MOVSQ across the end of RAM touches hundreds of millions of them).

use crate::cpu::EngineStats;
use std::collections::BTreeMap;

/// How many distinct unbacked addresses per bus are counted one by one; accesses to
/// further addresses are counted together under `io.unmapped_*.other`.
pub const MAX_TRACKED_UNMAPPED: usize = 64;

/// What kind of access reached a bus target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum AccessKind {
    /// IN.
    PioRead,
    /// OUT.
    PioWrite,
    /// A load from a device's MMIO window.
    MmioRead,
    /// A store to a device's MMIO window.
    MmioWrite,
    /// RDMSR of a machine MSR.
    Rdmsr,
    /// WRMSR of a machine MSR.
    Wrmsr,
}

impl AccessKind {
    const ALL: [AccessKind; 6] = [
        AccessKind::PioRead,
        AccessKind::PioWrite,
        AccessKind::MmioRead,
        AccessKind::MmioWrite,
        AccessKind::Rdmsr,
        AccessKind::Wrmsr,
    ];

    fn counter_name(self) -> &'static str {
        match self {
            AccessKind::PioRead => "pio_read",
            AccessKind::PioWrite => "pio_write",
            AccessKind::MmioRead => "mmio_read",
            AccessKind::MmioWrite => "mmio_write",
            AccessKind::Rdmsr => "rdmsr",
            AccessKind::Wrmsr => "wrmsr",
        }
    }
}

/// Accesses to addresses no device claims, on one bus.
#[derive(Debug, Clone, Default)]
pub struct UnmappedAccesses {
    per_address: BTreeMap<u64, u64>,
    elsewhere: u64,
    total: u64,
}

impl UnmappedAccesses {
    /// Counts one access to `addr`; allocates only for the first
    /// [`MAX_TRACKED_UNMAPPED`] distinct addresses.
    pub fn note(&mut self, addr: u64) {
        self.total += 1;
        if let Some(n) = self.per_address.get_mut(&addr) {
            *n += 1;
        } else if self.per_address.len() < MAX_TRACKED_UNMAPPED {
            self.per_address.insert(addr, 1);
        } else {
            self.elsewhere += 1;
        }
    }

    fn add_to(&self, stats: &mut EngineStats, prefix: &str, width: usize) {
        if self.total == 0 {
            return;
        }
        stats.add(prefix, self.total);
        for (addr, n) in &self.per_address {
            stats.add(&format!("{prefix}.{addr:#0width$x}"), *n);
        }
        if self.elsewhere > 0 {
            stats.add(&format!("{prefix}.other"), self.elsewhere);
        }
    }
}

/// One named event the machine counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Event {
    /// A write to the coprocessor-error port handled by the machine.
    FpuErrorClear,
    /// NMIs taken by the CPU.
    NmiDelivered,
    /// INITs taken by the CPU.
    InitDelivered,
    /// HLT exits.
    Hlt,
    /// Interrupts acknowledged.
    InterruptDelivered,
    /// Machine resets.
    Reset,
}

impl Event {
    const ALL: [Event; 6] = [
        Event::FpuErrorClear,
        Event::NmiDelivered,
        Event::InitDelivered,
        Event::Hlt,
        Event::InterruptDelivered,
        Event::Reset,
    ];

    fn counter_name(self) -> &'static str {
        match self {
            Event::FpuErrorClear => "io.fpu_error_clear",
            Event::NmiDelivered => "io.nmis_delivered",
            Event::InitDelivered => "io.inits_delivered",
            Event::Hlt => "io.hlt",
            Event::InterruptDelivered => "io.interrupts_delivered",
            Event::Reset => "machine.resets",
        }
    }
}

/// Every counter the machine keeps itself.
#[derive(Debug, Clone, Default)]
pub struct MachineCounters {
    /// Per bus target (index 0: the interrupt controller; i + 1: device i), per kind.
    accesses: Vec<[u64; AccessKind::ALL.len()]>,
    events: [u64; Event::ALL.len()],
    /// Port accesses no device claims.
    pub unmapped_pio: UnmappedAccesses,
    /// MMIO accesses no device claims.
    pub unmapped_mmio: UnmappedAccesses,
}

impl MachineCounters {
    /// Counts an access to the interrupt controller (`None`) or device `Some(i)`.
    pub fn access(&mut self, target: Option<usize>, kind: AccessKind) {
        let slot = target.map_or(0, |i| i + 1);
        if slot >= self.accesses.len() {
            self.accesses.resize(slot + 1, [0; AccessKind::ALL.len()]);
        }
        self.accesses[slot][kind as usize] += 1;
    }

    /// Counts one event.
    pub fn event(&mut self, event: Event) {
        self.events[event as usize] += 1;
    }

    /// Adds every nonzero counter to `stats`, named `io.<target>.<kind>` with the names
    /// `names(None)` (interrupt controller) and `names(Some(i))` (device i) give.
    pub fn add_to<'a>(&self, stats: &mut EngineStats, names: impl Fn(Option<usize>) -> &'a str) {
        for (slot, counts) in self.accesses.iter().enumerate() {
            let name = names(slot.checked_sub(1));
            for kind in AccessKind::ALL {
                let n = counts[kind as usize];
                if n > 0 {
                    stats.add(&format!("io.{name}.{}", kind.counter_name()), n);
                }
            }
        }
        for event in Event::ALL {
            let n = self.events[event as usize];
            if n > 0 {
                stats.add(event.counter_name(), n);
            }
        }
        self.unmapped_pio.add_to(stats, "io.unmapped_pio", 6);
        self.unmapped_mmio.add_to(stats, "io.unmapped_mmio", 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmapped_counters_keep_a_bounded_number_of_addresses() {
        let mut u = UnmappedAccesses::default();
        for addr in 0..1_000_000u64 {
            u.note(addr * 8);
        }
        u.note(0);
        assert_eq!(u.per_address.len(), MAX_TRACKED_UNMAPPED);
        let mut s = EngineStats::default();
        u.add_to(&mut s, "io.unmapped_mmio", 0);
        assert_eq!(s.get("io.unmapped_mmio"), 1_000_001);
        assert_eq!(s.get("io.unmapped_mmio.0x0"), 2);
        assert_eq!(
            s.get("io.unmapped_mmio.other"),
            1_000_000 - MAX_TRACKED_UNMAPPED as u64
        );
        assert_eq!(s.counters.len(), MAX_TRACKED_UNMAPPED + 2);
    }
}
