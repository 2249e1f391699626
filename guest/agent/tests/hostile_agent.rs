//! A hostile agent cannot grow host memory through the client: a fake agent on a socket pair
//! (the host side is a real `Client`) floods output past the credit window, frames for execs
//! that do not exist, answers nobody asked for and maximum-size frames. The client keeps at
//! most one window per stream and one answer per outstanding request, hangs up, and every
//! waiting call fails with the protocol error instead of hanging.
//!
//! The memory bounds are checked twice: by the client's own accounting (`Client::buffered`)
//! and by the process's resident set before and after (a generous bound, not a timing).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use smolvm_agent::agent::{run_session, HostSystem, SessionConfig};
use smolvm_agent::client::{Client, ClientError, MAX_STRAY_FRAMES, PROTOCOL_BROKEN};
use smolvm_agent::protocol::{
    frame, read_frame, AgentMsg, Applied, ExecRequest, ExitStatus, FrameDecoder, HostMsg,
    QuiesceReport, ResumeReport, Stream, HEADER_LEN, INITIAL_WINDOW, MAX_CHUNK, MAX_PAYLOAD,
    PROTOCOL_VERSION,
};

const GIB: u64 = 1 << 30;

/// Resident set size of this process, in bytes.
fn vm_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

/// The guest end of a socket pair, speaking just enough protocol to get a `Client` going.
struct FakeAgent {
    out: Arc<Mutex<UnixStream>>,
    execs: Receiver<u32>,
}

impl FakeAgent {
    /// Starts a client on one end and a fake agent on the other; returns after the handshake.
    fn start() -> (Client, FakeAgent) {
        let (host, guest) = UnixStream::pair().unwrap();
        let client = Client::from_unix_stream(host).unwrap();
        client.set_timeout(Some(Duration::from_secs(60)));
        let out = Arc::new(Mutex::new(guest.try_clone().unwrap()));
        let (tx, execs) = mpsc::channel();
        let reply = Arc::clone(&out);
        let mut input = guest;
        thread::spawn(move || {
            // Answers `Hello` and reports exec ids; everything else the host sends is read
            // and dropped so that the host's writer never blocks.
            while let Ok(msg) = read_frame::<_, HostMsg>(&mut input) {
                match msg {
                    HostMsg::Hello { .. } => {
                        let ready = AgentMsg::Ready {
                            version: PROTOCOL_VERSION,
                        };
                        let _ = reply.lock().unwrap().write_all(&frame(&ready).unwrap());
                    }
                    HostMsg::Exec { id, .. } => {
                        let _ = tx.send(id);
                    }
                    _ => {}
                }
            }
        });
        client.handshake().unwrap();
        (client, FakeAgent { out, execs })
    }

    fn send(&self, msg: &AgentMsg) {
        self.out
            .lock()
            .unwrap()
            .write_all(&frame(msg).unwrap())
            .unwrap();
    }

    /// Starts an exec on the client and tells it the command runs.
    fn exec(&self, client: &Client) -> smolvm_agent::client::ExecHandle {
        let h = client.exec(ExecRequest::new(["hostile"])).unwrap();
        assert_eq!(self.execs.recv().unwrap(), h.id());
        self.send(&AgentMsg::Started {
            id: h.id(),
            pid: 42,
        });
        h
    }

    /// Writes frames made by `next` until the host hangs up or `limit` bytes went out;
    /// returns the bytes written.
    fn flood(&self, limit: u64, mut next: impl FnMut(u64) -> Vec<u8>) -> u64 {
        let mut sent = 0u64;
        let mut i = 0;
        while sent < limit {
            let bytes = next(i);
            i += 1;
            if self.out.lock().unwrap().write_all(&bytes).is_err() {
                break;
            }
            sent += bytes.len() as u64;
        }
        sent
    }
}

/// The session ended because the agent broke the protocol.
fn assert_broken(e: ClientError) {
    match e {
        ClientError::Disconnected(m) => {
            assert!(m.starts_with(PROTOCOL_BROKEN), "wrong reason: {m}")
        }
        other => panic!("expected a protocol-abuse disconnect, got {other:?}"),
    }
}

/// The frame `make(len)` for the `len` that makes its payload exactly `MAX_PAYLOAD` bytes.
fn max_frame(make: impl Fn(usize) -> AgentMsg) -> Vec<u8> {
    // The fields around the variable part take well under 64 bytes.
    let mut len = MAX_PAYLOAD - 64;
    loop {
        let f = frame(&make(len)).unwrap();
        if f.len() == HEADER_LEN + MAX_PAYLOAD {
            return f;
        }
        len += HEADER_LEN + MAX_PAYLOAD - f.len();
    }
}

/// (a) Output past the credit window: the window is the most the host ever holds.
fn output_beyond_the_window() -> u64 {
    let (client, agent) = FakeAgent::start();
    let mut h = agent.exec(&client);
    let id = h.id();
    let chunk = frame(&AgentMsg::Output {
        id,
        stream: Stream::Stdout,
        data: vec![b'x'; MAX_CHUNK],
    })
    .unwrap();
    let pushed = agent.flood(GIB, |_| chunk.clone());
    assert!(
        pushed < GIB,
        "the client read 1 GiB of output past its window"
    );
    let b = client.buffered();
    assert!(b.max_stream_bytes <= INITIAL_WINDOW as usize, "{b:?}");
    assert_eq!(b.max_stream_bytes, INITIAL_WINDOW as usize, "{b:?}");
    assert_eq!(client.protocol_violations().beyond_window, 1);
    // The reader gets what was within the window, then the error.
    let mut stdout = h.take_stdout().unwrap();
    let mut got = Vec::new();
    let err = stdout.read_to_end(&mut got).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    assert!(err.to_string().contains(PROTOCOL_BROKEN), "{err}");
    assert_eq!(got.len(), INITIAL_WINDOW as usize);
    assert_broken(h.wait().unwrap_err());
    assert_broken(client.ping().unwrap_err());
    pushed
}

/// (b) Frames for exec ids the host never started or already saw finish.
fn frames_for_unknown_execs() -> u64 {
    let (client, agent) = FakeAgent::start();
    let h = agent.exec(&client);
    let done = h.id();
    agent.send(&AgentMsg::Exited {
        id: done,
        status: ExitStatus::Code(0),
    });
    assert_eq!(h.wait().unwrap(), ExitStatus::Code(0));
    // A waiting caller on a live exec must be released when the session ends.
    let live = agent.exec(&client);
    let pushed = thread::scope(|s| {
        let waiter = s.spawn(|| client.run_capture(["x"]));
        let pushed = agent.flood(GIB, |i| {
            let id = if i % 2 == 0 { done } else { 1000 + i as u32 };
            let msg = match i % 5 {
                0 => AgentMsg::Output {
                    id,
                    stream: Stream::Stderr,
                    data: vec![b'y'; MAX_CHUNK],
                },
                1 => AgentMsg::Started { id, pid: 1 },
                2 => AgentMsg::StdinCredit { id, bytes: 1 << 20 },
                3 => AgentMsg::ExecFailed {
                    id,
                    error: "e".repeat(1000),
                },
                _ => AgentMsg::Exited {
                    id,
                    status: ExitStatus::Code(1),
                },
            };
            frame(&msg).unwrap()
        });
        assert_broken(waiter.join().unwrap().unwrap_err());
        pushed
    });
    assert!(pushed < GIB);
    let v = client.protocol_violations();
    assert_eq!(v.unknown_exec, MAX_STRAY_FRAMES + 1, "{v:?}");
    assert_eq!(v.total(), v.unknown_exec);
    let b = client.buffered();
    assert_eq!(b.stream_bytes, 0, "{b:?}");
    assert!(b.execs <= 2, "{b:?}");
    assert_broken(live.wait().unwrap_err());
    pushed
}

/// (c) Answers of every kind to requests nobody made.
fn unsolicited_replies() -> u64 {
    let (client, agent) = FakeAgent::start();
    let pushed = thread::scope(|s| {
        // An outstanding request the agent never answers: it must fail, not hang.
        let ping = s.spawn(|| client.ping());
        let pushed = agent.flood(GIB, |i| {
            let req = 1_000_000 + i as u32;
            let msg = match i % 5 {
                0 => AgentMsg::Pong { req },
                1 => AgentMsg::Quiesced {
                    req,
                    report: QuiesceReport {
                        sync: Applied::Applied,
                        drop_caches: Applied::Failed("x".repeat(4096)),
                        running_execs: 0,
                    },
                },
                2 => AgentMsg::Unquiesced { req },
                3 => AgentMsg::Resumed {
                    req,
                    report: ResumeReport {
                        clock: Applied::Skipped,
                        entropy: Applied::Skipped,
                        dropped_execs: 0,
                    },
                },
                _ => AgentMsg::ShuttingDown { req },
            };
            frame(&msg).unwrap()
        });
        assert_broken(ping.join().unwrap().unwrap_err());
        pushed
    });
    assert!(pushed < GIB);
    let v = client.protocol_violations();
    assert_eq!(v.unsolicited_reply, MAX_STRAY_FRAMES + 1, "{v:?}");
    assert_eq!(client.buffered().replies, 0);
    pushed
}

/// (d) Frames at the maximum size, and one header past it.
fn maximum_size_frames() -> u64 {
    // Output of a full frame is four windows: over the credit at once.
    let (client, agent) = FakeAgent::start();
    let h = agent.exec(&client);
    let id = h.id();
    let big = max_frame(|len| AgentMsg::Output {
        id,
        stream: Stream::Stdout,
        data: vec![0xa5; len],
    });
    let mut pushed = agent.flood(GIB, |_| big.clone());
    assert!(pushed < GIB);
    assert_eq!(client.protocol_violations().beyond_window, 1);
    assert_eq!(client.buffered().stream_bytes, 0);
    assert_broken(h.wait().unwrap_err());

    // Maximum-size failures for execs that do not exist: dropped, then the session ends.
    let (client, agent) = FakeAgent::start();
    let f = max_frame(|len| AgentMsg::ExecFailed {
        id: 77,
        error: "z".repeat(len),
    });
    pushed += agent.flood(GIB, |_| f.clone());
    assert_eq!(
        client.protocol_violations().unknown_exec,
        MAX_STRAY_FRAMES + 1
    );
    assert_broken(client.ping().unwrap_err());

    // A maximum-size `Error` ends the session at once; what follows is not read.
    let (client, agent) = FakeAgent::start();
    let e = max_frame(|len| AgentMsg::Error {
        message: "e".repeat(len),
    });
    pushed += agent.flood(GIB, |_| e.clone());
    assert!(matches!(client.ping(), Err(ClientError::Agent(m)) if m.len() < MAX_PAYLOAD));
    assert_eq!(client.protocol_violations().total(), 0);

    // A length one past the limit: rejected from the header, nothing allocated for it.
    let (client, agent) = FakeAgent::start();
    let mut header = b"SM".to_vec();
    header.extend_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
    pushed += agent.flood(GIB, |_| header.clone());
    assert_eq!(client.protocol_violations().bad_frame, 1);
    assert_broken(client.ping().unwrap_err());
    pushed
}

#[test]
fn hostile_floods_end_the_session_and_keep_memory_bounded() {
    let before = vm_rss();
    let mut pushed = 0;
    for _ in 0..4 {
        pushed += output_beyond_the_window();
        pushed += frames_for_unknown_execs();
        pushed += unsolicited_replies();
        pushed += maximum_size_frames();
    }
    let grown = vm_rss().saturating_sub(before);
    eprintln!(
        "hostile floods: {pushed} bytes written before the client hung up, RSS grew {} KiB",
        grown / 1024
    );
    // Each session holds at most a window per stream plus one frame being decoded; the
    // floods above, repeated, must not add up.
    assert!(grown < 64 << 20, "RSS grew by {grown} bytes");
}

/// A reader that plays a well-formed agent stream: `Started`, then `total` bytes of output
/// in `MAX_CHUNK` frames (never waiting for credit), then `Exited`; it starts only when told.
struct Generator {
    go: Option<Receiver<u32>>,
    id: u32,
    frame: Vec<u8>,
    left: u64,
    buf: Vec<u8>,
    pos: usize,
    done: bool,
}

impl Read for Generator {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if let Some(go) = self.go.take() {
            self.id = go.recv().unwrap_or(0);
            self.frame = frame(&AgentMsg::Output {
                id: self.id,
                stream: Stream::Stdout,
                data: vec![b'g'; MAX_CHUNK],
            })
            .unwrap();
            self.buf = frame(&AgentMsg::Started {
                id: self.id,
                pid: 7,
            })
            .unwrap();
        }
        if self.pos == self.buf.len() {
            self.pos = 0;
            if self.left > 0 {
                self.buf.clone_from(&self.frame);
                self.left -= MAX_CHUNK as u64;
            } else if !self.done {
                self.done = true;
                self.buf = frame(&AgentMsg::Exited {
                    id: self.id,
                    status: ExitStatus::Code(0),
                })
                .unwrap();
            } else {
                return Ok(0);
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Counts the credit the host sends back.
struct CreditCounter {
    decoder: FrameDecoder,
    credited: Sender<u64>,
}

impl Write for CreditCounter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.decoder.feed(buf);
        while let Ok(Some(msg)) = self.decoder.next_msg::<HostMsg>() {
            if let HostMsg::Credit { bytes, .. } = msg {
                let _ = self.credited.send(u64::from(bytes));
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_gibibyte_of_output_nobody_reads_passes_through_bounded_memory() {
    // The agent streams 1 GiB for an exec whose handle was dropped: the client credits each
    // frame back as it arrives and keeps none of it.
    let (go_tx, go) = mpsc::channel();
    let (credited_tx, credited) = mpsc::channel();
    let gen = Generator {
        go: Some(go),
        id: 0,
        frame: Vec::new(),
        left: GIB,
        buf: Vec::new(),
        pos: 0,
        done: false,
    };
    let client = Client::new(
        gen,
        CreditCounter {
            decoder: FrameDecoder::new(),
            credited: credited_tx,
        },
    )
    .unwrap();
    let before = vm_rss();
    let h = client.exec(ExecRequest::new(["yes"])).unwrap();
    let id = h.id();
    drop(h);
    go_tx.send(id).unwrap();
    let mut total = 0;
    let mut max_buffered = 0;
    while total < GIB {
        total += credited.recv_timeout(Duration::from_secs(120)).unwrap();
        max_buffered = max_buffered.max(client.buffered().max_stream_bytes);
    }
    assert_eq!(total, GIB);
    assert_eq!(max_buffered, 0);
    assert_eq!(client.protocol_violations().total(), 0);
    let grown = vm_rss().saturating_sub(before);
    eprintln!(
        "1 GiB discarded through the client: RSS grew {} KiB",
        grown / 1024
    );
    assert!(grown < 64 << 20, "RSS grew by {grown} bytes");
}

#[test]
fn the_real_agent_streams_64_mib_within_the_window() {
    let (host, guest) = UnixStream::pair().unwrap();
    thread::spawn(move || run_session(guest, &mut HostSystem, &SessionConfig::default()));
    let client = Client::from_unix_stream(host).unwrap();
    client.set_timeout(Some(Duration::from_secs(60)));
    client.handshake().unwrap();
    const TOTAL: usize = 64 << 20;
    let mut h = client
        .exec(ExecRequest::new([
            "sh",
            "-c",
            &format!("yes 0123456789abcdef | head -c {TOTAL}"),
        ]))
        .unwrap();
    h.close_stdin().unwrap();
    let mut stdout = h.take_stdout().unwrap();
    let mut buf = vec![0u8; 48 * 1024];
    let mut got = 0usize;
    let mut max_buffered = 0;
    loop {
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        // "0123456789abcdef\n" repeated: every byte is determined by its offset.
        for (k, b) in buf[..n].iter().enumerate() {
            let want = b"0123456789abcdef\n"[(got + k) % 17];
            assert_eq!(*b, want, "byte {} differs", got + k);
        }
        got += n;
        max_buffered = max_buffered.max(client.buffered().max_stream_bytes);
    }
    drop(stdout);
    assert_eq!(h.wait().unwrap(), ExitStatus::Code(0));
    assert_eq!(got, TOTAL);
    assert!(max_buffered <= INITIAL_WINDOW as usize);
    assert_eq!(client.protocol_violations().total(), 0);
    assert_eq!(client.buffered().execs, 0);
}

#[test]
fn a_late_answer_to_a_request_that_timed_out_is_not_a_violation() {
    let (client, agent) = FakeAgent::start();
    client.set_timeout(Some(Duration::from_millis(50)));
    // The fake agent never answers pings by itself.
    assert!(matches!(client.ping(), Err(ClientError::Timeout(..))));
    let seen = client.ready_count();
    agent.send(&AgentMsg::Pong { req: 1 });
    agent.send(&AgentMsg::Pong { req: 1 });
    agent.send(&AgentMsg::Ready {
        version: PROTOCOL_VERSION,
    });
    // Frames are handled in order: once the `Ready` counted, both answers were.
    let mut polls = 0;
    while client.ready_count() == seen {
        polls += 1;
        assert!(polls < 12_000, "the client never handled the frames");
        thread::sleep(Duration::from_millis(5));
    }
    let v = client.protocol_violations();
    assert_eq!((v.unsolicited_reply, v.total()), (1, 1), "{v:?}");
    assert_eq!(client.buffered().replies, 0);
}
