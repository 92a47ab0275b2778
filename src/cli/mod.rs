//! Subcommand implementations. Each parses nothing itself (clap does) and does little more
//! than call the library crates and format their answers.

pub mod guests;
pub mod info;
pub mod run;

/// deja itself failed (bad arguments beyond clap's checks, unreadable image, engine error).
pub const EXIT_DEJA_ERROR: u8 = 1;

/// Shown at the end of `--help`.
pub const EXIT_CODES_HELP: &str = "\
Exit status of `deja run`:
  N    the guest wrote N to the isa-debug-exit port 0xf4 (QEMU would exit (N << 1) | 1)
  0    the guest powered off or reset the machine (or an --max-instructions limit was reached)
  1    deja could not run the guest (bad image, engine error); the message says why
  2    bad command line
  124  the --timeout passed
  125  the guest triple-faulted (the CPU state is printed)
  130  interrupted (Ctrl-C)";
