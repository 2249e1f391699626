//! What the build runs inside the booted guest, through the agent: setup steps with their
//! output streamed, and services started detached and probed until ready.
//!
//! Everything here talks to a [`Client`], so it is exercised without a VM against an agent
//! serving a socket pair on the host.

use std::collections::{BTreeMap, VecDeque};
use std::io::Read;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use smolvm_agent::client::{Client, ClientError};
use smolvm_agent::protocol::{ExecRequest, ExitStatus, WarmMode, WarmRequest, WarmState};

use crate::progress::{LineSplitter, Progress};
use crate::smolfile::{Probe, Run, Service, Step, Warm, WarmKind};

/// Lines of output kept for error messages.
const TAIL_LINES: usize = 40;

/// The line a service script prints with the service's pid; not shown to the user.
const PID_MARKER: &str = "smolvm-service-pid=";

/// Exit status of a service script whose service exited before it was ready.
const SERVICE_EXITED: i32 = 97;

/// Where services keep their output and pid inside the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePaths {
    /// Directory of `NAME.log` (stdout and stderr of the service).
    pub log_dir: String,
    /// Directory of `NAME.pid`.
    pub run_dir: String,
}

impl Default for ServicePaths {
    fn default() -> Self {
        ServicePaths {
            log_dir: "/var/log".into(),
            run_dir: "/run".into(),
        }
    }
}

impl ServicePaths {
    /// The log file of service `name`.
    pub fn log(&self, name: &str) -> String {
        format!("{}/{name}.log", self.log_dir.trim_end_matches('/'))
    }

    /// The pid file of service `name`.
    pub fn pid(&self, name: &str) -> String {
        format!("{}/{name}.pid", self.run_dir.trim_end_matches('/'))
    }
}

/// A guest command that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The command ran and failed.
    #[error("{command} {status}")]
    Failed {
        command: String,
        status: String,
        /// Its last lines of output (already shown while it ran).
        tail: Vec<String>,
    },
    /// A service did not become ready.
    #[error("service {name:?} {reason}; its log is {log}")]
    Service {
        name: String,
        reason: String,
        log: String,
    },
    /// The warm entrypoint did not get ready.
    #[error("{0}")]
    Warm(String),
    /// The agent refused or lost the command.
    #[error("{command}: {error}")]
    Agent { command: String, error: ClientError },
}

/// The environment of a command: the Smolfile's `[env]`, overridden by the entry's own.
pub fn exec_env(
    global: &BTreeMap<String, String>,
    local: &BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let mut env = global.clone();
    env.extend(local.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.into_iter().collect()
}

/// The exec request of a setup step.
pub fn setup_request(step: &Step, global_env: &BTreeMap<String, String>) -> ExecRequest {
    ExecRequest {
        argv: step.run.clone(),
        env: exec_env(global_env, &step.env),
        cwd: step.workdir.clone(),
        ..Default::default()
    }
}

/// A command as the user wrote it: the script of `/bin/sh -c SCRIPT`, else the argv joined
/// with shell quoting where needed.
pub fn display_command(argv: &[String]) -> String {
    if argv.len() == 3 && argv[0] == "/bin/sh" && argv[1] == "-c" {
        return argv[2].clone();
    }
    argv.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
            if plain {
                a.clone()
            } else {
                shell_quote(a)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `s` as one single-quoted POSIX shell word.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The body of the shell function `ready` for a probe: succeeds once the probe passes.
/// Only shell builtins run for `tcp` and `file`, because every process start is expensive in
/// an emulated guest: a TCP probe looks for a listening socket on 0.0.0.0 or 127.0.0.1 (v4, or
/// the v6 any/mapped address) in `/proc/net/tcp{,6}`, which is when a connection to
/// 127.0.0.1:PORT succeeds.
pub fn probe_function(probe: Option<&Probe>) -> String {
    match probe {
        None => "ready() { return 0; }".into(),
        Some(Probe::File(path)) => format!("ready() {{ [ -e {} ]; }}", shell_quote(path)),
        Some(Probe::Exec(argv)) => {
            let cmd: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
            format!(
                "ready() {{ {} </dev/null >/dev/null 2>&1; }}",
                cmd.join(" ")
            )
        }
        Some(Probe::Tcp(port)) => {
            let p = format!("{port:04X}");
            let addrs = [
                "00000000",
                "0100007F",
                "00000000000000000000000000000000",
                "0000000000000000FFFF00000100007F",
            ];
            let pattern: Vec<String> = addrs.iter().map(|a| format!("{a}:{p}")).collect();
            format!(
                "ready() {{\n\
                 \x20 for f in /proc/net/tcp /proc/net/tcp6; do\n\
                 \x20   [ -r \"$f\" ] || continue\n\
                 \x20   while read -r _ l _ s _; do\n\
                 \x20     [ \"$s\" = 0A ] || continue\n\
                 \x20     case \"$l\" in {}) return 0 ;; esac\n\
                 \x20   done <\"$f\"\n\
                 \x20 done\n\
                 \x20 return 1\n\
                 }}",
                pattern.join("|")
            )
        }
    }
}

/// The shell function `pause` before each probe: 0.5 s, during which the script does not
/// compete with the starting service for the CPU (an emulated guest has one slow vCPU).
/// `read -t` on a fresh pseudo-terminal master (which never has input) waits without starting
/// a process, where the shell has a fractional `read -t` (busybox ash, bash); else `sleep`.
const PAUSE: &str = "pause() { sleep 0.5 2>/dev/null || sleep 1; return 0; }\n\
    if [ -c /dev/ptmx ] && [ -e /dev/pts/ptmx ] && \
    { [ -n \"${BASH_VERSION-}\" ] || [ /bin/sh -ef /bin/busybox ]; }; then\n\
    \x20 exec 3<>/dev/ptmx && pause() { read -t 0.5 _ <&3; return 0; }\n\
    fi";

/// The script that starts a service detached and waits until it is ready.
///
/// The service (the script's arguments) starts in its own session (`setsid` when the image
/// has it) with stdin from `/dev/null` and output to its log, so it is no command of the
/// agent's: it survives the end of the build's agent session and a resume, and PID 1 reaps
/// it. Its pid goes to the pid file and, marked, to stdout. The script then polls `ready`
/// (pausing before each try, without starting processes where it can, see [`PAUSE`]),
/// and exits with [`SERVICE_EXITED`] and the log's tail if the service dies first. The build
/// enforces the timeout from the host (the guest clock is not trusted to run at wall speed).
pub fn service_script(probe: Option<&Probe>, log: &str, pidfile: &str) -> String {
    let log_dir = log.rsplit_once('/').map_or("/", |(d, _)| d);
    let log_dir = if log_dir.is_empty() { "/" } else { log_dir };
    format!(
        "log={log}\n\
         [ -d {log_dir} ] || mkdir -p {log_dir} || exit 125\n\
         if command -v setsid >/dev/null 2>&1; then\n\
         \x20 setsid \"$@\" </dev/null >\"$log\" 2>&1 &\n\
         else\n\
         \x20 \"$@\" </dev/null >\"$log\" 2>&1 &\n\
         fi\n\
         pid=$!\n\
         echo \"$pid\" >{pidfile} || exit 125\n\
         echo {PID_MARKER}$pid\n\
         {ready}\n\
         {PAUSE}\n\
         alive() {{\n\
         \x20 [ -r /proc/$pid/stat ] || return 1\n\
         \x20 read -r st </proc/$pid/stat || return 1\n\
         \x20 st=${{st##*) }}\n\
         \x20 [ \"${{st%% *}}\" != Z ]\n\
         }}\n\
         while pause; ! ready; do\n\
         \x20 if ! alive; then\n\
         \x20   wait \"$pid\"\n\
         \x20   echo \"the service exited with status $? before it was ready; last lines of $log:\" >&2\n\
         \x20   tail -n 20 \"$log\" >&2\n\
         \x20   exit {SERVICE_EXITED}\n\
         \x20 fi\n\
         done\n",
        log = shell_quote(log),
        log_dir = shell_quote(log_dir),
        pidfile = shell_quote(pidfile),
        ready = probe_function(probe),
    )
}

/// The exec request that starts `svc` and waits for its readiness probe.
pub fn service_request(
    svc: &Service,
    global_env: &BTreeMap<String, String>,
    paths: &ServicePaths,
) -> ExecRequest {
    let script = service_script(
        svc.ready.as_ref().map(|r| &r.probe),
        &paths.log(&svc.name),
        &paths.pid(&svc.name),
    );
    let mut argv = vec![
        "/bin/sh".to_string(),
        "-c".into(),
        script,
        format!("smolvm-service-{}", svc.name),
    ];
    argv.extend(svc.run.iter().cloned());
    ExecRequest {
        argv,
        env: exec_env(global_env, &svc.env),
        cwd: svc.workdir.clone(),
        ..Default::default()
    }
}

/// How a finished command ended, in words.
pub fn describe_status(status: ExitStatus) -> String {
    match status {
        ExitStatus::Code(c) => format!("exited with status {c}"),
        ExitStatus::Signal(s) => format!("was killed by signal {s}"),
    }
}

/// What a streamed command left behind.
#[derive(Debug)]
pub struct Finished {
    /// `None` when the timeout hit and the command was killed.
    pub status: Option<ExitStatus>,
    /// The last lines of output, stdout and stderr interleaved as they arrived.
    pub tail: Vec<String>,
    /// Lines starting with a marker the caller asked to capture instead of showing.
    pub marked: Vec<String>,
}

/// Runs `req` with empty stdin, printing each line of its output through `progress` as it
/// arrives. With a `timeout`, the command is killed when it has not finished by then.
/// Lines starting with `marker` are captured, not shown.
pub fn run_streamed(
    client: &Client,
    req: ExecRequest,
    progress: &Progress,
    timeout: Option<Duration>,
    marker: Option<&str>,
) -> Result<Finished, ClientError> {
    let mut h = client.exec(req)?;
    h.close_stdin()?;
    let (tx, rx) = mpsc::channel::<(usize, Vec<u8>)>();
    let mut readers = Vec::new();
    for (i, reader) in [h.take_stdout(), h.take_stderr()].into_iter().enumerate() {
        let Some(mut reader) = reader else { continue };
        let tx = tx.clone();
        readers.push(thread::spawn(move || {
            let mut buf = vec![0u8; 16 << 10];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send((i, buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                }
            }
        }));
    }
    drop(tx);

    let deadline = timeout.map(|t| Instant::now() + t);
    let mut killed = false;
    let mut splitters = [LineSplitter::default(), LineSplitter::default()];
    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    let mut marked = Vec::new();
    let mut show = |line: String, tail: &mut VecDeque<String>| {
        if let Some(m) = marker {
            if line.starts_with(m) {
                marked.push(line);
                return;
            }
        }
        progress.output(&line);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    };
    loop {
        let msg = match deadline {
            Some(d) if !killed => {
                let left = d.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(m) => Some(m),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        // The exec's pid is its process group (each exec gets its own session).
                        h.signal(libc::SIGKILL)?;
                        killed = true;
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => None,
                }
            }
            _ => rx.recv().ok(),
        };
        let Some((i, data)) = msg else { break };
        for line in splitters[i].push(&data) {
            show(line, &mut tail);
        }
    }
    for s in &mut splitters {
        if let Some(line) = s.finish() {
            show(line, &mut tail);
        }
    }
    for r in readers {
        let _ = r.join();
    }
    let status = h.wait()?;
    Ok(Finished {
        status: (!killed).then_some(status),
        tail: tail.into(),
        marked,
    })
}

/// Runs one setup step; a non-zero exit is an error carrying the output's tail.
pub fn run_setup_step(
    client: &Client,
    step: &Step,
    global_env: &BTreeMap<String, String>,
    progress: &Progress,
) -> Result<(), GuestError> {
    let command = display_command(&step.run);
    let finished = run_streamed(
        client,
        setup_request(step, global_env),
        progress,
        None,
        None,
    )
    .map_err(|error| GuestError::Agent {
        command: command.clone(),
        error,
    })?;
    match finished.status {
        Some(s) if s.success() => Ok(()),
        status => Err(GuestError::Failed {
            command: format!("`{}`", crate::progress::truncate(&command, 60)),
            status: status.map_or("did not finish".into(), describe_status),
            tail: finished.tail,
        }),
    }
}

/// Starts a service and waits for its readiness probe; returns its pid in the guest.
pub fn start_service(
    client: &Client,
    svc: &Service,
    global_env: &BTreeMap<String, String>,
    paths: &ServicePaths,
    progress: &Progress,
) -> Result<u32, GuestError> {
    let timeout = svc.ready.as_ref().map(|r| r.timeout);
    let log = paths.log(&svc.name);
    let service_err = |reason: String| GuestError::Service {
        name: svc.name.clone(),
        reason,
        log: log.clone(),
    };
    let finished = run_streamed(
        client,
        service_request(svc, global_env, paths),
        progress,
        timeout,
        Some(PID_MARKER),
    )
    .map_err(|error| GuestError::Agent {
        command: format!("starting service {:?}", svc.name),
        error,
    })?;
    let pid = finished
        .marked
        .iter()
        .find_map(|l| l.strip_prefix(PID_MARKER)?.trim().parse::<u32>().ok());
    match finished.status {
        Some(ExitStatus::Code(0)) => {
            pid.ok_or_else(|| service_err("started, but its pid was not reported".into()))
        }
        Some(ExitStatus::Code(SERVICE_EXITED)) => {
            Err(service_err("exited before it was ready".into()))
        }
        Some(ExitStatus::Code(125)) => Err(service_err(format!(
            "could not be started: cannot write {log} or {}",
            paths.pid(&svc.name)
        ))),
        Some(other) => Err(service_err(format!(
            "could not be started: its start script {}",
            describe_status(other)
        ))),
        None => {
            let waited = timeout.unwrap_or_default();
            // Show what the service said while it was not getting ready.
            if let Ok(out) = client.run_capture(["tail", "-n", "20", log.as_str()]) {
                let mut split = LineSplitter::default();
                let mut lines = split.push(&out.stdout);
                lines.extend(split.finish());
                if !lines.is_empty() {
                    progress.output(&format!("last lines of {log}:"));
                }
                for l in lines {
                    progress.output(&l);
                }
            }
            Err(service_err(format!(
                "was not ready after {}",
                crate::progress::format_duration(waited)
            )))
        }
    }
}

/// The request of a warm entrypoint: what a run without arguments sends (entrypoint and
/// cmd, `[env]`, the workdir, pipes), so that exactly such a run matches it.
pub fn warm_request(run: &Run, global_env: &BTreeMap<String, String>, warm: &Warm) -> WarmRequest {
    WarmRequest {
        exec: ExecRequest {
            argv: run.argv(&[]),
            env: global_env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            cwd: Some(run.workdir.clone().unwrap_or_else(|| "/".into())),
            ..Default::default()
        },
        mode: match warm.kind {
            WarmKind::Stdin => WarmMode::Stdin,
            WarmKind::Invoke => WarmMode::Invoke,
        },
        // The program: the entrypoint, or the command's first word without one.
        prefix: run.entrypoint.len().max(1) as u32,
    }
}

/// Starts the warm entrypoint and waits until it waits for its run; returns its pid.
pub fn start_warm(
    client: &Client,
    run: &Run,
    global_env: &BTreeMap<String, String>,
    warm: &Warm,
) -> Result<u32, GuestError> {
    let req = warm_request(run, global_env, warm);
    if req.exec.argv.is_empty() {
        return Err(GuestError::Warm(
            "there is no entrypoint or cmd to start warm".into(),
        ));
    }
    let command = format!(
        "`{}`",
        crate::progress::truncate(&display_command(&req.exec.argv), 60)
    );
    let what = match warm.kind {
        WarmKind::Stdin => "block reading its stdin",
        WarmKind::Invoke => "ask for its invocation on the socket (docs/WARM.md)",
    };
    match client.warm(req, warm.timeout) {
        Ok(WarmState::Ready { pid }) => Ok(pid),
        Ok(WarmState::Failed(why)) => Err(GuestError::Warm(format!("{command}: {why}"))),
        Err(ClientError::Timeout(..)) => Err(GuestError::Warm(format!(
            "the warm entrypoint {command} did not {what} within {}",
            crate::progress::format_duration(warm.timeout)
        ))),
        Err(error) => Err(GuestError::Agent { command, error }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smolfile::Ready;
    use smolvm_agent::agent::{run_session, HostSystem, SessionConfig};
    use std::os::unix::net::UnixStream;

    fn agent() -> Client {
        let (host, guest) = UnixStream::pair().unwrap();
        thread::spawn(move || run_session(guest, &mut HostSystem, &SessionConfig::default()));
        let c = Client::from_unix_stream(host).unwrap();
        c.handshake().unwrap();
        c
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn step(run: &[&str]) -> Step {
        Step {
            run: run.iter().map(|s| s.to_string()).collect(),
            workdir: None,
            env: BTreeMap::new(),
            line: 7,
        }
    }

    fn service(name: &str, run: &[&str], probe: Option<Probe>, timeout: Duration) -> Service {
        Service {
            name: name.into(),
            run: run.iter().map(|s| s.to_string()).collect(),
            workdir: None,
            env: BTreeMap::new(),
            ready: probe.map(|probe| Ready { probe, timeout }),
            line: 9,
        }
    }

    fn quiet() -> Progress {
        Progress::hidden(1)
    }

    fn warm_run(entrypoint: &[&str], cmd: &[&str], kind: WarmKind, secs: u64) -> (Run, Warm) {
        let run = Run {
            workdir: None,
            entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            warm: None,
        };
        let warm = Warm {
            kind,
            timeout: Duration::from_secs(secs),
            line: 12,
        };
        (run, warm)
    }

    #[test]
    fn warm_request_is_what_a_plain_run_sends() {
        let (run, warm) = warm_run(&["python3", "/app/t.py"], &["--x"], WarmKind::Invoke, 5);
        let r = warm_request(&run, &map(&[("B", "2"), ("A", "1")]), &warm);
        assert_eq!(r.exec.argv, ["python3", "/app/t.py", "--x"]);
        assert_eq!(
            r.exec.env,
            [("A".into(), "1".into()), ("B".into(), "2".into())]
        );
        assert_eq!(r.exec.cwd.as_deref(), Some("/"));
        assert_eq!((r.mode, r.prefix), (WarmMode::Invoke, 2));
        let (run, warm) = warm_run(&[], &["greet"], WarmKind::Stdin, 5);
        assert_eq!(warm_request(&run, &map(&[]), &warm).prefix, 1);
    }

    #[test]
    fn warm_entrypoints_ready_exited_and_timed_out() {
        let c = agent();
        let env = map(&[("GREETING", "hi")]);
        let (run, warm) = warm_run(
            &["sh", "-c"],
            &["read -r l; echo \"$GREETING $l\""],
            WarmKind::Stdin,
            60,
        );
        let pid = start_warm(&c, &run, &env, &warm).unwrap();
        // The run a plain `smolvm run` sends gets it.
        let h = c.exec(warm_request(&run, &env, &warm).exec).unwrap();
        assert_eq!(h.pid().unwrap(), pid);
        h.write_stdin(b"there\n").unwrap();
        h.close_stdin().unwrap();
        assert_eq!(h.wait_with_output().unwrap().stdout, b"hi there\n");

        let (run, warm) = warm_run(
            &["sh", "-c"],
            &["echo no config >&2; exit 4"],
            WarmKind::Stdin,
            60,
        );
        let e = start_warm(&c, &run, &env, &warm).unwrap_err().to_string();
        assert!(
            e.contains("exited with status 4 before it blocked reading its stdin"),
            "{e}"
        );
        assert!(e.contains("no config"), "{e}");

        let (run, warm) = warm_run(&["sleep"], &["600"], WarmKind::Stdin, 1);
        let e = start_warm(&c, &run, &env, &warm).unwrap_err().to_string();
        assert_eq!(
            e,
            "the warm entrypoint `sleep 600` did not block reading its stdin within 1.0s"
        );
        let (run, warm) = warm_run(&[], &[], WarmKind::Stdin, 1);
        assert!(start_warm(&c, &run, &env, &warm).is_err());
    }

    /// Kills a service the test started, by its pid file.
    struct Reap(String);
    impl Drop for Reap {
        fn drop(&mut self) {
            if let Ok(pid) = std::fs::read_to_string(&self.0) {
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    // SAFETY: kill has no memory effects; the pid is the test's own service.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }

    #[test]
    fn env_is_merged_with_local_overrides() {
        let env = exec_env(
            &map(&[("A", "1"), ("B", "2")]),
            &map(&[("B", "3"), ("C", "4")]),
        );
        assert_eq!(
            env,
            [("A", "1"), ("B", "3"), ("C", "4")].map(|(k, v)| (k.to_string(), v.to_string()))
        );
        let mut s = step(&["env"]);
        s.workdir = Some("/app".into());
        s.env = map(&[("X", "y")]);
        let req = setup_request(&s, &map(&[("X", "global"), ("G", "g")]));
        assert_eq!(req.argv, ["env"]);
        assert_eq!(req.cwd.as_deref(), Some("/app"));
        assert_eq!(
            req.env,
            [("G", "g"), ("X", "y")].map(|(k, v)| (k.to_string(), v.to_string()))
        );
        assert!(req.tty.is_none() && req.user.is_none());
    }

    #[test]
    fn commands_are_displayed_as_written() {
        let sh = |s: &str| vec!["/bin/sh".to_string(), "-c".into(), s.into()];
        assert_eq!(display_command(&sh("echo hi > /x")), "echo hi > /x");
        let argv: Vec<String> = ["httpd", "-p", "8080", "a b", "it's", ""]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(display_command(&argv), r"httpd -p 8080 'a b' 'it'\''s' ''");
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }

    #[test]
    fn service_request_carries_the_command_as_arguments() {
        let mut svc = service(
            "web",
            &["httpd", "-p", "8080", "it's"],
            Some(Probe::Tcp(8080)),
            Duration::from_secs(5),
        );
        svc.workdir = Some("/srv".into());
        svc.env = map(&[("PORT", "8080")]);
        let req = service_request(&svc, &map(&[("A", "b")]), &ServicePaths::default());
        assert_eq!(req.argv[..2], ["/bin/sh", "-c"]);
        assert_eq!(req.argv[3], "smolvm-service-web");
        assert_eq!(req.argv[4..], ["httpd", "-p", "8080", "it's"]);
        let script = &req.argv[2];
        assert!(script.contains("log='/var/log/web.log'"), "{script}");
        assert!(script.contains(">'/run/web.pid'"), "{script}");
        assert!(script.contains("0100007F:1F90"), "{script}");
        assert!(script.contains("setsid \"$@\""), "{script}");
        assert_eq!(req.cwd.as_deref(), Some("/srv"));
        assert_eq!(req.env.len(), 2);
    }

    #[test]
    fn probe_functions() {
        assert_eq!(probe_function(None), "ready() { return 0; }");
        assert_eq!(
            probe_function(Some(&Probe::File("/run/it's.sock".into()))),
            r"ready() { [ -e '/run/it'\''s.sock' ]; }"
        );
        let f = probe_function(Some(&Probe::Exec(vec!["wget".into(), "-q".into()])));
        assert!(f.contains("'wget' '-q' </dev/null"), "{f}");
        let f = probe_function(Some(&Probe::Tcp(80)));
        assert!(f.contains("00000000:0050|0100007F:0050|"), "{f}");
    }

    /// The TCP probe, run by the host's shell against a real listening socket.
    #[test]
    fn tcp_probe_sees_a_listener_on_this_host() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let run = |port: u16| {
            let script = format!("{}\nready", probe_function(Some(&Probe::Tcp(port))));
            std::process::Command::new("/bin/sh")
                .args(["-c", &script])
                .status()
                .unwrap()
                .success()
        };
        assert!(run(port), "listening port {port} not seen");
        drop(l);
        assert!(!run(port), "closed port {port} still seen");
    }

    /// Both forms of `pause` succeed: bash takes the pseudo-terminal path, the
    /// host's other shells `sleep`.
    #[test]
    fn pause_waits_without_failing() {
        for shell in ["bash", "sh"] {
            let script = format!("{PAUSE}\npause && pause && echo paused");
            let out = std::process::Command::new(shell)
                .args(["-c", &script])
                .output()
                .unwrap();
            assert_eq!(out.stdout, b"paused\n", "{shell}: {out:?}");
        }
    }

    #[test]
    fn setup_steps_stream_output_and_fail_with_status_and_tail() {
        let c = agent();
        let mut s = step(&["/bin/sh", "-c", "echo $WHO; echo err >&2; pwd"]);
        s.workdir = Some("/tmp".into());
        s.env = map(&[("WHO", "local")]);
        let p = quiet();
        let f = run_streamed(&c, setup_request(&s, &map(&[("WHO", "g")])), &p, None, None).unwrap();
        assert_eq!(f.status, Some(ExitStatus::Code(0)));
        let mut tail = f.tail.clone();
        tail.sort();
        assert_eq!(tail, ["/tmp", "err", "local"]);
        run_setup_step(&c, &s, &BTreeMap::new(), &p).unwrap();

        let s = step(&["/bin/sh", "-c", "echo partial; printf no-newline; exit 3"]);
        match run_setup_step(&c, &s, &BTreeMap::new(), &p) {
            Err(GuestError::Failed {
                command,
                status,
                tail,
            }) => {
                assert!(command.contains("exit 3"), "{command}");
                assert_eq!(status, "exited with status 3");
                assert_eq!(tail, ["partial", "no-newline"]);
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        let s = step(&["/no/such/program"]);
        assert!(matches!(
            run_setup_step(&c, &s, &BTreeMap::new(), &p),
            Err(GuestError::Agent { .. })
        ));
    }

    #[test]
    fn streamed_command_is_killed_at_its_timeout() {
        let c = agent();
        let p = quiet();
        let f = run_streamed(
            &c,
            ExecRequest::new(["sh", "-c", "echo before; exec sleep 30"]),
            &p,
            Some(Duration::from_millis(300)),
            None,
        )
        .unwrap();
        assert_eq!(f.status, None);
        assert_eq!(f.tail, ["before"]);
    }

    #[test]
    fn service_starts_detached_and_outlives_its_script() {
        let c = agent();
        let dir = tempfile::tempdir().unwrap();
        let paths = ServicePaths {
            log_dir: dir.path().join("log").display().to_string(),
            run_dir: dir.path().display().to_string(),
        };
        let ready_file = dir.path().join("ready");
        let script = format!(
            "echo service says hi; sleep 0.3; touch {}; exec sleep 60",
            ready_file.display()
        );
        let svc = service(
            "svc",
            &["sh", "-c", &script],
            Some(Probe::File(ready_file.display().to_string())),
            Duration::from_secs(20),
        );
        let _reap = Reap(paths.pid("svc"));
        let pid = start_service(&c, &svc, &BTreeMap::new(), &paths, &quiet()).unwrap();
        assert!(ready_file.exists(), "returned before the probe passed");
        assert_eq!(
            std::fs::read_to_string(paths.pid("svc")).unwrap().trim(),
            pid.to_string()
        );
        let log = std::fs::read_to_string(paths.log("svc")).unwrap();
        assert_eq!(log, "service says hi\n");
        // Still running after its start script exited, in its own session.
        // SAFETY: kill with signal 0 only checks that the process exists.
        assert_eq!(unsafe { libc::kill(pid as i32, 0) }, 0);
        // SAFETY: getsid has no memory effects.
        assert_eq!(unsafe { libc::getsid(pid as i32) }, pid as i32);
        // Not an exec of the agent: ending the session does not kill it.
        drop(c);
        thread::sleep(Duration::from_millis(200));
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(pid as i32, 0) }, 0);
    }

    #[test]
    fn service_that_exits_early_fails_with_its_log() {
        let c = agent();
        let dir = tempfile::tempdir().unwrap();
        let paths = ServicePaths {
            log_dir: dir.path().display().to_string(),
            run_dir: dir.path().display().to_string(),
        };
        let svc = service(
            "bad",
            &["sh", "-c", "echo cannot bind; exit 4"],
            Some(Probe::Tcp(1)),
            Duration::from_secs(20),
        );
        let p = quiet();
        match start_service(&c, &svc, &BTreeMap::new(), &paths, &p) {
            Err(e @ GuestError::Service { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("exited before it was ready"), "{msg}");
                assert!(msg.contains("bad.log"), "{msg}");
            }
            other => panic!("expected a service error, got {other:?}"),
        }
        // The script reported the status and the log through the streamed output.
        let f = run_streamed(
            &c,
            service_request(&svc, &BTreeMap::new(), &paths),
            &p,
            None,
            Some(PID_MARKER),
        )
        .unwrap();
        assert_eq!(f.status, Some(ExitStatus::Code(SERVICE_EXITED)));
        assert!(
            f.tail.iter().any(|l| l.contains("exited with status 4")),
            "{:?}",
            f.tail
        );
        assert!(f.tail.iter().any(|l| l == "cannot bind"), "{:?}", f.tail);
    }

    #[test]
    fn service_not_ready_in_time_fails_and_names_the_timeout() {
        let c = agent();
        let dir = tempfile::tempdir().unwrap();
        let paths = ServicePaths {
            log_dir: dir.path().display().to_string(),
            run_dir: dir.path().display().to_string(),
        };
        let svc = service(
            "slow",
            &["sh", "-c", "echo waiting; exec sleep 60"],
            Some(Probe::File(dir.path().join("never").display().to_string())),
            Duration::from_millis(500),
        );
        let _reap = Reap(paths.pid("slow"));
        let err = start_service(&c, &svc, &BTreeMap::new(), &paths, &quiet()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("was not ready after 500ms"), "{msg}");
    }

    #[test]
    fn service_without_probe_is_ready_once_started() {
        let c = agent();
        let dir = tempfile::tempdir().unwrap();
        let paths = ServicePaths {
            log_dir: dir.path().display().to_string(),
            run_dir: dir.path().display().to_string(),
        };
        let svc = service("s", &["sleep", "60"], None, Duration::ZERO);
        let _reap = Reap(paths.pid("s"));
        let pid = start_service(&c, &svc, &BTreeMap::new(), &paths, &quiet()).unwrap();
        assert!(pid > 1);
    }
}
