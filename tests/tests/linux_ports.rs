//! Published ports on a real Linux guest: `examples/hello` (with a `[[port]]` added in a
//! copy) built once, then `smolvm run -p` and the manifest's port reached
//! from this host over loopback. Checks the web server through a forward, concurrent
//! connections with exact bytes both ways and half-close, a guest port with nothing
//! listening, a busy host port, a client that stops reading, and `--save` with a connection
//! open.
//!
//! Needs /dev/kvm and the guest artifacts (`scripts/setup`); skips loudly without them,
//! except under `CI=true`, where it fails. Every child has a deadline.

mod build_util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use build_util::{bin, describe, guest, repo, smolpack_build};

/// One forwarded exchange may take this long before the test fails (only catches hangs).
const IO_DEADLINE: Duration = Duration::from_secs(300);

struct Built {
    dir: tempfile::TempDir,
    machine: PathBuf,
    /// The host port the manifest publishes guest port 8080 on.
    default_port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `examples/hello` with `[[port]] guest = 8080, host = <free port>`, built once.
fn hello(test: &str) -> Option<&'static Built> {
    static BUILT: OnceLock<Result<Built, String>> = OnceLock::new();
    let guest = guest(test)?;
    let built = BUILT.get_or_init(|| {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        // A machine built beforehand from the same Smolfile (on a loaded emulating host the
        // build alone can take 10 minutes): SMOLVM_TEST_PORTS_MACHINE=FILE and
        // SMOLVM_TEST_PORTS_DEFAULT=the host port of its [[port]] for guest port 8080.
        if let (Ok(m), Ok(p)) = (
            std::env::var("SMOLVM_TEST_PORTS_MACHINE"),
            std::env::var("SMOLVM_TEST_PORTS_DEFAULT"),
        ) {
            return Ok(Built {
                dir,
                machine: PathBuf::from(m),
                default_port: p
                    .parse()
                    .map_err(|_| "bad SMOLVM_TEST_PORTS_DEFAULT".to_string())?,
            });
        }
        let src = repo().join("examples/hello");
        let copy = dir.path().join("hello");
        std::fs::create_dir_all(copy.join("www")).map_err(|e| e.to_string())?;
        for f in ["greet", "www/index.html"] {
            std::fs::copy(src.join(f), copy.join(f)).map_err(|e| e.to_string())?;
        }
        let default_port = free_port();
        // The web service's readiness gets more time: a loaded emulating host needs it.
        let smolfile = std::fs::read_to_string(src.join("Smolfile"))
            .map_err(|e| e.to_string())?
            .replace("timeout = \"60s\"", "timeout = \"600s\"")
            + &format!("\n[[port]]\nguest = 8080\nhost = {default_port}\n");
        std::fs::write(copy.join("Smolfile"), smolfile).map_err(|e| e.to_string())?;
        let machine = dir.path().join("hello.smolmachine");
        let out = smolpack_build(&guest, &copy.join("Smolfile"), &machine);
        if !out.status.success() {
            return Err(format!("smolpack build failed: {}", describe(&out)));
        }
        Ok(Built {
            dir,
            machine,
            default_port,
        })
    });
    match built {
        Ok(b) => Some(b),
        Err(e) => panic!("{e}"),
    }
}

/// Serialises the machines of this file: with two running at once on the loaded PVM host,
/// forwarded connections of the echo test were seen reset (not understood yet; every test
/// passes when they run one at a time).
static ONE_MACHINE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A running `smolvm run ARGS` whose command keeps the machine up until its stdin closes.
struct Running {
    _one: std::sync::MutexGuard<'static, ()>,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    started: Instant,
}

impl Running {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Running {
        let one = ONE_MACHINE.lock().unwrap_or_else(|e| e.into_inner());
        let mut cmd = Command::new(bin("smolvm", "smolvm"));
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("starting smolvm");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Running {
            _one: one,
            child,
            stdin,
            stdout,
            started: Instant::now(),
        }
    }

    /// The command's next stdout line (it prints `ready` once its servers listen).
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.stdout.read_line(&mut l).unwrap();
        assert!(!l.is_empty(), "the command ended early");
        l.trim_end().to_string()
    }

    /// Closes the command's stdin and waits for smolvm's exit status.
    fn finish(mut self) -> std::process::ExitStatus {
        drop(self.stdin.take());
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if self.started.elapsed() > Duration::from_secs(900) {
                let _ = self.child.kill();
                panic!("smolvm did not finish");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the published port");
    s.set_read_timeout(Some(IO_DEADLINE)).unwrap();
    s.set_write_timeout(Some(IO_DEADLINE)).unwrap();
    s
}

/// `GET path` over HTTP/1.0 through the forward: the whole response.
fn get(port: u16, path: &str) -> Vec<u8> {
    let mut s = connect(port);
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    out
}

fn body(resp: &[u8]) -> &[u8] {
    let at = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response");
    &resp[at + 4..]
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2] ^ seed)
        .collect()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn the_web_server_is_reached_through_p_and_the_manifest_port() {
    let Some(b) = hello("the_web_server_is_reached_through_p_and_the_manifest_port") else {
        return;
    };
    let (port, nothing) = (free_port(), free_port());
    let mut run = Running::start(
        &[
            "run",
            "-p",
            &format!("{port}:8080"),
            "-p",
            &format!("127.0.0.1:{nothing}:9999/tcp"),
            path(&b.machine),
            "--",
            "sh",
            "-c",
            "echo ready; exec cat >/dev/null",
        ],
        &[],
    );
    assert_eq!(run.line(), "ready");
    let index = std::fs::read(repo().join("examples/hello/www/index.html")).unwrap();
    let resp = get(port, "/");
    assert!(
        resp.starts_with(b"HTTP/1.1 200 OK") || resp.starts_with(b"HTTP/1.0 200 OK"),
        "{}",
        String::from_utf8_lossy(&resp)
    );
    assert_eq!(body(&resp), index);
    // `-p` for guest port 8080 replaced the manifest's mapping of it.
    assert!(TcpStream::connect(("127.0.0.1", b.default_port)).is_err());
    // Nothing listens on guest port 9999: the host connection is closed at once.
    let mut s = connect(nothing);
    let mut buf = [0u8; 16];
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0);
    assert!(run.finish().success());

    // Without -p the Smolfile's [[port]] publishes it by default.
    let mut run = Running::start(
        &[
            "run",
            path(&b.machine),
            "--",
            "sh",
            "-c",
            "echo ready; exec cat >/dev/null",
        ],
        &[],
    );
    assert_eq!(run.line(), "ready");
    assert_eq!(body(&get(b.default_port, "/")), index);
    assert!(run.finish().success());
}

#[test]
fn a_busy_host_port_fails_the_start_with_one_line() {
    let Some(b) = hello("a_busy_host_port_fails_the_start_with_one_line") else {
        return;
    };
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = Command::new(bin("smolvm", "smolvm"))
        .args([
            "run",
            "-p",
            &format!("{port}:8080"),
            path(&b.machine),
            "--",
            "true",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("cannot publish port 127.0.0.1:{port}: ")),
        "{err}"
    );
    let out = Command::new(bin("smolvm", "smolvm"))
        .args(["run", "-p", "8080", path(&b.machine)])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad port mapping '8080'"));
}

#[test]
fn concurrent_connections_move_exact_bytes_both_ways() {
    let Some(b) = hello("concurrent_connections_move_exact_bytes_both_ways") else {
        return;
    };
    let port = free_port();
    // An echo server per connection (busybox nc runs cat for each), started before `ready`.
    let mut run = Running::start(
        &[
            "run",
            "-p",
            &format!("{port}:7000"),
            path(&b.machine),
            "--",
            "sh",
            "-c",
            "nc -ll -p 7000 -e cat & until grep -q ':1B58 ' /proc/net/tcp; do sleep 0.2; done; \
             echo ready; exec cat >/dev/null",
        ],
        &[],
    );
    assert_eq!(run.line(), "ready");
    let conns: Vec<_> = (0..8u8)
        .map(|i| {
            std::thread::spawn(move || {
                let data = pattern(300_000 + usize::from(i) * 777, i);
                let s = connect(port);
                let mut w = s.try_clone().unwrap();
                let sent = data.clone();
                let writer = std::thread::spawn(move || {
                    w.write_all(&sent).unwrap();
                    // Half-close: the echo goes on until cat sees the end.
                    w.shutdown(Shutdown::Write).unwrap();
                });
                let mut got = Vec::new();
                (&s).read_to_end(&mut got).unwrap();
                writer.join().unwrap();
                assert_eq!(got.len(), data.len(), "connection {i}");
                assert!(got == data, "connection {i}: bytes differ");
            })
        })
        .collect();
    for c in conns {
        c.join().unwrap();
    }
    assert!(run.finish().success());
}

#[test]
fn a_client_that_stops_reading_does_not_grow_the_vmm() {
    let Some(b) = hello("a_client_that_stops_reading_does_not_grow_the_vmm") else {
        return;
    };
    let port = free_port();
    // 1 MiB to serve (the guest kernel's copies are slow under PVM: more takes minutes).
    let mut run = Running::start(
        &[
            "run",
            "-p",
            &format!("{port}:8080"),
            path(&b.machine),
            "--",
            "sh",
            "-c",
            "dd if=/dev/zero of=/var/www/big bs=64k count=16 2>/dev/null; echo ready; \
             exec cat >/dev/null",
        ],
        &[],
    );
    assert_eq!(run.line(), "ready");
    // One whole fetch first, so every guest page on the serving path was touched once and
    // counts in the baseline.
    let whole = get(port, "/big");
    assert_eq!(body(&whole).len(), 1 << 20);
    let before = run.rss_kib();
    let mut s = connect(port);
    s.write_all(b"GET /big HTTP/1.0\r\n\r\n").unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let mut got = 0;
    while got < 256 << 10 {
        got += s.read(&mut buf).unwrap();
    }
    // Stop reading for a while; what the guest sends meanwhile must not pile up in smolvm.
    std::thread::sleep(Duration::from_secs(30));
    let after = run.rss_kib();
    assert!(
        after < before + 512,
        "VMM RSS grew from {before} KiB to {after} KiB with a reader stopped"
    );
    // Reading again gets the rest, byte for byte.
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert_eq!(got + rest.len(), whole.len());
    assert!(run.finish().success());
}

#[test]
fn save_with_an_open_forward_then_resume_it() {
    let Some(b) = hello("save_with_an_open_forward_then_resume_it") else {
        return;
    };
    let port = free_port();
    let saved = b.dir.path().join("saved.smolmachine");
    let mut run = Running::start(
        &[
            "run",
            "-p",
            &format!("{port}:8080"),
            "--save",
            path(&saved),
            path(&b.machine),
            "--",
            "sh",
            "-c",
            "echo ready; exec cat >/dev/null",
        ],
        &[],
    );
    assert_eq!(run.line(), "ready");
    // A connection the web server holds open (no request yet) while the machine is saved.
    let mut open = connect(port);
    open.write_all(b"GET / HTTP/1.0\r\n").unwrap();
    assert!(run.finish().success(), "the save failed");
    let mut rest = Vec::new();
    let _ = open.read_to_end(&mut rest); // cut off by the save (EOF or reset)
    assert!(saved.is_file());

    let port2 = free_port();
    let mut run = Running::start(
        &[
            "run",
            "-p",
            &format!("{port2}:8080"),
            path(&saved),
            "--",
            "sh",
            "-c",
            "echo ready; exec cat >/dev/null",
        ],
        &[],
    );
    assert_eq!(run.line(), "ready");
    let index = std::fs::read(repo().join("examples/hello/www/index.html")).unwrap();
    assert_eq!(body(&get(port2, "/")), index);
    assert!(run.finish().success());
}
