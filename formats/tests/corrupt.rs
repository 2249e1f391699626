//! Hostile and damaged input: every case must be a clear error, never a panic.

mod common;

use common::*;
use smolvm_formats::{Compression, Error, MachineReader, SectionKind};

fn open(bytes: &[u8]) -> Result<MachineReader<&[u8]>, Error> {
    MachineReader::from_source(bytes, 0, bytes.len() as u64)
}

const TABLE: usize = 24;

fn table_offset(b: &[u8]) -> usize {
    u64_at(b, TABLE) as usize
}

#[test]
fn every_truncation_is_refused() {
    for codec in [Compression::None, Compression::Zstd] {
        let bytes = sample_bytes(codec);
        // Step through all short prefixes and then coarser ones.
        let mut len = 0;
        while len < bytes.len() {
            let err = open(&bytes[..len]).err();
            assert!(err.is_some(), "prefix of {len} bytes opened");
            len += if len < 256 { 1 } else { 997 };
        }
        assert!(open(&bytes).is_ok());
    }
}

#[test]
fn trailing_bytes_are_refused() {
    let mut bytes = sample_bytes(Compression::None);
    bytes.push(0);
    let err = open(&bytes).unwrap_err();
    assert!(err.to_string().contains("unexpected bytes"), "{err}");
}

#[test]
fn every_byte_flip_is_detected() {
    // Exhaustive over every bit of a tiny compressed machine (no 64 KiB padding).
    let bytes = tiny_bytes(Compression::Zstd);
    assert!(bytes.len() < 4096, "sample is {} bytes", bytes.len());
    assert!(smolvm_formats::testing::exercise(&bytes));
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mask = 1u8 << bit;
            let mut b = bytes.clone();
            b[i] ^= mask;
            let ok = open(&b).map(|r| r.verify().is_ok()).unwrap_or(false);
            assert!(!ok, "flip of byte {i} mask {mask:#x} went unnoticed");
            smolvm_formats::testing::exercise(&b);
        }
    }
}

#[test]
fn flips_in_uncompressed_sample_are_detected() {
    // The uncompressed sample is mostly padding and data; sample every 61st byte.
    let bytes = tiny_bytes(Compression::None);
    for i in (0..bytes.len())
        .step_by(251)
        .chain(bytes.len() - 64..bytes.len())
    {
        let mut b = bytes.clone();
        b[i] ^= 0x10;
        let ok = open(&b).map(|r| r.verify().is_ok()).unwrap_or(false);
        assert!(!ok, "flip of byte {i} went unnoticed");
    }
}

#[test]
fn header_errors_are_specific() {
    let bytes = sample_bytes(Compression::Zstd);

    let mut b = bytes.clone();
    b[0] = b'X';
    assert!(matches!(open(&b), Err(Error::NotAMachine(_))));

    let mut b = bytes.clone();
    b[8] = 2; // major version 2
    let err = open(&b).unwrap_err();
    assert!(matches!(err, Error::UnsupportedVersion { found: 2, .. }));
    assert!(err.to_string().contains("upgrade"), "{err}");

    // A newer minor version is accepted.
    let mut b = bytes.clone();
    patch(&mut b, |h, _| h[10] = 7);
    let r = open(&b).unwrap();
    assert_eq!(r.header().version_minor, 7);
    r.verify().unwrap();

    let mut b = bytes.clone();
    patch(&mut b, |h, _| h[12] = 9);
    assert!(matches!(open(&b), Err(Error::UnsupportedArch(9))));
    // The same byte damaged in place reads as damage, not as a new architecture.
    let mut b = bytes.clone();
    b[12] = 9;
    assert!(matches!(open(&b), Err(Error::ChecksumMismatch(_))));

    // Unknown required feature bit refused; unknown optional bit ignored.
    let mut b = bytes.clone();
    patch(&mut b, |h, _| set_u32(h, 16, 1 << 3));
    assert!(matches!(open(&b), Err(Error::UnsupportedFeatures(8))));
    let mut b = bytes.clone();
    patch(&mut b, |h, _| set_u32(h, 16, 1 << 20));
    open(&b).unwrap().verify().unwrap();

    // Checksum damage in the header itself.
    let mut b = bytes.clone();
    b[40] ^= 1; // reserved byte
    assert!(matches!(open(&b), Err(Error::ChecksumMismatch(_))));

    // Absurd section count and table offsets.
    let mut b = bytes.clone();
    set_u32(&mut b, 20, u32::MAX);
    assert!(matches!(open(&b), Err(Error::TooLarge { .. })));
    for off in [0u64, 8, u64::MAX, u64::MAX - 10, bytes.len() as u64] {
        let mut b = bytes.clone();
        set_u64(&mut b, TABLE, off);
        assert!(open(&b).is_err(), "table offset {off} accepted");
    }
    for len in [0u64, 63, u64::MAX, bytes.len() as u64 + 1] {
        let mut b = bytes.clone();
        patch(&mut b, |h, _| set_u64(h, 32, len));
        assert!(open(&b).is_err(), "file_len {len} accepted");
    }
}

#[test]
fn section_ranges_are_checked() {
    let bytes = sample_bytes(Compression::Zstd);
    let vm = entry_of(&bytes, SectionKind::VmState);
    let mf = entry_of(&bytes, SectionKind::Manifest);
    let tab = table_offset(&bytes);
    type TableEdit = Box<dyn Fn(&mut [u8])>;
    let cases: Vec<(&str, TableEdit)> = vec![
        (
            "offset in header",
            Box::new(move |t: &mut [u8]| set_u64(&mut t[vm * 64..], 16, 8)),
        ),
        (
            "offset past end",
            Box::new(move |t: &mut [u8]| set_u64(&mut t[vm * 64..], 16, u64::MAX - 3)),
        ),
        (
            "length overflows",
            Box::new(move |t: &mut [u8]| set_u64(&mut t[vm * 64..], 24, u64::MAX)),
        ),
        (
            "runs into table",
            Box::new(move |t: &mut [u8]| set_u64(&mut t[vm * 64..], 24, tab as u64)),
        ),
        (
            "overlaps manifest",
            Box::new(move |t: &mut [u8]| {
                let off = u64_at(&t[mf * 64..], 16);
                set_u64(&mut t[vm * 64..], 16, off + 1);
            }),
        ),
        (
            "duplicate manifest",
            Box::new(move |t: &mut [u8]| set_u32(&mut t[vm * 64..], 0, 1)),
        ),
        (
            "unknown required kind",
            Box::new(move |t: &mut [u8]| set_u32(&mut t[vm * 64..], 0, 999)),
        ),
        (
            "unknown compression",
            Box::new(move |t: &mut [u8]| t[vm * 64 + 8] = 42),
        ),
    ];
    for (name, f) in cases {
        let mut b = bytes.clone();
        patch(&mut b, |_, t| f(t));
        let err = open(&b).err();
        assert!(err.is_some(), "{name}: accepted");
    }

    // Optional + unknown compression: skipped, still hashed by verify.
    let mut b = bytes.clone();
    patch(&mut b, |_, t| {
        t[vm * 64 + 8] = 42;
        set_u32(&mut t[vm * 64..], 4, 0);
    });
    let r = open(&b).unwrap();
    assert_eq!(r.skipped_sections(), 1);
    assert!(r.section(SectionKind::VmState).is_none());
    r.verify().unwrap();

    // Wrong logical length of a compressed blob: detected when read.
    let mut b = bytes.clone();
    patch(&mut b, |_, t| set_u64(&mut t[vm * 64..], 32, 5));
    let r = open(&b).unwrap();
    assert!(matches!(
        r.read_blob(SectionKind::VmState),
        Err(Error::Corrupt(_))
    ));
    assert!(r.verify().is_err());

    // Absurd logical length: capped, no allocation.
    let mut b = bytes.clone();
    patch(&mut b, |_, t| set_u64(&mut t[vm * 64..], 32, u64::MAX));
    let r = open(&b).unwrap();
    assert!(matches!(
        r.read_blob(SectionKind::VmState),
        Err(Error::TooLarge { .. })
    ));
}

#[test]
fn section_checksum_is_checked_on_full_reads() {
    let bytes = sample_bytes(Compression::None);
    let r = open(&bytes).unwrap();
    let vm = r.section(SectionKind::VmState).unwrap().offset as usize;
    let mut b = bytes.clone();
    b[vm] ^= 1;
    let r = open(&b).unwrap();
    let err = r.read_blob(SectionKind::VmState).unwrap_err();
    assert!(matches!(err, Error::ChecksumMismatch(_)));
    assert!(err.to_string().contains("damaged"), "{err}");
}

#[test]
fn memory_data_damage_is_found_by_verify_and_region_reads() {
    let bytes = sample_bytes(Compression::None);
    let r = open(&bytes).unwrap();
    let l = r.memory_layout().unwrap();
    let fo = l.regions[0]
        .runs
        .iter()
        .find_map(|x| x.file_offset)
        .unwrap() as usize;
    let mut b = bytes.clone();
    b[fo + 5] ^= 0x40;
    let r = open(&b).unwrap();
    // Layout reads only the index, so it still works (mapping does not hash data)...
    r.memory_layout().unwrap();
    // ...but a full region read and verify both catch it.
    let mut out = vec![0u8; l.regions[0].size as usize];
    assert!(matches!(
        r.read_memory_region(0, &mut out),
        Err(Error::ChecksumMismatch(_))
    ));
    assert!(matches!(r.verify(), Err(Error::ChecksumMismatch(_))));
}

#[test]
fn image_index_damage_is_refused() {
    let bytes = sample_bytes(Compression::None);
    let r = open(&bytes).unwrap();
    let m = r.section(SectionKind::Memory).unwrap().clone();
    let footer = (m.offset + m.stored_len - 64) as usize;
    // Each field of the footer and the start of the body.
    for at in [0usize, 4, 8, 12, 16, 20, 24, 56] {
        let mut b = bytes.clone();
        b[footer + at] ^= 0x04;
        let r = open(&b).unwrap();
        assert!(r.memory_layout().is_err(), "footer byte {at} flip accepted");
    }
    let mut b = bytes.clone();
    b[footer - 8] ^= 1; // last extent record
    assert!(matches!(
        open(&b).unwrap().memory_layout(),
        Err(Error::ChecksumMismatch(_))
    ));
}

/// Rewrites the memory index with `f` applied to the decoded fields, re-sealing the index
/// checksum, the section checksum and the header, to reach each structural check.
fn with_index(bytes: &[u8], f: impl Fn(&mut Vec<u8>, usize)) -> Vec<u8> {
    let r = open(bytes).unwrap();
    let m = r.section(SectionKind::Memory).unwrap().clone();
    let mut b = bytes.to_vec();
    let end = (m.offset + m.stored_len) as usize;
    let footer = end - 64;
    let body_len = u64_at(&b, footer + 24) as usize;
    let body = footer - body_len;
    f(&mut b, body);
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&b[body..footer]);
    h.update(&b[footer..footer + 56]);
    set_u64(&mut b, footer + 56, h.digest());
    let sum = xxhash_rust::xxh3::xxh3_64(&b[m.offset as usize..end]);
    let idx = m.index;
    patch(&mut b, |_, t| set_u64(&mut t[idx * 64..], 40, sum));
    b
}

#[test]
fn image_index_structure_is_validated() {
    let bytes = sample_bytes(Compression::None);
    // Region records start at the body (name_len is 0 for memory); extents follow two
    // 64-byte regions.
    let reg = |i: usize, field: usize| i * 64 + field;
    let ext = |i: usize, field: usize| 128 + i * 16 + field;
    type Edit = Box<dyn Fn(&mut Vec<u8>, usize)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "region overlap",
            Box::new(move |b, s| set_u64(b, s + reg(1, 0), 100)),
        ),
        (
            "region addr overflow",
            Box::new(move |b, s| set_u64(b, s + reg(1, 0), u64::MAX - 10)),
        ),
        (
            "huge region",
            Box::new(move |b, s| set_u64(b, s + reg(0, 8), 1 << 50)),
        ),
        (
            "data past index",
            Box::new(move |b, s| set_u64(b, s + reg(1, 16), 1 << 40)),
        ),
        (
            "unaligned data",
            Box::new(move |b, s| {
                let v = u64_at(b, s + reg(1, 16));
                set_u64(b, s + reg(1, 16), v + 4096);
            }),
        ),
        (
            "stored != data len",
            Box::new(move |b, s| {
                let v = u64_at(b, s + reg(0, 24));
                set_u64(b, s + reg(0, 24), v - 4096);
            }),
        ),
        (
            "first_extent gap",
            Box::new(move |b, s| set_u32(b, s + reg(1, 40), 0)),
        ),
        (
            "extent count too big",
            Box::new(move |b, s| set_u32(b, s + reg(1, 44), 1000)),
        ),
        (
            "extent unaligned",
            Box::new(move |b, s| {
                let v = u64_at(b, s + ext(0, 0));
                set_u64(b, s + ext(0, 0), v + 1);
            }),
        ),
        (
            "extent empty",
            Box::new(move |b, s| set_u64(b, s + ext(0, 8), 0)),
        ),
        (
            "extent past region",
            Box::new(move |b, s| set_u64(b, s + ext(0, 0), 1 << 30)),
        ),
        (
            "extent len overflow",
            Box::new(move |b, s| set_u64(b, s + ext(0, 8), u64::MAX - 4095)),
        ),
        (
            "extents out of order",
            Box::new(move |b, s| {
                let a = u64_at(b, s + ext(0, 0));
                let c = u64_at(b, s + ext(1, 0));
                set_u64(b, s + ext(0, 0), c);
                set_u64(b, s + ext(1, 0), a);
            }),
        ),
    ];
    assert!(open(&with_index(&bytes, |_, _| {}))
        .unwrap()
        .verify()
        .is_ok());
    for (name, f) in cases {
        let b = with_index(&bytes, f);
        let r = open(&b).unwrap();
        let err = r.memory_layout().err();
        assert!(
            matches!(err, Some(Error::Corrupt(_)) | Some(Error::TooLarge { .. })),
            "{name}: {err:?}"
        );
        assert!(r.verify().is_err(), "{name}: verify passed");
        smolvm_formats::testing::exercise(&b);
    }
}

#[test]
fn random_garbage_never_panics() {
    let mut seed = 1u64;
    for len in [0usize, 1, 7, 8, 63, 64, 65, 200, 4096] {
        for _ in 0..50 {
            let mut b = vec![0u8; len];
            fill(&mut b, seed);
            seed += 1;
            if len >= 8 && seed.is_multiple_of(2) {
                b[..8].copy_from_slice(b"SMOLMACH");
            }
            assert!(!smolvm_formats::testing::exercise(&b));
        }
    }
}

#[test]
fn guest_memory_over_the_limit_is_refused_at_open() {
    use smolvm_formats::{testing::inflate, MAX_GUEST_MEMORY};
    let tib = 1u64 << 40;
    // The sample's two memory regions claim 1 TiB each: a well-formed 2 TiB claim in a file
    // of a few hundred KiB.
    let mut b = sample_bytes(Compression::None);
    inflate(&mut b, SectionKind::Memory, tib, false);
    let err = open(&b).unwrap_err();
    assert!(
        matches!(err, Error::GuestMemoryTooLarge(n) if n == 2 * tib),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "machine claims 2048 GiB of guest memory, more than the 1024 GiB limit"
    );
    // Half a TiB each is exactly the limit: it opens and lays out.
    let mut b = sample_bytes(Compression::Zstd);
    inflate(&mut b, SectionKind::Memory, tib / 2, false);
    let r = open(&b).unwrap();
    assert_eq!(r.memory_layout().unwrap().total_bytes(), MAX_GUEST_MEMORY);
    // The manifest's own claim is held to the same limit.
    let mut m = manifest();
    m.memory_bytes = MAX_GUEST_MEMORY + 1;
    assert!(matches!(m.validate(), Err(Error::GuestMemoryTooLarge(_))));
}

#[test]
fn blob_limit_is_shared_by_writer_and_reader() {
    use smolvm_formats::{Arch, MachineWriter, MAX_BLOB_LEN};
    let dir = tempfile::tempdir().unwrap();
    let mut w = MachineWriter::create(&dir.path().join("m"), Arch::X86_64).unwrap();
    let big = vec![0u8; MAX_BLOB_LEN as usize + 1];
    assert!(w
        .add_blob(SectionKind::VmState, &big, Compression::Zstd)
        .is_err());
    // A stored logical length one past the limit is refused when read.
    let mut b = sample_bytes(Compression::Zstd);
    let vm = entry_of(&b, SectionKind::VmState);
    patch(&mut b, |_, t| {
        set_u64(&mut t[vm * 64..], 32, MAX_BLOB_LEN + 1)
    });
    assert!(matches!(
        open(&b).unwrap().read_blob(SectionKind::VmState),
        Err(Error::TooLarge { cap, .. }) if cap == MAX_BLOB_LEN
    ));
}
