//! The network thread: guest frames in, host sockets out.
//!
//! One thread owns a `smoltcp` interface (the VMM's side of the link: 10.0.2.2 and
//! 10.0.2.3, accepting any destination address, "any IP") and every host socket. It sleeps
//! in `poll(2)` on an eventfd (the virtio-net device writes it when the guest transmits)
//! and the host sockets it waits on, with smoltcp's next timer as the timeout.
//!
//! - **TCP.** A guest SYN to an allowed destination is held back while the VMM connects a
//!   non-blocking host socket to it; once connected, a smoltcp socket is made to listen on
//!   exactly that destination and the SYN is replayed into it, so the guest's handshake
//!   completes only against a live host connection. A refused, failed or timed-out connect,
//!   a destination outside the allow-list, and the flow limit all leave the SYN without a
//!   listener, and smoltcp answers it with a reset: "connection refused" in the guest.
//!   Data is then copied between the smoltcp socket's buffers and the host socket, with
//!   half-closes passed on both ways.
//! - **UDP** never enters smoltcp: each (guest port, destination) flow gets a connected
//!   host UDP socket, replies come back as frames built here, idle flows expire.
//! - **DNS** at 10.0.2.3:53: see [`super::dns`].
//!
//! Bounds: [`MAX_TCP_FLOWS`] connections with [`TCP_BUFFER`] bytes each way,
//! [`MAX_UDP_FLOWS`] UDP flows, [`MAX_PENDING_CONNECTS`] connects in progress; guest frames
//! and frames for the guest are bounded by the device. Host memory is therefore bounded
//! whatever the guest sends.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, IpListenEndpoint};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::dns::{self, Rcode};
use super::flows::{classify, udp_frame, FlowTable, Packet};
use super::{destination, AllowList, Destination, NetOptions};
use super::{DNS_IP, GATEWAY_IP, GATEWAY_MAC, GUEST_IP, GUEST_MAC, PREFIX_LEN};
use crate::devices::virtio::net::{NetSlot, TxQueue, MAX_FRAME};

/// Most TCP connections at once (more are refused).
pub const MAX_TCP_FLOWS: usize = 128;
/// Bytes buffered in each direction of a TCP connection (the guest's receive window).
pub const TCP_BUFFER: usize = 64 << 10;
/// Most UDP flows at once (the least recently used is closed for a new one).
pub const MAX_UDP_FLOWS: usize = 64;
/// A UDP flow with no traffic this long is closed.
pub const UDP_IDLE: Duration = Duration::from_secs(60);
/// Most host connects in progress.
pub const MAX_PENDING_CONNECTS: usize = 32;
/// A host connect that takes longer fails (the guest's SYN is reset).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest sleep in `poll(2)` (stop requests also wake it through the eventfd).
const MAX_SLEEP: Duration = Duration::from_millis(500);

/// (guest port, destination address as the guest sent it, destination port).
type FlowKey = (u16, Ipv4Addr, u16);

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The link between smoltcp and the device: frames from the guest, frames for it.
#[derive(Default)]
struct Link {
    rx: VecDeque<Vec<u8>>,
    out: Vec<Vec<u8>>,
}

struct RxTok(Vec<u8>);
struct TxTok<'a>(&'a mut Vec<Vec<u8>>);

impl RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut b = vec![0u8; len];
        let r = f(&mut b);
        self.0.push(b);
        r
    }
}

impl Device for Link {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok<'a>;

    fn receive(
        &mut self,
        _: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let f = self.rx.pop_front()?;
        Some((RxTok(f), TxTok(&mut self.out)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        Some(TxTok(&mut self.out))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = MAX_FRAME;
        c
    }
}

/// A host connect in progress for a held-back guest SYN.
struct Pending {
    stream: TcpStream,
    syn: Vec<u8>,
    since: Instant,
}

/// A relayed TCP connection.
struct TcpFlow {
    key: FlowKey,
    host: TcpStream,
    /// The host sent FIN (the guest side is being closed).
    host_eof: bool,
    /// The guest's FIN was passed on (host write side shut down).
    host_write_shut: bool,
}

/// A relayed UDP flow.
struct UdpFlow {
    sock: UdpSocket,
    /// Source of the replies as the guest sees them.
    reply_from: (Ipv4Addr, u16),
}

/// A new non-blocking, close-on-exec IPv4 socket of `kind` (`SOCK_STREAM` or `SOCK_DGRAM`):
/// the network's seccomp list allows socket(2) with `AF_INET` only.
fn ipv4_socket(kind: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with plain integer arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            kind | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Start a non-blocking TCP connect to `to`.
fn start_connect(to: SocketAddrV4) -> io::Result<TcpStream> {
    let owned = ipv4_socket(libc::SOCK_STREAM)?;
    let fd = owned.as_raw_fd();
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(to.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `sa` is a valid sockaddr_in of the size passed.
    let r = unsafe {
        libc::connect(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    Ok(TcpStream::from(owned))
}

/// The pending error of a socket whose connect finished (`SO_ERROR`).
fn socket_error(fd: RawFd) -> io::Result<()> {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `err`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if err != 0 {
        return Err(io::Error::from_raw_os_error(err));
    }
    Ok(())
}

/// A connected, non-blocking UDP socket to `to` (bound implicitly by the connect).
fn udp_connect(to: SocketAddrV4) -> io::Result<UdpSocket> {
    let sock = UdpSocket::from(ipv4_socket(libc::SOCK_DGRAM)?);
    sock.connect(to)?;
    Ok(sock)
}

/// The network of one run: its thread and how to stop it.
pub struct Network {
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
}

/// What the network thread is given.
pub struct NetworkParts {
    /// The device slot frames for the guest are delivered to.
    pub slot: Arc<Mutex<NetSlot>>,
    /// Frames the guest transmitted.
    pub tx: Arc<TxQueue>,
    /// Written by the device when `tx` has frames.
    pub wake: Arc<EventFd>,
}

impl NetworkParts {
    /// A fresh queue and eventfd for a device in `slot`.
    pub fn new(slot: Arc<Mutex<NetSlot>>) -> io::Result<Self> {
        Ok(NetworkParts {
            slot,
            tx: Arc::new(TxQueue::default()),
            wake: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        })
    }
}

impl Network {
    /// Start the network thread. The host's `/etc/hosts` and `/etc/resolv.conf` are read
    /// now (before any system call filter), not per query.
    pub fn start(parts: NetworkParts, opts: NetOptions) -> io::Result<Network> {
        let hosts = std::fs::read_to_string("/etc/hosts")
            .map(|t| dns::parse_hosts(&t))
            .unwrap_or_default();
        let nameserver = std::fs::read_to_string("/etc/resolv.conf")
            .ok()
            .and_then(|t| dns::first_nameserver(&t));
        let mut seed = [0u8; 8];
        crate::devices::virtio::rng::host_random(&mut seed)?;
        let stop = Arc::new(AtomicBool::new(false));
        let wake = parts.wake.clone();
        let mut stack = Stack::new(
            parts,
            opts.allow,
            hosts,
            nameserver,
            u64::from_ne_bytes(seed),
        );
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("net".into())
            .spawn(move || stack.run(&stop2))?;
        Ok(Network {
            thread: Some(thread),
            stop,
            wake,
        })
    }

    /// Stop the thread and close every host socket (the guest's connections are gone).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Stack {
    parts: NetworkParts,
    allow: AllowList,
    hosts: Vec<(String, Ipv4Addr)>,
    nameserver: Option<Ipv4Addr>,
    link: Link,
    iface: Interface,
    sockets: SocketSet<'static>,
    start: Instant,
    pending: HashMap<FlowKey, Pending>,
    tcp: HashMap<SocketHandle, TcpFlow>,
    tcp_keys: HashMap<FlowKey, SocketHandle>,
    udp: FlowTable<FlowKey, UdpFlow>,
    /// UDP and DNS frames for the guest, built outside smoltcp.
    out: Vec<Vec<u8>>,
}

impl Stack {
    fn new(
        parts: NetworkParts,
        allow: AllowList,
        hosts: Vec<(String, Ipv4Addr)>,
        nameserver: Option<Ipv4Addr>,
        seed: u64,
    ) -> Stack {
        let mut link = Link::default();
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GATEWAY_MAC)));
        config.random_seed = seed;
        let start = Instant::now();
        let mut iface = Interface::new(config, &mut link, smoltcp::time::Instant::from_millis(0));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(GATEWAY_IP.into(), PREFIX_LEN));
            let _ = a.push(IpCidr::new(DNS_IP.into(), PREFIX_LEN));
        });
        // Any destination is accepted as long as it routes through one of our addresses.
        let _ = iface.routes_mut().add_default_ipv4_route(GATEWAY_IP);
        iface.set_any_ip(true);
        Stack {
            parts,
            allow,
            hosts,
            nameserver,
            link,
            iface,
            sockets: SocketSet::new(Vec::new()),
            start,
            pending: HashMap::new(),
            tcp: HashMap::new(),
            tcp_keys: HashMap::new(),
            udp: FlowTable::new(MAX_UDP_FLOWS, UDP_IDLE),
            out: Vec::new(),
        }
    }

    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_millis(self.start.elapsed().as_millis() as i64)
    }

    fn run(&mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::SeqCst) {
            let _ = self.parts.wake.read();
            for frame in self.parts.tx.take() {
                self.guest_frame(frame);
            }
            self.finish_connects();
            self.poll_iface();
            self.relay_tcp();
            self.poll_iface();
            self.relay_udp();
            self.flush();
            self.sleep();
        }
    }

    fn poll_iface(&mut self) {
        let now = self.now();
        self.iface.poll(now, &mut self.link, &mut self.sockets);
    }

    /// Deliver the frames produced so far to the guest.
    fn flush(&mut self) {
        let mut frames = std::mem::take(&mut self.link.out);
        frames.append(&mut self.out);
        if !frames.is_empty() {
            lock(&self.parts.slot).deliver(frames);
        }
    }

    fn guest_frame(&mut self, frame: Vec<u8>) {
        match classify(&frame) {
            Packet::Udp {
                src,
                src_port,
                dst,
                dst_port,
                payload,
            } => {
                if src == GUEST_IP {
                    let payload = payload.to_vec();
                    self.guest_udp(src_port, dst, dst_port, &payload);
                }
            }
            Packet::TcpSyn {
                src_port,
                dst,
                dst_port,
            } => {
                let key = (src_port, dst, dst_port);
                if self.tcp_keys.contains_key(&key) {
                    self.link.rx.push_back(frame);
                } else if self.pending.contains_key(&key) {
                    // A retransmitted SYN while the host connect is under way.
                } else {
                    self.new_connection(key, frame);
                }
            }
            Packet::Other => self.link.rx.push_back(frame),
        }
    }

    /// A guest SYN for a new connection: connect on the host first, or let smoltcp reset it.
    fn new_connection(&mut self, key: FlowKey, syn: Vec<u8>) {
        let (_, dst, port) = key;
        let target = match destination(dst) {
            Destination::Host(ip) if self.allow.allows(ip, port) => Some(ip),
            _ => None,
        };
        let room = self.tcp.len() + self.pending.len() < MAX_TCP_FLOWS
            && self.pending.len() < MAX_PENDING_CONNECTS;
        match target.filter(|_| room) {
            Some(ip) => match start_connect(SocketAddrV4::new(ip, port)) {
                Ok(stream) => {
                    self.pending.insert(
                        key,
                        Pending {
                            stream,
                            syn,
                            since: Instant::now(),
                        },
                    );
                }
                Err(e) => {
                    log::debug!("net: connect to {ip}:{port} failed: {e}");
                    self.link.rx.push_back(syn);
                }
            },
            // No listener: smoltcp answers with a reset.
            None => self.link.rx.push_back(syn),
        }
    }

    /// Connects that finished (or timed out): replay the SYN into a listener, or not.
    fn finish_connects(&mut self) {
        let keys: Vec<FlowKey> = self.pending.keys().copied().collect();
        for key in keys {
            let Some(p) = self.pending.get(&key) else {
                continue;
            };
            let mut pfd = libc::pollfd {
                fd: p.stream.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd, no wait.
            let n = unsafe { libc::poll(&mut pfd, 1, 0) };
            let timed_out = p.since.elapsed() > CONNECT_TIMEOUT;
            if n <= 0 && !timed_out {
                continue;
            }
            let Some(p) = self.pending.remove(&key) else {
                continue;
            };
            let ok = n > 0 && socket_error(p.stream.as_raw_fd()).is_ok();
            if ok {
                let mut s = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
                    tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
                );
                let (_, dst, port) = key;
                if s.listen(IpListenEndpoint {
                    addr: Some(dst.into()),
                    port,
                })
                .is_ok()
                {
                    s.set_nagle_enabled(false);
                    let h = self.sockets.add(s);
                    self.tcp.insert(
                        h,
                        TcpFlow {
                            key,
                            host: p.stream,
                            host_eof: false,
                            host_write_shut: false,
                        },
                    );
                    self.tcp_keys.insert(key, h);
                }
            }
            // Processed at once, so that this SYN meets its own listener.
            self.link.rx.push_back(p.syn);
            self.poll_iface();
        }
    }

    /// Move bytes between every connection's smoltcp socket and its host socket.
    fn relay_tcp(&mut self) {
        let mut done = Vec::new();
        for (&h, flow) in self.tcp.iter_mut() {
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            if s.state() == tcp::State::Listen {
                // The replayed SYN did not reach it (reset meanwhile): nothing to relay.
                continue;
            }
            // Guest to host.
            while s.can_recv() {
                let r = s.recv(|buf| match flow.host.write(buf) {
                    Ok(n) => (n, Ok(n)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => (0, Ok(0)),
                    Err(e) => (0, Err(e)),
                });
                match r {
                    Ok(Ok(0)) => break,
                    Ok(Ok(_)) => {}
                    _ => {
                        s.abort();
                        break;
                    }
                }
            }
            if !s.may_recv()
                && !s.can_recv()
                && !flow.host_write_shut
                && s.state() != tcp::State::SynReceived
            {
                let _ = flow.host.shutdown(Shutdown::Write);
                flow.host_write_shut = true;
            }
            // Host to guest.
            while !flow.host_eof && s.can_send() {
                let r = s.send(|buf| match flow.host.read(buf) {
                    Ok(0) => (0, Some(true)),
                    Ok(n) => (n, None),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => (0, Some(false)),
                    Err(_) => (0, Some(true)),
                });
                match r {
                    Ok(None) => {}
                    Ok(Some(false)) => break,
                    Ok(Some(true)) => {
                        flow.host_eof = true;
                        s.close();
                    }
                    Err(_) => break,
                }
            }
            if matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) {
                done.push(h);
            }
        }
        for h in done {
            if let Some(f) = self.tcp.remove(&h) {
                self.tcp_keys.remove(&f.key);
            }
            self.sockets.remove(h);
        }
    }

    fn guest_udp(&mut self, src_port: u16, dst: Ipv4Addr, dst_port: u16, payload: &[u8]) {
        let now = Instant::now();
        let key = (src_port, dst, dst_port);
        let to = match destination(dst) {
            Destination::Dns if dst_port == 53 => {
                let query = dns::parse_query(payload);
                if let Some(q) = &query {
                    let found = dns::lookup_hosts(&self.hosts, &q.name);
                    if !found.is_empty() {
                        let a = dns::answer(q, Rcode::NoError, &found);
                        self.udp_to_guest((DNS_IP, 53), src_port, &a);
                        return;
                    }
                }
                match self.nameserver.filter(|ns| self.allow.allows(*ns, 53)) {
                    Some(ns) => SocketAddrV4::new(ns, 53),
                    None => {
                        if let Some(q) = &query {
                            let a = dns::answer(q, Rcode::ServFail, &[]);
                            self.udp_to_guest((DNS_IP, 53), src_port, &a);
                        }
                        return;
                    }
                }
            }
            Destination::Host(ip) if self.allow.allows(ip, dst_port) => {
                SocketAddrV4::new(ip, dst_port)
            }
            _ => return,
        };
        if self.udp.get_mut(&key, now).is_none() {
            match udp_connect(to) {
                Ok(sock) => {
                    self.udp.insert(
                        key,
                        UdpFlow {
                            sock,
                            reply_from: (dst, dst_port),
                        },
                        now,
                    );
                }
                Err(e) => {
                    log::debug!("net: UDP socket to {to} failed: {e}");
                    return;
                }
            }
        }
        if let Some(f) = self.udp.get_mut(&key, now) {
            let _ = f.sock.send(payload);
        }
    }

    fn udp_to_guest(&mut self, from: (Ipv4Addr, u16), guest_port: u16, payload: &[u8]) {
        if let Some(f) = udp_frame(
            from,
            (GUEST_IP, guest_port),
            GATEWAY_MAC,
            GUEST_MAC,
            payload,
        ) {
            self.out.push(f);
        }
    }

    fn relay_udp(&mut self) {
        let now = Instant::now();
        let mut buf = vec![0u8; 64 << 10];
        let mut replies = Vec::new();
        for (&(guest_port, _, _), f) in self.udp.iter_mut() {
            // A few datagrams per flow per round, so one flow cannot starve the others.
            for _ in 0..16 {
                match f.sock.recv(&mut buf) {
                    Ok(n) => replies.push((f.reply_from, guest_port, buf[..n].to_vec())),
                    Err(_) => break,
                }
            }
        }
        for (from, port, data) in replies {
            self.udp_to_guest(from, port, &data);
        }
        self.udp.expire(now);
    }

    /// Sleep until the guest transmits, a host socket is ready, or smoltcp has a timer due.
    fn sleep(&mut self) {
        let mut fds = vec![libc::pollfd {
            fd: self.parts.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        for p in self.pending.values() {
            fds.push(libc::pollfd {
                fd: p.stream.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            });
        }
        for (&h, f) in &self.tcp {
            let s = self.sockets.get::<tcp::Socket>(h);
            let mut events = 0;
            if !f.host_eof && s.can_send() {
                events |= libc::POLLIN;
            }
            if s.can_recv() {
                events |= libc::POLLOUT;
            }
            if events != 0 {
                fds.push(libc::pollfd {
                    fd: f.host.as_raw_fd(),
                    events,
                    revents: 0,
                });
            }
        }
        for (_, f) in self.udp.iter_mut() {
            fds.push(libc::pollfd {
                fd: f.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let now = self.now();
        let mut timeout = self
            .iface
            .poll_delay(now, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
            .unwrap_or(MAX_SLEEP)
            .min(MAX_SLEEP);
        if !self.pending.is_empty() {
            timeout = timeout.min(Duration::from_millis(100));
        }
        if !self.link.rx.is_empty() {
            timeout = Duration::ZERO;
        }
        // SAFETY: `fds` is a live array of `fds.len()` pollfd structs.
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                timeout.as_millis().min(i32::MAX as u128) as i32,
            )
        };
    }
}
