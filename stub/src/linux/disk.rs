//! A disk section read in place: the base of a resumed machine's disk is
//! the `.smolmachine` itself, read through the section's run map (data runs
//! at their file offsets, zero runs as zeros). Nothing is extracted, and the
//! file is only ever read.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use smolvm_formats::DiskLayout;

use crate::devices::virtio::block::DiskBase;

/// One run: `len` bytes at disk `offset`, stored at `file_offset` or zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    offset: u64,
    len: u64,
    file_offset: Option<u64>,
}

/// Errors from a disk layout that cannot be read in place.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RunMapError {
    /// Compressed sections have no file offsets to read from.
    #[error("disk '{0}' is compressed; expand the machine first")]
    NotMappable(String),
    /// The runs do not tile the disk or point outside the file.
    #[error("disk '{name}' has a bad run map: {why}")]
    BadRuns { name: String, why: String },
}

/// A read-only disk made of the runs of a disk section.
pub struct RunMapDisk {
    file: Arc<File>,
    size: u64,
    runs: Vec<Run>,
}

impl RunMapDisk {
    /// Check `layout` (sorted runs tiling `0..size`, data inside a file of
    /// `file_len` bytes) and serve it from `file`.
    pub fn new(file: Arc<File>, file_len: u64, layout: &DiskLayout) -> Result<Self, RunMapError> {
        let bad = |why: String| RunMapError::BadRuns {
            name: layout.name.clone(),
            why,
        };
        if !layout.mappable {
            return Err(RunMapError::NotMappable(layout.name.clone()));
        }
        let mut next = 0u64;
        let mut runs = Vec::with_capacity(layout.runs.len());
        for r in &layout.runs {
            if r.offset != next || r.len == 0 {
                return Err(bad(format!("run at {:#x} is out of place", r.offset)));
            }
            next = r
                .offset
                .checked_add(r.len)
                .filter(|&e| e <= layout.size)
                .ok_or_else(|| bad(format!("run at {:#x} passes the disk end", r.offset)))?;
            let file_offset = match (r.zero, r.file_offset) {
                (true, _) => None,
                (false, Some(fo)) => {
                    if fo.checked_add(r.len).is_none_or(|e| e > file_len) {
                        return Err(bad(format!(
                            "run at {:#x} is stored past the end of the file (truncated?)",
                            r.offset
                        )));
                    }
                    Some(fo)
                }
                (false, None) => return Err(bad(format!("run at {:#x} has no data", r.offset))),
            };
            runs.push(Run {
                offset: r.offset,
                len: r.len,
                file_offset,
            });
        }
        if next != layout.size {
            return Err(bad(format!(
                "runs cover {next:#x} of {:#x} bytes",
                layout.size
            )));
        }
        Ok(RunMapDisk {
            file,
            size: layout.size,
            runs,
        })
    }
}

impl DiskBase for RunMapDisk {
    fn size(&self) -> io::Result<u64> {
        Ok(self.size)
    }

    fn read_base_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "read past disk end"))?;
        let mut pos = offset;
        // The run holding `pos`: the last one starting at or before it.
        let mut i = self
            .runs
            .partition_point(|r| r.offset <= pos)
            .saturating_sub(1);
        while pos < end {
            let r = self
                .runs
                .get(i)
                .ok_or_else(|| io::Error::other("run map ended early"))?;
            let within = pos - r.offset;
            let n = (r.len - within).min(end - pos) as usize;
            let at = (pos - offset) as usize;
            let dst = &mut buf[at..at + n];
            match r.file_offset {
                Some(fo) => self.file.read_exact_at(dst, fo + within)?,
                None => dst.fill(0),
            }
            pos += n as u64;
            i += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smolvm_formats::MemRun;
    use std::io::Write;

    fn run(offset: u64, len: u64, file_offset: Option<u64>) -> MemRun {
        MemRun {
            offset,
            len,
            file_offset,
            zero: file_offset.is_none(),
        }
    }

    fn layout(size: u64, runs: Vec<MemRun>) -> DiskLayout {
        DiskLayout {
            section: 0,
            name: "root".into(),
            size,
            mappable: true,
            granule: 4096,
            runs,
        }
    }

    #[test]
    fn reads_data_and_zero_runs() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8 + 1).collect();
        f.write_all(&data).unwrap();
        let file = Arc::new(f);
        // Disk: 4 KiB data (file 4096..), 4 KiB zero, 1000 bytes data (file 0..).
        let l = layout(
            9192,
            vec![
                run(0, 4096, Some(4096)),
                run(4096, 4096, None),
                run(8192, 1000, Some(0)),
            ],
        );
        let d = RunMapDisk::new(file.clone(), 8192, &l).unwrap();
        let mut all = vec![0xeeu8; 9192];
        d.read_base_at(&mut all, 0).unwrap();
        assert_eq!(&all[..4096], &data[4096..]);
        assert!(all[4096..8192].iter().all(|&b| b == 0));
        assert_eq!(&all[8192..], &data[..1000]);
        let mut mid = vec![0xeeu8; 10];
        d.read_base_at(&mut mid, 4090).unwrap();
        assert_eq!(&mid[..6], &data[8186..8192]);
        assert_eq!(&mid[6..], &[0; 4]);
        assert!(d.read_base_at(&mut mid, 9190).is_err());
        // Damaged maps are refused.
        for bad in [
            layout(9192, vec![run(0, 4096, Some(4096))]),
            layout(8192, vec![run(0, 4096, Some(6000)), run(4096, 4096, None)]),
            layout(8192, vec![run(4096, 4096, None), run(0, 4096, None)]),
        ] {
            assert!(RunMapDisk::new(file.clone(), 8192, &bad).is_err());
        }
    }
}
