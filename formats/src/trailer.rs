//! Packed executables: `stub ‖ zero padding ‖ .smolmachine ‖ trailer`.
//!
//! The trailer is a fixed 64-byte record at the very end of the file, so the stub finds its
//! payload by reading the last 64 bytes of `/proc/self/exe`. The payload starts 64 KiB
//! aligned, which keeps every aligned offset inside the `.smolmachine` aligned in the
//! executable too, so guest memory maps straight from the executable.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use goblin::container::Ctx;
use goblin::elf::program_header::ProgramHeader;
use goblin::elf::section_header::{SectionHeader, SHT_NOBITS};
use goblin::elf::Elf;
use xxhash_rust::xxh3::xxh3_64;

use crate::atomic::AtomicFile;
use crate::error::{Error, Result};
use crate::layout::{put, u32_at, u64_at, HEADER_LEN};
use crate::reader::MachineReader;
use crate::source::{read_exact_at, ReadAt};
use crate::DATA_ALIGN;

/// First eight bytes of the trailer.
pub const TRAILER_MAGIC: [u8; 8] = *b"SMOLPACK";
/// Trailer layout version; readers reject others.
pub const TRAILER_VERSION: u32 = 1;
/// Size of the trailer record.
pub const TRAILER_LEN: u64 = 64;

/// Where the `.smolmachine` payload sits inside a packed executable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    /// Absolute, 64 KiB aligned offset of the payload.
    pub payload_offset: u64,
    /// Length of the payload; it ends where the trailer begins.
    pub payload_len: u64,
    /// Length of the stub before the zero padding.
    pub stub_len: u64,
}

impl Trailer {
    /// Encodes the record; bytes 56..64 are xxh3-64 of bytes 0..56.
    pub fn encode(&self) -> [u8; TRAILER_LEN as usize] {
        let mut b = [0u8; TRAILER_LEN as usize];
        put(&mut b, 0, &TRAILER_MAGIC);
        put(&mut b, 8, &TRAILER_VERSION.to_le_bytes());
        put(&mut b, 16, &self.payload_offset.to_le_bytes());
        put(&mut b, 24, &self.payload_len.to_le_bytes());
        put(&mut b, 32, &self.stub_len.to_le_bytes());
        let sum = xxh3_64(&b[..56]);
        put(&mut b, 56, &sum.to_le_bytes());
        b
    }
}

/// Finds the payload of a packed executable; `Ok(None)` when the file has no trailer.
pub fn locate(file: &File) -> Result<Option<Trailer>> {
    locate_in(file)
}

/// [`locate`] over any positioned source.
pub fn locate_in<S: ReadAt + ?Sized>(src: &S) -> Result<Option<Trailer>> {
    let len = src.size().map_err(|e| Error::io("reading file size", e))?;
    if len < TRAILER_LEN {
        return Ok(None);
    }
    let mut b = [0u8; TRAILER_LEN as usize];
    read_exact_at(src, &mut b, len - TRAILER_LEN, "trailer")?;
    if b[..8] != TRAILER_MAGIC {
        return Ok(None);
    }
    if xxh3_64(&b[..56]) != u64_at(&b, 56) {
        return Err(Error::ChecksumMismatch("packed-executable trailer".into()));
    }
    let version = u32_at(&b, 8);
    if version != TRAILER_VERSION {
        return Err(Error::UnsupportedVersion {
            what: "packed-executable trailer",
            found: version,
            supported: TRAILER_VERSION,
        });
    }
    let t = Trailer {
        payload_offset: u64_at(&b, 16),
        payload_len: u64_at(&b, 24),
        stub_len: u64_at(&b, 32),
    };
    let ok = t.payload_offset.is_multiple_of(DATA_ALIGN)
        && t.stub_len <= t.payload_offset
        && t.payload_len >= HEADER_LEN
        && t.payload_offset.checked_add(t.payload_len) == Some(len - TRAILER_LEN);
    if !ok {
        return Err(Error::corrupt(
            "trailer points outside the executable or at an unaligned payload",
        ));
    }
    Ok(Some(t))
}

/// Most section headers we read when the count is stored out of line (`e_shnum == 0`).
const MAX_ELF_SECTIONS: u64 = 1 << 18;

/// End of the ELF image in `src`: the furthest byte any header, segment or section covers.
/// Everything past it (e.g. an appended payload) is invisible to the loader and to `strip`.
pub fn elf_extent<S: ReadAt + ?Sized>(src: &S) -> Result<u64> {
    let len = src.size().map_err(|e| Error::io("reading stub size", e))?;
    let mut hb = [0u8; 64];
    let n = (len.min(64)) as usize;
    read_exact_at(src, &mut hb[..n], 0, "ELF header")?;
    if n < 16 || hb[..4] != *b"\x7fELF" {
        return Err(Error::Elf("no ELF header".into()));
    }
    let h = Elf::parse_header(&hb).map_err(|e| Error::Elf(e.to_string()))?;
    let container = h.container().map_err(|e| Error::Elf(e.to_string()))?;
    let endian = h.endianness().map_err(|e| Error::Elf(e.to_string()))?;
    let ctx = Ctx::new(container, endian);
    let oob = || Error::Elf("headers point past the end of the file".into());
    let mut extent = u64::from(h.e_ehsize);

    let read_table = |off: u64, count: u64, entsize: u64| -> Result<Vec<u8>> {
        let bytes = count.checked_mul(entsize).ok_or_else(oob)?;
        let end = off.checked_add(bytes).ok_or_else(oob)?;
        if end > len {
            return Err(oob());
        }
        let mut buf = vec![0u8; bytes as usize];
        read_exact_at(src, &mut buf, off, "ELF header table")?;
        Ok(buf)
    };

    if h.e_phnum > 0 {
        if usize::from(h.e_phentsize) != ProgramHeader::size(ctx) {
            return Err(Error::Elf("unexpected program header size".into()));
        }
        let buf = read_table(h.e_phoff, h.e_phnum.into(), h.e_phentsize.into())?;
        extent = extent.max(h.e_phoff + buf.len() as u64);
        let phs = ProgramHeader::parse(&buf, 0, h.e_phnum.into(), ctx)
            .map_err(|e| Error::Elf(e.to_string()))?;
        for p in phs {
            let end = p.p_offset.checked_add(p.p_filesz).ok_or_else(oob)?;
            extent = extent.max(end);
        }
    }
    if h.e_shoff != 0 {
        if usize::from(h.e_shentsize) != SectionHeader::size(ctx) {
            return Err(Error::Elf("unexpected section header size".into()));
        }
        let entsize = u64::from(h.e_shentsize);
        let mut count = u64::from(h.e_shnum);
        if count == 0 {
            // The real count lives in the first section header's sh_size.
            let first = read_table(h.e_shoff, 1, entsize)?;
            let sh = SectionHeader::parse_from(&first, 0, 1, ctx)
                .map_err(|e| Error::Elf(e.to_string()))?;
            count = sh.first().map(|s| s.sh_size).unwrap_or(0);
            if count > MAX_ELF_SECTIONS {
                return Err(Error::Elf("absurd section count".into()));
            }
        }
        if count > 0 {
            let buf = read_table(h.e_shoff, count, entsize)?;
            extent = extent.max(h.e_shoff + buf.len() as u64);
            let shs = SectionHeader::parse_from(&buf, 0, count as usize, ctx)
                .map_err(|e| Error::Elf(e.to_string()))?;
            for s in shs {
                if s.sh_type != SHT_NOBITS {
                    let end = s.sh_offset.checked_add(s.sh_size).ok_or_else(oob)?;
                    extent = extent.max(end);
                }
            }
        }
    }
    if extent > len {
        return Err(Error::Elf(format!(
            "truncated: its headers reach byte {extent} but the file has {len}"
        )));
    }
    Ok(extent)
}

/// Checks that the payload of a packed executable starts beyond the stub's ELF image.
pub fn check_stub_extent<S: ReadAt + ?Sized>(src: &S, t: &Trailer) -> Result<u64> {
    let extent = elf_extent(src)?;
    if extent > t.payload_offset {
        return Err(Error::corrupt(format!(
            "the stub's ELF image reaches byte {extent}, past the payload at {}",
            t.payload_offset
        )));
    }
    Ok(extent)
}

/// Writes `out = stub ‖ zeros ‖ machine ‖ trailer` atomically with the exec bit set.
///
/// The machine is verified first (every checksum), so a damaged file is never packed.
/// `machine` may itself be a packed executable; its payload is used.
pub fn pack(stub: &Path, machine: &Path, out: &Path) -> Result<Trailer> {
    let stub_file =
        File::open(stub).map_err(|e| Error::io(format!("opening stub {}", stub.display()), e))?;
    let meta = stub_file
        .metadata()
        .map_err(|e| Error::io(format!("reading {}", stub.display()), e))?;
    let stub_len = meta.len();
    elf_extent(&stub_file)?;
    if locate(&stub_file)?.is_some() {
        return Err(Error::InvalidInput(format!(
            "{} already carries a payload; pack the plain stub",
            stub.display()
        )));
    }
    let m = MachineReader::open(machine)?;
    // Never ship a damaged payload: check every checksum before copying.
    m.verify()?;
    let payload_offset = crate::layout::align_up(stub_len, DATA_ALIGN)
        .ok_or_else(|| Error::InvalidInput("stub is too large".into()))?;
    let t = Trailer {
        payload_offset,
        payload_len: m.len(),
        stub_len,
    };

    let af = AtomicFile::create(out)?;
    let ctx = format!("writing {}", af.tmp_path().display());
    let mut w = af.file();
    copy_range(&stub_file, 0, stub_len, &mut w).map_err(|e| Error::io(&ctx, e))?;
    io::copy(&mut io::repeat(0).take(payload_offset - stub_len), &mut w)
        .map_err(|e| Error::io(&ctx, e))?;
    copy_range(m.file(), m.base(), m.len(), &mut w).map_err(|e| Error::io(&ctx, e))?;
    w.write_all(&t.encode()).map_err(|e| Error::io(&ctx, e))?;
    let mode = (meta.permissions().mode() & 0o777) | 0o111;
    af.commit(Some(mode))?;
    Ok(t)
}

/// Copies `len` bytes at `off` of `src` to `dst` (kernel-side copy where the OS can).
fn copy_range(src: &File, off: u64, len: u64, dst: &mut &File) -> io::Result<()> {
    let mut s = src;
    s.seek(SeekFrom::Start(off))?;
    let n = io::copy(&mut s.take(len), dst)?;
    if n != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "source shrank while copying",
        ));
    }
    Ok(())
}
