//! virtio-console with a single port (no `VIRTIO_CONSOLE_F_MULTIPORT`): the
//! guest sees `/dev/hvcN`.
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
/// Size of both queues.
pub const QUEUE_SIZE: u16 = 256;
/// receiveq (host to guest).
pub const RX_QUEUE: usize = 0;
/// transmitq (guest to host).
pub const TX_QUEUE: usize = 1;
/// Default bound of host input waiting for guest buffers.
pub const DEFAULT_RX_CAPACITY: usize = 1 << 20;
/// Most descriptors accepted per buffer chain.
pub const MAX_DESCS: usize = 64;

/// Where guest output goes.
pub type ConsoleSink = Box<dyn Write + Send>;

/// A single-port virtio console.
pub struct Console {
    common: VirtioCommon,
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
    /// A console writing guest output to `sink`.
    pub fn new(
        mem: GuestMemoryMmap,
        interrupt: VirtioInterrupt,
        sink: ConsoleSink,
    ) -> Result<Self, VirtioError> {
        Ok(Self {
            common: VirtioCommon::new(&[QUEUE_SIZE, QUEUE_SIZE], mem, interrupt)?,
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

    fn deliver_input(&mut self) {
        if self.pending.is_empty() {
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
        COMMON_FEATURES
    }

    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr: meaningful only with features
        // this device does not offer.
        read_config_bytes(&[0u8; 12], offset, data);
    }

    fn activate(&mut self) {
        self.deliver_input();
    }

    fn resumed(&mut self) {
        self.deliver_input();
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RX_QUEUE => self.deliver_input(),
            TX_QUEUE => self.transmit(),
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
        })
    }

    fn restore(args: ConsoleArgs, state: &ConsoleState) -> Result<Self, VirtioError> {
        let rx_capacity = state.rx_capacity.max(1);
        if state.pending_rx.len() > rx_capacity {
            return Err(VirtioError::StateMismatch(
                "console input exceeds its buffer bound".into(),
            ));
        }
        Ok(Self {
            common: VirtioCommon::restore(
                &[QUEUE_SIZE, QUEUE_SIZE],
                args.mem,
                args.interrupt,
                &state.common,
            )?,
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
