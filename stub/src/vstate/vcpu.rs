//! The vCPU run loop and the control shared by vCPU threads, devices and the
//! thread that owns the machine.
//!
//! Pausing: the owner sets the request to `Pause` and kicks every vCPU thread
//! (a signal whose handler sets `kvm_run.immediate_exit`). A vCPU leaves its
//! loop only after a run returned `Interrupted`: that run completed any
//! pending I/O, so the saved state is consistent. A request seen before a
//! run sets `immediate_exit` itself, so a kick that came before the thread
//! armed it is never lost.

use std::os::unix::thread::RawPthread;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::devices::bus::Bus;
use crate::hypervisor::{Vcpu, VcpuExit};
use crate::memory::GuestMemory;
use crate::timing;

/// Why a machine stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest wrote its exit status to the exit port.
    Exited(u8),
    /// The guest triple-faulted or asked for a reset.
    Shutdown,
    /// A vCPU halted and the hypervisor handed the halt to the VMM.
    Halted,
    /// A vCPU could not go on (hypervisor error, emulation failure).
    Error(String),
}

const RUN: u8 = 0;
const PAUSE: u8 = 1;
const STOP: u8 = 2;

/// Run/pause/stop requests and the machine's exit reason.
pub struct RunControl {
    request: AtomicU8,
    outcome: Mutex<Option<ExitReason>>,
    cond: Condvar,
    threads: Mutex<Vec<RawPthread>>,
    kick: fn(RawPthread),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RunControl {
    /// A control whose kicks go through `kick` (the backend's thread kick).
    pub fn new(kick: fn(RawPthread)) -> Arc<Self> {
        Arc::new(RunControl {
            request: AtomicU8::new(RUN),
            outcome: Mutex::new(None),
            cond: Condvar::new(),
            threads: Mutex::new(Vec::new()),
            kick,
        })
    }

    fn kick_all(&self) {
        for &t in lock(&self.threads).iter() {
            (self.kick)(t);
        }
    }

    fn notify(&self) {
        let _g = lock(&self.outcome);
        self.cond.notify_all();
    }

    /// Ask every vCPU to stop at its next exit and park. Safe from any thread.
    pub fn request_pause(&self) {
        let _ = self
            .request
            .compare_exchange(RUN, PAUSE, Ordering::SeqCst, Ordering::SeqCst);
        self.kick_all();
        self.notify();
    }

    /// Record why the machine stops (the first reason wins) and stop all vCPUs.
    pub fn finish(&self, reason: ExitReason) {
        {
            let mut o = lock(&self.outcome);
            if o.is_none() {
                *o = Some(reason);
            }
            self.request.store(STOP, Ordering::SeqCst);
            self.cond.notify_all();
        }
        self.kick_all();
    }

    /// Whether vCPUs should keep running.
    pub fn running(&self) -> bool {
        self.request.load(Ordering::SeqCst) == RUN
    }

    /// The exit reason, once the machine stopped.
    pub fn outcome(&self) -> Option<ExitReason> {
        lock(&self.outcome).clone()
    }

    /// Block until the machine stops (or `timeout` passes) and return why;
    /// `None` on timeout.
    pub fn wait_outcome(&self, timeout: Option<std::time::Duration>) -> Option<ExitReason> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut g = lock(&self.outcome);
        loop {
            if let Some(r) = g.as_ref() {
                return Some(r.clone());
            }
            g = match deadline {
                None => self.cond.wait(g).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.cond
                        .wait_timeout(g, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// Block until a pause is requested or the machine stops.
    pub fn wait_not_running(&self) {
        let mut g = lock(&self.outcome);
        while g.is_none() && self.running() {
            g = self.cond.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub(crate) fn set_threads(&self, threads: Vec<RawPthread>) {
        *lock(&self.threads) = threads;
    }

    pub(crate) fn take_threads(&self) -> Vec<RawPthread> {
        std::mem::take(&mut *lock(&self.threads))
    }

    /// Back to running after a pause. Has no effect once the machine stopped.
    pub(crate) fn clear_pause(&self) {
        let _ = self
            .request
            .compare_exchange(PAUSE, RUN, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// What a vCPU thread needs besides its vCPU.
#[derive(Clone)]
pub struct VcpuContext {
    pub io_bus: Bus,
    pub mmio_bus: Bus,
    pub memory: GuestMemory,
    pub control: Arc<RunControl>,
}

static UNCLAIMED_LOGGED: AtomicU32 = AtomicU32::new(0);

fn unclaimed(kind: &str, addr: u64, data: &[u8]) {
    // The first few are worth a warning; after that they are noise.
    if UNCLAIMED_LOGGED.fetch_add(1, Ordering::Relaxed) < 8 {
        log::warn!(
            "guest {kind} at {addr:#x} ({} bytes, {data:02x?}) has no device; ignored",
            data.len()
        );
    } else {
        log::debug!("guest {kind} at {addr:#x} has no device; ignored");
    }
}

fn dispatch_write(bus: &Bus, kind: &str, addr: u64, data: &[u8]) {
    if data.len() <= 8 {
        if !bus.write(addr, data) {
            unclaimed(kind, addr, data);
        }
    } else {
        // String I/O (rep outs): one access per byte.
        for b in data.chunks(1) {
            if !bus.write(addr, b) {
                unclaimed(kind, addr, b);
            }
        }
    }
}

fn dispatch_read(bus: &Bus, kind: &str, addr: u64, data: &mut [u8]) {
    if data.len() <= 8 {
        if !bus.read(addr, data) {
            unclaimed(kind, addr, data);
        }
    } else {
        for b in data.chunks_mut(1) {
            if !bus.read(addr, b) {
                unclaimed(kind, addr, b);
            }
        }
    }
}

fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        1 => "emulation failure",
        2 => "simultaneous exceptions",
        3 => "delivery event",
        4 => "unexpected exit reason",
        _ => "unknown",
    }
}

/// Run `vcpu` until a pause or stop is requested. Returns with the last run
/// completed (the vCPU can be saved).
pub fn run_loop<V: Vcpu>(vcpu: &mut V, id: u32, ctx: &VcpuContext) {
    vcpu.arm_kick();
    loop {
        if !ctx.control.running() {
            vcpu.set_immediate_exit(true);
        }
        let result = vcpu.run();
        timing::mark_first_exit();
        let failure = match result {
            Ok(VcpuExit::Interrupted) => {
                vcpu.set_immediate_exit(false);
                if !ctx.control.running() {
                    break;
                }
                None
            }
            Ok(VcpuExit::IoOut { port, data }) => {
                dispatch_write(&ctx.io_bus, "port write", u64::from(port), data);
                None
            }
            Ok(VcpuExit::IoIn { port, data }) => {
                dispatch_read(&ctx.io_bus, "port read", u64::from(port), data);
                None
            }
            Ok(VcpuExit::MmioWrite { addr, data }) => {
                dispatch_write(&ctx.mmio_bus, "MMIO write", addr, data);
                None
            }
            Ok(VcpuExit::MmioRead { addr, data }) => {
                dispatch_read(&ctx.mmio_bus, "MMIO read", addr, data);
                None
            }
            Ok(VcpuExit::Hlt) => Some(ExitReason::Halted),
            Ok(VcpuExit::Shutdown) => Some(ExitReason::Shutdown),
            Ok(VcpuExit::InternalError { suberror, data }) => Some(ExitReason::Error(format!(
                "vCPU {id} stopped: KVM internal error {suberror} ({}; data {data:x?}) at {}",
                internal_error_name(suberror),
                vcpu.describe_position(&ctx.memory)
            ))),
            Ok(VcpuExit::FailEntry { reason }) => Some(ExitReason::Error(format!(
                "vCPU {id} could not enter the guest (hardware reason {reason:#x})"
            ))),
            Ok(VcpuExit::SystemEvent { kind }) => Some(if kind == 1 || kind == 2 {
                ExitReason::Shutdown
            } else {
                ExitReason::Error(format!("vCPU {id}: system event {kind}"))
            }),
            Ok(VcpuExit::Unhandled(what)) => Some(ExitReason::Error(format!(
                "vCPU {id}: unhandled exit '{what}' at {}",
                vcpu.describe_position(&ctx.memory)
            ))),
            Err(e) => Some(ExitReason::Error(format!("vCPU {id}: {e}"))),
        };
        if let Some(reason) = failure {
            ctx.control.finish(reason);
        }
    }
    vcpu.disarm_kick();
}
