//! x86_64 machine setup: the guest-physical layout, GDT and page tables for a
//! direct 64-bit entry, and the register, CPUID, MSR and LAPIC values a vCPU
//! starts with. Pure functions here; the KVM calls live in
//! `hypervisor::kvm::x86_64`.

pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod paging;
pub mod regs;
