//! What kind of hypervisor host this is.
//!
//! A machine records the profile of the host that built it. A guest set up on
//! a PVM host (KVM without hardware virtualisation: guest kernel code runs
//! under KVM's instruction emulator, so it avoids instructions the emulator
//! lacks) also runs on hardware KVM; a guest set up on hardware KVM may use
//! instructions PVM cannot emulate, so it is refused on PVM.
//!
//! A machine also records the CPU architecture it was built for; [`check_arch`] refuses
//! another architecture's machine before any VM exists, on every architecture's runtime.

use std::fmt;
use std::path::Path;

use smolvm_formats::Arch;

/// A machine of another CPU architecture than this host's.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "this machine is for {machine}; this host is {host}: run it on an {machine} host, or build \
     it again on this one"
)]
pub struct ArchError {
    /// The architecture the machine was built for.
    pub machine: Arch,
    /// This host's architecture, in words.
    pub host: String,
}

/// Whether a machine built for `machine` can resume on this host: only on a host of the
/// same architecture (its memory holds that architecture's code and its state that CPU's
/// registers). Checked before any VM is created.
pub fn check_arch(machine: Arch) -> Result<(), ArchError> {
    check_arch_on(machine, Arch::host())
}

/// [`check_arch`] for a host of architecture `host` (`None`: one smolvm has no backend for).
pub fn check_arch_on(machine: Arch, host: Option<Arch>) -> Result<(), ArchError> {
    if host == Some(machine) {
        Ok(())
    } else {
        Err(ArchError {
            machine,
            host: host.map_or_else(|| std::env::consts::ARCH.to_string(), |a| a.to_string()),
        })
    }
}

/// The hypervisor a host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostProfile {
    /// KVM on hardware virtualisation (Intel VMX or AMD SVM).
    Kvm,
    /// KVM on PVM (`kvm_pvm`): shadow paging, no VMX/SVM.
    KvmPvm,
    /// No KVM module found.
    Unknown,
}

/// A machine cannot be resumed on this host.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProfileError {
    /// The machine was built on a host kind this host cannot stand in for.
    #[error("machine was built on a '{built}' host and cannot run on this '{here}' host (rebuild it here, or set SMOLVM_IGNORE_HOST_PROFILE=1 to try anyway)")]
    Incompatible { built: String, here: String },
}

impl HostProfile {
    /// Detect the profile from the loaded kernel modules.
    pub fn detect() -> HostProfile {
        Self::detect_in(Path::new("/sys/module"))
    }

    /// Detect the profile from a sysfs module directory (for tests).
    pub fn detect_in(modules: &Path) -> HostProfile {
        if modules.join("kvm_pvm").exists() {
            HostProfile::KvmPvm
        } else if modules.join("kvm_intel").exists() || modules.join("kvm_amd").exists() {
            HostProfile::Kvm
        } else {
            HostProfile::Unknown
        }
    }

    /// The name recorded in a machine's manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            HostProfile::Kvm => "kvm",
            HostProfile::KvmPvm => "kvm-pvm",
            HostProfile::Unknown => "unknown",
        }
    }

    /// Whether a machine built on a `built` host may resume here.
    pub fn check_can_resume(self, built: &str) -> Result<(), ProfileError> {
        let ok = match (built, self) {
            (b, here) if b == here.as_str() => true,
            // PVM-built guests avoid what PVM cannot emulate; hardware runs them.
            ("kvm-pvm", HostProfile::Kvm) => true,
            // Unknown hosts (no module info, e.g. containers) are not second-guessed.
            (_, HostProfile::Unknown) | ("unknown", _) | ("", _) => true,
            _ => false,
        };
        if ok || std::env::var_os("SMOLVM_IGNORE_HOST_PROFILE").is_some_and(|v| v == "1") {
            Ok(())
        } else {
            Err(ProfileError::Incompatible {
                built: built.to_string(),
                here: self.as_str().to_string(),
            })
        }
    }
}

impl fmt::Display for HostProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_from_modules() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(HostProfile::detect_in(dir.path()), HostProfile::Unknown);
        std::fs::create_dir(dir.path().join("kvm_amd")).unwrap();
        assert_eq!(HostProfile::detect_in(dir.path()), HostProfile::Kvm);
        std::fs::create_dir(dir.path().join("kvm_pvm")).unwrap();
        assert_eq!(HostProfile::detect_in(dir.path()), HostProfile::KvmPvm);
    }

    #[test]
    fn another_architecture_is_refused_naming_both() {
        assert_eq!(check_arch_on(Arch::X86_64, Some(Arch::X86_64)), Ok(()));
        assert_eq!(check_arch_on(Arch::Aarch64, Some(Arch::Aarch64)), Ok(()));
        let e = check_arch_on(Arch::Aarch64, Some(Arch::X86_64)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "this machine is for aarch64; this host is x86_64: run it on an aarch64 host, or \
             build it again on this one"
        );
        let e = check_arch_on(Arch::X86_64, Some(Arch::Aarch64)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "this machine is for x86_64; this host is aarch64: run it on an x86_64 host, or \
             build it again on this one"
        );
        let e = check_arch_on(Arch::X86_64, None).unwrap_err();
        assert!(e.to_string().contains("this machine is for x86_64"), "{e}");
        // This host's own machines pass.
        let here = Arch::host().expect("smolvm builds for x86_64 and aarch64 only");
        assert_eq!(check_arch(here), Ok(()));
    }

    #[test]
    fn compatibility_rules() {
        assert!(HostProfile::Kvm.check_can_resume("kvm-pvm").is_ok());
        assert!(HostProfile::Kvm.check_can_resume("kvm").is_ok());
        assert!(HostProfile::KvmPvm.check_can_resume("kvm-pvm").is_ok());
        if std::env::var_os("SMOLVM_IGNORE_HOST_PROFILE").is_none() {
            assert!(HostProfile::KvmPvm.check_can_resume("kvm").is_err());
        }
    }
}
