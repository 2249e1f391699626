//! Arbitrary guest memory (descriptor table, rings, buffers, request headers)
//! fed to the virtio-blk, virtio-console and virtio-rng request paths. The
//! device must never panic, whatever the guest wrote.

#![no_main]

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use smolvm::devices::bus::BusDevice;
use smolvm::devices::virtio::block::{Block, BlockConfig, CowDisk};
use smolvm::devices::virtio::console::{Console, VIRTIO_CONSOLE_F_MULTIPORT};
use smolvm::devices::virtio::mmio::{regs, MmioTransport};
use smolvm::devices::virtio::rng::Rng;
use smolvm::devices::virtio::{
    status, GuestMemoryMmap, InterruptTrigger, VirtioDevice, VirtioInterrupt, COMMON_FEATURES,
    VIRTIO_F_VERSION_1,
};
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: usize = 0x10000;
const QUEUE_SIZE: u32 = 16;

struct NoIrq;
impl InterruptTrigger for NoIrq {
    fn trigger(&self) {}
}

fn image() -> &'static PathBuf {
    static IMAGE: OnceLock<(tempfile::TempPath, PathBuf)> = OnceLock::new();
    &IMAGE
        .get_or_init(|| {
            let mut f = tempfile::NamedTempFile::new().expect("temp image");
            f.write_all(&vec![0x5a; 64 * 1024]).expect("write image");
            let path = f.path().to_owned();
            (f.into_temp_path(), path)
        })
        .1
}

fn wr(dev: &mut dyn BusDevice, off: u64, v: u32) {
    dev.write(off, &v.to_le_bytes());
}

/// Drive the handshake with the rings of queue `i` at `0x1000 * i` (table),
/// `+0x100` (avail) and `+0x200` (used), then notify each queue.
fn run<D: VirtioDevice>(mut t: MmioTransport<D>, features: u64, queues: u32) -> MmioTransport<D> {
    wr(&mut t, regs::STATUS, 0);
    wr(&mut t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    wr(&mut t, regs::DRIVER_FEATURES_SEL, 0);
    wr(&mut t, regs::DRIVER_FEATURES, features as u32);
    wr(&mut t, regs::DRIVER_FEATURES_SEL, 1);
    wr(&mut t, regs::DRIVER_FEATURES, (features >> 32) as u32);
    wr(
        &mut t,
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    for q in 0..queues {
        let base = 0x1000 * u64::from(q);
        wr(&mut t, regs::QUEUE_SEL, q);
        wr(&mut t, regs::QUEUE_NUM, QUEUE_SIZE);
        wr(&mut t, regs::QUEUE_DESC_LOW, base as u32);
        wr(&mut t, regs::QUEUE_AVAIL_LOW, (base + 0x100) as u32);
        wr(&mut t, regs::QUEUE_USED_LOW, (base + 0x200) as u32);
        wr(&mut t, regs::QUEUE_READY, 1);
    }
    wr(
        &mut t,
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    for q in 0..queues {
        wr(&mut t, regs::QUEUE_NOTIFY, q);
    }
    t
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let n = rest.len().min(MEM_SIZE);
    mem.write_slice(&rest[..n], GuestAddress(0))
        .expect("fill memory");
    let irq = VirtioInterrupt::new(Arc::new(NoIrq));
    let features = if sel & 0x80 != 0 {
        COMMON_FEATURES
    } else {
        VIRTIO_F_VERSION_1
    };
    match sel % 3 {
        0 => {
            let disk = CowDisk::open(image()).expect("open image");
            let config = BlockConfig {
                read_only: sel & 0x40 != 0,
                id: "fuzz".into(),
            };
            let dev = Block::new(mem, irq, disk, config).expect("block device");
            run(MmioTransport::new(dev), features, 1);
        }
        1 => {
            // Multiport (control queues 2/3, whose messages the device parses) or not.
            let dev = Console::new(mem, irq, Box::new(std::io::sink())).expect("console");
            let features = if sel & 0x20 != 0 {
                features | VIRTIO_CONSOLE_F_MULTIPORT
            } else {
                features
            };
            let mut t = run(MmioTransport::new(dev), features, 4);
            t.device_mut().enqueue_input(&rest[..n.min(300)]);
        }
        _ => {
            let dev = Rng::new(mem, irq).expect("rng");
            run(MmioTransport::new(dev), features, 1);
        }
    }
});
