//! virtio-blk over a read-only base image with a private copy-on-write overlay.
//!
//! The base image file is opened read-only and never written: one image can
//! back any number of machines. Guest writes land in an overlay (an unlinked
//! sparse temp file) at the same offsets, tracked per 4 KiB block by a bitmap;
//! the first write to a block copies the rest of that block up from the base.
//! Reads take each block from the overlay when present, else from the base.
//!
//! For snapshots, [`CowDisk::write_merged_to`] writes the whole merged disk
//! (all-zero blocks left as holes); a resume uses that image as the base of a
//! fresh overlay.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk as blk;

use super::chain::{Chain, SegCursor, Segment, COPY_CHUNK};
use super::{
    read_config_bytes, GuestMemoryMmap, Persist, VirtioCommon, VirtioCommonState, VirtioDevice,
    VirtioError, VirtioInterrupt, COMMON_FEATURES,
};
use vm_memory::{Bytes, GuestAddress};

/// Virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request advertised through `seg_max`.
pub const SEG_MAX: u32 = 126;
/// Descriptors accepted per request: header + data segments + status.
pub const MAX_DESCS: usize = SEG_MAX as usize + 2;
/// Virtio sector size.
pub const SECTOR_SIZE: u64 = 512;
/// Copy-on-write granularity of the overlay.
pub const BLOCK_SIZE: u64 = 4096;
/// Length of a `GET_ID` answer.
pub const ID_BYTES: usize = 20;

/// `VIRTIO_BLK_F_SEG_MAX`.
pub const F_SEG_MAX: u64 = 1 << blk::VIRTIO_BLK_F_SEG_MAX;
/// `VIRTIO_BLK_F_RO`.
pub const F_RO: u64 = 1 << blk::VIRTIO_BLK_F_RO;
/// `VIRTIO_BLK_F_BLK_SIZE`.
pub const F_BLK_SIZE: u64 = 1 << blk::VIRTIO_BLK_F_BLK_SIZE;
/// `VIRTIO_BLK_F_FLUSH`.
pub const F_FLUSH: u64 = 1 << blk::VIRTIO_BLK_F_FLUSH;

/// Request types.
const T_IN: u32 = blk::VIRTIO_BLK_T_IN;
const T_OUT: u32 = blk::VIRTIO_BLK_T_OUT;
const T_FLUSH: u32 = blk::VIRTIO_BLK_T_FLUSH;
const T_GET_ID: u32 = blk::VIRTIO_BLK_T_GET_ID;
/// Request status values.
const S_OK: u8 = blk::VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = blk::VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = blk::VIRTIO_BLK_S_UNSUPP as u8;

/// Disk image errors.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The base image cannot be opened.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// Image path.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// I/O on the base image or the overlay failed.
    #[error("disk I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The image holds less than one sector.
    #[error("disk image is smaller than one 512-byte sector")]
    TooSmall,
    /// A saved overlay does not fit this base image.
    #[error("saved disk state does not match the base image: {0}")]
    Mismatch(String),
}

/// Saved disk geometry, checked against the disk a resume provides (its
/// contents are the machine file's disk section).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskState {
    /// Disk size in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Overlay granularity in bytes ([`BLOCK_SIZE`]).
    pub block_size: u64,
}

/// Where a disk's base bytes come from. Only ever read: a plain image file,
/// or a disk section read in place from a machine file through its run map.
pub trait DiskBase: Send {
    /// Size in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Fill `buf` from `offset` (within the size).
    fn read_base_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl DiskBase for File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn read_base_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

/// A base image plus a private copy-on-write overlay.
pub struct CowDisk {
    base: Box<dyn DiskBase>,
    overlay: File,
    capacity: u64,
    present: Vec<u64>,
}

impl CowDisk {
    /// Open the image at `path` read-only, with an empty overlay in the
    /// system temp directory.
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        let base = OpenOptions::new()
            .read(true)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.to_owned(),
                source,
            })?;
        Self::from_base(base)
    }

    /// Use an already open base image (only ever read) with an empty overlay
    /// in the system temp directory.
    pub fn from_base(base: File) -> Result<Self, DiskError> {
        Self::with_overlay(base, tempfile::tempfile()?)
    }

    /// Use `overlay` (truncated here) for copied-up blocks.
    pub fn with_overlay(base: File, overlay: File) -> Result<Self, DiskError> {
        Self::with_base_and_overlay(Box::new(base), overlay)
    }

    /// Any [`DiskBase`] with an empty overlay in the system temp directory.
    pub fn from_disk_base(base: Box<dyn DiskBase>) -> Result<Self, DiskError> {
        Self::with_base_and_overlay(base, tempfile::tempfile()?)
    }

    fn with_base_and_overlay(base: Box<dyn DiskBase>, overlay: File) -> Result<Self, DiskError> {
        let len = base.size()?;
        let capacity = len / SECTOR_SIZE * SECTOR_SIZE;
        if capacity == 0 {
            return Err(DiskError::TooSmall);
        }
        if capacity != len {
            log::warn!("disk image size {len} is not a multiple of 512; the tail is ignored");
        }
        overlay.set_len(0)?;
        overlay.set_len(capacity)?;
        let blocks = capacity.div_ceil(BLOCK_SIZE);
        Ok(Self {
            base,
            overlay,
            capacity,
            present: vec![0; blocks.div_ceil(64) as usize],
        })
    }

    /// Disk size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Disk size in sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity / SECTOR_SIZE
    }

    /// Number of overlay blocks (the last may be short).
    pub fn block_count(&self) -> u64 {
        self.capacity.div_ceil(BLOCK_SIZE)
    }

    fn block_len(&self, b: u64) -> usize {
        (self.capacity - b * BLOCK_SIZE).min(BLOCK_SIZE) as usize
    }

    /// Whether block `b` lives in the overlay.
    pub fn is_dirty(&self, b: u64) -> bool {
        self.present
            .get((b / 64) as usize)
            .is_some_and(|w| w & (1 << (b % 64)) != 0)
    }

    fn set_present(&mut self, b: u64) {
        if let Some(w) = self.present.get_mut((b / 64) as usize) {
            *w |= 1 << (b % 64);
        }
    }

    /// Overlay blocks as ascending `(first, count)` runs.
    pub fn dirty_runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (wi, &w) in self.present.iter().enumerate() {
            let mut bits = w;
            while bits != 0 {
                let b = wi as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                match runs.last_mut() {
                    Some((s, c)) if *s + *c == b => *c += 1,
                    _ => runs.push((b, 1)),
                }
            }
        }
        runs
    }

    /// Geometry to store in a snapshot.
    pub fn state(&self) -> DiskState {
        DiskState {
            capacity_sectors: self.capacity_sectors(),
            block_size: BLOCK_SIZE,
        }
    }

    fn check_range(&self, offset: u64, len: usize) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.capacity => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "access beyond the end of the disk",
            )),
        }
    }

    /// Read merged disk contents at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len())?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let b = pos / BLOCK_SIZE;
            let dirty = self.is_dirty(b);
            // One read for the whole stretch of blocks that share a source.
            let mut end_block = b + 1;
            let last = (offset + buf.len() as u64 - 1) / BLOCK_SIZE;
            while end_block <= last && self.is_dirty(end_block) == dirty {
                end_block += 1;
            }
            let n = (end_block * BLOCK_SIZE - pos).min((buf.len() - done) as u64) as usize;
            let dst = &mut buf[done..done + n];
            if dirty {
                self.overlay.read_exact_at(dst, pos)?;
            } else {
                self.base.read_base_at(dst, pos)?;
            }
            done += n;
        }
        Ok(())
    }

    /// Write `buf` at `offset` into the overlay.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len())?;
        let mut done = 0usize;
        let mut block = Vec::new();
        while done < buf.len() {
            let pos = offset + done as u64;
            let b = pos / BLOCK_SIZE;
            let start = b * BLOCK_SIZE;
            let n = ((b + 1) * BLOCK_SIZE - pos).min((buf.len() - done) as u64) as usize;
            let part = &buf[done..done + n];
            let whole = pos == start && n == self.block_len(b);
            if self.is_dirty(b) || whole {
                self.overlay.write_all_at(part, pos)?;
            } else {
                // First partial write to this block: copy it up, then patch.
                block.resize(self.block_len(b), 0);
                self.base.read_base_at(&mut block, start)?;
                let at = (pos - start) as usize;
                block[at..at + n].copy_from_slice(part);
                self.overlay.write_all_at(&block, start)?;
            }
            self.set_present(b);
            done += n;
        }
        Ok(())
    }

    /// Make overlay writes durable (the overlay is private, so this only
    /// matters when it is a named file).
    pub fn flush(&self) -> io::Result<()> {
        self.overlay.sync_data()
    }

    /// Read merged block `b` into `buf` (at least [`BLOCK_SIZE`] long);
    /// returns its length (short for the last block).
    pub fn read_block(&self, b: u64, buf: &mut [u8]) -> io::Result<usize> {
        if b >= self.block_count() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no such block"));
        }
        let n = self.block_len(b);
        let dst = buf.get_mut(..n).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "buffer shorter than a block")
        })?;
        self.read_at(dst, b * BLOCK_SIZE)?;
        Ok(n)
    }

    /// Write the whole merged disk (base with the overlay applied) into
    /// `out`, truncated to the disk's size first; all-zero blocks are left as
    /// holes, so a sparse-aware writer skips them cheaply. Returns the size.
    pub fn write_merged_to(&self, out: &File) -> io::Result<u64> {
        out.set_len(0)?;
        out.set_len(self.capacity)?;
        let mut buf = vec![0u8; COPY_CHUNK];
        let mut pos = 0u64;
        while pos < self.capacity {
            let n = (self.capacity - pos).min(COPY_CHUNK as u64) as usize;
            self.read_at(&mut buf[..n], pos)?;
            for (i, block) in buf[..n].chunks(BLOCK_SIZE as usize).enumerate() {
                if block.iter().any(|&b| b != 0) {
                    out.write_all_at(block, pos + (i as u64) * BLOCK_SIZE)?;
                }
            }
            pos += n as u64;
        }
        Ok(pos)
    }
}

/// Device options.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfig {
    /// Refuse guest writes (and advertise `VIRTIO_BLK_F_RO`).
    pub read_only: bool,
    /// Serial reported by `GET_ID` (at most 20 bytes used).
    pub id: String,
}

/// A virtio-blk device over a [`CowDisk`].
pub struct Block {
    common: VirtioCommon,
    disk: CowDisk,
    config: BlockConfig,
    scratch: Vec<u8>,
}

/// Saved [`Block`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Queues, features, status.
    pub common: VirtioCommonState,
    /// Device options.
    pub config: BlockConfig,
    /// Overlay layout at save time.
    pub disk: DiskState,
}

/// Host resources for [`Block::restore`].
pub struct BlockArgs {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// Interrupt line.
    pub interrupt: VirtioInterrupt,
    /// The disk, rebuilt by the caller (the merged image of the machine
    /// file as its base); its size must match the state.
    pub disk: CowDisk,
}

impl Block {
    /// A block device over `disk`.
    pub fn new(
        mem: GuestMemoryMmap,
        interrupt: VirtioInterrupt,
        disk: CowDisk,
        config: BlockConfig,
    ) -> Result<Self, VirtioError> {
        Ok(Self {
            common: VirtioCommon::new(&[QUEUE_SIZE], mem, interrupt)?,
            disk,
            config,
            scratch: vec![0; COPY_CHUNK],
        })
    }

    /// The disk (for exporting it into a snapshot).
    pub fn disk(&self) -> &CowDisk {
        &self.disk
    }

    fn config_space(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[0..8].copy_from_slice(&self.disk.capacity_sectors().to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }
}

/// Parsed request outcome: status and bytes written into the data-in part.
struct Outcome {
    status: u8,
    written: u32,
}

impl Outcome {
    fn status(status: u8) -> Self {
        Self { status, written: 0 }
    }
}

/// Split the writable part into data-in segments and the status byte (the
/// last writable byte).
fn split_status(writable: &[Segment]) -> Option<(Vec<Segment>, GuestAddress)> {
    let last = writable.iter().rposition(|s| s.len > 0)?;
    let seg = writable[last];
    let status = GuestAddress(seg.addr.0 + u64::from(seg.len) - 1);
    let mut data: Vec<Segment> = writable[..last].to_vec();
    if seg.len > 1 {
        data.push(Segment {
            addr: seg.addr,
            len: seg.len - 1,
        });
    }
    Some((data, status))
}

fn handle_request(
    disk: &mut CowDisk,
    config: &BlockConfig,
    scratch: &mut [u8],
    mem: &GuestMemoryMmap,
    chain: &Chain,
) -> u32 {
    let Some((data_in, status_addr)) = split_status(&chain.writable) else {
        log::warn!("virtio-blk: request without a status byte dropped");
        return 0;
    };
    let mut reader = SegCursor::new(&chain.readable);
    let mut hdr = [0u8; 16];
    let out = if reader.read(mem, &mut hdr) < hdr.len() {
        log::warn!("virtio-blk: short request header");
        Outcome::status(S_IOERR)
    } else {
        let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(sector);
        let mut writer = SegCursor::new(&data_in);
        execute(
            disk,
            config,
            scratch,
            mem,
            ty,
            sector,
            &mut reader,
            &mut writer,
        )
    };
    if mem.write_obj(out.status, status_addr).is_err() {
        return out.written;
    }
    // `execute` leaves room for the status byte (data-in below u32::MAX).
    out.written.saturating_add(1)
}

/// Byte range `[sector * 512, +len)` if it is sector-aligned and on the disk.
fn disk_range(disk: &CowDisk, sector: u64, len: u64) -> Option<u64> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return None;
    }
    let start = sector.checked_mul(SECTOR_SIZE)?;
    (start.checked_add(len)? <= disk.capacity()).then_some(start)
}

#[allow(clippy::too_many_arguments)]
fn execute(
    disk: &mut CowDisk,
    config: &BlockConfig,
    scratch: &mut [u8],
    mem: &GuestMemoryMmap,
    ty: u32,
    sector: u64,
    reader: &mut SegCursor,
    writer: &mut SegCursor,
) -> Outcome {
    match ty {
        T_IN => {
            if reader.remaining() != 0 {
                // Data buffers must be device-writable for a read.
                return Outcome::status(S_IOERR);
            }
            let len = writer.remaining();
            // The used length (data-in plus the status byte) is a u32: a
            // longer request fails before any I/O.
            if len >= u64::from(u32::MAX) {
                log::warn!("virtio-blk: read of {len} bytes is longer than a request can be");
                return Outcome::status(S_IOERR);
            }
            let Some(mut pos) = disk_range(disk, sector, len) else {
                return Outcome::status(S_IOERR);
            };
            let mut written = 0u32;
            let end = pos + len;
            while pos < end {
                let n = (end - pos).min(scratch.len() as u64) as usize;
                if let Err(e) = disk.read_at(&mut scratch[..n], pos) {
                    log::error!("virtio-blk: read failed: {e}");
                    return Outcome {
                        status: S_IOERR,
                        written,
                    };
                }
                let k = writer.write(mem, &scratch[..n]);
                let Some(sum) = u32::try_from(k).ok().and_then(|k| written.checked_add(k)) else {
                    return Outcome {
                        status: S_IOERR,
                        written,
                    };
                };
                written = sum;
                if k < n {
                    return Outcome {
                        status: S_IOERR,
                        written,
                    };
                }
                pos += n as u64;
            }
            Outcome {
                status: S_OK,
                written,
            }
        }
        T_OUT => {
            if config.read_only || writer.remaining() != 0 {
                // Read-only disk, or data buffers marked device-writable.
                return Outcome::status(S_IOERR);
            }
            let len = reader.remaining();
            let Some(mut pos) = disk_range(disk, sector, len) else {
                return Outcome::status(S_IOERR);
            };
            let end = pos + len;
            while pos < end {
                let n = (end - pos).min(scratch.len() as u64) as usize;
                if reader.read(mem, &mut scratch[..n]) < n {
                    return Outcome::status(S_IOERR);
                }
                if let Err(e) = disk.write_at(&scratch[..n], pos) {
                    log::error!("virtio-blk: write failed: {e}");
                    return Outcome::status(S_IOERR);
                }
                pos += n as u64;
            }
            Outcome::status(S_OK)
        }
        T_FLUSH => match disk.flush() {
            Ok(()) => Outcome::status(S_OK),
            Err(e) => {
                log::error!("virtio-blk: flush failed: {e}");
                Outcome::status(S_IOERR)
            }
        },
        T_GET_ID => {
            let mut id = [0u8; ID_BYTES];
            let src = config.id.as_bytes();
            let n = src.len().min(ID_BYTES);
            id[..n].copy_from_slice(&src[..n]);
            let len = (writer.remaining() as usize).min(ID_BYTES);
            Outcome {
                status: S_OK,
                // At most ID_BYTES.
                written: u32::try_from(writer.write(mem, &id[..len])).unwrap_or(0),
            }
        }
        _ => Outcome::status(S_UNSUPP),
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn device_features(&self) -> u64 {
        let ro = if self.config.read_only { F_RO } else { 0 };
        COMMON_FEATURES | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | ro
    }

    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn process_queue(&mut self, index: usize) {
        let disk = &mut self.disk;
        let config = &self.config;
        let scratch = &mut self.scratch;
        self.common.drain_queue(index, MAX_DESCS, |mem, chain| {
            Some(match chain {
                Ok(c) => handle_request(disk, config, scratch, mem, &c),
                Err(e) => {
                    log::warn!("virtio-blk: bad request: {e}");
                    0
                }
            })
        });
    }
}

impl Persist for Block {
    type State = BlockState;
    type Args<'a> = BlockArgs;
    type Error = VirtioError;

    fn save(&self) -> Result<BlockState, VirtioError> {
        Ok(BlockState {
            common: self.common.save(),
            config: self.config.clone(),
            disk: self.disk.state(),
        })
    }

    fn restore(args: BlockArgs, state: &BlockState) -> Result<Self, VirtioError> {
        if args.disk.capacity_sectors() != state.disk.capacity_sectors {
            return Err(VirtioError::StateMismatch(format!(
                "disk has {} sectors, snapshot expects {}",
                args.disk.capacity_sectors(),
                state.disk.capacity_sectors
            )));
        }
        Ok(Self {
            common: VirtioCommon::restore(&[QUEUE_SIZE], args.mem, args.interrupt, &state.common)?,
            disk: args.disk,
            config: state.config.clone(),
            scratch: vec![0; COPY_CHUNK],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::mmio::{regs, MmioDeviceState, MmioTransport};
    use crate::devices::virtio::status::*;
    use crate::devices::virtio::testutil::*;
    use crate::devices::virtio::VIRTIO_F_VERSION_1;
    use std::io::Write;

    /// A base image whose byte `i` is `i * 7 % 251` (never zero-filled, so
    /// copy-up mistakes show).
    fn base_image(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8 + 1).collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&data).unwrap();
        f.flush().unwrap();
        (f, data)
    }

    fn merged(disk: &CowDisk) -> Vec<u8> {
        let out = tempfile::tempfile().unwrap();
        assert_eq!(disk.write_merged_to(&out).unwrap(), disk.capacity());
        let mut v = vec![0u8; disk.capacity() as usize];
        out.read_exact_at(&mut v, 0).unwrap();
        v
    }

    #[test]
    fn cow_overlay_never_touches_base() {
        // 5 KiB + 100 bytes: two blocks (the second short) and a partial
        // sector tail that is not part of the disk.
        let (base, mut expect) = base_image(5 * 1024 + 100);
        let orig = std::fs::read(base.path()).unwrap();
        let mut disk = CowDisk::open(base.path()).unwrap();
        assert_eq!(disk.capacity(), 5 * 1024);
        assert_eq!(disk.capacity_sectors(), 10);
        assert_eq!(disk.block_count(), 2);
        expect.truncate(5 * 1024);

        // Partial write inside block 0: copy-up keeps the rest of the block.
        disk.write_at(b"hello", 10).unwrap();
        expect[10..15].copy_from_slice(b"hello");
        // Write spanning the block boundary into the short last block.
        let span = vec![0xabu8; 200];
        disk.write_at(&span, 4000).unwrap();
        expect[4000..4200].copy_from_slice(&span);
        assert_eq!(merged(&disk), expect);
        assert_eq!(disk.dirty_runs(), vec![(0, 2)]);

        let mut b = vec![0u8; BLOCK_SIZE as usize];
        assert_eq!(disk.read_block(1, &mut b).unwrap(), 1024);
        assert_eq!(&b[..1024], &expect[4096..]);
        assert!(disk.read_block(2, &mut b).is_err());
        assert!(disk.write_at(b"x", 5 * 1024).is_err());
        assert!(disk.read_at(&mut [0u8; 2], u64::MAX).is_err());
        disk.flush().unwrap();

        assert_eq!(std::fs::read(base.path()).unwrap(), orig);
    }

    #[test]
    fn merged_disk_leaves_zero_blocks_as_holes() {
        let (base, _) = base_image(64 * 1024);
        let mut disk = CowDisk::open(base.path()).unwrap();
        disk.write_at(&[0u8; 4096], 5 * 4096).unwrap();
        disk.write_at(&[3u8; 512], 15 * 4096).unwrap();
        let out = tempfile::tempfile().unwrap();
        // Stale bytes past the disk are cut off.
        out.write_all_at(&[9u8; 100], 70 * 1024).unwrap();
        assert_eq!(disk.write_merged_to(&out).unwrap(), 64 * 1024);
        assert_eq!(out.metadata().unwrap().len(), 64 * 1024);
        let mut got = vec![0u8; 64 * 1024];
        out.read_exact_at(&mut got, 0).unwrap();
        let mut expect = vec![0u8; 64 * 1024];
        disk.read_at(&mut expect, 0).unwrap();
        assert_eq!(got, expect);
        assert_eq!(&got[5 * 4096..6 * 4096], &[0u8; 4096][..]);
        assert_eq!(&got[15 * 4096..15 * 4096 + 512], &[3u8; 512][..]);
    }

    #[test]
    fn empty_image_is_refused() {
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(CowDisk::open(f.path()), Err(DiskError::TooSmall)));
        assert!(matches!(
            CowDisk::open(Path::new("/nonexistent/disk.img")),
            Err(DiskError::Open { .. })
        ));
    }

    const HDR: u64 = 0x10000;
    const DATA: u64 = 0x11000;
    const STATUS: u64 = 0x30000;

    struct Rig<'a> {
        m: &'a GuestMemoryMmap,
        t: MmioTransport<Block>,
        q: TestQueue<'a>,
        n: u64,
    }

    impl<'a> Rig<'a> {
        fn new(m: &'a GuestMemoryMmap, image: &Path, config: BlockConfig) -> Self {
            let (irq, _) = counting_interrupt();
            let disk = CowDisk::open(image).unwrap();
            let mut t = MmioTransport::new(Block::new(m.clone(), irq, disk, config).unwrap());
            let q = TestQueue::new(m, QUEUE_SIZE, GuestAddress(0x1000));
            assert_ne!(handshake(&mut t, VIRTIO_F_VERSION_1, &[&q]) & DRIVER_OK, 0);
            Self { m, t, q, n: 0 }
        }

        /// Write a request header into a fresh slot; returns (hdr, status).
        fn header(&mut self, ty: u32, sector: u64) -> (u64, u64) {
            let hdr = HDR + self.n * 16;
            let status = STATUS + self.n;
            self.n += 1;
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&ty.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.m.write_slice(&h, GuestAddress(hdr)).unwrap();
            self.m.write_obj(0xeeu8, GuestAddress(status)).unwrap();
            (hdr, status)
        }

        fn submit(&mut self, descs: &[Desc]) -> (u32, u32) {
            let before = self.q.used_idx();
            self.q.add(descs);
            wr(&mut self.t, regs::QUEUE_NOTIFY, 0);
            assert_eq!(self.q.used_idx(), before.wrapping_add(1));
            self.q.used_elem(before)
        }

        fn status(&self, at: u64) -> u8 {
            self.m.read_obj(GuestAddress(at)).unwrap()
        }

        fn read_guest(&self, at: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.m.read_slice(&mut v, GuestAddress(at)).unwrap();
            v
        }
    }

    #[test]
    fn requests_read_write_flush_get_id() {
        let m = mem(0x100000);
        let (base, data) = base_image(64 * 1024);
        let mut r = Rig::new(
            &m,
            base.path(),
            BlockConfig {
                read_only: false,
                id: "smolvm-root".into(),
            },
        );
        // Config space: capacity and seg_max.
        let mut cap = [0u8; 8];
        r.t.read(regs::CONFIG, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 128);
        assert_eq!(rd(&mut r.t, regs::CONFIG + 12), SEG_MAX);

        // Read sectors 2..4 split over two data buffers.
        let (h, s) = r.header(T_IN, 2);
        let (_, len) = r.submit(&[
            Desc::r(h, 16),
            Desc::w(DATA, 512),
            Desc::w(DATA + 0x1000, 512),
            Desc::w(s, 1),
        ]);
        assert_eq!((len, r.status(s)), (1025, S_OK));
        assert_eq!(r.read_guest(DATA, 512), &data[1024..1536]);
        assert_eq!(r.read_guest(DATA + 0x1000, 512), &data[1536..2048]);

        // Write sector 3, read it back.
        m.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        let (h, s) = r.header(T_OUT, 3);
        let (_, len) = r.submit(&[Desc::r(h, 16), Desc::r(DATA, 512), Desc::w(s, 1)]);
        assert_eq!((len, r.status(s)), (1, S_OK));
        let (h, s) = r.header(T_IN, 2);
        r.submit(&[Desc::r(h, 16), Desc::w(DATA + 0x2000, 1024), Desc::w(s, 1)]);
        assert_eq!(r.status(s), S_OK);
        assert_eq!(r.read_guest(DATA + 0x2000, 512), &data[1024..1536]);
        assert_eq!(r.read_guest(DATA + 0x2200, 512), vec![0x5a; 512]);

        let (h, s) = r.header(T_FLUSH, 0);
        let (_, len) = r.submit(&[Desc::r(h, 16), Desc::w(s, 1)]);
        assert_eq!((len, r.status(s)), (1, S_OK));

        let (h, s) = r.header(T_GET_ID, 0);
        let (_, len) = r.submit(&[Desc::r(h, 16), Desc::w(DATA + 0x3000, 20), Desc::w(s, 1)]);
        assert_eq!((len, r.status(s)), (21, S_OK));
        assert_eq!(&r.read_guest(DATA + 0x3000, 12), b"smolvm-root\0");

        let (h, s) = r.header(99, 0);
        r.submit(&[Desc::r(h, 16), Desc::w(s, 1)]);
        assert_eq!(r.status(s), S_UNSUPP);
        assert_eq!(r.t.status() & NEEDS_RESET, 0);
        // The base image is untouched.
        assert_eq!(std::fs::read(base.path()).unwrap(), data);
    }

    #[test]
    fn malformed_requests_get_errors_not_crashes() {
        let m = mem(0x100000);
        let (base, data) = base_image(128 * 1024);
        let mut r = Rig::new(&m, base.path(), BlockConfig::default());

        // Past the end, overflowing sector, unaligned length.
        for (sector, len) in [(255, 1024), (u64::MAX / 256, 512), (0, 100)] {
            let (h, s) = r.header(T_IN, sector);
            r.submit(&[Desc::r(h, 16), Desc::w(DATA, len), Desc::w(s, 1)]);
            assert_eq!(r.status(s), S_IOERR, "sector {sector} len {len}");
        }
        // Write past the end.
        let (h, s) = r.header(T_OUT, 256);
        r.submit(&[Desc::r(h, 16), Desc::r(DATA, 512), Desc::w(s, 1)]);
        assert_eq!(r.status(s), S_IOERR);
        // Wrong direction: read into a device-readable buffer, write from a
        // device-writable one.
        let (h, s) = r.header(T_IN, 0);
        r.submit(&[Desc::r(h, 16), Desc::r(DATA, 512), Desc::w(s, 1)]);
        assert_eq!(r.status(s), S_IOERR);
        let (h, s) = r.header(T_OUT, 0);
        r.submit(&[Desc::r(h, 16), Desc::w(DATA, 512), Desc::w(s, 1)]);
        assert_eq!(r.status(s), S_IOERR);
        // Header in a writable buffer (so no readable header at all).
        let (h, s) = r.header(T_IN, 0);
        r.submit(&[Desc::w(h, 16), Desc::w(s, 1)]);
        assert_eq!(r.status(s), S_IOERR);
        // Short header.
        let (h, s) = r.header(T_IN, 0);
        r.submit(&[Desc::r(h, 8), Desc::w(s, 1)]);
        assert_eq!(r.status(s), S_IOERR);
        // No status byte: completed with nothing written.
        let (h, _) = r.header(T_IN, 0);
        assert_eq!(r.submit(&[Desc::r(h, 16)]).1, 0);
        // Zero-length status buffer.
        let (h, s) = r.header(T_IN, 0);
        assert_eq!(r.submit(&[Desc::r(h, 16), Desc::w(s, 0)]).1, 0);
        assert_eq!(r.status(s), 0xee);
        // Data buffer outside guest memory.
        let (h, s) = r.header(T_IN, 0);
        assert_eq!(
            r.submit(&[Desc::r(h, 16), Desc::w(0xfff0_0000, 512), Desc::w(s, 1)])
                .1,
            0
        );
        // Oversized: a 4 GiB - 1 data buffer (rejected as out of memory).
        let (h, s) = r.header(T_OUT, 0);
        r.submit(&[Desc::r(h, 16), Desc::r(DATA, u32::MAX), Desc::w(s, 1)]);
        assert_eq!(r.status(s), 0xee);
        // The longest chain accepted, then one descriptor more.
        for extra in [0u64, 1] {
            let (h, s) = r.header(T_IN, 0);
            let segs = MAX_DESCS as u64 - 2 + extra;
            let mut descs = vec![Desc::r(h, 16)];
            descs.extend((0..segs).map(|i| Desc::w(DATA + (i % 16) * 512, 512)));
            descs.push(Desc::w(s, 1));
            let (_, len) = r.submit(&descs);
            if extra == 0 {
                assert_eq!((len, r.status(s)), (segs as u32 * 512 + 1, S_OK));
            } else {
                assert_eq!((len, r.status(s)), (0, 0xee));
            }
        }

        assert_eq!(r.t.status() & NEEDS_RESET, 0);
        assert_eq!(std::fs::read(base.path()).unwrap(), data);
    }

    #[test]
    fn reads_longer_than_a_used_length_fail_without_io() {
        // A sparse disk larger than 4 GiB, so the disk range check alone would
        // pass, and 2 GiB of untouched guest memory named twice by the data-in
        // buffers: 4 GiB of data-in, past what a used length can count. Such a
        // chain never comes out of `Chain::parse`; the device must not rely on
        // that.
        let base = tempfile::NamedTempFile::new().unwrap();
        base.as_file().set_len(5 << 30).unwrap();
        let mut disk = CowDisk::open(base.path()).unwrap();
        let m = mem(1 << 31);
        let (hdr, status) = (0x1000u64, 0x2000u64);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&T_IN.to_le_bytes());
        m.write_slice(&h, GuestAddress(hdr)).unwrap();
        m.write_obj(0xeeu8, GuestAddress(status)).unwrap();
        let seg = |addr: u64, len: u32| Segment {
            addr: GuestAddress(addr),
            len,
        };
        let mut scratch = vec![0u8; COPY_CHUNK];
        let config = BlockConfig::default();
        for data in [
            vec![seg(0, 1 << 31), seg(0, 1 << 31)],
            // Exactly u32::MAX: no room left for the status byte.
            vec![seg(0, 1 << 31), seg(0, (1 << 31) - 1)],
        ] {
            let mut writable = data;
            writable.push(seg(status, 1));
            let chain = Chain {
                readable: vec![seg(hdr, 16)],
                writable,
            };
            let used = handle_request(&mut disk, &config, &mut scratch, &m, &chain);
            assert_eq!(
                (used, m.read_obj::<u8>(GuestAddress(status)).unwrap()),
                (1, S_IOERR)
            );
            m.write_obj(0xeeu8, GuestAddress(status)).unwrap();
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Whatever the guest puts in its descriptor table, avail ring and
        /// request buffers, the device neither panics nor touches the base
        /// image, and every completion it publishes names a valid head.
        #[test]
        fn arbitrary_guest_memory_is_harmless(
            table in proptest::collection::vec(proptest::prelude::any::<u8>(), 16 * 16),
            heads in proptest::collection::vec(0u16..20, 1..20),
            headers in proptest::collection::vec(proptest::prelude::any::<u8>(), 0x400),
        ) {
            let m = mem(0x20000);
            let (base, data) = base_image(16 * 1024);
            let (irq, _) = counting_interrupt();
            let disk = CowDisk::open(base.path()).unwrap();
            let mut t = MmioTransport::new(
                Block::new(m.clone(), irq, disk, BlockConfig::default()).unwrap(),
            );
            let mut q = TestQueue::new(&m, 16, GuestAddress(0x1000));
            handshake(&mut t, VIRTIO_F_VERSION_1, &[&q]);
            // Descriptors point anywhere (mostly outside the 128 KiB); the
            // low 0x400 bytes hold fuzzed request headers.
            m.write_slice(&table, q.desc).unwrap();
            m.write_slice(&headers, GuestAddress(0)).unwrap();
            for h in &heads {
                q.publish(*h);
            }
            wr(&mut t, regs::QUEUE_NOTIFY, 0);
            let used = q.used_idx();
            proptest::prop_assert!(usize::from(used) <= heads.len());
            for i in 0..used {
                proptest::prop_assert!(q.used_elem(i).0 < 16);
            }
            proptest::prop_assert_eq!(std::fs::read(base.path()).unwrap(), data);
        }
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let m = mem(0x100000);
        let (base, _) = base_image(8 * 1024);
        let mut r = Rig::new(
            &m,
            base.path(),
            BlockConfig {
                read_only: true,
                id: String::new(),
            },
        );
        wr(&mut r.t, regs::DEVICE_FEATURES_SEL, 0);
        assert_ne!(u64::from(rd(&mut r.t, regs::DEVICE_FEATURES)) & F_RO, 0);
        let (h, s) = r.header(T_OUT, 0);
        r.submit(&[Desc::r(h, 16), Desc::r(DATA, 512), Desc::w(s, 1)]);
        assert_eq!(r.status(s), S_IOERR);
        assert!(r.t.device().disk().dirty_runs().is_empty());
    }

    #[test]
    fn save_restore_mid_stream() {
        let m = mem(0x100000);
        let (base, data) = base_image(32 * 1024);
        let mut r = Rig::new(&m, base.path(), BlockConfig::default());
        m.write_slice(&[0x77; 1024], GuestAddress(DATA)).unwrap();
        let (h, s) = r.header(T_OUT, 9);
        r.submit(&[Desc::r(h, 16), Desc::r(DATA, 1024), Desc::w(s, 1)]);
        assert_eq!(r.status(s), S_OK);
        // A read request is posted but not yet notified when the snapshot is
        // taken.
        let (h, s) = r.header(T_IN, 8);
        r.q.add(&[Desc::r(h, 16), Desc::w(DATA + 0x4000, 2048), Desc::w(s, 1)]);

        let state = r.t.save().unwrap();
        // A resume gets the merged disk as the base of a fresh overlay.
        let merged_file = tempfile::tempfile().unwrap();
        r.t.device().disk().write_merged_to(&merged_file).unwrap();
        let bytes = postcard::to_allocvec(&state).unwrap();
        let state: MmioDeviceState<BlockState> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(state.device.common.queues[0].next_avail, 1);

        let (irq, count) = counting_interrupt();
        let disk = CowDisk::from_base(merged_file).unwrap();
        let mut t = MmioTransport::<Block>::restore(
            BlockArgs {
                mem: m.clone(),
                interrupt: irq,
                disk,
            },
            &state,
        )
        .unwrap();
        wr(&mut t, regs::QUEUE_NOTIFY, 0);
        assert_eq!(r.q.used_idx(), 2);
        assert_eq!(r.q.used_elem(1), (3, 2049));
        assert_eq!(r.status(s), S_OK);
        let got = r.read_guest(DATA + 0x4000, 2048);
        assert_eq!(&got[..512], &data[4096..4608]);
        assert_eq!(&got[512..1536], &[0x77; 1024][..]);
        assert_eq!(&got[1536..], &data[5632..6144]);
        assert!(count.count() >= 1);

        // Restoring onto a disk of another size is refused.
        let (small, _) = base_image(4096);
        let (irq, _) = counting_interrupt();
        let err = MmioTransport::<Block>::restore(
            BlockArgs {
                mem: m.clone(),
                interrupt: irq,
                disk: CowDisk::open(small.path()).unwrap(),
            },
            &state,
        );
        assert!(err.is_err());

        // The merged export equals what the guest sees.
        let img = merged(t.device().disk());
        assert_eq!(img.len(), 32 * 1024);
        assert_eq!(&img[4608..5632], &[0x77; 1024][..]);
        assert_eq!(&img[..4608], &data[..4608]);
    }
}
