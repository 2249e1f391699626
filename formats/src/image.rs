//! The index of an image section (guest memory or a disk): regions, each a list of non-zero
//! extents whose bytes are stored back to back; the gaps between extents are zero.
//!
//! The index sits at the end of its section (body, then a fixed 64-byte footer) so the writer
//! can stream the data in one pass and only then write the map.

use xxhash_rust::xxh3::Xxh3;

use crate::error::{Error, Result};
use crate::layout::{put, u16_at, u32_at, u64_at};
use crate::source::{read_exact_at, ReadAt};
use crate::{Compression, DATA_ALIGN};

pub(crate) const IMAGE_MAGIC: [u8; 4] = *b"SMIX";
pub(crate) const IMAGE_VERSION: u16 = 1;
pub(crate) const FOOTER_LEN: u64 = 64;
pub(crate) const REGION_LEN: u64 = 64;
pub(crate) const EXTENT_LEN: u64 = 16;

/// Largest index body (name + region records + extent records) a reader accepts.
pub const MAX_INDEX_LEN: u64 = 64 << 20;
/// Most regions one image section may have.
pub const MAX_REGIONS: u32 = 1024;
/// Longest disk name, in bytes of UTF-8.
pub const MAX_NAME_LEN: u32 = 255;
/// Largest region or disk a reader accepts (1 TiB).
pub const MAX_IMAGE_SIZE: u64 = 1 << 40;
/// Smallest and largest zero-elision granule.
pub const MIN_GRANULE: u32 = 4096;
pub const MAX_GRANULE: u32 = 65536;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RegionRec {
    pub guest_addr: u64,
    pub size: u64,
    /// Relative to the start of the section.
    pub data_offset: u64,
    pub data_stored_len: u64,
    /// Sum of the extents' lengths (the decompressed length).
    pub data_len: u64,
    pub first_extent: u32,
    pub extent_count: u32,
    /// xxh3-64 of the `data_stored_len` stored bytes.
    pub data_checksum: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageIndex {
    pub name: String,
    pub granule: u32,
    pub regions: Vec<RegionRec>,
    pub extents: Vec<Extent>,
    /// Offset of the index body, relative to the section start.
    pub index_start: u64,
}

impl ImageIndex {
    pub(crate) fn region_extents(&self, r: &RegionRec) -> &[Extent] {
        let a = r.first_extent as usize;
        // Validated on decode (and constructed consistently by the writer).
        self.extents
            .get(a..a + r.extent_count as usize)
            .unwrap_or(&[])
    }

    pub(crate) fn logical_len(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }
}

fn pad8(n: u64) -> u64 {
    (n + 7) & !7
}

/// Encodes body and footer; the caller writes these bytes at the end of the section.
pub(crate) fn encode_index(
    name: &str,
    granule: u32,
    regions: &[RegionRec],
    extents: &[Extent],
) -> Vec<u8> {
    let name_len = name.len() as u64;
    let body_len =
        pad8(name_len) + regions.len() as u64 * REGION_LEN + extents.len() as u64 * EXTENT_LEN;
    let mut out = Vec::with_capacity((body_len + FOOTER_LEN) as usize);
    out.extend_from_slice(name.as_bytes());
    out.resize(pad8(name_len) as usize, 0);
    for r in regions {
        let mut b = [0u8; REGION_LEN as usize];
        put(&mut b, 0, &r.guest_addr.to_le_bytes());
        put(&mut b, 8, &r.size.to_le_bytes());
        put(&mut b, 16, &r.data_offset.to_le_bytes());
        put(&mut b, 24, &r.data_stored_len.to_le_bytes());
        put(&mut b, 32, &r.data_len.to_le_bytes());
        put(&mut b, 40, &r.first_extent.to_le_bytes());
        put(&mut b, 44, &r.extent_count.to_le_bytes());
        put(&mut b, 48, &r.data_checksum.to_le_bytes());
        out.extend_from_slice(&b);
    }
    for e in extents {
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
    }
    let mut f = [0u8; FOOTER_LEN as usize];
    put(&mut f, 0, &IMAGE_MAGIC);
    put(&mut f, 4, &IMAGE_VERSION.to_le_bytes());
    put(&mut f, 8, &granule.to_le_bytes());
    put(&mut f, 12, &(regions.len() as u32).to_le_bytes());
    put(&mut f, 16, &(extents.len() as u32).to_le_bytes());
    put(&mut f, 20, &(name.len() as u32).to_le_bytes());
    put(&mut f, 24, &body_len.to_le_bytes());
    let mut h = Xxh3::new();
    h.update(&out);
    h.update(&f[..56]);
    put(&mut f, 56, &h.digest().to_le_bytes());
    out.extend_from_slice(&f);
    out
}

/// Reads and validates the index of the image section at absolute `section_off`.
///
/// Every offset, length and count is checked against the section bounds and the caps above,
/// so the returned index can be walked without further checks.
pub(crate) fn decode_index<S: ReadAt + ?Sized>(
    src: &S,
    section_off: u64,
    stored_len: u64,
    codec: Compression,
    what: &str,
) -> Result<ImageIndex> {
    let bad = |m: String| Error::corrupt(format!("{what}: {m}"));
    if stored_len < FOOTER_LEN {
        return Err(bad(format!(
            "section is {stored_len} bytes, too short for its index"
        )));
    }
    let footer_off = section_off
        .checked_add(stored_len - FOOTER_LEN)
        .ok_or_else(|| bad("offset overflows".into()))?;
    let mut f = [0u8; FOOTER_LEN as usize];
    read_exact_at(src, &mut f, footer_off, what)?;
    if f[0..4] != IMAGE_MAGIC {
        return Err(bad("index footer has the wrong magic".into()));
    }
    let version = u16_at(&f, 4);
    if version != IMAGE_VERSION {
        return Err(Error::UnsupportedVersion {
            what: "image index",
            found: version.into(),
            supported: IMAGE_VERSION.into(),
        });
    }
    let granule = u32_at(&f, 8);
    let region_count = u32_at(&f, 12);
    let extent_count = u32_at(&f, 16);
    let name_len = u32_at(&f, 20);
    let body_len = u64_at(&f, 24);
    if !granule.is_power_of_two() || !(MIN_GRANULE..=MAX_GRANULE).contains(&granule) {
        return Err(bad(format!(
            "granule {granule} is not a power of two in 4096..=65536"
        )));
    }
    if region_count > MAX_REGIONS {
        return Err(Error::TooLarge {
            what: format!("{what} region count"),
            len: region_count.into(),
            cap: MAX_REGIONS.into(),
        });
    }
    if name_len > MAX_NAME_LEN {
        return Err(Error::TooLarge {
            what: format!("{what} name"),
            len: name_len.into(),
            cap: MAX_NAME_LEN.into(),
        });
    }
    if body_len > MAX_INDEX_LEN {
        return Err(Error::TooLarge {
            what: format!("{what} index"),
            len: body_len,
            cap: MAX_INDEX_LEN,
        });
    }
    // All terms are bounded (u32 counts times small sizes), so no overflow in u64.
    let expect = pad8(name_len.into())
        + u64::from(region_count) * REGION_LEN
        + u64::from(extent_count) * EXTENT_LEN;
    if expect != body_len {
        return Err(bad(format!(
            "index body is {body_len} bytes but its counts need {expect}"
        )));
    }
    if body_len > stored_len - FOOTER_LEN {
        return Err(bad("index is larger than its section".into()));
    }
    let index_start = stored_len - FOOTER_LEN - body_len;
    let mut body = vec![0u8; body_len as usize];
    read_exact_at(src, &mut body, section_off + index_start, what)?;
    let mut h = Xxh3::new();
    h.update(&body);
    h.update(&f[..56]);
    if h.digest() != u64_at(&f, 56) {
        return Err(Error::ChecksumMismatch(format!("{what} index")));
    }

    let name_end = name_len as usize;
    let name = std::str::from_utf8(&body[..name_end])
        .map_err(|_| bad("name is not UTF-8".into()))?
        .to_owned();
    let mut at = pad8(name_len.into()) as usize;
    let mut regions = Vec::with_capacity(region_count as usize);
    for _ in 0..region_count {
        let b = &body[at..at + REGION_LEN as usize];
        regions.push(RegionRec {
            guest_addr: u64_at(b, 0),
            size: u64_at(b, 8),
            data_offset: u64_at(b, 16),
            data_stored_len: u64_at(b, 24),
            data_len: u64_at(b, 32),
            first_extent: u32_at(b, 40),
            extent_count: u32_at(b, 44),
            data_checksum: u64_at(b, 48),
        });
        at += REGION_LEN as usize;
    }
    let mut extents = Vec::with_capacity(extent_count as usize);
    for _ in 0..extent_count {
        extents.push(Extent {
            offset: u64_at(&body, at),
            len: u64_at(&body, at + 8),
        });
        at += EXTENT_LEN as usize;
    }

    let g = u64::from(granule);
    let mut guest_end = 0u64;
    let mut data_end = 0u64;
    let mut next_extent = 0u64;
    for (i, r) in regions.iter().enumerate() {
        let bad_r = |m: &str| bad(format!("region {i}: {m}"));
        if r.size > MAX_IMAGE_SIZE {
            return Err(Error::TooLarge {
                what: format!("{what} region {i}"),
                len: r.size,
                cap: MAX_IMAGE_SIZE,
            });
        }
        let r_end = r
            .guest_addr
            .checked_add(r.size)
            .ok_or_else(|| bad_r("address range overflows"))?;
        if i > 0 && r.guest_addr < guest_end {
            return Err(bad_r("overlaps or precedes the previous region"));
        }
        guest_end = r_end;
        let d_end = r
            .data_offset
            .checked_add(r.data_stored_len)
            .ok_or_else(|| bad_r("data range overflows"))?;
        if r.data_offset < data_end || d_end > index_start {
            return Err(bad_r(
                "data lies outside its section or overlaps other data",
            ));
        }
        data_end = d_end;
        match codec {
            Compression::None => {
                if r.data_stored_len != r.data_len {
                    return Err(bad_r("uncompressed data length differs from its extents"));
                }
                if r.data_offset % DATA_ALIGN != 0 {
                    return Err(bad_r("uncompressed data is not 64 KiB aligned"));
                }
            }
            Compression::Zstd => {
                if r.data_len > 0 && r.data_stored_len == 0 {
                    return Err(bad_r("compressed data is missing"));
                }
            }
        }
        if u64::from(r.first_extent) != next_extent {
            return Err(bad_r("extents are not in order"));
        }
        next_extent += u64::from(r.extent_count);
        if next_extent > u64::from(extent_count) {
            return Err(bad_r("refers to extents past the end of the map"));
        }
        let mut prev_end = 0u64;
        let mut sum = 0u64;
        for e in &extents[r.first_extent as usize..next_extent as usize] {
            let e_end = e
                .offset
                .checked_add(e.len)
                .ok_or_else(|| bad_r("extent overflows"))?;
            if e.len == 0 || e.offset < prev_end || e_end > r.size {
                return Err(bad_r("extent is empty, out of order or out of range"));
            }
            if e.offset % g != 0 || (e.len % g != 0 && e_end != r.size) {
                return Err(bad_r("extent is not granule aligned"));
            }
            prev_end = e_end;
            sum += e.len;
        }
        if sum != r.data_len {
            return Err(bad_r("extent lengths do not add up to the data length"));
        }
    }
    if next_extent != u64::from(extent_count) {
        return Err(bad("extent map has entries no region uses".into()));
    }
    Ok(ImageIndex {
        name,
        granule,
        regions,
        extents,
        index_start,
    })
}
