//! Guest memory.
//!
//! A boot gets fresh anonymous memory. A resume maps the memory section of a
//! `.smolmachine` copy-on-write: each region is reserved as anonymous memory
//! (its zero runs stay that way) and every non-zero run is mapped
//! `MAP_PRIVATE | MAP_FIXED` from the file over it. Nothing is read up front
//! and guest writes never reach the file; the file must not be modified while
//! a machine maps it (untouched private pages still show the file's bytes).
//! A compressed memory section cannot be mapped; it is expanded into
//! anonymous memory instead.
//!
//! The regions are `vm-memory` `MmapRegion`s that own the whole reservation,
//! so dropping the last reference unmaps the file runs with it.

use std::fs::File;
use std::os::unix::io::AsRawFd;

use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};

/// Errors from setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A region or run description is inconsistent (corrupt machine file).
    #[error("bad memory layout: {0}")]
    BadLayout(String),
    /// Reserving or mapping memory failed.
    #[error("cannot map guest memory: {0}")]
    Mmap(std::io::Error),
    /// vm-memory refused the regions.
    #[error("cannot build guest memory: {0}")]
    Build(String),
    /// An access outside guest memory.
    #[error("guest address {0:#x} is outside guest memory")]
    OutOfRange(u64),
    /// More guest memory than a machine may have.
    #[error(transparent)]
    TooLarge(smolvm_formats::Error),
}

/// Refuse regions adding up to more than the machine file limit, before any
/// reservation.
fn check_total(sizes: impl Iterator<Item = u64>) -> Result<(), MemoryError> {
    let total = sizes.fold(0u64, u64::saturating_add);
    if total > smolvm_formats::MAX_GUEST_MEMORY {
        return Err(MemoryError::TooLarge(
            smolvm_formats::Error::GuestMemoryTooLarge(total),
        ));
    }
    Ok(())
}

/// One run of a region, as stored in a machine file: `len` bytes at `offset`
/// within the region, either zero (`file_offset == None`) or stored at an
/// absolute `file_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub offset: u64,
    pub len: u64,
    pub file_offset: Option<u64>,
}

/// One `mmap` of the file into a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMap {
    /// Offset within the region.
    pub offset: u64,
    pub len: u64,
    /// Absolute offset in the file.
    pub file_offset: u64,
}

/// Plan the file mappings of one region of `region_size` bytes from its runs.
///
/// Runs must be sorted, cover the region exactly, and be page-aligned (offset,
/// length and file offset); each file run must lie inside `file_len`. Adjacent
/// runs that are also adjacent in the file are merged into one mapping.
pub fn plan_region(
    region_size: u64,
    runs: &[Run],
    file_len: u64,
    page_size: u64,
) -> Result<Vec<FileMap>, MemoryError> {
    let bad = |m: String| Err(MemoryError::BadLayout(m));
    if region_size == 0 || !region_size.is_multiple_of(page_size) {
        return bad(format!(
            "region size {region_size:#x} is not a non-zero page multiple"
        ));
    }
    let mut plan: Vec<FileMap> = Vec::new();
    let mut next = 0u64;
    for run in runs {
        if run.offset != next {
            return bad(format!(
                "run at {:#x} leaves a gap or overlaps (expected {next:#x})",
                run.offset
            ));
        }
        if run.len == 0 || !run.len.is_multiple_of(page_size) {
            return bad(format!(
                "run at {:#x} has length {:#x}, not a page multiple",
                run.offset, run.len
            ));
        }
        next = match run.offset.checked_add(run.len) {
            Some(end) if end <= region_size => end,
            _ => {
                return bad(format!(
                    "run at {:#x} runs past the region end {region_size:#x}",
                    run.offset
                ))
            }
        };
        let Some(fo) = run.file_offset else { continue };
        if !fo.is_multiple_of(page_size) {
            return bad(format!("file offset {fo:#x} is not page aligned"));
        }
        if fo.checked_add(run.len).is_none_or(|end| end > file_len) {
            return bad(format!(
                "run at file offset {fo:#x} (+{:#x}) is past the end of the file",
                run.len
            ));
        }
        match plan.last_mut() {
            Some(last)
                if last.offset + last.len == run.offset && last.file_offset + last.len == fo =>
            {
                last.len += run.len;
            }
            _ => plan.push(FileMap {
                offset: run.offset,
                len: run.len,
                file_offset: fo,
            }),
        }
    }
    if next != region_size {
        return bad(format!("runs cover {next:#x} of {region_size:#x} bytes"));
    }
    Ok(plan)
}

/// The host page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        4096
    }
}

/// How a region got its contents (for diagnostics and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Fresh anonymous memory.
    Anonymous,
    /// Anonymous reservation with `maps` private file mappings over it.
    File { maps: usize },
    /// Expanded from a compressed section into anonymous memory.
    Expanded,
}

/// The machine's guest memory.
#[derive(Clone)]
pub struct GuestMemory {
    mem: GuestMemoryMmap,
    backing: Vec<Backing>,
}

fn reserve(size: u64) -> Result<MmapRegion, MemoryError> {
    let size =
        usize::try_from(size).map_err(|_| MemoryError::BadLayout("region too large".into()))?;
    vm_memory::mmap::MmapRegionBuilder::new(size)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| MemoryError::Mmap(std::io::Error::other(e.to_string())))
}

impl GuestMemory {
    fn assemble(
        regions: Vec<(u64, MmapRegion)>,
        backing: Vec<Backing>,
    ) -> Result<Self, MemoryError> {
        let regions = regions
            .into_iter()
            .map(|(addr, r)| {
                GuestRegionMmap::new(r, GuestAddress(addr))
                    .ok_or_else(|| MemoryError::BadLayout(format!("region at {addr:#x} wraps")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| MemoryError::Build(e.to_string()))?;
        Ok(GuestMemory { mem, backing })
    }

    /// Fresh zeroed memory for `(guest_addr, size)` regions.
    pub fn anonymous(regions: &[(u64, u64)]) -> Result<Self, MemoryError> {
        check_total(regions.iter().map(|r| r.1))?;
        let maps = regions
            .iter()
            .map(|&(a, s)| reserve(s).map(|r| (a, r)))
            .collect::<Result<Vec<_>, _>>()?;
        Self::assemble(maps, vec![Backing::Anonymous; regions.len()])
    }

    /// Map regions from `file`: each `(guest_addr, size, runs)` per
    /// [`plan_region`], copy-on-write.
    pub fn map_file(file: &File, regions: &[(u64, u64, Vec<Run>)]) -> Result<Self, MemoryError> {
        check_total(regions.iter().map(|r| r.1))?;
        let file_len = file.metadata().map_err(MemoryError::Mmap)?.len();
        let page = page_size();
        let plans = regions
            .iter()
            .map(|(_, size, runs)| plan_region(*size, runs, file_len, page))
            .collect::<Result<Vec<_>, _>>()?;
        let mut maps = Vec::with_capacity(regions.len());
        let mut backing = Vec::with_capacity(regions.len());
        for ((addr, size, _), plan) in regions.iter().zip(plans) {
            let region = reserve(*size)?;
            for m in &plan {
                let file_offset = libc::off_t::try_from(m.file_offset)
                    .map_err(|_| MemoryError::BadLayout("file offset too large".into()))?;
                // SAFETY: the target range lies inside `region`'s reservation
                // (checked by plan_region) which no one else references yet;
                // MAP_FIXED replaces those anonymous pages with a private
                // (copy-on-write) mapping of the file, so the file is never written.
                let p = unsafe {
                    libc::mmap(
                        region.as_ptr().add(m.offset as usize).cast(),
                        m.len as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                        file.as_raw_fd(),
                        file_offset,
                    )
                };
                if p == libc::MAP_FAILED {
                    return Err(MemoryError::Mmap(std::io::Error::last_os_error()));
                }
            }
            backing.push(Backing::File { maps: plan.len() });
            maps.push((*addr, region));
        }
        Self::assemble(maps, backing)
    }

    /// Anonymous regions filled by `fill(index, bytes)` (a compressed section
    /// expanded in place).
    pub fn expanded<E>(
        regions: &[(u64, u64)],
        mut fill: impl FnMut(usize, &mut [u8]) -> Result<(), E>,
    ) -> Result<Self, E>
    where
        E: From<MemoryError>,
    {
        let mut me = Self::anonymous(regions)?;
        for (i, r) in me.mem.iter().enumerate() {
            // SAFETY: the region was just created, nothing else references it,
            // and the slice covers exactly its mapping.
            let bytes = unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), r.len() as usize) };
            fill(i, bytes)?;
        }
        me.backing = vec![Backing::Expanded; regions.len()];
        Ok(me)
    }

    /// The vm-memory view, for devices.
    pub fn mmap(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// How each region is backed.
    pub fn backing(&self) -> &[Backing] {
        &self.backing
    }

    /// `(guest_addr, host_ptr, size)` of each region, for memory slots.
    pub fn host_regions(&self) -> Vec<(u64, *mut u8, u64)> {
        self.mem
            .iter()
            .map(|r| (r.start_addr().0, r.as_ptr(), r.len()))
            .collect()
    }

    /// Each region's bytes, for writing a snapshot.
    ///
    /// # Safety
    /// No vCPU or device may write guest memory while the slices live
    /// (the machine is paused).
    pub unsafe fn region_slices(&self) -> Vec<(u64, &[u8])> {
        self.mem
            .iter()
            .map(|r| {
                // SAFETY: the mapping is live for &self and the caller rules out writers.
                let s = unsafe {
                    std::slice::from_raw_parts(r.as_ptr() as *const u8, r.len() as usize)
                };
                (r.start_addr().0, s)
            })
            .collect()
    }

    /// Copy guest memory at `addr` into `buf`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        use vm_memory::Bytes;
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| MemoryError::OutOfRange(addr))
    }

    /// Copy `buf` into guest memory at `addr`.
    pub fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemoryError> {
        use vm_memory::Bytes;
        self.mem
            .write_slice(buf, GuestAddress(addr))
            .map_err(|_| MemoryError::OutOfRange(addr))
    }

    /// Read a little-endian u64.
    pub fn read_u64(&self, addr: u64) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// `(guest_addr, size)` of each region.
    pub fn layout(&self) -> Vec<(u64, u64)> {
        self.mem
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const P: u64 = 4096;

    fn run(offset: u64, len: u64, file_offset: Option<u64>) -> Run {
        Run {
            offset,
            len,
            file_offset,
        }
    }

    #[test]
    fn plans_and_merges_file_runs() {
        let runs = [
            run(0, P, Some(0x10000)),
            run(P, 2 * P, Some(0x11000)),
            run(3 * P, P, None),
            run(4 * P, P, Some(0x20000)),
        ];
        let plan = plan_region(5 * P, &runs, 0x30000, P).unwrap();
        assert_eq!(
            plan,
            vec![
                FileMap {
                    offset: 0,
                    len: 3 * P,
                    file_offset: 0x10000
                },
                FileMap {
                    offset: 4 * P,
                    len: P,
                    file_offset: 0x20000
                },
            ]
        );
        // All zero: nothing to map.
        assert!(plan_region(2 * P, &[run(0, 2 * P, None)], 0, P)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn refuses_bad_runs() {
        let cases: Vec<(u64, Vec<Run>)> = vec![
            (2 * P, vec![run(0, P, None)]),                      // short
            (2 * P, vec![run(0, P, None), run(2 * P, P, None)]), // gap / past end
            (2 * P, vec![run(0, 2 * P, None), run(P, P, None)]), // overlap
            (P, vec![run(0, 100, None)]),                        // unaligned length
            (P, vec![run(0, P, Some(12))]),                      // unaligned file offset
            (P, vec![run(0, P, Some(0x100000))]),                // past file end
            (P, vec![run(0, P, Some(u64::MAX - 4095))]),         // overflow
            (0, vec![]),                                         // empty region
            (P, vec![run(0, u64::MAX - 4095, None)]),            // huge
        ];
        for (size, runs) in cases {
            assert!(
                plan_region(size, &runs, 0x10000, P).is_err(),
                "accepted {size:#x} {runs:?}"
            );
        }
    }

    #[test]
    fn maps_file_private_and_zero_runs_anonymous() {
        let mut f = tempfile::tempfile().unwrap();
        let mut content = vec![0u8; 3 * P as usize];
        content[..P as usize].fill(0xaa);
        content[2 * P as usize..].fill(0xbb);
        f.write_all(&content).unwrap();
        let runs = vec![
            run(0, P, Some(0)),
            run(P, P, None),
            run(2 * P, P, Some(2 * P)),
        ];
        let mem = GuestMemory::map_file(&f, &[(0x1000_0000, 3 * P, runs)]).unwrap();
        assert_eq!(mem.backing(), &[Backing::File { maps: 2 }]);
        let mut b = [0u8; 1];
        mem.read(0x1000_0000, &mut b).unwrap();
        assert_eq!(b, [0xaa]);
        mem.read(0x1000_0000 + P, &mut b).unwrap();
        assert_eq!(b, [0]);
        mem.read(0x1000_0000 + 2 * P + 7, &mut b).unwrap();
        assert_eq!(b, [0xbb]);
        mem.write(0x1000_0000, &[1, 2, 3]).unwrap();
        mem.write(0x1000_0000 + P, &[4]).unwrap();
        drop(mem);
        let mut after = Vec::new();
        use std::io::{Read, Seek};
        f.rewind().unwrap();
        f.read_to_end(&mut after).unwrap();
        assert_eq!(after, content, "guest writes reached the file");
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    #[test]
    fn more_than_the_guest_memory_limit_is_refused_before_reserving() {
        // Two regions of 3 TiB: refused by the sum, not by a failed mmap.
        let tib = 1u64 << 40;
        let err = GuestMemory::anonymous(&[(0, 3 * tib), (3 * tib, 3 * tib)])
            .err()
            .expect("6 TiB of guest memory accepted");
        assert_eq!(
            err.to_string(),
            "machine claims 6144 GiB of guest memory, more than the 1024 GiB limit"
        );
        let f = tempfile::tempfile().unwrap();
        assert!(matches!(
            GuestMemory::map_file(&f, &[(0, 2 * tib, Vec::new())]),
            Err(MemoryError::TooLarge(_))
        ));
        let err = GuestMemory::expanded(&[(0, 2 * tib)], |_, _| Ok::<(), MemoryError>(()))
            .err()
            .expect("2 TiB expanded");
        assert!(matches!(err, MemoryError::TooLarge(_)), "{err}");
    }
}
