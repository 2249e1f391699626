//! Loading a Linux kernel: the ELF image at its physical addresses, then
//! either the PVH start info or, for the 64-bit boot protocol, the zero page
//! (`boot_params`) with an e820 map and the command line. The long-mode GDT
//! and identity page tables that protocol asks for are the VMM's shared boot
//! tables (`build_for_boot` writes them).
//!
//! A kernel with a PVH note is entered there by default (32-bit protected
//! mode, paging off, EBX = `hvm_start_info` with the memory map and command
//! line), as other microVMs do; the 64-bit entry (`startup_64`, long mode
//! with the VMM's shared boot tables, RSI = zero page) serves kernels
//! without the note, or on request. Both boot on PVM hosts.

use std::fs::File;
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::linux::{BootProtocol, LinuxConfig, LinuxError};
use crate::machine::Machine;
use crate::memory::GuestMemory;

/// The zero page (`boot_params`), passed to the kernel in RSI.
pub const ZERO_PAGE: u64 = 0x7000;
/// The initial stack, below the zero page's page.
pub const BOOT_STACK: u64 = 0x8ff0;
/// The command line, NUL-terminated.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Start of the extended BIOS data area: the end of usable low memory.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the kernel may start: everything below is boot structures and the
/// legacy hole.
pub const HIMEM_START: u64 = 0x10_0000;

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// Load `cfg.kernel` into the memory of a machine built for boot, write what
/// the boot protocol passes it (`cmdline` included) and set the vCPUs' entry.
pub fn load_and_enter(
    machine: &mut Machine,
    cfg: &LinuxConfig,
    cmdline: &str,
) -> Result<(), LinuxError> {
    use crate::arch::x86_64::regs::{Entry64, EntryPvh};
    let entries = load_kernel(machine.memory(), &cfg.kernel)?;
    let protocol = match (cfg.boot_protocol, entries.pvh) {
        (BootProtocol::Auto, Some(_)) => BootProtocol::Pvh,
        (BootProtocol::Auto, None) => BootProtocol::Linux64,
        (p, _) => p,
    };
    log::debug!("boot protocol: {protocol:?}");
    match protocol {
        BootProtocol::Linux64 | BootProtocol::Auto => {
            write_boot_params(machine.memory(), cmdline)?;
            machine.set_entry(&Entry64 {
                rip: entries.long_mode,
                rsp: BOOT_STACK,
                rsi: ZERO_PAGE,
            })?;
        }
        BootProtocol::Pvh => {
            let rip = entries.pvh.ok_or_else(|| LinuxError::Kernel {
                path: cfg.kernel.clone(),
                msg: "has no PVH entry note (CONFIG_PVH); boot it with BootProtocol::Linux64"
                    .into(),
            })?;
            write_pvh_start_info(machine.memory(), cmdline)?;
            machine.set_entry_pvh(&EntryPvh { rip, rbx: PVH_INFO })?;
        }
    }
    if cfg.vcpus > 1 {
        // Without ACPI, the MP table is how Linux finds the other vCPUs.
        let table = crate::arch::x86_64::mptable::mptable(cfg.vcpus)
            .map_err(|e| LinuxError::Config(e.to_string()))?;
        machine
            .memory()
            .write(crate::arch::x86_64::mptable::MPTABLE_ADDR, &table)
            .map_err(|e| LinuxError::Config(format!("cannot write the MP table: {e}")))?;
    }
    Ok(())
}

/// Where a loaded kernel can be entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelEntries {
    /// `startup_64`, for the 64-bit boot protocol (the ELF entry).
    pub long_mode: u64,
    /// The PVH entry, when the kernel has the note.
    pub pvh: Option<u64>,
}

/// Load the ELF kernel at `path` into guest memory; returns its entry points.
pub fn load_kernel(memory: &GuestMemory, path: &Path) -> Result<KernelEntries, LinuxError> {
    let bad = |msg: String| LinuxError::Kernel {
        path: path.to_owned(),
        msg,
    };
    let mut file = File::open(path).map_err(|e| bad(e.to_string()))?;
    let loaded = Elf::load(
        memory.mmap(),
        None,
        &mut file,
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(|e| {
        bad(format!(
            "not a loadable x86_64 vmlinux ELF ({e}); build it with guest/kernel/build.sh"
        ))
    })?;
    let end = memory.layout().last().map(|&(a, s)| a + s).unwrap_or(0);
    if loaded.kernel_end > end {
        return Err(bad(format!(
            "the kernel ends at {:#x}, past guest memory ({end:#x}); give the guest more memory",
            loaded.kernel_end
        )));
    }
    let pvh = match loaded.pvh_boot_cap {
        linux_loader::loader::elf::PvhBootCapability::PvhEntryPresent(a) => Some(a.0),
        _ => None,
    };
    Ok(KernelEntries {
        long_mode: loaded.kernel_load.0,
        pvh,
    })
}

/// The PVH start info (`hvm_start_info`, version 1).
pub const PVH_INFO: u64 = 0x6000;
/// The PVH memory map, after the start info.
pub const PVH_MEMMAP: u64 = 0x6040;
const PVH_MAGIC: u32 = 0x336e_c578;

/// Write the command line, the PVH start info and its memory map (the e820
/// map as `hvm_memmap_table_entry`s), for a PVH entry.
pub fn write_pvh_start_info(memory: &GuestMemory, cmdline: &str) -> Result<(), LinuxError> {
    let cfg = |e: crate::memory::MemoryError| {
        LinuxError::Config(format!("cannot write the PVH start info: {e}"))
    };
    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    memory.write(CMDLINE_ADDR, &line).map_err(cfg)?;
    let map = e820_map(&memory.layout());
    let mut table = Vec::with_capacity(map.len() * 24);
    for (addr, size) in &map {
        table.extend_from_slice(&addr.to_le_bytes());
        table.extend_from_slice(&size.to_le_bytes());
        table.extend_from_slice(&E820_RAM.to_le_bytes());
        table.extend_from_slice(&0u32.to_le_bytes());
    }
    if PVH_MEMMAP + table.len() as u64 > BOOT_STACK & !0xfff {
        return Err(LinuxError::Config("too many memory regions".into()));
    }
    memory.write(PVH_MEMMAP, &table).map_err(cfg)?;
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&PVH_MAGIC.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&0u32.to_le_bytes()); // nr_modules
    info.extend_from_slice(&0u64.to_le_bytes()); // modlist_paddr
    info.extend_from_slice(&CMDLINE_ADDR.to_le_bytes());
    info.extend_from_slice(&0u64.to_le_bytes()); // rsdp_paddr: no ACPI
    info.extend_from_slice(&PVH_MEMMAP.to_le_bytes());
    info.extend_from_slice(&(map.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    memory.write(PVH_INFO, &info).map_err(cfg)?;
    Ok(())
}

/// The e820 map for guest RAM regions: low memory below the EBDA, then RAM
/// from 1 MiB (the legacy hole between is left out).
pub fn e820_map(regions: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(addr, size) in regions {
        let end = addr + size;
        if addr < EBDA_START {
            out.push((addr, EBDA_START.min(end) - addr));
        }
        let hi = addr.max(HIMEM_START);
        if end > hi {
            out.push((hi, end - hi));
        }
    }
    out
}

/// Write the command line and the zero page.
pub fn write_boot_params(memory: &GuestMemory, cmdline: &str) -> Result<(), LinuxError> {
    let mem = memory.mmap();
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| LinuxError::Config(format!("cannot write the command line: {e}")))?;

    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = (bytes.len() - 1) as u32;
    let map = e820_map(&memory.layout());
    if map.len() > params.e820_table.len() {
        return Err(LinuxError::Config("too many memory regions".into()));
    }
    for (slot, &(addr, size)) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE))
        .map_err(|e| LinuxError::Config(format!("cannot write the zero page: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_skips_the_legacy_hole() {
        assert_eq!(
            e820_map(&[(0, 256 << 20)]),
            vec![(0, EBDA_START), (HIMEM_START, (256 << 20) - HIMEM_START)]
        );
        assert_eq!(
            e820_map(&[(0, 0xd000_0000), (1 << 32, 1 << 30)]),
            vec![
                (0, EBDA_START),
                (HIMEM_START, 0xd000_0000 - HIMEM_START),
                (1 << 32, 1 << 30)
            ]
        );
    }
}
