//! Two roads to a machine: build for boot (fresh memory, vCPUs at a 64-bit
//! entry) and build from a snapshot (memory mapped from a `.smolmachine`,
//! state restored). Both share the helpers that create the VM in the order
//! KVM is fastest with: memory slots, then the IRQ chip, then the vCPUs.

use std::path::Path;
use std::sync::Arc;

use smolvm_formats::MachineReader;

use crate::arch::cpu_model::{CpuModel, CpuModelError};
use crate::device_manager::{DeviceArgs, DeviceError, DeviceManager, HostEnds};
use crate::devices::exit::EXIT_PORT;
use crate::host::{ArchError, HostProfile, ProfileError};
use crate::hypervisor::{Backend, BackendVcpu, BackendVm, Hypervisor, HypervisorError};
use crate::machine::{irq_line, kick, Machine};
use crate::memory::{GuestMemory, MemoryError, Run};
use crate::persist::Persist;
use crate::snapshot::{Guest, MachineState, StateError};
use crate::timing;
use crate::vstate::vcpu::RunControl;
use crate::vstate::vm::create_vm;

#[cfg(target_arch = "aarch64")]
use crate::arch::aarch64::layout::ram_regions;
#[cfg(target_arch = "x86_64")]
use crate::arch::x86_64::layout::ram_regions;

/// Errors from building a machine.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error("{0}")]
    Machine(#[from] crate::machine::MachineError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The machine file cannot be read.
    #[error("cannot read machine file: {0}")]
    File(#[from] smolvm_formats::Error),
    /// The machine was built for another CPU architecture than this host's.
    #[error(transparent)]
    WrongArch(#[from] ArchError),
    /// The file does not match its state.
    #[error("machine file does not fit: {0}")]
    Mismatch(String),
    /// A bad boot configuration.
    #[error("invalid machine configuration: {0}")]
    Config(String),
    /// This host's CPU cannot run (or build) the machine's CPU model.
    #[error(transparent)]
    Cpu(#[from] CpuModelError),
    /// The machine names a CPU model this smolvm does not know.
    #[error("it was built for CPU model '{0}', which this smolvm does not know: upgrade smolvm")]
    UnknownCpu(String),
}

/// What a booted machine looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// Number of vCPUs (one on PVM hosts: the guest's multi-CPU paths use
    /// hypercalls PVM does not complete).
    pub vcpus: u32,
    /// Guest RAM in bytes (a multiple of 4 KiB, at least 2 MiB).
    pub memory_bytes: u64,
    /// Create the in-kernel PIT (Linux wants it; the test guest does not).
    pub pit: bool,
    /// Port of the exit device, or None for no exit device.
    pub exit_port: Option<u16>,
    /// The CPU model the guest is shown.
    pub cpu: CpuModel,
}

impl Default for BootConfig {
    fn default() -> Self {
        BootConfig {
            vcpus: 1,
            memory_bytes: 128 << 20,
            pit: true,
            exit_port: Some(EXIT_PORT),
            cpu: CpuModel::default(),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn assemble(
    hv: Backend,
    vm: Arc<BackendVm>,
    memory: GuestMemory,
    vcpus: Vec<BackendVcpu>,
    pit: bool,
    devices: DeviceManager,
    control: Arc<RunControl>,
    guest: Guest,
    profile: HostProfile,
    cpu: CpuModel,
    needs_entry: bool,
) -> Machine {
    Machine {
        _hypervisor: hv,
        vm,
        memory,
        devices,
        parked: vcpus,
        threads: Vec::new(),
        control,
        pit,
        guest,
        profile,
        cpu,
        needs_entry,
    }
}

/// The CPU features a guest can use on this host: KVM's supported CPUID, or
/// on PVM the CPU's own (PVM does not trap CPUID; see `cpu_model::native_cpuid`).
#[cfg(target_arch = "x86_64")]
fn host_cpuid(
    hv: &Backend,
    profile: HostProfile,
) -> Result<Vec<kvm_bindings::kvm_cpuid_entry2>, HypervisorError> {
    use crate::arch::x86_64::cpu_model;
    use crate::hypervisor::HypervisorX86_64;
    if profile == HostProfile::KvmPvm {
        Ok(cpu_model::native_cpuid())
    } else {
        hv.supported_cpuid()
    }
}

/// Check that this host can build a machine of `cpu`, then write what the
/// architecture's boot needs before the kernel is loaded (x86_64: the boot
/// GDT and identity page tables).
#[cfg(target_arch = "x86_64")]
fn prepare_boot(
    hv: &Backend,
    profile: HostProfile,
    cpu: CpuModel,
    memory: &GuestMemory,
) -> Result<(), BuildError> {
    crate::arch::x86_64::cpu_model::check_build(cpu, &host_cpuid(hv, profile)?)?;
    crate::arch::x86_64::write_boot_tables(memory)?;
    Ok(())
}

/// aarch64: the only model (`host`) fits every host, and the kernel is
/// entered with the MMU off, so nothing is written before it.
#[cfg(target_arch = "aarch64")]
fn prepare_boot(
    _hv: &Backend,
    _profile: HostProfile,
    _cpu: CpuModel,
    _memory: &GuestMemory,
) -> Result<(), BuildError> {
    Ok(())
}

/// Check, before any vCPU exists, that this host can resume the machine: a
/// host that lacks a feature the guest was shown is refused in one line, not
/// by an ioctl error or a guest crash.
#[cfg(target_arch = "x86_64")]
fn check_resume_cpu(
    hv: &Backend,
    profile: HostProfile,
    plan: &SnapshotPlan,
) -> Result<(), BuildError> {
    crate::arch::x86_64::cpu_model::check_resume(
        plan.cpu,
        plan.state.vcpus[0].cpuid.as_slice(),
        &host_cpuid(hv, profile)?,
    )?;
    Ok(())
}

/// aarch64 (`host` model only): KVM itself refuses ID registers this host
/// cannot offer when the vCPU state is restored.
#[cfg(target_arch = "aarch64")]
fn check_resume_cpu(
    _hv: &Backend,
    _profile: HostProfile,
    _plan: &SnapshotPlan,
) -> Result<(), BuildError> {
    Ok(())
}

/// Tell each vCPU the machine's CPU model and vCPU count (x86_64: they
/// decide its CPUID and saved MSRs).
#[cfg(target_arch = "x86_64")]
fn set_cpu_model(vcpus: &mut [BackendVcpu], cpu: CpuModel) {
    use crate::hypervisor::VcpuX86_64;
    let count = vcpus.len() as u32;
    for v in vcpus {
        v.set_cpu_model(cpu, count);
    }
}

/// aarch64: nothing depends on the model yet.
#[cfg(target_arch = "aarch64")]
fn set_cpu_model(_vcpus: &mut [BackendVcpu], _cpu: CpuModel) {}

/// Build a machine for a fresh boot: zeroed memory with the boot GDT and
/// identity page tables written, vCPUs created. Load the guest image into
/// `machine.memory()`, then call `machine.set_entry(..)` and `start()`.
pub fn build_for_boot(config: &BootConfig) -> Result<Machine, BuildError> {
    if config.vcpus == 0 || config.vcpus as usize > crate::snapshot::MAX_VCPUS {
        return Err(BuildError::Config(format!("{} vCPUs", config.vcpus)));
    }
    if config.memory_bytes < (2 << 20) || !config.memory_bytes.is_multiple_of(4096) {
        return Err(BuildError::Config(format!(
            "memory of {} bytes: use a 4 KiB multiple of at least 2 MiB",
            config.memory_bytes
        )));
    }
    let profile = HostProfile::detect();
    let hv = Backend::open_default()?;
    let memory = GuestMemory::anonymous(&ram_regions(config.memory_bytes))?;
    prepare_boot(&hv, profile, config.cpu, &memory)?;
    let (vm, mut vcpus) = create_vm(&hv, &memory, config.pit, config.vcpus)?;
    set_cpu_model(&mut vcpus, config.cpu);
    let control = RunControl::new(kick);
    let mut devices = DeviceManager::new(control.clone());
    if let Some(port) = config.exit_port {
        devices.attach_exit_port(port)?;
    }
    Ok(assemble(
        hv,
        Arc::new(vm),
        memory,
        vcpus,
        config.pit,
        devices,
        control,
        Guest::TestGuest,
        profile,
        config.cpu,
        true,
    ))
}

/// Read and check everything in a machine file that a resume needs, before
/// any KVM object exists: manifest, host profile, state, memory layout.
pub struct SnapshotPlan {
    pub reader: MachineReader,
    pub manifest: smolvm_formats::Manifest,
    pub state: MachineState,
    pub layout: smolvm_formats::MemoryLayout,
    /// The CPU model its guest was shown.
    pub cpu: CpuModel,
}

impl SnapshotPlan {
    /// Open `path` (a `.smolmachine` or a packed executable) and validate it.
    pub fn open(path: &Path) -> Result<Self, BuildError> {
        Self::from_reader(MachineReader::open(path)?)
    }

    /// Validate an opened machine.
    pub fn from_reader(reader: MachineReader) -> Result<Self, BuildError> {
        crate::host::check_arch(reader.arch())?;
        let manifest = reader.manifest()?;
        HostProfile::detect().check_can_resume(&manifest.host_profile)?;
        let cpu = CpuModel::from_manifest(&manifest.cpu)
            .map_err(|_| BuildError::UnknownCpu(manifest.cpu.clone()))?;
        let blob = reader.read_blob(smolvm_formats::SectionKind::VmState)?;
        let state = MachineState::from_bytes(&blob)?;
        let layout = reader.memory_layout()?;
        let stored: Vec<(u64, u64)> = layout
            .regions
            .iter()
            .map(|r| (r.guest_addr, r.size))
            .collect();
        let expected: Vec<(u64, u64)> = state
            .memory
            .iter()
            .map(|r| (r.guest_addr, r.size))
            .collect();
        if stored != expected {
            return Err(BuildError::Mismatch(format!(
                "memory section has regions {stored:x?}, the state expects {expected:x?}"
            )));
        }
        Ok(SnapshotPlan {
            reader,
            manifest,
            state,
            layout,
            cpu,
        })
    }
}

/// Guest memory for a resume: mapped copy-on-write from the file, or
/// expanded when the memory section is compressed.
pub fn snapshot_memory(plan: &SnapshotPlan) -> Result<GuestMemory, BuildError> {
    if plan.layout.mappable {
        let mut regions: Vec<(u64, u64, Vec<Run>)> = Vec::with_capacity(plan.layout.regions.len());
        for r in &plan.layout.regions {
            let mut runs = Vec::with_capacity(r.runs.len());
            for run in &r.runs {
                let file_offset = match (run.zero, run.file_offset) {
                    (true, _) => None,
                    (false, Some(o)) => Some(o),
                    (false, None) => {
                        return Err(BuildError::Mismatch(format!(
                            "region {:#x} has a data run at {:#x} with no file offset",
                            r.guest_addr, run.offset
                        )))
                    }
                };
                runs.push(Run {
                    offset: run.offset,
                    len: run.len,
                    file_offset,
                });
            }
            regions.push((r.guest_addr, r.size, runs));
        }
        Ok(GuestMemory::map_file(plan.reader.file(), &regions)?)
    } else {
        let regions: Vec<(u64, u64)> = plan
            .layout
            .regions
            .iter()
            .map(|r| (r.guest_addr, r.size))
            .collect();
        GuestMemory::expanded(&regions, |i, bytes| {
            plan.reader
                .read_memory_region(i, bytes)
                .map_err(BuildError::File)
        })
    }
}

/// Build a machine from a validated snapshot whose devices need no host
/// ends (the test guest's); it resumes where it was saved when started.
pub fn build_from_snapshot(plan: SnapshotPlan) -> Result<Machine, BuildError> {
    build_from_snapshot_with(plan, HostEnds::default())
}

/// Build a machine from a validated snapshot, its devices restored by the
/// device manager with `ends` as their host side; it resumes where it was
/// saved when started.
pub fn build_from_snapshot_with(plan: SnapshotPlan, ends: HostEnds) -> Result<Machine, BuildError> {
    let profile = HostProfile::detect();
    let hv = Backend::open_default()?;
    check_resume_cpu(&hv, profile, &plan)?;
    let state = &plan.state;
    let memory = snapshot_memory(&plan)?;
    timing::mark("file-mapped");
    let (vm, mut vcpus) = create_vm(&hv, &memory, state.pit, state.vcpus.len() as u32)?;
    set_cpu_model(&mut vcpus, plan.cpu);
    timing::mark("vm-and-vcpus-created");
    // The ordering rules are the architecture's (`vstate::vm::restore_state`).
    crate::vstate::vm::restore_state(&vm, &vcpus, &state.vm, &state.vcpus)?;
    timing::mark("state-restored");
    let control = RunControl::new(kick);
    let devices = DeviceManager::restore(
        DeviceArgs {
            memory: &memory,
            control: control.clone(),
            irq: &|gsi| irq_line(&vm, gsi),
            ends,
        },
        &state.devices,
    )?;
    Ok(assemble(
        hv,
        Arc::new(vm),
        memory,
        vcpus,
        state.pit,
        devices,
        control,
        state.guest.clone(),
        profile,
        plan.cpu,
        false,
    ))
}

/// Open, validate and rebuild a machine from `path` in one call.
pub fn resume(path: &Path) -> Result<Machine, BuildError> {
    build_from_snapshot(SnapshotPlan::open(path)?)
}
