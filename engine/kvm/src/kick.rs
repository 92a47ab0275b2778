//! Getting a vCPU thread out of `KVM_RUN` from another thread.
//!
//! A guest spinning in `jmp $` never exits on its own, so `--timeout` and Ctrl-C need a way
//! in. The kick (1) raises the [`Kicker`](deja_machine::Kicker) flag, (2) sets
//! `kvm_run.immediate_exit` so that a thread about to enter `KVM_RUN` returns at once, and
//! (3) sends a real-time signal, with a no-op handler installed without `SA_RESTART`, to the
//! vCPU thread while it is inside the `KVM_RUN` ioctl, which makes a running
//! `KVM_RUN` return `EINTR`. Steps 2 and 3 together close the window between the vCPU
//! checking the flag and entering the kernel.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use thiserror::Error;

/// Installing the kick signal's handler failed.
#[derive(Debug, Error, Clone)]
#[error("installing the kvm kick signal handler for signal {signal} failed: {detail}")]
pub struct SignalError {
    /// The signal number.
    pub signal: i32,
    /// The OS error.
    pub detail: String,
}

extern "C" fn on_kick_signal(_: libc::c_int) {}

/// The signal used to kick vCPU threads (the first real-time signal glibc leaves free).
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// Installs the no-op handler once per process.
pub fn install_signal_handler() -> Result<(), SignalError> {
    static INSTALLED: OnceLock<Result<(), SignalError>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            let signal = kick_signal();
            // SAFETY: a zeroed sigaction is a valid starting point; we set the handler to a
            // function with the required signature, an empty mask and no SA_RESTART (so that
            // KVM_RUN returns EINTR), then pass valid pointers to sigaction.
            let rc = unsafe {
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_kick_signal as extern "C" fn(libc::c_int) as usize;
                act.sa_flags = 0;
                libc::sigemptyset(&mut act.sa_mask);
                libc::sigaction(signal, &act, std::ptr::null_mut())
            };
            if rc != 0 {
                return Err(SignalError {
                    signal,
                    detail: std::io::Error::last_os_error().to_string(),
                });
            }
            Ok(())
        })
        .clone()
}

#[derive(Debug, Default)]
struct Target {
    /// Address of `kvm_run.immediate_exit`; 0 once the vCPU is gone.
    immediate_exit: usize,
    /// The thread inside `Cpu::run`, if any.
    thread: Option<libc::pthread_t>,
}

/// What the kick hook and the vCPU thread share.
#[derive(Debug, Default)]
pub struct KickTarget {
    inner: Mutex<Target>,
    /// The vCPU thread is in (or about to enter) the `KVM_RUN` ioctl. Signals are sent only
    /// then, so they never interrupt deja's own system calls (trace writes, device I/O).
    in_kvm_run: AtomicBool,
}

impl KickTarget {
    /// A target for the vCPU whose `kvm_run.immediate_exit` byte is at `immediate_exit`.
    pub fn new(immediate_exit: *mut u8) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Target {
                immediate_exit: immediate_exit as usize,
                thread: None,
            }),
            in_kvm_run: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Target> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The hook side: make the vCPU leave (or not enter) `KVM_RUN`.
    pub fn kick(&self) {
        let t = self.lock();
        if t.immediate_exit != 0 {
            // SAFETY: the address points into the vCPU's kvm_run mapping, which stays mapped
            // until `detach` zeroes it under this same lock; a u8 is always aligned.
            let flag = unsafe { &*(t.immediate_exit as *const AtomicU8) };
            flag.store(1, Ordering::SeqCst);
        }
        // immediate_exit is set before this load (SeqCst): a vCPU that raises `in_kvm_run`
        // after the load below reads immediate_exit = 1 in KVM_RUN and returns at once.
        if !self.in_kvm_run.load(Ordering::SeqCst) {
            return;
        }
        if let Some(thread) = t.thread {
            // SAFETY: `thread` is registered only while that thread is inside `Cpu::run`
            // (the guard removes it under this lock before returning), so it is alive; the
            // signal has a no-op handler installed.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }

    /// The vCPU side, right before the `KVM_RUN` ioctl.
    pub fn entering_kvm_run(&self) {
        self.in_kvm_run.store(true, Ordering::SeqCst);
    }

    /// The vCPU side, right after the `KVM_RUN` ioctl returned.
    pub fn left_kvm_run(&self) {
        self.in_kvm_run.store(false, Ordering::SeqCst);
    }

    /// The vCPU side: clears `immediate_exit` (before re-checking the kick flag).
    pub fn clear_immediate_exit(&self) {
        let t = self.lock();
        if t.immediate_exit != 0 {
            // SAFETY: as in `kick`.
            let flag = unsafe { &*(t.immediate_exit as *const AtomicU8) };
            flag.store(0, Ordering::SeqCst);
        }
    }

    /// The vCPU is going away: forget its mapping so a late kick touches nothing.
    pub fn detach(&self) {
        let mut t = self.lock();
        t.immediate_exit = 0;
        t.thread = None;
    }

    /// Registers the calling thread as the one inside `Cpu::run` until the guard drops.
    pub fn enter(self: &Arc<Self>) -> RunGuard {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.lock().thread = Some(me);
        RunGuard {
            target: Arc::clone(self),
        }
    }
}

/// Unregisters the vCPU thread when `Cpu::run` returns (by any path).
pub struct RunGuard {
    target: Arc<KickTarget>,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.target.lock().thread = None;
    }
}
