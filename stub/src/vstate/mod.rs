//! Runtime state of a machine: guest memory, the VM, and the vCPU run loop.

pub mod memory;
pub mod vcpu;
pub mod vm;
