//! Writes a realistic sample `.smolmachine`: manifest, a VM-state blob, 64 MiB of guest memory
//! that is mostly zero pages, and a small sparse disk.
//!
//! `cargo run -p smolvm-formats --example write_sample -- OUT [--zstd]`

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use smolvm_formats::{Arch, Compression, GuestRegion, MachineWriter, Manifest, SectionKind};

/// Deterministic filler so the sample is reproducible (xorshift64).
fn fill(buf: &mut [u8], mut seed: u64) {
    for chunk in buf.chunks_mut(8) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let b = seed.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().ok_or("usage: write_sample OUT [--zstd]")?);
    let codec = if args.any(|a| a == "--zstd") {
        Compression::Zstd
    } else {
        Compression::None
    };
    const MIB: usize = 1 << 20;

    let manifest = Manifest {
        name: "sample".into(),
        created_unix_s: SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs(),
        producer: format!("smolvm-formats {} write_sample", env!("CARGO_PKG_VERSION")),
        vcpus: 2,
        memory_bytes: 64 * MIB as u64,
        entrypoint: vec!["/bin/sh".into(), "-c".into()],
        cmd: vec!["echo hello from a resumed machine".into()],
        env: vec![
            ("PATH".into(), "/usr/bin:/bin".into()),
            ("HOME".into(), "/root".into()),
        ],
        workdir: "/".into(),
        kernel_cmdline: "console=ttyS0 reboot=k panic=1 quiet".into(),
        host_profile: "kvm".into(),
        cpu: "x86-64".into(),
        extra: BTreeMap::from([("sample".into(), "true".into())]),
    };

    // Guest memory like a freshly booted small guest: kernel image and page tables low,
    // a few scattered dirty pages, a userspace working set, the rest never touched.
    let mut low = vec![0u8; 48 * MIB];
    fill(&mut low[MIB..MIB + 6 * MIB], 1); // kernel text/data
    for i in 0..64 {
        let p = 8 * MIB + i * 97 * 4096;
        fill(&mut low[p..p + 4096], 100 + i as u64); // scattered slab pages
    }
    fill(&mut low[40 * MIB..42 * MIB], 7); // page cache
    let mut high = vec![0u8; 16 * MIB];
    fill(&mut high[..3 * MIB], 9); // userspace heap

    let mut state = vec![0u8; 16 * 1024];
    fill(&mut state, 42);

    // An 8 MiB sparse disk with a superblock-ish head and a data extent.
    let disk_path = out.with_extension("disk.tmp");
    let mut disk = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&disk_path)?;
    disk.set_len(8 * MIB as u64)?;
    let mut head = vec![0u8; 64 * 1024];
    fill(&mut head, 3);
    disk.write_all(&head)?;
    disk.seek(SeekFrom::Start(5 * MIB as u64))?;
    disk.write_all(&head)?;

    let mut w = MachineWriter::create(&out, Arch::host().unwrap_or(Arch::X86_64))?;
    w.add_manifest(&manifest)?;
    w.add_blob(SectionKind::VmState, &state, codec)?;
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
        codec,
    )?;
    w.add_disk("rootfs", &mut disk, codec)?;
    w.finish()?;
    std::fs::remove_file(&disk_path)?;
    println!("wrote {}", out.display());
    Ok(())
}
