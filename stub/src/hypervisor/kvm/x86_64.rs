//! x86_64 vCPU and VM state on KVM: boot setup, save and restore.
//!
//! The state types are the architecture's (`arch::x86_64::state`), kept apart from
//! the runtime objects here.
//! KVM's ordering rules are written beside the calls that depend on them.

use kvm_bindings::{
    kvm_clock_data, kvm_fpu, kvm_irqchip, kvm_msr_entry, kvm_pit_config, kvm_regs, kvm_sregs,
    kvm_xsave, CpuId, Msrs, Xsave, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use super::{KvmVcpu, KvmVm};
use crate::arch::x86_64::cpu_model::{self, CpuModel};
use crate::arch::x86_64::state::{FpuState, VcpuState, VmState};
use crate::arch::x86_64::{cpuid, interrupts, layout, msr, paging, regs};
use crate::hypervisor::HypervisorError;
use crate::hypervisor::{VcpuX86_64, VmX86_64};
use crate::memory::GuestMemory;

type Result<T> = std::result::Result<T, HypervisorError>;

fn op(name: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HypervisorError {
    move |e| HypervisorError::op(name, e)
}

fn fpu_to_bytes(fpu: &kvm_fpu) -> Vec<u8> {
    // SAFETY: kvm_fpu is a repr(C) struct of integers with explicit padding
    // fields, so every byte is initialised and readable.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (fpu as *const kvm_fpu).cast::<u8>(),
            std::mem::size_of::<kvm_fpu>(),
        )
    };
    bytes.to_vec()
}

fn fpu_from_bytes(bytes: &[u8]) -> Result<kvm_fpu> {
    if bytes.len() != std::mem::size_of::<kvm_fpu>() {
        return Err(HypervisorError::BadState(format!(
            "FPU state is {} bytes, expected {}",
            bytes.len(),
            std::mem::size_of::<kvm_fpu>()
        )));
    }
    // SAFETY: the length matches and every bit pattern is a valid kvm_fpu
    // (integers only); read_unaligned copes with the Vec's alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<kvm_fpu>()) })
}

/// Number of u32 entries past the legacy 4 KiB area that KVM_GET_XSAVE2 needs.
pub(super) fn xsave_fam_len(vm: &VmFd) -> usize {
    let size = vm.check_extension_int(Cap::Xsave2);
    let base = std::mem::size_of::<kvm_xsave>();
    if size as usize > base {
        (size as usize - base).div_ceil(4)
    } else {
        0
    }
}

/// The MSRs to save with their values: those of `wanted` (a CPU model's
/// allowlist), or of the host's KVM_GET_MSR_INDEX_LIST when None, that
/// KVM_GET_MSRS accepts. KVM_GET_MSRS stops at the first MSR it cannot read,
/// so that one is dropped and the batch continues after it.
fn read_msrs(kvm: &Kvm, fd: &VcpuFd, wanted: Option<Vec<u32>>) -> Result<Vec<(u32, u64)>> {
    let mut pending: Vec<u32> = match wanted {
        Some(list) => list,
        None => kvm
            .get_msr_index_list()
            .map_err(op("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec(),
    };
    let mut out = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let n = pending.len().min(KVM_MAX_MSR_ENTRIES);
        let entries: Vec<kvm_msr_entry> = pending[..n]
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| HypervisorError::BadState(format!("MSR list: {e:?}")))?;
        let read = fd.get_msrs(&mut msrs).map_err(op("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)));
        // Skip the entry that failed (if any) and go on after it.
        let consumed = (read + 1).min(n);
        pending.drain(..consumed);
    }
    Ok(out)
}

/// Write MSRs in chunks. Every one must be accepted: a machine's MSRs are
/// the ones its CPU model lets the guest use, so an MSR this host's KVM
/// refuses means the machine does not fit the host, and resuming anyway
/// would run the guest with state it did not leave.
fn write_msrs(fd: &VcpuFd, msrs: &[(u32, u64)]) -> Result<()> {
    let mut rest = msrs;
    while !rest.is_empty() {
        let n = rest.len().min(KVM_MAX_MSR_ENTRIES);
        let entries: Vec<kvm_msr_entry> = rest[..n]
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let wrapper = Msrs::from_entries(&entries)
            .map_err(|e| HypervisorError::BadState(format!("MSR list: {e:?}")))?;
        let written = fd.set_msrs(&wrapper).map_err(op("KVM_SET_MSRS"))?;
        if written < n {
            return Err(HypervisorError::MsrRefused {
                index: rest[written].0,
                value: rest[written].1,
            });
        }
        rest = &rest[n..];
    }
    Ok(())
}

fn get_chip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip).map_err(op("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

impl VmX86_64 for KvmVm {
    /// Create the in-kernel IRQ chip (PIC + IOAPIC + per-vCPU LAPIC) and the PIT.
    /// Call after the memory slots are registered: on PVM a slot added after the
    /// IRQ chip costs 5-8 ms instead of 0.1 ms.
    fn create_irqchip(&self, pit: bool) -> Result<()> {
        self.fd
            .set_tss_address(layout::KVM_TSS_ADDR as usize)
            .map_err(op("KVM_SET_TSS_ADDR"))?;
        self.fd
            .create_irq_chip()
            .map_err(op("KVM_CREATE_IRQCHIP"))?;
        if pit {
            let config = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            self.fd.create_pit2(config).map_err(op("KVM_CREATE_PIT2"))?;
        }
        Ok(())
    }

    /// Save the IRQ chips, the PIT (when `pit`) and kvmclock.
    fn save_state(&self, pit: bool) -> Result<VmState> {
        let clock = if self.kvm.check_extension(Cap::AdjustClock) {
            Some(self.fd.get_clock().map_err(op("KVM_GET_CLOCK"))?)
        } else {
            None
        };
        Ok(VmState {
            pic_master: get_chip(&self.fd, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get_chip(&self.fd, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get_chip(&self.fd, KVM_IRQCHIP_IOAPIC)?,
            pit: if pit {
                Some(self.fd.get_pit2().map_err(op("KVM_GET_PIT2"))?)
            } else {
                None
            },
            clock,
        })
    }

    /// Restore the IRQ chips and the PIT. The chips and PIT must exist
    /// (`create_irqchip`). The clock is restored separately, after the vCPUs.
    fn restore_irqchip(&self, state: &VmState) -> Result<()> {
        for (chip, id) in [
            (&state.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&state.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            if chip.chip_id != id {
                return Err(HypervisorError::BadState(format!(
                    "IRQ chip {id} saved as chip {}",
                    chip.chip_id
                )));
            }
            self.fd.set_irqchip(chip).map_err(op("KVM_SET_IRQCHIP"))?;
        }
        if let Some(pit) = &state.pit {
            self.fd.set_pit2(pit).map_err(op("KVM_SET_PIT2"))?;
        }
        Ok(())
    }

    /// Restore kvmclock. Done after every vCPU is restored, so that KVM
    /// propagates the clock to all of them (its master clock is per VM).
    /// Flags are cleared: the guest clock resumes from the saved value
    /// instead of jumping by the time the machine spent on disk.
    fn restore_clock(&self, state: &VmState) -> Result<()> {
        if let Some(clock) = &state.clock {
            let clock = kvm_clock_data {
                clock: clock.clock,
                ..Default::default()
            };
            self.fd.set_clock(&clock).map_err(op("KVM_SET_CLOCK"))?;
        }
        Ok(())
    }
}

impl KvmVcpu {
    fn configure_boot_with(
        &self,
        count: u32,
        model: CpuModel,
        boot_regs: &kvm_regs,
        boot_sregs: fn(kvm_sregs) -> kvm_sregs,
    ) -> Result<()> {
        let host = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(op("KVM_GET_SUPPORTED_CPUID"))?;
        let mut entries = cpu_model::cpuid_for(model, host.as_slice(), count);
        cpuid::patch_for_vcpu(&mut entries, self.id, count);
        let cpuid = CpuId::from_entries(&entries)
            .map_err(|e| HypervisorError::BadState(format!("CPUID table: {e:?}")))?;
        // CPUID first: KVM derives feature-dependent vCPU state from it.
        self.fd.set_cpuid2(&cpuid).map_err(op("KVM_SET_CPUID2"))?;
        write_msrs(&self.fd, &msr::boot_msrs())?;
        self.fd.set_regs(boot_regs).map_err(op("KVM_SET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(op("KVM_GET_SREGS"))?;
        self.fd
            .set_sregs(&boot_sregs(sregs))
            .map_err(op("KVM_SET_SREGS"))?;
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(op("KVM_SET_FPU"))?;
        // LAPIC after SREGS (the APIC base and mode come from there).
        let mut lapic = self.fd.get_lapic().map_err(op("KVM_GET_LAPIC"))?;
        // SAFETY: [i8; 1024] and [u8; 1024] have the same layout.
        let regs_u8 = unsafe { &mut *(&mut lapic.regs as *mut [i8; 1024]).cast::<[u8; 1024]>() };
        interrupts::set_lint(regs_u8);
        self.fd.set_lapic(&lapic).map_err(op("KVM_SET_LAPIC"))?;
        Ok(())
    }
}

impl VcpuX86_64 for KvmVcpu {
    fn set_cpu_model(&mut self, model: CpuModel, count: u32) {
        self.model = model;
        self.count = count;
    }

    fn configure_boot(&self, entry: &regs::Entry64, count: u32, model: CpuModel) -> Result<()> {
        self.configure_boot_with(count, model, &regs::boot_regs(entry), regs::boot_sregs)
    }

    fn configure_boot_pvh(
        &self,
        entry: &regs::EntryPvh,
        count: u32,
        model: CpuModel,
    ) -> Result<()> {
        self.configure_boot_with(count, model, &regs::pvh_regs(entry), regs::pvh_sregs)
    }

    fn regs(&self) -> Result<kvm_regs> {
        self.fd.get_regs().map_err(op("KVM_GET_REGS"))
    }

    /// Save everything KVM holds for this vCPU. The vCPU must be out of
    /// KVM_RUN with its last exit completed (paused).
    fn save_state(&self) -> Result<VcpuState> {
        let fd = &self.fd;
        // MP state first: KVM_GET_MP_STATE runs kvm_apic_accept_events(),
        // which can change vCPU and LAPIC state read below.
        let mp_state = fd.get_mp_state().map_err(op("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(op("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(op("KVM_GET_SREGS"))?;
        let fpu = if self.kvm.check_extension(Cap::Xsave) {
            let fam = self.xsave_fam;
            if fam > 0 {
                let mut xsave = Xsave::new(fam)
                    .map_err(|e| HypervisorError::BadState(format!("XSAVE buffer: {e:?}")))?;
                // SAFETY: the buffer has the size KVM_CAP_XSAVE2 reported, and
                // the VMM enables no XSTATE features dynamically.
                unsafe { fd.get_xsave2(&mut xsave) }.map_err(op("KVM_GET_XSAVE2"))?;
                let mut words = xsave.as_fam_struct_ref().xsave.region.to_vec();
                words.extend_from_slice(xsave.as_slice());
                FpuState::Xsave(words)
            } else {
                let xsave = fd.get_xsave().map_err(op("KVM_GET_XSAVE"))?;
                FpuState::Xsave(xsave.region.to_vec())
            }
        } else {
            FpuState::Legacy(fpu_to_bytes(&fd.get_fpu().map_err(op("KVM_GET_FPU"))?))
        };
        // A model without XSAVE keeps XCR0 at its reset value, and hosts
        // without XSAVE refuse KVM_SET_XCRS: such a machine saves none.
        let xcrs_used = !self.model.is_named() || self.model.xcr0() != Some(0b11);
        let xcrs = if xcrs_used && self.kvm.check_extension(Cap::Xcrs) {
            Some(fd.get_xcrs().map_err(op("KVM_GET_XCRS"))?)
        } else {
            None
        };
        let debug_regs = if self.kvm.check_extension(Cap::Debugregs) {
            Some(fd.get_debug_regs().map_err(op("KVM_GET_DEBUGREGS"))?)
        } else {
            None
        };
        let lapic = fd.get_lapic().map_err(op("KVM_GET_LAPIC"))?;
        let msrs = read_msrs(&self.kvm, fd, cpu_model::saved_msrs(self.model))?;
        // vCPU events after REGS: pending exceptions and interrupt shadows
        // refer to the RIP saved above.
        let vcpu_events = if self.kvm.check_extension(Cap::VcpuEvents) {
            Some(fd.get_vcpu_events().map_err(op("KVM_GET_VCPU_EVENTS"))?)
        } else {
            None
        };
        let tsc_khz = if self.kvm.check_extension(Cap::GetTscKhz) {
            fd.get_tsc_khz().ok()
        } else {
            None
        };
        let reported = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(op("KVM_GET_CPUID2"))?;
        let cpuid = CpuId::from_entries(&cpu_model::saved_cpuid(
            self.model,
            reported.as_slice(),
            self.id,
            self.count,
        ))
        .map_err(|e| HypervisorError::BadState(format!("CPUID table: {e:?}")))?;
        Ok(VcpuState {
            id: self.id,
            cpuid,
            mp_state,
            regs,
            sregs,
            fpu,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            vcpu_events,
            tsc_khz,
        })
    }

    /// Restore a freshly created vCPU from `state`.
    fn restore_state(&self, state: &VcpuState) -> Result<()> {
        let fd = &self.fd;
        // TSC frequency before anything that reads or writes the TSC. A
        // named CPU model hides the invariant TSC, so its guest keeps time
        // with kvmclock, which KVM derives from this host's TSC frequency
        // whatever the guest's TSC rate: nothing to set, and a host without
        // TSC scaling runs it correctly. A `host` machine's guest may clock
        // itself by the TSC, so its rate must be the saved one.
        if let (Some(khz), false) = (state.tsc_khz, self.model.is_named()) {
            let here = fd.get_tsc_khz().ok();
            if here != Some(khz) {
                let scaled =
                    self.kvm.check_extension(Cap::TscControl) && fd.set_tsc_khz(khz).is_ok();
                if !scaled {
                    return Err(HypervisorError::TscRate {
                        saved: khz,
                        here: here.unwrap_or(0),
                    });
                }
            }
        }
        // CPUID before any other state: KVM sizes XSAVE and gates MSRs and
        // LAPIC modes on the guest's CPUID.
        fd.set_cpuid2(&state.cpuid).map_err(op("KVM_SET_CPUID2"))?;
        // MP state first of the run state (it can reset LAPIC events).
        fd.set_mp_state(state.mp_state)
            .map_err(op("KVM_SET_MP_STATE"))?;
        fd.set_regs(&state.regs).map_err(op("KVM_SET_REGS"))?;
        // SREGS before LAPIC: APIC base and x2APIC mode are set through SREGS.
        fd.set_sregs(&state.sregs).map_err(op("KVM_SET_SREGS"))?;
        match &state.fpu {
            FpuState::Xsave(words) => {
                let fam = self.xsave_fam;
                let mut xsave = Xsave::new(fam)
                    .map_err(|e| HypervisorError::BadState(format!("XSAVE buffer: {e:?}")))?;
                let region_len = xsave.as_fam_struct_ref().xsave.region.len();
                if words.len() < region_len {
                    return Err(HypervisorError::BadState(format!(
                        "XSAVE area of {} words is shorter than {region_len}",
                        words.len()
                    )));
                }
                let extra = &words[region_len..];
                if extra.len() > fam && extra[fam..].iter().any(|&w| w != 0) {
                    return Err(HypervisorError::BadState(
                        "the saved XSAVE area uses CPU features this host lacks".into(),
                    ));
                }
                // SAFETY: the header is plain data and not resized here.
                let region = unsafe { &mut xsave.as_mut_fam_struct().xsave.region };
                region.copy_from_slice(&words[..region_len]);
                let extra = &words[region_len..];
                let n = extra.len().min(fam);
                xsave.as_mut_slice()[..n].copy_from_slice(&extra[..n]);
                // SAFETY: the buffer has the size KVM_CAP_XSAVE2 reports (or
                // the legacy 4 KiB without it).
                unsafe { fd.set_xsave2(&xsave) }.map_err(op("KVM_SET_XSAVE"))?;
            }
            FpuState::Legacy(bytes) => {
                fd.set_fpu(&fpu_from_bytes(bytes)?)
                    .map_err(op("KVM_SET_FPU"))?;
            }
        }
        if let Some(xcrs) = &state.xcrs {
            fd.set_xcrs(xcrs).map_err(op("KVM_SET_XCRS"))?;
        }
        if let Some(dr) = &state.debug_regs {
            fd.set_debug_regs(dr).map_err(op("KVM_SET_DEBUGREGS"))?;
        }
        fd.set_lapic(&state.lapic).map_err(op("KVM_SET_LAPIC"))?;
        // MSRs after LAPIC (TSC deadline needs the LAPIC timer mode), with
        // IA32_TSC before IA32_TSC_DEADLINE.
        let mut order: Vec<u32> = state.msrs.iter().map(|m| m.0).collect();
        msr::restore_order(&mut order);
        let msrs: Vec<(u32, u64)> = order
            .iter()
            .filter_map(|i| state.msrs.iter().find(|m| m.0 == *i).copied())
            .collect();
        write_msrs(fd, &msrs)?;
        // vCPU events last and after REGS: they re-inject pending exceptions
        // and interrupts relative to the restored RIP.
        if let Some(ev) = &state.vcpu_events {
            fd.set_vcpu_events(ev).map_err(op("KVM_SET_VCPU_EVENTS"))?;
        }
        // Tell a kvmclock guest that this vCPU was stopped (PVCLOCK_GUEST_STOPPED in its
        // clock page): its soft-lockup watchdog then takes the gap for a pause, not for a
        // hung CPU to report and recover from on the resumed guest's time. KVM refuses it
        // (EINVAL) for a guest that never enabled kvmclock, which is fine: nothing to tell.
        let _ = fd.kvmclock_ctrl();
        Ok(())
    }
}

/// "RIP 0x... (phys 0x...): bytes" for an error message.
pub fn describe_position(fd: &VcpuFd, memory: &GuestMemory) -> String {
    let (Ok(r), Ok(s)) = (fd.get_regs(), fd.get_sregs()) else {
        return String::from("RIP unknown (cannot read registers)");
    };
    let linear = s.cs.base.wrapping_add(r.rip);
    let phys = if s.cr0 & (1 << 31) != 0 && s.efer & (1 << 10) != 0 {
        paging::translate(s.cr3, linear, |a| memory.read_u64(a).ok())
    } else {
        Some(linear)
    };
    let Some(phys) = phys else {
        return format!("RIP {:#x} (not mapped by the guest page tables)", r.rip);
    };
    let mut bytes = [0u8; 16];
    let mut n = 0;
    for (i, b) in bytes.iter_mut().enumerate() {
        let mut one = [0u8; 1];
        if memory.read(phys + i as u64, &mut one).is_err() {
            break;
        }
        *b = one[0];
        n += 1;
    }
    let hex: Vec<String> = bytes[..n].iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "RIP {:#x} (guest-physical {phys:#x}), CPL {}, instruction bytes: {}",
        r.rip,
        s.cs.dpl,
        if hex.is_empty() {
            String::from("(outside guest memory)")
        } else {
            hex.join(" ")
        }
    )
}

impl crate::persist::Persist for KvmVcpu {
    type State = VcpuState;
    type Args<'a> = &'a KvmVm;
    type Error = HypervisorError;

    fn save(&self) -> Result<VcpuState> {
        self.save_state()
    }

    /// Create vCPU `state.id` in `vm` and restore it. The VM's memory slots
    /// and IRQ chip must exist (the LAPIC is created with the vCPU).
    fn restore(vm: &KvmVm, state: &VcpuState) -> Result<Self> {
        let vcpu = crate::hypervisor::Vm::create_vcpu(vm, state.id)?;
        vcpu.restore_state(state)?;
        Ok(vcpu)
    }
}
