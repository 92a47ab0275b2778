//! Costs of the soft-TLB MMU: a TLB hit, a full 4-level walk (TLB miss), and the pure
//! walker alone.

#![allow(missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};
use deja_bt::mmu::{
    Access, CR0_PG, CR0_WP, CR4_PAE, CR4_PGE, EFER_LMA, EFER_LME, EFER_NXE, PagingConfig,
    PagingRegs, TLB_ENTRIES, soft_tlb, walk,
};
use std::hint::black_box;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const PT: u64 = 0x4000;
const FLAGS: u64 = 0b111;

/// 512 4 KiB pages at linear 0..2 MiB, mapped by 4-level paging to 16 MiB + the same offset.
fn setup() -> (GuestMemoryMmap, PagingRegs) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    mem.write_obj(PDPT | FLAGS, GuestAddress(PML4)).unwrap();
    mem.write_obj(PD | FLAGS, GuestAddress(PDPT)).unwrap();
    mem.write_obj(PT | FLAGS, GuestAddress(PD)).unwrap();
    for i in 0..512u64 {
        // A and D already set, so the walks below measure reads only.
        let pte = (0x100_0000 + i * 0x1000) | FLAGS | 0x60;
        mem.write_obj(pte, GuestAddress(PT + i * 8)).unwrap();
    }
    for table in [PML4, PDPT, PD] {
        let e: u64 = mem.read_obj(GuestAddress(table)).unwrap();
        mem.write_obj(e | 0x20, GuestAddress(table)).unwrap();
    }
    let regs = PagingRegs {
        cr0: CR0_PG | CR0_WP | 1,
        cr3: PML4,
        cr4: CR4_PAE | CR4_PGE,
        efer: EFER_LME | EFER_LMA | EFER_NXE,
    };
    (mem, regs)
}

fn bench(c: &mut Criterion) {
    let (mem, regs) = setup();
    let read = Access::SUPERVISOR_READ;

    let mut tlb = soft_tlb();
    tlb.translate(&mem, &regs, 0x5000, read).unwrap();
    c.bench_function("mmu/tlb_hit", |b| {
        b.iter(|| tlb.translate(&mem, black_box(&regs), black_box(0x5123), read))
    });

    // Cycling through 64 pages that all fit in the TLB: hits with changing slots.
    let mut tlb = soft_tlb();
    let mut i = 0u64;
    c.bench_function("mmu/tlb_hit_64_pages", |b| {
        b.iter(|| {
            i = (i + 1) & 63;
            tlb.translate(&mem, black_box(&regs), black_box(i << 12), read)
        })
    });

    // INVLPG before each access forces a miss and a full 4-level walk.
    let mut tlb = soft_tlb();
    c.bench_function("mmu/tlb_miss_4level_walk", |b| {
        b.iter(|| {
            tlb.invlpg(0x7000);
            tlb.translate(&mem, black_box(&regs), black_box(0x7123), read)
        })
    });

    let cfg = PagingConfig::from_regs(&regs);
    c.bench_function("mmu/walk_4level_pure", |b| {
        b.iter(|| walk(&mem, black_box(&cfg), None, black_box(0x7123), read))
    });

    let mut tlb = soft_tlb();
    c.bench_function("mmu/flush_non_global", |b| b.iter(|| tlb.flush(false)));
    let _ = TLB_ENTRIES;
}

criterion_group!(benches, bench);
criterion_main!(benches);
