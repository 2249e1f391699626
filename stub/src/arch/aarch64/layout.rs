//! The aarch64 guest-physical address map.
//!
//! Below 2 GiB: the interrupt controller and the devices; RAM from 2 GiB up,
//! as QEMU `virt`, Firecracker and cloud-hypervisor place it (Linux arm64
//! needs no RAM at 0, and 32-bit DMA-capable devices can still see the first
//! 2 GiB of RAM below 4 GiB). The GIC addresses are QEMU `virt`'s, so a guest
//! kernel's device tree reads the same as under QEMU.
//!
//! ```text
//! 0x0800_0000  GICv3 distributor           64 KiB
//! 0x080a_0000  GICv3 redistributors        128 KiB per vCPU (up to 123)
//! 0x0900_0000  port window                 64 KiB: x86 port P is the byte at base + P
//! 0x0a00_0000  MMIO devices (virtio-mmio)  4 KiB each
//! 0x8000_0000  RAM
//! ```

/// Start of guest RAM.
pub const RAM_BASE: u64 = 0x8000_0000;

/// The GICv3 distributor (KVM_VGIC_V3_ADDR_TYPE_DIST).
pub const GIC_DIST_BASE: u64 = 0x0800_0000;
/// Size of the distributor (KVM_VGIC_V3_DIST_SIZE).
pub const GIC_DIST_SIZE: u64 = 0x1_0000;
/// The first GICv3 redistributor (KVM_VGIC_V3_ADDR_TYPE_REDIST); one per vCPU follows.
pub const GIC_REDIST_BASE: u64 = 0x080a_0000;
/// Size of one redistributor: the RD_base and SGI_base frames (KVM_VGIC_V3_REDIST_SIZE).
pub const GIC_REDIST_SIZE: u64 = 0x2_0000;
/// Most vCPUs whose redistributors fit below the port window.
pub const MAX_VCPUS: u32 = ((PORT_WINDOW_BASE - GIC_REDIST_BASE) / GIC_REDIST_SIZE) as u32;

/// MMIO stand-in for x86 I/O ports: port `P` is the byte at `PORT_WINDOW_BASE + P`.
/// The devices that sit on x86 ports (exit port, debug console, the test
/// guest's report port) are reached at the same offsets here.
pub const PORT_WINDOW_BASE: u64 = 0x0900_0000;
/// Size of the port window (the x86 port space).
pub const PORT_WINDOW_SIZE: u64 = 0x1_0000;

/// First MMIO device slot (virtio-mmio transports).
pub const MMIO_DEVICES_BASE: u64 = 0x0a00_0000;
/// Size of one MMIO device slot.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;

/// Interrupt lines the vGIC has (KVM_DEV_ARM_VGIC_GRP_NR_IRQS): 32 private
/// (SGIs and PPIs) and 96 shared (SPIs) for devices. A multiple of 32.
pub const NR_IRQS: u32 = 128;
/// First shared interrupt (SPI); an irqfd's GSI `g` is SPI `g + 32`.
pub const SPI_BASE: u32 = 32;

/// Guest RAM regions for `memory_bytes` of memory: one, from [`RAM_BASE`].
pub fn ram_regions(memory_bytes: u64) -> Vec<(u64, u64)> {
    vec![(RAM_BASE, memory_bytes)]
}

/// The port-window address of x86 port `port`.
pub const fn port_address(port: u16) -> u64 {
    PORT_WINDOW_BASE + port as u64
}

/// Guest-physical address of the redistributor of vCPU `index`.
pub const fn redist_address(index: u32) -> u64 {
    GIC_REDIST_BASE + index as u64 * GIC_REDIST_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_do_not_overlap() {
        const {
            assert!(GIC_DIST_BASE + GIC_DIST_SIZE <= GIC_REDIST_BASE);
            assert!(redist_address(MAX_VCPUS) <= PORT_WINDOW_BASE);
            assert!(PORT_WINDOW_BASE + PORT_WINDOW_SIZE <= MMIO_DEVICES_BASE);
            assert!(MMIO_DEVICES_BASE < RAM_BASE);
        }
        assert_eq!(MAX_VCPUS, 123);
        assert_eq!(NR_IRQS % 32, 0);
        assert_eq!(port_address(0xf4), 0x0900_00f4);
    }
}
