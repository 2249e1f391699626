//! The manifest: what the machine is and how to resume it, stored as JSON so `jq` can read it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Largest manifest a reader accepts.
pub const MAX_MANIFEST_LEN: u64 = 1 << 20;

/// Describes a snapshotted machine. Unknown JSON fields are ignored so newer writers can add
/// fields without breaking older readers; missing optional fields default to empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Human-readable machine name.
    pub name: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix_s: u64,
    /// Who wrote the file, e.g. `smolvm 0.1.0`.
    pub producer: String,
    /// Number of vCPUs the snapshot was taken with.
    pub vcpus: u32,
    /// Guest memory size in bytes.
    pub memory_bytes: u64,
    /// Program run by `smolvm run` (like an OCI entrypoint).
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// Default arguments appended to the entrypoint.
    #[serde(default)]
    pub cmd: Vec<String>,
    /// Environment for the entrypoint, in order.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory for the entrypoint.
    #[serde(default)]
    pub workdir: String,
    /// Kernel command line the guest booted with.
    #[serde(default)]
    pub kernel_cmdline: String,
    /// Hypervisor host kind that built the snapshot (e.g. `kvm`, `kvm-pvm`); the VMM refuses
    /// to resume on a different kind because saved CPU state is not portable between them.
    #[serde(default)]
    pub host_profile: String,
    /// CPU model the guest was shown (`x86-64`, `x86-64-v2`, `x86-64-v3`, `x86-64-v4` or
    /// `host`); a resume first checks that the host has its features. Empty in machines
    /// written before models existed: they carry the building host's CPUID, like `host`.
    #[serde(default)]
    pub cpu: String,
    /// Free-form extra metadata.
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
}

impl Manifest {
    /// Serializes to the stored form.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        let v = serde_json::to_vec_pretty(self)?;
        if v.len() as u64 > MAX_MANIFEST_LEN {
            return Err(Error::TooLarge {
                what: "manifest".into(),
                len: v.len() as u64,
                cap: MAX_MANIFEST_LEN,
            });
        }
        Ok(v)
    }

    /// Parses the stored form, enforcing the size cap.
    pub fn from_json(bytes: &[u8]) -> Result<Manifest> {
        if bytes.len() as u64 > MAX_MANIFEST_LEN {
            return Err(Error::TooLarge {
                what: "manifest".into(),
                len: bytes.len() as u64,
                cap: MAX_MANIFEST_LEN,
            });
        }
        Ok(serde_json::from_slice(bytes)?)
    }

    /// Checks the resource fields make sense (at least one vCPU, non-zero memory).
    pub fn validate(&self) -> Result<()> {
        if self.vcpus == 0 || self.vcpus > 1024 {
            return Err(Error::InvalidInput(format!(
                "manifest asks for {} vCPUs; use 1..=1024",
                self.vcpus
            )));
        }
        if self.memory_bytes > crate::MAX_GUEST_MEMORY {
            return Err(Error::GuestMemoryTooLarge(self.memory_bytes));
        }
        if self.memory_bytes == 0 {
            return Err(Error::InvalidInput(
                "manifest has zero guest memory; set memory_bytes".into(),
            ));
        }
        Ok(())
    }
}
