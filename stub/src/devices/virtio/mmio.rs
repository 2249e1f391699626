//! virtio-mmio transport, version 2 ("modern", virtio 1.2 section 4.2).
//!
//! The guest driver sees a 4 KiB register window; the transport implements
//! feature negotiation, queue configuration, the device status state machine
//! and interrupt status, and forwards `QueueNotify` to the device model.
//! Register accesses must be aligned 32-bit; anything else is ignored, as is
//! any write the state machine does not allow at that point.

use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;

use super::status::{DRIVER, DRIVER_OK, FAILED, FEATURES_OK, NEEDS_RESET};
use super::{queue_in_memory, Persist, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};
use super::{MMIO_SIZE, VIRTIO_RING_F_EVENT_IDX};
use crate::devices::bus::BusDevice;

/// Register offsets of the virtio-mmio window.
pub mod regs {
    /// "virt".
    pub const MAGIC: u64 = 0x000;
    /// Transport version (2).
    pub const VERSION: u64 = 0x004;
    /// Virtio device ID.
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor ID.
    pub const VENDOR_ID: u64 = 0x00c;
    /// 32 feature bits selected by `DEVICE_FEATURES_SEL`.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Which 32-bit word of the device features to show.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// 32 accepted feature bits selected by `DRIVER_FEATURES_SEL`.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Which 32-bit word of the driver features is written.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Queue the `QUEUE_*` registers refer to.
    pub const QUEUE_SEL: u64 = 0x030;
    /// Largest size of the selected queue.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Size of the selected queue.
    pub const QUEUE_NUM: u64 = 0x038;
    /// Selected queue ready.
    pub const QUEUE_READY: u64 = 0x044;
    /// Write a queue index to notify it.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Pending interrupt causes.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Acknowledge interrupt causes.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status.
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low word.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table address, high word.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Available ring address, low word.
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    /// Available ring address, high word.
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    /// Used ring address, low word.
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    /// Used ring address, high word.
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    /// Shared memory region selector.
    pub const SHM_SEL: u64 = 0x0ac;
    /// Shared memory region length, low word.
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// Shared memory region length, high word.
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// Shared memory region base, low word.
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// Shared memory region base, high word.
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// Changes whenever the device changes its configuration.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of device-specific configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Modern virtio-mmio.
pub const MMIO_VERSION: u32 = 2;
/// "SMOL" in little endian; drivers do not look at it.
pub const VENDOR_ID: u32 = 0x4c4f_4d53;

/// A virtio device behind a virtio-mmio register window.
pub struct MmioTransport<D> {
    device: D,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    config_generation: u32,
}

/// Saved transport registers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// Device status as written by the driver.
    pub status: u32,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
}

/// Saved transport plus device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioDeviceState<S> {
    /// Transport registers.
    pub transport: MmioState,
    /// Device model state.
    pub device: S,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Put `device` behind a fresh (reset) register window.
    pub fn new(device: D) -> Self {
        Self {
            device,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            config_generation: 0,
        }
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model (e.g. to push console input).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Size of the register window.
    pub fn window_size(&self) -> u64 {
        MMIO_SIZE
    }

    /// Device status as the guest reads it.
    pub fn status(&self) -> u32 {
        let broken = if self.device.common().broken {
            NEEDS_RESET
        } else {
            0
        };
        self.status | broken
    }

    fn reset(&mut self) {
        self.device.common_mut().reset();
        self.device.reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
    }

    fn features_word(features: u64, sel: u32) -> u32 {
        match sel {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let common = self.device.common();
        let queue = common.queues.get(self.queue_sel as usize);
        match offset {
            regs::MAGIC => MMIO_MAGIC,
            regs::VERSION => MMIO_VERSION,
            regs::DEVICE_ID => self.device.device_type(),
            regs::VENDOR_ID => VENDOR_ID,
            regs::DEVICE_FEATURES => {
                Self::features_word(self.device.device_features(), self.device_features_sel)
            }
            regs::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            regs::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            regs::INTERRUPT_STATUS => common.interrupt.status(),
            regs::STATUS => self.status(),
            // No shared memory regions: length all ones means "absent".
            regs::SHM_LEN_LOW | regs::SHM_LEN_HIGH | regs::SHM_BASE_LOW | regs::SHM_BASE_HIGH => {
                u32::MAX
            }
            regs::CONFIG_GENERATION => self.config_generation,
            _ => {
                log::debug!("virtio-mmio read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    /// Whether queue registers may be written: after `FEATURES_OK`, before
    /// `DRIVER_OK`, on an existing queue that is not ready yet.
    fn queue_config_allowed(&self) -> bool {
        self.status & (FEATURES_OK | DRIVER_OK | FAILED) == FEATURES_OK
            && self
                .device
                .common()
                .queues
                .get(self.queue_sel as usize)
                .is_some_and(|q| !q.ready())
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let sel = self.queue_sel as usize;
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            regs::DRIVER_FEATURES => {
                if self.status & (DRIVER | FEATURES_OK | FAILED) != DRIVER {
                    log::debug!("virtio-mmio driver features written outside negotiation");
                    return;
                }
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let common = self.device.common_mut();
                common.acked_features =
                    (common.acked_features & !(0xffff_ffffu64 << shift)) | (u64::from(v) << shift);
            }
            regs::QUEUE_SEL => self.queue_sel = v,
            regs::QUEUE_NUM if self.queue_config_allowed() => {
                if let Ok(n) = u16::try_from(v) {
                    if self.device.common_mut().queues[sel]
                        .try_set_size(n)
                        .is_err()
                    {
                        log::warn!("virtio-mmio: guest chose invalid queue size {v}");
                    }
                }
            }
            regs::QUEUE_READY => self.write_queue_ready(v),
            regs::QUEUE_DESC_LOW if self.queue_config_allowed() => {
                self.device.common_mut().queues[sel].set_desc_table_address(Some(v), None)
            }
            regs::QUEUE_DESC_HIGH if self.queue_config_allowed() => {
                self.device.common_mut().queues[sel].set_desc_table_address(None, Some(v))
            }
            regs::QUEUE_AVAIL_LOW if self.queue_config_allowed() => {
                self.device.common_mut().queues[sel].set_avail_ring_address(Some(v), None)
            }
            regs::QUEUE_AVAIL_HIGH if self.queue_config_allowed() => {
                self.device.common_mut().queues[sel].set_avail_ring_address(None, Some(v))
            }
            regs::QUEUE_USED_LOW if self.queue_config_allowed() => {
                self.device.common_mut().queues[sel].set_used_ring_address(Some(v), None)
            }
            regs::QUEUE_USED_HIGH if self.queue_config_allowed() => {
                self.device.common_mut().queues[sel].set_used_ring_address(None, Some(v))
            }
            regs::QUEUE_NOTIFY => self.notify(v),
            regs::INTERRUPT_ACK => self.device.common().interrupt.ack(v),
            regs::STATUS => self.write_status(v),
            regs::SHM_SEL => {}
            _ => log::debug!("virtio-mmio write {v:#x} to {offset:#x} ignored"),
        }
    }

    fn write_queue_ready(&mut self, v: u32) {
        let sel = self.queue_sel as usize;
        if v == 0 {
            // Drivers clear ready while tearing queues down; harmless any time.
            if let Some(q) = self.device.common_mut().queues.get_mut(sel) {
                q.set_ready(false);
            }
        } else if self.queue_config_allowed() {
            self.device.common_mut().queues[sel].set_ready(true);
        }
    }

    fn notify(&mut self, v: u32) {
        // With VIRTIO_F_NOTIFICATION_DATA (not offered) the high half would
        // carry ring positions; only the queue index matters here.
        let index = (v & 0xffff) as usize;
        if self.status & DRIVER_OK == 0 || index >= self.device.common().queues.len() {
            log::debug!("virtio-mmio notify of queue {index} ignored");
            return;
        }
        self.device.process_queue(index);
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if v & old != old {
            // Drivers only ever add bits; clearing needs a reset.
            log::debug!("virtio-mmio status {old:#x} -> {v:#x} rejected");
            return;
        }
        let added = v & !old;
        let mut new = v;
        if added & FEATURES_OK != 0 {
            let acked = self.device.common().acked_features;
            let offered = self.device.device_features();
            if v & DRIVER == 0 || acked & !offered != 0 || acked & VIRTIO_F_VERSION_1 == 0 {
                // Leaving FEATURES_OK clear tells the driver the set was refused.
                log::warn!(
                    "virtio-mmio: driver features {acked:#x} refused (offered {offered:#x})"
                );
                new &= !FEATURES_OK;
            }
        }
        if added & DRIVER_OK != 0 {
            if new & FEATURES_OK == 0 {
                log::debug!("virtio-mmio DRIVER_OK before FEATURES_OK ignored");
                return;
            }
            self.activate();
        }
        self.status = new;
    }

    fn activate(&mut self) {
        let common = self.device.common_mut();
        let event_idx = common.has_feature(VIRTIO_RING_F_EVENT_IDX);
        let mut bad = None;
        for (i, q) in common.queues.iter_mut().enumerate() {
            q.set_event_idx(event_idx);
            if q.ready() && !queue_in_memory(q, &common.mem) {
                bad = Some(i);
            }
        }
        common.activated = true;
        if let Some(i) = bad {
            common.mark_broken(&format_args!("queue {i} lies outside guest memory"));
            return;
        }
        self.device.activate();
    }

    /// Capture transport registers only (see [`Persist`] for the device too).
    pub fn save_transport(&self) -> MmioState {
        MmioState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
        }
    }

    /// Put an already restored device behind restored transport registers.
    pub fn restore_transport(device: D, state: &MmioState) -> Self {
        Self {
            device,
            status: state.status & !NEEDS_RESET,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            queue_sel: state.queue_sel,
            config_generation: state.config_generation,
        }
    }
}

impl<D> Persist for MmioTransport<D>
where
    D: VirtioDevice + Persist<Error = VirtioError>,
{
    type State = MmioDeviceState<D::State>;
    type Args = D::Args;
    type Error = VirtioError;

    fn save(&self) -> Self::State {
        MmioDeviceState {
            transport: self.save_transport(),
            device: self.device.save(),
        }
    }

    fn restore(args: D::Args, state: &Self::State) -> Result<Self, VirtioError> {
        let device = D::restore(args, &state.device)?;
        if state.transport.status & DRIVER_OK != 0 && !device.common().activated {
            return Err(VirtioError::StateMismatch(
                "transport is DRIVER_OK but the device is not active".into(),
            ));
        }
        Ok(Self::restore_transport(device, &state.transport))
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= regs::CONFIG {
            self.device.read_config(offset - regs::CONFIG, data);
        } else if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            log::debug!(
                "virtio-mmio unaligned {}-byte read at {offset:#x}",
                data.len()
            );
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= regs::CONFIG {
            self.device.write_config(offset - regs::CONFIG, data);
        } else if let (0, Ok(bytes)) = (offset % 4, <[u8; 4]>::try_from(data)) {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        } else {
            log::debug!(
                "virtio-mmio unaligned {}-byte write at {offset:#x}",
                data.len()
            );
        }
    }
}
