//! Positioned, bounds-checked reads from a file or an in-memory buffer.
//!
//! The reader never seeks a shared cursor, so one `File` can be read from several places (and
//! mapped by the VMM) at once; the in-memory impls let tests and the fuzzer run without files.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use xxhash_rust::xxh3::Xxh3;

use crate::error::{Error, Result};

/// A source of bytes addressed by absolute offset.
pub trait ReadAt {
    /// Reads up to `buf.len()` bytes at `offset`; `Ok(0)` means end of data.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Total length of the source in bytes.
    fn size(&self) -> io::Result<u64>;
}

impl ReadAt for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl ReadAt for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let Ok(start) = usize::try_from(offset) else {
            return Ok(0);
        };
        let Some(avail) = self.get(start..) else {
            return Ok(0);
        };
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        Ok(n)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl ReadAt for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.as_slice().read_at(buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        (**self).read_at(buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
}

/// Fills `buf` from `offset` or fails; a short source is reported as truncation.
pub(crate) fn read_exact_at<S: ReadAt + ?Sized>(
    src: &S,
    mut buf: &mut [u8],
    mut offset: u64,
    what: &str,
) -> Result<()> {
    while !buf.is_empty() {
        match src.read_at(buf, offset) {
            Ok(0) => {
                return Err(Error::corrupt(format!(
                    "{what} is truncated at byte {offset}"
                )))
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset = offset.saturating_add(n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(format!("reading {what}"), e)),
        }
    }
    Ok(())
}

/// Chunk size for streaming reads (hashing, copying).
pub(crate) const CHUNK: usize = 1 << 20;

/// Hashes `len` bytes at `offset` with xxh3-64, streaming through a bounded buffer.
///
/// `visit` sees every chunk with its absolute offset (used to hash sub-ranges in the same pass).
pub(crate) fn hash_range<S: ReadAt + ?Sized>(
    src: &S,
    offset: u64,
    len: u64,
    what: &str,
    mut visit: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<u64> {
    let mut hasher = Xxh3::new();
    let mut buf = vec![0u8; CHUNK.min(usize::try_from(len).unwrap_or(CHUNK))];
    let mut pos = 0u64;
    while pos < len {
        let n = usize::try_from(len - pos).unwrap_or(CHUNK).min(buf.len());
        let at = offset
            .checked_add(pos)
            .ok_or_else(|| Error::corrupt(format!("{what} offset overflows")))?;
        read_exact_at(src, &mut buf[..n], at, what)?;
        hasher.update(&buf[..n]);
        visit(at, &buf[..n])?;
        pos += n as u64;
    }
    Ok(hasher.digest())
}

/// A `std::io::Read` over `[start, end)` of a `ReadAt` source, for streaming decoders.
pub(crate) struct RangeReader<'a, S: ReadAt + ?Sized> {
    pub(crate) src: &'a S,
    pub(crate) pos: u64,
    pub(crate) end: u64,
    /// Hash of every byte handed out, to check a stored checksum after decoding.
    pub(crate) hasher: Xxh3,
}

impl<'a, S: ReadAt + ?Sized> RangeReader<'a, S> {
    pub(crate) fn new(src: &'a S, start: u64, len: u64) -> Self {
        RangeReader {
            src,
            pos: start,
            end: start.saturating_add(len),
            hasher: Xxh3::new(),
        }
    }

    /// Reads (and hashes) whatever the decoder left unread, returning the digest of the range.
    pub(crate) fn drain_digest(&mut self) -> io::Result<u64> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = io::Read::read(self, &mut buf)?;
            if n == 0 {
                return Ok(self.hasher.digest());
            }
        }
    }
}

impl<S: ReadAt + ?Sized> io::Read for RangeReader<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        if n == 0 {
            return Ok(0);
        }
        let got = self.src.read_at(&mut buf[..n], self.pos)?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "compressed data is truncated",
            ));
        }
        self.hasher.update(&buf[..got]);
        self.pos += got as u64;
        Ok(got)
    }
}
