//! The guest corpus: small x86 guests assembled in Rust with iced-x86's `code_asm`.
//!
//! Every guest is a raw image entered in real mode at [`LOAD_ADDR`]; it boots itself to long
//! mode (own GDT and page tables), talks through COM1 (0x3f8, polling LSR.THRE before each
//! byte) and reports through isa-debug-exit (port 0xf4): 0 when its checks pass,
//! [`EXIT_CHECK_FAILED`] when one fails, [`EXIT_UNEXPECTED_VECTOR`] on an exception or
//! interrupt it did not expect (after printing the vector, error code and RIP), and
//! [`EXIT_INCONCLUSIVE`] when the host kept it from deciding (the guest says why).
//!
//! Guests are deliberately short (a few thousand instructions): on hosts where KVM emulates
//! ring-0 code (PVM) every guest instruction costs about a microsecond.

pub mod bench;
mod bench_paging;
pub mod echo;
pub mod hello;
mod link;
pub mod paging_access;
pub mod platform;
pub mod racy_kernel;
mod rt;
pub mod string_io;
pub mod system;
pub mod testdev;
pub mod timer;
pub mod x86_64_v2;

pub use link::LinkError;
pub use rt::{EXIT_CHECK_FAILED, EXIT_INCONCLUSIVE, EXIT_PASS, EXIT_UNEXPECTED_VECTOR, LOAD_ADDR};

use deja_machine::loader::Image;
use thiserror::Error;

/// Failures building a guest image.
#[derive(Debug, Error)]
pub enum GuestError {
    /// The guest's code could not be assembled or linked (a bug in the guest's source).
    #[error("building guest {guest:?}: {source}")]
    Link {
        /// The guest.
        guest: &'static str,
        /// What went wrong.
        source: LinkError,
    },
}

/// A built-in guest: a name to ask for it by and a recipe for its image.
pub struct Guest {
    /// The name `deja run guest:NAME` uses.
    pub name: &'static str,
    /// One line on what it exercises and what success looks like.
    pub description: &'static str,
    build: fn() -> Result<Image, LinkError>,
}

impl Guest {
    /// Assembles the guest's image.
    pub fn image(&self) -> Result<Image, GuestError> {
        (self.build)().map_err(|source| GuestError::Link {
            guest: self.name,
            source,
        })
    }
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest").field("name", &self.name).finish()
    }
}

static GUESTS: [Guest; 39] = [
    Guest {
        name: "hello",
        description: "real -> protected -> long mode with its own GDT and page tables; \
                      greets on COM1 and exits 0",
        build: hello::build,
    },
    Guest {
        name: "echo",
        description: "echoes COM1 input until EOT (0x04) using IRQ 4 through the 8259A and \
                      HLT while idle; exits 0",
        build: echo::build,
    },
    Guest {
        name: "timer",
        description: "counts PIT channel 0 interrupts in a HLT loop and checks them against \
                      channel 2 time; prints both, exits 0 if they agree within 10%",
        build: timer::build,
    },
    Guest {
        name: "apic",
        description: "local APIC as an OS drives it: xAPIC one-shot and periodic timer, \
                      IA32_APIC_BASE relocation, CR8 holding back a self-IPI, NMI self-IPI, \
                      PIT through I/O APIC pin 2 (fixed, then NMI waking CLI; HLT), then \
                      x2APIC MSRs (timer, SELF IPI, NMI); exits 0",
        build: platform::build_apic,
    },
    Guest {
        name: "apic-tsc-deadline",
        description: "local APIC timer in TSC-deadline mode (CPUID bit, xAPIC and x2APIC \
                      LVT, deadline from RDTSC, fires no earlier, disarms); exits 0",
        build: platform::build_tsc_deadline,
    },
    Guest {
        name: "platform",
        description: "fw_cfg (signature, ID, CPUs, RAM size, command line, file directory, \
                      DMA read of etc/e820), ACPI RSDP scan and table checksums (FADT PM \
                      timer, MADT), PM timer monotonic and at 3.579545 MHz against the PIT, \
                      PCI bus 0 scan (i440FX, PIIX3); exits 0",
        build: platform::build_platform,
    },
    Guest {
        name: "reset",
        description: "reboots itself through 0xcf9, port 0x92, the i8042 and a triple \
                      fault, counting boots in CMOS NVRAM; exits 0 on the fifth boot \
                      (needs reboot on reset, the default of deja run)",
        build: platform::build_reset,
    },
    Guest {
        name: "racy-kernel",
        description: "two tasks and a timer-driven scheduler racing on a non-atomic counter \
                      increment; panics on COM1 and exits 3 on a lost update, exits 0 after \
                      400 clean ticks (bt; use chaos recording to make it fail)",
        build: racy_kernel::build,
    },
    Guest {
        name: "string-io",
        description: "REP INS/OUTS of bytes, words and dwords (PIT, PM timer, COM1, POST, \
                      unmapped ports; 1 to 3000 elements across page boundaries, DF=1, a32) \
                      under 4 kHz PIT interrupts; exits 0 (record on kvm, replay on bt)",
        build: string_io::build,
    },
    Guest {
        name: "bench-in",
        description: "benchmark: 1000 x IN from an unclaimed port between bench marks (0xe8); exits 0",
        build: bench::build_in,
    },
    Guest {
        name: "bench-out",
        description: "benchmark: 1000 x OUT to an unclaimed port between bench marks; exits 0",
        build: bench::build_out,
    },
    Guest {
        name: "bench-cpuid",
        description: "benchmark: 1000 x CPUID leaf 0 between bench marks; exits 0",
        build: bench::build_cpuid,
    },
    Guest {
        name: "bench-call-ret",
        description: "benchmark: 1000 x CALL to a bare RET between bench marks; exits 0",
        build: bench::build_call_ret,
    },
    Guest {
        name: "bench-divzero",
        description: "benchmark: 1000 x DIV by zero, #DE handler skips it, between bench marks; exits 0",
        build: bench::build_divzero,
    },
    Guest {
        name: "bench-integer",
        description: "benchmark: 1000 x an IMUL/ADD/ROR/XOR chain between bench marks; exits 0",
        build: bench::build_integer,
    },
    Guest {
        name: "bench-memory",
        description: "benchmark: 1000 x a cache-line-strided load over 64 KiB between bench marks; exits 0",
        build: bench::build_memory,
    },
    Guest {
        name: "bench-call",
        description: "benchmark: 1000 x three nested calls with arithmetic between bench marks; exits 0",
        build: bench::build_call,
    },
    Guest {
        name: "bench-ptemod",
        description: "benchmark: 1000 x rewrite a live PTE, INVLPG, load through it, between bench marks; exits 0",
        build: bench::build_ptemod,
    },
    Guest {
        name: "bench-pgfault",
        description: "benchmark: 1000 x a load from an unmapped page: #PF, the handler maps it, the load \
                      runs again; unmap + INVLPG; between bench marks; exits 0",
        build: bench::build_pgfault,
    },
    Guest {
        name: "bench-syscall",
        description: "benchmark: 1000 x SYSCALL from ring 3 / SYSRETQ between bench marks; exits 0",
        build: bench::build_syscall,
    },
    Guest {
        name: "bench-cr8wr",
        description: "benchmark: 1000 x MOV CR8, RAX between bench marks; exits 0",
        build: bench::build_cr8wr,
    },
    Guest {
        name: "bench-smc",
        description: "benchmark: 1000 x a store into the next instruction, then running it, between bench marks; exits 0",
        build: bench::build_smc,
    },
    Guest {
        name: "bench-hlt-wake",
        description: "benchmark: 1000 x LAPIC one-shot timer (2 µs), STI; HLT woken by it, EOI, between bench marks; exits 0",
        build: bench::build_hlt_wake,
    },
    Guest {
        name: "bench-forkwait",
        description: "benchmark: 1000 x fork (copy tables, copy-on-write) + child CR3 + COW fault + \
                      wait (free) + the parent's reuse fault, between bench marks; exits 0",
        build: bench::build_forkwait,
    },
    Guest {
        name: "bench-cr3switch",
        description: "benchmark: 1000 x MOV CR3 round-robin over 4 address spaces + a load and an \
                      increment of a private page, between bench marks; checks both; exits 0",
        build: bench::build_cr3switch,
    },
    Guest {
        name: "bench-tlbmiss",
        description: "benchmark: 8192 x a load from the next of 4096 distinct pages, between bench \
                      marks; exits 0",
        build: bench::build_tlbmiss,
    },
    Guest {
        name: "paging-access-32",
        description: "32-bit paging (4 KiB and 4 MiB pages): every PDE x PTE bit combination x \
                      read/write/fetch x ring 0/3 x CR0.WP, EFER.NXE, CR4.SMEP against an in-guest \
                      model of faults, error codes, CR2 and A/D bits; exits 0, or 1 naming the case",
        build: paging_access::build_32,
    },
    Guest {
        name: "paging-access-pae",
        description: "paging-access in PAE paging (2 MiB pages, NX, reserved bit 51); exits 0 or 1",
        build: paging_access::build_pae,
    },
    Guest {
        name: "paging-access-4level",
        description: "paging-access in 4-level paging (PML4E and PDPTE varied too); exits 0 or 1",
        build: paging_access::build_4level,
    },
    Guest {
        name: "paging-access-4level-quick",
        description: "paging-access-4level with two CPU states and no D/G variation, for hosts \
                      that emulate ring-0 code (PVM); exits 0 or 1",
        build: paging_access::build_4level_quick,
    },
    Guest {
        name: "smc",
        description: "code coherence: a store into the very next instruction, a live loop's \
                      JMP and JNE rewritten to fall through while running, code loaded over \
                      a running physical page through an alias mapping, a remapped code \
                      page; exits 0",
        build: system::build_smc,
    },
    Guest {
        name: "exceptions",
        description: "each exception with its error code: #DE #UD #NM #NP #SS #GP #PF (and \
                      CR2) #DF in ring 0, #BP #PF #GP #DB (ICEBP) #AC in ring 3, #OF #BR in \
                      compatibility mode; exits 0",
        build: system::build_exceptions,
    },
    Guest {
        name: "iopl",
        description: "CLI, STI and POPF in ring 3 under IOPL 0..3: #GP(0) or IF changed, \
                      POPF never faults and leaves IF (and IOPL) alone when not allowed; \
                      exits 0",
        build: system::build_iopl,
    },
    Guest {
        name: "modes",
        description: "long -> compatibility -> 32-bit protected -> 16-bit protected -> real \
                      mode (an IVT interrupt) -> 32-bit protected -> virtual-8086 mode (in by \
                      IRETD, out by INT) -> a task switch through a task gate and back by \
                      IRET, #TS -> long mode; exits 0",
        build: system::build_modes,
    },
    Guest {
        name: "debug",
        description: "ring-0 debugging: TF single-step (POPF edges, the MOV SS shadow), a DR0 \
                      instruction breakpoint with RF, a DR1 write breakpoint, ICEBP, DR7.GD, \
                      each #DB's RIP and DR6; exits 0",
        build: system::build_debug,
    },
    Guest {
        name: "pc-testdev",
        description: "QEMU's pc-testdev (needs --device pc-testdev): scratch register at \
                      0xe0/0xe8, flush port, the 64 KiB window at 0xff000000 at every width \
                      and with a read-modify-write, IRQ 5 raised and lowered through port \
                      0x2005; exits 0 (without the device: says so, checks nothing)",
        build: testdev::build,
    },
    Guest {
        name: "umip",
        description: "UMIP: SGDT, SIDT, SLDT, SMSW and STR in ring 0 and ring 3 with \
                      CR4.UMIP clear and set (#GP(0) only in ring 3 with it set); exits 0",
        build: system::build_umip,
    },
    Guest {
        name: "xsave",
        description: "XSAVE for x87 and SSE: CPUID (XSAVE, OSXSAVE, leaf 0xd), CR4.OSXSAVE, \
                      XGETBV/XSETBV and their #UD/#GP(0) rules in ring 0 and ring 3, XSAVE and \
                      XRSTOR of XMM0 (XSTATE_BV, init), #GP(0) for misalignment; exits 0",
        build: system::build_xsave,
    },
    Guest {
        name: "x86-64-v2",
        description: "the x86-64-v2 level: CPUID bits, then SSE3 (HADDPS, ADDSUBPS, LDDQU, \
                      MOVDDUP), SSSE3 (PSHUFB, PALIGNR, PABSD), SSE4.1 (PMULLD, PTEST, \
                      ROUNDSD, PINSRQ/PEXTRQ, BLENDVPS), SSE4.2 (PCMPGTQ, PCMPISTRI, CRC32), \
                      POPCNT, CMPXCHG16B, LAHF/SAHF in 64-bit mode; then CLFLUSHOPT and \
                      CLWB; exits 0",
        build: x86_64_v2::build,
    },
];

/// Every built-in guest, in a stable order.
pub fn all() -> &'static [Guest] {
    &GUESTS
}

/// The image of built-in guest `name`, or why there is none: what
/// [`deja_machine::loader::ImageRequest::resolve`] takes for `guest:NAME`.
pub fn image_of(name: &str) -> Result<Image, String> {
    match find(name) {
        Some(g) => g.image().map_err(|e| format!("assembling it failed: {e}")),
        None => {
            let names: Vec<_> = all().iter().map(|g| g.name).collect();
            Err(format!(
                "no built-in guest named {name:?}; there are: {}",
                names.join(", ")
            ))
        }
    }
}

/// The built-in guest called `name`.
pub fn find(name: &str) -> Option<&'static Guest> {
    GUESTS.iter().find(|g| g.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use deja_machine::loader::{EntryMode, ImageFormat};
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};

    #[test]
    fn every_guest_assembles_into_a_sane_real_mode_image() {
        assert!(!all().is_empty());
        for g in all() {
            let image = g.image().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(image.name, format!("guest:{}", g.name));
            assert_eq!(
                image.format,
                ImageFormat::Raw {
                    load_addr: LOAD_ADDR,
                    entry: LOAD_ADDR,
                    mode: EntryMode::Real
                },
                "{}",
                g.name
            );
            // Big enough to hold three modes' code, small enough to stay below the VGA hole
            // and fast to run.
            assert!(
                (256..16 * 1024).contains(&image.bytes.len()),
                "{}: {} bytes",
                g.name,
                image.bytes.len()
            );
            assert!(LOAD_ADDR + image.bytes.len() as u64 <= 0xa_0000);
            assert!(!g.description.is_empty());
        }
    }

    #[test]
    fn building_is_deterministic() {
        for g in all() {
            assert_eq!(g.image().unwrap(), g.image().unwrap(), "{}", g.name);
        }
    }

    #[test]
    fn find_knows_every_guest_and_nothing_else() {
        for g in all() {
            assert_eq!(find(g.name).map(|f| f.name), Some(g.name));
        }
        assert!(find("no-such-guest").is_none());
        let mut names: Vec<_> = all().iter().map(|g| g.name).collect();
        names.dedup();
        assert_eq!(names.len(), all().len());
    }

    #[test]
    fn images_start_with_a_far_jump_to_the_real_mode_code() {
        for g in all() {
            let image = g.image().unwrap();
            let mut d = Decoder::with_ip(16, &image.bytes, LOAD_ADDR, DecoderOptions::NONE);
            let first = d.decode();
            assert_eq!(first.mnemonic(), Mnemonic::Jmp, "{}", g.name);
            assert_eq!(first.far_branch_selector(), 0);
            assert_eq!(u64::from(first.far_branch16()), LOAD_ADDR + 5);
        }
    }

    #[test]
    fn the_gdt_holds_flat_32_bit_and_64_bit_code_segments() {
        let image = find("hello").unwrap().image().unwrap();
        let gdt = 0x00cf_9a00_0000_ffffu64.to_le_bytes();
        let code64 = 0x00af_9a00_0000_ffffu64.to_le_bytes();
        assert!(image.bytes.windows(8).any(|w| w == gdt));
        assert!(image.bytes.windows(8).any(|w| w == code64));
    }
}
