//! The exit port: a guest byte written here stops the machine, and the VMM
//! exits with that byte as its status (like QEMU's isa-debug-exit, without
//! the status transformation).

use super::bus::BusDevice;

/// Default I/O port of the exit device.
pub const EXIT_PORT: u16 = 0xf4;

/// Stops the machine with the status the guest writes.
pub struct ExitPort {
    on_exit: Box<dyn Fn(u8) + Send>,
    paused: bool,
}

impl ExitPort {
    /// An exit port that calls `on_exit(status)` (the machine wires it to
    /// stop the vCPUs; devices never see the run control).
    pub fn new(on_exit: Box<dyn Fn(u8) + Send>) -> Self {
        ExitPort {
            on_exit,
            paused: false,
        }
    }
}

// Only vCPU exits reach the port; vCPUs are parked while it is paused.
crate::devices::pausable_by_flag!(ExitPort);

impl BusDevice for ExitPort {
    fn read(&mut self, _offset: u64, _data: &mut [u8]) {}

    fn write(&mut self, _offset: u64, data: &[u8]) {
        debug_assert!(!self.paused, "exit port written while paused");
        if let Some(&status) = data.first() {
            (self.on_exit)(status);
        }
    }
}
