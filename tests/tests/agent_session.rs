//! Agent session control over Unix sockets, no VM: handshake, quiesce, resume, shutdown,
//! protocol errors and recovery.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::thread;

use smolvm_agent::agent::{run_session, HostSystem, SessionConfig, SessionEnd, System};
use smolvm_agent::client::{Client, ClientError};
use smolvm_agent::protocol::{
    frame, read_frame, AgentMsg, Applied, ExecRequest, ExitStatus, HostMsg, WallClock,
    INITIAL_WINDOW, MAX_PAYLOAD, PROTOCOL_VERSION,
};

#[derive(Default)]
struct Record {
    clocks: Vec<WallClock>,
    entropy: Vec<Vec<u8>>,
    quiesces: u32,
}

/// A system that records what the agent asked of it instead of touching the host.
struct Recorder(Arc<Mutex<Record>>);

impl System for Recorder {
    fn quiesce(&mut self) -> (Applied, Applied) {
        self.0.lock().unwrap().quiesces += 1;
        (Applied::Applied, Applied::Applied)
    }
    fn set_clock(&mut self, now: WallClock) -> Applied {
        self.0.lock().unwrap().clocks.push(now);
        Applied::Applied
    }
    fn add_entropy(&mut self, bytes: &[u8]) -> Applied {
        self.0.lock().unwrap().entropy.push(bytes.to_vec());
        Applied::Applied
    }
}

fn agent_with(system: impl System + Send + 'static) -> (Client, thread::JoinHandle<SessionEnd>) {
    let (host, guest) = UnixStream::pair().unwrap();
    let mut system = system;
    let t = thread::spawn(move || run_session(guest, &mut system, &SessionConfig::default()));
    let c = Client::from_unix_stream(host).unwrap();
    assert_eq!(c.handshake().unwrap(), PROTOCOL_VERSION);
    (c, t)
}

#[test]
fn handshake_and_ping() {
    let (c, t) = agent_with(HostSystem);
    c.ping().unwrap();
    c.ping().unwrap();
    // One Ready at session start, one per Hello.
    assert!(c.ready_count() >= 1);
    drop(c);
    assert_eq!(t.join().unwrap(), SessionEnd::Closed);
}

#[test]
fn quiesce_holds_new_work_until_unquiesce() {
    let rec = Arc::new(Mutex::new(Record::default()));
    let (c, t) = agent_with(Recorder(rec.clone()));
    let report = c.quiesce().unwrap();
    assert_eq!(report.sync, Applied::Applied);
    assert_eq!(report.drop_caches, Applied::Applied);
    assert_eq!(rec.lock().unwrap().quiesces, 1);

    let h = c.exec(ExecRequest::new(["echo", "held"])).unwrap();
    // The agent handles frames in order: after this answer it has seen the exec.
    c.ping().unwrap();
    assert_eq!(h.try_pid(), None, "exec must be held while quiesced");
    c.unquiesce().unwrap();
    let out = h.wait_with_output().unwrap();
    assert_eq!(out.stdout, b"held\n");
    assert_eq!(out.status, ExitStatus::Code(0));
    drop(c);
    assert_eq!(t.join().unwrap(), SessionEnd::Closed);
}

#[test]
fn host_system_skips_privileged_steps() {
    let (c, t) = agent_with(HostSystem);
    let q = c.quiesce().unwrap();
    assert_eq!(q.sync, Applied::Applied);
    assert_eq!(q.drop_caches, Applied::Skipped);
    let r = c.resume(WallClock::now(), &[7u8; 32]).unwrap();
    assert_eq!(r.clock, Applied::Skipped);
    assert_eq!(r.entropy, Applied::Skipped);
    drop(c);
    t.join().unwrap();
}

#[test]
fn resume_applies_clock_and_entropy_then_announces_ready() {
    let rec = Arc::new(Mutex::new(Record::default()));
    let (c, t) = agent_with(Recorder(rec.clone()));
    // A command of the "previous host" that is still running at snapshot time.
    let old = c.exec(ExecRequest::new(["sleep", "1000"])).unwrap();
    old.pid().unwrap();
    c.quiesce().unwrap();
    let held = c.exec(ExecRequest::new(["echo", "x"])).unwrap();
    c.ping().unwrap();

    let ready_before = c.ready_count();
    let now = WallClock {
        secs: 1_900_000_000,
        nanos: 123_456_789,
    };
    let entropy: Vec<u8> = (0..=255u8).collect();
    let report = c.resume(now, &entropy).unwrap();
    assert_eq!(report.clock, Applied::Applied);
    assert_eq!(report.entropy, Applied::Applied);
    assert_eq!(report.dropped_execs, 2);
    assert!(c.ready_count() > ready_before, "Ready must follow Resume");
    {
        let r = rec.lock().unwrap();
        assert_eq!(r.clocks, vec![now]);
        assert_eq!(r.entropy, vec![entropy.clone()]);
    }
    // Work runs again after the resume.
    assert_eq!(c.run_capture(["echo", "after"]).unwrap().stdout, b"after\n");
    drop((old, held));
    drop(c);
    assert_eq!(t.join().unwrap(), SessionEnd::Closed);
}

/// A system whose clock and entropy steps leave a file a command can read, so a test sees
/// what a command started right after a resume observes.
struct Marker(std::path::PathBuf);

impl System for Marker {
    fn quiesce(&mut self) -> (Applied, Applied) {
        (Applied::Applied, Applied::Applied)
    }
    fn set_clock(&mut self, now: WallClock) -> Applied {
        std::fs::write(self.0.join("clock"), format!("{}.{}", now.secs, now.nanos)).unwrap();
        Applied::Applied
    }
    fn add_entropy(&mut self, bytes: &[u8]) -> Applied {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(self.0.join("entropy"), hex).unwrap();
        Applied::Applied
    }
}

#[test]
fn a_command_sent_behind_resume_sees_its_clock_and_entropy() {
    let dir = tempfile::tempdir().unwrap();
    let (c, t) = agent_with(Marker(dir.path().to_owned()));
    let old = c.exec(ExecRequest::new(["sleep", "1000"])).unwrap();
    let old_pid = old.pid().unwrap() as i32;
    c.quiesce().unwrap();

    // The pipelined order of `smolvm run`: Resume, then at once the command, then the
    // answer. The command must run after the clock and entropy steps and must survive the
    // dropping of the snapshot's execs.
    let now = WallClock {
        secs: 1_900_000_001,
        nanos: 42,
    };
    let entropy = [0x5au8; 16];
    let pending = c.resume_start(now, &entropy).unwrap();
    let d = dir.path().display();
    let mut req = ExecRequest::new(["sh", "-c", "cat \"$0/clock\"; echo; cat \"$0/entropy\""]);
    req.argv.push(d.to_string());
    let h = c.exec(req).unwrap();
    h.close_stdin().unwrap();
    let report = c.resume_finish(pending).unwrap();
    assert_eq!(report.clock, Applied::Applied);
    assert_eq!(report.entropy, Applied::Applied);
    assert_eq!(
        report.dropped_execs, 1,
        "only the snapshot's exec is dropped"
    );
    let out = h.wait_with_output().unwrap();
    assert_eq!(out.status, ExitStatus::Code(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("1900000001.42\n{}", "5a".repeat(16))
    );
    // SAFETY: kill with signal 0 only checks for existence.
    let alive = unsafe { libc::kill(old_pid, 0) } == 0;
    assert!(
        !alive,
        "the snapshot's command {old_pid} outlived the resume"
    );
    drop(old);
    drop(c);
    assert_eq!(t.join().unwrap(), SessionEnd::Closed);
}

#[test]
fn oversized_entropy_is_refused_by_the_client() {
    let (c, t) = agent_with(HostSystem);
    assert!(matches!(
        c.resume(WallClock::now(), &vec![0u8; 5000]),
        Err(ClientError::Invalid(_))
    ));
    drop(c);
    t.join().unwrap();
}

#[test]
fn shutdown_ends_the_session_with_the_request() {
    let (c, t) = agent_with(HostSystem);
    c.shutdown(true).unwrap();
    assert_eq!(t.join().unwrap(), SessionEnd::Shutdown { reboot: true });
    let (c2, t2) = agent_with(HostSystem);
    c2.shutdown(false).unwrap();
    assert_eq!(t2.join().unwrap(), SessionEnd::Shutdown { reboot: false });
    drop(c);
}

#[test]
fn closing_the_session_kills_its_commands() {
    let (c, t) = agent_with(HostSystem);
    let h = c.exec(ExecRequest::new(["sleep", "1000"])).unwrap();
    let pid = h.pid().unwrap() as i32;
    drop(h);
    drop(c);
    assert_eq!(t.join().unwrap(), SessionEnd::Closed);
    // SAFETY: kill with signal 0 only checks for existence.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    assert!(!alive, "command {pid} outlived its session");
}

/// Reads agent frames until the stream ends; returns them.
fn drain(mut s: UnixStream) -> Vec<AgentMsg> {
    let mut v = Vec::new();
    while let Ok(m) = read_frame::<_, AgentMsg>(&mut s) {
        v.push(m);
    }
    v
}

fn expect_error(msgs: &[AgentMsg], needle: &str) {
    let err = msgs.iter().find_map(|m| match m {
        AgentMsg::Error { message } => Some(message.clone()),
        _ => None,
    });
    let err = err.unwrap_or_else(|| panic!("no Error frame in {msgs:?}"));
    assert!(err.contains(needle), "{err:?} lacks {needle:?}");
}

#[test]
fn malformed_frame_ends_the_session_but_the_agent_serves_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        let mut ends = Vec::new();
        for _ in 0..4 {
            let (s, _) = listener.accept().unwrap();
            ends.push(run_session(s, &mut HostSystem, &SessionConfig::default()));
        }
        ends
    });

    // 1: garbage that is not even a frame header.
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let msgs = drain(s);
    assert!(matches!(msgs[0], AgentMsg::Ready { .. }));
    expect_error(&msgs, "magic");

    // 2: a valid header with a payload that is no message (unknown variant 200).
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(&[b'S', b'M', 2, 0, 0, 0, 200, 1]).unwrap();
    expect_error(&drain(s), "decode");

    // 3: a header announcing more than the limit; nothing is allocated for it.
    let mut s = UnixStream::connect(&path).unwrap();
    let mut hdr = b"SM".to_vec();
    hdr.extend_from_slice(&((MAX_PAYLOAD as u32) + 1).to_le_bytes());
    s.write_all(&hdr).unwrap();
    expect_error(&drain(s), "limit");

    // 4: the agent still serves a well-behaved host.
    let c = Client::connect_unix(&path, None).unwrap();
    assert_eq!(
        c.run_capture(["echo", "still here"]).unwrap().stdout,
        b"still here\n"
    );
    drop(c);

    let ends = server.join().unwrap();
    assert!(matches!(ends[0], SessionEnd::Failed(_)));
    assert!(matches!(ends[1], SessionEnd::Failed(_)));
    assert!(matches!(ends[2], SessionEnd::Failed(_)));
    assert_eq!(ends[3], SessionEnd::Closed);
}

#[test]
fn version_mismatch_is_refused_clearly() {
    let (mut host, guest) = UnixStream::pair().unwrap();
    let t = thread::spawn(move || run_session(guest, &mut HostSystem, &SessionConfig::default()));
    host.write_all(&frame(&HostMsg::Hello { version: 99 }).unwrap())
        .unwrap();
    let msgs = drain(host);
    expect_error(&msgs, "version 99");
    assert!(matches!(t.join().unwrap(), SessionEnd::Failed(_)));
}

#[test]
fn stdin_beyond_credit_is_a_protocol_error() {
    let (mut host, guest) = UnixStream::pair().unwrap();
    let t = thread::spawn(move || run_session(guest, &mut HostSystem, &SessionConfig::default()));
    // `sleep` never reads stdin, so the agent must buffer all of it: more than the window.
    let mut bytes = frame(&HostMsg::Exec {
        id: 1,
        req: ExecRequest::new(["sleep", "1000"]),
    })
    .unwrap();
    let chunk = vec![0u8; 64 * 1024];
    for _ in 0..(INITIAL_WINDOW as usize / chunk.len() + 4) {
        bytes.extend(
            frame(&HostMsg::Stdin {
                id: 1,
                data: chunk.clone(),
            })
            .unwrap(),
        );
    }
    let writer = {
        let mut host = host.try_clone().unwrap();
        thread::spawn(move || {
            let _ = host.write_all(&bytes);
        })
    };
    let msgs = drain(host.try_clone().unwrap());
    expect_error(&msgs, "credit");
    writer.join().unwrap();
    assert!(matches!(t.join().unwrap(), SessionEnd::Failed(_)));
    let _ = host.read(&mut [0u8; 1]);
}

#[test]
fn signal_to_a_held_exec_cancels_it() {
    let (c, t) = agent_with(HostSystem);
    c.quiesce().unwrap();
    let h = c.exec(ExecRequest::new(["echo", "never"])).unwrap();
    h.signal(libc::SIGKILL).unwrap();
    c.unquiesce().unwrap();
    assert!(h.pid().is_err());
    assert_eq!(h.wait().unwrap(), ExitStatus::Signal(libc::SIGKILL));
    drop(c);
    t.join().unwrap();
}

#[test]
fn duplicate_exec_ids_are_rejected() {
    let (mut host, guest) = UnixStream::pair().unwrap();
    let t = thread::spawn(move || run_session(guest, &mut HostSystem, &SessionConfig::default()));
    let req = ExecRequest::new(["sleep", "1000"]);
    host.write_all(
        &frame(&HostMsg::Exec {
            id: 5,
            req: req.clone(),
        })
        .unwrap(),
    )
    .unwrap();
    host.write_all(&frame(&HostMsg::Exec { id: 5, req }).unwrap())
        .unwrap();
    let mut seen_started = false;
    loop {
        match read_frame::<_, AgentMsg>(&mut host).unwrap() {
            AgentMsg::Started { id: 5, .. } => seen_started = true,
            AgentMsg::ExecFailed { id: 5, error } => {
                assert!(error.contains("in use"), "{error}");
                break;
            }
            _ => {}
        }
    }
    assert!(seen_started);
    drop(host);
    assert_eq!(t.join().unwrap(), SessionEnd::Closed);
}
