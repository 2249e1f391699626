//! Runtime state of a machine: the VM and the vCPU run loop.

pub mod vcpu;
pub mod vm;
