//! Byte layout of the fixed header and the section table (see docs/FORMAT.md).

use xxhash_rust::xxh3::Xxh3;

use crate::error::{Error, Result};
use crate::{Arch, Compression, SectionKind};

/// First eight bytes of every `.smolmachine`.
pub const MACHINE_MAGIC: [u8; 8] = *b"SMOLMACH";
/// Major format version: readers reject any other major.
pub const VERSION_MAJOR: u16 = 1;
/// Minor format version: bumped for additive changes that older readers may ignore.
pub const VERSION_MINOR: u16 = 0;
/// Size of the fixed header at offset 0.
pub const HEADER_LEN: u64 = 64;
/// Size of one section-table entry.
pub const ENTRY_LEN: u64 = 64;
/// Every section starts at a multiple of this (relative to the start of the machine).
pub const SECTION_ALIGN: u64 = 8;

/// Section flag: a reader that does not understand the section must refuse the file.
pub const SECTION_FLAG_REQUIRED: u32 = 1;
/// Header flag bits 0..16 are required features (unknown ones are refused); none are defined.
pub const HEADER_REQUIRED_FEATURES_MASK: u32 = 0x0000_ffff;
/// Required feature bits this build implements.
pub const HEADER_KNOWN_FEATURES: u32 = 0;

/// The decoded fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version_major: u16,
    pub version_minor: u16,
    pub arch: Arch,
    pub flags: u32,
    pub section_count: u32,
    pub table_offset: u64,
    pub file_len: u64,
}

/// A section-table entry as stored, before kind/compression are interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawEntry {
    pub kind: u32,
    pub flags: u32,
    pub codec: u8,
    pub offset: u64,
    pub stored_len: u64,
    pub logical_len: u64,
    pub checksum: u64,
}

pub(crate) fn u16_at(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}
pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
pub(crate) fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

impl Header {
    /// Encodes the header; bytes 56..64 hold the checksum over bytes 0..56 and `table`.
    pub(crate) fn encode(&self, table: &[u8]) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        put(&mut b, 0, &MACHINE_MAGIC);
        put(&mut b, 8, &self.version_major.to_le_bytes());
        put(&mut b, 10, &self.version_minor.to_le_bytes());
        put(&mut b, 12, &self.arch.code().to_le_bytes());
        put(&mut b, 16, &self.flags.to_le_bytes());
        put(&mut b, 20, &self.section_count.to_le_bytes());
        put(&mut b, 24, &self.table_offset.to_le_bytes());
        put(&mut b, 32, &self.file_len.to_le_bytes());
        let sum = header_checksum(&b, table);
        put(&mut b, 56, &sum.to_le_bytes());
        b
    }

    /// Decodes the header. Magic and major version are checked first (they decide how the
    /// rest is laid out); the arch code is returned raw so the caller can check it after the
    /// checksum, making a damaged byte read as damage rather than as an unknown arch.
    pub(crate) fn decode(b: &[u8; HEADER_LEN as usize]) -> Result<(Header, u16)> {
        if b[0..8] != MACHINE_MAGIC {
            return Err(Error::NotAMachine("wrong magic in header".into()));
        }
        let version_major = u16_at(b, 8);
        if version_major != VERSION_MAJOR {
            return Err(Error::UnsupportedVersion {
                what: ".smolmachine",
                found: version_major.into(),
                supported: VERSION_MAJOR.into(),
            });
        }
        let arch_code = u16_at(b, 12);
        let header = Header {
            version_major,
            version_minor: u16_at(b, 10),
            arch: Arch::from_code(arch_code).unwrap_or(Arch::X86_64),
            flags: u32_at(b, 16),
            section_count: u32_at(b, 20),
            table_offset: u64_at(b, 24),
            file_len: u64_at(b, 32),
        };
        Ok((header, arch_code))
    }
}

/// xxh3-64 over header bytes 0..56 followed by the whole section table.
pub(crate) fn header_checksum(header: &[u8], table: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(&header[..56]);
    h.update(table);
    h.digest()
}

impl RawEntry {
    pub(crate) fn encode(&self) -> [u8; ENTRY_LEN as usize] {
        let mut b = [0u8; ENTRY_LEN as usize];
        put(&mut b, 0, &self.kind.to_le_bytes());
        put(&mut b, 4, &self.flags.to_le_bytes());
        b[8] = self.codec;
        put(&mut b, 16, &self.offset.to_le_bytes());
        put(&mut b, 24, &self.stored_len.to_le_bytes());
        put(&mut b, 32, &self.logical_len.to_le_bytes());
        put(&mut b, 40, &self.checksum.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8]) -> RawEntry {
        RawEntry {
            kind: u32_at(b, 0),
            flags: u32_at(b, 4),
            codec: b[8],
            offset: u64_at(b, 16),
            stored_len: u64_at(b, 24),
            logical_len: u64_at(b, 32),
            checksum: u64_at(b, 40),
        }
    }

    pub(crate) fn required(&self) -> bool {
        self.flags & SECTION_FLAG_REQUIRED != 0
    }

    pub(crate) fn kind(&self) -> SectionKind {
        SectionKind::from_code(self.kind)
    }

    pub(crate) fn compression(&self) -> Option<Compression> {
        Compression::from_code(self.codec)
    }
}

/// Rounds `v` up to a multiple of `align` (a power of two); `None` on overflow.
pub(crate) fn align_up(v: u64, align: u64) -> Option<u64> {
    Some(v.checked_add(align - 1)? & !(align - 1))
}
