//! Subcommand implementations. Each parses nothing itself (clap does) and does little more
//! than call the library crates and format their answers.

pub mod bench;
pub mod gdb;
pub mod guests;
pub mod info;
pub mod progress;
pub mod record;
pub mod replay;
pub mod report;
pub mod run;
pub mod trace;

/// deja itself failed (bad arguments beyond clap's checks, unreadable image, engine error).
pub const EXIT_DEJA_ERROR: u8 = 1;

/// Prints a line to stdout for the commands that run guests (run, record, replay), which
/// keep SIGPIPE ignored so that a reader going away cannot kill a recording before its
/// footer is written: the line is dropped when stdout is closed (the exit status still
/// says how the run ended), instead of `println!`'s panic.
pub fn say(text: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

/// Gives SIGPIPE its default action, for the commands that only print (trace, guests,
/// info, report, bench): when their reader goes away (`deja trace info | head`) they end
/// quietly, as other Unix tools do, instead of panicking on a failed print.
pub fn end_quietly_on_closed_stdout() {
    // SAFETY: signal() with SIG_DFL installs no handler code; it only resets the action for
    // SIGPIPE, which Rust's runtime set to SIG_IGN at start-up.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Shown at the end of `--help`.
pub const EXIT_CODES_HELP: &str = "\
Exit status of `deja run`:
  N    the guest wrote N to the isa-debug-exit port 0xf4 (QEMU would exit (N << 1) | 1)
  0    the guest powered off or reset the machine (or an --max-instructions limit was reached)
  1    deja could not run the guest (bad image, engine error); the message says why
  2    bad command line
  124  the --timeout passed
  125  the guest triple-faulted (the CPU state is printed)
  130  interrupted (Ctrl-C)
Exit status of `deja record`: as `deja run` (the recorded guest's status); 1 when the trace
  could not be finished (e.g. a full disk: every whole frame is kept); with --until-failure
  0 when a failing run was kept, 4 when no attempt failed
Exit status of `deja replay`: 0 verified (or --until reached), 3 diverged, 4 the trace ends
  early (everything it holds matched), 1 could not replay
Exit status of `deja trace verify`: 0 complete and sound, 3 problems found";
