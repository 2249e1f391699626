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
        let common = self.device.common();
        // Notifications come from vCPU exits, and vCPUs are parked before
        // devices are paused.
        debug_assert!(!common.paused, "virtio-mmio notify while paused");
        if self.status & DRIVER_OK == 0 || common.broken || index >= common.queues.len() {
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

impl<D: VirtioDevice> crate::devices::Pausable for MmioTransport<D> {
    fn pause(&mut self) {
        self.device.common_mut().paused = true;
    }

    fn resume(&mut self) {
        if self.device.common().paused {
            self.device.common_mut().paused = false;
            self.device.resumed();
        }
    }

    fn is_paused(&self) -> bool {
        self.device.common().paused
    }
}

impl<D> Persist for MmioTransport<D>
where
    D: VirtioDevice + Persist<Error = VirtioError>,
{
    type State = MmioDeviceState<D::State>;
    type Args<'a> = D::Args<'a>;
    type Error = VirtioError;

    fn save(&self) -> Result<Self::State, VirtioError> {
        Ok(MmioDeviceState {
            transport: self.save_transport(),
            device: self.device.save()?,
        })
    }

    fn restore(args: D::Args<'_>, state: &Self::State) -> Result<Self, VirtioError> {
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
        } else if data.len() == 4 && offset.is_multiple_of(4) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::status::*;
    use crate::devices::virtio::testutil::*;
    use crate::devices::virtio::{
        cmdline_fragment, mmio_slot, GuestMemoryMmap, VirtioCommon, VirtioInterrupt, INT_CONFIG,
        INT_VRING,
    };
    use vm_memory::GuestAddress;

    /// Records notifications and exposes an 8-byte config space.
    struct Dummy {
        common: VirtioCommon,
        notified: Vec<usize>,
        activations: usize,
        resets: usize,
        config: [u8; 8],
    }

    const OFFERED: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 1 << 3;

    impl Dummy {
        fn new(mem: GuestMemoryMmap, irq: VirtioInterrupt) -> Self {
            Self {
                common: VirtioCommon::new(&[16, 8], mem, irq).unwrap(),
                notified: Vec::new(),
                activations: 0,
                resets: 0,
                config: *b"ABCDEFGH",
            }
        }
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn device_features(&self) -> u64 {
            OFFERED
        }
        fn common(&self) -> &VirtioCommon {
            &self.common
        }
        fn common_mut(&mut self) -> &mut VirtioCommon {
            &mut self.common
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if let Some(dst) = self
                .config
                .get_mut(offset as usize..offset as usize + data.len())
            {
                dst.copy_from_slice(data);
            }
        }
        fn activate(&mut self) {
            self.activations += 1;
        }
        fn process_queue(&mut self, index: usize) {
            self.notified.push(index);
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    fn rig(m: &GuestMemoryMmap) -> MmioTransport<Dummy> {
        let (irq, _) = counting_interrupt();
        MmioTransport::new(Dummy::new(m.clone(), irq))
    }

    #[test]
    fn identity_and_features() {
        let m = mem(0x10000);
        let mut t = rig(&m);
        assert_eq!(rd(&mut t, regs::MAGIC), MMIO_MAGIC);
        assert_eq!(rd(&mut t, regs::VERSION), 2);
        assert_eq!(rd(&mut t, regs::DEVICE_ID), 42);
        assert_eq!(rd(&mut t, regs::VENDOR_ID), VENDOR_ID);
        assert_eq!(rd(&mut t, regs::DEVICE_FEATURES), OFFERED as u32);
        wr(&mut t, regs::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, regs::DEVICE_FEATURES), 1);
        wr(&mut t, regs::DEVICE_FEATURES_SEL, 7);
        assert_eq!(rd(&mut t, regs::DEVICE_FEATURES), 0);
        assert_eq!(rd(&mut t, regs::SHM_LEN_LOW), u32::MAX);
        assert_eq!(
            cmdline_fragment(0xd000_0000, 5),
            "virtio_mmio.device=0x1000@0xd0000000:5"
        );
        assert_eq!(mmio_slot(1), Some((0xd000_1000, 6)));
        assert_eq!(mmio_slot(3), Some((0xd000_3000, 9)));
        assert_eq!(mmio_slot(6), None);
    }

    #[test]
    fn full_handshake_then_notify() {
        let m = mem(0x10000);
        let mut t = rig(&m);
        let q0 = TestQueue::new(&m, 16, GuestAddress(0x1000));
        let q1 = TestQueue::new(&m, 8, GuestAddress(0x2000));
        let st = handshake(
            &mut t,
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX,
            &[&q0, &q1],
        );
        assert_eq!(st, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(t.device().activations, 1);
        assert!(t.device().common.activated);
        assert!(t.device().common.queues[1].event_idx_enabled());
        assert_eq!(t.device().common.queues[1].desc_table(), 0x2000);
        // Queue registers are frozen after DRIVER_OK.
        wr(&mut t, regs::QUEUE_SEL, 0);
        wr(&mut t, regs::QUEUE_DESC_LOW, 0x5000);
        assert_eq!(t.device().common.queues[0].desc_table(), 0x1000);

        wr(&mut t, regs::QUEUE_NOTIFY, 1);
        wr(&mut t, regs::QUEUE_NOTIFY, 0);
        wr(&mut t, regs::QUEUE_NOTIFY, 2); // no such queue
        assert_eq!(t.device().notified, vec![1, 0]);

        // Config space passthrough, any width.
        let mut b = [0u8; 2];
        t.read(regs::CONFIG + 2, &mut b);
        assert_eq!(&b, b"CD");
        t.write(regs::CONFIG + 7, b"z");
        let mut b = [0u8; 1];
        t.read(regs::CONFIG + 7, &mut b);
        assert_eq!(&b, b"z");
        let mut far = [0xffu8; 4];
        t.read(regs::CONFIG + 6, &mut far);
        assert_eq!(far, [0xff; 4], "access crossing the end is ignored");

        // Interrupt status and acknowledge.
        t.device().common.interrupt.signal_used_queue();
        t.device().common.interrupt.signal_config_change();
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
        wr(&mut t, regs::INTERRUPT_ACK, INT_VRING);
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), INT_CONFIG);

        // Reset returns everything to power-on.
        wr(&mut t, regs::STATUS, 0);
        assert_eq!(rd(&mut t, regs::STATUS), 0);
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), 0);
        assert_eq!(t.device().resets, 2, "handshake resets first, then us");
        assert!(!t.device().common.activated);
        assert_eq!(t.device().common.acked_features, 0);
        wr(&mut t, regs::QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, regs::QUEUE_READY), 0);
        wr(&mut t, regs::QUEUE_NOTIFY, 0);
        assert_eq!(
            t.device().notified,
            vec![1, 0],
            "notify after reset ignored"
        );
        // And the handshake works again.
        let st = handshake(&mut t, VIRTIO_F_VERSION_1, &[&q0, &q1]);
        assert_eq!(st & DRIVER_OK, DRIVER_OK);
        assert_eq!(t.device().activations, 2);
    }

    #[test]
    fn features_ok_refused_for_bad_feature_sets() {
        let m = mem(0x10000);
        let mut t = rig(&m);
        // Without VERSION_1.
        assert_eq!(handshake(&mut t, 1 << 3, &[]) & FEATURES_OK, 0);
        // A feature that was not offered.
        wr(&mut t, regs::STATUS, 0);
        wr(&mut t, regs::STATUS, ACKNOWLEDGE | DRIVER);
        wr(&mut t, regs::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, regs::DRIVER_FEATURES, 1 | 1 << 4);
        wr(&mut t, regs::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(rd(&mut t, regs::STATUS) & FEATURES_OK, 0);
        // DRIVER_OK without FEATURES_OK is ignored.
        wr(&mut t, regs::STATUS, ACKNOWLEDGE | DRIVER | DRIVER_OK);
        assert_eq!(rd(&mut t, regs::STATUS) & DRIVER_OK, 0);
        assert_eq!(t.device().activations, 0);
        // Feature writes after FEATURES_OK do not change the accepted set.
        wr(&mut t, regs::STATUS, 0);
        wr(&mut t, regs::STATUS, ACKNOWLEDGE | DRIVER);
        wr(&mut t, regs::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, regs::DRIVER_FEATURES, 1);
        wr(&mut t, regs::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_ne!(rd(&mut t, regs::STATUS) & FEATURES_OK, 0);
        wr(&mut t, regs::DRIVER_FEATURES, 0);
        assert_eq!(t.device().common.acked_features, VIRTIO_F_VERSION_1);
        // Clearing bits without a reset is rejected.
        wr(&mut t, regs::STATUS, ACKNOWLEDGE);
        assert_ne!(rd(&mut t, regs::STATUS) & FEATURES_OK, 0);
    }

    #[test]
    fn queue_setup_is_validated() {
        let m = mem(0x10000);
        let mut t = rig(&m);
        // Queue registers before FEATURES_OK are ignored.
        wr(&mut t, regs::QUEUE_SEL, 0);
        wr(&mut t, regs::QUEUE_NUM, 4);
        wr(&mut t, regs::QUEUE_READY, 1);
        assert_eq!(rd(&mut t, regs::QUEUE_READY), 0);
        assert_eq!(t.device().common.queues[0].size(), 16);

        assert_eq!(
            handshake(&mut t, VIRTIO_F_VERSION_1, &[]) & FEATURES_OK,
            FEATURES_OK
        );
        wr(&mut t, regs::STATUS, 0);
        wr(&mut t, regs::STATUS, ACKNOWLEDGE | DRIVER);
        wr(&mut t, regs::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, regs::DRIVER_FEATURES, 1);
        wr(&mut t, regs::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        // Invalid sizes and misaligned rings are refused.
        wr(&mut t, regs::QUEUE_NUM, 3);
        wr(&mut t, regs::QUEUE_NUM, 32);
        wr(&mut t, regs::QUEUE_NUM, 0x1_0000);
        assert_eq!(t.device().common.queues[0].size(), 16);
        wr(&mut t, regs::QUEUE_DESC_LOW, 0x1001);
        assert_ne!(t.device().common.queues[0].desc_table(), 0x1001);
        // No such queue: reads as absent, writes ignored.
        wr(&mut t, regs::QUEUE_SEL, 9);
        assert_eq!(rd(&mut t, regs::QUEUE_NUM_MAX), 0);
        wr(&mut t, regs::QUEUE_NUM, 4);
        wr(&mut t, regs::QUEUE_READY, 1);
        // A ready queue whose rings lie outside guest memory: DRIVER_OK is
        // accepted but the device reports NEEDS_RESET instead of using it.
        wr(&mut t, regs::QUEUE_SEL, 0);
        wr(&mut t, regs::QUEUE_DESC_LOW, 0);
        wr(&mut t, regs::QUEUE_DESC_HIGH, 0x10);
        wr(&mut t, regs::QUEUE_AVAIL_LOW, 0x2000);
        wr(&mut t, regs::QUEUE_USED_LOW, 0x3000);
        wr(&mut t, regs::QUEUE_READY, 1);
        wr(
            &mut t,
            regs::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_ne!(rd(&mut t, regs::STATUS) & NEEDS_RESET, 0);
        assert_eq!(
            t.device().activations,
            1,
            "only the first handshake activated"
        );
        wr(&mut t, regs::QUEUE_NOTIFY, 0);
        assert!(t.device().notified.is_empty());
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let m = mem(0x10000);
        let mut t = rig(&m);
        let mut b = [0xffu8; 2];
        t.read(regs::MAGIC, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        let mut b = [0xffu8; 4];
        t.read(regs::MAGIC + 1, &mut b);
        assert_eq!(b, [0xff; 4]);
        t.write(regs::STATUS, &[1]);
        t.write(regs::STATUS + 2, &[1, 0, 0, 0]);
        assert_eq!(rd(&mut t, regs::STATUS), 0);
        // Write-only and unknown registers read as zero.
        assert_eq!(rd(&mut t, regs::QUEUE_NOTIFY), 0);
        assert_eq!(rd(&mut t, 0x0f0), 0);
        wr(&mut t, 0x0f0, 1);
    }

    #[test]
    fn transport_state_round_trips() {
        let m = mem(0x10000);
        let mut t = rig(&m);
        let q0 = TestQueue::new(&m, 16, GuestAddress(0x1000));
        let q1 = TestQueue::new(&m, 8, GuestAddress(0x2000));
        handshake(&mut t, VIRTIO_F_VERSION_1, &[&q0, &q1]);
        wr(&mut t, regs::QUEUE_SEL, 1);
        let regs_state = t.save_transport();
        let common = t.device().common.save();
        let (irq, _) = counting_interrupt();
        let mut dev = Dummy::new(m.clone(), irq.clone());
        dev.common = VirtioCommon::restore(&[16, 8], m.clone(), irq, &common).unwrap();
        let mut t2 = MmioTransport::restore_transport(dev, &regs_state);
        assert_eq!(rd(&mut t2, regs::STATUS), rd(&mut t, regs::STATUS));
        assert_eq!(rd(&mut t2, regs::QUEUE_READY), 1);
        assert_eq!(rd(&mut t2, regs::QUEUE_NUM_MAX), 8);
        wr(&mut t2, regs::QUEUE_NOTIFY, 1);
        assert_eq!(t2.device().notified, vec![1]);

        // An active snapshot whose queue no longer fits guest memory fails.
        let small = mem(0x1800);
        let (irq, _) = counting_interrupt();
        assert!(matches!(
            VirtioCommon::restore(&[16, 8], small, irq, &common),
            Err(VirtioError::QueueOutsideMemory(1))
        ));
    }
}
