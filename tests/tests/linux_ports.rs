//! Published ports on a real Linux guest: `examples/hello` (with a `[[port]]` added in a
//! copy) built once, then `smolvm run -p` and the manifest's port reached
//! from this host over loopback. Checks the web server through a forward, 100 concurrent
//! connections with exact bytes both ways and half-close (16 KiB each, 1 MiB with
//! `SMOLVM_SLOW_TESTS=1`) and the VMM's memory meanwhile, a guest port with nothing
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
        }
    }

    /// The command's next stdout line (it prints `ready` once its servers listen).
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.stdout.read_line(&mut l).unwrap();
        assert!(!l.is_empty(), "the command ended early");
        l.trim_end().to_string()
    }

    /// Closes the command's stdin and waits for smolvm's exit status. The limit counts
    /// from the close, not from the start: the SLOW transfers alone take about 25 minutes.
    fn finish(mut self) -> std::process::ExitStatus {
        drop(self.stdin.take());
        let closed = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if closed.elapsed() > Duration::from_secs(900) {
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

    /// smolvm's resident memory less the guest's RAM: the pages of `machine`'s memory
    /// regions (the file's pages and the zero runs the guest wrote, up to the guest's size,
    /// as the guest uses them) and any other page of the machine file. What is left is the
    /// VMM's own memory. A region is found from any mapping of the file: its offset lies in
    /// one of the region's data runs, which sits at a known distance from the region's start.
    fn vmm_rss_kib(&self, machine: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let layout = smolvm_formats::MachineReader::open(machine)
            .unwrap()
            .memory_layout()
            .unwrap();
        let inode = std::fs::metadata(machine).unwrap().ino();
        let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", self.child.id())).unwrap();
        // (start, end, file offset, from the machine file, Rss KiB) of each mapping.
        let mut maps: Vec<(u64, u64, u64, bool, u64)> = Vec::new();
        for line in smaps.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let Some((a, b)) = f.first().and_then(|r| r.split_once('-')) {
                if let (Ok(start), Ok(end)) =
                    (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
                {
                    let offset = u64::from_str_radix(f[2], 16).unwrap();
                    let ours = f.get(4).and_then(|i| i.parse::<u64>().ok()) == Some(inode);
                    maps.push((start, end, offset, ours, 0));
                    continue;
                }
            }
            if f.first() == Some(&"Rss:") {
                maps.last_mut().unwrap().4 = f[1].parse().unwrap();
            }
        }
        let mut guest: Vec<(u64, u64)> = Vec::new();
        for &(start, _, offset, ours, _) in &maps {
            if !ours {
                continue;
            }
            for r in &layout.regions {
                let run = r.runs.iter().find(|run| {
                    run.file_offset
                        .is_some_and(|f| (f..f + run.len).contains(&offset))
                });
                if let Some(run) = run {
                    let base = start - run.offset - (offset - run.file_offset.unwrap());
                    guest.push((base, base + r.size));
                }
            }
        }
        maps.iter()
            .filter(|&&(start, end, _, ours, _)| {
                !ours && !guest.iter().any(|&(b, e)| start >= b && end <= e)
            })
            .map(|m| m.4)
            .sum()
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

/// Connections of the concurrency test, all open at once.
const CONNECTIONS: usize = 100;
/// Most the VMM's resident memory may grow per open connection (its buffers are two 64 KiB
/// chunks and one 128 KiB credit window, plus two thread stacks' touched pages).
const RSS_PER_CONNECTION_KIB: u64 = 512;

/// Byte `at` of connection `conn`'s own pattern (a splitmix64 stream per connection).
fn stream_byte(conn: usize, at: usize) -> u8 {
    let mut z = (((conn as u64) << 40) | (at / 8) as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)).to_le_bytes()[at % 8]
}

fn stream_bytes(conn: usize, from: usize, len: usize) -> Vec<u8> {
    (from..from + len).map(|at| stream_byte(conn, at)).collect()
}

/// Every connection thread arrives here once its echo server answered; a thread that fails
/// before it marks the gate failed, so the others stop waiting.
struct Gate {
    state: std::sync::Mutex<(usize, bool)>,
    cv: std::sync::Condvar,
}

impl Gate {
    /// Arrive and wait until all `n` arrived: false if one failed or the deadline passed.
    fn arrive_and_wait(&self, n: usize, deadline: Instant) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 += 1;
        self.cv.notify_all();
        while st.0 < n && !st.1 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self.cv.wait_timeout(st, left).unwrap().0;
        }
        !st.1
    }

    fn fail(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.cv.notify_all();
    }
}

/// Marks the gate failed if its thread panics before arriving.
struct FailOnPanic<'a>(&'a Gate);

impl Drop for FailOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fail();
        }
    }
}

#[test]
fn concurrent_connections_move_exact_bytes_both_ways() {
    use sha2::{Digest, Sha256};
    let Some(b) = hello("concurrent_connections_move_exact_bytes_both_ways") else {
        return;
    };
    // 16 KiB per connection by default (the PVM host's guest kernel moves about 0.2 MiB/s),
    // the 1 MiB with SMOLVM_SLOW_TESTS=1.
    let size: usize = if std::env::var("SMOLVM_SLOW_TESTS").as_deref() == Ok("1") {
        1 << 20
    } else {
        16 << 10
    };
    let port = free_port();
    // An echo server per connection (busybox nc forks a cat for each), started before
    // `ready`. busybox nc's listen backlog is the number of `-l` flags: with `-ll` (2) the
    // guest kernel drops the SYNs of a burst of connections and their retries back off for
    // minutes (seen: 44 of 100 reset by the VMM's connect timeout, then 60 s), so 128.
    let server = format!(
        "nc -{} -p 7000 -e cat & until grep -q ':1B58 ' /proc/net/tcp; do sleep 0.2; done; \
         echo ready; exec cat >/dev/null",
        "l".repeat(128)
    );
    let mut run = Running::start(
        &[
            "run",
            "-p",
            &format!("{port}:7000"),
            path(&b.machine),
            "--",
            "sh",
            "-c",
            &server,
        ],
        &[],
    );
    assert_eq!(run.line(), "ready");
    let started = Instant::now();
    // The VMM's own memory: the guest's RAM fills as 100 connections' sockets and `cat`s
    // use it (31 MiB of guest pages seen at 1 MiB per connection), within the guest's size.
    let rss_before = run.vmm_rss_kib(&b.machine);
    let gate = std::sync::Arc::new(Gate {
        state: std::sync::Mutex::new((0, false)),
        cv: std::sync::Condvar::new(),
    });
    let deadline = Instant::now() + IO_DEADLINE * 2;
    let conns: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            let gate = gate.clone();
            std::thread::spawn(move || {
                let _fail = FailOnPanic(&gate);
                let s = connect(port);
                // The first byte's echo: this connection's cat runs in the guest.
                let mut w = s.try_clone().unwrap();
                let first = stream_byte(i, 0);
                w.write_all(&[first]).unwrap();
                let mut echo = [0u8; 1];
                (&s).read_exact(&mut echo).unwrap();
                assert_eq!(echo[0], first, "connection {i}: first byte");
                // All connections open in the guest before any sends the rest.
                assert!(
                    gate.arrive_and_wait(CONNECTIONS, deadline),
                    "connection {i}: the others did not all connect"
                );
                let writer = std::thread::spawn(move || {
                    let mut sent = Sha256::new();
                    sent.update([first]);
                    let mut at = 1;
                    while at < size {
                        let chunk = stream_bytes(i, at, (size - at).min(64 << 10));
                        w.write_all(&chunk).unwrap();
                        sent.update(&chunk);
                        at += chunk.len();
                    }
                    // Half-close: the echo goes on until cat sees the end.
                    w.shutdown(Shutdown::Write).unwrap();
                    sent.finalize()
                });
                let (mut got, mut len) = (Sha256::new(), 1);
                got.update(echo);
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = (&s).read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    // Compared as they come, so the first differing byte is named.
                    let want = stream_bytes(i, len, n.min(size.saturating_sub(len)));
                    assert!(
                        buf[..want.len()] == want[..] && n == want.len(),
                        "connection {i}: bytes differ at or after offset {len}"
                    );
                    got.update(&buf[..n]);
                    len += n;
                }
                let sent = writer.join().unwrap();
                assert_eq!(len, size, "connection {i}: echoed length");
                assert_eq!(got.finalize(), sent, "connection {i}: SHA-256 of the echo");
            })
        })
        .collect();
    // The VMM's memory while they run: bounded per connection, not by the bytes moved.
    let mut rss_peak = rss_before;
    while !conns.iter().all(|c| c.is_finished()) {
        rss_peak = rss_peak.max(run.vmm_rss_kib(&b.machine));
        std::thread::sleep(Duration::from_millis(100));
    }
    let failed: Vec<_> = conns
        .into_iter()
        .enumerate()
        .filter_map(|(i, c)| c.join().is_err().then_some(i))
        .collect();
    assert!(failed.is_empty(), "connections failed: {failed:?}");
    let rss_after = run.vmm_rss_kib(&b.machine);
    eprintln!(
        "{CONNECTIONS} connections x {size} B each way in {:.1} s; VMM RSS (guest RAM excluded) {rss_before} KiB \
         before, {rss_peak} KiB at most, {rss_after} KiB after",
        started.elapsed().as_secs_f64()
    );
    assert!(
        rss_peak < rss_before + CONNECTIONS as u64 * RSS_PER_CONNECTION_KIB,
        "VMM RSS (guest RAM excluded) grew from {rss_before} KiB to {rss_peak} KiB"
    );
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
