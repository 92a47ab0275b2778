//! Tier 1: hot blocks compiled to host machine code.
//!
//! Tier 0 (the micro-op interpreter) stays the reference and the fallback. A block that has
//! run [`HOT_THRESHOLD`] times whole (not cut by an instruction limit, a breakpoint or debug
//! stepping) is compiled once ([`emit`]); from then on, whenever the run loop would run the
//! whole block on tier 0 under the same conditions, it calls the compiled code instead. The
//! compiled code keeps the guest's state where tier 0 keeps it, runs every instruction it
//! cannot serve inline through tier 0's own handler ([`jit_op`]), and reports how it left
//! exactly as tier 0's op loop does (instructions retired, a fault with its RIP, a device
//! access, a store into the running block, a taken branch), so the run loop, the instruction
//! count, interrupts and exits cannot tell the tiers apart: the tier is not part of a trace.

mod code;
mod emit;

use crate::cache::{Block, Link, LookupEntry};
use crate::exec::Ctx;
use crate::features::Features;
use crate::ir::{Ctl, UOp};
use code::{CodeMemory, CodeRef};
use iced_x86::{Decoder, DecoderOptions, Instruction};
use std::cell::{Cell, OnceCell};
use std::mem::offset_of;

pub use emit::CompileError;

/// Which tiers run guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tier {
    /// The micro-op interpreter only.
    Interpreter,
    /// Compile every block on its first whole run (for tests that check tier 1 everywhere).
    Eager,
    /// Compile blocks once they are hot ([`HOT_THRESHOLD`]); the default.
    #[default]
    Auto,
}

impl std::str::FromStr for Tier {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "0" => Ok(Tier::Interpreter),
            "1" => Ok(Tier::Eager),
            "auto" => Ok(Tier::Auto),
            other => Err(format!(
                "unknown tier {other:?}: expected 0 (interpreter), 1 (compile every block) or auto"
            )),
        }
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tier::Interpreter => "0",
            Tier::Eager => "1",
            Tier::Auto => "auto",
        })
    }
}

/// Whole runs of a block before [`Tier::Auto`] compiles it: compiling costs tens of
/// microseconds, an interpreted run of a block well under one.
pub const HOT_THRESHOLD: u32 = 50;

/// Tier-1 counters.
#[derive(Debug, Default, Clone)]
pub struct JitStats {
    /// Blocks compiled.
    pub blocks_compiled: u64,
    /// Blocks that could not be compiled (see the log of [`CompileError`]s: none expected).
    pub compile_failures: u64,
    /// Time spent compiling, in nanoseconds.
    pub compile_ns: u64,
    /// Bytes of host code placed.
    pub code_bytes: u64,
    /// Guest instructions compiled to inline host code, and ones left to tier 0's handlers.
    pub ops_native: u64,
    /// See [`JitStats::ops_native`].
    pub ops_fallback: u64,
    /// Entries into compiled blocks.
    pub entries: u64,
    /// Guest instructions retired inside compiled blocks.
    pub instructions: u64,
    /// Calls from compiled code into tier 0: instructions with no inline form.
    pub fallback_not_compiled: u64,
    /// Calls from compiled code into tier 0: a memory access the fast TLB did not serve.
    pub fallback_tlb_miss: u64,
    /// Whole-block runs left on tier 0 because the block was not hot yet.
    pub cold_runs: u64,
    /// Transfers from one compiled block straight into the next (no run loop between).
    pub chains: u64,
    /// Calls into tier 0 from compiled code, by the instruction's mnemonic (indexed by
    /// `iced_x86::Mnemonic as usize`): where tier 1 most needs an inline form.
    pub fallback_by_mnemonic: Vec<u64>,
}

impl JitStats {
    /// The `n` instructions compiled code left to tier 0 most often, with their counts.
    pub fn top_fallbacks(&self, n: usize) -> Vec<(iced_x86::Mnemonic, u64)> {
        let mut all: Vec<(iced_x86::Mnemonic, u64)> = iced_x86::Mnemonic::values()
            .zip(self.fallback_by_mnemonic.iter().copied())
            .filter(|&(_, c)| c > 0)
            .collect();
        all.sort_by_key(|&(_, c)| std::cmp::Reverse(c));
        all.truncate(n);
        all
    }
}

/// A block's tier-1 state.
#[derive(Debug, Default)]
pub struct BlockJit {
    /// Whole runs seen so far (up to the threshold).
    heat: Cell<u32>,
    /// The compiled code, or `None` once compiling failed.
    code: OnceCell<Option<Compiled>>,
}

/// A block's compiled code.
#[derive(Debug)]
struct Compiled {
    code: CodeRef,
    /// Where chaining blocks enter it (past the prologue).
    chain_entry: u64,
}

impl BlockJit {
    /// The entry other compiled blocks chain to, when the block is compiled.
    pub fn chain_entry(&self) -> Option<u64> {
        self.code.get()?.as_ref().map(|c| c.chain_entry)
    }
}

/// What compiled code and its helper share: pointers into the guest state and tier 0's
/// TLBs, the per-run position, and the way out.
#[repr(C)]
pub(crate) struct Frame {
    gpr: *mut u64,
    rflags: *mut u64,
    read_tlb: *const u8,
    write_tlb: *const u8,
    fs_base: u64,
    gs_base: u64,
    out_rip: u64,
    ctx: *mut (),
    ops: *const UOp,
    icount_base: u64,
    watch_on: bool,
    run: Option<crate::run::OpsRun>,
    /// The block executing (compiled code sets it as it chains).
    block: *const Block,
    /// Instructions retired by the blocks before it in this chain.
    chain_retired: u64,
    /// The block cache's generations, current slot and invalidation flag.
    generations: *const u32,
    current: *mut u32,
    current_hit: *mut bool,
    /// The kick flag: a pending kick stops chaining.
    kick: *const std::sync::atomic::AtomicBool,
    /// Instructions the chain may retire in all (0: no chaining).
    limit: u64,
    /// Transfers from one compiled block straight into the next.
    chains: u64,
    /// The block cache's lookup cache and its epoch (for RET's target).
    lookup: *const LookupEntry,
    epoch: *const u64,
}

const FRAME_GPR: i32 = offset_of!(Frame, gpr) as i32;
const FRAME_RFLAGS: i32 = offset_of!(Frame, rflags) as i32;
const FRAME_READ_TLB: i32 = offset_of!(Frame, read_tlb) as i32;
const FRAME_WRITE_TLB: i32 = offset_of!(Frame, write_tlb) as i32;
const FRAME_FS_BASE: i32 = offset_of!(Frame, fs_base) as i32;
const FRAME_GS_BASE: i32 = offset_of!(Frame, gs_base) as i32;
const FRAME_OUT_RIP: i32 = offset_of!(Frame, out_rip) as i32;
const FRAME_OPS: i32 = offset_of!(Frame, ops) as i32;
const FRAME_BLOCK: i32 = offset_of!(Frame, block) as i32;
const FRAME_CHAIN_RETIRED: i32 = offset_of!(Frame, chain_retired) as i32;
const FRAME_GENERATIONS: i32 = offset_of!(Frame, generations) as i32;
const FRAME_CURRENT: i32 = offset_of!(Frame, current) as i32;
const FRAME_CURRENT_HIT: i32 = offset_of!(Frame, current_hit) as i32;
const FRAME_KICK: i32 = offset_of!(Frame, kick) as i32;
const FRAME_LIMIT: i32 = offset_of!(Frame, limit) as i32;
const FRAME_CHAINS: i32 = offset_of!(Frame, chains) as i32;
const FRAME_LOOKUP: i32 = offset_of!(Frame, lookup) as i32;
const FRAME_EPOCH: i32 = offset_of!(Frame, epoch) as i32;
const LOOKUP_RIP: i32 = offset_of!(LookupEntry, rip) as i32;
const LOOKUP_CS_BASE: i32 = offset_of!(LookupEntry, cs_base) as i32;
const LOOKUP_EPOCH: i32 = offset_of!(LookupEntry, epoch) as i32;
const LOOKUP_MODE: i32 = offset_of!(LookupEntry, mode) as i32;
const LOOKUP_SLOT: i32 = offset_of!(LookupEntry, slot) as i32;
const LOOKUP_GENERATION: i32 = offset_of!(LookupEntry, generation) as i32;
const LOOKUP_ENTRY: i32 = offset_of!(LookupEntry, entry) as i32;
const LOOKUP_LEN: i32 = offset_of!(LookupEntry, len) as i32;
const LOOKUP_BYTES: i32 = std::mem::size_of::<LookupEntry>() as i32;
const LOOKUP_MASK: i32 = crate::cache::LOOKUP_SIZE as i32 - 1;
const LINK_RIP: i32 = offset_of!(Link, rip) as i32;
const LINK_SLOT: i32 = offset_of!(Link, slot) as i32;
const LINK_GENERATION: i32 = offset_of!(Link, generation) as i32;
const LINK_ENTRY: i32 = offset_of!(Link, entry) as i32;
const LINK_LEN: i32 = offset_of!(Link, len) as i32;
/// The soft TLB's index mask, as the compiled probe uses it.
const TLB_MASK: i32 = crate::exec::TLB_SIZE as i32 - 1;

/// How compiled code left (the high half of its return value; the low half is the number of
/// instructions retired).
const EXIT_NEXT: u64 = 0;
const EXIT_JUMP: u64 = 1;
const EXIT_HELPER: u64 = 2;
/// Why compiled code called tier 0 (the high half of the helper's argument).
const FALLBACK_NOT_COMPILED: u64 = 0;
const FALLBACK_TLB_MISS: u64 = 1;

/// The tier-1 compiler and its code memory.
#[derive(Debug, Default)]
pub struct Jit {
    memory: CodeMemory,
    /// The first compile error seen (none is expected; kept to be reported).
    pub first_error: Option<String>,
}

// SAFETY: the code memory is only written through `&mut Jit`; compiled code is executed only
// by the thread running the engine, which owns the `Jit`.
unsafe impl Send for Jit {}

impl Jit {
    /// The compiled code of `block`, compiling it when `tier` says it is time; `None` runs
    /// the block on tier 0.
    pub(crate) fn code_for(
        &mut self,
        block: &Block,
        slot: u32,
        tier: Tier,
        stats: &mut JitStats,
        features: impl FnOnce() -> Features,
    ) -> Option<usize> {
        let state = &block.jit;
        if let Some(code) = state.code.get() {
            return code.as_ref().map(|c| c.code.entry());
        }
        if tier == Tier::Auto {
            let heat = state.heat.get() + 1;
            state.heat.set(heat);
            if heat < HOT_THRESHOLD {
                stats.cold_runs += 1;
                return None;
            }
        }
        let started = std::time::Instant::now();
        let compiled = self.compile(block, slot, &features(), stats);
        stats.compile_ns += started.elapsed().as_nanos() as u64;
        let code = match compiled {
            Ok(code) => Some(code),
            Err(e) => {
                stats.compile_failures += 1;
                self.first_error.get_or_insert_with(|| e.to_string());
                None
            }
        };
        let entry = code.as_ref().map(|c| c.code.entry());
        let _ = state.code.set(code);
        entry
    }

    fn compile(
        &mut self,
        block: &Block,
        slot: u32,
        features: &Features,
        stats: &mut JitStats,
    ) -> Result<Compiled, CompileError> {
        let mode = block.key.mode;
        let mode64 = mode & 0b1100 == 0b1100;
        let bitness = if mode64 {
            64
        } else if mode & 0b11 == 0b01 && mode & (1 << 4) != 0 {
            32
        } else {
            16
        };
        let user = (mode >> 7) & 3 == 3;
        let mut decoder =
            Decoder::with_ip(bitness, &block.bytes, block.key.rip, DecoderOptions::NONE);
        let insns: Vec<Instruction> = (0..block.ops.len()).map(|_| decoder.decode()).collect();
        let place = emit::Place {
            mode: block.key.mode,
            cs_base: block.key.cs_base,
            block: block as *const Block as u64,
            slot,
            ops: block.ops.as_ptr() as u64,
            links: [
                block.links[0].as_ptr() as u64,
                block.links[1].as_ptr() as u64,
            ],
        };
        let out = emit::compile(
            &block.ops,
            &insns,
            features,
            mode64,
            user,
            jit_op as *const () as u64,
            &place,
        )?;
        let code = self
            .memory
            .place(&out.bytes)
            .ok_or(CompileError::NoExecutableMemory)?;
        stats.blocks_compiled += 1;
        stats.code_bytes += out.bytes.len() as u64;
        stats.ops_native += u64::from(out.native);
        stats.ops_fallback += u64::from(out.fallback);
        let chain_entry = (code.entry() + out.chain_offset) as u64;
        Ok(Compiled { code, chain_entry })
    }

    /// Runs the compiled code at `entry` for `block` (all of it, as tier 0's op loop would),
    /// returning what tier 0's loop returns.
    pub(crate) fn run(
        ctx: &mut Ctx,
        block: &Block,
        entry: usize,
        watch_on: bool,
        chain: Chain,
    ) -> (crate::run::OpsRun, *const Block) {
        // Inside compiled code the arithmetic flags are always in RFLAGS.
        ctx.core.materialize();
        let base = ctx.icount;
        let (fs_base, gs_base) = segment_bases(ctx);
        let (read_tlb, write_tlb) = ctx.mem.tlb_bases();
        let (generations, current, current_hit) = ctx.cache.chain_state();
        let (lookup, epoch) = ctx.cache.lookup_state();
        // Every pointer the compiled code and its helper use derives from this one.
        let ctx_ptr: *mut Ctx = ctx;
        // SAFETY: `ctx_ptr` comes from a live `&mut Ctx`; these are field addresses.
        let (gpr, rflags) = unsafe {
            let core = &mut *(*ctx_ptr).core;
            (core.gpr.as_mut_ptr(), &raw mut core.rflags)
        };
        let mut frame = Frame {
            gpr,
            rflags,
            read_tlb,
            write_tlb,
            fs_base,
            gs_base,
            out_rip: 0,
            ctx: ctx_ptr.cast(),
            ops: block.ops.as_ptr(),
            icount_base: base,
            watch_on,
            run: None,
            block,
            chain_retired: 0,
            generations,
            current,
            current_hit,
            kick: chain.kick,
            limit: chain.limit,
            chains: 0,
            lookup,
            epoch,
        };
        // SAFETY: `entry` is code `emit::compile` produced for this block (kept alive by the
        // block's `CodeRef`), a complete `extern "sysv64" fn(*mut Frame) -> u64` that touches
        // only the frame, the guest register file and RFLAGS it points to, the RAM pages the
        // TLB entries point to, and the context through `jit_op`; `frame` outlives the call and
        // nothing else uses `ctx` meanwhile.
        let result = unsafe {
            let f: extern "sysv64" fn(*mut Frame) -> u64 = std::mem::transmute(entry);
            f(&mut frame)
        };
        // SAFETY: the compiled code has returned; `ctx_ptr` is the `&mut Ctx` given.
        let ctx = unsafe { &mut *ctx_ptr };
        let retired = result & 0xffff_ffff;
        ctx.stats.jit.entries += 1;
        ctx.stats.jit.chains += frame.chains;
        ctx.stats.jit.instructions += retired;
        ctx.icount = base + retired;
        let ran = match result >> 32 {
            EXIT_JUMP => {
                ctx.core.rip = frame.out_rip;
                crate::run::OpsRun::outcome(Ctl::Jump)
            }
            EXIT_HELPER => frame
                .run
                .take()
                .unwrap_or(crate::run::OpsRun::outcome(Ctl::Next)),
            _ => crate::run::OpsRun::outcome(Ctl::Next),
        };
        (ran, frame.block)
    }
}

fn segment_bases(ctx: &Ctx) -> (u64, u64) {
    use deja_machine::cpu::seg;
    (ctx.core.seg[seg::FS].base, ctx.core.seg[seg::GS].base)
}

/// What a compiled run may do beyond its first block: chain into compiled successors while
/// no kick is pending and the instructions retired stay within `limit`.
pub(crate) struct Chain {
    /// The kick flag.
    pub kick: *const std::sync::atomic::AtomicBool,
    /// Instructions the whole chain may retire (0: the first block only).
    pub limit: u64,
}

/// Runs op `index` (low half of `arg`; the high half is the reason, for the counters) of the
/// frame's block on tier 0, at its position. Returns 0 to go on with the next op, or the
/// compiled code's return value (EXIT_HELPER with the instructions retired) with the outcome
/// in the frame.
extern "sysv64" fn jit_op(frame: *mut Frame, arg: u64) -> u64 {
    // SAFETY: compiled code passes the frame `Jit::run` made, which is live for the whole
    // call; its `ctx` points to the context `Jit::run` was given, unused by anyone else until
    // the compiled code returns, and `ops` to the block's ops, which outlive the run.
    let (frame, ctx, op) = unsafe {
        let frame = &mut *frame;
        let ctx = &mut *frame.ctx.cast::<Ctx>();
        let op = &*frame.ops.add((arg & 0xffff_ffff) as usize);
        (frame, ctx, op)
    };
    let index = arg & 0xffff_ffff;
    let stats = &mut ctx.stats.jit;
    match arg >> 32 {
        FALLBACK_TLB_MISS => stats.fallback_tlb_miss += 1,
        _ => {
            stats.fallback_not_compiled += 1;
            let m = op.code.mnemonic() as usize;
            if stats.fallback_by_mnemonic.len() <= m {
                stats.fallback_by_mnemonic.resize(m + 1, 0);
            }
            stats.fallback_by_mnemonic[m] += 1;
        }
    }
    ctx.icount = frame.icount_base + frame.chain_retired + index;
    let ran = crate::run::run_one(ctx, op, frame.watch_on);
    // Compiled code reads the flags from RFLAGS and the segment bases from the frame.
    ctx.core.materialize();
    (frame.fs_base, frame.gs_base) = segment_bases(ctx);
    match ran {
        None => 0,
        Some(run) => {
            let retired = ctx.icount - frame.icount_base;
            frame.run = Some(run);
            EXIT_HELPER << 32 | retired
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_parse_and_print() {
        for t in [Tier::Interpreter, Tier::Eager, Tier::Auto] {
            assert_eq!(t.to_string().parse::<Tier>(), Ok(t));
        }
        assert!("2".parse::<Tier>().unwrap_err().contains("unknown tier"));
    }
}
