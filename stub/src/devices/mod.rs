//! Device models and the buses that route guest port I/O and MMIO to them.
//!
//! Devices never see the hypervisor backend: a vCPU exit is turned into a
//! `Bus::read`/`Bus::write` call by the run loop.

pub mod bus;
pub mod exit;
pub mod legacy;
pub mod state;
pub mod virtio;
