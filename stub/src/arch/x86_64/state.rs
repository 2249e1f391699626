//! The saved state of an x86_64 machine's vCPUs and interrupt controllers:
//! plain serde data, apart from the backend objects that produce and consume
//! it. The layouts are KVM's (`kvm-bindings`), which are also the x86
//! architectural layouts (XSAVE area, LAPIC register page, MSR index/value
//! pairs); any x86_64 backend reads and writes these.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, CpuId,
};
use serde::{Deserialize, Serialize};

/// x87/SSE/AVX state: the XSAVE area where the host supports it, else the
/// legacy FXSAVE-format registers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum FpuState {
    /// The XSAVE area as KVM returns it (4 KiB, more with KVM_CAP_XSAVE2).
    Xsave(Vec<u32>),
    /// `kvm_fpu` as raw bytes.
    Legacy(Vec<u8>),
}

/// Everything KVM holds for one x86_64 vCPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u32,
    pub cpuid: CpuId,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    pub xcrs: Option<kvm_xcrs>,
    pub debug_regs: Option<kvm_debugregs>,
    pub lapic: kvm_lapic_state,
    /// (index, value), in the host's KVM_GET_MSR_INDEX_LIST order, limited
    /// to the MSRs KVM_GET_MSRS accepts.
    pub msrs: Vec<(u32, u64)>,
    pub vcpu_events: Option<kvm_vcpu_events>,
    pub tsc_khz: Option<u32>,
}

/// VM-wide KVM state: the in-kernel interrupt controllers, the PIT and kvmclock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: Option<kvm_pit_state2>,
    pub clock: Option<kvm_clock_data>,
}
