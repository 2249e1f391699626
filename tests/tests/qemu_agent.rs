//! Proves the guest side (kernel, busybox rootfs, `smol-agent` as PID 1)
//! without smolvm's VMM: QEMU's software emulator boots it once, and the host
//! client drives the agent over a virtio-serial port wired to a Unix
//! socket. Checked through the client: command output, exit codes and
//! signals, 1 MiB through `cat` byte for byte, two commands running at once,
//! the clock set by `Resume`, and a clean end of the VM.
//!
//! Needs `qemu-system-x86_64`, `target/guest/vmlinux`, `target/guest/smol-agent`
//! and `target/guest/busybox.ext4` (or `SMOLVM_KERNEL`, `SMOLVM_AGENT`,
//! `SMOLVM_ROOTFS`); without them the test skips with a message, except under
//! `CI=true` where it fails. The boot time to the agent's `Ready` is printed
//! (`--nocapture` shows it).
//!
//! The same checks run on the arm64 guest (`agent_serves_under_qemu_tcg_aarch64`):
//! `qemu-system-aarch64 -M virt,gic-version=3 -cpu cortex-a72` with
//! `target/guest/aarch64/{Image,smol-agent,busybox.ext4}` (`scripts/setup --aarch64`; or
//! `SMOLVM_KERNEL_AARCH64`, `SMOLVM_AGENT_AARCH64`, `SMOLVM_ROOTFS_AARCH64`).

#[path = "qemu_util/mod.rs"]
mod qemu_util;

use std::io::{Read, Write};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use qemu_util::{artifact, fingerprint, require, which, GuestSpec, QemuGuest, AGENT_PORT};
use smolvm_agent::client::{Client, ClientError};
use smolvm_agent::protocol::{Applied, ExecRequest, ExitStatus, WallClock};

/// Only a guard against a hung emulator or agent, not a performance expectation.
const HANG_GUARD: Duration = Duration::from_secs(300);

const TEST: &str = "qemu_agent";

type StepResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The booted guest and a client connected to its agent.
struct Guest {
    client: Arc<Client>,
    qemu: QemuGuest,
}

impl Guest {
    /// Panics with `msg` and the guest's console tail.
    fn fail(&self, msg: &str) -> ! {
        panic!("{msg}\n{}", self.qemu.diagnostics())
    }

    fn check(&self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.fail(&msg());
        }
    }

    /// Runs `f` against the client on its own thread, failing (with the
    /// console) if it errs or does not finish within `HANG_GUARD`. A step that
    /// hangs is abandoned; dropping the guest kills QEMU, which ends it.
    fn step<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(&Client) -> StepResult<T> + Send + 'static,
    ) -> T {
        let client = Arc::clone(&self.client);
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(f(&client).map_err(|e| e.to_string()));
        });
        match rx.recv_timeout(HANG_GUARD) {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => self.fail(&format!("{what}: {e}")),
            Err(RecvTimeoutError::Timeout) => {
                self.fail(&format!("{what}: not done within {HANG_GUARD:?}"))
            }
            Err(RecvTimeoutError::Disconnected) => {
                self.fail(&format!("{what}: the client thread panicked"))
            }
        }
    }

    /// Runs `argv` with empty stdin; returns stdout, stderr and status.
    fn run(&self, argv: &[&str]) -> (String, String, ExitStatus) {
        let args: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let out = self.step(&format!("run {argv:?}"), move |c| Ok(c.run_capture(args)?));
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            out.status,
        )
    }
}

/// Boots the guest and waits for the agent's first `Ready`; returns the guest
/// and the time from QEMU's start to that `Ready`.
fn boot(spec: &GuestSpec) -> (Guest, Duration) {
    let mut qemu = QemuGuest::spawn(spec);
    let stream = match qemu.connect(HANG_GUARD) {
        Ok(s) => s,
        Err(e) => panic!("{e}\n{}", qemu.diagnostics()),
    };
    let client = match Client::from_unix_stream(stream) {
        Ok(c) => Arc::new(c),
        Err(e) => panic!("cannot serve the agent socket: {e}\n{}", qemu.diagnostics()),
    };
    client.set_timeout(Some(HANG_GUARD));
    let mut guest = Guest { client, qemu };
    // The agent announces itself with `Ready` once it serves the port. Nothing
    // is sent before that: the port is a TTY that echoes until the agent puts
    // it in raw mode.
    loop {
        if guest.client.ready_count() > 0 {
            break;
        }
        if let Some(status) = guest.qemu.try_wait() {
            guest.fail(&format!(
                "QEMU exited ({status}) before the agent was ready"
            ));
        }
        if guest.qemu.started.elapsed() > HANG_GUARD {
            guest.fail(&format!("the agent sent no Ready within {HANG_GUARD:?}"));
        }
        thread::sleep(Duration::from_millis(2));
    }
    let ready = guest.qemu.started.elapsed();
    let version = guest.step("handshake", |c| Ok(c.handshake()?));
    guest.check(version == smolvm_agent::protocol::PROTOCOL_VERSION, || {
        format!("agent speaks protocol {version}")
    });
    (guest, ready)
}

/// Deterministic bytes covering every value (control characters included, so
/// any TTY translation on the port would show).
fn payload(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// One architecture's guest under QEMU.
struct Target {
    qemu: (&'static str, &'static str),
    machine: &'static str,
    cpu: &'static str,
    /// (override variable, default path, what builds it) of the kernel, agent, rootfs.
    artifacts: [(&'static str, &'static str, &'static str); 3],
    /// The command line before `root=`.
    cmdline: String,
    name: &'static str,
}

#[test]
fn agent_serves_under_qemu_tcg() {
    serves(Target {
        qemu: ("qemu-system-x86_64", "qemu-system-x86"),
        machine: "microvm,acpi=off",
        cpu: "max",
        artifacts: [
            (
                "SMOLVM_KERNEL",
                "target/guest/vmlinux",
                "guest/kernel/build.sh",
            ),
            (
                "SMOLVM_AGENT",
                "target/guest/smol-agent",
                "guest/agent/build.sh",
            ),
            (
                "SMOLVM_ROOTFS",
                "target/guest/busybox.ext4",
                "guest/rootfs/build-busybox.sh",
            ),
        ],
        cmdline: qemu_util::CMDLINE_BASE.trim().to_string(),
        name: "TCG",
    });
}

/// The arm64 guest: kernel Image, aarch64 agent and busybox-static:arm64 root. The base
/// command line is x86_64's (8250 console, `reboot=k`, kvm-clock); arm64 has the PL011
/// here and reboots through PSCI, so only the options that apply are kept.
#[test]
fn agent_serves_under_qemu_tcg_aarch64() {
    serves(Target {
        qemu: ("qemu-system-aarch64", "qemu-system-arm"),
        machine: "virt,gic-version=3",
        cpu: "cortex-a72",
        artifacts: [
            (
                "SMOLVM_KERNEL_AARCH64",
                "target/guest/aarch64/Image",
                "guest/kernel/build.sh --arch arm64",
            ),
            (
                "SMOLVM_AGENT_AARCH64",
                "target/guest/aarch64/smol-agent",
                "guest/agent/build.sh --arch arm64",
            ),
            (
                "SMOLVM_ROOTFS_AARCH64",
                "target/guest/aarch64/busybox.ext4",
                "guest/rootfs/build-busybox.sh --arch arm64",
            ),
        ],
        cmdline: "console=ttyAMA0 panic=-1 init_on_free=1 quiet".to_string(),
        name: "TCG, arm64",
    });
}

fn serves(target: Target) {
    let Some(qemu) = require(
        TEST,
        &format!("{} ({})", target.qemu.0, target.qemu.1),
        which(target.qemu.0),
    ) else {
        return;
    };
    let mut found = Vec::new();
    for (env, default, builder) in target.artifacts {
        let Some(path) = require(
            TEST,
            &format!("{default} ({builder})"),
            artifact(env, default),
        ) else {
            return;
        };
        found.push(path);
    }
    let (kernel, rootfs) = (found[0].clone(), found[2].clone());
    let image_before = fingerprint(&rootfs);

    let spec = GuestSpec {
        qemu: &qemu,
        machine: target.machine,
        kernel: &kernel,
        rootfs: &rootfs,
        // `loglevel=7` overrides `quiet` so a failure shows the kernel's and
        // the agent's log (the agent logs at KERN_INFO).
        cmdline: format!(
            "{} root=/dev/vda rw smolvm.agent={AGENT_PORT} loglevel=7",
            target.cmdline
        ),
        accel: "tcg",
        cpu: target.cpu,
    };
    let (mut guest, ready) = boot(&spec);
    eprintln!(
        "{TEST}: agent ready {ready:.2?} after QEMU started ({})",
        target.name
    );

    // Output of a command.
    let (out, _, status) = guest.run(&["echo", "hello from the guest"]);
    guest.check(
        out == "hello from the guest\n" && status == ExitStatus::Code(0),
        || format!("echo gave {out:?} ({status:?})"),
    );

    // Exit codes and signals.
    let (_, _, status) = guest.run(&["true"]);
    guest.check(status == ExitStatus::Code(0), || {
        format!("`true` ended with {status:?}")
    });
    let (out, err, status) = guest.run(&["sh", "-c", "echo out; echo err >&2; exit 3"]);
    guest.check(
        status == ExitStatus::Code(3) && out == "out\n" && err == "err\n",
        || format!("`exit 3` gave {status:?}, stdout {out:?}, stderr {err:?}"),
    );
    let (_, _, status) = guest.run(&["sh", "-c", "kill -KILL $$"]);
    guest.check(status == ExitStatus::Signal(libc::SIGKILL), || {
        format!("a shell killing itself ended with {status:?}")
    });
    let status = guest.step("signal from the host", |c| {
        let h = c.exec(ExecRequest::new(["sleep", "1000"]))?;
        h.pid()?;
        h.signal(libc::SIGTERM)?;
        Ok(h.wait()?)
    });
    guest.check(status == ExitStatus::Signal(libc::SIGTERM), || {
        format!("`sleep` sent SIGTERM ended with {status:?}")
    });
    let missing = guest.step("a missing program", |c| {
        Ok(match c.run_capture(["no-such-program"]) {
            Err(ClientError::ExecFailed(_)) => None,
            other => Some(format!("{other:?}")),
        })
    });
    if let Some(other) = missing {
        guest.fail(&format!(
            "a missing program gave {other} instead of ExecFailed"
        ));
    }

    // 1 MiB through `cat`, stdin written while stdout is read.
    let data = Arc::new(payload(1 << 20));
    let sent = Arc::clone(&data);
    let (echoed, status) = guest.step("1 MiB through cat", move |c| {
        let mut h = c.exec(ExecRequest::new(["cat"]))?;
        let mut stdin = h.stdin();
        let writer = thread::spawn(move || -> StepResult<()> {
            stdin.write_all(&sent)?;
            stdin.close()?;
            Ok(())
        });
        let mut echoed = Vec::new();
        h.take_stdout()
            .ok_or("stdout already taken")?
            .read_to_end(&mut echoed)?;
        writer.join().map_err(|_| "stdin writer panicked")??;
        Ok((echoed, h.wait()?))
    });
    guest.check(status == ExitStatus::Code(0), || {
        format!("cat ended with {status:?}")
    });
    if echoed != *data {
        let first = echoed.iter().zip(data.iter()).position(|(a, b)| a != b);
        guest.fail(&format!(
            "cat returned {} bytes for {} sent; first difference at {first:?}",
            echoed.len(),
            data.len()
        ));
    }

    // Two commands at once: a FIFO reader blocks in open() until the writer
    // opens the other end, so it can finish only if both run together.
    let (_, err, status) = guest.run(&["mkfifo", "/tmp/pipe"]);
    guest.check(status == ExitStatus::Code(0), || {
        format!("mkfifo: {status:?} {err}")
    });
    let out = guest.step("two commands at once", |c| {
        let reader = c.exec(ExecRequest::new(["cat", "/tmp/pipe"]))?;
        reader.pid()?;
        let writer = c.run_capture(["sh", "-c", "echo through the fifo > /tmp/pipe"])?;
        if writer.status != ExitStatus::Code(0) {
            return Err(format!("fifo writer ended with {:?}", writer.status).into());
        }
        Ok(reader.wait_with_output()?)
    });
    guest.check(
        out.stdout == b"through the fifo\n" && out.status == ExitStatus::Code(0),
        || format!("fifo reader gave {out:?}"),
    );
    // And from two host threads at the same time.
    let a = Arc::clone(&guest.client);
    let b = Arc::clone(&guest.client);
    let (x, y) = guest.step("two host threads", move |_| {
        let t = thread::spawn(move || a.run_capture(["sh", "-c", "echo one"]));
        let y = b.run_capture(["sh", "-c", "echo two"])?;
        let x = t.join().map_err(|_| "thread panicked")??;
        Ok((x, y))
    });
    guest.check(x.stdout == b"one\n" && y.stdout == b"two\n", || {
        format!("concurrent runs gave {x:?} and {y:?}")
    });

    // The root filesystem is writable (the image itself is not touched).
    let (out, _, status) = guest.run(&["sh", "-c", "echo kept > /root/f && cat /root/f"]);
    guest.check(out == "kept\n" && status == ExitStatus::Code(0), || {
        format!("writing the root filesystem gave {out:?} ({status:?})")
    });

    // The clock: `Resume` sets it to a chosen time, one day ahead of the host.
    let host_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("host clock after 1970")
        .as_secs() as i64;
    let target = host_now + 86_400;
    let mut entropy = [0u8; 32];
    getrandom(&mut entropy);
    let set_at = Instant::now();
    let report = guest.step("resume with a new clock", move |c| {
        Ok(c.resume(
            WallClock {
                secs: target,
                nanos: 0,
            },
            &entropy,
        )?)
    });
    guest.check(
        report.clock == Applied::Applied && report.entropy == Applied::Applied,
        || format!("resume report: {report:?}"),
    );
    let (out, _, _) = guest.run(&["date", "+%s"]);
    let elapsed = set_at.elapsed().as_secs() as i64;
    let seen: i64 = out
        .trim()
        .parse()
        .unwrap_or_else(|_| guest.fail(&format!("`date +%s` printed {out:?}")));
    guest.check(seen >= target - 2 && seen <= target + elapsed + 2, || {
        format!("guest clock {seen}, set to {target} {elapsed} s before")
    });

    // A clean end: the x86_64 kernel has no ACPI, so power-off would only halt
    // the CPU; a reboot resets the machine (arm64: PSCI SYSTEM_RESET), which
    // `-no-reboot` turns into QEMU exiting on its own.
    guest.step("shutdown", |c| Ok(c.shutdown(true)?));
    match guest.qemu.wait_exit(HANG_GUARD) {
        Some(status) => guest.check(status.success(), || {
            format!("QEMU ended with {status} after the shutdown")
        }),
        None => guest.fail(&format!(
            "QEMU still runs {HANG_GUARD:?} after the shutdown"
        )),
    }
    let console = guest.qemu.console();
    guest.check(
        console.contains("reboot: Restarting system") && !console.contains("Kernel panic"),
        || "the kernel did not restart cleanly".to_string(),
    );
    assert_eq!(
        fingerprint(&rootfs),
        image_before,
        "the rootfs image {} was modified",
        rootfs.display()
    );
}

/// Fresh random bytes from the host.
fn getrandom(buf: &mut [u8]) {
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .expect("read /dev/urandom");
}
