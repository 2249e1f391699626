//! `smol-agent`: PID 1 of a smolvm guest, or a host-side agent for tests.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use smolvm_agent::agent::{run_session, HostSystem, SessionConfig, SessionEnd, System};
use smolvm_agent::agent_log;
use smolvm_agent::init::{self, BootConfig, GuestSystem};
use smolvm_agent::protocol::{DEFAULT_AGENT_PORT, PROTOCOL_VERSION};

const USAGE: &str = "\
usage: smol-agent                    run as PID 1 of a smolvm guest (port from smolvm.agent=)
       smol-agent --socket PATH      listen on a Unix socket, serve one connection at a time
       smol-agent --connect PATH     connect to a Unix socket and serve that session
       smol-agent --fd N             serve the inherited descriptor N
       smol-agent --device PATH      serve a device (e.g. /dev/hvc0), reopening after each session
options: --system     set the clock, add entropy and drop caches for real (implied as PID 1)
         --etc DIR    where passwd and group live (default /etc)
         --version    print the agent and protocol versions";

enum Mode {
    Socket(PathBuf),
    Connect(PathBuf),
    Fd(i32),
    Device(PathBuf),
}

fn main() -> ExitCode {
    // SAFETY: getpid cannot fail.
    if unsafe { libc::getpid() } == 1 {
        pid1(Pid1Options::parse(std::env::args().skip(1)));
    }
    let argv0 = std::env::args().next().unwrap_or_default();
    if argv0.rsplit('/').next() == Some("smolvm-invoke") {
        return invoke_cli(std::env::args().skip(1).collect());
    }
    if std::env::args().nth(1).as_deref() == Some("invoke") {
        return invoke_cli(std::env::args().skip(2).collect());
    }
    let mut args = std::env::args().skip(1);
    let mut mode = None;
    let mut real_system = false;
    let mut config = SessionConfig::default();
    while let Some(a) = args.next() {
        let mut val = |name: &str| {
            args.next()
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))
        };
        let parsed = match a.as_str() {
            "--socket" => val("--socket").map(|v| mode = Some(Mode::Socket(v.into()))),
            "--connect" => val("--connect").map(|v| mode = Some(Mode::Connect(v.into()))),
            "--device" => val("--device").map(|v| mode = Some(Mode::Device(v.into()))),
            "--fd" => val("--fd").and_then(|v| {
                v.parse()
                    .map(|n| mode = Some(Mode::Fd(n)))
                    .map_err(|_| format!("--fd needs a descriptor number, got {v:?}"))
            }),
            "--etc" => val("--etc").map(|v| config.etc_dir = v.into()),
            "--system" => {
                real_system = true;
                Ok(())
            }
            "--version" => {
                println!(
                    "smol-agent {} (protocol {PROTOCOL_VERSION})",
                    env!("CARGO_PKG_VERSION")
                );
                return ExitCode::SUCCESS;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => Err(format!("unknown argument {other:?}\n{USAGE}")),
        };
        if let Err(e) = parsed {
            eprintln!("smol-agent: {e}");
            return ExitCode::from(2);
        }
    }
    let Some(mode) = mode else {
        eprintln!("smol-agent: not PID 1, so a transport is needed\n{USAGE}");
        return ExitCode::from(2);
    };
    let mut system: Box<dyn System> = if real_system {
        Box::new(GuestSystem::default())
    } else {
        Box::new(HostSystem)
    };
    match serve(mode, system.as_mut(), &config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("smol-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

const INVOKE_USAGE: &str = "\
usage: smolvm-invoke --sh NARGS    (also: smol-agent invoke --sh NARGS)
Waits for this warm program's run (docs/WARM.md) and prints shell commands that take it
over: its stdin, stdout and stderr, working directory, environment and arguments. Without
SMOLVM_INVOKE_SOCKET (the script was not started warm) it prints nothing.
NARGS is the script's own argument count, so in a shell script:

    eval \"$(smolvm-invoke --sh $#)\"";

/// `smolvm-invoke --sh NARGS`: the invocation protocol for shell scripts. A shell cannot
/// receive descriptors, so a child of this helper holds them while the script opens them
/// again through `/proc/CHILD/fd/N` (they are pipes), then the script kills the child.
fn invoke_cli(args: Vec<String>) -> ExitCode {
    let nargs = match args.as_slice() {
        [flag, n] if flag == "--sh" => n.parse::<usize>().ok(),
        _ => None,
    };
    let Some(nargs) = nargs else {
        eprintln!("smolvm-invoke: {INVOKE_USAGE}");
        return ExitCode::from(2);
    };
    // The run's argv is a command line as the agent execs it: the program's words, then the
    // script's arguments. The warm start had SMOLVM_INVOKE_ARGC words of which the script got
    // NARGS as its arguments, so the rest were the program's. Without the variable (an older
    // agent), count them from the script's shell, whose command line is the program's words
    // (as the kernel rewrote them for a `#!` line) and then its NARGS arguments.
    let from_env = std::env::var(smolvm_agent::invoke::ARGC_ENV)
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    let own = from_env.unwrap_or_else(|| {
        // SAFETY: getppid cannot fail.
        let ppid = unsafe { libc::getppid() };
        std::fs::read(format!("/proc/{ppid}/cmdline"))
            .map(|c| c.split(|&b| b == 0).count().saturating_sub(1))
            .unwrap_or(0)
    });
    let skip = own.saturating_sub(nargs);
    // Not started warm: nothing to take over, and nothing printed, so the script runs cold.
    let Some(socket) = std::env::var_os(smolvm_agent::invoke::SOCKET_ENV) else {
        return ExitCode::SUCCESS;
    };
    let socket = socket.to_string_lossy().into_owned();
    let (inv, fds) = match smolvm_agent::invoke::wait(&socket) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("smolvm-invoke: {e}");
            return ExitCode::from(1);
        }
    };
    // SAFETY: fork in a single-threaded process; the child only sleeps and exits.
    let holder = unsafe { libc::fork() };
    if holder < 0 {
        eprintln!("smolvm-invoke: fork: {}", std::io::Error::last_os_error());
        return ExitCode::from(1);
    }
    if holder == 0 {
        // The holder: keep the descriptors open, let go of the command substitution's pipe.
        // SAFETY: plain system calls on descriptors of this process.
        unsafe {
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            libc::dup2(null, 1);
            libc::dup2(null, 2);
            libc::alarm(60);
            loop {
                libc::pause();
            }
        }
    }
    let q = smolvm_agent::invoke::shell_quote;
    let [i, o, e] = fds.each_ref().map(|f| f.as_raw_fd());
    let mut out = format!(
        "exec 0</proc/{holder}/fd/{i} 1>/proc/{holder}/fd/{o} 2>/proc/{holder}/fd/{e}; \
         kill {holder} 2>/dev/null\ncd -- {}\n",
        q(&inv.cwd)
    );
    out.push_str(&smolvm_agent::invoke::shell_exports(&inv.env));
    out.push_str("set --");
    for a in inv.argv.iter().skip(skip) {
        out.push(' ');
        out.push_str(&q(a));
    }
    out.push('\n');
    print!("{out}");
    ExitCode::SUCCESS
}

fn log_end(end: &SessionEnd) {
    match end {
        SessionEnd::Closed => agent_log!("session closed by the host"),
        SessionEnd::Failed(e) => agent_log!("session failed: {e}"),
        SessionEnd::Panicked(e) => agent_log!("session aborted by an agent bug: {e}"),
        SessionEnd::Shutdown { reboot } => agent_log!("shutdown requested (reboot: {reboot})"),
    }
}

fn serve(mode: Mode, system: &mut dyn System, config: &SessionConfig) -> Result<(), String> {
    match mode {
        Mode::Socket(path) => {
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path)
                .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
            agent_log!("listening on {}", path.display());
            for conn in listener.incoming() {
                let stream = match conn {
                    Ok(s) => s,
                    Err(e) => {
                        agent_log!("accept failed: {e}");
                        continue;
                    }
                };
                let end = run_session(stream, system, config);
                log_end(&end);
                if matches!(end, SessionEnd::Shutdown { .. }) {
                    let _ = std::fs::remove_file(&path);
                    return Ok(());
                }
            }
            Ok(())
        }
        Mode::Connect(path) => {
            let stream = UnixStream::connect(&path)
                .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
            finish(run_session(stream, system, config))
        }
        Mode::Fd(n) => {
            // SAFETY: the caller handed us descriptor `n` to own; fcntl checks it is open.
            if unsafe { libc::fcntl(n, libc::F_GETFD) } < 0 {
                return Err(format!("descriptor {n} is not open"));
            }
            // SAFETY: checked open above; nothing else in this process owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(n) };
            let stream = UnixStream::from(fd);
            finish(run_session(stream, system, config))
        }
        Mode::Device(path) => loop {
            let port = init::open_port(&path.to_string_lossy())
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            let end = run_session(port, system, config);
            log_end(&end);
            if matches!(end, SessionEnd::Shutdown { .. }) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        },
    }
}

fn finish(end: SessionEnd) -> Result<(), String> {
    log_end(&end);
    match end {
        SessionEnd::Closed | SessionEnd::Shutdown { .. } => Ok(()),
        SessionEnd::Failed(e) | SessionEnd::Panicked(e) => Err(e),
    }
}

/// Arguments PID 1 accepts (the kernel passes words after `--` on its command line); unknown
/// ones are ignored, as PID 1 must come up whatever it is given.
#[derive(Default)]
struct Pid1Options {
    /// Agent port overriding `smolvm.agent=`.
    device: Option<String>,
    /// Log to stderr instead of /dev/kmsg (PID 1 of a container-style namespace in tests).
    log_stderr: bool,
}

impl Pid1Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Self {
        let mut o = Pid1Options::default();
        while let Some(a) = args.next() {
            match a.as_str() {
                "--device" => o.device = args.next(),
                "--log-stderr" => o.log_stderr = true,
                _ => {}
            }
        }
        o
    }
}

/// PID 1: never returns. Anything that would end the agent powers the machine off instead.
fn pid1(opts: Pid1Options) -> ! {
    let result = catch_unwind(AssertUnwindSafe(|| pid1_serve(opts)));
    match result {
        Ok(reboot) => init::power_off(reboot),
        Err(_) => {
            agent_log!("agent crashed outside a session; powering off");
            init::power_off(false)
        }
    }
}

/// Sets the guest up and serves the agent port; returns only to shut down (`true`: reboot).
fn pid1_serve(opts: Pid1Options) -> bool {
    init::mount_filesystems();
    init::keep_code_resident();
    if !opts.log_stderr {
        if let Ok(kmsg) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
            smolvm_agent::log::use_kmsg(kmsg);
        }
    }
    let mut boot =
        BootConfig::from_cmdline(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    if let Some(d) = opts.device {
        boot.agent_port = d;
    }
    if let Err(e) = init::set_hostname(&boot.hostname) {
        agent_log!("cannot set hostname {:?}: {e}", boot.hostname);
    }
    if let Err(e) = init::loopback_up() {
        agent_log!("cannot bring up lo: {e}");
    }
    let sigfd = match init::signal_fd() {
        Ok(fd) => Some(fd),
        Err(e) => {
            agent_log!("cannot set up signal handling: {e}");
            None
        }
    };
    let config = SessionConfig {
        reap_all: true,
        signal_fd: sigfd.as_ref().map(|f| f.as_raw_fd()),
        ..SessionConfig::default()
    };
    let mut system = GuestSystem::default();
    agent_log!(
        "serving protocol {PROTOCOL_VERSION} on {} as {}",
        boot.agent_port,
        boot.hostname
    );
    let mut open_failures = 0u32;
    loop {
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            // The named port appears a moment after the console driver probed: until then
            // (and without any port) this counts as a failed open and is retried soon.
            let port = init::resolve_agent_port(&boot.agent_port).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "no virtio port named {} and no {DEFAULT_AGENT_PORT}",
                        boot.agent_port
                    ),
                )
            });
            match port.and_then(|p| init::open_port(&p)) {
                Ok(port) => {
                    open_failures = 0;
                    let end = run_session(port, &mut system, &config);
                    log_end(&end);
                    match end {
                        SessionEnd::Shutdown { reboot } => Some(reboot),
                        _ => None,
                    }
                }
                Err(e) => {
                    if open_failures == 200 || open_failures == 1000 {
                        agent_log!("cannot open agent port {}: {e}", boot.agent_port);
                    }
                    open_failures += 1;
                    None
                }
            }
        }));
        if let Ok(Some(reboot)) = outcome {
            return reboot;
        }
        // Between sessions: keep reaping and honour shutdown signals. While the port has
        // not shown up yet (the first seconds of a boot), look again soon.
        let pause = if open_failures > 0 && open_failures < 500 {
            Duration::from_millis(10)
        } else {
            Duration::from_millis(500)
        };
        match &sigfd {
            Some(fd) => {
                init::wait_signal(fd.as_raw_fd(), pause);
                if let Some(reboot) = init::drain_signals(fd.as_raw_fd()) {
                    return reboot;
                }
            }
            None => std::thread::sleep(pause),
        }
        init::reap_orphans();
    }
}
