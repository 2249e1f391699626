//! The `smol-agent` binary in host mode: serves a Unix socket, survives a bad host, exits
//! on shutdown.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use smolvm_agent::client::Client;
use smolvm_agent::protocol::{read_frame, AgentMsg, ExitStatus};

fn spawn_agent(sock: &Path) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_smol-agent"))
        .arg("--socket")
        .arg(sock)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    // Wait (bounded) for the socket to appear; this is readiness, not a timing assertion.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "agent never created {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

#[test]
fn binary_serves_sessions_and_exits_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let mut child = spawn_agent(&sock);

    let c = Client::connect_unix(&sock, Some(Duration::from_secs(30))).unwrap();
    let out = c.run_capture(["sh", "-c", "echo hi; exit 3"]).unwrap();
    assert_eq!(out.stdout, b"hi\n");
    assert_eq!(out.status, ExitStatus::Code(3));
    drop(c);

    // A host speaking nonsense gets an error and a closed stream...
    let mut bad = UnixStream::connect(&sock).unwrap();
    bad.write_all(b"\x00\x01garbage").unwrap();
    let mut saw_error = false;
    while let Ok(m) = read_frame::<_, AgentMsg>(&mut bad) {
        saw_error |= matches!(m, AgentMsg::Error { .. });
    }
    assert!(saw_error);

    // ...and the agent keeps serving.
    let c = Client::connect_unix(&sock, Some(Duration::from_secs(30))).unwrap();
    assert_eq!(c.run_capture(["echo", "again"]).unwrap().stdout, b"again\n");
    c.shutdown(false).unwrap();
    drop(c);
    let status = child.wait().unwrap();
    assert!(status.success(), "agent exited with {status}");
}

#[test]
fn binary_rejects_bad_arguments() {
    let out = Command::new(env!("CARGO_BIN_EXE_smol-agent"))
        .arg("--frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown argument"));
    let out = Command::new(env!("CARGO_BIN_EXE_smol-agent"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("transport"));
}
