//! `deja replay --gdb` and `deja run --gdb`: a replay (or a live run) served to gdb.

use super::replay::{ReplayArgs, Stamped};
use anyhow::Context;
use deja_engine::{EngineKind, build_vm_with};
use deja_gdb::{Endpoint, ReplayTarget};
use deja_replayer::session::{ReplaySession, SessionOptions};
use std::io::Write;
use std::process::ExitCode;

/// Opens the trace as a replay session on bt, waits for gdb at `at` and serves it until
/// gdb detaches; then says how far the session's checks got.
pub fn serve_replay(
    args: &ReplayArgs,
    at: &Endpoint,
    serial_out: Box<dyn Write + Send>,
    stamped: Option<Stamped>,
    mmu: Option<deja_engine::MmuStrategy>,
) -> anyhow::Result<ExitCode> {
    let mut session = ReplaySession::open(
        &args.trace,
        &SessionOptions::default(),
        &|name| deja_guests::find(name).and_then(|g| g.image().ok()),
        serial_out,
        Box::new(move |cfg, image, host, out| {
            build_vm_with(EngineKind::Bt, cfg.clone(), host, out, image, mmu)
                .map_err(|e| e.to_string())
        }),
    )
    .with_context(|| format!("opening {} for gdb", args.trace.display()))?;
    if let Some(s) = stamped {
        session.set_position_hook(Some(Box::new(move |p| s.flush_at(p))));
    }
    let link = deja_gdb::accept(at, &mut |addr| {
        eprintln!(
            "deja: waiting for gdb on {addr} (gdb -ex 'target remote {addr}'), at the start \
             of {}",
            args.trace.display()
        );
    })?;
    eprintln!("deja: gdb connected");
    let mut target = ReplayTarget::new(session, Box::new(|line| eprintln!("{line}")));
    let reason = deja_gdb::serve(&mut target, &link)?;
    let session = target.session();
    let p = session.position();
    eprintln!(
        "deja: gdb session ended ({reason:?}) at icount {} exit #{}; {} state digests \
         checked on the way{}",
        p.icount,
        p.exits,
        session.digests_checked(),
        match session.divergence() {
            Some(_) => ", and the replay DIVERGED",
            None => ", all matched",
        }
    );
    Ok(ExitCode::from(if session.divergence().is_some() {
        super::replay::EXIT_DIVERGED
    } else {
        0
    }))
}

/// Waits for gdb at `at` and serves the live run of `vm` (forward only) until gdb leaves.
pub fn serve_live(vm: deja_engine::Vm, at: &Endpoint) -> anyhow::Result<ExitCode> {
    let run = deja_gdb::live::LiveRun::new(vm)?;
    let link = deja_gdb::accept(at, &mut |addr| {
        eprintln!(
            "deja: waiting for gdb on {addr} (gdb -ex 'target remote {addr}'), before the \
             guest's first instruction"
        );
    })?;
    eprintln!("deja: gdb connected");
    let mut target = deja_gdb::DebugTarget::new(run, Box::new(|line| eprintln!("{line}")));
    let reason = deja_gdb::serve(&mut target, &link)?;
    let p = deja_gdb::Debuggee::position(target.session());
    eprintln!(
        "deja: gdb session ended ({reason:?}) at icount {} exit #{}",
        p.icount, p.exits
    );
    Ok(ExitCode::SUCCESS)
}
