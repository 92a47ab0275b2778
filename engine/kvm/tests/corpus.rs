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
            println!("SKIP: hello on kvm: /dev/kvm not available: {e}");
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
