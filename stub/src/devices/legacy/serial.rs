//! 8250/16550 UART (via `vm-superio`) writing guest output to a host sink.

use std::convert::Infallible;
use std::io::Write;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

use crate::devices::bus::BusDevice;
use crate::devices::virtio::InterruptTrigger;
use crate::persist::Persist;

/// Where guest serial output goes.
pub type SerialSink = Box<dyn Write + Send>;

/// Adapts the VMM's interrupt line to `vm-superio`'s trigger.
pub struct SerialIrq(Arc<dyn InterruptTrigger>);

impl Trigger for SerialIrq {
    type E = Infallible;
    fn trigger(&self) -> Result<(), Infallible> {
        self.0.trigger();
        Ok(())
    }
}

/// A COM port.
pub struct SerialDevice {
    inner: Serial<SerialIrq, NoEvents, SerialSink>,
    paused: bool,
}

/// Errors restoring a serial port.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The saved input FIFO is larger than the UART's.
    #[error("saved serial state is invalid (input FIFO overflow)")]
    BadState,
}

/// Saved UART registers and input FIFO.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

/// Host resources for [`SerialDevice::restore`].
pub struct SerialArgs {
    /// Interrupt line (IRQ 4 for COM1).
    pub irq: Arc<dyn InterruptTrigger>,
    /// Output sink.
    pub sink: SerialSink,
}

impl SerialDevice {
    /// A UART raising `irq` and writing output to `sink`.
    pub fn new(irq: Arc<dyn InterruptTrigger>, sink: SerialSink) -> Self {
        Self {
            inner: Serial::new(SerialIrq(irq), sink),
            paused: false,
        }
    }

    /// Feed host input to the guest; returns bytes accepted (the FIFO holds
    /// 64). A paused port accepts nothing (enqueueing raises the interrupt
    /// line), so the caller retries after the machine resumes.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        if self.paused {
            return 0;
        }
        self.inner.enqueue_raw_bytes(input).unwrap_or(0)
    }
}

// The UART only acts on vCPU exits (register accesses) and on
// `SerialDevice::enqueue_input`, which a paused port refuses.
crate::devices::pausable_by_flag!(SerialDevice);

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            if off < 8 {
                *b = self.inner.read(off);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            if off < 8 {
                if let Err(e) = self.inner.write(off, *b) {
                    log::debug!("serial write failed: {e:?}");
                }
            }
        }
    }
}

impl Persist for SerialDevice {
    type State = SerialDeviceState;
    type Args<'a> = SerialArgs;
    type Error = SerialError;

    fn save(&self) -> Result<SerialDeviceState, SerialError> {
        let s = self.inner.state();
        Ok(SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        })
    }

    fn restore(args: SerialArgs, s: &SerialDeviceState) -> Result<Self, SerialError> {
        let state = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let inner = Serial::from_state(&state, SerialIrq(args.irq), NoEvents, args.sink)
            .map_err(|_| SerialError::BadState)?;
        Ok(Self {
            inner,
            paused: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testutil::Counter;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_input_interrupts_and_state() {
        let irq = Arc::new(Counter::default());
        let out = Shared::default();
        let mut dev = SerialDevice::new(irq.clone(), Box::new(out.clone()));
        for b in b"boot\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"boot\n");
        // Wide and out-of-window accesses are ignored.
        dev.write(0, &[1, 2]);
        dev.write(9, &[1]);
        let mut wide = [0xffu8; 2];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);

        // Enable the received-data interrupt, then feed input.
        dev.write(1, &[0x01]);
        assert_eq!(dev.enqueue_input(b"hi"), 2);
        assert!(irq.count() >= 1);
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b, [b'h']);
        dev.write(7, &[0x5a]);

        let state = dev.save().unwrap();
        assert_eq!(state.in_buffer, b"i");
        let mut dev2 = SerialDevice::restore(
            SerialArgs {
                irq: irq.clone(),
                sink: Box::new(std::io::sink()),
            },
            &state,
        )
        .unwrap();
        dev2.read(0, &mut b);
        assert_eq!(b, [b'i']);
        dev2.read(7, &mut b);
        assert_eq!(b, [0x5a]);

        let bad = SerialDeviceState {
            in_buffer: vec![0; 1000],
            ..state
        };
        assert!(SerialDevice::restore(
            SerialArgs {
                irq,
                sink: Box::new(std::io::sink())
            },
            &bad
        )
        .is_err());
    }
}
