//! Booting an arm64 Linux kernel (Documentation/arch/arm64/booting.rst): the
//! uncompressed `Image` at a 2 MiB-aligned base plus its header's
//! `text_offset` (`linux-loader`'s PE loader reads the header), the device
//! tree near the top of RAM, and vCPU 0 entered at the image's start with
//! x0 = the device tree's address, the MMU off and every exception masked
//! (`VcpuAarch64::configure_boot`). The other vCPUs wait powered off for
//! the kernel's PSCI CPU_ON.

use std::fs::File;

use linux_loader::loader::{pe::PE, KernelLoader};
use vm_memory::GuestAddress;

use crate::arch::aarch64::fdt::{self, FdtConfig};
use crate::arch::aarch64::layout::RAM_BASE;
use crate::arch::aarch64::regs::Entry;
use crate::linux::devices::LinuxDevices;
use crate::linux::{LinuxConfig, LinuxError};
use crate::machine::Machine;

/// Where the device tree goes: this far below the end of RAM, in a 2 MiB
/// block of its own (the protocol maps it with up to 2 MiB blocks).
const FDT_FROM_END: u64 = 2 << 20;

/// Load `cfg.kernel` (an arm64 `Image`) into the memory of a machine built
/// for boot, write the device tree (`cmdline` in `/chosen`) and set vCPU 0's
/// entry.
pub fn load_and_enter(
    machine: &mut Machine,
    cfg: &LinuxConfig,
    cmdline: &str,
) -> Result<(), LinuxError> {
    let bad = |msg: String| LinuxError::Kernel {
        path: cfg.kernel.clone(),
        msg,
    };
    let mut file = File::open(&cfg.kernel).map_err(|e| bad(e.to_string()))?;
    let loaded = PE::load(
        machine.memory().mmap(),
        Some(GuestAddress(RAM_BASE)),
        &mut file,
        None,
    )
    .map_err(|e| {
        bad(format!(
            "not a loadable arm64 Image ({e}); build it with guest/kernel/build.sh --arch arm64"
        ))
    })?;
    let regions = machine.memory().layout();
    let end = regions.last().map(|&(a, s)| a + s).unwrap_or(0);
    let fdt_addr = end.saturating_sub(FDT_FROM_END);
    if loaded.kernel_end > fdt_addr {
        return Err(bad(format!(
            "the kernel ends at {:#x}, past the device tree's place ({fdt_addr:#x}); give the guest more memory",
            loaded.kernel_end
        )));
    }
    let mpidrs = machine.vcpu_mpidrs()?;
    let (uart, virtio) = LinuxDevices::fdt_devices();
    let blob = fdt::build(&FdtConfig {
        memory: &regions,
        mpidrs: &mpidrs,
        cmdline,
        uart: Some(uart),
        virtio: &virtio,
    })
    .map_err(|e| LinuxError::Config(e.to_string()))?;
    machine
        .memory()
        .write(fdt_addr, &blob)
        .map_err(|e| LinuxError::Config(format!("cannot write the device tree: {e}")))?;
    machine.set_entry(&Entry {
        pc: loaded.kernel_load.0,
        sp: 0,
        x0: fdt_addr,
    })?;
    Ok(())
}
