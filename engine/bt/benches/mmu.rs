//! Costs of the soft-TLB MMU: a TLB hit, a full 4-level walk (TLB miss), and the pure
//! walker alone.

#![allow(missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};
use deja_bt::mmu::{
    Access, CR0_PG, CR0_WP, CR4_PAE, CR4_PGE, EFER_LMA, EFER_LME, EFER_NXE, PagingConfig,
    PagingRegs, soft_tlb, walk,
};
use deja_machine::GuestRam;
use std::hint::black_box;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const PT: u64 = 0x4000;
const FLAGS: u64 = 0b111;

/// 512 4 KiB pages at linear 0..2 MiB, mapped by 4-level paging to 16 MiB + the same offset.
fn setup() -> (GuestRam, PagingRegs) {
    let mem = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
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

    // A supervisor write that hits (the dirty bit is already known set).
    let write = Access::SUPERVISOR_WRITE;
    let mut tlb = soft_tlb();
    tlb.translate(&mem, &regs, 0x9000, write).unwrap();
    c.bench_function("mmu/tlb_hit_write", |b| {
        b.iter(|| tlb.translate(&mem, black_box(&regs), black_box(0x9abc), write))
    });

    // 32-bit paging, two levels: the PD at 0x5_0000 points to the PT at 0x6_0000.
    mem.write_obj(0x6_0000u32 | 0b111, GuestAddress(0x5_0000))
        .unwrap();
    mem.write_obj(0x100_0000u32 | 0b111_0111, GuestAddress(0x6_0000 + 7 * 4))
        .unwrap();
    let regs32 = PagingRegs {
        cr0: CR0_PG | 1,
        cr3: 0x5_0000,
        cr4: 0,
        efer: 0,
    };
    let mut tlb = soft_tlb();
    c.bench_function("mmu/tlb_miss_32bit_walk", |b| {
        b.iter(|| {
            tlb.invlpg(0x7000);
            tlb.translate(&mem, black_box(&regs32), black_box(0x7123), read)
        })
    });

    // A CR3 flush of a TLB holding 512 translations (none global).
    let mut tlb = soft_tlb();
    c.bench_function("mmu/flush_full_tlb", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                for i in 0..512u64 {
                    tlb.translate(&mem, &regs, i << 12, read).unwrap();
                }
                let start = Instant::now();
                tlb.flush(false);
                total += start.elapsed();
            }
            total
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
