//! Differential tests with the host CPU in this very process as the oracle, for the legacy
//! instructions kvm on this host cannot judge: BCD adjusts (DAA, AAA and AAS shut a PVM
//! guest down) and 16-bit stacks (PVM runs guest ring 3 on the host's own segments, so a
//! guest's 16-bit SS never takes effect).
//!
//! The same 32-bit code bytes run twice at the same linear addresses: natively, in
//! compatibility mode through Linux's 32-bit user code segment (0x23), with a 16-bit stack
//! segment installed in this process's LDT (`modify_ldt`); and on bt in ring-3
//! compatibility mode, with the same selectors (GDT and LDT) and paging that maps the same
//! linear range. The code reads its inputs from a context block and writes its registers,
//! flags and memory back; the two runs must agree bit for bit on everything the
//! architecture defines (flags an instruction leaves undefined are followed as in
//! `differential.rs`).
//!
//! Linux on x86-64 only; elsewhere (or without 32-bit user code or `modify_ldt`) the tests
//! print a SKIP line.

mod common;

use common::{Rng, load, machine, peek};
use deja_bt::BtCpu;
use deja_machine::cpu::{CpuState, DescriptorTable, Segment, seg};
use deja_machine::vm_memory::{Bytes, GuestAddress};
use deja_machine::{Cpu, Exit, Limit};
use iced_x86::code_asm::*;
use iced_x86::{Decoder, DecoderOptions, Formatter, NasmFormatter, RflagsBits};
use std::sync::Mutex;

/// Size of the shared linear range (two 2 MiB pages).
const AREA: usize = 4 << 20;
/// Offsets inside the range.
const CODE: u64 = 0x1000;
const GDT: u64 = 0x2000;
const LDT: u64 = 0x2800;
const CTX: u64 = 0x3000;
const DATA: u64 = 0x4000;
/// Top of the flat 32-bit stack the native stub runs on before switching.
const FLAT_STACK: u64 = 0xf000;
/// Base of the 16-bit stack segment (limit 0xffff).
const STACK16: u64 = 0x1_0000;
/// The exhaustive tests' results.
const OUT: u64 = 0x10_0000;
/// The 64-bit trampoline and the far pointer it calls through.
const TRAMPOLINE: u64 = 0x800;
const FAR_PTR: u64 = 0xf00;

/// Context block: the 16-bit SS selector, the initial ESP, the flat SS selector, the
/// saved flat ESP, the eight initial registers (ESP's slot unused), the initial EFLAGS.
const CTX_SS16: u64 = CTX;
const CTX_ESP: u64 = CTX + 4;
const CTX_FLAT_SS: u64 = CTX + 8;
const CTX_SAVED_ESP: u64 = CTX + 12;
const CTX_REGS: u64 = CTX + 16;
const CTX_EFLAGS: u64 = CTX + 48;
/// The final registers (EAX..EDI, ESP included) and EFLAGS.
const CTX_OUT: u64 = CTX + 0x100;
const CTX_OUT_EFLAGS: u64 = CTX + 0x120;

/// Where guest-physical memory holds the range on bt.
const GUEST_PHYS: u64 = 0x40_0000;
/// bt's page tables (identity-mapped nowhere: only the range is mapped).
const TABLES: u64 = 0x10_0000;

/// The selectors of the bt guest's GDT (ring 3) for CS and the data segments.
const BT_CODE32: u16 = 0x1b;
const BT_DATA: u16 = 0x23;
/// Linux's 32-bit user code and user data selectors; LDT entry 0 at RPL 3.
const LINUX_CODE32: u16 = 0x23;
const LINUX_DATA: u16 = 0x2b;
const LDT_STACK16: u16 = 0x07;

/// The range, mapped read-write-execute below 4 GiB and 2 MiB-aligned (so two large pages
/// in one page directory map it on bt).
struct Native {
    base: u64,
}

/// One native run at a time: the LDT is the process's.
static NATIVE: Mutex<Option<Result<Native, String>>> = Mutex::new(None);

impl Native {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    fn new() -> Result<Native, String> {
        // SAFETY: an anonymous private mapping; nothing else refers to it. MAP_32BIT places
        // it in the low 2 GiB, where 32-bit code can address it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                AREA * 2,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err("mmap(MAP_32BIT) failed".into());
        }
        let mut base = (p as u64).next_multiple_of(2 << 20);
        if (base >> 21) & 511 == 511 {
            base += 2 << 20;
        }
        let n = Native { base };
        // LDT entry 0: a 16-bit (B = 0), byte-granular, writable data segment at STACK16.
        #[repr(C)]
        struct UserDesc {
            entry_number: u32,
            base_addr: u32,
            limit: u32,
            flags: u32,
        }
        let d = UserDesc {
            entry_number: 0,
            base_addr: (base + STACK16) as u32,
            limit: 0xffff,
            // seg_32bit = 0, contents = data, writable, byte granular, present, useable.
            flags: 1 << 6,
        };
        // SAFETY: modify_ldt(1, &desc, size) writes one LDT entry of this process from a
        // properly laid out user_desc.
        let r = unsafe {
            libc::syscall(
                libc::SYS_modify_ldt,
                1,
                &d as *const UserDesc,
                std::mem::size_of::<UserDesc>(),
            )
        };
        if r != 0 {
            return Err(format!(
                "modify_ldt failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        // The trampoline: save RSP in R8 (compatibility-mode code cannot touch it), switch
        // to the flat stack below 4 GiB, far-call the 32-bit code, come back.
        let mut t = vec![0x49, 0x89, 0xe0]; // mov r8, rsp
        t.push(0xbc); // mov esp, imm32
        t.extend_from_slice(&((base + FLAT_STACK) as u32).to_le_bytes());
        t.extend_from_slice(&[0xff, 0x1c, 0x25]); // call far [abs32]
        t.extend_from_slice(&((base + FAR_PTR) as u32).to_le_bytes());
        t.extend_from_slice(&[0x4c, 0x89, 0xc4, 0xc3]); // mov rsp, r8; ret
        n.write(TRAMPOLINE, &t);
        let mut fp = ((base + CODE) as u32).to_le_bytes().to_vec();
        fp.extend_from_slice(&LINUX_CODE32.to_le_bytes());
        n.write(FAR_PTR, &fp);
        // Prove the path works before trusting it with a test.
        n.write(CODE, &[0xcb]); // retf
        n.call();
        Ok(n)
    }

    #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
    fn new() -> Result<Native, String> {
        Err("needs Linux on x86-64 (32-bit user code, modify_ldt)".into())
    }

    fn write(&self, off: u64, bytes: &[u8]) {
        assert!(off as usize + bytes.len() <= AREA);
        // SAFETY: inside the mapping made in `new` (checked above), which lives for the
        // process.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), (self.base + off) as *mut u8, bytes.len())
        };
    }

    fn read(&self, off: u64, len: usize) -> Vec<u8> {
        assert!(off as usize + len <= AREA);
        let mut v = vec![0u8; len];
        // SAFETY: as in `write`.
        unsafe {
            std::ptr::copy_nonoverlapping((self.base + off) as *const u8, v.as_mut_ptr(), len)
        };
        v
    }

    /// Runs the 32-bit code at CODE (which ends in RETF).
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    fn call(&self) {
        let t = self.base + TRAMPOLINE;
        // SAFETY: the trampoline and the code it calls were written by this harness: the
        // code runs in compatibility mode on the range's flat stack and its 16-bit stack
        // segment, writes only inside the range, restores the flat SS/ESP and DF, and
        // returns with RETF; R8 carries RSP across it. Everything the SysV ABI lets a callee
        // clobber is declared clobbered.
        unsafe {
            std::arch::asm!(
                "call {t}",
                t = in(reg) t,
                out("r8") _,
                clobber_abi("sysv64"),
            );
        }
    }

    #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
    fn call(&self) {}
}

/// Runs `f` with the native range, or prints a SKIP line.
fn with_native(test: &str, f: impl FnOnce(&Native)) {
    let mut g = NATIVE.lock().unwrap_or_else(|e| e.into_inner());
    let n = g.get_or_insert_with(Native::new);
    match n {
        Ok(n) => f(n),
        Err(e) => println!("SKIP: {test}: cannot run 32-bit code natively here: {e}"),
    }
}

/// The code both runs share: load the context, run `body`, store the results.
fn framed(
    base: u64,
    body: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Result<CodeAssembler, IcedError> {
    let at = |off: u64| base + off;
    let mut a = CodeAssembler::new(32)?;
    a.mov(dword_ptr(at(CTX_SAVED_ESP)), esp)?;
    a.mov(ss, word_ptr(at(CTX_SS16)))?;
    a.mov(esp, dword_ptr(at(CTX_ESP)))?;
    a.push(dword_ptr(at(CTX_EFLAGS)))?;
    a.popfd()?;
    for (i, r) in [eax, ecx, edx, ebx].into_iter().enumerate() {
        a.mov(r, dword_ptr(at(CTX_REGS + 4 * i as u64)))?;
    }
    for (i, r) in [ebp, esi, edi].into_iter().enumerate() {
        a.mov(r, dword_ptr(at(CTX_REGS + 20 + 4 * i as u64)))?;
    }
    body(&mut a)?;
    a.pushfd()?;
    a.pop(dword_ptr(at(CTX_OUT_EFLAGS)))?;
    for (i, r) in [eax, ecx, edx, ebx, esp, ebp, esi, edi]
        .into_iter()
        .enumerate()
    {
        a.mov(dword_ptr(at(CTX_OUT + 4 * i as u64)), r)?;
    }
    a.mov(ss, word_ptr(at(CTX_FLAT_SS)))?;
    a.mov(esp, dword_ptr(at(CTX_SAVED_ESP)))?;
    a.cld()?;
    Ok(a)
}

/// What one run leaves: registers, EFLAGS, the data page, the 16-bit stack, the results.
#[derive(PartialEq, Eq)]
struct Result32 {
    regs: [u32; 8],
    eflags: u32,
    data: Vec<u8>,
    stack: Vec<u8>,
    out: Vec<u8>,
}

/// The inputs of one run.
struct Inputs {
    regs: [u32; 8],
    esp: u32,
    eflags: u32,
    data: Vec<u8>,
    stack: Vec<u8>,
    out_len: usize,
}

fn context(inputs: &Inputs, ss16: u16, flat_ss: u16) -> Vec<u8> {
    let mut c = vec![0u8; 0x200];
    c[0..4].copy_from_slice(&u32::from(ss16).to_le_bytes());
    c[4..8].copy_from_slice(&inputs.esp.to_le_bytes());
    c[8..12].copy_from_slice(&u32::from(flat_ss).to_le_bytes());
    for (i, r) in inputs.regs.iter().enumerate() {
        c[16 + 4 * i..20 + 4 * i].copy_from_slice(&r.to_le_bytes());
    }
    c[48..52].copy_from_slice(&inputs.eflags.to_le_bytes());
    c
}

fn result_of(ctx: &[u8], data: Vec<u8>, stack: Vec<u8>, out: Vec<u8>) -> Result32 {
    let w = |o: usize| u32::from_le_bytes(ctx[o..o + 4].try_into().unwrap());
    Result32 {
        regs: std::array::from_fn(|i| w(0x100 + 4 * i)),
        eflags: w(0x120),
        data,
        stack,
        out,
    }
}

/// Runs `body` natively.
fn run_native(n: &Native, body: &[u8], inputs: &Inputs) -> Result32 {
    let mut code = vec![0x16, 0x1f, 0x16, 0x07]; // push ss; pop ds; push ss; pop es
    code.extend_from_slice(body);
    code.push(0xcb); // retf
    n.write(CODE, &code);
    n.write(CTX, &context(inputs, LDT_STACK16, LINUX_DATA));
    n.write(DATA, &inputs.data);
    n.write(STACK16, &inputs.stack);
    n.write(OUT, &vec![0u8; inputs.out_len]);
    n.call();
    result_of(
        &n.read(CTX, 0x200),
        n.read(DATA, inputs.data.len()),
        n.read(STACK16, inputs.stack.len()),
        n.read(OUT, inputs.out_len),
    )
}

/// A GDT descriptor.
fn descriptor(base: u64, limit: u32, access: u8, flags: u8) -> u64 {
    (u64::from(limit) & 0xffff)
        | (base & 0xff_ffff) << 16
        | u64::from(access) << 40
        | (u64::from(limit >> 16) & 0xf) << 48
        | u64::from(flags) << 52
        | (base >> 24 & 0xff) << 56
}

/// Runs `body` on bt at the same linear addresses.
fn run_bt(base: u64, body: &[u8], inputs: &Inputs) -> Result<Result32, String> {
    let (mut m, _, _) = machine();
    let (pml4, pdpt, pd) = (TABLES, TABLES + 0x1000, TABLES + 0x2000);
    let w = |v: u64, at: u64| m.mem.write_obj(v, GuestAddress(at)).unwrap();
    w(pdpt | 7, pml4 + 8 * (base >> 39 & 511));
    w(pd | 7, pdpt + 8 * (base >> 30 & 511));
    for i in 0..2 {
        w(
            (GUEST_PHYS + (i << 21)) | 0x87,
            pd + 8 * ((base >> 21 & 511) + i),
        );
    }
    let phys = |off: u64| GUEST_PHYS + off;
    // The same selectors as the native run: flat data 0x2b in the GDT, the 16-bit stack
    // segment as LDT entry 0 (selector 7), so selectors the code pushes agree too.
    let gdt = [
        0,
        0,
        0,
        descriptor(0, 0xfffff, 0xfa, 0xc), // 0x18: 32-bit code, DPL 3
        descriptor(0, 0xfffff, 0xf2, 0xc), // 0x20: flat data, DPL 3
        descriptor(0, 0xfffff, 0xf2, 0xc), // 0x28: flat data, DPL 3 (Linux's user data)
        descriptor(base + LDT, 7, 0x82, 0), // 0x30: the LDT
    ];
    for (i, d) in gdt.iter().enumerate() {
        w(*d, phys(GDT) + 8 * i as u64);
    }
    w(descriptor(base + STACK16, 0xffff, 0xf2, 0), phys(LDT));
    let mut code = body.to_vec();
    let mut tail = CodeAssembler::new(32).map_err(|e| e.to_string())?;
    tail.out(0xe9, al).map_err(|e| e.to_string())?;
    code.extend(tail.assemble(0).map_err(|e| e.to_string())?);
    load(&m, phys(CODE), &code);
    load(&m, phys(CTX), &context(inputs, LDT_STACK16, LINUX_DATA));
    load(&m, phys(DATA), &inputs.data);
    load(&m, phys(STACK16), &inputs.stack);
    let mut s = CpuState::reset();
    s.cr0 = 0x8000_0011;
    s.cr3 = pml4;
    s.cr4 = 0x20;
    s.efer = 0x500;
    for (i, sg) in s.seg.iter_mut().enumerate() {
        *sg = if i == seg::CS {
            Segment::flat(BT_CODE32, true, false)
        } else {
            Segment::flat(BT_DATA, false, false)
        };
        sg.dpl = 3;
    }
    s.tr.type_ = 0xb;
    s.ldtr = Segment {
        selector: 0x30,
        base: base + LDT,
        limit: 7,
        type_: 2,
        present: true,
        ..Segment::default()
    };
    s.gdtr = DescriptorTable {
        base: base + GDT,
        limit: (8 * gdt.len() - 1) as u16,
    };
    s.rip = base + CODE;
    s.gpr[4] = base + FLAT_STACK;
    s.rflags = 2 | (3 << 12);
    let mut cpu = BtCpu::new(&m).map_err(|e| e.to_string())?;
    cpu.set_state(&s).map_err(|e| e.to_string())?;
    let exit = cpu
        .run(&mut m, Limit::default())
        .map_err(|e| e.to_string())?;
    if exit != Exit::DeviceAccess {
        let st = cpu.state().map_err(|e| e.to_string())?;
        return Err(format!(
            "bt did not reach the final OUT: {exit:?} at rip {:#x}",
            st.rip
        ));
    }
    Ok(result_of(
        &peek(&m, phys(CTX), 0x200),
        peek(&m, phys(DATA), inputs.data.len()),
        peek(&m, phys(STACK16), inputs.stack.len()),
        peek(&m, phys(OUT), inputs.out_len),
    ))
}

/// iced-x86 flag bits to EFLAGS bits.
fn eflags(bits: u32) -> u32 {
    [
        (RflagsBits::CF, 0x1),
        (RflagsBits::PF, 0x4),
        (RflagsBits::AF, 0x10),
        (RflagsBits::ZF, 0x40),
        (RflagsBits::SF, 0x80),
        (RflagsBits::OF, 0x800),
    ]
    .iter()
    .filter(|(i, _)| bits & i != 0)
    .fold(0, |f, (_, e)| f | e)
}

/// The flags undefined at the end of `code`, or `None` when an instruction reads one that
/// is undefined at that point (the hardware's choice is not architecture).
fn undefined_at_end(code: &[u8]) -> Option<u32> {
    let mut undef = 0;
    for insn in Decoder::new(32, code, DecoderOptions::NONE) {
        if eflags(insn.rflags_read()) & undef != 0 {
            return None;
        }
        undef = (undef & !eflags(insn.rflags_modified())) | eflags(insn.rflags_undefined());
    }
    Some(undef)
}

fn listing(code: &[u8]) -> String {
    let mut f = NasmFormatter::new();
    let mut out = String::new();
    for insn in Decoder::with_ip(32, code, 0, DecoderOptions::NONE) {
        let mut s = String::new();
        f.format(&insn, &mut s);
        out.push_str(&format!("  {:#06x}: {s}\n", insn.ip()));
    }
    out
}

/// Every AL/AH/CF/AF input of each BCD adjust (and AAM/AAD with several bases), natively and
/// on bt: the results must agree on AX and on the flags the instruction defines.
#[test]
fn bcd_adjusts_over_every_input_match_the_host_cpu() {
    let test = "bcd_adjusts_over_every_input_match_the_host_cpu";
    type Insn = fn(&mut CodeAssembler) -> Result<(), IcedError>;
    let cases: [(&str, Insn); 10] = [
        ("daa", |a| a.daa()),
        ("das", |a| a.das()),
        ("aaa", |a| a.aaa()),
        ("aas", |a| a.aas()),
        ("aam 10", |a| a.aam(10)),
        ("aam 16", |a| a.aam(16)),
        ("aam 3", |a| a.aam(3)),
        ("aad 10", |a| a.aad(10)),
        ("aad 16", |a| a.aad(16)),
        ("aad 0", |a| a.aad(0)),
    ];
    with_native(test, |n| {
        let started = std::time::Instant::now();
        let mut executed = 0u64;
        for (name, insn) in cases {
            // For each of the 2^18 inputs (AX, CF, AF): EFLAGS from ECX's low bits, AX from
            // the rest; AX and the flags after go to OUT. (Branches are relative and data
            // addresses absolute, so the bytes run anywhere in the range.)
            let out = n.base + OUT;
            let body = framed(n.base, |a| {
                let mut top = a.create_label();
                a.mov(edi, out as u32)?;
                a.xor(ecx, ecx)?;
                a.set_label(&mut top)?;
                a.mov(eax, ecx)?;
                a.shr(eax, 2)?;
                a.mov(edx, ecx)?;
                a.and(edx, 1)?;
                a.mov(ebx, ecx)?;
                a.and(ebx, 2)?;
                a.shl(ebx, 3)?;
                a.or(edx, ebx)?;
                a.or(edx, 2)?;
                a.push(edx)?;
                a.popfd()?;
                insn(a)?;
                a.pushfd()?;
                a.pop(edx)?;
                a.mov(word_ptr(edi), ax)?;
                a.mov(word_ptr(edi + 2), dx)?;
                a.add(edi, 4)?;
                a.inc(ecx)?;
                a.cmp(ecx, 1 << 18)?;
                a.jb(top)
            })
            .and_then(|mut a| a.assemble(n.base + CODE))
            .unwrap();
            let inputs = Inputs {
                regs: [0; 8],
                esp: 0x8000,
                eflags: 2,
                data: vec![0; 16],
                stack: vec![0; 0x1_0000],
                out_len: 4 << 18,
            };
            let host = run_native(n, &body, &inputs);
            let bt = run_bt(n.base, &body, &inputs).unwrap_or_else(|e| panic!("{name}: {e}"));
            let mut one = CodeAssembler::new(32).unwrap();
            insn(&mut one).unwrap();
            let bytes = one.assemble(0).unwrap();
            let i = Decoder::new(32, &bytes, DecoderOptions::NONE).decode();
            let defined = eflags(i.rflags_modified()) & !eflags(i.rflags_undefined());
            let mut wrong = Vec::new();
            for k in 0..1usize << 18 {
                let at = 4 * k;
                let h = &host.out[at..at + 4];
                let b = &bt.out[at..at + 4];
                let (hax, bax) = (
                    u16::from_le_bytes([h[0], h[1]]),
                    u16::from_le_bytes([b[0], b[1]]),
                );
                let (hf, bf) = (
                    u32::from(u16::from_le_bytes([h[2], h[3]])) & defined,
                    u32::from(u16::from_le_bytes([b[2], b[3]])) & defined,
                );
                if hax != bax || hf != bf {
                    wrong.push(format!(
                        "AX {:#06x} CF {} AF {}: host AX {hax:#06x} flags {hf:#x}, bt AX {bax:#06x} flags {bf:#x}",
                        k >> 2,
                        k & 1,
                        (k >> 1) & 1
                    ));
                }
            }
            executed += (1 << 18) * 17;
            assert!(
                wrong.is_empty(),
                "{name}: {} of {} inputs differ (defined flags {defined:#x}); first:\n{}",
                wrong.len(),
                1 << 18,
                wrong[..wrong.len().min(12)].join("\n")
            );
        }
        println!(
            "{} BCD forms x 2^18 inputs agree with the host ({:.1} M bt+native instructions/s)",
            cases.len(),
            executed as f64 / started.elapsed().as_secs_f64() / 1e6
        );
    });
}

/// What the generator knows about the 16-bit stack: the byte size of each item pushed (so
/// pops and POPA/POPAD take exactly what was pushed) and the open ENTER frames.
#[derive(Default)]
struct StackModel {
    /// (size in bytes, pushed by PUSHA/PUSHAD).
    items: Vec<(u16, bool)>,
    /// Per open frame: the item count before its saved frame pointer, and ENTER's size.
    frames: Vec<(usize, u16)>,
}

/// One random legacy instruction: PUSH/POP (o16 and o32, registers, immediates, memory),
/// PUSHA/PUSHAD/POPA/POPAD, ENTER (levels 0..3) and LEAVE, POP SS, BCD adjusts, a16
/// LOOP/JCXZ, and a little ALU. Only data-independent stack motion: nothing pops into (E)BP or (E)SP, and
/// pops take what the model says was pushed, so SP and BP stay inside the segment.
fn random_legacy(
    a: &mut CodeAssembler,
    r: &mut Rng,
    st: &mut StackModel,
    base: u64,
) -> Result<(), IcedError> {
    let data = base + DATA;
    const G: [AsmRegister32; 6] = [eax, ecx, edx, ebx, esi, edi];
    const G16: [AsmRegister16; 6] = [ax, cx, dx, bx, si, di];
    const B: [AsmRegister8; 8] = [al, cl, dl, bl, ah, ch, dh, bh];
    let g = r.below(6) as usize;
    let mem = data + 4 * r.below(64);
    let top = st.items.last().copied();
    let frame_floor = st.frames.last().map(|f| f.0 + 1).unwrap_or(0);
    let can_pop = |size: u16| st.items.len() > frame_floor && top == Some((size, false));
    match r.below(25) {
        // POP SS reloading the 16-bit stack segment (each run's own selector, from the
        // context): the pop's stack pointer width is the one before the load (o16 and o32).
        24 => {
            if r.below(2) == 0 {
                a.push(dword_ptr(base + CTX_SS16))?;
                a.pop(ss)
            } else {
                a.push(word_ptr(base + CTX_SS16))?;
                a.db(&[0x66, 0x17])
            }
        }
        0 => {
            st.items.push((4, false));
            a.push(G[g])
        }
        1 => {
            st.items.push((2, false));
            a.push(G16[g])
        }
        2 => {
            st.items.push((4, false));
            match r.below(3) {
                0 => a.push(ebp),
                1 => a.push(esp),
                _ => a.push(r.next() as i32),
            }
        }
        3 => {
            st.items.push((2, false));
            a.db(&[0x66, 0x6a, r.next() as u8])
        }
        4 => {
            st.items.push((4, false));
            a.push(dword_ptr(mem))
        }
        5 => {
            st.items.push((2, false));
            a.push(word_ptr(mem))
        }
        6 if can_pop(4) => {
            st.items.pop();
            if r.below(3) == 0 {
                a.pop(dword_ptr(mem))
            } else {
                a.pop(G[g])
            }
        }
        7 if can_pop(2) => {
            st.items.pop();
            if r.below(3) == 0 {
                a.pop(word_ptr(mem))
            } else {
                a.pop(G16[g])
            }
        }
        8 => {
            if r.below(2) == 0 {
                st.items.push((32, true));
                a.pushad()
            } else {
                st.items.push((16, true));
                a.pusha()
            }
        }
        9 if st.items.len() > frame_floor && top == Some((32, true)) => {
            st.items.pop();
            a.popad()
        }
        9 if st.items.len() > frame_floor && top == Some((16, true)) => {
            st.items.pop();
            a.popa()
        }
        10 | 11 if st.frames.len() < 4 => {
            let size = (r.below(8) * 4) as u32;
            let level = r.below(4) as u32;
            let o16 = r.below(3) == 0;
            let w: u16 = if o16 { 2 } else { 4 };
            st.frames.push((st.items.len(), w));
            st.items.push((w, false)); // the saved frame pointer
            // Copies of the enclosing frame pointers and this frame's, then the locals:
            // none of them pops.
            st.items.push((w * level as u16 + size as u16, false));
            st.items.push((0, false));
            if o16 {
                a.db(&[0x66, 0xc8, size as u8, (size >> 8) as u8, level as u8])
            } else {
                a.enter(size, level)
            }
        }
        12 if !st.frames.is_empty() => {
            let (before, w) = st.frames.pop().unwrap_or((0, 4));
            st.items.truncate(before);
            if w == 2 {
                a.db(&[0x66, 0xc9])
            } else {
                a.leave()
            }
        }
        13 => a.daa(),
        14 => a.das(),
        15 => a.aaa(),
        16 => a.aas(),
        17 => a.aam(1 + r.below(255) as u32),
        18 => a.aad(r.below(256) as u32),
        19 => {
            // a16 and a32 LOOP/LOOPcc/JCXZ, skipping a 2-byte NOT EAX when taken.
            let forms: [&[u8]; 6] = [
                &[0x67, 0xe2],
                &[0xe2],
                &[0x67, 0xe1],
                &[0x67, 0xe0],
                &[0x67, 0xe3],
                &[0xe3],
            ];
            a.db(forms[r.below(6) as usize])?;
            a.db(&[2, 0xf7, 0xd0])
        }
        20 => a.add(al, B[r.below(8) as usize]),
        21 => a.sub(ah, r.next() as u8 as i32),
        22 => a.adc(G[g], G[r.below(6) as usize]),
        _ => a.mov(G16[g], r.next() as u16 as i32),
    }
}

/// Random sequences of legacy stack and BCD instructions on a 16-bit stack with o16 and o32
/// operand sizes, natively and on bt.
#[test]
fn random_16_bit_stack_and_bcd_sequences_match_the_host_cpu() {
    let test = "random_16_bit_stack_and_bcd_sequences_match_the_host_cpu";
    let seeds: u64 = std::env::var("DEJA_LEGACY_DIFF_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    with_native(test, |n| {
        let started = std::time::Instant::now();
        let mut compared = 0;
        let mut failures = Vec::new();
        for seed in 0..seeds {
            let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            // The same choices twice: bare (to follow the undefined flags and list it) and
            // framed (to run).
            let snapshot = r.0;
            let mut bare = CodeAssembler::new(32).unwrap();
            let mut st = StackModel::default();
            for _ in 0..24 {
                random_legacy(&mut bare, &mut r, &mut st, n.base).unwrap();
            }
            let bare = bare.assemble(0).unwrap();
            let text = listing(&bare);
            let mut again = Rng(snapshot);
            let mut st = StackModel::default();
            let body = framed(n.base, |a| {
                for _ in 0..24 {
                    random_legacy(a, &mut again, &mut st, n.base)?;
                }
                Ok(())
            })
            .and_then(|mut a| a.assemble(n.base + CODE))
            .unwrap();
            let Some(undef) = undefined_at_end(&bare) else {
                continue;
            };
            let regs: [u32; 8] = std::array::from_fn(|i| match i {
                // EBP: a frame pointer inside the segment, upper half random.
                5 => (r.next() as u32 & 0xffff_0000) | 0x9000 | (r.below(64) as u32 * 4),
                _ => match r.below(3) {
                    0 => r.next() as u32,
                    1 => r.next() as u32 & 0xff,
                    _ => r.next() as u32 & 0xffff,
                },
            });
            let inputs = Inputs {
                regs,
                // SP in the middle of the segment; the upper half of ESP must survive.
                esp: (r.next() as u32 & 0xffff_0000) | 0x8000 | (r.below(64) as u32 * 4),
                eflags: 2 | (r.next() as u32 & 0x8d5),
                data: (0..256).map(|_| r.next() as u8).collect(),
                stack: (0..0x1_0000).map(|_| r.next() as u8).collect(),
                out_len: 0,
            };
            let host = run_native(n, &body, &inputs);
            let bt = match run_bt(n.base, &body, &inputs) {
                Ok(b) => b,
                Err(e) => {
                    failures.push(format!("seed {seed}:\n{text}{e}"));
                    continue;
                }
            };
            compared += 1;
            let mut diff = Vec::new();
            for (i, name) in ["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi"]
                .iter()
                .enumerate()
            {
                if host.regs[i] != bt.regs[i] {
                    diff.push(format!(
                        "{name}: host {:#x} bt {:#x}",
                        host.regs[i], bt.regs[i]
                    ));
                }
            }
            if host.eflags & 0x8d5 & !undef != bt.eflags & 0x8d5 & !undef {
                diff.push(format!(
                    "eflags: host {:#x} bt {:#x} (undefined {undef:#x})",
                    host.eflags, bt.eflags
                ));
            }
            if host.data != bt.data {
                diff.push("data differs".into());
            }
            // The epilogue's PUSHFD leaves EFLAGS just below the final SP, with IF and IOPL
            // (the native run is a process with IF set and IOPL 0; bt's guest has IOPL 3).
            let (mut host, mut bt) = (host, bt);
            let top = bt.regs[4] as u16;
            for i in 1..=4u16 {
                let at = usize::from(top.wrapping_sub(i));
                host.stack[at] = 0;
                bt.stack[at] = 0;
            }
            if host.stack != bt.stack {
                let at: Vec<usize> = (0..host.stack.len())
                    .filter(|&i| host.stack[i] != bt.stack[i])
                    .collect();
                diff.push(format!(
                    "16-bit stack differs at {:#x?}",
                    &at[..at.len().min(16)]
                ));
            }
            if !diff.is_empty() {
                failures.push(format!(
                    "seed {seed}:\n{text}initial {:x?} esp {:#x} eflags {:#x}\n{}",
                    inputs.regs,
                    inputs.esp,
                    inputs.eflags,
                    diff.join("\n")
                ));
            }
        }
        println!(
            "{compared} of {seeds} legacy seeds compared ({:.0} seeds/s)",
            seeds as f64 / started.elapsed().as_secs_f64()
        );
        // BCD adjusts leave flags undefined that the next ADC, DAA or LOOPcc reads: a
        // seed doing that is skipped, which is about two thirds of them.
        assert!(compared > seeds / 5, "too few seeds compared: {compared}");
        assert!(
            failures.is_empty(),
            "{} of {seeds} legacy seeds differ; first:\n{}",
            failures.len(),
            failures[..failures.len().min(8)].join("\n\n")
        );
    });
}
