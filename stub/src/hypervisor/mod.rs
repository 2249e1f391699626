//! The hypervisor seam: the operations the VMM needs from a backend.
//!
//! The machine, the builder and the run loop are written against these traits
//! only: [`Hypervisor`], [`Vm`] and [`Vcpu`] for what every backend does, and
//! per-architecture extension traits ([`VmX86_64`], [`VcpuX86_64`]; `VmAarch64`,
//! `VcpuAarch64` on aarch64) for
//! interrupt controllers, boot entry and the saved register state, whose types
//! are the architecture's (`arch::x86_64::state`), not the backend's. Exits
//! come back as the backend-neutral [`VcpuExit`]; port I/O and MMIO exits go
//! to the device buses, so devices never see the backend. The build picks one
//! backend per target ([`Backend`]); KVM on aarch64 implements the same
//! traits in `kvm::aarch64`, and another backend (macOS Hypervisor.framework)
//! would in its own module.

#[cfg(target_os = "linux")]
pub mod kvm;

use std::os::unix::thread::RawPthread;

/// Why `Vcpu::run` returned. Borrowed data must be consumed (reads filled in)
/// before the next `run`.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// The guest read from an I/O port: `data.len() / size` accesses of
    /// `size` bytes (1, 2 or 4), more than one for string I/O (`rep ins`).
    IoIn {
        port: u16,
        size: u8,
        data: &'a mut [u8],
    },
    /// The guest wrote to an I/O port: `data.len() / size` accesses of
    /// `size` bytes, more than one for string I/O (`rep outs`).
    IoOut { port: u16, size: u8, data: &'a [u8] },
    /// The guest read from a guest-physical address that has no memory.
    MmioRead { addr: u64, data: &'a mut [u8] },
    /// The guest wrote to a guest-physical address that has no memory.
    MmioWrite { addr: u64, data: &'a [u8] },
    /// The vCPU executed `HLT` and the backend returned it to user space.
    Hlt,
    /// Triple fault or reset request.
    Shutdown,
    /// The run was cut short by a kick (`Vcpu::kick_thread`) or a pending
    /// immediate exit; pending I/O has been completed, guest state is consistent.
    Interrupted,
    /// The backend could not run or emulate the guest (KVM_EXIT_INTERNAL_ERROR).
    InternalError { suberror: u32, data: Vec<u64> },
    /// The hardware refused to enter the guest.
    FailEntry { reason: u64 },
    /// A system event (reset, shutdown, crash) reported by the backend.
    SystemEvent { kind: u32 },
    /// Any exit the VMM does not handle, by name.
    Unhandled(&'static str),
}

/// Errors from a hypervisor backend: the operation that failed and the OS error.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// Opening the hypervisor device failed; the message says what to do
    /// (see [`HypervisorError::open`]).
    #[error("{}", open_message(path, err))]
    Open {
        path: std::path::PathBuf,
        err: std::io::Error,
    },
    /// An ioctl or system call failed.
    #[error("{op} failed: {source}")]
    Op {
        op: &'static str,
        source: std::io::Error,
    },
    /// The host lacks something the VMM needs.
    #[error("the hypervisor lacks {0}")]
    Missing(&'static str),
    /// Saved state does not fit this host or is inconsistent.
    #[error("invalid vCPU/VM state: {0}")]
    BadState(String),
    /// KVM refused a saved MSR on restore: the machine was built for
    /// another kind of CPU.
    #[error("this host's KVM refuses the machine's MSR {index:#x} (value {value:#x}): rebuild it with a named --cpu model (the default x86-64)")]
    MsrRefused { index: u32, value: u64 },
    /// A `host` machine's TSC rate cannot be kept on this host.
    #[error("this machine's guest counts time at a TSC rate of {saved} kHz, this host's TSC runs at {here} kHz and KVM cannot scale it: rebuild it with a named --cpu model (the default x86-64)")]
    TscRate { saved: u32, here: u32 },
}

impl HypervisorError {
    /// The error for a failed open of the hypervisor device at `path`.
    pub fn open(path: &std::path::Path, err: std::io::Error) -> Self {
        HypervisorError::Open {
            path: path.to_owned(),
            err,
        }
    }

    pub(crate) fn op(op: &'static str, source: impl Into<std::io::Error>) -> Self {
        HypervisorError::Op {
            op,
            source: source.into(),
        }
    }
}

/// One line saying why the hypervisor device cannot be used and what to do:
/// the usual cases are a host without KVM and a user outside the kvm group.
fn open_message(path: &std::path::Path, err: &std::io::Error) -> String {
    let path = path.display();
    match err.kind() {
        std::io::ErrorKind::NotFound => format!(
            "{path} not found: this machine needs KVM (load kvm_intel/kvm_amd, or enable nested virtualisation)"
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            "permission denied on {path}: add yourself to the kvm group (sudo usermod -aG kvm $USER) and log in again"
        ),
        _ if matches!(err.raw_os_error(), Some(libc::ENXIO | libc::ENODEV)) => format!(
            "{path} has no KVM driver behind it: load kvm_intel/kvm_amd, or enable nested virtualisation"
        ),
        _ => format!("cannot open {path}: {err}"),
    }
}

/// A hypervisor: creates VMs.
pub trait Hypervisor: Sized {
    /// The VM type of this backend.
    type Vm: Vm;
    /// Open the host's hypervisor and check what the VMM relies on.
    fn open_default() -> Result<Self, HypervisorError>;
    /// Create an empty VM (no memory, no vCPUs).
    fn create_vm(&self) -> Result<Self::Vm, HypervisorError>;
}

/// A guest interrupt line that a device raises (edge-triggered).
pub trait InterruptLine: Send + Sync {
    /// Raise the interrupt.
    fn trigger(&self) -> Result<(), HypervisorError>;
    /// The line's number (GSI).
    fn gsi(&self) -> u32;
}

/// A VM: guest memory slots, interrupt lines and vCPUs.
pub trait Vm: Send + Sync {
    /// The vCPU type of this backend.
    type Vcpu: Vcpu;
    /// The interrupt line type of this backend.
    type InterruptLine: InterruptLine + 'static;

    /// An interrupt line for `gsi` (the interrupt controller must exist).
    fn interrupt_line(&self, gsi: u32) -> Result<Self::InterruptLine, HypervisorError>;

    /// Make `size` bytes at `host_addr` the guest-physical range at `guest_addr`.
    ///
    /// # Safety
    /// `host_addr..host_addr+size` must stay mapped (and not be reused) for
    /// the life of the VM.
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        host_addr: *mut u8,
        size: u64,
    ) -> Result<(), HypervisorError>;

    /// Create vCPU `id`.
    fn create_vcpu(&self, id: u32) -> Result<Self::Vcpu, HypervisorError>;
}

/// A virtual CPU, run by one thread at a time.
pub trait Vcpu: Send {
    /// This vCPU's index.
    fn id(&self) -> u32;

    /// Enter the guest until the next exit.
    fn run(&mut self) -> Result<VcpuExit<'_>, HypervisorError>;

    /// Ask the next `run` to return [`VcpuExit::Interrupted`] at once (after
    /// completing pending I/O), or clear that request.
    fn set_immediate_exit(&mut self, on: bool);

    /// Arm the kick for the calling thread: after this, `kick_thread` on this
    /// thread makes the current or next `run` return `Interrupted`.
    fn arm_kick(&mut self);

    /// Disarm the kick before the vCPU leaves the calling thread.
    fn disarm_kick(&mut self);

    /// Kick the vCPU running on `thread` out of the guest.
    fn kick_thread(thread: RawPthread);

    /// Describe the guest's current position for an error message: the
    /// instruction pointer and the bytes there, read from guest memory.
    fn describe_position(&self, memory: &crate::memory::GuestMemory) -> String;
}

/// x86_64 hypervisor queries.
#[cfg(target_arch = "x86_64")]
pub trait HypervisorX86_64: Hypervisor {
    /// The CPUID the hypervisor can offer a guest on this host.
    fn supported_cpuid(&self) -> Result<Vec<kvm_bindings::kvm_cpuid_entry2>, HypervisorError>;
}

/// x86_64 VM operations: the in-kernel interrupt controllers, PIT and clock.
#[cfg(target_arch = "x86_64")]
pub trait VmX86_64: Vm {
    /// Create the interrupt controllers (PIC, IOAPIC, per-vCPU LAPIC) and,
    /// when `pit`, the PIT. Call after the memory slots exist and before the
    /// vCPUs are created.
    fn create_irqchip(&self, pit: bool) -> Result<(), HypervisorError>;
    /// Save the interrupt controllers, the PIT (when `pit`) and the clock.
    fn save_state(&self, pit: bool) -> Result<X86VmState, HypervisorError>;
    /// Restore the interrupt controllers and the PIT, before the vCPUs.
    fn restore_irqchip(&self, state: &X86VmState) -> Result<(), HypervisorError>;
    /// Restore the guest clock, after every vCPU is restored.
    fn restore_clock(&self, state: &X86VmState) -> Result<(), HypervisorError>;
}

/// x86_64 vCPU operations: boot entry and the saved register state.
#[cfg(target_arch = "x86_64")]
pub trait VcpuX86_64: Vcpu {
    /// The machine's CPU model and vCPU count, before a boot or restore: they
    /// decide the CPUID saved, which MSRs are saved and whether the TSC rate
    /// must match on restore.
    fn set_cpu_model(&mut self, model: CpuModel, count: u32);
    /// Set this vCPU (one of `count`) up for a direct 64-bit entry, with
    /// the CPUID of CPU model `model`.
    fn configure_boot(
        &self,
        entry: &crate::arch::x86_64::regs::Entry64,
        count: u32,
        model: CpuModel,
    ) -> Result<(), HypervisorError>;
    /// Set this vCPU (one of `count`) up for a PVH entry (32-bit, paging
    /// off), with the CPUID of CPU model `model`.
    fn configure_boot_pvh(
        &self,
        entry: &crate::arch::x86_64::regs::EntryPvh,
        count: u32,
        model: CpuModel,
    ) -> Result<(), HypervisorError>;
    /// Save every register and piece of state the vCPU holds. The vCPU must be
    /// out of the guest with its last exit completed.
    fn save_state(&self) -> Result<X86VcpuState, HypervisorError>;
    /// Restore a freshly created vCPU (created after the interrupt controllers).
    fn restore_state(&self, state: &X86VcpuState) -> Result<(), HypervisorError>;
    /// The general-purpose registers, for inspection.
    fn regs(&self) -> Result<kvm_bindings::kvm_regs, HypervisorError>;
}

/// aarch64 VM operations: the in-kernel GICv3.
#[cfg(target_arch = "aarch64")]
pub trait VmAarch64: Vm {
    /// Create and initialise the GICv3 for `vcpus` vCPUs. Call after every
    /// vCPU is created (the init sizes the redistributors) and before any
    /// interrupt line (irqfds need it); see `arch::aarch64::gic`.
    fn create_gic(&self, vcpus: u32) -> Result<(), HypervisorError>;
    /// Save the GIC: the vCPUs, whose MPIDR_EL1 values are `mpidrs` in vCPU
    /// order, must be out of the guest.
    fn save_gic(&self, mpidrs: &[u64]) -> Result<AArch64GicState, HypervisorError>;
    /// Restore the GIC after every vCPU's registers, before the first run.
    fn restore_gic(&self, mpidrs: &[u64], state: &AArch64GicState) -> Result<(), HypervisorError>;
}

/// aarch64 vCPU operations: boot entry and the saved register state. The
/// backend initialises each vCPU (`KVM_ARM_VCPU_INIT`, PSCI 0.2; vCPUs other
/// than 0 powered off until a PSCI CPU_ON) when it creates it.
#[cfg(target_arch = "aarch64")]
pub trait VcpuAarch64: Vcpu {
    /// Set the entry registers: PC, SP_EL1, x0, PSTATE at EL1h masked.
    fn configure_boot(
        &self,
        entry: &crate::arch::aarch64::regs::Entry,
    ) -> Result<(), HypervisorError>;
    /// MPIDR_EL1, which names the vCPU's redistributor.
    fn mpidr(&self) -> Result<u64, HypervisorError>;
    /// Save every register `KVM_GET_REG_LIST` offers and the MP state. The
    /// vCPU must be out of the guest with its last exit completed.
    fn save_state(&self) -> Result<AArch64VcpuState, HypervisorError>;
    /// Restore a freshly created vCPU, in `regs::restore_order`.
    fn restore_state(&self, state: &AArch64VcpuState) -> Result<(), HypervisorError>;
}

#[cfg(target_arch = "aarch64")]
use crate::arch::aarch64::{gic::GicState as AArch64GicState, regs::VcpuState as AArch64VcpuState};

#[cfg(target_arch = "x86_64")]
use crate::arch::x86_64::cpu_model::CpuModel;
#[cfg(target_arch = "x86_64")]
use crate::arch::x86_64::state::{VcpuState as X86VcpuState, VmState as X86VmState};

/// The backend this build runs on.
#[cfg(target_os = "linux")]
pub type Backend = kvm::KvmHypervisor;
/// The backend's VM.
#[cfg(target_os = "linux")]
pub type BackendVm = <Backend as Hypervisor>::Vm;
/// The backend's vCPU.
#[cfg(target_os = "linux")]
pub type BackendVcpu = <BackendVm as Vm>::Vcpu;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::path::Path;

    fn message(err: io::Error) -> String {
        HypervisorError::open(Path::new("/dev/kvm"), err).to_string()
    }

    #[test]
    fn open_errors_say_what_to_do() {
        assert_eq!(
            message(io::Error::from_raw_os_error(libc::ENOENT)),
            "/dev/kvm not found: this machine needs KVM (load kvm_intel/kvm_amd, or enable nested virtualisation)"
        );
        for errno in [libc::EACCES, libc::EPERM] {
            assert_eq!(
                message(io::Error::from_raw_os_error(errno)),
                "permission denied on /dev/kvm: add yourself to the kvm group (sudo usermod -aG kvm $USER) and log in again"
            );
        }
        assert!(message(io::Error::from_raw_os_error(libc::ENXIO)).contains("no KVM driver"));
        let other = message(io::Error::from_raw_os_error(libc::EMFILE));
        assert!(other.starts_with("cannot open /dev/kvm: "), "{other}");
        for m in [message(io::ErrorKind::NotFound.into()), other] {
            assert!(!m.contains('\n'), "one line: {m}");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_missing_device_is_reported_by_kind() {
        let e = kvm::KvmHypervisor::open(Path::new("/nonexistent/kvm"))
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .starts_with("/nonexistent/kvm not found: this machine needs KVM"),
            "{e}"
        );
    }
}
