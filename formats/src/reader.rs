//! Bounds-checked `.smolmachine` reader.
//!
//! `open` reads the 64-byte header and the section table, checks their checksum and every
//! offset, and nothing else: section data is only hashed when it is read in full or by
//! [`MachineReader::verify`]. All offsets returned by the reader are absolute in the
//! underlying file, so the VMM can `mmap(reader.file(), file_offset)` directly.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::image::{decode_index, ImageIndex, RegionRec};
use crate::layout::{
    Header, RawEntry, ENTRY_LEN, HEADER_KNOWN_FEATURES, HEADER_LEN, HEADER_REQUIRED_FEATURES_MASK,
    MACHINE_MAGIC,
};
use crate::manifest::{Manifest, MAX_MANIFEST_LEN};
use crate::source::{hash_range, read_exact_at, RangeReader, ReadAt, CHUNK};
use crate::trailer::{self, Trailer};
use crate::writer::is_zero;
use crate::{
    Arch, Compression, SectionKind, DATA_ALIGN, MAX_BLOB_LEN, MAX_GUEST_MEMORY, MAX_SECTIONS,
};

/// One section as listed in the table, with its absolute position in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionEntry {
    /// Position in the section table.
    pub index: usize,
    pub kind: SectionKind,
    /// A reader that does not understand a required section refuses the file.
    pub required: bool,
    pub compression: Compression,
    /// Offset relative to the start of the machine (the payload, in a packed executable).
    pub offset: u64,
    /// Absolute offset in [`MachineReader::file`].
    pub file_offset: u64,
    /// Bytes the section occupies in the file.
    pub stored_len: u64,
    /// Bytes it represents: decompressed length, or the full image size for memory/disks.
    pub logical_len: u64,
    /// xxh3-64 of the stored bytes.
    pub checksum: u64,
}

impl SectionEntry {
    /// True when the stored bytes are the data itself (no decompression needed).
    pub fn mappable(&self) -> bool {
        self.compression == Compression::None
    }
}

/// A run of a memory region or disk: either zero or stored data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRun {
    /// Offset within the region (or disk).
    pub offset: u64,
    pub len: u64,
    /// Absolute offset of the run's bytes in the file when they can be mapped in place;
    /// `None` for zero runs and for data of compressed sections.
    pub file_offset: Option<u64>,
    /// True for an all-zero run (nothing stored).
    pub zero: bool,
}

/// One guest memory region and how its bytes are laid out in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionLayout {
    pub guest_addr: u64,
    pub size: u64,
    /// Sorted, contiguous runs covering `0..size` exactly.
    pub runs: Vec<MemRun>,
}

impl RegionLayout {
    /// Bytes of the region that are stored (non-zero runs).
    pub fn data_bytes(&self) -> u64 {
        self.runs.iter().filter(|r| !r.zero).map(|r| r.len).sum()
    }
}

/// Guest memory as stored: regions and their zero/data runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLayout {
    /// True when every data run can be mapped `MAP_PRIVATE` from the file at its
    /// `file_offset`; false when the section is compressed (use
    /// [`MachineReader::read_memory_region`]) or the payload is not 64 KiB aligned.
    pub mappable: bool,
    /// Zero-elision granule: run offsets and lengths are multiples of it.
    pub granule: u64,
    pub regions: Vec<RegionLayout>,
}

impl MemoryLayout {
    /// Total guest memory bytes.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }
    /// Non-zero bytes stored in the file.
    pub fn data_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.data_bytes()).sum()
    }
}

/// A disk image as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLayout {
    /// Index of the disk's section in [`MachineReader::sections`].
    pub section: usize,
    pub name: String,
    pub size: u64,
    /// Same meaning as [`MemoryLayout::mappable`].
    pub mappable: bool,
    pub granule: u64,
    pub runs: Vec<MemRun>,
}

/// What [`MachineReader::verify`] checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Sections checked, including optional ones this build skips.
    pub sections_checked: usize,
    /// Bytes hashed or compared, header and padding included.
    pub bytes_checked: u64,
}

/// Reads a `.smolmachine`, standalone or inside a packed executable.
#[derive(Debug)]
pub struct MachineReader<S: ReadAt = File> {
    src: S,
    base: u64,
    len: u64,
    header: Header,
    raw: Vec<RawEntry>,
    sections: Vec<SectionEntry>,
    trailer: Option<Trailer>,
    fingerprint: u128,
    /// The header and table bytes as stored (checked), for signatures.
    header_bytes: [u8; HEADER_LEN as usize],
    table: Vec<u8>,
}

impl MachineReader<File> {
    /// Opens a `.smolmachine` or a packed executable (found through its trailer).
    pub fn open(path: &Path) -> Result<MachineReader<File>> {
        let file =
            File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(format!("reading size of {}", path.display()), e))?
            .len();
        let mut magic = [0u8; 8];
        let n = if len >= 8 {
            read_exact_at(&file, &mut magic, 0, "file")?;
            8
        } else {
            0
        };
        if n == 8 && magic == MACHINE_MAGIC {
            return MachineReader::from_file(file, 0, len);
        }
        match trailer::locate_in(&file)? {
            Some(t) => {
                let mut r = MachineReader::from_file(file, t.payload_offset, t.payload_len)?;
                r.trailer = Some(t);
                Ok(r)
            }
            None if n == 8 && magic[..4] == *b"\x7fELF" => Err(Error::TrailerMissing),
            None => Err(Error::NotAMachine(format!(
                "{} starts with neither the .smolmachine magic nor an ELF header",
                path.display()
            ))),
        }
    }

    /// Reads the machine stored at `base..base + len` of `file`.
    pub fn from_file(file: File, base: u64, len: u64) -> Result<MachineReader<File>> {
        MachineReader::from_source(file, base, len)
    }

    /// The underlying file; offsets in layouts are absolute in it.
    pub fn file(&self) -> &File {
        &self.src
    }

    /// Writes a disk of [`disks`](Self::disks) to `dest`, truncating it first; zero runs
    /// become holes. The region checksum is checked (an error means `dest` is incomplete).
    pub fn extract_disk(&self, disk: &DiskLayout, dest: &File) -> Result<()> {
        dest.set_len(0)
            .and_then(|_| dest.set_len(disk.size))
            .map_err(|e| Error::io("sizing extracted disk", e))?;
        self.read_disk_with(disk, |off, bytes| {
            dest.write_all_at(bytes, off)
                .map_err(|e| Error::io("writing extracted disk", e))
        })
    }
}

impl<S: ReadAt> MachineReader<S> {
    /// Reads the machine stored at `base..base + len` of any positioned source.
    pub fn from_source(src: S, base: u64, len: u64) -> Result<MachineReader<S>> {
        let src_len = src.size().map_err(|e| Error::io("reading file size", e))?;
        let end = base
            .checked_add(len)
            .ok_or_else(|| Error::corrupt("payload range overflows"))?;
        if end > src_len {
            return Err(Error::corrupt(format!(
                "file is truncated: payload ends at byte {end} but the file has {src_len}"
            )));
        }
        if len < HEADER_LEN {
            return Err(Error::corrupt(format!(
                "file is truncated: {len} bytes, the header alone needs {HEADER_LEN}"
            )));
        }
        let mut hb = [0u8; HEADER_LEN as usize];
        read_exact_at(&src, &mut hb, base, "header")?;
        let (header, arch_code) = Header::decode(&hb)?;
        if header.file_len > len {
            return Err(Error::corrupt(format!(
                "file is truncated: header says {} bytes, only {len} present",
                header.file_len
            )));
        }
        if header.file_len < len {
            return Err(Error::corrupt(format!(
                "{} unexpected bytes after the end of the machine",
                len - header.file_len
            )));
        }
        if header.section_count > MAX_SECTIONS {
            return Err(Error::TooLarge {
                what: "section table".into(),
                len: header.section_count.into(),
                cap: MAX_SECTIONS.into(),
            });
        }
        let table_len = u64::from(header.section_count) * ENTRY_LEN;
        header
            .table_offset
            .checked_add(table_len)
            .filter(|&e| header.table_offset >= HEADER_LEN && e <= len)
            .ok_or_else(|| Error::corrupt("section table lies outside the file"))?;
        let mut table = vec![0u8; table_len as usize];
        read_exact_at(
            &src,
            &mut table,
            base + header.table_offset,
            "section table",
        )?;
        let stored = crate::layout::u64_at(&hb, 56);
        if crate::layout::header_checksum(&hb, &table) != stored {
            return Err(Error::ChecksumMismatch("header and section table".into()));
        }
        let fingerprint = {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            h.update(&hb);
            h.update(&table);
            h.digest128()
        };
        if Arch::from_code(arch_code).is_none() {
            return Err(Error::UnsupportedArch(arch_code));
        }
        let unknown = header.flags & HEADER_REQUIRED_FEATURES_MASK & !HEADER_KNOWN_FEATURES;
        if unknown != 0 {
            return Err(Error::UnsupportedFeatures(unknown));
        }

        let raw: Vec<RawEntry> = table
            .chunks_exact(ENTRY_LEN as usize)
            .map(RawEntry::decode)
            .collect();
        let mut sections = Vec::with_capacity(raw.len());
        for (i, e) in raw.iter().enumerate() {
            let end = e
                .offset
                .checked_add(e.stored_len)
                .ok_or_else(|| Error::corrupt(format!("section {i} range overflows")))?;
            if e.offset < HEADER_LEN || end > header.table_offset {
                return Err(Error::corrupt(format!(
                    "section {i} ({}..{end}) lies outside the data area",
                    e.offset
                )));
            }
            let kind = e.kind();
            let Some(compression) = e.compression() else {
                if e.required() {
                    return Err(Error::UnknownCompression {
                        index: i,
                        code: e.codec,
                    });
                }
                continue; // Optional and undecodable: skipped.
            };
            if let SectionKind::Unknown(code) = kind {
                if e.required() {
                    return Err(Error::UnknownRequiredSection {
                        index: i,
                        kind: code,
                    });
                }
            }
            if compression == Compression::None && !kind.is_image() && e.logical_len != e.stored_len
            {
                return Err(Error::corrupt(format!(
                    "section {i} is uncompressed but its lengths differ"
                )));
            }
            if kind.is_image() && compression == Compression::None && e.offset % DATA_ALIGN != 0 {
                return Err(Error::corrupt(format!(
                    "{kind} section {i} is not 64 KiB aligned"
                )));
            }
            // The memory section's logical length is the sum of its region sizes (checked
            // against its index when that is read): refuse an absurd claim up front.
            if kind == SectionKind::Memory && e.logical_len > MAX_GUEST_MEMORY {
                return Err(Error::GuestMemoryTooLarge(e.logical_len));
            }
            if kind.is_singleton() && sections.iter().any(|s: &SectionEntry| s.kind == kind) {
                return Err(Error::corrupt(format!("more than one {kind} section")));
            }
            sections.push(SectionEntry {
                index: i,
                kind,
                required: e.required(),
                compression,
                offset: e.offset,
                file_offset: base + e.offset,
                stored_len: e.stored_len,
                logical_len: e.logical_len,
                checksum: e.checksum,
            });
        }
        // No two sections may share bytes.
        let mut order: Vec<&RawEntry> = raw.iter().collect();
        order.sort_by_key(|e| e.offset);
        for w in order.windows(2) {
            if w[0].offset + w[0].stored_len > w[1].offset {
                return Err(Error::corrupt(format!(
                    "sections at {} and {} overlap",
                    w[0].offset, w[1].offset
                )));
            }
        }
        Ok(MachineReader {
            src,
            base,
            len,
            header,
            raw,
            sections,
            trailer: None,
            fingerprint,
            header_bytes: hb,
            table,
        })
    }

    /// The header as stored (64 bytes, checksum checked on open).
    pub fn header_bytes(&self) -> &[u8] {
        &self.header_bytes
    }
    /// The section table as stored (every entry, skipped ones included).
    pub fn table_bytes(&self) -> &[u8] {
        &self.table
    }
    pub(crate) fn raw_entry(&self, i: usize) -> &RawEntry {
        &self.raw[i]
    }

    /// The underlying byte source.
    pub fn source(&self) -> &S {
        &self.src
    }
    /// The decoded header.
    pub fn header(&self) -> &Header {
        &self.header
    }
    /// Guest architecture the machine was built for.
    pub fn arch(&self) -> Arch {
        self.header.arch
    }
    /// Absolute offset of the machine in the file (non-zero inside a packed executable).
    pub fn base(&self) -> u64 {
        self.base
    }
    /// xxh3-128 of the header and section table as stored: they hold every section's
    /// checksum and length, so equal fingerprints mean the same machine content wherever
    /// it is stored (standalone or packed). Stable across builds and Rust versions; meant
    /// for cache keys, not as a defence against crafted collisions.
    pub fn fingerprint(&self) -> u128 {
        self.fingerprint
    }
    /// Length of the machine in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Never true for an opened machine (the header alone is 64 bytes); for clippy.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The trailer, when the machine was found inside a packed executable.
    pub fn trailer(&self) -> Option<&Trailer> {
        self.trailer.as_ref()
    }
    /// Sections this build understands or can list; optional sections with an unknown
    /// compression are skipped (see [`skipped_sections`](Self::skipped_sections)).
    pub fn sections(&self) -> &[SectionEntry] {
        &self.sections
    }
    /// Number of table entries skipped because they are optional and undecodable.
    pub fn skipped_sections(&self) -> usize {
        self.raw.len() - self.sections.len()
    }
    /// The first section of `kind`.
    pub fn section(&self, kind: SectionKind) -> Option<&SectionEntry> {
        self.sections.iter().find(|s| s.kind == kind)
    }

    /// Parses the manifest (checksum checked).
    pub fn manifest(&self) -> Result<Manifest> {
        let e = self
            .section(SectionKind::Manifest)
            .ok_or(Error::MissingSection("manifest"))?;
        Manifest::from_json(&self.read_section(e)?)
    }

    /// Reads the first section of `kind` in full: checksum checked, decompressed, size-capped.
    pub fn read_blob(&self, kind: SectionKind) -> Result<Vec<u8>> {
        let e = self
            .section(kind)
            .ok_or(Error::MissingSection(kind.static_name()))?;
        self.read_section(e)
    }

    /// Reads a non-image section in full: checksum checked, decompressed, size-capped.
    pub fn read_section(&self, e: &SectionEntry) -> Result<Vec<u8>> {
        if e.kind.is_image() {
            return Err(Error::InvalidInput(format!(
                "{} sections are read through their layout, not in full",
                e.kind
            )));
        }
        let cap = if e.kind == SectionKind::Manifest {
            MAX_MANIFEST_LEN
        } else {
            MAX_BLOB_LEN
        };
        let what = format!("section {} ({})", e.index, e.kind);
        for (n, v) in [("stored", e.stored_len), ("logical", e.logical_len)] {
            if v > cap {
                return Err(Error::TooLarge {
                    what: format!("{what} {n} size"),
                    len: v,
                    cap,
                });
            }
        }
        // stored_len is within the file (checked on open) and under the cap.
        let mut stored = vec![0u8; e.stored_len as usize];
        read_exact_at(&self.src, &mut stored, e.file_offset, &what)?;
        if xxhash_rust::xxh3::xxh3_64(&stored) != e.checksum {
            return Err(Error::ChecksumMismatch(what));
        }
        match e.compression {
            Compression::None => Ok(stored),
            Compression::Zstd => {
                let mut out = Vec::new();
                zstd::stream::read::Decoder::new(stored.as_slice())
                    .and_then(|d| d.take(e.logical_len + 1).read_to_end(&mut out))
                    .map_err(|err| Error::corrupt(format!("{what}: bad zstd data: {err}")))?;
                if out.len() as u64 != e.logical_len {
                    return Err(Error::corrupt(format!(
                        "{what} decompresses to {} bytes, expected {}",
                        out.len(),
                        e.logical_len
                    )));
                }
                Ok(out)
            }
        }
    }

    fn image_index(&self, e: &SectionEntry) -> Result<ImageIndex> {
        let what = format!("section {} ({})", e.index, e.kind);
        let index = decode_index(&self.src, e.file_offset, e.stored_len, e.compression, &what)?;
        if index.logical_len() != e.logical_len {
            return Err(Error::corrupt(format!(
                "{what}: regions add up to {} bytes, the table says {}",
                index.logical_len(),
                e.logical_len
            )));
        }
        Ok(index)
    }

    fn runs(
        &self,
        e: &SectionEntry,
        index: &ImageIndex,
        r: &RegionRec,
        mappable: bool,
    ) -> Vec<MemRun> {
        let mut runs = Vec::with_capacity(r.extent_count as usize * 2 + 1);
        let mut cursor = 0u64;
        let mut data = e.file_offset + r.data_offset;
        for x in index.region_extents(r) {
            if x.offset > cursor {
                runs.push(MemRun {
                    offset: cursor,
                    len: x.offset - cursor,
                    file_offset: None,
                    zero: true,
                });
            }
            runs.push(MemRun {
                offset: x.offset,
                len: x.len,
                file_offset: mappable.then_some(data),
                zero: false,
            });
            data += x.len;
            cursor = x.offset + x.len;
        }
        if cursor < r.size {
            runs.push(MemRun {
                offset: cursor,
                len: r.size - cursor,
                file_offset: None,
                zero: true,
            });
        }
        runs
    }

    fn is_mappable(&self, e: &SectionEntry) -> bool {
        e.compression == Compression::None && e.file_offset.is_multiple_of(DATA_ALIGN)
    }

    /// The memory map of the guest: regions with their zero and data runs (index checksum
    /// checked; the data itself is not hashed here, see [`verify`](Self::verify)).
    pub fn memory_layout(&self) -> Result<MemoryLayout> {
        let e = self
            .section(SectionKind::Memory)
            .ok_or(Error::MissingSection("memory"))?;
        let index = self.image_index(e)?;
        let mappable = self.is_mappable(e);
        let regions = index
            .regions
            .iter()
            .map(|r| RegionLayout {
                guest_addr: r.guest_addr,
                size: r.size,
                runs: self.runs(e, &index, r, mappable),
            })
            .collect();
        Ok(MemoryLayout {
            mappable,
            granule: index.granule.into(),
            regions,
        })
    }

    /// Fills `out` (exactly the region's size) with memory region `idx`, decompressing if
    /// needed and checking the region checksum. Zero runs are written only where `out` is
    /// not already zero, so fresh anonymous memory stays unpopulated.
    pub fn read_memory_region(&self, idx: usize, out: &mut [u8]) -> Result<()> {
        let e = self
            .section(SectionKind::Memory)
            .ok_or(Error::MissingSection("memory"))?;
        let index = self.image_index(e)?;
        let r = index
            .regions
            .get(idx)
            .ok_or_else(|| Error::InvalidInput(format!("memory region {idx} does not exist")))?;
        if out.len() as u64 != r.size {
            return Err(Error::InvalidInput(format!(
                "memory region {idx} is {} bytes, buffer is {}",
                r.size,
                out.len()
            )));
        }
        let mut cursor = 0usize;
        self.stream_region(e, &index, r, |off, bytes| {
            // Offsets are validated to lie within the region and increase.
            let off = off as usize;
            zero_fill(&mut out[cursor..off]);
            out[off..off + bytes.len()].copy_from_slice(bytes);
            cursor = off + bytes.len();
            Ok(())
        })?;
        zero_fill(&mut out[cursor..]);
        Ok(())
    }

    /// Streams the data of region `r` in bounded chunks as `(region offset, bytes)`, then
    /// checks the region checksum.
    fn stream_region(
        &self,
        e: &SectionEntry,
        index: &ImageIndex,
        r: &RegionRec,
        mut emit: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let what = format!("section {} ({}) region data", e.index, e.kind);
        let start = e.file_offset + r.data_offset;
        let mut reader = RangeReader::new(&self.src, start, r.data_stored_len);
        let mut buf = vec![0u8; CHUNK.min(r.data_len.max(1) as usize)];
        let bad = |err: std::io::Error| Error::corrupt(format!("{what}: {err}"));
        let digest = match e.compression {
            Compression::None => {
                for x in index.region_extents(r) {
                    let mut done = 0u64;
                    while done < x.len {
                        let n = ((x.len - done) as usize).min(buf.len());
                        reader.read_exact(&mut buf[..n]).map_err(bad)?;
                        emit(x.offset + done, &buf[..n])?;
                        done += n as u64;
                    }
                }
                reader.drain_digest().map_err(bad)?
            }
            Compression::Zstd => {
                if r.data_stored_len == 0 {
                    reader.drain_digest().map_err(bad)?
                } else {
                    let mut dec = zstd::stream::read::Decoder::new(reader).map_err(bad)?;
                    for x in index.region_extents(r) {
                        let mut done = 0u64;
                        while done < x.len {
                            let n = ((x.len - done) as usize).min(buf.len());
                            dec.read_exact(&mut buf[..n]).map_err(bad)?;
                            emit(x.offset + done, &buf[..n])?;
                            done += n as u64;
                        }
                    }
                    let mut extra = [0u8; 1];
                    if dec.read(&mut extra).map_err(bad)? != 0 {
                        return Err(Error::corrupt(format!(
                            "{what}: decompresses to more bytes than its extents"
                        )));
                    }
                    let mut reader = dec.finish().into_inner();
                    reader.drain_digest().map_err(bad)?
                }
            }
        };
        if digest != r.data_checksum {
            return Err(Error::ChecksumMismatch(what));
        }
        Ok(())
    }

    /// Every disk section, with its layout.
    pub fn disks(&self) -> Result<Vec<DiskLayout>> {
        let mut out = Vec::new();
        for (i, e) in self.sections.iter().enumerate() {
            if e.kind != SectionKind::Disk {
                continue;
            }
            let index = self.image_index(e)?;
            let [r] = index.regions.as_slice() else {
                return Err(Error::corrupt(format!(
                    "disk section {} must have exactly one region",
                    e.index
                )));
            };
            if index.name.is_empty() || r.guest_addr != 0 {
                return Err(Error::corrupt(format!(
                    "disk section {} has no name or a non-zero base",
                    e.index
                )));
            }
            let mappable = self.is_mappable(e);
            out.push(DiskLayout {
                section: i,
                name: index.name.clone(),
                size: r.size,
                mappable,
                granule: index.granule.into(),
                runs: self.runs(e, &index, r, mappable),
            });
        }
        Ok(out)
    }

    /// Streams the stored (non-zero) bytes of a disk as `(disk offset, bytes)` in bounded
    /// chunks, decompressing if needed, then checks the region checksum.
    pub fn read_disk_with(
        &self,
        disk: &DiskLayout,
        emit: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let entry = self
            .sections
            .get(disk.section)
            .filter(|e| e.kind == SectionKind::Disk)
            .ok_or_else(|| Error::InvalidInput("disk does not belong to this file".into()))?;
        let index = self.image_index(entry)?;
        let r = index
            .regions
            .first()
            .ok_or_else(|| Error::corrupt("disk section has no region"))?;
        self.stream_region(entry, &index, r, emit)
    }

    /// Checks one table entry (by table position): its checksum, and for known kinds its
    /// structure (manifest parses, blob decompresses, image index and region checksums).
    pub fn check_section(&self, table_index: usize) -> Result<()> {
        let raw = self
            .raw
            .get(table_index)
            .ok_or_else(|| Error::InvalidInput(format!("no section {table_index}")))?;
        let entry = self.sections.iter().find(|s| s.index == table_index);
        let what = format!("section {table_index} ({})", raw.kind());
        match entry {
            Some(e) if e.kind == SectionKind::Manifest => self.manifest().map(|_| ()),
            Some(e) if !e.kind.is_image() && e.stored_len <= MAX_BLOB_LEN => {
                self.read_section(e).map(|_| ())
            }
            Some(e) if e.kind.is_image() => {
                let index = self.image_index(e)?;
                // One pass: the section hash and each region's hash together.
                let mut regions: Vec<(u64, u64, u64, xxhash_rust::xxh3::Xxh3)> = index
                    .regions
                    .iter()
                    .map(|r| {
                        let s = e.file_offset + r.data_offset;
                        (
                            s,
                            s + r.data_stored_len,
                            r.data_checksum,
                            Default::default(),
                        )
                    })
                    .collect();
                let sum = hash_range(
                    &self.src,
                    e.file_offset,
                    e.stored_len,
                    &what,
                    |at, chunk| {
                        let end = at + chunk.len() as u64;
                        for (s, t, _, h) in regions.iter_mut() {
                            let a = (*s).max(at);
                            let b = (*t).min(end);
                            if a < b {
                                h.update(&chunk[(a - at) as usize..(b - at) as usize]);
                            }
                        }
                        Ok(())
                    },
                )?;
                if sum != e.checksum {
                    return Err(Error::ChecksumMismatch(what));
                }
                for (i, (_, _, want, h)) in regions.iter().enumerate() {
                    if h.digest() != *want {
                        return Err(Error::ChecksumMismatch(format!("{what} region {i}")));
                    }
                }
                Ok(())
            }
            _ => {
                let sum = hash_range(
                    &self.src,
                    self.base + raw.offset,
                    raw.stored_len,
                    &what,
                    |_, _| Ok(()),
                )?;
                if sum != raw.checksum {
                    return Err(Error::ChecksumMismatch(what));
                }
                Ok(())
            }
        }
    }

    /// Checks every checksum in the file and that all padding between sections is zero, so
    /// any changed byte of the machine is detected.
    pub fn verify(&self) -> Result<VerifyReport> {
        for i in 0..self.raw.len() {
            self.check_section(i)?;
        }
        self.check_padding()?;
        Ok(VerifyReport {
            sections_checked: self.raw.len(),
            bytes_checked: self.len,
        })
    }

    /// Checks that every byte not covered by a checksum (alignment padding) is zero.
    pub fn check_padding(&self) -> Result<()> {
        let mut covered: Vec<(u64, u64)> = self
            .raw
            .iter()
            .map(|e| (e.offset, e.offset + e.stored_len))
            .collect();
        covered.push((0, HEADER_LEN));
        let table_end = self.header.table_offset + u64::from(self.header.section_count) * ENTRY_LEN;
        covered.push((self.header.table_offset, table_end));
        covered.sort();
        let mut cursor = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        for (s, t) in covered.iter().copied().chain([(self.len, self.len)]) {
            while cursor < s {
                let n = ((s - cursor) as usize).min(buf.len());
                read_exact_at(&self.src, &mut buf[..n], self.base + cursor, "padding")?;
                if !is_zero(&buf[..n]) {
                    return Err(Error::ChecksumMismatch(format!(
                        "padding near byte {cursor} (it must be zero)"
                    )));
                }
                cursor += n as u64;
            }
            cursor = cursor.max(t);
        }
        Ok(())
    }

    /// Number of entries in the section table, skipped ones included.
    pub fn table_len(&self) -> usize {
        self.raw.len()
    }
}

fn zero_fill(b: &mut [u8]) {
    if !is_zero(b) {
        b.fill(0);
    }
}
