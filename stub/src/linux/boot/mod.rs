//! Booting a Linux kernel: the command line every guest gets, and per
//! architecture how the kernel is loaded and entered (`x86_64`: the ELF
//! `vmlinux` with PVH or the 64-bit boot protocol; `aarch64`: the `Image`
//! with a device tree).

#[cfg(target_arch = "aarch64")]
pub mod aarch64;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

#[cfg(target_arch = "aarch64")]
pub use self::aarch64::load_and_enter;
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::load_and_enter;

use super::LinuxError;
use crate::arch::cpu_model::CpuModel;
use crate::host::HostProfile;

/// Longest command line accepted (the kernel's x86 limit; arm64's is 2048 too).
pub const CMDLINE_MAX: usize = 2048;

/// The command-line base every guest gets.
#[cfg(not(target_arch = "aarch64"))]
pub const CMDLINE_BASE: &str = include_str!("../../../../guest/kernel/cmdline-base.txt");
/// The command-line base every guest gets (aarch64: the same console and
/// panic behaviour, without the x86-only clock and reboot options).
#[cfg(target_arch = "aarch64")]
pub const CMDLINE_BASE: &str = include_str!("../../../../guest/kernel/cmdline-base-arm64.txt");
/// Workarounds for PVM hosts only (never on hardware KVM).
pub const CMDLINE_PVM: &str = include_str!("../../../../guest/kernel/cmdline-pvm.txt");

/// PVM hosts only: what glibc in the guest's user space may use. Two reasons,
/// both because under PVM user code runs natively with the host's CPUID and
/// XCR0, not the CPU model's:
///
/// - AVX, always: the guest kernel runs without XSAVE (hidden by
///   `cmdline-pvm.txt`), so it saves only the legacy SSE state on a task
///   switch, and upper YMM halves are lost across switches (AVX `memcpy`
///   corrupted agent frames 64 bytes at a time; gone with this mask).
/// - Every feature glibc selects code by and the CPU model lacks: the
///   processes in a snapshot (the agent, PID 1, above all) picked their
///   `memcpy`, `strlen`, ... when they started, so a PVM-built default-model
///   machine used SSE4.2 routines and its agent died of SIGILL on a host
///   without them (`-cpu qemu64`). Hardware KVM needs none of this: there
///   CPUID is the model's.
///
/// The kernel passes `GLIBC_TUNABLES=` to init's environment and the agent to
/// every command. Programs that run CPUID themselves still see the host.
pub const PVM_USER_NO_AVX: &[&str] = &[
    "AVX",
    "AVX2",
    "AVX512F",
    "AVX512VL",
    "AVX_Fast_Unaligned_Load",
];

/// glibc's `glibc.cpu.hwcaps` names (glibc 2.36, sysdeps/x86/cpu-tunables.c)
/// of the features its ifuncs and `glibc-hwcaps` directories select by, with
/// the CPU model feature each one needs.
const GLIBC_HWCAPS: &[(&str, &str)] = &[
    ("SSSE3", "ssse3"),
    ("SSE4_1", "sse4_1"),
    ("SSE4_2", "sse4_2"),
    ("POPCNT", "popcnt"),
    ("AVX", "avx"),
    ("AVX2", "avx2"),
    ("FMA", "fma"),
    ("FMA4", "fma4"),
    ("BMI1", "bmi1"),
    ("BMI2", "bmi2"),
    ("LZCNT", "abm"),
    ("MOVBE", "movbe"),
    ("ERMS", "erms"),
    ("RTM", "rtm"),
    ("XSAVEC", "xsavec"),
    ("AVX512F", "avx512f"),
    ("AVX512CD", "avx512cd"),
    ("AVX512BW", "avx512bw"),
    ("AVX512DQ", "avx512dq"),
    ("AVX512VL", "avx512vl"),
];

/// PVM hosts only: the `GLIBC_TUNABLES=` word for a CPU model (see
/// [`PVM_USER_NO_AVX`]): the AVX mask, plus every glibc feature the model
/// does not show (none more for `host`).
pub fn pvm_glibc_tunables(cpu: CpuModel) -> String {
    let mut off: Vec<&str> = PVM_USER_NO_AVX.to_vec();
    if let Some(shown) = cpu.features() {
        for (glibc, feature) in GLIBC_HWCAPS {
            if !shown.contains(feature) && !off.contains(glibc) {
                off.push(glibc);
            }
        }
    }
    let masks: Vec<String> = off.iter().map(|f| format!("-{f}")).collect();
    format!("GLIBC_TUNABLES=glibc.cpu.hwcaps={}", masks.join(","))
}

/// Pieces of a guest command line, in the order they are joined.
pub struct CmdlineParts<'a> {
    /// The host profile: PVM options are added only for `KvmPvm`.
    pub profile: HostProfile,
    /// `virtio_mmio.device=...` fragments (x86_64; aarch64 declares its
    /// devices in the device tree).
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
    // Declared before `words`, which borrows it.
    let tunables = pvm_glibc_tunables(p.cpu);
    let mut words: Vec<&str> = CMDLINE_BASE.split_whitespace().collect();
    if p.profile == HostProfile::KvmPvm {
        words.extend(CMDLINE_PVM.split_whitespace());
        if !CMDLINE_PVM.contains("GLIBC_TUNABLES=") {
            words.push(&tunables);
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

#[cfg(test)]
mod tests {
    use super::*;

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
        #[cfg(target_arch = "x86_64")]
        {
            assert!(pvm.split(' ').any(|w| w == PVM_NO_FSGSBASE), "{pvm}");
            assert!(!hw.contains(PVM_NO_FSGSBASE), "{hw}");
            parts.cpu = CpuModel::Host;
            let pvm_host = compose_cmdline(&parts).unwrap();
            assert!(!pvm_host.contains(PVM_NO_FSGSBASE), "{pvm_host}");
            parts.cpu = CpuModel::default();
        }
        let long = "x".repeat(CMDLINE_MAX);
        parts.extra = &long;
        assert!(compose_cmdline(&parts).is_err());
    }

    /// The hwcaps a PVM guest's glibc is told to drop, per model: AVX always,
    /// and exactly what the model does not show.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn pvm_glibc_mask_follows_the_model() {
        use crate::arch::cpu_model::{FEATURES, NAMED};
        let masked = |cpu: CpuModel| -> Vec<String> {
            let word = pvm_glibc_tunables(cpu);
            let list = word
                .strip_prefix("GLIBC_TUNABLES=glibc.cpu.hwcaps=")
                .unwrap_or_else(|| panic!("{word}"));
            list.split(',')
                .map(|m| {
                    m.strip_prefix('-')
                        .unwrap_or_else(|| panic!("{m}"))
                        .to_string()
                })
                .collect()
        };
        for (glibc, feature) in GLIBC_HWCAPS {
            assert!(
                FEATURES.iter().any(|f| f.name == *feature),
                "{glibc}: {feature}"
            );
        }
        assert_eq!(masked(CpuModel::Host), PVM_USER_NO_AVX);
        for cpu in NAMED {
            let off = masked(cpu);
            let shown = cpu.features().unwrap();
            for avx in PVM_USER_NO_AVX {
                assert!(off.iter().any(|m| m == avx), "{cpu}: {avx} not masked");
            }
            for (glibc, feature) in GLIBC_HWCAPS {
                let is_off = off.iter().any(|m| m == glibc);
                let must_be_off = !shown.contains(feature) || PVM_USER_NO_AVX.contains(glibc);
                assert_eq!(is_off, must_be_off, "{cpu}: {glibc}");
            }
            let mut unique = off.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), off.len(), "{cpu}: {off:?}");
        }
        // The default model: the SSE4.2 string routines the agent died of on qemu64.
        let default = masked(CpuModel::default());
        for f in ["SSSE3", "SSE4_1", "SSE4_2", "POPCNT", "BMI2", "ERMS"] {
            assert!(default.iter().any(|m| m == f), "{f}: {default:?}");
        }
        // The kernel takes the word whole, as init's environment.
        let parts = CmdlineParts {
            profile: HostProfile::KvmPvm,
            devices: &[],
            root_rw: false,
            agent_port: "/dev/hvc0",
            extra: "",
            cpu: CpuModel::default(),
        };
        let line = compose_cmdline(&parts).unwrap();
        let word = pvm_glibc_tunables(CpuModel::default());
        assert!(line.split(' ').any(|w| w == word), "{line}");
    }
}
