//! End-to-end check of the loaders on the host's KVM: each image is loaded by
//! `loader::load`, the returned `CpuState` is handed to a bare KVM vCPU (no deja engine in
//! between), and the guest reports what it sees through port writes. This checks the GDT,
//! segment caches, page tables, stack, multiboot registers and MBI, and the read-only ROM
//! mapping against real hardware semantics.

use deja_machine::cpu::{Segment, gpr, seg};
use deja_machine::devices::{Device, DeviceError, DeviceState, InterruptLines, IoCtx, Irqchip};
use deja_machine::loader::{self, EntryMode, Image};
use deja_machine::{ClockMode, CpuState, LiveHost, Machine, MachineConfig};
use iced_x86::code_asm::*;
use kvm_bindings::{KVM_MEM_READONLY, kvm_dtable, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

struct NoIrqchip;

impl Device for NoIrqchip {
    fn name(&self) -> &'static str {
        "none"
    }
    fn read(&mut self, _: &mut IoCtx, _: u64, _: &mut [u8]) {}
    fn write(&mut self, _: &mut IoCtx, _: u64, _: &[u8]) {}
    fn save(&self) -> DeviceState {
        DeviceState::DebugExit
    }
    fn restore(&mut self, _: &DeviceState) -> Result<(), DeviceError> {
        Ok(())
    }
}

impl InterruptLines for NoIrqchip {
    fn set_irq(&mut self, _: u32, _: bool) {}
}

impl Irqchip for NoIrqchip {
    fn interrupt_pending(&self) -> bool {
        false
    }
    fn acknowledge(&mut self) -> u8 {
        0xff
    }
}

fn kvm_seg(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present.into(),
        dpl: s.dpl,
        db: s.db.into(),
        s: s.s.into(),
        l: s.l.into(),
        g: s.g.into(),
        avl: s.avl.into(),
        unusable: s.unusable.into(),
        padding: 0,
    }
}

/// What the guest did: its port writes (port, byte) and the number of writes to ROM.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    outs: Vec<(u16, u8)>,
    rom_writes: usize,
}

/// Loads `image` into a 16 MiB machine and runs it on KVM until HLT.
fn run(kvm: &Kvm, image: &Image, cmdline: &str) -> Outcome {
    let config = MachineConfig {
        ram_size: 16 << 20,
        cmdline: cmdline.into(),
        ..MachineConfig::default()
    };
    let host = Box::new(LiveHost::new(ClockMode::Virtual));
    let mut m = Machine::new(config, host, Box::new(NoIrqchip)).unwrap();
    let st: CpuState = loader::load(&mut m, image).unwrap();
    let vm = kvm.create_vm().unwrap();
    for (slot, r) in m.mem.iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if m.layout.is_rom(r.start_addr().0) {
                KVM_MEM_READONLY
            } else {
                0
            },
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: m.mem.get_host_address(r.start_addr()).unwrap() as u64,
        };
        // SAFETY: the host range is a live mapping owned by `m.mem`, which outlives `vm`
        // (both are dropped at the end of this function, `vm` first).
        unsafe { vm.set_user_memory_region(region).unwrap() };
    }
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.es = kvm_seg(&st.seg[seg::ES]);
    sregs.cs = kvm_seg(&st.seg[seg::CS]);
    sregs.ss = kvm_seg(&st.seg[seg::SS]);
    sregs.ds = kvm_seg(&st.seg[seg::DS]);
    sregs.fs = kvm_seg(&st.seg[seg::FS]);
    sregs.gs = kvm_seg(&st.seg[seg::GS]);
    sregs.tr = kvm_seg(&st.tr);
    sregs.ldt = kvm_seg(&st.ldtr);
    sregs.gdt = kvm_dtable {
        base: st.gdtr.base,
        limit: st.gdtr.limit,
        padding: [0; 3],
    };
    sregs.idt = kvm_dtable {
        base: st.idtr.base,
        limit: st.idtr.limit,
        padding: [0; 3],
    };
    (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer) = (st.cr0, st.cr3, st.cr4, st.efer);
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = st.rip;
    regs.rflags = st.rflags;
    regs.rax = st.gpr[gpr::RAX];
    regs.rbx = st.gpr[gpr::RBX];
    regs.rdx = st.gpr[gpr::RDX];
    regs.rsp = st.gpr[gpr::RSP];
    vcpu.set_regs(&regs).unwrap();
    let mut out = Outcome {
        outs: Vec::new(),
        rom_writes: 0,
    };
    for _ in 0..100 {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(port, data) => out.outs.push((port, data[0])),
            VcpuExit::MmioWrite(addr, _) if m.layout.is_rom(addr) => out.rom_writes += 1,
            VcpuExit::Hlt => return out,
            e => panic!("{}: unexpected exit {e:?}", image.name),
        }
    }
    panic!("{}: no HLT after 100 exits: {out:?}", image.name);
}

fn assemble(
    bitness: u32,
    ip: u64,
    f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Vec<u8> {
    let mut a = CodeAssembler::new(bitness).unwrap();
    f(&mut a).unwrap();
    a.assemble(ip).unwrap()
}

/// Each test writes: port 0x80 ← a value the entry state determines; 0x81.. more values.
#[test]
fn every_entry_mode_runs_on_kvm() {
    if !deja_testkit::kvm_or_skip("every_entry_mode_runs_on_kvm") {
        return;
    }
    let kvm = Kvm::new().unwrap();

    // Real mode at 0x7c00: CS = 0 (push cs), SS:SP = 0:7c00 (mov ax, sp).
    let real = assemble(16, 0x7c00, |a| {
        a.push(cs)?;
        a.pop(ax)?;
        a.out(0x80, al)?;
        a.mov(ax, sp)?;
        a.out(0x81, al)?;
        a.mov(al, ah)?;
        a.out(0x82, al)?;
        a.hlt()
    });
    let img = Image::raw("real", real, 0x7c00, 0x7c00, EntryMode::Real);
    assert_eq!(
        run(&kvm, &img, "").outs,
        vec![(0x80, 0), (0x81, 0x00), (0x82, 0x7c)]
    );

    // Protected mode: the stack works, DS reaches all of RAM, reloading DS from the GDT
    // works, and paging is off (CR0 bit 31).
    let prot = assemble(32, 0x10_0000, |a| {
        a.mov(eax, 0x22)?;
        a.push(eax)?;
        a.pop(ebx)?;
        a.mov(al, bl)?;
        a.out(0x80, al)?;
        a.mov(ax, 0x10)?;
        a.mov(ds, ax)?;
        a.mov(al, byte_ptr(0x10_0001))?; // the immediate of the first instruction
        a.out(0x81, al)?;
        a.mov(eax, cr0)?;
        a.shr(eax, 24)?;
        a.out(0x82, al)?;
        a.hlt()
    });
    let img = Image::raw(
        "protected",
        prot,
        0x10_0000,
        0x10_0000,
        EntryMode::Protected,
    );
    assert_eq!(
        run(&kvm, &img, "").outs,
        vec![(0x80, 0x22), (0x81, 0x22), (0x82, 0)]
    );

    // Long mode: 64-bit code (a REX.W push/pop round trip), loads through the identity
    // map near the top of RAM, paging on.
    let long = assemble(64, 0x20_0000, |a| {
        a.mov(rax, 0x1234_5678_9abc_def0u64)?;
        a.push(rax)?;
        a.pop(rbx)?;
        a.shr(rbx, 56)?;
        a.mov(al, bl)?;
        a.out(0x80, al)?;
        a.mov(byte_ptr(0xff_f000), 0x77)?;
        a.mov(al, byte_ptr(0xff_f000))?;
        a.out(0x81, al)?;
        a.mov(rax, cr0)?;
        a.shr(eax, 24)?;
        a.out(0x82, al)?;
        a.hlt()
    });
    let img = Image::raw("long", long, 0x20_0000, 0x20_0000, EntryMode::Long);
    assert_eq!(
        run(&kvm, &img, "").outs,
        vec![(0x80, 0x12), (0x81, 0x77), (0x82, 0x80)]
    );

    // Multiboot (a.out kludge): EAX holds the magic, EBX the MBI, whose flags and command
    // line the guest reads.
    let flags: u32 = 1 << 16;
    let mut kernel = Vec::new();
    for w in [
        0x1bad_b002u32,
        flags,
        0u32.wrapping_sub(0x1bad_b002u32.wrapping_add(flags)),
        0x30_0000,
        0x30_0000,
        0,
        0,
        0x30_0020,
    ] {
        kernel.extend_from_slice(&w.to_le_bytes());
    }
    kernel.extend(assemble(32, 0x30_0020, |a| {
        let mut bad = a.create_label();
        a.cmp(eax, 0x2bad_b002)?;
        a.jne(bad)?;
        a.mov(eax, dword_ptr(ebx))?;
        a.out(0x80, al)?;
        a.mov(eax, dword_ptr(ebx + 16))?;
        a.mov(al, byte_ptr(eax))?;
        a.out(0x81, al)?;
        a.hlt()?;
        a.set_label(&mut bad)?;
        a.mov(al, 0xee)?;
        a.out(0x80, al)?;
        a.hlt()
    }));
    let img = Image::multiboot("K", kernel);
    assert_eq!(run(&kvm, &img, "x").outs, vec![(0x80, 0x4f), (0x81, b'K')]);

    // Firmware: starts at the reset vector in the ROM; a write to the ROM is dropped (it
    // reaches the VMM as MMIO) and the ROM still reads its original byte; the low alias at
    // 0xf0000 holds the same bytes.
    let mut rom = vec![0xa5u8; 64 << 10];
    let stub = assemble(16, 0xfff0, |a| {
        a.mov(byte_ptr(0xfff0).cs(), 0x12)?; // write into the ROM
        a.jmp(0xe000u64)
    });
    let body = assemble(16, 0xe000, |a| {
        a.mov(al, byte_ptr(0xfff0).cs())?; // ROM: still the stub's first byte
        a.out(0x80, al)?;
        a.mov(ax, 0xf000)?;
        a.mov(ds, ax)?;
        a.mov(al, byte_ptr(0xe000))?; // alias at 0xfe000: the body's first byte
        a.out(0x81, al)?;
        a.hlt()
    });
    let n = rom.len();
    rom[n - 16..n - 16 + stub.len()].copy_from_slice(&stub);
    rom[0xe000..0xe000 + body.len()].copy_from_slice(&body);
    let img = Image::firmware("bios", rom);
    let out = run(&kvm, &img, "");
    assert_eq!(out.outs, vec![(0x80, stub[0]), (0x81, body[0])]);
    assert_eq!(out.rom_writes, 1);
}
