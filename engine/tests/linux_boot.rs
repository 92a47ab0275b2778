//! The Linux boot protocol's 64-bit entry, checked by a kernel of our own: a bzImage whose
//! entry reads what the boot loader left (the zero page at RSI: the initrd's address, the
//! command line, the e820 entry count) and reports a checksum of them through debug-exit.
//! Debian's kernel is booted by the Linux tests; this one needs no download. The same for
//! the PVH entry: a vmlinux whose 32-bit entry reads the `hvm_start_info` at EBX.

mod common;

use deja_engine::{EngineKind, RunEnd, RunOptions, build_vm};
use deja_machine::devices::StopRequest;
use deja_machine::loader::{Image, ImageFormat};
use deja_machine::{ClockMode, LiveHost, MachineConfig};

/// `mov eax, [rsi+0x218]; mov ebx, [rax]; mov edx, [rsi+0x228]; movzx ecx, byte [rdx];
/// add ebx, ecx; movzx ecx, byte [rsi+0x1e8]; add ebx, ecx; mov eax, ebx; mov dx, 0xf4;
/// out dx, al; hlt`: the initrd's first byte + the command line's first byte + the e820
/// entry count.
const ENTRY: &[u8] = &[
    0x8b, 0x86, 0x18, 0x02, 0x00, 0x00, 0x8b, 0x18, 0x8b, 0x96, 0x28, 0x02, 0x00, 0x00, 0x0f, 0xb6,
    0x0a, 0x01, 0xcb, 0x0f, 0xb6, 0x8e, 0xe8, 0x01, 0x00, 0x00, 0x01, 0xcb, 0x89, 0xd8, 0x66, 0xba,
    0xf4, 0x00, 0xee, 0xf4,
];

fn boot(engine: EngineKind) -> Option<RunEnd> {
    let bytes = deja_testkit::bzimage(ENTRY);
    let image = Image::detect("synthetic-bzImage", bytes).unwrap();
    assert_eq!(image.format, ImageFormat::Linux);
    run(engine, image)
}

fn run(engine: EngineKind, mut image: Image) -> Option<RunEnd> {
    image.initrd = Some(Box::new(Image {
        name: "initrd".into(),
        bytes: vec![0x11, 0, 0, 0, 0x99],
        format: image.format.clone(),
        initrd: None,
    }));
    let config = MachineConfig {
        ram_size: 64 << 20,
        cmdline: "console=ttyS0".into(),
        ..MachineConfig::default()
    };
    let host = Box::new(LiveHost::new(ClockMode::Virtual));
    let mut vm = match build_vm(engine, config, host, Box::new(std::io::sink()), &image) {
        Ok(vm) => vm,
        Err(deja_engine::BuildError::EngineUnavailable { reason, .. }) => {
            deja_testkit::skip_without_kvm("the_64_bit_entry_sees_the_zero_page", reason);
            return None;
        }
        Err(e) => panic!("{e}"),
    };
    let out = vm
        .run(RunOptions {
            timeout: Some(std::time::Duration::from_secs(60)),
            max_instructions: None,
        })
        .unwrap();
    Some(out.end)
}

#[test]
fn the_64_bit_entry_sees_the_zero_page_initrd_and_command_line() {
    let layout = deja_machine::memory::MemoryLayout::pc(64 << 20).unwrap();
    let e820 = deja_machine::loader::multiboot::memory_map(&layout).len() as u32;
    let want = (0x11 + u32::from(b'c') + e820) & 0xff;
    for engine in [EngineKind::Bt, EngineKind::Kvm] {
        if let Some(end) = boot(engine) {
            assert_eq!(
                end,
                RunEnd::Stopped(StopRequest::DebugExit { value: want }),
                "{engine}"
            );
        }
    }
}

/// The PVH entry's code: checks that paging is off and the start info's magic and version,
/// then reports the initrd's first byte (through the module list) + the command line's
/// first byte + the memory map's entry count + the module count through debug-exit, or
/// 0xee when a check fails.
fn pvh_entry() -> Vec<u8> {
    use iced_x86::code_asm::*;
    let mut a = CodeAssembler::new(32).unwrap();
    let mut fail = a.create_label();
    a.mov(eax, cr0).unwrap();
    a.test(eax, 0x8000_0000u32 as i32).unwrap();
    a.jnz(fail).unwrap();
    a.cmp(dword_ptr(ebx), 0x336e_c578u32 as i32).unwrap();
    a.jne(fail).unwrap();
    a.cmp(dword_ptr(ebx + 4), 1).unwrap();
    a.jne(fail).unwrap();
    a.mov(esi, dword_ptr(ebx + 16)).unwrap();
    a.mov(esi, dword_ptr(esi)).unwrap();
    a.movzx(ecx, byte_ptr(esi)).unwrap();
    a.mov(edx, dword_ptr(ebx + 24)).unwrap();
    a.movzx(eax, byte_ptr(edx)).unwrap();
    a.add(ecx, eax).unwrap();
    a.add(ecx, dword_ptr(ebx + 48)).unwrap();
    a.add(ecx, dword_ptr(ebx + 12)).unwrap();
    a.mov(eax, ecx).unwrap();
    a.mov(dx, 0xf4).unwrap();
    a.out(dx, al).unwrap();
    a.hlt().unwrap();
    a.set_label(&mut fail).unwrap();
    a.mov(al, 0xee).unwrap();
    a.mov(dx, 0xf4).unwrap();
    a.out(dx, al).unwrap();
    a.hlt().unwrap();
    a.assemble(deja_testkit::VMLINUX_ENTRY).unwrap()
}

#[test]
fn the_pvh_entry_sees_the_start_info_initrd_and_command_line() {
    let layout = deja_machine::memory::MemoryLayout::pc(64 << 20).unwrap();
    let e820 = deja_machine::loader::multiboot::memory_map(&layout).len() as u32;
    let want = (0x11 + u32::from(b'c') + e820 + 1) & 0xff;
    let vmlinux = deja_testkit::vmlinux(&pvh_entry());
    for engine in [EngineKind::Bt, EngineKind::Kvm] {
        let image = Image::detect("synthetic-vmlinux", vmlinux.clone()).unwrap();
        assert_eq!(image.format, ImageFormat::Pvh);
        if let Some(end) = run(engine, image) {
            assert_eq!(
                end,
                RunEnd::Stopped(StopRequest::DebugExit { value: want }),
                "{engine}"
            );
        }
    }
}
