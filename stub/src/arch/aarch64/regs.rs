//! aarch64 vCPU registers as KVM names them (`KVM_GET_ONE_REG` ids), the
//! values a vCPU starts with, and the saved register state.
//!
//! A vCPU's state is the list of every register `KVM_GET_REG_LIST` offers,
//! each with its bytes: core registers (x0-x30, sp, pc, pstate, the EL1
//! banked registers, the FP/SIMD registers), the system registers KVM lets
//! user space see, the architected timer and the firmware (PSCI) pseudo
//! registers. Saving them all (as Firecracker and cloud-hypervisor do) keeps
//! the format independent of which registers a kernel version exposes; a host
//! that lacks one of them refuses the machine on restore.
//!
//! # Restore order (see [`restore_order`])
//! 1. Core registers, then the other system registers, in the saved order.
//! 2. The firmware pseudo-registers (PSCI version, Spectre workarounds) come
//!    with the system registers: KVM takes them any time before the first run.
//! 3. The virtual timer last, in the order counter, compare value, control:
//!    writing `KVM_REG_ARM_TIMER_CNT` moves the VM's virtual counter offset,
//!    so it goes first and the compare value is then judged against the
//!    restored count; the control register (enable bit) goes last, so the
//!    timer is never enabled against a stale compare value. QEMU treats the
//!    counter the same way: it writes `TIMER_CNT` only on a full-state restore
//!    (`KVM_PUT_FULL_STATE` in target/arm/kvm.c) because every write moves the
//!    offset. Firecracker restores the list in `KVM_GET_REG_LIST` order, in
//!    which the timer registers already come after the core registers.
//! 4. The multiprocessing state (`KVM_SET_MP_STATE`: running or powered off by
//!    PSCI) after the registers, as Firecracker does.
//! 5. The vGIC after every vCPU's registers: the redistributors are addressed
//!    by MPIDR_EL1 (`gic::mpidr_attr`), which is one of the restored registers.

use serde::{Deserialize, Serialize};

/// `KVM_REG_ARM64`: the architecture field of a register id.
pub const KVM_REG_ARM64: u64 = 0x6000_0000_0000_0000;
/// Register size fields.
pub const KVM_REG_SIZE_U32: u64 = 0x0020_0000_0000_0000;
pub const KVM_REG_SIZE_U64: u64 = 0x0030_0000_0000_0000;
pub const KVM_REG_SIZE_U128: u64 = 0x0040_0000_0000_0000;
/// Mask and shift of the size field: the size is `1 << field` bytes.
pub const KVM_REG_SIZE_MASK: u64 = 0x00f0_0000_0000_0000;
pub const KVM_REG_SIZE_SHIFT: u32 = 52;
/// Coprocessor field: which register group an id is in.
pub const KVM_REG_ARM_COPROC_MASK: u64 = 0x0000_0000_0fff_0000;
pub const KVM_REG_ARM_CORE: u64 = 0x0010 << 16;
pub const KVM_REG_ARM64_SYSREG: u64 = 0x0013 << 16;
pub const KVM_REG_ARM_FW: u64 = 0x0014 << 16;

/// Byte offsets in `struct kvm_regs` (arch/arm64/include/uapi/asm/kvm.h):
/// `user_pt_regs { regs[31], sp, pc, pstate }`, then `sp_el1`, `elr_el1`,
/// `spsr[5]`, then `user_fpsimd_state` (16-byte aligned).
const SP_OFFSET: u64 = 31 * 8;
const PC_OFFSET: u64 = SP_OFFSET + 8;
const PSTATE_OFFSET: u64 = PC_OFFSET + 8;
const SP_EL1_OFFSET: u64 = PSTATE_OFFSET + 8;

/// The id of the core register at byte `offset` of `struct kvm_regs`, `size` one of the size fields.
pub const fn core_reg(size: u64, offset: u64) -> u64 {
    KVM_REG_ARM64 | size | KVM_REG_ARM_CORE | (offset / 4)
}

/// General-purpose register `n` (x0-x30).
pub const fn x(n: u64) -> u64 {
    core_reg(KVM_REG_SIZE_U64, n * 8)
}
/// SP_EL0 (`regs.sp`).
pub const SP_EL0: u64 = core_reg(KVM_REG_SIZE_U64, SP_OFFSET);
/// The program counter.
pub const PC: u64 = core_reg(KVM_REG_SIZE_U64, PC_OFFSET);
/// PSTATE (SPSR format).
pub const PSTATE: u64 = core_reg(KVM_REG_SIZE_U64, PSTATE_OFFSET);
/// SP_EL1: the stack pointer at EL1 with SPSel=1 (EL1h).
pub const SP_EL1: u64 = core_reg(KVM_REG_SIZE_U64, SP_EL1_OFFSET);

/// The id of system register (op0, op1, CRn, CRm, op2).
pub const fn sys_reg(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
    KVM_REG_ARM64
        | KVM_REG_SIZE_U64
        | KVM_REG_ARM64_SYSREG
        | (op0 << 14)
        | (op1 << 11)
        | (crn << 7)
        | (crm << 3)
        | op2
}

/// MPIDR_EL1: the vCPU's affinity, which names its redistributor.
pub const MPIDR_EL1: u64 = sys_reg(3, 0, 0, 0, 5);
/// The virtual timer's control register (CNTV_CTL_EL0).
pub const TIMER_CTL: u64 = sys_reg(3, 3, 14, 3, 1);
/// The virtual counter. The uapi swapped the encodings of this one and
/// [`TIMER_CVAL`] by mistake long ago and keeps them so: this is CNTV_CVAL's
/// architectural encoding, but KVM reads it as the counter.
pub const TIMER_CNT: u64 = sys_reg(3, 3, 14, 3, 2);
/// The virtual timer's compare value (see [`TIMER_CNT`]).
pub const TIMER_CVAL: u64 = sys_reg(3, 3, 14, 0, 2);

/// PSTATE for an entry at EL1 on SP_EL1 (EL1h) with debug, SError, IRQ and
/// FIQ masked: what Linux's arm64 boot protocol asks for.
pub const PSTATE_EL1H_MASKED: u64 = 0x3c5;

/// Bytes of register `id`'s value.
pub const fn reg_size(id: u64) -> usize {
    1 << ((id & KVM_REG_SIZE_MASK) >> KVM_REG_SIZE_SHIFT)
}

/// Where a vCPU starts: the program counter, the stack (SP_EL1) and x0
/// (the device tree's address for a Linux kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub pc: u64,
    pub sp: u64,
    pub x0: u64,
}

/// One register and its value (little-endian, `reg_size(id)` bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reg {
    pub id: u64,
    pub value: Vec<u8>,
}

/// A vCPU's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// The `kvm_vcpu_init.features[0]` bits the vCPU was initialised with
    /// (PSCI 0.2, powered off): the restore initialises the new vCPU the same way.
    pub features: u32,
    /// Every register `KVM_GET_REG_LIST` offered, in that order.
    pub regs: Vec<Reg>,
    /// `kvm_mp_state.mp_state` (0 runnable, 1 stopped by PSCI CPU_OFF).
    pub mp_state: u32,
}

impl VcpuState {
    /// The value of register `id` as a u64 (registers of up to 8 bytes).
    pub fn get_u64(&self, id: u64) -> Option<u64> {
        let r = self.regs.iter().find(|r| r.id == id)?;
        let mut b = [0u8; 8];
        let n = r.value.len().min(8);
        b[..n].copy_from_slice(&r.value[..n]);
        Some(u64::from_le_bytes(b))
    }

    /// MPIDR_EL1, which names the vCPU's redistributor.
    pub fn mpidr(&self) -> Option<u64> {
        self.get_u64(MPIDR_EL1)
    }

    /// Check that every value has its register's size.
    pub fn check(&self) -> Result<(), String> {
        for r in &self.regs {
            if r.value.len() != reg_size(r.id) {
                return Err(format!(
                    "register {:#x} has {} bytes, its id says {}",
                    r.id,
                    r.value.len(),
                    reg_size(r.id)
                ));
            }
        }
        Ok(())
    }
}

/// The registers of `regs` in the order they are restored (module docs):
/// everything but the timer in the saved order, then the timer's counter,
/// compare value and control.
pub fn restore_order(regs: &[Reg]) -> Vec<&Reg> {
    const TIMER: [u64; 3] = [TIMER_CNT, TIMER_CVAL, TIMER_CTL];
    let mut out: Vec<&Reg> = regs.iter().filter(|r| !TIMER.contains(&r.id)).collect();
    for id in TIMER {
        out.extend(regs.iter().filter(|r| r.id == id));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_match_the_kernel_uapi() {
        // Values from arch/arm64/include/uapi/asm/kvm.h as KVM reports them.
        assert_eq!(x(0), 0x6030_0000_0010_0000);
        assert_eq!(PC, 0x6030_0000_0010_0040);
        assert_eq!(PSTATE, 0x6030_0000_0010_0042);
        assert_eq!(SP_EL1, 0x6030_0000_0010_0044);
        assert_eq!(MPIDR_EL1, 0x6030_0000_0013_c005);
        assert_eq!(TIMER_CTL, 0x6030_0000_0013_df19);
        assert_eq!(TIMER_CNT, 0x6030_0000_0013_df1a);
        assert_eq!(TIMER_CVAL, 0x6030_0000_0013_df02);
        assert_eq!(reg_size(PC), 8);
        assert_eq!(reg_size(KVM_REG_ARM64 | KVM_REG_SIZE_U128), 16);
        assert_eq!(reg_size(KVM_REG_ARM64 | KVM_REG_SIZE_U32), 4);
    }

    #[test]
    fn timer_registers_are_restored_last_counter_first() {
        let reg = |id| Reg {
            id,
            value: vec![0; 8],
        };
        let regs = [
            reg(TIMER_CTL),
            reg(PC),
            reg(TIMER_CVAL),
            reg(MPIDR_EL1),
            reg(TIMER_CNT),
        ];
        let order: Vec<u64> = restore_order(&regs).iter().map(|r| r.id).collect();
        assert_eq!(order, [PC, MPIDR_EL1, TIMER_CNT, TIMER_CVAL, TIMER_CTL]);
    }

    #[test]
    fn state_checks_sizes_and_reads_mpidr() {
        let mut s = VcpuState {
            features: 0,
            regs: vec![Reg {
                id: MPIDR_EL1,
                value: 0x8000_0001u64.to_le_bytes().to_vec(),
            }],
            mp_state: 0,
        };
        assert_eq!(s.mpidr(), Some(0x8000_0001));
        assert!(s.check().is_ok());
        s.regs[0].value.pop();
        assert!(s.check().is_err());
    }
}
