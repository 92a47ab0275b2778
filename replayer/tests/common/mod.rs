//! A small test machine (an interrupt controller and one "board" device with a clock, a
//! periodic timer, serial in/out and a stop port) and a real-mode guest that uses all of it,
//! so record/replay can be tested on both engines without the full PC device set.

#![allow(dead_code)]

use deja_engine::Vm;
use deja_machine::cpu::{CpuState, Segment, seg};
use deja_machine::devices::post::PostState;
use deja_machine::devices::{
    Device, DeviceError, DeviceState, InterruptLines, IoCtx, Irqchip, StopRequest,
};
use deja_machine::loader::{EntryMode, Image, ImageFormat};
use deja_machine::vm_memory::{Bytes, GuestAddress};
use deja_machine::{Cpu, Host, Machine, MachineConfig};
use iced_x86::BlockEncoderOptions;
use iced_x86::code_asm::*;
use std::io::Write;

/// Board ports.
pub const CLOCK_PORT: u16 = 0x500;
/// Serial output byte.
pub const OUT_PORT: u16 = 0x504;
/// Serial input: low byte the data, bit 8 set when a byte was there.
pub const IN_PORT: u16 = 0x506;
/// Timer period in microseconds (0 stops it).
pub const TIMER_PORT: u16 = 0x508;
/// Stop with the value written.
pub const STOP_PORT: u16 = 0x50c;
/// Where the guest is loaded.
pub const LOAD: u64 = 0x7c00;

fn state_bytes(words: &[u64]) -> DeviceState {
    DeviceState::Post(PostState {
        last: 0,
        history: words.iter().flat_map(|w| w.to_le_bytes()).collect(),
        writes: 0,
    })
}

fn words(state: &DeviceState, n: usize, device: &'static str) -> Result<Vec<u64>, DeviceError> {
    match state {
        DeviceState::Post(p) if p.history.len() == n * 8 => Ok(p
            .history
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect()),
        other => Err(DeviceError::WrongState {
            device,
            found: other.kind(),
        }),
    }
}

/// Edge-triggered, 8 lines, vectors 0x20 + line.
#[derive(Default)]
pub struct TestIrqchip {
    pending: u8,
}

impl Device for TestIrqchip {
    fn name(&self) -> &'static str {
        "test-irqchip"
    }
    fn read(&mut self, _: &mut IoCtx, _: u64, data: &mut [u8]) {
        data.fill(self.pending);
    }
    fn write(&mut self, _: &mut IoCtx, _: u64, _: &[u8]) {}
    fn save(&self) -> DeviceState {
        state_bytes(&[u64::from(self.pending)])
    }
    fn restore(&mut self, s: &DeviceState) -> Result<(), DeviceError> {
        self.pending = words(s, 1, "test-irqchip")?[0] as u8;
        Ok(())
    }
}

impl InterruptLines for TestIrqchip {
    fn set_irq(&mut self, line: u32, level: bool) {
        if level && line < 8 {
            self.pending |= 1 << line;
        }
    }
}

impl Irqchip for TestIrqchip {
    fn interrupt_pending(&self) -> bool {
        self.pending != 0
    }
    fn acknowledge(&mut self) -> u8 {
        if self.pending == 0 {
            return 0x27;
        }
        let line = self.pending.trailing_zeros() as u8;
        self.pending &= !(1 << line);
        0x20 + line
    }
}

/// Clock, periodic timer on IRQ 0, serial in/out, stop port.
pub struct Board {
    out: Box<dyn Write + Send>,
    period_ns: u64,
    deadline: u64,
}

impl Device for Board {
    fn name(&self) -> &'static str {
        "test-board"
    }
    fn read(&mut self, ctx: &mut IoCtx, addr: u64, data: &mut [u8]) {
        let v: u64 = match addr as u16 {
            CLOCK_PORT => ctx.now() / 1000,
            IN_PORT => ctx
                .host
                .serial_input(ctx.pos)
                .map_or(0, |b| 0x100 | u64::from(b)),
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }
    fn write(&mut self, ctx: &mut IoCtx, addr: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        b[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
        let v = u64::from_le_bytes(b);
        match addr as u16 {
            OUT_PORT => {
                let _ = self.out.write_all(&data[..1]);
            }
            TIMER_PORT => {
                self.period_ns = v * 1000;
                self.deadline = if v == 0 {
                    0
                } else {
                    ctx.now() + self.period_ns
                };
            }
            STOP_PORT => *ctx.stop = Some(StopRequest::DebugExit { value: v as u32 }),
            _ => {}
        }
    }
    fn poll(&mut self, ctx: &mut IoCtx) {
        if self.period_ns == 0 {
            return;
        }
        let now = ctx.now();
        if now >= self.deadline {
            ctx.irq.set_irq(0, true);
            while self.deadline <= now {
                self.deadline += self.period_ns;
            }
        }
    }
    fn next_deadline(&self) -> Option<u64> {
        (self.period_ns != 0).then_some(self.deadline)
    }
    fn save(&self) -> DeviceState {
        state_bytes(&[self.period_ns, self.deadline])
    }
    fn restore(&mut self, s: &DeviceState) -> Result<(), DeviceError> {
        let w = words(s, 2, "test-board")?;
        self.period_ns = w[0];
        self.deadline = w[1];
        Ok(())
    }
}

/// The test machine's configuration (small RAM).
pub fn config() -> MachineConfig {
    MachineConfig {
        ram_size: 16 << 20,
        ..MachineConfig::default()
    }
}

/// Real mode at 0000:`ip`, SP 0x7000.
fn real_mode_state(ip: u64) -> CpuState {
    let mut s = CpuState::reset();
    for (i, sg) in s.seg.iter_mut().enumerate() {
        *sg = Segment::real_mode(0, i == seg::CS);
    }
    s.rip = ip;
    s.gpr[4] = 0x7000;
    s.idtr.base = 0;
    s.idtr.limit = 0x3ff;
    s
}

/// Which engine a test machine uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// KVM.
    Kvm,
    /// bt.
    Bt,
}

/// Whether /dev/kvm can run guests here; prints the SKIP line when not.
pub fn kvm_available(test: &str) -> bool {
    let m = Machine::new(
        config(),
        Box::new(deja_machine::LiveHost::new(
            deja_machine::ClockMode::Virtual,
        )),
        Box::<TestIrqchip>::default(),
    )
    .unwrap();
    match deja_kvm::KvmCpu::new(&m) {
        Ok(_) => true,
        Err(e) if e.is_unavailable() => {
            deja_testkit::skip_without_kvm(test, &e);
            false
        }
        Err(e) => panic!("{test}: creating a kvm vCPU failed: {e}"),
    }
}

/// Builds the test machine with `image` loaded, on `engine`.
pub fn build(
    engine: Engine,
    config: &MachineConfig,
    image: &Image,
    host: Box<dyn Host>,
    out: Box<dyn Write + Send>,
) -> Result<Vm, String> {
    let mut m = Machine::new(config.clone(), host, Box::<TestIrqchip>::default())
        .map_err(|e| e.to_string())?;
    m.map_irqchip(&[(0x20, 2)], &[])
        .map_err(|e| e.to_string())?;
    m.add_device(
        Box::new(Board {
            out,
            period_ns: 0,
            deadline: 0,
        }),
        &[(CLOCK_PORT, 16)],
        &[],
    )
    .map_err(|e| e.to_string())?;
    m.mem
        .write_slice(&image.bytes, GuestAddress(LOAD))
        .map_err(|e| e.to_string())?;
    let mut cpu: Box<dyn Cpu> = match engine {
        Engine::Kvm => Box::new(deja_kvm::KvmCpu::new(&m).map_err(|e| e.to_string())?),
        Engine::Bt => Box::new(deja_bt::BtCpu::new(&m).map_err(|e| e.to_string())?),
    };
    cpu.set_state(&real_mode_state(LOAD))
        .map_err(|e| e.to_string())?;
    Ok(Vm::new(m, cpu))
}

/// The test guest: arms a periodic timer, counts `ticks` interrupts (printing '.' for
/// each, from the handler) while alternating HLT and a compute loop, then reads the clock
/// in a polling loop for 300 µs, echoes serial input until none is left, prints the
/// iteration count's low byte as a letter and stops with 0x10.
pub fn guest(ticks: u16) -> Image {
    let mut a = CodeAssembler::new(16).unwrap();
    let mut handler = a.create_label();
    let mut main_loop = a.create_label();
    let mut spin = a.create_label();
    let mut compute = a.create_label();
    let mut echo = a.create_label();
    let mut echo_done = a.create_label();
    a.cli().unwrap();
    a.xor(ax, ax).unwrap();
    a.mov(ds, ax).unwrap();
    a.mov(ss, ax).unwrap();
    a.mov(sp, 0x7000).unwrap();
    a.mov(word_ptr(0x600), 0).unwrap();
    // IVT entry 0x20 -> handler (offset filled below through a register).
    a.mov(ax, handler_offset_placeholder()).unwrap();
    a.mov(word_ptr(0x80), ax).unwrap();
    a.mov(word_ptr(0x82), 0).unwrap();
    a.mov(dx, TIMER_PORT as i32).unwrap();
    a.mov(eax, 150).unwrap();
    a.out(dx, eax).unwrap();
    a.sti().unwrap();
    a.set_label(&mut main_loop).unwrap();
    a.hlt().unwrap();
    a.mov(cx, 3000).unwrap();
    a.set_label(&mut compute).unwrap();
    a.add(bx, cx).unwrap();
    a.rol(bx, 3).unwrap();
    a.loop_(compute).unwrap();
    a.cmp(word_ptr(0x600), ticks as i32).unwrap();
    a.jb(main_loop).unwrap();
    a.cli().unwrap();
    a.mov(dx, TIMER_PORT as i32).unwrap();
    a.xor(eax, eax).unwrap();
    a.out(dx, eax).unwrap();
    // Poll the clock for 300 µs.
    a.mov(dx, CLOCK_PORT as i32).unwrap();
    a.in_(eax, dx).unwrap();
    a.mov(edi, eax).unwrap();
    a.add(edi, 300).unwrap();
    a.xor(esi, esi).unwrap();
    a.set_label(&mut spin).unwrap();
    a.inc(esi).unwrap();
    a.in_(eax, dx).unwrap();
    a.cmp(eax, edi).unwrap();
    a.jb(spin).unwrap();
    // Echo serial input.
    a.set_label(&mut echo).unwrap();
    a.mov(dx, IN_PORT as i32).unwrap();
    a.in_(ax, dx).unwrap();
    a.test(ah, 1).unwrap();
    a.jz(echo_done).unwrap();
    a.mov(dx, OUT_PORT as i32).unwrap();
    a.out(dx, al).unwrap();
    a.jmp(echo).unwrap();
    a.set_label(&mut echo_done).unwrap();
    a.mov(ax, si).unwrap();
    a.and(al, 15).unwrap();
    a.add(al, b'a' as i32).unwrap();
    a.mov(dx, OUT_PORT as i32).unwrap();
    a.out(dx, al).unwrap();
    a.mov(dx, STOP_PORT as i32).unwrap();
    a.mov(al, 0x10).unwrap();
    a.out(dx, al).unwrap();
    a.hlt().unwrap();
    a.set_label(&mut handler).unwrap();
    a.push(ax).unwrap();
    a.push(dx).unwrap();
    a.inc(word_ptr(0x600)).unwrap();
    a.mov(al, b'.' as i32).unwrap();
    a.mov(dx, OUT_PORT as i32).unwrap();
    a.out(dx, al).unwrap();
    a.pop(dx).unwrap();
    a.pop(ax).unwrap();
    a.iret().unwrap();
    let result = a
        .assemble_options(LOAD, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
        .unwrap();
    let handler_ip = result.label_ip(&handler).unwrap();
    let mut bytes = result.inner.code_buffer;
    // Patch the placeholder immediate with the handler's offset.
    let ph = handler_offset_placeholder() as u16;
    let pos = bytes
        .windows(3)
        .position(|w| w[0] == 0xb8 && u16::from_le_bytes([w[1], w[2]]) == ph)
        .unwrap();
    bytes[pos + 1..pos + 3].copy_from_slice(&(handler_ip as u16).to_le_bytes());
    board_image(bytes)
}

/// A raw real-mode image for the board machine, loaded and entered at [`LOAD`].
pub fn board_image(bytes: Vec<u8>) -> Image {
    Image {
        initrd: None,
        name: "guest:board".into(),
        bytes,
        format: ImageFormat::Raw {
            load_addr: LOAD,
            entry: LOAD,
            mode: EntryMode::Real,
        },
    }
}

fn handler_offset_placeholder() -> i32 {
    0x5a5a
}

/// Builds the deja-pc machine (PIC, PIT, RTC, COM1, ...) with `image` loaded, on `engine`:
/// what `deja_engine::build_vm` does, kept here so these tests do not depend on it.
pub fn build_pc(
    engine: Engine,
    config: &MachineConfig,
    image: &Image,
    host: Box<dyn Host>,
    out: Box<dyn Write + Send>,
) -> Result<Vm, String> {
    let mut m = deja_machine::pc::build_pc(config.clone(), host, out).map_err(|e| e.to_string())?;
    let state = deja_machine::loader::load(&mut m, image).map_err(|e| e.to_string())?;
    let mut cpu: Box<dyn Cpu> = match engine {
        Engine::Kvm => Box::new(deja_kvm::KvmCpu::new(&m).map_err(|e| e.to_string())?),
        Engine::Bt => Box::new(deja_bt::BtCpu::new(&m).map_err(|e| e.to_string())?),
    };
    cpu.set_state(&state).map_err(|e| e.to_string())?;
    Ok(Vm::new(m, cpu))
}

/// The live host, kicking the CPU right after its `kick_after`-th time answer: a Ctrl-C that
/// lands at a chosen clock read (a device poll, a read in the middle of a REP INS),
/// deterministically. Set `kicker` once the recorder exists; `kicked_at` says where it kicked.
pub struct KickingHost {
    live: deja_machine::LiveHost,
    time_reads: u32,
    kick_after: u32,
    /// The CPU's kicker, once there is one.
    pub kicker: std::sync::Arc<std::sync::Mutex<Option<deja_machine::Kicker>>>,
    /// Where the kick was made.
    pub kicked_at: std::sync::Arc<std::sync::Mutex<Option<deja_machine::Position>>>,
}

impl KickingHost {
    /// A live host on `clock` that kicks after its `kick_after`-th time answer.
    pub fn new(clock: deja_machine::ClockMode, kick_after: u32) -> Self {
        Self {
            live: deja_machine::LiveHost::new(clock),
            time_reads: 0,
            kick_after,
            kicker: Default::default(),
            kicked_at: Default::default(),
        }
    }
}

impl Host for KickingHost {
    fn time_ns(&mut self, at: deja_machine::Position) -> u64 {
        let t = self.live.time_ns(at);
        self.time_reads += 1;
        if self.time_reads == self.kick_after
            && let Some(k) = self.kicker.lock().unwrap().as_ref()
        {
            k.kick();
            *self.kicked_at.lock().unwrap() = Some(at);
        }
        t
    }
    fn boot_wallclock(&mut self) -> i64 {
        self.live.boot_wallclock()
    }
    fn serial_input(&mut self, at: deja_machine::Position) -> Option<u8> {
        self.live.serial_input(at)
    }
    fn entropy(&mut self, at: deja_machine::Position) -> u64 {
        self.live.entropy(at)
    }
    fn poll_quantum(&mut self, at: deja_machine::Position) -> u64 {
        self.live.poll_quantum(at)
    }
    fn idle(&mut self, at: deja_machine::Position, deadline_ns: Option<u64>) {
        self.live.idle(at, deadline_ns)
    }
}
