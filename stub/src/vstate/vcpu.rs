//! The vCPU run loop and the control shared by vCPU threads, devices and the
//! thread that owns the machine.
//!
//! Pausing: the owner sets the request to `Pause` and kicks every vCPU thread
//! (a signal whose handler sets `kvm_run.immediate_exit`). A vCPU leaves its
//! loop only after a run returned `Interrupted`: that run completed any
//! pending I/O, so the saved state is consistent. A request seen before a
//! run sets `immediate_exit` itself, so a kick that came before the thread
//! armed it is never lost.
//!
//! Each vCPU thread adds itself to the kick list before its first look at the
//! request and takes itself off after its last run, both under the list's
//! lock that kicks are sent under: a request made before the thread was
//! listed is seen by that first look, one made after reaches it as a kick.
//! (The list used to be filled by the starting thread after spawning every
//! vCPU thread; a stop requested in between, e.g. by vCPU 0 finishing while
//! vCPU 1 had already entered an idle guest, kicked nobody and vCPU 1 stayed
//! in KVM_RUN forever.)

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

    /// Add the calling thread to the kick list (a vCPU thread, before its
    /// first look at the request).
    fn list_current_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() } as RawPthread;
        lock(&self.threads).push(me);
    }

    /// Take the calling thread off the kick list (after its last run, before
    /// it ends: no kick may target a thread that is gone).
    fn unlist_current_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() } as RawPthread;
        lock(&self.threads).retain(|&t| t != me);
    }

    /// How many vCPU threads are on the kick list.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn listed_threads(&self) -> usize {
        lock(&self.threads).len()
    }

    /// Back to running after a pause. Has no effect once the machine stopped.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
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

/// Hand a port or MMIO exit to its bus: `size`-byte accesses, one after the
/// other at the same address (string I/O repeats the port access `count`
/// times; an MMIO exit is one access). Any other exit is left alone.
fn dispatch_bus_exit(io_bus: &Bus, mmio_bus: &Bus, exit: VcpuExit<'_>) {
    match exit {
        VcpuExit::IoOut { port, size, data } => {
            dispatch_write(io_bus, "port write", u64::from(port), size.into(), data)
        }
        VcpuExit::IoIn { port, size, data } => {
            dispatch_read(io_bus, "port read", u64::from(port), size.into(), data)
        }
        VcpuExit::MmioWrite { addr, data } => {
            dispatch_write(mmio_bus, "MMIO write", addr, data.len(), data)
        }
        VcpuExit::MmioRead { addr, data } => {
            let size = data.len();
            dispatch_read(mmio_bus, "MMIO read", addr, size, data)
        }
        _ => {}
    }
}

/// Whether `len` bytes are a whole number of accesses of `size` (1 to 8) bytes.
fn accesses_fit(kind: &str, addr: u64, size: usize, len: usize) -> bool {
    let ok = (1..=8).contains(&size) && len.is_multiple_of(size);
    if !ok {
        log::warn!("guest {kind} at {addr:#x}: {len} bytes in {size}-byte accesses; ignored");
    }
    ok
}

fn dispatch_write(bus: &Bus, kind: &str, addr: u64, size: usize, data: &[u8]) {
    if !accesses_fit(kind, addr, size, data.len()) {
        return;
    }
    for access in data.chunks(size) {
        if !bus.write(addr, access) {
            unclaimed(kind, addr, access);
        }
    }
}

fn dispatch_read(bus: &Bus, kind: &str, addr: u64, size: usize, data: &mut [u8]) {
    if !accesses_fit(kind, addr, size, data.len()) {
        data.fill(0xff);
        return;
    }
    for access in data.chunks_mut(size) {
        if !bus.read(addr, access) {
            unclaimed(kind, addr, access);
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
    // Listed before the first look at the request below (see the module docs).
    ctx.control.list_current_thread();
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
            Ok(
                exit @ (VcpuExit::IoOut { .. }
                | VcpuExit::IoIn { .. }
                | VcpuExit::MmioWrite { .. }
                | VcpuExit::MmioRead { .. }),
            ) => {
                dispatch_bus_exit(&ctx.io_bus, &ctx.mmio_bus, exit);
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
    ctx.control.unlist_current_thread();
    vcpu.disarm_kick();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;

    /// Records every access; reads return the access's index in every byte.
    #[derive(Default)]
    struct Recorder(Vec<(char, u64, Vec<u8>)>);

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.len() as u8);
            self.0.push(('r', offset, data.to_vec()));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push(('w', offset, data.to_vec()));
        }
    }

    fn buses() -> (Bus, Bus, Arc<Mutex<Recorder>>) {
        let rec = Arc::new(Mutex::new(Recorder::default()));
        let mut io = Bus::new();
        io.insert(rec.clone(), 0x500, 8).unwrap();
        let mut mmio = Bus::new();
        mmio.insert(rec.clone(), 0xd000_0000, 0x1000).unwrap();
        (io, mmio, rec)
    }

    fn taken(rec: &Mutex<Recorder>) -> Vec<(char, u64, Vec<u8>)> {
        std::mem::take(&mut lock(rec).0)
    }

    #[test]
    fn string_port_io_is_split_by_access_size() {
        let (io, mmio, rec) = buses();
        let data: Vec<u8> = (1..=12).collect();
        // `rep outsw` of six words, `rep outsl` of three dwords, `rep outsb`.
        for size in [2u8, 4, 1] {
            dispatch_bus_exit(
                &io,
                &mmio,
                VcpuExit::IoOut {
                    port: 0x502,
                    size,
                    data: &data,
                },
            );
            let want: Vec<_> = data
                .chunks(size.into())
                .map(|c| ('w', 2, c.to_vec()))
                .collect();
            assert_eq!(taken(&rec), want, "size {size}");
        }
        // `rep insw` of four words: four 2-byte reads, each filling its own slot.
        let mut buf = [0u8; 8];
        dispatch_bus_exit(
            &io,
            &mmio,
            VcpuExit::IoIn {
                port: 0x500,
                size: 2,
                data: &mut buf,
            },
        );
        assert_eq!(buf, [0, 0, 1, 1, 2, 2, 3, 3]);
        let got = taken(&rec);
        assert_eq!(got.len(), 4);
        assert!(got
            .iter()
            .all(|(k, o, d)| *k == 'r' && *o == 0 && d.len() == 2));
        // A single 4-byte port access and an 8-byte MMIO access stay whole.
        dispatch_bus_exit(
            &io,
            &mmio,
            VcpuExit::IoOut {
                port: 0x504,
                size: 4,
                data: &data[..4],
            },
        );
        dispatch_bus_exit(
            &io,
            &mmio,
            VcpuExit::MmioWrite {
                addr: 0xd000_0010,
                data: &data[..8],
            },
        );
        assert_eq!(
            taken(&rec),
            vec![
                ('w', 4, data[..4].to_vec()),
                ('w', 0x10, data[..8].to_vec())
            ]
        );
    }

    /// Kicks sent to threads, for [`IdleVcpu`] (kick_thread has no `self`).
    static KICKED: Mutex<Vec<RawPthread>> = Mutex::new(Vec::new());
    static KICKED_COND: Condvar = Condvar::new();

    fn record_kick(thread: RawPthread) {
        lock(&KICKED).push(thread);
        KICKED_COND.notify_all();
    }

    fn current() -> RawPthread {
        // SAFETY: pthread_self has no preconditions.
        unsafe { libc::pthread_self() as RawPthread }
    }

    /// A vCPU whose guest sits idle (HLT with the interrupt controller in the
    /// kernel): a run returns only when the thread is kicked, like KVM_RUN.
    /// Its first run first calls `on_first_run`: a request that arrives after
    /// the loop's look at it, just before the guest is entered.
    struct IdleVcpu {
        immediate_exit: bool,
        runs: u32,
        on_first_run: Option<Box<dyn FnOnce() + Send>>,
    }

    impl Vcpu for IdleVcpu {
        fn id(&self) -> u32 {
            1
        }
        fn run(&mut self) -> Result<VcpuExit<'_>, crate::hypervisor::HypervisorError> {
            self.runs += 1;
            if let Some(f) = self.on_first_run.take() {
                f();
            }
            if self.immediate_exit {
                return Ok(VcpuExit::Interrupted);
            }
            let me = current();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            let mut kicked = lock(&KICKED);
            while !kicked.contains(&me) {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                assert!(!left.is_zero(), "the idle vCPU was never kicked");
                kicked = KICKED_COND.wait_timeout(kicked, left).unwrap().0;
            }
            kicked.retain(|&t| t != me);
            Ok(VcpuExit::Interrupted)
        }
        fn set_immediate_exit(&mut self, on: bool) {
            self.immediate_exit = on;
        }
        fn arm_kick(&mut self) {}
        fn disarm_kick(&mut self) {}
        fn kick_thread(thread: RawPthread) {
            record_kick(thread)
        }
        fn describe_position(&self, _: &GuestMemory) -> String {
            String::new()
        }
    }

    fn context(control: &Arc<RunControl>) -> VcpuContext {
        VcpuContext {
            io_bus: Bus::new(),
            mmio_bus: Bus::new(),
            memory: GuestMemory::anonymous(&[(0, 0x1000)]).unwrap(),
            control: control.clone(),
        }
    }

    /// The hang seen on kvm_amd with 2 vCPUs: a stop requested while a vCPU
    /// thread had started but nobody had put it on the kick list yet, with its
    /// guest idle, left that thread in KVM_RUN for good. Here nobody lists the
    /// thread but run_loop itself, and the stop comes after its look at the
    /// request: the kick must still reach it.
    #[test]
    fn a_stop_between_a_vcpu_threads_start_and_its_first_run_reaches_it() {
        for request in ["pause", "finish"] {
            let control = RunControl::new(<IdleVcpu as Vcpu>::kick_thread);
            let ctx = context(&control);
            let c = control.clone();
            let mut vcpu = IdleVcpu {
                immediate_exit: false,
                runs: 0,
                on_first_run: Some(Box::new(move || match request {
                    "pause" => c.request_pause(),
                    _ => c.finish(ExitReason::Exited(0)),
                })),
            };
            let t = std::thread::spawn(move || {
                run_loop(&mut vcpu, 1, &ctx);
                vcpu.runs
            });
            assert_eq!(t.join().expect("run_loop returned"), 1, "{request}");
            assert_eq!(
                control.listed_threads(),
                0,
                "{request}: the ended thread is unlisted"
            );
        }
    }

    /// A request made before a vCPU thread looks at it needs no kick.
    #[test]
    fn a_stop_before_a_vcpu_thread_starts_is_seen_without_a_kick() {
        let control = RunControl::new(<IdleVcpu as Vcpu>::kick_thread);
        control.request_pause();
        let ctx = context(&control);
        let mut vcpu = IdleVcpu {
            immediate_exit: false,
            runs: 0,
            on_first_run: None,
        };
        let t = std::thread::spawn(move || {
            run_loop(&mut vcpu, 1, &ctx);
            (vcpu.runs, vcpu.immediate_exit)
        });
        assert_eq!(t.join().unwrap(), (1, false));
    }

    #[test]
    fn malformed_port_accesses_are_ignored() {
        let (io, mmio, rec) = buses();
        // A length that is not a whole number of accesses, and a zero size.
        dispatch_bus_exit(
            &io,
            &mmio,
            VcpuExit::IoOut {
                port: 0x500,
                size: 4,
                data: &[1, 2, 3, 4, 5, 6],
            },
        );
        let mut buf = [0u8; 4];
        dispatch_bus_exit(
            &io,
            &mmio,
            VcpuExit::IoIn {
                port: 0x500,
                size: 0,
                data: &mut buf,
            },
        );
        assert_eq!(buf, [0xff; 4]);
        assert!(taken(&rec).is_empty());
    }
}
