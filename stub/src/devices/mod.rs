//! Device models and the buses that route guest port I/O and MMIO to them
//! (the machine's `device_manager` owns both).
//!
//! Devices never see the hypervisor backend: a vCPU exit is turned into a
//! `Bus::read`/`Bus::write` call by the run loop.

pub mod bus;
pub mod exit;
pub mod legacy;
pub mod state;
pub mod virtio;

/// Stopping a device for a snapshot (crosvm's `Suspendable`, cloud-hypervisor's
/// `Pausable`). A paused device touches no guest memory, rings or interrupt
/// lines: host input is buffered (bounded) or refused, and delivered on
/// `resume`. The machine pauses its devices after its vCPUs are parked and
/// resumes them before the vCPUs run again, so a saved state and the guest
/// memory read after it agree.
pub trait Pausable {
    /// Stop touching guest-visible state. Idempotent.
    fn pause(&mut self);
    /// Deliver what was buffered while paused and go on. Idempotent.
    fn resume(&mut self);
    /// Whether the device is paused.
    fn is_paused(&self) -> bool;
}

/// [`Pausable`] for a device whose only pause state is its `paused` flag: one that acts
/// on vCPU exits alone (parked while it is paused) and at most refuses host input then.
macro_rules! pausable_by_flag {
    ($device:ty) => {
        impl $crate::devices::Pausable for $device {
            fn pause(&mut self) {
                self.paused = true;
            }

            fn resume(&mut self) {
                self.paused = false;
            }

            fn is_paused(&self) -> bool {
                self.paused
            }
        }
    };
}
pub(crate) use pausable_by_flag;
