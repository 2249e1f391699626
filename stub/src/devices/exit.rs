//! The exit port: a guest byte written here stops the machine, and the VMM
//! exits with that byte as its status (like QEMU's isa-debug-exit, without
//! the status transformation).

use std::sync::Arc;

use super::bus::BusDevice;
use crate::vstate::vcpu::{ExitReason, RunControl};

/// Default I/O port of the exit device.
pub const EXIT_PORT: u16 = 0xf4;

/// Stops the machine with the status the guest writes.
pub struct ExitPort {
    control: Arc<RunControl>,
}

impl ExitPort {
    /// An exit port that reports to `control`.
    pub fn new(control: Arc<RunControl>) -> Self {
        ExitPort { control }
    }
}

impl BusDevice for ExitPort {
    fn read(&mut self, _offset: u64, _data: &mut [u8]) {}

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&status) = data.first() {
            self.control.finish(ExitReason::Exited(status));
        }
    }
}
