//! Published ports (`smolvm run -p`, `SMOLVM_PUBLISH`, a Smolfile's `[[port]]`): host TCP
//! listeners whose connections each become a port-forward stream of the agent protocol, which
//! the agent connects to `127.0.0.1:GUEST_PORT` inside the machine.
//!
//! Threads: one accept loop per listener, and per connection one thread per direction
//! (host socket → stream, stream → host socket), all blocking. Host memory stays bounded by
//! the protocol's credit windows: the client buffers at most one window of guest data per
//! stream, and a host peer that stops reading blocks its writer thread, so the window is not
//! returned and the agent stops reading the guest socket.
//!
//! The listeners are bound before the machine is resumed (a busy port fails the start before
//! anything runs, and `bind` happens before the system call filters go on); the accept loops
//! start once the agent is ready.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use smolvm_agent::client::{PortConnector, PortStream};
use smolvm_formats::Manifest;

/// How long a new connection waits for the agent to reach the guest port: longer than the
/// guest kernel's own connect gives up (about 127 s with Linux's default `tcp_syn_retries`
/// of 6), so the guest decides, and this only catches an agent that never answers. On a
/// slow guest a burst of connections takes that long: 100 at once to busybox `nc` on the
/// PVM host, where every guest system call is emulated, took up to 120 s; 60 s cut a
/// quarter of them off.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(180);
/// Stack of the forwarding threads (their buffers are on the heap).
const THREAD_STACK: usize = 256 << 10;
/// Bytes moved per read on either side.
const CHUNK: usize = 64 << 10;

/// One published port: `HOST_IP:HOST_PORT` on the host to `GUEST_PORT` in the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish {
    /// Address the host listener binds (127.0.0.1 unless the spec names one).
    pub host_ip: IpAddr,
    /// Host port.
    pub host_port: u16,
    /// Guest port the agent connects to on the guest's 127.0.0.1.
    pub guest_port: u16,
}

impl std::fmt::Display for Publish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}",
            SocketAddr::new(self.host_ip, self.host_port),
            self.guest_port
        )
    }
}

fn port_number(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || s.len() > 5 {
        return None;
    }
    s.parse::<u16>().ok().filter(|&p| p > 0)
}

/// Parse docker's `-p` syntax, TCP only: `[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp]`, where
/// HOST_IP is an IPv4 address or a bracketed IPv6 one (`[::1]`). Errors are one line naming
/// the spec.
pub fn parse_publish(spec: &str) -> Result<Publish, String> {
    let bad = |why: &str| {
        format!("bad port mapping '{spec}': {why} (expected [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp])")
    };
    let body = match spec.rsplit_once('/') {
        Some((b, "tcp")) => b,
        Some((_, proto)) => {
            return Err(bad(&format!("protocol {proto} is not supported, only tcp")))
        }
        None => spec,
    };
    let (rest, guest) = body.rsplit_once(':').ok_or_else(|| bad("no guest port"))?;
    let guest_port = port_number(guest).ok_or_else(|| bad("the guest port must be 1-65535"))?;
    let (ip, host) = match rest.rsplit_once(':') {
        Some((ip, host)) => (Some(ip), host),
        None => (None, rest),
    };
    let host_port = port_number(host).ok_or_else(|| bad("the host port must be 1-65535"))?;
    let host_ip = match ip {
        None => IpAddr::V4(Ipv4Addr::LOCALHOST),
        Some(ip) => {
            let plain = ip
                .strip_prefix('[')
                .and_then(|i| i.strip_suffix(']'))
                .unwrap_or(ip);
            let addr: IpAddr = plain
                .parse()
                .map_err(|_| bad(&format!("'{ip}' is not an IP address")))?;
            if addr.is_ipv6() && plain == ip {
                return Err(bad("an IPv6 address goes in brackets, as [::1]"));
            }
            addr
        }
    };
    Ok(Publish {
        host_ip,
        host_port,
        guest_port,
    })
}

/// Parse `SMOLVM_PUBLISH`: port mappings separated by commas.
pub fn parse_publish_list(list: &str) -> Result<Vec<Publish>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(parse_publish)
        .collect()
}

/// The ports of a run: the caller's `given` (`-p`, `SMOLVM_PUBLISH`), then each port the
/// manifest publishes by default (`port.N` = a `-p` spec, from a Smolfile `[[port]]`) whose
/// guest port the caller did not publish. Two mappings of one host address are refused.
pub fn ports_for(manifest: &Manifest, given: &[Publish]) -> Result<Vec<Publish>, String> {
    let mut out = given.to_vec();
    for i in 0.. {
        let Some(spec) = manifest.extra.get(&format!("port.{i}")) else {
            break;
        };
        let p = parse_publish(spec).map_err(|e| format!("the machine's manifest: {e}"))?;
        if !given.iter().any(|g| g.guest_port == p.guest_port) {
            out.push(p);
        }
    }
    for (i, a) in out.iter().enumerate() {
        if out[..i]
            .iter()
            .any(|b| b.host_port == a.host_port && b.host_ip == a.host_ip)
        {
            return Err(format!(
                "host port {} is published twice",
                SocketAddr::new(a.host_ip, a.host_port)
            ));
        }
    }
    Ok(out)
}

/// Host listeners bound for a run, not yet forwarding.
pub struct Publisher {
    listeners: Vec<(Publish, TcpListener)>,
}

impl Publisher {
    /// Bind every port: the error names the first that cannot be bound (in use, no such
    /// address, a privileged port).
    pub fn bind(ports: &[Publish]) -> Result<Publisher, String> {
        let mut listeners = Vec::new();
        for p in ports {
            let addr = SocketAddr::new(p.host_ip, p.host_port);
            let l =
                TcpListener::bind(addr).map_err(|e| format!("cannot publish port {addr}: {e}"))?;
            listeners.push((*p, l));
        }
        Ok(Publisher { listeners })
    }

    /// Nothing to publish.
    pub fn is_empty(&self) -> bool {
        self.listeners.is_empty()
    }

    /// Start accepting: each connection becomes a stream opened through `conn`.
    pub fn start(self, conn: PortConnector) -> std::io::Result<Forwarding> {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            live: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        });
        let mut listeners = Vec::new();
        for (p, l) in self.listeners {
            let sh = shared.clone();
            let conn = conn.clone();
            listeners.push(l.try_clone()?);
            thread::Builder::new()
                .name(format!("publish-{}", p.host_port))
                .stack_size(THREAD_STACK)
                .spawn(move || accept_loop(l, p, conn, sh))?;
        }
        Ok(Forwarding {
            shared,
            listeners,
            conn,
        })
    }
}

struct Shared {
    stop: AtomicBool,
    /// Host connections being forwarded and their streams, to cut them off on `stop`.
    live: Mutex<HashMap<u64, (TcpStream, Arc<PortStream>)>>,
    next: AtomicU64,
}

impl Shared {
    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (TcpStream, Arc<PortStream>)>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Published ports being forwarded.
pub struct Forwarding {
    shared: Arc<Shared>,
    listeners: Vec<TcpListener>,
    conn: PortConnector,
}

impl Forwarding {
    /// Stop accepting, cut every forwarded connection off, and wait (at most `timeout`)
    /// until the agent closed all their streams: afterwards no stream is open in the guest,
    /// so the machine can be saved without them.
    pub fn stop(&self, timeout: Duration) -> Result<(), String> {
        self.shared.stop.store(true, Ordering::SeqCst);
        for l in &self.listeners {
            // Wakes the blocked accept (EINVAL) so the loop sees `stop`.
            // SAFETY: shutdown on a socket we own reads no memory.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
        for (tcp, stream) in self.shared.live().values() {
            // The stream is aborted, not half-closed: a guest server that would wait for
            // more must not hold the save up.
            stream.abort();
            let _ = tcp.shutdown(Shutdown::Both);
        }
        self.conn
            .wait_all_closed(timeout)
            .map_err(|e| format!("the forwarded connections did not close: {e}"))
    }

    /// Host connections being forwarded right now.
    pub fn live_connections(&self) -> usize {
        self.shared.live().len()
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for l in &self.listeners {
            // SAFETY: as in `stop`.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
}

fn accept_loop(l: TcpListener, p: Publish, conn: PortConnector, sh: Arc<Shared>) {
    loop {
        let accepted = l.accept();
        if sh.stop.load(Ordering::SeqCst) {
            return;
        }
        let tcp = match accepted {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of descriptors or memory: drop this one, keep serving.
                log::warn!("publish {p}: accept failed: {e}");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let (conn, sh) = (conn.clone(), sh.clone());
        let spawned = thread::Builder::new()
            .name(format!("fwd-{}", p.guest_port))
            .stack_size(THREAD_STACK)
            .spawn(move || forward(tcp, p.guest_port, conn, sh));
        if let Err(e) = spawned {
            log::warn!("publish {p}: cannot start a forwarding thread: {e}");
        }
    }
}

/// One host connection: opened in the guest first (a guest port with nothing listening
/// closes the host connection at once), then copied both ways until both ends finished.
fn forward(tcp: TcpStream, guest_port: u16, conn: PortConnector, sh: Arc<Shared>) {
    let stream = match conn.connect(guest_port) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("forward to guest port {guest_port}: {e}");
            return;
        }
    };
    if let Err(e) = stream.wait_connected(Some(CONNECT_TIMEOUT)) {
        log::info!("forward to guest port {guest_port}: {e}");
        return;
    }
    let key = sh.next.fetch_add(1, Ordering::Relaxed);
    let stream = Arc::new(stream);
    match tcp.try_clone() {
        Ok(c) => {
            sh.live().insert(key, (c, stream.clone()));
        }
        Err(e) => {
            log::warn!("forward to guest port {guest_port}: {e}");
            return;
        }
    }
    if sh.stop.load(Ordering::SeqCst) {
        stream.abort();
        let _ = tcp.shutdown(Shutdown::Both);
    }
    let up = {
        let (stream, tcp) = (stream.clone(), tcp.try_clone());
        thread::Builder::new()
            .name(format!("fwd-{guest_port}-up"))
            .stack_size(THREAD_STACK)
            .spawn(move || {
                if let Ok(tcp) = tcp {
                    host_to_guest(tcp, &stream);
                }
            })
    };
    guest_to_host(&tcp, &stream);
    if let Ok(up) = up {
        let _ = up.join();
    }
    sh.live().remove(&key);
}

fn host_to_guest(mut tcp: TcpStream, stream: &PortStream) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match tcp.read(&mut buf) {
            Ok(0) => {
                let _ = stream.shutdown_write();
                return;
            }
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    let _ = tcp.shutdown(Shutdown::Both);
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => {
                // Reset by the host peer, or cut off by `stop`: the stream is aborted when
                // its last handle goes.
                let _ = tcp.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

fn guest_to_host(mut tcp: &TcpStream, stream: &PortStream) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                // The guest end finished sending: half-close; an error (reset, the agent
                // closed the stream) ends both directions.
                if stream.close_error().is_some() {
                    let _ = tcp.shutdown(Shutdown::Both);
                } else {
                    let _ = tcp.shutdown(Shutdown::Write);
                }
                return;
            }
            Ok(n) => {
                if tcp.write_all(&buf[..n]).is_err() {
                    let _ = tcp.shutdown(Shutdown::Both);
                    return;
                }
            }
            Err(_) => {
                let _ = tcp.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(ip: &str, host: u16, guest: u16) -> Publish {
        Publish {
            host_ip: ip.parse().unwrap(),
            host_port: host,
            guest_port: guest,
        }
    }

    #[test]
    fn docker_port_syntax() {
        assert_eq!(parse_publish("8080:80"), Ok(p("127.0.0.1", 8080, 80)));
        assert_eq!(parse_publish("8080:80/tcp"), Ok(p("127.0.0.1", 8080, 80)));
        assert_eq!(
            parse_publish("0.0.0.0:9090:9090"),
            Ok(p("0.0.0.0", 9090, 9090))
        );
        assert_eq!(parse_publish("[::1]:8443:443"), Ok(p("::1", 8443, 443)));
        assert_eq!(p("::1", 8443, 443).to_string(), "[::1]:8443:443");
        assert_eq!(
            parse_publish_list("8080:80, 9090:9090,").unwrap(),
            vec![p("127.0.0.1", 8080, 80), p("127.0.0.1", 9090, 9090)]
        );
        for (spec, why) in [
            ("80", "no guest port"),
            ("8080:80/udp", "protocol udp is not supported"),
            ("0:80", "host port must be 1-65535"),
            ("8080:0", "guest port must be 1-65535"),
            ("8080:65536", "guest port must be 1-65535"),
            ("x:80", "host port must be 1-65535"),
            ("+80:80", "host port must be 1-65535"),
            ("localhost:8080:80", "'localhost' is not an IP address"),
            ("::1:8080:80", "IPv6 address goes in brackets"),
            (":8080:80", "'' is not an IP address"),
        ] {
            let e = parse_publish(spec).unwrap_err();
            assert!(e.contains(why), "{spec}: {e}");
            assert!(e.starts_with(&format!("bad port mapping '{spec}'")), "{e}");
            assert!(!e.contains('\n'));
        }
    }

    proptest::proptest! {
        /// Every well-formed mapping parses to what it says and prints back the same;
        /// any string parses or is refused with one line, never a panic.
        #[test]
        fn publish_specs_round_trip(a: [u8; 4], host in 1u16.., guest in 1u16.., tcp: bool,
                                    junk in "[0-9a-f:\\[\\]./tcpud]{0,24}") {
            let ip = std::net::Ipv4Addr::from(a);
            let spec = format!("{ip}:{host}:{guest}{}", if tcp { "/tcp" } else { "" });
            let parsed = parse_publish(&spec).unwrap();
            proptest::prop_assert_eq!(parsed, p(&ip.to_string(), host, guest));
            proptest::prop_assert_eq!(parse_publish(&parsed.to_string()), Ok(parsed));
            match parse_publish(&junk) {
                Ok(q) => proptest::prop_assert!(q.host_port > 0 && q.guest_port > 0),
                Err(e) => proptest::prop_assert!(!e.contains('\n')),
            }
        }
    }

    #[test]
    fn manifest_ports_are_defaults_the_caller_overrides() {
        let mut m = Manifest::default();
        m.extra.insert("port.0".into(), "8080:80".into());
        m.extra.insert("port.1".into(), "9090:9090".into());
        assert_eq!(
            ports_for(&m, &[]).unwrap(),
            vec![p("127.0.0.1", 8080, 80), p("127.0.0.1", 9090, 9090)]
        );
        let given = [p("127.0.0.1", 18080, 80)];
        assert_eq!(
            ports_for(&m, &given).unwrap(),
            vec![p("127.0.0.1", 18080, 80), p("127.0.0.1", 9090, 9090)]
        );
        let twice = [p("127.0.0.1", 9090, 1)];
        assert!(ports_for(&m, &twice)
            .unwrap_err()
            .contains("127.0.0.1:9090 is published twice"));
    }

    #[test]
    fn a_busy_port_is_named() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let err = Publisher::bind(&[p("127.0.0.1", port, 80)]).err().unwrap();
        assert!(
            err.starts_with(&format!("cannot publish port 127.0.0.1:{port}: ")),
            "{err}"
        );
        assert!(!err.contains('\n'));
    }
}
