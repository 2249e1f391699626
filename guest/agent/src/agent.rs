//! The agent's server side: one session per connected stream, a single-threaded poll(2) loop
//! multiplexing the transport, every exec's pipes or terminal, and process exits.
//!
//! Nothing here exits the process or panics on peer input: a bad frame ends the session with
//! [`SessionEnd::Failed`], and [`run_session`] catches any panic so PID 1 keeps serving.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::agent_log;
use crate::invoke::{self, Invocation};
use crate::protocol::{
    encode_frame, AgentMsg, Applied, ExecId, ExecRequest, ExitStatus, FrameDecoder, HostMsg,
    NetConfig, QuiesceReport, ResumeReport, ShareMount, Stream, StreamId, WallClock, WarmMode,
    WarmRequest, WarmState, INITIAL_WINDOW, MAX_CHUNK, MAX_ENTROPY, PROTOCOL_VERSION,
    STREAM_WINDOW,
};
use crate::sys::{self, Creds};

/// Anything the agent can serve a session over: a Unix socket, a virtio-console TTY, a pipe
/// pair wrapped in one type. It must expose a pollable descriptor.
pub trait Transport: Read + Write + AsRawFd {}
impl<T: Read + Write + AsRawFd> Transport for T {}

/// System actions that need privileges; injectable so tests never touch the host.
pub trait System {
    /// Flushes filesystems and drops the page cache before a snapshot: (sync, drop_caches).
    fn quiesce(&mut self) -> (Applied, Applied);
    /// Sets `CLOCK_REALTIME`.
    fn set_clock(&mut self, now: WallClock) -> Applied;
    /// Mixes `bytes` into the kernel RNG and forces a reseed.
    fn add_entropy(&mut self, bytes: &[u8]) -> Applied;
    /// Mounts the host directory shares (see `HostMsg::Mount`).
    fn mount_shares(&mut self, _shares: &[ShareMount]) -> Result<(), String> {
        Err("shares can only be mounted inside a machine".into())
    }
    /// Unmounts every share mounted by `mount_shares`; fails if one is busy.
    fn unmount_shares(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// Brings the network card up (see `HostMsg::NetUp`).
    fn net_up(&mut self, _config: &NetConfig) -> Result<(), String> {
        Err("the network can only be configured inside a machine".into())
    }
    /// Unbinds the network card's driver (see `HostMsg::NetDown`).
    fn net_down(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// The system as seen by an agent running as an ordinary host process: syncs, but leaves the
/// clock, the RNG and the page cache alone.
#[derive(Debug, Default)]
pub struct HostSystem;

impl System for HostSystem {
    fn quiesce(&mut self) -> (Applied, Applied) {
        // SAFETY: sync takes no arguments and cannot fail.
        unsafe { libc::sync() };
        (Applied::Applied, Applied::Skipped)
    }
    fn set_clock(&mut self, _now: WallClock) -> Applied {
        Applied::Skipped
    }
    fn add_entropy(&mut self, _bytes: &[u8]) -> Applied {
        Applied::Skipped
    }
}

/// How a session behaves.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Reap every child with `waitpid(-1)` (PID 1 adopts orphans). Off in host mode so an
    /// agent embedded in a test process never steals another thread's children.
    pub reap_all: bool,
    /// A non-blocking signalfd for SIGCHLD and the shutdown signals (PID 1 only).
    pub signal_fd: Option<RawFd>,
    /// Directory holding `passwd` and `group` for user lookups.
    pub etc_dir: PathBuf,
    /// After a command exits, how long its output may stay idle before the agent stops
    /// waiting for background processes that inherited the pipes.
    pub exit_grace: Duration,
    /// Most execs (running or held) at once.
    pub max_execs: usize,
    /// Most port-forward streams open at once.
    pub max_streams: usize,
    /// Where a warm entrypoint in invocation mode connects (docs/WARM.md).
    pub invoke_socket: PathBuf,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            reap_all: false,
            signal_fd: None,
            etc_dir: PathBuf::from("/etc"),
            exit_grace: Duration::from_millis(500),
            max_execs: 256,
            max_streams: 1024,
            invoke_socket: PathBuf::from(invoke::DEFAULT_SOCKET),
        }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The peer closed the stream.
    Closed,
    /// Protocol or I/O error; the agent can serve a new session.
    Failed(String),
    /// The host (or a signal to PID 1) asked to power off or reboot.
    Shutdown { reboot: bool },
    /// A bug in the agent; the session was abandoned, the agent lives on.
    Panicked(String),
}

/// Stop reading the transport while this much output waits to be written to it.
const OUT_HIGH_WATER: usize = 2 * 1024 * 1024;
/// Return stdin credit once this much has been delivered (or the buffer ran dry).
const STDIN_CREDIT_BATCH: u32 = INITIAL_WINDOW / 4;
/// Poll interval used only when the kernel lacks pidfds and no signalfd is available.
const FALLBACK_TICK: Duration = Duration::from_millis(50);
/// How often a starting warm entrypoint is checked for blocking on its stdin.
const WARM_TICK: Duration = Duration::from_millis(50);
/// Bytes of a warm entrypoint's output quoted when it ends before it is ready.
const WARM_TAIL: usize = 2048;
/// Bounds on the command directories read back after a cache drop (a `PATH` is the
/// machine's own, but it is still input).
const MAX_PRELOAD_DIRS: usize = 64;
const MAX_PRELOAD_ENTRIES: usize = 100_000;

/// A command started by `Warm` and kept outside every exec (so `Resume` does not kill it)
/// until a matching run takes it over.
struct Warm {
    req: WarmRequest,
    pid: i32,
    pidfd: Option<OwnedFd>,
    stdin: OwnedFd,
    outs: [OwnedFd; 2],
    /// The `Warm` request to answer once it is ready; `None` once answered.
    starting: Option<u32>,
    /// Invocation mode: the socket it connects to, until it has.
    listener: Option<UnixListener>,
    /// Invocation mode: its connection, waiting for a run.
    conn: Option<UnixStream>,
    /// Invocation mode: the FIFO a shell script sources (`SMOLVM_INVOKE_SH`), held open
    /// for writing so that the script's read blocks until its run; dropped when the
    /// program connects to the socket instead.
    sh: Option<OwnedFd>,
    /// Invocation mode: the script is blocked reading `sh`, waiting for its run.
    sh_waiting: bool,
    /// The variables it was started with (a shell run unsets those the run lacks).
    start_env: Vec<String>,
    /// How it ended, when it did before a run took it.
    status: Option<ExitStatus>,
    /// Readiness checks so far (a log line every 100, about 5 s).
    checks: u32,
}

impl Warm {
    fn ready(&self) -> bool {
        self.status.is_none()
            && match self.req.mode {
                WarmMode::Stdin => self.starting.is_none(),
                WarmMode::Invoke => self.conn.is_some() || self.sh_waiting,
            }
    }

    /// Whether a run of `req` is the one this process waits for.
    fn matches(&self, req: &ExecRequest) -> bool {
        let w = &self.req.exec;
        let cwd = |r: &ExecRequest| r.cwd.clone().unwrap_or_else(|| "/".into());
        let env = |r: &ExecRequest| {
            let mut e = r.env.clone();
            e.sort();
            e
        };
        let argv = match self.req.mode {
            WarmMode::Stdin => req.argv == w.argv,
            WarmMode::Invoke => {
                let n = (self.req.prefix as usize).clamp(1, w.argv.len().max(1));
                req.argv.len() >= n && req.argv[..n] == w.argv[..n.min(w.argv.len())]
            }
        };
        argv && req.tty.is_none()
            && w.tty.is_none()
            && req.user == w.user
            && cwd(req) == cwd(w)
            && env(req) == env(w)
    }

    /// What is waiting in its output pipes (non-blocking), for an error message.
    fn output_tail(&self) -> String {
        let mut all = Vec::new();
        for fd in &self.outs {
            let mut buf = [0u8; 4096];
            loop {
                // SAFETY: `buf` is writable for its length.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    break;
                }
                all.extend_from_slice(&buf[..n as usize]);
                if all.len() > 16 * WARM_TAIL {
                    all.drain(..all.len() - WARM_TAIL);
                }
            }
        }
        let tail = &all[all.len().saturating_sub(WARM_TAIL)..];
        String::from_utf8_lossy(tail).trim_end().to_string()
    }
}

struct OutStream {
    fd: OwnedFd,
    window: u32,
}

struct Exec {
    /// Request held while quiesced; `None` once started.
    pending: Option<ExecRequest>,
    pid: Option<i32>,
    pidfd: Option<OwnedFd>,
    /// Pipe write end, or a duplicate of the terminal master.
    stdin: Option<OwnedFd>,
    stdin_buf: VecDeque<u8>,
    stdin_eof: bool,
    stdin_uncredited: u32,
    /// Terminal master kept for resizes.
    tty: Option<OwnedFd>,
    outs: [Option<OutStream>; 2],
    status: Option<ExitStatus>,
    exited_at: Option<Instant>,
    last_output: Instant,
    /// A warm shell script still opening its run's stdio FIFOs.
    handover: Option<Handover>,
    /// A warm run's way to report its status before its process is gone.
    report: Option<Report>,
}

/// Where a warm program writes `exit N` once its run is over (its invocation connection,
/// or the shell way's `exit` FIFO), and what it has written so far.
struct Report {
    fd: OwnedFd,
    buf: Vec<u8>,
}

/// A process whose run ended with its reported status: reaped when it is gone; killed at
/// the next quiesce or resume (it said it was done), so no snapshot holds it.
struct Ending {
    pid: i32,
    pidfd: Option<OwnedFd>,
}

impl Exec {
    fn held(req: ExecRequest) -> Self {
        Exec {
            pending: Some(req),
            pid: None,
            pidfd: None,
            stdin: None,
            stdin_buf: VecDeque::new(),
            stdin_eof: false,
            stdin_uncredited: 0,
            tty: None,
            outs: [None, None],
            status: None,
            exited_at: None,
            handover: None,
            report: None,
            last_output: Instant::now(),
        }
    }

    fn running(&self) -> bool {
        self.pid.is_some() && self.status.is_none()
    }
}

/// One port-forward stream: a TCP connection to a guest port, carried as frames.
struct FwdStream {
    sock: OwnedFd,
    /// The non-blocking connect has not completed yet.
    connecting: bool,
    /// Host bytes not yet written to the socket (at most one window).
    to_guest: VecDeque<u8>,
    /// The host sent `StreamEof`: shut the write side down once `to_guest` is drained.
    host_eof: bool,
    /// The write side is shut down.
    write_shut: bool,
    /// Guest bytes the host still accepts.
    window: u32,
    /// The guest end finished sending (`StreamEof` sent).
    read_eof: bool,
    /// Host bytes written but not yet credited back.
    uncredited: u32,
}

#[derive(Clone, Copy)]
enum Token {
    Transport,
    Signals,
    Out(ExecId, usize),
    In(ExecId),
    Pid,
    Sock(StreamId),
    WarmListen,
    Handover(ExecId),
    Report(ExecId),
}

/// Serves one session on `transport` until it ends. Catches panics: whatever happens, every
/// command started in the session is killed and reaped before this returns.
pub fn run_session<T: Transport>(
    transport: T,
    system: &mut dyn System,
    config: &SessionConfig,
) -> SessionEnd {
    let mut session = match Session::new(transport, system, config) {
        Ok(s) => s,
        Err(e) => return SessionEnd::Failed(format!("cannot set up the transport: {e}")),
    };
    let end = match catch_unwind(AssertUnwindSafe(|| session.run())) {
        Ok(end) => end,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            SessionEnd::Panicked(msg)
        }
    };
    if catch_unwind(AssertUnwindSafe(|| {
        session.kill_all();
        session.drop_warm();
    }))
    .is_err()
    {
        agent_log!("cleanup after the session panicked");
    }
    end
}

struct Session<'a, T: Transport> {
    transport: T,
    fd: RawFd,
    decoder: FrameDecoder,
    out: Vec<u8>,
    out_pos: usize,
    execs: BTreeMap<ExecId, Exec>,
    streams: BTreeMap<StreamId, FwdStream>,
    quiesced: bool,
    system: &'a mut dyn System,
    config: &'a SessionConfig,
    end: Option<SessionEnd>,
    readbuf: Vec<u8>,
    pidfds_work: bool,
    warm: Option<Warm>,
    ending: Vec<Ending>,
    /// The `PATH` of the last command started that set one (a build's steps run with
    /// the Smolfile's `[env]`): read back after a cache drop with the default one.
    last_path: Option<String>,
}

impl<'a, T: Transport> Session<'a, T> {
    fn new(
        transport: T,
        system: &'a mut dyn System,
        config: &'a SessionConfig,
    ) -> io::Result<Self> {
        let fd = transport.as_raw_fd();
        sys::make_raw_if_tty(fd)?;
        sys::set_nonblocking(fd, true)?;
        Ok(Session {
            transport,
            fd,
            decoder: FrameDecoder::new(),
            out: Vec::new(),
            out_pos: 0,
            execs: BTreeMap::new(),
            streams: BTreeMap::new(),
            quiesced: false,
            system,
            config,
            end: None,
            readbuf: vec![0u8; MAX_CHUNK],
            pidfds_work: true,
            warm: None,
            ending: Vec::new(),
            last_path: None,
        })
    }

    fn send(&mut self, msg: &AgentMsg) {
        if self.out_pos > 0 && self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        if let Err(e) = encode_frame(msg, &mut self.out) {
            // Only oversized messages fail; ours are bounded, so this is an agent bug.
            agent_log!("dropping an unencodable message: {e}");
        }
    }

    fn out_pending(&self) -> usize {
        self.out.len() - self.out_pos
    }

    fn fail(&mut self, why: String) {
        if self.end.is_none() {
            self.send(&AgentMsg::Error {
                message: why.clone(),
            });
            self.end = Some(SessionEnd::Failed(why));
        }
    }

    fn run(&mut self) -> SessionEnd {
        self.send(&AgentMsg::Ready {
            version: PROTOCOL_VERSION,
        });
        loop {
            self.flush();
            if let Some(end) = self.end.clone() {
                self.final_flush();
                return end;
            }
            let (mut fds, tokens, timeout) = self.poll_set();
            let timeout_ms = match timeout {
                Some(d) => d.as_millis().min(60_000) as libc::c_int,
                None => -1,
            };
            // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()` pollfds.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return SessionEnd::Failed(format!("poll failed: {e}"));
            }
            let mut reap = !self.pidfds_work;
            for (pfd, tok) in fds.iter().zip(tokens.iter()) {
                if pfd.revents == 0 {
                    continue;
                }
                match *tok {
                    Token::Transport => self.on_transport(pfd.revents),
                    Token::Signals => reap |= self.on_signals(),
                    Token::Out(id, idx) => self.on_output(id, idx),
                    Token::In(id) => self.pump_stdin(id),
                    Token::Pid => reap = true,
                    Token::Sock(id) => self.on_sock(id),
                    Token::WarmListen => self.on_warm_connect(),
                    Token::Handover(id) => {
                        if let Some(e) = self.execs.get_mut(&id) {
                            e.handover = None;
                        }
                    }
                    Token::Report(id) => self.on_report(id),
                }
                if self.end.is_some() {
                    break;
                }
            }
            if reap {
                self.reap();
            }
            self.housekeeping();
            self.check_warm();
        }
    }

    fn poll_set(&self) -> (Vec<libc::pollfd>, Vec<Token>, Option<Duration>) {
        let mut fds = Vec::with_capacity(2 + self.execs.len() * 4);
        let mut tokens = Vec::with_capacity(fds.capacity());
        let mut add = |fd: RawFd, events: libc::c_short, tok: Token| {
            fds.push(libc::pollfd {
                fd,
                events,
                revents: 0,
            });
            tokens.push(tok);
        };
        let mut ev = 0;
        if self.out_pending() < OUT_HIGH_WATER {
            ev |= libc::POLLIN;
        }
        if self.out_pending() > 0 {
            ev |= libc::POLLOUT;
        }
        add(self.fd, ev, Token::Transport);
        if let Some(sfd) = self.config.signal_fd {
            add(sfd, libc::POLLIN, Token::Signals);
        }
        let mut timeout: Option<Duration> = None;
        let now = Instant::now();
        // While quiesced nothing but answers leaves the agent: output and stdin are held.
        let move_data = !self.quiesced && self.out_pending() < OUT_HIGH_WATER;
        for (&id, e) in &self.execs {
            if move_data {
                for (idx, o) in e.outs.iter().enumerate() {
                    // A stream without credit is left out entirely: its hang-up would
                    // otherwise wake poll in a loop.
                    if let Some(o) = o.as_ref().filter(|o| o.window > 0) {
                        add(o.fd.as_raw_fd(), libc::POLLIN, Token::Out(id, idx));
                    }
                }
                if let Some(fd) = &e.stdin {
                    if !e.stdin_buf.is_empty() {
                        add(fd.as_raw_fd(), libc::POLLOUT, Token::In(id));
                    }
                }
            }
            if let Some(h) = &e.handover {
                add(h.ack.as_raw_fd(), libc::POLLIN, Token::Handover(id));
            }
            if e.running() {
                if let Some(p) = &e.pidfd {
                    add(p.as_raw_fd(), libc::POLLIN, Token::Pid);
                }
                if let Some(r) = &e.report {
                    add(r.fd.as_raw_fd(), libc::POLLIN, Token::Report(id));
                }
            }
            if let Some(at) = e.exited_at {
                if move_data && e.outs.iter().any(|o| o.is_some()) {
                    let due = at.max(e.last_output) + self.config.exit_grace;
                    let wait = due.saturating_duration_since(now);
                    timeout = Some(timeout.map_or(wait, |t: Duration| t.min(wait)));
                }
            }
        }
        for (&id, st) in &self.streams {
            let mut ev = 0;
            if st.connecting {
                ev |= libc::POLLOUT;
            } else if move_data {
                if st.window > 0 && !st.read_eof {
                    ev |= libc::POLLIN;
                }
                if !st.to_guest.is_empty() || (st.host_eof && !st.write_shut) {
                    ev |= libc::POLLOUT;
                }
            }
            // A stream with nothing to do is left out: its hang-up would wake poll in a loop.
            if ev != 0 {
                add(st.sock.as_raw_fd(), ev, Token::Sock(id));
            }
        }
        for p in self.ending.iter().filter_map(|p| p.pidfd.as_ref()) {
            add(p.as_raw_fd(), libc::POLLIN, Token::Pid);
        }
        if let Some(w) = &self.warm {
            if w.status.is_none() {
                if let Some(p) = &w.pidfd {
                    add(p.as_raw_fd(), libc::POLLIN, Token::Pid);
                }
            }
            if let Some(l) = &w.listener {
                add(l.as_raw_fd(), libc::POLLIN, Token::WarmListen);
            }
            let tick = w.starting.is_some() && (w.req.mode == WarmMode::Stdin || w.sh.is_some());
            if tick || (w.pidfd.is_none() && w.status.is_none()) {
                timeout = Some(timeout.map_or(WARM_TICK, |t| t.min(WARM_TICK)));
            }
        }
        if !self.pidfds_work && self.execs.values().any(|e| e.running()) {
            timeout = Some(timeout.map_or(FALLBACK_TICK, |t| t.min(FALLBACK_TICK)));
        }
        (fds, tokens, timeout)
    }

    fn flush(&mut self) {
        while self.out_pending() > 0 {
            match self.transport.write(&self.out[self.out_pos..]) {
                Ok(0) => {
                    self.end.get_or_insert(SessionEnd::Closed);
                    return;
                }
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    if self.end.is_none() {
                        self.end = Some(if e.kind() == ErrorKind::BrokenPipe {
                            SessionEnd::Closed
                        } else {
                            SessionEnd::Failed(format!("write to host failed: {e}"))
                        });
                    }
                    self.out.clear();
                    self.out_pos = 0;
                    return;
                }
            }
        }
        let _ = self.transport.flush();
    }

    /// Best effort to deliver the last frames (an error report, `ShuttingDown`) before the
    /// session ends: waits at most a second for the host to take them.
    fn final_flush(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.out_pending() > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let mut pfd = libc::pollfd {
                fd: self.fd,
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as libc::c_int) };
            if n <= 0 || pfd.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                break;
            }
            let before = self.out_pending();
            self.flush();
            if self.out_pending() == before {
                break;
            }
        }
    }

    fn on_transport(&mut self, _revents: libc::c_short) {
        if self.out_pending() > 0 {
            self.flush();
        }
        // A virtio port returns at most one receive buffer (a page) per read: take a few
        // in a row before going back to poll, up to one read buffer's worth.
        let mut taken = 0;
        while taken < MAX_CHUNK {
            if self.out_pending() >= OUT_HIGH_WATER {
                break;
            }
            match self.transport.read(&mut self.readbuf) {
                Ok(0) => {
                    self.end.get_or_insert(SessionEnd::Closed);
                    return;
                }
                Ok(n) => {
                    taken += n;
                    let chunk = &self.readbuf[..n];
                    self.decoder.feed(chunk);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.end
                        .get_or_insert(SessionEnd::Failed(format!("read from host failed: {e}")));
                    return;
                }
            }
            if !self.handle_frames() {
                return;
            }
        }
    }

    /// Handles every whole frame received so far; false once the session is ending.
    fn handle_frames(&mut self) -> bool {
        loop {
            match self.decoder.next_msg::<HostMsg>() {
                Ok(Some(msg)) => {
                    self.handle(msg);
                    if self.end.is_some() {
                        return false;
                    }
                }
                Ok(None) => return true,
                Err(e) => {
                    self.fail(format!("malformed frame from host: {e}"));
                    return false;
                }
            }
        }
    }

    fn on_signals(&mut self) -> bool {
        let Some(sfd) = self.config.signal_fd else {
            return false;
        };
        let (child, shutdown) = sys::read_signals(sfd);
        if let Some(reboot) = shutdown {
            agent_log!("shutdown signal received (reboot: {reboot})");
            self.end.get_or_insert(SessionEnd::Shutdown { reboot });
        }
        child
    }

    fn handle(&mut self, msg: HostMsg) {
        match msg {
            HostMsg::Hello { version } => {
                if version != PROTOCOL_VERSION {
                    self.fail(format!(
                        "host speaks protocol version {version}, this agent speaks \
                         {PROTOCOL_VERSION}: rebuild the guest image with a matching agent"
                    ));
                } else {
                    self.send(&AgentMsg::Ready {
                        version: PROTOCOL_VERSION,
                    });
                }
            }
            HostMsg::Ping { req } => self.send(&AgentMsg::Pong { req }),
            HostMsg::Exec { id, req } => self.on_exec(id, req),
            HostMsg::Stdin { id, data } => self.on_stdin(id, data),
            HostMsg::StdinEof { id } => {
                if let Some(e) = self.execs.get_mut(&id) {
                    if !e.stdin_eof {
                        e.stdin_eof = true;
                        if e.tty.is_some() || e.pending.as_ref().is_some_and(|r| r.tty.is_some()) {
                            // A terminal has no half-close: send its EOF character (^D).
                            e.stdin_buf.push_back(4);
                        }
                    }
                    self.pump_stdin(id);
                }
            }
            HostMsg::Resize { id, size } => {
                if let Some(e) = self.execs.get_mut(&id) {
                    if let Some(req) = e.pending.as_mut() {
                        if req.tty.is_some() {
                            req.tty = Some(size);
                        }
                    } else if let Some(t) = &e.tty {
                        if let Err(err) = sys::set_winsize(t.as_raw_fd(), size) {
                            agent_log!("resize of exec {id} failed: {err}");
                        }
                    }
                }
            }
            HostMsg::Signal { id, signal } => self.on_signal(id, signal),
            HostMsg::Credit { id, stream, bytes } => {
                if let Some(e) = self.execs.get_mut(&id) {
                    if let Some(o) = e.outs[stream_index(stream)].as_mut() {
                        o.window = o.window.saturating_add(bytes);
                    }
                }
            }
            HostMsg::Quiesce { req } => {
                self.quiesced = true;
                self.end_reported();
                // A shell run's FIFOs outlive it (removing them would delay the run); a
                // snapshot without a warm process waiting does not keep them.
                if self.warm.as_ref().is_none_or(|w| w.sh.is_none()) {
                    remove_shell_fifos(self.config);
                }
                let (sync, drop_caches) = self.system.quiesce();
                if drop_caches == Applied::Applied {
                    self.preload_warm_files();
                    self.preload_command_dirs();
                }
                let running_execs = self.execs.values().filter(|e| e.running()).count() as u32;
                self.send(&AgentMsg::Quiesced {
                    req,
                    report: QuiesceReport {
                        sync,
                        drop_caches,
                        running_execs,
                    },
                });
            }
            HostMsg::Unquiesce { req } => {
                self.send(&AgentMsg::Unquiesced { req });
                self.release();
            }
            HostMsg::Resume { req, now, entropy } => {
                if entropy.len() > MAX_ENTROPY {
                    self.fail(format!(
                        "resume carries {} bytes of entropy, the limit is {MAX_ENTROPY}",
                        entropy.len()
                    ));
                    return;
                }
                // Clock and RNG first, so nothing started afterwards sees stale state.
                let clock = self.system.set_clock(now);
                let entropy = self.system.add_entropy(&entropy);
                // Execs of the previous host have nobody to talk to any more.
                let dropped_execs = self.kill_all();
                self.quiesced = false;
                self.send(&AgentMsg::Resumed {
                    req,
                    report: ResumeReport {
                        clock,
                        entropy,
                        dropped_execs,
                    },
                });
                self.send(&AgentMsg::Ready {
                    version: PROTOCOL_VERSION,
                });
                // The host sends its first command right behind `Resume`: answer before
                // starting it, so the host learns when the resume itself was done.
                self.flush();
            }
            HostMsg::Shutdown { req, reboot } => {
                self.send(&AgentMsg::ShuttingDown { req });
                self.end = Some(SessionEnd::Shutdown { reboot });
            }
            HostMsg::Mount { req, shares } => {
                let error = self.system.mount_shares(&shares).err();
                self.send(&AgentMsg::Mounted { req, error });
            }
            HostMsg::Unmount { req } => {
                let error = self.system.unmount_shares().err();
                self.send(&AgentMsg::Unmounted { req, error });
            }
            HostMsg::Warm { req, warm } => self.on_warm(req, warm),
            HostMsg::NetUp { req, config } => {
                let error = self.system.net_up(&config).err();
                self.send(&AgentMsg::NetReady { req, error });
            }
            HostMsg::NetDown { req } => {
                let error = self.system.net_down().err();
                self.send(&AgentMsg::NetDown { req, error });
            }
            HostMsg::Connect { id, port } => self.on_connect(id, port),
            HostMsg::StreamData { id, data } => {
                let Some(st) = self.streams.get_mut(&id) else {
                    // Closed on this side already; the host learns it from `StreamClosed`.
                    return;
                };
                if st.host_eof || st.to_guest.len() + data.len() > STREAM_WINDOW as usize {
                    self.fail(format!(
                        "stream {id}: data beyond its {STREAM_WINDOW}-byte window or after its end"
                    ));
                    return;
                }
                st.to_guest.extend(data);
                self.on_sock(id);
            }
            HostMsg::StreamEof { id } => {
                if let Some(st) = self.streams.get_mut(&id) {
                    st.host_eof = true;
                    self.on_sock(id);
                }
            }
            HostMsg::StreamCredit { id, bytes } => {
                if let Some(st) = self.streams.get_mut(&id) {
                    st.window = st.window.saturating_add(bytes).min(STREAM_WINDOW);
                }
            }
            HostMsg::StreamClose { id } => {
                if self.streams.remove(&id).is_some() {
                    self.send(&AgentMsg::StreamClosed { id, error: None });
                }
            }
        }
    }

    fn on_connect(&mut self, id: StreamId, port: u16) {
        let refuse = |s: &mut Self, error: String| s.send(&AgentMsg::ConnectFailed { id, error });
        if self.streams.contains_key(&id) {
            return refuse(
                self,
                format!("stream id {id} is still in use: pick a fresh id"),
            );
        }
        if self.streams.len() >= self.config.max_streams {
            return refuse(
                self,
                format!("{} port streams are already open", self.streams.len()),
            );
        }
        match sys::tcp_connect_loopback(port) {
            Ok((sock, connecting)) => {
                self.streams.insert(
                    id,
                    FwdStream {
                        sock,
                        connecting,
                        to_guest: VecDeque::new(),
                        host_eof: false,
                        write_shut: false,
                        window: STREAM_WINDOW,
                        read_eof: false,
                        uncredited: 0,
                    },
                );
                if !connecting {
                    self.send(&AgentMsg::Connected { id });
                }
            }
            Err(e) => refuse(self, format!("cannot connect to guest port {port}: {e}")),
        }
    }

    /// Moves what can move on stream `id` without blocking, and ends it when both directions
    /// are finished or its socket failed.
    fn on_sock(&mut self, id: StreamId) {
        let Some(st) = self.streams.get_mut(&id) else {
            return;
        };
        if st.connecting {
            match sys::socket_error(st.sock.as_raw_fd()) {
                Ok(None) => {
                    st.connecting = false;
                    self.send(&AgentMsg::Connected { id });
                }
                Ok(Some(e)) | Err(e) => {
                    self.streams.remove(&id);
                    self.send(&AgentMsg::ConnectFailed {
                        id,
                        error: format!("cannot connect to the guest port: {e}"),
                    });
                }
            }
            return;
        }
        if self.quiesced {
            return;
        }
        let fd = st.sock.as_raw_fd();
        let mut failed: Option<String> = None;
        // Host to guest.
        let (written, err) = write_queued(&mut st.to_guest, |front| {
            // SAFETY: `front` is a valid readable slice; MSG_NOSIGNAL turns a closed peer
            // into EPIPE instead of a signal.
            unsafe { libc::send(fd, front.as_ptr().cast(), front.len(), libc::MSG_NOSIGNAL) }
        });
        st.uncredited += written;
        if let Some(err) = err {
            failed = Some(format!("write to the guest socket failed: {err}"));
        }
        if failed.is_none() && st.to_guest.is_empty() && st.host_eof && !st.write_shut {
            // SAFETY: shutdown on a socket we own reads no memory.
            unsafe { libc::shutdown(fd, libc::SHUT_WR) };
            st.write_shut = true;
        }
        let credit = if st.uncredited >= STREAM_WINDOW / 4
            || (st.uncredited > 0 && st.to_guest.is_empty())
        {
            std::mem::take(&mut st.uncredited)
        } else {
            0
        };
        // Guest to host: one read per wake-up, as for command output.
        let mut data = None;
        let mut eof_now = false;
        if failed.is_none() && st.window > 0 && !st.read_eof {
            let want = (st.window as usize).min(self.readbuf.len());
            // SAFETY: `readbuf` is writable for at least `want` bytes.
            let n = unsafe { libc::recv(fd, self.readbuf.as_mut_ptr().cast(), want, 0) };
            if n > 0 {
                st.window -= n as u32;
                data = Some(self.readbuf[..n as usize].to_vec());
            } else if n == 0 {
                st.read_eof = true;
                eof_now = true;
            } else {
                let err = io::Error::last_os_error();
                if !matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) {
                    failed = Some(format!("read from the guest socket failed: {err}"));
                }
            }
        }
        let done = st.read_eof && st.write_shut;
        if credit > 0 {
            self.send(&AgentMsg::StreamCredit { id, bytes: credit });
        }
        if let Some(data) = data {
            self.send(&AgentMsg::StreamData { id, data });
        } else if eof_now && failed.is_none() {
            self.send(&AgentMsg::StreamEof { id });
        }
        if failed.is_some() || done {
            self.streams.remove(&id);
            self.send(&AgentMsg::StreamClosed { id, error: failed });
        }
    }

    fn on_exec(&mut self, id: ExecId, req: ExecRequest) {
        if self.execs.contains_key(&id) {
            self.send(&AgentMsg::ExecFailed {
                id,
                error: format!("exec id {id} is still in use: pick a fresh id"),
            });
            return;
        }
        if self.execs.len() >= self.config.max_execs {
            self.send(&AgentMsg::ExecFailed {
                id,
                error: format!(
                    "{} execs are already live: wait for some to finish",
                    self.execs.len()
                ),
            });
            return;
        }
        if req.argv.is_empty() {
            self.send(&AgentMsg::ExecFailed {
                id,
                error: "empty argv: name a program to run".into(),
            });
            return;
        }
        self.execs.insert(id, Exec::held(req));
        if !self.quiesced {
            self.start(id);
        }
    }

    /// Starts a held exec: hands it the warm entrypoint when the request is the one it
    /// waits for, else spawns it.
    fn start(&mut self, id: ExecId) {
        let Some(e) = self.execs.get_mut(&id) else {
            return;
        };
        let Some(req) = e.pending.take() else {
            return;
        };
        if let Some((_, path)) = req.env.iter().find(|(k, _)| k == "PATH") {
            self.last_path = Some(path.clone());
        }
        if let Some(w) = self.take_warm(&req) {
            match adopt(&req, w, self.config) {
                Ok(sp) => return self.started(id, sp),
                Err(why) => agent_log!("warm entrypoint not used, starting afresh: {why}"),
            }
        }
        match spawn(&req, self.config) {
            Ok(sp) => self.started(id, sp),
            Err(error) => {
                self.execs.remove(&id);
                self.send(&AgentMsg::ExecFailed { id, error });
            }
        }
    }

    fn started(&mut self, id: ExecId, sp: Spawned) {
        let Some(e) = self.execs.get_mut(&id) else {
            return;
        };
        e.pid = Some(sp.pid);
        e.pidfd = sp.pidfd;
        if e.pidfd.is_none() {
            self.pidfds_work = false;
        }
        e.stdin = Some(sp.stdin);
        e.tty = sp.tty;
        e.handover = sp.handover;
        e.report = sp.report.map(|fd| Report {
            fd,
            buf: Vec::with_capacity(invoke::EXIT_REPORT_MAX),
        });
        e.outs = sp.outs.map(|o| {
            o.map(|fd| OutStream {
                fd,
                window: INITIAL_WINDOW,
            })
        });
        e.last_output = Instant::now();
        self.send(&AgentMsg::Started {
            id,
            pid: sp.pid as u32,
        });
        self.pump_stdin(id);
    }

    /// The warm entrypoint, if it is alive, ready and waits for exactly `req`; taken out
    /// of its slot (a warm process serves one run).
    fn take_warm(&mut self, req: &ExecRequest) -> Option<Warm> {
        let w = self.warm.as_mut()?;
        if !w.ready() || !w.matches(req) {
            return None;
        }
        // It may have ended unseen (no pidfd, no SIGCHLD handled yet): then a fresh exec.
        if let Some((_, status)) = sys::try_wait(w.pid) {
            w.status = Some(status);
            w.pidfd = None;
            return None;
        }
        self.warm.take()
    }

    /// `Warm`: starts the entrypoint; `check_warm` and `on_warm_connect` answer.
    fn on_warm(&mut self, req: u32, warm: WarmRequest) {
        self.drop_warm();
        if warm.exec.argv.is_empty() || warm.exec.tty.is_some() {
            let why = "a warm entrypoint needs a command and runs on pipes, not a terminal";
            self.send(&AgentMsg::WarmReady {
                req,
                state: WarmState::Failed(why.into()),
            });
            return;
        }
        let mut exec = warm.exec.clone();
        let mut listener = None;
        let mut sh = None;
        let creds = exec
            .user
            .as_ref()
            .and_then(|u| sys::resolve_user(u, &self.config.etc_dir).ok());
        let owner = creds.as_ref().map(|c| (c.uid, c.gid));
        if warm.mode == WarmMode::Invoke {
            let path = &self.config.invoke_socket;
            let bound = (|| {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let _ = std::fs::remove_file(path);
                let l = UnixListener::bind(path)?;
                l.set_nonblocking(true)?;
                Ok::<_, io::Error>(l)
            })();
            match bound {
                Ok(l) => listener = Some(l),
                Err(e) => {
                    let why = format!("cannot listen on {}: {e}", path.display());
                    self.send(&AgentMsg::WarmReady {
                        req,
                        state: WarmState::Failed(why),
                    });
                    return;
                }
            }
            exec.env.push((
                invoke::SOCKET_ENV.into(),
                path.to_string_lossy().into_owned(),
            ));
            exec.env
                .push((invoke::ARGC_ENV.into(), exec.argv.len().to_string()));
            // All the FIFOs of the shell way in are made now, at build time: made at run
            // time they cost a good part of a run on an emulating host.
            let sh_path = shell_fifo(self.config, "sh");
            match make_shell_fifos(self.config, owner)
                .and_then(|()| sys::open_fifo(&sh_path, libc::O_RDWR).map_err(|e| e.to_string()))
            {
                Ok(fd) => sh = Some(fd),
                Err(e) => {
                    let _ = std::fs::remove_file(path);
                    remove_shell_fifos(self.config);
                    self.send(&AgentMsg::WarmReady {
                        req,
                        state: WarmState::Failed(e),
                    });
                    return;
                }
            }
            exec.env.push((
                invoke::SH_ENV.into(),
                sh_path.to_string_lossy().into_owned(),
            ));
        }
        let start_env = build_env(&exec, creds.as_ref(), &inherited_env())
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        match spawn(&exec, self.config) {
            Ok(sp) => {
                let [Some(out), Some(err)] = sp.outs else {
                    unreachable!("a piped spawn has both output pipes");
                };
                if sp.pidfd.is_none() {
                    self.pidfds_work = false;
                }
                self.warm = Some(Warm {
                    req: warm,
                    pid: sp.pid,
                    pidfd: sp.pidfd,
                    stdin: sp.stdin,
                    outs: [out, err],
                    starting: Some(req),
                    listener,
                    conn: None,
                    sh,
                    sh_waiting: false,
                    start_env,
                    status: None,
                    checks: 0,
                });
                self.check_warm();
            }
            Err(error) => {
                if listener.is_some() {
                    let _ = std::fs::remove_file(&self.config.invoke_socket);
                }
                if sh.is_some() {
                    remove_shell_fifos(self.config);
                }
                self.send(&AgentMsg::WarmReady {
                    req,
                    state: WarmState::Failed(error),
                })
            }
        }
    }

    /// Answers a pending `Warm` once the process is ready or has ended; forgets a warm
    /// process that ended after it was ready (runs then start afresh).
    fn check_warm(&mut self) {
        let Some(w) = self.warm.as_mut() else {
            return;
        };
        if let Some(status) = w.status {
            if let Some(req) = w.starting.take() {
                let tail = w.output_tail();
                let how = match status {
                    ExitStatus::Code(c) => format!("exited with status {c}"),
                    ExitStatus::Signal(s) => format!("was killed by signal {s}"),
                };
                let wait = match w.req.mode {
                    WarmMode::Stdin => "blocked reading its stdin",
                    WarmMode::Invoke => "asked for its invocation",
                };
                let mut why = format!("the warm entrypoint {how} before it {wait}");
                if !tail.is_empty() {
                    why.push_str(&format!("; its output: {tail}"));
                }
                self.send(&AgentMsg::WarmReady {
                    req,
                    state: WarmState::Failed(why),
                });
            } else {
                agent_log!("the warm entrypoint ended ({status:?}); runs start afresh");
            }
            self.drop_warm();
            return;
        }
        let Some(req) = w.starting else {
            return;
        };
        if w.req.mode == WarmMode::Invoke {
            // A shell script waits in `. "$SMOLVM_INVOKE_SH"`, reading the FIFO.
            if w.sh.is_some() && sys::blocked_reading_fifo(w.pid, &shell_fifo(self.config, "sh")) {
                w.sh_waiting = true;
                w.starting = None;
                w.listener = None;
                let _ = std::fs::remove_file(&self.config.invoke_socket);
                let pid = w.pid as u32;
                self.send(&AgentMsg::WarmReady {
                    req,
                    state: WarmState::Ready { pid },
                });
            }
            return;
        }
        w.checks += 1;
        if w.checks % 100 == 0 {
            let what = sys::describe_wait(w.pid, w.stdin.as_raw_fd());
            agent_log!(
                "warm entrypoint {} not waiting for its stdin yet: {what}",
                w.pid
            );
        }
        if sys::session_blocked_on_pipe(w.pid, w.stdin.as_raw_fd()) {
            w.starting = None;
            let pid = w.pid as u32;
            self.send(&AgentMsg::WarmReady {
                req,
                state: WarmState::Ready { pid },
            });
        }
    }

    /// A connection on the invocation socket: kept if it comes from the warm command's
    /// session and asks correctly, which makes the warm entrypoint ready.
    fn on_warm_connect(&mut self) {
        let Some(w) = self.warm.as_mut() else {
            return;
        };
        let Some(listener) = &w.listener else {
            return;
        };
        let Ok((conn, _)) = listener.accept() else {
            return;
        };
        let from_warm = sys::peer_pid(conn.as_raw_fd())
            .and_then(sys::getsid)
            .is_ok_and(|sid| sid == w.pid);
        if !from_warm {
            agent_log!("invocation socket: refused a connection from outside the warm command");
            return;
        }
        let mut got = [0u8; invoke::REQUEST.len()];
        let asked = conn.set_nonblocking(false).is_ok()
            && conn.set_read_timeout(Some(Duration::from_secs(5))).is_ok()
            && (&conn).read_exact(&mut got).is_ok()
            && &got == invoke::REQUEST;
        if !asked {
            agent_log!("invocation socket: a connection did not send the request");
            return;
        }
        w.conn = Some(conn);
        w.listener = None;
        let _ = std::fs::remove_file(&self.config.invoke_socket);
        if w.sh.take().is_some() {
            remove_shell_fifos(self.config);
        }
        if let Some(req) = w.starting.take() {
            let pid = w.pid as u32;
            self.send(&AgentMsg::WarmReady {
                req,
                state: WarmState::Ready { pid },
            });
        }
    }

    /// Reads back into the page cache what the waiting warm process has mapped (its
    /// executable, libraries, other mapped files), after the snapshot's cache drop. A run
    /// then touches code the start-up did not (a shell's builtins, its exit path, an
    /// interpreter's modules) from memory instead of the disk; on an emulating host a read
    /// from the disk in the middle of a run is among its slowest steps. Bounded by what the
    /// process maps, and read once, at build time.
    fn preload_warm_files(&self) {
        let Some(w) = self.warm.as_ref().filter(|w| w.status.is_none()) else {
            return;
        };
        let mut ranges: Vec<(String, u64, u64)> = sys::session_members(w.pid)
            .into_iter()
            .flat_map(sys::file_mappings)
            .collect();
        ranges.sort();
        ranges.dedup();
        let mut buf = vec![0u8; 128 * 1024];
        let bytes: u64 = ranges
            .iter()
            .map(|(path, offset, len)| sys::read_through(path, *offset, *len, &mut buf))
            .sum();
        agent_log!(
            "kept {} KiB of the warm process's mapped files in the page cache",
            bytes / 1024
        );
    }

    /// Reads back the directories command names are looked up in: the default `PATH`,
    /// the last command's and the warm process's. After the snapshot's cache drop, a run's
    /// first `./app cmd` would otherwise read each directory before `cmd` from the disk to
    /// find it missing there (on an emulating host, about a sixth of a short run). Small:
    /// the directories' blocks and inodes, read once, at build time.
    fn preload_command_dirs(&self) {
        let warm_path = self.warm.as_ref().and_then(|w| {
            w.req
                .exec
                .env
                .iter()
                .find(|(k, _)| k == "PATH")
                .map(|(_, v)| v.as_str())
        });
        let mut dirs: Vec<&str> = Vec::new();
        for path in [Some(DEFAULT_PATH), self.last_path.as_deref(), warm_path]
            .into_iter()
            .flatten()
        {
            for d in path.split(':').filter(|d| d.starts_with('/')) {
                if !dirs.contains(&d) {
                    dirs.push(d);
                }
            }
        }
        let (mut read, mut entries) = (0, 0);
        for d in dirs.iter().take(MAX_PRELOAD_DIRS) {
            if let Ok(rd) = std::fs::read_dir(d) {
                read += 1;
                entries += rd.take(MAX_PRELOAD_ENTRIES).count();
            }
        }
        agent_log!("kept {read} command directories ({entries} entries) in the cache");
    }

    /// Kills and forgets the warm entrypoint, if any.
    fn drop_warm(&mut self) {
        if let Some(w) = self.warm.take() {
            if w.listener.is_some() {
                let _ = std::fs::remove_file(&self.config.invoke_socket);
            }
            if w.sh.is_some() {
                remove_shell_fifos(self.config);
            }
            if w.status.is_none() {
                let _ = sys::kill(-w.pid, libc::SIGKILL);
                let _ = sys::kill(w.pid, libc::SIGKILL);
                sys::wait_blocking(w.pid);
            }
        }
    }

    fn release(&mut self) {
        self.quiesced = false;
        let held: Vec<ExecId> = self
            .execs
            .iter()
            .filter(|(_, e)| e.pending.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in held {
            self.start(id);
        }
    }

    fn on_stdin(&mut self, id: ExecId, data: Vec<u8>) {
        let Some(e) = self.execs.get_mut(&id) else {
            return; // Raced with the exit; the host forgets the exec on `Exited`.
        };
        if e.stdin_buf.len() + data.len() > INITIAL_WINDOW as usize {
            let why = format!(
                "host sent stdin for exec {id} beyond its credit window of {INITIAL_WINDOW} bytes"
            );
            self.fail(why);
            return;
        }
        let closed = e.pending.is_none() && e.stdin.is_none();
        if closed || e.stdin_eof {
            // Nobody will read it: give the credit straight back.
            e.stdin_uncredited += data.len() as u32;
        } else {
            e.stdin_buf.extend(data);
        }
        self.pump_stdin(id);
    }

    fn on_signal(&mut self, id: ExecId, signal: i32) {
        let Some(e) = self.execs.get(&id) else {
            return;
        };
        if e.pending.is_some() {
            // Killed before it ever ran.
            self.execs.remove(&id);
            self.send(&AgentMsg::Exited {
                id,
                status: ExitStatus::Signal(signal),
            });
            return;
        }
        if let (Some(pid), true) = (e.pid, e.running()) {
            if let Err(err) = sys::kill(pid, signal) {
                agent_log!("signal {signal} to exec {id} failed: {err}");
            }
        }
    }

    /// Writes buffered stdin to the command; closes the pipe after EOF once drained.
    fn pump_stdin(&mut self, id: ExecId) {
        let Some(e) = self.execs.get_mut(&id) else {
            return;
        };
        if self.quiesced || e.pending.is_some() {
            return;
        }
        if let Some(fd) = e.stdin.as_ref().map(|f| f.as_raw_fd()) {
            let (written, err) = write_queued(&mut e.stdin_buf, |front| {
                // SAFETY: `front` is a valid readable slice of the given length.
                unsafe { libc::write(fd, front.as_ptr().cast(), front.len()) }
            });
            e.stdin_uncredited += written;
            if err.is_some() {
                // The command closed its stdin (EPIPE): discard what is left.
                e.stdin_uncredited += e.stdin_buf.len() as u32;
                e.stdin_buf.clear();
                e.stdin = None;
            }
        }
        if e.stdin_buf.is_empty() && e.stdin_eof && e.tty.is_none() {
            e.stdin = None;
        }
        if e.stdin.is_none() && !e.stdin_buf.is_empty() {
            e.stdin_uncredited += e.stdin_buf.len() as u32;
            e.stdin_buf.clear();
        }
        if e.stdin_uncredited >= STDIN_CREDIT_BATCH
            || (e.stdin_uncredited > 0 && e.stdin_buf.is_empty())
        {
            let bytes = std::mem::take(&mut e.stdin_uncredited);
            self.send(&AgentMsg::StdinCredit { id, bytes });
        }
    }

    fn on_output(&mut self, id: ExecId, idx: usize) {
        let Some(e) = self.execs.get_mut(&id) else {
            return;
        };
        let Some(o) = e.outs[idx].as_mut() else {
            return;
        };
        let want = (o.window as usize).min(self.readbuf.len());
        if want == 0 {
            return;
        }
        // SAFETY: `readbuf` is writable for at least `want` bytes.
        let n = unsafe { libc::read(o.fd.as_raw_fd(), self.readbuf.as_mut_ptr().cast(), want) };
        if n > 0 {
            let n = n as usize;
            o.window -= n as u32;
            e.last_output = Instant::now();
            let data = self.readbuf[..n].to_vec();
            let stream = if idx == 0 {
                Stream::Stdout
            } else {
                Stream::Stderr
            };
            self.send(&AgentMsg::Output { id, stream, data });
            return;
        }
        if n < 0 {
            let err = io::Error::last_os_error();
            if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) {
                return;
            }
            // EIO from a terminal master means every slave is closed: end of output.
        }
        e.outs[idx] = None;
    }

    /// A warm run's report: `exit N` ends the run with status N now; its process, done
    /// with the run's stdio, goes on ending by itself. Anything else is ignored and the run
    /// ends when the process does, as without a report.
    fn on_report(&mut self, id: ExecId) {
        let Some(e) = self.execs.get_mut(&id) else {
            return;
        };
        let Some(r) = e.report.as_mut() else {
            return;
        };
        let mut chunk = [0u8; invoke::EXIT_REPORT_MAX + 1];
        let room = chunk.len() - r.buf.len();
        // SAFETY: `chunk` is writable for `room` <= its length bytes.
        let n = unsafe { libc::read(r.fd.as_raw_fd(), chunk.as_mut_ptr().cast(), room) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if !matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) {
                e.report = None;
            }
            return;
        }
        if n == 0 {
            if !r.buf.is_empty() {
                agent_log!("exec {id}: an exit report ended unfinished; waiting for the process");
            }
            e.report = None;
            return;
        }
        r.buf.extend_from_slice(&chunk[..n as usize]);
        match invoke::parse_exit_report(&r.buf) {
            Ok(None) => {}
            Ok(Some(code)) => {
                e.status = Some(ExitStatus::Code(code as i32));
                e.exited_at = Some(Instant::now());
                e.handover = None;
                e.report = None;
                if let Some(pid) = e.pid {
                    self.ending.push(Ending {
                        pid,
                        pidfd: e.pidfd.take(),
                    });
                }
            }
            Err(why) => {
                agent_log!("exec {id}: {why}; waiting for the process");
                e.report = None;
            }
        }
    }

    /// Kills and reaps the processes that reported their run's end and are still there.
    fn end_reported(&mut self) {
        for p in self.ending.drain(..) {
            let _ = sys::kill(p.pid, libc::SIGKILL);
            sys::wait_blocking(p.pid);
        }
    }

    fn reap(&mut self) {
        self.ending.retain(|p| sys::try_wait(p.pid).is_none());
        if let Some(w) = self.warm.as_mut().filter(|w| w.status.is_none()) {
            if let Some((_, status)) = sys::try_wait(w.pid) {
                w.status = Some(status);
                w.pidfd = None;
            }
        }
        if self.config.reap_all {
            while let Some((pid, status)) = sys::try_wait(-1) {
                self.ending.retain(|p| p.pid != pid);
                if let Some(w) = self.warm.as_mut().filter(|w| w.pid == pid) {
                    w.status = Some(status);
                    w.pidfd = None;
                    continue;
                }
                if let Some(e) = self
                    .execs
                    .values_mut()
                    .find(|e| e.pid == Some(pid) && e.status.is_none())
                {
                    e.status = Some(status);
                    e.exited_at = Some(Instant::now());
                    e.pidfd = None;
                    e.handover = None;
                    e.report = None;
                }
            }
        } else {
            for e in self.execs.values_mut().filter(|e| e.running()) {
                if let Some((_, status)) = e.pid.and_then(sys::try_wait) {
                    e.status = Some(status);
                    e.exited_at = Some(Instant::now());
                    e.pidfd = None;
                    e.handover = None;
                    e.report = None;
                }
            }
        }
    }

    /// Sends `Exited` for finished commands, gives up on output held open by background
    /// processes after the grace period.
    fn housekeeping(&mut self) {
        if self.quiesced {
            return;
        }
        let now = Instant::now();
        let mut done = Vec::new();
        for (&id, e) in self.execs.iter_mut() {
            let Some(status) = e.status else {
                continue;
            };
            if let Some(at) = e.exited_at {
                let idle = now >= at.max(e.last_output) + self.config.exit_grace;
                let blocked = e.outs.iter().flatten().any(|o| o.window == 0);
                if idle && !blocked && self.out.len() - self.out_pos < OUT_HIGH_WATER {
                    e.outs = [None, None];
                }
            }
            if e.outs.iter().all(|o| o.is_none()) {
                done.push((id, status));
            }
        }
        for (id, status) in done {
            self.execs.remove(&id);
            self.send(&AgentMsg::Exited { id, status });
        }
    }

    /// Kills and reaps every command of this session; returns how many there were.
    fn kill_all(&mut self) -> u32 {
        let count = self.execs.len() as u32;
        for e in self.execs.values().filter(|e| e.running()) {
            if let Some(pid) = e.pid {
                let _ = sys::kill(-pid, libc::SIGKILL);
                let _ = sys::kill(pid, libc::SIGKILL);
            }
        }
        for e in self.execs.values().filter(|e| e.running()) {
            if let Some(pid) = e.pid {
                sys::wait_blocking(pid);
            }
        }
        self.execs.clear();
        self.end_reported();
        // The previous host's connections are gone with it.
        self.streams.clear();
        count
    }
}

fn stream_index(s: Stream) -> usize {
    match s {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

struct Spawned {
    pid: i32,
    pidfd: Option<OwnedFd>,
    stdin: OwnedFd,
    tty: Option<OwnedFd>,
    outs: [Option<OwnedFd>; 2],
    handover: Option<Handover>,
    /// Where a warm run reports its end (`Report`).
    report: Option<OwnedFd>,
}

/// A warm shell script's run while the script opens its stdio FIFOs. Until it says it has
/// (by opening and closing `ack`), the agent keeps the stdin FIFO open for writing as well:
/// a run whose stdin ends before the script opened it would otherwise lose what was
/// written, or leave the script's open blocked for good.
struct Handover {
    _keep: OwnedFd,
    ack: OwnedFd,
}

/// The FIFOs of the shell way in sit beside the invocation socket: `invoke.sh`, which the
/// script sources, and `invoke.stdin`, `.stdout`, `.stderr`, `.ack` and `.exit` (the
/// `EXIT` trap's report) for its run.
const SHELL_FIFOS: [&str; 6] = ["sh", "stdin", "stdout", "stderr", "ack", "exit"];

fn shell_fifo(config: &SessionConfig, ext: &str) -> PathBuf {
    config.invoke_socket.with_extension(ext)
}

/// Makes the FIFOs of the shell way in, owned by the warm command's user.
fn make_shell_fifos(config: &SessionConfig, owner: Option<(u32, u32)>) -> Result<(), String> {
    for ext in SHELL_FIFOS {
        let path = shell_fifo(config, ext);
        if let Err(e) = sys::make_fifo(&path, owner) {
            remove_shell_fifos(config);
            return Err(format!("{}: {e}", path.display()));
        }
    }
    Ok(())
}

fn remove_shell_fifos(config: &SessionConfig) {
    for ext in SHELL_FIFOS {
        let _ = std::fs::remove_file(shell_fifo(config, ext));
    }
}

/// Variables of the agent's own environment (set by the VMM on the kernel command
/// line) that every command inherits. `GLIBC_TUNABLES` carries host-specific CPU
/// feature masks: on a host whose guest kernel cannot save AVX state, glibc in
/// every process must leave AVX alone, not only in the agent.
const INHERITED_VARS: &[&str] = &["GLIBC_TUNABLES"];

/// Writes the front of `queue` with `write` (a `write(2)`-like call: bytes written or -1 with
/// errno set) until the queue is empty or the descriptor would block, retrying on EINTR.
/// Returns the bytes written and the error that stopped it, if any (not EAGAIN).
fn write_queued(
    queue: &mut VecDeque<u8>,
    mut write: impl FnMut(&[u8]) -> isize,
) -> (u32, Option<io::Error>) {
    let mut written = 0u32;
    while !queue.is_empty() {
        let (front, _) = queue.as_slices();
        let n = write(front);
        if n > 0 {
            queue.drain(..n as usize);
            written += n as u32;
            continue;
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            ErrorKind::Interrupted => continue,
            ErrorKind::WouldBlock => break,
            _ => return (written, Some(err)),
        }
    }
    (written, None)
}

fn inherited_env() -> Vec<(String, String)> {
    INHERITED_VARS
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect()
}

/// The `PATH` of a command whose request sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Base environment: predictable rather than inherited from whatever started the
/// agent, apart from `inherited` (see [`INHERITED_VARS`]); the request wins.
fn build_env(
    req: &ExecRequest,
    creds: Option<&Creds>,
    inherited: &[(String, String)],
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![("PATH".into(), DEFAULT_PATH.into())];
    env.extend(inherited.iter().cloned());
    let home = creds.and_then(|c| c.home.clone()).unwrap_or_else(|| {
        if creds.is_some() {
            "/".into()
        } else {
            "/root".into()
        }
    });
    env.push(("HOME".into(), home));
    if let Some(name) = creds.and_then(|c| c.name.clone()) {
        env.push(("USER".into(), name.clone()));
        env.push(("LOGNAME".into(), name));
    }
    if req.tty.is_some() {
        env.push(("TERM".into(), "xterm-256color".into()));
    }
    for (k, v) in &req.env {
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }
    env
}

/// The environment a run of `req` gets, as a fresh spawn would give it (the user's `HOME`,
/// `USER` and `LOGNAME` included): what a warm process taking the run over installs.
fn run_env(req: &ExecRequest, config: &SessionConfig) -> Vec<(String, String)> {
    let creds = req
        .user
        .as_ref()
        .and_then(|u| sys::resolve_user(u, &config.etc_dir).ok());
    build_env(req, creds.as_ref(), &inherited_env())
}

fn spawn(req: &ExecRequest, config: &SessionConfig) -> Result<Spawned, String> {
    let argv0 = &req.argv[0];
    let creds = match &req.user {
        Some(u) => Some(sys::resolve_user(u, &config.etc_dir).map_err(|e| e.to_string())?),
        None => None,
    };
    let cwd = req.cwd.as_deref().unwrap_or("/");
    let no_cwd =
        || format!("cannot start {argv0:?}: working directory {cwd:?} does not exist in the guest");
    if req.tty.is_none() && creds.is_none() {
        return spawn_piped(req, cwd, &build_env(req, None, &inherited_env())).map_err(|e| {
            // The child's chdir and exec both fail with ENOENT: name the directory when it
            // is the one missing (checked only on this error path, not before every start).
            if e.kind() == ErrorKind::NotFound && !std::path::Path::new(cwd).is_dir() {
                no_cwd()
            } else {
                format!("cannot start {argv0:?}: {e}")
            }
        });
    }
    if !std::path::Path::new(cwd).is_dir() {
        return Err(no_cwd());
    }
    let mut cmd = Command::new(argv0);
    cmd.args(&req.argv[1..]);
    cmd.env_clear();
    cmd.envs(build_env(req, creds.as_ref(), &inherited_env()));
    cmd.current_dir(cwd);
    let err = |e: sys::SysError| format!("cannot start {argv0:?}: {e}");

    let (stdin, tty, outs);
    if let Some(size) = req.tty {
        let (master, slave) = sys::open_pty(size).map_err(err)?;
        let s_in = sys::dup(slave.as_raw_fd()).map_err(err)?;
        let s_out = sys::dup(slave.as_raw_fd()).map_err(err)?;
        cmd.stdin(Stdio::from(s_in));
        cmd.stdout(Stdio::from(s_out));
        cmd.stderr(Stdio::from(slave));
        stdin = sys::dup(master.as_raw_fd()).map_err(err)?;
        tty = Some(sys::dup(master.as_raw_fd()).map_err(err)?);
        outs = [Some(master), None];
    } else {
        let (in_r, in_w) = sys::pipe().map_err(err)?;
        let (out_r, out_w) = sys::pipe().map_err(err)?;
        let (err_r, err_w) = sys::pipe().map_err(err)?;
        cmd.stdin(Stdio::from(in_r));
        cmd.stdout(Stdio::from(out_w));
        cmd.stderr(Stdio::from(err_w));
        stdin = in_w;
        tty = None;
        outs = [Some(out_r), Some(err_r)];
    }
    for fd in outs
        .iter()
        .flatten()
        .map(|f| f.as_raw_fd())
        .chain([stdin.as_raw_fd()])
    {
        sys::set_nonblocking(fd, true).map_err(|e| format!("cannot start {argv0:?}: {e}"))?;
    }

    let is_tty = req.tty.is_some();
    let ids = creds.map(|c| (c.uid, c.gid, c.groups));
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls on data prepared before the fork (no allocation).
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if is_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some((uid, gid, groups)) = &ids {
                if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(*gid) < 0
                    || libc::setuid(*uid) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {argv0:?}: {e}"))?;
    // Drop the child's ends of the pipes / the slave held by `cmd`.
    drop(cmd);
    let pid = child.id() as i32;
    // The exit status is collected with waitpid, not through `child`.
    drop(child);
    Ok(Spawned {
        pid,
        pidfd: sys::pidfd_open(pid),
        stdin,
        tty,
        outs,
        handover: None,
        report: None,
    })
}

/// The common case (pipes, no terminal, no other user) on the short path: the pipes made
/// with one system call each plus one to make the agent's end non-blocking, the command
/// started by [`sys::spawn_piped`] (vfork-style, no copy of the agent's address space).
fn spawn_piped(req: &ExecRequest, cwd: &str, env: &[(String, String)]) -> io::Result<Spawned> {
    let os = |e: sys::SysError| match e {
        sys::SysError::Os { source, .. } => source,
        other => io::Error::other(other.to_string()),
    };
    let (in_r, in_w) = sys::pipe().map_err(os)?;
    let (out_r, out_w) = sys::pipe().map_err(os)?;
    let (err_r, err_w) = sys::pipe().map_err(os)?;
    for fd in [&in_w, &out_r, &err_r] {
        // A pipe end is O_RDONLY or O_WRONLY and nothing else: F_SETFL without F_GETFL.
        // SAFETY: F_SETFL on a descriptor we own reads no memory.
        sys::cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) })?;
    }
    // Without a console, PID 1 may have no descriptors 0-2 and a pipe can land there;
    // the child's dup2 onto 0-2 needs its sources elsewhere.
    let high = |fd: OwnedFd| -> io::Result<OwnedFd> {
        if fd.as_raw_fd() < 3 {
            sys::dup(fd.as_raw_fd()).map_err(os)
        } else {
            Ok(fd)
        }
    };
    let (in_r, out_w, err_w) = (high(in_r)?, high(out_w)?, high(err_w)?);
    let plan = sys::SpawnPlan::new(
        &req.argv,
        env,
        cwd,
        [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()],
    )?;
    let pid = sys::spawn_piped(&plan)?;
    // The child's ends (in_r, out_w, err_w) close here.
    Ok(Spawned {
        pid,
        pidfd: sys::pidfd_open(pid),
        stdin: in_w,
        tty: None,
        outs: [Some(out_r), Some(err_r)],
        handover: None,
        report: None,
    })
}

/// Hands a run to the warm entrypoint `w`: in stdin mode its own pipes; in invocation mode
/// fresh pipes sent over its connection, or FIFOs named to a shell script, with the run's
/// argv, environment and directory. On error the process is killed and the caller starts
/// the run afresh.
fn adopt(req: &ExecRequest, w: Warm, config: &SessionConfig) -> Result<Spawned, String> {
    if w.req.mode == WarmMode::Stdin {
        let [out, err] = w.outs;
        return Ok(Spawned {
            pid: w.pid,
            pidfd: w.pidfd,
            stdin: w.stdin,
            tty: None,
            outs: [Some(out), Some(err)],
            handover: None,
            report: None,
        });
    }
    let pid = w.pid;
    let kill = |why: String| {
        let _ = sys::kill(-pid, libc::SIGKILL);
        let _ = sys::kill(pid, libc::SIGKILL);
        sys::wait_blocking(pid);
        why
    };
    let inv = Invocation {
        argv: req.argv.clone(),
        env: run_env(req, config),
        cwd: req.cwd.clone().unwrap_or_else(|| "/".into()),
        reseed: true,
    };
    let os = |e: sys::SysError| e.to_string();
    if w.conn.is_none() && w.sh_waiting {
        return adopt_shell(&inv, w, config).map_err(&kill);
    }
    let Some(conn) = w.conn else {
        return Err(kill("no invocation connection".into()));
    };
    let pipes = (|| {
        let (in_r, in_w) = sys::pipe().map_err(os)?;
        let (out_r, out_w) = sys::pipe().map_err(os)?;
        let (err_r, err_w) = sys::pipe().map_err(os)?;
        for fd in [&in_w, &out_r, &err_r] {
            sys::set_nonblocking(fd.as_raw_fd(), true).map_err(|e| e.to_string())?;
        }
        Ok::<_, String>(([in_r, out_w, err_w], [in_w, out_r, err_r]))
    })();
    let (theirs, [in_w, out_r, err_r]) = pipes.map_err(&kill)?;
    let fds = theirs.each_ref().map(|f| f.as_raw_fd());
    invoke::send(&conn, &inv, fds).map_err(|e| kill(e.to_string()))?;
    // Its build-time pipes (`w.stdin`, `w.outs`) and our copies of the new ends close
    // here: it reads and writes only what it was sent.
    drop(theirs);
    // The connection stays open for the program's exit report; it is read without blocking.
    let report = conn
        .set_nonblocking(true)
        .ok()
        .map(|()| OwnedFd::from(conn));
    Ok(Spawned {
        pid: w.pid,
        pidfd: w.pidfd,
        stdin: in_w,
        tty: None,
        outs: [Some(out_r), Some(err_r)],
        handover: None,
        report,
    })
}

/// Opens the agent's ends of a shell run's FIFOs (made with the warm process): the
/// hand-over, the run's stdin writer, stdout and stderr readers, and the exit report's
/// reader.
fn shell_stdio(config: &SessionConfig) -> Result<(Handover, [OwnedFd; 4]), String> {
    let [stdin, stdout, stderr, ack, exit] =
        ["stdin", "stdout", "stderr", "ack", "exit"].map(|e| shell_fifo(config, e));
    // A FIFO opens for writing without blocking only once it has a reader: each of ours is
    // opened with its reader first.
    let opened = (|| {
        let keep = sys::open_fifo(&stdin, libc::O_RDWR)?;
        let ack = sys::open_fifo(&ack, libc::O_RDONLY)?;
        let in_w = sys::open_fifo(&stdin, libc::O_WRONLY)?;
        let out_r = sys::open_fifo(&stdout, libc::O_RDONLY)?;
        let err_r = sys::open_fifo(&stderr, libc::O_RDONLY)?;
        // Before its first writer, a FIFO's reader sees neither data nor a hang-up.
        let exit_r = sys::open_fifo(&exit, libc::O_RDONLY)?;
        Ok::<_, sys::SysError>((Handover { _keep: keep, ack }, [in_w, out_r, err_r, exit_r]))
    })();
    opened.map_err(|e| e.to_string())
}

/// The shell way in: FIFOs for the run's stdio, and the commands that take them over
/// (`invoke::shell_takeover`) written into the FIFO the script is reading with `.`. The
/// script starts no process for this; it opens the FIFOs by name.
fn adopt_shell(inv: &Invocation, w: Warm, config: &SessionConfig) -> Result<Spawned, String> {
    let (handover, [in_w, out_r, err_r, exit_r]) = shell_stdio(config)?;
    let [stdin, stdout, stderr, ack, exit] =
        ["stdin", "stdout", "stderr", "ack", "exit"].map(|e| shell_fifo(config, e));
    let run_env: std::collections::HashSet<&str> =
        inv.env.iter().map(|(k, _)| k.as_str()).collect();
    let unset: Vec<&str> = w
        .start_env
        .iter()
        .map(String::as_str)
        .filter(|k| !run_env.contains(k))
        .collect();
    let lossy = |p: &PathBuf| p.to_string_lossy().into_owned();
    let (i, o, e, a) = (lossy(&stdin), lossy(&stdout), lossy(&stderr), lossy(&ack));
    let x = lossy(&exit);
    let stdio = invoke::ShellStdio {
        stdin: &i,
        stdout: &o,
        stderr: &e,
        ack: &a,
        exit: &x,
    };
    let code = invoke::shell_takeover(inv, &stdio, w.req.exec.argv.len(), &unset);
    let Some(sh) = &w.sh else {
        return Err("the script is not waiting on its FIFO".into());
    };
    sys::write_whole_fifo(sh.as_raw_fd(), code.as_bytes()).map_err(|e| e.to_string())?;
    // Closing our end ends the script's `.` after it has read everything written. The
    // FIFOs stay until the next quiesce: removing them now would delay the run.
    drop(w.sh);
    Ok(Spawned {
        pid: w.pid,
        pidfd: w.pidfd,
        stdin: in_w,
        tty: None,
        outs: [Some(out_r), Some(err_r)],
        handover: Some(handover),
        report: Some(exit_r),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
        env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The hand-over keeps a shell run's stdin alive while the script has not opened it:
    /// written and ended early, it still arrives whole, and ends once the script says so.
    #[test]
    fn a_shell_runs_early_stdin_waits_for_the_script() {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir().unwrap();
        let config = SessionConfig {
            invoke_socket: dir.path().join("invoke.sock"),
            ..SessionConfig::default()
        };
        make_shell_fifos(&config, None).unwrap();
        let (handover, [in_w, _out, _err, _exit]) = shell_stdio(&config).unwrap();
        let paths = ["stdin", "ack"].map(|e| shell_fifo(&config, e));
        std::fs::File::from(in_w).write_all(b"early").unwrap();
        // The script opens its stdin only now, as its `exec 0<…` would.
        let mut script_in = std::fs::File::from(sys::open_fifo(&paths[0], libc::O_RDONLY).unwrap());
        sys::set_nonblocking(script_in.as_raw_fd(), false).unwrap();
        let mut got = [0u8; 5];
        script_in.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"early");
        // It opens and closes the ack FIFO; the agent sees that and lets go.
        drop(
            std::fs::OpenOptions::new()
                .write(true)
                .open(&paths[1])
                .unwrap(),
        );
        let mut pfd = libc::pollfd {
            fd: handover.ack.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1);
        assert_ne!(pfd.revents & libc::POLLHUP, 0);
        drop(handover);
        let mut rest = Vec::new();
        script_in.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "stdin ends once the hand-over is dropped");
        remove_shell_fifos(&config);
        assert!(paths.iter().all(|p| !p.exists()), "the FIFOs are removed");
    }

    /// The exit report's FIFO: its reader, opened before any writer, is not woken (no
    /// hang-up) until the shell's trap opens it read-write, writes and closes it; then the
    /// report is there, then the end.
    #[test]
    fn the_exit_fifo_wakes_its_reader_only_with_a_report() {
        let dir = tempfile::tempdir().unwrap();
        let config = SessionConfig {
            invoke_socket: dir.path().join("invoke.sock"),
            ..SessionConfig::default()
        };
        make_shell_fifos(&config, None).unwrap();
        let (_handover, [_in, _out, _err, exit_r]) = shell_stdio(&config).unwrap();
        let poll = |timeout: i32| {
            let mut pfd = libc::pollfd {
                fd: exit_r.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, timeout) };
            (n, pfd.revents)
        };
        assert_eq!(poll(0), (0, 0), "woken before any report");
        // What `echo "exit 3" 1<>FIFO` does.
        let mut w = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(shell_fifo(&config, "exit"))
            .unwrap();
        std::io::Write::write_all(&mut w, invoke::exit_report(3).as_bytes()).unwrap();
        drop(w);
        let (n, revents) = poll(5000);
        assert_eq!(n, 1);
        assert_ne!(revents & libc::POLLIN, 0);
        let mut buf = [0u8; 16];
        // SAFETY: `buf` is writable for its length.
        let got = unsafe { libc::read(exit_r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        assert_eq!(
            invoke::parse_exit_report(&buf[..got as usize]).unwrap(),
            Some(3)
        );
        // SAFETY: as above.
        let end = unsafe { libc::read(exit_r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        assert_eq!(end, 0, "the writer's close ends it");
        remove_shell_fifos(&config);
    }

    /// A warm run as another user gets that user's variables, as a fresh spawn does.
    #[test]
    fn a_warm_runs_environment_is_the_users() {
        let etc = tempfile::tempdir().unwrap();
        std::fs::write(
            etc.path().join("passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        let config = SessionConfig {
            etc_dir: etc.path().to_path_buf(),
            ..SessionConfig::default()
        };
        let mut req = ExecRequest::new(["greet"]);
        req.user = Some(crate::protocol::User::Name("app".into()));
        let env = run_env(&req, &config);
        assert_eq!(lookup(&env, "HOME"), Some("/home/app"));
        assert_eq!(lookup(&env, "USER"), Some("app"));
        assert_eq!(lookup(&env, "LOGNAME"), Some("app"));
        let env = run_env(&ExecRequest::new(["greet"]), &config);
        assert_eq!(lookup(&env, "HOME"), Some("/root"));
        assert_eq!(lookup(&env, "USER"), None);
    }

    #[test]
    fn inherited_vars_reach_commands_and_the_request_wins() {
        let tunables = (
            "GLIBC_TUNABLES".to_string(),
            "glibc.cpu.hwcaps=-AVX".to_string(),
        );
        let req = ExecRequest::new(["true"]);
        let env = build_env(&req, None, std::slice::from_ref(&tunables));
        assert_eq!(
            lookup(&env, "GLIBC_TUNABLES"),
            Some("glibc.cpu.hwcaps=-AVX")
        );
        assert_eq!(lookup(&env, "HOME"), Some("/root"));

        let mut req = ExecRequest::new(["true"]);
        req.env.push(("GLIBC_TUNABLES".into(), "mine".into()));
        let env = build_env(&req, None, &[tunables]);
        assert_eq!(lookup(&env, "GLIBC_TUNABLES"), Some("mine"));
        assert_eq!(env.iter().filter(|(k, _)| k == "GLIBC_TUNABLES").count(), 1);

        let env = build_env(&ExecRequest::new(["true"]), None, &[]);
        assert_eq!(lookup(&env, "GLIBC_TUNABLES"), None);
    }
}
