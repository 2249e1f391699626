//! Signed machines: signing, trusted and untrusted keys, any byte changed after signing, and
//! signatures through pack, unpack, re-pack and compression.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use proptest::prelude::*;
use smolvm_formats::signature::{verify_signature, PublicKey, SecretKey};
use smolvm_formats::{testing, trailer, Compression, Error, MachineReader, MachineWriter};

fn key(n: u8) -> SecretKey {
    SecretKey::from_seed([n; 32])
}

fn open(bytes: &[u8]) -> Result<MachineReader<&[u8]>, Error> {
    MachineReader::from_source(bytes, 0, bytes.len() as u64)
}

fn sign_file(src: &Path, dest: &Path, k: &SecretKey) {
    let r = MachineReader::open(src).unwrap();
    MachineWriter::copy_from(&r, dest, Some(k)).unwrap();
}

fn signed_bytes(codec: Compression, k: &SecretKey) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m");
    fs::write(&p, tiny_bytes(codec)).unwrap();
    sign_file(&p, &p, k);
    fs::read(&p).unwrap()
}

/// Whether `bytes` passes every check a trusting reader makes: it opens, the signature is
/// by `trusted` and matches, and `verify` (checksums, zero padding) passes.
fn accepted(bytes: &[u8], trusted: &PublicKey) -> bool {
    let Ok(r) = open(bytes) else { return false };
    verify_signature(&r, &[*trusted]).is_ok() && r.verify().is_ok()
}

#[test]
fn signed_verifies_and_unsigned_or_untrusted_is_refused() {
    let (a, b) = (key(1), key(2));
    for codec in [Compression::None, Compression::Zstd] {
        let unsigned = tiny_bytes(codec);
        let r = open(&unsigned).unwrap();
        assert!(r.signature_info().unwrap().is_none());
        assert!(matches!(
            verify_signature(&r, &[a.public()]),
            Err(Error::Unsigned)
        ));

        let signed = signed_bytes(codec, &a);
        let r = open(&signed).unwrap();
        r.verify().unwrap();
        let info = verify_signature(&r, &[b.public(), a.public()]).unwrap();
        assert_eq!(info.key, a.public());
        assert_eq!(info.covered, r.table_len() - 1);
        assert_eq!(r.signature_info().unwrap().unwrap(), info);
        let err = verify_signature(&r, &[b.public()]).unwrap_err();
        assert!(
            matches!(&err, Error::UntrustedKey(id) if *id == a.public().id()),
            "{err}"
        );
        // Everything but the signature is copied byte for byte, at the same offsets.
        let u = open(&unsigned).unwrap();
        for (x, y) in u.sections().iter().zip(r.sections()) {
            assert_eq!(
                (x.kind, x.offset, x.checksum),
                (y.kind, y.offset, y.checksum)
            );
            let (s, t) = (x.offset as usize, (x.offset + x.stored_len) as usize);
            assert_eq!(unsigned[s..t], signed[s..t]);
        }
        // The machine reads the same (manifest and memory).
        assert_eq!(u.manifest().unwrap(), r.manifest().unwrap());
        assert_eq!(u.memory_layout().unwrap().regions.len(), 2);
    }
}

#[test]
fn re_signing_replaces_the_signature() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m");
    fs::write(&p, signed_bytes(Compression::None, &key(1))).unwrap();
    sign_file(&p, &p, &key(2));
    let r = MachineReader::open(&p).unwrap();
    assert_eq!(
        r.sections()
            .iter()
            .filter(|s| s.kind == smolvm_formats::SectionKind::Signature)
            .count(),
        1
    );
    assert!(verify_signature(&r, &[key(2).public()]).is_ok());
    assert!(matches!(
        verify_signature(&r, &[key(1).public()]),
        Err(Error::UntrustedKey(_))
    ));
    // Dropping it gives back the unsigned machine exactly.
    MachineWriter::copy_from(&r, &dir.path().join("u"), None).unwrap();
    assert_eq!(
        fs::read(dir.path().join("u")).unwrap(),
        tiny_bytes(Compression::None)
    );
}

/// Every byte of a signed zstd machine (about 1 KiB) flipped, as given and with every
/// checksum recomputed as an attacker would: never accepted. Inside a covered section or the
/// table the signature check itself refuses it.
#[test]
fn any_flipped_byte_after_signing_is_refused() {
    let a = key(1);
    let signed = signed_bytes(Compression::Zstd, &a);
    assert!(accepted(&signed, &a.public()));
    let r = open(&signed).unwrap();
    let in_section = |i: usize| {
        r.sections()
            .iter()
            .any(|s| (s.offset as usize..(s.offset + s.stored_len) as usize).contains(&i))
    };
    for i in 0..signed.len() {
        for resealed in [false, true] {
            let mut b = signed.clone();
            b[i] ^= 0x40;
            if resealed {
                testing::reseal(&mut b);
            }
            if b == signed {
                continue; // The byte was a checksum, and resealing put it back.
            }
            assert!(
                !accepted(&b, &a.public()),
                "byte {i} flipped (resealed: {resealed}) was accepted"
            );
            if resealed && in_section(i) {
                if let Ok(m) = open(&b) {
                    assert!(verify_signature(&m, &[a.public()]).is_err(), "byte {i}");
                }
            }
        }
    }
}

/// The raw machine is larger (64 KiB aligned data): every 61st byte and every byte of the
/// header, the table and the signature section.
#[test]
fn flipped_bytes_in_a_raw_machine_are_refused() {
    let a = key(3);
    let signed = signed_bytes(Compression::None, &a);
    let table = u64_at(&signed, 24) as usize;
    let sig = open(&signed).unwrap();
    let sig = sig.sections().last().unwrap().offset as usize;
    let positions = (0..signed.len())
        .step_by(61)
        .chain(0..64)
        .chain(sig..signed.len())
        .chain(table..signed.len());
    for i in positions {
        let mut b = signed.clone();
        b[i] ^= 1;
        testing::reseal(&mut b);
        if b == signed {
            continue; // A checksum byte, put back by resealing.
        }
        assert!(!accepted(&b, &a.public()), "byte {i} flipped was accepted");
    }
}

#[test]
fn packed_executables_carry_the_signature_through_unpack_and_pack() {
    let a = key(4);
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    fs::write(&m, signed_bytes(Compression::None, &a)).unwrap();
    let stub = dir.path().join("stub");
    fs::write(&stub, testing::tiny_elf()).unwrap();
    let app = dir.path().join("app");
    trailer::pack(&stub, &m, &app).unwrap();
    let r = MachineReader::open(&app).unwrap();
    assert!(r.trailer().is_some());
    verify_signature(&r, &[a.public()]).unwrap();
    let back = dir.path().join("back");
    trailer::unpack(&app, &back).unwrap();
    assert_eq!(fs::read(&back).unwrap(), fs::read(&m).unwrap());
    let again = dir.path().join("again");
    trailer::pack(&stub, &back, &again).unwrap();
    verify_signature(&MachineReader::open(&again).unwrap(), &[a.public()]).unwrap();
    // A byte of the payload's memory changed (and every checksum resealed) is refused.
    let mut bytes = fs::read(&again).unwrap();
    let t = trailer::locate_in(bytes.as_slice()).unwrap().unwrap();
    let r = MachineReader::open(&again).unwrap();
    let mem = r.section(smolvm_formats::SectionKind::Memory).unwrap();
    bytes[(mem.file_offset + 5) as usize] ^= 0xff;
    testing::reseal(&mut bytes);
    let r = MachineReader::from_source(bytes.as_slice(), t.payload_offset, t.payload_len).unwrap();
    // The resealed table now holds a new xxh3 checksum, so the signed message differs.
    let err = verify_signature(&r, &[a.public()]).unwrap_err();
    assert!(matches!(err, Error::BadSignature(_)), "{err}");
}

#[test]
fn compression_drops_the_signature_unless_given_a_key() {
    let a = key(5);
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    fs::write(&m, signed_bytes(Compression::None, &a)).unwrap();
    let r = MachineReader::open(&m).unwrap();
    let c = dir.path().join("c");
    MachineWriter::compress_from(&r, &c, None).unwrap();
    let rc = MachineReader::open(&c).unwrap();
    rc.verify().unwrap();
    assert!(matches!(
        verify_signature(&rc, &[a.public()]),
        Err(Error::Unsigned)
    ));
    MachineWriter::compress_from(&r, &c, Some(&a)).unwrap();
    let rc = MachineReader::open(&c).unwrap();
    assert!(rc
        .sections()
        .iter()
        .any(|s| s.compression == Compression::Zstd));
    verify_signature(&rc, &[a.public()]).unwrap();
}

#[test]
fn nothing_can_be_added_after_the_signature() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m");
    let mut w = MachineWriter::create(&p, smolvm_formats::Arch::X86_64).unwrap();
    w.add_manifest(&manifest()).unwrap();
    w.add_signature(&key(1)).unwrap();
    let err = w
        .add_blob(
            smolvm_formats::SectionKind::VmState,
            b"x",
            Compression::None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("last section"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random damage to a signed machine, resealed or not, is never accepted; the
    /// signature section's parser never panics on it.
    #[test]
    fn random_damage_to_a_signed_machine_is_never_accepted(
        flips in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..4),
        reseal in any::<bool>(),
        zstd in any::<bool>(),
    ) {
        let a = key(9);
        let codec = if zstd { Compression::Zstd } else { Compression::None };
        let signed = signed_bytes(codec, &a);
        let mut b = signed.clone();
        for (at, x) in &flips {
            let n = b.len();
            b[at % n] ^= x;
        }
        if reseal {
            testing::reseal(&mut b);
        }
        testing::exercise(&b);
        prop_assert!(b == signed || !accepted(&b, &a.public()));
    }
}
