//! Writes small valid machines and a packed executable into a directory, as fuzzing seeds.
//!
//! `cargo run -p smolvm-formats --example write_fuzz_seeds -- DIR`

use std::fs;
use std::io::Write;
use std::path::PathBuf;

use smolvm_formats::{
    signature, testing, trailer, Arch, Compression, GuestRegion, MachineReader, MachineWriter,
    Manifest, SectionKind,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .ok_or("usage: write_fuzz_seeds DIR")?,
    );
    fs::create_dir_all(&dir)?;
    let manifest = Manifest {
        name: "seed".into(),
        vcpus: 1,
        memory_bytes: 1 << 16,
        env: vec![("A".into(), "b".into())],
        ..Default::default()
    };
    let mut low = vec![0u8; 3 * 4096];
    low[4096..4200].fill(0xab);
    let mut high = vec![0u8; 2 * 4096 + 100];
    high[2 * 4096..].fill(1);
    let disk_path = dir.join("disk.tmp");
    let mut disk = fs::File::create(&disk_path)?;
    disk.write_all(&[0u8; 4096])?;
    disk.write_all(&[7u8; 5000])?;
    let mut disk = fs::File::open(&disk_path)?;

    let mut n = 0;
    let mut write =
        |codec: Compression, with_images: bool| -> Result<PathBuf, Box<dyn std::error::Error>> {
            n += 1;
            let p = dir.join(format!("seed-{n}.smolmachine"));
            let mut w = MachineWriter::create(&p, Arch::X86_64)?;
            w.add_manifest(&manifest)?;
            w.add_blob(SectionKind::VmState, b"vcpu state blob", codec)?;
            w.add_blob_with(SectionKind::Unknown(77), b"optional extra", codec, false)?;
            if with_images {
                w.add_memory(
                    &[
                        GuestRegion {
                            guest_addr: 0,
                            data: &low,
                        },
                        GuestRegion {
                            guest_addr: 1 << 20,
                            data: &high,
                        },
                    ],
                    codec,
                )?;
                w.add_disk("root", &mut disk, codec)?;
            }
            w.finish()?;
            Ok(p)
        };
    write(Compression::None, false)?;
    let zstd = write(Compression::Zstd, true)?;
    let raw = write(Compression::None, true)?;
    // Signed copies, so the signature section's parser and checks are reached.
    let key = signature::SecretKey::from_seed([0x5e; 32]);
    for (src, name) in [(&raw, "seed-signed"), (&zstd, "seed-signed-zstd")] {
        let r = MachineReader::open(src)?;
        MachineWriter::copy_from(&r, &dir.join(format!("{name}.smolmachine")), Some(&key))?;
    }
    let stub = dir.join("stub.tmp");
    fs::write(&stub, testing::tiny_elf())?;
    trailer::pack(&stub, &raw, &dir.join("seed-packed"))?;
    fs::remove_file(&stub)?;
    fs::remove_file(&disk_path)?;
    println!("seeds in {}", dir.display());
    Ok(())
}
