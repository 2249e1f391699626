//! Host-side client of the agent protocol, for synchronous code (the VMM, tests).
//!
//! Two threads serve a connection: a reader that decodes agent frames into shared state and
//! never blocks on anything but the stream, and a writer that drains a queue of encoded
//! frames. Callers block only on condition variables (waiting for output, an exit, stdin
//! credit or an answer), so a slow consumer of one exec never stalls another: the agent
//! sends at most the credit window per stream, and credit is returned only as the
//! consumer takes the bytes.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::{Duration, Instant};

use crate::protocol::{
    frame, read_frame, AgentMsg, ExecId, ExecRequest, ExitStatus, HostMsg, ProtocolError,
    QuiesceReport, ResumeReport, Stream, WallClock, WinSize, INITIAL_WINDOW, MAX_CHUNK,
    MAX_ENTROPY, PROTOCOL_VERSION,
};

/// Errors seen by client callers.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("agent connection lost: {0}")]
    Disconnected(String),
    #[error("agent reported a protocol error: {0}")]
    Agent(String),
    #[error("agent speaks protocol version {agent}, this host speaks {host}: use matching builds")]
    Version { agent: u32, host: u32 },
    #[error("command failed to start: {0}")]
    ExecFailed(String),
    #[error("timed out after {0:?} waiting for the agent to {1}")]
    Timeout(Duration, &'static str),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("cannot encode request: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("cannot set up the agent connection: {0}")]
    Io(#[from] io::Error),
}

type Result<T> = std::result::Result<T, ClientError>;

/// Captured result of a finished command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

#[derive(Default)]
struct StreamBuf {
    data: VecDeque<u8>,
    /// Nobody will read this stream: credit bytes back as they arrive.
    discard: bool,
    /// Consumed bytes not yet credited back.
    uncredited: u32,
}

#[derive(Default)]
struct ExecSlot {
    pid: Option<u32>,
    failed: Option<String>,
    status: Option<ExitStatus>,
    streams: [StreamBuf; 2],
    stdin_credit: u32,
    /// Handles (ExecHandle, readers, stdin writers) still alive.
    refs: u32,
}

impl ExecSlot {
    fn finished(&self) -> bool {
        self.status.is_some() || self.failed.is_some()
    }
}

#[derive(Default)]
struct State {
    closed: Option<String>,
    agent_error: Option<String>,
    ready_count: u64,
    ready_version: Option<u32>,
    replies: HashMap<u32, AgentMsg>,
    execs: HashMap<ExecId, ExecSlot>,
}

struct Inner {
    state: Mutex<State>,
    cond: Condvar,
    tx: Mutex<Sender<Vec<u8>>>,
    next_id: AtomicU32,
    next_req: AtomicU32,
    timeout: Mutex<Option<Duration>>,
    shutdown_hook: Option<UnixStream>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another caller panicked; the state is still coherent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, msg: &HostMsg) -> Result<()> {
        let bytes = frame(msg)?;
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        tx.send(bytes)
            .map_err(|_| ClientError::Disconnected("the writer thread stopped".into()))
    }

    fn disconnected(&self, st: &State) -> ClientError {
        match &st.agent_error {
            Some(e) => ClientError::Agent(e.clone()),
            None => ClientError::Disconnected(st.closed.clone().unwrap_or_default()),
        }
    }

    /// Waits on the condvar until `done` yields a value, the connection closes or `timeout`.
    fn wait_for<T>(
        &self,
        timeout: Option<Duration>,
        what: &'static str,
        mut done: impl FnMut(&mut State) -> Option<T>,
    ) -> Result<T> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.lock();
        loop {
            if let Some(v) = done(&mut st) {
                return Ok(v);
            }
            if st.closed.is_some() {
                return Err(self.disconnected(&st));
            }
            st = match deadline {
                None => self.cond.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ClientError::Timeout(timeout.unwrap_or_default(), what));
                    }
                    self.cond
                        .wait_timeout(st, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    fn release(&self, id: ExecId) {
        let mut st = self.lock();
        if let Some(slot) = st.execs.get_mut(&id) {
            slot.refs = slot.refs.saturating_sub(1);
            if slot.refs == 0 {
                if slot.finished() {
                    st.execs.remove(&id);
                } else {
                    // Nobody listens any more: let the command run to completion unhindered.
                    let mut credit = Vec::new();
                    for (i, s) in slot.streams.iter_mut().enumerate() {
                        s.discard = true;
                        let pending = s.data.len() as u32 + std::mem::take(&mut s.uncredited);
                        s.data.clear();
                        if pending > 0 {
                            credit.push((i, pending));
                        }
                    }
                    drop(st);
                    for (i, bytes) in credit {
                        let _ = self.send(&HostMsg::Credit {
                            id,
                            stream: index_stream(i),
                            bytes,
                        });
                    }
                }
            }
        }
    }
}

fn index_stream(i: usize) -> Stream {
    if i == 0 {
        Stream::Stdout
    } else {
        Stream::Stderr
    }
}

fn stream_index(s: Stream) -> usize {
    match s {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

/// A connection to an agent. Cheap to share by reference across threads.
pub struct Client {
    inner: Arc<Inner>,
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(s) = &self.inner.shutdown_hook {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Client {
    /// Starts serving a connection made of a read half and a write half. Does not wait for
    /// the agent: call [`Client::handshake`] (or [`Client::resume`] after a restore).
    pub fn new<R, W>(reader: R, writer: W) -> Result<Client>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        Self::build(reader, writer, None)
    }

    /// Serves a Unix stream (socket pair, a VMM's console socket); shuts it down on drop.
    pub fn from_unix_stream(stream: UnixStream) -> Result<Client> {
        let r = stream.try_clone()?;
        let w = stream.try_clone()?;
        Self::build(r, w, Some(stream))
    }

    /// Connects to an agent listening on a Unix socket path and completes the handshake.
    pub fn connect_unix(path: &std::path::Path, timeout: Option<Duration>) -> Result<Client> {
        let c = Self::from_unix_stream(UnixStream::connect(path)?)?;
        c.set_timeout(timeout);
        c.handshake()?;
        Ok(c)
    }

    fn build<R, W>(mut reader: R, mut writer: W, hook: Option<UnixStream>) -> Result<Client>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
            tx: Mutex::new(tx),
            next_id: AtomicU32::new(1),
            next_req: AtomicU32::new(1),
            timeout: Mutex::new(None),
            shutdown_hook: hook,
        });
        // Both threads hold the state weakly, so dropping the client and its handles frees
        // it and closes the writer's queue.
        let w_inner: Weak<Inner> = Arc::downgrade(&inner);
        thread::Builder::new()
            .name("agent-writer".into())
            .spawn(move || {
                for buf in rx {
                    if let Err(e) = writer.write_all(&buf).and_then(|_| writer.flush()) {
                        if let Some(inner) = w_inner.upgrade() {
                            let mut st = inner.lock();
                            st.closed.get_or_insert(format!("write failed: {e}"));
                            inner.cond.notify_all();
                        }
                        return;
                    }
                }
            })?;
        let r_inner: Weak<Inner> = Arc::downgrade(&inner);
        thread::Builder::new()
            .name("agent-reader".into())
            .spawn(move || loop {
                let res = read_frame::<_, AgentMsg>(&mut reader);
                let Some(inner) = r_inner.upgrade() else {
                    return;
                };
                match res {
                    Ok(msg) => dispatch(&inner, msg),
                    Err(e) => {
                        let mut st = inner.lock();
                        st.closed.get_or_insert(e.to_string());
                        inner.cond.notify_all();
                        return;
                    }
                }
            })?;
        Ok(Client { inner })
    }

    /// Timeout for handshakes and control requests (not for commands); `None` waits forever.
    pub fn set_timeout(&self, timeout: Option<Duration>) {
        *self.inner.timeout.lock().unwrap_or_else(|p| p.into_inner()) = timeout;
    }

    fn timeout(&self) -> Option<Duration> {
        *self.inner.timeout.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `Hello` and waits for `Ready`; returns the agent's protocol version.
    pub fn handshake(&self) -> Result<u32> {
        let seen = self.inner.lock().ready_count;
        self.inner.send(&HostMsg::Hello {
            version: PROTOCOL_VERSION,
        })?;
        self.wait_ready_after(seen)
    }

    fn wait_ready_after(&self, seen: u64) -> Result<u32> {
        let v = self
            .inner
            .wait_for(self.timeout(), "become ready", |st| {
                (st.ready_count > seen).then_some(st.ready_version)
            })?
            .unwrap_or(0);
        if v != PROTOCOL_VERSION {
            return Err(ClientError::Version {
                agent: v,
                host: PROTOCOL_VERSION,
            });
        }
        Ok(v)
    }

    /// Waits until at least one `Ready` has arrived (without sending `Hello`): the
    /// connection closing or `timeout` passing first is an error.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        self.inner.wait_for(Some(timeout), "become ready", |st| {
            (st.ready_count > 0).then_some(())
        })
    }

    /// How many `Ready` messages arrived so far (the agent sends one per session start and
    /// resume, and one per `Hello`).
    pub fn ready_count(&self) -> u64 {
        self.inner.lock().ready_count
    }

    fn request(&self, make: impl FnOnce(u32) -> HostMsg, what: &'static str) -> Result<AgentMsg> {
        let req = self.inner.next_req.fetch_add(1, Ordering::Relaxed);
        self.inner.send(&make(req))?;
        self.inner
            .wait_for(self.timeout(), what, |st| st.replies.remove(&req))
    }

    /// Round trip to the agent.
    pub fn ping(&self) -> Result<()> {
        self.request(|req| HostMsg::Ping { req }, "answer a ping")
            .map(|_| ())
    }

    /// Asks the agent to sync, drop caches and hold new work before a snapshot.
    pub fn quiesce(&self) -> Result<QuiesceReport> {
        match self.request(|req| HostMsg::Quiesce { req }, "quiesce")? {
            AgentMsg::Quiesced { report, .. } => Ok(report),
            other => Err(ClientError::Agent(format!("unexpected answer {other:?}"))),
        }
    }

    /// Releases a quiesce without a restore.
    pub fn unquiesce(&self) -> Result<()> {
        self.request(|req| HostMsg::Unquiesce { req }, "unquiesce")
            .map(|_| ())
    }

    /// After a restore: hands the agent the wall clock and fresh entropy, waits for it to
    /// apply them and announce `Ready`.
    pub fn resume(&self, now: WallClock, entropy: &[u8]) -> Result<ResumeReport> {
        if entropy.len() > MAX_ENTROPY {
            return Err(ClientError::Invalid(format!(
                "{} bytes of entropy exceed the {MAX_ENTROPY}-byte limit",
                entropy.len()
            )));
        }
        let seen = self.inner.lock().ready_count;
        let entropy = entropy.to_vec();
        let answer = self.request(|req| HostMsg::Resume { req, now, entropy }, "resume")?;
        let AgentMsg::Resumed { report, .. } = answer else {
            return Err(ClientError::Agent(format!("unexpected answer {answer:?}")));
        };
        self.wait_ready_after(seen)?;
        Ok(report)
    }

    /// Asks the agent to power the machine off (or reboot). The connection ends afterwards.
    pub fn shutdown(&self, reboot: bool) -> Result<()> {
        match self.request(|req| HostMsg::Shutdown { req, reboot }, "shut down") {
            Ok(_) => Ok(()),
            // The agent may go down before its answer is read.
            Err(ClientError::Disconnected(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Starts a command. Returns at once; the handle streams its output and exit.
    pub fn exec(&self, req: ExecRequest) -> Result<ExecHandle> {
        if req.argv.is_empty() {
            return Err(ClientError::Invalid("empty argv: name a program".into()));
        }
        let id = {
            let mut st = self.inner.lock();
            if st.closed.is_some() {
                return Err(self.inner.disconnected(&st));
            }
            let mut id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            while id == 0 || st.execs.contains_key(&id) {
                id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            }
            st.execs.insert(
                id,
                ExecSlot {
                    stdin_credit: INITIAL_WINDOW,
                    refs: 1,
                    ..ExecSlot::default()
                },
            );
            id
        };
        if let Err(e) = self.inner.send(&HostMsg::Exec { id, req }) {
            self.inner.lock().execs.remove(&id);
            return Err(e);
        }
        Ok(ExecHandle {
            inner: Arc::clone(&self.inner),
            id,
            taken: [false; 2],
        })
    }

    /// Runs `argv` with empty stdin and collects its output and status.
    pub fn run_capture<I, S>(&self, argv: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let h = self.exec(ExecRequest::new(argv))?;
        h.close_stdin()?;
        h.wait_with_output()
    }
}

fn dispatch(inner: &Inner, msg: AgentMsg) {
    let mut credit = None;
    {
        let mut st = inner.lock();
        match msg {
            AgentMsg::Ready { version } => {
                st.ready_count += 1;
                st.ready_version = Some(version);
            }
            AgentMsg::Pong { req }
            | AgentMsg::Unquiesced { req }
            | AgentMsg::ShuttingDown { req } => {
                st.replies.insert(req, msg);
            }
            AgentMsg::Quiesced { req, .. } | AgentMsg::Resumed { req, .. } => {
                st.replies.insert(req, msg);
            }
            AgentMsg::Started { id, pid } => {
                if let Some(s) = st.execs.get_mut(&id) {
                    s.pid = Some(pid);
                }
            }
            AgentMsg::ExecFailed { id, error } => {
                if let Some(s) = st.execs.get_mut(&id) {
                    s.failed = Some(error);
                    if s.refs == 0 {
                        st.execs.remove(&id);
                    }
                }
            }
            AgentMsg::Output { id, stream, data } => {
                if let Some(s) = st.execs.get_mut(&id) {
                    let buf = &mut s.streams[stream_index(stream)];
                    if buf.discard {
                        credit = Some(HostMsg::Credit {
                            id,
                            stream,
                            bytes: data.len() as u32,
                        });
                    } else {
                        buf.data.extend(data);
                    }
                }
            }
            AgentMsg::StdinCredit { id, bytes } => {
                if let Some(s) = st.execs.get_mut(&id) {
                    s.stdin_credit = s.stdin_credit.saturating_add(bytes);
                }
            }
            AgentMsg::Exited { id, status } => {
                if let Some(s) = st.execs.get_mut(&id) {
                    s.status = Some(status);
                    if s.refs == 0 {
                        st.execs.remove(&id);
                    }
                }
            }
            AgentMsg::Error { message } => {
                st.agent_error = Some(message);
            }
        }
        inner.cond.notify_all();
    }
    if let Some(c) = credit {
        // Queued, never blocking: the reader must keep reading.
        let _ = inner.send(&c);
    }
}

/// A running (or finished) command.
pub struct ExecHandle {
    inner: Arc<Inner>,
    id: ExecId,
    taken: [bool; 2],
}

impl Drop for ExecHandle {
    fn drop(&mut self) {
        self.inner.release(self.id);
    }
}

impl ExecHandle {
    /// The protocol id of this exec.
    pub fn id(&self) -> ExecId {
        self.id
    }

    /// Waits until the command started; returns its pid in the guest.
    pub fn pid(&self) -> Result<u32> {
        let id = self.id;
        let r = self.inner.wait_for(None, "start the command", |st| {
            let s = st.execs.get(&id)?;
            if let Some(p) = s.pid {
                return Some(Ok(p));
            }
            if let Some(e) = &s.failed {
                return Some(Err(e.clone()));
            }
            if s.status.is_some() {
                return Some(Err("the command was cancelled before it started".into()));
            }
            None
        })?;
        r.map_err(ClientError::ExecFailed)
    }

    /// The pid if the agent reported the start already (never blocks).
    pub fn try_pid(&self) -> Option<u32> {
        self.inner.lock().execs.get(&self.id).and_then(|s| s.pid)
    }

    /// The exit status if the command already finished (never blocks).
    pub fn try_status(&self) -> Option<ExitStatus> {
        self.inner.lock().execs.get(&self.id).and_then(|s| s.status)
    }

    /// Writes all of `data` to the command's stdin, waiting for credit as needed.
    pub fn write_stdin(&self, mut data: &[u8]) -> Result<()> {
        let id = self.id;
        while !data.is_empty() {
            let n = self.inner.wait_for(None, "accept stdin", |st| {
                let s = st.execs.get_mut(&id)?;
                if s.finished() {
                    return Some(0);
                }
                let n = (s.stdin_credit as usize).min(data.len()).min(MAX_CHUNK);
                if n == 0 {
                    return None;
                }
                s.stdin_credit -= n as u32;
                Some(n)
            })?;
            if n == 0 {
                return Err(ClientError::Disconnected(
                    "the command finished before reading all of its stdin".into(),
                ));
            }
            self.inner.send(&HostMsg::Stdin {
                id,
                data: data[..n].to_vec(),
            })?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Signals end of stdin (pipes: closes it; TTY: sends the EOF character).
    pub fn close_stdin(&self) -> Result<()> {
        self.inner.send(&HostMsg::StdinEof { id: self.id })
    }

    /// A `Write` adapter for stdin that can move to another thread.
    pub fn stdin(&self) -> ExecStdin {
        self.inner.lock().execs.entry(self.id).or_default().refs += 1;
        ExecStdin {
            handle: ExecHandle {
                inner: Arc::clone(&self.inner),
                id: self.id,
                taken: [true; 2],
            },
        }
    }

    /// Resizes the command's terminal.
    pub fn resize(&self, size: WinSize) -> Result<()> {
        self.inner.send(&HostMsg::Resize { id: self.id, size })
    }

    /// Sends a signal (e.g. `libc::SIGTERM`) to the command.
    pub fn signal(&self, signal: i32) -> Result<()> {
        self.inner.send(&HostMsg::Signal {
            id: self.id,
            signal,
        })
    }

    /// Takes the stdout reader (once). Output not taken is discarded by `wait`.
    pub fn take_stdout(&mut self) -> Option<ExecReader> {
        self.take(Stream::Stdout)
    }

    /// Takes the stderr reader (once).
    pub fn take_stderr(&mut self) -> Option<ExecReader> {
        self.take(Stream::Stderr)
    }

    fn take(&mut self, stream: Stream) -> Option<ExecReader> {
        let i = stream_index(stream);
        if self.taken[i] {
            return None;
        }
        self.taken[i] = true;
        self.inner.lock().execs.entry(self.id).or_default().refs += 1;
        Some(ExecReader {
            handle: ExecHandle {
                inner: Arc::clone(&self.inner),
                id: self.id,
                taken: [true; 2],
            },
            stream,
        })
    }

    /// Waits for the exit; output of streams not taken is discarded.
    pub fn wait(mut self) -> Result<ExitStatus> {
        let id = self.id;
        let untaken: Vec<usize> = (0..2).filter(|i| !self.taken[*i]).collect();
        self.taken = [true; 2];
        let mut credit = Vec::new();
        {
            let mut st = self.inner.lock();
            if let Some(s) = st.execs.get_mut(&id) {
                for i in untaken {
                    let b = &mut s.streams[i];
                    b.discard = true;
                    let n = b.data.len() as u32 + std::mem::take(&mut b.uncredited);
                    b.data.clear();
                    if n > 0 {
                        credit.push((i, n));
                    }
                }
            }
        }
        for (i, bytes) in credit {
            self.inner.send(&HostMsg::Credit {
                id,
                stream: index_stream(i),
                bytes,
            })?;
        }
        self.wait_status()
    }

    fn wait_status(&self) -> Result<ExitStatus> {
        let id = self.id;
        let r = self.inner.wait_for(None, "finish the command", |st| {
            let s = st.execs.get(&id)?;
            if let Some(e) = &s.failed {
                return Some(Err(e.clone()));
            }
            s.status.map(Ok)
        })?;
        r.map_err(ClientError::ExecFailed)
    }

    /// Collects stdout and stderr (those not taken) until the command exits.
    pub fn wait_with_output(mut self) -> Result<Output> {
        let id = self.id;
        let want = [!self.taken[0], !self.taken[1]];
        self.taken = [true; 2];
        let mut out = [Vec::new(), Vec::new()];
        loop {
            let mut credits = Vec::new();
            let done = self.inner.wait_for(None, "finish the command", |st| {
                let s = st.execs.get_mut(&id)?;
                let mut moved = false;
                for i in 0..2 {
                    let b = &mut s.streams[i];
                    if !b.data.is_empty() {
                        let n = b.data.len();
                        if want[i] {
                            out[i].extend(b.data.drain(..));
                        } else {
                            b.data.clear();
                        }
                        credits.push((i, n as u32));
                        moved = true;
                    }
                }
                if let Some(e) = &s.failed {
                    return Some(Err(e.clone()));
                }
                if let Some(status) = s.status {
                    return Some(Ok(Some(status)));
                }
                moved.then_some(Ok(None))
            })?;
            for (i, bytes) in credits {
                self.inner.send(&HostMsg::Credit {
                    id,
                    stream: index_stream(i),
                    bytes,
                })?;
            }
            match done {
                Err(e) => return Err(ClientError::ExecFailed(e)),
                Ok(Some(status)) => {
                    let [stdout, stderr] = out;
                    return Ok(Output {
                        stdout,
                        stderr,
                        status,
                    });
                }
                Ok(None) => {}
            }
        }
    }
}

/// Blocking reader of one output stream; end of file once the command exited.
pub struct ExecReader {
    handle: ExecHandle,
    stream: Stream,
}

impl Read for ExecReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let id = self.handle.id;
        let i = stream_index(self.stream);
        let inner = &self.handle.inner;
        let (n, credit) = inner
            .wait_for(None, "produce output", |st| {
                let s = st.execs.get_mut(&id)?;
                let b = &mut s.streams[i];
                if !b.data.is_empty() {
                    let n = b.data.len().min(buf.len());
                    let (front, back) = b.data.as_slices();
                    let k = front.len().min(n);
                    buf[..k].copy_from_slice(&front[..k]);
                    buf[k..n].copy_from_slice(&back[..n - k]);
                    b.data.drain(..n);
                    b.uncredited += n as u32;
                    // Batch credits, but never let the agent's window run dry while the
                    // buffer here is empty.
                    let credit = if b.uncredited >= INITIAL_WINDOW / 4 || b.data.is_empty() {
                        std::mem::take(&mut b.uncredited)
                    } else {
                        0
                    };
                    return Some((n, credit));
                }
                s.finished().then_some((0, 0))
            })
            .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e.to_string()))?;
        if credit > 0 {
            inner
                .send(&HostMsg::Credit {
                    id,
                    stream: self.stream,
                    bytes: credit,
                })
                .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e.to_string()))?;
        }
        Ok(n)
    }
}

/// `Write` adapter for a command's stdin; `close` (or drop) does not send EOF by itself.
pub struct ExecStdin {
    handle: ExecHandle,
}

impl ExecStdin {
    /// Signals end of stdin.
    pub fn close(&self) -> Result<()> {
        self.handle.close_stdin()
    }
}

impl Write for ExecStdin {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.handle
            .write_stdin(buf)
            .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e.to_string()))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
