//! The bt engine: a binary translator for x86 that runs every guest in-process.
//!
//! Guest code is decoded with iced-x86 into blocks of operand-specialized micro-ops
//! ([`ir::UOp`]: one handler per instruction and operand form, operands resolved at
//! translation), kept in a block cache keyed by guest-physical address and mode, with a
//! direct-mapped lookup cache in front and direct chaining between blocks of one page.
//! Arithmetic flags are evaluated lazily and dead flags are not produced at all. Privileged
//! and sensitive instructions are monitor calls with exact semantics ([`system`]). Stores
//! into translated code invalidate exactly the blocks they hit, and a store into the running
//! block ends it right after the store. Execution can stop after exactly N instructions.
//!
//! Layers (each a seam): [`translate`] (decode to IR) → [`cache`] (blocks, lookup, chains)
//! → the run loop here (icount, interrupts, exits) → [`exec`] (operands, segmentation, fast
//! TLB) → [`paging`] (the MMU; [`mmu`] strategies plug in through `paging::MmuAdapter`).
//!
//! x87, MMX and SSE/SSE2 run on the host FPU ([`native`]: real 80-bit precision, MXCSR
//! rounding and flags, bit-exact with the host), the environment formats and masked stores in
//! software ([`x87`]), the hot XMM moves and integer operations in software ([`sse`]).
//!
//! Debugging: while TF or RF is set, a breakpoint is armed in DR7, or a #DB is held back by
//! a MOV SS shadow, instructions run one at a time so that single-step traps, instruction
//! breakpoints (faults, suppressed by RF) and data breakpoints (traps after the access) land
//! on exact instruction boundaries; otherwise the debug machinery costs nothing. Hardware
//! task switches live in [`task`].
//!
//! Not implemented yet (each raises #UD or #GP and is counted under `bt.unimplemented.*`):
//! anything beyond SSE2 (SSE3 and later are not in deja's CPUID).

pub mod cache;
pub mod core;
pub mod exec;
pub mod ir;
pub mod mmu;
pub mod native;
pub mod ops;
pub mod paging;
pub mod sse;
pub mod system;
pub mod task;
pub mod track;
pub mod translate;
pub mod x87;

use crate::cache::{Block, BlockCache, Key, Link};
use crate::core::Core;
use crate::exec::{Ctx, MemSys};
use crate::ir::{Ctl, Exc};
use crate::paging::Kind;
use crate::system::EventKind;
use deja_machine::cpu::seg;
use deja_machine::vm_memory::{GuestAddress, GuestMemoryBackend};
use deja_machine::{Cpu, CpuError, CpuState, EngineStats, Exit, Kicker, Limit, Machine};
use iced_x86::{Decoder, DecoderError, DecoderOptions, FlowControl, Instruction};
use std::collections::BTreeMap;
use thiserror::Error;

/// Most instructions in one block.
pub const MAX_BLOCK_INSNS: usize = 64;

/// Failures creating the engine.
#[derive(Debug, Error)]
pub enum BtError {
    /// The machine's configuration cannot be run by bt.
    #[error("bt cannot run this machine: {0}")]
    Unsupported(String),
}

/// The engine's counters.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Blocks translated.
    pub blocks_translated: u64,
    /// Guest instructions translated.
    pub insns_translated: u64,
    /// Block lookups answered by the lookup cache or the map.
    pub lookup_hits: u64,
    /// Block lookups that needed a translation.
    pub lookup_misses: u64,
    /// Blocks invalidated by stores or replaced code.
    pub invalidations: u64,
    /// Transfers that followed a chain link without a lookup.
    pub chained: u64,
    /// Exceptions raised, by vector.
    pub exceptions: BTreeMap<u8, u64>,
    /// Interrupts delivered.
    pub interrupts: u64,
    /// Named counters (unimplemented instructions and the like).
    pub extra: EngineStats,
    /// Set when an event could not be delivered (triple fault).
    pub triple_fault: bool,
}

/// The bt engine.
pub struct BtCpu {
    core: Core,
    mem: MemSys,
    cache: BlockCache,
    stats: Stats,
    icount: u64,
    kicker: Kicker,
    /// Deliver external interrupts only on entry to `run` (exit-synchronous delivery, as kvm
    /// without a PMU does), never in the middle of a run.
    deliver_at_exits: bool,
    /// The guest continues an exit group ([`deja_machine::exit_group`]): until `run`
    /// returns, no interrupt, NMI or INIT is taken, as on kvm (kicks are taken between
    /// elements).
    holding: bool,
    /// Dead-flag elimination is on (off only to check it against exact flags everywhere).
    eliminate_flags: bool,
}

/// What a lookup found.
enum Found {
    Block(u32),
    Fault(Exc),
}

impl BtCpu {
    /// An engine for `machine`, in the reset state.
    pub fn new(machine: &Machine) -> Result<BtCpu, BtError> {
        if machine.layout.ranges.is_empty() {
            return Err(BtError::Unsupported("the machine has no RAM".into()));
        }
        Ok(Self {
            core: Core::from_state(&CpuState::reset()),
            mem: MemSys::new(paging::default_translator()),
            cache: BlockCache::default(),
            stats: Stats::default(),
            icount: 0,
            kicker: Kicker::new(),
            deliver_at_exits: false,
            holding: false,
            eliminate_flags: true,
        })
    }

    /// Turns dead-flag elimination on or off for blocks translated from now on (the cache is
    /// emptied). Off, every instruction produces its flags: the reference that tests check
    /// the optimized translation against, stop by stop.
    pub fn set_dead_flag_elimination(&mut self, on: bool) {
        self.eliminate_flags = on;
        self.cache.clear();
        self.mem.sync_code_pages(&mut self.cache);
    }

    /// Replaces the MMU (the seam where soft TLB, shadow and nested strategies plug in).
    pub fn set_mmu(&mut self, mmu: Box<dyn paging::Translate>) {
        self.mem.set_mmu(mmu);
        self.cache.flush_lookup();
    }

    /// The write-tracking set (for tests and diagnostics).
    pub fn page_track(&self) -> &track::PageTrack {
        self.mem.track()
    }

    /// The counters as a struct.
    pub fn raw_stats(&self) -> &Stats {
        &self.stats
    }

    /// Number of live translated blocks.
    pub fn cached_blocks(&self) -> usize {
        self.cache.len()
    }

    fn mode_bits(c: &Core) -> u32 {
        let bit = |b: bool, n: u32| (b as u32) << n;
        bit(c.protected(), 0)
            | bit(c.vm86(), 1)
            | bit(c.long_mode(), 2)
            | bit(c.seg[seg::CS].l, 3)
            | bit(c.seg[seg::CS].db, 4)
            | bit(c.seg[seg::SS].db, 5)
            | bit(c.cr0 & core::crb::PG != 0, 6)
            | (c.cpl() as u32) << 7
    }

    fn lin_rip(c: &Core) -> u64 {
        let l = c.seg[seg::CS].base.wrapping_add(c.rip);
        if c.mode64() { c.rip } else { l & 0xffff_ffff }
    }

    /// Whether the device exit just made leaves its exit group open
    /// ([`deja_machine::exit_group`]): the next instruction is a repeated string instruction
    /// with elements to go (the same one, between two elements, or a new one).
    fn exit_group_continues(&self, machine: &Machine) -> bool {
        use deja_machine::exit_group;
        let c = &self.core;
        if c.gpr[1] == 0 {
            return false;
        }
        let cs = &c.seg[seg::CS];
        let address_bytes = exit_group::default_address_bytes(cs, c.cr0, c.rflags, c.long_mode());
        let paging = exit_group::PagingRegs {
            cr0: c.cr0,
            cr3: c.cr3,
            cr4: c.cr4,
            efer: c.efer,
        };
        let mut code = [0u8; 15];
        let n = exit_group::fetch_code(&machine.mem, &paging, Self::lin_rip(c), &mut code);
        exit_group::rep_string_continues(&code[..n], address_bytes, c.gpr[1])
    }

    /// Finds or translates the block at the current RIP.
    fn find_block(&mut self, machine: &mut Machine) -> Result<Found, CpuError> {
        let c = &self.core;
        let mode = Self::mode_bits(c);
        let cs_base = c.seg[seg::CS].base;
        if let Some(slot) = self.cache.fast_lookup(c.rip, cs_base, mode) {
            self.stats.lookup_hits += 1;
            return Ok(Found::Block(slot));
        }
        let rip = c.rip;
        let user = c.cpl() == 3;
        if !c.mode64() && rip > c.seg[seg::CS].limit as u64 {
            return Ok(Found::Fault(Exc::gp(0)));
        }
        if c.mode64() && !exec::canonical(rip) {
            return Ok(Found::Fault(Exc::gp(0)));
        }
        let lin = Self::lin_rip(c);
        let regs = paging::Regs {
            cr0: c.cr0,
            cr3: c.cr3,
            cr4: c.cr4,
            efer: c.efer,
        };
        let fetched = self
            .mem
            .mmu
            .translate(&machine.mem, &regs, lin, Kind::Execute, user);
        // Between blocks: an accessed-bit store that hits a block only invalidates it.
        self.mem
            .apply_mmu_events(&mut self.cache, &mut self.stats.invalidations);
        let phys = match fetched {
            Ok(p) => p,
            Err(f) => {
                self.core.cr2 = f.address;
                return Ok(Found::Fault(Exc {
                    vector: 14,
                    error: Some(f.error_code),
                }));
            }
        };
        let key = Key {
            rip,
            cs_base,
            phys,
            mode,
        };
        if let Some(slot) = self.cache.lookup(&key) {
            if self.still_valid(machine, slot) {
                self.stats.lookup_hits += 1;
                self.cache.remember(slot);
                return Ok(Found::Block(slot));
            }
            self.cache.discard(slot);
            self.mem.sync_code_pages(&mut self.cache);
            self.stats.invalidations += 1;
        }
        self.stats.lookup_misses += 1;
        match self.translate(machine, key, lin, &regs, user)? {
            Ok(block) => {
                let slot = self.cache.insert(block);
                // Replacing a block with the same key may have released its pages.
                self.mem.sync_code_pages(&mut self.cache);
                // The pages now hold code: stores to them must take the checked path.
                self.mem.track_code(&self.cache, slot);
                self.cache.remember(slot);
                Ok(Found::Block(slot))
            }
            Err(e) => Ok(Found::Fault(e)),
        }
    }

    /// Whether a cached block's guest bytes are unchanged (code can be replaced behind the
    /// CPU, by DMA or a loader, without a store the engine sees).
    fn still_valid(&self, machine: &Machine, slot: u32) -> bool {
        let Some(b) = self.cache.block(slot) else {
            return false;
        };
        let mut at = 0usize;
        for &(s, e) in &b.extents {
            if e <= s {
                continue;
            }
            let len = (e - s) as usize;
            // Extents never cross a page, so one host pointer covers each.
            if !machine.layout.is_ram(s) && !machine.layout.is_rom(s) {
                return false;
            }
            let Ok(h) = machine.mem.get_host_address(GuestAddress(s)) else {
                return false;
            };
            // SAFETY: `h` points at `len` bytes of one RAM page of guest memory (an extent
            // lies within a page), valid for reads while `machine` is borrowed.
            let now = unsafe { std::slice::from_raw_parts(h as *const u8, len) };
            if now != &b.bytes[at..at + len] {
                return false;
            }
            at += len;
        }
        true
    }

    fn translate(
        &mut self,
        machine: &Machine,
        key: Key,
        lin: u64,
        regs: &paging::Regs,
        user: bool,
    ) -> Result<Result<Block, Exc>, CpuError> {
        let c = &self.core;
        let bitness = c.bitness();
        let in_page = 4096 - (key.phys & 0xfff) as usize;
        let mut avail = in_page;
        if !c.mode64() {
            let lim = c.seg[seg::CS].limit as u64;
            avail = avail.min((lim - key.rip + 1).min(4096) as usize);
        }
        // A block has at most MAX_BLOCK_INSNS instructions of at most 15 bytes: fetch no more
        // than that (not the rest of the page). A first instruction that does not fit `avail`
        // implies `avail` < 15, where this takes all of it.
        let mut bytes = vec![0u8; avail.min(MAX_BLOCK_INSNS * 15)];
        if read_phys(machine, key.phys, &mut bytes).is_err() {
            return Err(CpuError::Unsupported {
                engine: "bt",
                rip: key.rip,
                detail: format!(
                    "instruction fetch from guest-physical {:#x}, which is not RAM",
                    key.phys
                ),
            });
        }
        let mut insns = Vec::new();
        let mut ops = Vec::new();
        let mut extents = [(key.phys, key.phys), (0, 0)];
        let mut decoder = Decoder::with_ip(bitness, &bytes, key.rip, DecoderOptions::NONE);
        let mut insn = Instruction::default();
        let mut consumed = 0usize;
        while decoder.can_decode() && ops.len() < MAX_BLOCK_INSNS {
            decoder.decode_out(&mut insn);
            if decoder.last_error() == DecoderError::NoMoreBytes {
                break;
            }
            consumed += insn.len();
            ops.push(translate::build(&insn, bitness));
            insns.push(insn);
            if insn.flow_control() != FlowControl::Next || ends_block(&insn) {
                break;
            }
        }
        if ops.is_empty() {
            // The first instruction crosses the page (or the CS limit).
            if avail < in_page {
                return Ok(Err(Exc::gp(0)));
            }
            let next_lin = (lin & !0xfff).wrapping_add(0x1000);
            let next_lin = if c.long_mode() {
                next_lin
            } else {
                next_lin & 0xffff_ffff
            };
            let fetched = self
                .mem
                .mmu
                .translate(&machine.mem, regs, next_lin, Kind::Execute, user);
            self.mem
                .apply_mmu_events(&mut self.cache, &mut self.stats.invalidations);
            let p2 = match fetched {
                Ok(p) => p,
                Err(f) => {
                    self.core.cr2 = f.address;
                    return Ok(Err(Exc {
                        vector: 14,
                        error: Some(f.error_code),
                    }));
                }
            };
            let mut more = vec![0u8; 15];
            if read_phys(machine, p2, &mut more).is_err() {
                return Err(CpuError::Unsupported {
                    engine: "bt",
                    rip: key.rip,
                    detail: format!("instruction fetch from non-RAM {p2:#x}"),
                });
            }
            bytes.extend_from_slice(&more);
            let mut decoder = Decoder::with_ip(bitness, &bytes, key.rip, DecoderOptions::NONE);
            decoder.decode_out(&mut insn);
            let len = insn.len();
            ops.push(translate::build(&insn, bitness));
            insns.push(insn);
            let first = avail.min(len);
            consumed = first;
            extents[1] = (p2, p2 + (len - first) as u64);
            bytes.truncate(avail);
            bytes.extend_from_slice(&more[..len - first]);
        }
        extents[0].1 = key.phys + consumed as u64;
        bytes.truncate(consumed + (extents[1].1 - extents[1].0) as usize);
        if extents[1].1 == extents[1].0 {
            bytes.truncate(consumed);
        }
        if self.eliminate_flags {
            translate::eliminate_dead_flags(&mut ops, &insns);
        }
        self.stats.blocks_translated += 1;
        self.stats.insns_translated += ops.len() as u64;
        Ok(Ok(Block {
            key,
            ops,
            extents,
            bytes,
            links: Default::default(),
        }))
    }

    fn ctx<'a>(&'a mut self, machine: &'a mut Machine) -> Ctx<'a> {
        let align_check =
            self.core.cr0 & core::crb::AM != 0 && self.core.rflags & core::fl::AC != 0;
        Ctx {
            core: &mut self.core,
            machine,
            mem: &mut self.mem,
            cache: &mut self.cache,
            icount: self.icount,
            device: false,
            smc_current: false,
            exact_flags: true,
            align_check,
            stats: &mut self.stats,
        }
    }

    /// Whether instructions must run one at a time with the debug checks: single-stepping,
    /// RF to clear, breakpoints armed, or a #DB held back by a MOV SS shadow.
    fn debug_mode(&self) -> bool {
        let c = &self.core;
        c.rflags & (core::fl::TF | core::fl::RF) != 0 || c.dr7 & 0xff != 0 || c.db_deferred != 0
    }

    /// DR6 B0-B3 bits of the enabled instruction breakpoints at the current RIP (none while
    /// RF is set: the instruction a breakpoint handler returns to runs once).
    fn instruction_breakpoints(&self) -> u64 {
        let c = &self.core;
        if c.dr7 & 0xff == 0 || c.rflags & core::fl::RF != 0 {
            return 0;
        }
        let lin = Self::lin_rip(c);
        (0..4)
            .filter(|&n| c.bp_enabled(n) && c.bp_kind(n).0 == 0 && c.dr[n] == lin)
            .fold(0, |bits, n| bits | 1 << n)
    }

    /// Delivers a #DB with `bits` for DR6; `false` on a triple fault.
    fn raise_debug(&mut self, machine: &mut Machine, bits: u64, rip: u64) -> bool {
        let mut ctx = self.ctx(machine);
        system::raise_debug(&mut ctx, bits, rip)
    }

    /// Delivers an exception or interrupt; `false` on a triple fault.
    fn raise(&mut self, machine: &mut Machine, e: Exc, kind: EventKind, rip: u64) -> bool {
        let mut ctx = self.ctx(machine);
        let delivered = system::raise(&mut ctx, e, kind, rip);
        if let Some(w) = self.mem.watch.as_deref_mut()
            && w.unresolved > 0
        {
            // Stores made delivering the event (its frame) belong to the interrupted RIP.
            w.resolve(rip);
        }
        delivered
    }

    /// Moves an NMI the local APIC holds into the CPU's pending events, and performs an
    /// INIT: the CPU goes to its INIT state (the reset vector, real mode; x87/SSE state and
    /// most MSRs kept, SDM table 9-1). deja has one CPU, which is the bootstrap processor,
    /// so it does not wait for a SIPI: it starts at the reset vector as a BSP does after
    /// INIT (the firmware ROM, when the machine has one).
    fn take_nmi_and_init(&mut self, machine: &mut Machine) {
        if machine.take_init() {
            self.stats.extra.add("bt.inits", 1);
            let state = self.core.to_state().after_init();
            self.core = Core::from_state(&state);
            self.mem.mmu.flush(true);
            self.mem.flush_fast();
            self.cache.flush_lookup();
        }
        if machine.take_nmi() {
            self.core.pending.nmi_pending = true;
        }
    }

    /// [`Cpu::run`] itself: runs until an exit.
    fn run_until_exit(&mut self, machine: &mut Machine, limit: Limit) -> Result<Exit, CpuError> {
        self.mem.flush_fast();
        self.cache.flush_lookup();
        self.mem.watching = self.core.data_bps_armed();
        let stop_at = limit.stop_at_icount.unwrap_or(u64::MAX);
        let stop_exits = limit.stop_at_exits.unwrap_or(0);
        let holding = self.holding;
        let mut irq_line = !holding && machine.interrupt_pending();
        // Kicks are taken inside exit groups too, between two elements: a timeout or Ctrl-C
        // must stop a REP string instruction with billions of elements to go. Nothing is
        // polled or delivered there (the run ends), so the exit-group rule still decides
        // every recorded position; the stop itself is named by the exit ordinal
        // (`Limit::stop_at_exits` stops a replay there).
        if self.kicker.pending() {
            // A kick must stop a halted guest too (Ctrl-C while the guest idles).
            self.kicker.take();
            return Ok(Exit::Kicked);
        }
        if !holding {
            self.take_nmi_and_init(machine);
        }
        if self.core.pending.halted {
            let nmi = self.core.pending.nmi_pending && !self.core.pending.nmi_blocked;
            if nmi || (irq_line && self.core.rflags & core::fl::IF != 0) {
                self.core.pending.halted = false;
            } else {
                return Ok(Exit::Halted);
            }
        }
        loop {
            self.cache.bury();
            if self.kicker.pending() {
                self.kicker.take();
                return Ok(Exit::Kicked);
            }
            // At the instruction limit with exits still to come (`Limit::stop_at_exits`):
            // only the unretired instruction at RIP may run on, one op at a time.
            let exits_due = self.icount == stop_at && machine.position().exits < stop_exits;
            if self.icount >= stop_at && !exits_due {
                return Ok(Exit::InstructionLimit);
            }
            if self.core.db_pending != 0 {
                // A #DB trap from the instruction that just retired (single step, data
                // breakpoint, TSS T bit) comes before interrupts.
                let bits = std::mem::take(&mut self.core.db_pending);
                let rip = self.core.rip;
                if !self.raise_debug(machine, bits, rip) {
                    return Ok(self.shutdown("triple fault delivering #DB"));
                }
                continue;
            }
            let shadow = self.core.pending.interrupt_shadow;
            // NMIs and INITs come from device accesses and polls, which end `run`, so they
            // are taken here at the first boundary after one: the same place on replay.
            if !holding {
                self.take_nmi_and_init(machine);
            }
            if self.core.pending.nmi_pending && !self.core.pending.nmi_blocked && !shadow {
                // NMI: vector 2 whatever IF says; further NMIs wait for the next IRET.
                self.core.pending.nmi_pending = false;
                self.core.pending.nmi_blocked = true;
                self.stats.extra.add("bt.nmis", 1);
                let rip = self.core.rip;
                if !self.raise(
                    machine,
                    Exc {
                        vector: 2,
                        error: None,
                    },
                    EventKind::External,
                    rip,
                ) {
                    return Ok(self.shutdown("triple fault delivering an NMI"));
                }
                continue;
            }
            if !self.deliver_at_exits && !holding {
                // MOV CR8 may have lowered the task priority since the last look.
                irq_line = machine.interrupt_pending();
            }
            if irq_line && !shadow && self.core.rflags & core::fl::IF != 0 {
                machine.set_icount(self.icount);
                let vector = machine.acknowledge_interrupt();
                self.stats.interrupts += 1;
                let rip = self.core.rip;
                if !self.raise(
                    machine,
                    Exc {
                        vector,
                        error: None,
                    },
                    EventKind::External,
                    rip,
                ) {
                    return Ok(self.shutdown("triple fault delivering an interrupt"));
                }
                irq_line = machine.interrupt_pending();
                continue;
            }
            if self.deliver_at_exits {
                // Exit-synchronous delivery: whatever was pending at entry had its chance.
                irq_line = false;
            }
            let debug = self.debug_mode();
            if debug {
                let bits = self.instruction_breakpoints();
                if bits != 0 {
                    let rip = self.core.rip;
                    if !self.raise_debug(machine, bits, rip) {
                        return Ok(self.shutdown("triple fault delivering #DB"));
                    }
                    continue;
                }
            }
            let slot = match self.find_block(machine)? {
                Found::Block(s) => s,
                Found::Fault(e) => {
                    let rip = self.core.rip;
                    if !self.raise(machine, e, EventKind::Exception, rip) {
                        return Ok(self.shutdown("triple fault"));
                    }
                    continue;
                }
            };
            // Execute a chain of blocks. Whole blocks that end in a jump or fall through and
            // chain by their links stay in the inner loop, with one context for the chain;
            // anything else (faults, device accesses, stores into the running block, HLT,
            // debug steps, a stop, a kick, an interrupt) leaves it for the handling below.
            let watch_on = self.mem.watch.is_some();
            let mut slot = slot;
            loop {
                let mut ctx = Ctx {
                    core: &mut self.core,
                    machine: &mut *machine,
                    mem: &mut self.mem,
                    cache: &mut self.cache,
                    icount: self.icount,
                    device: false,
                    smc_current: false,
                    exact_flags: true,
                    align_check: false,
                    stats: &mut self.stats,
                };
                let kicker = &self.kicker;
                let left = loop {
                    let shadow_before = ctx.core.pending.interrupt_shadow;
                    let budget = if shadow_before || debug || exits_due {
                        1
                    } else {
                        stop_at - ctx.icount
                    };
                    let flags_before = ctx.core.rflags;
                    let icount_before = ctx.icount;
                    ctx.core.db_hits = 0;
                    let Some(ptr) = ctx.cache.block_ptr(slot) else {
                        break Left::Boundary;
                    };
                    // SAFETY: blocks are boxed and never freed while the chain runs:
                    // invalidation moves them to the graveyard, emptied by `bury` only at the
                    // top of the outer loop, after this reference is dead.
                    let block: &Block = unsafe { &*ptr };
                    ctx.cache.enter(slot);
                    let len = block.ops.len();
                    let n = if (len as u64) <= budget {
                        len
                    } else {
                        budget as usize
                    };
                    ctx.exact_flags = n < len;
                    ctx.align_check =
                        ctx.core.cr0 & core::crb::AM != 0 && ctx.core.rflags & core::fl::AC != 0;
                    let ran = run_ops(&mut ctx, &block.ops[..n], watch_on);
                    if ran.outcome == Ctl::Next && ran.fault.is_none() {
                        ctx.core.rip = block.ops[n - 1].next_rip;
                    }
                    if shadow_before && ran.fault.is_none() {
                        // The instruction after STI / MOV SS has retired.
                        ctx.core.pending.interrupt_shadow = false;
                    }
                    if debug
                        || ran.fault.is_some()
                        || ctx.device
                        || ctx.smc_current
                        || ctx.stats.triple_fault
                        || (ran.outcome != Ctl::Jump && ran.outcome != Ctl::Next)
                    {
                        break Left::Unusual {
                            block: ptr,
                            ran,
                            flags_before,
                            icount_before,
                        };
                    }
                    if ctx.icount >= stop_at
                        || exits_due
                        || kicker.pending()
                        || (irq_line && ctx.core.rflags & core::fl::IF != 0)
                    {
                        break Left::Boundary;
                    }
                    // Chaining: follow a link, or create one to a block in the same page.
                    let rip = ctx.core.rip;
                    let same_page = (block.key.rip ^ rip) & !0xfff == 0;
                    let which = usize::from(block.ops[len - 1].target != rip);
                    if same_page {
                        let link = block.links[which].get();
                        if link.rip == rip
                            && link.slot != u32::MAX
                            && ctx.cache.generation(link.slot) == link.generation
                        {
                            ctx.stats.chained += 1;
                            slot = link.slot;
                            continue;
                        }
                    }
                    break Left::Lookup {
                        block: ptr,
                        same_page,
                        which,
                    };
                };
                let device = ctx.device;
                let triple = ctx.stats.triple_fault;
                self.icount = ctx.icount;
                match left {
                    Left::Boundary => break,
                    Left::Lookup {
                        block,
                        same_page,
                        which,
                    } => match self.find_block(machine)? {
                        Found::Block(next) => {
                            if same_page {
                                // SAFETY: as above; `bury` has not run since.
                                let block: &Block = unsafe { &*block };
                                block.links[which].set(Link {
                                    rip: self.core.rip,
                                    slot: next,
                                    generation: self.cache.generation(next),
                                });
                            }
                            slot = next;
                        }
                        Found::Fault(e) => {
                            let rip = self.core.rip;
                            if !self.raise(machine, e, EventKind::Exception, rip) {
                                return Ok(self.shutdown("triple fault"));
                            }
                            break;
                        }
                    },
                    Left::Unusual {
                        block,
                        ran,
                        flags_before,
                        icount_before,
                    } => {
                        // SAFETY: as above; `bury` has not run since.
                        let block: &Block = unsafe { &*block };
                        if debug {
                            let retired = ran.fault.is_none() && self.icount > icount_before;
                            self.after_debug_step(
                                &block.ops[0],
                                flags_before,
                                retired,
                                ran.restarted,
                            );
                        }
                        if let Some((e, rip)) = ran.fault {
                            if !self.raise(machine, e, EventKind::Exception, rip) {
                                return Ok(self.shutdown("triple fault"));
                            }
                            if device {
                                return Ok(self.device_exit(machine));
                            }
                            break;
                        }
                        if triple {
                            self.stats.triple_fault = false;
                            return Ok(self.shutdown("triple fault in INT n"));
                        }
                        if ran.outcome == Ctl::Freeze {
                            // FERR# raised IRQ13 just now: the CPU takes an interrupt at the
                            // waiting instruction if it can, and otherwise waits there as after
                            // HLT (its handler returns to the instruction, which then runs
                            // again).
                            if !self.deliver_at_exits
                                && machine.interrupt_pending()
                                && self.core.rflags & core::fl::IF != 0
                            {
                                irq_line = true;
                                break;
                            }
                            machine.set_icount(self.icount);
                            machine.note_halt();
                            self.core.pending.halted = true;
                            return Ok(Exit::Halted);
                        }
                        if ran.outcome == Ctl::Halt {
                            machine.set_icount(self.icount);
                            machine.note_halt();
                            if irq_line && self.core.rflags & core::fl::IF != 0 {
                                // An interrupt is already waiting: HLT retires and wakes at
                                // once.
                                break;
                            }
                            self.core.pending.halted = true;
                            return Ok(Exit::Halted);
                        }
                        if device {
                            return Ok(self.device_exit(machine));
                        }
                        // Debug steps, stores into the running block and instructions that
                        // end the chain (End, Restart) go back to the boundary checks.
                        break;
                    }
                }
            }
        }
    }

    /// A device access ended the run. A write to the chipset's coprocessor-error port
    /// ([`deja_machine::machine::FPU_ERROR_PORT`]) asserts IGNNE# while FERR# is asserted;
    /// it is taken here, before the run returns, so no checkpoint sees it pending.
    fn device_exit(&mut self, machine: &mut Machine) -> Exit {
        if machine.take_fpu_error_clear() && self.core.x87_pins.ferr {
            self.core.x87_pins.ignne = true;
        }
        Exit::DeviceAccess
    }

    fn shutdown(&self, why: &str) -> Exit {
        Exit::Shutdown {
            reason: format!(
                "bt: {why} at {:04x}:{:#x}",
                self.core.seg[seg::CS].selector,
                self.core.rip
            ),
        }
    }
}

impl BtCpu {
    /// Debug bookkeeping after one instruction ran in debug mode: the single-step trap (if
    /// TF was set when it started), data breakpoints it hit, the MOV SS / POP SS shadow that
    /// holds both back for one instruction, and RF, which every retired instruction but IRET
    /// clears. A repeated string instruction that stopped between iterations (`restarted`,
    /// not retired) traps for the breakpoints its last iteration hit and for single
    /// stepping, with RIP still at the instruction, which resumes on return from the handler
    /// (SDM 17.3.1.2; under TF one iteration runs per trap).
    fn after_debug_step(
        &mut self,
        op: &ir::UOp,
        flags_before: u64,
        retired: bool,
        restarted: bool,
    ) {
        let c = &mut self.core;
        let hits = std::mem::take(&mut c.db_hits);
        let mut bits = hits;
        let m = op.code.mnemonic();
        // SYSCALL and SYSRET decide their single-step trap by the TF they leave
        // (`system::syscall`).
        let tf_after = matches!(
            m,
            iced_x86::Mnemonic::Syscall | iced_x86::Mnemonic::Sysret | iced_x86::Mnemonic::Sysretq
        );
        if flags_before & core::fl::TF != 0 && !tf_after {
            bits |= core::dbg::BS;
        }
        if !retired {
            if restarted {
                // Single stepping a REP string instruction traps after each iteration.
                c.db_pending |= bits;
            }
            return;
        }
        let ss_load = matches!(m, iced_x86::Mnemonic::Mov | iced_x86::Mnemonic::Pop)
            && op.dst == ir::Operand::Sreg(seg::SS as u8);
        if ss_load {
            c.db_deferred |= bits;
        } else {
            c.db_pending |= bits | std::mem::take(&mut c.db_deferred);
        }
        let iret = matches!(
            m,
            iced_x86::Mnemonic::Iret | iced_x86::Mnemonic::Iretd | iced_x86::Mnemonic::Iretq
        );
        if flags_before & core::fl::RF != 0 && !iret {
            c.rflags &= !core::fl::RF;
        }
    }
}

/// How the ops of one block (or the part of it that fits the budget) ran.
struct OpsRun {
    /// [`Ctl::Next`] when every op fell through; otherwise what ended the block
    /// ([`Ctl::End`] also for a device access, a store into the block and a restart).
    outcome: Ctl,
    /// The exception an op raised, with its RIP.
    fault: Option<(Exc, u64)>,
    /// A REP string instruction stopped between iterations (RIP is still at it).
    restarted: bool,
}

/// Where the chain's inner loop left off.
enum Left {
    /// At a boundary (a stop, a kick, an interrupt to take, a vanished block): back to the
    /// outer loop's checks.
    Boundary,
    /// The next block is not linked: look it up (and link it when it is in the same page).
    Lookup {
        block: *const Block,
        same_page: bool,
        which: usize,
    },
    /// The block ended in a way that needs the general handling.
    Unusual {
        block: *const Block,
        ran: OpsRun,
        flags_before: u64,
        icount_before: u64,
    },
}

/// Runs `ops` in order, counting retired instructions in `ctx.icount`: stops after an op
/// that made a device access or stored into the running block (RIP after it), at an op that
/// did not fall through, or at a fault (RIP at the faulting op). `watch_on`: stores into
/// watched ranges get the RIP of the op that made them.
#[inline(always)]
fn run_ops(ctx: &mut Ctx, ops: &[ir::UOp], watch_on: bool) -> OpsRun {
    for op in ops {
        let result = (op.exec)(ctx, op);
        if watch_on
            && let Some(w) = ctx.mem.watch.as_deref_mut()
            && w.unresolved > 0
        {
            w.resolve(op.rip);
        }
        match result {
            Ok(Ctl::Next) => {
                ctx.icount += 1;
                if ctx.device || ctx.smc_current {
                    ctx.core.rip = op.next_rip;
                    return OpsRun {
                        outcome: Ctl::End,
                        fault: None,
                        restarted: false,
                    };
                }
            }
            Ok(Ctl::Restart) => {
                ctx.core.rip = op.rip;
                return OpsRun {
                    outcome: Ctl::End,
                    fault: None,
                    restarted: true,
                };
            }
            Ok(Ctl::Freeze) => {
                // Not retired: the CPU waits at the instruction.
                ctx.core.rip = op.rip;
                return OpsRun {
                    outcome: Ctl::Freeze,
                    fault: None,
                    restarted: false,
                };
            }
            Ok(c) => {
                ctx.icount += 1;
                return OpsRun {
                    outcome: c,
                    fault: None,
                    restarted: false,
                };
            }
            Err(e) => {
                ctx.core.rip = op.rip;
                return OpsRun {
                    outcome: Ctl::Next,
                    fault: Some((e, op.rip)),
                    restarted: false,
                };
            }
        }
    }
    OpsRun {
        outcome: Ctl::Next,
        fault: None,
        restarted: false,
    }
}

/// Instructions after which a block ends even though they fall through (they change the
/// state blocks are translated under, or are device accesses best kept at block ends).
fn ends_block(insn: &Instruction) -> bool {
    use iced_x86::Mnemonic as M;
    let r0 = insn.op0_register();
    match insn.mnemonic() {
        M::Mov => r0.is_cr() || r0.is_dr() || r0.is_segment_register(),
        M::Pop => r0.is_segment_register(),
        M::Cli
        | M::Sti
        | M::Popf
        | M::Popfd
        | M::Popfq
        | M::Lgdt
        | M::Lidt
        | M::Lldt
        | M::Ltr
        | M::Lmsw
        | M::Invlpg
        | M::Wrmsr
        | M::Lss
        | M::Lds
        | M::Les
        | M::Lfs
        | M::Lgs
        | M::Hlt
        | M::Swapgs => true,
        _ => false,
    }
}

fn read_phys(machine: &Machine, phys: u64, out: &mut [u8]) -> Result<(), ()> {
    let mut done = 0;
    while done < out.len() {
        let p = phys + done as u64;
        // Code runs from RAM and from firmware ROM (the reset vector).
        if !machine.layout.is_ram(p) && !machine.layout.is_rom(p) {
            return Err(());
        }
        let chunk = (4096 - (p & 0xfff) as usize).min(out.len() - done);
        let h = machine
            .mem
            .get_host_address(GuestAddress(p))
            .map_err(|_| ())?;
        // SAFETY: `h` points at a RAM page of guest memory and `chunk` stays within it.
        unsafe { std::ptr::copy_nonoverlapping(h, out[done..].as_mut_ptr(), chunk) };
        done += chunk;
    }
    Ok(())
}

impl Cpu for BtCpu {
    fn name(&self) -> &'static str {
        "bt"
    }

    fn counts_instructions(&self) -> bool {
        true
    }

    fn run(&mut self, machine: &mut Machine, limit: Limit) -> Result<Exit, CpuError> {
        let mut exit = self.run_until_exit(machine, limit);
        // Device exits inside an exit group are not the run loop's business: the guest goes
        // on until the group's last one (a stop request ends it at once).
        while matches!(exit, Ok(Exit::DeviceAccess))
            && machine.stop_request().is_none()
            && self.exit_group_continues(machine)
        {
            if limit
                .stop_at_exits
                .is_some_and(|k| machine.position().exits >= k)
            {
                // Between two elements, where a recording was kicked (`Limit::stop_at_exits`).
                exit = Ok(Exit::InstructionLimit);
                break;
            }
            self.stats.extra.add("bt.exit_group_continued", 1);
            self.holding = true;
            exit = self.run_until_exit(machine, limit);
        }
        self.holding = false;
        // CR8 is the local APIC's TPR, which MMIO and MSR writes change too: the CPU state
        // shows the APIC's value, as kvm's does.
        if let Some(cr8) = machine.cr8() {
            self.core.cr8 = cr8;
        }
        exit
    }

    fn icount(&self) -> u64 {
        self.icount
    }

    fn set_icount(&mut self, icount: u64) {
        self.icount = icount;
    }

    fn set_interrupt_delivery(
        &mut self,
        delivery: deja_machine::InterruptDelivery,
    ) -> Result<(), CpuError> {
        self.deliver_at_exits = delivery == deja_machine::InterruptDelivery::AtExits;
        Ok(())
    }

    fn state(&mut self) -> Result<CpuState, CpuError> {
        Ok(self.core.to_state())
    }

    fn memory_rewritten(&mut self) {
        self.cache.clear();
        self.mem.mmu.flush(true);
        self.mem.flush_fast();
    }

    fn set_state(&mut self, state: &CpuState) -> Result<(), CpuError> {
        self.core = Core::from_state(state);
        // A state load may come with guest memory rewritten behind the engine (a snapshot
        // restore): nothing the MMU built from guest tables can be trusted.
        self.mem.mmu.reset();
        self.mem
            .apply_mmu_events(&mut self.cache, &mut self.stats.invalidations);
        self.mem.flush_fast();
        self.cache.flush_lookup();
        Ok(())
    }

    fn stats(&self) -> EngineStats {
        let s = &self.stats;
        let mut e = EngineStats::default();
        e.add("bt.blocks_translated", s.blocks_translated);
        e.add("bt.insns_translated", s.insns_translated);
        e.add("bt.lookup_hits", s.lookup_hits);
        e.add("bt.lookup_misses", s.lookup_misses);
        e.add("bt.invalidations", s.invalidations);
        e.add("bt.chained", s.chained);
        e.add("bt.instructions", self.icount);
        e.add("bt.interrupts", s.interrupts);
        for (v, n) in &s.exceptions {
            if *n > 0 {
                e.add(&format!("bt.exceptions.{v}"), *n);
            }
        }
        e.merge(&s.extra);
        e.merge(&self.mem.mmu.stats());
        e
    }

    fn kicker(&self) -> Kicker {
        self.kicker.clone()
    }

    fn set_watch(&mut self, ranges: &[(u64, u64)]) -> Result<(), CpuError> {
        self.mem.watch = (!ranges.is_empty()).then(|| {
            Box::new(exec::Watch {
                ranges: ranges.to_vec(),
                ..exec::Watch::default()
            })
        });
        self.mem.flush_fast();
        Ok(())
    }

    fn take_watch_hits(&mut self) -> Vec<deja_machine::WatchHit> {
        match self.mem.watch.as_deref_mut() {
            Some(w) => {
                w.unresolved = 0;
                std::mem::take(&mut w.hits)
            }
            None => Vec::new(),
        }
    }
}
