//! The flattened device tree an aarch64 Linux guest boots with: how it finds
//! its memory, CPUs, interrupt controller, timer, PSCI, console and virtio
//! devices (arm64 has no firmware tables here; x86_64 uses the command line
//! and the MP table instead). Written with `vm-fdt`; read once by the kernel
//! at boot, never after a resume.
//!
//! Interrupt specifiers are the GICv3 binding's three cells: type (0 SPI,
//! 1 PPI), number (an SPI's number is its INTID - 32, which is the GSI an
//! irqfd raises: `layout::SPI_BASE`), flags.

use vm_fdt::FdtWriter;

use super::layout;

/// An SPI (shared peripheral interrupt).
const GIC_SPI: u32 = 0;
/// A PPI (private, per-CPU interrupt).
const GIC_PPI: u32 = 1;
/// Edge-triggered, rising: irqfd lines are pulses.
const IRQ_TYPE_EDGE_RISING: u32 = 1;
/// Level-triggered, active high (the architected timer's PPIs as KVM drives them).
const IRQ_TYPE_LEVEL_HIGH: u32 = 4;
/// Phandle of the GIC, the interrupt parent of every device.
const GIC_PHANDLE: u32 = 1;
/// The architected timer's PPIs: secure physical, non-secure physical,
/// virtual, hypervisor (the order the `arm,armv8-timer` binding lists them).
const TIMER_PPIS: [u32; 4] = [13, 14, 11, 10];
/// The GIC maintenance interrupt (PPI 9), for the binding.
const GIC_MAINTENANCE_PPI: u32 = 9;
/// Base clock of the 8250 (the PC UART's 1.8432 MHz, so divisors mean the usual baud rates).
const UART_CLOCK_HZ: u32 = 1_843_200;
/// Largest device tree the arm64 boot protocol accepts.
pub const FDT_MAX_BYTES: usize = 2 << 20;

/// A device on the MMIO bus with one interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    /// The GSI (SPI number) it raises.
    pub gsi: u32,
}

/// What the device tree describes.
#[derive(Debug, Clone)]
pub struct FdtConfig<'a> {
    /// RAM regions (guest address, size).
    pub memory: &'a [(u64, u64)],
    /// MPIDR_EL1 of each vCPU, in vCPU order (the CPU nodes' `reg`).
    pub mpidrs: &'a [u64],
    /// The kernel command line.
    pub cmdline: &'a str,
    /// The 8250 UART (the kernel console, `console=ttyS0`).
    pub uart: Option<MmioDevice>,
    /// virtio-mmio transports, in the order the kernel should number them.
    pub virtio: &'a [MmioDevice],
}

/// The device tree could not be written.
#[derive(Debug, thiserror::Error)]
pub enum FdtError {
    #[error("cannot write the device tree: {0}")]
    Write(#[from] vm_fdt::Error),
    #[error("the device tree is {0} bytes, more than the 2 MiB the arm64 boot protocol allows")]
    TooLarge(usize),
    #[error("a machine needs at least one vCPU and one memory region")]
    Empty,
}

/// The `reg` of a CPU node: MPIDR_EL1's affinity fields (Aff3 at 39:32,
/// Aff2..Aff0 at 23:0), as the arm `cpus` binding wants with two address cells.
pub const fn cpu_reg(mpidr: u64) -> u64 {
    mpidr & 0xff_00ff_ffff
}

/// Build the device tree blob.
pub fn build(cfg: &FdtConfig<'_>) -> Result<Vec<u8>, FdtError> {
    if cfg.mpidrs.is_empty() || cfg.memory.is_empty() {
        return Err(FdtError::Empty);
    }
    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", "linux,dummy-virt")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("interrupt-parent", GIC_PHANDLE)?;

    let cpus = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 0)?;
    for &mpidr in cfg.mpidrs {
        let reg = cpu_reg(mpidr);
        let cpu = fdt.begin_node(&format!("cpu@{reg:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,arm-v8")?;
        // Secondary vCPUs start powered off; the kernel starts them with
        // PSCI CPU_ON, which KVM implements.
        fdt.property_string("enable-method", "psci")?;
        fdt.property_u64("reg", reg)?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(cpus)?;

    for &(addr, size) in cfg.memory {
        let mem = fdt.begin_node(&format!("memory@{addr:x}"))?;
        fdt.property_string("device_type", "memory")?;
        fdt.property_array_u64("reg", &[addr, size])?;
        fdt.end_node(mem)?;
    }

    let chosen = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", cfg.cmdline)?;
    if let Some(uart) = cfg.uart {
        fdt.property_string("stdout-path", &format!("/uart@{:x}", uart.base))?;
    }
    fdt.end_node(chosen)?;

    let redist_size = layout::GIC_REDIST_SIZE * cfg.mpidrs.len() as u64;
    let gic = fdt.begin_node(&format!("intc@{:x}", layout::GIC_DIST_BASE))?;
    fdt.property_string("compatible", "arm,gic-v3")?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_u32("#interrupt-cells", 3)?;
    fdt.property_array_u64(
        "reg",
        &[
            layout::GIC_DIST_BASE,
            layout::GIC_DIST_SIZE,
            layout::GIC_REDIST_BASE,
            redist_size,
        ],
    )?;
    fdt.property_u32("phandle", GIC_PHANDLE)?;
    fdt.property_array_u32(
        "interrupts",
        &[GIC_PPI, GIC_MAINTENANCE_PPI, IRQ_TYPE_LEVEL_HIGH],
    )?;
    fdt.end_node(gic)?;

    let timer = fdt.begin_node("timer")?;
    fdt.property_string("compatible", "arm,armv8-timer")?;
    fdt.property_null("always-on")?;
    let cells: Vec<u32> = TIMER_PPIS
        .iter()
        .flat_map(|&ppi| [GIC_PPI, ppi, IRQ_TYPE_LEVEL_HIGH])
        .collect();
    fdt.property_array_u32("interrupts", &cells)?;
    fdt.end_node(timer)?;

    let psci = fdt.begin_node("psci")?;
    fdt.property_string("compatible", "arm,psci-0.2")?;
    // KVM answers PSCI calls made with HVC from EL1.
    fdt.property_string("method", "hvc")?;
    fdt.end_node(psci)?;

    if let Some(uart) = cfg.uart {
        let node = fdt.begin_node(&format!("uart@{:x}", uart.base))?;
        fdt.property_string("compatible", "ns16550a")?;
        fdt.property_array_u64("reg", &[uart.base, uart.size])?;
        fdt.property_u32("clock-frequency", UART_CLOCK_HZ)?;
        fdt.property_array_u32("interrupts", &[GIC_SPI, uart.gsi, IRQ_TYPE_EDGE_RISING])?;
        fdt.end_node(node)?;
    }

    for dev in cfg.virtio {
        let node = fdt.begin_node(&format!("virtio_mmio@{:x}", dev.base))?;
        fdt.property_string("compatible", "virtio,mmio")?;
        fdt.property_array_u64("reg", &[dev.base, dev.size])?;
        fdt.property_array_u32("interrupts", &[GIC_SPI, dev.gsi, IRQ_TYPE_EDGE_RISING])?;
        // Guest memory is ordinary cacheable RAM shared with the VMM.
        fdt.property_null("dma-coherent")?;
        fdt.end_node(node)?;
    }

    fdt.end_node(root)?;
    let blob = fdt.finish()?;
    if blob.len() > FDT_MAX_BYTES {
        return Err(FdtError::TooLarge(blob.len()));
    }
    Ok(blob)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(cmdline: &str) -> Vec<u8> {
        build(&FdtConfig {
            memory: &[(layout::RAM_BASE, 256 << 20)],
            mpidrs: &[0x8000_0000, 0x8000_0001],
            cmdline,
            uart: Some(MmioDevice {
                base: layout::port_address(0x3f8),
                size: 8,
                gsi: 4,
            }),
            virtio: &[
                MmioDevice {
                    base: layout::MMIO_DEVICES_BASE,
                    size: 0x1000,
                    gsi: 5,
                },
                MmioDevice {
                    base: layout::MMIO_DEVICES_BASE + 0x1000,
                    size: 0x1000,
                    gsi: 6,
                },
            ],
        })
        .expect("device tree")
    }

    fn be32(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn blob_is_a_device_tree_with_every_node() {
        let blob = sample("console=ttyS0 root=/dev/vda");
        assert_eq!(be32(&blob, 0), 0xd00d_feed, "FDT magic");
        assert_eq!(be32(&blob, 4) as usize, blob.len(), "totalsize");
        for name in [
            &b"cpu@0\0"[..],
            b"cpu@1\0",
            b"memory@80000000\0",
            b"chosen\0",
            b"intc@8000000\0",
            b"timer\0",
            b"psci\0",
            b"uart@90003f8\0",
            b"virtio_mmio@a000000\0",
            b"virtio_mmio@a001000\0",
            b"console=ttyS0 root=/dev/vda\0",
            b"arm,gic-v3\0",
            b"ns16550a\0",
            b"/uart@90003f8\0",
        ] {
            assert!(
                contains(&blob, name),
                "{:?} missing",
                String::from_utf8_lossy(name)
            );
        }
        // The uart's interrupt: SPI 4, edge.
        let spec: Vec<u8> = [GIC_SPI, 4, IRQ_TYPE_EDGE_RISING]
            .iter()
            .flat_map(|c| c.to_be_bytes())
            .collect();
        assert!(contains(&blob, &spec));
    }

    #[test]
    fn cpu_reg_keeps_only_affinity() {
        // Bit 31 (RES1) and the MT/U bits are not affinity.
        assert_eq!(cpu_reg(0x8000_0000), 0);
        assert_eq!(cpu_reg(0x8000_0102), 0x102);
        assert_eq!(cpu_reg(0x12_8001_0203), 0x12_0001_0203);
    }

    #[test]
    fn empty_machines_are_refused() {
        let e = build(&FdtConfig {
            memory: &[],
            mpidrs: &[0],
            cmdline: "",
            uart: None,
            virtio: &[],
        });
        assert!(matches!(e, Err(FdtError::Empty)));
    }
}
