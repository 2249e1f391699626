//! Snapshot the running test guest and resume it in new processes: the
//! counter continues, registers and memory hold, the file never changes.

mod common;

use std::path::Path;

use smolvm::testguest::FIXED_REGS;
use smolvm_formats::{Compression, Manifest};

/// Not a test of its own: the entry point of the resume child processes
/// (run with `--ignored --exact child` and the child environment variable).
#[test]
#[ignore = "entry point of the resume child processes"]
fn child() {
    common::child_main();
}

fn snapshot(dir: &Path, compression: Compression) -> (std::path::PathBuf, u64) {
    let (m, reports, counter) = common::boot_and_pause(&common::PARAMS, 3);
    assert_eq!(reports.len(), 3);
    let regs = m.vcpu_regs(0).unwrap();
    assert_eq!(
        [regs.rbx, regs.rbp, regs.r12, regs.r13, regs.r14, regs.r15],
        FIXED_REGS
    );
    let path = dir.join("guest.smolmachine");
    let manifest = Manifest {
        name: "testguest".into(),
        ..Default::default()
    };
    m.save(&path, &manifest, compression).unwrap();
    (path, counter)
}

#[test]
fn resumes_in_new_process_and_leaves_file_unchanged() {
    if !common::kvm_ready("resumes_in_new_process_and_leaves_file_unchanged") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (path, saved) = snapshot(dir.path(), Compression::None);
    let before = std::fs::read(&path).unwrap();

    let reader = smolvm_formats::MachineReader::open(&path).unwrap();
    let manifest = reader.manifest().unwrap();
    assert_eq!(manifest.vcpus, 1);
    assert_eq!(manifest.memory_bytes, smolvm::testguest::MEMORY_BYTES);
    assert_eq!(
        manifest.host_profile,
        smolvm::host::HostProfile::detect().as_str()
    );
    let layout = reader.memory_layout().unwrap();
    assert!(layout.mappable);
    // Mostly zero: only the touched pages are stored.
    assert!(layout.data_bytes() < layout.total_bytes() / 4);

    let run = common::collect(common::spawn_child("child", &path));
    common::check_continuation(&run, saved, &common::PARAMS);
    // The resumed guest wrote its counter and block (copy-on-write pages of
    // the file mapping); the file is byte for byte the same.
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "resume modified the machine file"
    );
    reader.verify().unwrap();
}

#[test]
fn resumes_from_compressed_memory() {
    if !common::kvm_ready("resumes_from_compressed_memory") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (path, saved) = snapshot(dir.path(), Compression::Zstd);
    let layout = smolvm_formats::MachineReader::open(&path)
        .unwrap()
        .memory_layout()
        .unwrap();
    assert!(!layout.mappable);
    let run = common::collect(common::spawn_child("child", &path));
    common::check_continuation(&run, saved, &common::PARAMS);
}

#[test]
fn resumes_twenty_times_in_a_row_and_eight_at_once() {
    if !common::kvm_ready("resumes_twenty_times_in_a_row_and_eight_at_once") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (path, saved) = snapshot(dir.path(), Compression::None);
    let before = std::fs::read(&path).unwrap();
    let first = common::collect(common::spawn_child("child", &path));
    common::check_continuation(&first, saved, &common::PARAMS);
    for i in 0..19 {
        let run = common::collect(common::spawn_child("child", &path));
        assert_eq!(run.reports, first.reports, "sequential resume {i} diverged");
        assert_eq!(run.status, first.status);
    }
    let children: Vec<_> = (0..8)
        .map(|_| common::spawn_child("child", &path))
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        let run = common::collect(c);
        assert_eq!(
            run.reports, first.reports,
            "parallel resume {i} diverged: {}",
            run.stderr
        );
        assert_eq!(run.status, first.status);
    }
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn smolvm_run_exits_with_guest_status() {
    if !common::kvm_ready("smolvm_run_exits_with_guest_status") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = snapshot(dir.path(), Compression::None);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smolvm"))
        .arg("run")
        .arg(&path)
        .env("SMOLVM_TIMINGS", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(i32::from(common::PARAMS.exit_status)),
        "stderr: {stderr}"
    );
    // The guest's line on stdout; its report port writes are dropped quietly.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "smolvm test guest: counter=10000 status=9\n"
    );
    assert!(!stderr.contains("has no device"), "stderr: {stderr}");
    for phase in [
        "file-mapped",
        "vm-and-vcpus-created",
        "state-restored",
        "first-guest-exit",
    ] {
        assert!(
            stderr.contains(phase),
            "timing phase {phase} missing: {stderr}"
        );
    }
}

#[test]
fn packed_executable_resumes_its_own_machine() {
    if !common::kvm_ready("packed_executable_resumes_its_own_machine") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = snapshot(dir.path(), Compression::None);
    let exe = dir.path().join("myguest");
    smolvm_formats::trailer::pack(Path::new(env!("CARGO_BIN_EXE_smolvm")), &path, &exe).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let before = std::fs::read(&exe).unwrap();
    let out = std::process::Command::new(&exe).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(i32::from(common::PARAMS.exit_status)),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `smolvm run` also accepts the packed executable as a machine file.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smolvm"))
        .arg("run")
        .arg(&exe)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(i32::from(common::PARAMS.exit_status))
    );
    assert_eq!(std::fs::read(&exe).unwrap(), before);
}
