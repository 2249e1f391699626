//! The runtime as a user meets it, on the VMM test guest: `smolvm run` prints
//! the guest's output and exits with its status; a packed executable hands
//! every argument to the machine, reads its settings from `SMOLVM_*`
//! variables (SMOLVM_SAVE, SMOLVM_HELP, SMOLVM_KVM_DEVICE), and fails with one
//! line and status 125 for a machine of another architecture, a missing KVM
//! device or damage.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use smolvm::testguest::{self, Params};
use smolvm_formats::{Compression, MachineReader, Manifest, SectionKind};

/// Report every 1000 iterations, stop at 10000 with status 7.
const PARAMS: Params = Params {
    report_every: 1000,
    limit: 10_000,
    exit_status: 7,
};

/// The line the guest prints when it stops at `counter`.
fn guest_line(counter: u64) -> String {
    format!("smolvm test guest: counter={counter} status=7\n")
}

fn smolvm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_smolvm"));
    c.env_remove("SMOLVM_SAVE")
        .env_remove("SMOLVM_HELP")
        .env_remove("SMOLVM_KVM_DEVICE");
    c
}

fn exe(path: &Path) -> Command {
    let mut c = Command::new(path);
    c.env_remove("SMOLVM_SAVE")
        .env_remove("SMOLVM_HELP")
        .env_remove("SMOLVM_KVM_DEVICE");
    c
}

/// Running a packed executable the test just wrote: a child another test thread forked in
/// between may still hold the file open for writing until its own exec (ETXTBSY).
trait OutputRetrying {
    fn output_retrying(&mut self) -> Output;
}

impl OutputRetrying for Command {
    fn output_retrying(&mut self) -> Output {
        let mut tries = 0;
        loop {
            match self.output() {
                Ok(o) => return o,
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("running {self:?}: {e}"),
            }
        }
    }
}

fn describe(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The test guest booted, paused at its third report and saved to `name`.
fn snapshot(dir: &Path, name: &str, compression: Compression) -> PathBuf {
    let (m, _, _) = common::boot_and_pause(&PARAMS, 3);
    let path = dir.join(name);
    let manifest = Manifest {
        name: "testguest".into(),
        ..Default::default()
    };
    m.save(&path, &manifest, compression).unwrap();
    path
}

fn pack(machine: &Path, out: &Path) {
    smolvm_formats::trailer::pack(Path::new(env!("CARGO_BIN_EXE_smolvm")), machine, out)
        .expect("pack the test guest onto the smolvm stub");
}

/// A failure of smolvm itself: status 125 and exactly one line on stderr,
/// which is returned.
fn one_line_failure(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(125), "{}", describe(o));
    assert!(o.stdout.is_empty(), "{}", describe(o));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "one line: {}", describe(o));
    assert!(err.starts_with("smolvm: "), "{}", describe(o));
    err
}

#[test]
fn smolvm_run_prints_the_guest_line_and_exits_with_its_status() {
    if !common::kvm_ready("smolvm_run_prints_the_guest_line_and_exits_with_its_status") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let machine = snapshot(dir.path(), "guest.smolmachine", Compression::None);
    let o = smolvm()
        .arg("run")
        .arg(&machine)
        .env("SMOLVM_TIMINGS", "1")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(7), "{}", describe(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), guest_line(10_000));
    let err = String::from_utf8_lossy(&o.stderr);
    for phase in [
        "machine-opened",
        "file-mapped",
        "state-restored",
        "first-guest-exit",
    ] {
        assert!(err.contains(phase), "phase {phase} missing: {err}");
    }
    // SMOLVM_SAVE is for packed executables; `run` has --save.
    let ignored = dir.path().join("ignored.smolmachine");
    let o = smolvm()
        .arg("run")
        .arg(&machine)
        .env("SMOLVM_SAVE", &ignored)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(7), "{}", describe(&o));
    assert!(!ignored.exists());
}

#[test]
fn a_closed_stdout_does_not_stop_the_guest() {
    if !common::kvm_ready("a_closed_stdout_does_not_stop_the_guest") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let machine = snapshot(dir.path(), "guest.smolmachine", Compression::None);
    // The read end of stdout is closed before the guest writes its line.
    let mut child = smolvm()
        .arg("run")
        .arg(&machine)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(7), "{}", describe(&o));
    assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
}

#[test]
fn packed_executable_passes_every_argument_to_the_machine() {
    if !common::kvm_ready("packed_executable_passes_every_argument_to_the_machine") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let machine = snapshot(dir.path(), "guest.smolmachine", Compression::None);
    let app = dir.path().join("app");
    pack(&machine, &app);
    let before = std::fs::read(&app).unwrap();
    // `--help`, `--version` and `run` are the machine's, not smolvm's, and a
    // leading `--` is dropped (the rest, `--` included, is the machine's):
    // the test guest takes no arguments and runs to its exit as always.
    for args in [
        &["--help"][..],
        &["--", "x"],
        &["--"],
        &["--", "--", "x"],
        &["run", "--save", "x"],
        &["--version"],
    ] {
        let o = exe(&app)
            .args(args)
            .env("SMOLVM_TIMINGS", "1")
            .output_retrying();
        assert_eq!(o.status.code(), Some(7), "{args:?}: {}", describe(&o));
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            guest_line(10_000),
            "{args:?}"
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("usage"), "{args:?}: {err}");
        // The phases of `smolvm run`, after the trailer was found.
        let phases: Vec<&str> = err
            .lines()
            .filter_map(|l| l.strip_prefix("smolvm-timing "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let at = |p: &str| {
            phases
                .iter()
                .position(|q| *q == p)
                .unwrap_or_else(|| panic!("phase {p} missing: {phases:?}"))
        };
        assert_eq!(at("trailer-found"), 0, "{phases:?}");
        assert!(at("machine-opened") < at("file-mapped"));
        assert!(at("file-mapped") < at("vm-and-vcpus-created"));
        assert!(at("vm-and-vcpus-created") < at("state-restored"));
        assert!(at("state-restored") < at("first-guest-exit"));
        assert!(at("first-guest-exit") < at("guest-stopped"));
    }
    assert_eq!(
        std::fs::read(&app).unwrap(),
        before,
        "the executable changed"
    );

    // Its own help only through the environment.
    let o = exe(&app).env("SMOLVM_HELP", "1").output_retrying();
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(help.contains("packed executable"), "{help}");
    assert!(help.contains("SMOLVM_SAVE"), "{help}");
    assert!(
        !help.contains("smolvm test guest:"),
        "the machine ran: {help}"
    );
}

#[test]
fn packed_compressed_guest_runs() {
    if !common::kvm_ready("packed_compressed_guest_runs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let machine = snapshot(dir.path(), "guest.smolmachine", Compression::Zstd);
    assert!(
        !MachineReader::open(&machine)
            .unwrap()
            .memory_layout()
            .unwrap()
            .mappable
    );
    let app = dir.path().join("app");
    pack(&machine, &app);
    let o = exe(&app)
        .env("SMOLVM_CACHE", dir.path().join("cache"))
        .output_retrying();
    assert_eq!(o.status.code(), Some(7), "{}", describe(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), guest_line(10_000));
    // Same content, same fingerprint, packed or not (the expansion cache key).
    assert_eq!(
        MachineReader::open(&app).unwrap().fingerprint(),
        MachineReader::open(&machine).unwrap().fingerprint()
    );
}

#[test]
fn smolvm_save_keeps_a_resumable_machine() {
    if !common::kvm_ready("smolvm_save_keeps_a_resumable_machine") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let machine = snapshot(dir.path(), "guest.smolmachine", Compression::None);
    let app = dir.path().join("app");
    pack(&machine, &app);
    let before = std::fs::read(&app).unwrap();
    let saved = dir.path().join("after.smolmachine");
    let o = exe(&app).env("SMOLVM_SAVE", &saved).output_retrying();
    assert_eq!(o.status.code(), Some(7), "{}", describe(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), guest_line(10_000));
    let r = MachineReader::open(&saved).unwrap();
    r.verify().unwrap();
    assert_eq!(r.manifest().unwrap().name, "testguest");
    // The saved machine goes on from where the guest exited: one more
    // iteration, then its line and status again.
    let o = smolvm().arg("run").arg(&saved).output().unwrap();
    assert_eq!(o.status.code(), Some(7), "{}", describe(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), guest_line(10_001));
    // And it packs and runs like any machine.
    let app2 = dir.path().join("app2");
    pack(&saved, &app2);
    let o = exe(&app2).output_retrying();
    assert_eq!(String::from_utf8_lossy(&o.stdout), guest_line(10_001));
    assert_eq!(
        std::fs::read(&app).unwrap(),
        before,
        "the executable changed"
    );

    // Saving over the executable itself is refused before the guest runs.
    let o = exe(&app).env("SMOLVM_SAVE", &app).output_retrying();
    let err = one_line_failure(&o);
    assert!(
        err.contains("SMOLVM_SAVE names this executable itself"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&app).unwrap(),
        before,
        "the executable changed"
    );
}

/// `machine` with the architecture code in its header set to aarch64 (2)
/// and every checksum recomputed.
fn as_aarch64(machine: &Path, out: &Path) {
    let mut bytes = std::fs::read(machine).unwrap();
    bytes[12..14].copy_from_slice(&2u16.to_le_bytes());
    smolvm_formats::testing::reseal(&mut bytes);
    std::fs::write(out, &bytes).unwrap();
    assert_eq!(
        MachineReader::open(out).unwrap().arch(),
        smolvm_formats::Arch::Aarch64
    );
}

#[test]
fn another_architecture_is_refused_in_one_line() {
    if !common::kvm_ready("another_architecture_is_refused_in_one_line") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let machine = snapshot(dir.path(), "guest.smolmachine", Compression::None);
    let arm = dir.path().join("arm.smolmachine");
    as_aarch64(&machine, &arm);
    let o = smolvm()
        .arg("run")
        .arg(&arm)
        .env("SMOLVM_TIMINGS", "1")
        .output()
        .unwrap();
    // Timing lines go to stderr too: keep them out of this run.
    assert_eq!(o.status.code(), Some(125), "{}", describe(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("file-mapped"), "{err}");
    let o = smolvm().arg("run").arg(&arm).output().unwrap();
    let err = one_line_failure(&o);
    assert!(
        err.contains("this machine is for aarch64; this host is x86_64"),
        "{err}"
    );
    let app = dir.path().join("arm-app");
    pack(&arm, &app);
    let err = one_line_failure(&exe(&app).arg("--help").output_retrying());
    assert!(
        err.contains("this machine is for aarch64; this host is x86_64"),
        "{err}"
    );
}

/// A minimal aarch64 machine (`formats::testing::write_machine`): never resumed, only refused.
fn aarch64_machine(path: &Path) {
    smolvm_formats::testing::write_machine(path, smolvm_formats::Arch::Aarch64, "arm");
}

/// An aarch64 machine, bare or packed onto this (x86_64) stub, is refused with one line
/// and status 125 before any VM exists: the KVM device is never opened (a missing one would
/// be the error otherwise), and no KVM is needed for this test.
#[cfg(target_arch = "x86_64")]
#[test]
fn another_architecture_is_refused_before_any_vm() {
    let dir = tempfile::tempdir().unwrap();
    let arm = dir.path().join("arm.smolmachine");
    aarch64_machine(&arm);
    let expected = "this machine is for aarch64; this host is x86_64: run it on an aarch64 \
                    host, or build it again on this one\n";
    let o = smolvm()
        .arg("run")
        .arg(&arm)
        .env("SMOLVM_KVM_DEVICE", "/nonexistent/kvm")
        .output()
        .unwrap();
    let err = one_line_failure(&o);
    assert_eq!(
        err,
        format!("smolvm: cannot resume {}: {expected}", arm.display())
    );
    let app = dir.path().join("arm-app");
    pack(&arm, &app);
    let o = exe(&app)
        .env("SMOLVM_KVM_DEVICE", "/nonexistent/kvm")
        .output_retrying();
    let err = one_line_failure(&o);
    assert!(err.ends_with(expected), "{err}");
}

#[test]
fn a_missing_kvm_device_is_one_line() {
    if !common::kvm_ready("a_missing_kvm_device_is_one_line") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let machine = snapshot(dir.path(), "guest.smolmachine", Compression::None);
    let app = dir.path().join("app");
    pack(&machine, &app);
    let expected = "/nonexistent/kvm not found: this machine needs KVM \
                    (load kvm_intel/kvm_amd, or enable nested virtualisation)\n";
    let o = exe(&app)
        .env("SMOLVM_KVM_DEVICE", "/nonexistent/kvm")
        .output_retrying();
    assert_eq!(one_line_failure(&o), format!("smolvm: {expected}"));
    let o = smolvm()
        .arg("run")
        .arg(&machine)
        .env("SMOLVM_KVM_DEVICE", "/nonexistent/kvm")
        .output()
        .unwrap();
    let err = one_line_failure(&o);
    assert!(err.ends_with(expected), "{err}");
}

#[test]
fn damage_is_reported_in_one_line() {
    if !common::kvm_ready("damage_is_reported_in_one_line") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let machine = snapshot(dir.path(), "guest.smolmachine", Compression::None);
    let app = dir.path().join("app");
    pack(&machine, &app);
    let memory = MachineReader::open(&app)
        .unwrap()
        .section(SectionKind::Memory)
        .unwrap()
        .clone();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&app)
        .unwrap();
    let at = memory.file_offset + memory.stored_len / 2;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    drop(f);
    let err = one_line_failure(&exe(&app).output_retrying());
    assert!(
        err.contains("is damaged (checksum mismatch in section"),
        "{err}"
    );
    assert!(err.contains("re-download it or pack it again"), "{err}");
    // The trailer itself.
    let len = std::fs::metadata(&app).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&app).unwrap();
    f.write_all_at(&[0xff], len - 20).unwrap();
    drop(f);
    let err = one_line_failure(&exe(&app).output_retrying());
    assert!(
        err.contains("is damaged (checksum mismatch in packed-executable trailer)"),
        "{err}"
    );
}

#[test]
fn an_executable_without_a_trailer_is_named_as_such() {
    // Needs no KVM: smolvm refuses the file before anything runs.
    let o = smolvm().arg("run").arg("/bin/sh").output().unwrap();
    let err = one_line_failure(&o);
    assert!(err.contains("no smolvm trailer"), "{err}");
    assert!(err.contains("strip"), "{err}");
    let o = smolvm()
        .arg("run")
        .arg("/nonexistent/file")
        .output()
        .unwrap();
    let err = one_line_failure(&o);
    assert!(err.contains("/nonexistent/file"), "{err}");
}

#[test]
fn the_guest_line_matches_its_parser() {
    assert_eq!(
        testguest::parse_line(guest_line(10_000).trim_end()),
        Some((10_000, 7))
    );
}
