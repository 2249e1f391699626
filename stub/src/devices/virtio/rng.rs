//! virtio-rng: fills guest buffers with bytes from the host's `getrandom`.
//!
//! A restored machine shares its memory image with every other resume of the
//! same snapshot, so the guest must be able to reseed from a fresh host source
//! after resume; this device is that source.

use serde::{Deserialize, Serialize};

use super::chain::{Chain, SegCursor};
use super::{
    GuestMemoryMmap, Persist, VirtioCommon, VirtioCommonState, VirtioDevice, VirtioError,
    VirtioInterrupt, COMMON_FEATURES,
};

/// Virtio device ID of an entropy source.
pub const VIRTIO_ID_RNG: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 64;
/// Most bytes handed out per request, so one request costs bounded work.
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;
/// Most descriptors accepted per request.
pub const MAX_DESCS: usize = 64;

/// Entropy device.
pub struct Rng {
    common: VirtioCommon,
}

/// Saved [`Rng`]: only the common virtio state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// Queues, features, status.
    pub common: VirtioCommonState,
}

/// Host resources for [`Rng::restore`].
pub struct RngArgs {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// Interrupt line.
    pub interrupt: VirtioInterrupt,
}

impl Rng {
    /// A new entropy device.
    pub fn new(mem: GuestMemoryMmap, interrupt: VirtioInterrupt) -> Result<Self, VirtioError> {
        Ok(Self {
            common: VirtioCommon::new(&[QUEUE_SIZE], mem, interrupt)?,
        })
    }
}

/// Fill `buf` from the host CSPRNG.
pub fn host_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the pointer and length describe `rest`, a live, writable
        // slice; getrandom writes at most that many bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

fn fill(mem: &GuestMemoryMmap, chain: &Chain) -> u32 {
    let mut out = SegCursor::new(&chain.writable);
    let mut left = out.remaining().min(MAX_BYTES_PER_REQUEST as u64) as usize;
    let mut buf = [0u8; 4096];
    let mut written = 0usize;
    while left > 0 {
        let n = left.min(buf.len());
        if let Err(e) = host_random(&mut buf[..n]) {
            log::error!("host getrandom failed: {e}");
            break;
        }
        let k = out.write(mem, &buf[..n]);
        written += k;
        if k < n {
            break;
        }
        left -= n;
    }
    // At most MAX_BYTES_PER_REQUEST.
    u32::try_from(written).unwrap_or(0)
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn device_features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, _offset: u64, _data: &mut [u8]) {}

    fn process_queue(&mut self, index: usize) {
        self.common.drain_queue(index, MAX_DESCS, |mem, chain| {
            Some(match chain {
                Ok(c) => fill(mem, &c),
                Err(e) => {
                    log::warn!("virtio-rng: bad request: {e}");
                    0
                }
            })
        });
    }
}

impl Persist for Rng {
    type State = RngState;
    type Args<'a> = RngArgs;
    type Error = VirtioError;

    fn save(&self) -> Result<RngState, VirtioError> {
        Ok(RngState {
            common: self.common.save(),
        })
    }

    fn restore(args: RngArgs, state: &RngState) -> Result<Self, VirtioError> {
        Ok(Self {
            common: VirtioCommon::restore(&[QUEUE_SIZE], args.mem, args.interrupt, &state.common)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::status::*;
    use crate::devices::virtio::testutil::*;
    use crate::devices::virtio::Persist;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn fills_buffers_and_bounds_requests() {
        let m = mem(0x40000);
        let (irq, count) = counting_interrupt();
        let mut t = MmioTransport::new(Rng::new(m.clone(), irq).unwrap());
        let mut tq = TestQueue::new(&m, 16, GuestAddress(0x1000));
        let st = handshake(&mut t, COMMON_FEATURES, &[&tq]);
        assert_eq!(st & DRIVER_OK, DRIVER_OK);

        tq.add(&[Desc::w(0x10000, 32), Desc::w(0x10100, 32)]);
        // Oversized: 128 KiB asked, 64 KiB given.
        tq.add(&[Desc::w(0x20000, 0x20000)]);
        // Read-only buffer: nothing to fill.
        tq.add(&[Desc::r(0x10200, 32)]);
        wr(&mut t, crate::devices::virtio::mmio::regs::QUEUE_NOTIFY, 0);

        assert_eq!(tq.used_idx(), 3);
        assert_eq!(tq.used_elem(0).1, 64);
        assert_eq!(tq.used_elem(1).1, MAX_BYTES_PER_REQUEST as u32);
        assert_eq!(tq.used_elem(2).1, 0);
        let mut a = [0u8; 32];
        m.read_slice(&mut a, GuestAddress(0x10000)).unwrap();
        assert_ne!(a, [0u8; 32]);
        assert_eq!(count.count(), 1, "one interrupt per batch");
        assert_eq!(t.status() & NEEDS_RESET, 0);
        // Round trip through the snapshot codec, then keep serving.
        let state = t.save().unwrap();
        let bytes = postcard::to_allocvec(&state).unwrap();
        let state: crate::devices::virtio::mmio::MmioDeviceState<RngState> =
            postcard::from_bytes(&bytes).unwrap();
        let (irq2, count2) = counting_interrupt();
        let mut t = MmioTransport::<Rng>::restore(
            RngArgs {
                mem: m.clone(),
                interrupt: irq2,
            },
            &state,
        )
        .unwrap();
        tq.set_used_event(3); // interrupt me when entry 3 is used
        tq.add(&[Desc::w(0x10300, 16)]);
        wr(&mut t, crate::devices::virtio::mmio::regs::QUEUE_NOTIFY, 0);
        assert_eq!(tq.used_idx(), 4);
        assert_eq!(tq.used_elem(3), (4, 16));
        assert_eq!(count2.count(), 1);

        // No config space: reads leave the bus's all-ones in place.
        let mut cfg = [0xffu8; 4];
        t.read(0x100, &mut cfg);
        assert_eq!(cfg, [0xff; 4]);
    }
}
