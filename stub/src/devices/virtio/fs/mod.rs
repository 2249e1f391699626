//! virtio-fs: host directories shared into the machine.
//!
//! One device with the tag [`TAG`] serves every share through the in-process
//! FUSE server in [`server`] (an external `virtiofsd` cannot serve here:
//! guest RAM is a private copy-on-write mapping of the machine file, not
//! shared memory). The device exists in every Linux machine, shares or not,
//! so a snapshot's device set never depends on run-time flags; which host
//! directories it serves is decided at each resume and is not part of the
//! snapshot (only the queues are). Requests are served synchronously on the
//! notifying vCPU thread, like the block device's.
//!
//! Queue 0 is the high-priority queue (forgets), queue 1 the one request
//! queue. DAX and notifications are not offered.

pub mod fuse;
pub mod server;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

use super::chain::{Chain, SegCursor};
use super::{
    read_config_bytes, GuestMemoryMmap, Persist, VirtioCommon, VirtioCommonState, VirtioDevice,
    VirtioError, VirtioInterrupt, COMMON_FEATURES,
};
pub use server::{Server, ShareConfig, ShareError};

/// Virtio device ID of a file system device.
pub const VIRTIO_ID_FS: u32 = 26;
/// The mount tag the guest uses (`mount -t virtiofs smolvm DIR`).
pub const TAG: &str = "smolvm";
/// Queue size offered (both queues).
pub const QUEUE_SIZE: u16 = 256;
/// Most descriptors accepted per request: a maximal read or write in pages
/// plus the headers.
pub const MAX_DESCS: usize = server::MAX_IO / 4096 + 8;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];

/// The virtio-fs device.
pub struct Fs {
    common: VirtioCommon,
    server: Server,
}

/// Saved [`Fs`]: the queues only; the shares are the resume's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsState {
    /// Queues, features, status.
    pub common: VirtioCommonState,
}

/// Host resources for [`Fs::restore`].
pub struct FsArgs {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// Interrupt line.
    pub interrupt: VirtioInterrupt,
    /// The shares this run serves (opened already).
    pub server: Server,
}

impl Fs {
    /// A new device serving `server`'s shares.
    pub fn new(
        mem: GuestMemoryMmap,
        interrupt: VirtioInterrupt,
        server: Server,
    ) -> Result<Self, VirtioError> {
        Ok(Self {
            common: VirtioCommon::new(&QUEUE_SIZES, mem, interrupt)?,
            server,
        })
    }

    /// The FUSE server (tests look at its counts).
    pub fn server(&self) -> &Server {
        &self.server
    }
}

/// Serve one chain: the request is its readable part, the reply goes into
/// its writable part. Returns the used length.
fn serve(server: &mut Server, mem: &GuestMemoryMmap, chain: &Chain) -> u32 {
    let len = chain.readable_len();
    let mut req = vec![0u8; len.min(server::MAX_REQUEST as u64) as usize];
    let got = SegCursor::new(&chain.readable).read(mem, &mut req);
    req.truncate(got);
    let reply = if len > server::MAX_REQUEST as u64 {
        // Too big to take in: answer from the header alone.
        fuse::parse_header(&req)
            .ok()
            .map(|h| fuse::reply_err(h.unique, libc::E2BIG))
    } else {
        let room = usize::try_from(chain.writable_len()).unwrap_or(usize::MAX);
        server.handle(&req, room)
    };
    match reply {
        Some(r) => {
            let n = SegCursor::new(&chain.writable).write(mem, &r);
            // At most the writable length, itself a u32.
            u32::try_from(n).unwrap_or(0)
        }
        None => 0,
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
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

    /// `struct virtio_fs_config`: the tag (36 bytes, NUL-padded) and the
    /// number of request queues.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 40];
        cfg[..TAG.len()].copy_from_slice(TAG.as_bytes());
        cfg[36..].copy_from_slice(&1u32.to_le_bytes());
        read_config_bytes(&cfg, offset, data);
    }

    fn process_queue(&mut self, index: usize) {
        let server = &mut self.server;
        self.common.drain_queue(index, MAX_DESCS, |mem, chain| {
            Some(match chain {
                Ok(c) => serve(server, mem, &c),
                Err(e) => {
                    log::warn!("virtio-fs: bad request: {e}");
                    0
                }
            })
        });
    }

    fn reset(&mut self) {
        // The driver went away: everything it held is released.
        let _ = self.server.handle(
            &{
                let mut h = vec![0u8; fuse::IN_HEADER_LEN];
                h[..4].copy_from_slice(&(fuse::IN_HEADER_LEN as u32).to_le_bytes());
                h[4..8].copy_from_slice(&fuse::opcode::DESTROY.to_le_bytes());
                h
            },
            fuse::OUT_HEADER_LEN,
        );
    }
}

impl Persist for Fs {
    type State = FsState;
    type Args<'a> = FsArgs;
    type Error = VirtioError;

    fn save(&self) -> Result<FsState, VirtioError> {
        Ok(FsState {
            common: self.common.save(),
        })
    }

    fn restore(args: FsArgs, state: &FsState) -> Result<Self, VirtioError> {
        Ok(Self {
            common: VirtioCommon::restore(&QUEUE_SIZES, args.mem, args.interrupt, &state.common)?,
            server: args.server,
        })
    }
}
