//! Local APIC boot setup: LINT0 as ExtINT (the PIC's line), LINT1 as NMI.

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const DELIVERY_MODE_EXTINT: u32 = 0x7;
const DELIVERY_MODE_NMI: u32 = 0x4;

fn get_reg(regs: &[u8], offset: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&regs[offset..offset + 4]);
    u32::from_le_bytes(b)
}

fn set_reg(regs: &mut [u8], offset: usize, value: u32) {
    regs[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Program LINT0/LINT1 in a 1 KiB LAPIC register page (`kvm_lapic_state.regs`).
pub fn set_lint(regs: &mut [u8; 1024]) {
    let lvt0 = get_reg(regs, APIC_LVT0);
    set_reg(
        regs,
        APIC_LVT0,
        with_delivery_mode(lvt0, DELIVERY_MODE_EXTINT),
    );
    let lvt1 = get_reg(regs, APIC_LVT1);
    set_reg(regs, APIC_LVT1, with_delivery_mode(lvt1, DELIVERY_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_lint() {
        let mut regs = [0u8; 1024];
        set_reg(&mut regs, APIC_LVT0, 0x0001_0000);
        set_lint(&mut regs);
        assert_eq!(get_reg(&regs, APIC_LVT0), 0x0001_0700);
        assert_eq!(get_reg(&regs, APIC_LVT1), 0x400);
    }
}
