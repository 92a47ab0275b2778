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
    /// An MMU strategy was asked of an engine that cannot use it.
    #[error("the {engine} engine cannot use the {strategy} MMU strategy: {reason}")]
    MmuStrategy {
        /// The engine asked for.
        engine: EngineKind,
        /// The strategy asked for.
        strategy: deja_bt::mmu::MmuStrategy,
        /// Why not.
        reason: &'static str,
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
    build(
        engine,
        config,
        host,
        serial_out,
        image,
        BtOptions::default(),
    )
}

fn build(
    engine: EngineKind,
    config: MachineConfig,
    host: Box<dyn Host>,
    serial_out: Box<dyn Write + Send>,
    image: &Image,
    bt: BtOptions,
) -> Result<Vm, BuildError> {
    let mut machine = build_pc(config, host, serial_out)?;
    let state = loader::load(&mut machine, image).map_err(|source| BuildError::Load {
        image: image.name.clone(),
        source,
    })?;
    let devices = machine.save_devices();
    let mut cpu = create_engine(engine, &machine, bt)?;
    cpu.set_state(&state)
        .map_err(|source| BuildError::SetState { engine, source })?;
    let mut vm = Vm::new(machine, cpu);
    vm.set_reset_plan(crate::ResetPlan {
        image: image.clone(),
        devices,
        acpi_tables: true,
    });
    Ok(vm)
}

/// How bt runs a guest (kvm takes none of these): its MMU strategy (`deja run --mmu`, issue
/// #7; `None` keeps shadow page tables) and its tiers (`--tier`, issue #12). Neither is part
/// of a run's identity: the guest sees the same under all of them, so a trace replays under
/// any.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BtOptions {
    /// The MMU strategy.
    pub mmu: Option<deja_bt::mmu::MmuStrategy>,
    /// The tiers.
    pub tier: deja_bt::jit::Tier,
}

impl From<Option<deja_bt::mmu::MmuStrategy>> for BtOptions {
    fn from(mmu: Option<deja_bt::mmu::MmuStrategy>) -> Self {
        BtOptions {
            mmu,
            ..BtOptions::default()
        }
    }
}

/// [`build_vm`] with bt's options chosen ([`BtOptions`], or just an MMU strategy).
pub fn build_vm_with(
    engine: EngineKind,
    config: MachineConfig,
    host: Box<dyn Host>,
    serial_out: Box<dyn Write + Send>,
    image: &Image,
    bt: impl Into<BtOptions>,
) -> Result<Vm, BuildError> {
    build(engine, config, host, serial_out, image, bt.into())
}

fn create_engine(
    engine: EngineKind,
    machine: &deja_machine::Machine,
    bt: BtOptions,
) -> Result<Box<dyn Cpu>, BuildError> {
    if let Some(strategy) = bt.mmu
        && engine == EngineKind::Kvm
    {
        return Err(BuildError::MmuStrategy {
            engine,
            strategy,
            reason: "kvm translates with the host's MMU",
        });
    }
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
            Ok(mut cpu) => {
                cpu.set_tier(bt.tier);
                if let Some(strategy) = bt.mmu {
                    let created = strategy.create().map_err(|e| BuildError::Engine {
                        engine,
                        detail: e.to_string(),
                    })?;
                    cpu.set_mmu(Box::new(deja_bt::paging::MmuAdapter(created)));
                }
                Ok(Box::new(cpu))
            }
            Err(e) => Err(BuildError::Engine {
                engine,
                detail: e.to_string(),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deja_machine::loader::{EntryMode, ImageFormat};
    use deja_machine::{ClockMode, LiveHost};

    fn raw(bytes: Vec<u8>, load_addr: u64) -> Image {
        Image {
            initrd: None,
            name: "test-image".into(),
            bytes,
            format: ImageFormat::Raw {
                load_addr,
                entry: load_addr,
                mode: EntryMode::Real,
            },
        }
    }

    fn build(config: MachineConfig, image: &Image) -> Result<Vm, BuildError> {
        build_vm(
            EngineKind::Bt,
            config,
            Box::new(LiveHost::new(ClockMode::Virtual)),
            Box::new(std::io::sink()),
            image,
        )
    }

    fn small() -> MachineConfig {
        MachineConfig {
            ram_size: 16 << 20,
            ..MachineConfig::default()
        }
    }

    #[test]
    fn a_bad_memory_size_is_a_machine_error() {
        let config = MachineConfig {
            ram_size: 4096,
            ..MachineConfig::default()
        };
        let err = build(config, &raw(vec![0xf4], 0x7c00)).err().unwrap();
        assert!(matches!(err, BuildError::Machine(_)), "{err}");
    }

    #[test]
    fn a_load_failure_names_the_image() {
        let err = build(small(), &raw(Vec::new(), 0x7c00)).err().unwrap();
        assert!(
            matches!(&err, BuildError::Load { image, .. } if image == "test-image"),
            "{err}"
        );
        assert!(err.to_string().contains("test-image"), "{err}");
    }

    #[test]
    fn the_engine_starts_in_the_loaders_state() {
        let mut vm = build(small(), &raw(vec![0xf4], 0x7c00)).unwrap();
        let state = vm.cpu.state().unwrap();
        let cs = state.seg[deja_machine::cpu::seg::CS];
        assert_eq!(cs.base + state.rip, 0x7c00);
        assert_eq!(state.cr0 & 1, 0, "real mode");
    }
}

/// The CPUID answers guest code gets on an engine, ring 0 and ring 3 apart, for each of
/// [`deja_machine::CpuidTable::probe_leaves`]: bt answers from the table; kvm runs a probe
/// guest, since a host may answer some leaves itself (PVM answers ring-3 CPUID natively
/// and overrides leaves 1, 7 and 0xd in ring 0 too). Returns how they were learned and the
/// two lists.
pub fn guest_visible_cpuid(
    engine: EngineKind,
    table: &deja_machine::CpuidTable,
) -> Result<GuestVisibleCpuid, String> {
    match engine {
        EngineKind::Bt => {
            let answers: Vec<_> = table
                .probe_leaves()
                .into_iter()
                .map(|(function, index)| {
                    let [eax, ebx, ecx, edx] = table.lookup(function, index);
                    deja_machine::cpuid::CpuidEntry {
                        function,
                        index,
                        indexed: true,
                        eax,
                        ebx,
                        ecx,
                        edx,
                    }
                })
                .collect();
            Ok(GuestVisibleCpuid {
                source: "deja's table (bt)".into(),
                ring0: answers.clone(),
                ring3: answers,
            })
        }
        EngineKind::Kvm => Ok(GuestVisibleCpuid {
            source: "a probe guest on this host's kvm".into(),
            ring0: deja_kvm::probe::guest_cpuid(table, 0)?,
            ring3: deja_kvm::probe::guest_cpuid(table, 3)?,
        }),
    }
}

/// What [`guest_visible_cpuid`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestVisibleCpuid {
    /// How the answers were learned.
    pub source: String,
    /// As ring-0 code sees them.
    pub ring0: Vec<deja_machine::cpuid::CpuidEntry>,
    /// As ring-3 code sees them.
    pub ring3: Vec<deja_machine::cpuid::CpuidEntry>,
}
