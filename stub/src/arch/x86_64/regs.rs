//! Register values for a vCPU entered directly in 64-bit long mode.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

use super::gdt::{segment_from_gdt, BOOT_GDT, CODE_INDEX, DATA_INDEX, PVH_GDT, TSS_INDEX};
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

/// Where a PVH entry starts: 32-bit protected mode, paging off, EBX = the
/// `hvm_start_info` address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryPvh {
    /// The kernel's PVH entry (its `XEN_ELFNOTE_PHYS32_ENTRY`).
    pub rip: u64,
    /// Guest-physical address of the start info.
    pub rbx: u64,
}

/// General registers at a PVH entry.
pub fn pvh_regs(entry: &EntryPvh) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.rip,
        rbx: entry.rbx,
        ..Default::default()
    }
}

/// Special registers for a PVH entry: flat 32-bit segments from
/// [`PVH_GDT`], CR0.PE only, no paging, no long mode.
pub fn pvh_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(&PVH_GDT, CODE_INDEX);
    let data = segment_from_gdt(&PVH_GDT, DATA_INDEX);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (PVH_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(&PVH_GDT, TSS_INDEX);
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
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
        let p = pvh_sregs(kvm_sregs::default());
        assert_eq!((p.cr0 & CR0_PG, p.efer, p.cr4), (0, 0, 0));
        assert_eq!((p.cs.l, p.cs.db, p.cs.selector), (0, 1, 8));
        assert_eq!((p.ds.db, p.ds.type_), (1, 3));
        let r = pvh_regs(&EntryPvh {
            rip: 0x100_04a0,
            rbx: 0x6000,
        });
        assert_eq!((r.rip, r.rbx, r.rflags), (0x100_04a0, 0x6000, 2));
    }
}
