//! Write tracking of guest-physical pages: one set of reasons per page, shared by everything
//! in the engine that must see guest stores to a page before they are forgotten.
//!
//! Two users, one mechanism (as KVM's `gfn_track` serves both its shadow MMU and its other
//! write-tracking clients): the block cache marks pages holding translated code
//! ([`CODE`]), so a store into them invalidates the blocks it hits; the shadow MMU marks the
//! guest page-table pages its shadow entries were built from ([`PAGE_TABLE`]), so a store
//! into them updates or zaps those entries. A page may carry both reasons.
//!
//! The store path checks a page with one load ([`PageTrack::reasons`], a byte per guest page
//! number). The invariant the engine keeps on top of it: a page with any reason never has a
//! host pointer in the write fast path (`exec::MemSys` drops them when a page becomes
//! tracked), so the unchecked fast path can only reach untracked pages.

/// The page holds guest paging structures a shadow entry was built from.
pub const PAGE_TABLE: u8 = 1 << 0;
/// The page holds guest code the block cache translated.
pub const CODE: u8 = 1 << 1;

/// Reasons per guest-physical page number. Pages beyond the array have none; the array grows
/// to the highest page ever tracked (bounded by the guest's RAM, since only RAM pages are
/// translated or walked through).
#[derive(Debug, Default, Clone)]
pub struct PageTrack {
    reasons: Vec<u8>,
    tracked: usize,
}

impl PageTrack {
    /// No page tracked.
    pub fn new() -> Self {
        Self::default()
    }

    /// The reasons guest page number `page` is tracked for (0: untracked).
    #[inline(always)]
    pub fn reasons(&self, page: u64) -> u8 {
        usize::try_from(page)
            .ok()
            .and_then(|i| self.reasons.get(i))
            .copied()
            .unwrap_or(0)
    }

    /// Adds `reason` to `page`; returns whether the page was untracked before (the caller
    /// must then drop any cached write permission for it).
    pub fn track(&mut self, page: u64, reason: u8) -> bool {
        let Ok(i) = usize::try_from(page) else {
            return false;
        };
        if i >= self.reasons.len() {
            // Grow geometrically so a guest touching ascending pages costs amortised O(1).
            let len = (i + 1).max(self.reasons.len() * 2).max(256);
            self.reasons.resize(len, 0);
        }
        let before = self.reasons[i];
        self.reasons[i] = before | reason;
        if before == 0 && reason != 0 {
            self.tracked += 1;
        }
        before == 0 && reason != 0
    }

    /// Removes `reason` from `page` (other reasons stay).
    pub fn untrack(&mut self, page: u64, reason: u8) {
        let Some(r) = usize::try_from(page)
            .ok()
            .and_then(|i| self.reasons.get_mut(i))
        else {
            return;
        };
        let before = *r;
        *r &= !reason;
        if before != 0 && *r == 0 {
            self.tracked -= 1;
        }
    }

    /// Removes `reason` from every page (an MMU replaced or reset).
    pub fn untrack_all(&mut self, reason: u8) {
        for r in self.reasons.iter_mut() {
            if *r != 0 {
                *r &= !reason;
                if *r == 0 {
                    self.tracked -= 1;
                }
            }
        }
    }

    /// Pages with at least one reason.
    pub fn tracked_pages(&self) -> usize {
        self.tracked
    }

    /// The pages tracked for `reason`, ascending (for tests and diagnostics).
    pub fn pages_with(&self, reason: u8) -> Vec<u64> {
        self.reasons
            .iter()
            .enumerate()
            .filter(|(_, r)| **r & reason != 0)
            .map(|(i, _)| i as u64)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_accumulate_and_are_removed_one_at_a_time() {
        let mut t = PageTrack::new();
        assert_eq!(t.reasons(7), 0);
        assert!(t.track(7, CODE), "first reason: newly tracked");
        assert!(!t.track(7, PAGE_TABLE), "second reason: already tracked");
        assert!(!t.track(7, CODE), "same reason again");
        assert_eq!(t.reasons(7), CODE | PAGE_TABLE);
        assert_eq!(t.tracked_pages(), 1);
        t.untrack(7, CODE);
        assert_eq!(t.reasons(7), PAGE_TABLE, "the page-table reason survives");
        assert_eq!(t.tracked_pages(), 1);
        t.untrack(7, PAGE_TABLE);
        assert_eq!(t.reasons(7), 0);
        assert_eq!(t.tracked_pages(), 0);
        assert!(t.track(7, PAGE_TABLE), "untracked pages track anew");
    }

    #[test]
    fn untracking_unknown_pages_and_huge_page_numbers_is_harmless() {
        let mut t = PageTrack::new();
        t.untrack(1 << 40, CODE);
        assert_eq!(t.reasons(u64::MAX), 0);
        assert_eq!(t.reasons(1 << 40), 0);
        assert!(t.track(3, CODE));
        t.untrack(3, PAGE_TABLE);
        assert_eq!(
            t.reasons(3),
            CODE,
            "removing an absent reason keeps the others"
        );
        assert_eq!(t.reasons(4), 0, "neighbours are untouched");
    }

    #[test]
    fn untrack_all_removes_one_reason_everywhere() {
        let mut t = PageTrack::new();
        t.track(1, PAGE_TABLE);
        t.track(2, PAGE_TABLE);
        t.track(2, CODE);
        t.track(900, CODE);
        t.untrack_all(PAGE_TABLE);
        assert_eq!(t.pages_with(PAGE_TABLE), Vec::<u64>::new());
        assert_eq!(t.pages_with(CODE), vec![2, 900]);
        assert_eq!(t.tracked_pages(), 2);
    }
}
