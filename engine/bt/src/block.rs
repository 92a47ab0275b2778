//! Block building and lookup: finding the block at the current RIP (the lookup cache, then
//! the block cache, checking a cached block's bytes are unchanged), and translating a new
//! one from guest memory.

use crate::cache::{Block, Key};
use crate::core::Core;
use crate::features::Features;
use crate::ir::Exc;
use crate::paging::Kind;
use crate::{BtCpu, MAX_BLOCK_INSNS, core, exec, paging, translate};
use deja_machine::cpu::seg;
use deja_machine::vm_memory::{GuestAddress, GuestMemoryBackend};
use deja_machine::{CpuError, Machine};
use iced_x86::{Decoder, DecoderError, DecoderOptions, FlowControl, Instruction};

/// What a lookup found.
pub(crate) enum Found {
    Block(u32),
    Fault(Exc),
}

impl BtCpu {
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

    pub(crate) fn lin_rip(c: &Core) -> u64 {
        let l = c.seg[seg::CS].base.wrapping_add(c.rip);
        if c.mode64() { c.rip } else { l & 0xffff_ffff }
    }

    /// Finds or translates the block at the current RIP.
    pub(crate) fn find_block(&mut self, machine: &mut Machine) -> Result<Found, CpuError> {
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
        let features = Features::of(machine);
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
            ops.push(translate::build(&insn, bitness, &features));
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
            ops.push(translate::build(&insn, bitness, &features));
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
            jit: Default::default(),
        }))
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
