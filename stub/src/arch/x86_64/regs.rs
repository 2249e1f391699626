//! Register values for a vCPU entered directly in 64-bit long mode.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

use super::gdt::{segment_from_gdt, BOOT_GDT, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use super::layout::{GDT_ADDR, IDT_ADDR, PML4_ADDR};

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Where a 64-bit entry starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry64 {
    /// First instruction.
    pub rip: u64,
    /// Initial stack pointer.
    pub rsp: u64,
    /// Passed in RSI (the Linux 64-bit boot protocol's `boot_params` pointer).
    pub rsi: u64,
}

/// General registers at entry: only RIP, RSP, RSI and the reserved RFLAGS bit.
pub fn boot_regs(entry: &Entry64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.rip,
        rsp: entry.rsp,
        rbp: entry.rsp,
        rsi: entry.rsi,
        ..Default::default()
    }
}

/// Special registers for long mode with the boot GDT and identity page tables,
/// starting from the vCPU's current (reset) special registers.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(&BOOT_GDT, CODE_INDEX);
    let data = segment_from_gdt(&BOOT_GDT, DATA_INDEX);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(&BOOT_GDT, TSS_INDEX);
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.cr0 |= CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// x87/SSE state at entry: the architectural reset control words.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_sregs() {
        let s = boot_sregs(kvm_sregs::default());
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.cr4 & CR4_PAE, 0);
        assert_eq!(s.cr3, PML4_ADDR);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.gdt.limit, 31);
        let r = boot_regs(&Entry64 {
            rip: 0x10_0000,
            rsp: 0x8000,
            rsi: 0x7000,
        });
        assert_eq!(
            (r.rip, r.rsp, r.rsi, r.rflags),
            (0x10_0000, 0x8000, 0x7000, 2)
        );
    }
}
