//! Bounded, validated views of guest descriptor chains.
//!
//! `virtio-queue` already stops a chain after `queue size` descriptors (so a
//! `next` loop terminates) and ends it early where its total length would
//! pass `u32::MAX`. On top of that every chain is collected here once, with a
//! per-device descriptor cap, its total length checked again (a used-ring
//! length is a `u32`, so device code may count a chain's bytes in one), every
//! buffer range-checked against guest memory, and the readable-before-writable
//! ordering the spec requires enforced, so device code only sees plain
//! `(address, length)` segments that are known to be accessible.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::GuestMemoryMmap;

/// Largest chunk copied between the host and guest memory at a time, so a
/// request of any size needs only a fixed host buffer.
pub const COPY_CHUNK: usize = 64 * 1024;

/// Why a descriptor chain was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// More descriptors than the device accepts (or a `next` loop).
    #[error("descriptor chain longer than {0} descriptors")]
    TooLong(usize),
    /// A buffer lies (partly) outside guest memory.
    #[error("descriptor buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// A device-readable buffer after a device-writable one.
    #[error("readable descriptor after a writable one")]
    BadOrder,
    /// The chain has no descriptors at all (bad head index or table).
    #[error("empty descriptor chain")]
    Empty,
    /// The buffers add up to more than [`MAX_CHAIN_BYTES`].
    #[error("descriptor chain longer than {MAX_CHAIN_BYTES} bytes")]
    TooBig,
}

/// Most bytes one chain may describe: a used-ring length is a `u32` (the
/// virtio spec forbids chains over 4 GiB).
pub const MAX_CHAIN_BYTES: u64 = u32::MAX as u64;

/// One guest buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A validated chain: readable segments first, then writable ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    /// Device-readable (driver-written) buffers, in order.
    pub readable: Vec<Segment>,
    /// Device-writable buffers, in order.
    pub writable: Vec<Segment>,
}

impl Chain {
    /// Collect and validate at most `max_descs` descriptors of a chain (a
    /// `virtio_queue::DescriptorChain` or any descriptor sequence).
    pub fn parse(
        mem: &GuestMemoryMmap,
        descs: impl IntoIterator<Item = Descriptor>,
        max_descs: usize,
    ) -> Result<Self, ChainError> {
        let mut out = Chain::default();
        let mut total = 0u64;
        for (i, d) in descs.into_iter().enumerate() {
            if i >= max_descs {
                return Err(ChainError::TooLong(max_descs));
            }
            let seg = Segment {
                addr: d.addr(),
                len: d.len(),
            };
            total += u64::from(seg.len);
            if total > MAX_CHAIN_BYTES {
                return Err(ChainError::TooBig);
            }
            // `check_range` is false for zero lengths in some backends; an
            // empty buffer is harmless, so only its address must be sane.
            if seg.len > 0 && !mem.check_range(seg.addr, seg.len as usize) {
                return Err(ChainError::OutOfRange {
                    addr: seg.addr.0,
                    len: seg.len,
                });
            }
            if d.is_write_only() {
                out.writable.push(seg);
            } else if out.writable.is_empty() {
                out.readable.push(seg);
            } else {
                return Err(ChainError::BadOrder);
            }
        }
        if out.readable.is_empty() && out.writable.is_empty() {
            return Err(ChainError::Empty);
        }
        Ok(out)
    }

    /// Total bytes the device may read (at most [`MAX_CHAIN_BYTES`] for a
    /// parsed chain).
    pub fn readable_len(&self) -> u64 {
        total(&self.readable)
    }

    /// Total bytes the device may write (at most [`MAX_CHAIN_BYTES`] for a
    /// parsed chain).
    pub fn writable_len(&self) -> u64 {
        total(&self.writable)
    }
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// A cursor over a list of segments: a logical byte stream split across guest
/// buffers.
#[derive(Debug, Clone)]
pub struct SegCursor<'a> {
    segs: &'a [Segment],
    idx: usize,
    off: u32,
}

impl<'a> SegCursor<'a> {
    /// Start of `segs`.
    pub fn new(segs: &'a [Segment]) -> Self {
        Self {
            segs,
            idx: 0,
            off: 0,
        }
    }

    /// Bytes left.
    pub fn remaining(&self) -> u64 {
        let rest: u64 = self
            .segs
            .iter()
            .skip(self.idx)
            .map(|s| u64::from(s.len))
            .sum();
        rest - u64::from(self.off)
    }

    /// Next contiguous piece of at most `max` bytes, advancing past it.
    fn next_piece(&mut self, max: usize) -> Option<(GuestAddress, usize)> {
        loop {
            let seg = self.segs.get(self.idx)?;
            let left = (seg.len - self.off) as usize;
            if left == 0 {
                self.idx += 1;
                self.off = 0;
                continue;
            }
            let n = left.min(max);
            // Cannot overflow: `check_range` accepted `addr + len`.
            let addr = GuestAddress(seg.addr.0 + u64::from(self.off));
            self.off += n as u32;
            return Some((addr, n));
        }
    }

    /// Skip `n` bytes; false when fewer remain.
    pub fn skip(&mut self, mut n: u64) -> bool {
        while n > 0 {
            match self.next_piece(usize::try_from(n).unwrap_or(usize::MAX)) {
                Some((_, k)) => n -= k as u64,
                None => return false,
            }
        }
        true
    }

    /// Fill `buf` from guest memory; returns bytes copied (less than
    /// `buf.len()` only when the segments run out or memory faults).
    pub fn read(&mut self, mem: &GuestMemoryMmap, buf: &mut [u8]) -> usize {
        let mut done = 0;
        while done < buf.len() {
            let Some((addr, n)) = self.next_piece(buf.len() - done) else {
                break;
            };
            if mem.read_slice(&mut buf[done..done + n], addr).is_err() {
                break;
            }
            done += n;
        }
        done
    }

    /// Copy `buf` into guest memory; returns bytes copied.
    pub fn write(&mut self, mem: &GuestMemoryMmap, buf: &[u8]) -> usize {
        let mut done = 0;
        while done < buf.len() {
            let Some((addr, n)) = self.next_piece(buf.len() - done) else {
                break;
            };
            if mem.write_slice(&buf[done..done + n], addr).is_err() {
                break;
            }
            done += n;
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testutil::{mem, Desc, TestQueue};
    use proptest::prelude::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::QueueOwnedT;

    #[test]
    fn orders_and_ranges_are_checked() {
        let m = mem(0x10000);
        let mut tq = TestQueue::new(&m, 16, GuestAddress(0));
        let mut q = tq.queue();

        tq.add(&[Desc::r(0x8000, 16), Desc::w(0x9000, 8)]);
        tq.add(&[Desc::w(0x9000, 8), Desc::r(0x8000, 16)]);
        tq.add(&[Desc::r(0xfff0, 0x20)]);
        tq.add(&[Desc::r(u64::MAX - 4, 8)]);
        tq.add(&[Desc::w(0x8000, 0)]);

        let mut it = q.iter(&m).unwrap();
        let c = Chain::parse(&m, it.next().unwrap(), 8).unwrap();
        assert_eq!(c.readable_len(), 16);
        assert_eq!(c.writable_len(), 8);
        assert_eq!(
            Chain::parse(&m, it.next().unwrap(), 8),
            Err(ChainError::BadOrder)
        );
        assert!(matches!(
            Chain::parse(&m, it.next().unwrap(), 8),
            Err(ChainError::OutOfRange { .. })
        ));
        assert!(matches!(
            Chain::parse(&m, it.next().unwrap(), 8),
            Err(ChainError::OutOfRange { .. })
        ));
        let c = Chain::parse(&m, it.next().unwrap(), 8).unwrap();
        assert_eq!(c.writable_len(), 0);
    }

    #[test]
    fn loops_and_long_chains_are_bounded() {
        let m = mem(0x10000);
        let mut tq = TestQueue::new(&m, 16, GuestAddress(0));
        let mut q = tq.queue();
        // Descriptor 14 -> 15 -> 14 -> ... : a cycle.
        tq.raw_desc(14, 0x8000, 4, Desc::NEXT, 15);
        tq.raw_desc(15, 0x8000, 4, Desc::NEXT, 14);
        tq.publish(14);
        // Six linked descriptors against a cap of four.
        let descs: Vec<Desc> = (0..6).map(|_| Desc::r(0x8000, 4)).collect();
        tq.add(&descs);
        let mut it = q.iter(&m).unwrap();
        // virtio-queue cuts the cycle after `queue size` descriptors; a cap
        // below that reports it as too long.
        let c = Chain::parse(&m, it.next().unwrap(), 64).unwrap();
        assert_eq!(c.readable.len(), 16);
        assert_eq!(
            Chain::parse(&m, it.next().unwrap(), 4),
            Err(ChainError::TooLong(4))
        );
        tq.publish(14);
        let mut it = q.iter(&m).unwrap();
        assert_eq!(
            Chain::parse(&m, it.next().unwrap(), 8),
            Err(ChainError::TooLong(8))
        );
    }

    #[test]
    fn chains_over_4_gib_are_refused() {
        // 2 GiB of guest memory, reserved but never touched: three descriptors
        // naming the same buffer add up to more than a u32 can count.
        let m = mem(1 << 31);
        let w = |len: u32| Descriptor::new(0, len, VRING_DESC_F_WRITE as u16, 0);
        assert_eq!(
            Chain::parse(&m, [w(1 << 31), w(1 << 31)], 8),
            Err(ChainError::TooBig)
        );
        let c = Chain::parse(&m, [w((1 << 31) - 1), w(1 << 31)], 8).unwrap();
        assert_eq!(c.writable_len(), MAX_CHAIN_BYTES);
        assert_eq!(
            Chain::parse(&m, [w((1 << 31) - 1), w(1 << 31), w(1)], 8),
            Err(ChainError::TooBig)
        );
    }

    #[test]
    fn cursor_spans_segments() {
        let m = mem(0x10000);
        let segs = [
            Segment {
                addr: GuestAddress(0x100),
                len: 3,
            },
            Segment {
                addr: GuestAddress(0x200),
                len: 0,
            },
            Segment {
                addr: GuestAddress(0x300),
                len: 5,
            },
        ];
        let mut w = SegCursor::new(&segs);
        assert_eq!(w.remaining(), 8);
        assert_eq!(w.write(&m, b"abcdefghij"), 8);
        let mut r = SegCursor::new(&segs);
        assert!(r.skip(2));
        let mut buf = [0u8; 10];
        assert_eq!(r.read(&m, &mut buf), 6);
        assert_eq!(&buf[..6], b"cdefgh");
        assert!(!r.skip(1));
    }

    proptest! {
        /// Arbitrary descriptor-table, ring and buffer contents never panic the
        /// parser, and whatever it accepts lies inside guest memory.
        #[test]
        fn arbitrary_memory_parses_without_panic(
            table in proptest::collection::vec(any::<u8>(), 16 * 16),
            avail in proptest::collection::vec(any::<u8>(), 4 + 2 * 16),
            next_avail in any::<u16>(),
            max in 1usize..40,
        ) {
            let m = mem(0x10000);
            m.write_slice(&table, GuestAddress(0)).unwrap();
            m.write_slice(&avail, GuestAddress(0x1000)).unwrap();
            let mut q = TestQueue::queue_at(16, GuestAddress(0), GuestAddress(0x1000), GuestAddress(0x2000));
            virtio_queue::QueueT::set_next_avail(&mut q, next_avail);
            if let Ok(it) = q.iter(&m) {
                for chain in it.take(64) {
                    if let Ok(c) = Chain::parse(&m, chain, max) {
                        prop_assert!(c.readable.len() + c.writable.len() <= max);
                        for s in c.readable.iter().chain(&c.writable) {
                            prop_assert!(s.len == 0 || m.check_range(s.addr, s.len as usize));
                        }
                    }
                }
            }
        }
    }
}
