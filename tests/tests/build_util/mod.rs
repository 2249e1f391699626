//! Helpers for the tests that drive the binaries: the guest artifacts, the `smolpack` and
//! `smolvm` binaries, running them, and a small sample machine.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use smolvm_formats::{Arch, Compression, GuestRegion, MachineWriter, Manifest, SectionKind};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository")
        .to_path_buf()
}

/// The kernel and agent a build needs, found as `smolpack` finds them.
pub struct Guest {
    pub kernel: PathBuf,
    pub agent: PathBuf,
}

fn artifact(env: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    Some(repo().join("target/guest").join(name)).filter(|p| p.is_file())
}

/// The guest artifacts and a usable `/dev/kvm`, or `None` after a loud message (a failure
/// under `CI=true`).
pub fn guest(test: &str) -> Option<Guest> {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let kernel = artifact("SMOLVM_KERNEL", "vmlinux");
    let agent = artifact("SMOLVM_AGENT", "smol-agent");
    let missing = if !kvm {
        "/dev/kvm (read-write)"
    } else if kernel.is_none() {
        "the guest kernel (target/guest/vmlinux or SMOLVM_KERNEL; build it with scripts/setup)"
    } else if agent.is_none() {
        "the guest agent (target/guest/smol-agent or SMOLVM_AGENT; build it with scripts/setup)"
    } else {
        return Some(Guest {
            kernel: kernel?,
            agent: agent?,
        });
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test} needs {missing} (CI=true: run scripts/setup)");
    }
    eprintln!("SKIPPED: {test} needs {missing}");
    None
}

/// A binary of this build profile (`smolpack`, `smolvm`), built once per test process, so
/// a test never runs a stale one (cargo makes it a no-op when it is up to date).
pub fn bin(package: &str, name: &str) -> PathBuf {
    static BUILT: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps layout");
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.contains(name) {
        let target_dir = profile_dir.parent().expect("target dir");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-q", "-p", package, "--bin", name])
            .env("CARGO_TARGET_DIR", target_dir);
        if profile_dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "building {name} failed");
        built.insert(name.to_string());
    }
    profile_dir.join(name)
}

/// `smolpack build SMOLFILE -o OUT` with the given artifacts.
pub fn smolpack_build(guest: &Guest, smolfile: &Path, out: &Path) -> Output {
    Command::new(bin("smolpack", "smolpack"))
        .arg("build")
        .arg(smolfile)
        .arg("-o")
        .arg(out)
        .arg("--kernel")
        .arg(&guest.kernel)
        .arg("--agent")
        .arg(&guest.agent)
        .output()
        .expect("running smolpack build")
}

/// `smolvm run MACHINE [-- ARGS...]`.
pub fn smolvm_run(machine: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("smolvm", "smolvm"));
    cmd.arg("run").arg(machine);
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    cmd.output().expect("running smolvm run")
}

/// Stdout and stderr of a finished command, for assertion messages.
pub fn describe(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The 1-based line of the first line of `text` containing `needle`.
pub fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} not in the Smolfile"))
}

/// A small valid machine named `name` (64 KiB of memory, two data runs; never resumed).
pub fn sample_machine(path: &Path, name: &str) {
    let mut mem = vec![0u8; 64 * 4096];
    mem[4096..8192].fill(0x5a);
    mem[40 * 4096] = 1;
    machine_with_memory(path, name, &mem, Compression::Zstd);
}

/// A valid machine named `name` whose one memory region (at 0) is `mem`, with a
/// placeholder state blob stored with `blob`; never resumed.
pub fn machine_with_memory(path: &Path, name: &str, mem: &[u8], blob: Compression) {
    machine_for_arch(path, name, mem, blob, Arch::X86_64);
}

/// [`machine_with_memory`] for `arch` (an aarch64 machine without an aarch64 build).
pub fn machine_for_arch(path: &Path, name: &str, mem: &[u8], blob: Compression, arch: Arch) {
    let mut w = MachineWriter::create(path, arch).unwrap();
    w.add_manifest(&Manifest {
        name: name.into(),
        producer: "smolvm-tests".into(),
        vcpus: 1,
        memory_bytes: mem.len() as u64,
        host_profile: "kvm".into(),
        ..Default::default()
    })
    .unwrap();
    w.add_blob(SectionKind::VmState, b"state", blob).unwrap();
    w.add_memory(
        &[GuestRegion {
            guest_addr: 0,
            data: mem,
        }],
        Compression::None,
    )
    .unwrap();
    w.finish().unwrap();
}

/// Fails with every collected problem at once.
pub fn assert_no_problems(problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
