//! Virtio devices (console, block, rng, fs) behind the virtio-mmio transport.
//!
//! Ownership: each device owns its queues and a handle to guest memory; the
//! [`mmio::MmioTransport`] owns the device and turns guest register accesses
//! into queue configuration, feature negotiation and queue notifications.
//! Work is done synchronously on the notifying vCPU thread (or, for console
//! input, on the thread that calls `enqueue_input`), so there are no device
//! threads and a snapshot never races an in-progress request.
//!
//! Everything read from guest memory is untrusted: descriptor chains are
//! bounded and range-checked in [`chain`], malformed requests complete with an
//! error status, and queue-level corruption marks the device `NEEDS_RESET`.

pub mod block;
pub mod chain;
pub mod console;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod rng;

#[cfg(test)]
pub(crate) mod testutil;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use chain::{Chain, ChainError};
use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// Guest memory as the devices see it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// `VIRTIO_F_VERSION_1`: the only transport generation we speak.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_EVENT_IDX`: used/avail event suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Features every device offers on top of its own.
pub const COMMON_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// Guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// Guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// Driver is set up and running.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation finished.
    pub const FEATURES_OK: u32 = 8;
    /// Device hit an unrecoverable error; the driver must reset it.
    pub const NEEDS_RESET: u32 = 0x40;
    /// Driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bit: a used ring was updated.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: configuration (or device status) changed.
pub const INT_CONFIG: u32 = 2;

/// Size of each virtio-mmio window.
pub const MMIO_SIZE: u64 = 0x1000;
/// Guest-physical base of the first virtio-mmio window; the next ones follow
/// at [`MMIO_SIZE`] steps. x86_64: in the hole below 4 GiB.
#[cfg(not(target_arch = "aarch64"))]
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Guest-physical base of the first virtio-mmio window (aarch64: the device
/// area below RAM, `arch::aarch64::layout`).
#[cfg(target_arch = "aarch64")]
pub const MMIO_BASE: u64 = crate::arch::aarch64::layout::MMIO_DEVICES_BASE;
/// Interrupt lines (GSIs) handed to virtio-mmio devices, in slot order. IRQ 4
/// is the serial port and 8 the RTC on x86_64, so they are skipped; aarch64
/// uses the same numbers (GSI `g` is the GIC's SPI `g + 32`).
pub const MMIO_IRQS: [u32; 6] = [5, 6, 7, 9, 10, 11];

/// Base address and IRQ of virtio-mmio slot `index`, or `None` past the last
/// slot.
pub fn mmio_slot(index: usize) -> Option<(u64, u32)> {
    let irq = *MMIO_IRQS.get(index)?;
    Some((MMIO_BASE + index as u64 * MMIO_SIZE, irq))
}

/// Kernel command-line fragment that makes Linux probe a virtio-mmio device
/// (`CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`).
pub fn cmdline_fragment(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device={MMIO_SIZE:#x}@{base:#x}:{irq}")
}

/// Raises the guest interrupt line of one device. The VMM implements it with
/// an irqfd or `KVM_IRQ_LINE`; tests count calls.
pub trait InterruptTrigger: Send + Sync {
    /// Assert the interrupt.
    fn trigger(&self);
}

/// The interrupt side of a virtio-mmio device: the `InterruptStatus` register
/// bits plus the line that tells the guest to look at them.
#[derive(Clone)]
pub struct VirtioInterrupt {
    status: Arc<AtomicU32>,
    line: Arc<dyn InterruptTrigger>,
}

impl VirtioInterrupt {
    /// An interrupt delivered through `line`.
    pub fn new(line: Arc<dyn InterruptTrigger>) -> Self {
        Self {
            status: Arc::new(AtomicU32::new(0)),
            line,
        }
    }

    /// Tell the driver a used ring changed.
    pub fn signal_used_queue(&self) {
        self.status.fetch_or(INT_VRING, Ordering::SeqCst);
        self.line.trigger();
    }

    /// Tell the driver the configuration or device status changed.
    pub fn signal_config_change(&self) {
        self.status.fetch_or(INT_CONFIG, Ordering::SeqCst);
        self.line.trigger();
    }

    /// Current `InterruptStatus` bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// `InterruptACK`: clear `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}

/// The snapshot contract the device models implement (state structs apart
/// from runtime objects; restore is construction).
pub use crate::persist::Persist;

/// Errors of the virtio device models.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// A queue size the transport does not allow.
    #[error("invalid virtio queue configuration: {0}")]
    Queue(virtio_queue::Error),
    /// A snapshot does not describe this device.
    #[error("virtio device state does not match the device: {0}")]
    StateMismatch(String),
    /// A queue in an active snapshot points outside guest memory.
    #[error("virtio queue {0} in the snapshot lies outside guest memory")]
    QueueOutsideMemory(usize),
    /// Disk image problems.
    #[error("disk image: {0}")]
    Disk(#[from] block::DiskError),
}

/// Saved state of one virtqueue: everything needed to continue from the same
/// ring positions after a restore.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size chosen by the driver.
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
    /// Next available-ring entry the device will consume.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
    /// `VIRTIO_RING_F_EVENT_IDX` in effect.
    pub event_idx: bool,
}

impl QueueSnapshot {
    fn save(q: &Queue) -> Self {
        let s = q.state();
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }

    fn restore(&self) -> Result<Queue, VirtioError> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(VirtioError::Queue)
    }
}

/// State shared by every virtio device model: queues, negotiated features,
/// memory and interrupt. Devices embed it; the transport drives it.
pub struct VirtioCommon {
    /// The device's virtqueues, index = queue number.
    pub queues: Vec<Queue>,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Set once the driver wrote `DRIVER_OK` and the queues checked out.
    pub activated: bool,
    /// Set when the device found the driver's rings unusable; reported to the
    /// guest as `NEEDS_RESET` and cleared by a reset.
    pub broken: bool,
    /// Set while the device is paused for a snapshot: no queue is processed,
    /// so no guest memory, ring or interrupt is touched (not saved: a
    /// restored device starts paused only if its owner pauses it).
    pub paused: bool,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// Interrupt line and status bits.
    pub interrupt: VirtioInterrupt,
}

/// Saved [`VirtioCommon`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioCommonState {
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Per-queue state.
    pub queues: Vec<QueueSnapshot>,
    /// Device activated (`DRIVER_OK` accepted).
    pub activated: bool,
    /// Device marked `NEEDS_RESET`.
    pub broken: bool,
    /// Pending `InterruptStatus` bits.
    pub interrupt_status: u32,
}

impl VirtioCommon {
    /// Queues of the given maximum sizes (each a power of two, at most 32768).
    pub fn new(
        queue_max_sizes: &[u16],
        mem: GuestMemoryMmap,
        interrupt: VirtioInterrupt,
    ) -> Result<Self, VirtioError> {
        let queues = queue_max_sizes
            .iter()
            .map(|&s| Queue::new(s).map_err(VirtioError::Queue))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            queues,
            acked_features: 0,
            activated: false,
            broken: false,
            paused: false,
            mem,
            interrupt,
        })
    }

    /// Whether `feature` (a bit mask) was negotiated.
    pub fn has_feature(&self, feature: u64) -> bool {
        self.acked_features & feature == feature
    }

    /// Back to the power-on state (driver wrote 0 to `Status`).
    pub fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.acked_features = 0;
        self.activated = false;
        self.broken = false;
        self.interrupt.set_status(0);
    }

    /// Mark the device as needing a reset and tell the driver.
    pub fn mark_broken(&mut self, why: &dyn std::fmt::Display) {
        if !self.broken {
            log::warn!("virtio device needs reset: {why}");
            self.broken = true;
            self.interrupt.signal_config_change();
        }
    }

    /// Whether queue `index` may be processed now.
    pub fn queue_usable(&self, index: usize) -> bool {
        self.activated
            && !self.broken
            && !self.paused
            && self.queues.get(index).is_some_and(|q| q.ready())
    }

    /// Raise the used-buffer interrupt for queue `index` if the driver wants
    /// one for the entries added since the last check (event index or
    /// `NO_INTERRUPT` flag). A failure marks the device broken.
    pub fn notify_used(&mut self, index: usize) {
        let Some(q) = self.queues.get_mut(index) else {
            return;
        };
        match q.needs_notification(&self.mem) {
            Ok(true) => self.interrupt.signal_used_queue(),
            Ok(false) => {}
            Err(e) => self.mark_broken(&e),
        }
    }

    /// Pop the available chains of queue `index` one at a time, parse each
    /// (at most `max_descs` descriptors) and hand it to `handle`, which
    /// returns the used length to publish, or `None` to leave that chain
    /// available and stop (e.g. console input ran dry). The guest gets at
    /// most one interrupt per call. Queue-level faults (corrupt avail index,
    /// unwritable used ring) mark the device broken.
    pub fn drain_queue<F>(&mut self, index: usize, max_descs: usize, handle: F)
    where
        F: FnMut(&GuestMemoryMmap, Result<Chain, ChainError>) -> Option<u32>,
    {
        if !self.queue_usable(index) {
            return;
        }
        let added = self.drain_inner(index, max_descs, handle);
        if added && !self.broken {
            self.notify_used(index);
        }
    }

    /// The loop of [`VirtioCommon::drain_queue`]; returns whether any used
    /// entry was added.
    fn drain_inner<F>(&mut self, index: usize, max_descs: usize, mut handle: F) -> bool
    where
        F: FnMut(&GuestMemoryMmap, Result<Chain, ChainError>) -> Option<u32>,
    {
        let mut added = false;
        loop {
            if let Err(e) = self.queues[index].disable_notification(&self.mem) {
                self.mark_broken(&e);
                return added;
            }
            loop {
                let popped = match self.queues[index].iter(&self.mem) {
                    Ok(mut it) => it.next().map(|c| {
                        let head = c.head_index();
                        (head, Chain::parse(&self.mem, c, max_descs))
                    }),
                    Err(e) => {
                        self.mark_broken(&e);
                        return added;
                    }
                };
                let Some((head, chain)) = popped else {
                    break;
                };
                let Some(len) = handle(&self.mem, chain) else {
                    self.queues[index].go_to_previous_position();
                    if let Err(e) = self.queues[index].enable_notification(&self.mem) {
                        self.mark_broken(&e);
                    }
                    return added;
                };
                if let Err(e) = self.queues[index].add_used(&self.mem, head, len) {
                    self.mark_broken(&e);
                    return added;
                }
                added = true;
            }
            match self.queues[index].enable_notification(&self.mem) {
                Ok(true) => continue,
                Ok(false) => return added,
                Err(e) => {
                    self.mark_broken(&e);
                    return added;
                }
            }
        }
    }

    /// Capture the state.
    pub fn save(&self) -> VirtioCommonState {
        VirtioCommonState {
            acked_features: self.acked_features,
            queues: self.queues.iter().map(QueueSnapshot::save).collect(),
            activated: self.activated,
            broken: self.broken,
            interrupt_status: self.interrupt.status(),
        }
    }

    /// Rebuild from `state`; the queue count and maximum sizes must match the
    /// device's.
    pub fn restore(
        queue_max_sizes: &[u16],
        mem: GuestMemoryMmap,
        interrupt: VirtioInterrupt,
        state: &VirtioCommonState,
    ) -> Result<Self, VirtioError> {
        if state.queues.len() != queue_max_sizes.len()
            || state
                .queues
                .iter()
                .zip(queue_max_sizes)
                .any(|(q, &m)| q.max_size != m)
        {
            return Err(VirtioError::StateMismatch(format!(
                "expected queues of max sizes {queue_max_sizes:?}"
            )));
        }
        let queues: Vec<Queue> = state
            .queues
            .iter()
            .map(QueueSnapshot::restore)
            .collect::<Result<_, _>>()?;
        if state.activated {
            for (i, q) in queues.iter().enumerate() {
                if q.ready() && !queue_in_memory(q, &mem) {
                    return Err(VirtioError::QueueOutsideMemory(i));
                }
            }
        }
        interrupt.set_status(state.interrupt_status);
        Ok(Self {
            queues,
            acked_features: state.acked_features,
            activated: state.activated,
            broken: state.broken,
            paused: false,
            mem,
            interrupt,
        })
    }
}

/// Whether the rings of a ready queue lie in guest memory (the checks
/// `Queue::is_valid` does, without its error logging).
fn queue_in_memory(q: &Queue, mem: &GuestMemoryMmap) -> bool {
    let n = u64::from(q.size());
    let in_mem = |addr: u64, len: u64| {
        usize::try_from(len).is_ok_and(|len| mem.check_range(GuestAddress(addr), len))
    };
    in_mem(q.desc_table(), 16 * n)
        && in_mem(q.avail_ring(), 6 + 2 * n)
        && in_mem(q.used_ring(), 6 + 8 * n)
}

/// A virtio device model, as driven by the transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers (including [`COMMON_FEATURES`]).
    fn device_features(&self) -> u64;
    /// Shared queue/feature/interrupt state.
    fn common(&self) -> &VirtioCommon;
    /// Shared queue/feature/interrupt state.
    fn common_mut(&mut self) -> &mut VirtioCommon;
    /// Read device-specific configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Guest write to configuration space; ignored by default (read-only).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "ignored virtio config write of {} bytes at {offset:#x}",
            data.len()
        );
    }
    /// The driver set `DRIVER_OK`; queues are configured. Devices with host
    /// input pending start delivering it here.
    fn activate(&mut self) {}
    /// The driver notified queue `index`.
    fn process_queue(&mut self, index: usize);
    /// Device-specific part of a reset (the common part is done already).
    fn reset(&mut self) {}
    /// The device was resumed after a pause: deliver host input buffered
    /// meanwhile. Devices that only act on guest notifications (block, rng)
    /// have nothing to do: their vCPUs were parked while they were paused.
    fn resumed(&mut self) {}
}

/// Read `data.len()` bytes of the little-endian config image `config` at
/// `offset`, leaving `data` untouched when the access falls outside it.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(end) = start.checked_add(data.len()) {
        if let Some(src) = config.get(start..end) {
            data.copy_from_slice(src);
        }
    }
}
