//! The execution context of micro-ops: register and memory operand access, segmentation
//! (limits, rights, canonical checks), the fast TLB in front of the MMU, device accesses,
//! and the store side of write tracking (translated code and shadowed page tables, see
//! [`crate::track`]).

use crate::cache::BlockCache;
use crate::core::Core;
use crate::ir::{Exc, MemRef, NO_REG, Operand, RIP_REL, UOp};
use crate::mmu::MmuEvent;
use crate::paging::{Kind, Regs, Translate};
use crate::track::{CODE, PAGE_TABLE, PageTrack};
use deja_machine::Machine;
use deja_machine::cpu::seg;
use deja_machine::devices::MsrFault;
use deja_machine::devices::lapic::GuestTsc;
use deja_machine::vm_memory::{GuestAddress, GuestMemoryBackend};

/// Entries in each soft TLB (a power of two; tier-1 code probes them inline).
pub(crate) const TLB_SIZE: usize = 1024;

#[inline(always)]
fn tlb_index(lin: u64) -> usize {
    let page = lin >> 12;
    ((page ^ (page >> 10)) as usize) & (TLB_SIZE - 1)
}

/// `repr(C)`: tier-1 code reads `tag` at offset 0 and `host` at offset 8.
#[derive(Clone, Copy)]
#[repr(C)]
struct TlbEntry {
    /// Linear page number << 12 | user << 1 | valid.
    tag: u64,
    /// Host address of the page.
    host: *mut u8,
}

const EMPTY: TlbEntry = TlbEntry {
    tag: 0,
    host: std::ptr::null_mut(),
};

/// The memory system: MMU plus a linear-page to host-pointer cache for RAM pages, and the
/// write-tracking set that decides which pages may be cached for writes.
pub struct MemSys {
    read_tlb: Box<[TlbEntry; TLB_SIZE]>,
    write_tlb: Box<[TlbEntry; TLB_SIZE]>,
    /// The guest-physical page number behind each valid `write_tlb` entry (so tracking a
    /// page can drop exactly its entries; the fast path never reads it).
    write_pages: Box<[u64; TLB_SIZE]>,
    /// Why stores to a guest-physical page must be seen (code, page tables).
    track: PageTrack,
    /// Events drained from the MMU, kept to reuse the allocation.
    events: Vec<MmuEvent>,
    /// The linear-to-physical translator.
    pub mmu: Box<dyn Translate>,
    /// Watched guest-physical ranges and the stores seen in them (debugging; `None` costs
    /// nothing on the store path).
    pub watch: Option<Box<Watch>>,
    /// Guest data breakpoints (DR0-DR3) are armed: every access takes the checked path (no
    /// fast entries are installed while this is set, and they are flushed when it is set).
    pub watching: bool,
    /// The access in progress is an implicit supervisor-mode access (descriptor tables, the
    /// IDT, the TSS: [`Ctx::read_sys`], [`Ctx::write_sys`]), which SMAP checks whatever
    /// EFLAGS.AC says.
    implicit: bool,
}

/// Watched guest-physical ranges: their pages never get fast write entries, so every store
/// into them takes [`Ctx::write_bytes`], which reports it; pages of ranges watched for reads
/// never get fast read entries either, so every load from them takes [`Ctx::read_bytes`].
#[derive(Debug, Default)]
pub struct Watch {
    /// `(start, len)` ranges watched for stores.
    pub ranges: Vec<(u64, u64)>,
    /// `(start, len)` ranges watched for loads.
    pub reads: Vec<(u64, u64)>,
    /// Stores seen since they were last taken; their RIP is filled in when the storing
    /// instruction completes.
    pub hits: Vec<deja_machine::WatchHit>,
    /// Hits at the end of `hits` whose RIP is not known yet.
    pub unresolved: usize,
}

/// Whether the page holding `phys` holds bytes of one of `ranges`.
fn page_in(ranges: &[(u64, u64)], phys: u64) -> bool {
    ranges.iter().any(|&(start, len)| {
        let first = start >> 12;
        let last = start.saturating_add(len.max(1) - 1) >> 12;
        (first..=last).contains(&(phys >> 12))
    })
}

/// The part of an access of `len` bytes at `phys` inside `ranges`: `(offset into the
/// access, length)`.
fn overlap_in(ranges: &[(u64, u64)], phys: u64, len: u64) -> Option<(u64, u64)> {
    let mut lo = u64::MAX;
    let mut hi = 0;
    for &(start, wlen) in ranges {
        let a = start.max(phys);
        let b = start.saturating_add(wlen).min(phys.saturating_add(len));
        if a < b {
            lo = lo.min(a);
            hi = hi.max(b);
        }
    }
    (lo < hi).then(|| (lo - phys, hi - lo))
}

impl Watch {
    /// Whether a store of `len` bytes at `phys` touches a watched page.
    pub fn page_watched(&self, phys: u64) -> bool {
        page_in(&self.ranges, phys)
    }

    /// The watched part of a store of `len` bytes at `phys`: `(offset into the store, length)`.
    fn overlap(&self, phys: u64, len: u64) -> Option<(u64, u64)> {
        overlap_in(&self.ranges, phys, len)
    }

    /// Notes a load of `bytes` from guest-physical `phys` (within one page) by the
    /// instruction at `rip` after `icount` instructions: a hit when it touches a range
    /// watched for reads. Returns whether its page holds such a range (the page must then
    /// get no fast read entry).
    fn note_read(&mut self, phys: u64, bytes: &[u8], icount: u64, rip: u64) -> bool {
        if !page_in(&self.reads, phys) {
            return false;
        }
        if let Some((skip, n)) = overlap_in(&self.reads, phys, bytes.len() as u64) {
            let seen = bytes[skip as usize..(skip + n) as usize].to_vec();
            self.hits.push(deja_machine::WatchHit {
                icount,
                rip,
                address: phys + skip,
                old: seen.clone(),
                new: seen,
                read: true,
            });
            self.unresolved += 1;
        }
        true
    }

    /// Gives the hits still waiting for it the storing instruction's RIP.
    pub fn resolve(&mut self, rip: u64) {
        let n = self.hits.len();
        for h in &mut self.hits[n - self.unresolved..] {
            h.rip = rip;
        }
        self.unresolved = 0;
    }
}

// SAFETY: the host pointers in the TLBs point into guest memory owned by the `Machine`; they
// are only dereferenced during `run` (which holds `&mut Machine`) and the TLBs are flushed at
// the start of every run, so moving the engine between threads cannot make them dangle.
unsafe impl Send for MemSys {}

impl MemSys {
    /// A memory system around `mmu`.
    pub fn new(mmu: Box<dyn Translate>) -> Self {
        Self {
            read_tlb: Box::new([EMPTY; TLB_SIZE]),
            write_tlb: Box::new([EMPTY; TLB_SIZE]),
            write_pages: Box::new([u64::MAX; TLB_SIZE]),
            track: PageTrack::new(),
            events: Vec::new(),
            mmu,
            watch: None,
            watching: false,
            implicit: false,
        }
    }

    /// Replaces the MMU: the page-table pages the old one tracked no longer matter (code
    /// pages stay tracked, the block cache still holds their blocks).
    pub fn set_mmu(&mut self, mmu: Box<dyn Translate>) {
        self.mmu = mmu;
        self.track.untrack_all(PAGE_TABLE);
        self.events.clear();
        self.flush_fast();
    }

    /// The write-tracking set.
    pub fn track(&self) -> &PageTrack {
        &self.track
    }

    /// Adds `reason` to guest page `page`; a page that was untracked loses its cached
    /// write permissions, so every later store to it takes the checked path.
    pub fn track_page(&mut self, page: u64, reason: u8) {
        if self.track.track(page, reason) {
            for (e, p) in self.write_tlb.iter_mut().zip(self.write_pages.iter_mut()) {
                if *p == page {
                    *e = EMPTY;
                    *p = u64::MAX;
                }
            }
        }
    }

    /// Removes `reason` from guest page `page`.
    pub fn untrack_page(&mut self, page: u64, reason: u8) {
        self.track.untrack(page, reason);
    }

    /// Applies what the MMU reported since the last call: tracking changes, and its own
    /// stores (accessed/dirty updates) into translated code, which invalidate the blocks
    /// they hit. Returns whether the block being executed was among them.
    pub fn apply_mmu_events(&mut self, cache: &mut BlockCache, invalidations: &mut u64) -> bool {
        let mut events = std::mem::take(&mut self.events);
        self.mmu.drain_events(&mut events);
        let mut current = false;
        for ev in events.drain(..) {
            match ev {
                MmuEvent::Track(page) => self.track_page(page, PAGE_TABLE),
                MmuEvent::Untrack(page) => self.untrack_page(page, PAGE_TABLE),
                MmuEvent::Stored(phys) => {
                    if self.track.reasons(phys >> 12) & CODE != 0 {
                        cache.invalidate_range(phys, 1, invalidations);
                        current |= cache.current_invalidated();
                    }
                }
            }
        }
        self.events = events;
        self.sync_code_pages(cache);
        current
    }

    /// Tracks the pages of a newly inserted block as code.
    pub fn track_code(&mut self, cache: &BlockCache, slot: u32) {
        let Some(b) = cache.block(slot) else {
            return;
        };
        let pages = b.extents.map(|(s, e)| (e > s).then_some(s >> 12));
        for page in pages.into_iter().flatten() {
            self.track_page(page, CODE);
        }
    }

    /// Stops tracking as code the pages whose last block the cache dropped.
    pub fn sync_code_pages(&mut self, cache: &mut BlockCache) {
        for page in cache.take_released() {
            if !cache.is_code_page(page) {
                self.untrack_page(page, CODE);
            }
        }
    }

    /// Forgets the cached host pointers for stores, so that the next store to every page
    /// takes `write_bytes` again (which marks the page dirty).
    pub fn flush_write_tlb(&mut self) {
        self.write_tlb.fill(EMPTY);
        self.write_pages.fill(u64::MAX);
    }

    /// The read and write TLBs' first entries (for tier-1 code's inline probes: 16-byte
    /// entries of tag then host address, indexed as [`tlb_index`] does).
    pub(crate) fn tlb_bases(&self) -> (*const u8, *const u8) {
        (
            self.read_tlb.as_ptr().cast(),
            self.write_tlb.as_ptr().cast(),
        )
    }

    /// Forgets every cached host pointer.
    pub fn flush_fast(&mut self) {
        self.read_tlb.fill(EMPTY);
        self.flush_write_tlb();
    }
}

/// Everything a micro-op may touch.
pub struct Ctx<'a> {
    /// The CPU.
    pub core: &'a mut Core,
    /// Devices, memory and the `Host`. Private: a device, a machine MSR or the host is
    /// reached only through the methods that give it the current position first
    /// ([`Ctx::port_in`], [`Ctx::port_out`], [`Ctx::machine_rdmsr`], [`Ctx::machine_wrmsr`],
    /// [`Ctx::host_time_ns`], [`Ctx::host_entropy`], and MMIO inside [`Ctx::read_bytes`]
    /// and [`Ctx::write_bytes`]); what carries no position is reached through
    /// [`Ctx::machine`] (shared) and a few named methods.
    machine: &'a mut Machine,
    /// MMU and TLB.
    pub mem: &'a mut MemSys,
    /// The block cache (for store-side invalidation).
    pub cache: &'a mut BlockCache,
    /// Instructions retired before the current one.
    pub icount: u64,
    /// A device access happened during the current instruction.
    pub device: bool,
    /// A store hit the block being executed.
    pub smc_current: bool,
    /// Every op must produce its flags (the block runs only partly, so dead-flag
    /// elimination's block-end assumption does not hold).
    pub exact_flags: bool,
    /// Counters the ops bump.
    pub stats: &'a mut crate::Stats,
    /// CR0.AM and EFLAGS.AC are both set: data accesses at CPL 3 are alignment checked.
    pub align_check: bool,
}

/// The alignment an operand of `size` bytes needs under alignment checking (SDM vol. 3
/// table 6-7): its size up to 8; far pointers (6 bytes) 4, 80-bit x87 values 8; 16-byte
/// operands 8 (for MOVUPS and its kind the SDM says #AC "may or may not" come for addresses
/// not 8-byte aligned; AMD hosts check 16). Operands with their own rule use
/// [`Ctx::linear_aligned`].
#[inline(always)]
pub fn natural_alignment(size: u64) -> u64 {
    match size {
        0 | 1 => 1,
        2 | 3 => 2,
        4..=7 => 4,
        _ => 8,
    }
}

/// Whether `v` is a canonical 48-bit address.
#[inline(always)]
pub fn canonical(v: u64) -> bool {
    ((v as i64) << 16 >> 16) as u64 == v
}

/// The one place bt tells the machine where the guest is: every call into a device, a
/// machine MSR or the `Host` goes through here, with `icount` the count of instructions
/// retired before the one making the call (the position of that instruction).
#[inline(always)]
pub(crate) fn positioned(machine: &mut Machine, icount: u64) -> &mut Machine {
    machine.set_icount(icount);
    machine
}

impl<'a> Ctx<'a> {
    /// A context for running micro-ops at instruction count `icount`.
    pub fn new(
        core: &'a mut Core,
        machine: &'a mut Machine,
        mem: &'a mut MemSys,
        cache: &'a mut BlockCache,
        stats: &'a mut crate::Stats,
        icount: u64,
        align_check: bool,
    ) -> Ctx<'a> {
        Ctx {
            core,
            machine,
            mem,
            cache,
            icount,
            device: false,
            smc_current: false,
            exact_flags: true,
            stats,
            align_check,
        }
    }
}

/// Devices, machine MSRs and the host: each call is made at the current instruction's
/// position, and the device exits mark the instruction as having made one ([`Ctx::device`]).
impl Ctx<'_> {
    /// The machine at the current instruction's position.
    #[inline(always)]
    fn at_position(&mut self) -> &mut Machine {
        positioned(self.machine, self.icount)
    }

    /// The machine for a device exit of the current instruction.
    #[inline(always)]
    fn device_exit(&mut self) -> &mut Machine {
        self.device = true;
        self.at_position()
    }

    /// A guest IN from `port` (`data.len()` bytes): a device exit.
    pub fn port_in(&mut self, port: u16, data: &mut [u8]) {
        self.device_exit().pio_read(port, data);
    }

    /// A guest OUT to `port`: a device exit.
    pub fn port_out(&mut self, port: u16, data: &[u8]) {
        self.device_exit().pio_write(port, data);
    }

    /// A guest read of guest-physical `p`, which is not RAM or ROM: a device exit.
    fn mmio_read(&mut self, p: u64, data: &mut [u8]) {
        self.device_exit().mmio_read(p, data);
    }

    /// A guest write to guest-physical `p`, which is not RAM: a device exit.
    fn mmio_write(&mut self, p: u64, data: &[u8]) {
        self.device_exit().mmio_write(p, data);
    }

    /// RDMSR of an MSR the machine owns ([`Machine::handles_msr`]): a device exit.
    pub fn machine_rdmsr(&mut self, idx: u32) -> Result<u64, MsrFault> {
        self.device_exit().rdmsr(idx)
    }

    /// WRMSR of an MSR the machine owns: a device exit.
    pub fn machine_wrmsr(&mut self, idx: u32, v: u64, tsc: GuestTsc) -> Result<(), MsrFault> {
        self.device_exit().wrmsr(idx, v, tsc)
    }

    /// Guest time in ns from the host (RDTSC and its kind; not a device exit).
    pub fn host_time_ns(&mut self) -> u64 {
        self.at_position().time_ns()
    }

    /// Entropy from the host (RDRAND/RDSEED; not a device exit).
    pub fn host_entropy(&mut self) -> u64 {
        let m = self.at_position();
        let pos = m.position();
        m.host.entropy(pos)
    }

    /// The machine, shared: memory, the layout, CPUID, which MSRs it owns, CR8. Nothing
    /// reachable through it calls a device or the host.
    pub fn machine(&self) -> &Machine {
        self.machine
    }

    /// The machine (shared) and the counters, borrowed together.
    pub(crate) fn machine_and_stats(&mut self) -> (&Machine, &mut crate::Stats) {
        (self.machine, self.stats)
    }

    /// Loads the PAE PDPTE registers from guest memory under the current CR0/CR3/CR4/EFER;
    /// `false` means #GP(0).
    pub fn load_pdptes(&mut self) -> bool {
        let regs = self.regs();
        self.mem.mmu.load_pdptes(&self.machine.mem, &regs)
    }

    /// A MOV to CR8 when the interrupt controller owns the task priority (not a device
    /// exit; no position).
    pub fn set_cr8(&mut self, v: u64) {
        self.machine.set_cr8(v);
    }

    /// Drives an interrupt line of the machine's interrupt controller (FERR#'s IRQ13; no
    /// position).
    pub fn set_irq(&mut self, line: u32, level: bool) {
        self.machine.set_irq(line, level);
    }
}

impl Ctx<'_> {
    fn regs(&self) -> Regs {
        // SMAP as it applies to this access: EFLAGS.AC lifts it for explicit accesses
        // (`crate::mmu::PagingRegs::cr4`).
        let ac = self.core.rflags & crate::core::fl::AC != 0 && !self.mem.implicit;
        Regs {
            cr0: self.core.cr0,
            cr3: self.core.cr3,
            cr4: if ac {
                self.core.cr4 & !crate::core::crb::SMAP
            } else {
                self.core.cr4
            },
            efer: self.core.efer,
        }
    }

    /// Whether a supervisor access may install a fast-path entry: not while SMAP is on and
    /// EFLAGS.AC lets explicit accesses reach user pages, since the fast path does not know
    /// AC (so its supervisor entries stay supervisor pages; CR4.SMAP changes flush it).
    #[inline]
    fn fast_fill_ok(&self, user: bool) -> bool {
        use crate::core::{crb, fl};
        user || self.core.cr4 & crb::SMAP == 0 || self.core.rflags & fl::AC == 0
    }

    /// An implicit supervisor-mode read (descriptor tables, the IDT, the TSS).
    pub fn read_sys(&mut self, lin: u64, size: u8) -> Result<u64, Exc> {
        self.mem.implicit = true;
        let r = self.read_lin_as(lin, size, false);
        self.mem.implicit = false;
        r
    }

    /// An implicit supervisor-mode write (descriptor accessed and busy bits, the TSS).
    pub fn write_sys(&mut self, lin: u64, size: u8, v: u64) -> Result<(), Exc> {
        self.mem.implicit = true;
        let r = self.write_lin_as(lin, size, v, false);
        self.mem.implicit = false;
        r
    }

    /// The effective address (offset within the segment) of a memory operand.
    #[inline(always)]
    pub fn ea(&self, m: &MemRef) -> u64 {
        let mut a = m.disp;
        if m.base != NO_REG && m.base != RIP_REL {
            a = a.wrapping_add(self.core.gpr[m.base as usize]);
        }
        if m.index != NO_REG {
            a = a.wrapping_add(self.core.gpr[m.index as usize].wrapping_mul(m.scale as u64));
        }
        match m.asize {
            2 => a & 0xffff,
            4 => a & 0xffff_ffff,
            _ => a,
        }
    }

    /// Segmentation: offset to linear address, with limit, rights and canonical checks, and
    /// the alignment check of an operand of `size` bytes (see [`natural_alignment`]).
    #[inline(always)]
    pub fn linear(&self, sreg: u8, off: u64, size: u64, write: bool) -> Result<u64, Exc> {
        self.linear_aligned(sreg, off, size, write, natural_alignment(size))
    }

    /// [`Ctx::linear`] for an operand whose alignment requirement is not the one its size
    /// implies: `align` bytes (a power of two; 1: never misaligned). The x87 environment and
    /// save areas and the FXSAVE area are such operands.
    #[inline(always)]
    pub fn linear_aligned(
        &self,
        sreg: u8,
        off: u64,
        size: u64,
        write: bool,
        align: u64,
    ) -> Result<u64, Exc> {
        let c = &*self.core;
        let s = &c.seg[sreg as usize];
        if c.mode64() {
            let lin = if sreg as usize >= seg::FS {
                off.wrapping_add(s.base)
            } else {
                off
            };
            if !canonical(lin) || !canonical(lin.wrapping_add(size - 1)) {
                return Err(if sreg as usize == seg::SS {
                    Exc::ss(0)
                } else {
                    Exc::gp(0)
                });
            }
            if self.align_check {
                self.check_alignment(lin, align)?;
            }
            return Ok(lin);
        }
        let fault = || {
            if sreg as usize == seg::SS {
                Exc::ss(0)
            } else {
                Exc::gp(0)
            }
        };
        if c.protected() && !c.vm86() {
            if s.unusable || !s.present {
                return Err(fault());
            }
            let code = s.type_ & 8 != 0;
            if write && (code || s.type_ & 2 == 0) {
                return Err(fault());
            }
            if !write && code && s.type_ & 2 == 0 {
                return Err(fault());
            }
        }
        let last = off.wrapping_add(size - 1);
        if s.s && s.type_ & 0xc == 4 {
            // Expand-down data segment: valid offsets are (limit, top].
            let top = if s.db { 0xffff_ffff } else { 0xffff };
            if off <= s.limit as u64 || last > top || last < off {
                return Err(fault());
            }
        } else if last > s.limit as u64 || last < off {
            return Err(fault());
        }
        let lin = s.base.wrapping_add(off) & 0xffff_ffff;
        if self.align_check {
            self.check_alignment(lin, align)?;
        }
        Ok(lin)
    }

    /// #AC(0) for a data access at CPL 3 not aligned to `align` bytes (the caller has seen
    /// CR0.AM and EFLAGS.AC set).
    #[cold]
    fn check_alignment(&self, lin: u64, align: u64) -> Result<(), Exc> {
        if self.core.cpl() != 3 || self.core.cr0 & crate::core::crb::AM == 0 {
            return Ok(());
        }
        if lin & (align.max(1) - 1) != 0 {
            return Err(Exc {
                vector: 17,
                error: Some(0),
            });
        }
        Ok(())
    }

    /// Records data breakpoints (DR0-DR3 with R/W 01 or 11) that an access of `len` bytes at
    /// `lin` hits, for a #DB trap after the instruction.
    fn watch(&mut self, lin: u64, len: u64, write: bool) {
        let c = &mut *self.core;
        for n in 0..4 {
            if !c.bp_enabled(n) {
                continue;
            }
            let (rw, blen) = c.bp_kind(n);
            if !(rw == 3 || (rw == 1 && write)) {
                continue;
            }
            let start = c.dr[n] & !(blen - 1);
            if lin < start.wrapping_add(blen) && start < lin.wrapping_add(len) {
                c.db_hits |= 1 << n;
            }
        }
    }

    fn user(&self) -> bool {
        self.core.cpl() == 3
    }

    /// Translates a linear address, raising #PF (and setting CR2) on failure.
    pub fn translate(&mut self, lin: u64, kind: Kind, user: bool) -> Result<u64, Exc> {
        let regs = self.regs();
        let result = self
            .mem
            .mmu
            .translate(&self.machine.mem, &regs, lin, kind, user);
        self.apply_mmu_events();
        match result {
            Ok(p) => Ok(p),
            Err(f) => {
                self.core.cr2 = f.address;
                Err(Exc {
                    vector: 14,
                    error: Some(f.error_code),
                })
            }
        }
    }

    /// Applies the MMU's events ([`MemSys::apply_mmu_events`]); a hit on the executing block
    /// ends it after the current instruction.
    pub fn apply_mmu_events(&mut self) {
        if self
            .mem
            .apply_mmu_events(self.cache, &mut self.stats.invalidations)
        {
            self.smc_current = true;
        }
    }

    fn host_ptr(&self, phys: u64) -> Option<*mut u8> {
        if !self.machine.layout.is_ram(phys) {
            return None;
        }
        self.machine.mem.get_host_address(GuestAddress(phys)).ok()
    }

    /// [`Ctx::host_ptr`] for reads: firmware ROM is memory too (it is in guest memory,
    /// mapped read-only), so data reads see its bytes as kvm's do, not a device's all-ones.
    /// Stores never take this path: `write_bytes` drops those to ROM first.
    fn host_ptr_for_read(&self, phys: u64) -> Option<*mut u8> {
        let layout = &self.machine.layout;
        if !layout.is_ram(phys) && !layout.is_rom(phys) {
            return None;
        }
        self.machine.mem.get_host_address(GuestAddress(phys)).ok()
    }

    /// Reads `size` (1, 2, 4, 8) bytes at a linear address.
    #[inline(always)]
    pub fn read_lin(&mut self, lin: u64, size: u8) -> Result<u64, Exc> {
        let user = self.user();
        self.read_lin_as(lin, size, user)
    }

    /// Reads with an explicit user/supervisor access type (descriptor tables are supervisor).
    #[inline(always)]
    pub fn read_lin_as(&mut self, lin: u64, size: u8, user: bool) -> Result<u64, Exc> {
        let page = lin & !0xfff;
        let off = (lin & 0xfff) as usize;
        let e = self.mem.read_tlb[tlb_index(lin)];
        if e.tag == page | (user as u64) << 1 | 1 && off + size as usize <= 4096 {
            // SAFETY: the entry maps a RAM or ROM page of guest memory (checked by
            // `host_ptr_for_read` when filled; flushed at every run start and mapping
            // change), and
            // `off + size` stays within that 4 KiB page.
            return Ok(unsafe { load(e.host.add(off), size) });
        }
        self.read_slow(lin, size, user)
    }

    #[inline(never)]
    fn read_slow(&mut self, lin: u64, size: u8, user: bool) -> Result<u64, Exc> {
        let mut buf = [0u8; 8];
        self.read_bytes(lin, &mut buf[..size as usize], user)?;
        Ok(u64::from_le_bytes(buf))
    }

    /// Reads bytes at a linear address (any length, page crossings handled).
    pub fn read_bytes(&mut self, lin: u64, out: &mut [u8], user: bool) -> Result<(), Exc> {
        if self.mem.watching {
            self.watch(lin, out.len() as u64, false);
        }
        let mut done = 0usize;
        // Translate every page first so a fault leaves nothing half done.
        let mut pieces = [(0u64, 0usize, 0usize); 3];
        let mut n = 0;
        while done < out.len() {
            let a = self.wrap(lin.wrapping_add(done as u64));
            let chunk = (4096 - (a & 0xfff) as usize).min(out.len() - done);
            let p = self.translate(a, Kind::Read, user)?;
            if n < 3 {
                pieces[n] = (p, done, chunk);
                n += 1;
            }
            done += chunk;
        }
        for &(p, at, len) in &pieces[..n] {
            if let Some(h) = self.host_ptr_for_read(p) {
                // SAFETY: `h` points at the RAM or ROM page of guest memory holding `p`, and
                // the chunk does not cross the 4 KiB page (ROMs are whole pages).
                unsafe { std::ptr::copy_nonoverlapping(h, out[at..].as_mut_ptr(), len) };
                let (icount, rip) = (self.icount, self.core.rip);
                let read_watched = match self.mem.watch.as_deref_mut() {
                    Some(w) => w.note_read(p, &out[at..at + len], icount, rip),
                    None => false,
                };
                if len == out.len()
                    && !self.mem.watching
                    && !read_watched
                    && self.fast_fill_ok(user)
                {
                    let page = self.wrap(lin) & !0xfff;
                    let tag = page | (user as u64) << 1 | 1;
                    // SAFETY: page-aligned host address of the same RAM page.
                    let base = unsafe { h.sub((p & 0xfff) as usize) };
                    self.mem.read_tlb[tlb_index(page)] = TlbEntry { tag, host: base };
                }
            } else {
                self.mmio_read(p, &mut out[at..at + len]);
            }
        }
        Ok(())
    }

    fn wrap(&self, lin: u64) -> u64 {
        if self.core.long_mode() {
            lin
        } else {
            lin & 0xffff_ffff
        }
    }

    /// Writes `size` bytes at a linear address.
    #[inline(always)]
    pub fn write_lin(&mut self, lin: u64, size: u8, v: u64) -> Result<(), Exc> {
        let user = self.user();
        self.write_lin_as(lin, size, v, user)
    }

    /// Writes with an explicit user/supervisor access type.
    #[inline(always)]
    pub fn write_lin_as(&mut self, lin: u64, size: u8, v: u64, user: bool) -> Result<(), Exc> {
        let page = lin & !0xfff;
        let off = (lin & 0xfff) as usize;
        let e = self.mem.write_tlb[tlb_index(lin)];
        if e.tag == page | (user as u64) << 1 | 1 && off + size as usize <= 4096 {
            // SAFETY: as in `read_lin_as`; write entries are only installed for RAM pages
            // with no tracking reason, and dropped when a page gets one.
            unsafe { store(e.host.add(off), size, v) };
            return Ok(());
        }
        let b = v.to_le_bytes();
        self.write_bytes(lin, &b[..size as usize], user)
    }

    /// Checks that a write of `size` bytes at a linear address would not fault (paging),
    /// without writing: #PF as the write would raise it.
    pub fn check_writable(&mut self, lin: u64, size: u64) -> Result<(), Exc> {
        let user = self.user();
        let last = self.wrap(lin.wrapping_add(size.max(1) - 1));
        self.translate(self.wrap(lin), Kind::Write, user)?;
        if last & !0xfff != self.wrap(lin) & !0xfff {
            self.translate(last, Kind::Write, user)?;
        }
        Ok(())
    }

    /// Writes bytes at a linear address (page crossings handled; both pages are checked
    /// before anything is written).
    pub fn write_bytes(&mut self, lin: u64, data: &[u8], user: bool) -> Result<(), Exc> {
        if self.mem.watching {
            self.watch(lin, data.len() as u64, true);
        }
        let mut done = 0usize;
        let mut pieces = [(0u64, 0usize, 0usize); 3];
        let mut n = 0;
        while done < data.len() {
            let a = self.wrap(lin.wrapping_add(done as u64));
            let chunk = (4096 - (a & 0xfff) as usize).min(data.len() - done);
            let p = self.translate(a, Kind::Write, user)?;
            if n < 3 {
                pieces[n] = (p, done, chunk);
                n += 1;
            }
            done += chunk;
        }
        for &(p, at, len) in &pieces[..n] {
            if self.machine.layout.is_rom(p) {
                // Stores into firmware ROM are dropped, without a device access.
                continue;
            }
            if let Some(h) = self.host_ptr(p) {
                // The one check of the write-tracking set on the store path.
                let reasons = self.mem.track.reasons(p >> 12);
                let watched = match self.mem.watch.as_deref_mut() {
                    Some(w) if w.page_watched(p) => {
                        if let Some((skip, n)) = w.overlap(p, len as u64) {
                            let mut old = vec![0u8; n as usize];
                            // SAFETY: `h` points into a RAM page of guest memory and
                            // `skip + n <= len` stays within the chunk.
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    h.add(skip as usize),
                                    old.as_mut_ptr(),
                                    n as usize,
                                )
                            };
                            let from = at + skip as usize;
                            w.hits.push(deja_machine::WatchHit {
                                icount: self.icount,
                                rip: self.core.rip,
                                address: p + skip,
                                old,
                                new: data[from..from + n as usize].to_vec(),
                                read: false,
                            });
                            w.unresolved += 1;
                        }
                        true
                    }
                    _ => false,
                };
                // SAFETY: `h` points into a RAM page of guest memory; the chunk stays in it.
                unsafe { std::ptr::copy_nonoverlapping(data[at..].as_ptr(), h, len) };
                // Stores through the write TLB below go unmarked until the next
                // `collect_dirty_pages` drops the entry, so the page is marked here.
                self.machine.mark_dirty(p, len);
                if reasons == 0 && !watched {
                    if len == data.len() && !self.mem.watching && self.fast_fill_ok(user) {
                        let page = self.wrap(lin) & !0xfff;
                        let tag = page | (user as u64) << 1 | 1;
                        // SAFETY: page-aligned host address of the same RAM page.
                        let base = unsafe { h.sub((p & 0xfff) as usize) };
                        let slot = tlb_index(page);
                        self.mem.write_tlb[slot] = TlbEntry { tag, host: base };
                        self.mem.write_pages[slot] = p >> 12;
                    }
                } else if reasons != 0 {
                    self.tracked_store(reasons, p, len);
                }
            } else {
                self.mmio_write(p, &data[at..at + len]);
            }
        }
        Ok(())
    }

    /// A store of `len` bytes at guest-physical `p` (already in memory) to a page tracked
    /// for `reasons`: page tables → the MMU updates or zaps what it built from them; code →
    /// the blocks hit are invalidated, and a hit on the executing block ends it after this
    /// instruction.
    #[inline(never)]
    fn tracked_store(&mut self, reasons: u8, p: u64, len: usize) {
        if reasons & PAGE_TABLE != 0 {
            self.mem.mmu.note_guest_write(&self.machine.mem, p, len);
        }
        if reasons & CODE != 0 {
            self.cache
                .invalidate_range(p, len as u64, &mut self.stats.invalidations);
            if self.cache.current_invalidated() {
                self.smc_current = true;
            }
        }
        self.apply_mmu_events();
    }

    /// Reads a memory operand of `size` bytes.
    #[inline(always)]
    pub fn read_mem(&mut self, m: &MemRef, size: u8) -> Result<u64, Exc> {
        let off = self.ea(m);
        let lin = self.linear(m.seg, off, size as u64, false)?;
        self.read_lin(lin, size)
    }

    /// Writes a memory operand of `size` bytes.
    #[inline(always)]
    pub fn write_mem(&mut self, m: &MemRef, size: u8, v: u64) -> Result<(), Exc> {
        let off = self.ea(m);
        let lin = self.linear(m.seg, off, size as u64, true)?;
        self.write_lin(lin, size, v)
    }

    /// Reads an operand.
    #[inline(always)]
    pub fn get(&mut self, o: &Operand, size: u8) -> Result<u64, Exc> {
        match *o {
            Operand::Reg { idx, hi } => Ok(self.core.reg(idx, hi, size)),
            Operand::Imm(v) => Ok(v),
            Operand::Mem(ref m) => self.read_mem(m, size),
            Operand::Sreg(s) => Ok(self.core.seg[s as usize].selector as u64),
            _ => Ok(0),
        }
    }

    /// Writes an operand.
    #[inline(always)]
    pub fn put(&mut self, o: &Operand, size: u8, v: u64) -> Result<(), Exc> {
        match *o {
            Operand::Reg { idx, hi } => {
                self.core.set_reg(idx, hi, size, v);
                Ok(())
            }
            Operand::Mem(ref m) => self.write_mem(m, size, v),
            _ => Ok(()),
        }
    }

    /// Pushes onto the stack with the current stack size.
    pub fn push(&mut self, size: u8, v: u64) -> Result<(), Exc> {
        let ss = self.core.stack_size();
        let sp = self.core.gpr[4];
        let nsp = sp.wrapping_sub(size as u64) & crate::core::mask(ss);
        let lin = self.linear(seg::SS as u8, nsp, size as u64, true)?;
        self.write_lin(lin, size, v)?;
        self.core.set_reg(4, false, ss, nsp);
        Ok(())
    }

    /// Reads the stack top at `extra` bytes above the stack pointer.
    pub fn peek(&mut self, size: u8, extra: u64) -> Result<u64, Exc> {
        let ss = self.core.stack_size();
        let sp = self.core.gpr[4].wrapping_add(extra) & crate::core::mask(ss);
        let lin = self.linear(seg::SS as u8, sp, size as u64, false)?;
        self.read_lin(lin, size)
    }

    /// Pops from the stack.
    pub fn pop(&mut self, size: u8) -> Result<u64, Exc> {
        let v = self.peek(size, 0)?;
        let ss = self.core.stack_size();
        let nsp = self.core.gpr[4].wrapping_add(size as u64);
        self.core.set_reg(4, false, ss, nsp);
        Ok(v)
    }

    /// Counts an event.
    pub fn count(&mut self, name: &str) {
        self.stats.extra.add(name, 1);
    }

    /// The RIP a branch lands on, truncated to the operand size outside 64-bit mode.
    pub fn branch_rip(&self, op: &UOp, target: u64) -> u64 {
        match op.size {
            2 => target & 0xffff,
            4 => target & 0xffff_ffff,
            _ => target,
        }
    }
}

/// Loads `size` bytes (little endian) from `p`.
///
/// # Safety
/// `p` must be valid for reads of `size` bytes.
#[inline(always)]
unsafe fn load(p: *const u8, size: u8) -> u64 {
    // SAFETY: the caller guarantees `size` readable bytes; unaligned reads are explicit.
    unsafe {
        match size {
            1 => *p as u64,
            2 => (p as *const u16).read_unaligned() as u64,
            4 => (p as *const u32).read_unaligned() as u64,
            _ => (p as *const u64).read_unaligned(),
        }
    }
}

/// Stores the low `size` bytes of `v` at `p`.
///
/// # Safety
/// `p` must be valid for writes of `size` bytes.
#[inline(always)]
unsafe fn store(p: *mut u8, size: u8, v: u64) {
    // SAFETY: the caller guarantees `size` writable bytes; unaligned writes are explicit.
    unsafe {
        match size {
            1 => *p = v as u8,
            2 => (p as *mut u16).write_unaligned(v as u16),
            4 => (p as *mut u32).write_unaligned(v as u32),
            _ => (p as *mut u64).write_unaligned(v),
        }
    }
}
