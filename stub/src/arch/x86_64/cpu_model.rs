//! CPU models: the CPUID a machine's guest sees, chosen when the machine is
//! built, so that a machine built on one x86_64 host resumes on another.
//!
//! A snapshot freezes the guest's view of the CPU: the kernel and every
//! process already picked their code paths from CPUID. A machine may only
//! resume where every feature it was shown exists. A named model shows the
//! guest a fixed, documented set: the host's supported CPUID (what KVM can
//! offer) masked to the model's features, with the XSAVE leaf recomputed for
//! the XCR0 the model allows, cache and topology leaves that match the vCPU
//! count, and only the stable kvmclock paravirtual features. `host` shows
//! everything the building host offers (fastest, and only resumable on hosts
//! with the same features).
//!
//! | model | features on top of the one before |
//! |---|---|
//! | `x86-64` (default) | x86-64-v1 (fpu, cx8, cmov, mmx, fxsr, sse, sse2, syscall, nx, lm and the system features every 64-bit CPU has) + sse3, cx16, lahf_lm; x2apic (KVM emulates it everywhere). What QEMU's `qemu64` CPU offers. |
//! | `x86-64-v2` | ssse3, sse4_1, sse4_2, popcnt |
//! | `x86-64-v3` | avx, avx2, bmi1, bmi2, f16c, fma, abm (lzcnt), movbe, xsave (XCR0 x87, SSE, AVX) |
//! | `x86-64-v4` | avx512f, avx512bw, avx512cd, avx512dq, avx512vl (XCR0 adds opmask, ZMM) |
//! | `host` | every feature the building host's KVM offers |
//!
//! Named models hide what varies between hosts and would tie a snapshot to
//! one: invariant TSC (so the guest keeps kvmclock as its clock source,
//! which stays right on a host with another TSC frequency), the PMU, speculation
//! control MSRs, PCID, FSGSBASE, and the paravirtual features other than
//! kvmclock.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// A CPU model a machine is built against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuModel {
    /// The portable default: x86-64-v1 + sse3, cx16, lahf_lm.
    #[default]
    X86_64,
    /// x86-64-v2 (psABI level 2).
    V2,
    /// x86-64-v3 (psABI level 3: AVX2).
    V3,
    /// x86-64-v4 (psABI level 4: AVX-512).
    V4,
    /// Everything the building host offers.
    Host,
}

/// The named (portable) models, from the most widely runnable.
pub const NAMED: [CpuModel; 4] = [CpuModel::X86_64, CpuModel::V2, CpuModel::V3, CpuModel::V4];

/// A machine does not fit this host's CPU, or a model name is unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuModelError {
    /// An unknown `--cpu` / `cpu =` name.
    #[error("unknown CPU model '{0}'; use x86-64 (the default), x86-64-v2, x86-64-v3, x86-64-v4 or host")]
    Unknown(String),
    /// A resume on a host that lacks features the machine's guest was shown.
    #[error("this machine needs a CPU with {}; this host lacks {}: {}", list(.missing), them(.missing), advice(*.fits))]
    HostLacks {
        missing: Vec<&'static str>,
        /// The most capable named model this host runs.
        fits: Option<CpuModel>,
    },
    /// A build for a model the building host cannot offer.
    #[error("--cpu {model} needs a CPU with {}; this host lacks {}: {}", list(.missing), them(.missing), build_advice(*.fits))]
    CannotBuild {
        model: CpuModel,
        missing: Vec<&'static str>,
        fits: Option<CpuModel>,
    },
}

fn list(names: &[&str]) -> String {
    const SHOWN: usize = 8;
    let shown = &names[..names.len().min(SHOWN)];
    let mut s = match shown {
        [] => String::new(),
        [one] => (*one).to_string(),
        [init @ .., last] if names.len() <= SHOWN => format!("{} and {last}", init.join(", ")),
        all => all.join(", "),
    };
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

fn them(names: &[&str]) -> &'static str {
    if names.len() == 1 {
        "it"
    } else {
        "them"
    }
}

fn advice(fits: Option<CpuModel>) -> String {
    match fits {
        Some(m) => format!("rebuild it with --cpu {m}"),
        None => "run it on a host with those features".into(),
    }
}

fn build_advice(fits: Option<CpuModel>) -> String {
    match fits {
        Some(m) => format!("build with --cpu {m} instead"),
        None => "build on a host with those features".into(),
    }
}

impl CpuModel {
    /// The name used by `--cpu`, the Smolfile and the manifest.
    pub fn name(self) -> &'static str {
        match self {
            CpuModel::X86_64 => "x86-64",
            CpuModel::V2 => "x86-64-v2",
            CpuModel::V3 => "x86-64-v3",
            CpuModel::V4 => "x86-64-v4",
            CpuModel::Host => "host",
        }
    }

    /// The model named `name` (`x86-64-v1` is accepted for `x86-64`).
    pub fn parse(name: &str) -> Result<CpuModel, CpuModelError> {
        match name {
            "x86-64" | "x86-64-v1" => Ok(CpuModel::X86_64),
            "x86-64-v2" => Ok(CpuModel::V2),
            "x86-64-v3" => Ok(CpuModel::V3),
            "x86-64-v4" => Ok(CpuModel::V4),
            "host" => Ok(CpuModel::Host),
            other => Err(CpuModelError::Unknown(other.to_string())),
        }
    }

    /// The model a manifest's `cpu` field names; empty (machines written
    /// before models existed, which carry the building host's CPUID) is `host`.
    pub fn from_manifest(field: &str) -> Result<CpuModel, CpuModelError> {
        if field.is_empty() {
            Ok(CpuModel::Host)
        } else {
            CpuModel::parse(field)
        }
    }

    /// Whether the model is a fixed, portable feature set.
    pub fn is_named(self) -> bool {
        self != CpuModel::Host
    }

    /// The features the model shows (cumulative), or None for `host`.
    pub fn features(self) -> Option<Vec<&'static str>> {
        let levels: &[&[&str]] = match self {
            CpuModel::X86_64 => &[BASE],
            CpuModel::V2 => &[BASE, V2],
            CpuModel::V3 => &[BASE, V2, V3],
            CpuModel::V4 => &[BASE, V2, V3, V4],
            CpuModel::Host => return None,
        };
        Some(levels.iter().flat_map(|l| l.iter().copied()).collect())
    }

    /// XSAVE components (XCR0 bits) the guest may enable, before intersecting
    /// with the host's; None for `host` (the host's).
    pub fn xcr0(self) -> Option<u64> {
        match self {
            CpuModel::X86_64 | CpuModel::V2 => Some(XCR0_X87 | XCR0_SSE),
            CpuModel::V3 => Some(XCR0_X87 | XCR0_SSE | XCR0_AVX),
            CpuModel::V4 => Some(XCR0_X87 | XCR0_SSE | XCR0_AVX | XCR0_AVX512),
            CpuModel::Host => None,
        }
    }
}

impl std::fmt::Display for CpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for CpuModel {
    type Err = CpuModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CpuModel::parse(s)
    }
}

const XCR0_X87: u64 = 1 << 0;
const XCR0_SSE: u64 = 1 << 1;
const XCR0_AVX: u64 = 1 << 2;
/// Opmask, ZMM_Hi256 and Hi16_ZMM.
const XCR0_AVX512: u64 = 0b111 << 5;

/// Which CPUID register a feature bit lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// One CPUID feature bit, by its Linux `/proc/cpuinfo` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u8,
}

const fn f(name: &'static str, leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> Feature {
    Feature {
        name,
        leaf,
        subleaf,
        reg,
        bit,
    }
}

use Reg::{Eax, Ebx, Ecx, Edx};

/// The feature bits that matter for resuming a machine: what a guest
/// kernel or program uses once it has seen it. Bits the VMM or KVM set
/// for themselves (hypervisor, htt, osxsave, ospke) are not here: they are
/// never a reason to refuse a host.
pub const FEATURES: &[Feature] = &[
    f("fpu", 1, 0, Edx, 0),
    f("vme", 1, 0, Edx, 1),
    f("de", 1, 0, Edx, 2),
    f("pse", 1, 0, Edx, 3),
    f("tsc", 1, 0, Edx, 4),
    f("msr", 1, 0, Edx, 5),
    f("pae", 1, 0, Edx, 6),
    f("mce", 1, 0, Edx, 7),
    f("cx8", 1, 0, Edx, 8),
    f("apic", 1, 0, Edx, 9),
    f("sep", 1, 0, Edx, 11),
    f("mtrr", 1, 0, Edx, 12),
    f("pge", 1, 0, Edx, 13),
    f("mca", 1, 0, Edx, 14),
    f("cmov", 1, 0, Edx, 15),
    f("pat", 1, 0, Edx, 16),
    f("pse36", 1, 0, Edx, 17),
    f("clflush", 1, 0, Edx, 19),
    f("mmx", 1, 0, Edx, 23),
    f("fxsr", 1, 0, Edx, 24),
    f("sse", 1, 0, Edx, 25),
    f("sse2", 1, 0, Edx, 26),
    f("sse3", 1, 0, Ecx, 0),
    f("pclmulqdq", 1, 0, Ecx, 1),
    f("ssse3", 1, 0, Ecx, 9),
    f("fma", 1, 0, Ecx, 12),
    f("cx16", 1, 0, Ecx, 13),
    f("pcid", 1, 0, Ecx, 17),
    f("sse4_1", 1, 0, Ecx, 19),
    f("sse4_2", 1, 0, Ecx, 20),
    f("x2apic", 1, 0, Ecx, 21),
    f("movbe", 1, 0, Ecx, 22),
    f("popcnt", 1, 0, Ecx, 23),
    f("aes", 1, 0, Ecx, 25),
    f("xsave", 1, 0, Ecx, 26),
    f("avx", 1, 0, Ecx, 28),
    f("f16c", 1, 0, Ecx, 29),
    f("rdrand", 1, 0, Ecx, 30),
    f("fsgsbase", 7, 0, Ebx, 0),
    f("bmi1", 7, 0, Ebx, 3),
    f("hle", 7, 0, Ebx, 4),
    f("avx2", 7, 0, Ebx, 5),
    f("smep", 7, 0, Ebx, 7),
    f("bmi2", 7, 0, Ebx, 8),
    f("erms", 7, 0, Ebx, 9),
    f("invpcid", 7, 0, Ebx, 10),
    f("rtm", 7, 0, Ebx, 11),
    f("avx512f", 7, 0, Ebx, 16),
    f("avx512dq", 7, 0, Ebx, 17),
    f("rdseed", 7, 0, Ebx, 18),
    f("adx", 7, 0, Ebx, 19),
    f("smap", 7, 0, Ebx, 20),
    f("avx512ifma", 7, 0, Ebx, 21),
    f("clflushopt", 7, 0, Ebx, 23),
    f("clwb", 7, 0, Ebx, 24),
    f("avx512cd", 7, 0, Ebx, 28),
    f("sha_ni", 7, 0, Ebx, 29),
    f("avx512bw", 7, 0, Ebx, 30),
    f("avx512vl", 7, 0, Ebx, 31),
    f("avx512vbmi", 7, 0, Ecx, 1),
    f("umip", 7, 0, Ecx, 2),
    f("pku", 7, 0, Ecx, 3),
    f("waitpkg", 7, 0, Ecx, 5),
    f("avx512_vbmi2", 7, 0, Ecx, 6),
    f("gfni", 7, 0, Ecx, 8),
    f("vaes", 7, 0, Ecx, 9),
    f("vpclmulqdq", 7, 0, Ecx, 10),
    f("avx512_vnni", 7, 0, Ecx, 11),
    f("avx512_bitalg", 7, 0, Ecx, 12),
    f("avx512_vpopcntdq", 7, 0, Ecx, 14),
    f("la57", 7, 0, Ecx, 16),
    f("rdpid", 7, 0, Ecx, 22),
    f("cldemote", 7, 0, Ecx, 25),
    f("movdiri", 7, 0, Ecx, 27),
    f("movdir64b", 7, 0, Ecx, 28),
    f("fsrm", 7, 0, Edx, 4),
    f("avx512_vp2intersect", 7, 0, Edx, 8),
    f("md_clear", 7, 0, Edx, 10),
    f("serialize", 7, 0, Edx, 14),
    f("tsxldtrk", 7, 0, Edx, 16),
    f("amx_bf16", 7, 0, Edx, 22),
    f("avx512_fp16", 7, 0, Edx, 23),
    f("amx_tile", 7, 0, Edx, 24),
    f("amx_int8", 7, 0, Edx, 25),
    f("spec_ctrl", 7, 0, Edx, 26),
    f("arch_capabilities", 7, 0, Edx, 29),
    f("ssbd", 7, 0, Edx, 31),
    f("avx_vnni", 7, 1, Eax, 4),
    f("avx512_bf16", 7, 1, Eax, 5),
    f("xsaveopt", 0xd, 1, Eax, 0),
    f("xsavec", 0xd, 1, Eax, 1),
    f("xgetbv1", 0xd, 1, Eax, 2),
    f("xsaves", 0xd, 1, Eax, 3),
    f("lahf_lm", 0x8000_0001, 0, Ecx, 0),
    f("cmp_legacy", 0x8000_0001, 0, Ecx, 1),
    f("abm", 0x8000_0001, 0, Ecx, 5),
    f("sse4a", 0x8000_0001, 0, Ecx, 6),
    f("misalignsse", 0x8000_0001, 0, Ecx, 7),
    f("3dnowprefetch", 0x8000_0001, 0, Ecx, 8),
    f("xop", 0x8000_0001, 0, Ecx, 11),
    f("fma4", 0x8000_0001, 0, Ecx, 16),
    f("tbm", 0x8000_0001, 0, Ecx, 21),
    f("topoext", 0x8000_0001, 0, Ecx, 22),
    f("syscall", 0x8000_0001, 0, Edx, 11),
    f("nx", 0x8000_0001, 0, Edx, 20),
    f("mmxext", 0x8000_0001, 0, Edx, 22),
    f("fxsr_opt", 0x8000_0001, 0, Edx, 25),
    f("pdpe1gb", 0x8000_0001, 0, Edx, 26),
    f("rdtscp", 0x8000_0001, 0, Edx, 27),
    f("lm", 0x8000_0001, 0, Edx, 29),
    f("constant_tsc", 0x8000_0007, 0, Edx, 8),
    f("clzero", 0x8000_0008, 0, Ebx, 0),
    f("wbnoinvd", 0x8000_0008, 0, Ebx, 9),
];

/// x86-64-v1 with the system features of every x86_64 CPU, plus sse3, cx16
/// and lahf_lm: exactly what QEMU's `qemu64` model offers (no vme), so the
/// default machine resumes on the most minimal x86_64 KVM hosts. x2apic is
/// emulated by KVM on every host.
const BASE: &[&str] = &[
    "fpu", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "mtrr", "pge", "mca",
    "cmov", "pat", "pse36", "clflush", "mmx", "fxsr", "sse", "sse2", "syscall", "nx", "lm", "sse3",
    "cx16", "lahf_lm", "x2apic",
];
const V2: &[&str] = &["ssse3", "sse4_1", "sse4_2", "popcnt"];
const V3: &[&str] = &[
    "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave",
];
const V4: &[&str] = &["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"];

/// The feature named `name` (a programming error if unknown).
fn feature(name: &str) -> &'static Feature {
    FEATURES
        .iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("CPU feature {name} is not in FEATURES"))
}

fn reg(e: &kvm_cpuid_entry2, r: Reg) -> u32 {
    match r {
        Eax => e.eax,
        Ebx => e.ebx,
        Ecx => e.ecx,
        Edx => e.edx,
    }
}

fn reg_mut(e: &mut kvm_cpuid_entry2, r: Reg) -> &mut u32 {
    match r {
        Eax => &mut e.eax,
        Ebx => &mut e.ebx,
        Ecx => &mut e.ecx,
        Edx => &mut e.edx,
    }
}

fn find(entries: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32) -> Option<&kvm_cpuid_entry2> {
    // Leaves whose subleaf does not matter are stored once, with index 0.
    entries
        .iter()
        .find(|e| e.function == leaf && e.index == subleaf)
        .or_else(|| {
            entries.iter().find(|e| {
                e.function == leaf && e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 && subleaf == 0
            })
        })
}

/// Whether `entries` show feature `f`.
pub fn has(entries: &[kvm_cpuid_entry2], f: &Feature) -> bool {
    find(entries, f.leaf, f.subleaf).is_some_and(|e| reg(e, f.reg) & (1 << f.bit) != 0)
}

/// The features a machine needs of a host: its model's, or for `host` (and
/// machines from before models) every known feature its saved CPUID shows.
pub fn required(model: CpuModel, saved: &[kvm_cpuid_entry2]) -> Vec<&'static Feature> {
    match model.features() {
        Some(names) => names.into_iter().map(feature).collect(),
        None => FEATURES.iter().filter(|f| has(saved, f)).collect(),
    }
}

/// The most capable named model `host` (a supported-CPUID table) offers.
pub fn best_named(host: &[kvm_cpuid_entry2]) -> Option<CpuModel> {
    NAMED.iter().rev().copied().find(|m| {
        required(*m, &[])
            .iter()
            .all(|f| has(host, f) || f.name == "x2apic")
    })
}

fn missing(required: &[&'static Feature], host: &[kvm_cpuid_entry2]) -> Vec<&'static str> {
    required
        .iter()
        // KVM offers x2apic on every host (it emulates the APIC).
        .filter(|f| !has(host, f) && f.name != "x2apic")
        .map(|f| f.name)
        .collect()
}

/// Check, before any vCPU exists, that a host whose KVM supports `host`
/// can resume a machine of `model` whose vCPU 0 CPUID was `saved`.
pub fn check_resume(
    model: CpuModel,
    saved: &[kvm_cpuid_entry2],
    host: &[kvm_cpuid_entry2],
) -> Result<(), CpuModelError> {
    let missing = missing(&required(model, saved), host);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CpuModelError::HostLacks {
            missing,
            fits: best_named(host),
        })
    }
}

/// Check that this host can build a machine of `model`.
pub fn check_build(model: CpuModel, host: &[kvm_cpuid_entry2]) -> Result<(), CpuModelError> {
    let missing = missing(&required(model, &[]), host);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CpuModelError::CannotBuild {
            model,
            missing,
            fits: best_named(host),
        })
    }
}

/// The feature leaves of the CPU this code runs on, read with the CPUID
/// instruction. On a PVM host this, not KVM's supported CPUID, is what a
/// guest uses: PVM runs guest code natively and does not trap CPUID, so
/// the guest sees the host CPU's features (KVM's table only gates what KVM
/// itself emulates).
pub fn native_cpuid() -> Vec<kvm_cpuid_entry2> {
    use std::arch::x86_64::__cpuid_count;
    // SAFETY: CPUID exists on every x86_64 CPU and only reads.
    #[allow(unused_unsafe)]
    let read = |leaf: u32, sub: u32| unsafe { __cpuid_count(leaf, sub) };
    let max_basic = read(0, 0).eax;
    let max_ext = read(0x8000_0000, 0).eax;
    let mut out = Vec::new();
    for (leaf, sub) in [
        (1, 0),
        (7, 0),
        (7, 1),
        (0xd, 1),
        (0x8000_0001, 0),
        (0x8000_0007, 0),
        (0x8000_0008, 0),
    ] {
        let present = if leaf >= 0x8000_0000 {
            leaf <= max_ext
        } else {
            leaf <= max_basic
        };
        if !present {
            continue;
        }
        let r = read(leaf, sub);
        out.push(kvm_cpuid_entry2 {
            function: leaf,
            index: sub,
            flags: if matches!(leaf, 7 | 0xd) {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: r.eax,
            ebx: r.ebx,
            ecx: r.ecx,
            edx: r.edx,
            ..Default::default()
        });
    }
    out
}

/// Registers of feature bits that a named model masks to its own features.
const FEATURE_REGS: &[(u32, u32, Reg)] = &[
    (1, 0, Ecx),
    (1, 0, Edx),
    (7, 0, Ebx),
    (7, 0, Ecx),
    (7, 0, Edx),
    (7, 1, Eax),
    (0xd, 1, Eax),
    (0x8000_0001, 0, Ecx),
    (0x8000_0001, 0, Edx),
    (0x8000_0007, 0, Edx),
    (0x8000_0008, 0, Ebx),
];

/// Leaf 6 EAX bit 2: the APIC timer runs in deep C-states (KVM's always does).
const ARAT: u32 = 1 << 2;
/// The highest basic and extended leaves a named model shows.
const MAX_BASIC: u32 = 0xd;
const MAX_EXTENDED: u32 = 0x8000_0008;

/// The CPUID table for a machine of `model` with `count` vCPUs, from the
/// host's supported CPUID (`KVM_GET_SUPPORTED_CPUID`). The per-vCPU APIC IDs
/// are patched in afterwards (`cpuid::patch_for_vcpu`). `host` returns the
/// table unchanged but for the KVM leaves.
pub fn cpuid_for(model: CpuModel, host: &[kvm_cpuid_entry2], count: u32) -> Vec<kvm_cpuid_entry2> {
    let Some(names) = model.features() else {
        let mut out = host.to_vec();
        if !out.iter().any(|e| e.function == 0x4000_0000) {
            out.extend(super::cpuid::kvm_leaves());
        }
        return out;
    };
    let masks = feature_masks(&names);
    let xsave = names.contains(&"xsave");
    let host_xcr0 = find(host, 0xd, 0).map_or(0, |e| u64::from(e.eax) | u64::from(e.edx) << 32);
    let xcr0 = model.xcr0().unwrap_or(0) & host_xcr0;
    let mut out = Vec::with_capacity(host.len());
    for e in host {
        let mut e = *e;
        let keep = match e.function {
            0 => {
                e.eax = e.eax.min(MAX_BASIC);
                true
            }
            1 | 2 | 4 => true,
            6 => {
                e.eax &= ARAT;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
                true
            }
            // Subleaf 0 only: it says there are no others.
            7 => {
                e.eax = 0;
                e.index == 0
            }
            0xd if xsave => match e.index {
                0 => {
                    e.eax = xcr0 as u32;
                    e.edx = (xcr0 >> 32) as u32;
                    // What the XCR0 at reset (x87 | SSE) needs; KVM keeps
                    // EBX current as the guest changes XCR0.
                    e.ebx = XSAVE_LEGACY_AND_HEADER;
                    e.ecx = xsave_size(host, xcr0);
                    true
                }
                // No supervisor states (no XSAVES): no XSS bits.
                1 => {
                    e.ebx = 0;
                    e.ecx = 0;
                    e.edx = 0;
                    true
                }
                i => i < 64 && xcr0 & (1 << i) != 0,
            },
            0x8000_0000 => {
                e.eax = e.eax.min(MAX_EXTENDED);
                true
            }
            0x8000_0001..=0x8000_0006 => true,
            0x8000_0007 => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                true
            }
            0x8000_0008 => {
                e.edx = 0;
                true
            }
            // Everything else (0xb is rebuilt below; the KVM leaves are
            // replaced; the PMU, SGX, PT, RDT, AMD topology and SEV
            // leaves and the rest are hidden).
            _ => false,
        };
        if !keep {
            continue;
        }
        for ((leaf, sub, r), m) in &masks {
            if e.function == *leaf && e.index == *sub {
                *reg_mut(&mut e, *r) &= m;
            }
        }
        if e.function == 0x8000_0008 && e.index == 0 {
            e.ebx |= host_erratum_bits(host);
        }
        out.push(e);
    }
    set_topology(&mut out, count);
    out.extend(super::cpuid::kvm_leaves());
    out
}

/// Leaf 0x8000_0008 EBX bit 2: FXSAVE/XRSTOR always save and restore the
/// x87 error pointers (every AMD CPU since Zen).
const XSAVEERPTR: u32 = 1 << 2;

/// Bits that describe the host CPU's errata, not features a program uses,
/// and so pass through every model. Without XSAVEERPTR a Linux guest on an
/// AMD host assumes the old FXSAVE pointer leak and runs an x87 sequence
/// (fnclex; emms; fild) on every FPU restore. A machine carried to a host
/// without the fix only misses that mitigation; Intel CPUs never leak.
fn host_erratum_bits(host: &[kvm_cpuid_entry2]) -> u32 {
    find(host, 0x8000_0008, 0).map_or(0, |e| e.ebx & XSAVEERPTR)
}

/// Per feature register, the bits of the features in `names`.
fn feature_masks(names: &[&str]) -> Vec<((u32, u32, Reg), u32)> {
    let mut masks: Vec<((u32, u32, Reg), u32)> = FEATURE_REGS.iter().map(|&r| (r, 0)).collect();
    for name in names {
        let f = feature(name);
        if let Some((_, m)) = masks
            .iter_mut()
            .find(|(r, _)| *r == (f.leaf, f.subleaf, f.reg))
        {
            *m |= 1 << f.bit;
        }
    }
    masks
}

/// The CPUID to save for vCPU `id` of `count`, from the table KVM reports
/// for it (`KVM_GET_CPUID2`). For a named model it is the model's table
/// again (the masking is idempotent): a PVM host reports, and runs the guest
/// with, the host CPU's feature bits whatever table the VMM set, and a
/// machine built there must not carry them to the next host, where
/// processes started after the resume would use them. OSXSAVE and OSPKE
/// come out clear; KVM sets them again from the restored CR4.
pub fn saved_cpuid(
    model: CpuModel,
    reported: &[kvm_cpuid_entry2],
    id: u32,
    count: u32,
) -> Vec<kvm_cpuid_entry2> {
    if !model.is_named() {
        return reported.to_vec();
    }
    let mut v = cpuid_for(model, reported, count);
    super::cpuid::patch_for_vcpu(&mut v, id, count);
    v
}

/// The legacy XSAVE area and the XSAVE header.
const XSAVE_LEGACY_AND_HEADER: u32 = 512 + 64;

/// Size of the standard-format XSAVE area holding the components of `xcr0`,
/// from the host's per-component offsets and sizes (leaf 0xd, subleaf i).
pub fn xsave_size(host: &[kvm_cpuid_entry2], xcr0: u64) -> u32 {
    (2..64)
        .filter(|i| xcr0 & (1u64 << i) != 0)
        .filter_map(|i| find(host, 0xd, i))
        .map(|e| e.ebx.saturating_add(e.eax))
        .fold(XSAVE_LEGACY_AND_HEADER, u32::max)
}

/// Cache and topology leaves for `count` vCPUs of one core each in one
/// package: leaf 4's core and sharing counts (L1 and L2 private, L3
/// shared), leaf 0xb's two levels, and AMD's core count (0x8000_0008 ECX).
fn set_topology(entries: &mut Vec<kvm_cpuid_entry2>, count: u32) {
    let count = count.max(1);
    for e in entries.iter_mut() {
        match e.function {
            4 => {
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((count - 1).min(63) << 26) | (sharing.min(4095) << 14);
            }
            0x8000_0008 => e.ecx = (count - 1).min(255),
            _ => {}
        }
    }
    entries.retain(|e| e.function != 0xb);
    let shift = u32::BITS - (count - 1).leading_zeros();
    let leaf_b = |index: u32, eax: u32, ebx: u32, ecx: u32| kvm_cpuid_entry2 {
        function: 0xb,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx,
        ..Default::default()
    };
    // Subleaf 0: the SMT level (one thread per core); 1: the core level
    // (`count` cores, APIC IDs `shift` bits wide); 2: the end.
    entries.push(leaf_b(0, 0, 1, 1 << 8));
    entries.push(leaf_b(1, shift, count, 2 << 8 | 1));
    entries.push(leaf_b(2, 0, 0, 2));
}

/// MSRs a machine of a named model saves (and restores, all of them):
/// what its CPUID lets the guest use. `host` saves every MSR KVM lists.
pub fn saved_msrs(model: CpuModel) -> Option<Vec<u32>> {
    if !model.is_named() {
        return None;
    }
    let mut v = vec![
        0x10,  // IA32_TSC
        0x11,  // kvmclock (first MSR set): wall clock
        0x12,  // kvmclock (first MSR set): system time
        0x140, // MISC_FEATURES_ENABLES (CPUID faulting)
        0x174, // SYSENTER_CS
        0x175, // SYSENTER_ESP
        0x176, // SYSENTER_EIP
        0x17a, // MCG_STATUS
        0x1a0, // MISC_ENABLE
        0x277, // PAT
        0x2ff, // MTRR default type
        0x250, // fixed-range MTRRs
        0x258,
        0x259,
        0xc000_0080, // EFER
        0xc000_0081, // STAR
        0xc000_0082, // LSTAR
        0xc000_0083, // CSTAR
        0xc000_0084, // SYSCALL_MASK
        0xc000_0100, // FS_BASE
        0xc000_0101, // GS_BASE
        0xc000_0102, // KERNEL_GS_BASE
        0x4b56_4d00, // kvmclock: wall clock
        0x4b56_4d01, // kvmclock: system time
    ];
    v.extend(0x200..0x210); // variable-range MTRRs (8 pairs)
    v.extend(0x268..0x270); // fixed-range MTRRs
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if matches!(function, 4 | 7 | 0xb | 0xd) {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn bits(names: &[&str], leaf: u32, sub: u32, r: Reg) -> u32 {
        names
            .iter()
            .map(|n| feature(n))
            .filter(|f| (f.leaf, f.subleaf, f.reg) == (leaf, sub, r))
            .fold(0, |m, f| m | 1 << f.bit)
    }

    /// A table like KVM_GET_SUPPORTED_CPUID's on a host with the named
    /// features, AVX-512 XSAVE components and a few leaves a named model hides.
    fn host_with(names: &[&str]) -> Vec<kvm_cpuid_entry2> {
        let b = |leaf, sub, r| bits(names, leaf, sub, r);
        let mut v = vec![
            entry(0, 0, [0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            entry(1, 0, [0x806f8, 0x0080_0800, b(1, 0, Ecx), b(1, 0, Edx)]),
            entry(4, 0, [0xfc00_4121, 0, 0, 0]),
            entry(4, 3, [0xfc0f_c163, 0, 0, 0]),
            entry(6, 0, [0x4 | 0x2, 1, 1, 0]),
            entry(7, 0, [2, b(7, 0, Ebx), b(7, 0, Ecx), b(7, 0, Edx)]),
            entry(7, 1, [b(7, 1, Eax), 0, 0, 0]),
            entry(0xa, 0, [0x0704_3002, 0, 0, 0]),
            entry(0xb, 0, [1, 2, 0x100, 0]),
            entry(0xd, 0, [0xe7, 0x240, 0xa88, 0]),
            entry(0xd, 1, [b(0xd, 1, Eax), 0, 0x1900, 0]),
            entry(0xd, 2, [0x100, 0x240, 0, 0]),
            entry(0xd, 5, [0x40, 0x440, 0, 0]),
            entry(0xd, 6, [0x200, 0x480, 0, 0]),
            entry(0xd, 7, [0x400, 0x680, 0, 0]),
            entry(0x1f, 0, [1, 2, 0x100, 0]),
            entry(0x4000_0000, 0, [0x4000_0001, 1, 2, 3]),
            entry(0x4000_0001, 0, [0x01ff_ffff, 0, 0, 0]),
            entry(0x8000_0000, 0, [0x8000_0021, 0, 0, 0]),
            entry(
                0x8000_0001,
                0,
                [0, 0, b(0x8000_0001, 0, Ecx), b(0x8000_0001, 0, Edx)],
            ),
            entry(0x8000_0007, 0, [0, 0, 0, b(0x8000_0007, 0, Edx)]),
            entry(0x8000_0008, 0, [0x3028, b(0x8000_0008, 0, Ebx), 0x7, 0]),
            entry(0x8000_001e, 0, [0, 0x100, 0, 0]),
        ];
        // The hypervisor bit and OSXSAVE are no features to check.
        v[1].ecx |= 1 << 31 | 1 << 27;
        v
    }

    fn find_mut(v: &mut [kvm_cpuid_entry2], leaf: u32) -> &mut kvm_cpuid_entry2 {
        v.iter_mut()
            .find(|e| e.function == leaf && e.index == 0)
            .unwrap()
    }

    fn all_features() -> Vec<&'static str> {
        FEATURES.iter().map(|f| f.name).collect()
    }

    /// What QEMU's `-cpu qemu64,+svm,+npt` offers a KVM inside it.
    fn qemu64() -> Vec<kvm_cpuid_entry2> {
        host_with(&[
            "fpu", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "mtrr", "pge",
            "mca", "cmov", "pat", "pse36", "clflush", "mmx", "fxsr", "sse", "sse2", "sse3", "cx16",
            "x2apic", "syscall", "nx", "lm", "lahf_lm",
        ])
    }

    fn get(v: &[kvm_cpuid_entry2], leaf: u32, sub: u32) -> Option<kvm_cpuid_entry2> {
        v.iter()
            .find(|e| e.function == leaf && e.index == sub)
            .copied()
    }

    #[test]
    fn names_round_trip() {
        for m in NAMED.iter().chain([&CpuModel::Host]) {
            assert_eq!(CpuModel::parse(m.name()), Ok(*m));
        }
        assert_eq!(CpuModel::parse("x86-64-v1"), Ok(CpuModel::X86_64));
        assert_eq!(CpuModel::default(), CpuModel::X86_64);
        assert_eq!(CpuModel::from_manifest(""), Ok(CpuModel::Host));
        let e = CpuModel::parse("skylake").unwrap_err().to_string();
        assert_eq!(e, "unknown CPU model 'skylake'; use x86-64 (the default), x86-64-v2, x86-64-v3, x86-64-v4 or host");
    }

    #[test]
    fn every_model_feature_is_known() {
        for m in NAMED {
            assert!(!required(m, &[]).is_empty());
        }
    }

    #[test]
    fn the_default_fits_qemu64_and_v2_does_not() {
        let host = qemu64();
        assert_eq!(best_named(&host), Some(CpuModel::X86_64));
        check_resume(CpuModel::X86_64, &[], &host).unwrap();
        check_build(CpuModel::X86_64, &host).unwrap();
        assert_eq!(
            check_resume(CpuModel::V2, &[], &host)
                .unwrap_err()
                .to_string(),
            "this machine needs a CPU with ssse3, sse4_1, sse4_2 and popcnt; this host lacks them: rebuild it with --cpu x86-64"
        );
    }

    #[test]
    fn a_host_without_avx2_and_bmi2_refuses_v3_in_one_line() {
        let mut names = all_features();
        names.retain(|n| !matches!(*n, "avx2" | "bmi2"));
        let host = host_with(&names);
        let msg = check_resume(CpuModel::V3, &[], &host)
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "this machine needs a CPU with avx2 and bmi2; this host lacks them: rebuild it with --cpu x86-64-v2"
        );
        assert!(!msg.contains('\n'));
        assert_eq!(
            check_build(CpuModel::V4, &host).unwrap_err().to_string(),
            "--cpu x86-64-v4 needs a CPU with avx2 and bmi2; this host lacks them: build with --cpu x86-64-v2 instead"
        );
    }

    #[test]
    fn a_host_machine_needs_what_its_saved_cpuid_shows() {
        let rich = host_with(&all_features());
        let saved = cpuid_for(CpuModel::Host, &rich, 1);
        let host = qemu64();
        let CpuModelError::HostLacks { missing, fits } =
            check_resume(CpuModel::Host, &saved, &host).unwrap_err()
        else {
            panic!("wrong error")
        };
        assert!(missing.contains(&"avx512f") && missing.contains(&"ssse3"));
        assert!(!missing.contains(&"x2apic") && !missing.contains(&"sse2"));
        assert_eq!(fits, Some(CpuModel::X86_64));
        let msg = check_resume(CpuModel::Host, &saved, &host)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains(" more; this host lacks them: rebuild it with --cpu x86-64"),
            "{msg}"
        );
        check_resume(CpuModel::Host, &saved, &rich).unwrap();
        // A default machine built on the rich host resumes on qemu64.
        let saved = cpuid_for(CpuModel::X86_64, &rich, 1);
        check_resume(CpuModel::X86_64, &saved, &host).unwrap();
        check_resume(CpuModel::Host, &saved, &host).unwrap();
    }

    #[test]
    fn the_default_model_masks_everything_else() {
        let rich = host_with(&all_features());
        let v = cpuid_for(CpuModel::X86_64, &rich, 1);
        let shown: Vec<&str> = FEATURES
            .iter()
            .filter(|f| has(&v, f))
            .map(|f| f.name)
            .collect();
        let mut want = BASE.to_vec();
        want.sort();
        let mut got = shown.clone();
        got.sort();
        assert_eq!(got, want);
        assert_eq!(get(&v, 0, 0).unwrap().eax, 0xd);
        assert_eq!(get(&v, 0x8000_0000, 0).unwrap().eax, 0x8000_0008);
        // No XSAVE: no leaf 0xd; leaf 7 has no subleaves; no PMU, no 0x1f.
        assert!(v.iter().all(|e| e.function != 0xd));
        assert_eq!(get(&v, 7, 0).unwrap().eax, 0);
        assert!(get(&v, 7, 1).is_none());
        assert!(get(&v, 0xa, 0).is_none() && get(&v, 0x1f, 0).is_none());
        assert!(get(&v, 0x8000_001e, 0).is_none());
        // Invariant TSC hidden: the guest keeps kvmclock.
        assert_eq!(get(&v, 0x8000_0007, 0).unwrap().edx, 0);
        assert_eq!(get(&v, 6, 0).unwrap().eax, ARAT);
        // Only the kvmclock paravirtual features.
        assert_eq!(
            get(&v, 0x4000_0001, 0).unwrap(),
            super::super::cpuid::kvm_leaves()[1]
        );
        assert_eq!(v.iter().filter(|e| e.function == 0x4000_0001).count(), 1);
    }

    #[test]
    fn v3_allows_avx_state_and_sizes_xsave_for_it() {
        let rich = host_with(&all_features());
        let v = cpuid_for(CpuModel::V3, &rich, 1);
        assert!(has(&v, feature("avx2")) && has(&v, feature("xsave")));
        assert!(!has(&v, feature("avx512f")) && !has(&v, feature("xsaveopt")));
        let d0 = get(&v, 0xd, 0).unwrap();
        assert_eq!((d0.eax, d0.edx), (0x7, 0));
        // AVX's component at 0x240 + 0x100 bytes.
        assert_eq!(d0.ecx, 0x340);
        assert_eq!(d0.ebx, 576);
        assert!(get(&v, 0xd, 2).is_some());
        assert!(get(&v, 0xd, 5).is_none());
        let d1 = get(&v, 0xd, 1).unwrap();
        assert_eq!((d1.eax, d1.ecx), (0, 0));
        let v4 = cpuid_for(CpuModel::V4, &rich, 1);
        let d0 = get(&v4, 0xd, 0).unwrap();
        assert_eq!(d0.eax, 0xe7);
        assert_eq!(d0.ecx, 0xa80);
        // A host without AVX-512 state offers v4's XCR0 only where it has it.
        let mut poor = rich.clone();
        poor.iter_mut()
            .filter(|e| e.function == 0xd && e.index == 0)
            .for_each(|e| e.eax = 0x7);
        assert_eq!(
            get(&cpuid_for(CpuModel::V4, &poor, 1), 0xd, 0).unwrap().eax,
            0x7
        );
    }

    #[test]
    fn topology_follows_the_vcpu_count() {
        let rich = host_with(&all_features());
        for count in [1u32, 2, 3, 4, 64] {
            let v = cpuid_for(CpuModel::X86_64, &rich, count);
            let l1 = get(&v, 4, 0).unwrap();
            assert_eq!(l1.eax >> 26, (count - 1).min(63));
            assert_eq!((l1.eax >> 14) & 0xfff, 0, "L1 is per core");
            assert_eq!(l1.eax & 0x3fff, 0x0121, "cache type and level kept");
            let l3 = get(&v, 4, 3).unwrap();
            assert_eq!((l3.eax >> 14) & 0xfff, count - 1, "L3 is shared");
            let smt = get(&v, 0xb, 0).unwrap();
            assert_eq!((smt.eax, smt.ebx, smt.ecx), (0, 1, 0x100));
            let core = get(&v, 0xb, 1).unwrap();
            assert_eq!(core.ebx, count);
            assert!(1u32 << core.eax >= count);
            assert_eq!(get(&v, 0xb, 2).unwrap().ecx >> 8, 0);
            assert_eq!(get(&v, 0x8000_0008, 0).unwrap().ecx, count - 1);
        }
        assert_eq!(
            get(&cpuid_for(CpuModel::X86_64, &rich, 4), 0xb, 1)
                .unwrap()
                .eax,
            2
        );
        assert_eq!(
            get(&cpuid_for(CpuModel::X86_64, &rich, 5), 0xb, 1)
                .unwrap()
                .eax,
            3
        );
    }

    #[test]
    fn host_keeps_the_table() {
        let rich = host_with(&all_features());
        let v = cpuid_for(CpuModel::Host, &rich, 2);
        assert_eq!(v.len(), rich.len());
        assert!(has(&v, feature("avx512f")) && has(&v, feature("constant_tsc")));
    }

    #[test]
    fn saved_tables_are_the_models_again() {
        let rich = host_with(&all_features());
        let mut set = cpuid_for(CpuModel::V3, &rich, 2);
        crate::arch::x86_64::cpuid::patch_for_vcpu(&mut set, 1, 2);
        // What KVM reports back on hardware: the table as set.
        assert_eq!(saved_cpuid(CpuModel::V3, &set, 1, 2), set);
        // What a PVM host reports: its own feature bits and leaves.
        let mut pvm = rich.clone();
        crate::arch::x86_64::cpuid::patch_for_vcpu(&mut pvm, 1, 2);
        let saved = saved_cpuid(CpuModel::V3, &pvm, 1, 2);
        let shown: Vec<&str> = FEATURES
            .iter()
            .filter(|f| has(&saved, f))
            .map(|f| f.name)
            .collect();
        let want = CpuModel::V3.features().unwrap();
        assert!(shown.iter().all(|n| want.contains(n)), "{shown:?}");
        assert!(saved
            .iter()
            .all(|e| e.function != 0xa && e.function != 0x1f));
        assert_eq!(saved_cpuid(CpuModel::Host, &pvm, 1, 2), pvm);
    }

    #[test]
    fn the_host_xsaveerptr_erratum_bit_passes_through_named_models() {
        let ebx = |v: &[kvm_cpuid_entry2]| find(v, 0x8000_0008, 0).unwrap().ebx;
        let mut amd = qemu64();
        find_mut(&mut amd, 0x8000_0008).ebx |= XSAVEERPTR | 1 << 9;
        let out = cpuid_for(CpuModel::X86_64, &amd, 1);
        // The erratum bit stays; a feature outside the model (wbnoinvd) does not.
        assert_eq!(ebx(&out) & (XSAVEERPTR | 1 << 9), XSAVEERPTR);
        assert_eq!(
            ebx(&cpuid_for(CpuModel::X86_64, &qemu64(), 1)) & XSAVEERPTR,
            0
        );
        // It is no feature a resume host is checked for.
        assert!(required(CpuModel::X86_64, &out)
            .iter()
            .all(|f| f.leaf != 0x8000_0008));
    }

    #[test]
    fn this_cpu_reads_natively() {
        let native = native_cpuid();
        // Every x86_64 CPU has long mode and SSE2.
        assert!(has(&native, feature("lm")) && has(&native, feature("sse2")));
    }

    #[test]
    fn msr_allowlist() {
        let named = saved_msrs(CpuModel::X86_64).unwrap();
        for want in [0x10, 0xc000_0102, 0x4b56_4d01, 0x2ff, 0x20f] {
            assert!(named.contains(&want), "{want:#x}");
        }
        // LBR, speculation control, TSC deadline and TSC_AUX are not baseline state.
        for no in [0x1db, 0x48, 0x6e0, 0xc000_0103, 0x4b56_4d02] {
            assert!(!named.contains(&no), "{no:#x}");
        }
        assert!(saved_msrs(CpuModel::Host).is_none());
    }
}
