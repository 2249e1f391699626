//! The host <-> agent wire protocol.
//!
//! One byte stream carries every conversation between the VMM and the guest agent. It is cut
//! into frames: a 6-byte header (`b"SM"` magic, then the payload length as a little-endian
//! `u32`) followed by a postcard-encoded [`HostMsg`] or [`AgentMsg`]. Postcard is compact
//! (varint integers, raw byte strings), has a documented stable wire format, and needs no
//! schema compiler, which keeps the static agent small. See `PROTOCOL.md` for the full rules.

use std::io::{self, Read};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The protocol version both sides announce (`Ready` / `Hello`); bumped on any wire change.
pub const PROTOCOL_VERSION: u32 = 4;
/// First two bytes of every frame; catches a wrong port or a desynchronised stream at once.
pub const MAGIC: [u8; 2] = *b"SM";
/// Magic plus little-endian `u32` payload length.
pub const HEADER_LEN: usize = 6;
/// Largest payload either side accepts; a bigger length ends the session.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Bytes each side may send on a fresh exec stream (stdin, stdout, stderr) before it needs credit.
pub const INITIAL_WINDOW: u32 = 256 * 1024;
/// Bytes each side may send on a fresh port-forward stream before it needs credit.
pub const STREAM_WINDOW: u32 = 128 * 1024;
/// Largest data chunk the reference agent and client put in one `Output`/`Stdin` frame.
pub const MAX_CHUNK: usize = 64 * 1024;
/// Largest entropy blob accepted in `Resume`.
pub const MAX_ENTROPY: usize = 4096;
/// Device path of the agent port when the kernel command line names none: the VMM's only
/// virtio console.
pub const DEFAULT_AGENT_PORT: &str = "/dev/hvc0";
/// Kernel command-line key naming the agent port: a device path (`smolvm.agent=/dev/hvc0`) or
/// the name of a virtio-console port (`smolvm.agent=org.smolvm.agent`), found in
/// `/sys/class/virtio-ports/*/name`, with [`DEFAULT_AGENT_PORT`] as the fallback when no port
/// has that name.
pub const CMDLINE_AGENT_KEY: &str = "smolvm.agent";
/// Name of the agent's virtio-console port in machines with a multiport console.
pub const AGENT_PORT_NAME: &str = "org.smolvm.agent";
/// Kernel command-line key naming the guest hostname, e.g. `smolvm.hostname=web`.
pub const CMDLINE_HOSTNAME_KEY: &str = "smolvm.hostname";
/// Hostname used when the command line names none.
pub const DEFAULT_HOSTNAME: &str = "smolvm";

/// Host-chosen identifier of one exec, unique among the execs live in a session.
pub type ExecId = u32;
/// Host-chosen identifier of one port-forward stream (a TCP connection to a guest port),
/// unique among the streams live in a session; a separate space from exec ids.
pub type StreamId = u32;

/// Errors of framing and encoding.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("bad frame magic {0:02x?} (want \"SM\"): the stream is not the smolvm agent protocol or lost sync")]
    BadMagic([u8; 2]),
    #[error("frame payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("cannot decode frame payload: {0}")]
    Decode(postcard::Error),
    #[error("frame payload has {0} trailing bytes after the message")]
    TrailingBytes(usize),
    #[error("cannot encode message: {0}")]
    Encode(postcard::Error),
    #[error("the peer closed the stream")]
    Closed,
    #[error("stream I/O failed: {0}")]
    Io(#[from] io::Error),
}

/// Which output stream of an exec.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Terminal size in character cells.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

impl Default for WinSize {
    fn default() -> Self {
        WinSize { rows: 24, cols: 80 }
    }
}

/// Who a command runs as.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum User {
    /// Numeric ids; a missing gid is taken from `/etc/passwd` (or equals the uid).
    Id { uid: u32, gid: Option<u32> },
    /// A name looked up in the guest's `/etc/passwd` (and `/etc/group` for extra groups).
    Name(String),
}

/// A command to start in the guest.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is searched in `PATH`.
    pub argv: Vec<String>,
    /// Variables added on top of the agent's clean base environment (PATH, HOME, TERM, ...).
    pub env: Vec<(String, String)>,
    /// Working directory; `/` when absent.
    pub cwd: Option<String>,
    /// Identity; the agent's own (root in the guest) when absent.
    pub user: Option<User>,
    /// Run on a new pseudo-terminal of this size (stderr merges into stdout); pipes when absent.
    pub tty: Option<WinSize>,
}

impl ExecRequest {
    /// A pipe-mode request for `argv` with everything else defaulted.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }
}

/// How a command ended.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Normal exit with this code.
    Code(i32),
    /// Killed by this signal number.
    Signal(i32),
}

impl ExitStatus {
    /// True for exit code 0.
    pub fn success(&self) -> bool {
        matches!(self, ExitStatus::Code(0))
    }

    /// The exit code, if it exited normally.
    pub fn code(&self) -> Option<i32> {
        match self {
            ExitStatus::Code(c) => Some(*c),
            ExitStatus::Signal(_) => None,
        }
    }

    /// The signal number, if it was killed by one.
    pub fn signal(&self) -> Option<i32> {
        match self {
            ExitStatus::Signal(s) => Some(*s),
            ExitStatus::Code(_) => None,
        }
    }
}

/// Wall-clock time as seconds and nanoseconds since the Unix epoch.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct WallClock {
    pub secs: i64,
    pub nanos: u32,
}

impl WallClock {
    /// The current host time.
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }
}

impl From<SystemTime> for WallClock {
    fn from(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => WallClock {
                secs: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                nanos: d.subsec_nanos(),
            },
            Err(e) => {
                // Before 1970: express as a negative second count plus positive nanos.
                let d: Duration = e.duration();
                let mut secs = -i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
                let mut nanos = d.subsec_nanos();
                if nanos > 0 {
                    secs -= 1;
                    nanos = 1_000_000_000 - nanos;
                }
                WallClock { secs, nanos }
            }
        }
    }
}

/// Outcome of one system action the agent was asked to perform.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Done.
    Applied,
    /// Deliberately not done (the agent is not PID 1 and was not told to touch the system).
    Skipped,
    /// Tried and failed, with the reason.
    Failed(String),
}

/// What `Quiesce` did.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct QuiesceReport {
    /// `sync(2)` of all filesystems.
    pub sync: Applied,
    /// `3` written to `/proc/sys/vm/drop_caches`.
    pub drop_caches: Applied,
    /// Execs running at the time (their output is held until release).
    pub running_execs: u32,
}

/// What `Resume` did.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ResumeReport {
    /// `clock_settime(CLOCK_REALTIME)` to the host's time.
    pub clock: Applied,
    /// `RNDADDENTROPY` + `RNDRESEEDCRNG` with the host's bytes.
    pub entropy: Applied,
    /// Execs of the previous host that were killed and forgotten.
    pub dropped_execs: u32,
}

/// One host directory share for `Mount`: entry `index` of the virtio-fs device's root
/// directory, bind-mounted at `path`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ShareMount {
    /// Entry of the device's root (`0`, `1`, ...).
    pub index: u32,
    /// Absolute guest path to mount it at (created if missing).
    pub path: String,
    /// Mount read-only (the host refuses writes to a read-only share anyway).
    pub read_only: bool,
}

/// The guest side of the user-mode network (`NetUp`): fixed by the VMM, the same on every
/// run, so a resumed machine's settings never depend on the host.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's IPv4 address.
    pub address: [u8; 4],
    /// Its prefix length.
    pub prefix: u8,
    /// The default gateway.
    pub gateway: [u8; 4],
    /// The DNS server written to `/etc/resolv.conf`.
    pub dns: [u8; 4],
}

/// How a warm entrypoint (see [`WarmRequest`]) waits for its run.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmMode {
    /// Transparent: ready once it blocks reading its stdin; a run whose request equals the
    /// warm one gets its pipes.
    Stdin,
    /// Invocation protocol: ready once it connects to the invocation socket
    /// ([`crate::invoke`]); a run with the same program (`prefix` leading argv items),
    /// environment and directory is handed to it.
    Invoke,
}

/// A command the agent starts at build time and keeps, outside any exec, until a run
/// takes it over (docs/WARM.md).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WarmRequest {
    /// The command, as a run without arguments would send it (pipes, no terminal).
    pub exec: ExecRequest,
    pub mode: WarmMode,
    /// `Invoke` mode: how many leading argv items a run must share with `exec.argv`.
    pub prefix: u32,
}

/// Where a warm entrypoint stands (answer to `Warm`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum WarmState {
    /// Blocked reading its stdin (or waiting on the invocation socket): snapshot now.
    Ready { pid: u32 },
    /// It could not start, or ended before it was ready; the reason and its last output.
    Failed(String),
}

/// Messages from the host (VMM, tests) to the agent.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum HostMsg {
    /// Version handshake; the agent answers `Ready` (or `Error` and ends the session).
    Hello { version: u32 },
    /// Liveness check; answered by `Pong` with the same `req`.
    Ping { req: u32 },
    /// Start a command under the host-chosen `id`.
    Exec { id: ExecId, req: ExecRequest },
    /// Bytes for the command's stdin; needs stdin credit.
    Stdin {
        id: ExecId,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// No more stdin: closes the pipe (or sends the terminal's EOF character in TTY mode).
    StdinEof { id: ExecId },
    /// New terminal size (TTY mode only).
    Resize { id: ExecId, size: WinSize },
    /// Send signal number `signal` to the command.
    Signal { id: ExecId, signal: i32 },
    /// The host consumed `bytes` of `stream`: the agent may send that many more.
    Credit {
        id: ExecId,
        stream: Stream,
        bytes: u32,
    },
    /// Prepare for a snapshot: sync, drop caches, hold new work; answered by `Quiesced`.
    Quiesce { req: u32 },
    /// Release a quiesce without a restore; answered by `Unquiesced`.
    Unquiesce { req: u32 },
    /// A new host took over after a restore: set the clock, mix in entropy, release the quiesce.
    Resume {
        req: u32,
        now: WallClock,
        #[serde(with = "serde_bytes")]
        entropy: Vec<u8>,
    },
    /// Power off (or reboot) the machine; answered by `ShuttingDown`.
    Shutdown { req: u32, reboot: bool },
    /// Mount the virtio-fs device (tag `smolvm`) and bind-mount the shares; answered by
    /// `Mounted`. Sent after `Resume`; shares are never part of a snapshot.
    Mount { req: u32, shares: Vec<ShareMount> },
    /// Unmount every share (before a save); answered by `Unmounted`.
    Unmount { req: u32 },
    /// Open stream `id`: a TCP connection to `127.0.0.1:port` in the guest. Answered by
    /// `Connected` or `ConnectFailed`.
    Connect { id: StreamId, port: u16 },
    /// Bytes for the guest end of a stream; needs stream credit (`STREAM_WINDOW` at first).
    StreamData {
        id: StreamId,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The host end will send no more: the agent shuts the guest socket's write side down
    /// once the data before it is written (half-close).
    StreamEof { id: StreamId },
    /// The host delivered `bytes` of the stream's guest-to-host data: that many more may come.
    StreamCredit { id: StreamId, bytes: u32 },
    /// The host end is gone: close the guest socket at once, discarding what is buffered.
    /// Answered by `StreamClosed` (unless that was already sent).
    StreamClose { id: StreamId },
    /// Start a warm entrypoint and answer `WarmReady` once it waits for its run (or ended).
    /// The host enforces the timeout; one warm entrypoint at a time (a new one replaces it).
    Warm { req: u32, warm: WarmRequest },
    /// Bring the network card up: bind the driver to the (until now empty) virtio-mmio
    /// network slot, configure the interface and `/etc/resolv.conf`; answered by `NetReady`.
    NetUp { req: u32, config: NetConfig },
    /// Unbind the network card's driver (before a save: the saved machine has no card);
    /// answered by `NetDown`.
    NetDown { req: u32 },
}

/// Messages from the agent to the host.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum AgentMsg {
    /// The agent is serving: sent at session start, after `Resume`, and in answer to `Hello`.
    Ready { version: u32 },
    /// Answer to `Ping`.
    Pong { req: u32 },
    /// The command of exec `id` runs as process `pid`.
    Started { id: ExecId, pid: u32 },
    /// The command of exec `id` could not start; the id is free again.
    ExecFailed { id: ExecId, error: String },
    /// Output bytes; each consumes the stream's credit.
    Output {
        id: ExecId,
        stream: Stream,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The agent delivered `bytes` of stdin to the command: the host may send that many more.
    StdinCredit { id: ExecId, bytes: u32 },
    /// The command ended and all its output was sent; the id is free again.
    Exited { id: ExecId, status: ExitStatus },
    /// Answer to `Quiesce`: nothing more is sent until `Unquiesce`/`Resume` except answers.
    Quiesced { req: u32, report: QuiesceReport },
    /// Answer to `Unquiesce`.
    Unquiesced { req: u32 },
    /// Answer to `Resume` (followed by `Ready`).
    Resumed { req: u32, report: ResumeReport },
    /// Answer to `Shutdown`, sent just before the machine goes down.
    ShuttingDown { req: u32 },
    /// Fatal protocol error; the agent ends the session after sending it.
    Error { message: String },
    /// Answer to `Mount`: `error` says which share failed and why (the ones before it stay
    /// mounted).
    Mounted { req: u32, error: Option<String> },
    /// Answer to `Unmount`: `error` names a share still in use (files open on it).
    Unmounted { req: u32, error: Option<String> },
    /// Stream `id` is connected to its guest port.
    Connected { id: StreamId },
    /// Stream `id` could not connect (nothing listens on the port, too many streams); the
    /// id is free again.
    ConnectFailed { id: StreamId, error: String },
    /// Bytes from the guest end of a stream; each consumes the stream's credit.
    StreamData {
        id: StreamId,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The guest end will send no more (it shut down its write side or closed).
    StreamEof { id: StreamId },
    /// The agent wrote `bytes` of host data to the guest socket: that many more may come.
    StreamCredit { id: StreamId, bytes: u32 },
    /// Stream `id` is over (both ends finished, an error, or the host's `StreamClose`);
    /// nothing more is sent for it and the id is free again.
    StreamClosed { id: StreamId, error: Option<String> },
    /// Answer to `Warm`.
    WarmReady { req: u32, state: WarmState },
    /// Answer to `NetUp`: `error` says what failed.
    NetReady { req: u32, error: Option<String> },
    /// Answer to `NetDown`.
    NetDown { req: u32, error: Option<String> },
}

/// Encodes `msg` as one frame appended to `out`.
pub fn encode_frame<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let payload = postcard::to_stdvec(msg).map_err(ProtocolError::Encode)?;
    if payload.len() > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(payload.len()));
    }
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    // `len <= MAX_PAYLOAD` fits in u32.
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(())
}

/// Encodes `msg` as a standalone frame.
pub fn frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtocolError> {
    let mut out = Vec::new();
    encode_frame(msg, &mut out)?;
    Ok(out)
}

/// Validates a frame header and returns the payload length.
pub fn parse_header(header: &[u8; HEADER_LEN]) -> Result<usize, ProtocolError> {
    let magic = [header[0], header[1]];
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let len = u32::from_le_bytes([header[2], header[3], header[4], header[5]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes one message from a complete payload; the payload must hold exactly one message.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ProtocolError> {
    let (msg, rest) = postcard::take_from_bytes(payload).map_err(ProtocolError::Decode)?;
    if !rest.is_empty() {
        return Err(ProtocolError::TrailingBytes(rest.len()));
    }
    Ok(msg)
}

/// Reads one frame from a blocking reader. A clean end of stream before a header is `Closed`.
pub fn read_frame<R: Read + ?Sized, T: DeserializeOwned>(r: &mut R) -> Result<T, ProtocolError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Err(ProtocolError::Closed),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = parse_header(&header)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    decode_payload(&payload)
}

/// Incremental frame decoder for non-blocking readers: feed bytes, pull whole messages.
///
/// Memory stays bounded: the buffer never holds more than one maximal frame plus what the
/// caller fed in one call, because the header is checked as soon as it arrives.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    pos: usize,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends raw bytes read from the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 64 * 1024 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet returned as messages.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Returns the next complete message, `Ok(None)` if more bytes are needed. After an error
    /// the stream is out of sync and must be abandoned.
    pub fn next_msg<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ProtocolError> {
        let avail = &self.buf[self.pos..];
        if avail.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&avail[..HEADER_LEN]);
        let len = parse_header(&header)?;
        if avail.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let msg = decode_payload(&avail[HEADER_LEN..HEADER_LEN + len])?;
        self.pos += HEADER_LEN + len;
        Ok(Some(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip_and_header() {
        let msg = HostMsg::Stdin {
            id: 7,
            data: b"hello".to_vec(),
        };
        let buf = frame(&msg).unwrap();
        assert_eq!(&buf[..2], b"SM");
        let len = u32::from_le_bytes(buf[2..6].try_into().unwrap()) as usize;
        assert_eq!(len, buf.len() - HEADER_LEN);
        let back: HostMsg = read_frame(&mut &buf[..]).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn decoder_handles_byte_at_a_time() {
        let msgs = vec![
            AgentMsg::Ready {
                version: PROTOCOL_VERSION,
            },
            AgentMsg::Output {
                id: 1,
                stream: Stream::Stderr,
                data: vec![0xff; 1000],
            },
            AgentMsg::Exited {
                id: 1,
                status: ExitStatus::Signal(9),
            },
        ];
        let mut bytes = Vec::new();
        for m in &msgs {
            encode_frame(m, &mut bytes).unwrap();
        }
        let mut dec = FrameDecoder::new();
        let mut out = Vec::new();
        for b in bytes {
            dec.feed(&[b]);
            while let Some(m) = dec.next_msg::<AgentMsg>().unwrap() {
                out.push(m);
            }
        }
        assert_eq!(out, msgs);
        assert_eq!(dec.pending(), 0);
    }

    #[test]
    fn oversized_and_bad_magic_are_rejected_from_the_header() {
        let mut dec = FrameDecoder::new();
        dec.feed(b"SM\xff\xff\xff\x7f");
        assert!(matches!(
            dec.next_msg::<HostMsg>(),
            Err(ProtocolError::TooLarge(_))
        ));
        let mut dec = FrameDecoder::new();
        dec.feed(b"GET / HTTP/1.1\r\n");
        assert!(matches!(
            dec.next_msg::<HostMsg>(),
            Err(ProtocolError::BadMagic(_))
        ));
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut payload = postcard::to_stdvec(&HostMsg::Ping { req: 1 }).unwrap();
        payload.push(0);
        assert!(matches!(
            decode_payload::<HostMsg>(&payload),
            Err(ProtocolError::TrailingBytes(1))
        ));
    }

    #[test]
    fn wall_clock_before_epoch() {
        let t = UNIX_EPOCH - Duration::from_millis(1500);
        assert_eq!(
            WallClock::from(t),
            WallClock {
                secs: -2,
                nanos: 500_000_000
            }
        );
    }
}
