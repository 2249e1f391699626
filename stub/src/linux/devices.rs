//! The device set of a Linux guest: COM1 (kernel log), the i8042 (its reset
//! ends the VM), and on virtio-mmio, declared on the command line: the root
//! disk (slot 0), the agent's console (slot 1), an entropy source
//! (slot 2) and the host directory shares (slot 5; present even when no
//! directory is shared, so a machine's device set does not depend on how it
//! is run). The machine's device manager owns them; a boot attaches them
//! here through its attach helpers, a resume has the manager restore them
//! from the snapshot with the host ends built here. Interrupts are irqfd
//! lines from `Machine::interrupt_line`.

use std::fs::File;
use std::sync::{Arc, Mutex};

use crate::device_manager::{HostEnds, VirtioHandle};
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::legacy::COM1_IRQ;
use crate::devices::virtio::block::{Block, BlockConfig, CowDisk};
use crate::devices::virtio::console::Console;
use crate::devices::virtio::fs::{Fs, Server};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::{cmdline_fragment, mmio_slot, VirtioInterrupt};
use crate::machine::Machine;

use super::console::{ConsoleLog, LogWriter, SocketSink};
use super::LinuxError;

/// Name of the root disk's section in a machine file.
pub const ROOT_DISK: &str = "root";
const BLOCK_SLOT: usize = 0;
const CONSOLE_SLOT: usize = 1;
const RNG_SLOT: usize = 2;
/// Slot 3 is the vsock device's.
const FS_SLOT: usize = 5;
/// The network slot: empty unless a run asks for the network (`devices::virtio::net`).
pub const NET_SLOT: usize = 4;

fn slot(i: usize) -> (u64, u32) {
    // The slots used here exist (mmio_slot has six).
    mmio_slot(i).unwrap_or((0, 0))
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn dev_err(what: &str) -> impl FnOnce(String) -> LinuxError + '_ {
    move |e| LinuxError::Device(format!("{what}: {e}"))
}

fn irq(machine: &Machine, gsi: u32) -> Result<VirtioInterrupt, LinuxError> {
    Ok(VirtioInterrupt::new(machine.interrupt_line(gsi)?))
}

/// The devices a Linux machine talks to from the host (the device manager
/// owns them; these are shared handles).
pub struct LinuxDevices {
    /// The agent's console (the bridge pushes host bytes into it).
    pub console: Arc<Mutex<MmioTransport<Console>>>,
    /// The root disk (saved as the merged disk section).
    pub block: Arc<Mutex<MmioTransport<Block>>>,
}

impl LinuxDevices {
    /// Attach fresh devices for a boot.
    pub fn attach(
        machine: &mut Machine,
        disk: CowDisk,
        read_only: bool,
        log: Arc<ConsoleLog>,
        console_sink: SocketSink,
    ) -> Result<Self, LinuxError> {
        let mem = machine.memory().mmap().clone();
        let serial = SerialDevice::new(machine.interrupt_line(COM1_IRQ)?, Box::new(LogWriter(log)));
        let block = Block::new(
            mem.clone(),
            irq(machine, slot(BLOCK_SLOT).1)?,
            disk,
            BlockConfig {
                read_only,
                id: ROOT_DISK.into(),
            },
        )
        .map_err(|e| dev_err("virtio-blk")(e.to_string()))?;
        let console = Console::new(
            mem.clone(),
            irq(machine, slot(CONSOLE_SLOT).1)?,
            Box::new(console_sink),
        )
        .map_err(|e| dev_err("virtio-console")(e.to_string()))?;
        let rng = Rng::new(mem.clone(), irq(machine, slot(RNG_SLOT).1)?)
            .map_err(|e| dev_err("virtio-rng")(e.to_string()))?;
        // A booting machine serves no shares: they are given at each resume.
        let no_shares = Server::new(&[]).map_err(|e| dev_err("virtio-fs")(e.to_string()))?;
        let fs = Fs::new(mem, irq(machine, slot(FS_SLOT).1)?, no_shares)
            .map_err(|e| dev_err("virtio-fs")(e.to_string()))?;
        let dev_mgr = machine.devices_mut();
        let attach_err = |e: crate::device_manager::DeviceError| LinuxError::Device(e.to_string());
        dev_mgr.attach_serial(serial).map_err(attach_err)?;
        // x86_64 guests reboot through the i8042 (`reboot=k`); arm64 ones
        // through PSCI SYSTEM_RESET, which KVM reports as a system event.
        #[cfg(target_arch = "x86_64")]
        dev_mgr.attach_i8042().map_err(attach_err)?;
        for (i, dev) in [
            (
                BLOCK_SLOT,
                VirtioHandle::Block(Arc::new(Mutex::new(MmioTransport::new(block)))),
            ),
            (
                CONSOLE_SLOT,
                VirtioHandle::Console(Arc::new(Mutex::new(MmioTransport::new(console)))),
            ),
            (
                RNG_SLOT,
                VirtioHandle::Rng(Arc::new(Mutex::new(MmioTransport::new(rng)))),
            ),
            (
                FS_SLOT,
                VirtioHandle::Fs(Arc::new(Mutex::new(MmioTransport::new(fs)))),
            ),
        ] {
            let (base, irq) = slot(i);
            dev_mgr.attach_virtio(base, irq, dev).map_err(attach_err)?;
        }
        // The network slot, empty: a machine is built without a network.
        Self::attach_net_slot(machine, false)?;
        Self::of(machine)
    }

    /// The host ends a resume gives the device manager.
    pub fn host_ends(
        disk: CowDisk,
        log: Arc<ConsoleLog>,
        console_sink: SocketSink,
        shares: Server,
    ) -> HostEnds {
        HostEnds {
            serial_out: Some(Box::new(LogWriter(log))),
            console_out: Some(Box::new(console_sink)),
            disk: Some(disk),
            shares: Some(shares),
        }
    }

    /// The handles of a machine's Linux devices (booted or restored).
    pub fn of(machine: &Machine) -> Result<Self, LinuxError> {
        let missing = |what: &str| LinuxError::Device(format!("the machine has no {what}"));
        Ok(LinuxDevices {
            console: machine
                .devices()
                .virtio_console()
                .ok_or_else(|| missing("agent console"))?,
            block: machine
                .devices()
                .virtio_block()
                .ok_or_else(|| missing("root disk"))?,
        })
    }

    /// The command-line option declaring the network slot (last, so that it is platform
    /// device `virtio-mmio.4` and the others keep their numbers).
    pub fn net_fragment() -> String {
        let (base, irq) = slot(NET_SLOT);
        cmdline_fragment(base, irq)
    }

    /// Whether a machine booted with `cmdline` has the network slot (every
    /// aarch64 machine: its device tree has always declared it).
    #[cfg(target_arch = "aarch64")]
    pub fn has_net_slot(_cmdline: &str) -> bool {
        true
    }

    /// Whether a machine booted with `cmdline` has the network slot.
    #[cfg(not(target_arch = "aarch64"))]
    pub fn has_net_slot(cmdline: &str) -> bool {
        let f = Self::net_fragment();
        cmdline.split_whitespace().any(|w| w == f)
    }

    /// Attach the network slot of a machine that has one: with a virtio-net device whose
    /// frames go to the returned network parts, or empty.
    pub fn attach_net_slot(
        machine: &mut Machine,
        with_device: bool,
    ) -> Result<Option<crate::net::stack::NetworkParts>, LinuxError> {
        use crate::devices::virtio::net::{Net, NetSlot, QueueSink};
        let (base, gsi) = slot(NET_SLOT);
        let attach_err = |e: crate::device_manager::DeviceError| LinuxError::Device(e.to_string());
        if !with_device {
            machine
                .devices_mut()
                .attach_net_slot(base, gsi, Arc::new(Mutex::new(NetSlot::empty())))
                .map_err(attach_err)?;
            return Ok(None);
        }
        let slot_dev = Arc::new(Mutex::new(NetSlot::empty()));
        let parts = crate::net::stack::NetworkParts::new(slot_dev.clone())?;
        let wake = parts.wake.clone();
        let net = Net::new(
            machine.memory().mmap().clone(),
            irq(machine, gsi)?,
            crate::net::GUEST_MAC,
            Box::new(QueueSink {
                queue: parts.tx.clone(),
                wake: Box::new(move || {
                    let _ = wake.write(1);
                }),
            }),
        )
        .map_err(|e| dev_err("virtio-net")(e.to_string()))?;
        *lock(&slot_dev) = NetSlot::with(net);
        machine
            .devices_mut()
            .attach_net_slot(base, gsi, slot_dev)
            .map_err(attach_err)?;
        Ok(Some(parts))
    }

    /// The UART and the virtio-mmio slots as the device tree declares them
    /// (aarch64), in slot order with the network slot last, as on x86_64's
    /// command line.
    #[cfg(target_arch = "aarch64")]
    pub fn fdt_devices() -> (
        crate::arch::aarch64::fdt::MmioDevice,
        Vec<crate::arch::aarch64::fdt::MmioDevice>,
    ) {
        use crate::arch::aarch64::fdt::MmioDevice;
        use crate::devices::legacy::{COM1_BASE, COM1_LEN};
        let uart = MmioDevice {
            base: crate::arch::aarch64::layout::port_address(COM1_BASE as u16),
            size: COM1_LEN,
            gsi: COM1_IRQ,
        };
        let virtio = [BLOCK_SLOT, CONSOLE_SLOT, RNG_SLOT, FS_SLOT, NET_SLOT]
            .iter()
            .map(|&i| {
                let (base, gsi) = slot(i);
                MmioDevice {
                    base,
                    size: crate::devices::virtio::MMIO_SIZE,
                    gsi,
                }
            })
            .collect();
        (uart, virtio)
    }

    /// `virtio_mmio.device=` options declaring the devices to the kernel
    /// (x86_64; none on aarch64, whose device tree declares them).
    #[cfg(target_arch = "aarch64")]
    pub fn cmdline_fragments() -> Vec<String> {
        Vec::new()
    }

    /// `virtio_mmio.device=` options declaring the devices to the kernel.
    #[cfg(not(target_arch = "aarch64"))]
    pub fn cmdline_fragments() -> Vec<String> {
        [BLOCK_SLOT, CONSOLE_SLOT, RNG_SLOT, FS_SLOT, NET_SLOT]
            .iter()
            .map(|&i| {
                let (base, irq) = slot(i);
                cmdline_fragment(base, irq)
            })
            .collect()
    }

    /// Write the merged root disk into `out` (see [`CowDisk::write_merged_to`]).
    pub fn write_merged_disk(&self, out: &File) -> Result<u64, LinuxError> {
        Ok(lock(&self.block).device().disk().write_merged_to(out)?)
    }
}
