//! A guest under QEMU, independent of smolvm's own VMM: the project's kernel,
//! the busybox rootfs (agent as PID 1) on virtio-blk, the kernel log on the
//! first serial port (ttyS0 on x86_64's microvm, the PL011 ttyAMA0 on arm64's
//! virt) in a file and the agent port as a named virtio-serial port wired to a
//! Unix socket. QEMU is killed when the [`QemuGuest`] is dropped.
//!
//! Use `#[path = "qemu_util/mod.rs"] mod qemu_util;` to include it.

#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// The base kernel command line every smolvm guest gets.
pub const CMDLINE_BASE: &str = include_str!("../../../guest/kernel/cmdline-base.txt");

/// The agent port, by name, as smolvm's VMM offers it: a plain port of the
/// virtio-serial device (the kernel log is on the serial console). Not a
/// `virtconsole`: QEMU drops what a console port cannot write to its
/// chardev at once, so a host reader that fell behind (a loaded machine)
/// saw the stream lose bytes and sync; a plain port waits for the reader.
pub const AGENT_PORT: &str = "org.smolvm.agent";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate lives in the workspace")
        .to_path_buf()
}

/// Returns `found`, or skips (`None`) with a loud message; fails under `CI=true`.
pub fn require(test: &str, what: &str, found: Option<PathBuf>) -> Option<PathBuf> {
    if found.is_some() {
        return found;
    }
    let msg = format!("{test}: {what} not found");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true: run scripts/setup)");
    }
    eprintln!("SKIPPED: {msg}; run scripts/setup to build or install it");
    None
}

/// A program on `PATH` (or in /usr/sbin, /sbin).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A built guest artifact: `$env` if set, else `default` under the repo root.
pub fn artifact(env: &str, default: &str) -> Option<PathBuf> {
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(default));
    path.is_file().then_some(path)
}

/// Size and modification time, to show a file was left untouched.
pub fn fingerprint(path: &Path) -> (u64, SystemTime) {
    let meta = std::fs::metadata(path).expect("stat file");
    (meta.len(), meta.modified().expect("file mtime"))
}

/// What to boot.
pub struct GuestSpec<'a> {
    pub qemu: &'a Path,
    /// `-M` value: `microvm,acpi=off` (x86_64) or `virt,gic-version=3` (arm64); the
    /// virtio devices go on the machine's virtio-mmio transports either way.
    pub machine: &'a str,
    pub kernel: &'a Path,
    /// Booted through a copy-on-write overlay (`snapshot=on`): never written.
    pub rootfs: &'a Path,
    /// Full kernel command line (QEMU appends its `virtio_mmio.device=` list).
    pub cmdline: String,
    /// `-accel` value: `tcg`, or `kvm` together with a `-cpu` the host accepts.
    pub accel: &'a str,
    pub cpu: &'a str,
}

/// A running QEMU; its temp dir holds the agent socket, the console log and
/// QEMU's own stdout/stderr.
pub struct QemuGuest {
    child: Child,
    dir: tempfile::TempDir,
    /// When QEMU was started (boot times are measured from here).
    pub started: Instant,
}

impl QemuGuest {
    pub fn spawn(spec: &GuestSpec) -> QemuGuest {
        let dir = tempfile::Builder::new()
            .prefix("smolvm-qemu")
            .tempdir()
            .expect("create temp dir");
        let socket = dir.path().join("agent.sock");
        let console = dir.path().join("console.log");
        let out = std::fs::File::create(dir.path().join("qemu.out")).expect("create qemu.out");
        let err = out.try_clone().expect("dup qemu.out");
        let started = Instant::now();
        let child = Command::new(spec.qemu)
            .args(["-M", spec.machine, "-cpu", spec.cpu, "-accel", spec.accel])
            .args([
                "-m",
                "256",
                "-smp",
                "1",
                "-nographic",
                "-no-reboot",
                "-nodefaults",
            ])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(spec.kernel)
            .arg("-append")
            .arg(&spec.cmdline)
            .arg("-drive")
            .arg(format!(
                "id=root,file={},format=raw,if=none,snapshot=on",
                spec.rootfs.display()
            ))
            .args(["-device", "virtio-blk-device,drive=root"])
            .args(["-device", "virtio-rng-device"])
            .args(["-device", "virtio-serial-device"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=agent,path={},server=on,wait=off",
                socket.display()
            ))
            .arg("-device")
            .arg(format!("virtserialport,chardev=agent,name={AGENT_PORT}"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", spec.qemu.display()));
        QemuGuest {
            child,
            dir,
            started,
        }
    }

    /// Connects to the agent socket as soon as QEMU has created it (before the
    /// guest can have opened its end, so the agent's first `Ready` is not missed).
    pub fn connect(&mut self, guard: Duration) -> Result<UnixStream, String> {
        let socket = self.dir.path().join("agent.sock");
        let start = Instant::now();
        loop {
            if socket.exists() {
                match UnixStream::connect(&socket) {
                    Ok(s) => return Ok(s),
                    Err(e) if start.elapsed() > guard => {
                        return Err(format!("cannot connect to {}: {e}", socket.display()))
                    }
                    Err(_) => {}
                }
            }
            if let Some(status) = self.try_wait() {
                return Err(format!(
                    "QEMU exited ({status}) before its agent socket existed"
                ));
            }
            if start.elapsed() > guard {
                return Err(format!("QEMU created no agent socket within {guard:?}"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// QEMU's exit status if it has ended.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait for qemu")
    }

    /// Waits for QEMU to end on its own; `None` after `guard` (QEMU still runs).
    pub fn wait_exit(&mut self, guard: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if start.elapsed() > guard {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The whole kernel console so far.
    pub fn console(&self) -> String {
        let bytes = std::fs::read(self.dir.path().join("console.log")).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The last lines of the console and QEMU's own output, for failure messages.
    pub fn diagnostics(&self) -> String {
        let tail = |text: String| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(60)..].join("\n")
        };
        let qemu = std::fs::read(self.dir.path().join("qemu.out")).unwrap_or_default();
        format!(
            "--- guest console (tail) ---\n{}\n--- qemu output ---\n{}\n---",
            tail(self.console()),
            tail(String::from_utf8_lossy(&qemu).into_owned())
        )
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
