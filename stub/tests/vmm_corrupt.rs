//! Damaged machine state is refused before any vCPU exists: truncated,
//! bit-flipped, from a future version, oversized.

mod common;

use std::path::Path;

use smolvm::builder::{BuildError, SnapshotPlan};
use smolvm::snapshot::{StateError, MAX_STATE_BYTES, STATE_VERSION};
use smolvm_formats::{Arch, Compression, GuestRegion, MachineReader, MachineWriter, SectionKind};

/// Rewrite `src` into `dst` with the state blob replaced by `blob`; every
/// other section (manifest, memory) copied, all container checksums valid.
fn rewrite_with_state(src: &Path, dst: &Path, blob: &[u8]) {
    let r = MachineReader::open(src).unwrap();
    let layout = r.memory_layout().unwrap();
    let mut bufs = Vec::new();
    for (i, region) in layout.regions.iter().enumerate() {
        let mut b = vec![0u8; region.size as usize];
        r.read_memory_region(i, &mut b).unwrap();
        bufs.push((region.guest_addr, b));
    }
    let regions: Vec<GuestRegion<'_>> = bufs
        .iter()
        .map(|(a, b)| GuestRegion {
            guest_addr: *a,
            data: b,
        })
        .collect();
    let mut w = MachineWriter::create(dst, Arch::X86_64).unwrap();
    w.add_manifest(&r.manifest().unwrap()).unwrap();
    w.add_blob(SectionKind::VmState, blob, Compression::None)
        .unwrap();
    w.add_memory(&regions, Compression::None).unwrap();
    w.finish().unwrap();
}

fn state_error(path: &Path) -> StateError {
    match SnapshotPlan::open(path) {
        Err(BuildError::State(e)) => e,
        Err(other) => panic!("expected a state error, got {other}"),
        Ok(_) => panic!("damaged state accepted"),
    }
}

#[test]
fn refuses_damaged_state_before_running() {
    if !common::kvm_ready("refuses_damaged_state_before_running") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (m, _, _) = common::boot_and_pause(&common::PARAMS, 1);
    let good = dir.path().join("good.smolmachine");
    m.save(&good, &Default::default(), Compression::None)
        .unwrap();
    drop(m);
    let blob = MachineReader::open(&good)
        .unwrap()
        .read_blob(SectionKind::VmState)
        .unwrap();
    SnapshotPlan::open(&good).expect("the good file is accepted");

    let bad = dir.path().join("bad.smolmachine");
    // Truncated.
    rewrite_with_state(&good, &bad, &blob[..blob.len() / 2]);
    assert!(matches!(state_error(&bad), StateError::Truncated { .. }));
    // Bit-flipped in the payload (the container checksum is recomputed, so
    // the state's own CRC must catch it).
    let mut flipped = blob.clone();
    let at = flipped.len() - 100;
    flipped[at] ^= 0x10;
    rewrite_with_state(&good, &bad, &flipped);
    assert_eq!(state_error(&bad), StateError::Checksum);
    // From a future version.
    let mut future = blob.clone();
    future[8..12].copy_from_slice(&(STATE_VERSION + 1).to_le_bytes());
    rewrite_with_state(&good, &bad, &future);
    assert!(matches!(
        state_error(&bad),
        StateError::FutureVersion { .. }
    ));
    // Oversized: the state limit is the file's blob limit, so a writer refuses to store
    // it (and a reader refuses such a section: formats' tests), and the decoder refuses
    // the bytes themselves.
    let mut huge = blob.clone();
    huge.resize(MAX_STATE_BYTES + 1, 0);
    let mut w = MachineWriter::create(&bad, Arch::X86_64).unwrap();
    assert!(w
        .add_blob(SectionKind::VmState, &huge, Compression::None)
        .is_err());
    drop(w);
    assert!(matches!(
        smolvm::snapshot::MachineState::from_bytes(&huge),
        Err(StateError::TooLarge { .. })
    ));

    // A bit flipped in place in the file is caught by the container checksum.
    let mut raw = std::fs::read(&good).unwrap();
    let section = MachineReader::open(&good)
        .unwrap()
        .section(SectionKind::VmState)
        .unwrap()
        .clone();
    raw[(section.file_offset + 40) as usize] ^= 1;
    std::fs::write(&bad, &raw).unwrap();
    assert!(SnapshotPlan::open(&bad).is_err());

    // The CLI refuses it too, with a clear message and without running.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smolvm"))
        .arg("run")
        .arg(&bad)
        .env("SMOLVM_TIMINGS", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "stderr: {stderr}");
    assert!(
        stderr.contains("cannot run") && stderr.contains("the file is damaged"),
        "stderr: {stderr}"
    );
    assert!(
        !stderr.contains("vm-and-vcpus-created"),
        "a VM was created: {stderr}"
    );
}
