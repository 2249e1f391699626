//! virtio-console with `VIRTIO_CONSOLE_F_MULTIPORT` and one named port.
//!
//! The device offers multiport with `max_nr_ports = 1`: queues 0/1 are port
//! 0's receive/transmit queues, 2/3 the control receive/transmit queues. The
//! driver announces itself (`DEVICE_READY`), the device adds port 0
//! (`DEVICE_ADD`), the driver says it is set up (`PORT_READY`), and the device
//! names it (`PORT_NAME`, e.g. `org.smolvm.agent`) and reports the host end
//! connected (`PORT_OPEN 1`). Port 0 is a plain character device
//! (`/dev/vportNp0`, no tty, no line discipline) whose name the guest finds in
//! `/sys/class/virtio-ports/vportNp0/name`. A driver that does not accept the
//! feature gets a single-port console (`/dev/hvcN`) on queues 0/1, as before.
//!
//! In multiport mode Linux drops data that arrives for a port no guest
//! process has open, so host input is delivered only while the guest holds
//! the port open (`PORT_OPEN` from the guest); it waits in the bounded buffer
//! otherwise. Control messages from the guest are untrusted: each is parsed
//! by [`ControlMsg::parse`] from at most its first bytes, and the queue of
//! control messages to the guest is bounded.
//!
//! Transmit: bytes the guest writes are passed to a host sink as they arrive.
//! Receive: the host pushes bytes with [`Console::enqueue_input`]; they wait in
//! a bounded buffer until the guest has posted receive buffers, and are copied
//! into those immediately when it has. While the device is paused (for a
//! snapshot) input only goes into that buffer; resuming delivers it. A host
//! writer that finds the buffer full waits on [`InputRoom`] instead of polling.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};

use serde::{Deserialize, Serialize};

use super::chain::{Chain, SegCursor, COPY_CHUNK};
use super::{
    read_config_bytes, GuestMemoryMmap, Persist, VirtioCommon, VirtioCommonState, VirtioDevice,
    VirtioError, VirtioInterrupt, COMMON_FEATURES,
};

/// Virtio device ID of a console.
pub const VIRTIO_ID_CONSOLE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
/// Size of both data queues.
pub const QUEUE_SIZE: u16 = 256;
/// Size of both control queues.
pub const CTRL_QUEUE_SIZE: u16 = 32;
/// receiveq of port 0 (host to guest).
pub const RX_QUEUE: usize = 0;
/// transmitq of port 0 (guest to host).
pub const TX_QUEUE: usize = 1;
/// Control receiveq (device to driver), multiport only.
pub const CTRL_RX_QUEUE: usize = 2;
/// Control transmitq (driver to device), multiport only.
pub const CTRL_TX_QUEUE: usize = 3;
/// The queue sizes, in queue order.
pub const QUEUE_SIZES: [u16; 4] = [QUEUE_SIZE, QUEUE_SIZE, CTRL_QUEUE_SIZE, CTRL_QUEUE_SIZE];
/// `VIRTIO_CONSOLE_F_MULTIPORT`: ports, control queues, `max_nr_ports`.
pub const VIRTIO_CONSOLE_F_MULTIPORT: u64 = 1 << 1;
/// The name of the agent's port.
pub const AGENT_PORT_NAME: &str = "org.smolvm.agent";
/// Longest port name accepted (the guest keeps it in a sysfs attribute).
pub const MAX_PORT_NAME: usize = 64;
/// Control messages to the guest that may wait for control receive buffers.
pub const MAX_PENDING_CONTROL: usize = 16;

/// `struct virtio_console_control` events (virtio spec 5.3.6.2).
pub mod event {
    /// Driver to device: the driver is ready (value 1) or failed (0).
    pub const DEVICE_READY: u16 = 0;
    /// Device to driver: a port was added.
    pub const DEVICE_ADD: u16 = 1;
    /// Device to driver: a port was removed.
    pub const DEVICE_REMOVE: u16 = 2;
    /// Driver to device: a port is set up (1) or failed (0).
    pub const PORT_READY: u16 = 3;
    /// Device to driver: the port is a console (`hvc`).
    pub const CONSOLE_PORT: u16 = 4;
    /// Device to driver: console size.
    pub const RESIZE: u16 = 5;
    /// Both ways: the sender's end of the port is open (1) or closed (0).
    pub const PORT_OPEN: u16 = 6;
    /// Device to driver: the port's name follows the header.
    pub const PORT_NAME: u16 = 7;
}

/// Bytes of a control message header (`id: le32, event: le16, value: le16`).
pub const CONTROL_HEADER_LEN: usize = 8;

/// One control message (`struct virtio_console_control`), plus the name
/// bytes that follow a `PORT_NAME`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlMsg {
    /// Port number.
    pub id: u32,
    /// What happened ([`event`]).
    pub event: u16,
    /// Event argument (open/ready flags).
    pub value: u16,
    /// Name bytes (`PORT_NAME` only).
    pub name: Vec<u8>,
}

impl ControlMsg {
    fn new(id: u32, event: u16, value: u16) -> Self {
        ControlMsg {
            id,
            event,
            value,
            name: Vec::new(),
        }
    }

    /// Parse a driver's control message: `None` when shorter than the
    /// header. Bytes after the header are ignored (no driver-to-device event
    /// carries any).
    pub fn parse(bytes: &[u8]) -> Option<ControlMsg> {
        let h: &[u8; CONTROL_HEADER_LEN] = bytes.get(..CONTROL_HEADER_LEN)?.try_into().ok()?;
        Some(ControlMsg::new(
            u32::from_le_bytes([h[0], h[1], h[2], h[3]]),
            u16::from_le_bytes([h[4], h[5]]),
            u16::from_le_bytes([h[6], h[7]]),
        ))
    }

    /// The wire form: header, then the name bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(CONTROL_HEADER_LEN + self.name.len());
        v.extend_from_slice(&self.id.to_le_bytes());
        v.extend_from_slice(&self.event.to_le_bytes());
        v.extend_from_slice(&self.value.to_le_bytes());
        v.extend_from_slice(&self.name);
        v
    }
}

/// Where the multiport handshake of port 0 stands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortState {
    /// The port's name as told to the guest.
    pub name: String,
    /// The driver sent `DEVICE_READY 1` (port 0 was added).
    pub device_ready: bool,
    /// The driver sent `PORT_READY 1` for port 0 (named and opened).
    pub port_ready: bool,
    /// A guest process holds port 0 open: input may be delivered.
    pub guest_open: bool,
    /// Control messages for the guest still waiting for receive buffers.
    pub pending_control: Vec<ControlMsg>,
}
/// Default bound of host input waiting for guest buffers.
pub const DEFAULT_RX_CAPACITY: usize = 1 << 20;
/// Most descriptors accepted per buffer chain.
pub const MAX_DESCS: usize = 64;

/// Where guest output goes.
pub type ConsoleSink = Box<dyn Write + Send>;

/// A virtio console with one port (multiport when the driver accepts it).
pub struct Console {
    common: VirtioCommon,
    port: PortState,
    sink: ConsoleSink,
    pending: VecDeque<u8>,
    rx_capacity: usize,
    sink_failed: bool,
    room: Arc<InputRoom>,
}

/// Tells a host writer blocked on a full input buffer that room may have
/// appeared (the guest took input, or the device resumed). A generation
/// counter read under the console's lock before waiting makes wake-ups
/// impossible to miss.
#[derive(Default)]
pub struct InputRoom {
    state: Mutex<(u64, bool)>,
    cond: Condvar,
}

impl InputRoom {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, bool)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current generation; read it while holding the console's lock.
    pub fn generation(&self) -> u64 {
        self.lock().0
    }

    fn signal(&self) {
        self.lock().0 += 1;
        self.cond.notify_all();
    }

    /// Block until the generation is no longer `seen`; false once closed.
    pub fn wait_change(&self, seen: u64) -> bool {
        let mut g = self.lock();
        while g.0 == seen && !g.1 {
            g = self.cond.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        !g.1
    }

    /// Wake every waiter for good (the writer is shutting down).
    pub fn close(&self) {
        self.lock().1 = true;
        self.cond.notify_all();
    }
}

/// Saved [`Console`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    /// Queues, features, status.
    pub common: VirtioCommonState,
    /// Host input not yet delivered to the guest.
    pub pending_rx: Vec<u8>,
    /// Bound of `pending_rx`.
    pub rx_capacity: usize,
    /// The multiport handshake and port 0's open state.
    pub port: PortState,
}

/// Host resources for [`Console::restore`].
pub struct ConsoleArgs {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// Interrupt line.
    pub interrupt: VirtioInterrupt,
    /// Where guest output goes.
    pub sink: ConsoleSink,
}

impl Console {
    /// A console whose port 0 is named [`AGENT_PORT_NAME`], writing guest
    /// output to `sink`.
    pub fn new(
        mem: GuestMemoryMmap,
        interrupt: VirtioInterrupt,
        sink: ConsoleSink,
    ) -> Result<Self, VirtioError> {
        Self::with_name(mem, interrupt, sink, AGENT_PORT_NAME)
    }

    /// A console whose port 0 has the given name (at most
    /// [`MAX_PORT_NAME`] bytes, no NUL).
    pub fn with_name(
        mem: GuestMemoryMmap,
        interrupt: VirtioInterrupt,
        sink: ConsoleSink,
        name: &str,
    ) -> Result<Self, VirtioError> {
        check_name(name)?;
        Ok(Self {
            common: VirtioCommon::new(&QUEUE_SIZES, mem, interrupt)?,
            port: PortState {
                name: name.into(),
                ..PortState::default()
            },
            sink,
            pending: VecDeque::new(),
            rx_capacity: DEFAULT_RX_CAPACITY,
            sink_failed: false,
            room: Arc::default(),
        })
    }

    /// Queue host bytes for the guest and deliver what fits in the receive
    /// buffers the guest has posted (nothing while paused). Returns how many
    /// bytes were accepted: fewer than `input.len()` when the bounded buffer
    /// is full, in which case the caller waits on [`Console::input_room_signal`]
    /// and retries the rest.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let room = self.rx_capacity.saturating_sub(self.pending.len());
        let n = room.min(input.len());
        self.pending.extend(&input[..n]);
        self.deliver_input();
        n
    }

    /// Host bytes waiting for guest receive buffers.
    pub fn pending_input(&self) -> usize {
        self.pending.len()
    }

    /// How many more bytes [`Console::enqueue_input`] would accept now.
    pub fn input_room(&self) -> usize {
        self.rx_capacity.saturating_sub(self.pending.len())
    }

    /// The bound on undelivered host input.
    pub fn input_capacity(&self) -> usize {
        self.rx_capacity
    }

    /// Signalled whenever undelivered input shrinks.
    pub fn input_room_signal(&self) -> Arc<InputRoom> {
        self.room.clone()
    }

    /// Whether the driver runs the multiport protocol.
    pub fn multiport(&self) -> bool {
        self.common.activated && self.common.has_feature(VIRTIO_CONSOLE_F_MULTIPORT)
    }

    /// The multiport handshake state (port name, ready and open flags).
    pub fn port_state(&self) -> &PortState {
        &self.port
    }

    fn deliver_input(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        // A multiport guest drops data for a port nobody has open.
        if self.multiport() && !self.port.guest_open {
            return;
        }
        let before = self.pending.len();
        self.drain_rx();
        if self.pending.len() < before {
            self.room.signal();
        }
    }

    fn drain_rx(&mut self) {
        let pending = &mut self.pending;
        self.common.drain_queue(RX_QUEUE, MAX_DESCS, |mem, chain| {
            if pending.is_empty() {
                return None;
            }
            Some(match chain {
                Ok(c) => fill_rx(mem, &c, pending),
                Err(e) => {
                    log::warn!("virtio-console: bad receive buffer: {e}");
                    0
                }
            })
        });
    }

    /// Handle the driver's control messages, then send what is due.
    fn control_in(&mut self) {
        let mut got = Vec::new();
        self.common
            .drain_queue(CTRL_TX_QUEUE, MAX_DESCS, |mem, chain| {
                match chain {
                    Ok(c) => {
                        let mut head = [0u8; CONTROL_HEADER_LEN];
                        let n = SegCursor::new(&c.readable).read(mem, &mut head);
                        match ControlMsg::parse(&head[..n]) {
                            Some(m) => got.push(m),
                            None => log::warn!("virtio-console: short control message ({n} bytes)"),
                        }
                    }
                    Err(e) => log::warn!("virtio-console: bad control buffer: {e}"),
                }
                Some(0)
            });
        for m in got {
            self.on_control(m);
        }
        self.control_out();
        self.deliver_input();
    }

    /// One message from the driver (untrusted: anything unexpected is
    /// ignored).
    fn on_control(&mut self, m: ControlMsg) {
        let p = &mut self.port;
        match (m.event, m.id) {
            (event::DEVICE_READY, _) if m.value == 1 => {
                // A driver re-announcing itself (after a reset) starts over.
                p.device_ready = true;
                p.port_ready = false;
                p.guest_open = false;
                queue_control(p, ControlMsg::new(0, event::DEVICE_ADD, 0));
            }
            (event::DEVICE_READY, _) => log::warn!("virtio-console: the driver failed to start"),
            (event::PORT_READY, 0) if m.value == 1 && p.device_ready => {
                p.port_ready = true;
                let mut name = ControlMsg::new(0, event::PORT_NAME, 1);
                name.name = p.name.as_bytes().to_vec();
                queue_control(p, name);
                // The host end is always connected.
                queue_control(p, ControlMsg::new(0, event::PORT_OPEN, 1));
            }
            (event::PORT_READY, id) if m.value != 1 => {
                log::warn!("virtio-console: the driver could not set up port {id}")
            }
            (event::PORT_OPEN, 0) => p.guest_open = m.value == 1,
            (ev, id) => log::debug!("virtio-console: ignored control event {ev} for port {id}"),
        }
    }

    /// Copy waiting control messages into the driver's control receive
    /// buffers, one message per buffer.
    fn control_out(&mut self) {
        if self.port.pending_control.is_empty() {
            return;
        }
        let pending = &mut self.port.pending_control;
        self.common
            .drain_queue(CTRL_RX_QUEUE, MAX_DESCS, |mem, chain| {
                if pending.is_empty() {
                    return None;
                }
                let msg = pending.remove(0);
                Some(match chain {
                    Ok(c) => {
                        let bytes = msg.encode();
                        if c.writable_len() < bytes.len() as u64 {
                            log::warn!("virtio-console: control buffer too small, message dropped");
                            0
                        } else {
                            // Fits: `bytes` is at most a header and a name.
                            SegCursor::new(&c.writable).write(mem, &bytes) as u32
                        }
                    }
                    Err(e) => {
                        log::warn!("virtio-console: bad control receive buffer: {e}");
                        0
                    }
                })
            });
    }

    fn transmit(&mut self) {
        let sink = &mut self.sink;
        let sink_failed = &mut self.sink_failed;
        self.common.drain_queue(TX_QUEUE, MAX_DESCS, |mem, chain| {
            match chain {
                Ok(c) => drain_tx(mem, &c, sink, sink_failed),
                Err(e) => log::warn!("virtio-console: bad transmit buffer: {e}"),
            }
            Some(0)
        });
        if let Err(e) = self.sink.flush() {
            log::debug!("virtio-console: flushing output failed: {e}");
        }
    }
}

fn check_name(name: &str) -> Result<(), VirtioError> {
    if name.is_empty() || name.len() > MAX_PORT_NAME || name.contains('\0') {
        return Err(VirtioError::StateMismatch(format!(
            "bad console port name {name:?}"
        )));
    }
    Ok(())
}

fn queue_control(p: &mut PortState, m: ControlMsg) {
    if p.pending_control.len() >= MAX_PENDING_CONTROL {
        // Only a driver repeating its handshake without taking the answers
        // gets here; the oldest answers are stale by then.
        p.pending_control.remove(0);
    }
    p.pending_control.push(m);
}

fn fill_rx(mem: &GuestMemoryMmap, chain: &Chain, pending: &mut VecDeque<u8>) -> u32 {
    let mut out = SegCursor::new(&chain.writable);
    // The used length is a u32: never fill more than it can count, whatever
    // the chain claims.
    let mut written = 0u32;
    while !pending.is_empty() && written < u32::MAX {
        let (front, _) = pending.as_slices();
        let room = usize::try_from(u32::MAX - written).unwrap_or(usize::MAX);
        let front = &front[..front.len().min(room)];
        let want = front.len();
        let n = out.write(mem, front);
        pending.drain(..n);
        // n <= room, so this neither truncates nor overflows.
        written += n as u32;
        if n < want {
            break;
        }
    }
    written
}

fn drain_tx(mem: &GuestMemoryMmap, chain: &Chain, sink: &mut ConsoleSink, failed: &mut bool) {
    let mut src = SegCursor::new(&chain.readable);
    let mut buf = vec![0u8; COPY_CHUNK.min(src.remaining() as usize)];
    loop {
        let n = src.read(mem, &mut buf);
        if n == 0 {
            break;
        }
        if let Err(e) = sink.write_all(&buf[..n]) {
            if !*failed {
                log::error!("virtio-console: output sink failed, dropping guest output: {e}");
                *failed = true;
            }
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn device_features(&self) -> u64 {
        COMMON_FEATURES | VIRTIO_CONSOLE_F_MULTIPORT
    }

    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows (no VIRTIO_CONSOLE_F_SIZE), max_nr_ports = 1, emerg_wr.
        let mut config = [0u8; 12];
        config[4..8].copy_from_slice(&1u32.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn activate(&mut self) {
        self.deliver_input();
    }

    fn reset(&mut self) {
        let name = std::mem::take(&mut self.port.name);
        self.port = PortState {
            name,
            ..PortState::default()
        };
    }

    fn resumed(&mut self) {
        self.control_out();
        self.deliver_input();
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RX_QUEUE => self.deliver_input(),
            TX_QUEUE => self.transmit(),
            CTRL_RX_QUEUE => self.control_out(),
            CTRL_TX_QUEUE => self.control_in(),
            _ => {}
        }
    }
}

impl Persist for Console {
    type State = ConsoleState;
    type Args<'a> = ConsoleArgs;
    type Error = VirtioError;

    fn save(&self) -> Result<ConsoleState, VirtioError> {
        Ok(ConsoleState {
            common: self.common.save(),
            pending_rx: self.pending.iter().copied().collect(),
            rx_capacity: self.rx_capacity,
            port: self.port.clone(),
        })
    }

    fn restore(args: ConsoleArgs, state: &ConsoleState) -> Result<Self, VirtioError> {
        let rx_capacity = state.rx_capacity.max(1);
        if state.pending_rx.len() > rx_capacity {
            return Err(VirtioError::StateMismatch(
                "console input exceeds its buffer bound".into(),
            ));
        }
        check_name(&state.port.name)?;
        if state.port.pending_control.len() > MAX_PENDING_CONTROL
            || state
                .port
                .pending_control
                .iter()
                .any(|m| m.name.len() > MAX_PORT_NAME)
        {
            return Err(VirtioError::StateMismatch(
                "console control messages exceed their bound".into(),
            ));
        }
        Ok(Self {
            common: VirtioCommon::restore(&QUEUE_SIZES, args.mem, args.interrupt, &state.common)?,
            port: state.port.clone(),
            sink: args.sink,
            pending: state.pending_rx.iter().copied().collect(),
            rx_capacity,
            sink_failed: false,
            room: Arc::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::{regs, MmioTransport};
    use crate::devices::virtio::status::*;
    use crate::devices::virtio::testutil::*;
    use crate::devices::virtio::VIRTIO_F_VERSION_1;
    use std::sync::{Arc, Mutex};
    use vm_memory::{Bytes, GuestAddress};

    /// A sink the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Shared {
        fn take(&self) -> Vec<u8> {
            std::mem::take(&mut self.0.lock().unwrap())
        }
    }

    fn setup(m: &GuestMemoryMmap) -> (MmioTransport<Console>, Shared, Arc<Counter>) {
        let (irq, count) = counting_interrupt();
        let sink = Shared::default();
        let dev = Console::new(m.clone(), irq, Box::new(sink.clone())).unwrap();
        (MmioTransport::new(dev), sink, count)
    }

    /// The console restored from `state`, its output discarded.
    fn restore_discarding_output(
        m: &GuestMemoryMmap,
        state: &crate::devices::virtio::mmio::MmioDeviceState<ConsoleState>,
    ) -> MmioTransport<Console> {
        let (irq, _count) = counting_interrupt();
        let args = ConsoleArgs {
            mem: m.clone(),
            interrupt: irq,
            sink: Box::new(std::io::sink()),
        };
        MmioTransport::<Console>::restore(args, state).unwrap()
    }

    fn read(m: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        m.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn transmit_goes_to_sink() {
        let m = mem(0x40000);
        let (mut t, sink, count) = setup(&m);
        let rxq = TestQueue::new(&m, 16, GuestAddress(0x1000));
        let mut txq = TestQueue::new(&m, 16, GuestAddress(0x2000));
        assert_ne!(
            handshake(&mut t, COMMON_FEATURES, &[&rxq, &txq]) & DRIVER_OK,
            0
        );

        m.write_slice(b"hello ", GuestAddress(0x10000)).unwrap();
        m.write_slice(b"world", GuestAddress(0x10100)).unwrap();
        txq.add(&[Desc::r(0x10000, 6), Desc::r(0x10100, 5)]);
        // Malformed: buffer past the end of memory, and zero length.
        txq.add(&[Desc::r(0x3fff0, 0x100)]);
        txq.add(&[Desc::r(0x10000, 0)]);
        wr(&mut t, regs::QUEUE_NOTIFY, TX_QUEUE as u32);
        assert_eq!(sink.take(), b"hello world");
        assert_eq!(txq.used_idx(), 3);
        assert_eq!(count.count(), 1, "one interrupt per batch");
        assert_eq!(t.status() & NEEDS_RESET, 0);
    }

    #[test]
    fn input_waits_for_buffers_and_is_bounded() {
        let m = mem(0x40000);
        let (t, _sink, count) = setup(&m);
        let mut t = MmioTransport::new(
            Console::restore(
                ConsoleArgs {
                    mem: m.clone(),
                    interrupt: t.device().common().interrupt.clone(),
                    sink: Box::new(std::io::sink()),
                },
                &ConsoleState {
                    rx_capacity: 8,
                    ..t.device().save().unwrap()
                },
            )
            .unwrap(),
        );
        // Before the driver is up, input is only buffered, up to the bound.
        assert_eq!(t.device_mut().enqueue_input(b"0123456789"), 8);
        assert_eq!(t.device().input_room(), 0);

        let mut rxq = TestQueue::new(&m, 16, GuestAddress(0x1000));
        let txq = TestQueue::new(&m, 16, GuestAddress(0x2000));
        rxq.add(&[Desc::w(0x10000, 5)]);
        handshake(&mut t, VIRTIO_F_VERSION_1, &[&rxq, &txq]);
        // Activation delivered what fit.
        assert_eq!(rxq.used_idx(), 1);
        assert_eq!(rxq.used_elem(0), (0, 5));
        assert_eq!(read(&m, 0x10000, 5), b"01234");
        assert_eq!(t.device().pending_input(), 3);

        // A buffer split over two descriptors takes the rest plus new input.
        rxq.add(&[Desc::w(0x11000, 2), Desc::w(0x11100, 8)]);
        wr(&mut t, regs::QUEUE_NOTIFY, RX_QUEUE as u32);
        assert_eq!(rxq.used_elem(1), (1, 3));
        assert_eq!(read(&m, 0x11000, 2), b"56");
        assert_eq!(read(&m, 0x11100, 1), b"7");
        let before = count.count();
        assert_eq!(t.device_mut().enqueue_input(b"ab"), 2);
        assert_eq!(rxq.used_idx(), 2, "no buffer posted yet");
        rxq.add(&[Desc::w(0x12000, 16)]);
        wr(&mut t, regs::QUEUE_NOTIFY, RX_QUEUE as u32);
        assert_eq!(rxq.used_elem(2), (3, 2));
        assert_eq!(read(&m, 0x12000, 2), b"ab");
        assert!(count.count() > before);

        // A read-only receive buffer is returned empty, not written.
        rxq.add(&[Desc::r(0x13000, 16)]);
        t.device_mut().enqueue_input(b"z");
        assert_eq!(rxq.used_elem(3).1, 0);
        assert_eq!(t.device().pending_input(), 1);
    }

    #[test]
    fn event_idx_suppresses_interrupts_until_used_event() {
        let m = mem(0x40000);
        let (mut t, sink, count) = setup(&m);
        let rxq = TestQueue::new(&m, 16, GuestAddress(0x1000));
        let mut txq = TestQueue::new(&m, 16, GuestAddress(0x2000));
        handshake(&mut t, COMMON_FEATURES, &[&rxq, &txq]);
        m.write_slice(b"abc", GuestAddress(0x10000)).unwrap();
        // The driver asks for an interrupt once the third buffer is used.
        txq.set_used_event(2);
        for i in 0..3u64 {
            txq.add(&[Desc::r(0x10000 + i, 1)]);
            wr(&mut t, regs::QUEUE_NOTIFY, TX_QUEUE as u32);
            assert_eq!(count.count(), usize::from(i == 2), "after buffer {i}");
        }
        assert_eq!(sink.take(), b"abc");
        // The device asks to be notified of the next available entry.
        assert_eq!(txq.avail_event(), 3);
    }

    #[test]
    fn corrupt_avail_index_marks_needs_reset() {
        let m = mem(0x40000);
        let (mut t, _sink, count) = setup(&m);
        let rxq = TestQueue::new(&m, 16, GuestAddress(0x1000));
        let mut txq = TestQueue::new(&m, 16, GuestAddress(0x2000));
        handshake(&mut t, VIRTIO_F_VERSION_1, &[&rxq, &txq]);
        txq.set_avail_idx(1000);
        wr(&mut t, regs::QUEUE_NOTIFY, TX_QUEUE as u32);
        assert_ne!(t.status() & NEEDS_RESET, 0);
        assert_ne!(
            rd(&mut t, regs::INTERRUPT_STATUS) & crate::devices::virtio::INT_CONFIG,
            0
        );
        assert!(count.count() >= 1);
        // Further notifications are ignored until reset; reset clears it.
        wr(&mut t, regs::QUEUE_NOTIFY, TX_QUEUE as u32);
        wr(&mut t, regs::STATUS, 0);
        assert_eq!(t.status(), 0);
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn out_of_range_head_index_marks_needs_reset() {
        let m = mem(0x40000);
        let (mut t, sink, _count) = setup(&m);
        let rxq = TestQueue::new(&m, 16, GuestAddress(0x1000));
        let mut txq = TestQueue::new(&m, 16, GuestAddress(0x2000));
        handshake(&mut t, VIRTIO_F_VERSION_1, &[&rxq, &txq]);
        txq.publish(200);
        wr(&mut t, regs::QUEUE_NOTIFY, TX_QUEUE as u32);
        assert_ne!(t.status() & NEEDS_RESET, 0);
        assert!(sink.take().is_empty());
    }

    #[test]
    fn save_restore_mid_stream_keeps_ring_positions() {
        let m = mem(0x40000);
        let (mut t, sink, _count) = setup(&m);
        let mut rxq = TestQueue::new(&m, 16, GuestAddress(0x1000));
        let mut txq = TestQueue::new(&m, 16, GuestAddress(0x2000));
        handshake(&mut t, VIRTIO_F_VERSION_1, &[&rxq, &txq]);

        // Some traffic so ring positions are not zero.
        for i in 0..3u64 {
            m.write_slice(b"x", GuestAddress(0x10000 + i)).unwrap();
            txq.add(&[Desc::r(0x10000 + i, 1)]);
        }
        wr(&mut t, regs::QUEUE_NOTIFY, TX_QUEUE as u32);
        assert_eq!(sink.take(), b"xxx");
        // In flight at snapshot time: pending input that found no buffer,
        // and a posted receive buffer the device has not been notified of.
        rxq.add(&[Desc::w(0x11000, 4)]);
        rxq.add(&[Desc::w(0x12000, 4)]);
        t.device_mut().enqueue_input(b"abcdef");
        t.device_mut().enqueue_input(b"ghij");
        assert_eq!(rxq.used_idx(), 2);
        rxq.add(&[Desc::w(0x13000, 4)]); // posted but not yet seen (no notify)

        let state = t.save().unwrap();
        // Through the snapshot codec.
        let bytes = postcard::to_allocvec(&state).unwrap();
        let state: crate::devices::virtio::mmio::MmioDeviceState<ConsoleState> =
            postcard::from_bytes(&bytes).unwrap();
        assert_eq!(state.device.pending_rx, b"ghij");
        assert_eq!(state.device.common.queues[TX_QUEUE].next_avail, 3);
        assert_eq!(state.device.common.queues[RX_QUEUE].next_used, 2);
        drop(t);

        let (irq, count2) = counting_interrupt();
        let sink2 = Shared::default();
        let mut t2 = MmioTransport::<Console>::restore(
            ConsoleArgs {
                mem: m.clone(),
                interrupt: irq,
                sink: Box::new(sink2.clone()),
            },
            &state,
        )
        .unwrap();
        assert_eq!(t2.status(), state.transport.status);
        // The guest's pending notification arrives after resume.
        wr(&mut t2, regs::QUEUE_NOTIFY, RX_QUEUE as u32);
        assert_eq!(rxq.used_idx(), 3);
        assert_eq!(rxq.used_elem(2), (2, 4));
        assert_eq!(read(&m, 0x13000, 4), b"ghij");
        assert!(count2.count() >= 1);
        m.write_slice(b"after", GuestAddress(0x14000)).unwrap();
        txq.add(&[Desc::r(0x14000, 5)]);
        wr(&mut t2, regs::QUEUE_NOTIFY, TX_QUEUE as u32);
        assert_eq!(sink2.take(), b"after");
        assert_eq!(txq.used_idx(), 4);
    }

    /// A multiport driver: the four queues at 0x1000.. and buffers at 0x10000...
    struct Driver<'a> {
        m: &'a GuestMemoryMmap,
        rxq: TestQueue<'a>,
        txq: TestQueue<'a>,
        crx: TestQueue<'a>,
        ctx: TestQueue<'a>,
        crx_seen: u16,
    }

    impl<'a> Driver<'a> {
        fn new(m: &'a GuestMemoryMmap) -> Self {
            Driver {
                m,
                rxq: TestQueue::new(m, 16, GuestAddress(0x1000)),
                txq: TestQueue::new(m, 16, GuestAddress(0x2000)),
                crx: TestQueue::new(m, 16, GuestAddress(0x3000)),
                ctx: TestQueue::new(m, 16, GuestAddress(0x4000)),
                crx_seen: 0,
            }
        }

        fn up(&mut self, t: &mut MmioTransport<Console>) {
            let st = handshake(
                t,
                COMMON_FEATURES | VIRTIO_CONSOLE_F_MULTIPORT,
                &[&self.rxq, &self.txq, &self.crx, &self.ctx],
            );
            assert_ne!(st & DRIVER_OK, 0);
            for i in 0..8u64 {
                self.crx.add(&[Desc::w(0x20000 + i * 0x100, 0x100)]);
            }
            wr(t, regs::QUEUE_NOTIFY, CTRL_RX_QUEUE as u32);
        }

        fn send(&mut self, t: &mut MmioTransport<Console>, at: u64, msg: &ControlMsg) {
            self.m.write_slice(&msg.encode(), GuestAddress(at)).unwrap();
            self.ctx.add(&[Desc::r(at, CONTROL_HEADER_LEN as u32)]);
            wr(t, regs::QUEUE_NOTIFY, CTRL_TX_QUEUE as u32);
        }

        /// Control messages the device put in the receive buffers since the
        /// last call.
        fn received(&mut self) -> Vec<ControlMsg> {
            let mut out = Vec::new();
            while self.crx_seen < self.crx.used_idx() {
                let (head, len) = self.crx.used_elem(self.crx_seen);
                let addr = 0x20000 + u64::from(head) * 0x100;
                let bytes = read(self.m, addr, len as usize);
                let mut msg = ControlMsg::parse(&bytes).unwrap();
                msg.name = bytes[CONTROL_HEADER_LEN..].to_vec();
                out.push(msg);
                self.crx_seen += 1;
            }
            out
        }
    }

    #[test]
    fn multiport_handshake_names_the_port_and_gates_input_on_open() {
        let m = mem(0x40000);
        let (mut t, sink, _count) = setup(&m);
        assert_ne!(t.device().device_features() & VIRTIO_CONSOLE_F_MULTIPORT, 0);
        let mut cfg = [0u8; 4];
        t.device().read_config(4, &mut cfg);
        assert_eq!(u32::from_le_bytes(cfg), 1, "max_nr_ports");

        let mut d = Driver::new(&m);
        d.up(&mut t);
        assert!(t.device().multiport());
        assert!(d.received().is_empty(), "nothing before DEVICE_READY");
        d.send(
            &mut t,
            0x30000,
            &ControlMsg::new(0xffff_ffff, event::DEVICE_READY, 1),
        );
        assert_eq!(d.received(), vec![ControlMsg::new(0, event::DEVICE_ADD, 0)]);
        d.send(&mut t, 0x30010, &ControlMsg::new(0, event::PORT_READY, 1));
        let mut name = ControlMsg::new(0, event::PORT_NAME, 1);
        name.name = AGENT_PORT_NAME.as_bytes().to_vec();
        assert_eq!(
            d.received(),
            vec![name, ControlMsg::new(0, event::PORT_OPEN, 1)]
        );

        // Input waits while no guest process has the port open.
        d.rxq.add(&[Desc::w(0x11000, 64)]);
        wr(&mut t, regs::QUEUE_NOTIFY, RX_QUEUE as u32);
        assert_eq!(t.device_mut().enqueue_input(b"frame"), 5);
        assert_eq!(d.rxq.used_idx(), 0);
        d.send(&mut t, 0x30020, &ControlMsg::new(0, event::PORT_OPEN, 1));
        assert!(t.device().port_state().guest_open);
        assert_eq!(d.rxq.used_elem(0), (0, 5));
        assert_eq!(read(&m, 0x11000, 5), b"frame");

        // Output flows on port 0's transmit queue.
        m.write_slice(b"out", GuestAddress(0x12000)).unwrap();
        d.txq.add(&[Desc::r(0x12000, 3)]);
        wr(&mut t, regs::QUEUE_NOTIFY, TX_QUEUE as u32);
        assert_eq!(sink.take(), b"out");

        // Closed again: input waits again.
        d.send(&mut t, 0x30030, &ControlMsg::new(0, event::PORT_OPEN, 0));
        d.rxq.add(&[Desc::w(0x13000, 64)]);
        t.device_mut().enqueue_input(b"later");
        assert_eq!(d.rxq.used_idx(), 1);
        assert_eq!(t.device().pending_input(), 5);

        // Save with the port closed and input pending; the restored device
        // delivers once the guest opens the port again.
        let state = t.save().unwrap();
        let bytes = postcard::to_allocvec(&state).unwrap();
        let state: crate::devices::virtio::mmio::MmioDeviceState<ConsoleState> =
            postcard::from_bytes(&bytes).unwrap();
        assert!(state.device.port.port_ready && !state.device.port.guest_open);
        drop(t);
        let mut t2 = restore_discarding_output(&m, &state);
        d.send(&mut t2, 0x30040, &ControlMsg::new(0, event::PORT_OPEN, 1));
        assert_eq!(d.rxq.used_elem(1), (1, 5));
        assert_eq!(read(&m, 0x13000, 5), b"later");
    }

    #[test]
    fn control_messages_wait_for_buffers_across_a_save() {
        let m = mem(0x40000);
        let (mut t, _sink, _count) = setup(&m);
        let mut d = Driver::new(&m);
        handshake(
            &mut t,
            COMMON_FEATURES | VIRTIO_CONSOLE_F_MULTIPORT,
            &[&d.rxq, &d.txq, &d.crx, &d.ctx],
        );
        // No control receive buffers posted yet: the answer waits.
        d.send(&mut t, 0x30000, &ControlMsg::new(0, event::DEVICE_READY, 1));
        assert_eq!(t.device().port_state().pending_control.len(), 1);
        let state = t.save().unwrap();
        let mut t2 = restore_discarding_output(&m, &state);
        d.crx.add(&[Desc::w(0x20000, 0x100)]);
        wr(&mut t2, regs::QUEUE_NOTIFY, CTRL_RX_QUEUE as u32);
        assert_eq!(d.received(), vec![ControlMsg::new(0, event::DEVICE_ADD, 0)]);
        // A control buffer too small for a message completes empty.
        d.send(&mut t2, 0x30010, &ControlMsg::new(0, event::PORT_READY, 1));
        d.crx.add(&[Desc::w(0x20100, 4)]);
        wr(&mut t2, regs::QUEUE_NOTIFY, CTRL_RX_QUEUE as u32);
        assert_eq!(d.crx.used_elem(1).1, 0);
    }

    #[test]
    fn a_driver_without_multiport_gets_a_plain_console() {
        let m = mem(0x40000);
        let (mut t, _sink, _count) = setup(&m);
        let mut rxq = TestQueue::new(&m, 16, GuestAddress(0x1000));
        let txq = TestQueue::new(&m, 16, GuestAddress(0x2000));
        handshake(&mut t, COMMON_FEATURES, &[&rxq, &txq]);
        assert!(!t.device().multiport());
        rxq.add(&[Desc::w(0x10000, 8)]);
        t.device_mut().enqueue_input(b"now");
        assert_eq!(rxq.used_elem(0), (0, 3), "no open needed");
    }

    #[test]
    fn control_parse_and_encode() {
        assert_eq!(ControlMsg::parse(&[0; 7]), None);
        let m = ControlMsg::parse(&[1, 0, 0, 0, 6, 0, 1, 0, 0xff]).unwrap();
        assert_eq!(m, ControlMsg::new(1, event::PORT_OPEN, 1));
        assert_eq!(m.encode(), [1, 0, 0, 0, 6, 0, 1, 0]);
        assert!(Console::with_name(
            mem(0x1000),
            counting_interrupt().0,
            Box::new(std::io::sink()),
            "a\0b"
        )
        .is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]

        /// Any header round-trips; any byte string parses or is refused
        /// without panicking.
        #[test]
        fn control_header_round_trips(id: u32, ev: u16, value: u16,
                                      junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..32)) {
            let m = ControlMsg::new(id, ev, value);
            proptest::prop_assert_eq!(ControlMsg::parse(&m.encode()), Some(m));
            let _ = ControlMsg::parse(&junk);
        }

        /// Arbitrary control messages (and chains) from a driver never
        /// panic the device, keep the queue of answers bounded, and leave a
        /// state that restores.
        #[test]
        fn arbitrary_control_traffic_stays_bounded(
            msgs in proptest::collection::vec((0u32..3, 0u16..9, 0u16..3, 0u32..12), 0..64)
        ) {
            let m = mem(0x40000);
            let (mut t, _sink, _count) = setup(&m);
            let mut d = Driver::new(&m);
            handshake(
                &mut t,
                COMMON_FEATURES | VIRTIO_CONSOLE_F_MULTIPORT,
                &[&d.rxq, &d.txq, &d.crx, &d.ctx],
            );
            for (i, (id, ev, value, len)) in msgs.into_iter().enumerate() {
                let at = 0x30000 + (i as u64 % 16) * 0x10;
                m.write_slice(&ControlMsg::new(id, ev, value).encode(), GuestAddress(at)).unwrap();
                d.ctx.add(&[Desc::r(at, len)]);
                wr(&mut t, regs::QUEUE_NOTIFY, CTRL_TX_QUEUE as u32);
                if i % 5 == 0 {
                    d.crx.add(&[Desc::w(0x20000 + (i as u64 % 16) * 0x100, 0x100)]);
                    wr(&mut t, regs::QUEUE_NOTIFY, CTRL_RX_QUEUE as u32);
                }
                proptest::prop_assert!(t.device().port_state().pending_control.len() <= MAX_PENDING_CONTROL);
            }
            let state = t.save().unwrap();
            let (irq, _c) = counting_interrupt();
            let args = ConsoleArgs { mem: m.clone(), interrupt: irq, sink: Box::new(std::io::sink()) };
            let restored = MmioTransport::<Console>::restore(args, &state);
            proptest::prop_assert!(restored.is_ok());
        }
    }

    #[test]
    fn restore_rejects_mismatched_state() {
        let m = mem(0x40000);
        let (t, _s, _c) = setup(&m);
        let mut state = t.device().save().unwrap();
        state.common.queues.pop();
        let (irq, _) = counting_interrupt();
        assert!(Console::restore(
            ConsoleArgs {
                mem: m.clone(),
                interrupt: irq.clone(),
                sink: Box::new(std::io::sink())
            },
            &state
        )
        .is_err());
        let mut state = t.device().save().unwrap();
        state.common.queues[0].size = 3;
        assert!(Console::restore(
            ConsoleArgs {
                mem: m,
                interrupt: irq,
                sink: Box::new(std::io::sink())
            },
            &state
        )
        .is_err());
    }
}
