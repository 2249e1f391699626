//! The Linux guest fixture shared by the Linux test binaries (and the
//! build-side tests): the guest is booted ONCE per test binary, set up,
//! and saved as a `.smolmachine` in a temp dir; tests resume that file.
//!
//! Needs `/dev/kvm`, `target/guest/vmlinux` (or `SMOLVM_KERNEL`) and
//! `target/guest/busybox.ext4` (or `SMOLVM_ROOTFS`). Without them the tests
//! skip with a loud message, except under `CI=true` where they fail.
//! Use `#[path = "linux_common/mod.rs"] mod linux_common;` to include it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

#[path = "../build_util/mod.rs"]
mod build_util;

use smolvm::linux::{boot_linux, LinuxConfig};
use smolvm_formats::{Compression, Manifest};

/// Marker file written in the guest before the snapshot.
pub const MARKER: &str = "/root/marker";
/// Its contents.
pub const MARKER_TEXT: &str = "written before the snapshot";

pub fn repo_root() -> PathBuf {
    build_util::repo()
}

/// Skip (None) with a loud message, or fail under `CI=true`.
pub fn require(test: &str, what: &str, ok: bool) -> bool {
    if ok {
        return true;
    }
    let msg = format!("{test}: {what} is missing");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true: run scripts/setup)");
    }
    eprintln!("SKIPPED: {msg}; run scripts/setup (guest/kernel/build.sh for the kernel)");
    false
}

fn artifact(env: &str, default: &str) -> PathBuf {
    std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(default))
}

/// The kernel and rootfs, or None (skipped) when something is missing.
pub fn artifacts(test: &str) -> Option<(PathBuf, PathBuf)> {
    let kernel = artifact("SMOLVM_KERNEL", "target/guest/vmlinux");
    let rootfs = artifact("SMOLVM_ROOTFS", "target/guest/busybox.ext4");
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    (require(test, "/dev/kvm (read-write)", kvm)
        && require(
            test,
            &format!("the kernel {}", kernel.display()),
            kernel.is_file(),
        )
        && require(
            test,
            &format!("the rootfs {}", rootfs.display()),
            rootfs.is_file(),
        ))
    .then_some((kernel, rootfs))
}

/// The booted-and-saved machine every test resumes.
pub struct Fixture {
    _dir: tempfile::TempDir,
    /// The machine, uncompressed.
    pub machine: PathBuf,
    /// The same machine with zstd-compressed sections.
    pub compressed: PathBuf,
    /// A scratch directory for the tests.
    pub scratch: PathBuf,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
}

static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();

/// Boot, write [`MARKER`], save; once per test binary.
pub fn fixture(test: &str) -> Option<&'static Fixture> {
    FIXTURE
        .get_or_init(|| {
            let (kernel, rootfs) = artifacts(test)?;
            let dir = tempfile::tempdir().expect("temp dir");
            let t = Instant::now();
            let mut m = boot_linux(LinuxConfig::new(&kernel, &rootfs))
                .unwrap_or_else(|e| panic!("booting the Linux fixture failed: {e}"));
            eprintln!(
                "linux fixture: agent ready after {:.1} s",
                t.elapsed().as_secs_f64()
            );
            let out = m
                .agent()
                .run_capture([
                    "/bin/sh",
                    "-c",
                    &format!("echo '{MARKER_TEXT}' > {MARKER} && cat {MARKER}"),
                ])
                .expect("fixture setup command");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                MARKER_TEXT,
                "setup output, stderr {:?}",
                String::from_utf8_lossy(&out.stderr)
            );
            let manifest = Manifest {
                name: "linux-test".into(),
                cmd: vec!["/bin/sh".into(), "-c".into(), "echo default command".into()],
                ..Default::default()
            };
            let machine = dir.path().join("linux.smolmachine");
            let compressed = dir.path().join("linux-zstd.smolmachine");
            m.save(&machine, &manifest, Compression::None)
                .expect("saving the fixture");
            m.save(&compressed, &manifest, Compression::Zstd)
                .expect("saving the compressed fixture");
            eprintln!(
                "linux fixture: saved after {:.1} s",
                t.elapsed().as_secs_f64()
            );
            // The booted machine goes on after a save.
            m.unpause().expect("unpausing after the save");
            let out = m
                .agent()
                .run_capture(["cat", MARKER])
                .expect("a command after unpausing");
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), MARKER_TEXT);
            m.shutdown();
            let scratch = dir.path().join("scratch");
            std::fs::create_dir(&scratch).expect("scratch dir");
            Some(Fixture {
                _dir: dir,
                machine,
                compressed,
                scratch,
                kernel,
                rootfs,
            })
        })
        .as_ref()
}

/// The `smolvm` binary of this build profile (built once per test process).
pub fn smolvm_bin() -> PathBuf {
    build_util::bin("smolvm", "smolvm")
}

/// `smolvm ARGS` with `stdin` piped in; its output. The cache goes to the
/// fixture's scratch directory.
pub fn smolvm(fx: &Fixture, args: &[&std::ffi::OsStr], stdin: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new(smolvm_bin())
        .args(args)
        .env("SMOLVM_CACHE", fx.scratch.join("cache"))
        .env("SMOLVM_TIMINGS", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn smolvm");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait for smolvm");
    let _ = feeder.join();
    out
}

/// `smolvm run FILE -- ARGV...` with empty stdin.
pub fn run_in(fx: &Fixture, file: &Path, argv: &[&str]) -> Output {
    let mut args: Vec<&std::ffi::OsStr> = vec!["run".as_ref(), file.as_os_str(), "--".as_ref()];
    args.extend(argv.iter().map(|a| std::ffi::OsStr::new(*a)));
    smolvm(fx, &args, b"")
}

/// Human-readable summary of a run for assertion messages.
pub fn describe(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
