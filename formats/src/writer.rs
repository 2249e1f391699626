//! Streaming, atomic `.smolmachine` writer.
//!
//! Sections are written one after another in a single pass; guest memory and disks are scanned
//! granule by granule and only non-zero runs are written, straight from the caller's memory or
//! a bounded read buffer, so a whole image is never held in RAM. The table goes at the end and
//! the header is written last, at offset 0, once everything else is known.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use xxhash_rust::xxh3::Xxh3;

use crate::atomic::AtomicFile;
use crate::error::{Error, Result};
use crate::image::{self, encode_index, Extent, RegionRec};
use crate::layout::{
    align_up, Header, RawEntry, ENTRY_LEN, HEADER_LEN, SECTION_ALIGN, SECTION_FLAG_REQUIRED,
    VERSION_MAJOR, VERSION_MINOR,
};
use crate::manifest::Manifest;
use crate::reader::{DiskLayout, MachineReader, SectionEntry};
use crate::signature::{self, SecretKey};
use crate::source::{read_exact_at, ReadAt, CHUNK};
use crate::{Arch, Compression, SectionKind, DATA_ALIGN, MAX_BLOB_LEN, MAX_SECTIONS};

/// Default zero-elision granule: the smallest host page size.
pub const DEFAULT_GRANULE: u32 = 4096;
/// The zstd level of compressed sections: fast, and most of the gain on memory images comes
/// from zero pages.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

static ZEROS: [u8; DATA_ALIGN as usize] = [0u8; DATA_ALIGN as usize];

/// Zero gaps of up to this many bytes between two stretches of data are stored as data in
/// uncompressed memory, so they join one extent: a resume maps each extent with its own
/// `mmap`, and a booted Linux guest's memory is scattered data with many short zero gaps
/// (examples/hello: 158 extents, 142 of the gaps at most 64 KiB and 1.2 MiB of them in all;
/// bridged, 16 extents for 5 % more file).
pub const MEMORY_BRIDGE_GAP: u64 = 64 * 1024;

/// One guest memory region as the VMM sees it: guest-physical base and the host mapping.
#[derive(Debug, Clone, Copy)]
pub struct GuestRegion<'a> {
    pub guest_addr: u64,
    pub data: &'a [u8],
}

/// Output with position tracking and the running hashes of the current section and region.
struct Out {
    w: BufWriter<File>,
    pos: u64,
    section: Option<Xxh3>,
    region: Option<Xxh3>,
}

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.w.write(buf)?;
        if let Some(h) = &mut self.section {
            h.update(&buf[..n]);
        }
        if let Some(h) = &mut self.region {
            h.update(&buf[..n]);
        }
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

impl Out {
    fn pad_to(&mut self, align: u64) -> io::Result<()> {
        let target = align_up(self.pos, align)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
        while self.pos < target {
            let n = ((target - self.pos) as usize).min(ZEROS.len());
            self.write_all(&ZEROS[..n])?;
        }
        Ok(())
    }
}

/// True if every byte is zero; word-at-a-time so it runs near memory bandwidth.
pub fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            acc |= u64::from_ne_bytes(a);
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&x| x == 0)
}

enum Sink<'o> {
    Raw(&'o mut Out),
    #[cfg(feature = "compress")]
    Zstd(zstd::stream::write::Encoder<'static, &'o mut Out>),
}

/// Receives a region's bytes in order and writes only the non-zero granules.
struct RegionEmitter<'o> {
    sink: Sink<'o>,
    granule: u64,
    extents: Vec<Extent>,
    data_len: u64,
    max_extents: usize,
    /// Zero gaps up to this long are written out as data ([`MEMORY_BRIDGE_GAP`]); 0: none.
    bridge: u64,
}

impl<'o> RegionEmitter<'o> {
    fn new(
        out: &'o mut Out,
        codec: Compression,
        level: i32,
        granule: u32,
        max_extents: usize,
        bridge: u64,
    ) -> Result<Self> {
        let sink = match codec {
            Compression::None => Sink::Raw(out),
            #[cfg(feature = "compress")]
            Compression::Zstd => Sink::Zstd(
                zstd::stream::write::Encoder::new(out, level)
                    .map_err(|e| Error::io("starting zstd stream", e))?,
            ),
            #[cfg(not(feature = "compress"))]
            Compression::Zstd => {
                let _ = level;
                return Err(no_compress());
            }
        };
        Ok(RegionEmitter {
            sink,
            granule: u64::from(granule),
            extents: Vec::new(),
            data_len: 0,
            max_extents,
            bridge,
        })
    }

    /// Feeds bytes starting at region offset `offset` (a granule multiple, increasing).
    fn feed(&mut self, offset: u64, chunk: &[u8]) -> Result<()> {
        let g = self.granule as usize;
        let mut i = 0usize;
        while i < chunk.len() {
            // Skip zero granules.
            while i < chunk.len() && is_zero(&chunk[i..(i + g).min(chunk.len())]) {
                i += g;
            }
            if i >= chunk.len() {
                break;
            }
            let start = i;
            while i < chunk.len() && !is_zero(&chunk[i..(i + g).min(chunk.len())]) {
                i += g;
            }
            let end = i.min(chunk.len());
            let off = offset + start as u64;
            let len = (end - start) as u64;
            if let Some(last) = self.extents.last() {
                let gap = off - (last.offset + last.len);
                if gap > 0 && gap <= self.bridge {
                    self.write_zeros(gap)?;
                }
            }
            match self.extents.last_mut() {
                Some(last) if last.offset + last.len == off => last.len += len,
                _ => {
                    if self.extents.len() >= self.max_extents {
                        return Err(Error::InvalidInput(
                            "image is too fragmented for the extent map limit; use a larger granule"
                                .into(),
                        ));
                    }
                    self.extents.push(Extent { offset: off, len });
                }
            }
            self.data_len += len;
            self.write(&chunk[start..end])?;
        }
        Ok(())
    }

    /// Writes stored bytes of the region to the sink.
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        match &mut self.sink {
            Sink::Raw(o) => o.write_all(bytes),
            #[cfg(feature = "compress")]
            Sink::Zstd(e) => e.write_all(bytes),
        }
        .map_err(|e| Error::io("writing image data", e))
    }

    /// Stores a bridged zero gap of `len` bytes: the last extent grows over it.
    fn write_zeros(&mut self, mut len: u64) -> Result<()> {
        if let Some(last) = self.extents.last_mut() {
            last.len += len;
        }
        self.data_len += len;
        while len > 0 {
            let n = len.min(ZEROS.len() as u64) as usize;
            self.write(&ZEROS[..n])?;
            len -= n as u64;
        }
        Ok(())
    }

    fn finish(self) -> Result<(Vec<Extent>, u64)> {
        #[cfg(feature = "compress")]
        if let Sink::Zstd(enc) = self.sink {
            enc.finish()
                .map_err(|e| Error::io("finishing zstd stream", e))?;
        }
        Ok((self.extents, self.data_len))
    }
}

/// Streams a `.smolmachine` to a temp file and renames it into place on [`finish`].
///
/// Dropping the writer without calling `finish` deletes the temp file. The temp file is
/// `.NAME.PID.N.tmp` beside the output and locked (`flock`) while the writer lives; creating
/// a writer removes the unlocked temp files of earlier writers of the same output, which were
/// killed before they could (see [`crate::atomic`]).
///
/// [`finish`]: MachineWriter::finish
pub struct MachineWriter {
    file: AtomicFile,
    out: Out,
    arch: Arch,
    entries: Vec<RawEntry>,
    granule: u32,
    failed: bool,
}

impl std::fmt::Debug for MachineWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineWriter")
            .field("tmp", &self.file.tmp_path())
            .field("arch", &self.arch)
            .field("sections", &self.entries.len())
            .finish()
    }
}

impl MachineWriter {
    /// Starts a machine for `arch` that will appear at `path` when finished.
    pub fn create(path: &Path, arch: Arch) -> Result<MachineWriter> {
        let file = AtomicFile::create(path)?;
        let dup = file
            .file()
            .try_clone()
            .map_err(|e| Error::io("duplicating output handle", e))?;
        let mut out = Out {
            w: BufWriter::with_capacity(CHUNK, dup),
            pos: 0,
            section: None,
            region: None,
        };
        // Placeholder; the real header is written at offset 0 by `finish`.
        out.write_all(&[0u8; HEADER_LEN as usize])
            .map_err(|e| Error::io(format!("writing {}", file.tmp_path().display()), e))?;
        Ok(MachineWriter {
            file,
            out,
            arch,
            entries: Vec::new(),
            granule: DEFAULT_GRANULE,
            failed: false,
        })
    }

    /// Sets the zero-elision granule for memory and disks written after this call (a power of
    /// two in 4096..=65536). Use the largest host page size the file must be mappable on.
    pub fn set_granule(&mut self, granule: u32) -> Result<()> {
        if !granule.is_power_of_two()
            || !(image::MIN_GRANULE..=image::MAX_GRANULE).contains(&granule)
        {
            return Err(Error::InvalidInput(format!(
                "granule {granule} must be a power of two in 4096..=65536"
            )));
        }
        self.granule = granule;
        Ok(())
    }

    /// Adds the manifest (required, exactly once).
    pub fn add_manifest(&mut self, manifest: &Manifest) -> Result<()> {
        let json = manifest.to_json()?;
        self.add_section(SectionKind::Manifest, true, &json, Compression::None)
    }

    /// Adds an opaque blob such as the VM and vCPU state. `kind` must not be `Manifest`,
    /// `Memory` or `Disk` (they have their own methods); known kinds are marked required.
    pub fn add_blob(
        &mut self,
        kind: SectionKind,
        data: &[u8],
        compression: Compression,
    ) -> Result<()> {
        let required = !matches!(kind, SectionKind::Unknown(_));
        self.add_blob_with(kind, data, compression, required)
    }

    /// Like [`add_blob`](Self::add_blob) with an explicit required flag; an optional section
    /// of a kind a reader does not know is skipped by that reader instead of refused.
    pub fn add_blob_with(
        &mut self,
        kind: SectionKind,
        data: &[u8],
        compression: Compression,
        required: bool,
    ) -> Result<()> {
        match kind {
            SectionKind::Manifest
            | SectionKind::Memory
            | SectionKind::Disk
            | SectionKind::Signature => {
                return Err(Error::InvalidInput(format!(
                    "{kind} sections have a dedicated writer method"
                )))
            }
            SectionKind::Unknown(code) if SectionKind::from_code(code) != kind => {
                return Err(Error::InvalidInput(format!(
                    "section code {code} is a known kind; use that kind"
                )))
            }
            _ => {}
        }
        self.add_section(kind, required, data, compression)
    }

    fn check_can_add(&self, kind: SectionKind) -> Result<()> {
        if self.failed {
            return Err(Error::InvalidInput(
                "an earlier write failed; start a new writer".into(),
            ));
        }
        if self.entries.len() >= MAX_SECTIONS as usize {
            return Err(Error::InvalidInput(format!(
                "a .smolmachine holds at most {MAX_SECTIONS} sections"
            )));
        }
        if self
            .entries
            .iter()
            .any(|e| e.kind() == SectionKind::Signature)
        {
            return Err(Error::InvalidInput(
                "the signature must be the last section; add it last".into(),
            ));
        }
        if kind.is_singleton() && self.entries.iter().any(|e| e.kind() == kind) {
            return Err(Error::InvalidInput(format!(
                "the machine already has a {kind} section"
            )));
        }
        Ok(())
    }

    fn add_section(
        &mut self,
        kind: SectionKind,
        required: bool,
        data: &[u8],
        compression: Compression,
    ) -> Result<()> {
        self.check_can_add(kind)?;
        let level = DEFAULT_ZSTD_LEVEL;
        if data.len() as u64 > MAX_BLOB_LEN {
            return Err(Error::InvalidInput(format!(
                "{kind} blob is {} bytes; readers accept at most {MAX_BLOB_LEN}",
                data.len()
            )));
        }
        let r = self.write_section(kind, required, compression, |out| {
            write_blob(out, data, compression, level)
                .map_err(|e| Error::io("writing section", e))?;
            Ok(data.len() as u64)
        });
        self.fail_on_err(r)
    }

    fn fail_on_err<T>(&mut self, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    /// Writes one section with `body`, which returns the logical length.
    fn write_section(
        &mut self,
        kind: SectionKind,
        required: bool,
        compression: Compression,
        body: impl FnOnce(&mut Out) -> Result<u64>,
    ) -> Result<()> {
        // Raw image data must map in place; compressed sections only need word alignment.
        let align = if kind.is_image() && compression == Compression::None {
            DATA_ALIGN
        } else {
            SECTION_ALIGN
        };
        self.out
            .pad_to(align)
            .map_err(|e| Error::io("writing padding", e))?;
        let start = self.out.pos;
        self.out.section = Some(Xxh3::new());
        let logical = body(&mut self.out);
        let hasher = self.out.section.take();
        let logical = logical?;
        self.entries.push(RawEntry {
            kind: kind.code(),
            flags: if required { SECTION_FLAG_REQUIRED } else { 0 },
            codec: compression.code(),
            offset: start,
            stored_len: self.out.pos - start,
            logical_len: logical,
            checksum: hasher.map(|h| h.digest()).unwrap_or(0),
        });
        Ok(())
    }

    /// Adds guest memory. Regions must be sorted by guest address and must not overlap; each
    /// is scanned in granules and only non-zero runs are stored. Uncompressed, every region's
    /// data starts 64 KiB aligned so the VMM can map it straight from the file.
    pub fn add_memory(
        &mut self,
        regions: &[GuestRegion<'_>],
        compression: Compression,
    ) -> Result<()> {
        self.check_can_add(SectionKind::Memory)?;
        if regions.len() > image::MAX_REGIONS as usize {
            return Err(Error::InvalidInput(format!(
                "at most {} memory regions",
                image::MAX_REGIONS
            )));
        }
        let mut end = 0u64;
        for (i, r) in regions.iter().enumerate() {
            let size = r.data.len() as u64;
            if size > image::MAX_IMAGE_SIZE {
                return Err(Error::InvalidInput(format!(
                    "memory region {i} is larger than 1 TiB"
                )));
            }
            if (i > 0 && r.guest_addr < end) || r.guest_addr.checked_add(size).is_none() {
                return Err(Error::InvalidInput(format!(
                    "memory region {i} overlaps or is not sorted by guest address"
                )));
            }
            end = r.guest_addr + size;
        }
        let total: u64 = regions.iter().map(|r| r.data.len() as u64).sum();
        if total > crate::MAX_GUEST_MEMORY {
            return Err(Error::GuestMemoryTooLarge(total));
        }
        let granule = self.granule;
        let level = DEFAULT_ZSTD_LEVEL;
        let r = self.write_section(SectionKind::Memory, true, compression, |out| {
            write_image(
                out,
                "",
                Encoding {
                    granule,
                    level,
                    codec: compression,
                    // Only mappable memory gains from fewer extents.
                    bridge: if compression == Compression::None {
                        MEMORY_BRIDGE_GAP
                    } else {
                        0
                    },
                },
                regions.len(),
                |i, em| {
                    let r = &regions[i];
                    let g = u64::from(granule) as usize;
                    // Feed in CHUNK-sized pieces (a multiple of the granule).
                    let step = CHUNK.max(g);
                    let mut off = 0usize;
                    while off < r.data.len() {
                        let end = (off + step).min(r.data.len());
                        em.feed(off as u64, &r.data[off..end])?;
                        off = end;
                    }
                    Ok((r.guest_addr, r.data.len() as u64))
                },
            )
        });
        self.fail_on_err(r)
    }

    /// Adds a disk image read from `src`. Holes (via `SEEK_DATA`/`SEEK_HOLE`) are skipped
    /// without reading and zero granules are elided, so a sparse disk stays small. Moves the
    /// file position of `src`.
    pub fn add_disk(&mut self, name: &str, src: &mut File, compression: Compression) -> Result<()> {
        self.check_can_add(SectionKind::Disk)?;
        if name.is_empty() || name.len() > image::MAX_NAME_LEN as usize {
            return Err(Error::InvalidInput(format!(
                "disk name must be 1..={} bytes",
                image::MAX_NAME_LEN
            )));
        }
        let size = src
            .metadata()
            .map_err(|e| Error::io(format!("reading size of disk {name}"), e))?
            .len();
        if size > image::MAX_IMAGE_SIZE {
            return Err(Error::InvalidInput(format!(
                "disk {name} is larger than 1 TiB"
            )));
        }
        let granule = self.granule;
        let level = DEFAULT_ZSTD_LEVEL;
        let r = self.write_section(SectionKind::Disk, true, compression, |out| {
            let enc = Encoding {
                granule,
                level,
                codec: compression,
                bridge: 0,
            };
            write_image(out, name, enc, 1, |_, em| {
                let g = u64::from(granule);
                let mut buf = vec![0u8; CHUNK.max(g as usize)];
                let mut off = 0u64;
                while off < size {
                    let Some((data, hole)) = next_data(src, off, size)? else {
                        break;
                    };
                    let mut a = (data / g * g).max(off);
                    let b = align_up(hole, g).unwrap_or(size).min(size);
                    while a < b {
                        let n = ((b - a) as usize).min(buf.len());
                        read_exact_at(&*src, &mut buf[..n], a, "disk image")?;
                        em.feed(a, &buf[..n])?;
                        a += n as u64;
                    }
                    off = b.max(off + 1);
                }
                Ok((0, size))
            })
        });
        self.fail_on_err(r)
    }

    /// Rewrites the machine `src` at `dest` (atomically) with its uncompressed memory and
    /// disk sections zstd-compressed: the distributable form of a machine, which the VMM
    /// expands once into its cache before mapping it. Every other section, and image sections
    /// already compressed, are copied byte for byte (same compression, flags and checksum, in
    /// table order); optional sections this build cannot decode are dropped. Zero granules
    /// stay elided at the source's granule. Verify `src` first: raw memory is copied as read
    /// (disk data is checked against its region checksum on the way).
    ///
    /// A signature section is dropped (its digests no longer match the re-encoded sections);
    /// with `key` the result is signed again.
    pub fn compress_from<S: ReadAt>(
        src: &MachineReader<S>,
        dest: &Path,
        key: Option<&SecretKey>,
    ) -> Result<()> {
        let mut w = MachineWriter::create(dest, src.arch())?;
        let disks = if src.sections().iter().any(|e| e.kind == SectionKind::Disk) {
            src.disks()?
        } else {
            Vec::new()
        };
        for (i, e) in src.sections().iter().enumerate() {
            let raw = e.compression == Compression::None;
            match e.kind {
                SectionKind::Memory if raw => w.compress_memory_from(src, e)?,
                SectionKind::Disk if raw => {
                    let d = disks.iter().find(|d| d.section == i).ok_or_else(|| {
                        Error::corrupt(format!("disk section {} has no layout", e.index))
                    })?;
                    w.compress_disk_from(src, e, d)?;
                }
                SectionKind::Signature => {}
                _ => w.copy_section_from(src, e)?,
            }
        }
        if let Some(key) = key {
            w.add_signature(key)?;
        }
        w.finish()
    }

    /// Rewrites `src` at `dest` (atomically) with every section copied byte for byte (same
    /// offsets when `src` was written by this writer) except its signature, which is dropped;
    /// with `key` a new signature is added. `smolpack sign` is this with `dest` = the file
    /// itself. Copying reads every byte, and the checksum of every copied section is checked
    /// on the way (a damaged source is refused).
    pub fn copy_from<S: ReadAt>(
        src: &MachineReader<S>,
        dest: &Path,
        key: Option<&SecretKey>,
    ) -> Result<()> {
        if src.skipped_sections() > 0 {
            return Err(Error::InvalidInput(format!(
                "{} optional sections use an encoding this build does not know; upgrade smolpack",
                src.skipped_sections()
            )));
        }
        let mut w = MachineWriter::create(dest, src.arch())?;
        for e in src.sections() {
            if e.kind != SectionKind::Signature {
                w.copy_section_from(src, e)?;
            }
        }
        if let Some(key) = key {
            w.add_signature(key)?;
        }
        w.finish()
    }

    /// Signs the machine written so far: SHA-512 of every section as written, then the
    /// Ed25519 signature over the header fields, the table entries and those digests, as
    /// the last section. Nothing may be added after it.
    pub fn add_signature(&mut self, key: &SecretKey) -> Result<()> {
        self.check_can_add(SectionKind::Signature)?;
        let ctx = format!("writing {}", self.file.tmp_path().display());
        let r = self.out.flush().map_err(|e| Error::io(&ctx, e));
        self.fail_on_err(r)?;
        let digests: Result<Vec<[u8; 64]>> = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let what = format!("section {i} as written");
                signature::digest_range(self.file.file(), e.offset, e.stored_len, &what)
            })
            .collect();
        let digests = self.fail_on_err(digests)?;
        let header = Header {
            version_major: VERSION_MAJOR,
            version_minor: VERSION_MINOR,
            arch: self.arch,
            flags: 0,
            section_count: 0,
            table_offset: 0,
            file_len: 0,
        }
        .encode(&[]);
        let entries: Vec<[u8; ENTRY_LEN as usize]> =
            self.entries.iter().map(|e| e.encode()).collect();
        let refs: Vec<&[u8]> = entries.iter().map(|e| &e[..]).collect();
        let section = signature::encode(key, &header, &refs, &digests);
        self.add_section(SectionKind::Signature, false, &section, Compression::None)
    }

    /// Copies section `e` of `src` byte for byte; its checksum must still match.
    fn copy_section_from<S: ReadAt>(
        &mut self,
        src: &MachineReader<S>,
        e: &SectionEntry,
    ) -> Result<()> {
        self.check_can_add(e.kind)?;
        let what = format!("section {} ({})", e.index, e.kind);
        let r = self.write_section(e.kind, e.required, e.compression, |out| {
            let mut buf = vec![0u8; CHUNK.min(e.stored_len as usize)];
            let mut done = 0u64;
            while done < e.stored_len {
                let n = ((e.stored_len - done) as usize).min(buf.len());
                read_exact_at(src.source(), &mut buf[..n], e.file_offset + done, &what)?;
                out.write_all(&buf[..n])
                    .map_err(|err| Error::io("writing section", err))?;
                done += n as u64;
            }
            Ok(e.logical_len)
        });
        let r = r.and_then(|()| match self.entries.last() {
            Some(x) if x.checksum == e.checksum => Ok(()),
            _ => Err(Error::ChecksumMismatch(what)),
        });
        self.fail_on_err(r)
    }

    /// Re-encodes the uncompressed memory section `e` of `src` with zstd.
    fn compress_memory_from<S: ReadAt>(
        &mut self,
        src: &MachineReader<S>,
        e: &SectionEntry,
    ) -> Result<()> {
        self.check_can_add(SectionKind::Memory)?;
        let layout = src.memory_layout()?;
        if !layout.mappable {
            return Err(Error::InvalidInput(
                "the memory section is not 64 KiB aligned in its file; cannot re-encode it".into(),
            ));
        }
        let granule = u32::try_from(layout.granule)
            .map_err(|_| Error::corrupt("memory granule out of range"))?;
        self.set_granule(granule)?;
        let level = DEFAULT_ZSTD_LEVEL;
        let regions = &layout.regions;
        let r = self.write_section(SectionKind::Memory, e.required, Compression::Zstd, |out| {
            write_image(
                out,
                "",
                Encoding {
                    granule,
                    level,
                    codec: Compression::Zstd,
                    bridge: 0,
                },
                regions.len(),
                |i, em| {
                    let reg = &regions[i];
                    let mut buf = vec![0u8; CHUNK];
                    for run in reg.runs.iter().filter(|r| !r.zero) {
                        let at = run
                            .file_offset
                            .ok_or_else(|| Error::corrupt("memory run without file offset"))?;
                        let mut done = 0u64;
                        while done < run.len {
                            let n = ((run.len - done) as usize).min(buf.len());
                            read_exact_at(src.source(), &mut buf[..n], at + done, "memory data")?;
                            em.feed(run.offset + done, &buf[..n])?;
                            done += n as u64;
                        }
                    }
                    Ok((reg.guest_addr, reg.size))
                },
            )
        });
        self.fail_on_err(r)
    }

    /// Re-encodes the uncompressed disk section `e` (layout `d`) of `src` with zstd.
    fn compress_disk_from<S: ReadAt>(
        &mut self,
        src: &MachineReader<S>,
        e: &SectionEntry,
        d: &DiskLayout,
    ) -> Result<()> {
        self.check_can_add(SectionKind::Disk)?;
        let granule =
            u32::try_from(d.granule).map_err(|_| Error::corrupt("disk granule out of range"))?;
        self.set_granule(granule)?;
        let level = DEFAULT_ZSTD_LEVEL;
        let r = self.write_section(SectionKind::Disk, e.required, Compression::Zstd, |out| {
            write_image(
                out,
                &d.name,
                Encoding {
                    granule,
                    level,
                    codec: Compression::Zstd,
                    bridge: 0,
                },
                1,
                |_, em| {
                    src.read_disk_with(d, |off, bytes| em.feed(off, bytes))?;
                    Ok((0, d.size))
                },
            )
        });
        self.fail_on_err(r)
    }

    /// Writes the table and header, syncs, and renames the file into place.
    pub fn finish(mut self) -> Result<()> {
        if self.failed {
            return Err(Error::InvalidInput(
                "an earlier write failed; nothing was written".into(),
            ));
        }
        if !self
            .entries
            .iter()
            .any(|e| e.kind() == SectionKind::Manifest)
        {
            return Err(Error::InvalidInput(
                "a .smolmachine needs a manifest; call add_manifest".into(),
            ));
        }
        let ctx = format!("writing {}", self.file.tmp_path().display());
        self.out
            .pad_to(SECTION_ALIGN)
            .map_err(|e| Error::io(&ctx, e))?;
        let table_offset = self.out.pos;
        let mut table = Vec::with_capacity(self.entries.len() * ENTRY_LEN as usize);
        for e in &self.entries {
            table.extend_from_slice(&e.encode());
        }
        self.out.write_all(&table).map_err(|e| Error::io(&ctx, e))?;
        self.out.flush().map_err(|e| Error::io(&ctx, e))?;
        let header = Header {
            version_major: VERSION_MAJOR,
            version_minor: VERSION_MINOR,
            arch: self.arch,
            flags: 0,
            section_count: self.entries.len() as u32,
            table_offset,
            file_len: self.out.pos,
        }
        .encode(&table);
        self.file
            .file()
            .write_all_at(&header, 0)
            .map_err(|e| Error::io(&ctx, e))?;
        self.file.commit(None)
    }
}

/// The error for a compressed section asked of a build without the `compress` feature
/// (the VMM runtime reads compressed machines but never writes them).
#[cfg(not(feature = "compress"))]
fn no_compress() -> Error {
    Error::InvalidInput(
        "this build writes no compressed sections (smolvm-formats without the `compress` feature)"
            .into(),
    )
}

fn write_blob(out: &mut Out, data: &[u8], codec: Compression, level: i32) -> io::Result<()> {
    match codec {
        Compression::None => out.write_all(data),
        #[cfg(not(feature = "compress"))]
        Compression::Zstd => {
            let _ = level;
            Err(io::Error::other(no_compress()))
        }
        #[cfg(feature = "compress")]
        Compression::Zstd => {
            let mut enc = zstd::stream::write::Encoder::new(out, level)?;
            enc.include_contentsize(true)?;
            enc.set_pledged_src_size(Some(data.len() as u64))?;
            enc.write_all(data)?;
            enc.finish()?;
            Ok(())
        }
    }
}

/// Writes the data of `count` regions, then the index. `fill(i, emitter)` feeds region `i`
/// and returns its guest address and size. Returns the section's logical length.
/// How an image section's regions are stored.
struct Encoding {
    granule: u32,
    level: i32,
    codec: Compression,
    /// Zero gaps bridged into extents ([`MEMORY_BRIDGE_GAP`] or 0).
    bridge: u64,
}

fn write_image(
    out: &mut Out,
    name: &str,
    enc: Encoding,
    count: usize,
    mut fill: impl FnMut(usize, &mut RegionEmitter<'_>) -> Result<(u64, u64)>,
) -> Result<u64> {
    let start = out.pos;
    let Encoding {
        granule,
        level,
        codec,
        bridge,
    } = enc;
    let max_extents = (image::MAX_INDEX_LEN / image::EXTENT_LEN) as usize;
    let mut recs = Vec::with_capacity(count);
    let mut all = Vec::new();
    for i in 0..count {
        if codec == Compression::None {
            out.pad_to(DATA_ALIGN)
                .map_err(|e| Error::io("writing padding", e))?;
        }
        let data_offset = out.pos - start;
        out.region = Some(Xxh3::new());
        let mut em = RegionEmitter::new(
            &mut *out,
            codec,
            level,
            granule,
            max_extents.saturating_sub(all.len()),
            bridge,
        )?;
        let (guest_addr, size) = fill(i, &mut em)?;
        let (extents, data_len) = em.finish()?;
        let data_checksum = out.region.take().map(|h| h.digest()).unwrap_or(0);
        recs.push(RegionRec {
            guest_addr,
            size,
            data_offset,
            data_stored_len: out.pos - start - data_offset,
            data_len,
            first_extent: all.len() as u32,
            extent_count: extents.len() as u32,
            data_checksum,
        });
        all.extend(extents);
    }
    let index = encode_index(name, granule, &recs, &all);
    out.write_all(&index)
        .map_err(|e| Error::io("writing image index", e))?;
    Ok(recs.iter().map(|r| r.size).sum())
}

/// Finds the next data segment at or after `off` with `SEEK_DATA`/`SEEK_HOLE`; where the
/// filesystem does not support them, the rest of the file counts as data.
fn next_data(src: &File, off: u64, size: u64) -> Result<Option<(u64, u64)>> {
    let fd = src.as_raw_fd();
    let Ok(off_i) = i64::try_from(off) else {
        return Ok(None);
    };
    // SAFETY: lseek on a valid open fd only moves its file position; no memory is touched.
    let data = unsafe { libc::lseek(fd, off_i, libc::SEEK_DATA) };
    if data < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some((off, size))),
            _ => Err(Error::io("seeking disk image data", e)),
        };
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
    let hole = if hole < 0 { size } else { hole as u64 };
    Ok(Some((data as u64, hole.min(size))))
}

#[cfg(test)]
mod tests {
    use super::is_zero;
    use crate::{Arch, Compression, GuestRegion, MachineReader, MachineWriter, Manifest};
    use crate::{DiskLayout, SectionKind};

    /// The non-zero bytes of a disk, by offset.
    fn disk_bytes(r: &MachineReader, d: &DiskLayout) -> Vec<(u64, u8)> {
        let mut v = Vec::new();
        r.read_disk_with(d, |off, b| {
            v.extend(
                b.iter()
                    .enumerate()
                    .filter(|(_, &x)| x != 0)
                    .map(|(i, &x)| (off + i as u64, x)),
            );
            Ok(())
        })
        .unwrap();
        v
    }

    #[test]
    fn compress_from_keeps_the_machine_and_compresses_images() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("raw.smolmachine");
        let mut low = vec![0u8; 64 * 4096];
        low[4096..3 * 4096].fill(0x11);
        low[63 * 4096 + 5] = 9;
        let mut high = vec![0u8; 3 * 1024 * 1024 + 4096];
        for (i, b) in high.iter_mut().enumerate().skip(1 << 20).take(1 << 20) {
            *b = (i % 251) as u8;
        }
        let mut disk = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut disk, &vec![7u8; 20000]).unwrap();
        let mut w = MachineWriter::create(&src, Arch::X86_64).unwrap();
        w.add_manifest(&Manifest {
            name: "c".into(),
            ..Default::default()
        })
        .unwrap();
        w.add_blob(SectionKind::VmState, b"state bytes", Compression::None)
            .unwrap();
        w.add_blob_with(SectionKind::Unknown(99), b"extra", Compression::Zstd, false)
            .unwrap();
        w.add_memory(
            &[
                GuestRegion {
                    guest_addr: 0,
                    data: &low,
                },
                GuestRegion {
                    guest_addr: 1 << 32,
                    data: &high,
                },
            ],
            Compression::None,
        )
        .unwrap();
        w.add_disk("root", &mut disk, Compression::None).unwrap();
        w.finish().unwrap();

        let r = MachineReader::open(&src).unwrap();
        let dest = dir.path().join("zstd.smolmachine");
        MachineWriter::compress_from(&r, &dest, None).unwrap();
        let c = MachineReader::open(&dest).unwrap();
        c.verify().unwrap();
        assert!(c.len() < r.len());
        for (a, b) in r.sections().iter().zip(c.sections()) {
            assert_eq!(a.kind, b.kind);
            assert_eq!(a.required, b.required);
            if a.kind.is_image() {
                assert_eq!(b.compression, Compression::Zstd);
            } else {
                assert_eq!((a.compression, a.checksum), (b.compression, b.checksum));
            }
        }
        assert_eq!(c.manifest().unwrap(), r.manifest().unwrap());
        let (lr, lc) = (r.memory_layout().unwrap(), c.memory_layout().unwrap());
        assert!(!lc.mappable);
        assert_eq!(lr.data_bytes(), lc.data_bytes());
        for (i, reg) in lr.regions.iter().enumerate() {
            let mut x = vec![0u8; reg.size as usize];
            let mut y = vec![0u8; reg.size as usize];
            r.read_memory_region(i, &mut x).unwrap();
            c.read_memory_region(i, &mut y).unwrap();
            assert!(x == y, "region {i}");
        }
        let (dr, dc) = (r.disks().unwrap(), c.disks().unwrap());
        assert_eq!(disk_bytes(&r, &dr[0]), disk_bytes(&c, &dc[0]));
        assert_eq!((dc[0].name.as_str(), dc[0].size), ("root", 20000));

        // Already compressed: the same bytes again (byte-for-byte section copies).
        let again = dir.path().join("again.smolmachine");
        MachineWriter::compress_from(&c, &again, None).unwrap();
        assert_eq!(
            std::fs::read(&again).unwrap(),
            std::fs::read(&dest).unwrap()
        );
    }

    #[test]
    fn is_zero_sees_every_position() {
        for len in [0usize, 1, 7, 8, 63, 64, 65, 127, 200, 4096] {
            let mut b = vec![0u8; len];
            assert!(is_zero(&b));
            for i in 0..len {
                b[i] = 0x80;
                assert!(!is_zero(&b), "len {len} pos {i}");
                b[i] = 0;
            }
        }
    }
}
