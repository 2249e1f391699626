//! Warm entrypoints on the agent, no VM: a command started by `Warm` is handed to the run
//! that matches it (transparent stdin mode, and the invocation protocol through the Python
//! and shell helpers), anything else starts afresh, and the failure cases are reported.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use smolvm_agent::agent::{run_session, HostSystem, SessionConfig, SessionEnd};
use smolvm_agent::client::{Client, ClientError, Output};
use smolvm_agent::protocol::{ExecRequest, ExitStatus, WarmMode, WarmRequest, WarmState};

mod build_util;

/// Long enough for a slow shared test machine; a test that expects readiness never waits
/// this long unless the feature is broken.
const READY: Duration = Duration::from_secs(60);

struct Agent {
    client: Client,
    thread: thread::JoinHandle<SessionEnd>,
    _dir: tempfile::TempDir,
    socket: PathBuf,
}

fn agent() -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/invoke.sock");
    let config = SessionConfig {
        invoke_socket: socket.clone(),
        ..SessionConfig::default()
    };
    let (host, guest) = UnixStream::pair().unwrap();
    let thread = thread::spawn(move || run_session(guest, &mut HostSystem, &config));
    let client = Client::from_unix_stream(host).unwrap();
    client.handshake().unwrap();
    Agent {
        client,
        thread,
        _dir: dir,
        socket,
    }
}

impl Agent {
    fn finish(self) {
        drop(self.client);
        assert_eq!(self.thread.join().unwrap(), SessionEnd::Closed);
    }
}

fn req(argv: &[&str]) -> ExecRequest {
    let mut r = ExecRequest::new(argv.iter().copied());
    r.env = vec![("MODE".into(), "warm".into())];
    r.cwd = Some("/tmp".into());
    r
}

fn warm(c: &Client, exec: ExecRequest, mode: WarmMode, prefix: u32) -> WarmState {
    c.warm(WarmRequest { exec, mode, prefix }, READY).unwrap()
}

fn ready_pid(state: WarmState) -> u32 {
    match state {
        WarmState::Ready { pid } => pid,
        other => panic!("warm entrypoint not ready: {other:?}"),
    }
}

/// Runs `r` with `input` on stdin: its pid and output.
fn run(c: &Client, r: ExecRequest, input: &[u8]) -> (u32, Output) {
    let h = c.exec(r).unwrap();
    let pid = h.pid().unwrap();
    h.write_stdin(input).unwrap();
    h.close_stdin().unwrap();
    (pid, h.wait_with_output().unwrap())
}

/// A filter with a visible start-up: prints a banner, then echoes stdin with a prefix.
const FILTER: &str = "echo started; echo to-stderr >&2; while read -r l; do echo \"<$l>\"; done; \
                      echo \"cwd=$(pwd) mode=$MODE\"; exit 7";

#[test]
fn stdin_mode_hands_the_process_to_the_matching_run_only_once() {
    let a = agent();
    let c = &a.client;
    let warm_req = req(&["sh", "-c", FILTER]);
    let pid = ready_pid(warm(c, warm_req.clone(), WarmMode::Stdin, 0));

    // Another command, other arguments, another environment or directory: fresh execs.
    let (p, out) = run(c, req(&["sh", "-c", FILTER, "x"]), b"a\n");
    assert_ne!(p, pid);
    assert_eq!(out.stdout, b"started\n<a>\ncwd=/tmp mode=warm\n");
    let mut other_env = warm_req.clone();
    other_env.env.push(("EXTRA".into(), "1".into()));
    assert_ne!(run(c, other_env, b"").0, pid);
    let mut other_cwd = warm_req.clone();
    other_cwd.cwd = Some("/".into());
    let (p, out) = run(c, other_cwd, b"");
    assert_ne!(p, pid);
    assert_eq!(out.stdout, b"started\ncwd=/ mode=warm\n");

    // The same request, with its environment in another order: the warm process.
    let (p, warm_out) = run(c, warm_req.clone(), b"one\ntwo\n");
    assert_eq!(p, pid, "the matching run gets the warm process");
    assert_eq!(warm_out.status, ExitStatus::Code(7));
    assert_eq!(
        warm_out.stdout,
        b"started\n<one>\n<two>\ncwd=/tmp mode=warm\n"
    );
    assert_eq!(warm_out.stderr, b"to-stderr\n");

    // It served its run: the next identical run starts afresh, with identical results.
    let (p, cold_out) = run(c, warm_req, b"one\ntwo\n");
    assert_ne!(p, pid);
    assert_eq!(cold_out, warm_out);
    a.finish();
}

/// Deterministic pseudo-random bytes (xorshift), so any corruption shows.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn run_big(c: &Client, r: ExecRequest, data: &[u8]) -> (u32, Vec<u8>, ExitStatus) {
    let mut h = c.exec(r).unwrap();
    let pid = h.pid().unwrap();
    let mut stdout = h.take_stdout().unwrap();
    let stdin = h.stdin();
    let to_send = data.to_vec();
    let writer = thread::spawn(move || {
        let mut stdin = stdin;
        std::io::Write::write_all(&mut stdin, &to_send).unwrap();
        stdin.close().unwrap();
    });
    let mut got = Vec::new();
    stdout.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    drop(stdout);
    (pid, got, h.wait().unwrap())
}

#[test]
fn one_mebibyte_warm_and_cold_are_byte_identical() {
    let a = agent();
    let c = &a.client;
    let r = req(&["sh", "-c", "cat; echo end"]);
    let pid = ready_pid(warm(c, r.clone(), WarmMode::Stdin, 0));
    let data = pattern(1 << 20);
    let (p, warm_out, warm_status) = run_big(c, r.clone(), &data);
    assert_eq!(p, pid);
    let (p, cold_out, cold_status) = run_big(c, r, &data);
    assert_ne!(p, pid);
    assert_eq!(warm_out.len(), data.len() + 4);
    assert!(warm_out == cold_out, "warm and cold output differ");
    assert!(warm_out[..data.len()] == data[..]);
    assert_eq!(
        (warm_status, cold_status),
        (ExitStatus::Code(0), ExitStatus::Code(0))
    );
    a.finish();
}

#[test]
fn a_child_of_the_entrypoint_reading_stdin_makes_it_ready() {
    // The shell waits for `cat`, which blocks on the shared stdin: same session, same pipe.
    let a = agent();
    let c = &a.client;
    let r = req(&["sh", "-c", "cat | tr a-z A-Z"]);
    let pid = ready_pid(warm(c, r.clone(), WarmMode::Stdin, 0));
    let (p, out) = run(c, r, b"shout\n");
    assert_eq!((p, out.stdout.as_slice()), (pid, b"SHOUT\n".as_slice()));
    a.finish();
}

#[test]
fn waiting_in_poll_select_or_epoll_on_stdin_makes_it_ready() {
    if !have_python() {
        return;
    }
    let waits = [
        "select.select([0], [], [])",
        "p = select.poll(); p.register(0, select.POLLIN); p.poll()",
        "e = select.epoll(); e.register(0, select.EPOLLIN); e.poll()",
    ];
    let a = agent();
    let c = &a.client;
    for wait in waits {
        let code = format!("import select, sys\n{wait}\nprint('got', sys.stdin.read().strip())");
        let r = req(&["python3", "-c", &code]);
        let pid = ready_pid(warm(c, r.clone(), WarmMode::Stdin, 0));
        let (p, out) = run(c, r, b"in\n");
        assert_eq!(
            (p, out.stdout.as_slice()),
            (pid, b"got in\n".as_slice()),
            "{wait}"
        );
    }
    // busybox's `read` polls before it reads (the guest's /bin/sh in busybox images).
    if std::process::Command::new("busybox")
        .arg("true")
        .output()
        .is_ok()
    {
        let r = req(&["busybox", "sh", "-c", "read -r l; echo \"got $l\""]);
        let pid = ready_pid(warm(c, r.clone(), WarmMode::Stdin, 0));
        let (p, out) = run(c, r, b"in\n");
        assert_eq!((p, out.stdout.as_slice()), (pid, b"got in\n".as_slice()));
    }
    // Waiting on something else (a pipe of its own) is not waiting for stdin.
    let r = req(&[
        "python3",
        "-c",
        "import os, select\nr, w = os.pipe()\nselect.select([r], [], [])",
    ]);
    let w = WarmRequest {
        exec: r,
        mode: WarmMode::Stdin,
        prefix: 0,
    };
    assert!(matches!(
        c.warm(w, Duration::from_secs(2)),
        Err(ClientError::Timeout(..))
    ));
    a.finish();
}

/// State letter of a process (`/proc/PID/stat`), `None` once it is gone.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

#[test]
fn a_warm_process_that_died_before_the_run_falls_back() {
    let a = agent();
    let c = &a.client;
    let r = req(&["sh", "-c", FILTER]);
    let pid = ready_pid(warm(c, r.clone(), WarmMode::Stdin, 0));
    // SAFETY: kill with a pid the agent reported; the process is ours.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    // Dead (a zombie, or reaped already) before the run arrives, as in a snapshot.
    while proc_state(pid).is_some_and(|s| s != 'Z') {
        thread::sleep(Duration::from_millis(10));
    }
    let (p, out) = run(c, r, b"x\n");
    assert_ne!(p, pid);
    assert_eq!(out.status, ExitStatus::Code(7));
    assert_eq!(out.stdout, b"started\n<x>\ncwd=/tmp mode=warm\n");
    a.finish();
}

#[test]
fn an_entrypoint_that_exits_first_is_reported_with_its_output() {
    let a = agent();
    let c = &a.client;
    let r = req(&["sh", "-c", "echo cannot load config >&2; exit 3"]);
    match warm(c, r.clone(), WarmMode::Stdin, 0) {
        WarmState::Failed(why) => {
            assert!(why.contains("exited with status 3"), "{why}");
            assert!(why.contains("before it blocked reading its stdin"), "{why}");
            assert!(why.contains("cannot load config"), "{why}");
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    match warm(c, req(&["/no/such/program"]), WarmMode::Stdin, 0) {
        WarmState::Failed(why) => assert!(why.contains("/no/such/program"), "{why}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    // Runs are unaffected.
    assert_eq!(run(c, r, b"").1.status, ExitStatus::Code(3));
    a.finish();
}

#[test]
fn an_entrypoint_that_never_reads_stdin_times_out() {
    let a = agent();
    let c = &a.client;
    let w = WarmRequest {
        exec: req(&["sleep", "600"]),
        mode: WarmMode::Stdin,
        prefix: 0,
    };
    match c.warm(w, Duration::from_millis(800)) {
        Err(ClientError::Timeout(..)) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    // The session goes on; its end kills the warm process.
    c.ping().unwrap();
    a.finish();
}

fn helpers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest/agent/helpers")
}

/// Whether the host has a Python the helper runs on; says so loudly when it has not.
fn have_python() -> bool {
    let ok = std::process::Command::new("python3")
        .arg("-c")
        .arg("import socket; socket.recv_fds")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: needs python3 (3.9 or later) on the host");
    }
    ok
}

/// Writes a Python program `name` into `dir` that finds the helper module in the source
/// tree (as an image finds it in dist-packages), then runs `body`; its path.
fn python_tool(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    let helpers = helpers_dir().display().to_string();
    std::fs::write(
        &path,
        format!("import sys\nsys.path.insert(0, {helpers:?})\n{body}"),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn invoke_mode_through_the_python_helper() {
    if !have_python() {
        return;
    }
    let a = agent();
    let c = &a.client;
    let dir = tempfile::tempdir().unwrap();
    let s = &python_tool(
        dir.path(),
        "tool.py",
        "import os, random, sys\n\
             import smolvm_invoke\n\
             before = random.random()\n\
             import tempfile\n\
             tempfile._get_candidate_names()\n\
             print('start-up output stays out of runs')\n\
             inv = smolvm_invoke.wait()\n\
             print('tempfile names fresh', tempfile._name_sequence is None)\n\
             data = sys.stdin.read()\n\
             print('argv', sys.argv[1:], 'cwd', os.getcwd(), 'mode', os.environ.get('MODE'))\n\
             print('socket var', os.environ.get('SMOLVM_INVOKE_SOCKET'))\n\
             print('stdin', repr(data))\n\
             print('warm', inv is not None, 'reseeded', random.random() != before)\n\
             print('err', file=sys.stderr)\n\
             sys.exit(len(sys.argv))\n",
    );
    let w = req(&["python3", "-u", s, "--default"]);
    let pid = ready_pid(warm(c, w.clone(), WarmMode::Invoke, 3));
    assert!(
        !a.socket.exists(),
        "the socket is gone once the program connected"
    );

    // Another program: fresh.
    let (p, out) = run(c, req(&["echo", "plain"]), b"");
    assert_ne!(p, pid);
    assert_eq!(out.stdout, b"plain\n");

    // Same program, other arguments, another working directory's worth of input.
    let (p, out) = run(c, req(&["python3", "-u", s, "--compact", "a b"]), b"in\n");
    assert_eq!(p, pid, "the run with the warm program's prefix gets it");
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(
        text,
        "tempfile names fresh True\n\
         argv ['--compact', 'a b'] cwd /tmp mode warm\n\
         socket var None\n\
         stdin 'in\\n'\n\
         warm True reseeded True\n"
    );
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.status, ExitStatus::Code(3));

    // The next run of it is cold: the same program without the protocol (wait() is a
    // no-op without the socket variable).
    let (p, out) = run(c, req(&["python3", "-u", s, "--compact", "a b"]), b"in\n");
    assert_ne!(p, pid);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with(
        "start-up output stays out of runs\ntempfile names fresh False\nargv ['--compact', 'a b']"
    ));
    assert!(text.contains("warm False"), "{text}");
    assert_eq!(out.status, ExitStatus::Code(3));
    a.finish();
}

#[test]
fn invoke_mode_through_the_shell_helper() {
    let agent_bin = build_util::bin("smolvm-agent", "smol-agent");
    let a = agent();
    let c = &a.client;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("tool.sh");
    std::fs::write(
        &script,
        format!(
            "greeting=$(echo slow start-up)\n\
             eval \"$({} invoke --sh $#)\"\n\
             echo \"$greeting: $# args: $1|$2 in $(pwd) mode=$MODE\"\n\
             while read -r l; do echo \"<$l>\"; done\n\
             echo oops >&2\n\
             exit 5\n",
            agent_bin.display()
        ),
    )
    .unwrap();
    let s = script.to_str().unwrap();
    // Started cold (no socket variable), the same script runs as it is.
    let (_, out) = run(c, req(&["sh", s, "cold"]), b"l0\n");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "slow start-up: 1 args: cold| in /tmp mode=warm\n<l0>\n"
    );
    assert_eq!(out.status, ExitStatus::Code(5));
    let pid = ready_pid(warm(c, req(&["sh", s]), WarmMode::Invoke, 2));
    let (p, out) = run(c, req(&["sh", s, "x y", "z"]), b"l1\nl2\n");
    assert_eq!(p, pid);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "slow start-up: 2 args: x y|z in /tmp mode=warm\n<l1>\n<l2>\n"
    );
    assert_eq!(out.stderr, b"oops\n");
    assert_eq!(out.status, ExitStatus::Code(5));

    // Started by its own path, as a `#!` script (examples/hello's greet): the kernel runs
    // `/bin/sh PATH ARGS`, so the shell's command line has one word more than the run's
    // argv; the run's arguments must still arrive whole, the first one included.
    let direct = dir.path().join("direct.sh");
    std::fs::write(
        &direct,
        format!(
            "#!/bin/sh\n\
             eval \"$({} invoke --sh $#)\"\n\
             echo \"$# args: $1|$2|$3\"\n",
            agent_bin.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&direct, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let d = direct.to_str().unwrap();
    let pid = ready_pid(warm(c, req(&[d]), WarmMode::Invoke, 1));
    let (p, out) = run(c, req(&[d, "x y", "", "z"]), b"");
    assert_eq!(p, pid);
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "3 args: x y||z\n");
    assert_eq!(out.status, ExitStatus::Code(0));

    // The same with busybox's shell, the /bin/sh of busybox images.
    if std::process::Command::new("busybox")
        .arg("true")
        .output()
        .is_ok()
    {
        let pid = ready_pid(warm(c, req(&["busybox", "sh", s]), WarmMode::Invoke, 3));
        let (p, out) = run(c, req(&["busybox", "sh", s, "x y", "z"]), b"l1\n");
        assert_eq!(p, pid);
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "slow start-up: 2 args: x y|z in /tmp mode=warm\n<l1>\n"
        );
        assert_eq!(out.status, ExitStatus::Code(5));
    }
    a.finish();
}

/// The shell way in without a helper: `. "$SMOLVM_INVOKE_SH"` takes the run over with
/// builtins only. Stdin written and closed before the script opens it must arrive whole.
#[test]
fn invoke_mode_through_a_sourced_fifo() {
    let a = agent();
    let c = &a.client;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("tool.sh");
    std::fs::write(
        &script,
        "greeting=$(echo slow start-up)\n\
         . \"${SMOLVM_INVOKE_SH:-/dev/null}\"\n\
         echo \"$greeting: $# args: $1|$2|$3 in $PWD mode=$MODE sh=${SMOLVM_INVOKE_SH-unset}\"\n\
         while read -r l; do echo \"<$l>\"; done\n\
         echo oops >&2\n\
         exit 5\n",
    )
    .unwrap();
    let s = script.to_str().unwrap();
    let run_dir = a.socket.parent().unwrap().to_path_buf();
    let leftovers = || -> Vec<String> {
        std::fs::read_dir(&run_dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut shells = vec![vec!["sh"]];
    if std::process::Command::new("busybox")
        .arg("true")
        .output()
        .is_ok()
    {
        shells.push(vec!["busybox", "sh"]);
    } else {
        eprintln!("busybox not installed: only the host's sh is tried");
    }
    for shell in shells {
        fn words<'a>(shell: &[&'a str], script: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
            [shell, &[script], rest].concat()
        }
        let argv = |rest: &[&'static str]| words(&shell, s, rest);
        // Started cold, the script runs as it is.
        let (_, out) = run(c, req(&argv(&["cold"])), b"l0\n");
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "slow start-up: 1 args: cold|| in /tmp mode=warm sh=unset\n<l0>\n"
        );
        let prefix = shell.len() as u32 + 1;
        for input in [&b"l1\nl2\n"[..], b""] {
            let pid = ready_pid(warm(c, req(&argv(&[])), WarmMode::Invoke, prefix));
            let (p, out) = run(c, req(&argv(&["x y", "", "z"])), input);
            assert_eq!(p, pid, "{shell:?}: the warm process serves the run");
            let lines: String = String::from_utf8_lossy(input)
                .lines()
                .map(|l| format!("<{l}>\n"))
                .collect();
            assert_eq!(
                String::from_utf8(out.stdout).unwrap(),
                format!("slow start-up: 3 args: x y||z in /tmp mode=warm sh=unset\n{lines}"),
                "{shell:?}"
            );
            assert_eq!(out.stderr, b"oops\n");
            assert_eq!(out.status, ExitStatus::Code(5));
            // The run's FIFOs stay until a quiesce (a snapshot) removes them.
            assert!(!leftovers().is_empty());
            c.quiesce().unwrap();
            c.unquiesce().unwrap();
            assert_eq!(
                leftovers(),
                Vec::<String>::new(),
                "FIFOs left in a snapshot"
            );
        }
    }

    // A `#!` script started by its own path: one word more on the shell's command line.
    let direct = dir.path().join("direct.sh");
    std::fs::write(
        &direct,
        "#!/bin/sh\n. \"${SMOLVM_INVOKE_SH:-/dev/null}\"\necho \"$# args: $1|$2|$3\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&direct, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let d = direct.to_str().unwrap();
    let pid = ready_pid(warm(c, req(&[d]), WarmMode::Invoke, 1));
    let (p, out) = run(c, req(&[d, "a", "it's", "c d"]), b"");
    assert_eq!(p, pid);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "3 args: a|it's|c d\n"
    );
    assert_eq!(out.status, ExitStatus::Code(0));
    // A run with fewer words than the program had gets no arguments, not an error.
    let pid = ready_pid(warm(c, req(&["sh", s, "p1", "p2"]), WarmMode::Invoke, 1));
    let (p, out) = run(c, req(&["sh"]), b"");
    assert_eq!(p, pid);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "slow start-up: 0 args: || in /tmp mode=warm sh=unset\n"
    );
    a.finish();
}

#[test]
fn a_stranger_on_the_invocation_socket_is_refused() {
    let a = agent();
    let c = &a.client;
    let w = WarmRequest {
        exec: req(&["sleep", "600"]),
        mode: WarmMode::Invoke,
        prefix: 1,
    };
    let socket = a.socket.clone();
    let t = thread::spawn(move || {
        // Not of the warm command's session: the agent drops the connection unanswered.
        for _ in 0..200 {
            if let Ok(mut s) = UnixStream::connect(&socket) {
                use std::io::Write;
                // The agent may close before the request is written (EPIPE):
                // that is the refusal too.
                if s.write_all(smolvm_agent::invoke::REQUEST).is_err() {
                    return 0;
                }
                let mut buf = [0u8; 4];
                return s.read(&mut buf).unwrap_or(0);
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!("the agent never listened");
    });
    match c.warm(w, Duration::from_secs(3)) {
        Err(ClientError::Timeout(..)) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(t.join().unwrap(), 0);
    a.finish();
}

#[test]
fn yaml2json_example_warm_and_cold_agree() {
    let has_yaml = std::process::Command::new("python3")
        .args(["-c", "import socket, yaml; socket.recv_fds"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_yaml {
        eprintln!("SKIPPED: needs python3 (3.9 or later) with PyYAML on the host");
        return;
    }
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/yaml2json");
    let tool = example.join("yaml2json.py");
    let yaml = std::fs::read(example.join("example.yaml")).unwrap();
    let mut base = req(&["python3", tool.to_str().unwrap()]);
    // What the image provides through dist-packages.
    base.env = vec![("PYTHONPATH".into(), helpers_dir().display().to_string())];
    let with = |args: &[&str]| {
        let mut r = base.clone();
        r.argv.extend(args.iter().map(|a| a.to_string()));
        r
    };
    for (args, input) in [
        (&["--compact"][..], &yaml[..]),
        (&[][..], &yaml[..]),
        (&["--keys"][..], &yaml[..]),
        (&[][..], &b"a: [\n"[..]),
    ] {
        let a = agent();
        let c = &a.client;
        let pid = ready_pid(warm(c, base.clone(), WarmMode::Invoke, 2));
        let (p, warm_out) = run(c, with(args), input);
        assert_eq!(p, pid, "{args:?}: the run gets the warm process");
        let (p, cold_out) = run(c, with(args), input);
        assert_ne!(p, pid);
        assert_eq!(warm_out, cold_out, "{args:?}: warm and cold differ");
        a.finish();
    }
}

/// A warm program that reports its status (`exit N` on its connection, after closing its
/// stdio) ends its run with that status while the process is still there; the next quiesce
/// kills it. A malformed report is ignored: the run then ends with the process.
#[test]
fn a_reported_exit_ends_the_run_before_the_process() {
    if !have_python() {
        return;
    }
    let a = agent();
    let c = &a.client;
    let dir = tempfile::tempdir().unwrap();
    // A program whose end is slow: it reports, then takes its time to go.
    let s = &python_tool(
        dir.path(),
        "linger.py",
        "import os, sys, time\n\
             import smolvm_invoke\n\
             smolvm_invoke.wait()\n\
             report = sys.argv[1].encode().decode('unicode_escape').encode()\n\
             print('ran', sys.argv[1:])\n\
             sys.stdout.flush()\n\
             for fd in (0, 1, 2):\n\
             \x20   os.close(fd)\n\
             smolvm_invoke._conn.sendall(report)\n\
             time.sleep(float(sys.argv[2]))\n\
             os._exit(4)\n",
    );
    let pid = ready_pid(warm(c, req(&["python3", s]), WarmMode::Invoke, 2));
    let (p, out) = run(c, req(&["python3", s, "exit 9\\n", "600"]), b"");
    assert_eq!(p, pid);
    assert_eq!(out.stdout, b"ran ['exit 9\\\\n', '600']\n");
    assert_eq!(out.status, ExitStatus::Code(9), "the reported status");
    assert!(
        matches!(proc_state(pid), Some(s) if s != 'Z'),
        "the run ended while its process was still there: {:?}",
        proc_state(pid)
    );
    c.quiesce().unwrap();
    assert_eq!(
        proc_state(pid),
        None,
        "a quiesce ends and reaps a reported process"
    );
    c.unquiesce().unwrap();

    // Out of range: ignored, the process's own status counts.
    let pid = ready_pid(warm(c, req(&["python3", s]), WarmMode::Invoke, 2));
    let (p, out) = run(c, req(&["python3", s, "exit 300\\n", "0.2"]), b"");
    assert_eq!(p, pid);
    assert_eq!(out.status, ExitStatus::Code(4));
    a.finish();
}

/// `smolvm_invoke.run(main)`: main's result is the status, `atexit` handlers of the
/// start-up and of the run both write to the run's stderr (last registered first), and
/// a cold start of the same program gives the same output and status.
#[test]
fn the_python_helpers_run_reports_what_sys_exit_would() {
    if !have_python() {
        return;
    }
    let a = agent();
    let c = &a.client;
    let dir = tempfile::tempdir().unwrap();
    let s = &python_tool(
        dir.path(),
        "tool.py",
        "import atexit, sys\n\
             import smolvm_invoke\n\
             atexit.register(lambda: print('atexit of the start-up', file=sys.stderr))\n\
             smolvm_invoke.wait()\n\
             def main():\n\
             \x20   atexit.register(lambda: print('atexit of the run', file=sys.stderr))\n\
             \x20   sys.stdout.write('out, unflushed ' + ' '.join(sys.argv[1:]))\n\
             \x20   if sys.argv[1:] == ['message']:\n\
             \x20       sys.exit('a message means status 1')\n\
             \x20   return len(sys.argv[1:]) + 256\n\
             smolvm_invoke.run(main)\n",
    );
    for (args, status) in [(&["a", "b"][..], 2), (&["message"][..], 1)] {
        let pid = ready_pid(warm(c, req(&["python3", s]), WarmMode::Invoke, 2));
        let argv = [&["python3", s][..], args].concat();
        let (p, warm_out) = run(c, req(&argv), b"");
        assert_eq!(p, pid);
        assert_eq!(warm_out.status, ExitStatus::Code(status));
        let err = String::from_utf8_lossy(&warm_out.stderr).into_owned();
        assert!(
            err.ends_with("atexit of the run\natexit of the start-up\n"),
            "{err}"
        );
        let (p, cold_out) = run(c, req(&argv), b"");
        assert_ne!(p, pid);
        assert_eq!(warm_out, cold_out, "{args:?}: warm and cold differ");
    }
    a.finish();
}

/// The shell way's `EXIT` trap reports the shell's own status only: a subshell, a command
/// substitution or a child shell that exits does not end the run; a script's own `EXIT`
/// trap set after the line still runs (its run then ends with the shell); a script killed
/// by a signal ends as killed, also under bash, whose `EXIT` trap runs on signals; warm and
/// cold runs agree, under every shell found on the host.
#[test]
fn a_shell_runs_exit_trap_reports_the_scripts_status_only() {
    let a = agent();
    let c = &a.client;
    let dir = tempfile::tempdir().unwrap();
    let scripts = [
        (
            "nested.sh",
            "( exit 3 )\necho \"sub=$?\"\nv=$(exit 4; echo no)\necho \"cmdsub=$? $v\"\n\
             sh -c 'exit 5'\necho \"child=$?\"\necho to-err >&2\nexit 6\n",
            "sub=3\ncmdsub=4 \nchild=5\n",
            6,
        ),
        (
            "own-trap.sh",
            "trap 'echo own trap' EXIT\necho body\nexit 2\n",
            "body\nown trap\n",
            2,
        ),
        ("falls-off.sh", "echo last\nfalse\n", "last\n", 1),
        (
            "errexit.sh",
            "set -e\necho before\nfalse\necho after\n",
            "before\n",
            1,
        ),
        // bash runs an `EXIT` trap on a fatal signal too, with `$?` 0: no report there.
        (
            "signal.sh",
            "echo before\nkill -TERM $$\necho after\n",
            "before\n",
            -15,
        ),
    ];
    let mut shells: Vec<Vec<&str>> = vec![vec!["sh"]];
    for extra in [&["busybox", "sh"][..], &["bash"], &["dash"]] {
        let found = std::process::Command::new(extra[0])
            .args(&extra[1..])
            .args(["-c", "true"])
            .output()
            .is_ok_and(|o| o.status.success());
        if found {
            shells.push(extra.to_vec());
        } else {
            eprintln!("{extra:?} not installed: not tried");
        }
    }
    for (name, body, stdout, status) in scripts {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(". \"${{SMOLVM_INVOKE_SH:-/dev/null}}\"\n{body}"),
        )
        .unwrap();
        let p = path.to_str().unwrap();
        for shell in &shells {
            let argv = [&shell[..], &[p]].concat();
            let pid = ready_pid(warm(c, req(&argv), WarmMode::Invoke, argv.len() as u32));
            let (got, warm_out) = run(c, req(&argv), b"");
            assert_eq!(got, pid, "{shell:?} {name}");
            assert_eq!(
                String::from_utf8_lossy(&warm_out.stdout),
                stdout,
                "{shell:?} {name}"
            );
            let want = if status < 0 {
                ExitStatus::Signal(-status)
            } else {
                ExitStatus::Code(status)
            };
            assert_eq!(warm_out.status, want, "{shell:?} {name}");
            let (got, cold_out) = run(c, req(&argv), b"");
            assert_ne!(got, pid);
            assert_eq!(warm_out, cold_out, "{shell:?} {name}: warm and cold differ");
        }
    }
    a.finish();
}
