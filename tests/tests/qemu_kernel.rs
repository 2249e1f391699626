//! Boots the guest kernel (`target/guest/vmlinux`, or `SMOLVM_KERNEL`) under
//! QEMU's software emulator as an independent check of the kernel itself:
//! virtio-mmio devices from the command line, an ext4 root on virtio-blk, the
//! filesystems and features the config promises, and a clean end of the VM
//! through `reboot=k`. It boots once with the base command line and once with
//! the PVM additions too, so the guarded workarounds are proven inert where
//! they are not needed. (Booting on a PVM `/dev/kvm` is slower and is
//! recorded in `guest/kernel/README.md` instead.)
//!
//! Needs `qemu-system-x86_64`, `mkfs.ext4` and a static busybox
//! (`busybox-static`); without them, or without the kernel, the test skips
//! with a message, except under `CI=true` where it fails.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CMDLINE_BASE: &str = include_str!("../../guest/kernel/cmdline-base.txt");
const CMDLINE_PVM: &str = include_str!("../../guest/kernel/cmdline-pvm.txt");

/// Only a guard against a hung emulator, not a performance expectation.
const HANG_GUARD: Duration = Duration::from_secs(180);

/// PID 1 of the test guest: checks the kernel features smolvm relies on and
/// prints one marker per check, then ends the VM the way the agent does.
const INIT: &str = r#"#!/bin/busybox sh
export PATH=/bin
busybox mount -t proc proc /proc
busybox mount -t sysfs sysfs /sys
echo "SMOLVM-CMDLINE $(busybox cat /proc/cmdline)"
echo "SMOLVM-INITARGS $(busybox tr '\0' ' ' < /proc/1/cmdline)"
echo "SMOLVM-INITENV $(busybox tr '\0' ' ' < /proc/1/environ)"
for fs in ext4 overlay tmpfs devtmpfs devpts proc sysfs mqueue; do
    busybox grep -qw "$fs" /proc/filesystems && echo "SMOLVM-FS $fs"
done
busybox mount -t tmpfs tmpfs /tmp
busybox mkdir -p /tmp/up /tmp/work /tmp/merged /dev/pts
busybox mount -t overlay overlay -o lowerdir=/etc,upperdir=/tmp/up,workdir=/tmp/work /tmp/merged &&
    echo written > /tmp/merged/new && busybox test -f /tmp/up/new && echo "SMOLVM-OVERLAY ok"
busybox mount -t devpts devpts /dev/pts && busybox test -c /dev/ptmx && echo "SMOLVM-PTS ok"
busybox ip link set lo up && busybox ip addr add 127.0.0.1/8 dev lo 2>/dev/null
busybox ip addr show lo | busybox grep -q 127.0.0.1 && echo "SMOLVM-LO ok"
busybox test -c /dev/hwrng && echo "SMOLVM-HWRNG ok"
busybox test -f /proc/sysvipc/shm && echo "SMOLVM-IPC ok"
child=$(busybox sh -c 'echo $$')
busybox test -n "$child" && echo "SMOLVM-FORK ok"
echo "SMOLVM-UPTIME $(busybox cat /proc/uptime)"
echo "SMOLVM-END"
busybox sync
busybox reboot -f
"#;

/// What each boot must print, in the order of `INIT`.
const EXPECTED: &[&str] = &[
    "SMOLVM-FS ext4",
    "SMOLVM-FS overlay",
    "SMOLVM-FS tmpfs",
    "SMOLVM-FS devtmpfs",
    "SMOLVM-FS devpts",
    "SMOLVM-FS proc",
    "SMOLVM-FS sysfs",
    "SMOLVM-FS mqueue",
    "SMOLVM-OVERLAY ok",
    "SMOLVM-PTS ok",
    "SMOLVM-LO ok",
    "SMOLVM-HWRNG ok",
    "SMOLVM-IPC ok",
    "SMOLVM-FORK ok",
    "SMOLVM-END",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate lives in the workspace")
        .to_path_buf()
}

/// Skips (returns `None`) with a loud message, or fails under `CI=true`.
fn require(what: &str, found: Option<PathBuf>) -> Option<PathBuf> {
    if found.is_some() {
        return found;
    }
    let msg = format!("qemu_kernel: {what} not found");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true: run scripts/setup)");
    }
    eprintln!("SKIPPED: {msg}; run scripts/setup to build and install it");
    None
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn kernel() -> Option<PathBuf> {
    let path = std::env::var_os("SMOLVM_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/guest/vmlinux"));
    path.is_file().then_some(path)
}

/// A small ext4 image holding a static busybox and `INIT`.
fn build_rootfs(dir: &Path, busybox: &Path, mkfs: &Path) -> PathBuf {
    let tree = dir.join("tree");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(tree.join(d)).expect("create rootfs dir");
    }
    std::fs::copy(busybox, tree.join("bin/busybox")).expect("copy busybox");
    std::os::unix::fs::symlink("busybox", tree.join("bin/sh")).expect("link sh");
    std::fs::write(tree.join("etc/hostname"), "smolvm\n").expect("write etc");
    let init = tree.join("init");
    std::fs::write(&init, INIT).expect("write init");
    let mut perm = std::fs::metadata(&init).expect("stat init").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&init, perm).expect("chmod init");

    let image = dir.join("root.ext4");
    let status = Command::new(mkfs)
        .args(["-q", "-F", "-d"])
        .stdout(Stdio::null())
        .arg(&tree)
        .arg(&image)
        .arg("16M")
        .status()
        .expect("run mkfs.ext4");
    assert!(status.success(), "mkfs.ext4 failed: {status}");
    image
}

/// Boots the kernel under TCG with `cmdline` and returns the serial output.
fn boot(qemu: &Path, kernel: &Path, rootfs: &Path, cmdline: &str) -> String {
    let mut child = Command::new(qemu)
        .args(["-M", "microvm,acpi=off", "-cpu", "max", "-accel", "tcg"])
        .args(["-m", "256", "-smp", "1", "-nographic", "-no-reboot"])
        .args(["-nodefaults", "-serial", "stdio"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-append")
        .arg(cmdline)
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=raw,if=none,snapshot=on",
            rootfs.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root"])
        .args(["-device", "virtio-rng-device"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-x86_64");

    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for qemu") {
            break status;
        }
        if started.elapsed() > HANG_GUARD {
            let _ = child.kill();
            let _ = child.wait();
            let mut out = String::new();
            if let Some(mut s) = child.stdout.take() {
                let _ = s.read_to_string(&mut out);
            }
            panic!("guest did not end within {HANG_GUARD:?}; console:\n{out}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        s.read_to_string(&mut out).expect("read qemu stdout");
    }
    if let Some(mut s) = child.stderr.take() {
        s.read_to_string(&mut err).expect("read qemu stderr");
    }
    assert!(
        status.success(),
        "qemu exited with {status}; stderr:\n{err}\nconsole:\n{out}"
    );
    out
}

fn check(out: &str, cmdline: &str) {
    let mut rest = out;
    for want in EXPECTED {
        match rest.find(want) {
            Some(at) => rest = &rest[at + want.len()..],
            None => panic!("guest did not print {want:?} (in order); console:\n{out}"),
        }
    }
    let seen = out
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("SMOLVM-CMDLINE "))
        .unwrap_or_else(|| panic!("no command line echoed; console:\n{out}"));
    // QEMU appends the `virtio_mmio.device=` declarations of its devices.
    assert!(
        seen.starts_with(cmdline) && seen.contains("virtio_mmio.device="),
        "kernel saw a different command line: {seen:?}"
    );
    // Options the kernel does not know are handed to init as arguments or
    // environment; neither command-line file may contain any.
    let line = |tag: &str| {
        out.lines()
            .find_map(|l| l.trim_end().strip_prefix(tag))
            .unwrap_or_else(|| panic!("no {tag:?} line; console:\n{out}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        line("SMOLVM-INITARGS "),
        ["/bin/busybox", "sh", "/init"],
        "unknown options reached init's arguments"
    );
    let mut env = line("SMOLVM-INITENV ");
    env.sort_unstable();
    assert_eq!(
        env,
        ["HOME=/", "TERM=linux"],
        "unknown options reached init's environment"
    );
    assert!(
        !out.contains("Kernel panic"),
        "kernel panicked; console:\n{out}"
    );
}

#[test]
fn kernel_boots_under_qemu_tcg() {
    let Some(kernel) = require("guest kernel target/guest/vmlinux", kernel()) else {
        return;
    };
    let Some(qemu) = require(
        "qemu-system-x86_64 (qemu-system-x86)",
        which("qemu-system-x86_64"),
    ) else {
        return;
    };
    let Some(mkfs) = require("mkfs.ext4 (e2fsprogs)", which("mkfs.ext4")) else {
        return;
    };
    let busybox = Path::new("/bin/busybox");
    let Some(busybox) = require(
        "static /bin/busybox (busybox-static)",
        busybox.is_file().then(|| busybox.to_path_buf()),
    ) else {
        return;
    };

    let dir = tempfile::tempdir().expect("create temp dir");
    let rootfs = build_rootfs(dir.path(), &busybox, &mkfs);

    let base = format!("{} root=/dev/vda rw init=/init", CMDLINE_BASE.trim());
    let out = boot(&qemu, &kernel, &rootfs, &base);
    check(&out, &base);

    // The PVM workarounds are switched on by this command line; under TCG
    // they must change nothing a program can see.
    let pvm = format!("{base} {}", CMDLINE_PVM.trim());
    let out = boot(&qemu, &kernel, &rootfs, &pvm);
    check(&out, &pvm);
}
