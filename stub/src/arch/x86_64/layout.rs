//! Where boot structures live in guest-physical memory (all below 1 MiB).

/// The boot GDT (4 entries).
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT: faults before the guest installs its own triple-fault.
pub const IDT_ADDR: u64 = 0x520;
/// The boot PML4; the PDPT and the page directories follow it page by page.
pub const PML4_ADDR: u64 = 0x9000;
/// Guest-physical start of memory.
pub const RAM_START: u64 = 0;
/// The identity map built for a 64-bit entry covers the low 4 GiB, MMIO
/// hole included (6 pages from `PML4_ADDR`).
pub const IDENTITY_MAP_BYTES: u64 = 4 << 30;
/// Start of the 32-bit MMIO hole: RAM above this is placed past 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// KVM needs three pages for the TSS on Intel; placed just below the hole end.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

/// Split `memory_bytes` of RAM into guest-physical regions around the MMIO hole.
pub fn ram_regions(memory_bytes: u64) -> Vec<(u64, u64)> {
    if memory_bytes <= MMIO_HOLE_START {
        vec![(RAM_START, memory_bytes)]
    } else {
        vec![
            (RAM_START, MMIO_HOLE_START),
            (MMIO_HOLE_END, memory_bytes - MMIO_HOLE_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_is_split_around_the_hole() {
        assert_eq!(ram_regions(64 << 20), vec![(0, 64 << 20)]);
        assert_eq!(
            ram_regions(4 << 30),
            vec![(0, MMIO_HOLE_START), (1 << 32, (4 << 30) - MMIO_HOLE_START)]
        );
    }
}
