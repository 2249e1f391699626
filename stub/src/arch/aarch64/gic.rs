//! The in-kernel GICv3 (KVM's vgic-v3 device): which registers make up its
//! state and how KVM's device attributes name them.
//!
//! # Ordering (KVM rules, and what Firecracker and cloud-hypervisor do)
//! - Create: every vCPU is created and `KVM_ARM_VCPU_INIT`ed first, then the
//!   vgic device (`KVM_CREATE_DEVICE`), its distributor and redistributor
//!   addresses (`KVM_DEV_ARM_VGIC_GRP_ADDR`), its line count
//!   (`KVM_DEV_ARM_VGIC_GRP_NR_IRQS`), then `KVM_DEV_ARM_VGIC_CTRL_INIT`:
//!   the init sizes the redistributors for the vCPUs that exist then, and a
//!   vCPU created after it is refused. Firecracker (`arch/aarch64/gic`,
//!   created in the builder after the vCPUs) and cloud-hypervisor
//!   (`create_gic` after `create_vcpus`) do the same. Irqfds need the
//!   initialised vgic, so devices get their interrupt lines after this.
//! - Save: with every vCPU out of the guest. Per vCPU (by MPIDR) the
//!   redistributor registers, then its CPU-interface system registers
//!   (`ICC_*`), then the distributor, as Firecracker's
//!   `gic/gicv3/regs/mod.rs` does. (Firecracker first flushes the LPI pending
//!   tables to guest RAM with `KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES`; that
//!   only matters with an ITS, which this VMM does not create.)
//! - Restore: after every vCPU's registers (MPIDR_EL1 names the
//!   redistributor), before the first run: distributor, then per vCPU the
//!   redistributor and the `ICC_*` registers. Within each, control registers
//!   first, per-interrupt state after, and the group enables (`ICC_IGRPEN*`)
//!   last. A set/clear register pair (ISENABLER/ICENABLER, ISPENDR/ICPENDR,
//!   ISACTIVER/ICACTIVER) is restored by writing all ones to the clear
//!   register, then the saved bits to the set register.
//! - Not yet saved: the line levels of level-triggered interrupts
//!   (`KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO`), needed once a level-triggered
//!   device exists (virtio-mmio lines are edge-triggered through irqfds).

use serde::{Deserialize, Serialize};

use super::layout::NR_IRQS;

/// A distributor or redistributor register range: `offset`, `bits` per
/// interrupt (0: one 32-bit register), and how its value is restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegRange {
    pub name: &'static str,
    pub offset: u32,
    /// Bits per interrupt; 0 for a single 32-bit register.
    pub bits_per_irq: u32,
    /// The matching clear register of a set/clear pair, written with all ones first.
    pub clear_offset: Option<u32>,
}

const fn single(name: &'static str, offset: u32) -> RegRange {
    RegRange {
        name,
        offset,
        bits_per_irq: 0,
        clear_offset: None,
    }
}

const fn per_irq(name: &'static str, offset: u32, bits_per_irq: u32) -> RegRange {
    RegRange {
        name,
        offset,
        bits_per_irq,
        clear_offset: None,
    }
}

const fn set_clear(name: &'static str, offset: u32, clear: u32) -> RegRange {
    RegRange {
        name,
        offset,
        bits_per_irq: 1,
        clear_offset: Some(clear),
    }
}

/// Distributor registers, in restore order. The per-interrupt ranges cover
/// the shared interrupts (32..NR_IRQS); the first 32 are banked in each
/// redistributor. GICD_IROUTER is 64 bits per interrupt, accessed as two
/// 32-bit halves like every register of this group.
pub const DIST_REGS: &[RegRange] = &[
    single("GICD_CTLR", 0x0000),
    per_irq("GICD_IGROUPR", 0x0080, 1),
    per_irq("GICD_IGRPMODR", 0x0d00, 1),
    per_irq("GICD_ICFGR", 0x0c00, 2),
    per_irq("GICD_IPRIORITYR", 0x0400, 8),
    per_irq("GICD_IROUTER", 0x6000, 64),
    set_clear("GICD_ISENABLER", 0x0100, 0x0180),
    set_clear("GICD_ISPENDR", 0x0200, 0x0280),
    set_clear("GICD_ISACTIVER", 0x0300, 0x0380),
];

/// Offset of a redistributor's SGI_base frame (SGIs and PPIs) from its RD_base.
pub const SGI_FRAME: u32 = 0x1_0000;

/// Redistributor registers, in restore order: RD_base control, then the
/// SGI/PPI state of the SGI_base frame (interrupts 0..32 of this vCPU).
pub const REDIST_REGS: &[RegRange] = &[
    single("GICR_CTLR", 0x0000),
    single("GICR_WAKER", 0x0014),
    single("GICR_IGROUPR0", SGI_FRAME + 0x0080),
    single("GICR_IGRPMODR0", SGI_FRAME + 0x0d00),
    single("GICR_ICFGR0", SGI_FRAME + 0x0c00),
    single("GICR_ICFGR1", SGI_FRAME + 0x0c04),
    per_irq("GICR_IPRIORITYR", SGI_FRAME + 0x0400, 8),
    set_clear("GICR_ISENABLER0", SGI_FRAME + 0x0100, SGI_FRAME + 0x0180),
    set_clear("GICR_ISPENDR0", SGI_FRAME + 0x0200, SGI_FRAME + 0x0280),
    set_clear("GICR_ISACTIVER0", SGI_FRAME + 0x0300, SGI_FRAME + 0x0380),
];

/// The 32-bit registers a range covers for `nr_irqs` lines: `(offset, count)`.
/// Distributor ranges skip the first 32 (private) interrupts; redistributor
/// ranges cover exactly those 32.
pub fn range_words(r: &RegRange, distributor: bool) -> (u32, u32) {
    if r.bits_per_irq == 0 {
        return (r.offset, 1);
    }
    let (first, count) = if distributor {
        (32, NR_IRQS - 32)
    } else {
        (0, 32)
    };
    let offset = r.offset + first * r.bits_per_irq / 8;
    (offset, count * r.bits_per_irq / 32)
}

/// An `ICC_*` system register as `KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS` names
/// it: (op0, op1, CRn, CRm, op2) packed as in `ARM64_SYS_REG` without the
/// arch and size fields.
pub const fn icc(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
    (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2
}

pub const ICC_SRE_EL1: u64 = icc(3, 0, 12, 12, 5);
pub const ICC_CTLR_EL1: u64 = icc(3, 0, 12, 12, 4);
pub const ICC_PMR_EL1: u64 = icc(3, 0, 4, 6, 0);
pub const ICC_BPR0_EL1: u64 = icc(3, 0, 12, 8, 3);
pub const ICC_BPR1_EL1: u64 = icc(3, 0, 12, 12, 3);
pub const ICC_IGRPEN0_EL1: u64 = icc(3, 0, 12, 12, 6);
pub const ICC_IGRPEN1_EL1: u64 = icc(3, 0, 12, 12, 7);

/// ICC_AP0R`n`_EL1 and ICC_AP1R`n`_EL1 (active priorities).
pub const fn icc_ap0r(n: u64) -> u64 {
    icc(3, 0, 12, 8, 4 + n)
}
pub const fn icc_ap1r(n: u64) -> u64 {
    icc(3, 0, 12, 9, n)
}

/// How many ICC_AP{0,1}R<n> registers exist for the priority bits that
/// ICC_CTLR_EL1.PRIbits (bits 10:8, minus one) reports: 1 for 5 bits, 2 for
/// 6, 4 for 7 (GICv3 spec, ICC_AP0R<n>_EL1).
pub fn ap_registers(icc_ctlr: u64) -> u64 {
    match ((icc_ctlr >> 8) & 7) + 1 {
        7 => 4,
        6 => 2,
        _ => 1,
    }
}

/// The `ICC_*` registers to save for a CPU interface whose ICC_CTLR_EL1 is
/// `icc_ctlr`, in restore order (group enables last).
pub fn icc_regs(icc_ctlr: u64) -> Vec<u64> {
    let mut regs = vec![
        ICC_SRE_EL1,
        ICC_CTLR_EL1,
        ICC_PMR_EL1,
        ICC_BPR0_EL1,
        ICC_BPR1_EL1,
    ];
    for n in 0..ap_registers(icc_ctlr) {
        regs.push(icc_ap0r(n));
        regs.push(icc_ap1r(n));
    }
    regs.push(ICC_IGRPEN0_EL1);
    regs.push(ICC_IGRPEN1_EL1);
    regs
}

/// The affinity field of a redistributor or CPU-interface attribute for the
/// vCPU whose MPIDR_EL1 is `mpidr`: Aff3..Aff0 in bits 63:32
/// (`KVM_DEV_ARM_VGIC_V3_MPIDR_MASK`).
pub const fn mpidr_attr(mpidr: u64) -> u64 {
    let aff3 = (mpidr >> 32) & 0xff;
    let aff2_0 = mpidr & 0xff_ffff;
    ((aff3 << 24) | aff2_0) << 32
}

/// A GICv3's saved state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GicState {
    /// Distributor registers: (offset, value).
    pub dist: Vec<(u32, u32)>,
    /// Per vCPU, in vCPU order.
    pub vcpus: Vec<GicVcpuState>,
}

/// One vCPU's redistributor and CPU interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GicVcpuState {
    /// Redistributor registers: (offset, value).
    pub redist: Vec<(u32, u32)>,
    /// CPU-interface system registers: (`icc` id, value).
    pub icc: Vec<(u64, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_match_the_kernel_encoding() {
        // ICC_SRE_EL1 is ARM64_SYS_REG(3, 0, 12, 12, 5) without arch/size fields.
        assert_eq!(ICC_SRE_EL1, 0xc665);
        assert_eq!(ICC_PMR_EL1, 0xc230);
        assert_eq!(mpidr_attr(0x8000_0000), 0);
        assert_eq!(mpidr_attr(0x0000_0001), 1 << 32);
        assert_eq!(mpidr_attr(0x01_0002_0304), 0x0102_0304 << 32);
    }

    #[test]
    fn ranges_cover_the_lines() {
        let enable = &DIST_REGS[6];
        assert_eq!(enable.name, "GICD_ISENABLER");
        // SPIs 32..128 start at the second word and take three.
        assert_eq!(range_words(enable, true), (0x104, 3));
        let router = &DIST_REGS[5];
        assert_eq!(
            range_words(router, true),
            (0x6000 + 32 * 8, (NR_IRQS - 32) * 2)
        );
        let prio = &REDIST_REGS[6];
        assert_eq!(range_words(prio, false), (SGI_FRAME + 0x400, 8));
        assert_eq!(range_words(&REDIST_REGS[0], false), (0, 1));
    }

    #[test]
    fn icc_list_follows_the_priority_bits_and_enables_last() {
        assert_eq!(icc_regs(4 << 8).len(), 5 + 2 + 2);
        assert_eq!(icc_regs(6 << 8).len(), 5 + 8 + 2);
        assert_eq!(icc_regs(0).last(), Some(&ICC_IGRPEN1_EL1));
    }
}
