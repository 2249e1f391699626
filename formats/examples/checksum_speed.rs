//! Measures the checksum (xxh3-64), zero-scan, write and verify throughput behind the numbers
//! in docs/FORMAT.md. Run in release:
//! `cargo run --release -p smolvm-formats --example checksum_speed`.
//!
//! Reports both wall-clock and thread-CPU throughput: on a shared host the CPU figure is the
//! stable one (it excludes time spent waiting for a core).

use std::time::Instant;

use smolvm_formats::{
    testing, Arch, Compression, GuestRegion, MachineReader, MachineWriter, Manifest,
};

const GIB: f64 = (1u64 << 30) as f64;

fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass, which lives on our stack.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Runs `f` (which processes `bytes` bytes) and prints wall and CPU throughput.
fn measure(name: &str, bytes: u64, f: impl FnOnce() -> u64) {
    let (w, c) = (Instant::now(), thread_cpu_s());
    let sink = f();
    let (wall, cpu) = (w.elapsed().as_secs_f64(), thread_cpu_s() - c);
    let g = bytes as f64 / GIB;
    println!(
        "{name:<44} wall {:6.2} GiB/s   cpu {:6.2} GiB/s ({:4.0} ms CPU per GiB)  [{sink:x}]",
        g / wall,
        g / cpu,
        cpu / g * 1e3
    );
}

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
    let rounds = 8u64;
    let total = LEN as u64 * rounds;

    measure("xxh3-64 one-shot", total, || {
        (0..rounds).fold(0u64, |a, _| {
            a.wrapping_add(xxhash_rust::xxh3::xxh3_64(&buf))
        })
    });
    measure("xxh3-64 streaming, 1 MiB updates (verify)", total, || {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for _ in 0..rounds {
            for c in buf.chunks(1 << 20) {
                h.update(c);
            }
        }
        h.digest()
    });
    let zeros = vec![0u8; LEN];
    measure("zero-page scan, writer's is_zero", total, || {
        (0..rounds)
            .map(|_| zeros.chunks(4096).filter(|c| testing::is_zero(c)).count() as u64)
            .sum()
    });

    // End to end: a 256 MiB guest with 1/8 of its pages non-zero, written uncompressed to a
    // temp dir (fsync included), then verified with the page cache warm.
    let mut mem = vec![0u8; LEN];
    for (i, page) in mem.chunks_mut(4096).enumerate() {
        if i % 8 == 0 {
            page.copy_from_slice(&buf[i * 4096..(i + 1) * 4096]);
        }
    }
    let dir = std::env::temp_dir().join(format!("smolvm-speed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("speed.smolmachine");
    measure(
        "write 256 MiB guest (12.5% data), per guest GiB",
        LEN as u64,
        || {
            let mut w = MachineWriter::create(&path, Arch::X86_64).expect("create");
            w.add_manifest(&Manifest::default()).expect("manifest");
            w.add_memory(
                &[GuestRegion {
                    guest_addr: 0,
                    data: &mem,
                }],
                Compression::None,
            )
            .expect("memory");
            w.finish().expect("finish");
            0
        },
    );
    let r = MachineReader::open(&path).expect("open");
    let t = Instant::now();
    let l = r.memory_layout().expect("layout");
    println!(
        "memory_layout: {:.2} ms for {} runs",
        t.elapsed().as_secs_f64() * 1e3,
        l.regions[0].runs.len()
    );
    measure("verify (file in page cache), per file GiB", r.len(), || {
        r.verify().expect("verify").bytes_checked
    });
    std::fs::remove_dir_all(&dir).ok();
}
