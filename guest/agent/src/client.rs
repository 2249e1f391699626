//! Host-side client of the agent protocol, for synchronous code (the VMM, tests).
//!
//! Two threads serve a connection: a reader that decodes agent frames into shared state and
//! never blocks on anything but the stream, and a writer that drains a queue of encoded
//! frames. Callers block only on condition variables (waiting for output, an exit, stdin
//! credit or an answer), so a slow consumer of one exec never stalls another: the agent
//! sends at most the credit window per stream, and credit is returned only as the
//! consumer takes the bytes.
//!
//! The agent runs in the guest and is not trusted: the client keeps its own account of every
//! stream's credit window and of the requests it is waiting on, so whatever the agent sends,
//! the host buffers at most one window per stream and one answer per outstanding request.
//! Frames that break the protocol are dropped and counted ([`Client::protocol_violations`]);
//! output beyond the window, a malformed frame, or more than [`MAX_STRAY_FRAMES`] stray
//! frames end the session, and every waiting call fails with
//! `Disconnected("agent broke the protocol: ...")`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::{Duration, Instant};

use crate::protocol::{
    frame, read_frame, AgentMsg, ExecId, ExecRequest, ExitStatus, FrameDecoder, HostMsg, NetConfig,
    ProtocolError, QuiesceReport, ResumeReport, ShareMount, Stream, StreamId, WallClock,
    WarmRequest, WarmState, WinSize, INITIAL_WINDOW, MAX_CHUNK, MAX_ENTROPY, PROTOCOL_VERSION,
    STREAM_WINDOW,
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
    #[error("{0}")]
    ConnectFailed(String),
}

type Result<T> = std::result::Result<T, ClientError>;

/// Stray frames (for execs that are not running, answers nobody waits for, stdin credit
/// beyond the window) tolerated before the session ends. Each is dropped at no cost; the
/// limit only stops an agent that keeps the host busy with them.
pub const MAX_STRAY_FRAMES: u64 = 64;

/// Prefix of the `Disconnected` reason when the client ended the session itself.
pub const PROTOCOL_BROKEN: &str = "agent broke the protocol";

/// Stdin and stream payload queued for the writer thread, all streams together, before
/// senders wait. Each stream's credit window bounds what the guest must buffer; this
/// bounds what waits in the host's queue, so a stream's next chunk is at most this far
/// behind the others' (with a window per stream queued, 100 streams put 12.5 MiB ahead
/// of every chunk, minutes on a slow channel).
pub const TX_DATA_QUEUE: usize = 256 * 1024;

/// Frames the client dropped because they broke the protocol, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProtocolViolations {
    /// `Output` larger than the credit the host granted on that stream (ends the session).
    pub beyond_window: u64,
    /// `Started`, `ExecFailed`, `Output`, `StdinCredit` or `Exited` for an exec id the host
    /// never started, already saw finish, or released.
    pub unknown_exec: u64,
    /// An answer (`Pong`, `Quiesced`, ...) to no outstanding request.
    pub unsolicited_reply: u64,
    /// `StdinCredit` returning more than the host sent.
    pub excess_stdin_credit: u64,
    /// A frame with a bad magic, an oversized length or a payload that does not decode
    /// (ends the session).
    pub bad_frame: u64,
    /// A port-forward frame for a stream the host never opened or already saw closed, or
    /// stream credit beyond what was sent.
    pub unknown_stream: u64,
}

impl ProtocolViolations {
    /// All violations.
    pub fn total(&self) -> u64 {
        self.beyond_window + self.bad_frame + self.stray()
    }

    /// Violations that are only dropped until [`MAX_STRAY_FRAMES`] of them arrived.
    pub fn stray(&self) -> u64 {
        self.unknown_exec + self.unsolicited_reply + self.excess_stdin_credit + self.unknown_stream
    }
}

/// What the client holds on behalf of the agent right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Buffered {
    /// Output bytes received and not yet read, in the fullest stream.
    pub max_stream_bytes: usize,
    /// Output bytes received and not yet read, all streams.
    pub stream_bytes: usize,
    /// Answers received and not yet taken by their caller.
    pub replies: usize,
    /// Exec slots (running, or finished with a live handle).
    pub execs: usize,
    /// Port-forward bytes received and not yet read, all streams.
    pub port_bytes: usize,
    /// Port-forward streams (open, or closing).
    pub ports: usize,
    /// Stdin and stream bytes queued for the agent and not yet written to it (at most
    /// [`TX_DATA_QUEUE`]).
    pub queued_to_agent: usize,
    /// Senders waiting for room in that queue, each with its chunk's credit in hand.
    pub senders_waiting: usize,
}

/// The host's account of one port-forward stream.
struct PortSlot {
    connected: bool,
    failed: Option<String>,
    /// The agent sent `StreamClosed`: nothing more comes and nothing may be sent.
    closed: bool,
    close_error: Option<String>,
    /// The host sent `StreamClose` and waits for `StreamClosed`; data meanwhile is dropped.
    aborting: bool,
    rx: VecDeque<u8>,
    /// Credit the agent holds for guest-to-host data.
    rx_window: u32,
    rx_uncredited: u32,
    rx_eof: bool,
    /// Host-to-guest bytes the host may still send.
    tx_credit: u32,
}

impl PortSlot {
    fn new() -> Self {
        PortSlot {
            connected: false,
            failed: None,
            closed: false,
            close_error: None,
            aborting: false,
            rx: VecDeque::new(),
            rx_window: STREAM_WINDOW,
            rx_uncredited: 0,
            rx_eof: false,
            tx_credit: STREAM_WINDOW,
        }
    }
}

/// Captured result of a finished command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

struct StreamBuf {
    data: VecDeque<u8>,
    /// Credit the agent holds: what it may still send on this stream.
    window: u32,
    /// Nobody will read this stream: credit bytes back as they arrive.
    discard: bool,
    /// Consumed bytes not yet credited back.
    uncredited: u32,
}

impl Default for StreamBuf {
    fn default() -> Self {
        StreamBuf {
            data: VecDeque::new(),
            window: INITIAL_WINDOW,
            discard: false,
            uncredited: 0,
        }
    }
}

impl StreamBuf {
    /// Records `bytes` as credited back to the agent; call when queueing the `Credit`.
    fn grant(&mut self, bytes: u32) {
        self.window = self.window.saturating_add(bytes);
    }

    /// Moves buffered bytes into `buf`; returns how many and the credit to send back now.
    fn take(&mut self, buf: &mut [u8]) -> (usize, u32) {
        let n = self.data.len().min(buf.len());
        let (front, back) = self.data.as_slices();
        let k = front.len().min(n);
        buf[..k].copy_from_slice(&front[..k]);
        buf[k..n].copy_from_slice(&back[..n - k]);
        self.data.drain(..n);
        // `n` is at most one window, a u32.
        self.uncredited += n as u32;
        // Batch credits, but never let the agent's window run dry while the buffer here is
        // empty.
        let credit = if self.uncredited >= INITIAL_WINDOW / 4 || self.data.is_empty() {
            std::mem::take(&mut self.uncredited)
        } else {
            0
        };
        self.grant(credit);
        (n, credit)
    }
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
    /// Requests sent and not yet answered; only these answers are kept.
    awaiting: HashSet<u32>,
    /// Requests whose caller gave up (timeout): a late answer is dropped without complaint.
    abandoned: HashSet<u32>,
    execs: HashMap<ExecId, ExecSlot>,
    ports: HashMap<StreamId, PortSlot>,
    violations: ProtocolViolations,
    /// Payload bytes handed to the writer and not yet written (see [`TX_DATA_QUEUE`]).
    tx_data_queued: usize,
    /// Tickets taken and let in by [`Inner::send_data`].
    tx_tickets: u64,
    tx_serving: u64,
}

impl State {
    /// Ends the session because the agent broke the protocol.
    fn broken(&mut self, what: String) {
        self.closed
            .get_or_insert(format!("{PROTOCOL_BROKEN}: {what}"));
    }

    /// Counts a stray frame; too many end the session.
    fn stray(&mut self, what: impl FnOnce() -> String) {
        if self.violations.stray() > MAX_STRAY_FRAMES {
            let what = what();
            self.broken(format!(
                "more than {MAX_STRAY_FRAMES} stray frames, the last: {what}"
            ));
        }
    }

    fn buffered(&self) -> Buffered {
        let mut b = Buffered {
            replies: self.replies.len(),
            execs: self.execs.len(),
            ..Buffered::default()
        };
        for s in self.execs.values().flat_map(|e| e.streams.iter()) {
            b.max_stream_bytes = b.max_stream_bytes.max(s.data.len());
            b.stream_bytes += s.data.len();
        }
        b.ports = self.ports.len();
        b.port_bytes = self.ports.values().map(|p| p.rx.len()).sum();
        b.queued_to_agent = self.tx_data_queued;
        b.senders_waiting = (self.tx_tickets - self.tx_serving) as usize;
        b
    }
}

struct Inner {
    state: Mutex<State>,
    cond: Condvar,
    /// Encoded frames for the writer thread, each with the payload bytes it releases from
    /// `State::tx_data_queued` once written.
    tx: Mutex<Sender<(Vec<u8>, usize)>>,
    next_id: AtomicU32,
    next_stream: AtomicU32,
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
        if !self.enqueue(bytes, 0) {
            return Err(self.writer_gone());
        }
        Ok(())
    }

    /// Hands an encoded frame, carrying `data` payload bytes already counted in
    /// `tx_data_queued`, to the writer thread; false once the writer stopped. Lock order:
    /// the state lock may be held when this takes the queue's; never the other way round.
    fn enqueue(&self, bytes: Vec<u8>, data: usize) -> bool {
        self.tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send((bytes, data))
            .is_ok()
    }

    /// Why a frame could not be queued: the writer stops only when the session ended.
    fn writer_gone(&self) -> ClientError {
        let st = self.lock();
        if st.closed.is_some() {
            return self.disconnected(&st);
        }
        ClientError::Disconnected("the writer thread stopped".into())
    }

    /// The writer wrote (or dropped) frames carrying `data` payload bytes: wakes senders
    /// waiting for queue room.
    fn release_queued(&self, data: usize) {
        if data > 0 {
            let mut st = self.lock();
            st.tx_data_queued = st.tx_data_queued.saturating_sub(data);
            self.cond.notify_all();
        }
    }

    /// Sends `msg`, a stdin or stream frame with `len` (at most [`MAX_CHUNK`]) payload bytes
    /// whose credit the caller holds, once the writer queue has room for it, in the order
    /// callers asked: each takes a ticket and its frame is queued only when every earlier
    /// ticket's was, so a stream's next chunk waits behind at most one chunk of each other
    /// sender. (Letting in whoever took the lock first starved some of 100 streams for
    /// minutes: a sender that never slept kept beating the ones woken for the room it freed.)
    /// Credit is taken before the ticket, so a sender without credit never holds up the line.
    fn send_data(&self, len: usize, msg: impl FnOnce() -> HostMsg) -> Result<()> {
        let ticket = {
            let mut st = self.lock();
            st.tx_tickets += 1;
            st.tx_tickets - 1
        };
        let mut msg = Some(msg);
        let admitted = self.wait_for(None, "queue data for the agent", |st| {
            if st.tx_serving != ticket || st.tx_data_queued + len > TX_DATA_QUEUE {
                return None;
            }
            st.tx_serving += 1;
            // Encoded only now, so a sender in line holds no copy of its chunk (100 waiting
            // streams held 12.5 MiB), and queued under the state lock, so frames leave in
            // ticket order.
            // (Taken once: this branch ends the wait.)
            let bytes = match frame(&(msg.take()?)()) {
                Ok(b) => b,
                Err(e) => return Some(Err(ClientError::from(e))),
            };
            let queued = self.enqueue(bytes, len);
            if queued {
                st.tx_data_queued += len;
            }
            Some(Ok(queued))
        });
        // The next ticket may fit already.
        self.cond.notify_all();
        if !admitted?? {
            return Err(self.writer_gone());
        }
        Ok(())
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
                            s.grant(pending);
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

/// A `Resume` sent by [`Client::resume_start`] whose answer is still to be awaited.
#[derive(Debug)]
#[must_use = "a resume is checked only by Client::resume_finish"]
pub struct PendingResume {
    req: u32,
    /// `Ready` messages seen before the request: the agent sends one more after resuming.
    seen: u64,
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
        let (tx, rx) = mpsc::channel::<(Vec<u8>, usize)>();
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
            tx: Mutex::new(tx),
            next_id: AtomicU32::new(1),
            next_stream: AtomicU32::new(1),
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
                for (buf, data) in rx {
                    let written = writer.write_all(&buf).and_then(|_| writer.flush());
                    let Some(inner) = w_inner.upgrade() else {
                        return;
                    };
                    if let Err(e) = written {
                        let mut st = inner.lock();
                        st.closed.get_or_insert(format!("write failed: {e}"));
                        inner.cond.notify_all();
                        return;
                    }
                    inner.release_queued(data);
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
                if !inner.receive(res) {
                    // Hang up so that the agent's next write fails instead of filling the
                    // stream nobody reads any more.
                    if let Some(s) = &inner.shutdown_hook {
                        let _ = s.shutdown(std::net::Shutdown::Both);
                    }
                    return;
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

    /// Frames dropped so far because they broke the protocol.
    pub fn protocol_violations(&self) -> ProtocolViolations {
        self.inner.lock().violations
    }

    /// What the client buffers for the agent right now (bounded by the credit windows and
    /// the outstanding requests, whatever the agent sends).
    pub fn buffered(&self) -> Buffered {
        self.inner.lock().buffered()
    }

    fn request(&self, make: impl FnOnce(u32) -> HostMsg, what: &'static str) -> Result<AgentMsg> {
        let req = self.send_request(make)?;
        self.await_reply(req, what)
    }

    /// Sends a request without waiting: its number, for [`Client::await_reply`]. Forgotten
    /// (its answer dropped as abandoned) when sending fails.
    fn send_request(&self, make: impl FnOnce(u32) -> HostMsg) -> Result<u32> {
        let req = self.inner.next_req.fetch_add(1, Ordering::Relaxed);
        self.inner.lock().awaiting.insert(req);
        match self.inner.send(&make(req)) {
            Ok(()) => Ok(req),
            Err(e) => {
                self.forget(req);
                Err(e)
            }
        }
    }

    /// Waits for the answer to request `req`.
    fn await_reply(&self, req: u32, what: &'static str) -> Result<AgentMsg> {
        let res = self
            .inner
            .wait_for(self.timeout(), what, |st| st.replies.remove(&req));
        if res.is_err() {
            self.forget(req);
        }
        res
    }

    fn forget(&self, req: u32) {
        {
            let mut st = self.inner.lock();
            st.replies.remove(&req);
            if st.awaiting.remove(&req) && st.closed.is_none() {
                st.abandoned.insert(req);
            }
        }
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

    /// Has the agent mount the virtio-fs shares; the agent's error is
    /// [`ClientError::Agent`].
    pub fn mount_shares(&self, shares: Vec<ShareMount>) -> Result<()> {
        match self.request(|req| HostMsg::Mount { req, shares }, "mount the shares")? {
            AgentMsg::Mounted { error: None, .. } => Ok(()),
            AgentMsg::Mounted { error: Some(e), .. } => Err(ClientError::Agent(e)),
            other => Err(ClientError::Agent(format!("unexpected answer {other:?}"))),
        }
    }

    /// Has the agent unmount every share: `Ok(Some(why))` when one is still in use.
    pub fn unmount_shares(&self) -> Result<Option<String>> {
        match self.request(|req| HostMsg::Unmount { req }, "unmount the shares")? {
            AgentMsg::Unmounted { error, .. } => Ok(error),
            other => Err(ClientError::Agent(format!("unexpected answer {other:?}"))),
        }
    }

    /// Has the agent bring the network card up; the agent's error is [`ClientError::Agent`].
    pub fn net_up(&self, config: NetConfig) -> Result<()> {
        match self.request(|req| HostMsg::NetUp { req, config }, "bring the network up")? {
            AgentMsg::NetReady { error: None, .. } => Ok(()),
            AgentMsg::NetReady { error: Some(e), .. } => Err(ClientError::Agent(e)),
            other => Err(ClientError::Agent(format!("unexpected answer {other:?}"))),
        }
    }

    /// Has the agent unbind the network card's driver; the agent's error is
    /// [`ClientError::Agent`].
    pub fn net_down(&self) -> Result<()> {
        match self.request(|req| HostMsg::NetDown { req }, "take the network down")? {
            AgentMsg::NetDown { error: None, .. } => Ok(()),
            AgentMsg::NetDown { error: Some(e), .. } => Err(ClientError::Agent(e)),
            other => Err(ClientError::Agent(format!("unexpected answer {other:?}"))),
        }
    }

    /// Starts a warm entrypoint and waits, at most `timeout`, until it waits for its run
    /// (blocked on its stdin, or connected to the invocation socket) or has ended. A timeout
    /// is [`ClientError::Timeout`]; the process is then left as it is (the build fails).
    pub fn warm(&self, warm: WarmRequest, timeout: Duration) -> Result<WarmState> {
        let req = self.send_request(|req| HostMsg::Warm { req, warm })?;
        let res = self
            .inner
            .wait_for(Some(timeout), "report the warm entrypoint ready", |st| {
                st.replies.remove(&req)
            });
        match res {
            Ok(AgentMsg::WarmReady { state, .. }) => Ok(state),
            Ok(other) => Err(ClientError::Agent(format!("unexpected answer {other:?}"))),
            Err(e) => {
                self.forget(req);
                Err(e)
            }
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
        let pending = self.resume_start(now, entropy)?;
        self.resume_finish(pending)
    }

    /// The first half of [`Client::resume`]: sends `Resume` and returns at once, so that
    /// the first command can follow it on the wire without waiting for the round trip.
    /// The agent handles frames in order, so a command sent after this starts only once
    /// the clock is set, the entropy added and the execs of the previous host are gone.
    /// Finish with [`Client::resume_finish`].
    pub fn resume_start(&self, now: WallClock, entropy: &[u8]) -> Result<PendingResume> {
        if entropy.len() > MAX_ENTROPY {
            return Err(ClientError::Invalid(format!(
                "{} bytes of entropy exceed the {MAX_ENTROPY}-byte limit",
                entropy.len()
            )));
        }
        let seen = {
            let mut st = self.inner.lock();
            // The agent drops every port stream on `Resume` without a word (they belong to
            // the host that saved the machine): close them here.
            st.ports.retain(|_, p| !p.aborting);
            for p in st.ports.values_mut() {
                if !p.closed {
                    p.closed = true;
                    p.close_error = Some("the machine was resumed".into());
                }
                // What the agent sent before it handled `Resume` is dropped quietly.
                p.aborting = true;
            }
            self.inner.cond.notify_all();
            st.ready_count
        };
        let entropy = entropy.to_vec();
        let req = self.send_request(|req| HostMsg::Resume { req, now, entropy })?;
        Ok(PendingResume { req, seen })
    }

    /// Waits for the agent's answer to a [`Client::resume_start`] and its `Ready`.
    pub fn resume_finish(&self, pending: PendingResume) -> Result<ResumeReport> {
        let answer = self.await_reply(pending.req, "resume")?;
        let AgentMsg::Resumed { report, .. } = answer else {
            return Err(ClientError::Agent(format!("unexpected answer {answer:?}")));
        };
        self.wait_ready_after(pending.seen)?;
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

impl Client {
    /// A handle that opens port-forward streams on this connection, for other threads (it
    /// does not keep the connection open by itself: dropping the client ends it).
    pub fn port_connector(&self) -> PortConnector {
        PortConnector {
            inner: Arc::clone(&self.inner),
        }
    }

    /// Opens a stream to `127.0.0.1:port` in the guest (see [`PortConnector::connect`]).
    pub fn connect_port(&self, port: u16) -> Result<PortStream> {
        self.port_connector().connect(port)
    }
}

/// Opens port-forward streams (`HostMsg::Connect`) on a client's connection.
#[derive(Clone)]
pub struct PortConnector {
    inner: Arc<Inner>,
}

impl PortConnector {
    /// Starts a connection to `127.0.0.1:port` in the guest. Returns at once; wait for the
    /// outcome with [`PortStream::wait_connected`].
    pub fn connect(&self, port: u16) -> Result<PortStream> {
        let id = {
            let mut st = self.inner.lock();
            if st.closed.is_some() {
                return Err(self.inner.disconnected(&st));
            }
            let mut id = self.inner.next_stream.fetch_add(1, Ordering::Relaxed);
            while id == 0 || st.ports.contains_key(&id) {
                id = self.inner.next_stream.fetch_add(1, Ordering::Relaxed);
            }
            st.ports.insert(id, PortSlot::new());
            id
        };
        if let Err(e) = self.inner.send(&HostMsg::Connect { id, port }) {
            self.inner.lock().ports.remove(&id);
            return Err(e);
        }
        Ok(PortStream {
            inner: Arc::clone(&self.inner),
            id,
        })
    }

    /// Streams open or closing (their `StreamClosed` not yet received).
    pub fn open_streams(&self) -> usize {
        self.inner.lock().ports.len()
    }

    /// Waits until no stream is open or closing, or `timeout`.
    pub fn wait_all_closed(&self, timeout: Duration) -> Result<()> {
        self.inner
            .wait_for(Some(timeout), "close the port streams", |st| {
                st.ports.is_empty().then_some(())
            })
    }
}

/// One port-forward stream: a TCP connection in the guest, as a byte stream each way.
/// `read` and `write_all` may run on two threads at once (share it in an `Arc`). Dropping
/// it before the agent closed the stream aborts it (`StreamClose`).
pub struct PortStream {
    inner: Arc<Inner>,
    id: StreamId,
}

impl PortStream {
    /// The protocol id of this stream.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Waits until the agent connected (`Ok`) or could not (`ConnectFailed` with its reason).
    pub fn wait_connected(&self, timeout: Option<Duration>) -> Result<()> {
        let id = self.id;
        let r = self
            .inner
            .wait_for(timeout, "connect to the guest port", |st| {
                let p = st.ports.get(&id)?;
                if let Some(e) = &p.failed {
                    return Some(Err(e.clone()));
                }
                if p.connected {
                    return Some(Ok(()));
                }
                p.closed.then(|| Err("the stream was closed".to_string()))
            })?;
        r.map_err(ClientError::ConnectFailed)
    }

    /// Reads guest bytes, blocking until some arrive: 0 once the guest end finished or the
    /// stream closed.
    pub fn read(&self, buf: &mut [u8]) -> Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let id = self.id;
        let (n, credit) = self.inner.wait_for(None, "send stream data", |st| {
            let Some(p) = st.ports.get_mut(&id) else {
                return Some((0, 0));
            };
            if p.aborting {
                return Some((0, 0));
            }
            if p.rx.is_empty() {
                return (p.rx_eof || p.closed).then_some((0, 0));
            }
            let n = p.rx.len().min(buf.len());
            for (d, s) in buf.iter_mut().zip(p.rx.drain(..n)) {
                *d = s;
            }
            // At most one window, a u32.
            p.rx_uncredited += n as u32;
            let credit = if p.closed {
                0
            } else if p.rx_uncredited >= STREAM_WINDOW / 4 || p.rx.is_empty() {
                std::mem::take(&mut p.rx_uncredited)
            } else {
                0
            };
            p.rx_window += credit;
            Some((n, credit))
        })?;
        if credit > 0 {
            let _ = self
                .inner
                .send(&HostMsg::StreamCredit { id, bytes: credit });
        }
        Ok(n)
    }

    /// Sends all of `data` to the guest end, waiting for credit as needed; fails once the
    /// stream is closed.
    pub fn write_all(&self, mut data: &[u8]) -> Result<()> {
        let id = self.id;
        while !data.is_empty() {
            let n = self.inner.wait_for(None, "accept stream data", |st| {
                let Some(p) = st.ports.get_mut(&id) else {
                    return Some(0);
                };
                if p.closed || p.aborting {
                    return Some(0);
                }
                let n = (p.tx_credit as usize).min(data.len()).min(MAX_CHUNK);
                if n == 0 {
                    return None;
                }
                p.tx_credit -= n as u32;
                Some(n)
            })?;
            if n == 0 {
                return Err(ClientError::Disconnected(
                    "the guest end of the stream is closed".into(),
                ));
            }
            self.inner.send_data(n, || HostMsg::StreamData {
                id,
                data: data[..n].to_vec(),
            })?;
            data = &data[n..];
        }
        Ok(())
    }

    /// The host end will send no more (half-close): the guest socket's write side is shut
    /// down after the data already sent.
    pub fn shutdown_write(&self) -> Result<()> {
        self.inner.send(&HostMsg::StreamEof { id: self.id })
    }

    /// Aborts the stream now (`StreamClose`): readers and writers of it stop at once, and
    /// the agent closes the guest socket without waiting for either end.
    pub fn abort(&self) {
        let id = self.id;
        let send = {
            let mut st = self.inner.lock();
            let open = st.closed.is_none();
            let send = match st.ports.get_mut(&id) {
                Some(p) if !p.closed && !p.aborting => {
                    p.aborting = true;
                    p.rx.clear();
                    open
                }
                _ => false,
            };
            self.inner.cond.notify_all();
            send
        };
        if send && self.inner.send(&HostMsg::StreamClose { id }).is_err() {
            self.inner.lock().ports.remove(&id);
        }
    }

    /// Why the agent closed the stream, if it did and said why.
    pub fn close_error(&self) -> Option<String> {
        self.inner
            .lock()
            .ports
            .get(&self.id)
            .and_then(|p| p.close_error.clone())
    }
}

impl Drop for PortStream {
    fn drop(&mut self) {
        let id = self.id;
        let abort = {
            let mut st = self.inner.lock();
            match st.ports.get_mut(&id) {
                Some(p) if p.closed => {
                    st.ports.remove(&id);
                    false
                }
                // Aborted already: `StreamClosed` removes it.
                Some(p) if p.aborting => false,
                Some(p) => {
                    p.aborting = true;
                    p.rx.clear();
                    st.closed.is_none()
                }
                None => false,
            }
        };
        if abort && self.inner.send(&HostMsg::StreamClose { id }).is_err() {
            self.inner.lock().ports.remove(&id);
        }
    }
}

impl Inner {
    /// Applies what the reader got; false once the session is over.
    fn receive(&self, res: std::result::Result<AgentMsg, ProtocolError>) -> bool {
        let mut credits = Vec::new();
        let open = {
            let mut st = self.lock();
            match res {
                Ok(msg) => apply(&mut st, msg, &mut credits),
                Err(e) => read_failed(&mut st, e),
            }
            self.cond.notify_all();
            st.closed.is_none()
        };
        for c in credits {
            // Queued, never blocking: the reader must keep reading.
            let _ = self.send(&c);
        }
        open
    }
}

/// Records why reading stopped: a frame that breaks the protocol, or the end of the stream.
fn read_failed(st: &mut State, e: ProtocolError) {
    match e {
        ProtocolError::BadMagic(_)
        | ProtocolError::TooLarge(_)
        | ProtocolError::Decode(_)
        | ProtocolError::TrailingBytes(_) => {
            st.violations.bad_frame += 1;
            st.broken(e.to_string());
        }
        ProtocolError::Encode(_) | ProtocolError::Closed | ProtocolError::Io(_) => {
            st.closed.get_or_insert(e.to_string());
        }
    }
}

/// Applies one agent frame to the state. Frames that break the protocol are dropped and
/// counted; `credits` collects the `Credit` frames to queue (for streams nobody reads).
fn apply(st: &mut State, msg: AgentMsg, credits: &mut Vec<HostMsg>) {
    match msg {
        AgentMsg::Ready { version } => {
            st.ready_count += 1;
            st.ready_version = Some(version);
        }
        AgentMsg::Pong { req }
        | AgentMsg::Unquiesced { req }
        | AgentMsg::ShuttingDown { req }
        | AgentMsg::Quiesced { req, .. }
        | AgentMsg::Resumed { req, .. }
        | AgentMsg::Mounted { req, .. }
        | AgentMsg::Unmounted { req, .. }
        | AgentMsg::NetReady { req, .. }
        | AgentMsg::NetDown { req, .. }
        | AgentMsg::WarmReady { req, .. } => {
            if st.awaiting.remove(&req) {
                st.replies.insert(req, msg);
            } else if !st.abandoned.remove(&req) {
                st.violations.unsolicited_reply += 1;
                st.stray(|| format!("an answer to request {req}, which is not outstanding"));
            }
        }
        AgentMsg::Started { id, pid } => match live(st, id) {
            Some(s) => s.pid = Some(pid),
            None => unknown_exec(st, "Started", id),
        },
        AgentMsg::ExecFailed { id, error } => match live(st, id) {
            Some(s) => {
                s.failed = Some(error);
                if s.refs == 0 {
                    st.execs.remove(&id);
                }
            }
            None => unknown_exec(st, "ExecFailed", id),
        },
        AgentMsg::Output { id, stream, data } => {
            let Some(s) = live(st, id) else {
                return unknown_exec(st, "Output", id);
            };
            let buf = &mut s.streams[stream_index(stream)];
            let window = buf.window;
            if data.len() > window as usize {
                st.violations.beyond_window += 1;
                st.broken(format!(
                    "{} bytes of {stream:?} for exec {id} beyond its {window}-byte credit",
                    data.len()
                ));
                return;
            }
            // `data.len() <= window`, a u32.
            let n = data.len() as u32;
            buf.window -= n;
            if buf.discard {
                buf.grant(n);
                credits.push(HostMsg::Credit {
                    id,
                    stream,
                    bytes: n,
                });
            } else {
                buf.data.extend(data);
            }
        }
        AgentMsg::StdinCredit { id, bytes } => {
            let Some(s) = live(st, id) else {
                return unknown_exec(st, "StdinCredit", id);
            };
            match s.stdin_credit.checked_add(bytes) {
                Some(c) if c <= INITIAL_WINDOW => s.stdin_credit = c,
                _ => {
                    st.violations.excess_stdin_credit += 1;
                    st.stray(|| format!("stdin credit for exec {id} beyond what was sent"));
                }
            }
        }
        AgentMsg::Exited { id, status } => match live(st, id) {
            Some(s) => {
                s.status = Some(status);
                if s.refs == 0 {
                    st.execs.remove(&id);
                }
            }
            None => unknown_exec(st, "Exited", id),
        },
        AgentMsg::Connected { id } => match st.ports.get_mut(&id) {
            Some(p) if !p.connected && !p.closed => p.connected = true,
            _ => unknown_stream(st, "Connected", id),
        },
        AgentMsg::ConnectFailed { id, error } => match st.ports.get_mut(&id) {
            Some(p) if !p.connected && !p.closed => {
                p.failed = Some(error);
                p.closed = true;
                if p.aborting {
                    st.ports.remove(&id);
                }
            }
            _ => unknown_stream(st, "ConnectFailed", id),
        },
        AgentMsg::StreamData { id, data } => match st.ports.get_mut(&id) {
            Some(p) if p.aborting => {}
            Some(p) if p.connected && !p.closed && !p.rx_eof => {
                if data.len() > p.rx_window as usize {
                    let window = p.rx_window;
                    st.violations.beyond_window += 1;
                    st.broken(format!(
                        "{} bytes for port stream {id} beyond its {window}-byte credit",
                        data.len()
                    ));
                    return;
                }
                // `data.len() <= rx_window`, a u32.
                p.rx_window -= data.len() as u32;
                p.rx.extend(data);
            }
            _ => unknown_stream(st, "StreamData", id),
        },
        AgentMsg::StreamEof { id } => match st.ports.get_mut(&id) {
            Some(p) if p.aborting => {}
            Some(p) if p.connected && !p.closed => p.rx_eof = true,
            _ => unknown_stream(st, "StreamEof", id),
        },
        AgentMsg::StreamCredit { id, bytes } => match st.ports.get_mut(&id) {
            Some(p) if p.aborting => {}
            Some(p) if p.connected && !p.closed => match p.tx_credit.checked_add(bytes) {
                Some(c) if c <= STREAM_WINDOW => p.tx_credit = c,
                _ => unknown_stream(st, "StreamCredit beyond what was sent", id),
            },
            _ => unknown_stream(st, "StreamCredit", id),
        },
        AgentMsg::StreamClosed { id, error } => match st.ports.get_mut(&id) {
            Some(p) if p.aborting && p.closed => {
                st.ports.remove(&id);
            }
            Some(p) if !p.closed => {
                p.closed = true;
                p.close_error = error;
                if p.aborting {
                    st.ports.remove(&id);
                }
            }
            _ => unknown_stream(st, "StreamClosed", id),
        },
        AgentMsg::Error { message } => {
            // The agent ends the session after it; nothing it sends later counts.
            st.agent_error = Some(message);
            st.closed
                .get_or_insert_with(|| "the agent ended the session".into());
        }
    }
}

/// The slot of an exec the agent may still send about: started by the host, not finished.
fn live(st: &mut State, id: ExecId) -> Option<&mut ExecSlot> {
    st.execs.get_mut(&id).filter(|s| !s.finished())
}

fn unknown_stream(st: &mut State, what: &str, id: StreamId) {
    st.violations.unknown_stream += 1;
    st.stray(|| format!("{what} for port stream {id}, which is not open"));
}

fn unknown_exec(st: &mut State, what: &str, id: ExecId) {
    st.violations.unknown_exec += 1;
    st.stray(|| format!("{what} for exec {id}, which is not running"));
}

/// The client's frame handling without threads or a socket, for fuzzing and property tests:
/// the same state and rules as a [`Client`] whose agent sends the frames fed here.
#[doc(hidden)]
pub struct Replay {
    st: State,
    decoder: FrameDecoder,
    credits: Vec<HostMsg>,
    window: u32,
    requests: usize,
}

impl Replay {
    /// A session with `execs` started (those in `discard` have nobody reading their output)
    /// and requests `requests` outstanding.
    pub fn new(execs: &[ExecId], discard: &[ExecId], requests: &[u32]) -> Replay {
        Self::with_window(execs, discard, requests, INITIAL_WINDOW)
    }

    /// Like [`Replay::new`], with each output stream's credit window `window` bytes instead
    /// of `INITIAL_WINDOW` (so that a small input can overrun it).
    pub fn with_window(
        execs: &[ExecId],
        discard: &[ExecId],
        requests: &[u32],
        window: u32,
    ) -> Replay {
        let mut st = State::default();
        for &id in execs {
            let mut slot = ExecSlot {
                stdin_credit: INITIAL_WINDOW,
                refs: 1,
                ..ExecSlot::default()
            };
            for s in &mut slot.streams {
                s.discard = discard.contains(&id);
                s.window = window;
            }
            st.execs.insert(id, slot);
        }
        st.awaiting.extend(requests);
        Replay {
            window,
            requests: st.awaiting.len(),
            st,
            decoder: FrameDecoder::new(),
            credits: Vec::new(),
        }
    }

    /// Applies one frame; false once the session is over (later frames are ignored).
    pub fn apply(&mut self, msg: AgentMsg) -> bool {
        if self.st.closed.is_none() {
            apply(&mut self.st, msg, &mut self.credits);
        }
        self.st.closed.is_none()
    }

    /// Feeds raw stream bytes and applies every whole frame; false once the session is over.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        if self.st.closed.is_some() {
            return false;
        }
        self.decoder.feed(bytes);
        while self.st.closed.is_none() {
            match self.decoder.next_msg::<AgentMsg>() {
                Ok(Some(msg)) => apply(&mut self.st, msg, &mut self.credits),
                Ok(None) => break,
                Err(e) => read_failed(&mut self.st, e),
            }
        }
        self.st.closed.is_none()
    }

    /// A reader takes up to `max` bytes of a stream, as [`ExecReader`] does; returns the
    /// bytes taken and the credit sent back.
    pub fn read(&mut self, id: ExecId, stream: Stream, max: usize) -> (usize, u32) {
        let mut buf = vec![0; max];
        match self.st.execs.get_mut(&id) {
            Some(s) => s.streams[stream_index(stream)].take(&mut buf),
            None => (0, 0),
        }
    }

    /// Why the session ended, if it did.
    pub fn closed(&self) -> Option<&str> {
        self.st.closed.as_deref()
    }

    pub fn violations(&self) -> ProtocolViolations {
        self.st.violations
    }

    pub fn buffered(&self) -> Buffered {
        self.st.buffered()
    }

    /// Credit frames queued so far (for streams nobody reads).
    pub fn credits_sent(&self) -> usize {
        self.credits.len()
    }

    /// Checks that every stream's account balances: buffered, consumed-but-uncredited and
    /// the agent's remaining credit always add up to one window.
    pub fn check(&self) -> std::result::Result<(), String> {
        for (id, e) in &self.st.execs {
            for (i, s) in e.streams.iter().enumerate() {
                let sum = s.data.len() as u64 + u64::from(s.uncredited) + u64::from(s.window);
                if sum != u64::from(self.window) {
                    return Err(format!(
                        "exec {id} stream {i}: {} buffered + {} uncredited + {} window != {}",
                        s.data.len(),
                        s.uncredited,
                        s.window,
                        self.window
                    ));
                }
            }
            if e.stdin_credit > INITIAL_WINDOW {
                return Err(format!("exec {id}: stdin credit {}", e.stdin_credit));
            }
        }
        if self.st.replies.len() + self.st.awaiting.len() > self.requests {
            return Err(format!(
                "{} answers stored and {} awaited for {} requests",
                self.st.replies.len(),
                self.st.awaiting.len(),
                self.requests
            ));
        }
        Ok(())
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
            self.inner.send_data(n, || HostMsg::Stdin {
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
                        b.grant(n);
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
                        b.grant(n as u32);
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
                    return Some(b.take(buf));
                }
                s.finished().then_some((0, 0))
            })
            .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e.to_string()))?;
        if credit > 0 {
            // The `n` bytes are already taken: if the session is gone, the next read says so.
            let _ = inner.send(&HostMsg::Credit {
                id,
                stream: self.stream,
                bytes: credit,
            });
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
