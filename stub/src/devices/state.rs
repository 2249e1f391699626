//! Saved state of a Linux machine's devices, carried in the machine state
//! blob: plain serde structs from each device's `Persist::save`, so queue
//! positions, pending console input and the disk layout survive a resume.

use serde::{Deserialize, Serialize};

use super::legacy::serial::SerialDeviceState;
use super::virtio::block::BlockState;
use super::virtio::console::ConsoleState;
use super::virtio::mmio::MmioDeviceState;
use super::virtio::rng::RngState;

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
    /// virtio-blk; `disk` names the disk section that backs it.
    Block {
        disk: String,
        state: MmioDeviceState<BlockState>,
    },
    /// virtio-console carrying the agent's byte stream.
    Console(MmioDeviceState<ConsoleState>),
    /// virtio-rng.
    Rng(MmioDeviceState<RngState>),
}

/// Every device of a Linux guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinuxDeviceStates {
    /// The 8250 UART at COM1 (kernel log).
    pub serial: SerialDeviceState,
    /// virtio-mmio devices in slot order.
    pub virtio: Vec<VirtioSlotState>,
    /// The kernel command line the guest booted with.
    pub cmdline: String,
}
