//! The targets `smolpack pack` can produce: one VMM stub per OS and CPU, and how a machine is
//! attached to that stub's executable format.
//!
//! Stubs are embedded into `smolpack` at build time (`packer/build.rs`), so packing needs no
//! network and no toolchain. A target whose stub this build does not carry stays in the table,
//! so `--list-targets` and error messages can say how it will be added.

use smolvm_formats::trailer::ElfIdentity;
use smolvm_formats::Arch;

/// The stubs `packer/build.rs` embedded (each `None` when this build does not carry it).
mod embedded {
    include!(concat!(env!("OUT_DIR"), "/stubs.rs"));
}

/// How a machine is attached to a stub's executable format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackStrategy {
    /// ELF: `stub ‖ zero padding ‖ .smolmachine ‖ trailer`. The payload lies beyond every
    /// header, segment and section of the stub, so the loader and `strip` never see it; the
    /// stub finds it through the 64-byte trailer at the end of its own file.
    ElfAppend,
    /// Mach-O: the payload goes into a segment of its own (covered by the load commands),
    /// and the executable is re-signed ad hoc. Appending is not an option there: on Apple
    /// Silicon every executable must carry a valid code signature, and bytes after the
    /// signed image invalidate it.
    MachOSegment,
}

impl PackStrategy {
    /// Short description for `--list-targets`.
    pub fn describe(self) -> &'static str {
        match self {
            PackStrategy::ElfAppend => "ELF, payload appended after the image",
            PackStrategy::MachOSegment => "Mach-O, payload segment + ad-hoc re-sign",
        }
    }
}

/// Operating system a stub runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Os {
    Linux,
    MacOs,
}

/// One target of `smolpack pack --target`.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// `--target` name: `<cpu>-<os>`.
    pub name: &'static str,
    /// CPU of the stub, which is also the architecture of the machines it resumes.
    pub arch: Arch,
    pub os: Os,
    pub strategy: PackStrategy,
    /// The embedded stub, when this build carries it.
    pub stub: Option<&'static [u8]>,
    /// How a build that lacks the stub gets it.
    pub how_added: &'static str,
}

/// Every target, carried or not.
pub static TARGETS: &[Target] = &[
    Target {
        name: "x86_64-linux",
        arch: Arch::X86_64,
        os: Os::Linux,
        strategy: PackStrategy::ElfAppend,
        stub: embedded::X86_64_LINUX,
        how_added: "not carried by this build: the x86_64-linux stub is built into smolpack on \
                    x86_64 Linux hosts (unless SMOLPACK_NO_STUB_BUILD=1), elsewhere taken from \
                    SMOLPACK_STUB_X86_64_LINUX=<static smolvm binary> at build time",
    },
    Target {
        name: "aarch64-linux",
        arch: Arch::Aarch64,
        os: Os::Linux,
        strategy: PackStrategy::ElfAppend,
        stub: embedded::AARCH64_LINUX,
        how_added: "not carried by this build: the aarch64-linux stub is built into smolpack \
                    on aarch64 Linux hosts, and cross-built on x86_64 Linux hosts that have Debian's aarch64 toolchain (run \
                    scripts/setup --aarch64, then build smolpack again), elsewhere taken from \
                    SMOLPACK_STUB_AARCH64_LINUX=<static smolvm binary> at build time",
    },
    Target {
        name: "aarch64-macos",
        arch: Arch::Aarch64,
        os: Os::MacOs,
        strategy: PackStrategy::MachOSegment,
        stub: None,
        how_added: "not carried by this build: the aarch64-macos stub will be added with the \
                    Apple Silicon backend (applevisor); it runs machines built on macOS 15+ \
                    (docs/MACOS.md)",
    },
];

/// Why a target cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(
        "unknown target {name:?}; known targets: {known} (see `smolpack pack --list-targets`)"
    )]
    Unknown { name: String, known: String },
    #[error(
        "this host ({0}) has no default target; pass --target (see `smolpack pack --list-targets`)"
    )]
    NoHostDefault(String),
    #[error("cannot pack for {name}: {how}; or pass --stub PATH")]
    NotCarried {
        name: &'static str,
        how: &'static str,
    },
    #[error("cannot pack for {name}: {how}")]
    StrategyNotImplemented {
        name: &'static str,
        how: &'static str,
    },
}

/// ELF `e_machine` of x86-64.
const EM_X86_64: u16 = 62;
/// ELF `e_machine` of AArch64.
const EM_AARCH64: u16 = 183;
/// `EI_OSABI` values Linux executables carry: System V and GNU/Linux.
const LINUX_OSABIS: [u8; 2] = [0, 3];

impl Target {
    /// Whether this build embeds the stub.
    pub fn carried(&self) -> bool {
        self.stub.is_some()
    }

    /// The embedded stub, or why there is none.
    pub fn embedded_stub(&self) -> Result<&'static [u8], TargetError> {
        self.check_strategy()?;
        self.stub.ok_or(TargetError::NotCarried {
            name: self.name,
            how: self.how_added,
        })
    }

    /// Fails for targets whose executable format this build cannot write yet.
    pub fn check_strategy(&self) -> Result<(), TargetError> {
        match self.strategy {
            PackStrategy::ElfAppend => Ok(()),
            PackStrategy::MachOSegment => Err(TargetError::StrategyNotImplemented {
                name: self.name,
                how: self.how_added,
            }),
        }
    }

    /// Whether an ELF stub with this identity runs on the target.
    pub fn matches(&self, id: &ElfIdentity) -> bool {
        let machine = match self.arch {
            Arch::X86_64 => EM_X86_64,
            Arch::Aarch64 => EM_AARCH64,
        };
        self.os == Os::Linux
            && id.is_64
            && id.little_endian
            && id.machine == machine
            && LINUX_OSABIS.contains(&id.osabi)
    }
}

/// The target called `name`.
pub fn find(name: &str) -> Result<&'static Target, TargetError> {
    TARGETS
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| TargetError::Unknown {
            name: name.to_string(),
            known: TARGETS
                .iter()
                .map(|t| t.name)
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Name of the host this smolpack runs on, as a target name (empty for other hosts).
pub fn host_name() -> &'static str {
    match (std::env::consts::ARCH, std::env::consts::OS) {
        ("x86_64", "linux") => "x86_64-linux",
        ("aarch64", "linux") => "aarch64-linux",
        ("aarch64", "macos") => "aarch64-macos",
        _ => "",
    }
}

/// The default target: the host's.
pub fn host() -> Result<&'static Target, TargetError> {
    let name = host_name();
    TARGETS.iter().find(|t| t.name == name).ok_or_else(|| {
        TargetError::NoHostDefault(format!(
            "{}-{}",
            std::env::consts::ARCH,
            std::env::consts::OS
        ))
    })
}

/// The target an ELF stub runs on, if any.
pub fn identify(id: &ElfIdentity) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.matches(id))
}

/// Describes an ELF identity for `inspect`: the target name, or the raw fields.
pub fn describe_elf(id: &ElfIdentity) -> String {
    let linkage = if id.dynamic { "dynamic" } else { "static" };
    match identify(id) {
        Some(t) => format!("{}, {linkage}", t.name),
        None => format!(
            "unknown (ELF machine {}, {}-bit, {}-endian, OSABI {}), {linkage}",
            id.machine,
            if id.is_64 { 64 } else { 32 },
            if id.little_endian { "little" } else { "big" },
            id.osabi
        ),
    }
}

/// Human-readable byte count.
fn human(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / f64::from(1 << 20))
    } else {
        format!("{:.1} KiB", n as f64 / 1024.0)
    }
}

/// The `smolpack pack --list-targets` table.
pub fn list() -> String {
    let default = host_name();
    let mut s = format!("{:<14} {:<42} STUB\n", "TARGET", "FORMAT");
    for t in TARGETS {
        let stub = match (t.stub, t.check_strategy()) {
            (Some(b), Ok(())) => format!("carried, {}", human(b.len() as u64)),
            _ => t.how_added.to_string(),
        };
        let mark = if t.name == default { " (default)" } else { "" };
        s.push_str(&format!(
            "{:<14} {:<42} {stub}{mark}\n",
            t.name,
            t.strategy.describe()
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(machine: u16, osabi: u8) -> ElfIdentity {
        ElfIdentity {
            is_64: true,
            little_endian: true,
            machine,
            osabi,
            dynamic: false,
        }
    }

    #[test]
    fn table_names_are_unique_and_findable() {
        for t in TARGETS {
            assert_eq!(find(t.name).unwrap().name, t.name);
            assert_eq!(TARGETS.iter().filter(|x| x.name == t.name).count(), 1);
        }
        for name in ["x86_64-linux", "aarch64-linux", "aarch64-macos"] {
            assert!(find(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn unknown_target_lists_the_known_ones() {
        let e = find("riscv64-linux").unwrap_err().to_string();
        assert!(e.contains("riscv64-linux"), "{e}");
        assert!(
            e.contains("x86_64-linux, aarch64-linux, aarch64-macos"),
            "{e}"
        );
        assert!(e.contains("--list-targets"), "{e}");
    }

    #[test]
    fn macos_is_not_carried_and_says_how_it_will_be() {
        let t = find("aarch64-macos").unwrap();
        assert_eq!(t.strategy, PackStrategy::MachOSegment);
        assert!(!t.carried());
        let e = t.embedded_stub().unwrap_err().to_string();
        assert!(e.contains("Apple Silicon backend (applevisor)"), "{e}");
        assert!(e.contains("not carried by this build"), "{e}");
        // Even given a stub, the Mach-O strategy is not implemented yet.
        assert!(t.check_strategy().is_err());
    }

    #[test]
    fn aarch64_linux_is_carried_where_the_toolchain_is() {
        let t = find("aarch64-linux").unwrap();
        assert_eq!(t.strategy, PackStrategy::ElfAppend);
        assert_eq!(t.arch, Arch::Aarch64);
        match t.embedded_stub() {
            Ok(stub) => {
                let ident = smolvm_formats::trailer::elf_identity(stub).unwrap();
                assert_eq!(ident.machine, EM_AARCH64);
                assert!(!ident.dynamic, "the embedded stub is static");
                assert!(t.matches(&ident));
                assert_eq!(identify(&ident).unwrap().name, "aarch64-linux");
            }
            Err(e) => {
                // x86_64 CI installs the cross toolchain (scripts/setup --aarch64).
                assert!(
                    !(cfg!(all(target_arch = "x86_64", target_os = "linux"))
                        && option_env!("SMOLPACK_NO_STUB_BUILD") != Some("1")
                        && std::env::var("CI").is_ok_and(|v| v == "true")),
                    "CI=true: the aarch64-linux stub must be carried: {e}"
                );
                let e = e.to_string();
                assert!(e.contains("aarch64-linux"), "{e}");
                assert!(e.contains("scripts/setup --aarch64"), "{e}");
                assert!(e.contains("--stub"), "{e}");
            }
        }
    }

    #[test]
    fn x86_64_linux_is_carried_on_x86_64_linux_builds() {
        let t = find("x86_64-linux").unwrap();
        if cfg!(all(target_arch = "x86_64", target_os = "linux"))
            && option_env!("SMOLPACK_NO_STUB_BUILD") != Some("1")
        {
            let stub = t
                .embedded_stub()
                .expect("the x86_64-linux stub is embedded");
            let ident = smolvm_formats::trailer::elf_identity(stub).unwrap();
            assert!(!ident.dynamic, "the embedded stub is static");
            assert!(t.matches(&ident));
            assert_eq!(identify(&ident).unwrap().name, "x86_64-linux");
        } else {
            assert!(t.embedded_stub().is_err());
        }
    }

    #[test]
    fn identify_by_machine_and_osabi() {
        assert_eq!(identify(&id(62, 0)).unwrap().name, "x86_64-linux");
        assert_eq!(identify(&id(62, 3)).unwrap().name, "x86_64-linux");
        assert_eq!(identify(&id(183, 0)).unwrap().name, "aarch64-linux");
        assert!(identify(&id(62, 9)).is_none(), "FreeBSD is no target");
        assert!(identify(&id(40, 0)).is_none(), "32-bit ARM is no target");
        let mut be = id(62, 0);
        be.little_endian = false;
        assert!(identify(&be).is_none());
        let mut dynamic = id(62, 0);
        dynamic.dynamic = true;
        assert_eq!(describe_elf(&dynamic), "x86_64-linux, dynamic");
        assert!(describe_elf(&id(40, 0)).starts_with("unknown (ELF machine 40"));
    }

    #[test]
    fn list_shows_every_target_and_the_default() {
        let l = list();
        assert_eq!(l.lines().count(), TARGETS.len() + 1);
        for t in TARGETS {
            let line = l.lines().find(|x| x.starts_with(t.name)).unwrap();
            assert_eq!(line.contains("carried,"), t.carried(), "{line}");
        }
        if host().is_ok() {
            assert_eq!(l.matches("(default)").count(), 1, "{l}");
        }
    }

    #[test]
    fn host_default_is_in_the_table() {
        if cfg!(all(target_arch = "x86_64", target_os = "linux")) {
            assert_eq!(host().unwrap().name, "x86_64-linux");
        }
    }
}
