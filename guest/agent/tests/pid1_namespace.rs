//! The agent as PID 1, without a VM: inside fresh PID, mount, UTS and network namespaces
//! (`unshare`), serving a pseudo-terminal the way it serves a virtio-console port. Covers the
//! PID-1-only paths: mounts, hostname, loopback, orphan reaping via signalfd, and shutdown
//! through reboot(2) (which in a PID namespace ends the namespace's init with SIGINT).

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::Duration;

use smolvm_agent::client::Client;
use smolvm_agent::protocol::{ExitStatus, WinSize};
use smolvm_agent::sys;

fn agent_bin() -> String {
    std::env::var("SMOLVM_AGENT").unwrap_or_else(|_| env!("CARGO_BIN_EXE_smol-agent").into())
}

fn can_unshare() -> bool {
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        return false;
    }
    Command::new("unshare")
        .args(["--pid", "--fork", "--mount", "--uts", "--net", "true"])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn agent_as_pid1_in_namespaces() {
    if !can_unshare() {
        eprintln!("SKIP agent_as_pid1_in_namespaces: needs root and unshare(1) with namespaces");
        return;
    }
    let (master, slave): (OwnedFd, OwnedFd) = sys::open_pty(WinSize::default()).unwrap();
    // Raw before the agent even starts, so nothing the host writes is echoed back.
    sys::make_raw_if_tty(slave.as_raw_fd()).unwrap();
    let slave_path = std::fs::read_link(format!("/proc/self/fd/{}", slave.as_raw_fd())).unwrap();

    let mut child = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount",
            "--uts",
            "--net",
            "--mount-proc",
            "--",
        ])
        .arg(agent_bin())
        .arg("--device")
        .arg(&slave_path)
        .arg("--log-stderr")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();

    let m = File::from(master);
    let c = Client::new(m.try_clone().unwrap(), m).unwrap();
    c.set_timeout(Some(Duration::from_secs(60)));
    c.handshake().unwrap();
    drop(slave);

    let out = c.run_capture(["cat", "/proc/1/cmdline"]).unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("smol-agent"),
        "PID 1 is not the agent: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = c.run_capture(["hostname"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "smolvm");

    if std::path::Path::new("/usr/sbin/ip").exists() || std::path::Path::new("/sbin/ip").exists() {
        let out = c.run_capture(["ip", "-o", "link", "show", "lo"]).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("UP"), "lo is not up: {text}");
    }

    // An orphan: the shell exits at once, its background child is adopted by PID 1.
    let out = c.run_capture(["sh", "-c", "sleep 0.1 & echo $!"]).unwrap();
    let orphan: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    // Wait (bounded) until it is gone from /proc: gone means exited *and* reaped by PID 1.
    let probe = format!("test -e /proc/{orphan} && exit 1; exit 0");
    let mut reaped = false;
    for _ in 0..600 {
        if c.run_capture(["sh", "-c", &probe]).unwrap().status == ExitStatus::Code(0) {
            reaped = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(reaped, "orphan {orphan} was never reaped");

    // Terminals work with the devpts the namespace sees.
    let mut req = smolvm_agent::protocol::ExecRequest::new(["tty"]);
    req.tty = Some(WinSize { rows: 10, cols: 20 });
    let out = c.exec(req).unwrap().wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("/dev/pts/"));

    c.shutdown(false).unwrap();
    let status = child.wait().unwrap();
    // reboot(RB_POWER_OFF) in a PID namespace kills its init with SIGINT; unshare reports it.
    use std::os::unix::process::ExitStatusExt;
    assert!(
        status.signal() == Some(libc::SIGINT) || status.code() == Some(128 + libc::SIGINT),
        "unexpected end of the namespace's init: {status}"
    );
}
