//! The saved state of an aarch64 machine besides its vCPUs' registers: the
//! VM-wide part is the GICv3 (distributor, redistributors, CPU interfaces).
//! The architected timer and PSCI power state travel with each vCPU's
//! registers (`regs::VcpuState`).

use serde::{Deserialize, Serialize};

pub use super::regs::VcpuState;

/// VM-wide state: the interrupt controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    pub gic: super::gic::GicState,
}
