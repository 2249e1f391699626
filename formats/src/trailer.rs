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

/// The ELF header of the executable at the start of a file, with what reading its tables
/// needs.
struct ElfHead {
    /// Length of the whole file.
    len: u64,
    header: goblin::elf::Header,
    ctx: Ctx,
}

fn elf_out_of_bounds() -> Error {
    Error::Elf("headers point past the end of the file".into())
}

/// Reads and parses the ELF header at the start of `src`.
fn read_elf_head<S: ReadAt + ?Sized>(src: &S) -> Result<ElfHead> {
    let len = src.size().map_err(|e| Error::io("reading stub size", e))?;
    let mut hb = [0u8; 64];
    let n = (len.min(64)) as usize;
    read_exact_at(src, &mut hb[..n], 0, "ELF header")?;
    if n < 16 || hb[..4] != *b"\x7fELF" {
        return Err(Error::Elf("no ELF header".into()));
    }
    let header = Elf::parse_header(&hb).map_err(|e| Error::Elf(e.to_string()))?;
    let container = header.container().map_err(|e| Error::Elf(e.to_string()))?;
    let endian = header.endianness().map_err(|e| Error::Elf(e.to_string()))?;
    Ok(ElfHead {
        len,
        header,
        ctx: Ctx::new(container, endian),
    })
}

/// Reads `count` table entries of `entsize` bytes at `off`, all inside the file.
fn read_elf_table<S: ReadAt + ?Sized>(
    src: &S,
    head: &ElfHead,
    off: u64,
    count: u64,
    entsize: u64,
) -> Result<Vec<u8>> {
    let bytes = count.checked_mul(entsize).ok_or_else(elf_out_of_bounds)?;
    let end = off.checked_add(bytes).ok_or_else(elf_out_of_bounds)?;
    if end > head.len {
        return Err(elf_out_of_bounds());
    }
    let mut buf = vec![0u8; bytes as usize];
    read_exact_at(src, &mut buf, off, "ELF header table")?;
    Ok(buf)
}

/// The program headers (none when `e_phnum` is 0) and the end of their table in the file.
fn read_program_headers<S: ReadAt + ?Sized>(
    src: &S,
    head: &ElfHead,
) -> Result<(Vec<ProgramHeader>, u64)> {
    let h = &head.header;
    if h.e_phnum == 0 {
        return Ok((Vec::new(), 0));
    }
    if usize::from(h.e_phentsize) != ProgramHeader::size(head.ctx) {
        return Err(Error::Elf("unexpected program header size".into()));
    }
    let buf = read_elf_table(src, head, h.e_phoff, h.e_phnum.into(), h.e_phentsize.into())?;
    let table_end = h.e_phoff + buf.len() as u64;
    let phs = ProgramHeader::parse(&buf, 0, h.e_phnum.into(), head.ctx)
        .map_err(|e| Error::Elf(e.to_string()))?;
    Ok((phs, table_end))
}

/// End of the ELF image in `src`: the furthest byte any header, segment or section covers.
/// Everything past it (e.g. an appended payload) is invisible to the loader and to `strip`.
pub fn elf_extent<S: ReadAt + ?Sized>(src: &S) -> Result<u64> {
    let head = read_elf_head(src)?;
    let (h, ctx, len) = (&head.header, head.ctx, head.len);
    let mut extent = u64::from(h.e_ehsize);
    let (phs, ph_table_end) = read_program_headers(src, &head)?;
    extent = extent.max(ph_table_end);
    for p in phs {
        let end = p
            .p_offset
            .checked_add(p.p_filesz)
            .ok_or_else(elf_out_of_bounds)?;
        extent = extent.max(end);
    }
    if h.e_shoff != 0 {
        if usize::from(h.e_shentsize) != SectionHeader::size(ctx) {
            return Err(Error::Elf("unexpected section header size".into()));
        }
        let entsize = u64::from(h.e_shentsize);
        let mut count = u64::from(h.e_shnum);
        if count == 0 {
            // The real count lives in the first section header's sh_size.
            let first = read_elf_table(src, &head, h.e_shoff, 1, entsize)?;
            let sh = SectionHeader::parse_from(&first, 0, 1, ctx)
                .map_err(|e| Error::Elf(e.to_string()))?;
            count = sh.first().map(|s| s.sh_size).unwrap_or(0);
            if count > MAX_ELF_SECTIONS {
                return Err(Error::Elf("absurd section count".into()));
            }
        }
        if count > 0 {
            let buf = read_elf_table(src, &head, h.e_shoff, count, entsize)?;
            extent = extent.max(h.e_shoff + buf.len() as u64);
            let shs = SectionHeader::parse_from(&buf, 0, count as usize, ctx)
                .map_err(|e| Error::Elf(e.to_string()))?;
            for s in shs {
                if s.sh_type != SHT_NOBITS {
                    let end = s
                        .sh_offset
                        .checked_add(s.sh_size)
                        .ok_or_else(elf_out_of_bounds)?;
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
/// The written file is verified before it is renamed (every checksum of the copied
/// machine), so a damaged machine is never packed.
/// `machine` may itself be a packed executable; its payload is used.
pub fn pack(stub: &Path, machine: &Path, out: &Path) -> Result<Trailer> {
    let stub_file =
        File::open(stub).map_err(|e| Error::io(format!("opening stub {}", stub.display()), e))?;
    let meta = stub_file
        .metadata()
        .map_err(|e| Error::io(format!("reading {}", stub.display()), e))?;
    let m = MachineReader::open(machine)?;
    let mode = (meta.permissions().mode() & 0o777) | 0o111;
    pack_from(&stub_file, &stub.display().to_string(), mode, &m, out)
}

/// [`pack`] from any stub source (e.g. a stub embedded in the packer) and an opened machine.
///
/// Refuses a stub that is not an ELF image or already carries a payload. The output is
/// written to a temporary file, checked with [`verify_packed`] (stub extent unchanged,
/// payload beyond it, trailer, every checksum of the machine as copied, which also refuses a
/// damaged input) and only then renamed to `out` with permission bits `mode`: on any failure
/// no file appears under `out` and an existing one is left untouched, even when the process
/// is killed. The temp file (`.OUT.PID.N.tmp`) is locked while it is written, and the temp
/// files that killed packs of the same `out` left behind are removed (see [`crate::atomic`]).
/// The machine is read once to copy it and once to check the copy.
pub fn pack_from<S: ReadAt + ?Sized>(
    stub: &S,
    stub_name: &str,
    mode: u32,
    machine: &MachineReader<File>,
    out: &Path,
) -> Result<Trailer> {
    let stub_len = stub
        .size()
        .map_err(|e| Error::io(format!("reading size of stub {stub_name}"), e))?;
    let extent = elf_extent(stub)?;
    if locate_in(stub)?.is_some() {
        return Err(Error::InvalidInput(format!(
            "{stub_name} already carries a payload; pack the plain stub"
        )));
    }
    let payload_offset = crate::layout::align_up(stub_len, DATA_ALIGN)
        .ok_or_else(|| Error::InvalidInput("stub is too large".into()))?;
    let t = Trailer {
        payload_offset,
        payload_len: machine.len(),
        stub_len,
    };

    let af = AtomicFile::create(out)?;
    let ctx = format!("writing {}", af.tmp_path().display());
    let mut w = af.file();
    copy_from(stub, stub_len, &mut w).map_err(|e| Error::io(&ctx, e))?;
    io::copy(&mut io::repeat(0).take(payload_offset - stub_len), &mut w)
        .map_err(|e| Error::io(&ctx, e))?;
    copy_range(machine.file(), machine.base(), machine.len(), &mut w)
        .map_err(|e| Error::io(&ctx, e))?;
    w.write_all(&t.encode()).map_err(|e| Error::io(&ctx, e))?;
    let written = verify_packed(af.file(), Some(extent))?;
    if written != t {
        return Err(Error::corrupt(
            "the written trailer differs from the one packed",
        ));
    }
    af.commit(Some(mode))?;
    Ok(t)
}

/// Checks a packed executable end to end: the trailer parses and round-trips, the stub's ELF
/// image parses and ends before the 64 KiB aligned payload (at `stub_extent` when given), the
/// padding between them is zero, and the machine passes [`MachineReader::verify`].
pub fn verify_packed<S: ReadAt>(src: S, stub_extent: Option<u64>) -> Result<Trailer> {
    let t = locate_in(&src)?.ok_or(Error::TrailerMissing)?;
    let mut enc = [0u8; TRAILER_LEN as usize];
    let len = src.size().map_err(|e| Error::io("reading file size", e))?;
    read_exact_at(&src, &mut enc, len - TRAILER_LEN, "trailer")?;
    if enc != t.encode() {
        return Err(Error::corrupt("the trailer does not round-trip"));
    }
    let extent = check_stub_extent(&src, &t)?;
    if let Some(want) = stub_extent {
        if extent != want {
            return Err(Error::corrupt(format!(
                "the stub's ELF image ends at byte {extent}, not {want} as before packing"
            )));
        }
    }
    let mut pad = vec![0u8; (t.payload_offset - t.stub_len).min(DATA_ALIGN) as usize];
    let mut at = t.stub_len;
    while at < t.payload_offset {
        let n = ((t.payload_offset - at) as usize).min(pad.len());
        read_exact_at(&src, &mut pad[..n], at, "padding before the payload")?;
        if pad[..n].iter().any(|&b| b != 0) {
            return Err(Error::corrupt("the padding before the payload is not zero"));
        }
        at += n as u64;
    }
    MachineReader::from_source(src, t.payload_offset, t.payload_len)?.verify()?;
    Ok(t)
}

/// Writes the payload of the packed executable `packed` to `out` atomically, byte for
/// byte as it was packed; every checksum of the copy is checked before the rename.
pub fn unpack(packed: &Path, out: &Path) -> Result<Trailer> {
    let file =
        File::open(packed).map_err(|e| Error::io(format!("opening {}", packed.display()), e))?;
    let Some(t) = locate(&file)? else {
        let mut magic = [0u8; 8];
        let is_machine =
            read_exact_at(&file, &mut magic, 0, "file").is_ok() && magic == crate::MACHINE_MAGIC;
        return Err(Error::InvalidInput(
            if is_machine {
                "a .smolmachine, not a packed executable: there is nothing to unpack"
            } else {
                "not a packed executable (no trailer; was it stripped?)"
            }
            .into(),
        ));
    };
    let m = MachineReader::from_file(file, t.payload_offset, t.payload_len)?;
    let af = AtomicFile::create(out)?;
    let ctx = format!("writing {}", af.tmp_path().display());
    let mut w = af.file();
    copy_range(m.file(), m.base(), m.len(), &mut w).map_err(|e| Error::io(&ctx, e))?;
    // Checking the copy covers the source too: it is byte for byte the payload.
    MachineReader::from_source(af.file(), 0, t.payload_len)?.verify()?;
    af.commit(None)?;
    Ok(t)
}

/// What a stub's ELF header says about where it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElfIdentity {
    /// `ELFCLASS64`.
    pub is_64: bool,
    pub little_endian: bool,
    /// `e_machine` (62 = x86-64, 183 = AArch64).
    pub machine: u16,
    /// `EI_OSABI` (0 = System V, 3 = GNU/Linux).
    pub osabi: u8,
    /// Whether a program header asks for an interpreter (a dynamically linked program).
    pub dynamic: bool,
}

/// Reads the ELF identity of the executable at the start of `src` (a stub or a packed
/// executable); only the ELF header and program headers are read.
pub fn elf_identity<S: ReadAt + ?Sized>(src: &S) -> Result<ElfIdentity> {
    let head = read_elf_head(src)?;
    let (phs, _) = read_program_headers(src, &head)?;
    let dynamic = phs
        .iter()
        .any(|p| p.p_type == goblin::elf::program_header::PT_INTERP);
    let h = &head.header;
    Ok(ElfIdentity {
        is_64: head.ctx.container.is_big(),
        little_endian: head.ctx.le.is_little(),
        machine: h.e_machine,
        osabi: h.e_ident[goblin::elf::header::EI_OSABI],
        dynamic,
    })
}

/// Copies the first `len` bytes of `src` to `dst`.
fn copy_from<S: ReadAt + ?Sized>(src: &S, len: u64, dst: &mut &File) -> io::Result<()> {
    let mut buf = vec![0u8; crate::source::CHUNK.min(len as usize)];
    let mut at = 0u64;
    while at < len {
        let n = ((len - at) as usize).min(buf.len());
        read_exact_at(src, &mut buf[..n], at, "stub").map_err(io::Error::other)?;
        dst.write_all(&buf[..n])?;
        at += n as u64;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::tiny_elf;
    use crate::Arch;

    fn machine(path: &Path) {
        crate::testing::write_machine(path, Arch::X86_64, "");
    }

    #[test]
    fn pack_from_bytes_verify_and_unpack() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("m.smolmachine");
        machine(&m);
        let stub = tiny_elf();
        let out = dir.path().join("app");
        let r = MachineReader::open(&m).unwrap();
        let t = pack_from(stub.as_slice(), "stub", 0o750, &r, &out).unwrap();
        assert_eq!(t.stub_len, stub.len() as u64);
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o750);
        let f = File::open(&out).unwrap();
        assert_eq!(verify_packed(&f, Some(stub.len() as u64)).unwrap(), t);
        assert!(verify_packed(&f, Some(1)).is_err(), "a different extent");

        let back = dir.path().join("back.smolmachine");
        assert_eq!(unpack(&out, &back).unwrap(), t);
        assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&m).unwrap());

        let e = unpack(&m, &dir.path().join("x")).unwrap_err().to_string();
        assert!(e.contains("nothing to unpack"), "{e}");
        let plain = dir.path().join("plain");
        std::fs::write(&plain, &stub).unwrap();
        let e = unpack(&plain, &dir.path().join("x"))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "not a packed executable (no trailer; was it stripped?)");
        assert!(!dir.path().join("x").exists());
    }

    #[test]
    fn verify_packed_catches_damage() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("m.smolmachine");
        machine(&m);
        let out = dir.path().join("app");
        let r = MachineReader::open(&m).unwrap();
        let t = pack_from(tiny_elf().as_slice(), "stub", 0o755, &r, &out).unwrap();
        let good = std::fs::read(&out).unwrap();
        assert!(verify_packed(good.as_slice(), None).is_ok());
        // A non-zero byte in the padding between the stub and the payload.
        let mut b = good.clone();
        b[t.stub_len as usize + 1] = 1;
        assert!(verify_packed(b.as_slice(), None).is_err());
        // A flipped byte in the payload's memory data.
        let mut b = good.clone();
        b[(t.payload_offset + 65536) as usize] ^= 1;
        assert!(verify_packed(b.as_slice(), None).is_err());
        // No trailer at all.
        assert!(matches!(
            verify_packed(&good[..good.len() - 1], None),
            Err(Error::TrailerMissing)
        ));
    }

    #[test]
    fn pack_refuses_a_damaged_machine_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("m.smolmachine");
        machine(&m);
        let mut b = std::fs::read(&m).unwrap();
        b[65536] ^= 1;
        std::fs::write(&m, &b).unwrap();
        let r = MachineReader::open(&m).unwrap();
        let out = dir.path().join("app");
        std::fs::write(&out, b"old").unwrap();
        assert!(pack_from(tiny_elf().as_slice(), "stub", 0o755, &r, &out).is_err());
        assert_eq!(std::fs::read(&out).unwrap(), b"old");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 2, "no temporary file left");
    }

    #[test]
    fn elf_identity_of_stubs() {
        let id = elf_identity(tiny_elf().as_slice()).unwrap();
        assert_eq!(
            id,
            ElfIdentity {
                is_64: true,
                little_endian: true,
                machine: 62,
                osabi: 0,
                dynamic: false,
            }
        );
        assert!(elf_identity(b"#!/bin/sh\n".as_slice()).is_err());
        assert!(
            elf_identity(&tiny_elf()[..70]).is_err(),
            "truncated headers"
        );
        if let Ok(f) = File::open("/bin/sh") {
            let id = elf_identity(&f).unwrap();
            assert!(id.dynamic, "/bin/sh has an interpreter");
        }
    }
}
