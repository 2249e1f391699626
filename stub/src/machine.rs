//! A running (or paused) machine: start, pause, wait, save.

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use smolvm_formats::{Arch, Compression, GuestRegion, MachineWriter, Manifest, SectionKind};

use crate::arch::cpu_model::CpuModel;
use crate::device_manager::{DeviceError, DeviceManager};
use crate::host::HostProfile;
use crate::hypervisor::{
    Backend, BackendVcpu, BackendVm, HypervisorError, InterruptLine, Vcpu, Vm,
};
use crate::memory::{GuestMemory, MemoryError};
use crate::persist::Persist;
use crate::snapshot::{Guest, MachineState, RegionState, StateError};
use crate::vstate::vcpu::{run_loop, ExitReason, RunControl, VcpuContext};

/// The architecture of the machines this build runs and writes.
#[cfg(target_arch = "x86_64")]
pub const HOST_ARCH: Arch = Arch::X86_64;
/// The architecture of the machines this build runs and writes.
#[cfg(target_arch = "aarch64")]
pub const HOST_ARCH: Arch = Arch::Aarch64;

/// Errors from running or saving a machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("cannot write the machine file: {0}")]
    Write(#[from] smolvm_formats::Error),
    /// The operation needs the vCPUs parked (call `pause` or `wait` first).
    #[error("the machine is running; pause it first")]
    Running,
    /// The operation needs running vCPUs.
    #[error("the machine is not running")]
    NotRunning,
    /// The boot entry can only be set on a machine built for boot, before it starts.
    #[error("the boot entry can only be set before a booted machine first starts")]
    EntryAfterStart,
    /// A vCPU thread could not be started or panicked.
    #[error("vCPU thread failed: {0}")]
    Thread(String),
}

/// What `wait` observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEvent {
    /// A pause was requested; every vCPU is parked and the machine can be
    /// saved or started again.
    Paused,
    /// The machine stopped for good.
    Stopped(ExitReason),
}

/// Asks a running machine to pause from any thread.
#[derive(Clone)]
pub struct PauseHandle {
    control: Arc<RunControl>,
}

impl PauseHandle {
    /// Kick every vCPU out of the guest; `Machine::wait` then returns `Paused`.
    pub fn pause(&self) {
        self.control.request_pause();
    }
}

/// A machine: guest memory, the VM, its vCPUs and its device manager.
///
/// Fields drop in order: vCPUs, then devices, then the VM, then guest memory.
pub struct Machine {
    pub(crate) threads: Vec<JoinHandle<BackendVcpu>>,
    pub(crate) parked: Vec<BackendVcpu>,
    pub(crate) devices: DeviceManager,
    pub(crate) vm: Arc<BackendVm>,
    pub(crate) _hypervisor: Backend,
    pub(crate) memory: GuestMemory,
    pub(crate) control: Arc<RunControl>,
    pub(crate) pit: bool,
    pub(crate) guest: Guest,
    pub(crate) profile: HostProfile,
    /// The CPU model the guest is shown (recorded in the manifest).
    pub(crate) cpu: CpuModel,
    /// Set for a machine built for boot until it first starts.
    pub(crate) needs_entry: bool,
}

impl Machine {
    /// Guest memory (to load images before a boot, or inspect a paused guest).
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The device manager (buses and devices).
    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    /// The device manager: attach devices before `start`.
    pub fn devices_mut(&mut self) -> &mut DeviceManager {
        &mut self.devices
    }

    /// What runs in the machine (saved in its state).
    pub fn guest(&self) -> &Guest {
        &self.guest
    }

    /// Say what runs in the machine (a boot sets it before the first save).
    pub fn set_guest(&mut self, guest: Guest) {
        self.guest = guest;
    }

    /// The control shared with vCPUs and devices (devices use it to stop the machine).
    pub fn control(&self) -> Arc<RunControl> {
        self.control.clone()
    }

    /// A handle that pauses this machine from another thread.
    pub fn pause_handle(&self) -> PauseHandle {
        PauseHandle {
            control: self.control.clone(),
        }
    }

    /// An interrupt line raising GSI `gsi` (an irqfd), for devices.
    pub fn interrupt_line(
        &self,
        gsi: u32,
    ) -> Result<Arc<dyn crate::devices::virtio::InterruptTrigger>, MachineError> {
        Ok(irq_line(&self.vm, gsi)?)
    }

    /// The CPU model its guest is shown.
    pub fn cpu_model(&self) -> CpuModel {
        self.cpu
    }

    /// The host profile this machine runs under.
    pub fn host_profile(&self) -> HostProfile {
        self.profile
    }

    /// Whether vCPU threads are running.
    pub fn is_running(&self) -> bool {
        !self.threads.is_empty()
    }

    /// Set the 64-bit entry point of vCPU 0 of a machine built for boot
    /// (after loading the guest image into `memory()`), before `start`.
    #[cfg(target_arch = "x86_64")]
    pub fn set_entry(
        &mut self,
        entry: &crate::arch::x86_64::regs::Entry64,
    ) -> Result<(), MachineError> {
        if !self.needs_entry {
            return Err(MachineError::EntryAfterStart);
        }
        use crate::hypervisor::VcpuX86_64;
        let count = self.parked.len() as u32;
        for vcpu in &self.parked {
            vcpu.configure_boot(entry, count, self.cpu)?;
        }
        self.needs_entry = false;
        Ok(())
    }

    /// Set a PVH entry (32-bit protected mode, EBX = start info) on the
    /// vCPUs of a machine built for boot, before `start`. The PVH GDT is
    /// written over the long-mode boot GDT.
    #[cfg(target_arch = "x86_64")]
    pub fn set_entry_pvh(
        &mut self,
        entry: &crate::arch::x86_64::regs::EntryPvh,
    ) -> Result<(), MachineError> {
        use crate::arch::x86_64::{gdt, layout};
        use crate::hypervisor::VcpuX86_64;
        if !self.needs_entry {
            return Err(MachineError::EntryAfterStart);
        }
        self.memory
            .write(layout::GDT_ADDR, &gdt::gdt_bytes(&gdt::PVH_GDT))?;
        let count = self.parked.len() as u32;
        for vcpu in &self.parked {
            vcpu.configure_boot_pvh(entry, count, self.cpu)?;
        }
        self.needs_entry = false;
        Ok(())
    }

    /// Set the entry of a machine built for boot (after loading the guest
    /// image into `memory()`), before `start`: vCPU 0 starts there; the
    /// others stay powered off until the guest starts them with PSCI CPU_ON.
    #[cfg(target_arch = "aarch64")]
    pub fn set_entry(
        &mut self,
        entry: &crate::arch::aarch64::regs::Entry,
    ) -> Result<(), MachineError> {
        use crate::hypervisor::VcpuAarch64;
        if !self.needs_entry {
            return Err(MachineError::EntryAfterStart);
        }
        if let Some(boot) = self.parked.first() {
            boot.configure_boot(entry)?;
        }
        self.needs_entry = false;
        Ok(())
    }

    /// MPIDR_EL1 of each parked vCPU, in vCPU order (the device tree's CPU
    /// nodes name them).
    #[cfg(target_arch = "aarch64")]
    pub fn vcpu_mpidrs(&self) -> Result<Vec<u64>, MachineError> {
        use crate::hypervisor::VcpuAarch64;
        Ok(self
            .parked
            .iter()
            .map(|v| v.mpidr())
            .collect::<Result<Vec<_>, _>>()?)
    }

    /// Start (or restart after a pause) one thread per vCPU; devices resume
    /// first, so host input they buffered reaches the guest.
    pub fn start(&mut self) -> Result<(), MachineError> {
        if self.is_running() {
            return Err(MachineError::Running);
        }
        if self.needs_entry {
            return Err(MachineError::EntryAfterStart);
        }
        self.control.clear_pause();
        self.devices.resume();
        let ctx = VcpuContext {
            io_bus: self.devices.io_bus().clone(),
            mmio_bus: self.devices.mmio_bus().clone(),
            memory: self.memory.clone(),
            control: self.control.clone(),
        };
        for mut vcpu in std::mem::take(&mut self.parked) {
            let ctx = ctx.clone();
            let id = vcpu.id();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    // A filtered process filters its vCPU threads too (stub/src/seccomp).
                    if let Err(e) = crate::seccomp::enter_vcpu_thread() {
                        ctx.control.finish(ExitReason::Error(e.to_string()));
                        return vcpu;
                    }
                    run_loop(&mut vcpu, id, &ctx);
                    vcpu
                })
                .map_err(|e| MachineError::Thread(e.to_string()))?;
            // Each thread puts itself on the kick list (run_loop) before it
            // first looks at the request: listing them here, after spawning,
            // would miss a stop requested in between.
            self.threads.push(handle);
        }
        Ok(())
    }

    /// Block until a pause is requested or the guest stops; on return every
    /// vCPU is parked and then every device paused (a stopped machine can
    /// still be inspected or saved).
    pub fn wait(&mut self) -> Result<RunEvent, MachineError> {
        if !self.is_running() {
            return Err(MachineError::NotRunning);
        }
        self.control.wait_not_running();
        self.join()
    }

    /// Pause from the owning thread: kick the vCPUs and wait for them.
    pub fn pause(&mut self) -> Result<RunEvent, MachineError> {
        self.control.request_pause();
        self.wait()
    }

    fn join(&mut self) -> Result<RunEvent, MachineError> {
        // Each vCPU thread took itself off the kick list before ending, so no
        // kick targets a joined thread.
        let mut failed = None;
        for h in std::mem::take(&mut self.threads) {
            match h.join() {
                Ok(vcpu) => self.parked.push(vcpu),
                Err(_) => failed = Some(MachineError::Thread("a vCPU thread panicked".into())),
            }
        }
        debug_assert_eq!(
            self.control.listed_threads(),
            0,
            "a joined vCPU thread is listed"
        );
        self.parked.sort_by_key(|v| v.id());
        // vCPUs first, then devices: a device paused while a vCPU still ran
        // could miss that vCPU's notification.
        self.devices.pause();
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(match self.control.outcome() {
            Some(reason) => RunEvent::Stopped(reason),
            None => RunEvent::Paused,
        })
    }

    /// Run until the guest stops (pauses requested meanwhile are honoured
    /// and resumed at once).
    pub fn run_to_exit(&mut self) -> Result<ExitReason, MachineError> {
        if !self.is_running() {
            self.start()?;
        }
        loop {
            match self.wait()? {
                RunEvent::Stopped(reason) => return Ok(reason),
                RunEvent::Paused => self.start()?,
            }
        }
    }

    /// Capture the machine state (vCPUs parked and devices paused, as
    /// `wait` and `pause` leave them).
    pub fn save_state(&self) -> Result<MachineState, MachineError> {
        if self.is_running() {
            return Err(MachineError::Running);
        }
        let devices = self.devices.save()?;
        let (vm, vcpus) = crate::vstate::vm::save_state(&self.vm, &self.parked, self.pit)?;
        Ok(MachineState {
            arch: std::env::consts::ARCH.into(),
            backend: "kvm".into(),
            guest: self.guest.clone(),
            memory: self
                .memory
                .layout()
                .into_iter()
                .map(|(guest_addr, size)| RegionState { guest_addr, size })
                .collect(),
            pit: self.pit,
            vm,
            vcpus,
            devices,
        })
    }

    /// Save the paused machine to a `.smolmachine` at `path`: the manifest
    /// (vCPU count, memory size and host profile filled in), the state and
    /// guest memory (zero pages elided). The write is atomic.
    pub fn save(
        &self,
        path: &Path,
        manifest: &Manifest,
        compression: Compression,
    ) -> Result<(), MachineError> {
        let mut w = MachineWriter::create(path, HOST_ARCH)?;
        self.write_snapshot(&mut w, manifest, compression)?;
        w.finish()?;
        Ok(())
    }

    /// Add the manifest, the state and guest memory of the paused machine to
    /// `w` (more sections, e.g. disks, may follow before `finish`).
    pub fn write_snapshot(
        &self,
        w: &mut MachineWriter,
        manifest: &Manifest,
        compression: Compression,
    ) -> Result<(), MachineError> {
        let state = self.save_state()?;
        let blob = state.to_bytes()?;
        let mut manifest = manifest.clone();
        manifest.vcpus = state.vcpus.len() as u32;
        manifest.memory_bytes = state.memory.iter().map(|r| r.size).sum();
        manifest.host_profile = self.profile.as_str().into();
        manifest.cpu = self.cpu.name().into();
        if manifest.producer.is_empty() {
            manifest.producer = format!("smolvm {}", env!("CARGO_PKG_VERSION"));
        }
        if manifest.created_unix_s == 0 {
            manifest.created_unix_s = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
        }
        w.add_manifest(&manifest)?;
        w.add_blob(SectionKind::VmState, &blob, Compression::None)?;
        // SAFETY: every vCPU is parked and every device paused (save_state
        // above fails otherwise; only `start` resumes them, and it needs
        // `&mut self`), so nothing writes guest memory while the writer reads
        // it: devices driven by host threads (the agent console) only buffer
        // input while paused.
        let slices = unsafe { self.memory.region_slices() };
        let regions: Vec<GuestRegion<'_>> = slices
            .into_iter()
            .map(|(guest_addr, data)| GuestRegion { guest_addr, data })
            .collect();
        w.add_memory(&regions, compression)?;
        Ok(())
    }

    /// Registers of vCPU `id` (parked), for inspection and tests.
    #[cfg(target_arch = "x86_64")]
    pub fn vcpu_regs(&self, id: usize) -> Result<kvm_bindings::kvm_regs, MachineError> {
        use crate::hypervisor::VcpuX86_64;
        let vcpu = self.parked.get(id).ok_or(MachineError::Running)?;
        Ok(vcpu.regs()?)
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if self.is_running() {
            self.control
                .finish(ExitReason::Error("machine dropped while running".into()));
            let _ = self.join();
        }
    }
}

/// The interrupt line of GSI `gsi` on `vm`, as the devices' trigger.
pub(crate) fn irq_line(
    vm: &BackendVm,
    gsi: u32,
) -> Result<Arc<dyn crate::devices::virtio::InterruptTrigger>, HypervisorError> {
    Ok(Arc::new(IrqLine(vm.interrupt_line(gsi)?)))
}

/// A backend interrupt line as the devices' interrupt trigger.
struct IrqLine(<BackendVm as Vm>::InterruptLine);

impl crate::devices::virtio::InterruptTrigger for IrqLine {
    fn trigger(&self) {
        if let Err(e) = self.0.trigger() {
            log::warn!("cannot raise GSI {}: {e}", self.0.gsi());
        }
    }
}

/// The backend's vCPU kick, for the run control.
pub(crate) fn kick(thread: std::os::unix::thread::RawPthread) {
    <BackendVcpu as Vcpu>::kick_thread(thread)
}
