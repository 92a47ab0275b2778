//! A live bt run served to gdb: forward only (a live run cannot be replayed backwards; record
//! it and debug the trace with `deja replay --gdb` for that).

use crate::{Debuggee, GdbError};
use deja_engine::{RunEnd, RunObserver, RunOptions, Vm};
use deja_machine::exit_group::{PagingRegs, fetch_code, translate_linear};
use deja_machine::{Cpu, CpuState, Machine, WatchHit};
use deja_replayer::session::{Access, Stop, linear_rip};
use deja_traces::Position;

/// Instructions a forward run executes between two looks at gdb's connection.
const SLICE: u64 = 1 << 20;
/// Single steps (while watching) between two looks at gdb's connection.
const STEPS_PER_LOOK: u64 = 4096;

/// A watched virtual range: `(virtual start, length, accesses, [(physical, length,
/// virtual)])`, one piece per page it touches.
type Watched = (u64, u64, Access, Vec<(u64, u64, u64)>);

/// A live machine on bt, stopped between instructions.
pub struct LiveRun {
    vm: Vm,
    breakpoints: Vec<u64>,
    watched: Vec<Watched>,
    ended: bool,
}

/// Stops a live run where bt stopped for a breakpoint.
struct BreakpointObserver {
    hit: bool,
}

impl RunObserver for BreakpointObserver {
    fn between_exits(&mut self, _: &mut Machine, cpu: &mut dyn Cpu, _: u64) -> bool {
        if cpu.stopped_at_breakpoint() {
            self.hit = true;
            return false;
        }
        true
    }
}

impl LiveRun {
    /// Debugs `vm` from where it stands (a machine just built: the guest's first
    /// instruction). The engine must count instructions (bt).
    pub fn new(vm: Vm) -> Result<Self, GdbError> {
        if !vm.cpu.counts_instructions() {
            return Err(GdbError::Refused(format!(
                "debugging a live run needs bt ({} cannot stop at instructions)",
                vm.cpu.name()
            )));
        }
        Ok(Self {
            vm,
            breakpoints: Vec::new(),
            watched: Vec::new(),
            ended: false,
        })
    }

    /// The machine (for the caller's report when gdb leaves).
    pub fn vm(&mut self) -> &mut Vm {
        &mut self.vm
    }

    fn paging(&mut self) -> Result<PagingRegs, GdbError> {
        let s = self.vm.cpu.state()?;
        Ok(PagingRegs {
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
        })
    }

    /// The physical ranges watched for accesses `on` accepts.
    fn ranges(&self, on: fn(&Access) -> bool) -> Vec<(u64, u64)> {
        self.watched
            .iter()
            .filter(|w| on(&w.2))
            .flat_map(|w| w.3.iter().map(|&(p, n, _)| (p, n)))
            .collect()
    }

    /// The stop for `hit`: the watched virtual address it touched and the watch's kind.
    fn watch_stop(&self, hit: WatchHit) -> Stop {
        let seen = |a: &Access| match a {
            Access::Write => !hit.read,
            Access::Read => hit.read,
            Access::ReadWrite => true,
        };
        let found = self.watched.iter().filter(|w| seen(&w.2)).find_map(|w| {
            w.3.iter()
                .find(|&&(p, n, _)| (p..p + n).contains(&hit.address))
                .map(|&(p, _, v)| (v + (hit.address - p), w.2))
        });
        let fallback = if hit.read {
            Access::Read
        } else {
            Access::Write
        };
        let (address, access) = found.unwrap_or((hit.address, fallback));
        Stop::Watch {
            address,
            access,
            hit,
        }
    }

    /// One run up to `limit` with breakpoints `bps`; whether it stopped at one, how it
    /// ended, and the watched stores it made.
    fn run(&mut self, limit: u64, bps: &[u64]) -> Result<(bool, RunEnd, Vec<WatchHit>), GdbError> {
        self.vm.cpu.set_breakpoints(bps)?;
        let writes = self.ranges(|a| matches!(a, Access::Write | Access::ReadWrite));
        let reads = self.ranges(|a| matches!(a, Access::Read | Access::ReadWrite));
        self.vm.cpu.set_watch_access(&writes, &reads)?;
        let mut obs = BreakpointObserver { hit: false };
        let out = self.vm.run_observed(
            RunOptions {
                timeout: None,
                max_instructions: Some(limit),
            },
            &mut obs,
        )?;
        let hits = self.vm.cpu.take_watch_hits();
        if matches!(out.end, RunEnd::Stopped(_) | RunEnd::Shutdown { .. }) {
            self.ended = true;
        }
        Ok((obs.hit, out.end, hits))
    }

    fn at_breakpoint(&mut self) -> Result<Option<u64>, GdbError> {
        if self.breakpoints.is_empty() {
            return Ok(None);
        }
        let lin = linear_rip(&self.vm.cpu.state()?);
        Ok(self.breakpoints.binary_search(&lin).is_ok().then_some(lin))
    }

    fn refused(what: &str) -> GdbError {
        GdbError::Refused(format!(
            "{what}: a live run goes forward only (record it, then deja replay --gdb)"
        ))
    }
}

impl Debuggee for LiveRun {
    fn position(&self) -> Position {
        Position::new(self.vm.cpu.icount(), self.vm.machine.position().exits)
    }

    fn cpu_state(&mut self) -> Result<CpuState, GdbError> {
        Ok(self.vm.cpu.state()?)
    }

    fn read_virtual(&mut self, addr: u64, buf: &mut [u8]) -> Result<usize, GdbError> {
        let regs = self.paging()?;
        Ok(fetch_code(&self.vm.machine.mem, &regs, addr, buf))
    }

    fn read_physical(&self, addr: u64, buf: &mut [u8]) -> usize {
        fetch_code(&self.vm.machine.mem, &PagingRegs::default(), addr, buf)
    }

    fn translate(&mut self, addr: u64) -> Result<Option<u64>, GdbError> {
        let regs = self.paging()?;
        Ok(translate_linear(&self.vm.machine.mem, &regs, addr))
    }

    fn set_breakpoints(&mut self, linear: &[u64]) {
        self.breakpoints = linear.to_vec();
        self.breakpoints.sort_unstable();
        self.breakpoints.dedup();
    }

    fn add_watch(&mut self, virt: u64, len: u64, access: Access) -> Result<(), GdbError> {
        let regs = self.paging()?;
        let end = virt
            .checked_add(len.max(1))
            .ok_or_else(|| GdbError::Refused(format!("watch {virt:#x}+{len}: wraps")))?;
        let mut pieces = Vec::new();
        let mut at = virt;
        while at < end {
            let n = (0x1000 - (at & 0xfff)).min(end - at);
            let phys = translate_linear(&self.vm.machine.mem, &regs, at).ok_or_else(|| {
                GdbError::Refused(format!("watch {virt:#x}+{len}: {at:#x} is not mapped here"))
            })?;
            pieces.push((phys, n, at));
            at += n;
        }
        self.watched.push((virt, len, access, pieces));
        Ok(())
    }

    fn remove_watch(&mut self, virt: u64, len: u64, access: Access) -> bool {
        match self
            .watched
            .iter()
            .position(|w| w.0 == virt && w.1 == len && w.2 == access)
        {
            Some(i) => {
                self.watched.remove(i);
                true
            }
            None => false,
        }
    }

    fn step(&mut self) -> Result<Stop, GdbError> {
        if self.ended {
            return Ok(Stop::End);
        }
        let now = self.vm.cpu.icount();
        let (_, _, hits) = self.run(now + 1, &[])?;
        if self.ended {
            return Ok(Stop::End);
        }
        Ok(match hits.into_iter().next() {
            Some(hit) => self.watch_stop(hit),
            None => Stop::Reached,
        })
    }

    fn resume(&mut self, interrupt: &mut dyn FnMut() -> bool) -> Result<Stop, GdbError> {
        if self.ended {
            return Ok(Stop::End);
        }
        if self.at_breakpoint()?.is_some() {
            match self.step()? {
                Stop::Reached => {}
                other => return Ok(other),
            }
        }
        let bps = self.breakpoints.clone();
        let mut steps = 0u64;
        loop {
            // Watching, instructions run one at a time: a live run cannot go back to the
            // access it overshot, so it must stop right after it.
            let now = self.vm.cpu.icount();
            let limit = if self.watched.is_empty() {
                now + SLICE
            } else {
                now + 1
            };
            let (hit_bp, end, hits) = self.run(limit, &bps)?;
            if let Some(hit) = hits.into_iter().next() {
                return Ok(self.watch_stop(hit));
            }
            if self.ended {
                return Ok(Stop::End);
            }
            if hit_bp {
                let lin = linear_rip(&self.vm.cpu.state()?);
                return Ok(Stop::Breakpoint(lin));
            }
            if end == RunEnd::Interrupted {
                return Ok(Stop::Interrupted);
            }
            steps += limit - now;
            if steps >= STEPS_PER_LOOK.min(SLICE) {
                steps = 0;
                if interrupt() {
                    return Ok(Stop::Interrupted);
                }
            }
        }
    }

    fn reversible(&self) -> bool {
        false
    }

    fn reverse_step(&mut self) -> Result<Stop, GdbError> {
        Err(Self::refused("reverse-stepi"))
    }

    fn reverse_resume(&mut self) -> Result<Stop, GdbError> {
        Err(Self::refused("reverse-continue"))
    }

    fn seek(&mut self, _n: u64) -> Result<Stop, GdbError> {
        Err(Self::refused("seek"))
    }

    fn checkpoint(&mut self) -> Result<Position, GdbError> {
        Err(Self::refused("checkpoint"))
    }

    fn digests_checked(&self) -> u64 {
        0
    }

    fn diverged(&self) -> bool {
        false
    }
}
