//! i8042 keyboard controller stub: only the CPU-reset command matters.
//!
//! Linux's `reboot` (with `reboot=k`) waits for the controller's input buffer
//! to drain (status bit 1 clear; every read here returns 0) and writes 0xfe to
//! port 0x64. That write is reported to the VMM so it can end the VM.

use vm_superio::{I8042Device, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

/// Called when the guest asks for a reset.
pub type ResetCallback = Box<dyn Fn() + Send>;

/// Adapts the callback to `vm-superio`'s trigger.
pub struct ResetTrigger(ResetCallback);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)();
        Ok(())
    }
}

/// i8042 at ports 0x60..=0x64.
pub struct I8042 {
    inner: I8042Device<ResetTrigger>,
    paused: bool,
}

impl I8042 {
    /// Report resets through `on_reset`.
    pub fn new(on_reset: ResetCallback) -> Self {
        Self {
            inner: I8042Device::new(ResetTrigger(on_reset)),
            paused: false,
        }
    }

    /// Report resets by writing 1 to `evt` (the VMM polls it).
    pub fn with_eventfd(evt: EventFd) -> Self {
        Self::new(Box::new(move || {
            if let Err(e) = evt.write(1) {
                log::error!("cannot signal guest reset: {e}");
            }
        }))
    }
}

// Only vCPU exits reach the controller; vCPUs are parked while it is paused.
crate::devices::pausable_by_flag!(I8042);

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            *b = self.inner.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        debug_assert!(!self.paused, "i8042 written while paused");
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            let Ok(()) = self.inner.write(off, *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::Bus;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn reset_command_signals_eventfd() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = I8042::with_eventfd(evt.try_clone().unwrap());
        let mut bus = Bus::new();
        bus.insert(
            Arc::new(Mutex::new(dev)),
            super::super::I8042_BASE,
            super::super::I8042_LEN,
        )
        .unwrap();
        let mut status = [0xffu8];
        assert!(bus.read(0x64, &mut status));
        assert_eq!(status[0] & 0x02, 0, "input buffer must read empty");
        bus.write(0x64, &[0xaa]);
        bus.write(0x60, &[0xfe]);
        assert!(evt.read().is_err(), "no reset yet");
        bus.write(0x64, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
