//! The deja-pc machine model shared by both CPU engines: guest memory laid out as QEMU's pc
//! machine, port and MMIO buses, the devices, the loaders, the CPUID table, and the contract
//! between the machine and an engine ([`Cpu`], [`CpuState`], [`Exit`]).
//!
//! Everything here is deterministic given the image, the configuration and the answers of
//! the [`Host`]: that is what makes record and replay possible.

pub mod bus;
pub mod counters;
pub mod cpu;
pub mod cpuid;
pub mod devices;
pub mod exit_group;
pub mod host;
pub mod loader;
pub mod machine;
pub mod memory;
pub mod pc;
pub mod tables;

pub use cpu::{
    Cpu, CpuError, CpuState, EngineStats, Exit, InterruptDelivery, Kicker, Limit, Segment, WatchHit,
};
pub use cpuid::CpuidTable;
pub use host::{ClockMode, Host, LiveHost, Position};
pub use machine::{Machine, MachineConfig, MachineError, OptionalDevice};
pub use memory::GuestRam;
pub use pc::build_pc;
pub use vm_memory;
