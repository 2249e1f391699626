//! The agent's exec path over a Unix socket pair, no VM: output, exit codes, signals, stdin,
//! flow control, terminals, identities.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::thread;

use smolvm_agent::agent::{run_session, HostSystem, SessionConfig, SessionEnd};
use smolvm_agent::client::{Client, ClientError};
use smolvm_agent::protocol::{ExecRequest, ExitStatus, User, WinSize};

/// An agent serving one end of a socket pair in a thread, a client on the other.
fn agent() -> (Client, thread::JoinHandle<SessionEnd>) {
    let (host, guest) = UnixStream::pair().unwrap();
    let t = thread::spawn(move || run_session(guest, &mut HostSystem, &SessionConfig::default()));
    let c = Client::from_unix_stream(host).unwrap();
    c.handshake().unwrap();
    (c, t)
}

fn finish(c: Client, t: thread::JoinHandle<SessionEnd>) {
    drop(c);
    assert_eq!(t.join().unwrap(), SessionEnd::Closed);
}

#[test]
fn echo_hi() {
    let (c, t) = agent();
    let out = c.run_capture(["echo", "hi"]).unwrap();
    assert_eq!(out.stdout, b"hi\n");
    assert!(out.stderr.is_empty());
    assert_eq!(out.status, ExitStatus::Code(0));
    finish(c, t);
}

#[test]
fn exit_codes_and_stderr() {
    let (c, t) = agent();
    assert_eq!(c.run_capture(["true"]).unwrap().status, ExitStatus::Code(0));
    let out = c
        .run_capture(["sh", "-c", "echo oops >&2; exit 3"])
        .unwrap();
    assert_eq!(out.status, ExitStatus::Code(3));
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(out.stderr, b"oops\n");
    assert!(out.stdout.is_empty());
    finish(c, t);
}

#[test]
fn killed_by_signal_reports_the_signal() {
    let (c, t) = agent();
    let out = c.run_capture(["sh", "-c", "kill -9 $$"]).unwrap();
    assert_eq!(out.status, ExitStatus::Signal(9));
    assert_eq!(out.status.signal(), Some(9));
    finish(c, t);
}

#[test]
fn missing_program_fails_to_start_and_session_goes_on() {
    let (c, t) = agent();
    let h = c.exec(ExecRequest::new(["/nonexistent/program"])).unwrap();
    match h.wait() {
        Err(ClientError::ExecFailed(msg)) => assert!(msg.contains("/nonexistent/program"), "{msg}"),
        other => panic!("expected ExecFailed, got {other:?}"),
    }
    let mut req = ExecRequest::new(["true"]);
    req.cwd = Some("/no/such/dir".into());
    match c.exec(req).unwrap().wait() {
        Err(ClientError::ExecFailed(msg)) => assert!(
            msg.contains("working directory \"/no/such/dir\" does not exist"),
            "{msg}"
        ),
        other => panic!("expected ExecFailed, got {other:?}"),
    }
    // A name without a slash is looked up in the command's PATH, as execvp does; a name
    // found nowhere, or a file that is not executable, fails to start.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("say-hi");
    std::fs::write(&script, "#!/bin/sh\necho hi from PATH\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(dir.path().join("not-exec"), "#!/bin/sh\n").unwrap();
    let path = format!("/nonexistent:{}:/usr/bin:/bin", dir.path().display());
    let mut req = ExecRequest::new(["say-hi"]);
    req.env = vec![("PATH".into(), path.clone())];
    let h = c.exec(req).unwrap();
    h.close_stdin().unwrap();
    assert_eq!(h.wait_with_output().unwrap().stdout, b"hi from PATH\n");
    for name in ["no-such-program-anywhere", "not-exec"] {
        let mut req = ExecRequest::new([name]);
        req.env = vec![("PATH".into(), path.clone())];
        match c.exec(req).unwrap().wait() {
            Err(ClientError::ExecFailed(msg)) => assert!(msg.contains(name), "{msg}"),
            other => panic!("{name}: expected ExecFailed, got {other:?}"),
        }
    }
    assert_eq!(c.run_capture(["echo", "ok"]).unwrap().stdout, b"ok\n");
    finish(c, t);
}

#[test]
fn env_and_cwd() {
    let (c, t) = agent();
    let mut req = ExecRequest::new(["sh", "-c", "echo $FOO; pwd; echo $PATH"]);
    req.env = vec![("FOO".into(), "bar baz".into())];
    req.cwd = Some("/tmp".into());
    let h = c.exec(req).unwrap();
    h.close_stdin().unwrap();
    let out = h.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "bar baz");
    assert_eq!(lines[1], "/tmp");
    assert!(lines[2].contains("/usr/bin"), "{text}");
    finish(c, t);
}

/// Deterministic pseudo-random bytes (xorshift), so any corruption shows.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn one_mebibyte_through_cat_is_byte_identical() {
    let (c, t) = agent();
    let data = pattern(1 << 20);
    let mut h = c.exec(ExecRequest::new(["cat"])).unwrap();
    let mut stdout = h.take_stdout().unwrap();
    let stdin = h.stdin();
    let to_send = data.clone();
    let writer = thread::spawn(move || {
        let mut stdin = stdin;
        std::io::Write::write_all(&mut stdin, &to_send).unwrap();
        stdin.close().unwrap();
    });
    let mut got = Vec::new();
    stdout.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "cat output differs from its input");
    assert_eq!(h.wait().unwrap(), ExitStatus::Code(0));
    drop(stdout);
    finish(c, t);
}

#[test]
fn slow_reader_does_not_stall_other_execs() {
    let (c, t) = agent();
    // 4 MiB is far more than one stream's credit window plus a pipe buffer: `head` cannot
    // finish until somebody reads its output.
    let mut big = c
        .exec(ExecRequest::new(["head", "-c", "4194304", "/dev/zero"]))
        .unwrap();
    let mut big_out = big.take_stdout().unwrap();
    big.pid().unwrap();
    // Meanwhile other commands run to completion.
    for i in 0..3 {
        let out = c.run_capture(["echo", &format!("n{i}")]).unwrap();
        assert_eq!(out.stdout, format!("n{i}\n").as_bytes());
    }
    c.ping().unwrap();
    assert_eq!(
        big.try_status(),
        None,
        "the unread exec cannot have finished"
    );
    let mut n = 0usize;
    let mut buf = vec![0u8; 100_000];
    loop {
        let k = big_out.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        assert!(buf[..k].iter().all(|b| *b == 0));
        n += k;
    }
    assert_eq!(n, 4 << 20);
    assert_eq!(big.wait().unwrap(), ExitStatus::Code(0));
    drop(big_out);
    finish(c, t);
}

#[test]
fn two_concurrent_execs_interleave() {
    let (c, t) = agent();
    let mut a = c.exec(ExecRequest::new(["cat"])).unwrap();
    let mut b = c.exec(ExecRequest::new(["cat"])).unwrap();
    let mut a_out = a.take_stdout().unwrap();
    let mut b_out = b.take_stdout().unwrap();
    // Ping-pong between the two: each answer proves both commands are live at once.
    let mut buf = [0u8; 64];
    for round in 0..3 {
        a.write_stdin(format!("a{round}\n").as_bytes()).unwrap();
        let k = a_out.read(&mut buf).unwrap();
        assert_eq!(&buf[..k], format!("a{round}\n").as_bytes());
        b.write_stdin(format!("b{round}\n").as_bytes()).unwrap();
        let k = b_out.read(&mut buf).unwrap();
        assert_eq!(&buf[..k], format!("b{round}\n").as_bytes());
    }
    assert_ne!(a.pid().unwrap(), b.pid().unwrap());
    a.close_stdin().unwrap();
    b.close_stdin().unwrap();
    assert_eq!(a.wait().unwrap(), ExitStatus::Code(0));
    assert_eq!(b.wait().unwrap(), ExitStatus::Code(0));
    drop((a_out, b_out));
    finish(c, t);
}

fn tty_req(argv: &[&str], rows: u16, cols: u16) -> ExecRequest {
    let mut r = ExecRequest::new(argv.iter().copied());
    r.tty = Some(WinSize { rows, cols });
    r
}

#[test]
fn tty_exec_has_a_terminal_and_its_size() {
    let (c, t) = agent();
    let h = c.exec(tty_req(&["tty"], 24, 80)).unwrap();
    let out = h.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("/dev/pts/"), "{text:?}");
    assert_eq!(out.status, ExitStatus::Code(0));

    let h = c.exec(tty_req(&["stty", "size"], 33, 91)).unwrap();
    let out = h.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "33 91");

    // stderr merges into the terminal.
    let h = c
        .exec(tty_req(&["sh", "-c", "echo to-stderr >&2"], 24, 80))
        .unwrap();
    let out = h.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("to-stderr"));
    assert!(out.stderr.is_empty());
    finish(c, t);
}

#[test]
fn tty_resize_is_seen_by_the_command() {
    let (c, t) = agent();
    let h = c
        .exec(tty_req(&["sh", "-c", "read x; stty size"], 24, 80))
        .unwrap();
    h.resize(WinSize {
        rows: 40,
        cols: 100,
    })
    .unwrap();
    h.write_stdin(b"go\n").unwrap();
    let out = h.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("40 100"), "{text:?}");
    assert_eq!(out.status, ExitStatus::Code(0));
    finish(c, t);
}

#[test]
fn tty_stdin_eof_ends_cat() {
    let (c, t) = agent();
    let h = c.exec(tty_req(&["cat"], 24, 80)).unwrap();
    h.write_stdin(b"line\n").unwrap();
    h.close_stdin().unwrap();
    let out = h.wait_with_output().unwrap();
    assert_eq!(out.status, ExitStatus::Code(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("line"));
    finish(c, t);
}

#[test]
fn signals_are_delivered() {
    let (c, t) = agent();
    let h = c.exec(ExecRequest::new(["sleep", "1000"])).unwrap();
    h.pid().unwrap();
    h.signal(libc::SIGTERM).unwrap();
    assert_eq!(h.wait().unwrap(), ExitStatus::Signal(libc::SIGTERM));

    // A handler in the command runs and chooses the exit code.
    let mut h = c
        .exec(ExecRequest::new([
            "sh",
            "-c",
            "trap 'echo got-usr1; exit 7' USR1; echo ready; while :; do sleep 0.05; done",
        ]))
        .unwrap();
    let mut out = h.take_stdout().unwrap();
    let mut buf = [0u8; 6];
    out.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ready\n");
    h.signal(libc::SIGUSR1).unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "got-usr1\n");
    assert_eq!(h.wait().unwrap(), ExitStatus::Code(7));
    drop(out);
    finish(c, t);
}

#[test]
fn runs_as_another_user() {
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("SKIP runs_as_another_user: needs root to switch users");
        return;
    }
    let (c, t) = agent();
    let mut req = ExecRequest::new(["sh", "-c", "id -u; id -g; echo $HOME"]);
    req.user = Some(User::Id {
        uid: 4242,
        gid: Some(4343),
    });
    let h = c.exec(req).unwrap();
    let out = h.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "4242\n4343\n/\n");

    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    if passwd.lines().any(|l| l.starts_with("nobody:")) {
        let mut req = ExecRequest::new(["id", "-un"]);
        req.user = Some(User::Name("nobody".into()));
        let out = c.exec(req).unwrap().wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "nobody\n");
    }
    let mut req = ExecRequest::new(["true"]);
    req.user = Some(User::Name("no-such-user-here".into()));
    assert!(matches!(
        c.exec(req).unwrap().wait(),
        Err(ClientError::ExecFailed(m)) if m.contains("no-such-user-here")
    ));
    finish(c, t);
}
