//! Measures the checksum (xxh3-64) and zero-scan throughput behind the numbers in
//! docs/FORMAT.md. Run in release: `cargo run --release -p smolvm-formats --example checksum_speed`.

use std::time::Instant;

fn main() {
    const LEN: usize = 256 << 20;
    let mut buf = vec![0u8; LEN];
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    for c in buf.chunks_mut(8) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        c.copy_from_slice(&s.to_le_bytes());
    }
    let gib = |secs: f64, rounds: usize| (LEN * rounds) as f64 / secs / (1u64 << 30) as f64;

    let rounds = 8;
    let t = Instant::now();
    let mut acc = 0u64;
    for _ in 0..rounds {
        acc = acc.wrapping_add(xxhash_rust::xxh3::xxh3_64(&buf));
    }
    let d = t.elapsed().as_secs_f64();
    println!(
        "xxh3-64 one-shot:  {:6.2} GiB/s ({:.0} ms per GiB)  [{acc:x}]",
        gib(d, rounds),
        1000.0 / gib(d, rounds)
    );

    let t = Instant::now();
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for _ in 0..rounds {
        for c in buf.chunks(1 << 20) {
            h.update(c);
        }
    }
    let d = t.elapsed().as_secs_f64();
    println!(
        "xxh3-64 streaming: {:6.2} GiB/s ({:.0} ms per GiB)  [{:x}]",
        gib(d, rounds),
        1000.0 / gib(d, rounds),
        h.digest()
    );

    let zeros = vec![0u8; LEN];
    let t = Instant::now();
    let mut n = 0usize;
    for _ in 0..rounds {
        n += zeros
            .chunks(4096)
            .filter(|c| c.iter().all(|&b| b == 0))
            .count();
    }
    let d = t.elapsed().as_secs_f64();
    println!(
        "zero-page scan (naive all()): {:6.2} GiB/s  [{n}]",
        gib(d, rounds)
    );

    // End to end: a 256 MiB guest with 1/8 of its pages non-zero, written uncompressed to a
    // temp dir, then verified (page cache warm).
    let mut mem = vec![0u8; LEN];
    for (i, page) in mem.chunks_mut(4096).enumerate() {
        if i % 8 == 0 {
            page.copy_from_slice(&buf[i * 4096..(i + 1) * 4096]);
        }
    }
    let dir = std::env::temp_dir().join(format!("smolvm-speed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("speed.smolmachine");
    let t = Instant::now();
    let mut w =
        smolvm_formats::MachineWriter::create(&path, smolvm_formats::Arch::X86_64).expect("create");
    w.add_manifest(&smolvm_formats::Manifest::default())
        .expect("manifest");
    w.add_memory(
        &[smolvm_formats::GuestRegion {
            guest_addr: 0,
            data: &mem,
        }],
        smolvm_formats::Compression::None,
    )
    .expect("memory");
    w.finish().expect("finish");
    let d = t.elapsed().as_secs_f64();
    println!(
        "write 256 MiB guest (12.5% data, incl. fsync): {:6.2} GiB/s of guest memory",
        gib(d, 1)
    );
    let r = smolvm_formats::MachineReader::open(&path).expect("open");
    let t = Instant::now();
    let l = r.memory_layout().expect("layout");
    println!(
        "memory_layout: {:.2} ms for {} runs",
        t.elapsed().as_secs_f64() * 1e3,
        l.regions[0].runs.len()
    );
    let t = Instant::now();
    r.verify().expect("verify");
    let d = t.elapsed().as_secs_f64();
    let stored = r.len() as f64 / (1u64 << 30) as f64;
    println!(
        "verify {:.1} MiB file: {:6.2} GiB/s of file",
        stored * 1024.0,
        stored / d
    );
    std::fs::remove_dir_all(&dir).ok();
}
