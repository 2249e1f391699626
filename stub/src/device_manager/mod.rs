//! The device manager: the one owner of a machine's buses and devices.
//!
//! Boot and resume attach devices through the same helpers (`attach_*`);
//! the manager is the single [`Persist`] for the whole device set (a list of
//! tagged [`DeviceState`]s in attach order) and pauses and resumes every
//! device together with the vCPUs (see [`Pausable`]).
//!
//! Host devices that carry no guest state (the test guest's console and
//! report ports) go on the I/O bus through [`DeviceManager::attach_host_io`]
//! and are not part of the snapshot: whoever resumes the machine attaches
//! them again.

use std::sync::{Arc, Mutex};

use crate::devices::bus::{Bus, BusDevice, BusError};
use crate::devices::exit::ExitPort;
use crate::devices::legacy::serial::{SerialArgs, SerialDevice, SerialSink};
use crate::devices::legacy::{COM1_BASE, COM1_IRQ, COM1_LEN, I8042, I8042_BASE, I8042_LEN};
use crate::devices::state::{DeviceState, VirtioDeviceState, VirtioSlotState};
use crate::devices::virtio::block::{Block, BlockArgs, CowDisk};
use crate::devices::virtio::console::{Console, ConsoleArgs, ConsoleSink};
use crate::devices::virtio::fs::{Fs, FsArgs, Server};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::NetSlot;
use crate::devices::virtio::rng::{Rng, RngArgs};
use crate::devices::virtio::{mmio_slot, InterruptTrigger, VirtioInterrupt, MMIO_IRQS, MMIO_SIZE};
use crate::devices::Pausable;
use crate::hypervisor::HypervisorError;
use crate::memory::GuestMemory;
use crate::persist::Persist;
use crate::vstate::vcpu::{ExitReason, RunControl};

/// Errors attaching, saving or restoring devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Two devices claim the same addresses.
    #[error("cannot attach a device: {0}")]
    Bus(#[from] BusError),
    /// An interrupt line cannot be set up.
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    /// A device refused its saved state.
    #[error("cannot restore the {what}: {msg}")]
    Restore { what: &'static str, msg: String },
    /// A device's state could not be captured.
    #[error("cannot save the {what}: {msg}")]
    Save { what: &'static str, msg: String },
    /// The snapshot holds a device whose host side was not provided.
    #[error("the machine has a {0} but no host end was given for it")]
    MissingHostEnd(&'static str),
    /// A saved device sits where this VMM never puts one.
    #[error(
        "the machine state puts a {what} at {at}, where this VMM has none; the file is corrupt"
    )]
    BadPlace { what: &'static str, at: String },
    /// `save` needs the devices paused (pause the machine first).
    #[error("devices must be paused before their state is saved")]
    NotPaused,
}

/// A virtio device and the mmio transport in front of it, shared with the
/// MMIO bus.
#[derive(Clone)]
pub enum VirtioHandle {
    Block(Arc<Mutex<MmioTransport<Block>>>),
    Console(Arc<Mutex<MmioTransport<Console>>>),
    Rng(Arc<Mutex<MmioTransport<Rng>>>),
    Fs(Arc<Mutex<MmioTransport<Fs>>>),
}

impl VirtioHandle {
    fn bus_device(&self) -> Arc<Mutex<dyn BusDevice>> {
        match self {
            VirtioHandle::Block(d) => d.clone(),
            VirtioHandle::Console(d) => d.clone(),
            VirtioHandle::Rng(d) => d.clone(),
            VirtioHandle::Fs(d) => d.clone(),
        }
    }

    fn pausable(&self, f: &mut dyn FnMut(&mut dyn Pausable)) {
        match self {
            VirtioHandle::Block(d) => f(&mut *lock(d)),
            VirtioHandle::Console(d) => f(&mut *lock(d)),
            VirtioHandle::Rng(d) => f(&mut *lock(d)),
            VirtioHandle::Fs(d) => f(&mut *lock(d)),
        }
    }

    fn save(&self) -> Result<VirtioDeviceState, DeviceError> {
        let err = |what| {
            move |e: crate::devices::virtio::VirtioError| DeviceError::Save {
                what,
                msg: e.to_string(),
            }
        };
        Ok(match self {
            VirtioHandle::Block(d) => {
                VirtioDeviceState::Block(lock(d).save().map_err(err("virtio-blk"))?)
            }
            VirtioHandle::Console(d) => {
                VirtioDeviceState::Console(lock(d).save().map_err(err("virtio-console"))?)
            }
            VirtioHandle::Rng(d) => {
                VirtioDeviceState::Rng(lock(d).save().map_err(err("virtio-rng"))?)
            }
            VirtioHandle::Fs(d) => VirtioDeviceState::Fs(lock(d).save().map_err(err("virtio-fs"))?),
        })
    }
}

enum Attached {
    ExitPort {
        port: u16,
        dev: Arc<Mutex<ExitPort>>,
    },
    Serial {
        base: u16,
        irq: u32,
        dev: Arc<Mutex<SerialDevice>>,
    },
    I8042(Arc<Mutex<I8042>>),
    Virtio {
        base: u64,
        irq: u32,
        dev: VirtioHandle,
    },
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes the interrupt line of a GSI (an irqfd on KVM).
pub type IrqLines<'a> = &'a dyn Fn(u32) -> Result<Arc<dyn InterruptTrigger>, HypervisorError>;

/// The host side of the devices a snapshot restores; each is taken by the
/// device that needs it.
#[derive(Default)]
pub struct HostEnds {
    /// Where the serial port's output goes (discarded when `None`).
    pub serial_out: Option<SerialSink>,
    /// Where the virtio console's output goes.
    pub console_out: Option<ConsoleSink>,
    /// The disk behind the virtio block device.
    pub disk: Option<CowDisk>,
    /// The shares the virtio-fs device serves (none when `None`).
    pub shares: Option<Server>,
}

/// What [`DeviceManager::restore`] needs from the machine.
pub struct DeviceArgs<'a> {
    /// Guest memory, for virtio queues.
    pub memory: &'a GuestMemory,
    /// The machine's run control (the exit port and i8042 stop the machine).
    pub control: Arc<RunControl>,
    /// Interrupt lines by GSI.
    pub irq: IrqLines<'a>,
    /// Host ends of the devices.
    pub ends: HostEnds,
}

/// The buses and every device attached to them.
pub struct DeviceManager {
    io_bus: Bus,
    mmio_bus: Bus,
    devices: Vec<Attached>,
    control: Arc<RunControl>,
    paused: bool,
    /// The reserved network slot (Linux machines): on the bus and paused with the rest,
    /// never saved (see `devices::virtio::net`).
    net_slot: Option<Arc<Mutex<NetSlot>>>,
}

impl DeviceManager {
    /// No devices; the exit port and i8042 will report to `control`. The
    /// set starts paused, like the machine's parked vCPUs: devices attached
    /// before the machine starts are paused as they are attached, and
    /// `Machine::start` resumes them.
    pub fn new(control: Arc<RunControl>) -> Self {
        DeviceManager {
            io_bus: Bus::new(),
            mmio_bus: Bus::new(),
            devices: Vec::new(),
            control,
            paused: true,
            net_slot: None,
        }
    }

    /// Put the network slot at virtio-mmio `(base, irq)` (one of [`mmio_slot`]'s). It is
    /// paused and resumed with the other devices but is no part of the saved state: a
    /// resume attaches it again, empty or with a device.
    pub fn attach_net_slot(
        &mut self,
        base: u64,
        irq: u32,
        slot: Arc<Mutex<NetSlot>>,
    ) -> Result<(), DeviceError> {
        if !(0..MMIO_IRQS.len()).any(|i| mmio_slot(i) == Some((base, irq))) {
            return Err(DeviceError::BadPlace {
                what: "network slot",
                at: format!("{base:#x} IRQ {irq}"),
            });
        }
        self.mmio_bus.insert(slot.clone(), base, MMIO_SIZE)?;
        {
            let mut s = lock(&slot);
            if self.paused {
                s.pause();
            } else {
                s.resume();
            }
        }
        self.net_slot = Some(slot);
        Ok(())
    }

    /// The network slot, if attached.
    pub fn net_slot(&self) -> Option<Arc<Mutex<NetSlot>>> {
        self.net_slot.clone()
    }

    fn push(&mut self, d: Attached) {
        self.devices.push(d);
        if self.paused {
            if let Some(last) = self.devices.last() {
                pause_one(last);
            }
        }
    }

    /// The port I/O bus (the vCPU run loop dispatches on it).
    pub fn io_bus(&self) -> &Bus {
        &self.io_bus
    }

    /// The MMIO bus.
    pub fn mmio_bus(&self) -> &Bus {
        &self.mmio_bus
    }

    /// Attach the exit port at `port`.
    pub fn attach_exit_port(&mut self, port: u16) -> Result<(), DeviceError> {
        let control = self.control.clone();
        let dev = Arc::new(Mutex::new(ExitPort::new(Box::new(move |status| {
            control.finish(ExitReason::Exited(status))
        }))));
        self.insert_port(dev.clone(), u64::from(port), 1)?;
        self.push(Attached::ExitPort { port, dev });
        Ok(())
    }

    /// Attach `dev` as COM1 (raising IRQ 4).
    pub fn attach_serial(&mut self, dev: SerialDevice) -> Result<(), DeviceError> {
        let dev = Arc::new(Mutex::new(dev));
        self.insert_port(dev.clone(), COM1_BASE, COM1_LEN)?;
        self.push(Attached::Serial {
            base: COM1_BASE as u16,
            irq: COM1_IRQ,
            dev,
        });
        Ok(())
    }

    /// Attach the i8042; its reset command stops the machine (`Shutdown`).
    pub fn attach_i8042(&mut self) -> Result<(), DeviceError> {
        let control = self.control.clone();
        let dev = Arc::new(Mutex::new(I8042::new(Box::new(move || {
            control.finish(ExitReason::Shutdown)
        }))));
        self.insert_port(dev.clone(), I8042_BASE, I8042_LEN)?;
        self.push(Attached::I8042(dev));
        Ok(())
    }

    /// Attach a virtio device at virtio-mmio slot `(base, irq)` (one of
    /// [`mmio_slot`]'s; its interrupt is built from `irq` by the caller).
    pub fn attach_virtio(
        &mut self,
        base: u64,
        irq: u32,
        dev: VirtioHandle,
    ) -> Result<(), DeviceError> {
        if !(0..MMIO_IRQS.len()).any(|i| mmio_slot(i) == Some((base, irq))) {
            return Err(DeviceError::BadPlace {
                what: "virtio-mmio device",
                at: format!("{base:#x} IRQ {irq}"),
            });
        }
        self.mmio_bus.insert(dev.bus_device(), base, MMIO_SIZE)?;
        self.push(Attached::Virtio { base, irq, dev });
        Ok(())
    }

    /// Attach a host device that carries no guest state (not saved).
    pub fn attach_host_io(
        &mut self,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), DeviceError> {
        self.insert_port(dev, base, len)
    }

    /// Detach the host device at `base` (dropping the bus's reference).
    pub fn detach_host_io(&mut self, base: u64) -> bool {
        #[cfg(target_arch = "aarch64")]
        return self
            .mmio_bus
            .remove(crate::arch::aarch64::layout::port_address(base as u16));
        #[cfg(not(target_arch = "aarch64"))]
        self.io_bus.remove(base)
    }

    /// Put a device that sits on x86 I/O ports at `port..port + len`: on the
    /// port bus on x86_64; on aarch64, which has no ports, at the same
    /// offsets in the MMIO port window (`arch::aarch64::layout`), so devices
    /// and saved state name the same port numbers on both.
    fn insert_port(
        &mut self,
        dev: Arc<Mutex<dyn BusDevice>>,
        port: u64,
        len: u64,
    ) -> Result<(), DeviceError> {
        #[cfg(target_arch = "aarch64")]
        {
            use crate::arch::aarch64::layout::{port_address, PORT_WINDOW_SIZE};
            if port + len > PORT_WINDOW_SIZE {
                return Err(DeviceError::BadPlace {
                    what: "port device",
                    at: format!("{port:#x}+{len}"),
                });
            }
            self.mmio_bus.insert(dev, port_address(port as u16), len)?;
        }
        #[cfg(not(target_arch = "aarch64"))]
        self.io_bus.insert(dev, port, len)?;
        Ok(())
    }

    fn virtio(&self) -> impl Iterator<Item = &VirtioHandle> {
        self.devices.iter().filter_map(|d| match d {
            Attached::Virtio { dev, .. } => Some(dev),
            _ => None,
        })
    }

    /// The first virtio console (the agent's).
    pub fn virtio_console(&self) -> Option<Arc<Mutex<MmioTransport<Console>>>> {
        self.virtio().find_map(|d| match d {
            VirtioHandle::Console(c) => Some(c.clone()),
            _ => None,
        })
    }

    /// The virtio-fs device (machines built before shares have none).
    pub fn virtio_fs(&self) -> Option<Arc<Mutex<MmioTransport<Fs>>>> {
        self.virtio().find_map(|d| match d {
            VirtioHandle::Fs(f) => Some(f.clone()),
            _ => None,
        })
    }

    /// The first virtio block device (the root disk).
    pub fn virtio_block(&self) -> Option<Arc<Mutex<MmioTransport<Block>>>> {
        self.virtio().find_map(|d| match d {
            VirtioHandle::Block(b) => Some(b.clone()),
            _ => None,
        })
    }

    fn each(&self, f: &mut dyn FnMut(&mut dyn Pausable)) {
        for d in &self.devices {
            with_pausable(d, &mut *f);
        }
        if let Some(s) = &self.net_slot {
            f(&mut *lock(s));
        }
    }

    /// Pause every device (after the vCPUs are parked): from here on no
    /// device touches guest memory, rings or interrupts.
    pub fn pause(&mut self) {
        self.each(&mut |d| d.pause());
        self.paused = true;
    }

    /// Resume every device (before the vCPUs run again); devices deliver
    /// host input they buffered meanwhile.
    pub fn resume(&mut self) {
        self.each(&mut |d| d.resume());
        self.paused = false;
    }

    /// Whether the device set is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }
}

fn with_pausable(d: &Attached, f: &mut dyn FnMut(&mut dyn Pausable)) {
    match d {
        Attached::ExitPort { dev, .. } => f(&mut *lock(dev)),
        Attached::Serial { dev, .. } => f(&mut *lock(dev)),
        Attached::I8042(dev) => f(&mut *lock(dev)),
        Attached::Virtio { dev, .. } => dev.pausable(f),
    }
}

fn pause_one(d: &Attached) {
    with_pausable(d, &mut |p| p.pause());
}

fn restore_err<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> DeviceError {
    move |e| DeviceError::Restore {
        what,
        msg: e.to_string(),
    }
}

impl Persist for DeviceManager {
    type State = Vec<DeviceState>;
    type Args<'a> = DeviceArgs<'a>;
    type Error = DeviceError;

    fn save(&self) -> Result<Vec<DeviceState>, DeviceError> {
        if !self.paused {
            return Err(DeviceError::NotPaused);
        }
        self.devices
            .iter()
            .map(|d| {
                Ok(match d {
                    Attached::ExitPort { port, .. } => DeviceState::ExitPort { port: *port },
                    Attached::Serial { base, irq, dev } => DeviceState::Serial {
                        base: *base,
                        irq: *irq,
                        state: lock(dev).save().map_err(|e| DeviceError::Save {
                            what: "serial port",
                            msg: e.to_string(),
                        })?,
                    },
                    Attached::I8042(_) => DeviceState::I8042,
                    Attached::Virtio { base, irq, dev } => {
                        DeviceState::VirtioMmio(VirtioSlotState {
                            base: *base,
                            irq: *irq,
                            device: dev.save()?,
                        })
                    }
                })
            })
            .collect()
    }

    /// Rebuild and attach every device of `states`, in order; they stay
    /// paused until the machine starts.
    fn restore(args: DeviceArgs<'_>, states: &Vec<DeviceState>) -> Result<Self, DeviceError> {
        let DeviceArgs {
            memory,
            control,
            irq,
            mut ends,
        } = args;
        let mut m = DeviceManager::new(control);
        let mem = memory.mmap();
        for s in states {
            match s {
                DeviceState::ExitPort { port } => m.attach_exit_port(*port)?,
                DeviceState::Serial {
                    base,
                    irq: gsi,
                    state,
                } => {
                    if (u64::from(*base), *gsi) != (COM1_BASE, COM1_IRQ) {
                        return Err(DeviceError::BadPlace {
                            what: "serial port",
                            at: format!("port {base:#x} IRQ {gsi}"),
                        });
                    }
                    let sink = ends
                        .serial_out
                        .take()
                        .unwrap_or_else(|| Box::new(std::io::sink()));
                    let dev = SerialDevice::restore(
                        SerialArgs {
                            irq: irq(*gsi)?,
                            sink,
                        },
                        state,
                    )
                    .map_err(restore_err("serial port"))?;
                    m.attach_serial(dev)?;
                }
                DeviceState::I8042 => m.attach_i8042()?,
                DeviceState::VirtioMmio(slot) => {
                    let interrupt = VirtioInterrupt::new(irq(slot.irq)?);
                    let dev = match &slot.device {
                        VirtioDeviceState::Block(state) => {
                            let disk = ends
                                .disk
                                .take()
                                .ok_or(DeviceError::MissingHostEnd("virtio block device"))?;
                            let args = BlockArgs {
                                mem: mem.clone(),
                                interrupt,
                                disk,
                            };
                            VirtioHandle::Block(Arc::new(Mutex::new(
                                MmioTransport::<Block>::restore(args, state)
                                    .map_err(restore_err("virtio-blk"))?,
                            )))
                        }
                        VirtioDeviceState::Console(state) => {
                            let sink = ends
                                .console_out
                                .take()
                                .ok_or(DeviceError::MissingHostEnd("virtio console"))?;
                            let args = ConsoleArgs {
                                mem: mem.clone(),
                                interrupt,
                                sink,
                            };
                            VirtioHandle::Console(Arc::new(Mutex::new(
                                MmioTransport::<Console>::restore(args, state)
                                    .map_err(restore_err("virtio-console"))?,
                            )))
                        }
                        VirtioDeviceState::Rng(state) => {
                            let args = RngArgs {
                                mem: mem.clone(),
                                interrupt,
                            };
                            VirtioHandle::Rng(Arc::new(Mutex::new(
                                MmioTransport::<Rng>::restore(args, state)
                                    .map_err(restore_err("virtio-rng"))?,
                            )))
                        }
                        VirtioDeviceState::Fs(state) => {
                            let server = match ends.shares.take() {
                                Some(s) => s,
                                None => Server::new(&[]).map_err(restore_err("virtio-fs"))?,
                            };
                            let args = FsArgs {
                                mem: mem.clone(),
                                interrupt,
                                server,
                            };
                            VirtioHandle::Fs(Arc::new(Mutex::new(
                                MmioTransport::<Fs>::restore(args, state)
                                    .map_err(restore_err("virtio-fs"))?,
                            )))
                        }
                    };
                    m.attach_virtio(slot.base, slot.irq, dev)?;
                }
            }
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::console::{ConsoleState, RX_QUEUE};
    use crate::devices::virtio::mmio::regs;
    use crate::devices::virtio::testutil::{handshake, Counter, TestQueue};
    use crate::devices::virtio::{GuestMemoryMmap, VIRTIO_F_VERSION_1};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use vm_memory::{Bytes, GuestAddress};

    const MEM: u64 = 0x40000;
    const RX_SIZE: u16 = 128;
    const RX_DESC: u64 = 0x1000;
    const BUFS: u64 = 0x10000;
    const BUF_LEN: u32 = 61;
    /// Less than the driver's posted buffers hold, so free buffers are
    /// often waiting when a save comes and input flows straight into them.
    const RX_CAPACITY: usize = 4096;
    const ROUNDS: usize = 300;

    /// Byte `i` of the host's input stream: not periodic over any short
    /// distance, so a lost, repeated or torn run shows in a prefix check.
    fn stream_byte(i: u64) -> u8 {
        (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 ^ (i / 4093) as u8
    }

    fn no_kick(_: std::os::unix::thread::RawPthread) {}

    fn irq_lines(_gsi: u32) -> Result<Arc<dyn InterruptTrigger>, HypervisorError> {
        Ok(Arc::new(Counter::default()))
    }

    /// Guest side of the receive queue, as the guest's driver keeps it: the
    /// bytes it took and its ring positions (in a real guest these live in
    /// guest memory; here they are copied with it).
    #[derive(Clone, Default)]
    struct FakeDriver {
        last_used: u16,
        avail_idx: u16,
        consumed: Vec<u8>,
    }

    impl FakeDriver {
        /// Take the used buffers, post free ones and notify through `bus`.
        /// Returns whether anything was taken.
        fn step(&mut self, mem: &GuestMemoryMmap, bus: &Bus, base: u64) -> bool {
            let (_, avail, used) = rx_rings();
            let used_idx: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
            let took = used_idx != self.last_used;
            while self.last_used != used_idx {
                let at = used + 4 + 8 * u64::from(self.last_used % RX_SIZE);
                let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
                assert!(id < u32::from(RX_SIZE) && len <= BUF_LEN, "bad used entry");
                let mut b = vec![0u8; len as usize];
                mem.read_slice(&mut b, GuestAddress(buf_addr(id as u16)))
                    .unwrap();
                self.consumed.extend_from_slice(&b);
                self.last_used = self.last_used.wrapping_add(1);
            }
            while self.avail_idx.wrapping_sub(self.last_used) < RX_SIZE {
                // Buffers are used in order, so descriptor i is free again.
                let id = self.avail_idx % RX_SIZE;
                let d = RX_DESC + 16 * u64::from(id);
                mem.write_obj(buf_addr(id), GuestAddress(d)).unwrap();
                mem.write_obj(BUF_LEN, GuestAddress(d + 8)).unwrap();
                mem.write_obj(2u16, GuestAddress(d + 12)).unwrap();
                mem.write_obj(0u16, GuestAddress(d + 14)).unwrap();
                let slot = avail + 4 + 2 * u64::from(self.avail_idx % RX_SIZE);
                mem.write_obj(id, GuestAddress(slot)).unwrap();
                self.avail_idx = self.avail_idx.wrapping_add(1);
                mem.write_obj(self.avail_idx, GuestAddress(avail + 2))
                    .unwrap();
            }
            assert!(bus.write(base + regs::QUEUE_NOTIFY, &(RX_QUEUE as u32).to_le_bytes()));
            took
        }
    }

    fn buf_addr(id: u16) -> u64 {
        BUFS + u64::from(id) * 0x100
    }

    /// Descriptor table, available and used ring of the receive queue (the
    /// layout `TestQueue` uses).
    fn rx_rings() -> (u64, u64, u64) {
        let avail = RX_DESC + 16 * u64::from(RX_SIZE);
        let used = (avail + 6 + 2 * u64::from(RX_SIZE) + 3) & !3;
        (RX_DESC, avail, used)
    }

    fn console_at(mem: &GuestMemory) -> (u64, u32, Arc<Mutex<MmioTransport<Console>>>) {
        let (base, irq) = mmio_slot(1).unwrap();
        let fresh = Console::new(
            mem.mmap().clone(),
            VirtioInterrupt::new(Arc::new(Counter::default())),
            Box::new(std::io::sink()),
        )
        .unwrap();
        // A small input bound, so the flood fills it and waits often.
        let state = ConsoleState {
            rx_capacity: RX_CAPACITY,
            ..fresh.save().unwrap()
        };
        let console = Console::restore(
            ConsoleArgs {
                mem: mem.mmap().clone(),
                interrupt: VirtioInterrupt::new(Arc::new(Counter::default())),
                sink: Box::new(std::io::sink()),
            },
            &state,
        )
        .unwrap();
        (base, irq, Arc::new(Mutex::new(MmioTransport::new(console))))
    }

    /// A host thread floods the agent console while the test, hundreds of
    /// times, pauses the device set, saves it, copies guest memory and
    /// resumes. Every (state, memory) pair, restored into a fresh device set
    /// and drained by the same fake driver, gives exactly a prefix of the
    /// stream holding every byte accepted before the save: nothing lost,
    /// repeated or torn.
    #[test]
    fn console_flood_during_saves_restores_consistently() {
        let memory = GuestMemory::anonymous(&[(0, MEM)]).unwrap();
        let control = RunControl::new(no_kick);
        let mut mgr = DeviceManager::new(control.clone());
        let (base, irq, console) = console_at(&memory);
        mgr.attach_virtio(base, irq, VirtioHandle::Console(console.clone()))
            .unwrap();
        mgr.resume();
        {
            let mem = memory.mmap();
            let rxq = TestQueue::new(mem, RX_SIZE, GuestAddress(RX_DESC));
            let txq = TestQueue::new(mem, RX_SIZE, GuestAddress(0x3000));
            assert_eq!(rxq.avail.0, rx_rings().1);
            assert_eq!(rxq.used.0, rx_rings().2);
            let mut t = console.lock().unwrap();
            handshake(&mut *t, VIRTIO_F_VERSION_1, &[&rxq, &txq]);
        }

        let accepted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let room = console.lock().unwrap().device().input_room_signal();
        let flooder = {
            let (console, accepted, stop, room) = (
                console.clone(),
                accepted.clone(),
                stop.clone(),
                room.clone(),
            );
            std::thread::spawn(move || {
                let mut next = 0u64;
                let mut chunk = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let len = 1 + (next % 397) as usize;
                    chunk.clear();
                    chunk.extend((next..next + len as u64).map(stream_byte));
                    let mut off = 0;
                    while off < chunk.len() && !stop.load(Ordering::SeqCst) {
                        let (took, seen) = {
                            let mut c = console.lock().unwrap();
                            let seen = room.generation();
                            let took = c.device_mut().enqueue_input(&chunk[off..]);
                            // Counted under the device's lock, so a save sees
                            // either all or none of this enqueue.
                            accepted.fetch_add(took as u64, Ordering::SeqCst);
                            (took, seen)
                        };
                        off += took;
                        if took == 0 && !room.wait_change(seen) {
                            return;
                        }
                    }
                    next += off as u64;
                }
            })
        };

        let mut driver = FakeDriver::default();
        let mut restored_totals = Vec::with_capacity(ROUNDS);
        for round in 0..ROUNDS {
            // The "vCPU" runs the driver for a while.
            for _ in 0..(1 + round % 3) {
                driver.step(memory.mmap(), mgr.mmio_bus(), base);
            }
            // Save: vCPUs (the driver) are parked; pause devices, save, copy.
            mgr.pause();
            let before = accepted.load(Ordering::SeqCst);
            let state = mgr.save().unwrap();
            let after = accepted.load(Ordering::SeqCst);
            // Give the flood time to hit the paused device between the save
            // and the copy (a device that kept delivering would now write
            // input the saved state still holds into guest memory).
            std::thread::sleep(std::time::Duration::from_micros(200));
            let mut copy = vec![0u8; MEM as usize];
            memory.read(0, &mut copy).unwrap();
            let saved_driver = driver.clone();
            mgr.resume();

            // Restore into a fresh device set and drain it.
            let mem2 = GuestMemory::anonymous(&[(0, MEM)]).unwrap();
            mem2.write(0, &copy).unwrap();
            let mut mgr2 = DeviceManager::restore(
                DeviceArgs {
                    memory: &mem2,
                    control: RunControl::new(no_kick),
                    irq: &irq_lines,
                    ends: HostEnds {
                        console_out: Some(Box::new(std::io::sink())),
                        ..Default::default()
                    },
                },
                &state,
            )
            .unwrap();
            assert!(mgr2.is_paused());
            mgr2.resume();
            let mut d2 = saved_driver;
            while d2.step(mem2.mmap(), mgr2.mmio_bus(), base) {}
            let pending = mgr2
                .virtio_console()
                .unwrap()
                .lock()
                .unwrap()
                .device()
                .pending_input();
            assert_eq!(pending, 0, "round {round}: restored input not drained");
            let got = &d2.consumed;
            let total = got.len() as u64;
            assert!(
                (before..=after).contains(&total),
                "round {round}: restored machine holds {total} bytes, {before}..={after} were accepted"
            );
            let bad = (0..total).find(|&i| got[i as usize] != stream_byte(i));
            assert_eq!(bad, None, "round {round}: byte differs from the stream");
            restored_totals.push(total);
        }
        stop.store(true, Ordering::SeqCst);
        room.close();
        flooder.join().unwrap();

        // The original went on undisturbed.
        while driver.step(memory.mmap(), mgr.mmio_bus(), base) {}
        let total = driver.consumed.len() as u64;
        assert_eq!(total, accepted.load(Ordering::SeqCst));
        assert!((0..total).all(|i| driver.consumed[i as usize] == stream_byte(i)));
        // The saves caught the console mid-stream, not only idle.
        assert!(restored_totals.windows(2).filter(|w| w[1] > w[0]).count() > ROUNDS / 2);
    }
}
