//! The host ends of a Linux guest's two byte streams: the kernel log (8250
//! serial), kept as a bounded tail for error messages and scanned for
//! panics, and the agent's virtio-console port, bridged to a Unix socket
//! that the agent client serves.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use smolvm_agent::protocol::{parse_header, HEADER_LEN};

use crate::devices::virtio::console::{Console, InputRoom};
use crate::devices::virtio::mmio::MmioTransport;

/// Bytes of kernel log kept for error messages.
pub const LOG_TAIL_BYTES: usize = 16 << 10;

/// What the kernel prints when it gives up; with `panic=-1` a reset follows.
const PANIC_MARK: &[u8] = b"Kernel panic";
/// Printed by `kernel_power_off`.
const POWER_OFF_MARK: &[u8] = b"reboot: Power down";
/// Printed by `kernel_restart`.
const RESTART_MARK: &[u8] = b"reboot: Restarting system";
/// Printed by `kernel_halt`: a power-off without a power-off method becomes
/// a halt, and the CPU then idles with interrupts off, so the VMM must end
/// the machine itself.
const HALT_MARK: &[u8] = b"reboot: System halted";

/// Where guest console output may also go (a terminal, a file).
pub type ConsoleSink = Box<dyn Write + Send>;

#[derive(Default)]
struct LogInner {
    tail: VecDeque<u8>,
    /// The last line so far (marks are matched per line).
    line: Vec<u8>,
    sink: Option<ConsoleSink>,
}

/// The kernel log: a bounded tail plus markers seen.
#[derive(Default)]
pub struct ConsoleLog {
    inner: Mutex<LogInner>,
    panicked: AtomicBool,
    powered_off: AtomicBool,
    restarted: AtomicBool,
    on_halt: Mutex<Option<Box<dyn Fn() + Send>>>,
}

/// How the guest kernel said it was ending, from its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelEnd {
    /// Nothing seen.
    None,
    /// `reboot`.
    Restart,
    /// `poweroff`.
    PowerOff,
    /// A kernel panic.
    Panic,
}

impl ConsoleLog {
    /// A log that also copies output to `sink`.
    pub fn new(sink: Option<ConsoleSink>) -> Arc<Self> {
        Arc::new(ConsoleLog {
            inner: Mutex::new(LogInner {
                sink,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Call `f` when the kernel says it halted or powered off (the guest
    /// will not end the VM by itself then).
    pub fn on_halt(&self, f: Box<dyn Fn() + Send>) {
        *self.on_halt.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    /// The last [`LOG_TAIL_BYTES`] of output, lossily decoded.
    pub fn tail(&self) -> String {
        let g = self.lock();
        let (a, b) = g.tail.as_slices();
        let mut v = a.to_vec();
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).replace('\r', "")
    }

    /// The last `lines` lines of the tail.
    pub fn tail_lines(&self, lines: usize) -> String {
        let t = self.tail();
        let all: Vec<&str> = t.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// How the kernel said it ends (panic wins over the others).
    pub fn kernel_end(&self) -> KernelEnd {
        if self.panicked.load(Ordering::SeqCst) && !self.powered_off.load(Ordering::SeqCst) {
            KernelEnd::Panic
        } else if self.powered_off.load(Ordering::SeqCst) {
            KernelEnd::PowerOff
        } else if self.restarted.load(Ordering::SeqCst) {
            KernelEnd::Restart
        } else {
            KernelEnd::None
        }
    }

    /// Whether a kernel panic was logged (a power-off's panic excluded).
    pub fn panicked(&self) -> bool {
        self.kernel_end() == KernelEnd::Panic
    }

    fn scan_line(&self, line: &[u8]) {
        let has = |m: &[u8]| line.windows(m.len()).any(|w| w == m);
        if has(PANIC_MARK) {
            self.panicked.store(true, Ordering::SeqCst);
        }
        if has(POWER_OFF_MARK) || has(HALT_MARK) {
            self.powered_off.store(true, Ordering::SeqCst);
            if let Some(f) = self
                .on_halt
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                f();
            }
        }
        if has(RESTART_MARK) {
            self.restarted.store(true, Ordering::SeqCst);
        }
    }

    fn push(&self, data: &[u8]) {
        let mut g = self.lock();
        g.tail.extend(data);
        let excess = g.tail.len().saturating_sub(LOG_TAIL_BYTES);
        g.tail.drain(..excess);
        let mut lines = Vec::new();
        for &b in data {
            if b == b'\n' {
                lines.push(std::mem::take(&mut g.line));
            } else if g.line.len() < 512 {
                g.line.push(b);
            }
        }
        if let Some(s) = g.sink.as_mut() {
            let _ = s.write_all(data);
            let _ = s.flush();
        }
        drop(g);
        for l in lines {
            self.scan_line(&l);
        }
    }
}

/// The serial device's sink: writes into a shared [`ConsoleLog`].
pub struct LogWriter(pub Arc<ConsoleLog>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The console device's transmit sink: the VMM end of the agent socket.
/// A vCPU thread writes guest output here; the client's reader thread
/// always drains the other end, so this blocks only briefly.
pub struct SocketSink(pub UnixStream);

impl Write for SocketSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use std::os::unix::io::AsRawFd;
        // MSG_NOSIGNAL: a closed client must give EPIPE, not kill the process.
        // SAFETY: the pointer and length describe `buf`; the fd is the socket's.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Pumps host bytes from the VMM end of the agent socket into the console's
/// receive queue, until the socket closes. When the console's bounded input
/// buffer is full (the guest has not posted receive buffers, or the machine
/// is paused) it waits on the console's [`InputRoom`] signal.
///
/// Agent frames go into the console whole: a frame waits on the host side
/// until all of it has arrived and fits, so a machine saved at any moment
/// holds a frame-aligned stream, and the client of a resumed machine starts
/// on a frame boundary. A stream that is not the agent protocol (bad magic,
/// oversized length) is passed through as it comes.
pub struct AgentBridge {
    socket: UnixStream,
    room: Arc<InputRoom>,
    thread: Option<JoinHandle<()>>,
}

type SharedConsole = Arc<Mutex<MmioTransport<Console>>>;

/// Length of the frame at the start of `b`: `None` while its header is
/// incomplete, `Some(Err(()))` when it is no agent frame.
fn frame_len(b: &[u8]) -> Option<Result<usize, ()>> {
    let header: &[u8; HEADER_LEN] = b.get(..HEADER_LEN)?.try_into().ok()?;
    Some(
        parse_header(header)
            .map(|len| HEADER_LEN + len)
            .map_err(|_| ()),
    )
}

/// Put `bytes` into the console, all at once when `whole` (and it can ever
/// fit), waiting for room as needed. False when the bridge is shutting down.
fn deliver(console: &SharedConsole, room: &InputRoom, bytes: &[u8], whole: bool) -> bool {
    let mut rest = bytes;
    while !rest.is_empty() {
        let (took, seen) = {
            let mut c = console.lock().unwrap_or_else(|e| e.into_inner());
            // Read under the console's lock: a signal after this enqueue
            // changes the generation.
            let seen = room.generation();
            let dev = c.device_mut();
            let wait = whole && rest.len() <= dev.input_capacity() && dev.input_room() < rest.len();
            (if wait { 0 } else { dev.enqueue_input(rest) }, seen)
        };
        rest = &rest[took..];
        if took == 0 && !room.wait_change(seen) {
            return false;
        }
    }
    true
}

fn pump(mut reader: UnixStream, console: SharedConsole, room: Arc<InputRoom>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    let mut framed = true;
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut start = 0;
        while start < buf.len() {
            let rest = &buf[start..];
            let len = if framed {
                match frame_len(rest) {
                    Some(Ok(len)) if len <= rest.len() => len,
                    Some(Ok(_)) | None => break,
                    Some(Err(())) => {
                        framed = false;
                        rest.len()
                    }
                }
            } else {
                rest.len()
            };
            if !deliver(&console, &room, &rest[..len], framed) {
                return;
            }
            start += len;
        }
        buf.drain(..start);
    }
}

impl AgentBridge {
    /// Start pumping from `socket` into `console`.
    pub fn start(socket: UnixStream, console: SharedConsole) -> io::Result<AgentBridge> {
        let reader = socket.try_clone()?;
        let room = console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device()
            .input_room_signal();
        let room2 = room.clone();
        let thread = std::thread::Builder::new()
            .name("agent-bridge".into())
            .spawn(move || pump(reader, console, room2))?;
        Ok(AgentBridge {
            socket,
            room,
            thread: Some(thread),
        })
    }
}

impl Drop for AgentBridge {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        self.room.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testutil::{counting_interrupt, mem};
    use crate::devices::Pausable;

    fn paused_console() -> SharedConsole {
        let (irq, _) = counting_interrupt();
        let c = Console::new(mem(0x10000), irq, Box::new(io::sink())).unwrap();
        let mut t = MmioTransport::new(c);
        t.pause();
        Arc::new(Mutex::new(t))
    }

    fn pending(c: &SharedConsole) -> usize {
        c.lock().unwrap().device().pending_input()
    }

    /// Waits (bounded) until the bridge moved at least `n` bytes into `c`.
    fn wait_pending(c: &SharedConsole, n: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while pending(c) < n {
            assert!(
                std::time::Instant::now() < deadline,
                "the bridge never delivered"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = b"SM".to_vec();
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn bridge_delivers_whole_frames_only() {
        let console = paused_console();
        let (vmm, mut host) = UnixStream::pair().unwrap();
        let bridge = AgentBridge::start(vmm, console.clone()).unwrap();
        let a = frame(b"first frame");
        let b = frame(&[7u8; 300]);
        let mut bytes = a.clone();
        bytes.extend_from_slice(&b[..b.len() / 2]);
        host.write_all(&bytes).unwrap();
        wait_pending(&console, a.len());
        drop(host);
        drop(bridge);
        // The half frame stayed on the host side.
        assert_eq!(pending(&console), a.len());

        // A stream that is not agent frames passes through as it comes.
        let console = paused_console();
        let (vmm, mut host) = UnixStream::pair().unwrap();
        let bridge = AgentBridge::start(vmm, console.clone()).unwrap();
        host.write_all(b"not a frame at all").unwrap();
        wait_pending(&console, 18);
        drop(host);
        drop(bridge);
        assert_eq!(pending(&console), 18);
    }

    #[test]
    fn keeps_a_bounded_tail_and_spots_marks() {
        let log = ConsoleLog::new(None);
        let mut w = LogWriter(log.clone());
        for i in 0..2000 {
            writeln!(w, "line {i} of the boot log").unwrap();
        }
        assert!(log.tail().len() <= LOG_TAIL_BYTES);
        assert!(log.tail_lines(1).ends_with("line 1999 of the boot log"));
        assert_eq!(log.kernel_end(), KernelEnd::None);
        write!(w, "[ 1.0] Kernel pan").unwrap();
        assert_eq!(log.kernel_end(), KernelEnd::None);
        writeln!(w, "ic - not syncing: VFS: Unable to mount root fs").unwrap();
        assert_eq!(log.kernel_end(), KernelEnd::Panic);
        let halted = Arc::new(AtomicBool::new(false));
        let h = halted.clone();
        log.on_halt(Box::new(move || h.store(true, Ordering::SeqCst)));
        writeln!(w, "[ 2.0] reboot: System halted").unwrap();
        assert_eq!(log.kernel_end(), KernelEnd::PowerOff);
        assert!(halted.load(Ordering::SeqCst));
    }
}
