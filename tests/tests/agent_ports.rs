//! Port-forward streams through the agent, no VM: an agent session over a socket pair
//! connects to TCP servers on this host's loopback, as it does to guest ports inside a
//! machine. Bytes exact both ways, half-close, refused ports, backpressure, quiesce and
//! resume.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use smolvm_agent::agent::{run_session, HostSystem, SessionConfig, SessionEnd};
use smolvm_agent::client::{Client, ClientError, PortStream, TX_DATA_QUEUE};
use smolvm_agent::protocol::{read_frame, HostMsg, WallClock, PROTOCOL_VERSION, STREAM_WINDOW};

const WAIT: Option<Duration> = Some(Duration::from_secs(30));

fn agent() -> (Client, thread::JoinHandle<SessionEnd>) {
    let (host, guest) = UnixStream::pair().unwrap();
    let t = thread::spawn(move || run_session(guest, &mut HostSystem, &SessionConfig::default()));
    let c = Client::from_unix_stream(host).unwrap();
    c.set_timeout(WAIT);
    assert_eq!(c.handshake().unwrap(), PROTOCOL_VERSION);
    (c, t)
}

fn read_all(s: &PortStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 50_000];
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// An echo server: each connection gets back what it sent, then its write side is shut
/// once the client half-closed.
fn echo_server() -> (u16, thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let t = thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { return };
            thread::spawn(move || {
                let mut buf = vec![0u8; 32 << 10];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if c.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = c.shutdown(Shutdown::Write);
            });
        }
    });
    (port, t)
}

#[test]
fn bytes_are_exact_both_ways_with_half_close() {
    let (c, t) = agent();
    let (port, _srv) = echo_server();
    let s = Arc::new(c.connect_port(port).unwrap());
    s.wait_connected(WAIT).unwrap();
    // More than one window each way, so credit has to flow.
    let data = pattern(3 * STREAM_WINDOW as usize + 12_345, 7);
    let w = {
        let s = s.clone();
        let data = data.clone();
        thread::spawn(move || {
            s.write_all(&data).unwrap();
            s.shutdown_write().unwrap();
        })
    };
    let got = read_all(&s);
    w.join().unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "echoed bytes differ");
    // Both ends finished: the agent closes the stream by itself.
    drop(s);
    c.port_connector()
        .wait_all_closed(Duration::from_secs(30))
        .unwrap();
    assert_eq!(c.protocol_violations().total(), 0);
    drop(c);
    assert_eq!(t.join().unwrap(), SessionEnd::Closed);
}

#[test]
fn a_guest_end_that_only_writes_then_reads_after_half_close() {
    // The server sends a greeting, then reads until EOF and answers with the byte count:
    // half-close in the host-to-guest direction must not end the other.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let srv = thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        c.write_all(b"hello\n").unwrap();
        let mut all = Vec::new();
        c.read_to_end(&mut all).unwrap();
        c.write_all(format!("{}\n", all.len()).as_bytes()).unwrap();
    });
    let (c, _t) = agent();
    let s = c.connect_port(port).unwrap();
    s.wait_connected(WAIT).unwrap();
    s.write_all(&pattern(200_000, 1)).unwrap();
    s.shutdown_write().unwrap();
    assert_eq!(read_all(&s), b"hello\n200000\n");
    srv.join().unwrap();
}

#[test]
fn nothing_listening_fails_the_connect_at_once() {
    let (c, _t) = agent();
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let s = c.connect_port(port).unwrap();
    match s.wait_connected(WAIT) {
        Err(ClientError::ConnectFailed(why)) => assert!(why.contains("refused"), "{why}"),
        other => panic!("expected a refused connection, got {other:?}"),
    }
    drop(s);
    assert_eq!(c.port_connector().open_streams(), 0);
    c.ping().unwrap();
}

#[test]
fn many_streams_at_once_keep_their_bytes_apart() {
    let (c, _t) = agent();
    let (port, _srv) = echo_server();
    let handles: Vec<_> = (0..20u8)
        .map(|i| {
            let conn = c.port_connector();
            thread::spawn(move || {
                let s = Arc::new(conn.connect(port).unwrap());
                s.wait_connected(WAIT).unwrap();
                let data = pattern(150_000 + usize::from(i) * 1000, i);
                let w = {
                    let (s, data) = (s.clone(), data.clone());
                    thread::spawn(move || {
                        s.write_all(&data).unwrap();
                        s.shutdown_write().unwrap();
                    })
                };
                let got = read_all(&s);
                w.join().unwrap();
                assert!(got == data, "stream {i} differs");
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(c.protocol_violations().total(), 0);
}

/// The host's end of the channel, held shut until `open` is set: frames wait in the client.
/// Everything written is also kept in `sent`, to read back in order.
struct GatedWriter {
    inner: UnixStream,
    open: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    sent: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Write for GatedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (m, cv) = &*self.open;
        let mut open = m.lock().unwrap();
        while !*open {
            open = cv.wait(open).unwrap();
        }
        drop(open);
        let n = self.inner.write(buf)?;
        self.sent.lock().unwrap().extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[test]
fn a_slow_channel_queues_a_bounded_amount_across_streams() {
    // 22 streams with a full window each to send, and a channel that takes nothing: the
    // client queues at most TX_DATA_QUEUE of their data (not 22 windows), so each stream's
    // next chunk waits behind a bounded amount of the others'. Opened, all bytes arrive,
    // and the queue lets senders in in the order they asked: of the 20 that waited, every
    // one's first chunk goes out before any one's second.
    let (host, guest) = UnixStream::pair().unwrap();
    let _agent =
        thread::spawn(move || run_session(guest, &mut HostSystem, &SessionConfig::default()));
    let open = Arc::new((std::sync::Mutex::new(true), std::sync::Condvar::new()));
    let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
    let writer = GatedWriter {
        inner: host.try_clone().unwrap(),
        open: open.clone(),
        sent: sent.clone(),
    };
    let c = Client::new(host, writer).unwrap();
    c.set_timeout(WAIT);
    assert_eq!(c.handshake().unwrap(), PROTOCOL_VERSION);
    let (port, _srv) = echo_server();
    let streams: Vec<_> = (0..22u8)
        .map(|_| {
            let s = Arc::new(c.connect_port(port).unwrap());
            s.wait_connected(WAIT).unwrap();
            s
        })
        .collect();
    *open.0.lock().unwrap() = false;
    let size = STREAM_WINDOW as usize;
    let send = |i: usize| {
        let s = streams[i].clone();
        thread::spawn(move || {
            s.write_all(&pattern(size, i as u8)).unwrap();
            s.shutdown_write().unwrap();
        })
    };
    let wait_until = |what: &str, ok: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: {:?}",
                c.buffered()
            );
            thread::sleep(Duration::from_millis(2));
        }
    };
    // Two streams fill the queue (a window is two chunks): the others must wait in line.
    let mut writers: Vec<_> = (0..2).map(send).collect();
    wait_until("the queue fills", &|| {
        c.buffered().queued_to_agent == TX_DATA_QUEUE
    });
    writers.extend((2..22).map(send));
    wait_until("20 senders wait", &|| c.buffered().senders_waiting == 20);
    thread::sleep(Duration::from_millis(50));
    assert_eq!(c.buffered().queued_to_agent, TX_DATA_QUEUE);
    assert_eq!(c.buffered().senders_waiting, 20);
    *open.0.lock().unwrap() = true;
    open.1.notify_all();
    let readers: Vec<_> = streams
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let s = s.clone();
            thread::spawn(move || assert!(read_all(&s) == pattern(size, i as u8), "stream {i}"))
        })
        .collect();
    for t in writers.into_iter().chain(readers) {
        t.join().unwrap();
    }
    assert_eq!(c.buffered().queued_to_agent, 0);
    assert_eq!(c.protocol_violations().total(), 0);
    // The streams' data frames in the order they were written to the agent.
    let sent = sent.lock().unwrap().clone();
    let mut frames = std::io::Cursor::new(sent);
    let mut order = Vec::new();
    while (frames.position() as usize) < frames.get_ref().len() {
        if let HostMsg::StreamData { id, .. } = read_frame::<_, HostMsg>(&mut frames).unwrap() {
            order.push(id);
        }
    }
    // The 20 that waited: each got in line for its first chunk before any could ask again.
    let ids: std::collections::BTreeSet<_> = streams[2..].iter().map(|s| s.id()).collect();
    let last_first = ids
        .iter()
        .map(|id| {
            order
                .iter()
                .position(|o| o == id)
                .expect("every stream sent")
        })
        .max()
        .unwrap();
    let first_second = ids
        .iter()
        .filter_map(|id| order.iter().enumerate().filter(|(_, o)| *o == id).nth(1))
        .map(|(i, _)| i)
        .min()
        .unwrap();
    assert!(
        last_first < first_second,
        "a stream's second chunk went out (frame {first_second}) before another's first \
         (frame {last_first})"
    );
}

#[test]
fn a_reader_that_stops_bounds_what_the_host_buffers() {
    // The server floods; the host side never reads: the client holds at most one window.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let chunk = vec![0x5a; 64 << 10];
        while c.write_all(&chunk).is_ok() {}
    });
    let (c, _t) = agent();
    let s = c.connect_port(port).unwrap();
    s.wait_connected(WAIT).unwrap();
    // Wait until the window is used up (the agent then stops reading the socket).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while c.buffered().port_bytes < STREAM_WINDOW as usize {
        assert!(std::time::Instant::now() < deadline, "no data arrived");
        thread::sleep(Duration::from_millis(5));
    }
    for _ in 0..20 {
        c.ping().unwrap();
        assert_eq!(c.buffered().port_bytes, STREAM_WINDOW as usize);
    }
    // Reading some lets exactly that much more in.
    let mut buf = vec![0u8; 1000];
    assert_eq!(s.read(&mut buf).unwrap(), 1000);
    drop(s);
    c.port_connector()
        .wait_all_closed(Duration::from_secs(30))
        .unwrap();
    assert_eq!(c.buffered().port_bytes, 0);
}

#[test]
fn quiesce_holds_stream_data_and_resume_closes_streams() {
    let (c, _t) = agent();
    let (port, _srv) = echo_server();
    let s = c.connect_port(port).unwrap();
    s.wait_connected(WAIT).unwrap();
    c.quiesce().unwrap();
    s.write_all(b"held").unwrap();
    c.ping().unwrap();
    assert_eq!(c.buffered().port_bytes, 0, "nothing moves while quiesced");
    c.unquiesce().unwrap();
    let mut buf = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        got += s.read(&mut buf[got..]).unwrap();
    }
    assert_eq!(&buf, b"held");
    // A resume (a new host) closes the previous host's streams.
    c.resume(WallClock::now(), &[]).unwrap();
    assert_eq!(read_all(&s), b"");
    drop(s);
    c.port_connector()
        .wait_all_closed(Duration::from_secs(30))
        .unwrap();
}

#[test]
fn abort_closes_a_stream_whose_guest_end_never_finishes() {
    // A server that reads forever and never writes or closes on its own.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let srv = thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut all = Vec::new();
        let _ = c.read_to_end(&mut all);
        all
    });
    let (c, _t) = agent();
    let s = Arc::new(c.connect_port(port).unwrap());
    s.wait_connected(WAIT).unwrap();
    s.write_all(b"partial request").unwrap();
    let reader = {
        let s = s.clone();
        thread::spawn(move || read_all(&s))
    };
    s.abort();
    assert_eq!(reader.join().unwrap(), b"", "a reader stops at once");
    assert!(s.write_all(b"more").is_err());
    c.port_connector()
        .wait_all_closed(Duration::from_secs(30))
        .unwrap();
    assert_eq!(srv.join().unwrap(), b"partial request");
    drop(s);
    assert_eq!(c.port_connector().open_streams(), 0);
    assert_eq!(c.protocol_violations().total(), 0);
}
