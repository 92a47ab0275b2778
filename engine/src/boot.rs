//! Boot glue: a deja-pc machine, an image loaded into it, and the chosen engine started in
//! the CPU state the loader left, joined into a [`Vm`] ready to run.

use crate::{EngineKind, Vm};
use deja_machine::loader::{self, Image, LoadError};
use deja_machine::pc::build_pc;
use deja_machine::{Cpu, CpuError, Host, MachineConfig, MachineError};
use std::io::Write;
use thiserror::Error;

/// Failures between "run this image" and a [`Vm`] ready to run.
#[derive(Debug, Error)]
pub enum BuildError {
    /// The machine (memory, devices) could not be built.
    #[error("building the deja-pc machine: {0}")]
    Machine(#[from] MachineError),
    /// The image could not be loaded.
    #[error("loading {image}: {source}")]
    Load {
        /// The image's name.
        image: String,
        /// What the loader reported.
        source: LoadError,
    },
    /// The engine cannot run on this host or in this build.
    #[error("engine {engine} is not available: {reason}")]
    EngineUnavailable {
        /// The engine asked for.
        engine: EngineKind,
        /// Why not.
        reason: String,
    },
    /// The engine exists but failed to start.
    #[error("creating the {engine} engine: {detail}")]
    Engine {
        /// The engine asked for.
        engine: EngineKind,
        /// The engine's explanation.
        detail: String,
    },
    /// The engine refused the loader's initial CPU state.
    #[error("setting the {engine} engine's initial CPU state: {source}")]
    SetState {
        /// The engine.
        engine: EngineKind,
        /// The engine's explanation.
        source: CpuError,
    },
}

/// Builds the deja-pc machine for `config` (serial output to `serial_out`, every
/// nondeterministic input from `host`), loads `image`, creates `engine` over the machine and
/// starts it in the state the loader chose.
pub fn build_vm(
    engine: EngineKind,
    config: MachineConfig,
    host: Box<dyn Host>,
    serial_out: Box<dyn Write + Send>,
    image: &Image,
) -> Result<Vm, BuildError> {
    let mut machine = build_pc(config, host, serial_out)?;
    let state = loader::load(&mut machine, image).map_err(|source| BuildError::Load {
        image: image.name.clone(),
        source,
    })?;
    let mut cpu = create_engine(engine, &machine)?;
    cpu.set_state(&state)
        .map_err(|source| BuildError::SetState { engine, source })?;
    Ok(Vm::new(machine, cpu))
}

fn create_engine(
    engine: EngineKind,
    machine: &deja_machine::Machine,
) -> Result<Box<dyn Cpu>, BuildError> {
    match engine {
        EngineKind::Kvm => match deja_kvm::KvmCpu::new(machine) {
            Ok(cpu) => Ok(Box::new(cpu)),
            Err(e) if e.is_unavailable() => Err(BuildError::EngineUnavailable {
                engine,
                reason: e.to_string(),
            }),
            Err(e) => Err(BuildError::Engine {
                engine,
                detail: e.to_string(),
            }),
        },
        EngineKind::Bt => match deja_bt::BtCpu::new(machine) {
            Ok(cpu) => Ok(Box::new(cpu)),
            Err(e) => Err(BuildError::Engine {
                engine,
                detail: e.to_string(),
            }),
        },
    }
}
