//! The guest corpus on the kvm engine, end to end: image -> loader -> KvmCpu -> run loop.
//!
//! Until the deja-pc builder is in the machine, a minimal COM1 stand-in captures the output
//! (LSR always reports the transmitter empty) and isa-debug-exit ends the run.

use deja_engine::{RunEnd, RunOptions, Vm};
use deja_kvm::KvmCpu;
use deja_machine::devices::debug_exit::DebugExit;
use deja_machine::devices::{
    Device, DeviceError, DeviceState, InterruptLines, IoCtx, Irqchip, StopRequest,
};
use deja_machine::{ClockMode, Cpu, LiveHost, Machine, MachineConfig, loader};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Transmit-only COM1: keeps what the guest writes to THR.
struct SerialCapture(Arc<Mutex<Vec<u8>>>);

impl Device for SerialCapture {
    fn name(&self) -> &'static str {
        "serial-capture"
    }
    fn read(&mut self, _ctx: &mut IoCtx, addr: u64, data: &mut [u8]) {
        // LSR: THR empty and transmitter idle; everything else reads 0.
        data.fill(if addr == 0x3fd { 0x60 } else { 0 });
    }
    fn write(&mut self, _ctx: &mut IoCtx, addr: u64, data: &[u8]) {
        if addr == 0x3f8 {
            self.0.lock().unwrap().extend_from_slice(data);
        }
    }
    fn save(&self) -> DeviceState {
        DeviceState::DebugExit
    }
    fn restore(&mut self, _state: &DeviceState) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// No interrupt sources: `hello` does not use interrupts.
struct Quiet;

impl Device for Quiet {
    fn name(&self) -> &'static str {
        "quiet-irqchip"
    }
    fn read(&mut self, _ctx: &mut IoCtx, _addr: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _ctx: &mut IoCtx, _addr: u64, _data: &[u8]) {}
    fn save(&self) -> DeviceState {
        DeviceState::DebugExit
    }
    fn restore(&mut self, _state: &DeviceState) -> Result<(), DeviceError> {
        Ok(())
    }
}

impl InterruptLines for Quiet {
    fn set_irq(&mut self, _line: u32, _level: bool) {}
}

impl Irqchip for Quiet {
    fn interrupt_pending(&self) -> bool {
        false
    }
    fn acknowledge(&mut self) -> u8 {
        0xff
    }
}

#[test]
fn hello_boots_to_long_mode_and_exits_0_on_kvm() {
    let config = MachineConfig {
        ram_size: 16 << 20,
        ..MachineConfig::default()
    };
    let host = Box::new(LiveHost::new(ClockMode::Virtual));
    let mut m = Machine::new(config, host, Box::new(Quiet)).unwrap();
    m.map_irqchip(&[(0x20, 2), (0xa0, 2)], &[]).unwrap();
    let out = Arc::new(Mutex::new(Vec::new()));
    m.add_device(Box::new(SerialCapture(out.clone())), &[(0x3f8, 8)], &[])
        .unwrap();
    m.add_device(Box::<DebugExit>::default(), &[(0xf4, 1)], &[])
        .unwrap();
    let image = deja_guests::find("hello").unwrap().image().unwrap();
    let state = loader::load(&mut m, &image).unwrap();
    let mut cpu = match KvmCpu::new(&m) {
        Ok(c) => c,
        Err(e) if e.is_unavailable() => {
            deja_testkit::skip_without_kvm("hello on kvm", &e);
            return;
        }
        Err(e) => panic!("{e}"),
    };
    cpu.set_state(&state).unwrap();
    let mut vm = Vm::new(m, Box::new(cpu));
    let outcome = vm
        .run(RunOptions {
            timeout: Some(Duration::from_secs(20)),
            max_instructions: None,
        })
        .unwrap();
    let text = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    assert_eq!(
        outcome.end,
        RunEnd::Stopped(StopRequest::DebugExit { value: 0 }),
        "output: {text:?}"
    );
    assert_eq!(text, deja_guests::hello::GREETING);
    // One OUT per character plus an LSR poll before each, and the debug exit.
    assert_eq!(outcome.stats.get("exit.io_out"), text.len() as u64 + 1);
    assert_eq!(outcome.stats.get("exit.io_in"), text.len() as u64);
    println!(
        "hello on kvm: {} device exits in {:?}",
        outcome.exits, outcome.elapsed
    );
}

/// COM1 output collected in memory.
#[derive(Clone, Default)]
struct Output(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs a built-in guest on the deja-pc machine under kvm; `None` when KVM is unavailable.
fn run_on_pc(
    name: &str,
    host: LiveHost,
    windows: bool,
) -> Option<(deja_engine::RunOutcome, String)> {
    let config = MachineConfig {
        ram_size: 16 << 20,
        ..MachineConfig::default()
    };
    let out = Output::default();
    let mut m = deja_machine::pc::build_pc(config, Box::new(host), Box::new(out.clone())).unwrap();
    let image = deja_guests::find(name).unwrap().image().unwrap();
    let state = loader::load(&mut m, &image).unwrap();
    let mut cpu = match KvmCpu::new(&m) {
        Ok(c) => c,
        Err(e) if e.is_unavailable() => {
            deja_testkit::skip_without_kvm(&format!("{name} on kvm"), &e);
            return None;
        }
        Err(e) => panic!("{e}"),
    };
    cpu.set_interrupt_windows(windows);
    cpu.set_state(&state).unwrap();
    let mut vm = Vm::new(m, Box::new(cpu));
    let outcome = vm
        .run(RunOptions {
            timeout: Some(Duration::from_secs(30)),
            max_instructions: None,
        })
        .unwrap();
    let text = String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned();
    println!(
        "{name} on kvm (windows {windows}): {:?}, {} device exits, {} interrupts injected, {:?}",
        outcome.end,
        outcome.exits,
        outcome.stats.get("kvm.interrupts_injected"),
        outcome.elapsed
    );
    Some((outcome, text))
}

#[test]
fn echo_echoes_serial_input_through_the_8259a_on_kvm() {
    for windows in [true, false] {
        let (tx, rx) = std::sync::mpsc::channel();
        for &b in b"deja\x04" {
            tx.send(b).unwrap();
        }
        let host = LiveHost::new(ClockMode::Virtual).with_input(rx);
        let Some((outcome, text)) = run_on_pc("echo", host, windows) else {
            return;
        };
        assert_eq!(
            outcome.end,
            RunEnd::Stopped(StopRequest::DebugExit { value: 0 }),
            "output: {text:?}"
        );
        assert!(text.starts_with(deja_guests::echo::BANNER), "{text:?}");
        assert!(text.contains("deja"), "{text:?}");
        assert!(text.ends_with(&deja_guests::echo::trailer(4)), "{text:?}");
        assert!(outcome.stats.get("kvm.interrupts_injected") >= 1);
        drop(tx);
    }
}

#[test]
fn timer_counts_pit_interrupts_through_the_8259a_on_kvm() {
    for windows in [true, false] {
        let Some((outcome, text)) = run_on_pc("timer", LiveHost::new(ClockMode::Virtual), windows)
        else {
            return;
        };
        assert_eq!(
            outcome.end,
            RunEnd::Stopped(StopRequest::DebugExit { value: 0 }),
            "output: {text:?}"
        );
        assert!(
            outcome.stats.get("kvm.interrupts_injected")
                > u64::from(deja_guests::timer::INTERRUPTS),
            "{:?}",
            outcome.stats
        );
    }
}

#[test]
fn exit_synchronous_delivery_makes_kvm_runs_repeatable_under_a_virtual_clock() {
    let mut runs = Vec::new();
    for _ in 0..2 {
        let Some((outcome, text)) = run_on_pc("timer", LiveHost::new(ClockMode::Virtual), false)
        else {
            return;
        };
        runs.push((
            outcome.exits,
            outcome.stats.get("kvm.interrupts_injected"),
            outcome.stats.get("exit.io_in"),
            outcome.stats.get("exit.io_out"),
            outcome.stats.get("exit.hlt"),
            text,
        ));
    }
    assert_eq!(runs[0], runs[1]);
}
