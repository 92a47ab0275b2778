//! Guest memory as digests and checkpoints see it, kept current in proportion to what the
//! guest wrote: a hash per non-zero page, combined by lane-wise addition (so one page's
//! change updates the sum without touching the others), and the set of pages written since
//! the last checkpoint. The machine's dirty-page bitmap ([`Machine::drain_dirty_pages`],
//! filled by `vm_memory` and by the engine through [`Cpu::collect_dirty_pages`]) says which
//! pages to look at; when the engine cannot tell, every resident page is rehashed, which is
//! what a digest cost before dirty tracking.

use deja_machine::vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};
use deja_machine::{Cpu, Machine};
use deja_traces::PAGE_SIZE;
use std::collections::{BTreeMap, BTreeSet};

/// A page's contribution to the memory sum: BLAKE3 of its number and contents, as four
/// little-endian lanes. Zero pages contribute nothing (they are not in the map).
pub type PageHash = [u64; 4];

/// The hash of page `n` holding `page` (a trailing partial page counts as zero-padded, which
/// hashing the bytes present gives as long as both sides hash the same bytes), or `None` for
/// a page of zeros.
pub fn page_hash(n: u64, page: &[u8]) -> Option<PageHash> {
    if page.iter().all(|&b| b == 0) {
        return None;
    }
    let mut h = blake3::Hasher::new();
    h.update(&n.to_le_bytes());
    h.update(page);
    let bytes = h.finalize();
    let mut lanes = [0u64; 4];
    for (lane, chunk) in lanes.iter_mut().zip(bytes.as_bytes().chunks_exact(8)) {
        *lane = u64::from_le_bytes(chunk.try_into().expect("8-byte chunk"));
    }
    Some(lanes)
}

fn add(sum: &mut PageHash, h: &PageHash) {
    for (s, x) in sum.iter_mut().zip(h) {
        *s = s.wrapping_add(*x);
    }
}

fn sub(sum: &mut PageHash, h: &PageHash) {
    for (s, x) in sum.iter_mut().zip(h) {
        *s = s.wrapping_sub(*x);
    }
}

/// The memory sum computed from scratch over every resident page: what [`MemoryHashes`]
/// keeps incrementally (the oracle its tests compare with).
pub fn full_memory_sum(machine: &Machine) -> PageHash {
    let mut sum = [0; 4];
    crate::state::for_each_resident_page(machine, |n, page| {
        if let Some(h) = page_hash(n, page) {
            add(&mut sum, &h);
        }
    });
    sum
}

/// The bytes of page `n` of guest memory (RAM or ROM), or `None` when no region holds it.
/// The guest must not be running.
fn page_bytes(machine: &Machine, n: u64) -> Option<&[u8]> {
    let addr = n.checked_mul(PAGE_SIZE as u64)?;
    let region = machine.mem.find_region(GuestAddress(addr))?;
    let offset = addr - region.start_addr().0;
    let len = (PAGE_SIZE as u64).min(region.len() - offset) as usize;
    let host = region.get_host_address(MemoryRegionAddress(offset)).ok()?;
    // SAFETY: `host..host + len` lies inside the region's mapping, which `machine.mem` keeps
    // alive for the borrow; the guest is not running, so nothing writes it meanwhile.
    Some(unsafe { std::slice::from_raw_parts(host, len) })
}

/// Per-page hashes of guest memory and the pages written since the last checkpoint.
#[derive(Debug, Default)]
pub struct MemoryHashes {
    pages: BTreeMap<u64, PageHash>,
    sum: PageHash,
    since_checkpoint: BTreeSet<u64>,
    /// Whether the hashes were ever computed (the first refresh rehashes every page).
    primed: bool,
    /// Pages rehashed so far, and full rescans: what digests cost.
    pub pages_hashed: u64,
    /// Refreshes that had to rehash every resident page.
    pub full_scans: u64,
}

impl MemoryHashes {
    /// Hashes that know nothing yet: the first [`MemoryHashes::refresh`] reads all memory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets the hashes, so the next refresh reads all memory (after memory was rewritten
    /// in a way the dirty bitmap may not show).
    pub fn invalidate(&mut self) {
        self.primed = false;
    }

    /// Brings the hashes up to date with guest memory: rehashes the pages written since the
    /// last refresh, or every resident page when the engine cannot say which were written.
    pub fn refresh(&mut self, machine: &Machine, cpu: &mut dyn Cpu) {
        let exact = cpu.collect_dirty_pages(machine);
        let mut dirty = Vec::new();
        machine.drain_dirty_pages(|n| dirty.push(n));
        if exact && self.primed {
            for n in dirty {
                let now = page_bytes(machine, n).and_then(|p| page_hash(n, p));
                self.pages_hashed += 1;
                self.set(n, now);
            }
            return;
        }
        let mut seen = BTreeMap::new();
        crate::state::for_each_resident_page(machine, |n, page| {
            if let Some(h) = page_hash(n, page) {
                seen.insert(n, h);
            }
        });
        self.pages_hashed += seen.len() as u64;
        self.full_scans += 1;
        let gone: Vec<u64> = self
            .pages
            .keys()
            .filter(|n| !seen.contains_key(n))
            .copied()
            .collect();
        for n in gone {
            self.set(n, None);
        }
        for (n, h) in seen {
            self.set(n, Some(h));
        }
        self.primed = true;
    }

    fn set(&mut self, n: u64, now: Option<PageHash>) {
        let before = match now {
            Some(h) => self.pages.insert(n, h),
            None => self.pages.remove(&n),
        };
        if before == now {
            return;
        }
        if let Some(b) = before {
            sub(&mut self.sum, &b);
        }
        if let Some(h) = now {
            add(&mut self.sum, &h);
        }
        self.since_checkpoint.insert(n);
    }

    /// Whether the hashes describe memory as of some refresh (they were computed at least
    /// once and not thrown away since): only then does a refresh tell which pages changed.
    pub fn primed(&self) -> bool {
        self.primed
    }

    /// The pages whose contents changed since the last checkpoint (or the last call), as of
    /// the last [`MemoryHashes::refresh`]; starts the next set. A page written back to what
    /// it held may be listed; a page that changed is always listed, provided the hashes were
    /// [`primed`](MemoryHashes::primed) at that checkpoint.
    pub fn take_changed(&mut self) -> BTreeSet<u64> {
        std::mem::take(&mut self.since_checkpoint)
    }

    /// The sum of every non-zero page's hash as of the last refresh.
    pub fn sum(&self) -> PageHash {
        self.sum
    }

    /// Non-zero pages as of the last refresh.
    pub fn resident_pages(&self) -> usize {
        self.pages.len()
    }

    /// The pages a checkpoint taken now must store, with their contents (zero-padded to a
    /// whole page): every non-zero page when `full`, else those that changed since the
    /// previous checkpoint (a page that became zero is stored as zeros). Call after
    /// [`MemoryHashes::refresh`]; starts the next checkpoint's set.
    pub fn checkpoint_pages(&mut self, machine: &Machine, full: bool) -> Vec<(u64, Vec<u8>)> {
        let changed = std::mem::take(&mut self.since_checkpoint);
        let numbers: Vec<u64> = if full {
            self.pages.keys().copied().collect()
        } else {
            changed.into_iter().collect()
        };
        numbers
            .into_iter()
            .filter_map(|n| {
                let mut page = page_bytes(machine, n)?.to_vec();
                page.resize(PAGE_SIZE, 0);
                Some((n, page))
            })
            .collect()
    }
}
