//! What kind of KVM this host offers, and what that means for deja: the data behind
//! `deja info`.
//!
//! Everything reported here is either *detected* (read from `/dev/kvm`, `/sys/module`,
//! `/proc/cpuinfo` or a system call made just now) or *inferred* (known behaviour of the
//! detected flavour that deja did not probe). The two are kept apart so that a user never
//! mistakes a documented limitation for a measurement.

use kvm_bindings as kb;
use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The kind of hardware-assisted (or paravirtual) virtualization behind `/dev/kvm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Flavour {
    /// Intel VT-x with extended page tables.
    VmxEpt {
        /// Real mode and unpaged protected mode run natively (`unrestricted_guest`).
        unrestricted_guest: bool,
    },
    /// Intel VT-x with shadow paging only.
    VmxShadow,
    /// AMD-V with nested page tables.
    SvmNpt,
    /// AMD-V with shadow paging only.
    SvmShadow,
    /// PVM: KVM on a host that is itself a guest without hardware virtualization; guest
    /// ring 3 runs natively, guest ring 0 is emulated, paging is shadowed.
    Pvm,
    /// `/dev/kvm` answers but no known vendor module is loaded.
    Unknown,
    /// No usable `/dev/kvm`.
    Unavailable,
}

impl Flavour {
    /// A short human-readable name.
    pub fn describe(&self) -> &'static str {
        match self {
            Flavour::VmxEpt {
                unrestricted_guest: true,
            } => "Intel VT-x with EPT and unrestricted guest",
            Flavour::VmxEpt {
                unrestricted_guest: false,
            } => "Intel VT-x with EPT, without unrestricted guest",
            Flavour::VmxShadow => "Intel VT-x without EPT (shadow paging)",
            Flavour::SvmNpt => "AMD-V with NPT",
            Flavour::SvmShadow => "AMD-V without NPT (shadow paging)",
            Flavour::Pvm => "PVM (paravirtual KVM inside a guest; shadow paging, no VT-x/AMD-V)",
            Flavour::Unknown => "unknown KVM implementation",
            Flavour::Unavailable => "KVM unavailable",
        }
    }

    /// Whether the host needs `KVM_SET_TSS_ADDR` (and, without EPT's unrestricted guest, an
    /// identity-map page) to run real-mode code: Intel VT-x only.
    pub fn needs_tss_addr(&self) -> bool {
        matches!(self, Flavour::VmxEpt { .. } | Flavour::VmxShadow)
    }
}

/// One fact and how deja knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fact {
    /// The statement.
    pub text: String,
    /// `detected` (observed on this host now) or `inferred` (known behaviour, not probed).
    pub basis: Basis,
}

/// How a [`Fact`] was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Basis {
    /// Observed on this host.
    Detected,
    /// Known behaviour of the flavour; not probed.
    Inferred,
}

/// One `KVM_CHECK_EXTENSION` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    /// The capability's name without the `KVM_CAP_` prefix, lower case.
    pub name: String,
    /// The kernel's answer (0 = absent; some capabilities answer a number).
    pub value: i32,
    /// Why deja cares.
    pub used_for: String,
}

/// Whether a performance counter could be opened on this process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerfProbe {
    /// The event tried.
    pub event: String,
    /// Whether `perf_event_open` succeeded.
    pub available: bool,
    /// The error when it did not.
    pub error: Option<String>,
}

/// Everything `deja info` says about the host's KVM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// Why KVM cannot be used, when it cannot.
    pub unavailable_reason: Option<String>,
    /// `KVM_GET_API_VERSION` (12 on every kernel since 2.6.22).
    pub api_version: Option<i32>,
    /// The flavour deja concluded.
    pub flavour: Flavour,
    /// What the flavour was concluded from.
    pub flavour_evidence: Vec<String>,
    /// The host CPU's model name from `/proc/cpuinfo`.
    pub cpu_model: Option<String>,
    /// The KVM modules loaded (`/sys/module/kvm*`).
    pub modules: Vec<String>,
    /// Capabilities deja relies on or reports.
    pub capabilities: Vec<Capability>,
    /// `KVM_CAP_NR_MEMSLOTS`.
    pub memslots: Option<i32>,
    /// `KVM_CAP_MAX_VCPUS`.
    pub max_vcpus: Option<i32>,
    /// Hardware and software performance counters on this process.
    pub perf: Vec<PerfProbe>,
    /// Limits of the flavour that matter for deja's guests.
    pub limits: Vec<Fact>,
    /// What tiny probe guests showed (empty unless [`HostInfo::detect_and_probe`] ran).
    #[serde(default)]
    pub probes: Vec<Fact>,
}

/// The capabilities `deja info` lists, with why each matters.
const CAPABILITIES: &[(&str, u32, &str)] = &[
    (
        "user_memory",
        kb::KVM_CAP_USER_MEMORY,
        "guest RAM is deja's own mmap",
    ),
    (
        "readonly_mem",
        kb::KVM_CAP_READONLY_MEM,
        "firmware ROM slots (writes exit to deja)",
    ),
    (
        "immediate_exit",
        kb::KVM_CAP_IMMEDIATE_EXIT,
        "race-free kicks (--timeout, Ctrl-C) and completing I/O before reading state",
    ),
    (
        "set_tss_addr",
        kb::KVM_CAP_SET_TSS_ADDR,
        "real mode on Intel VT-x",
    ),
    (
        "set_identity_map_addr",
        kb::KVM_CAP_SET_IDENTITY_MAP_ADDR,
        "real mode on Intel VT-x without unrestricted guest",
    ),
    (
        "vcpu_events",
        kb::KVM_CAP_VCPU_EVENTS,
        "interrupt shadow and NMI state in snapshots",
    ),
    (
        "intr_shadow",
        kb::KVM_CAP_INTR_SHADOW,
        "interrupt shadow in snapshots",
    ),
    ("debugregs", kb::KVM_CAP_DEBUGREGS, "DR0-DR7 in snapshots"),
    ("xsave", kb::KVM_CAP_XSAVE, "extended FPU state"),
    ("xcrs", kb::KVM_CAP_XCRS, "XCR0 in snapshots"),
    (
        "ext_cpuid",
        kb::KVM_CAP_EXT_CPUID,
        "KVM_SET_CPUID2 (deja's CPUID table)",
    ),
    ("hlt", kb::KVM_CAP_HLT, "HLT exits to userspace"),
    ("mp_state", kb::KVM_CAP_MP_STATE, "halted state of a vCPU"),
    (
        "sync_mmu",
        kb::KVM_CAP_SYNC_MMU,
        "guest memory may be changed by deja between runs",
    ),
    (
        "irqchip",
        kb::KVM_CAP_IRQCHIP,
        "in-kernel interrupt controllers (deja does not use them)",
    ),
    (
        "pit2",
        kb::KVM_CAP_PIT2,
        "in-kernel PIT (deja does not use it)",
    ),
    (
        "set_guest_debug",
        kb::KVM_CAP_SET_GUEST_DEBUG,
        "single-step and hardware breakpoints (precise positions)",
    ),
    (
        "internal_error_data",
        kb::KVM_CAP_INTERNAL_ERROR_DATA,
        "details of emulation failures",
    ),
    (
        "exit_on_emulation_failure",
        kb::KVM_CAP_EXIT_ON_EMULATION_FAILURE,
        "instruction bytes of emulation failures",
    ),
    (
        "get_tsc_khz",
        kb::KVM_CAP_GET_TSC_KHZ,
        "guest TSC frequency",
    ),
    (
        "tsc_control",
        kb::KVM_CAP_TSC_CONTROL,
        "setting the guest TSC frequency",
    ),
    (
        "x86_disable_exits",
        kb::KVM_CAP_X86_DISABLE_EXITS,
        "letting HLT/PAUSE run without exits (deja keeps them)",
    ),
    (
        "binary_stats_fd",
        kb::KVM_CAP_BINARY_STATS_FD,
        "KVM's own exit statistics",
    ),
    (
        "x86_user_space_msr",
        kb::KVM_CAP_X86_USER_SPACE_MSR,
        "MSR accesses forwarded to userspace",
    ),
    (
        "nr_memslots",
        kb::KVM_CAP_NR_MEMSLOTS,
        "memory slots per VM",
    ),
    ("max_vcpus", kb::KVM_CAP_MAX_VCPUS, "vCPUs per VM"),
];

fn read_trimmed(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// A module parameter as a boolean (`Y`/`N`/`1`/`0`), if the module and parameter exist.
fn module_flag(module: &str, param: &str) -> Option<bool> {
    let v = read_trimmed(format!("/sys/module/{module}/parameters/{param}"))?;
    Some(matches!(v.as_str(), "Y" | "y" | "1"))
}

fn cpuinfo_field(cpuinfo: &str, field: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == field).then(|| v.trim().to_string())
    })
}

/// Decides the flavour from the loaded modules, their parameters and the CPU flags.
fn detect_flavour(modules: &[String], cpu_flags: &[&str], evidence: &mut Vec<String>) -> Flavour {
    let has_module = |m: &str| modules.iter().any(|x| x == m);
    let flag = |f: &str| cpu_flags.contains(&f);
    evidence.push(format!(
        "/proc/cpuinfo flags: vmx {}, svm {}, hypervisor {}",
        if flag("vmx") { "present" } else { "absent" },
        if flag("svm") { "present" } else { "absent" },
        if flag("hypervisor") {
            "present"
        } else {
            "absent"
        },
    ));
    if has_module("kvm_pvm") {
        evidence.push("module kvm_pvm is loaded (/sys/module/kvm_pvm)".into());
        if let Some(native) = read_trimmed("/sys/module/kvm_pvm/parameters/pvm_native") {
            evidence.push(format!("kvm_pvm.pvm_native = {native}"));
        }
        if let Some(tdp) = read_trimmed("/sys/module/kvm/parameters/tdp_mmu") {
            evidence.push(format!("kvm.tdp_mmu = {tdp}"));
        }
        return Flavour::Pvm;
    }
    if has_module("kvm_intel") {
        evidence.push("module kvm_intel is loaded".into());
        let ept = module_flag("kvm_intel", "ept").unwrap_or(false);
        let ug = module_flag("kvm_intel", "unrestricted_guest").unwrap_or(false);
        evidence.push(format!("kvm_intel.ept = {ept}, unrestricted_guest = {ug}"));
        return if ept {
            Flavour::VmxEpt {
                unrestricted_guest: ug,
            }
        } else {
            Flavour::VmxShadow
        };
    }
    if has_module("kvm_amd") {
        evidence.push("module kvm_amd is loaded".into());
        let npt = module_flag("kvm_amd", "npt").unwrap_or(false);
        evidence.push(format!("kvm_amd.npt = {npt}"));
        return if npt {
            Flavour::SvmNpt
        } else {
            Flavour::SvmShadow
        };
    }
    evidence.push("no kvm_intel, kvm_amd or kvm_pvm module found".into());
    Flavour::Unknown
}

/// The limits of a flavour deja knows about, marked by how it knows them.
fn flavour_limits(flavour: Flavour, perf: &[PerfProbe]) -> Vec<Fact> {
    let inferred = |t: &str| Fact {
        text: t.to_string(),
        basis: Basis::Inferred,
    };
    let mut out = Vec::new();
    if let Some(hw) = perf.iter().find(|p| p.event == "cpu-cycles") {
        out.push(Fact {
            text: if hw.available {
                "hardware performance counters work on this process".into()
            } else {
                format!(
                    "hardware performance counters are unavailable ({}): kvm cannot count \
                     guest instructions, interrupts are delivered at device exits",
                    hw.error.as_deref().unwrap_or("unknown error")
                )
            },
            basis: Basis::Detected,
        });
    }
    match flavour {
        Flavour::Pvm => {
            out.push(inferred(
                "guest ring-0 code is emulated by the host, about 1 µs per instruction",
            ));
            out.push(inferred(
                "32-bit paging (non-PAE and PAE) does not run: the guest shuts down at once",
            ));
            out.push(inferred(
                "real mode, 32-bit protected mode without paging and 64-bit long mode run",
            ));
            out.push(inferred(
                "guest ring-3 CPUID and RDTSC are not intercepted: they return host values, \
                 not deja's CPUID table",
            ));
            out.push(inferred(
                "the host's instruction emulator has gaps (e.g. INVPCID, LOCK CMPXCHG16B): \
                 such guests stop with an emulation failure",
            ));
            out.push(inferred(
                "guest single-step and hardware breakpoints do not work for guest ring-3 code",
            ));
            out.push(inferred(
                "interrupt-window exits come only between batches of emulated ring-0 \
                 instructions (hundreds of instructions after STI in deja's tests): \
                 interrupts waiting for IF=1 arrive late; exit-synchronous delivery is exact",
            ));
            out.push(inferred(
                "real-mode exceptions and interrupts are vectored through the IVT without a \
                 limit check (KVM's emulator), so an empty IVT loops instead of shutting down",
            ));
        }
        Flavour::VmxShadow | Flavour::SvmShadow => {
            out.push(inferred(
                "guest paging is shadowed by KVM: page-table writes and CR3 loads exit",
            ));
        }
        Flavour::VmxEpt {
            unrestricted_guest: false,
        } => {
            out.push(inferred(
                "real mode and unpaged protected mode are emulated (no unrestricted guest)",
            ));
        }
        _ => {}
    }
    out
}

/// Inferred limits (by a phrase in their text) that the probe guests measure directly.
const PROBED_TOPICS: &[&str] = &[
    "about 1 µs per instruction",
    "32-bit paging",
    "real mode, 32-bit protected mode",
    "ring-3 CPUID and RDTSC",
];

/// Minimal `perf_event_attr` (the version-0 layout, 64 bytes), enough to open one counter.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttrV0 {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

const PERF_TYPE_HARDWARE: u32 = 0;
const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_COUNT_HW_CPU_CYCLES: u64 = 0;
const PERF_COUNT_HW_INSTRUCTIONS: u64 = 1;
const PERF_COUNT_SW_TASK_CLOCK: u64 = 1;
/// `disabled`, `exclude_kernel` and `exclude_hv`: a user-only counter needs the least
/// privilege.
const PERF_FLAGS_USER_ONLY_DISABLED: u64 = 1 | (1 << 5) | (1 << 6);

/// Tries to open one counter on this process and closes it again.
fn probe_perf(name: &str, type_: u32, config: u64) -> PerfProbe {
    let attr = PerfEventAttrV0 {
        type_,
        size: std::mem::size_of::<PerfEventAttrV0>() as u32,
        config,
        flags: PERF_FLAGS_USER_ONLY_DISABLED,
        ..PerfEventAttrV0::default()
    };
    // SAFETY: perf_event_open reads `attr.size` bytes from a valid, initialised struct of
    // exactly that size; pid 0 / cpu -1 / group -1 / flags 0 are valid arguments.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const PerfEventAttrV0,
            0 as libc::pid_t,
            -1 as libc::c_int,
            -1 as libc::c_int,
            0 as libc::c_ulong,
        )
    };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        return PerfProbe {
            event: name.to_string(),
            available: false,
            error: Some(err.to_string()),
        };
    }
    // SAFETY: `fd` is a descriptor we just opened and own.
    unsafe { libc::close(fd as libc::c_int) };
    PerfProbe {
        event: name.to_string(),
        available: true,
        error: None,
    }
}

/// Probes perf counters: two hardware events and one software event for contrast.
pub fn probe_perf_counters() -> Vec<PerfProbe> {
    vec![
        probe_perf("cpu-cycles", PERF_TYPE_HARDWARE, PERF_COUNT_HW_CPU_CYCLES),
        probe_perf(
            "instructions",
            PERF_TYPE_HARDWARE,
            PERF_COUNT_HW_INSTRUCTIONS,
        ),
        probe_perf("task-clock", PERF_TYPE_SOFTWARE, PERF_COUNT_SW_TASK_CLOCK),
    ]
}

fn kvm_modules() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir("/sys/module")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n == "kvm" || n.starts_with("kvm_"))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

impl HostInfo {
    /// Only the flavour (modules and CPU flags; no device or perf probing): what the engine
    /// needs to set a VM up.
    pub fn detect_flavour_only() -> Flavour {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags_line = cpuinfo_field(&cpuinfo, "flags").unwrap_or_default();
        let cpu_flags: Vec<&str> = flags_line.split_whitespace().collect();
        detect_flavour(&kvm_modules(), &cpu_flags, &mut Vec::new())
    }

    /// Detects everything, opening `/dev/kvm` once. Never fails: what cannot be detected is
    /// reported as such.
    pub fn detect() -> HostInfo {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags_line = cpuinfo_field(&cpuinfo, "flags").unwrap_or_default();
        let cpu_flags: Vec<&str> = flags_line.split_whitespace().collect();
        let modules = kvm_modules();
        let perf = probe_perf_counters();
        let mut evidence = Vec::new();
        let kvm = Kvm::new();
        let (flavour, unavailable_reason) = match &kvm {
            Ok(_) => (detect_flavour(&modules, &cpu_flags, &mut evidence), None),
            Err(e) => (
                Flavour::Unavailable,
                Some(format!("cannot open /dev/kvm: {e}")),
            ),
        };
        let mut capabilities = Vec::new();
        let (mut memslots, mut max_vcpus, mut api_version) = (None, None, None);
        if let Ok(kvm) = &kvm {
            api_version = Some(kvm.get_api_version());
            for &(name, cap, used_for) in CAPABILITIES {
                let value = kvm.check_extension_raw(libc::c_ulong::from(cap));
                match name {
                    "nr_memslots" => memslots = Some(value),
                    "max_vcpus" => max_vcpus = Some(value),
                    _ => {}
                }
                capabilities.push(Capability {
                    name: name.to_string(),
                    value,
                    used_for: used_for.to_string(),
                });
            }
        }
        let limits = flavour_limits(flavour, &perf);
        HostInfo {
            probes: Vec::new(),
            unavailable_reason,
            api_version,
            flavour,
            flavour_evidence: evidence,
            cpu_model: cpuinfo_field(&cpuinfo, "model name"),
            modules,
            capabilities,
            memslots,
            max_vcpus,
            perf,
            limits,
        }
    }

    /// [`HostInfo::detect`] plus the probe guests of [`crate::probe`] (about 0.1 s): the
    /// inferred limits that a probe measured are replaced by what it measured.
    pub fn detect_and_probe() -> HostInfo {
        let mut info = Self::detect();
        if info.unavailable_reason.is_some() {
            return info;
        }
        info.probes = crate::probe::probe_guests(&deja_machine::CpuidTable::deja_default());
        info.limits.retain(|l| {
            !(l.basis == Basis::Inferred && PROBED_TOPICS.iter().any(|t| l.text.contains(t)))
        });
        info
    }

    /// The answer of one capability by name (`readonly_mem`, ...), 0 when unknown.
    pub fn capability(&self, name: &str) -> i32 {
        self.capabilities
            .iter()
            .find(|c| c.name == name)
            .map_or(0, |c| c.value)
    }

    /// A multi-line human-readable report.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "kvm flavour: {}", self.flavour.describe());
        if let Some(r) = &self.unavailable_reason {
            let _ = writeln!(s, "  {r}");
        }
        if let Some(v) = self.api_version {
            let _ = writeln!(s, "  KVM API version: {v}");
        }
        if let Some(m) = &self.cpu_model {
            let _ = writeln!(s, "  host CPU: {m}");
        }
        if !self.modules.is_empty() {
            let _ = writeln!(s, "  modules: {}", self.modules.join(", "));
        }
        for e in &self.flavour_evidence {
            let _ = writeln!(s, "  evidence: {e}");
        }
        if !self.capabilities.is_empty() {
            let _ = writeln!(s, "capabilities (KVM_CHECK_EXTENSION):");
            for c in &self.capabilities {
                let _ = writeln!(s, "  {:<26} {:>6}  {}", c.name, c.value, c.used_for);
            }
        }
        let _ = writeln!(s, "perf counters (perf_event_open on this process):");
        for p in &self.perf {
            match &p.error {
                None => {
                    let _ = writeln!(s, "  {:<14} available", p.event);
                }
                Some(e) => {
                    let _ = writeln!(s, "  {:<14} unavailable: {e}", p.event);
                }
            }
        }
        if !self.limits.is_empty() || !self.probes.is_empty() {
            let _ = writeln!(s, "limits:");
            for l in self.probes.iter().chain(&self.limits) {
                let tag = match l.basis {
                    Basis::Detected => "detected",
                    Basis::Inferred => "inferred",
                };
                let _ = writeln!(s, "  [{tag}] {}", l.text);
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavour_follows_the_vendor_module_and_its_parameters() {
        let mut ev = Vec::new();
        let f = detect_flavour(&["kvm".into(), "kvm_pvm".into()], &["lm"], &mut ev);
        assert_eq!(f, Flavour::Pvm);
        assert!(ev.iter().any(|e| e.contains("vmx absent")));
        let mut ev = Vec::new();
        assert_eq!(
            detect_flavour(&["kvm".into()], &[], &mut ev),
            Flavour::Unknown
        );
        assert!(Flavour::VmxShadow.needs_tss_addr());
        assert!(!Flavour::Pvm.needs_tss_addr());
        assert!(!Flavour::SvmNpt.needs_tss_addr());
    }

    #[test]
    fn pvm_limits_are_marked_inferred_and_perf_is_detected() {
        let perf = vec![PerfProbe {
            event: "cpu-cycles".into(),
            available: false,
            error: Some("No such file or directory (os error 2)".into()),
        }];
        let limits = flavour_limits(Flavour::Pvm, &perf);
        assert_eq!(limits[0].basis, Basis::Detected);
        assert!(limits[0].text.contains("os error 2"));
        assert!(
            limits[1..]
                .iter()
                .all(|l| l.basis == Basis::Inferred && !l.text.is_empty())
        );
        assert!(limits.iter().any(|l| l.text.contains("32-bit paging")));
    }

    #[test]
    fn probes_replace_the_inferred_limits_they_measure() {
        let info = HostInfo::detect_and_probe();
        if let Some(why) = &info.unavailable_reason {
            assert!(info.probes.is_empty());
            deja_testkit::skip_without_kvm("probes_replace_the_inferred_limits_they_measure", why);
            return;
        }
        println!("{}", info.render());
        assert_eq!(info.probes.len(), 10, "{:#?}", info.probes);
        assert!(info.probes.iter().all(|p| p.basis == Basis::Detected));
        // Long mode and real mode run on every KVM flavour deja knows.
        assert!(
            info.probes[0].text.contains("ring-0 code runs at"),
            "{:?}",
            info.probes[0]
        );
        assert!(
            info.probes[1].text.contains("ring-3 code runs at"),
            "{:?}",
            info.probes[1]
        );
        assert_eq!(info.probes[2].text, "real-mode code runs");
        assert!(
            info.limits
                .iter()
                .all(|l| !PROBED_TOPICS.iter().any(|t| l.text.contains(t)))
        );
    }

    #[test]
    fn detection_never_fails_and_serializes() {
        let info = HostInfo::detect();
        let json = serde_json::to_string(&info).unwrap();
        let back: HostInfo = serde_json::from_str(&json).unwrap();
        assert_eq!(back, info);
        // The software clock counter works on any Linux that has perf events at all, so a
        // failure of it while cycles fail would point at a broken probe.
        let task = info.perf.iter().find(|p| p.event == "task-clock").unwrap();
        let cycles = info.perf.iter().find(|p| p.event == "cpu-cycles").unwrap();
        assert!(task.available || !cycles.available);
        println!("{}", info.render());
        if info.unavailable_reason.is_none() {
            assert_eq!(info.api_version, Some(12));
            assert!(info.capability("user_memory") > 0);
            assert!(info.memslots.unwrap_or(0) > 0);
        }
    }
}
