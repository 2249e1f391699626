//! Writer → reader round trips: contents, layouts, alignment, atomicity, API misuse.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

use common::*;
use smolvm_formats::{
    Arch, Compression, Error, GuestRegion, MachineReader, MachineWriter, Manifest, SectionKind,
    DATA_ALIGN,
};

fn check_runs_cover(size: u64, runs: &[smolvm_formats::MemRun], granule: u64) {
    let mut cursor = 0;
    for r in runs {
        assert_eq!(r.offset, cursor, "runs must be contiguous and sorted");
        assert!(r.len > 0);
        assert_eq!(r.offset % granule, 0);
        assert!(r.len % granule == 0 || r.offset + r.len == size);
        if r.zero {
            assert!(r.file_offset.is_none());
        }
        cursor += r.len;
    }
    assert_eq!(cursor, size, "runs must cover the region exactly");
}

#[test]
fn uncompressed_round_trip_maps_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.smolmachine");
    write_sample(&p, Compression::None, None);
    let r = MachineReader::open(&p).unwrap();
    assert_eq!(r.arch(), Arch::X86_64);
    assert_eq!(r.manifest().unwrap(), manifest());
    assert_eq!(
        r.read_blob(SectionKind::VmState).unwrap(),
        b"opaque vm state v1"
    );
    assert!(r.trailer().is_none());

    let (low, high) = memory();
    let l = r.memory_layout().unwrap();
    assert!(l.mappable);
    assert_eq!(l.granule, 4096);
    assert_eq!(l.regions.len(), 2);
    assert_eq!(l.regions[0].guest_addr, 0);
    assert_eq!(l.regions[1].guest_addr, 0x1_0000_0000);
    assert_eq!(l.total_bytes(), (low.len() + high.len()) as u64);
    // low: pages 1-2, page 10, page 31; high: pages 2-3. Uncompressed memory bridges zero
    // gaps of up to 64 KiB (MEMORY_BRIDGE_GAP): pages 3-9 are stored, so pages 1-10 are one
    // extent; the 80 KiB gap before page 31 stays a zero run.
    assert_eq!(l.data_bytes(), 13 * PAGE as u64);
    let data: Vec<_> = l.regions[0]
        .runs
        .iter()
        .filter(|r| !r.zero)
        .map(|r| (r.offset / PAGE as u64, r.len / PAGE as u64))
        .collect();
    assert_eq!(data, [(1, 10), (31, 1)]);
    for (reg, src) in l.regions.iter().zip([&low, &high]) {
        check_runs_cover(reg.size, &reg.runs, 4096);
        let first = reg.runs.iter().find_map(|r| r.file_offset).unwrap();
        assert_eq!(
            first % DATA_ALIGN,
            0,
            "each region's data is 64 KiB aligned"
        );
        for run in &reg.runs {
            let range = run.offset as usize..(run.offset + run.len) as usize;
            match run.file_offset {
                Some(fo) => {
                    // The bytes at file_offset are the guest bytes: what mmap would show.
                    let mut buf = vec![0u8; run.len as usize];
                    r.file().read_exact_at(&mut buf, fo).unwrap();
                    assert_eq!(buf, src[range]);
                }
                None => assert!(src[range].iter().all(|&b| b == 0)),
            }
        }
    }
    let mut out = vec![0xeeu8; low.len()];
    r.read_memory_region(0, &mut out).unwrap();
    assert_eq!(out, low);
    let rep = r.verify().unwrap();
    assert_eq!(rep.bytes_checked, fs::metadata(&p).unwrap().len());
}

#[test]
fn compressed_round_trip_is_not_mappable_but_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.smolmachine");
    write_sample(&p, Compression::Zstd, None);
    let r = MachineReader::open(&p).unwrap();
    let vm = r.section(SectionKind::VmState).unwrap();
    assert_eq!(vm.compression, Compression::Zstd);
    assert!(!vm.mappable());
    assert_eq!(
        r.read_blob(SectionKind::VmState).unwrap(),
        b"opaque vm state v1"
    );
    let l = r.memory_layout().unwrap();
    assert!(!l.mappable);
    assert!(l
        .regions
        .iter()
        .all(|g| g.runs.iter().all(|x| x.file_offset.is_none())));
    let (low, high) = memory();
    for (i, src) in [&low, &high].into_iter().enumerate() {
        check_runs_cover(src.len() as u64, &l.regions[i].runs, 4096);
        let mut out = vec![0x55u8; src.len()];
        r.read_memory_region(i, &mut out).unwrap();
        assert_eq!(&out, src);
    }
    r.verify().unwrap();
}

#[test]
fn read_memory_region_checks_buffer_and_index() {
    let bytes = sample_bytes(Compression::None);
    let r = MachineReader::from_source(bytes, 0, 0).err();
    assert!(matches!(r, Some(Error::Corrupt(_))));
    let bytes = sample_bytes(Compression::None);
    let len = bytes.len() as u64;
    let r = MachineReader::from_source(bytes, 0, len).unwrap();
    let mut small = vec![0u8; 10];
    assert!(matches!(
        r.read_memory_region(0, &mut small),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        r.read_memory_region(9, &mut small),
        Err(Error::InvalidInput(_))
    ));
}

#[test]
fn larger_granules_keep_runs_page_aligned_for_big_page_hosts() {
    for granule in [16384u32, 65536] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.smolmachine");
        let mut mem = vec![0u8; 8 * 65536];
        fill(&mut mem[70000..70001], 1); // in the 2nd 64K block, 5th 16K block
        fill(&mut mem[8 * 65536 - 5..], 2);
        let mut w = MachineWriter::create(&p, Arch::Aarch64).unwrap();
        w.set_granule(granule).unwrap();
        w.add_manifest(&manifest()).unwrap();
        w.add_memory(
            &[GuestRegion {
                guest_addr: 0x4000_0000,
                data: &mem,
            }],
            Compression::None,
        )
        .unwrap();
        w.finish().unwrap();
        let r = MachineReader::open(&p).unwrap();
        assert_eq!(r.arch(), Arch::Aarch64);
        let l = r.memory_layout().unwrap();
        assert_eq!(l.granule, u64::from(granule));
        check_runs_cover(mem.len() as u64, &l.regions[0].runs, u64::from(granule));
        for run in l.regions[0].runs.iter().filter(|x| !x.zero) {
            assert_eq!(run.file_offset.unwrap() % u64::from(granule), 0);
        }
        assert_eq!(l.data_bytes(), 2 * u64::from(granule));
        let mut out = vec![0u8; mem.len()];
        r.read_memory_region(0, &mut out).unwrap();
        assert_eq!(out, mem);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut w = MachineWriter::create(&dir.path().join("x"), Arch::X86_64).unwrap();
    assert!(w.set_granule(8192 + 1).is_err());
    assert!(w.set_granule(2048).is_err());
    assert!(w.set_granule(1 << 17).is_err());
}

#[test]
fn all_zero_and_odd_sized_regions() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.smolmachine");
    let zeros = vec![0u8; 16 * PAGE];
    let mut odd = vec![0u8; 3 * PAGE + 100];
    fill(&mut odd[3 * PAGE..], 9);
    for codec in [Compression::None, Compression::Zstd] {
        let mut w = MachineWriter::create(&p, Arch::X86_64).unwrap();
        w.add_manifest(&manifest()).unwrap();
        w.add_memory(
            &[
                GuestRegion {
                    guest_addr: 0,
                    data: &zeros,
                },
                GuestRegion {
                    guest_addr: 0x10_0000,
                    data: &odd,
                },
                GuestRegion {
                    guest_addr: 0x20_0000,
                    data: &[],
                },
            ],
            codec,
        )
        .unwrap();
        w.finish().unwrap();
        let r = MachineReader::open(&p).unwrap();
        let l = r.memory_layout().unwrap();
        assert_eq!(l.regions[0].runs.len(), 1);
        assert!(l.regions[0].runs[0].zero);
        assert_eq!(l.regions[1].data_bytes(), 100);
        assert!(l.regions[2].runs.is_empty());
        let mut out = vec![1u8; odd.len()];
        r.read_memory_region(1, &mut out).unwrap();
        assert_eq!(out, odd);
        let mut out = vec![1u8; zeros.len()];
        r.read_memory_region(0, &mut out).unwrap();
        assert_eq!(out, zeros);
        r.verify().unwrap();
    }
}

fn sparse_disk(path: &std::path::Path, size: u64) -> Vec<u8> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.set_len(size).unwrap();
    let mut head = vec![0u8; 3 * PAGE];
    fill(&mut head[..PAGE + 7], 5);
    f.write_all(&head).unwrap();
    let mut tail = vec![0u8; 777];
    fill(&mut tail, 6);
    f.seek(SeekFrom::Start(size - 777)).unwrap();
    f.write_all(&tail).unwrap();
    f.seek(SeekFrom::Start(size / 2)).unwrap();
    f.write_all(&[0u8; 8192]).unwrap(); // explicit zeros, not a hole
    fs::read(path).unwrap()
}

#[test]
fn disks_are_sparse_and_extract_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let size = 8 * 1024 * 1024 + 333; // not a granule multiple
    let original = sparse_disk(&disk, size);
    for codec in [Compression::None, Compression::Zstd] {
        let p = dir.path().join("m.smolmachine");
        write_sample(&p, codec, Some(&disk));
        let stored = fs::metadata(&p).unwrap().len();
        assert!(
            stored < 1024 * 1024,
            "sparse disk must stay small, got {stored}"
        );
        let r = MachineReader::open(&p).unwrap();
        let disks = r.disks().unwrap();
        assert_eq!(disks.len(), 1);
        let d = &disks[0];
        assert_eq!(d.name, "root");
        assert_eq!(d.size, size);
        assert_eq!(d.mappable, codec == Compression::None);
        check_runs_cover(size, &d.runs, 4096);
        let data: u64 = d.runs.iter().filter(|x| !x.zero).map(|x| x.len).sum();
        // Two head pages (one partly filled); the 777-byte tail spans the last full
        // granule and the 333-byte partial one.
        assert_eq!(data, 3 * PAGE as u64 + 333);
        let out = dir.path().join("out.img");
        let f = File::create(&out).unwrap();
        r.extract_disk(d, &f).unwrap();
        assert_eq!(fs::read(&out).unwrap(), original);
        r.verify().unwrap();
    }
}

#[test]
fn several_disks_and_empty_disk() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    fs::write(&a, b"hello disk").unwrap();
    fs::write(&b, b"").unwrap();
    let p = dir.path().join("m.smolmachine");
    let mut w = MachineWriter::create(&p, Arch::X86_64).unwrap();
    w.add_manifest(&manifest()).unwrap();
    w.add_disk("a", &mut File::open(&a).unwrap(), Compression::None)
        .unwrap();
    w.add_disk("b", &mut File::open(&b).unwrap(), Compression::Zstd)
        .unwrap();
    assert!(w
        .add_disk("", &mut File::open(&b).unwrap(), Compression::None)
        .is_err());
    w.finish().unwrap();
    let r = MachineReader::open(&p).unwrap();
    let disks = r.disks().unwrap();
    assert_eq!(
        disks.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(disks[0].size, 10);
    assert_eq!(disks[1].size, 0);
    let mut got = Vec::new();
    r.read_disk_with(&disks[0], |off, b| {
        got.push((off, b.to_vec()));
        Ok(())
    })
    .unwrap();
    assert_eq!(got, vec![(0, b"hello disk".to_vec())]);
    assert!(matches!(
        r.memory_layout(),
        Err(Error::MissingSection("memory"))
    ));
}

#[test]
fn unknown_sections_optional_skipped_required_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.smolmachine");
    let mut w = MachineWriter::create(&p, Arch::X86_64).unwrap();
    w.add_manifest(&manifest()).unwrap();
    w.add_blob(SectionKind::Unknown(4242), b"future", Compression::Zstd)
        .unwrap();
    w.finish().unwrap();
    let r = MachineReader::open(&p).unwrap();
    let s = r.section(SectionKind::Unknown(4242)).unwrap();
    assert!(!s.required);
    assert_eq!(r.read_section(s).unwrap(), b"future");
    r.verify().unwrap();

    let mut w = MachineWriter::create(&p, Arch::X86_64).unwrap();
    w.add_manifest(&manifest()).unwrap();
    w.add_blob_with(
        SectionKind::Unknown(4242),
        b"future",
        Compression::None,
        true,
    )
    .unwrap();
    w.finish().unwrap();
    let err = MachineReader::open(&p).unwrap_err();
    assert!(matches!(
        err,
        Error::UnknownRequiredSection { kind: 4242, .. }
    ));
    assert!(err.to_string().contains("upgrade smolvm"), "{err}");
}

#[test]
fn writer_rejects_misuse() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.smolmachine");
    let mut w = MachineWriter::create(&p, Arch::X86_64).unwrap();
    w.add_manifest(&manifest()).unwrap();
    assert!(w.add_manifest(&manifest()).is_err(), "one manifest only");
    for k in [
        SectionKind::Manifest,
        SectionKind::Memory,
        SectionKind::Disk,
        SectionKind::Unknown(2),
    ] {
        assert!(matches!(
            w.add_blob(k, b"x", Compression::None),
            Err(Error::InvalidInput(_))
        ));
    }
    w.add_blob(SectionKind::VmState, b"a", Compression::None)
        .unwrap();
    assert!(w
        .add_blob(SectionKind::VmState, b"b", Compression::None)
        .is_err());
    let a = vec![1u8; PAGE];
    let unsorted = [
        GuestRegion {
            guest_addr: 0x10000,
            data: &a,
        },
        GuestRegion {
            guest_addr: 0,
            data: &a,
        },
    ];
    assert!(w.add_memory(&unsorted, Compression::None).is_err());
    let overlapping = [
        GuestRegion {
            guest_addr: 0,
            data: &a,
        },
        GuestRegion {
            guest_addr: 100,
            data: &a,
        },
    ];
    assert!(w.add_memory(&overlapping, Compression::None).is_err());
    // Rejected calls wrote nothing; the writer is still usable.
    w.add_memory(
        &[GuestRegion {
            guest_addr: 0,
            data: &a,
        }],
        Compression::None,
    )
    .unwrap();
    w.finish().unwrap();
    let r = MachineReader::open(&p).unwrap();
    assert_eq!(r.sections().len(), 3);
    r.verify().unwrap();

    let w = MachineWriter::create(&dir.path().join("n.smolmachine"), Arch::X86_64).unwrap();
    let err = w.finish().unwrap_err();
    assert!(err.to_string().contains("manifest"), "{err}");
    assert!(!dir.path().join("n.smolmachine").exists());

    let big = Manifest {
        extra: [("x".to_string(), "y".repeat(2 << 20))].into(),
        ..manifest()
    };
    let mut w = MachineWriter::create(&dir.path().join("o"), Arch::X86_64).unwrap();
    assert!(matches!(w.add_manifest(&big), Err(Error::TooLarge { .. })));
}

fn dir_names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn writes_are_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.smolmachine");
    // An unfinished writer leaves nothing behind.
    {
        let mut w = MachineWriter::create(&p, Arch::X86_64).unwrap();
        w.add_manifest(&manifest()).unwrap();
        w.add_blob(SectionKind::VmState, &[7u8; 100_000], Compression::None)
            .unwrap();
        assert_eq!(dir_names(dir.path()).len(), 1, "only the temp file exists");
        assert!(!p.exists());
    }
    assert!(
        dir_names(dir.path()).is_empty(),
        "temp file removed on drop"
    );

    // Replacing an existing file: the old one stays intact until finish.
    write_sample(&p, Compression::None, None);
    let before = fs::read(&p).unwrap();
    let mut w = MachineWriter::create(&p, Arch::X86_64).unwrap();
    w.add_manifest(&Manifest {
        name: "new".into(),
        ..manifest()
    })
    .unwrap();
    assert_eq!(fs::read(&p).unwrap(), before);
    drop(w);
    assert_eq!(fs::read(&p).unwrap(), before);
    let mut w = MachineWriter::create(&p, Arch::X86_64).unwrap();
    w.add_manifest(&Manifest {
        name: "new".into(),
        ..manifest()
    })
    .unwrap();
    w.finish().unwrap();
    assert_eq!(
        MachineReader::open(&p).unwrap().manifest().unwrap().name,
        "new"
    );
    assert_eq!(dir_names(dir.path()), ["m.smolmachine"]);

    // A missing directory is a clear error, not a panic.
    let err = MachineWriter::create(&dir.path().join("no/such/dir/m"), Arch::X86_64).unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
}

#[test]
fn memory_is_scanned_not_copied() {
    // A 32 MiB region that is all zero except one page: the file holds one page of data,
    // and the writer never allocates the image (it streams from the caller's slice).
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.smolmachine");
    let mut mem = vec![0u8; 32 << 20];
    fill(&mut mem[(16 << 20)..(16 << 20) + PAGE], 1);
    let mut w = MachineWriter::create(&p, Arch::X86_64).unwrap();
    w.add_manifest(&manifest()).unwrap();
    w.add_memory(
        &[GuestRegion {
            guest_addr: 0,
            data: &mem,
        }],
        Compression::None,
    )
    .unwrap();
    w.finish().unwrap();
    let len = fs::metadata(&p).unwrap().len();
    assert!(len < 3 * DATA_ALIGN, "file is {len} bytes");
    let l = MachineReader::open(&p).unwrap().memory_layout().unwrap();
    assert_eq!(l.data_bytes(), PAGE as u64);
    assert_eq!(l.regions[0].runs.len(), 3);
}
