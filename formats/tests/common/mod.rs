//! Helpers shared by the format tests: sample machines and byte-level patching.
#![allow(dead_code)]

use std::fs;
use std::path::Path;

use smolvm_formats::{Arch, Compression, GuestRegion, MachineWriter, Manifest, SectionKind};

pub const PAGE: usize = 4096;

/// Deterministic non-zero filler.
pub fn fill(buf: &mut [u8], mut seed: u64) {
    seed |= 1;
    for b in buf.iter_mut() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        *b = (seed as u8) | 1;
    }
}

pub fn manifest() -> Manifest {
    Manifest {
        name: "test".into(),
        created_unix_s: 1_700_000_000,
        producer: "tests".into(),
        vcpus: 2,
        memory_bytes: 64 * PAGE as u64,
        entrypoint: vec!["/bin/sh".into()],
        cmd: vec!["-c".into(), "true".into()],
        env: vec![("K".into(), "V".into())],
        workdir: "/root".into(),
        kernel_cmdline: "console=ttyS0".into(),
        host_profile: "kvm".into(),
        cpu: "x86-64".into(),
        extra: [("k".to_string(), "v".to_string())].into(),
    }
}

/// Two memory regions: some data, some zero pages, a partial tail.
pub fn memory() -> (Vec<u8>, Vec<u8>) {
    let mut low = vec![0u8; 32 * PAGE];
    fill(&mut low[PAGE..3 * PAGE], 1);
    fill(&mut low[10 * PAGE..10 * PAGE + 1], 2);
    fill(&mut low[31 * PAGE..], 3);
    let mut high = vec![0u8; 8 * PAGE];
    fill(&mut high[2 * PAGE..4 * PAGE], 4);
    (low, high)
}

/// Writes a complete sample machine to `path`.
pub fn write_sample(path: &Path, codec: Compression, disk: Option<&Path>) {
    let (low, high) = memory();
    let mut w = MachineWriter::create(path, Arch::X86_64).unwrap();
    w.add_manifest(&manifest()).unwrap();
    w.add_blob(SectionKind::VmState, b"opaque vm state v1", codec)
        .unwrap();
    w.add_memory(
        &[
            GuestRegion {
                guest_addr: 0,
                data: &low,
            },
            GuestRegion {
                guest_addr: 0x1_0000_0000,
                data: &high,
            },
        ],
        codec,
    )
    .unwrap();
    if let Some(d) = disk {
        let mut f = fs::File::open(d).unwrap();
        w.add_disk("root", &mut f, codec).unwrap();
    }
    w.finish().unwrap();
}

/// Bytes of a tiny machine whose data compresses well: small enough (about 1 KiB with zstd)
/// to flip every bit of it in a test.
pub fn tiny_bytes(codec: Compression) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.smolmachine");
    let mut low = vec![0u8; 4 * PAGE];
    low[PAGE..PAGE + 300].fill(0xa5);
    low[3 * PAGE + 17] = 1;
    let mut high = vec![0u8; 2 * PAGE + 10];
    high[2 * PAGE..].fill(3);
    let disk = dir.path().join("d");
    fs::write(&disk, [9u8; 5000]).unwrap();
    let mut w = MachineWriter::create(&p, Arch::X86_64).unwrap();
    w.add_manifest(&Manifest {
        name: "t".into(),
        vcpus: 1,
        memory_bytes: 1,
        ..Default::default()
    })
    .unwrap();
    w.add_blob(SectionKind::VmState, b"vm state", codec)
        .unwrap();
    w.add_memory(
        &[
            GuestRegion {
                guest_addr: 0,
                data: &low,
            },
            GuestRegion {
                guest_addr: 1 << 30,
                data: &high,
            },
        ],
        codec,
    )
    .unwrap();
    w.add_disk("d", &mut fs::File::open(&disk).unwrap(), codec)
        .unwrap();
    w.finish().unwrap();
    fs::read(&p).unwrap()
}

/// Bytes of a small sample machine (memory, state; no disk).
pub fn sample_bytes(codec: Compression) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.smolmachine");
    write_sample(&p, codec, None);
    fs::read(&p).unwrap()
}

pub fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
pub fn set_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
pub fn set_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Lets `f` edit the header (64 bytes) and the table, then re-seals the header checksum, so
/// tests reach the structural checks behind it.
pub fn patch(bytes: &mut [u8], f: impl FnOnce(&mut [u8], &mut [u8])) {
    let table_offset = u64_at(bytes, 24) as usize;
    let count = u32::from_le_bytes(bytes[20..24].try_into().unwrap()) as usize;
    let (head, rest) = bytes.split_at_mut(table_offset);
    let table = &mut rest[..count * 64];
    f(&mut head[..64], table);
    reseal(bytes);
}

/// Recomputes the header checksum over the current header and table.
pub fn reseal(bytes: &mut [u8]) {
    let table_offset = u64_at(bytes, 24) as usize;
    let count = u32::from_le_bytes(bytes[20..24].try_into().unwrap()) as usize;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&bytes[..56]);
    h.update(&bytes[table_offset..table_offset + count * 64]);
    let d = h.digest();
    set_u64(bytes, 56, d);
}

/// Table position of the first entry of `kind`.
pub fn entry_of(bytes: &[u8], kind: SectionKind) -> usize {
    let table_offset = u64_at(bytes, 24) as usize;
    let count = u32::from_le_bytes(bytes[20..24].try_into().unwrap()) as usize;
    (0..count)
        .find(|i| {
            let e = table_offset + i * 64;
            u32::from_le_bytes(bytes[e..e + 4].try_into().unwrap()) == kind.code()
        })
        .unwrap()
}
