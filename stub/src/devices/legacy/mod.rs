//! Legacy PC devices on the port I/O bus: the 8250 UART at COM1 and an i8042
//! stub whose only job is turning the guest's keyboard-controller reset into
//! a VM exit.

pub mod i8042;
pub mod serial;

pub use i8042::I8042;
pub use serial::SerialDevice;

/// COM1 I/O port base.
pub const COM1_BASE: u64 = 0x3f8;
/// COM1 register window length.
pub const COM1_LEN: u64 = 8;
/// COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;
/// i8042 data port; the command/status port is `I8042_BASE + 4` (0x64).
pub const I8042_BASE: u64 = 0x60;
/// i8042 window length (ports 0x60..=0x64).
pub const I8042_LEN: u64 = 5;
