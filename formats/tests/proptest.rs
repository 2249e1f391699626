//! Property tests: arbitrary machines round-trip exactly; arbitrary damage never panics and
//! never passes `verify`.

mod common;

use std::fs;
use std::sync::OnceLock;

use common::*;
use proptest::prelude::*;
use smolvm_formats::{
    testing, Arch, Compression, GuestRegion, MachineReader, MachineWriter, SectionKind,
};

/// A region: page pattern (bit i set = page i non-zero), extra tail bytes, gap after it.
#[derive(Debug, Clone)]
struct RegionSpec {
    pages: u32,
    pattern: u32,
    tail: u16,
    seed: u64,
}

fn region_spec() -> impl Strategy<Value = RegionSpec> {
    (
        0u32..20,
        any::<u32>(),
        prop_oneof![Just(0u16), 1u16..4096],
        any::<u64>(),
    )
        .prop_map(|(pages, pattern, tail, seed)| RegionSpec {
            pages,
            pattern,
            tail,
            seed,
        })
}

fn build(spec: &RegionSpec) -> Vec<u8> {
    let mut v = vec![0u8; spec.pages as usize * PAGE + spec.tail as usize];
    for p in 0..spec.pages as usize {
        if spec.pattern & (1 << (p % 32)) != 0 {
            // Sometimes a whole page, sometimes a single byte at a random spot.
            let off = (spec.seed as usize).wrapping_add(p * 31) % PAGE;
            if spec.seed.is_multiple_of(3) {
                fill(
                    &mut v[p * PAGE + off..p * PAGE + off + 1],
                    spec.seed + p as u64,
                );
            } else {
                fill(&mut v[p * PAGE..(p + 1) * PAGE], spec.seed + p as u64);
            }
        }
    }
    if spec.tail > 0 && spec.pattern & 1 == 1 {
        let n = v.len();
        fill(&mut v[n - 1..], spec.seed);
    }
    v
}

fn codec() -> impl Strategy<Value = Compression> {
    prop_oneof![Just(Compression::None), Just(Compression::Zstd)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn machines_round_trip(
        regions in prop::collection::vec(region_spec(), 0..4),
        disk in prop::option::of(region_spec()),
        blob in prop::collection::vec(any::<u8>(), 0..3000),
        granule in prop_oneof![Just(4096u32), Just(16384), Just(65536)],
        mem_codec in codec(),
        blob_codec in codec(),
        disk_codec in codec(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.smolmachine");
        let datas: Vec<Vec<u8>> = regions.iter().map(build).collect();
        let guest: Vec<GuestRegion> = datas
            .iter()
            .enumerate()
            .map(|(i, d)| GuestRegion { guest_addr: (i as u64) << 32, data: d })
            .collect();
        let disk_data = disk.as_ref().map(build);
        let mut w = MachineWriter::create(&p, Arch::X86_64).unwrap();
        w.set_granule(granule).unwrap();
        w.add_manifest(&manifest()).unwrap();
        w.add_blob(SectionKind::VmState, &blob, blob_codec).unwrap();
        w.add_memory(&guest, mem_codec).unwrap();
        if let Some(d) = &disk_data {
            let dp = dir.path().join("disk");
            fs::write(&dp, d).unwrap();
            w.add_disk("disk", &mut fs::File::open(&dp).unwrap(), disk_codec).unwrap();
        }
        w.finish().unwrap();

        let r = MachineReader::open(&p).unwrap();
        prop_assert_eq!(r.manifest().unwrap(), manifest());
        prop_assert_eq!(r.read_blob(SectionKind::VmState).unwrap(), blob);
        let l = r.memory_layout().unwrap();
        prop_assert_eq!(l.mappable, mem_codec == Compression::None);
        prop_assert_eq!(l.regions.len(), datas.len());
        for (i, (reg, src)) in l.regions.iter().zip(&datas).enumerate() {
            prop_assert_eq!(reg.size, src.len() as u64);
            let mut cursor = 0;
            for run in &reg.runs {
                prop_assert_eq!(run.offset, cursor);
                prop_assert_eq!(run.offset % u64::from(granule), 0);
                let s = &src[run.offset as usize..(run.offset + run.len) as usize];
                if run.zero {
                    prop_assert!(s.iter().all(|&b| b == 0));
                } else if let Some(fo) = run.file_offset {
                    prop_assert_eq!(fo % u64::from(granule), 0);
                    let mut buf = vec![0u8; s.len()];
                    std::os::unix::fs::FileExt::read_exact_at(r.file(), &mut buf, fo).unwrap();
                    prop_assert_eq!(&buf[..], s);
                }
                cursor += run.len;
            }
            prop_assert_eq!(cursor, reg.size);
            let mut out = vec![0xaau8; src.len()];
            r.read_memory_region(i, &mut out).unwrap();
            prop_assert_eq!(&out, src);
        }
        if let Some(d) = &disk_data {
            let disks = r.disks().unwrap();
            prop_assert_eq!(disks.len(), 1);
            let out = dir.path().join("out");
            r.extract_disk(&disks[0], &fs::File::create(&out).unwrap()).unwrap();
            prop_assert_eq!(&fs::read(&out).unwrap(), d);
        }
        r.verify().unwrap();
        prop_assert!(testing::exercise(&fs::read(&p).unwrap()));
    }
}

fn originals() -> &'static [Vec<u8>; 2] {
    static O: OnceLock<[Vec<u8>; 2]> = OnceLock::new();
    O.get_or_init(|| [tiny_bytes(Compression::Zstd), tiny_bytes(Compression::None)])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn damage_never_panics_and_never_verifies(
        which in 0usize..2,
        flips in prop::collection::vec((any::<prop::sample::Index>(), 0u8..8), 0..4),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let orig = &originals()[which];
        let mut b = orig.clone();
        for (at, bit) in &flips {
            let i = at.index(b.len());
            b[i] ^= 1 << bit;
        }
        if let Some(c) = cut {
            b.truncate(c.index(b.len()));
        }
        let ok = testing::exercise(&b);
        if &b != orig {
            prop_assert!(!ok, "damaged file opened and verified");
        } else {
            prop_assert!(ok);
        }
    }
}

#[test]
fn reseal_leaves_intact_files_unchanged() {
    for orig in originals() {
        let mut b = orig.clone();
        testing::reseal(&mut b);
        assert_eq!(&b, orig);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Damage with every checksum recomputed reaches the structural checks; they must
    /// refuse or accept cleanly, never panic.
    #[test]
    fn resealed_damage_never_panics(
        which in 0usize..2,
        flips in prop::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..6),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let mut b = originals()[which].clone();
        for (at, bit) in &flips {
            let i = at.index(b.len());
            b[i] ^= 1 << bit;
        }
        if let Some(c) = cut {
            b.truncate(c.index(b.len()));
        }
        testing::reseal(&mut b);
        testing::exercise(&b);
    }
}
