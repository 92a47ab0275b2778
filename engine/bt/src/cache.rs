//! The block cache: translated blocks keyed by guest-physical address plus every mode bit
//! that changes decoding or semantics, a direct-mapped lookup cache in front of the map,
//! direct chaining between blocks of the same page, and invalidation with sub-page
//! precision when guest stores hit translated code.

use crate::ir::UOp;
use std::cell::Cell;
use std::collections::HashMap;

/// What a block was translated under. Blocks are only reused when every field matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Key {
    /// RIP of the first instruction.
    pub rip: u64,
    /// CS base (RIP + base is the linear address).
    pub cs_base: u64,
    /// Guest-physical address of the first byte.
    pub phys: u64,
    /// Mode bits (see [`crate::BtCpu`]'s `mode_bits`).
    pub mode: u32,
}

/// A link from a block's exit to a successor in the same page. `repr(C)`: tier-1 code
/// follows links itself (see [`crate::jit`]).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Link {
    /// The successor's RIP.
    pub rip: u64,
    /// Its slot.
    pub slot: u32,
    /// The slot's generation when linked (a stale link never matches).
    pub generation: u32,
    /// The successor's tier-1 chained entry (0: not compiled when linked).
    pub entry: u64,
    /// The successor's instruction count.
    pub len: u64,
}

impl Default for Link {
    fn default() -> Self {
        // No slot has this number, so an unset link never matches.
        Self {
            rip: 0,
            slot: u32::MAX,
            generation: 0,
            entry: 0,
            len: 0,
        }
    }
}

/// One translated block.
#[derive(Debug)]
pub struct Block {
    /// Its key.
    pub key: Key,
    /// One micro-op per guest instruction.
    pub ops: Vec<UOp>,
    /// Guest-physical byte ranges the block was decoded from (second is empty unless the
    /// last instruction crosses a page).
    pub extents: [(u64, u64); 2],
    /// The guest bytes it was decoded from (to notice code replaced behind the CPU's back,
    /// e.g. by DMA or a loader).
    pub bytes: Vec<u8>,
    /// Successor links: taken branch target, fall-through.
    pub links: [Cell<Link>; 2],
    /// Its tier-1 state: heat and compiled code.
    pub jit: crate::jit::BlockJit,
}

// SAFETY: `Cell` fields are only touched by the thread that owns the engine; the block is
// moved between threads only together with the whole `BtCpu`, never shared.
unsafe impl Sync for Block {}

/// Entries in the lookup cache (a power of two; tier-1 code probes it inline).
pub(crate) const LOOKUP_SIZE: usize = 4096;

/// `repr(C)`: tier-1 code probes the lookup cache itself for a RET's target.
#[derive(Clone, Copy, Default)]
#[repr(C)]
pub(crate) struct LookupEntry {
    pub(crate) rip: u64,
    pub(crate) cs_base: u64,
    pub(crate) epoch: u64,
    pub(crate) mode: u32,
    pub(crate) slot: u32,
    pub(crate) generation: u32,
    /// The block's tier-1 chained entry when it was remembered (0: not compiled).
    pub(crate) entry: u64,
    /// The block's instruction count.
    pub(crate) len: u64,
}

/// The cache.
pub struct BlockCache {
    slots: Vec<Option<Box<Block>>>,
    generations: Vec<u32>,
    free: Vec<u32>,
    map: HashMap<Key, u32>,
    lookup: Box<[LookupEntry]>,
    pages: HashMap<u64, Vec<u32>>,
    #[allow(clippy::vec_box)] // boxes keep blocks at stable addresses while they run
    graveyard: Vec<Box<Block>>,
    current: u32,
    current_hit: bool,
    epoch: u64,
    /// Pages whose last block went since [`BlockCache::take_released`] (they stop being
    /// tracked as code, unless a block was added again since).
    released: Vec<u64>,
}

impl Default for BlockCache {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
            map: HashMap::new(),
            lookup: vec![LookupEntry::default(); LOOKUP_SIZE].into_boxed_slice(),
            pages: HashMap::new(),
            graveyard: Vec::new(),
            current: u32::MAX,
            current_hit: false,
            epoch: 1,
            released: Vec::new(),
        }
    }
}

#[inline(always)]
fn lookup_index(rip: u64) -> usize {
    ((rip ^ (rip >> 12)) as usize) & (LOOKUP_SIZE - 1)
}

impl BlockCache {
    /// Fast lookup by linear RIP and mode (valid while paging does not change; flushed on
    /// every mapping change).
    #[inline(always)]
    pub fn fast_lookup(&self, rip: u64, cs_base: u64, mode: u32) -> Option<u32> {
        let e = &self.lookup[lookup_index(rip)];
        if e.epoch == self.epoch
            && e.rip == rip
            && e.cs_base == cs_base
            && e.mode == mode
            && self.generations[e.slot as usize] == e.generation
        {
            Some(e.slot)
        } else {
            None
        }
    }

    /// Full lookup by key.
    pub fn lookup(&self, key: &Key) -> Option<u32> {
        self.map.get(key).copied()
    }

    /// Fills the lookup cache.
    pub fn remember(&mut self, slot: u32) {
        if let Some(b) = self.block(slot) {
            let k = b.key;
            self.lookup[lookup_index(k.rip)] = LookupEntry {
                rip: k.rip,
                cs_base: k.cs_base,
                mode: k.mode,
                slot,
                generation: self.generations[slot as usize],
                epoch: self.epoch,
                entry: b.jit.chain_entry().unwrap_or(0),
                len: b.ops.len() as u64,
            };
        }
    }

    /// Forgets the lookup cache (paging changed).
    pub fn flush_lookup(&mut self) {
        self.epoch += 1;
    }

    /// The block in `slot`.
    #[inline(always)]
    pub fn block(&self, slot: u32) -> Option<&Block> {
        self.slots.get(slot as usize).and_then(|b| b.as_deref())
    }

    /// A raw pointer to the block in `slot`, stable until the block is freed (invalidated
    /// blocks go to a graveyard emptied only by [`BlockCache::bury`]).
    pub fn block_ptr(&self, slot: u32) -> Option<*const Block> {
        self.block(slot).map(|b| b as *const Block)
    }

    /// The generation of `slot`.
    #[inline(always)]
    pub fn generation(&self, slot: u32) -> u32 {
        self.generations
            .get(slot as usize)
            .copied()
            .unwrap_or(u32::MAX)
    }

    /// Inserts a new block, returning its slot.
    pub fn insert(&mut self, block: Block) -> u32 {
        let key = block.key;
        let pages: Vec<u64> = block
            .extents
            .iter()
            .filter(|e| e.1 > e.0)
            .map(|e| e.0 >> 12)
            .collect();
        let slot = match self.free.pop() {
            Some(s) => {
                self.slots[s as usize] = Some(Box::new(block));
                s
            }
            None => {
                self.slots.push(Some(Box::new(block)));
                self.generations.push(0);
                (self.slots.len() - 1) as u32
            }
        };
        if let Some(old) = self.map.insert(key, slot) {
            self.remove(old);
            self.map.insert(key, slot);
        }
        for p in pages {
            self.pages.entry(p).or_default().push(slot);
        }
        slot
    }

    fn remove(&mut self, slot: u32) {
        let Some(b) = self.slots.get_mut(slot as usize).and_then(|s| s.take()) else {
            return;
        };
        if self.map.get(&b.key) == Some(&slot) {
            self.map.remove(&b.key);
        }
        for e in b.extents.iter().filter(|e| e.1 > e.0) {
            let page = e.0 >> 12;
            if let Some(v) = self.pages.get_mut(&page) {
                v.retain(|&s| s != slot);
                if v.is_empty() {
                    self.pages.remove(&page);
                    self.released.push(page);
                }
            }
        }
        self.generations[slot as usize] = self.generations[slot as usize].wrapping_add(1);
        self.free.push(slot);
        if slot == self.current {
            self.current_hit = true;
        }
        self.graveyard.push(b);
    }

    /// Removes a block whose guest bytes no longer match (code replaced behind the CPU).
    pub fn discard(&mut self, slot: u32) {
        self.remove(slot);
    }

    /// Whether a physical page holds translated code.
    #[inline]
    pub fn is_code_page(&self, page: u64) -> bool {
        self.pages.contains_key(&page)
    }

    /// The pages that lost their last block since the last call (a page may since have
    /// gained a block again: check [`BlockCache::is_code_page`]).
    pub fn take_released(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.released)
    }

    /// Invalidates every block overlapping `[phys, phys + len)`; returns whether any was.
    pub fn invalidate_range(&mut self, phys: u64, len: u64, counter: &mut u64) -> bool {
        let end = phys + len;
        let Some(slots) = self.pages.get(&(phys >> 12)) else {
            return false;
        };
        let hit: Vec<u32> = slots
            .iter()
            .copied()
            .filter(|&s| {
                self.block(s)
                    .is_some_and(|b| b.extents.iter().any(|&(a, e)| e > a && a < end && phys < e))
            })
            .collect();
        for s in &hit {
            self.remove(*s);
            *counter += 1;
        }
        !hit.is_empty()
    }

    /// Drops every block (e.g. a state load).
    pub fn clear(&mut self) {
        let all: Vec<u32> = (0..self.slots.len() as u32).collect();
        for s in all {
            self.remove(s);
        }
        self.flush_lookup();
    }

    /// The generation of every slot, indexed by slot (valid until the next insertion), and
    /// the executing block's slot and invalidation flag: what tier-1 code reads and writes
    /// when it chains from one compiled block to the next.
    pub(crate) fn chain_state(&mut self) -> (*const u32, *mut u32, *mut bool) {
        (
            self.generations.as_ptr(),
            &raw mut self.current,
            &raw mut self.current_hit,
        )
    }

    /// The lookup cache's entries and its current epoch (for tier-1 code's inline probe).
    pub(crate) fn lookup_state(&self) -> (*const LookupEntry, *const u64) {
        (self.lookup.as_ptr(), &raw const self.epoch)
    }

    /// Marks the block about to execute, so stores into it can be noticed.
    #[inline(always)]
    pub fn enter(&mut self, slot: u32) {
        self.current = slot;
        self.current_hit = false;
    }

    /// Whether the block being executed was invalidated.
    #[inline(always)]
    pub fn current_invalidated(&self) -> bool {
        self.current_hit
    }

    /// Frees invalidated blocks; only called when no block is executing.
    pub fn bury(&mut self) {
        if !self.graveyard.is_empty() {
            self.graveyard.clear();
        }
        self.current = u32::MAX;
    }

    /// Number of live blocks.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
