//! Test helpers: a driver-side view of a split virtqueue written straight into
//! synthetic guest memory, a counting interrupt line, and an mmio driver.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::mmio::regs;
use super::{GuestMemoryMmap, InterruptTrigger, VirtioInterrupt};
use crate::devices::bus::BusDevice;

/// Guest memory `[0, size)`.
pub fn mem(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// Counts interrupts.
#[derive(Default)]
pub struct Counter(pub AtomicUsize);

impl InterruptTrigger for Counter {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Counter {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// An interrupt whose line counts triggers.
pub fn counting_interrupt() -> (VirtioInterrupt, Arc<Counter>) {
    let c = Arc::new(Counter::default());
    (VirtioInterrupt::new(c.clone()), c)
}

/// One descriptor as the test driver describes it.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

impl Desc {
    pub const NEXT: u16 = 1;
    pub const WRITE: u16 = 2;

    pub fn r(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: false,
        }
    }

    pub fn w(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: true,
        }
    }
}

/// Driver side of a split queue laid out at `base`: descriptor table, then the
/// available ring, then the used ring.
pub struct TestQueue<'a> {
    mem: &'a GuestMemoryMmap,
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
}

impl<'a> TestQueue<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, size: u16, base: GuestAddress) -> Self {
        let desc = base;
        let avail = GuestAddress(desc.0 + 16 * u64::from(size));
        let used = GuestAddress((avail.0 + 6 + 2 * u64::from(size) + 3) & !3);
        mem.write_slice(&[0u8; 6], avail).unwrap();
        mem.write_slice(&[0u8; 4], used).unwrap();
        Self {
            mem,
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// A device-side queue already configured for these rings.
    pub fn queue(&self) -> Queue {
        Self::queue_at(self.size, self.desc, self.avail, self.used)
    }

    pub fn queue_at(
        size: u16,
        desc: GuestAddress,
        avail: GuestAddress,
        used: GuestAddress,
    ) -> Queue {
        let mut q = Queue::new(size).unwrap();
        q.set_size(size);
        q.set_desc_table_address(Some(desc.0 as u32), Some((desc.0 >> 32) as u32));
        q.set_avail_ring_address(Some(avail.0 as u32), Some((avail.0 >> 32) as u32));
        q.set_used_ring_address(Some(used.0 as u32), Some((used.0 >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Write descriptor `idx` verbatim.
    pub fn raw_desc(&self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.desc.0 + 16 * u64::from(idx));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, at).unwrap();
    }

    /// Write a linked chain into free descriptor slots and make it available.
    pub fn add(&mut self, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % self.size;
            let mut flags = if d.write { Desc::WRITE } else { 0 };
            if i + 1 < descs.len() {
                flags |= Desc::NEXT;
            }
            self.raw_desc(idx, d.addr, d.len, flags, (idx + 1) % self.size);
        }
        self.next_desc = (self.next_desc + descs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// Put `head` on the available ring and bump its index.
    pub fn publish(&mut self, head: u16) {
        let slot = GuestAddress(self.avail.0 + 4 + 2 * u64::from(self.avail_idx % self.size));
        self.mem.write_obj(head.to_le(), slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx.to_le(), GuestAddress(self.avail.0 + 2))
            .unwrap();
    }

    /// Overwrite the available ring index (to fake a corrupt driver).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.mem
            .write_obj(idx.to_le(), GuestAddress(self.avail.0 + 2))
            .unwrap();
    }

    /// `used_event` (driver asks for an interrupt once this entry is used).
    pub fn set_used_event(&self, v: u16) {
        let at = GuestAddress(self.avail.0 + 4 + 2 * u64::from(self.size));
        self.mem.write_obj(v.to_le(), at).unwrap();
    }

    /// `avail_event` as the device wrote it.
    pub fn avail_event(&self) -> u16 {
        let at = GuestAddress(self.used.0 + 4 + 8 * u64::from(self.size));
        self.mem.read_obj::<u16>(at).unwrap()
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj::<u16>(GuestAddress(self.used.0 + 2))
            .unwrap()
    }

    /// Used-ring entry `i`: (head id, written length).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used.0 + 4 + 8 * u64::from(i % self.size);
        let id = self.mem.read_obj::<u32>(GuestAddress(at)).unwrap();
        let len = self.mem.read_obj::<u32>(GuestAddress(at + 4)).unwrap();
        (id, len)
    }
}

/// 32-bit register read.
pub fn rd(dev: &mut dyn BusDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// 32-bit register write.
pub fn wr(dev: &mut dyn BusDevice, off: u64, v: u32) {
    dev.write(off, &v.to_le_bytes());
}

/// Run the virtio-mmio driver handshake (reset → ACK → DRIVER → features →
/// FEATURES_OK → queue setup → DRIVER_OK) as Linux does, accepting
/// `features` (which must be offered). Returns the final status.
pub fn handshake(dev: &mut dyn BusDevice, features: u64, queues: &[&TestQueue]) -> u32 {
    use super::status::*;
    assert_eq!(rd(dev, regs::MAGIC), 0x7472_6976);
    assert_eq!(rd(dev, regs::VERSION), 2);
    wr(dev, regs::STATUS, 0);
    wr(dev, regs::STATUS, ACKNOWLEDGE);
    wr(dev, regs::STATUS, ACKNOWLEDGE | DRIVER);
    wr(dev, regs::DEVICE_FEATURES_SEL, 0);
    let lo = rd(dev, regs::DEVICE_FEATURES);
    wr(dev, regs::DEVICE_FEATURES_SEL, 1);
    let hi = rd(dev, regs::DEVICE_FEATURES);
    let offered = u64::from(hi) << 32 | u64::from(lo);
    assert_eq!(offered & features, features, "feature not offered");
    wr(dev, regs::DRIVER_FEATURES_SEL, 0);
    wr(dev, regs::DRIVER_FEATURES, features as u32);
    wr(dev, regs::DRIVER_FEATURES_SEL, 1);
    wr(dev, regs::DRIVER_FEATURES, (features >> 32) as u32);
    wr(dev, regs::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    if rd(dev, regs::STATUS) & FEATURES_OK == 0 {
        return rd(dev, regs::STATUS);
    }
    for (i, q) in queues.iter().enumerate() {
        wr(dev, regs::QUEUE_SEL, i as u32);
        assert_eq!(rd(dev, regs::QUEUE_READY), 0);
        assert!(rd(dev, regs::QUEUE_NUM_MAX) >= u32::from(q.size));
        wr(dev, regs::QUEUE_NUM, u32::from(q.size));
        wr(dev, regs::QUEUE_DESC_LOW, q.desc.0 as u32);
        wr(dev, regs::QUEUE_DESC_HIGH, (q.desc.0 >> 32) as u32);
        wr(dev, regs::QUEUE_AVAIL_LOW, q.avail.0 as u32);
        wr(dev, regs::QUEUE_AVAIL_HIGH, (q.avail.0 >> 32) as u32);
        wr(dev, regs::QUEUE_USED_LOW, q.used.0 as u32);
        wr(dev, regs::QUEUE_USED_HIGH, (q.used.0 >> 32) as u32);
        wr(dev, regs::QUEUE_READY, 1);
    }
    wr(
        dev,
        regs::STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    rd(dev, regs::STATUS)
}
