//! The built-in guests booted through [`deja_engine::build_vm`] on each engine: the boot
//! path (real -> protected -> long mode), serial output and input, the 8259A, the PIT and
//! HLT wake-ups, checked by the guests' own output and exit status.

mod common;

use common::guest_vm;
use deja_engine::{EngineKind, RunEnd, RunOptions, RunOutcome};
use deja_machine::devices::StopRequest;
use deja_machine::{ClockMode, LiveHost};
use std::sync::mpsc::Receiver;
use std::time::Duration;

/// Boots guest `name` on `engine` and runs it to the end. `None` when the engine cannot be
/// built on this host (printed as a SKIP line).
fn run_guest(
    test: &str,
    engine: EngineKind,
    name: &str,
    clock: ClockMode,
    input: Option<Receiver<u8>>,
    timeout: Duration,
) -> Option<(RunOutcome, String)> {
    let mut host = LiveHost::new(clock);
    if let Some(rx) = input {
        host = host.with_input(rx);
    }
    let (mut vm, serial) = guest_vm(test, engine, name, host)?;
    let outcome = vm
        .run(RunOptions {
            timeout: Some(timeout),
            max_instructions: None,
        })
        .unwrap_or_else(|e| panic!("{test}: running {name} on {engine}: {e}"));
    let text = serial.text();
    println!(
        "{test}: {name} on {engine}: {:?} after {:?}, {} exits; serial:\n{text}",
        outcome.end, outcome.elapsed, outcome.exits
    );
    Some((outcome, text))
}

fn assert_debug_exit(test: &str, outcome: &RunOutcome, text: &str, value: u32) {
    assert_eq!(
        outcome.end,
        RunEnd::Stopped(StopRequest::DebugExit { value }),
        "{test}: serial output was:\n{text}"
    );
    assert_eq!(outcome.exit_status(), value as i32);
}

fn hello(engine: EngineKind, test: &str) {
    let Some((outcome, text)) = run_guest(
        test,
        engine,
        "hello",
        ClockMode::Virtual,
        None,
        Duration::from_secs(20),
    ) else {
        return;
    };
    assert_eq!(text, deja_guests::hello::GREETING);
    assert_debug_exit(test, &outcome, &text, 0);
}

/// Sends the input in pieces with pauses, so that some bytes arrive while the guest is
/// halted and must wake it, then EOT.
fn echo(engine: EngineKind, clock: ClockMode, test: &str) {
    let pieces: [&[u8]; 3] = [b"hello, ", b"deja\r\n", b"bye\x7f!"];
    let (tx, rx) = std::sync::mpsc::channel();
    let sender = std::thread::spawn(move || {
        for piece in pieces {
            std::thread::sleep(Duration::from_millis(30));
            for &b in piece {
                if tx.send(b).is_err() {
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(30));
        let _ = tx.send(deja_guests::echo::EOT);
        // Bytes after EOT must not be echoed.
        let _ = tx.send(b'X');
    });
    let run = run_guest(
        test,
        engine,
        "echo",
        clock,
        Some(rx),
        Duration::from_secs(30),
    );
    sender.join().expect("input thread");
    let Some((outcome, text)) = run else {
        return;
    };
    let sent: Vec<u8> = pieces.concat();
    let expected = format!(
        "{}{}{}",
        deja_guests::echo::BANNER,
        String::from_utf8_lossy(&sent),
        deja_guests::echo::trailer(sent.len())
    );
    assert_eq!(text, expected);
    assert_debug_exit(test, &outcome, &text, 0);
    assert!(
        outcome.stats.get("io.hlt") > 0,
        "{test}: the guest never halted: {:?}",
        outcome.stats
    );
}

fn timer_once(engine: EngineKind, clock: ClockMode, test: &str) -> Option<(RunOutcome, String)> {
    run_guest(test, engine, "timer", clock, None, Duration::from_secs(30))
}

fn assert_timer_passed(test: &str, outcome: &RunOutcome, text: &str) {
    assert!(
        text.contains("timer: PASS"),
        "{test}: serial output was:\n{text}"
    );
    assert_debug_exit(test, outcome, text, 0);
    let interrupts = outcome.stats.get("io.interrupts_delivered");
    assert!(
        interrupts > u64::from(deja_guests::timer::INTERRUPTS),
        "{test}: only {interrupts} interrupts delivered"
    );
}

/// With a virtual clock, time is a function of the guest's progress: channel 2 must
/// measure exactly one reload period per interrupt, every time.
fn timer_exact(engine: EngineKind, test: &str) {
    let Some((outcome, text)) = timer_once(engine, ClockMode::Virtual, test) else {
        return;
    };
    assert_timer_passed(test, &outcome, &text);
    use deja_guests::timer::{INTERRUPTS, TIMER_COUNT};
    let expected = u64::from(INTERRUPTS) * u64::from(TIMER_COUNT);
    let line = format!(
        "channel 2 measured {expected} (tolerance {}; wake-up interval min {TIMER_COUNT} max {TIMER_COUNT}; stalled wake-ups 0)",
        expected * u64::from(deja_guests::timer::TOLERANCE_PERCENT) / 100
    );
    assert!(
        text.contains(&line),
        "{test}: expected {line:?} in:\n{text}"
    );
}

/// With the host's clock the guest sees real time, and a host too loaded to run the vCPU
/// when ticks are due makes it lose ticks, as it would a real PC. The guest detects such
/// stalls and calls the run inconclusive (exit 4); only those runs are repeated (up to
/// 5 runs). A run that disagrees without a stall fails at once.
fn timer_host_clock(engine: EngineKind, test: &str) {
    const ATTEMPTS: usize = 5;
    let mut inconclusive = Vec::new();
    for attempt in 1..=ATTEMPTS {
        let Some((outcome, text)) = timer_once(engine, ClockMode::Host, test) else {
            return;
        };
        let stalled = RunEnd::Stopped(StopRequest::DebugExit {
            value: u32::from(deja_guests::EXIT_INCONCLUSIVE),
        });
        if outcome.end != stalled {
            assert_timer_passed(test, &outcome, &text);
            return;
        }
        println!("{test}: run {attempt} of {ATTEMPTS} was inconclusive (host stalls)");
        inconclusive.push(text);
    }
    panic!(
        "{test}: all {ATTEMPTS} runs were inconclusive:\n{}",
        inconclusive.join("\n---\n")
    );
}

#[test]
fn hello_on_kvm() {
    hello(EngineKind::Kvm, "hello_on_kvm");
}

#[test]
fn echo_on_kvm() {
    echo(EngineKind::Kvm, ClockMode::Host, "echo_on_kvm");
}

#[test]
fn timer_on_kvm_with_the_host_clock() {
    timer_host_clock(EngineKind::Kvm, "timer_on_kvm_with_the_host_clock");
}

#[test]
fn hello_on_bt() {
    hello(EngineKind::Bt, "hello_on_bt");
}

#[test]
fn echo_on_bt() {
    echo(EngineKind::Bt, ClockMode::Virtual, "echo_on_bt");
}

#[test]
fn timer_on_bt_with_the_virtual_clock() {
    timer_exact(EngineKind::Bt, "timer_on_bt_with_the_virtual_clock");
}

#[test]
fn timer_on_bt_with_the_host_clock() {
    timer_host_clock(EngineKind::Bt, "timer_on_bt_with_the_host_clock");
}

#[test]
fn timer_on_kvm_with_the_virtual_clock() {
    timer_exact(EngineKind::Kvm, "timer_on_kvm_with_the_virtual_clock");
}
