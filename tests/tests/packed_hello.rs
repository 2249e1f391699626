//! The bundled example as users run it: `examples/hello` built with `smolpack build`, packed
//! into one executable with `smolpack pack`, then run as `./hello ARGS...`. Every argument
//! goes to the machine, so these tests check what a native command promises: arguments
//! arrive byte for byte, exit codes and signals come back, stdin/stdout/stderr behave as
//! pipes, and SIGINT/SIGTERM sent to `./hello` reach the command inside.
//!
//! The executable is built once for this whole file (a boot costs 40 s or more on an
//! emulating host). Every process a test starts has a deadline: a hang fails the test.
//!
//! Needs /dev/kvm and the guest artifacts (`scripts/setup`); skips loudly without them,
//! except under `CI=true`, where it fails.

mod build_util;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use build_util::{bin, describe, guest, repo};

/// How long one run of `./hello` may take before the test fails: a resume plus a few guest
/// processes is seconds even on an emulating host; this only catches hangs.
const RUN_DEADLINE: Duration = Duration::from_secs(120);
/// How long the large-stdin run may take.
const BIG_INPUT_DEADLINE: Duration = Duration::from_secs(400);
/// How long building and packing the machine may take.
const BUILD_DEADLINE: Duration = Duration::from_secs(900);

struct Packed {
    dir: tempfile::TempDir,
    exe: PathBuf,
}

/// Builds `examples/hello` and packs it once for every test of this file; `None` when
/// skipped. A failed build fails every test with its output (and is not retried).
fn hello(test: &str) -> Option<&'static Packed> {
    static PACKED: OnceLock<Result<Packed, String>> = OnceLock::new();
    let guest = guest(test)?;
    let packed = PACKED.get_or_init(|| {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let machine = dir.path().join("hello.smolmachine");
        let exe = dir.path().join("hello");
        let mut build = Command::new(bin("smolpack", "smolpack"));
        build
            .arg("build")
            .arg(repo().join("examples/hello/Smolfile"))
            .arg("-o")
            .arg(&machine)
            .arg("--kernel")
            .arg(&guest.kernel)
            .arg("--agent")
            .arg(&guest.agent);
        let out = run_until(build, b"", BUILD_DEADLINE);
        if !out.status.success() {
            return Err(format!("smolpack build failed: {}", describe(&out)));
        }
        // With the stub built into smolpack, as users pack.
        let mut pack = Command::new(bin("smolpack", "smolpack"));
        pack.arg("pack").arg(&machine).arg("-o").arg(&exe);
        let out = run_until(pack, b"", BUILD_DEADLINE);
        if !out.status.success() {
            return Err(format!("smolpack pack failed: {}", describe(&out)));
        }
        Ok(Packed { dir, exe })
    });
    match packed {
        Ok(p) => Some(p),
        Err(e) => panic!("{e}"),
    }
}

impl Packed {
    /// `./hello ARGS...` as a command, its cache kept in the test's directory.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.args(args)
            .env("SMOLVM_CACHE", self.dir.path().join("cache"));
        cmd
    }

    /// `./hello ARGS...` with `stdin` fed in; its output, or a failure after the deadline.
    fn run(&self, args: &[&str], stdin: &[u8]) -> Output {
        run_until(self.command(args), stdin, RUN_DEADLINE)
    }
}

/// Waits for `child` until `deadline` has passed since `start`; kills it and fails then.
fn wait_until(child: &mut Child, start: Instant, deadline: Duration, what: &str) -> ExitStatus {
    loop {
        match child.try_wait().expect("waiting for a child") {
            Some(status) => return status,
            None if start.elapsed() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not finish within {deadline:?}; killed it");
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A reader thread draining `r` to the end.
fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Runs `cmd` with `stdin` fed in on its own thread and its output collected; kills it and
/// fails the test when it outlives `deadline`.
fn run_until(mut cmd: Command, stdin: &[u8], deadline: Duration) -> Output {
    let what = format!("{cmd:?}");
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    // A command that does not read its input must not block the test: write errors (EPIPE)
    // are ignored, and the pipe closes when the feeder ends.
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = drain(child.stdout.take().expect("stdout"));
    let err = drain(child.stderr.take().expect("stderr"));
    let status = wait_until(&mut child, start, deadline, &what);
    let _ = feeder.join();
    Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn no_arguments_runs_the_default_command() {
    let Some(h) = hello("no_arguments_runs_the_default_command") else {
        return;
    };
    // `./app --` is `./app`: the leading `--` is dropped, leaving no arguments.
    for args in [&[][..], &["--"]] {
        let o = h.run(args, b"");
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", describe(&o));
        let text = stdout(&o);
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("hello from smolvm"), "{}", describe(&o));
        // Written by the Smolfile's setup step at build time, so it is in the snapshot.
        assert!(
            lines
                .next()
                .is_some_and(|l| l.starts_with("built by smolpack on ")),
            "{}",
            describe(&o)
        );
        assert_eq!(lines.next(), None, "{}", describe(&o));
    }
}

#[test]
fn greet_prints_each_argument_on_its_own_line() {
    let Some(h) = hello("greet_prints_each_argument_on_its_own_line") else {
        return;
    };
    let o = h.run(&["greet", "a b", "c", "--help", ""], b"");
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    let text = stdout(&o);
    let args: Vec<&str> = text.lines().skip(2).collect();
    assert_eq!(args, ["[a b]", "[c]", "[--help]", "[]"], "{}", describe(&o));
}

#[test]
fn arguments_arrive_byte_for_byte() {
    let Some(h) = hello("arguments_arrive_byte_for_byte") else {
        return;
    };
    let args = [
        "a b",
        "c\"d",
        "e'f",
        "",
        "$HOME",
        "é ✓ 日本",
        "back\\slash",
        "two\nlines",
        "*",
        "--",
        "-n",
        "  padded  ",
    ];
    let mut argv = vec!["sh", "-c", r#"for a; do printf '[%s]\n' "$a"; done"#, "x"];
    argv.extend(args);
    let o = h.run(&argv, b"");
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    let expected: String = args.iter().map(|a| format!("[{a}]\n")).collect();
    assert_eq!(stdout(&o), expected, "{}", describe(&o));
}

#[test]
fn help_and_double_dash_go_to_the_machine() {
    let Some(h) = hello("help_and_double_dash_go_to_the_machine") else {
        return;
    };
    // `--help` is the command to run in the machine, which has none by that name: the
    // exit status of a command that cannot start, and no usage text from smolvm.
    let o = h.run(&["--help"], b"");
    assert_eq!(o.status.code(), Some(127), "{}", describe(&o));
    assert!(o.stdout.is_empty(), "{}", describe(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--help"),
        "{}",
        describe(&o)
    );
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("Usage"),
        "{}",
        describe(&o)
    );

    // After the first argument `--` is an argument like any other.
    let o = h.run(&["sh", "-c", r#"printf '[%s]' "$@""#, "sh", "--", "x"], b"");
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert_eq!(stdout(&o), "[--][x]", "{}", describe(&o));

    // One leading `--` is dropped (`./app -- cmd`, as `docker run IMAGE -- cmd`); a
    // second one is the machine's: `./app -- -- x` runs the command `--`, which no
    // program is named.
    let o = h.run(
        &["--", "sh", "-c", r#"printf '[%s]' "$@""#, "sh", "--", "x"],
        b"",
    );
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert_eq!(stdout(&o), "[--][x]", "{}", describe(&o));
    let o = h.run(&["--", "--", "x"], b"");
    assert_eq!(o.status.code(), Some(127), "{}", describe(&o));
}

#[test]
fn exit_codes_come_back() {
    let Some(h) = hello("exit_codes_come_back") else {
        return;
    };
    let o = h.run(&["sh", "-c", "exit 7"], b"");
    assert_eq!(o.status.code(), Some(7), "{}", describe(&o));
    // A command killed by a signal exits 128 + N, as in a shell.
    let o = h.run(&["sh", "-c", "kill -TERM $$"], b"");
    assert_eq!(o.status.code(), Some(128 + 15), "{}", describe(&o));
    let o = h.run(&["sh", "-c", "kill -KILL $$"], b"");
    assert_eq!(o.status.code(), Some(128 + 9), "{}", describe(&o));
}

#[test]
fn stdout_and_stderr_stay_apart() {
    let Some(h) = hello("stdout_and_stderr_stay_apart") else {
        return;
    };
    let o = h.run(
        &["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3"],
        b"",
    );
    assert_eq!(o.status.code(), Some(3), "{}", describe(&o));
    assert_eq!(stdout(&o), "to-stdout\n", "{}", describe(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("to-stderr\n"), "{}", describe(&o));
    assert!(!err.contains("to-stdout"), "{}", describe(&o));
}

#[test]
fn works_in_a_shell_pipeline() {
    let Some(h) = hello("works_in_a_shell_pipeline") else {
        return;
    };
    // `echo hi | ./hello cat | wc -c` through a real shell: the guest's cat sees the end of
    // its input and ends, and its output goes on down the pipe.
    let mut sh = Command::new("/bin/sh");
    sh.arg("-c")
        .arg(r#"echo hi | "$0" cat | wc -c"#)
        .arg(&h.exe)
        .env("SMOLVM_CACHE", h.dir.path().join("cache"));
    let o = run_until(sh, b"", RUN_DEADLINE);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert_eq!(stdout(&o).trim(), "3", "{}", describe(&o));
}

#[test]
fn half_a_mebibyte_of_stdin_comes_back_unchanged() {
    let Some(h) = hello("half_a_mebibyte_of_stdin_comes_back_unchanged") else {
        return;
    };
    // Every byte value, pseudo-random (xorshift), twice the agent's 256 KiB flow-control
    // window per stream. Guest console input is slow under an emulating hypervisor (about
    // 12 KiB/s measured on PVM), hence the size and the longer deadline.
    let mut x: u32 = 0x9e37_79b9;
    let input: Vec<u8> = (0..512 << 10)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect();
    let o = run_until(h.command(&["cat"]), &input, BIG_INPUT_DEADLINE);
    assert_eq!(
        o.status.code(),
        Some(0),
        "status {:?}, stderr {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(o.stdout.len(), input.len(), "length of the echoed input");
    assert!(o.stdout == input, "the echoed input differs from the input");
}

#[test]
fn the_web_server_started_at_build_time_answers() {
    let Some(h) = hello("the_web_server_started_at_build_time_answers") else {
        return;
    };
    let o = h.run(&["wget", "-qO-", "http://127.0.0.1:8080/"], b"");
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    let page = std::fs::read_to_string(repo().join("examples/hello/www/index.html")).unwrap();
    assert_eq!(stdout(&o), page, "{}", describe(&o));
}

/// Starts a guest shell that traps `signal`, waits for it to say "ready", sends `signal` to
/// the `./hello` process, and checks that the trap ran and its exit code came back.
fn signal_reaches_the_guest(test: &str, signal: libc::c_int, name: &str, code: i32) {
    let Some(h) = hello(test) else {
        return;
    };
    let script = format!(
        "trap 'echo got-{name}; exit {code}' {name}; echo ready; while :; do sleep 0.1; done"
    );
    let start = Instant::now();
    let mut child = h
        .command(&["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting ./hello");
    let err = drain(child.stderr.take().expect("stderr"));
    let (tx, rx) = mpsc::channel();
    let mut lines = BufReader::new(child.stdout.take().expect("stdout"));
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            match lines.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    all.push_str(&line);
                    let _ = tx.send(line);
                }
            }
        }
        all
    });
    let ready = rx.recv_timeout(RUN_DEADLINE);
    if ready.as_deref() != Ok("ready\n") {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "the guest did not say ready ({ready:?}); stderr {}",
            String::from_utf8_lossy(&err.join().unwrap_or_default())
        );
    }
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    let status = wait_until(&mut child, start, RUN_DEADLINE, "./hello with a trap");
    let out = reader.join().expect("stdout reader");
    let err = String::from_utf8_lossy(&err.join().expect("stderr reader")).into_owned();
    let seen = format!("status {status:?}\n--- stdout ---\n{out}\n--- stderr ---\n{err}");
    assert_eq!(out, format!("ready\ngot-{name}\n"), "{seen}");
    assert_eq!(status.code(), Some(code), "{seen}");
}

#[test]
fn sigint_reaches_the_guest_command() {
    signal_reaches_the_guest("sigint_reaches_the_guest_command", libc::SIGINT, "INT", 42);
}

#[test]
fn sigterm_reaches_the_guest_command() {
    signal_reaches_the_guest(
        "sigterm_reaches_the_guest_command",
        libc::SIGTERM,
        "TERM",
        43,
    );
}

/// The packed file is one self-contained executable: nothing next to it is needed.
#[test]
fn the_executable_runs_from_anywhere() {
    let Some(h) = hello("the_executable_runs_from_anywhere") else {
        return;
    };
    let elsewhere = h.dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let moved = elsewhere.join("renamed");
    std::fs::copy(&h.exe, &moved).unwrap();
    let mut cmd = Command::new(&moved);
    cmd.arg("greet")
        .arg("moved")
        .current_dir(Path::new("/"))
        .env("SMOLVM_CACHE", h.dir.path().join("cache"));
    let o = run_until(cmd, b"", RUN_DEADLINE);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert!(stdout(&o).ends_with("[moved]\n"), "{}", describe(&o));
}
