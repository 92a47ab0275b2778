//! The paging benchmarks of [`Bench`]: a guest kernel's memory-management work in a loop,
//! so that the MMU strategies (and hardware virtualization) can be compared per operation.
//!
//! - `pgfault`: demand paging. A load from an unmapped page faults; the #PF handler maps the
//!   page and `IRETQ`s, the load runs again and succeeds; the loop then unmaps the page (PTE
//!   cleared, `INVLPG`) for the next iteration.
//! - `forkwait`: fork + wait. The parent's tables are copied into a child address space with
//!   every writable page made read-only and copy-on-write in both; the child runs (CR3
//!   switch), writes one page (a copy-on-write fault that copies it) and exits (CR3 back);
//!   the parent frees the child and writes the page itself (a fault that, the child being
//!   gone, only makes the page writable again). The guest checks that the child's write
//!   never reaches the parent and that every frame and reference comes back.
//! - `cr3switch`: four address spaces sharing the kernel mapping, each with a private page at
//!   the same address; `MOV CR3` round-robin and a load and an increment in each. The guest
//!   checks each load saw its own space's page and the increments' totals.
//! - `tlbmiss`: loads from 4096 distinct 4 KiB pages in turn.
//!
//! All of them run in ring 0 of long mode with CR0.WP set, on tables placed in the boot
//! path's identity-mapped first 2 MiB (physical = virtual there).

use crate::bench::{BENCH_STACK_TOP, Bench, MARK_END, MARK_START, PML4, PTE_FRAME, PTE_VIRT, mark};
use crate::link::{LinkError, SectionAsm};
use crate::rt::{BootMessages, EXIT_CHECK_FAILED, EXIT_PASS, long_mode_image};
use deja_machine::loader::Image;
use iced_x86::code_asm::*;

/// Pages `bench-tlbmiss` cycles through.
pub(crate) const TLBMISS_PAGES: u32 = 4096;
/// The boot path's PDPT (PML4[0] points at it).
const BOOT_PDPT: i32 = PML4 + 0x1000;
/// The boot path's page directory.
const BOOT_PD: i32 = PML4 + 0x2000;
/// `bench-pgfault`'s page table, hooked into PD[1] (virtual 2 MiB..4 MiB).
const PGFAULT_PT: i32 = 0x12_0000;
/// What `bench-pgfault`'s page holds, checked through the mapping after the loop.
const PGFAULT_MARKER: i32 = 0x5a5a_1234;

/// `bench-tlbmiss`: eight page tables (4096 PTEs, contiguous), their page directory, and 16
/// frames the pages alias (the TLB is keyed by virtual page; the frames only need to exist).
const TLBMISS_PTS: i32 = 0x14_0000;
const TLBMISS_PD: i32 = 0x14_8000;
const TLBMISS_FRAMES: i32 = 0x15_0000;
/// Where the 4096 pages start: PDPT[1], 1 GiB.
const TLBMISS_VIRT: i32 = 0x4000_0000;

/// `bench-cr3switch`: per space a PML4, PDPT, PD and PT (four pages from here on), and one
/// private frame each.
const CR3_SPACES: i32 = 4;
const CR3_TABLES: i32 = 0x16_0000;
const CR3_FRAMES: i32 = 0x17_0000;
/// The private page's address in every space: PML4[1], outside the shared kernel mapping.
const PRIVATE_VIRT: u64 = 0x80_0000_0000;

/// `bench-forkwait`: the parent's tables below PML4[1], the child's four tables, the
/// parent's eight writable frames, a pool of eight frames for copies, and bookkeeping.
const FORK_PARENT_PDPT: i32 = 0x18_0000;
const FORK_PARENT_PD: i32 = 0x18_1000;
const FORK_PARENT_PT: i32 = 0x18_2000;
const FORK_CHILD_PML4: i32 = 0x18_4000;
const FORK_CHILD_PDPT: i32 = 0x18_5000;
const FORK_CHILD_PD: i32 = 0x18_6000;
const FORK_CHILD_PT: i32 = 0x18_7000;
const FORK_FRAMES: i32 = 0x19_0000;
const FORK_POOL_FRAMES: i32 = 0x19_8000;
/// The process's pages.
const FORK_PAGES: i32 = 8;
/// Bookkeeping: the free-frame count (qword), the free-frame stack (8 qwords at +0x40) and
/// per parent frame the number of address spaces mapping it (qwords at +0x100).
const FORK_VARS: i32 = 0x1a_0000;
const FORK_POOL_COUNT: i32 = FORK_VARS;
const FORK_POOL_STACK: i32 = FORK_VARS + 0x40;
const FORK_REFS: i32 = FORK_VARS + 0x100;
/// The software-available PTE bit fork uses to mark a read-only page as copy-on-write.
const PTE_COW: i32 = 1 << 9;
/// The page the child writes (and the parent after it).
const FORK_WRITTEN_PAGE: i32 = 1;
/// What the child writes there: must never be seen by the parent.
const CHILD_MARKER: i32 = 0x0c0f_fee0;

const P_RW: i32 = 3;
const CR0_WP: i32 = 1 << 16;

/// Builds one of the paging benchmarks.
pub(crate) fn build(bench: Bench, iterations: u32) -> Result<Image, LinkError> {
    let name = format!("bench-{}", bench.name());
    let handlers: &[(u8, &'static str)] = match bench {
        Bench::PgFault => &[(14, "bench_map_page")],
        Bench::ForkWait => &[(14, "bench_cow")],
        _ => &[],
    };
    long_mode_image(&name, BootMessages::default(), handlers, &|s, rt| {
        s.a.mov(esp, BENCH_STACK_TOP)?;
        rt.load_idt(s)?;
        let a = &mut s.a;
        a.mov(rax, cr0)?;
        a.or(eax, CR0_WP)?;
        a.mov(cr0, rax)?;
        let mut fail = s.a.create_label();
        match bench {
            Bench::PgFault => pgfault(s, iterations, fail)?,
            Bench::ForkWait => forkwait(s, iterations, fail)?,
            Bench::Cr3Switch => cr3switch(s, iterations, fail)?,
            _ => tlbmiss(s, iterations)?,
        }
        rt.exit_with(s, EXIT_PASS)?;
        s.a.set_label(&mut fail)?;
        let text = format!("{name}: check failed\r\n");
        rt.print(s, text.as_bytes())?;
        rt.exit_with(s, EXIT_CHECK_FAILED)?;
        if bench == Bench::PgFault {
            pgfault_handler(s)?;
        }
        if bench == Bench::ForkWait {
            cow_handler(s)?;
        }
        Ok(())
    })
}

/// Zeroes `pages` pages from `at`.
fn zero_pages(a: &mut CodeAssembler, at: i32, pages: i32) -> Result<(), IcedError> {
    a.mov(edi, at)?;
    a.xor(eax, eax)?;
    a.mov(ecx, pages * 512)?;
    a.rep().stosq()
}

/// Stores `value` into the qword at physical (= virtual) address `at`.
fn store(a: &mut CodeAssembler, at: i32, value: i32) -> Result<(), IcedError> {
    a.mov(edi, at)?;
    a.mov(qword_ptr(rdi), value)
}

/// Leaves the handler through the runtime's report for an unexpected #PF (vector, error
/// code, RIP on COM1, exit 2), with the exception frame as the CPU pushed it.
fn unexpected_fault(s: &mut SectionAsm<'_>) -> Result<(), LinkError> {
    let stub = s.sym("vec_0e");
    Ok(s.a.jmp(stub)?)
}

fn pgfault(s: &mut SectionAsm<'_>, iterations: u32, fail: CodeLabel) -> Result<(), LinkError> {
    let a = &mut s.a;
    zero_pages(a, PGFAULT_PT, 1)?;
    store(a, PTE_FRAME, PGFAULT_MARKER)?;
    store(a, BOOT_PD + 8, PGFAULT_PT | P_RW)?;
    a.mov(rax, cr3)?;
    a.mov(cr3, rax)?;
    a.mov(r8d, PGFAULT_PT)?;
    a.mov(r9d, PTE_VIRT)?;
    a.mov(r15d, iterations)?;
    let mut top = a.create_label();
    mark(a, MARK_START)?;
    a.set_label(&mut top)?;
    a.mov(rbx, qword_ptr(r9))?; // faults; the handler maps the page; runs again
    a.mov(qword_ptr(r8), 0)?; // unmap
    a.invlpg(byte_ptr(r9))?;
    a.dec(r15)?;
    a.jnz(top)?;
    mark(a, MARK_END)?;
    a.cmp(rbx, PGFAULT_MARKER)?;
    a.jne(fail)?;
    Ok(())
}

/// #PF for `bench-pgfault`: a not-present supervisor read of the lazily mapped page maps it
/// and returns to the faulting load; anything else is unexpected.
fn pgfault_handler(s: &mut SectionAsm<'_>) -> Result<(), LinkError> {
    s.export_here("bench_map_page")?;
    let mut bad = s.a.create_label();
    let a = &mut s.a;
    a.push(rax)?;
    a.mov(rax, cr2)?;
    a.cmp(rax, r9)?;
    a.jne(bad)?;
    a.cmp(qword_ptr(rsp + 8), 0)?; // error code: not present, read, supervisor
    a.jne(bad)?;
    a.mov(qword_ptr(r8), PTE_FRAME | P_RW)?;
    a.pop(rax)?;
    a.add(rsp, 8)?;
    a.iretq()?;
    a.set_label(&mut bad)?;
    a.pop(rax)?;
    unexpected_fault(s)
}

fn tlbmiss(s: &mut SectionAsm<'_>, iterations: u32) -> Result<(), LinkError> {
    let a = &mut s.a;
    // PTE i maps frame i mod 16; PD[j] -> page table j; PDPT[1] -> the PD.
    let mut fill = a.create_label();
    a.mov(edi, TLBMISS_PTS)?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut fill)?;
    a.mov(eax, ecx)?;
    a.and(eax, 15)?;
    a.shl(eax, 12)?;
    a.add(eax, TLBMISS_FRAMES | P_RW)?;
    a.mov(qword_ptr(rdi + rcx * 8), rax)?;
    a.inc(ecx)?;
    a.cmp(ecx, TLBMISS_PAGES as i32)?;
    a.jb(fill)?;
    zero_pages(a, TLBMISS_PD, 1)?;
    for j in 0..(TLBMISS_PAGES as i32 / 512) {
        store(a, TLBMISS_PD + j * 8, (TLBMISS_PTS + j * 0x1000) | P_RW)?;
    }
    store(a, BOOT_PDPT + 8, TLBMISS_PD | P_RW)?;
    a.mov(rax, cr3)?;
    a.mov(cr3, rax)?;
    a.mov(esi, TLBMISS_VIRT)?;
    a.xor(edx, edx)?;
    a.xor(eax, eax)?;
    a.mov(r15d, iterations)?;
    let mut top = a.create_label();
    mark(a, MARK_START)?;
    a.set_label(&mut top)?;
    a.add(rax, qword_ptr(rsi + rdx))?;
    a.add(edx, 0x1000)?;
    a.and(edx, ((TLBMISS_PAGES - 1) << 12) as i32)?;
    a.dec(r15)?;
    a.jnz(top)?;
    mark(a, MARK_END)?;
    Ok(())
}

fn cr3switch(s: &mut SectionAsm<'_>, iterations: u32, fail: CodeLabel) -> Result<(), LinkError> {
    let a = &mut s.a;
    zero_pages(a, CR3_TABLES, CR3_SPACES * 4)?;
    zero_pages(a, CR3_FRAMES, CR3_SPACES)?;
    for i in 0..CR3_SPACES {
        let pml4 = CR3_TABLES + i * 0x4000;
        let (pdpt, pd, pt) = (pml4 + 0x1000, pml4 + 0x2000, pml4 + 0x3000);
        let frame = CR3_FRAMES + i * 0x1000;
        store(a, pml4, BOOT_PDPT | P_RW)?; // the shared kernel mapping
        store(a, pml4 + 8, pdpt | P_RW)?; // PML4[1]: private
        store(a, pdpt, pd | P_RW)?;
        store(a, pd, pt | P_RW)?;
        store(a, pt, frame | P_RW)?;
        store(a, frame, i)?; // the space's tag; +8 counts visits
    }
    a.mov(rsi, PRIVATE_VIRT)?;
    a.xor(r14d, r14d)?; // visits so far
    a.mov(r15d, iterations)?;
    let mut top = a.create_label();
    mark(a, MARK_START)?;
    a.set_label(&mut top)?;
    a.mov(ecx, r14d)?;
    a.and(ecx, CR3_SPACES - 1)?;
    a.mov(eax, ecx)?;
    a.shl(eax, 14)?;
    a.add(eax, CR3_TABLES)?;
    a.mov(cr3, rax)?;
    a.cmp(qword_ptr(rsi), rcx)?; // the page of this space, not a stale translation
    a.jne(fail)?;
    a.inc(qword_ptr(rsi + 8))?;
    a.inc(r14d)?;
    a.dec(r15)?;
    a.jnz(top)?;
    mark(a, MARK_END)?;
    a.mov(eax, PML4)?;
    a.mov(cr3, rax)?;
    for i in 0..CR3_SPACES as u32 {
        let visits = iterations / CR3_SPACES as u32 + u32::from(i < iterations % CR3_SPACES as u32);
        a.mov(edi, CR3_FRAMES + i as i32 * 0x1000 + 8)?;
        a.cmp(qword_ptr(rdi), visits as i32)?;
        a.jne(fail)?;
    }
    Ok(())
}

fn forkwait(s: &mut SectionAsm<'_>, iterations: u32, fail: CodeLabel) -> Result<(), LinkError> {
    let a = &mut s.a;
    // The parent: PML4[1] -> PDPT -> PD -> PT with eight writable frames, each mapped once.
    zero_pages(a, FORK_PARENT_PDPT, 8)?; // parent and child tables
    zero_pages(a, FORK_FRAMES, 2 * FORK_PAGES)?;
    zero_pages(a, FORK_VARS, 1)?;
    store(a, PML4 + 8, FORK_PARENT_PDPT | P_RW)?;
    store(a, FORK_PARENT_PDPT, FORK_PARENT_PD | P_RW)?;
    store(a, FORK_PARENT_PD, FORK_PARENT_PT | P_RW)?;
    for k in 0..FORK_PAGES {
        store(a, FORK_PARENT_PT + k * 8, (FORK_FRAMES + k * 0x1000) | P_RW)?;
        store(a, FORK_REFS + k * 8, 1)?;
        store(a, FORK_POOL_STACK + k * 8, FORK_POOL_FRAMES + k * 0x1000)?;
    }
    store(a, FORK_POOL_COUNT, FORK_PAGES)?;
    // The child's fixed upper tables: the shared kernel mapping and its own private part.
    store(a, FORK_CHILD_PML4 + 8, FORK_CHILD_PDPT | P_RW)?;
    store(a, FORK_CHILD_PDPT, FORK_CHILD_PD | P_RW)?;
    store(a, FORK_CHILD_PD, FORK_CHILD_PT | P_RW)?;
    a.mov(eax, PML4)?;
    a.mov(cr3, rax)?;

    a.mov(rsi, PRIVATE_VIRT)?;
    a.mov(r8d, FORK_PARENT_PT)?;
    a.mov(r9d, FORK_CHILD_PT)?;
    a.mov(r10d, FORK_REFS)?;
    a.xor(r14d, r14d)?; // what the parent last wrote to its page
    a.mov(r15d, iterations)?;
    let mut top = a.create_label();
    let mut copy = a.create_label();
    let mut shared = a.create_label();
    let mut free = a.create_label();
    let mut private = a.create_label();
    let mut freed = a.create_label();
    mark(a, MARK_START)?;
    a.set_label(&mut top)?;
    // fork: copy the kernel PML4 entry, then every PTE, write-protecting writable pages in
    // both address spaces and counting the child's references.
    a.mov(edi, PML4)?;
    a.mov(rax, qword_ptr(rdi))?;
    a.mov(edi, FORK_CHILD_PML4)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut copy)?;
    a.mov(rax, qword_ptr(r8 + rcx * 8))?;
    a.btr(rax, 1)?; // W -> CF
    a.jnc(shared)?;
    a.or(eax, PTE_COW)?;
    a.mov(qword_ptr(r8 + rcx * 8), rax)?;
    a.set_label(&mut shared)?;
    a.mov(qword_ptr(r9 + rcx * 8), rax)?;
    a.inc(qword_ptr(r10 + rcx * 8))?;
    a.inc(ecx)?;
    a.cmp(ecx, FORK_PAGES)?;
    a.jb(copy)?;
    // The parent's own translations may still allow writes: flush them.
    a.mov(rax, cr3)?;
    a.mov(cr3, rax)?;
    // The child runs: it reads a page and writes another (a copy-on-write fault), exits.
    a.mov(eax, FORK_CHILD_PML4)?;
    a.mov(cr3, rax)?;
    a.mov(rax, qword_ptr(rsi))?;
    a.mov(qword_ptr(rsi + FORK_WRITTEN_PAGE * 0x1000), CHILD_MARKER)?;
    a.mov(eax, PML4)?;
    a.mov(cr3, rax)?;
    // wait: free the child: drop its references to shared frames, return its own frames.
    a.xor(ecx, ecx)?;
    a.set_label(&mut free)?;
    a.mov(rax, qword_ptr(r9 + rcx * 8))?;
    a.mov(qword_ptr(r9 + rcx * 8), 0)?;
    a.test(eax, PTE_COW)?;
    a.jz(private)?;
    a.dec(qword_ptr(r10 + rcx * 8))?;
    a.jmp(freed)?;
    a.set_label(&mut private)?;
    a.and(rax, !0xfffi32)?;
    a.mov(edi, FORK_POOL_COUNT)?;
    a.mov(rdx, qword_ptr(rdi))?;
    a.mov(
        qword_ptr(rdi + rdx * 8 + (FORK_POOL_STACK - FORK_POOL_COUNT)),
        rax,
    )?;
    a.inc(qword_ptr(rdi))?;
    a.set_label(&mut freed)?;
    a.inc(ecx)?;
    a.cmp(ecx, FORK_PAGES)?;
    a.jb(free)?;
    // The parent sees its own data, then writes the page (a fault that reuses the frame).
    a.cmp(qword_ptr(rsi + FORK_WRITTEN_PAGE * 0x1000), r14)?;
    a.jne(fail)?;
    a.mov(qword_ptr(rsi + FORK_WRITTEN_PAGE * 0x1000), r15)?;
    a.mov(r14, r15)?;
    a.dec(r15)?;
    a.jnz(top)?;
    mark(a, MARK_END)?;
    // Everything came back: the pool is full, every frame is mapped once.
    a.mov(edi, FORK_POOL_COUNT)?;
    a.cmp(qword_ptr(rdi), FORK_PAGES)?;
    a.jne(fail)?;
    for k in 0..FORK_PAGES {
        a.mov(edi, FORK_REFS + k * 8)?;
        a.cmp(qword_ptr(rdi), 1)?;
        a.jne(fail)?;
    }
    Ok(())
}

/// #PF for `bench-forkwait`: a supervisor write to a present copy-on-write page. If no other
/// address space maps the frame, the page becomes writable again; otherwise the handler
/// takes a frame from the pool, copies the page into it and maps it writable. Either way it
/// `INVLPG`s the address and returns to the write.
fn cow_handler(s: &mut SectionAsm<'_>) -> Result<(), LinkError> {
    s.export_here("bench_cow")?;
    let mut bad = s.a.create_label();
    let mut reuse = s.a.create_label();
    let mut mapped = s.a.create_label();
    let mut child = s.a.create_label();
    let mut table_known = s.a.create_label();
    let a = &mut s.a;
    let saved = [rax, rcx, rdx, rsi, rdi, rbx];
    for r in saved {
        a.push(r)?;
    }
    let error_code = qword_ptr(rsp + 8 * saved.len() as i32);
    a.cmp(error_code, 3)?; // present, write, supervisor
    a.jne(bad)?;
    a.mov(rax, cr2)?;
    a.mov(rcx, PRIVATE_VIRT)?;
    a.sub(rax, rcx)?;
    a.shr(rax, 12)?;
    a.cmp(rax, FORK_PAGES)?;
    a.jae(bad)?;
    a.mov(rcx, rax)?; // the page's index
    a.mov(rdx, cr3)?;
    a.cmp(edx, FORK_CHILD_PML4)?;
    a.je(child)?;
    a.mov(ebx, FORK_PARENT_PT)?;
    a.jmp(table_known)?;
    a.set_label(&mut child)?;
    a.mov(ebx, FORK_CHILD_PT)?;
    a.set_label(&mut table_known)?;
    a.mov(rax, qword_ptr(rbx + rcx * 8))?;
    a.test(eax, PTE_COW)?;
    a.jz(bad)?;
    a.mov(edi, FORK_REFS)?;
    a.cmp(qword_ptr(rdi + rcx * 8), 1)?;
    a.je(reuse)?;
    // Shared: one reference less, copy into a pool frame.
    a.dec(qword_ptr(rdi + rcx * 8))?;
    a.mov(edi, FORK_POOL_COUNT)?;
    a.dec(qword_ptr(rdi))?;
    a.mov(rdx, qword_ptr(rdi))?;
    a.mov(
        rdi,
        qword_ptr(rdi + rdx * 8 + (FORK_POOL_STACK - FORK_POOL_COUNT)),
    )?;
    a.mov(rdx, rdi)?; // the new frame
    a.mov(rsi, rax)?;
    a.and(rsi, !0xfffi32)?; // the shared frame
    a.push(rcx)?;
    a.mov(ecx, 512)?;
    a.rep().movsq()?;
    a.pop(rcx)?;
    a.lea(rax, qword_ptr(rdx + P_RW))?;
    a.jmp(mapped)?;
    a.set_label(&mut reuse)?;
    a.and(eax, !PTE_COW)?;
    a.or(eax, 2)?; // W
    a.set_label(&mut mapped)?;
    a.mov(qword_ptr(rbx + rcx * 8), rax)?;
    a.mov(rax, cr2)?;
    a.invlpg(byte_ptr(rax))?;
    for r in saved.into_iter().rev() {
        a.pop(r)?;
    }
    a.add(rsp, 8)?;
    a.iretq()?;
    a.set_label(&mut bad)?;
    for r in saved.into_iter().rev() {
        a.pop(r)?;
    }
    unexpected_fault(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_paging_tables_stay_inside_the_identity_mapped_2_mib_and_apart() {
        let regions = [
            (PGFAULT_PT, 0x1000),
            (PTE_FRAME, 0x1000),
            (TLBMISS_PTS, 0x8000),
            (TLBMISS_PD, 0x1000),
            (TLBMISS_FRAMES, 0x1_0000),
            (CR3_TABLES, CR3_SPACES * 0x4000),
            (CR3_FRAMES, CR3_SPACES * 0x1000),
            (FORK_PARENT_PDPT, 0x8000),
            (FORK_FRAMES, 2 * FORK_PAGES * 0x1000),
            (FORK_VARS, 0x1000),
        ];
        for (i, &(start, len)) in regions.iter().enumerate() {
            assert!(start >= 0x10_0000 && start + len <= 0x20_0000, "{start:#x}");
            for &(other, other_len) in &regions[i + 1..] {
                assert!(
                    start + len <= other || other + other_len <= start,
                    "{start:#x}"
                );
            }
        }
        assert_eq!(TLBMISS_PAGES % 512, 0);
    }
}
