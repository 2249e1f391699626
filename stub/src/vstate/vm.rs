//! Creating the VM (memory slots, the interrupt controller and the vCPUs in each
//! architecture's order) and saving and restoring its VM-wide state.

#[cfg(target_os = "linux")]
use crate::hypervisor::{Backend, BackendVcpu, BackendVm, Hypervisor};
use crate::hypervisor::{HypervisorError, Vm};
use crate::memory::GuestMemory;

/// Register every region of `memory` as a memory slot of `vm`, in order.
///
/// # Safety
/// `memory` must outlive `vm` (its mappings back the slots).
pub unsafe fn register_memory<V: Vm>(vm: &V, memory: &GuestMemory) -> Result<(), HypervisorError> {
    for (slot, (guest_addr, host, size)) in memory.host_regions().into_iter().enumerate() {
        // SAFETY: the caller keeps `memory` alive for the life of `vm`.
        unsafe { vm.map_memory(slot as u32, guest_addr, host, size)? };
    }
    Ok(())
}

/// Create the VM with `memory` registered, its interrupt controller and
/// `count` vCPUs, in the order each architecture needs:
/// - x86_64: the IRQ chip (and PIT when `pit`) before the vCPUs: KVM adds
///   memory slots much faster before the IRQ chip exists (0.1 ms against
///   5-8 ms measured on PVM), and each vCPU's LAPIC needs the chip;
/// - aarch64 (no PIT): the vCPUs (each initialised by the backend: PSCI,
///   vCPUs other than 0 powered off), then the GICv3: its init sizes the
///   redistributors by the vCPUs that exist, and the irqfds of the devices
///   attached afterwards need it (`arch::aarch64::gic`).
#[cfg(target_os = "linux")]
pub fn create_vm(
    hv: &Backend,
    memory: &GuestMemory,
    pit: bool,
    count: u32,
) -> Result<(BackendVm, Vec<BackendVcpu>), HypervisorError> {
    let vm = hv.create_vm()?;
    // SAFETY: the owner of the returned VM (a Machine, the aarch64 test
    // guest) keeps `memory` and drops it after the VM and vCPUs.
    unsafe { register_memory(&vm, memory)? };
    #[cfg(target_arch = "x86_64")]
    {
        use crate::hypervisor::VmX86_64;
        vm.create_irqchip(pit)?;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = pit;
    let vcpus = (0..count)
        .map(|id| vm.create_vcpu(id))
        .collect::<Result<Vec<_>, _>>()?;
    #[cfg(target_arch = "aarch64")]
    {
        use crate::hypervisor::VmAarch64;
        vm.create_gic(count)?;
    }
    Ok((vm, vcpus))
}

#[cfg(target_os = "linux")]
use crate::arch::state::{VcpuState, VmState};

/// Save the VM-wide state and every vCPU's, all vCPUs out of the guest
/// with their last exit completed. x86_64: the vCPUs, then the interrupt
/// controllers, PIT and clock.
#[cfg(target_arch = "x86_64")]
pub fn save_state(
    vm: &BackendVm,
    vcpus: &[BackendVcpu],
    pit: bool,
) -> Result<(VmState, Vec<VcpuState>), HypervisorError> {
    use crate::hypervisor::{VcpuX86_64, VmX86_64};
    let saved = vcpus
        .iter()
        .map(|v| v.save_state())
        .collect::<Result<Vec<_>, _>>()?;
    Ok((vm.save_state(pit)?, saved))
}

/// aarch64: the vCPUs' registers, then the GIC, whose redistributors are
/// addressed by each vCPU's MPIDR_EL1.
#[cfg(target_arch = "aarch64")]
pub fn save_state(
    vm: &BackendVm,
    vcpus: &[BackendVcpu],
    _pit: bool,
) -> Result<(VmState, Vec<VcpuState>), HypervisorError> {
    use crate::hypervisor::{VcpuAarch64, VmAarch64};
    let saved = vcpus
        .iter()
        .map(|v| v.save_state())
        .collect::<Result<Vec<_>, _>>()?;
    let mpidrs = vcpus
        .iter()
        .map(|v| v.mpidr())
        .collect::<Result<Vec<_>, _>>()?;
    Ok((
        VmState {
            gic: vm.save_gic(&mpidrs)?,
        },
        saved,
    ))
}

/// Restore a VM created by `create_vm` for a resume, before any vCPU runs.
/// x86_64: the IRQ chips and PIT first, then each vCPU (its LAPIC
/// included), then the clock, which KVM propagates to the vCPUs that exist.
#[cfg(target_arch = "x86_64")]
pub fn restore_state(
    vm: &BackendVm,
    vcpus: &[BackendVcpu],
    state: &VmState,
    saved: &[VcpuState],
) -> Result<(), HypervisorError> {
    use crate::hypervisor::{VcpuX86_64, VmX86_64};
    vm.restore_irqchip(state)?;
    for (vcpu, s) in vcpus.iter().zip(saved) {
        vcpu.restore_state(s)?;
    }
    vm.restore_clock(state)
}

/// aarch64: every vCPU's registers first (MPIDR_EL1 among them, which names
/// its redistributor), then the GIC: KVM resolves a redistributor's
/// registers through the vCPU with that MPIDR, as Firecracker and
/// cloud-hypervisor restore it (vCPUs, then the vGIC).
#[cfg(target_arch = "aarch64")]
pub fn restore_state(
    vm: &BackendVm,
    vcpus: &[BackendVcpu],
    state: &VmState,
    saved: &[VcpuState],
) -> Result<(), HypervisorError> {
    use crate::hypervisor::{VcpuAarch64, VmAarch64};
    for (vcpu, s) in vcpus.iter().zip(saved) {
        vcpu.restore_state(s)?;
    }
    let mpidrs = vcpus
        .iter()
        .map(|v| v.mpidr())
        .collect::<Result<Vec<_>, _>>()?;
    vm.restore_gic(&mpidrs, &state.gic)
}
