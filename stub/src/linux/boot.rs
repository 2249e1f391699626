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

use super::LinuxError;
use crate::arch::x86_64::cpu_model::CpuModel;
use crate::host::HostProfile;
use crate::memory::GuestMemory;

/// The zero page (`boot_params`), passed to the kernel in RSI.
pub const ZERO_PAGE: u64 = 0x7000;
/// The initial stack, below the zero page's page.
pub const BOOT_STACK: u64 = 0x8ff0;
/// The command line, NUL-terminated.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line accepted (the kernel's x86 limit).
pub const CMDLINE_MAX: usize = 2048;
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

/// The command-line base every guest gets.
pub const CMDLINE_BASE: &str = include_str!("../../../guest/kernel/cmdline-base.txt");
/// Workarounds for PVM hosts only (never on hardware KVM).
pub const CMDLINE_PVM: &str = include_str!("../../../guest/kernel/cmdline-pvm.txt");

/// PVM hosts only: keep glibc in PID 1 (the agent, which carries every byte
/// of the host stream) off AVX. Under PVM the guest kernel runs without XSAVE
/// (hidden by `cmdline-pvm.txt`), so it saves only the legacy SSE state on a
/// task switch, while user code runs natively with the host's XCR0 and sees
/// AVX: upper YMM halves are then lost across switches, and AVX `memcpy`
/// corrupted agent frames 64 bytes at a time (reproduced with 64 KiB of
/// output; gone with this option). The kernel passes it to init's environment.
pub const PVM_USER_NO_AVX: &str =
    "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX_Fast_Unaligned_Load";

/// Pieces of a guest command line, in the order they are joined.
pub struct CmdlineParts<'a> {
    /// The host profile: PVM options are added only for `KvmPvm`.
    pub profile: HostProfile,
    /// `virtio_mmio.device=...` fragments.
    pub devices: &'a [String],
    /// Mount the root read-write.
    pub root_rw: bool,
    /// The agent's port: a virtio port name (`org.smolvm.agent`) or a device node.
    pub agent_port: &'a str,
    /// Caller's extra options, last so they win.
    pub extra: &'a str,
    /// The CPU model the guest is shown.
    pub cpu: CpuModel,
}

/// PVM hosts only, for CPU models that hide FSGSBASE: under PVM the guest
/// executes CPUID natively and sees the host's FSGSBASE, but KVM checks its
/// CR4 writes against the model's CPUID and refuses CR4.FSGSBASE, which the
/// kernel would set at boot.
pub const PVM_NO_FSGSBASE: &str = "nofsgsbase";

/// Build the kernel command line.
pub fn compose_cmdline(p: &CmdlineParts<'_>) -> Result<String, LinuxError> {
    let mut words: Vec<&str> = CMDLINE_BASE.split_whitespace().collect();
    if p.profile == HostProfile::KvmPvm {
        words.extend(CMDLINE_PVM.split_whitespace());
        if !CMDLINE_PVM.contains("GLIBC_TUNABLES=") {
            words.push(PVM_USER_NO_AVX);
        }
        if p.cpu.features().is_some_and(|f| !f.contains(&"fsgsbase")) {
            words.push(PVM_NO_FSGSBASE);
        }
    }
    words.extend(p.devices.iter().map(String::as_str));
    words.push("root=/dev/vda");
    words.push(if p.root_rw { "rw" } else { "ro" });
    let agent = format!("smolvm.agent={}", p.agent_port);
    words.push(&agent);
    words.extend(p.extra.split_whitespace());
    let line = words.join(" ");
    if line.len() >= CMDLINE_MAX {
        return Err(LinuxError::Config(format!(
            "kernel command line is {} bytes; the limit is {}",
            line.len(),
            CMDLINE_MAX - 1
        )));
    }
    if line.bytes().any(|b| b == 0) {
        return Err(LinuxError::Config(
            "kernel command line contains a NUL byte".into(),
        ));
    }
    Ok(line)
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

    #[test]
    fn pvm_options_only_on_pvm_hosts() {
        let devs = vec!["virtio_mmio.device=4K@0xd0000000:5".to_string()];
        let mut parts = CmdlineParts {
            profile: HostProfile::Kvm,
            devices: &devs,
            root_rw: false,
            agent_port: "/dev/hvc0",
            extra: "loglevel=7",
            cpu: CpuModel::default(),
        };
        let hw = compose_cmdline(&parts).unwrap();
        for w in CMDLINE_PVM.split_whitespace() {
            if !CMDLINE_BASE.split_whitespace().any(|b| b == w) {
                assert!(!hw.split(' ').any(|x| x == w), "{w} leaked: {hw}");
            }
        }
        assert!(!hw.contains("GLIBC_TUNABLES"), "{hw}");
        assert!(hw.starts_with(CMDLINE_BASE.trim()));
        assert!(hw.contains("virtio_mmio.device=4K@0xd0000000:5 root=/dev/vda ro"));
        assert!(hw.ends_with("smolvm.agent=/dev/hvc0 loglevel=7"));
        parts.profile = HostProfile::KvmPvm;
        parts.root_rw = true;
        let pvm = compose_cmdline(&parts).unwrap();
        assert!(pvm.contains(CMDLINE_PVM.trim()));
        assert!(pvm.contains("GLIBC_TUNABLES="), "{pvm}");
        assert!(pvm.contains(" rw "));
        assert!(pvm.split(' ').any(|w| w == PVM_NO_FSGSBASE), "{pvm}");
        assert!(!hw.contains(PVM_NO_FSGSBASE), "{hw}");
        parts.cpu = CpuModel::Host;
        let pvm_host = compose_cmdline(&parts).unwrap();
        assert!(!pvm_host.contains(PVM_NO_FSGSBASE), "{pvm_host}");
        parts.cpu = CpuModel::default();
        let long = "x".repeat(CMDLINE_MAX);
        parts.extra = &long;
        assert!(compose_cmdline(&parts).is_err());
    }
}
