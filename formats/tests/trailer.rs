//! Packed executables: pack, locate, open through the trailer, ELF extent checks.

mod common;

use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::*;
use smolvm_formats::trailer::{self, Trailer, TRAILER_LEN};
use smolvm_formats::{testing, Compression, Error, MachineReader, DATA_ALIGN};

fn tiny_stub(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("stub");
    fs::write(&p, testing::tiny_elf()).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn pack_locate_open_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.smolmachine");
    write_sample(&m, Compression::None, None);
    let stub = tiny_stub(dir.path());
    let out = dir.path().join("app");
    let t = trailer::pack(&stub, &m, &out).unwrap();
    assert_eq!(t.payload_offset, DATA_ALIGN);
    assert_eq!(t.stub_len, testing::tiny_elf().len() as u64);
    let mode = fs::metadata(&out).unwrap().permissions().mode();
    assert_eq!(mode & 0o111, 0o111, "packed file is executable");
    let total = fs::metadata(&out).unwrap().len();
    assert_eq!(total, t.payload_offset + t.payload_len + TRAILER_LEN);

    let f = fs::File::open(&out).unwrap();
    assert_eq!(trailer::locate(&f).unwrap(), Some(t));
    assert_eq!(trailer::check_stub_extent(&f, &t).unwrap(), t.stub_len);

    // The machine inside is byte-identical and opens through the trailer.
    let mut payload = vec![0u8; t.payload_len as usize];
    f.read_exact_at(&mut payload, t.payload_offset).unwrap();
    assert_eq!(payload, fs::read(&m).unwrap());
    let r = MachineReader::open(&out).unwrap();
    assert_eq!(r.trailer(), Some(&t));
    assert_eq!(r.base(), t.payload_offset);
    assert_eq!(r.manifest().unwrap(), manifest());
    let l = r.memory_layout().unwrap();
    assert!(l.mappable);
    let (low, _) = memory();
    for run in l.regions[0].runs.iter().filter(|x| !x.zero) {
        let fo = run.file_offset.unwrap();
        assert_eq!(fo % 4096, 0);
        assert!(
            fo > t.payload_offset,
            "offsets are absolute in the executable"
        );
        let mut buf = vec![0u8; run.len as usize];
        r.file().read_exact_at(&mut buf, fo).unwrap();
        assert_eq!(
            buf,
            low[run.offset as usize..(run.offset + run.len) as usize]
        );
    }
    r.verify().unwrap();

    // The appended payload does not disturb the stub: it still runs.
    let status = Command::new(&out).status().unwrap();
    assert!(status.success());

    // A packed executable can itself be the machine input; its payload is reused.
    let again = dir.path().join("app2");
    let t2 = trailer::pack(&stub, &out, &again).unwrap();
    assert_eq!(t2, t);
    assert_eq!(fs::read(&again).unwrap(), fs::read(&out).unwrap());
}

#[test]
fn real_stub_and_strip() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.smolmachine");
    write_sample(&m, Compression::Zstd, None);
    // Any dynamically linked system ELF with section headers works as a stub here.
    let stub = dir.path().join("true");
    fs::copy("/bin/true", &stub).unwrap();
    let out = dir.path().join("app");
    let t = trailer::pack(&stub, &m, &out).unwrap();
    assert_eq!(t.payload_offset % DATA_ALIGN, 0);
    let f = fs::File::open(&out).unwrap();
    let extent = trailer::check_stub_extent(&f, &t).unwrap();
    assert!(extent <= t.stub_len && extent > 0);
    assert!(Command::new(&out).status().unwrap().success());
    MachineReader::open(&out).unwrap().verify().unwrap();

    // What `strip` leaves: the ELF image only. Use the real tool where installed.
    let stripped = dir.path().join("stripped");
    fs::copy(&out, &stripped).unwrap();
    let used_strip = Command::new("strip")
        .arg(&stripped)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !used_strip {
        eprintln!("strip not installed; truncating to the ELF extent instead");
        fs::OpenOptions::new()
            .write(true)
            .open(&stripped)
            .unwrap()
            .set_len(extent)
            .unwrap();
    }
    assert!(trailer::locate(&fs::File::open(&stripped).unwrap())
        .unwrap()
        .is_none());
    let err = MachineReader::open(&stripped).unwrap_err();
    assert!(matches!(err, Error::TrailerMissing));
    assert!(err.to_string().contains("strip"), "{err}");
}

#[test]
fn pack_refuses_bad_stubs() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.smolmachine");
    write_sample(&m, Compression::Zstd, None);
    let out = dir.path().join("app");

    let not_elf = dir.path().join("script");
    fs::write(&not_elf, "#!/bin/sh\necho hi\n").unwrap();
    assert!(matches!(
        trailer::pack(&not_elf, &m, &out),
        Err(Error::Elf(_))
    ));

    // Headers that point past the end of the stub: a truncated ELF.
    let mut elf = testing::tiny_elf();
    elf.truncate(100);
    let trunc = dir.path().join("trunc");
    fs::write(&trunc, &elf).unwrap();
    assert!(matches!(
        trailer::pack(&trunc, &m, &out),
        Err(Error::Elf(_))
    ));

    let stub = tiny_stub(dir.path());
    trailer::pack(&stub, &m, &out).unwrap();
    let err = trailer::pack(&out, &m, &dir.path().join("x")).unwrap_err();
    assert!(
        err.to_string().contains("already carries a payload"),
        "{err}"
    );

    // Not a machine, or a damaged one.
    assert!(trailer::pack(&stub, &not_elf, &dir.path().join("y")).is_err());
    let mut bytes = fs::read(&m).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    let damaged = dir.path().join("damaged.smolmachine");
    fs::write(&damaged, &bytes).unwrap();
    assert!(trailer::pack(&stub, &damaged, &dir.path().join("y")).is_err());
    assert!(!dir.path().join("x").exists() && !dir.path().join("y").exists());
}

fn packed_bytes() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.smolmachine");
    fs::write(&m, tiny_bytes(Compression::Zstd)).unwrap();
    let out = dir.path().join("app");
    trailer::pack(&tiny_stub(dir.path()), &m, &out).unwrap();
    fs::read(&out).unwrap()
}

fn set_trailer(bytes: &mut [u8], t: Trailer) {
    let n = bytes.len();
    bytes[n - 64..].copy_from_slice(&t.encode());
}

#[test]
fn trailer_damage_is_refused() {
    let bytes = packed_bytes();
    let good = trailer::locate_in(bytes.as_slice()).unwrap().unwrap();
    assert!(testing::exercise(&bytes));

    // A flipped bit anywhere in the trailer: checksum error (or, in the magic, "no trailer").
    let n = bytes.len();
    for i in n - 64..n {
        let mut b = bytes.clone();
        b[i] ^= 0x02;
        match trailer::locate_in(b.as_slice()) {
            Ok(None) => assert!(i < n - 56, "byte {i}"),
            Ok(Some(t)) => panic!("flip at {i} accepted: {t:?}"),
            Err(_) => {}
        }
    }

    let bad = [
        Trailer {
            payload_offset: good.payload_offset + 8,
            payload_len: good.payload_len - 8,
            ..good
        },
        Trailer {
            payload_len: good.payload_len + 1,
            ..good
        },
        Trailer {
            payload_offset: 0,
            payload_len: (n - 64) as u64,
            ..good
        },
        Trailer {
            stub_len: good.payload_offset + 1,
            ..good
        },
        Trailer {
            payload_offset: u64::MAX - 65535,
            ..good
        },
        Trailer {
            payload_len: u64::MAX,
            ..good
        },
    ];
    for t in bad {
        let mut b = bytes.clone();
        set_trailer(&mut b, t);
        assert!(trailer::locate_in(b.as_slice()).is_err(), "{t:?} accepted");
        testing::exercise(&b);
    }

    // Version 2: refused with an upgrade hint.
    let mut b = bytes.clone();
    let mut rec = good.encode();
    rec[8] = 2;
    let sum = xxhash_rust::xxh3::xxh3_64(&rec[..56]);
    rec[56..].copy_from_slice(&sum.to_le_bytes());
    b[n - 64..].copy_from_slice(&rec);
    let err = trailer::locate_in(b.as_slice()).unwrap_err();
    assert!(err.to_string().contains("upgrade"), "{err}");

    // A stub whose ELF image reaches into the payload.
    let mut b = bytes.clone();
    // p_filesz of the single program header (at 64 + 32).
    set_u64(&mut b, 64 + 32, good.payload_offset + 10);
    let t = trailer::locate_in(b.as_slice()).unwrap().unwrap();
    let err = trailer::check_stub_extent(b.as_slice(), &t).unwrap_err();
    assert!(err.to_string().contains("past the payload"), "{err}");

    assert!(trailer::locate_in(&b"short"[..]).unwrap().is_none());
    assert!(trailer::locate_in(tiny_bytes(Compression::None).as_slice())
        .unwrap()
        .is_none());
}

#[test]
fn open_explains_unknown_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("junk");
    fs::write(&p, b"hello world, not a machine").unwrap();
    assert!(matches!(
        MachineReader::open(&p),
        Err(Error::NotAMachine(_))
    ));
    fs::write(&p, b"").unwrap();
    assert!(matches!(
        MachineReader::open(&p),
        Err(Error::NotAMachine(_))
    ));
    let stub = tiny_stub(dir.path());
    assert!(matches!(
        MachineReader::open(&stub),
        Err(Error::TrailerMissing)
    ));
    assert!(matches!(
        MachineReader::open(&dir.path().join("missing")),
        Err(Error::Io { .. })
    ));
}
