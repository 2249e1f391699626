//! The smolvm VMM runtime: boots, pauses, snapshots and resumes machines.
//!
//! Entry points: [`builder::build_for_boot`] and [`builder::resume`] give a
//! [`machine::Machine`]; `start`, `pause`/[`machine::PauseHandle`], `wait`,
//! `run_to_exit` and `save` drive it.

pub mod arch;
#[cfg(target_os = "linux")]
pub mod builder;
#[cfg(target_os = "linux")]
pub mod device_manager;
pub mod devices;
pub mod host;
pub mod hypervisor;
#[cfg(target_os = "linux")]
pub mod linux;
#[cfg(target_os = "linux")]
pub mod machine;
pub mod memory;
#[cfg(target_os = "linux")]
pub mod net;
pub mod persist;
#[cfg(target_os = "linux")]
pub mod seccomp;
pub mod snapshot;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod testguest;
pub mod testguest_aarch64;
pub mod testguest_common;
pub mod timing;
pub mod vstate;
