//! Rough host-side numbers for the protocol: exec round trip and stdin->stdout throughput
//! through `cat`, with the agent in a thread over a Unix socket pair.
//! Run: `cargo run --release -p smolvm-agent --example bench`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use smolvm_agent::agent::{run_session, HostSystem, SessionConfig};
use smolvm_agent::client::Client;
use smolvm_agent::protocol::ExecRequest;

fn main() {
    let (host, guest) = UnixStream::pair().expect("socket pair");
    std::thread::spawn(move || run_session(guest, &mut HostSystem, &SessionConfig::default()));
    let c = Client::from_unix_stream(host).expect("client");
    c.handshake().expect("handshake");

    let n = 200;
    let t = Instant::now();
    for _ in 0..n {
        c.ping().expect("ping");
    }
    println!(
        "ping round trip: {:.1} us",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );

    let t = Instant::now();
    for _ in 0..n {
        c.run_capture(["true"]).expect("true");
    }
    println!(
        "exec `true` round trip: {:.2} ms",
        t.elapsed().as_secs_f64() * 1e3 / n as f64
    );

    let total: usize = 256 << 20;
    let mut h = c.exec(ExecRequest::new(["cat"])).expect("cat");
    let mut out = h.take_stdout().expect("stdout");
    let mut stdin = h.stdin();
    let t = Instant::now();
    let w = std::thread::spawn(move || {
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..(total >> 20) {
            stdin.write_all(&chunk).expect("stdin");
        }
        stdin.close().expect("eof");
    });
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0;
    loop {
        let k = out.read(&mut buf).expect("read");
        if k == 0 {
            break;
        }
        got += k;
    }
    w.join().expect("writer");
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(got, total);
    println!(
        "cat throughput: {:.0} MiB/s ({} MiB)",
        (total >> 20) as f64 / secs,
        total >> 20
    );
}
