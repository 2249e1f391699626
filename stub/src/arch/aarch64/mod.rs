//! aarch64 machine setup: the guest-physical layout, the KVM register ids and
//! the saved vCPU and GICv3 state types. Pure functions and plain data here
//! (compiled on every host, so that an x86_64 `smolpack` can read and check
//! arm64 machines later); the KVM calls live in `hypervisor::kvm::aarch64`.

pub mod cpu_model;
pub mod fdt;
pub mod gic;
pub mod layout;
pub mod regs;
pub mod state;
