//! KVM on aarch64: vCPU init, the one-reg register state and the vgic-v3.
//! The register and GIC layouts and the ordering rules are in
//! `arch::aarch64::{regs, gic}`; this module only makes the KVM calls.

use kvm_bindings::{kvm_device_attr, kvm_mp_state, kvm_vcpu_init, RegList};
use kvm_ioctls::{DeviceFd, VcpuFd, VmFd};

use super::{KvmVcpu, KvmVm};
use crate::arch::aarch64::gic::{self, GicState, GicVcpuState, RegRange};
use crate::arch::aarch64::layout;
use crate::arch::aarch64::regs::{self, Entry, Reg, VcpuState};
use crate::hypervisor::{HypervisorError, VcpuAarch64, VmAarch64};
use crate::memory::GuestMemory;

type Result<T> = std::result::Result<T, HypervisorError>;

/// `kvm_vcpu_init.features[0]` for vCPU `id`: PSCI 0.2 for every vCPU (the
/// guest starts and stops its CPUs through PSCI calls KVM answers), and every
/// vCPU but the first powered off until PSCI CPU_ON starts it.
pub fn vcpu_features(id: u32) -> u32 {
    let mut f = 1 << kvm_bindings::KVM_ARM_VCPU_PSCI_0_2;
    if id > 0 {
        f |= 1 << kvm_bindings::KVM_ARM_VCPU_POWER_OFF;
    }
    f
}

/// `KVM_ARM_VCPU_INIT` a new vCPU with the host's preferred target
/// (`KVM_ARM_PREFERRED_TARGET`) and [`vcpu_features`]. Must come before any
/// register access and before the vgic is initialised.
pub(super) fn init_vcpu(vm: &VmFd, vcpu: &VcpuFd, id: u32) -> Result<()> {
    let mut kvi = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut kvi)
        .map_err(|e| HypervisorError::op("KVM_ARM_PREFERRED_TARGET", e))?;
    kvi.features[0] |= vcpu_features(id);
    vcpu.vcpu_init(&kvi)
        .map_err(|e| HypervisorError::op("KVM_ARM_VCPU_INIT", e))
}

fn get_u64(fd: &VcpuFd, id: u64, what: &'static str) -> Result<u64> {
    let mut b = [0u8; 8];
    fd.get_one_reg(id, &mut b)
        .map_err(|e| HypervisorError::op(what, e))?;
    Ok(u64::from_le_bytes(b))
}

fn set_u64(fd: &VcpuFd, id: u64, value: u64, what: &'static str) -> Result<()> {
    fd.set_one_reg(id, &value.to_le_bytes())
        .map(|_| ())
        .map_err(|e| HypervisorError::op(what, e))
}

/// Every register id `KVM_GET_REG_LIST` offers. kvm-bindings caps the list
/// at 500 entries (`ARM64_REGS_MAX`); arm64 KVM offers fewer (about 250-300).
fn reg_list(fd: &VcpuFd) -> Result<Vec<u64>> {
    const MAX: usize = 500;
    let mut list = RegList::new(MAX).map_err(|_| HypervisorError::Missing("a register list"))?;
    match fd.get_reg_list(&mut list) {
        Ok(()) => Ok(list.as_slice().to_vec()),
        Err(e) if e.errno() == libc::E2BIG => Err(HypervisorError::BadState(format!(
            "KVM offers {} registers, more than the {MAX} this VMM saves",
            list.as_fam_struct_ref().n
        ))),
        Err(e) => Err(HypervisorError::op("KVM_GET_REG_LIST", e)),
    }
}

impl VcpuAarch64 for KvmVcpu {
    fn configure_boot(&self, entry: &Entry) -> Result<()> {
        set_u64(
            &self.fd,
            regs::PSTATE,
            regs::PSTATE_EL1H_MASKED,
            "KVM_SET_ONE_REG pstate",
        )?;
        set_u64(&self.fd, regs::SP_EL1, entry.sp, "KVM_SET_ONE_REG sp_el1")?;
        set_u64(&self.fd, regs::x(0), entry.x0, "KVM_SET_ONE_REG x0")?;
        set_u64(&self.fd, regs::PC, entry.pc, "KVM_SET_ONE_REG pc")
    }

    fn mpidr(&self) -> Result<u64> {
        get_u64(&self.fd, regs::MPIDR_EL1, "KVM_GET_ONE_REG MPIDR_EL1")
    }

    fn save_state(&self) -> Result<VcpuState> {
        let ids = reg_list(&self.fd)?;
        let mut out = Vec::with_capacity(ids.len());
        let mut buf = [0u8; 256];
        for id in ids {
            let size = regs::reg_size(id);
            if size > buf.len() {
                return Err(HypervisorError::BadState(format!(
                    "register {id:#x} has {size} bytes"
                )));
            }
            self.fd
                .get_one_reg(id, &mut buf[..size])
                .map_err(|e| HypervisorError::op("KVM_GET_ONE_REG", e))?;
            out.push(Reg {
                id,
                value: buf[..size].to_vec(),
            });
        }
        let mp = self
            .fd
            .get_mp_state()
            .map_err(|e| HypervisorError::op("KVM_GET_MP_STATE", e))?;
        Ok(VcpuState {
            features: vcpu_features(self.id),
            regs: out,
            mp_state: mp.mp_state,
        })
    }

    fn restore_state(&self, state: &VcpuState) -> Result<()> {
        state.check().map_err(HypervisorError::BadState)?;
        if state.features != vcpu_features(self.id) {
            return Err(HypervisorError::BadState(format!(
                "vCPU {} was initialised with features {:#x}, this VMM uses {:#x}",
                self.id,
                state.features,
                vcpu_features(self.id)
            )));
        }
        for reg in regs::restore_order(&state.regs) {
            self.fd.set_one_reg(reg.id, &reg.value).map_err(|e| {
                HypervisorError::BadState(format!(
                    "this host's KVM refuses register {:#x}: {e}",
                    reg.id
                ))
            })?;
        }
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: state.mp_state,
            })
            .map_err(|e| HypervisorError::op("KVM_SET_MP_STATE", e))
    }
}

/// Read (`write` false) or write one vgic attribute through `value`.
fn gic_attr<T>(gic: &DeviceFd, group: u32, attr: u64, value: &mut T, write: bool) -> Result<()> {
    let mut a = kvm_device_attr {
        flags: 0,
        group,
        attr,
        addr: value as *mut T as u64,
    };
    if write {
        gic.set_device_attr(&a)
            .map_err(|e| HypervisorError::op("KVM_SET_DEVICE_ATTR (vgic)", e))
    } else {
        // SAFETY: `addr` points at `value`, a live T of the size the group's
        // registers have (u32 for distributor/redistributor, u64 for ICC).
        unsafe { gic.get_device_attr(&mut a) }
            .map_err(|e| HypervisorError::op("KVM_GET_DEVICE_ATTR (vgic)", e))
    }
}

fn save_ranges(
    gic: &DeviceFd,
    group: u32,
    base: u64,
    ranges: &[RegRange],
    dist: bool,
) -> Result<Vec<(u32, u32)>> {
    let mut out = Vec::new();
    for r in ranges {
        let (offset, words) = gic::range_words(r, dist);
        for w in 0..words {
            let off = offset + w * 4;
            let mut v = 0u32;
            gic_attr(gic, group, base | u64::from(off), &mut v, false)?;
            out.push((off, v));
        }
    }
    Ok(out)
}

fn restore_ranges(
    gic: &DeviceFd,
    group: u32,
    base: u64,
    ranges: &[RegRange],
    dist: bool,
    saved: &[(u32, u32)],
) -> Result<()> {
    for r in ranges {
        let (offset, words) = gic::range_words(r, dist);
        for w in 0..words {
            let off = offset + w * 4;
            let Some(&(_, mut v)) = saved.iter().find(|(o, _)| *o == off) else {
                return Err(HypervisorError::BadState(format!(
                    "GIC register {} ({off:#x}) missing",
                    r.name
                )));
            };
            if let Some(clear) = r.clear_offset {
                let mut ones = u32::MAX;
                gic_attr(
                    gic,
                    group,
                    base | u64::from(clear + (off - r.offset)),
                    &mut ones,
                    true,
                )?;
            }
            gic_attr(gic, group, base | u64::from(off), &mut v, true)?;
        }
    }
    Ok(())
}

impl KvmVm {
    fn gic(&self) -> Result<&DeviceFd> {
        self.gic
            .get()
            .ok_or(HypervisorError::Missing("a GIC (create_gic first)"))
    }
}

impl VmAarch64 for KvmVm {
    fn create_gic(&self, vcpus: u32) -> Result<()> {
        if vcpus == 0 || vcpus > layout::MAX_VCPUS {
            return Err(HypervisorError::BadState(format!(
                "{vcpus} vCPUs (1 to {} fit the GIC layout)",
                layout::MAX_VCPUS
            )));
        }
        let mut dev = kvm_bindings::kvm_create_device {
            type_: kvm_bindings::kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
            fd: 0,
            flags: 0,
        };
        let fd = self
            .fd
            .create_device(&mut dev)
            .map_err(|e| HypervisorError::op("KVM_CREATE_DEVICE (vgic-v3)", e))?;
        let mut dist = layout::GIC_DIST_BASE;
        gic_attr(
            &fd,
            kvm_bindings::KVM_DEV_ARM_VGIC_GRP_ADDR,
            u64::from(kvm_bindings::KVM_VGIC_V3_ADDR_TYPE_DIST),
            &mut dist,
            true,
        )?;
        let mut redist = layout::GIC_REDIST_BASE;
        gic_attr(
            &fd,
            kvm_bindings::KVM_DEV_ARM_VGIC_GRP_ADDR,
            u64::from(kvm_bindings::KVM_VGIC_V3_ADDR_TYPE_REDIST),
            &mut redist,
            true,
        )?;
        let mut nr = layout::NR_IRQS;
        gic_attr(
            &fd,
            kvm_bindings::KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
            0,
            &mut nr,
            true,
        )?;
        // CTRL_INIT takes no value; addr is ignored.
        let mut none = 0u64;
        gic_attr(
            &fd,
            kvm_bindings::KVM_DEV_ARM_VGIC_GRP_CTRL,
            u64::from(kvm_bindings::KVM_DEV_ARM_VGIC_CTRL_INIT),
            &mut none,
            true,
        )?;
        self.gic
            .set(fd)
            .map_err(|_| HypervisorError::BadState("the GIC exists already".into()))
    }

    fn save_gic(&self, mpidrs: &[u64]) -> Result<GicState> {
        let g = self.gic()?;
        let mut vcpus = Vec::with_capacity(mpidrs.len());
        for &mpidr in mpidrs {
            let base = gic::mpidr_attr(mpidr);
            let redist = save_ranges(
                g,
                kvm_bindings::KVM_DEV_ARM_VGIC_GRP_REDIST_REGS,
                base,
                gic::REDIST_REGS,
                false,
            )?;
            let sysregs = kvm_bindings::KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS;
            let mut ctlr = 0u64;
            gic_attr(g, sysregs, base | gic::ICC_CTLR_EL1, &mut ctlr, false)?;
            let mut icc = Vec::new();
            for id in gic::icc_regs(ctlr) {
                let mut v = 0u64;
                gic_attr(g, sysregs, base | id, &mut v, false)?;
                icc.push((id, v));
            }
            vcpus.push(GicVcpuState { redist, icc });
        }
        let dist = save_ranges(
            g,
            kvm_bindings::KVM_DEV_ARM_VGIC_GRP_DIST_REGS,
            0,
            gic::DIST_REGS,
            true,
        )?;
        Ok(GicState { dist, vcpus })
    }

    fn restore_gic(&self, mpidrs: &[u64], state: &GicState) -> Result<()> {
        let g = self.gic()?;
        if mpidrs.len() != state.vcpus.len() {
            return Err(HypervisorError::BadState(format!(
                "GIC state for {} vCPUs, the machine has {}",
                state.vcpus.len(),
                mpidrs.len()
            )));
        }
        restore_ranges(
            g,
            kvm_bindings::KVM_DEV_ARM_VGIC_GRP_DIST_REGS,
            0,
            gic::DIST_REGS,
            true,
            &state.dist,
        )?;
        for (&mpidr, v) in mpidrs.iter().zip(&state.vcpus) {
            let base = gic::mpidr_attr(mpidr);
            restore_ranges(
                g,
                kvm_bindings::KVM_DEV_ARM_VGIC_GRP_REDIST_REGS,
                base,
                gic::REDIST_REGS,
                false,
                &v.redist,
            )?;
            for &(id, value) in &v.icc {
                let mut value = value;
                gic_attr(
                    g,
                    kvm_bindings::KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS,
                    base | id,
                    &mut value,
                    true,
                )?;
            }
        }
        Ok(())
    }
}

/// The PC and the instruction there, for error messages.
pub fn describe_position(fd: &VcpuFd, memory: &GuestMemory) -> String {
    match get_u64(fd, regs::PC, "KVM_GET_ONE_REG pc") {
        Ok(pc) => {
            let mut insn = [0u8; 4];
            match memory.read(pc, &mut insn) {
                Ok(()) => format!(
                    "pc {pc:#x} (instruction {:#010x})",
                    u32::from_le_bytes(insn)
                ),
                Err(_) => format!("pc {pc:#x} (outside guest memory)"),
            }
        }
        Err(e) => format!("position unknown ({e})"),
    }
}
