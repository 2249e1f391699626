//! Model-specific registers: boot values and save/restore ordering.

/// IA32_TSC: the time-stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_DEADLINE: must be restored after IA32_TSC (it is relative to it).
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// IA32_MISC_ENABLE.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// MSR values at a fresh boot: fast strings on, MTRRs on with write-back default.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_MISC_ENABLE, 1),
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}

/// Order MSR indexes for KVM_SET_MSRS: IA32_TSC before IA32_TSC_DEADLINE
/// (KVM computes the deadline against the TSC it holds), everything else
/// in the host's order.
pub fn restore_order(indexes: &mut [u32]) {
    indexes.sort_by_key(|&i| match i {
        MSR_IA32_TSC => 0u8,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_before_deadline() {
        let mut v = vec![MSR_IA32_TSC_DEADLINE, 0x174, MSR_IA32_TSC, 0xc000_0080];
        restore_order(&mut v);
        assert_eq!(
            v,
            vec![MSR_IA32_TSC, 0x174, 0xc000_0080, MSR_IA32_TSC_DEADLINE]
        );
    }
}
