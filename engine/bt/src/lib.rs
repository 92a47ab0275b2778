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
//! → the run loop (`run.rs`: icount, interrupts, exits; blocks are found and built in
//! `block.rs`; this file is the facade, [`BtCpu`] and its [`Cpu`] impl) → [`exec`]
//! (operands, segmentation, fast TLB, and the positioned device and host accesses) →
//! [`paging`] (the MMU; [`mmu`] strategies plug in through `paging::MmuAdapter`).
//!
//! x87, MMX and SSE to SSE4.2 run on the host FPU ([`native`]: real 80-bit precision, MXCSR
//! rounding and flags, bit-exact with the host), the environment formats and masked stores in
//! software ([`x87`]), the hot XMM moves and integer operations in software ([`sse`]).
//!
//! The instruction set is the machine's CPUID table's ([`features`]): an instruction whose
//! CPUID feature bit the table does not report raises #UD, as on a CPU without it.
//!
//! Debugging: while TF or RF is set, a breakpoint is armed in DR7, or a #DB is held back by
//! a MOV SS shadow, instructions run one at a time so that single-step traps, instruction
//! breakpoints (faults, suppressed by RF) and data breakpoints (traps after the access) land
//! on exact instruction boundaries; otherwise the debug machinery costs nothing. Hardware
//! task switches live in [`task`].
//!
//! Not implemented yet (each raises #UD or #GP and is counted under `bt.unimplemented.*`):
//! anything the CPUID table does not report (AVX, AES-NI, XSAVE and the like), and with it
//! any instruction of a reported feature that its table leaves out.

pub mod cache;
pub mod core;
pub mod exec;
pub mod features;
pub mod ir;
pub mod jit;
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

mod block;
mod run;

use crate::cache::BlockCache;
use crate::core::Core;
use crate::exec::MemSys;
use deja_machine::{Cpu, CpuError, CpuState, EngineStats, Exit, Kicker, Limit, Machine};
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
    /// Tier 1's counters.
    pub jit: jit::JitStats,
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
    /// Where (RIP, icount) a REP string instruction last stopped between two elements that
    /// made no device access (a chunk of RAM-only elements): a kick there stops the run at a
    /// point (icount, exit ordinal) does not name ([`Cpu::stopped_inside_instruction`]).
    rep_paused_at: Option<(u64, u64)>,
    /// Dead-flag elimination is on (off only to check it against exact flags everywhere).
    eliminate_flags: bool,
    /// Linear addresses a debugger stops before (sorted; see [`Cpu::set_breakpoints`]).
    breakpoints: Vec<u64>,
    /// The last run stopped at one of them.
    breakpoint_stop: bool,
    /// Which tiers run guest code.
    tier: jit::Tier,
    /// Tier 1's compiler and code.
    jit: jit::Jit,
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
            rep_paused_at: None,
            eliminate_flags: true,
            breakpoints: Vec::new(),
            breakpoint_stop: false,
            tier: jit::Tier::default(),
            jit: jit::Jit::default(),
        })
    }

    /// Chooses the tiers that run guest code ([`jit::Tier`]). The tier is not part of a
    /// run's identity: every tier retires the same instructions with the same effects.
    pub fn set_tier(&mut self, tier: jit::Tier) {
        self.tier = tier;
    }

    /// The first error compiling a block for tier 1, if any (none is expected; such a block
    /// runs on tier 0).
    pub fn jit_error(&self) -> Option<&str> {
        self.jit.first_error.as_deref()
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

    fn collect_dirty_pages(&mut self, _machine: &Machine) -> bool {
        // Every store that missed the write TLB marked its page; dropping the TLB makes the
        // next store to each page miss once more.
        self.mem.flush_write_tlb();
        true
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
        let j = &s.jit;
        for (name, v) in [
            ("blocks_compiled", j.blocks_compiled),
            ("compile_failures", j.compile_failures),
            ("compile_us", j.compile_ns / 1000),
            ("code_bytes", j.code_bytes),
            ("ops_native", j.ops_native),
            ("ops_fallback", j.ops_fallback),
            ("entries", j.entries),
            ("instructions", j.instructions),
            ("fallback.not_compiled", j.fallback_not_compiled),
            ("fallback.tlb_miss", j.fallback_tlb_miss),
            ("cold_runs", j.cold_runs),
            ("chains", j.chains),
        ] {
            if v > 0 {
                e.add(&format!("bt.tier1.{name}"), v);
            }
        }
        for (m, n) in j.top_fallbacks(12) {
            e.add(&format!("bt.tier1.fallback_insn.{m:?}"), n);
        }
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

    fn stopped_inside_instruction(&self) -> bool {
        self.rep_paused_at == Some((self.core.rip, self.icount))
    }

    fn set_watch(&mut self, ranges: &[(u64, u64)]) -> Result<(), CpuError> {
        self.set_watch_access(ranges, &[])
    }

    fn set_watch_access(
        &mut self,
        writes: &[(u64, u64)],
        reads: &[(u64, u64)],
    ) -> Result<(), CpuError> {
        self.mem.watch = (!writes.is_empty() || !reads.is_empty()).then(|| {
            Box::new(exec::Watch {
                ranges: writes.to_vec(),
                reads: reads.to_vec(),
                ..exec::Watch::default()
            })
        });
        // No fast entry may stay for a newly watched page, for reads or writes.
        self.mem.flush_fast();
        Ok(())
    }

    fn set_breakpoints(&mut self, linear: &[u64]) -> Result<(), CpuError> {
        let mut b = linear.to_vec();
        b.sort_unstable();
        b.dedup();
        self.breakpoints = b;
        Ok(())
    }

    fn stopped_at_breakpoint(&self) -> bool {
        self.breakpoint_stop
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
