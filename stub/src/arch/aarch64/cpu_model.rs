//! CPU models on aarch64. There is one so far, `host`: the guest sees the
//! building host's ID registers as KVM offers them, and a machine resumes
//! where KVM accepts those registers back (the saved vCPU state holds every
//! register `KVM_GET_REG_LIST` lists, ID registers included, and KVM refuses a
//! write that differs from what it can offer). Named arm64 baselines (Armv8.0
//! plus a fixed feature set, as Firecracker's aarch64 CPU templates do) need
//! KVM's writable ID registers (Linux 6.7+); they come with issue 11's x86
//! counterpart. The API matches `arch::x86_64::cpu_model` where callers share it.

/// A CPU model a machine is built against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuModel {
    /// Everything the building host's KVM offers.
    #[default]
    Host,
}

/// An unknown model name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuModelError {
    /// An unknown `--cpu` / `cpu =` name.
    #[error("unknown CPU model '{0}'; on aarch64 the only model is host (the default)")]
    Unknown(String),
}

impl CpuModel {
    /// The name used by `--cpu`, the Smolfile and the manifest.
    pub fn name(self) -> &'static str {
        "host"
    }

    /// The model named `name`.
    pub fn parse(name: &str) -> Result<CpuModel, CpuModelError> {
        match name {
            "host" => Ok(CpuModel::Host),
            other => Err(CpuModelError::Unknown(other.to_string())),
        }
    }

    /// The model a manifest's `cpu` field names (empty is `host`).
    pub fn from_manifest(field: &str) -> Result<CpuModel, CpuModelError> {
        if field.is_empty() {
            Ok(CpuModel::Host)
        } else {
            CpuModel::parse(field)
        }
    }

    /// Whether the model is a fixed, portable feature set (none is yet).
    pub fn is_named(self) -> bool {
        false
    }

    /// The features the model shows, or None for `host`.
    pub fn features(self) -> Option<Vec<&'static str>> {
        None
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_the_only_model() {
        assert_eq!(CpuModel::parse("host"), Ok(CpuModel::Host));
        assert_eq!(CpuModel::from_manifest(""), Ok(CpuModel::Host));
        let e = CpuModel::parse("x86-64").unwrap_err().to_string();
        assert_eq!(
            e,
            "unknown CPU model 'x86-64'; on aarch64 the only model is host (the default)"
        );
        assert_eq!(CpuModel::default().to_string(), "host");
    }
}
