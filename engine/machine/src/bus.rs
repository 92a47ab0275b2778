//! Address-range routing for the port-I/O and MMIO buses.

use std::collections::BTreeMap;
use thiserror::Error;

/// A bus registration that would overlap an existing one.
#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "bus range {start:#x}+{len:#x} for {name} overlaps {other} at {other_start:#x}+{other_len:#x}"
)]
pub struct BusConflict {
    /// Name of the device being added.
    pub name: &'static str,
    /// Its first address.
    pub start: u64,
    /// Its length.
    pub len: u64,
    /// Name of the device already there.
    pub other: &'static str,
    /// That device's first address.
    pub other_start: u64,
    /// That device's length.
    pub other_len: u64,
}

/// What sits at a bus range: an index the machine resolves, and a name for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusEntry<T> {
    /// First address of the range.
    pub start: u64,
    /// Length of the range in bytes.
    pub len: u64,
    /// The machine's handle for the target.
    pub target: T,
    /// Device name, for diagnostics and statistics.
    pub name: &'static str,
}

/// Non-overlapping address ranges mapped to targets.
#[derive(Debug, Clone)]
pub struct Bus<T: Copy> {
    ranges: BTreeMap<u64, BusEntry<T>>,
}

impl<T: Copy> Default for Bus<T> {
    fn default() -> Self {
        Self {
            ranges: BTreeMap::new(),
        }
    }
}

impl<T: Copy> Bus<T> {
    /// Maps `[start, start + len)` to `target`.
    pub fn insert(
        &mut self,
        start: u64,
        len: u64,
        target: T,
        name: &'static str,
    ) -> Result<(), BusConflict> {
        assert!(len > 0, "bus range for {name} has zero length");
        let end = start + len;
        let conflict = self
            .ranges
            .range(..end)
            .next_back()
            .filter(|(_, e)| e.start + e.len > start)
            .map(|(_, e)| *e);
        if let Some(e) = conflict {
            return Err(BusConflict {
                name,
                start,
                len,
                other: e.name,
                other_start: e.start,
                other_len: e.len,
            });
        }
        self.ranges.insert(
            start,
            BusEntry {
                start,
                len,
                target,
                name,
            },
        );
        Ok(())
    }

    /// The entry covering `addr`, with the offset of `addr` inside it.
    pub fn find(&self, addr: u64) -> Option<(BusEntry<T>, u64)> {
        let (_, e) = self.ranges.range(..=addr).next_back()?;
        (addr - e.start < e.len).then_some((*e, addr - e.start))
    }

    /// Every entry in address order.
    pub fn entries(&self) -> impl Iterator<Item = &BusEntry<T>> {
        self.ranges.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_finds_the_covering_range_and_offset() {
        let mut b = Bus::default();
        b.insert(0x3f8, 8, 1u8, "serial").unwrap();
        b.insert(0x40, 4, 2u8, "pit").unwrap();
        assert_eq!(b.find(0x3fa).map(|(e, o)| (e.target, o)), Some((1, 2)));
        assert_eq!(b.find(0x43).map(|(e, o)| (e.target, o)), Some((2, 3)));
        assert!(b.find(0x44).is_none());
        assert!(b.find(0x3f7).is_none());
        assert!(b.find(0).is_none());
    }

    #[test]
    fn overlaps_are_refused_with_both_names() {
        let mut b = Bus::default();
        b.insert(0x40, 4, 0u8, "pit").unwrap();
        let e = b.insert(0x43, 2, 1u8, "other").unwrap_err();
        assert_eq!(e.other, "pit");
        let e = b.insert(0x3e, 4, 1u8, "low").unwrap_err();
        assert_eq!(e.other, "pit");
        b.insert(0x44, 1, 1u8, "adjacent").unwrap();
        b.insert(0x3f, 1, 1u8, "adjacent-low").unwrap();
    }
}
