//! Saved state of a machine's device set, carried in the machine state blob:
//! one tagged entry per attached device, in attach order, each holding the
//! plain serde state from that device's `Persist::save`, so queue positions,
//! pending console input and the disk layout survive a resume.

use serde::{Deserialize, Serialize};

use super::legacy::serial::SerialDeviceState;
use super::virtio::block::BlockState;
use super::virtio::console::ConsoleState;
use super::virtio::fs::FsState;
use super::virtio::mmio::MmioDeviceState;
use super::virtio::rng::RngState;

/// One attached device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// The exit port (no state besides where it sits).
    ExitPort {
        /// I/O port.
        port: u16,
    },
    /// An 8250 UART on the port I/O bus.
    Serial {
        /// First I/O port of its register window.
        base: u16,
        /// Its interrupt line (GSI).
        irq: u32,
        /// Registers and input FIFO.
        state: SerialDeviceState,
    },
    /// The i8042 reset stub (stateless) at its fixed ports.
    I8042,
    /// A virtio device behind a virtio-mmio window.
    VirtioMmio(VirtioSlotState),
}

/// One virtio-mmio device and where it sits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioSlotState {
    /// Guest-physical base of its register window.
    pub base: u64,
    /// Its interrupt line (GSI).
    pub irq: u32,
    /// The device and its transport.
    pub device: VirtioDeviceState,
}

/// A virtio device model's state, by kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    /// virtio-blk (its disk is the machine file's only disk section).
    Block(MmioDeviceState<BlockState>),
    /// virtio-console carrying the agent's byte stream.
    Console(MmioDeviceState<ConsoleState>),
    /// virtio-rng.
    Rng(MmioDeviceState<RngState>),
    /// virtio-fs (host directory shares; which ones is the resume's choice).
    Fs(MmioDeviceState<FsState>),
}
