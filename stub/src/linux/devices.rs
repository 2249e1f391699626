//! The device set of a Linux guest, attached the same way on boot and on
//! resume: COM1 (kernel log), the i8042 (its reset ends the VM), and on
//! virtio-mmio, declared on the command line: the root disk (slot 0), the
//! agent's console (slot 1) and an entropy source (slot 2). Interrupts are
//! irqfd lines from `Machine::interrupt_line`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use crate::devices::legacy::serial::{SerialArgs, SerialDevice};
use crate::devices::legacy::{COM1_BASE, COM1_IRQ, COM1_LEN, I8042, I8042_BASE, I8042_LEN};
use crate::devices::state::{LinuxDeviceStates, VirtioDeviceState, VirtioSlotState};
use crate::devices::virtio::block::{Block, BlockArgs, BlockConfig, CowDisk, BLOCK_SIZE};
use crate::devices::virtio::console::{Console, ConsoleArgs};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::rng::{Rng, RngArgs};
use crate::devices::virtio::{cmdline_fragment, mmio_slot, VirtioInterrupt, MMIO_SIZE};
use crate::machine::Machine;
use crate::persist::Persist;
use crate::vstate::vcpu::ExitReason;

use super::console::{ConsoleLog, LogWriter, SocketSink};
use super::LinuxError;

/// Name of the root disk's section in a machine file.
pub const ROOT_DISK: &str = "root";
const BLOCK_SLOT: usize = 0;
const CONSOLE_SLOT: usize = 1;
const RNG_SLOT: usize = 2;

fn slot(i: usize) -> (u64, u32) {
    // The three slots used here exist (mmio_slot has six).
    mmio_slot(i).unwrap_or((0, 0))
}

/// The devices, shared with the buses (and the agent bridge for the console).
pub struct LinuxDevices {
    pub serial: Arc<Mutex<SerialDevice>>,
    pub block: Arc<Mutex<MmioTransport<Block>>>,
    pub console: Arc<Mutex<MmioTransport<Console>>>,
    pub rng: Arc<Mutex<MmioTransport<Rng>>>,
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

impl LinuxDevices {
    /// Fresh devices for a boot.
    pub fn create(
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
        let rng = Rng::new(mem, irq(machine, slot(RNG_SLOT).1)?)
            .map_err(|e| dev_err("virtio-rng")(e.to_string()))?;
        let me = LinuxDevices {
            serial: Arc::new(Mutex::new(serial)),
            block: Arc::new(Mutex::new(MmioTransport::new(block))),
            console: Arc::new(Mutex::new(MmioTransport::new(console))),
            rng: Arc::new(Mutex::new(MmioTransport::new(rng))),
        };
        me.attach(machine)?;
        Ok(me)
    }

    /// Devices rebuilt from a snapshot, with `disk` as the root disk.
    pub fn restore(
        machine: &mut Machine,
        state: &LinuxDeviceStates,
        disk: CowDisk,
        log: Arc<ConsoleLog>,
        console_sink: SocketSink,
    ) -> Result<Self, LinuxError> {
        let mem = machine.memory().mmap().clone();
        let serial = SerialDevice::restore(
            SerialArgs {
                irq: machine.interrupt_line(COM1_IRQ)?,
                sink: Box::new(LogWriter(log)),
            },
            &state.serial,
        )
        .map_err(|e| dev_err("serial")(e.to_string()))?;
        let mut block = None;
        let mut console = None;
        let mut rng = None;
        let mut disk = Some(disk);
        for (i, s) in state.virtio.iter().enumerate() {
            if (s.base, s.irq) != slot(i) {
                return Err(LinuxError::Device(format!(
                    "virtio device {i} is saved at {:#x} IRQ {}, expected {:?}",
                    s.base,
                    s.irq,
                    slot(i)
                )));
            }
            let interrupt = irq(machine, s.irq)?;
            match (&s.device, i) {
                (VirtioDeviceState::Block { state, .. }, BLOCK_SLOT) => {
                    let disk = disk
                        .take()
                        .ok_or_else(|| LinuxError::Device("two root disks".into()))?;
                    let args = BlockArgs {
                        mem: mem.clone(),
                        interrupt,
                        disk,
                    };
                    block = Some(
                        MmioTransport::<Block>::restore(args, state)
                            .map_err(|e| dev_err("virtio-blk")(e.to_string()))?,
                    );
                }
                (VirtioDeviceState::Console(state), CONSOLE_SLOT) => {
                    let args = ConsoleArgs {
                        mem: mem.clone(),
                        interrupt,
                        sink: Box::new(console_sink.try_clone()?),
                    };
                    console = Some(
                        MmioTransport::<Console>::restore(args, state)
                            .map_err(|e| dev_err("virtio-console")(e.to_string()))?,
                    );
                }
                (VirtioDeviceState::Rng(state), RNG_SLOT) => {
                    let args = RngArgs {
                        mem: mem.clone(),
                        interrupt,
                    };
                    rng = Some(
                        MmioTransport::<Rng>::restore(args, state)
                            .map_err(|e| dev_err("virtio-rng")(e.to_string()))?,
                    );
                }
                _ => {
                    return Err(LinuxError::Device(format!(
                        "virtio slot {i} holds an unexpected device"
                    )))
                }
            }
        }
        let missing = |what: &str| LinuxError::Device(format!("the snapshot has no {what}"));
        let me = LinuxDevices {
            serial: Arc::new(Mutex::new(serial)),
            block: Arc::new(Mutex::new(block.ok_or_else(|| missing("root disk"))?)),
            console: Arc::new(Mutex::new(console.ok_or_else(|| missing("agent console"))?)),
            rng: Arc::new(Mutex::new(rng.ok_or_else(|| missing("entropy device"))?)),
        };
        me.attach(machine)?;
        Ok(me)
    }

    fn attach(&self, machine: &mut Machine) -> Result<(), LinuxError> {
        let bus_err = |e: crate::devices::bus::BusError| LinuxError::Device(e.to_string());
        let control = machine.control();
        let i8042 = I8042::new(Box::new(move || control.finish(ExitReason::Shutdown)));
        let io = machine.io_bus_mut();
        io.insert(self.serial.clone(), COM1_BASE, COM1_LEN)
            .map_err(bus_err)?;
        io.insert(Arc::new(Mutex::new(i8042)), I8042_BASE, I8042_LEN)
            .map_err(bus_err)?;
        let mmio = machine.mmio_bus_mut();
        mmio.insert(self.block.clone(), slot(BLOCK_SLOT).0, MMIO_SIZE)
            .map_err(bus_err)?;
        mmio.insert(self.console.clone(), slot(CONSOLE_SLOT).0, MMIO_SIZE)
            .map_err(bus_err)?;
        mmio.insert(self.rng.clone(), slot(RNG_SLOT).0, MMIO_SIZE)
            .map_err(bus_err)?;
        Ok(())
    }

    /// `virtio_mmio.device=` options declaring the devices to the kernel.
    pub fn cmdline_fragments() -> Vec<String> {
        [BLOCK_SLOT, CONSOLE_SLOT, RNG_SLOT]
            .iter()
            .map(|&i| {
                let (base, irq) = slot(i);
                cmdline_fragment(base, irq)
            })
            .collect()
    }

    /// Save every device (the machine must be paused).
    pub fn save(&self, cmdline: &str) -> Result<LinuxDeviceStates, LinuxError> {
        let serial = lock(&self.serial)
            .save()
            .map_err(|e| dev_err("serial")(e.to_string()))?;
        let slot_state = |i: usize, device| {
            let (base, irq) = slot(i);
            VirtioSlotState { base, irq, device }
        };
        let block = lock(&self.block)
            .save()
            .map_err(|e| dev_err("virtio-blk")(e.to_string()))?;
        let console = lock(&self.console)
            .save()
            .map_err(|e| dev_err("virtio-console")(e.to_string()))?;
        let rng = lock(&self.rng)
            .save()
            .map_err(|e| dev_err("virtio-rng")(e.to_string()))?;
        Ok(LinuxDeviceStates {
            serial,
            virtio: vec![
                slot_state(
                    BLOCK_SLOT,
                    VirtioDeviceState::Block {
                        disk: ROOT_DISK.into(),
                        state: block,
                    },
                ),
                slot_state(CONSOLE_SLOT, VirtioDeviceState::Console(console)),
                slot_state(RNG_SLOT, VirtioDeviceState::Rng(rng)),
            ],
            cmdline: cmdline.to_string(),
        })
    }

    /// Write the merged root disk (base with the overlay applied) into `out`,
    /// leaving all-zero blocks as holes so the writer skips them cheaply.
    pub fn write_merged_disk(&self, out: &File) -> Result<u64, LinuxError> {
        let dev = lock(&self.block);
        let disk = dev.device().disk();
        let size = disk.capacity();
        out.set_len(0)?;
        out.set_len(size)?;
        let chunk = 1usize << 20;
        let mut buf = vec![0u8; chunk];
        let mut pos = 0u64;
        while pos < size {
            let n = (size - pos).min(chunk as u64) as usize;
            disk.read_at(&mut buf[..n], pos)?;
            for (i, block) in buf[..n].chunks(BLOCK_SIZE as usize).enumerate() {
                if block.iter().any(|&b| b != 0) {
                    out.write_all_at(block, pos + (i as u64) * BLOCK_SIZE)?;
                }
            }
            pos += n as u64;
        }
        Ok(size)
    }
}

impl SocketSink {
    /// Another handle on the same socket.
    pub fn try_clone(&self) -> io::Result<SocketSink> {
        Ok(SocketSink(self.0.try_clone()?))
    }
}
