//! x86_64 machine setup: the guest-physical layout, GDT and page tables for a
//! direct 64-bit entry, and the register, CPUID, MSR and LAPIC values a vCPU
//! starts with, and the saved vCPU/VM state types. Pure functions and plain
//! data here; the KVM calls live in `hypervisor::kvm::x86_64`.

pub mod cpu_model;
pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod paging;
pub mod regs;
pub mod state;

use crate::memory::{GuestMemory, MemoryError};

/// Write the boot GDT, an empty IDT and the identity page tables that a
/// direct 64-bit entry uses into fresh guest memory.
pub fn write_boot_tables(memory: &GuestMemory) -> Result<(), MemoryError> {
    memory.write(layout::GDT_ADDR, &gdt::gdt_bytes(&gdt::BOOT_GDT))?;
    memory.write(layout::IDT_ADDR, &[0u8; 8])?;
    let pages = paging::identity_map(layout::PML4_ADDR, layout::IDENTITY_MAP_BYTES)
        .map_err(|e| MemoryError::BadLayout(e.to_string()))?;
    for (addr, page) in pages {
        memory.write(addr, &page)?;
    }
    Ok(())
}
