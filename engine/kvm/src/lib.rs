//! The kvm engine: deja-pc guests under the host's KVM with every device in deja's
//! userspace.
//!
//! No in-kernel irqchip, PIT or irqfd: every port and MMIO access, every HLT and every
//! interrupt passes through the [`Machine`], so every input the guest sees can be logged.
//! Interrupts are injected with `KVM_INTERRUPT` when the vCPU can take them (or an
//! interrupt window is requested). On hosts without a PMU (all the machines deja runs on
//! today) kvm cannot count instructions, so positions are device-exit ordinals.
//!
//! See [`host_info`] for what the host's KVM is and what it cannot do, and [`probe`] for
//! the tiny guests that measure it.
//!
//! Counters ([`Cpu::stats`]): `exit.io_in`, `exit.io_out` (one per exit; string I/O also adds
//! its element count to `exit.io_string_elements`), `exit.mmio_read`, `exit.mmio_write`,
//! `exit.rom_write` (stores into ROM, dropped), `exit.hlt`, `exit.irq_window_open`,
//! `exit.shutdown`, `exit.intr` (signals and kicks), `exit.internal_error`,
//! `exit.fail_entry`, `exit.<name>` for anything unexpected, `kvm.interrupts_injected`,
//! `exit.group_continued` (device exits that left their exit group open, see below),
//! `exit.group_decided_at_exit` (device exits whose group ended without completing the
//! access first),
//! `exit.completion_exits` (completing an access made KVM exit again at once),
//! `exit.rep_retired` (finished REP instructions KVM left unretired, retired by deja),
//! and KVM's own non-zero counters as `kvm.stat.vcpu.<name>` and `kvm.stat.vm.<name>`.
//!
//! String I/O: KVM's emulator hands over a repeated string instruction in batches (INS data
//! read ahead up to the end of the destination page or 1 KiB, OUTS one element per exit)
//! and may re-enter the guest between batches. deja follows the exit-group rule
//! ([`deja_machine::exit_group`]) that bt follows too: while the next instruction after a
//! device exit is a REP string instruction with elements to go, the vCPU is resumed with
//! nothing injected, so [`Cpu::run`] returns the group's last exit only. A kick inside a
//! group is taken where the emulator re-enters the guest between two batches (no exit
//! waiting, the last element completed), and [`Limit::stop_at_exits`] stops a replay there.
//! Usually decided at the exit from the registers KVM syncs into `kvm_run`
//! (`KVM_CAP_SYNC_REGS`) and a code fetch; a REP string instruction at or right after RIP
//! costs completing the access at once (a `KVM_RUN` with `immediate_exit`, so registers are
//! those after it), `KVM_GET_REGS` and `KVM_GET_SREGS`.
//!
//! Known gaps: an interrupt queued with `KVM_INTERRUPT` whose `KVM_RUN` was cut short by a
//! kick stays queued inside KVM and is not part of [`CpuState`] (a snapshot taken then
//! loses it).
//!
//! The local APIC lives in deja: its MSRs (IA32_APIC_BASE, IA32_TSC_DEADLINE, x2APIC)
//! reach the machine as userspace MSR exits (`KVM_CAP_X86_USER_SPACE_MSR` + an MSR filter;
//! counted as `exit.rdmsr`/`exit.wrmsr`, device exits like port I/O), CR8 is synchronised
//! with the TPR through `kvm_run.cr8` at every entry and exit (a guest that lowers CR8
//! without exiting sees a pending interrupt at its next exit, as under QEMU with a
//! userspace APIC), NMIs go in with `KVM_NMI` and an INIT resets the vCPU.

pub mod host_info;
pub mod kick;
pub mod kvm_stats;
pub mod probe;
pub mod state;

use deja_machine::GuestRam;
use deja_machine::cpu::{PendingEvents, Xcr0, msr};
use deja_machine::{Cpu, CpuError, CpuState, EngineStats, Exit, Kicker, Limit, Machine};
use host_info::Flavour;
use kick::KickTarget;
use kvm_bindings as kb;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use std::collections::BTreeMap;
use std::sync::Arc;
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

const ENGINE: &str = "kvm";

/// Guest-physical address of the three-page TSS Intel VT-x needs for real mode (as QEMU).
pub const TSS_ADDR: u64 = 0xfeff_d000;
/// Guest-physical address of the identity-map page VT-x without unrestricted guest needs.
pub const IDENTITY_MAP_ADDR: u64 = 0xfeff_c000;

/// Ioctls kvm-ioctls does not wrap.
mod ioctls {
    #![allow(missing_docs)]
    use kvm_bindings as kb;
    // KVM_INTERRUPT: queue an external interrupt (userspace irqchip only).
    vmm_sys_util::ioctl_iow_nr!(KVM_INTERRUPT, kb::KVMIO, 0x86, kb::kvm_interrupt);
    // KVM_X86_SETUP_MCE: the vCPU's IA32_MCG_CAP (banks and capabilities).
    vmm_sys_util::ioctl_iow_nr!(KVM_X86_SETUP_MCE, kb::KVMIO, 0x9c, u64);
}
use ioctls::{KVM_INTERRUPT, KVM_X86_SETUP_MCE};

/// Failures creating a [`KvmCpu`].
#[derive(Debug, Error)]
pub enum KvmError {
    /// The KVM device could not be opened (missing, or no permission).
    #[error("cannot open {path}: {detail}")]
    Open {
        /// The device path (normally `/dev/kvm`).
        path: String,
        /// The OS error.
        detail: String,
    },
    /// The kernel speaks a different KVM API.
    #[error("KVM API version {found}, deja needs {expected}")]
    ApiVersion {
        /// What the kernel reported.
        found: i32,
        /// What deja was written for.
        expected: i32,
    },
    /// An ioctl needed to set the VM up failed.
    #[error("{operation} failed: {detail}")]
    Setup {
        /// The operation, e.g. `KVM_CREATE_VM`.
        operation: &'static str,
        /// The host's error.
        detail: String,
    },
    /// A guest memory range could not become a KVM memory slot.
    #[error(
        "registering guest memory {start:#x}+{len:#x} as KVM slot {slot} (flags {flags:#x}) failed: {detail}"
    )]
    MemorySlot {
        /// The slot number.
        slot: u32,
        /// Guest-physical start.
        start: u64,
        /// Length in bytes.
        len: u64,
        /// KVM_MEM_* flags asked for.
        flags: u32,
        /// The host's error.
        detail: String,
    },
    /// The machine's CPUID table does not fit KVM.
    #[error("CPUID table with {entries} entries rejected: {detail}")]
    Cpuid {
        /// Entries in the table.
        entries: usize,
        /// Why.
        detail: String,
    },
    /// The kick signal handler could not be installed.
    #[error(transparent)]
    Signal(#[from] kick::SignalError),
    /// Setting the reset state failed.
    #[error("setting the initial CPU state failed: {0}")]
    InitialState(#[from] CpuError),
}

impl KvmError {
    /// Whether the failure is "this host has no usable KVM" (tests skip, the CLI explains)
    /// rather than a bug.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, KvmError::Open { .. })
    }
}

fn host_err(operation: &'static str, e: impl std::fmt::Display) -> CpuError {
    CpuError::Host {
        engine: ENGINE,
        operation,
        detail: e.to_string(),
    }
}

fn setup_err(operation: &'static str, e: impl std::fmt::Display) -> KvmError {
    KvmError::Setup {
        operation,
        detail: e.to_string(),
    }
}

/// One KVM memory slot: a guest-physical range and whether the guest may write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Guest-physical start.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Registered with `KVM_MEM_READONLY` (writes exit as MMIO and are dropped).
    pub readonly: bool,
}

/// Splits the RAM range `[start, start+len)` into slots around the read-only ranges
/// (`(start, len)` pairs, any order, possibly overlapping the range partially).
pub fn split_slots(start: u64, len: u64, readonly: &[(u64, u64)]) -> Vec<Slot> {
    let end = start + len;
    let mut cuts: Vec<(u64, u64)> = readonly
        .iter()
        .map(|&(s, l)| (s.max(start), (s + l).min(end)))
        .filter(|(s, e)| s < e)
        .collect();
    cuts.sort_unstable();
    // Overlapping or touching read-only ranges become one slot.
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in cuts {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let mut out = Vec::new();
    let mut at = start;
    for (s, e) in merged {
        if at < s {
            out.push(Slot {
                start: at,
                len: s - at,
                readonly: false,
            });
        }
        out.push(Slot {
            start: s,
            len: e - s,
            readonly: true,
        });
        at = e;
    }
    if at < end {
        out.push(Slot {
            start: at,
            len: end - at,
            readonly: false,
        });
    }
    out
}

/// What one `KVM_RUN` exit turned into.
enum Step {
    /// Keep running (the exit was handled inside the engine).
    Continue,
    /// Return this to the run loop.
    Return(Exit),
}

/// The kvm engine's CPU: one vCPU of a VM whose memory is the machine's RAM.
pub struct KvmCpu {
    // Field order matters for drop: the vCPU and VM go before the memory they map.
    vcpu: VcpuFd,
    _vm: VmFd,
    _kvm: Kvm,
    /// Keeps the guest RAM mapped for as long as KVM may access it.
    _mem: GuestRam,
    run_size: usize,
    kick: Arc<KickTarget>,
    kicker: Kicker,
    stats: EngineStats,
    flavour: Flavour,
    slots: Vec<Slot>,
    /// Whether the RAM slots log the guest's writes (`KVM_MEM_LOG_DIRTY_PAGES`), turned on
    /// by the first [`Cpu::collect_dirty_pages`] (a plain run does not pay for it).
    dirty_logging: bool,
    msrs: Vec<u32>,
    /// KVM's own statistics for the vCPU and the VM, when the host offers them.
    kvm_stats: Vec<(&'static str, kvm_stats::StatsFile)>,
    /// Whether writing IA32_TSC changes the guest TSC (PVM accepts the write and ignores it).
    tsc_settable: bool,
    /// Whether to ask KVM for an interrupt-window exit while an interrupt waits for IF.
    interrupt_windows: bool,
    /// Whether x87/SSE state goes through KVM_GET/SET_XSAVE (else KVM_GET/SET_FPU).
    xsave: bool,
    /// Whether XCR0 goes through KVM_GET/SET_XCRS (else it stays at its reset value, 1).
    xcrs: bool,
    /// The guest executed HLT and has not taken an interrupt since.
    halted: bool,
    /// The last exit was I/O or MMIO, which KVM completes only on the next `KVM_RUN`.
    completion_pending: bool,
    /// `kvm_run.ready_for_interrupt_injection`/`if_flag` predate a `set_state`.
    run_flags_stale: bool,
    /// Whether KVM copies the registers and system registers into `kvm_run` at every exit
    /// (`KVM_CAP_SYNC_REGS`), which saves two ioctls per device exit for the exit-group rule.
    sync_regs: bool,
    /// Completing the last access made KVM exit again without entering the guest (the next
    /// batch of a repeated string instruction): that exit is in `kvm_run`, to be handled
    /// before the next `KVM_RUN`.
    exit_waiting: bool,
    /// The TSC read or written since the guest last ran (the guest cannot have observed
    /// time passing in between, so snapshots stay stable).
    tsc_cache: Option<u64>,
    /// Whether the local APIC's MSRs (IA32_APIC_BASE, IA32_TSC_DEADLINE, x2APIC) exit to
    /// deja (`KVM_CAP_X86_USER_SPACE_MSR` with an MSR filter); else the host's KVM
    /// answers them (x2APIC accesses then #GP, as without a local APIC).
    apic_msr_exits: bool,
    /// The guest TSC's frequency (`KVM_GET_TSC_KHZ`; 0 if the host does not say).
    tsc_khz: u64,
    /// CR8 as the machine's local APIC held it when `run` last returned (`None` without
    /// an APIC, or before the first run).
    apic_cr8: Option<u64>,
}

impl KvmCpu {
    /// Opens `/dev/kvm`, creates a VM with one vCPU over the machine's RAM, sets deja's
    /// CPUID table and the reset state. No in-kernel irqchip or PIT is created.
    pub fn new(machine: &Machine) -> Result<KvmCpu, KvmError> {
        Self::with_device(machine, "/dev/kvm")
    }

    /// [`KvmCpu::new`] with the KVM device at another path (containers, tests).
    pub fn with_device(machine: &Machine, path: &str) -> Result<KvmCpu, KvmError> {
        let c_path = std::ffi::CString::new(path).map_err(|_| KvmError::Open {
            path: path.to_string(),
            detail: "the path contains a NUL byte".into(),
        })?;
        let kvm = Kvm::new_with_path(&c_path).map_err(|e| KvmError::Open {
            path: path.to_string(),
            detail: e.to_string(),
        })?;
        let api = kvm.get_api_version();
        if api != kb::KVM_API_VERSION as i32 {
            return Err(KvmError::ApiVersion {
                found: api,
                expected: kb::KVM_API_VERSION as i32,
            });
        }
        let info = host_info::HostInfo::detect_flavour_only();
        let vm = kvm.create_vm().map_err(|e| setup_err("KVM_CREATE_VM", e))?;
        if info.needs_tss_addr() {
            vm.set_identity_map_address(IDENTITY_MAP_ADDR)
                .map_err(|e| setup_err("KVM_SET_IDENTITY_MAP_ADDR", e))?;
            vm.set_tss_address(TSS_ADDR as usize)
                .map_err(|e| setup_err("KVM_SET_TSS_ADDR", e))?;
        }
        if vm.check_extension_raw(libc::c_ulong::from(kb::KVM_CAP_EXIT_ON_EMULATION_FAILURE)) > 0 {
            // Without it KVM may turn an instruction its emulator cannot handle into a #UD
            // in the guest; deja would rather stop and say so.
            let cap = kb::kvm_enable_cap {
                cap: kb::KVM_CAP_EXIT_ON_EMULATION_FAILURE,
                args: [1, 0, 0, 0],
                ..Default::default()
            };
            vm.enable_cap(&cap)
                .map_err(|e| setup_err("KVM_ENABLE_CAP(EXIT_ON_EMULATION_FAILURE)", e))?;
        }
        let apic_msr_exits = enable_apic_msr_exits(&vm);
        let readonly = readonly_ranges(machine);
        let slots = register_memory(&vm, &machine.mem, &readonly)?;
        let mut vcpu = vm
            .create_vcpu(0)
            .map_err(|e| setup_err("KVM_CREATE_VCPU", e))?;
        let mut cpuid = machine.config.cpuid.clone();
        if !setup_mce(&vcpu) {
            // KVM would answer its own default machine-check MSRs (32 banks, no
            // IA32_MCG_CTL), not deja's: do not advertise MCE/MCA.
            use deja_machine::cpuid::features::{MCA, MCE};
            for e in cpuid.entries.iter_mut().filter(|e| e.function == 1) {
                e.edx &= !(MCE | MCA);
            }
        }
        if !apic_msr_exits {
            // Without userspace MSR exits deja's APIC cannot answer x2APIC or
            // IA32_TSC_DEADLINE accesses here: do not advertise them.
            use deja_machine::cpuid::features::{TSC_DEADLINE, X2APIC};
            for e in cpuid.entries.iter_mut().filter(|e| e.function == 1) {
                e.ecx &= !(X2APIC | TSC_DEADLINE);
            }
        }
        set_cpuid(&vcpu, &cpuid)?;
        let run_size = vm.run_size();
        kick::install_signal_handler()?;
        let immediate_exit = std::ptr::addr_of_mut!(vcpu.get_kvm_run().immediate_exit);
        let kick = KickTarget::new(immediate_exit);
        let hook_target = Arc::clone(&kick);
        let kicker = Kicker::with_hook(Arc::new(move || hook_target.kick()));
        let msrs = supported_msrs(&vcpu);
        let xsave = vm.check_extension_raw(libc::c_ulong::from(kb::KVM_CAP_XSAVE)) > 0
            && vcpu.get_xsave().is_ok();
        let xcrs = vm.check_extension_raw(libc::c_ulong::from(kb::KVM_CAP_XCRS)) > 0
            && vcpu.get_xcrs().is_ok();
        let wanted_sync = u64::from(kb::KVM_SYNC_X86_REGS | kb::KVM_SYNC_X86_SREGS);
        let sync_regs = (vm.check_extension_raw(libc::c_ulong::from(kb::KVM_CAP_SYNC_REGS)) as u64)
            & wanted_sync
            == wanted_sync;
        if sync_regs {
            vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
            vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::SystemRegister);
        }
        let mut kvm_stats = Vec::new();
        if let Ok(f) = kvm_stats::StatsFile::open(&vcpu) {
            kvm_stats.push(("vcpu", f));
        }
        if let Ok(f) = kvm_stats::StatsFile::open(&vm) {
            kvm_stats.push(("vm", f));
        }
        let tsc_khz = vcpu.get_tsc_khz().map(u64::from).unwrap_or(0);
        let mut cpu = KvmCpu {
            apic_msr_exits,
            tsc_khz,
            apic_cr8: None,
            kvm_stats,
            vcpu,
            _vm: vm,
            _kvm: kvm,
            _mem: machine.mem.clone(),
            run_size,
            kick,
            kicker,
            stats: EngineStats::default(),
            flavour: info,
            slots,
            dirty_logging: false,
            msrs,
            xsave,
            xcrs,
            interrupt_windows: true,
            tsc_settable: true,
            halted: false,
            completion_pending: false,
            run_flags_stale: true,
            exit_waiting: false,
            sync_regs,
            tsc_cache: None,
        };
        cpu.tsc_settable = cpu.probe_tsc_write();
        cpu.set_state(&CpuState::reset())?;
        Ok(cpu)
    }

    /// Chooses where a pending interrupt that the guest cannot take yet (IF = 0, interrupt
    /// shadow) is delivered.
    ///
    /// On (the default): KVM is asked for an interrupt-window exit, so the interrupt arrives
    /// at the first instruction boundary where the guest can take it, as on hardware. On
    /// VT-x and AMD-V that boundary is exact; on PVM the window opens only between batches
    /// of emulated ring-0 instructions, hundreds of instructions late.
    ///
    /// Off: interrupts are injected only when [`Cpu::run`] is entered after a device exit
    /// (or HLT) with the guest able to take them, so the delivery point is a device-exit
    /// ordinal on every host, which is what exit-synchronous recording needs.
    pub fn set_interrupt_windows(&mut self, on: bool) {
        self.interrupt_windows = on;
    }

    /// KVM's own non-zero counters for this vCPU (`vcpu.exits`, `vcpu.insn_emulation`,
    /// `vcpu.pf_fixed`, ...) and its VM (`vm.mmu_shadow_zapped`, ...), since creation.
    /// Empty on hosts without `KVM_CAP_BINARY_STATS_FD`.
    pub fn kvm_stats(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (scope, file) in &self.kvm_stats {
            if let Ok(values) = file.read() {
                for (name, value) in values {
                    if value != 0 {
                        out.insert(format!("{scope}.{name}"), value);
                    }
                }
            }
        }
        out
    }

    /// Whether the guest TSC can be set. When it cannot (PVM: the write is accepted and has
    /// no effect; the guest sees the host's TSC), [`Cpu::set_state`] leaves the TSC alone
    /// and [`Cpu::state`] reports the TSC as read, so snapshots still round-trip.
    pub fn tsc_settable(&self) -> bool {
        self.tsc_settable
    }

    /// Writes 0 to IA32_TSC and reads it back: a settable TSC is then tiny; an ignored
    /// write leaves the host's TSC (the host's uptime in cycles).
    fn probe_tsc_write(&self) -> bool {
        let zero = [kb::kvm_msr_entry {
            index: msr::IA32_TSC,
            ..Default::default()
        }];
        let Ok(msrs) = kb::Msrs::from_entries(&zero) else {
            return false;
        };
        if self.vcpu.set_msrs(&msrs) != Ok(1) {
            return false;
        }
        let Ok(mut back) = kb::Msrs::from_entries(&zero) else {
            return false;
        };
        if self.vcpu.get_msrs(&mut back) != Ok(1) {
            return false;
        }
        // A second of cycles at 10 GHz: far above what passes between the two ioctls.
        back.as_slice()[0].data < 10_000_000_000
    }

    /// Whether the local APIC's MSRs exit to deja (`KVM_CAP_X86_USER_SPACE_MSR` and an MSR
    /// filter were accepted). When not, guests that use x2APIC or TSC-deadline mode cannot
    /// run on this host's kvm.
    pub fn apic_msr_exits(&self) -> bool {
        self.apic_msr_exits
    }

    /// The flavour of KVM this vCPU runs on.
    pub fn flavour(&self) -> Flavour {
        self.flavour
    }

    /// The memory slots registered, in address order.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// The MSRs this host lets deja save and restore (a subset of [`state::KEPT_MSRS`]).
    pub fn kept_msrs(&self) -> &[u32] {
        &self.msrs
    }

    fn count(&mut self, name: &str) {
        self.stats.add(name, 1);
    }

    /// Whether an external interrupt can be injected right now.
    fn can_inject(&mut self) -> Result<bool, CpuError> {
        if self.run_flags_stale {
            let regs = self
                .vcpu
                .get_regs()
                .map_err(|e| host_err("KVM_GET_REGS", e))?;
            let ev = self
                .vcpu
                .get_vcpu_events()
                .map_err(|e| host_err("KVM_GET_VCPU_EVENTS", e))?;
            return Ok(regs.rflags & (1 << 9) != 0
                && ev.interrupt.shadow == 0
                && ev.interrupt.injected == 0
                && ev.exception.injected == 0);
        }
        let run = self.vcpu.get_kvm_run();
        Ok(run.ready_for_interrupt_injection != 0 && run.if_flag != 0)
    }

    fn inject(&mut self, machine: &mut Machine) -> Result<(), CpuError> {
        let vector = machine.acknowledge_interrupt();
        let irq = kb::kvm_interrupt {
            irq: u32::from(vector),
        };
        // SAFETY: KVM_INTERRUPT reads one kvm_interrupt from the valid reference we pass;
        // the fd is a vCPU fd.
        let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.vcpu, KVM_INTERRUPT(), &irq) };
        if rc != 0 {
            return Err(host_err(
                "KVM_INTERRUPT",
                format!("vector {vector:#x}: {}", std::io::Error::last_os_error()),
            ));
        }
        self.count("kvm.interrupts_injected");
        // The flags in kvm_run describe the moment before this injection.
        self.run_flags_stale = true;
        Ok(())
    }

    /// How the guest's TSC relates to guest time, for a WRMSR of `msr`: only
    /// IA32_TSC_DEADLINE needs it. The guest's TSC under KVM is the host's (PVM ignores
    /// writes to it), so the relation is measured at the write: the TSC KVM reports for
    /// the vCPU now, at KVM's TSC frequency, against the [`Host`](deja_machine::Host)'s
    /// time. TSC-deadline guests replay exactly only when recorded on bt (whose TSC is guest
    /// time): here the guest's own RDTSC returns the host TSC without an exit, so the
    /// deadline it writes (and every TSC value it keeps) follows host time, which no trace
    /// can give back. Logging this measurement would not help; a replayed guest writes a
    /// deadline from its new RDTSC.
    fn guest_tsc(
        &mut self,
        machine: &mut Machine,
        msr_index: u32,
    ) -> Result<deja_machine::devices::lapic::GuestTsc, CpuError> {
        use deja_machine::devices::lapic::{GuestTsc, MSR_TSC_DEADLINE};
        if msr_index != MSR_TSC_DEADLINE || self.tsc_khz == 0 {
            return Ok(GuestTsc::BT);
        }
        let mut m = kb::Msrs::from_entries(&[kb::kvm_msr_entry {
            index: msr::IA32_TSC,
            ..Default::default()
        }])
        .map_err(|e| host_err("KVM_GET_MSRS", format!("{e:?}")))?;
        let n = self
            .vcpu
            .get_msrs(&mut m)
            .map_err(|e| host_err("KVM_GET_MSRS", e))?;
        if n != 1 {
            return Err(host_err("KVM_GET_MSRS", "IA32_TSC could not be read"));
        }
        let tsc = m.as_slice()[0].data;
        let now = machine.time_ns();
        Ok(GuestTsc::observed(self.tsc_khz, now, tsc))
    }

    /// Takes what the local APIC holds for the CPU before an entry: an INIT resets the
    /// vCPU to its INIT state (one CPU, the BSP: it restarts at the reset vector rather
    /// than waiting for a SIPI), an NMI goes in with `KVM_NMI` (KVM blocks further NMIs
    /// until the guest's IRET).
    fn take_nmi_and_init(&mut self, machine: &mut Machine) -> Result<(), CpuError> {
        if machine.take_init() {
            let s = self.state()?.after_init();
            self.set_state(&s)?;
            self.count("kvm.inits");
        }
        if machine.take_nmi() {
            self.vcpu.nmi().map_err(|e| host_err("KVM_NMI", e))?;
            self.halted = false;
            self.count("kvm.nmis_injected");
        }
        Ok(())
    }

    /// Lets KVM finish an I/O or MMIO instruction whose data deja supplied, without running
    /// the guest further, so that registers read now are those after the instruction.
    fn complete_pending_io(&mut self) -> Result<(), CpuError> {
        if !self.completion_pending {
            return Ok(());
        }
        self.completion_pending = false;
        self.vcpu.get_kvm_run().immediate_exit = 1;
        let r = self.vcpu.run().map(|_| ()).map_err(|e| e.errno());
        self.kick.clear_immediate_exit();
        match r {
            Err(libc::EINTR) => Ok(()),
            Ok(()) => {
                // A repeated string instruction continued into its next batch and exited
                // again: deja cannot serve that access here (no machine at hand).
                let rip = self.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                Err(CpuError::Unsupported {
                    engine: ENGINE,
                    rip,
                    detail: format!(
                        "state requested in the middle of a repeated string I/O instruction \
                         (exit reason {} while completing it)",
                        self.vcpu.get_kvm_run().exit_reason
                    ),
                })
            }
            Err(errno) => Err(host_err(
                "KVM_RUN (completing I/O)",
                std::io::Error::from_raw_os_error(errno),
            )),
        }
    }

    /// Whether the device exit just handled leaves its exit group open
    /// ([`deja_machine::exit_group`]): the guest's next instruction is a repeated string
    /// instruction with elements to go.
    ///
    /// KVM writes an instruction's registers back only on the next `KVM_RUN` (how much it
    /// has written at the exit depends on the instruction and the kernel), so at the exit the
    /// next instruction is either the one at RIP or the one after it. When neither is a REP
    /// string instruction (and the one at RIP does not branch) the group ends, decided from
    /// the registers KVM left in `kvm_run` without an ioctl. Otherwise the access is
    /// completed first (a `KVM_RUN` with `immediate_exit`, not entering the guest) and the
    /// rule applied to the registers after it; when completing makes KVM exit again at once
    /// (its emulator went on to the same instruction's next batch), that exit waits in
    /// `kvm_run` and the group goes on.
    fn exit_group_continues(&mut self, machine: &Machine) -> Result<bool, CpuError> {
        use deja_machine::exit_group;
        if self.completion_pending {
            let (regs, sregs) = self.exit_registers()?;
            let view = CodeView::new(&regs, &sregs);
            let mut code = [0u8; 15];
            let n = exit_group::fetch_code(
                &machine.mem,
                &view.paging,
                view.linear(regs.rip),
                &mut code,
            );
            if exit_group::rep_string(&code[..n], view.address_bytes).is_none() {
                let mut decoder = iced_x86::Decoder::with_ip(
                    u32::from(view.address_bytes) * 8,
                    &code[..n],
                    regs.rip,
                    iced_x86::DecoderOptions::NONE,
                );
                let insn = decoder.decode();
                if !insn.is_invalid() && insn.flow_control() == iced_x86::FlowControl::Next {
                    let next = view.next_rip(regs.rip, insn.len() as u64);
                    let n = exit_group::fetch_code(
                        &machine.mem,
                        &view.paging,
                        view.linear(next),
                        &mut code,
                    );
                    if exit_group::rep_string(&code[..n], view.address_bytes).is_none() {
                        self.count("exit.group_decided_at_exit");
                        return Ok(false);
                    }
                }
            }
            self.completion_pending = false;
            self.vcpu.get_kvm_run().immediate_exit = 1;
            let r = self.vcpu.run().map(|_| ()).map_err(|e| e.errno());
            self.kick.clear_immediate_exit();
            match r {
                Err(libc::EINTR) => {}
                Ok(()) => {
                    self.exit_waiting = true;
                    self.count("exit.completion_exits");
                    return Ok(true);
                }
                Err(errno) => {
                    return Err(host_err(
                        "KVM_RUN (completing I/O)",
                        std::io::Error::from_raw_os_error(errno),
                    ));
                }
            }
        }
        let mut regs = self
            .vcpu
            .get_regs()
            .map_err(|e| host_err("KVM_GET_REGS", e))?;
        let sregs = self
            .vcpu
            .get_sregs()
            .map_err(|e| host_err("KVM_GET_SREGS", e))?;
        let view = CodeView::new(&regs, &sregs);
        let mut code = [0u8; 15];
        let n =
            exit_group::fetch_code(&machine.mem, &view.paging, view.linear(regs.rip), &mut code);
        let Some(rep) = exit_group::rep_string(&code[..n], view.address_bytes) else {
            return Ok(false);
        };
        if rep.has_elements(regs.rcx) {
            return Ok(true);
        }
        const RF: u64 = 1 << 16;
        if regs.rflags & RF != 0 {
            // KVM's emulator can hand over a repeated string instruction whose last element
            // is done before retiring it: RIP still on it with the count at 0 and RF set (it
            // marks an instruction it resumes). Running it again would only move RIP on, so
            // retire it here, as bt has at this exit: otherwise an interrupt delivered now
            // returns to it, and the state differs from bt's.
            regs.rip = view.next_rip(regs.rip, rep.len);
            regs.rflags &= !RF;
            self.vcpu
                .set_regs(&regs)
                .map_err(|e| host_err("KVM_SET_REGS", e))?;
            self.count("exit.rep_retired");
        }
        Ok(false)
    }

    /// Hands the IA32_APIC_BASE deja's local APIC just took to KVM (through `kvm_sregs`),
    /// which keeps CPUID.01H:EDX.APIC in step with its enable bit, as bt does
    /// ([`Machine::cpuid`]); KVM never sees the guest's write, which deja's APIC owns.
    fn tell_kvm_apic_base(&mut self, value: u64) -> Result<(), CpuError> {
        let mut sregs = self
            .vcpu
            .get_sregs()
            .map_err(|e| host_err("KVM_GET_SREGS", e))?;
        if sregs.apic_base != value {
            sregs.apic_base = value;
            self.vcpu
                .set_sregs(&sregs)
                .map_err(|e| host_err("KVM_SET_SREGS", e))?;
        }
        Ok(())
    }

    /// The registers as KVM left them at the last exit: from `kvm_run` when KVM syncs them
    /// there, else by ioctl.
    fn exit_registers(&mut self) -> Result<(kb::kvm_regs, kb::kvm_sregs), CpuError> {
        if self.sync_regs {
            let s = self.vcpu.sync_regs();
            return Ok((s.regs, s.sregs));
        }
        let regs = self
            .vcpu
            .get_regs()
            .map_err(|e| host_err("KVM_GET_REGS", e))?;
        let sregs = self
            .vcpu
            .get_sregs()
            .map_err(|e| host_err("KVM_GET_SREGS", e))?;
        Ok((regs, sregs))
    }

    /// Handles the exit KVM left in `kvm_run`.
    fn handle_exit(&mut self, machine: &mut Machine) -> Result<Step, CpuError> {
        let run_size = self.run_size;
        let run = self.vcpu.get_kvm_run();
        let reason = run.exit_reason;
        match reason {
            kb::KVM_EXIT_IO => {
                // SAFETY: the exit reason says the `io` member of the union is valid.
                let io = unsafe { run.__bindgen_anon_1.io };
                let size = usize::from(io.size);
                let count = io.count as usize;
                let offset = io.data_offset as usize;
                let total = size * count;
                if !matches!(size, 1 | 2 | 4) || offset.saturating_add(total) > run_size {
                    return Err(host_err(
                        "KVM_EXIT_IO",
                        format!(
                            "malformed I/O exit: port {:#x} size {size} count {count} offset {offset}",
                            io.port
                        ),
                    ));
                }
                let base = std::ptr::from_mut(run).cast::<u8>();
                // SAFETY: the kernel placed `total` bytes of I/O data at `data_offset` inside
                // the kvm_run mapping of `run_size` bytes (checked above); nothing else
                // aliases it while we hold the vCPU mutably.
                let data = unsafe { std::slice::from_raw_parts_mut(base.add(offset), total) };
                let is_in = u32::from(io.direction) == kb::KVM_EXIT_IO_IN;
                for element in data.chunks_mut(size) {
                    if is_in {
                        machine.pio_read(io.port, element);
                    } else {
                        machine.pio_write(io.port, element);
                    }
                }
                self.stats
                    .add(if is_in { "exit.io_in" } else { "exit.io_out" }, 1);
                if count > 1 {
                    self.stats.add("exit.io_string_elements", count as u64);
                }
                self.completion_pending = true;
                Ok(Step::Return(device_exit(machine)))
            }
            kb::KVM_EXIT_MMIO => {
                // SAFETY: the exit reason says the `mmio` member of the union is valid.
                let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
                let addr = mmio.phys_addr;
                let len = (mmio.len as usize).min(mmio.data.len());
                let write = mmio.is_write != 0;
                if write {
                    let data = mmio.data;
                    if is_readonly(&self.slots, addr) {
                        // A store to ROM: dropped, as on real hardware; not a device access.
                        self.stats.add("exit.rom_write", 1);
                        self.completion_pending = true;
                        return Ok(Step::Continue);
                    }
                    machine.mmio_write(addr, &data[..len]);
                } else {
                    machine.mmio_read(addr, &mut mmio.data[..len]);
                }
                self.stats.add(
                    if write {
                        "exit.mmio_write"
                    } else {
                        "exit.mmio_read"
                    },
                    1,
                );
                self.completion_pending = true;
                Ok(Step::Return(device_exit(machine)))
            }
            kb::KVM_EXIT_HLT => {
                self.count("exit.hlt");
                machine.note_halt();
                self.halted = true;
                Ok(Step::Return(Exit::Halted))
            }
            kb::KVM_EXIT_X86_RDMSR | kb::KVM_EXIT_X86_WRMSR => {
                // SAFETY: the exit reason says the `msr` member of the union is valid.
                let m = unsafe { run.__bindgen_anon_1.msr };
                let write = reason == kb::KVM_EXIT_X86_WRMSR;
                if !machine.handles_msr(m.index) {
                    // An MSR KVM found invalid and deja does not own: #GP(0), as KVM would
                    // have raised itself; not a device access (bt does not stop for it).
                    self.vcpu.get_kvm_run().__bindgen_anon_1.msr.error = 1;
                    self.count("exit.msr_gp");
                    self.completion_pending = true;
                    return Ok(Step::Continue);
                }
                let result = if write {
                    let tsc = self.guest_tsc(machine, m.index)?;
                    machine.wrmsr(m.index, m.data, tsc).map_err(|_| ())
                } else {
                    // KVM reads `data` back on the next KVM_RUN.
                    machine
                        .rdmsr(m.index)
                        .map(|v| self.vcpu.get_kvm_run().__bindgen_anon_1.msr.data = v)
                        .map_err(|_| ())
                };
                if write && m.index == msr::IA32_APIC_BASE && result.is_ok() {
                    self.tell_kvm_apic_base(m.data)?;
                }
                // A non-zero `error` makes KVM inject #GP(0).
                self.vcpu.get_kvm_run().__bindgen_anon_1.msr.error = u8::from(result.is_err());
                self.count(if write { "exit.wrmsr" } else { "exit.rdmsr" });
                self.completion_pending = true;
                Ok(Step::Return(device_exit(machine)))
            }
            kb::KVM_EXIT_IRQ_WINDOW_OPEN => {
                self.count("exit.irq_window_open");
                Ok(Step::Continue)
            }
            kb::KVM_EXIT_SHUTDOWN => {
                self.count("exit.shutdown");
                Ok(Step::Return(Exit::Shutdown {
                    reason: "triple fault (KVM_EXIT_SHUTDOWN)".to_string(),
                }))
            }
            kb::KVM_EXIT_INTR => {
                self.count("exit.intr");
                Ok(Step::Continue)
            }
            kb::KVM_EXIT_INTERNAL_ERROR => {
                let detail = internal_error_detail(run);
                self.count("exit.internal_error");
                Err(self.unsupported(detail))
            }
            kb::KVM_EXIT_FAIL_ENTRY => {
                // SAFETY: the exit reason says the `fail_entry` member is valid.
                let f = unsafe { run.__bindgen_anon_1.fail_entry };
                self.count("exit.fail_entry");
                let detail = format!(
                    "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {:#x} on host cpu {}",
                    f.hardware_entry_failure_reason, f.cpu
                );
                Err(self.unsupported(detail))
            }
            other => {
                let name = exit_name(other);
                self.count(&format!("exit.{name}"));
                Err(self.unsupported(format!("unexpected KVM exit {name} ({other})")))
            }
        }
    }

    fn get_fpu(&self) -> Result<deja_machine::cpu::FpuState, CpuError> {
        if self.xsave {
            let x = self
                .vcpu
                .get_xsave()
                .map_err(|e| host_err("KVM_GET_XSAVE", e))?;
            Ok(state::fpu_from_xsave(&xsave_bytes(&x)))
        } else {
            let f = self
                .vcpu
                .get_fpu()
                .map_err(|e| host_err("KVM_GET_FPU", e))?;
            Ok(state::fpu_from_kvm(&f))
        }
    }

    fn set_fpu(&self, fpu: &deja_machine::cpu::FpuState) -> Result<(), CpuError> {
        if self.xsave {
            let mut x = self
                .vcpu
                .get_xsave()
                .map_err(|e| host_err("KVM_GET_XSAVE", e))?;
            let mut image = xsave_bytes(&x);
            state::fpu_into_xsave(fpu, &mut image);
            for (word, chunk) in x.region.iter_mut().zip(image.chunks_exact(4)) {
                *word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
            // SAFETY: the buffer is the kernel's own KVM_GET_XSAVE answer (so its feature
            // set fits the 4 KiB kvm_xsave), changed only in the legacy area and in the x87
            // and SSE bits of XSTATE_BV.
            unsafe { self.vcpu.set_xsave(&x) }.map_err(|e| host_err("KVM_SET_XSAVE", e))
        } else {
            self.vcpu
                .set_fpu(&state::fpu_to_kvm(fpu))
                .map_err(|e| host_err("KVM_SET_FPU", e))
        }
    }

    /// XCR0 (KVM_GET_XCRS); the reset value where KVM cannot say.
    fn get_xcr0(&self) -> Result<Xcr0, CpuError> {
        if !self.xcrs {
            return Ok(Xcr0::RESET);
        }
        let x = self
            .vcpu
            .get_xcrs()
            .map_err(|e| host_err("KVM_GET_XCRS", e))?;
        let n = (x.nr_xcrs as usize).min(x.xcrs.len());
        Ok(x.xcrs[..n]
            .iter()
            .find(|r| r.xcr == 0)
            .map_or(Xcr0::RESET, |r| Xcr0(r.value)))
    }

    /// Sets XCR0 (KVM_SET_XCRS). A value other than the reset one on a KVM without
    /// KVM_CAP_XCRS cannot be represented: refused, as an MSR KVM lacks is.
    fn set_xcr0(&self, xcr0: Xcr0) -> Result<(), CpuError> {
        if !self.xcrs {
            if xcr0 == Xcr0::RESET {
                return Ok(());
            }
            return Err(CpuError::Unsupported {
                engine: ENGINE,
                rip: 0,
                detail: format!(
                    "the state holds XCR0 = {:#x}, which this host's KVM (no KVM_CAP_XCRS) cannot restore",
                    xcr0.0
                ),
            });
        }
        let mut x = kb::kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        x.xcrs[0].xcr = 0;
        x.xcrs[0].value = xcr0.0;
        self.vcpu
            .set_xcrs(&x)
            .map_err(|e| host_err("KVM_SET_XCRS", e))
    }

    /// [`Cpu::run`] itself: runs until an exit.
    fn run_until_exit(&mut self, machine: &mut Machine, limit: Limit) -> Result<Exit, CpuError> {
        let _in_run = self.kick.enter();
        // Set while the guest continues an exit group (deja_machine::exit_group): until the
        // group's last device exit nothing is injected. Kicks are taken inside a group too,
        // where the emulator re-enters the guest between two elements (no exit waiting, the
        // last element completed): a KVM_RUN that returns EINTR.
        let mut holding = false;
        loop {
            if holding && !self.exit_waiting {
                // Between two elements, the last one completed.
                if self.kicker.pending() {
                    self.kick.clear_immediate_exit();
                    return Ok(Exit::Kicked);
                }
                if limit
                    .stop_at_exits
                    .is_some_and(|k| machine.position().exits >= k)
                {
                    // Where a recording was kicked inside this group (`Limit::stop_at_exits`).
                    return Ok(Exit::InstructionLimit);
                }
            }
            let mut want_window = false;
            if !holding {
                if self.kicker.pending() {
                    self.kick.clear_immediate_exit();
                    return Ok(Exit::Kicked);
                }
                self.take_nmi_and_init(machine)?;
                let pending = machine.interrupt_pending();
                if self.halted {
                    if pending && self.can_inject()? {
                        self.inject(machine)?;
                        self.halted = false;
                    } else {
                        // Still halted: nothing the guest can take yet. Not a new guest access.
                        return Ok(Exit::Halted);
                    }
                } else if pending && self.can_inject()? {
                    self.inject(machine)?;
                }
                // Ask for an exit as soon as the guest can take the (next) pending interrupt.
                want_window = self.interrupt_windows && machine.interrupt_pending();
            }
            self.vcpu.get_kvm_run().request_interrupt_window = u8::from(want_window);
            // Without an in-kernel local APIC, KVM loads CR8 from kvm_run.cr8 at every entry
            // and reports it there at every exit: the TPR lives in deja's APIC.
            if let Some(cr8) = machine.cr8() {
                self.vcpu.get_kvm_run().cr8 = cr8;
            }
            self.tsc_cache = None;
            let result = if std::mem::take(&mut self.exit_waiting) {
                Ok(())
            } else {
                self.kick.entering_kvm_run();
                let r = self.vcpu.run().map(|_| ()).map_err(|e| e.errno());
                self.kick.left_kvm_run();
                r
            };
            self.completion_pending = false;
            self.run_flags_stale = false;
            let cr8 = self.vcpu.get_kvm_run().cr8;
            if machine.cr8().is_some_and(|tpr| tpr != cr8) {
                machine.set_cr8(cr8 & 0xf);
            }
            match result {
                Ok(()) => match self.handle_exit(machine)? {
                    Step::Continue => continue,
                    Step::Return(Exit::DeviceAccess) if self.exit_group_continues(machine)? => {
                        self.count("exit.group_continued");
                        holding = true;
                    }
                    Step::Return(exit) => return Ok(exit),
                },
                Err(libc::EINTR) => {
                    self.count("exit.intr");
                    // Clear first, then look at the flag: a kick landing in between sets
                    // immediate_exit again and the next KVM_RUN returns at once.
                    self.kick.clear_immediate_exit();
                    if self.kicker.pending() {
                        return Ok(Exit::Kicked);
                    }
                }
                Err(libc::EAGAIN) => self.count("exit.eagain"),
                Err(errno) => {
                    return Err(host_err(
                        "KVM_RUN",
                        std::io::Error::from_raw_os_error(errno),
                    ));
                }
            }
        }
    }

    fn unsupported(&mut self, detail: String) -> CpuError {
        let rip = self.vcpu.get_regs().map(|r| r.rip).unwrap_or(u64::MAX);
        CpuError::Unsupported {
            engine: ENGINE,
            rip,
            detail,
        }
    }
}

impl Drop for KvmCpu {
    fn drop(&mut self) {
        // A kicker may outlive the vCPU; it must not write into the unmapped kvm_run.
        self.kick.detach();
    }
}

fn xsave_bytes(x: &kb::kvm_xsave) -> [u8; 4096] {
    let mut image = [0u8; 4096];
    for (chunk, word) in image.chunks_exact_mut(4).zip(x.region.iter()) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    image
}

fn is_readonly(slots: &[Slot], addr: u64) -> bool {
    slots
        .iter()
        .any(|s| s.readonly && (s.start..s.start + s.len).contains(&addr))
}

/// After a device access: stop if a device asked for it.
/// How the guest's code is addressed now, for the exit-group rule's code fetches.
struct CodeView {
    cs_base: u64,
    /// The mode's address size in bytes (also its code size).
    address_bytes: u8,
    /// CS.D outside 64-bit mode (IP wraps at 16 bits without it).
    cs_db: bool,
    paging: deja_machine::exit_group::PagingRegs,
}

impl CodeView {
    fn new(regs: &kb::kvm_regs, sregs: &kb::kvm_sregs) -> Self {
        let cs = state::segment_from_kvm(&sregs.cs);
        let lma = sregs.efer & (1 << 10) != 0;
        Self {
            cs_base: cs.base,
            address_bytes: deja_machine::exit_group::default_address_bytes(
                &cs,
                sregs.cr0,
                regs.rflags,
                lma,
            ),
            cs_db: cs.db,
            paging: deja_machine::exit_group::PagingRegs {
                cr0: sregs.cr0,
                cr3: sregs.cr3,
                cr4: sregs.cr4,
                efer: sregs.efer,
            },
        }
    }

    /// The linear address of `rip`.
    fn linear(&self, rip: u64) -> u64 {
        if self.address_bytes == 8 {
            rip
        } else {
            self.cs_base.wrapping_add(rip) & 0xffff_ffff
        }
    }

    /// RIP after an instruction of `len` bytes at `rip` (wrapping as IP/EIP do).
    fn next_rip(&self, rip: u64, len: u64) -> u64 {
        let next = rip.wrapping_add(len);
        match self.address_bytes {
            8 => next,
            _ if self.cs_db => next & 0xffff_ffff,
            _ => next & 0xffff,
        }
    }
}

fn device_exit(machine: &Machine) -> Exit {
    if machine.stop_request().is_some() {
        Exit::StopRequested
    } else {
        Exit::DeviceAccess
    }
}

fn exit_name(reason: u32) -> String {
    match reason {
        kb::KVM_EXIT_UNKNOWN => "unknown".into(),
        kb::KVM_EXIT_EXCEPTION => "exception".into(),
        kb::KVM_EXIT_HYPERCALL => "hypercall".into(),
        kb::KVM_EXIT_DEBUG => "debug".into(),
        kb::KVM_EXIT_NMI => "nmi".into(),
        kb::KVM_EXIT_SYSTEM_EVENT => "system_event".into(),
        kb::KVM_EXIT_X86_RDMSR => "rdmsr".into(),
        kb::KVM_EXIT_X86_WRMSR => "wrmsr".into(),
        kb::KVM_EXIT_MEMORY_FAULT => "memory_fault".into(),
        kb::KVM_EXIT_TPR_ACCESS => "tpr_access".into(),
        kb::KVM_EXIT_SET_TPR => "set_tpr".into(),
        kb::KVM_EXIT_NOTIFY => "notify".into(),
        n => format!("reason_{n}"),
    }
}

fn internal_error_detail(run: &kb::kvm_run) -> String {
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, whose `internal` member is valid.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let sub = match internal.suberror {
        kb::KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
        kb::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
        kb::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
        kb::KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected hardware exit reason",
        _ => "unknown suberror",
    };
    let mut detail = format!(
        "KVM_EXIT_INTERNAL_ERROR: {sub} (suberror {})",
        internal.suberror
    );
    if internal.suberror == kb::KVM_INTERNAL_ERROR_EMULATION {
        // SAFETY: for emulation failures the `emulation_failure` member is the valid view.
        let ef = unsafe { run.__bindgen_anon_1.emulation_failure };
        if ef.flags & u64::from(kb::KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0 {
            // SAFETY: the flag says the instruction bytes are present.
            let bytes = unsafe { ef.__bindgen_anon_1.__bindgen_anon_1 };
            let n = usize::from(bytes.insn_size).min(bytes.insn_bytes.len());
            detail.push_str(&format!(
                "; instruction bytes {:02x?}",
                &bytes.insn_bytes[..n]
            ));
            return detail;
        }
    }
    let n = (internal.ndata as usize).min(internal.data.len());
    if n > 0 {
        detail.push_str(&format!("; data {:#x?}", &internal.data[..n]));
    }
    detail
}

/// Read-only ranges of the machine's memory (firmware ROM), `(start, len)`.
fn readonly_ranges(machine: &Machine) -> Vec<(u64, u64)> {
    machine
        .layout
        .rom
        .iter()
        .map(|r| (r.start, r.len))
        .collect()
}

fn register_memory(
    vm: &VmFd,
    mem: &GuestRam,
    readonly: &[(u64, u64)],
) -> Result<Vec<Slot>, KvmError> {
    let mut slots = Vec::new();
    for region in mem.iter() {
        for piece in split_slots(region.start_addr().0, region.len(), readonly) {
            set_slot(vm, mem, slots.len() as u32, piece, false)?;
            slots.push(piece);
        }
    }
    Ok(slots)
}

/// Registers (or re-registers, to change its flags) memory slot `slot` for `piece` of
/// `mem`, logging the guest's writes to it when `log_dirty`.
fn set_slot(
    vm: &VmFd,
    mem: &GuestRam,
    slot: u32,
    piece: Slot,
    log_dirty: bool,
) -> Result<(), KvmError> {
    let region = mem
        .find_region(vm_memory::GuestAddress(piece.start))
        .ok_or_else(|| {
            setup_err(
                "guest memory slot",
                format!("no region at {:#x}", piece.start),
            )
        })?;
    let host = region
        .get_host_address(MemoryRegionAddress(0))
        .map_err(|e| setup_err("guest memory host address", e))?;
    let mut flags = 0;
    if piece.readonly {
        flags |= kb::KVM_MEM_READONLY;
    }
    if log_dirty {
        flags |= kb::KVM_MEM_LOG_DIRTY_PAGES;
    }
    let region = kb::kvm_userspace_memory_region {
        slot,
        flags,
        guest_phys_addr: piece.start,
        memory_size: piece.len,
        userspace_addr: host as u64 + (piece.start - region.start_addr().0),
    };
    // SAFETY: the host range lies inside a mapping of the machine's guest memory, which the
    // KvmCpu keeps alive (it holds a clone of the GuestRam) for as long as the VM exists.
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| KvmError::MemorySlot {
        slot,
        start: piece.start,
        len: piece.len,
        flags,
        detail: e.to_string(),
    })
}

fn set_cpuid(vcpu: &VcpuFd, table: &deja_machine::CpuidTable) -> Result<(), KvmError> {
    let entries: Vec<kb::kvm_cpuid_entry2> = table
        .entries
        .iter()
        .map(|e| kb::kvm_cpuid_entry2 {
            function: e.function,
            index: if e.indexed { e.index } else { 0 },
            flags: if e.indexed {
                kb::KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            padding: [0; 3],
        })
        .collect();
    let err = |detail: String| KvmError::Cpuid {
        entries: entries.len(),
        detail,
    };
    let cpuid = kb::CpuId::from_entries(&entries).map_err(|e| err(format!("{e:?}")))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| err(format!("KVM_SET_CPUID2: {e}")))
}

/// Asks KVM to send the local APIC's MSRs to userspace: `KVM_CAP_X86_USER_SPACE_MSR`
/// for filtered, invalid and unknown accesses, and a filter that denies (so forwards)
/// IA32_APIC_BASE and IA32_TSC_DEADLINE while allowing every other MSR. Without an
/// in-kernel local APIC KVM would otherwise keep IA32_APIC_BASE itself, read
/// IA32_TSC_DEADLINE as 0 and #GP every x2APIC access. Returns whether it worked.
fn enable_apic_msr_exits(vm: &VmFd) -> bool {
    use deja_machine::devices::lapic::MSR_TSC_DEADLINE;
    use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags};
    if vm.check_extension_raw(libc::c_ulong::from(kb::KVM_CAP_X86_USER_SPACE_MSR)) <= 0 {
        return false;
    }
    let cap = kb::kvm_enable_cap {
        cap: kb::KVM_CAP_X86_USER_SPACE_MSR,
        // FILTER for IA32_APIC_BASE and IA32_TSC_DEADLINE; KVM never filters the x2APIC
        // range, and without an in-kernel APIC it finds those MSRs invalid (INVAL) or
        // unknown: those exits reach deja too, which answers #GP for anything not its own.
        args: [
            u64::from(
                kb::KVM_MSR_EXIT_REASON_FILTER
                    | kb::KVM_MSR_EXIT_REASON_INVAL
                    | kb::KVM_MSR_EXIT_REASON_UNKNOWN,
            ),
            0,
            0,
            0,
        ],
        ..Default::default()
    };
    if vm.enable_cap(&cap).is_err() {
        return false;
    }
    let deny = [0u8; 1]; // every bit 0: denied, so forwarded to userspace
    let both = MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE;
    let ranges = [
        MsrFilterRange {
            flags: both,
            base: msr::IA32_APIC_BASE,
            msr_count: 1,
            bitmap: &deny,
        },
        MsrFilterRange {
            flags: both,
            base: MSR_TSC_DEADLINE,
            msr_count: 1,
            bitmap: &deny,
        },
    ];
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
        .is_ok()
}

/// Gives the vCPU deja's machine-check architecture ([`deja_machine::cpu::mca`]), which
/// KVM then emulates as bt does (IA32_MCG_CTL and every MCi_CTL all 1s, no error logged).
/// Returns whether KVM took it.
fn setup_mce(vcpu: &VcpuFd) -> bool {
    let cap: u64 = deja_machine::cpu::mca::MCG_CAP;
    // SAFETY: KVM_X86_SETUP_MCE reads one u64 from the valid reference we pass; the fd is
    // a vCPU fd.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vcpu, KVM_X86_SETUP_MCE(), &cap) };
    rc == 0
}

/// The subset of [`state::KEPT_MSRS`] and the machine-check MSRs the host can read for
/// this vCPU.
fn supported_msrs(vcpu: &VcpuFd) -> Vec<u32> {
    state::KEPT_MSRS
        .iter()
        .copied()
        .chain(deja_machine::cpu::mca::state_msrs())
        .filter(|&index| {
            kb::Msrs::from_entries(&[kb::kvm_msr_entry {
                index,
                ..Default::default()
            }])
            .ok()
            .and_then(|mut m| vcpu.get_msrs(&mut m).ok())
                == Some(1)
        })
        .collect()
}

impl Cpu for KvmCpu {
    fn name(&self) -> &'static str {
        ENGINE
    }

    fn set_interrupt_delivery(
        &mut self,
        delivery: deja_machine::InterruptDelivery,
    ) -> Result<(), CpuError> {
        self.set_interrupt_windows(delivery == deja_machine::InterruptDelivery::Exact);
        Ok(())
    }

    fn counts_instructions(&self) -> bool {
        false
    }

    fn run(&mut self, machine: &mut Machine, limit: Limit) -> Result<Exit, CpuError> {
        let exit = self.run_until_exit(machine, limit);
        // The TPR may have changed by MMIO or MSR since KVM last saw CR8 (it reloads it
        // from kvm_run.cr8 at the next entry): the CPU state shows the APIC's value.
        self.apic_cr8 = machine.cr8();
        exit
    }

    fn icount(&self) -> u64 {
        0
    }

    fn state(&mut self) -> Result<CpuState, CpuError> {
        self.complete_pending_io()?;
        let regs = self
            .vcpu
            .get_regs()
            .map_err(|e| host_err("KVM_GET_REGS", e))?;
        let sregs = self
            .vcpu
            .get_sregs()
            .map_err(|e| host_err("KVM_GET_SREGS", e))?;
        let fpu = self.get_fpu()?;
        let debug = self
            .vcpu
            .get_debug_regs()
            .map_err(|e| host_err("KVM_GET_DEBUGREGS", e))?;
        let events = self
            .vcpu
            .get_vcpu_events()
            .map_err(|e| host_err("KVM_GET_VCPU_EVENTS", e))?;
        let (gpr, rip, rflags) = state::gprs_from_kvm(&regs);
        let mut s = CpuState {
            gpr,
            rip,
            rflags,
            seg: [
                state::segment_from_kvm(&sregs.es),
                state::segment_from_kvm(&sregs.cs),
                state::segment_from_kvm(&sregs.ss),
                state::segment_from_kvm(&sregs.ds),
                state::segment_from_kvm(&sregs.fs),
                state::segment_from_kvm(&sregs.gs),
            ],
            tr: state::segment_from_kvm(&sregs.tr),
            ldtr: state::segment_from_kvm(&sregs.ldt),
            gdtr: state::dtable_from_kvm(&sregs.gdt),
            idtr: state::dtable_from_kvm(&sregs.idt),
            cr0: sregs.cr0,
            cr2: sregs.cr2,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            cr8: self.apic_cr8.unwrap_or(sregs.cr8),
            efer: sregs.efer,
            msrs: Default::default(),
            dr: debug.db,
            dr6: debug.dr6,
            dr7: debug.dr7,
            fpu,
            pending: PendingEvents {
                interrupt_shadow: events.interrupt.shadow != 0,
                nmi_pending: events.nmi.pending != 0,
                nmi_blocked: events.nmi.masked != 0,
                halted: self.halted,
            },
            pending_debug: state::pending_debug_from_kvm(&events, debug.dr6),
            // KVM runs the guest with CR0.NE forced on (a VMX fixed bit; SVM raises #MF
            // the same way), so x87 errors are #MF and FERR# never asserts; the pins a state
            // from bt holds are ignored by set_state for that reason.
            x87_error_pins: Default::default(),
            xcr0: self.get_xcr0()?,
        };
        s.msrs.insert(msr::IA32_APIC_BASE, sregs.apic_base);
        let entries: Vec<kb::kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&index| kb::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = kb::Msrs::from_entries(&entries)
            .map_err(|e| host_err("KVM_GET_MSRS", format!("{e:?}")))?;
        let n = self
            .vcpu
            .get_msrs(&mut msrs)
            .map_err(|e| host_err("KVM_GET_MSRS", e))?;
        if n != entries.len() {
            return Err(host_err(
                "KVM_GET_MSRS",
                format!("MSR {:#x} could not be read", entries[n].index),
            ));
        }
        for e in msrs.as_slice() {
            s.msrs.insert(e.index, e.data);
        }
        match self.tsc_cache {
            Some(tsc) => {
                s.msrs.insert(msr::IA32_TSC, tsc);
            }
            None => self.tsc_cache = s.msrs.get(&msr::IA32_TSC).copied(),
        }
        Ok(s)
    }

    fn set_state(&mut self, s: &CpuState) -> Result<(), CpuError> {
        // A half-finished IN would otherwise overwrite RAX after the new state is in.
        self.complete_pending_io()?;
        let mut sregs = self
            .vcpu
            .get_sregs()
            .map_err(|e| host_err("KVM_GET_SREGS", e))?;
        sregs.es = state::segment_to_kvm(&s.seg[0]);
        sregs.cs = state::segment_to_kvm(&s.seg[1]);
        sregs.ss = state::segment_to_kvm(&s.seg[2]);
        sregs.ds = state::segment_to_kvm(&s.seg[3]);
        sregs.fs = state::segment_to_kvm(&s.seg[4]);
        sregs.gs = state::segment_to_kvm(&s.seg[5]);
        sregs.tr = state::segment_to_kvm(&s.tr);
        sregs.ldt = state::segment_to_kvm(&s.ldtr);
        sregs.gdt = state::dtable_to_kvm(&s.gdtr);
        sregs.idt = state::dtable_to_kvm(&s.idtr);
        sregs.cr0 = s.cr0;
        sregs.cr2 = s.cr2;
        sregs.cr3 = s.cr3;
        sregs.cr4 = s.cr4;
        sregs.cr8 = s.cr8;
        sregs.efer = s.efer;
        if let Some(&base) = s.msrs.get(&msr::IA32_APIC_BASE) {
            sregs.apic_base = base;
        }
        self.vcpu
            .set_sregs(&sregs)
            .map_err(|e| host_err("KVM_SET_SREGS", e))?;
        // Without an in-kernel local APIC, every KVM_RUN reloads CR8 from kvm_run.cr8 (the
        // TPR as userspace last saw it): keep it in step or the next entry undoes this.
        self.vcpu.get_kvm_run().cr8 = s.cr8;
        self.apic_cr8 = self.apic_cr8.map(|_| s.cr8);
        self.vcpu
            .set_regs(&state::gprs_to_kvm(&s.gpr, s.rip, s.rflags))
            .map_err(|e| host_err("KVM_SET_REGS", e))?;
        self.set_xcr0(s.xcr0)?;
        self.set_fpu(&s.fpu)?;
        let mut debug = self
            .vcpu
            .get_debug_regs()
            .map_err(|e| host_err("KVM_GET_DEBUGREGS", e))?;
        let mut events = self
            .vcpu
            .get_vcpu_events()
            .map_err(|e| host_err("KVM_GET_VCPU_EVENTS", e))?;
        debug.db = s.dr;
        debug.dr6 = s.dr6;
        debug.dr7 = s.dr7;
        if !state::pending_debug_to_kvm(&s.pending_debug, &mut events, &mut debug.dr6) {
            self.count("kvm.pending_debug_after_shadow_dropped");
        }
        self.vcpu
            .set_debug_regs(&debug)
            .map_err(|e| host_err("KVM_SET_DEBUGREGS", e))?;
        events.interrupt.shadow = if s.pending.interrupt_shadow {
            kb::KVM_X86_SHADOW_INT_STI as u8
        } else {
            0
        };
        events.nmi.pending = u8::from(s.pending.nmi_pending);
        events.nmi.masked = u8::from(s.pending.nmi_blocked);
        events.flags |= kb::KVM_VCPUEVENT_VALID_SHADOW | kb::KVM_VCPUEVENT_VALID_NMI_PENDING;
        self.vcpu
            .set_vcpu_events(&events)
            .map_err(|e| host_err("KVM_SET_VCPU_EVENTS", e))?;
        let mut entries = Vec::new();
        for (&index, &data) in &s.msrs {
            if index == msr::IA32_TSC && !self.tsc_settable {
                continue;
            }
            if self.msrs.contains(&index) {
                entries.push(kb::kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                });
            } else if index != msr::IA32_APIC_BASE && index != msr::IA32_EFER && data != 0 {
                return Err(CpuError::Unsupported {
                    engine: ENGINE,
                    rip: s.rip,
                    detail: format!(
                        "the state holds MSR {index:#x} = {data:#x}, which this host's KVM cannot restore"
                    ),
                });
            }
        }
        let msrs = kb::Msrs::from_entries(&entries)
            .map_err(|e| host_err("KVM_SET_MSRS", format!("{e:?}")))?;
        let n = self
            .vcpu
            .set_msrs(&msrs)
            .map_err(|e| host_err("KVM_SET_MSRS", e))?;
        if n != entries.len() {
            return Err(host_err(
                "KVM_SET_MSRS",
                format!(
                    "MSR {:#x} = {:#x} was refused",
                    entries[n].index, entries[n].data
                ),
            ));
        }
        self.tsc_cache = s.msrs.get(&msr::IA32_TSC).copied();
        self.halted = s.pending.halted;
        self.run_flags_stale = true;
        Ok(())
    }

    fn stats(&self) -> EngineStats {
        let mut s = self.stats.clone();
        for (name, value) in self.kvm_stats() {
            s.add(&format!("kvm.stat.{name}"), value);
        }
        s
    }

    fn collect_dirty_pages(&mut self, machine: &Machine) -> bool {
        if !self.dirty_logging {
            // Start logging now; what the guest wrote before is unknown to KVM.
            let slots = self.slots.clone();
            for (i, piece) in slots.into_iter().enumerate() {
                if !piece.readonly
                    && set_slot(&self._vm, &self._mem, i as u32, piece, true).is_err()
                {
                    return false;
                }
            }
            self.dirty_logging = true;
            return false;
        }
        for (i, piece) in self.slots.iter().enumerate() {
            if piece.readonly {
                continue;
            }
            let Ok(words) = self._vm.get_dirty_log(i as u32, piece.len as usize) else {
                return false;
            };
            for (w, mut word) in words.into_iter().enumerate() {
                while word != 0 {
                    let bit = word.trailing_zeros() as u64;
                    word &= word - 1;
                    machine.mark_dirty(piece.start + (w as u64 * 64 + bit) * 4096, 4096);
                }
            }
        }
        true
    }

    fn kicker(&self) -> Kicker {
        self.kicker.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_split_around_readonly_ranges() {
        let rw = |start, len| Slot {
            start,
            len,
            readonly: false,
        };
        let ro = |start, len| Slot {
            start,
            len,
            readonly: true,
        };
        assert_eq!(split_slots(0, 0x1000, &[]), vec![rw(0, 0x1000)]);
        assert_eq!(
            split_slots(0xc0000, 0x40000, &[(0xf0000, 0x10000)]),
            vec![rw(0xc0000, 0x30000), ro(0xf0000, 0x10000)]
        );
        assert_eq!(
            split_slots(0, 0x10000, &[(0x8000, 0x1000), (0x1000, 0x1000)]),
            vec![
                rw(0, 0x1000),
                ro(0x1000, 0x1000),
                rw(0x2000, 0x6000),
                ro(0x8000, 0x1000),
                rw(0x9000, 0x7000)
            ]
        );
        // Ranges reaching outside, and overlapping each other.
        assert_eq!(
            split_slots(0x1000, 0x3000, &[(0, 0x2000), (0x1800, 0x1000)]),
            vec![ro(0x1000, 0x1800), rw(0x2800, 0x1800)]
        );
        assert_eq!(
            split_slots(0x1000, 0x1000, &[(0x3000, 0x1000)]),
            vec![rw(0x1000, 0x1000)]
        );
    }
}
