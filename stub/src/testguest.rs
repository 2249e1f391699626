//! The VMM test guest: a tiny 64-bit program (`testguest/guest.S`, built by
//! `build.rs`) used to test boot, pause, snapshot and resume without a Linux
//! kernel. Not a product guest.
//!
//! The guest counts in memory, keeps fixed values in registers and checks
//! them every loop, and every `report_every` iterations fills a 4 KiB block
//! from the counter and reports the counter and the block's checksum through
//! [`REPORT_PORT`]. At `limit` it writes a status line (see [`parse_line`])
//! to the console port [`CONSOLE_PORT`], then `exit_status` to the exit port;
//! resumed after that exit (a machine saved at exit), it counts one more
//! iteration and exits again the same way.

use std::io::Write;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use crate::arch::x86_64::regs::Entry64;
use crate::builder::{build_for_boot, BootConfig, BuildError};
use crate::devices::bus::BusDevice;
use crate::devices::exit::EXIT_PORT;
use crate::machine::Machine;
use crate::memory::GuestMemory;
use crate::testguest_common::ReportWords;

/// The assembled guest (empty when binutils was missing at build time).
pub const IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/testguest.bin"));
/// Guest-physical load and entry address.
pub const LOAD_ADDR: u64 = 0x10_0000;
/// Initial stack pointer.
pub const STACK_TOP: u64 = 0x18_0000;
/// Parameters: u64 report_every, u64 limit, u64 exit_status.
pub const PARAMS_ADDR: u64 = 0x2000;
/// The loop counter.
pub const COUNTER_ADDR: u64 = 0x20_0000;
/// The block the guest fills before each report.
pub const BLOCK_ADDR: u64 = 0x20_1000;
/// Report port: four 32-bit writes (counter low/high, checksum low/high).
pub const REPORT_PORT: u16 = 0x510;
/// Console port (the Bochs/QEMU debug console port): bytes written here are
/// the guest's output.
pub const CONSOLE_PORT: u16 = 0xe9;
/// Start of the line the guest writes to the console before it exits.
pub const LINE_PREFIX: &str = "smolvm test guest: ";
/// Guest memory size.
pub const MEMORY_BYTES: u64 = 4 << 20;
/// The register values the guest keeps: rbx, rbp, r12, r13, r14, r15.
pub const FIXED_REGS: [u64; 6] = [
    0x1111_1111_1111_1111,
    0x2222_2222_2222_2222,
    0x3333_3333_3333_3333,
    0x4444_4444_4444_4444,
    0x5555_5555_5555_5555,
    0x6666_6666_6666_6666,
];
/// Guest exit status when a fixed register changed.
pub const FAIL_REGS: u8 = 3;
/// Guest exit status when an unclaimed port/MMIO read was not all ones.
pub const FAIL_UNCLAIMED: u8 = 4;
/// Guest exit status when the counter and its register shadow disagree.
pub const FAIL_SHADOW: u8 = 5;

/// Test guest parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub report_every: u64,
    pub limit: u64,
    pub exit_status: u8,
}

/// Errors of the test guest helpers.
#[derive(Debug, thiserror::Error)]
pub enum TestGuestError {
    #[error("the test guest was not assembled (install binutils: as, objcopy) and rebuild")]
    NotBuilt,
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Machine(#[from] crate::machine::MachineError),
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    Device(#[from] crate::device_manager::DeviceError),
    #[error("the test guest stopped before it could be paused: {0:?}")]
    StoppedEarly(crate::vstate::vcpu::ExitReason),
}

pub use crate::testguest_common::{expected_checksum, Report, BLOCK_QWORDS};

/// Checksum of the block as it is in guest memory.
pub fn memory_checksum(memory: &GuestMemory) -> Result<u64, crate::memory::MemoryError> {
    crate::testguest_common::block_checksum(memory, BLOCK_ADDR)
}

/// The report port: collects the four writes and sends a [`Report`].
pub struct ReportDevice {
    memory: GuestMemory,
    words: ReportWords,
    tx: Sender<Report>,
    seen: u64,
    /// Hold the vCPU at report N until the receiver gets a message (or
    /// closes), so another thread can pause the guest at a known point
    /// however fast the host runs it.
    hold: Option<(u64, Receiver<()>)>,
}

impl BusDevice for ReportDevice {
    fn read(&mut self, _offset: u64, _data: &mut [u8]) {}

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((counter, checksum)) = self.words.write(offset, data) {
            // The vCPU is stopped at this OUT, so the block is stable.
            let memory_checksum = memory_checksum(&self.memory).unwrap_or(!checksum);
            let _ = self.tx.send(Report {
                counter,
                checksum,
                memory_checksum,
            });
            self.seen += 1;
            if let Some((at, release)) = &self.hold {
                if self.seen == *at {
                    let _ = release.recv();
                }
            }
        }
    }
}

/// Where the console's bytes go.
pub type ConsoleOut = Box<dyn Write + Send>;

/// The console port: copies every byte the guest writes to its output,
/// flushing at each newline. Reads return the port number, as the Bochs/QEMU
/// debug console does (guests probe for it that way).
pub struct ConsoleDevice {
    out: ConsoleOut,
}

impl BusDevice for ConsoleDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(CONSOLE_PORT as u8);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        // A closed stdout (`| head -0`) must not stop the guest: output is
        // dropped, the exit status still comes through.
        let _ = self.out.write_all(data);
        if data.contains(&b'\n') {
            let _ = self.out.flush();
        }
    }
}

/// Attach the console device to `machine`, copying the guest's output to
/// `out`. Boot ([`boot`]) and resume (`smolvm run`) both use it.
pub fn attach_console(machine: &mut Machine, out: ConsoleOut) -> Result<(), TestGuestError> {
    machine.devices_mut().attach_host_io(
        Arc::new(Mutex::new(ConsoleDevice { out })),
        u64::from(CONSOLE_PORT),
        1,
    )?;
    Ok(())
}

/// Takes the guest's reports and drops them.
struct DiscardReports;

impl BusDevice for DiscardReports {
    fn read(&mut self, _offset: u64, _data: &mut [u8]) {}
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// Claim the report port without reading the reports (`smolvm run` has no
/// use for them; unclaimed, each write would be logged as a stray access).
pub fn ignore_reports(machine: &mut Machine) -> Result<(), TestGuestError> {
    machine.devices_mut().attach_host_io(
        Arc::new(Mutex::new(DiscardReports)),
        u64::from(REPORT_PORT),
        16,
    )?;
    Ok(())
}

/// Parse the guest's status line `smolvm test guest: counter=C status=S`
/// (without the newline) into (C, S).
pub fn parse_line(line: &str) -> Option<(u64, u8)> {
    let rest = line.strip_prefix(LINE_PREFIX)?;
    let (counter, status) = rest.split_once(' ')?;
    Some((
        counter.strip_prefix("counter=")?.parse().ok()?,
        status.strip_prefix("status=")?.parse().ok()?,
    ))
}

/// Attach a report device to `machine`; reports arrive on the receiver.
pub fn attach_reporter(machine: &mut Machine) -> Result<Receiver<Report>, TestGuestError> {
    let (tx, rx) = channel();
    insert_reporter(machine, tx, None)?;
    Ok(rx)
}

/// Attach a report device that holds the vCPU inside report number `at`
/// (1-based) until a message arrives on (or the drop of) the returned sender.
pub fn attach_reporter_holding_at(
    machine: &mut Machine,
    at: u64,
) -> Result<(Receiver<Report>, Sender<()>), TestGuestError> {
    let (tx, rx) = channel();
    let (release_tx, release_rx) = channel();
    insert_reporter(machine, tx, Some((at, release_rx)))?;
    Ok((rx, release_tx))
}

fn insert_reporter(
    machine: &mut Machine,
    tx: Sender<Report>,
    hold: Option<(u64, Receiver<()>)>,
) -> Result<(), TestGuestError> {
    let dev = ReportDevice {
        memory: machine.memory().clone(),
        words: ReportWords::default(),
        tx,
        seen: 0,
        hold,
    };
    machine
        .devices_mut()
        .attach_host_io(Arc::new(Mutex::new(dev)), u64::from(REPORT_PORT), 16)?;
    Ok(())
}

/// Boot the test guest and pause it from another thread while the vCPU is
/// held at report `at`: the saved counter is then exactly
/// `at * report_every` on any host. Returns the paused machine and the
/// reports seen.
pub fn boot_and_pause_at(
    params: &Params,
    at: u64,
) -> Result<(Machine, Vec<Report>), TestGuestError> {
    let mut m = boot(params)?;
    let (rx, release) = attach_reporter_holding_at(&mut m, at)?;
    let pauser = m.pause_handle();
    let watcher = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for r in rx.iter() {
            seen.push(r);
            if seen.len() as u64 == at {
                pauser.pause();
                let _ = release.send(());
                break;
            }
        }
        seen
    });
    m.start()?;
    let event = m.wait()?;
    let reports = watcher.join().unwrap_or_default();
    match event {
        crate::machine::RunEvent::Paused => Ok((m, reports)),
        crate::machine::RunEvent::Stopped(r) => Err(TestGuestError::StoppedEarly(r)),
    }
}

/// Build a machine with the test guest loaded and its entry set (not
/// started); its console goes to stdout.
pub fn boot(params: &Params) -> Result<Machine, TestGuestError> {
    boot_with_console(params, Box::new(std::io::stdout()))
}

/// [`boot`] with the console going to `console`.
pub fn boot_with_console(params: &Params, console: ConsoleOut) -> Result<Machine, TestGuestError> {
    if IMAGE.is_empty() {
        return Err(TestGuestError::NotBuilt);
    }
    let mut m = build_for_boot(&BootConfig {
        vcpus: 1,
        memory_bytes: MEMORY_BYTES,
        pit: false,
        exit_port: Some(EXIT_PORT),
        cpu: Default::default(),
    })?;
    let mem = m.memory();
    mem.write(LOAD_ADDR, IMAGE)?;
    let mut p = Vec::with_capacity(24);
    p.extend_from_slice(&params.report_every.max(1).to_le_bytes());
    p.extend_from_slice(&params.limit.to_le_bytes());
    p.extend_from_slice(&u64::from(params.exit_status).to_le_bytes());
    mem.write(PARAMS_ADDR, &p)?;
    m.set_entry(&Entry64 {
        rip: LOAD_ADDR,
        rsp: STACK_TOP,
        rsi: 0,
    })?;
    attach_console(&mut m, console)?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_is_assembled_on_x86_64_linux() {
        if IMAGE.is_empty() {
            eprintln!("SKIP: test guest not assembled (binutils missing)");
            return;
        }
        // Starts with `mov $0xcfc, %dx` (66 ba fc 0c).
        assert_eq!(&IMAGE[..4], &[0x66, 0xba, 0xfc, 0x0c]);
    }

    #[test]
    fn status_line_parses() {
        assert_eq!(
            parse_line("smolvm test guest: counter=3000 status=7"),
            Some((3000, 7))
        );
        assert_eq!(parse_line("smolvm test guest: counter=x status=7"), None);
        assert_eq!(parse_line("counter=1 status=2"), None);
        // The guest's strings are in the image, so the two stay in sync.
        let image = String::from_utf8_lossy(IMAGE);
        if !IMAGE.is_empty() {
            assert!(image.contains("smolvm test guest: counter="));
            assert!(image.contains(" status="));
        }
    }
}
