//! The run loop: chains of cached blocks up to the instruction limit, interrupts, NMI and
//! INIT, exceptions and their escalation, debug traps, HLT and device exits.

use crate::block::Found;
use crate::cache::{Block, Link};
use crate::core::Core;
use crate::exec::{Ctx, positioned};
use crate::features::Features;
use crate::ir::{Ctl, Exc};
use crate::jit::{Chain, Jit, Tier};
use crate::system::EventKind;
use crate::{BtCpu, core, ir, system};
use deja_machine::cpu::seg;
use deja_machine::{CpuError, Exit, Limit, Machine};

impl BtCpu {
    /// Whether the device exit just made leaves its exit group open
    /// ([`deja_machine::exit_group`]): the next instruction is a repeated string instruction
    /// with elements to go (the same one, between two elements, or a new one).
    pub(crate) fn exit_group_continues(&self, machine: &Machine) -> bool {
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

    fn ctx<'a>(&'a mut self, machine: &'a mut Machine) -> Ctx<'a> {
        let align_check =
            self.core.cr0 & core::crb::AM != 0 && self.core.rflags & core::fl::AC != 0;
        Ctx::new(
            &mut self.core,
            machine,
            &mut self.mem,
            &mut self.cache,
            &mut self.stats,
            self.icount,
            align_check,
        )
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
    pub(crate) fn run_until_exit(
        &mut self,
        machine: &mut Machine,
        limit: Limit,
    ) -> Result<Exit, CpuError> {
        self.mem.flush_fast();
        self.cache.flush_lookup();
        self.mem.watching = self.core.data_bps_armed();
        self.breakpoint_stop = false;
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
                let vector = positioned(machine, self.icount).acknowledge_interrupt();
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
            // A debugger's breakpoint (not the guest's DR7): stop before the instruction.
            if !self.breakpoints.is_empty()
                && !exits_due
                && self
                    .breakpoints
                    .binary_search(&Self::lin_rip(&self.core))
                    .is_ok()
            {
                self.breakpoint_stop = true;
                return Ok(Exit::InstructionLimit);
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
                let mut ctx = Ctx::new(
                    &mut self.core,
                    &mut *machine,
                    &mut self.mem,
                    &mut self.cache,
                    &mut self.stats,
                    self.icount,
                    false,
                );
                let kicker = &self.kicker;
                let breakpoints = &self.breakpoints;
                let jit = &mut self.jit;
                let tier = self.tier;
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
                    let block_ptr_in = ptr;
                    ctx.cache.enter(slot);
                    let len = block.ops.len();
                    let mut n = if (len as u64) <= budget {
                        len
                    } else {
                        budget as usize
                    };
                    // A debugger's breakpoint inside the block: run up to it, then back to
                    // the boundary checks, which stop there.
                    let mut cut = false;
                    if !breakpoints.is_empty()
                        && let Some(i) = first_breakpoint(block, &block.ops[..n], breakpoints)
                    {
                        if i == 0 {
                            break Left::Boundary;
                        }
                        n = i;
                        cut = true;
                    }
                    ctx.exact_flags = n < len;
                    ctx.align_check =
                        ctx.core.cr0 & core::crb::AM != 0 && ctx.core.rflags & core::fl::AC != 0;
                    // Tier 1 runs whole blocks only, with none of the per-access checks it
                    // leaves out (alignment) and no debugging to do between instructions.
                    let compiled = if tier != Tier::Interpreter
                        && n == len
                        && !debug
                        && !ctx.align_check
                        && !watch_on
                    {
                        let (machine, stats) = ctx.machine_and_stats();
                        let fresh = block.jit.chain_entry().is_none();
                        let code = jit
                            .code_for(block, slot, tier, &mut stats.jit, || Features::of(machine));
                        if fresh && code.is_some() {
                            // Its lookup-cache entry now names its code, for RETs to chain.
                            ctx.cache.remember(slot);
                        }
                        code
                    } else {
                        None
                    };
                    let (ran, block, ptr) = match compiled {
                        Some(entry) => {
                            // Compiled code goes on into compiled successors itself, within the
                            // budget, unless something must be looked at between blocks.
                            let chain = Chain {
                                kick: kicker.flag(),
                                // (IF only changes in instructions that end a chain.)
                                limit: if breakpoints.is_empty()
                                    && !exits_due
                                    && !(irq_line && ctx.core.rflags & core::fl::IF != 0)
                                {
                                    budget
                                } else {
                                    0
                                },
                            };
                            let (ran, last) = Jit::run(&mut ctx, block, entry, watch_on, chain);
                            // SAFETY: the last block the chain entered, alive as `block` is
                            // (invalidated blocks wait in the graveyard until `bury`).
                            (ran, unsafe { &*last }, last)
                        }
                        None => (run_ops(&mut ctx, &block.ops[..n], watch_on), block, ptr),
                    };
                    // A chain ends in a whole block, as tier 1 only runs whole blocks.
                    let (len, n) = if ptr == block_ptr_in {
                        (len, n)
                    } else {
                        (block.ops.len(), block.ops.len())
                    };
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
                        || cut
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
                        let mut link = block.links[which].get();
                        if link.rip == rip
                            && link.slot != u32::MAX
                            && ctx.cache.generation(link.slot) == link.generation
                        {
                            ctx.stats.chained += 1;
                            slot = link.slot;
                            if link.entry == 0
                                && let Some(entry) =
                                    ctx.cache.block(link.slot).and_then(|b| b.jit.chain_entry())
                            {
                                // Compiled since it was linked: compiled code may now chain.
                                link.entry = entry;
                                block.links[which].set(link);
                            }
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
                                let successor = self.cache.block(next);
                                block.links[which].set(Link {
                                    rip: self.core.rip,
                                    slot: next,
                                    generation: self.cache.generation(next),
                                    entry: successor.and_then(|b| b.jit.chain_entry()).unwrap_or(0),
                                    len: successor.map_or(0, |b| b.ops.len() as u64),
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
                        // A REP string instruction paused between RAM-only elements: a kick
                        // now stops it where no position names the elements done.
                        self.rep_paused_at =
                            (ran.restarted && !device).then_some((self.core.rip, self.icount));
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
                            positioned(machine, self.icount).note_halt();
                            self.core.pending.halted = true;
                            return Ok(Exit::Halted);
                        }
                        if ran.outcome == Ctl::Halt {
                            positioned(machine, self.icount).note_halt();
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
pub(crate) struct OpsRun {
    /// [`Ctl::Next`] when every op fell through; otherwise what ended the block
    /// ([`Ctl::End`] also for a device access, a store into the block and a restart).
    pub(crate) outcome: Ctl,
    /// The exception an op raised, with its RIP.
    pub(crate) fault: Option<(Exc, u64)>,
    /// A REP string instruction stopped between iterations (RIP is still at it).
    pub(crate) restarted: bool,
}

impl OpsRun {
    /// Ops that ended with `outcome`, without a fault or a restart.
    pub(crate) fn outcome(outcome: Ctl) -> OpsRun {
        OpsRun {
            outcome,
            fault: None,
            restarted: false,
        }
    }
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
        if let Some(left) = run_one(ctx, op, watch_on) {
            return left;
        }
    }
    OpsRun::outcome(Ctl::Next)
}

/// Runs one op of a block ([`run_ops`]' step, and tier 1's fallback for the instructions
/// its code leaves to tier 0): `None` when it fell through and the block goes on.
#[inline(always)]
pub(crate) fn run_one(ctx: &mut Ctx, op: &ir::UOp, watch_on: bool) -> Option<OpsRun> {
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
                return Some(OpsRun::outcome(Ctl::End));
            }
            None
        }
        Ok(Ctl::Restart) => {
            ctx.core.rip = op.rip;
            Some(OpsRun {
                outcome: Ctl::End,
                fault: None,
                restarted: true,
            })
        }
        Ok(Ctl::Freeze) => {
            // Not retired: the CPU waits at the instruction.
            ctx.core.rip = op.rip;
            Some(OpsRun::outcome(Ctl::Freeze))
        }
        Ok(c) => {
            ctx.icount += 1;
            Some(OpsRun::outcome(c))
        }
        Err(e) => {
            ctx.core.rip = op.rip;
            Some(OpsRun {
                outcome: Ctl::Next,
                fault: Some((e, op.rip)),
                restarted: false,
            })
        }
    }
}

/// The index of the first of `ops` (a prefix of `block`'s) whose linear address is one of
/// the sorted `breakpoints`.
fn first_breakpoint(block: &Block, ops: &[ir::UOp], breakpoints: &[u64]) -> Option<usize> {
    // A block's ops share its CS base and mode (bits 2 and 3 of the key's mode: long mode
    // and CS.L); outside 64-bit mode linear addresses wrap at 4 GiB, as `BtCpu::lin_rip`
    // computes them.
    let mode64 = block.key.mode & 0b1100 == 0b1100;
    ops.iter().position(|op| {
        let lin = if mode64 {
            op.rip
        } else {
            block.key.cs_base.wrapping_add(op.rip) & 0xffff_ffff
        };
        breakpoints.binary_search(&lin).is_ok()
    })
}
