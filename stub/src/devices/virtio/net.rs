//! virtio-net behind the reserved network slot (`--net`), and that slot itself.
//!
//! The slot ([`NetSlot`]) is on every Linux machine's command line (virtio-mmio slot 4) but
//! reads as device ID 0, virtio-mmio's "no device" (the guest driver skips it), unless the
//! run asked for a network: then it holds a [`Net`] device whose frames go to and come from
//! the user-mode network (`crate::net`). Neither the slot nor the device is part of the
//! snapshot: before a save the agent unbinds the guest driver and the slot is emptied
//! again, so a saved machine's device set never depends on `--net`.
//!
//! Frames: queue 0 receives (host to guest), queue 1 transmits. With `VIRTIO_F_VERSION_1`
//! every frame is preceded by the 12-byte `virtio_net_hdr` (no offloads are offered, so the
//! device writes zeros and `num_buffers = 1`, and ignores the guest's). A transmitted frame
//! is copied out of guest memory into a bounded host buffer ([`MAX_FRAME`]); frames for the
//! guest wait in a bounded queue ([`MAX_PENDING_RX`]) for receive buffers and are dropped
//! beyond it, as a full NIC would (TCP retransmits).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::chain::{Chain, SegCursor};
use super::mmio::{regs, MmioTransport};
use super::{
    read_config_bytes, GuestMemoryMmap, VirtioCommon, VirtioDevice, VirtioError, VirtioInterrupt,
    COMMON_FEATURES,
};
use crate::devices::bus::BusDevice;

/// Virtio device ID of a network card.
pub const VIRTIO_ID_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
/// `VIRTIO_NET_F_MAC`: the device has a MAC address in its configuration.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Size of `virtio_net_hdr` with `VIRTIO_F_VERSION_1`.
pub const NET_HDR_LEN: usize = 12;
/// Largest frame taken from or given to the guest: an Ethernet frame of MTU 1500 (no
/// offloads are offered, so the guest never sends more; larger ones are dropped).
pub const MAX_FRAME: usize = 1514;
/// Frames waiting for guest receive buffers at most; more are dropped.
pub const MAX_PENDING_RX: usize = 512;
/// Frames the guest transmitted that the network has not taken yet, at most.
pub const MAX_PENDING_TX: usize = 512;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Most descriptors accepted per frame.
pub const MAX_DESCS: usize = 32;
/// Receive queue.
pub const RX_QUEUE: usize = 0;
/// Transmit queue.
pub const TX_QUEUE: usize = 1;

/// Where transmitted frames go: the network side takes them from `frames` and is woken
/// through `wake` (an eventfd in the VMM). Bounded by [`MAX_PENDING_TX`].
pub trait FrameSink: Send {
    /// One Ethernet frame from the guest; `false` when it was dropped (queue full).
    fn push(&mut self, frame: &[u8]) -> bool;
}

/// A frame queue shared between the device (vCPU thread) and the network thread.
#[derive(Default)]
pub struct TxQueue {
    frames: Mutex<VecDeque<Vec<u8>>>,
}

impl TxQueue {
    /// Queue `frame`; `false` when [`MAX_PENDING_TX`] frames wait already.
    pub fn push(&self, frame: &[u8]) -> bool {
        let mut q = self.frames.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= MAX_PENDING_TX {
            return false;
        }
        q.push_back(frame.to_vec());
        true
    }

    /// Take every waiting frame.
    pub fn take(&self) -> VecDeque<Vec<u8>> {
        std::mem::take(&mut *self.frames.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The virtio-net device model.
pub struct Net {
    common: VirtioCommon,
    mac: [u8; 6],
    sink: Box<dyn FrameSink>,
    rx_pending: VecDeque<Vec<u8>>,
    /// Frames dropped (guest buffers or the tx queue full, or too large); for tests and logs.
    pub dropped: u64,
}

/// Strip the `virtio_net_hdr` from a transmitted chain's bytes: the frame, or `None` when
/// the chain is shorter than the header or the frame is larger than [`MAX_FRAME`].
pub fn frame_of(packet: &[u8]) -> Option<&[u8]> {
    let frame = packet.get(NET_HDR_LEN..)?;
    (!frame.is_empty() && frame.len() <= MAX_FRAME).then_some(frame)
}

impl Net {
    /// A new network device with address `mac` whose transmitted frames go to `sink`.
    pub fn new(
        mem: GuestMemoryMmap,
        interrupt: VirtioInterrupt,
        mac: [u8; 6],
        sink: Box<dyn FrameSink>,
    ) -> Result<Self, VirtioError> {
        Ok(Net {
            common: VirtioCommon::new(&[QUEUE_SIZE, QUEUE_SIZE], mem, interrupt)?,
            mac,
            sink,
            rx_pending: VecDeque::new(),
            dropped: 0,
        })
    }

    /// Frames for the guest: queued (bounded) and copied into its receive buffers as far as
    /// it has posted them (not while paused).
    pub fn deliver(&mut self, frames: impl IntoIterator<Item = Vec<u8>>) {
        for f in frames {
            if f.len() > MAX_FRAME || self.rx_pending.len() >= MAX_PENDING_RX {
                self.dropped += 1;
                continue;
            }
            self.rx_pending.push_back(f);
        }
        self.fill_rx();
    }

    /// Frames waiting for receive buffers.
    pub fn pending_rx(&self) -> usize {
        self.rx_pending.len()
    }

    fn fill_rx(&mut self) {
        if self.rx_pending.is_empty() {
            return;
        }
        let pending = &mut self.rx_pending;
        let dropped = &mut self.dropped;
        self.common.drain_queue(RX_QUEUE, MAX_DESCS, |mem, chain| {
            let frame = pending.front()?;
            let c = match chain {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("virtio-net: bad receive buffer: {e}");
                    return Some(0);
                }
            };
            if c.writable_len() < (NET_HDR_LEN + frame.len()) as u64 {
                // A buffer too small for the frame: drop the frame, give the buffer back.
                *dropped += 1;
                pending.pop_front();
                return Some(0);
            }
            let mut hdr = [0u8; NET_HDR_LEN];
            // num_buffers (le16 at offset 10) = 1 with VIRTIO_F_VERSION_1.
            hdr[10] = 1;
            let mut out = SegCursor::new(&c.writable);
            let n = out.write(mem, &hdr) + out.write(mem, frame);
            pending.pop_front();
            Some(n as u32)
        });
    }

    fn transmit(&mut self) {
        let sink = &mut self.sink;
        let dropped = &mut self.dropped;
        let mut buf = vec![0u8; NET_HDR_LEN + MAX_FRAME];
        self.common
            .drain_queue(TX_QUEUE, MAX_DESCS, |mem, chain: Result<Chain, _>| {
                let c = match chain {
                    Ok(c) => c,
                    Err(e) => {
                        log::warn!("virtio-net: bad transmit chain: {e}");
                        return Some(0);
                    }
                };
                if c.readable_len() > buf.len() as u64 {
                    *dropped += 1;
                    return Some(0);
                }
                let n = SegCursor::new(&c.readable).read(mem, &mut buf);
                match frame_of(&buf[..n]) {
                    Some(f) if sink.push(f) => {}
                    _ => *dropped += 1,
                }
                Some(0)
            });
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn device_features(&self) -> u64 {
        COMMON_FEATURES | VIRTIO_NET_F_MAC
    }

    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config { u8 mac[6]; le16 status; ... }: only the MAC is offered.
        read_config_bytes(&self.mac, offset, data);
    }

    fn activate(&mut self) {
        self.fill_rx();
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RX_QUEUE => self.fill_rx(),
            TX_QUEUE => self.transmit(),
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.rx_pending.clear();
    }

    fn resumed(&mut self) {
        self.fill_rx();
        self.transmit();
    }
}

/// The reserved network slot: empty (device ID 0) or a [`Net`] device.
pub struct NetSlot {
    net: Option<MmioTransport<Net>>,
    paused: bool,
}

/// `"virt"`, the virtio-mmio magic.
const MMIO_MAGIC: u32 = 0x7472_6976;

impl NetSlot {
    /// An empty slot: the guest sees virtio-mmio's placeholder (device ID 0).
    pub fn empty() -> Self {
        NetSlot {
            net: None,
            paused: true,
        }
    }

    /// A slot holding `net`.
    pub fn with(net: Net) -> Self {
        NetSlot {
            net: Some(MmioTransport::new(net)),
            paused: true,
        }
    }

    /// Whether a device is present.
    pub fn has_device(&self) -> bool {
        self.net.is_some()
    }

    /// Whether a guest driver has the device (status `DRIVER` or beyond). After Linux
    /// unbinds `virtio_net` the status is `ACKNOWLEDGE` alone: the core acknowledges the
    /// device again once the driver reset it.
    pub fn driver_active(&self) -> bool {
        use super::status::{DRIVER, DRIVER_OK, FEATURES_OK};
        self.net
            .as_ref()
            .is_some_and(|t| t.status() & (DRIVER | FEATURES_OK | DRIVER_OK) != 0)
    }

    /// Remove the device: the slot reads as empty from now on.
    pub fn clear(&mut self) {
        self.net = None;
    }

    /// Frames for the guest (dropped when the slot is empty).
    pub fn deliver(&mut self, frames: impl IntoIterator<Item = Vec<u8>>) {
        if let Some(t) = &mut self.net {
            t.device_mut().deliver(frames);
        }
    }

    /// The device, if present.
    pub fn net(&self) -> Option<&Net> {
        self.net.as_ref().map(|t| t.device())
    }
}

impl BusDevice for NetSlot {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match &mut self.net {
            Some(t) => t.read(offset, data),
            None => {
                let v = match offset {
                    regs::MAGIC => MMIO_MAGIC,
                    regs::VERSION => 2,
                    _ => 0,
                };
                if data.len() == 4 && offset.is_multiple_of(4) {
                    data.copy_from_slice(&v.to_le_bytes());
                } else {
                    data.fill(0);
                }
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(t) = &mut self.net {
            t.write(offset, data);
        }
    }
}

impl crate::devices::Pausable for NetSlot {
    fn pause(&mut self) {
        self.paused = true;
        if let Some(t) = &mut self.net {
            t.pause();
        }
    }

    fn resume(&mut self) {
        self.paused = false;
        if let Some(t) = &mut self.net {
            t.resume();
        }
    }

    fn is_paused(&self) -> bool {
        self.paused
    }
}

/// A [`FrameSink`] into a shared [`TxQueue`] that wakes the network thread.
pub struct QueueSink {
    /// The queue the network thread drains.
    pub queue: Arc<TxQueue>,
    /// Called after each queued frame (writes the network thread's eventfd).
    pub wake: Box<dyn Fn() + Send>,
}

impl FrameSink for QueueSink {
    fn push(&mut self, frame: &[u8]) -> bool {
        let ok = self.queue.push(frame);
        (self.wake)();
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::status::*;
    use crate::devices::virtio::testutil::*;
    use crate::devices::Pausable;
    use vm_memory::{Bytes, GuestAddress};

    struct Collect(Arc<Mutex<Vec<Vec<u8>>>>);
    impl FrameSink for Collect {
        fn push(&mut self, frame: &[u8]) -> bool {
            self.0.lock().unwrap().push(frame.to_vec());
            true
        }
    }

    #[test]
    fn frame_of_strips_the_header_and_bounds_the_frame() {
        assert_eq!(frame_of(&[0; 12]), None);
        assert_eq!(frame_of(&[0; 11]), None);
        let mut p = vec![0u8; 12];
        p.extend_from_slice(b"abc");
        assert_eq!(frame_of(&p), Some(&b"abc"[..]));
        assert_eq!(
            frame_of(&vec![0u8; 12 + MAX_FRAME]).map(|f| f.len()),
            Some(MAX_FRAME)
        );
        assert_eq!(frame_of(&vec![0u8; 13 + MAX_FRAME]), None);
    }

    #[test]
    fn empty_slot_reads_as_no_device() {
        let mut s = NetSlot::empty();
        let mut b = [0u8; 4];
        s.read(regs::MAGIC, &mut b);
        assert_eq!(u32::from_le_bytes(b), MMIO_MAGIC);
        s.read(regs::VERSION, &mut b);
        assert_eq!(u32::from_le_bytes(b), 2);
        s.read(regs::DEVICE_ID, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0);
        s.write(regs::STATUS, &1u32.to_le_bytes());
        s.read(regs::STATUS, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0);
        assert!(!s.has_device() && !s.driver_active());
    }

    #[test]
    fn frames_flow_both_ways_through_the_rings() {
        let m = mem(0x40000);
        let (irq, _count) = counting_interrupt();
        let got = Arc::new(Mutex::new(Vec::new()));
        let net = Net::new(
            m.clone(),
            irq,
            [2, 0, 0, 0, 0, 1],
            Box::new(Collect(got.clone())),
        )
        .unwrap();
        let mut slot = NetSlot::with(net);
        slot.resume();
        let mut rxq = TestQueue::new(&m, 16, GuestAddress(0x1000));
        let mut txq = TestQueue::new(&m, 16, GuestAddress(0x3000));
        let st = handshake(&mut slot, COMMON_FEATURES | VIRTIO_NET_F_MAC, &[&rxq, &txq]);
        assert_ne!(st & DRIVER_OK, 0);
        assert_eq!(rd(&mut slot, regs::DEVICE_ID), VIRTIO_ID_NET);
        let mut b = [0u8; 6];
        slot.read(regs::CONFIG, &mut b);
        assert_eq!(b, [2, 0, 0, 0, 0, 1]);
        // Transmit: header + frame.
        let mut pkt = vec![0u8; NET_HDR_LEN];
        pkt.extend_from_slice(b"hello frame");
        m.write_slice(&pkt, GuestAddress(0x10000)).unwrap();
        txq.add(&[Desc::r(0x10000, pkt.len() as u32)]);
        wr(&mut slot, regs::QUEUE_NOTIFY, 1);
        assert_eq!(*got.lock().unwrap(), vec![b"hello frame".to_vec()]);
        assert_eq!(txq.used_idx(), 1);
        // Receive: a frame before any buffer waits, then lands in the first one posted.
        slot.deliver([b"to guest".to_vec()]);
        assert_eq!(slot.net().unwrap().pending_rx(), 1);
        rxq.add(&[Desc::w(0x20000, 2048)]);
        wr(&mut slot, regs::QUEUE_NOTIFY, 0);
        assert_eq!(slot.net().unwrap().pending_rx(), 0);
        assert_eq!(rxq.used_elem(0).1 as usize, NET_HDR_LEN + 8);
        let mut out = vec![0u8; NET_HDR_LEN + 8];
        m.read_slice(&mut out, GuestAddress(0x20000)).unwrap();
        assert_eq!(out[10], 1);
        assert_eq!(&out[NET_HDR_LEN..], b"to guest");
        // Paused: nothing reaches the ring until resumed.
        slot.pause();
        rxq.add(&[Desc::w(0x21000, 2048)]);
        slot.deliver([b"later".to_vec()]);
        assert_eq!(slot.net().unwrap().pending_rx(), 1);
        slot.resume();
        assert_eq!(slot.net().unwrap().pending_rx(), 0);
        assert_eq!(rxq.used_idx(), 2);
        // Unbound as Linux does it: reset, then acknowledged again.
        assert!(slot.driver_active());
        wr(&mut slot, regs::STATUS, 0);
        wr(&mut slot, regs::STATUS, ACKNOWLEDGE);
        assert!(!slot.driver_active());
        slot.clear();
        assert_eq!(rd(&mut slot, regs::DEVICE_ID), 0);
    }

    #[test]
    fn rx_backlog_is_bounded() {
        let (irq, _count) = counting_interrupt();
        let mut net =
            Net::new(mem(0x40000), irq, [0; 6], Box::new(Collect(Arc::default()))).unwrap();
        net.deliver((0..MAX_PENDING_RX + 10).map(|_| vec![0u8; 60]));
        assert_eq!(net.pending_rx(), MAX_PENDING_RX);
        assert_eq!(net.dropped, 10);
        net.deliver([vec![0u8; MAX_FRAME + 1]]);
        assert_eq!(net.dropped, 11);
    }
}
