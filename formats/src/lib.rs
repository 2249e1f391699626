//! The `.smolmachine` file format and the trailer of packed executables.
//!
//! A `.smolmachine` is a 64-byte header, sections, and a section table; `docs/FORMAT.md`
//! specifies every byte. The API:
//!
//! * [`MachineWriter`] streams a machine to disk atomically (temp file, fsync, rename):
//!   `create(path, arch)`, then `add_manifest(&Manifest)`, `add_blob(SectionKind::VmState,
//!   bytes, compression)`, `add_memory(&[GuestRegion], compression)`, `add_disk(name, &mut
//!   File, compression)`, then `finish()`. Memory and disks are scanned in granules (4 KiB by
//!   default, `set_granule` for 16/64 KiB page hosts) and only non-zero runs are stored; raw
//!   region data starts [`DATA_ALIGN`]-aligned. Dropping an unfinished writer deletes the
//!   temp file; the writer holds an exclusive `flock` on it while it writes, so the temp
//!   file of a killed writer is told apart from a live one and removed by the next writer
//!   of the same file or by [`atomic::remove_leftovers`].
//! * [`MachineReader::open`] takes a `.smolmachine` or a packed executable and checks the
//!   header and table checksum. [`MachineReader::memory_layout`] gives, per region, sorted
//!   [`MemRun`]s covering it exactly: `zero` runs, and data runs whose `file_offset` is an
//!   absolute offset in [`MachineReader::file`] to `mmap(MAP_PRIVATE)` in place. When
//!   `MemoryLayout::mappable` is false (zstd), fill memory with
//!   [`MachineReader::read_memory_region`] instead. `manifest()`, `read_blob(kind)`,
//!   `disks()`/`extract_disk()` read the rest; [`MachineReader::verify`] checks every
//!   checksum and that all padding is zero.
//! * [`trailer`]: `pack(stub, machine, out)`, `locate(file)` and the goblin-based ELF extent
//!   check for `stub ‖ padding ‖ machine ‖ trailer` executables.
//!
//! The reader never panics on bad input and never allocates more than the caps below (or
//! the file's own size) allow; every offset is bounds-checked before use.

pub mod atomic;
mod error;
mod image;
mod layout;
mod manifest;
mod reader;
pub mod reference;
pub mod signature;
mod source;
pub mod trailer;
mod writer;

use std::fmt;

pub use error::{Error, Result};
pub use image::{
    MAX_GRANULE, MAX_IMAGE_SIZE, MAX_INDEX_LEN, MAX_NAME_LEN, MAX_REGIONS, MIN_GRANULE,
};
pub use layout::{
    Header, ENTRY_LEN, HEADER_LEN, MACHINE_MAGIC, SECTION_ALIGN, VERSION_MAJOR, VERSION_MINOR,
};
pub use manifest::{Manifest, MAX_MANIFEST_LEN};
pub use reader::{
    DiskLayout, MachineReader, MemRun, MemoryLayout, RegionLayout, SectionEntry, VerifyReport,
};
pub use source::ReadAt;
pub use trailer::Trailer;
/// Helpers shared by the property tests and the fuzzer; not a stable API.
#[doc(hidden)]
pub mod testing {
    use crate::{trailer, MachineReader, ReadAt, Result};

    pub use crate::writer::is_zero;

    /// Most region bytes the exerciser decompresses into memory per machine.
    const MAX_REGION_READ: u64 = 64 << 20;

    /// Drives every reader entry point over `bytes`, as a standalone machine and as a packed
    /// executable. Returns whether the whole thing opened and verified; never panics.
    pub fn exercise(bytes: &[u8]) -> bool {
        let mut ok = walk(bytes, 0, bytes.len() as u64).unwrap_or(false);
        if let Ok(Some(t)) = trailer::locate_in(bytes) {
            let _ = trailer::check_stub_extent(bytes, &t);
            ok |= walk(bytes, t.payload_offset, t.payload_len).unwrap_or(false);
        }
        let _ = trailer::elf_extent(bytes);
        ok
    }

    /// Recomputes every checksum in `bytes` (header, sections, image indexes and regions,
    /// trailer) where the structure is in range, so a fuzzer's mutations reach the
    /// structural checks behind the checksums. Best effort; never panics.
    pub fn reseal(bytes: &mut [u8]) {
        use crate::layout::{put, u32_at, u64_at};
        use xxhash_rust::xxh3::{xxh3_64, Xxh3};

        fn range(b: &[u8], off: u64, len: u64) -> Option<std::ops::Range<usize>> {
            let end = off.checked_add(len)?;
            (end <= b.len() as u64).then_some(off as usize..end as usize)
        }
        fn machine(b: &mut [u8]) {
            if b.len() < 64 || b[..8] != crate::MACHINE_MAGIC {
                return;
            }
            let count = u64::from(u32_at(b, 20));
            let toff = u64_at(b, 24);
            let Some(table) = range(b, toff, count.saturating_mul(64)) else {
                return;
            };
            if count > u64::from(crate::MAX_SECTIONS) {
                return;
            }
            for i in 0..count as usize {
                let e = table.start + i * 64;
                let (kind, off, len) = (u32_at(b, e), u64_at(b, e + 16), u64_at(b, e + 24));
                let Some(sec) = range(b, off, len) else {
                    continue;
                };
                if (kind == 3 || kind == 4) && len >= 64 {
                    image(&mut b[sec.clone()]);
                }
                let sum = xxh3_64(&b[sec]);
                put(b, e + 40, &sum.to_le_bytes());
            }
            let mut h = Xxh3::new();
            h.update(&b[..56]);
            h.update(&b[table]);
            let sum = h.digest();
            put(b, 56, &sum.to_le_bytes());
        }
        fn image(s: &mut [u8]) {
            let f = s.len() - 64;
            if s[f..f + 4] != *b"SMIX" {
                return;
            }
            let body_len = u64_at(s, f + 24);
            let Some(body) = range(s, (f as u64).saturating_sub(body_len), body_len) else {
                return;
            };
            if body.end != f {
                return;
            }
            let regions = u64::from(u32_at(s, f + 12));
            let first = body.start as u64 + ((u64::from(u32_at(s, f + 20)) + 7) & !7);
            for r in 0..regions {
                let at = first + r * 64;
                if at + 64 > f as u64 {
                    break;
                }
                let at = at as usize;
                let (off, len) = (u64_at(s, at + 16), u64_at(s, at + 24));
                if let Some(d) = range(s, off, len) {
                    let sum = xxh3_64(&s[d]);
                    put(s, at + 48, &sum.to_le_bytes());
                }
            }
            let mut h = Xxh3::new();
            h.update(&s[body]);
            h.update(&s[f..f + 56]);
            let sum = h.digest();
            put(s, f + 56, &sum.to_le_bytes());
        }

        let n = bytes.len();
        if n >= 64 && bytes[n - 64..n - 56] == trailer::TRAILER_MAGIC {
            let (off, len) = (u64_at(bytes, n - 48), u64_at(bytes, n - 40));
            if let Some(p) = range(bytes, off, len) {
                machine(&mut bytes[p]);
            }
            let sum = xxh3_64(&bytes[n - 64..n - 8]);
            put(bytes, n - 8, &sum.to_le_bytes());
        } else {
            machine(bytes);
        }
    }

    /// Makes a standalone machine claim more than it holds, for tests of the limits: every
    /// region of every `kind` image section becomes `region_size` bytes (memory regions
    /// placed back to back from address 0), with `fill` the last extent of each region
    /// stretched to the region's end (claiming that much non-zero data; only a compressed
    /// section stays consistent), and the table's logical lengths and every checksum are
    /// updated, so the file opens as well-formed. `region_size` must be a granule multiple.
    pub fn inflate(bytes: &mut [u8], kind: crate::SectionKind, region_size: u64, fill: bool) {
        use crate::layout::{put, u32_at, u64_at};
        let count = u32_at(bytes, 20) as usize;
        let toff = u64_at(bytes, 24) as usize;
        for i in 0..count {
            let e = toff + i * 64;
            if u32_at(bytes, e) != kind.code() {
                continue;
            }
            let (off, len) = (
                u64_at(bytes, e + 16) as usize,
                u64_at(bytes, e + 24) as usize,
            );
            let s = &mut bytes[off..off + len];
            let f = s.len() - 64;
            let (regions, extents) = (u32_at(s, f + 12) as usize, u32_at(s, f + 16) as usize);
            let body = f - u64_at(s, f + 24) as usize;
            let first = body + ((u32_at(s, f + 20) as usize + 7) & !7);
            let ext_base = first + regions * 64;
            assert!(
                ext_base + extents * 16 == f,
                "unexpected image index layout"
            );
            for r in 0..regions {
                let at = first + r * 64;
                let addr = if kind == crate::SectionKind::Memory {
                    r as u64 * region_size
                } else {
                    0
                };
                put(s, at, &addr.to_le_bytes());
                put(s, at + 8, &region_size.to_le_bytes());
                let (x0, xn) = (u32_at(s, at + 40) as usize, u32_at(s, at + 44) as usize);
                if fill && xn > 0 {
                    let last = ext_base + (x0 + xn - 1) * 16;
                    let x_off = u64_at(s, last);
                    put(s, last + 8, &(region_size - x_off).to_le_bytes());
                }
                let data: u64 = (x0..x0 + xn)
                    .map(|x| u64_at(s, ext_base + x * 16 + 8))
                    .sum();
                put(s, at + 32, &data.to_le_bytes());
            }
            let logical = regions as u64 * region_size;
            put(bytes, e + 32, &logical.to_le_bytes());
        }
        reseal(bytes);
    }

    /// Writes a minimal machine for `arch` to `path`: a manifest (`name`, one vCPU, 16 pages,
    /// host profile `kvm`), a placeholder state blob and 16 pages of memory at 0 whose
    /// second page is 0x5a (the rest zero). For tests that pack, sign or refuse a machine;
    /// it is never resumed.
    pub fn write_machine(path: &std::path::Path, arch: crate::Arch, name: &str) {
        use crate::{Compression, GuestRegion, MachineWriter, Manifest, SectionKind};
        let mut mem = vec![0u8; 16 * 4096];
        mem[4096..8192].fill(0x5a);
        let mut w = MachineWriter::create(path, arch).expect("create the machine");
        w.add_manifest(&Manifest {
            name: name.into(),
            vcpus: 1,
            memory_bytes: mem.len() as u64,
            host_profile: "kvm".into(),
            ..Default::default()
        })
        .expect("manifest");
        w.add_blob(SectionKind::VmState, b"state", Compression::None)
            .expect("state");
        w.add_memory(
            &[GuestRegion {
                guest_addr: 0,
                data: &mem,
            }],
            Compression::None,
        )
        .expect("memory");
        w.finish().expect("finish the machine");
    }

    /// A minimal static x86_64 ELF executable that exits 0: a stand-in stub for tests.
    pub fn tiny_elf() -> Vec<u8> {
        let code: [u8; 9] = [0xb8, 0x3c, 0, 0, 0, 0x31, 0xff, 0x0f, 0x05]; // exit(0)
        let total = 64 + 56 + code.len() as u64;
        let mut b = Vec::with_capacity(total as usize);
        b.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        b.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&(0x400000u64 + 120).to_le_bytes()); // entry
        b.extend_from_slice(&64u64.to_le_bytes()); // phoff
        b.extend_from_slice(&0u64.to_le_bytes()); // shoff
        b.extend_from_slice(&0u32.to_le_bytes()); // flags
        for v in [64u16, 56, 1, 64, 0, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        b.extend_from_slice(&5u32.to_le_bytes()); // R+X
        for v in [0u64, 0x400000, 0x400000, total, total, 0x1000] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&code);
        b
    }

    fn walk<S: ReadAt>(src: S, base: u64, len: u64) -> Result<bool> {
        let r = MachineReader::from_source(src, base, len)?;
        let _ = r.manifest();
        for s in r.sections() {
            if !s.kind.is_image() {
                let _ = r.read_section(s);
            }
        }
        if let Ok(l) = r.memory_layout() {
            let mut budget = MAX_REGION_READ;
            for (i, reg) in l.regions.iter().enumerate() {
                if reg.size <= budget {
                    budget -= reg.size;
                    let mut buf = vec![0u8; reg.size as usize];
                    let _ = r.read_memory_region(i, &mut buf);
                }
            }
        }
        if let Ok(disks) = r.disks() {
            for d in &disks {
                let _ = r.read_disk_with(d, |_, _| Ok(()));
            }
        }
        for i in 0..r.table_len() {
            let _ = r.check_section(i);
        }
        // Trust the embedded key, so the signed message and every digest are checked too.
        if let Ok(Some(info)) = r.signature_info() {
            let _ = crate::signature::verify_signature(&r, &[info.key]);
        }
        Ok(r.verify().is_ok())
    }
}

pub use writer::{GuestRegion, MachineWriter, DEFAULT_GRANULE, DEFAULT_ZSTD_LEVEL};

/// Alignment of every uncompressed memory region's and disk's data in the file (and of the
/// payload inside a packed executable): a multiple of 4 KiB, 16 KiB and 64 KiB host pages.
pub const DATA_ALIGN: u64 = 65536;
/// Most sections a reader accepts.
pub const MAX_SECTIONS: u32 = 1024;
/// Largest blob (the VM state, unknown kinds) read in full, stored or decompressed. The
/// VMM's state decoder takes the same limit from here.
pub const MAX_BLOB_LEN: u64 = 16 << 20;
/// Most guest memory a machine may have, all regions together (1 TiB). A reader refuses a
/// file that claims more when it opens it, before anything is allocated for its memory.
pub const MAX_GUEST_MEMORY: u64 = 1 << 40;

/// Guest CPU architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    /// Code stored in the header.
    pub fn code(self) -> u16 {
        match self {
            Arch::X86_64 => 1,
            Arch::Aarch64 => 2,
        }
    }
    /// Decodes a header code.
    pub fn from_code(code: u16) -> Option<Arch> {
        match code {
            1 => Some(Arch::X86_64),
            2 => Some(Arch::Aarch64),
            _ => None,
        }
    }
    /// The architecture this program runs on, if supported.
    pub fn host() -> Option<Arch> {
        if cfg!(target_arch = "x86_64") {
            Some(Arch::X86_64)
        } else if cfg!(target_arch = "aarch64") {
            Some(Arch::Aarch64)
        } else {
            None
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        })
    }
}

/// How a section's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// Raw: memory and disks can be mapped straight from the file.
    None,
    /// zstd frames: smaller for distribution, must be decompressed to read.
    Zstd,
}

impl Compression {
    /// Code stored in the table.
    pub fn code(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Zstd => 1,
        }
    }
    /// Decodes a table code.
    pub fn from_code(code: u8) -> Option<Compression> {
        match code {
            0 => Some(Compression::None),
            1 => Some(Compression::Zstd),
            _ => None,
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
        })
    }
}

/// What a section holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SectionKind {
    /// JSON [`Manifest`].
    Manifest,
    /// VM, vCPU and device state: an opaque, versioned blob owned by the VMM.
    VmState,
    /// Guest memory: regions with a zero-run map.
    Memory,
    /// A disk image with a zero-run map; there may be several.
    Disk,
    /// An Ed25519 signature over the header, the table and every other section's digest
    /// (optional, at most once, the last section; see [`signature`]).
    Signature,
    /// A kind this build does not know (listed, never interpreted).
    Unknown(u32),
}

impl SectionKind {
    /// Code stored in the table.
    pub fn code(self) -> u32 {
        match self {
            SectionKind::Manifest => 1,
            SectionKind::VmState => 2,
            SectionKind::Memory => 3,
            SectionKind::Disk => 4,
            SectionKind::Signature => 5,
            SectionKind::Unknown(c) => c,
        }
    }
    /// Decodes a table code.
    pub fn from_code(code: u32) -> SectionKind {
        match code {
            1 => SectionKind::Manifest,
            2 => SectionKind::VmState,
            3 => SectionKind::Memory,
            4 => SectionKind::Disk,
            5 => SectionKind::Signature,
            c => SectionKind::Unknown(c),
        }
    }
    /// Kinds that may appear at most once.
    pub fn is_singleton(self) -> bool {
        matches!(
            self,
            SectionKind::Manifest
                | SectionKind::VmState
                | SectionKind::Memory
                | SectionKind::Signature
        )
    }
    /// Kinds stored as an image (region data + run map).
    pub fn is_image(self) -> bool {
        matches!(self, SectionKind::Memory | SectionKind::Disk)
    }
    pub(crate) fn static_name(self) -> &'static str {
        match self {
            SectionKind::Manifest => "manifest",
            SectionKind::VmState => "vm-state",
            SectionKind::Memory => "memory",
            SectionKind::Disk => "disk",
            SectionKind::Signature => "signature",
            SectionKind::Unknown(_) => "unknown",
        }
    }
}

impl fmt::Display for SectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SectionKind::Unknown(c) => write!(f, "unknown({c})"),
            k => f.write_str(k.static_name()),
        }
    }
}
