//! Helpers for the `smolpack build` tests: the guest artifacts, the `smolpack` and `smolvm`
//! binaries, and running them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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

/// A binary of this build profile (`smolpack`, `smolvm`), built on demand when a lone test
/// run did not build the whole workspace.
pub fn bin(package: &str, name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps layout");
    let bin = profile_dir.join(name);
    if !bin.exists() {
        let target_dir = profile_dir.parent().expect("target dir");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-q", "-p", package, "--bin", name])
            .env("CARGO_TARGET_DIR", target_dir);
        if profile_dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "building {name} failed");
    }
    bin
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
