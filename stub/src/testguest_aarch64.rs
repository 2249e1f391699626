//! The VMM test guest for aarch64: `testguest/guest-aarch64.S`, the same
//! program as the x86_64 one (`testguest`), assembled once and checked in as
//! `testguest/guest-aarch64.bin` (the default build has no aarch64
//! assembler; a test re-assembles it when `aarch64-linux-gnu-as` is there).
//!
//! The constants are shared by every host (the bytes and the checksum are
//! tested on x86_64 too); the runner ([`run`], aarch64 Linux only) drives it
//! on KVM without the x86-only `Machine`: one vCPU, the GICv3, RAM at
//! `layout::RAM_BASE`, the exit, console and report devices in the port
//! window. A save is a test-only state file ([`SavedGuest`], not the
//! `.smolmachine` format, which is x86_64-only so far).

use crate::arch::aarch64::layout::{port_address, RAM_BASE};

/// The assembled guest.
pub const IMAGE: &[u8] = include_bytes!("../testguest/guest-aarch64.bin");
/// Guest-physical load and entry address.
pub const LOAD_ADDR: u64 = RAM_BASE + 0x10_0000;
/// Initial stack pointer (SP_EL1).
pub const STACK_TOP: u64 = RAM_BASE + 0x18_0000;
/// Parameters: u64 report_every, u64 limit, u64 exit_status.
pub const PARAMS_ADDR: u64 = RAM_BASE + 0x2000;
/// The loop counter.
pub const COUNTER_ADDR: u64 = RAM_BASE + 0x20_0000;
/// The block the guest fills before each report.
pub const BLOCK_ADDR: u64 = RAM_BASE + 0x20_1000;
/// Report port (in the port window): four 32-bit writes.
pub const REPORT_ADDR: u64 = port_address(0x510);
/// Console port: bytes written here are the guest's output.
pub const CONSOLE_ADDR: u64 = port_address(0xe9);
/// Exit port: a byte written here stops the machine with that status.
pub const EXIT_ADDR: u64 = port_address(crate::devices::exit::EXIT_PORT);
/// Guest memory size.
pub const MEMORY_BYTES: u64 = 4 << 20;
/// Start of the line the guest writes before it exits.
pub const LINE_PREFIX: &str = "smolvm test guest: ";

/// Test guest parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub report_every: u64,
    pub limit: u64,
    pub exit_status: u8,
}

pub use crate::testguest_common::{expected_checksum, Report, BLOCK_QWORDS};

/// The parameter block written at [`PARAMS_ADDR`].
pub fn params_bytes(p: &Params) -> Vec<u8> {
    let mut b = Vec::with_capacity(24);
    b.extend_from_slice(&p.report_every.max(1).to_le_bytes());
    b.extend_from_slice(&p.limit.to_le_bytes());
    b.extend_from_slice(&u64::from(p.exit_status).to_le_bytes());
    b
}

#[cfg(all(target_os = "linux", target_arch = "aarch64"))]
pub use runner::*;

#[cfg(all(target_os = "linux", target_arch = "aarch64"))]
mod runner {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::arch::aarch64::gic::GicState;
    use crate::arch::aarch64::regs::{Entry, VcpuState};
    use crate::devices::bus::{Bus, BusDevice};
    use crate::devices::exit::ExitPort;
    use crate::hypervisor::kvm::{KvmHypervisor, KvmVcpu, KvmVm};
    use crate::hypervisor::{HypervisorError, Vcpu, VcpuAarch64, VmAarch64};
    use crate::memory::{GuestMemory, MemoryError};
    use crate::testguest_common::{block_checksum, ReportWords};
    use crate::vstate::vcpu::{run_loop, ExitReason, RunControl, VcpuContext};

    /// Errors of the aarch64 test guest runner.
    #[derive(Debug, thiserror::Error)]
    pub enum TestGuestError {
        #[error(transparent)]
        Hypervisor(#[from] HypervisorError),
        #[error(transparent)]
        Memory(#[from] MemoryError),
        #[error("test guest state file {path}: {msg}")]
        State { path: String, msg: String },
        #[error("the vCPU thread failed")]
        Thread,
    }

    /// What a saved test guest holds: the vCPU, the GIC and all of RAM.
    #[derive(Serialize, Deserialize)]
    pub struct SavedGuest {
        pub vcpu: VcpuState,
        pub gic: GicState,
        pub memory: Vec<u8>,
    }

    /// First bytes of a state file.
    pub const STATE_MAGIC: &[u8; 8] = b"SMOLA64T";

    struct ReportDevice {
        memory: GuestMemory,
        words: ReportWords,
        reports: Arc<Mutex<Vec<Report>>>,
        pause_at: Option<u64>,
        control: Arc<RunControl>,
    }

    impl BusDevice for ReportDevice {
        fn read(&mut self, _offset: u64, _data: &mut [u8]) {}

        fn write(&mut self, offset: u64, data: &[u8]) {
            if let Some((counter, checksum)) = self.words.write(offset, data) {
                // The vCPU is stopped at this write, so the block is stable.
                let memory_checksum = block_checksum(&self.memory, BLOCK_ADDR).unwrap_or(!checksum);
                let r = Report {
                    counter,
                    checksum,
                    memory_checksum,
                };
                let mut reports = self.reports.lock().unwrap_or_else(|e| e.into_inner());
                reports.push(r);
                if self.pause_at == Some(reports.len() as u64) {
                    // The vCPU is inside this exit: the pause takes effect
                    // when the next KVM_RUN completes the write and returns.
                    self.control.request_pause();
                }
            }
        }
    }

    struct ConsoleDevice;

    impl BusDevice for ConsoleDevice {
        fn read(&mut self, _offset: u64, _data: &mut [u8]) {}
        fn write(&mut self, _offset: u64, data: &[u8]) {
            let mut out = std::io::stdout();
            let _ = out.write_all(data);
            if data.contains(&b'\n') {
                let _ = out.flush();
            }
        }
    }

    /// A test guest machine: VM, one vCPU, GIC, RAM and devices.
    pub struct TestGuest {
        vm: KvmVm,
        vcpu: Option<KvmVcpu>,
        memory: GuestMemory,
        control: Arc<RunControl>,
        mmio: Bus,
        /// Reports seen so far.
        pub reports: Arc<Mutex<Vec<Report>>>,
    }

    /// How a run ended.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Outcome {
        Stopped(ExitReason),
        Paused,
    }

    impl TestGuest {
        /// VM with `memory` registered, vCPU 0 created and initialised, then
        /// the GIC (after the vCPUs: see `arch::aarch64::gic`), then devices.
        fn create(memory: GuestMemory, pause_at: Option<u64>) -> Result<Self, TestGuestError> {
            let hv = KvmHypervisor::new()?;
            // The TestGuest owns `memory` and drops it after the VM (fields
            // drop in declaration order: vm, vcpu, then memory).
            let (vm, mut vcpus) = crate::vstate::vm::create_vm(&hv, &memory, false, 1)?;
            let vcpu = vcpus.pop().ok_or(HypervisorError::Missing("vCPU 0"))?;
            let control = RunControl::new(KvmVcpu::kick_thread);
            let reports = Arc::new(Mutex::new(Vec::new()));
            let mut mmio = Bus::new();
            let stop = control.clone();
            type Device = Arc<Mutex<dyn BusDevice>>;
            let devices: [(Device, u64, u64); 3] = [
                (
                    Arc::new(Mutex::new(ExitPort::new(Box::new(move |s| {
                        stop.finish(ExitReason::Exited(s))
                    })))),
                    EXIT_ADDR,
                    1,
                ),
                (Arc::new(Mutex::new(ConsoleDevice)), CONSOLE_ADDR, 1),
                (
                    Arc::new(Mutex::new(ReportDevice {
                        memory: memory.clone(),
                        words: ReportWords::default(),
                        reports: reports.clone(),
                        pause_at,
                        control: control.clone(),
                    })),
                    REPORT_ADDR,
                    16,
                ),
            ];
            for (dev, base, len) in devices {
                mmio.insert(dev, base, len)
                    .map_err(|e| HypervisorError::BadState(e.to_string()))?;
            }
            Ok(TestGuest {
                vm,
                vcpu: Some(vcpu),
                memory,
                control,
                mmio,
                reports,
            })
        }

        /// A fresh machine with the guest loaded and its entry set.
        pub fn boot(params: &Params, pause_at: Option<u64>) -> Result<Self, TestGuestError> {
            let memory = GuestMemory::anonymous(&[(RAM_BASE, MEMORY_BYTES)])?;
            memory.write(LOAD_ADDR, IMAGE)?;
            memory.write(PARAMS_ADDR, &params_bytes(params))?;
            let g = Self::create(memory, pause_at)?;
            g.vcpu().configure_boot(&Entry {
                pc: LOAD_ADDR,
                sp: STACK_TOP,
                x0: 0,
            })?;
            Ok(g)
        }

        fn vcpu(&self) -> &KvmVcpu {
            self.vcpu
                .as_ref()
                .expect("the vCPU is back from its thread")
        }

        /// Run until the guest exits or the pause point is reached.
        pub fn run(&mut self) -> Result<Outcome, TestGuestError> {
            let mut vcpu = self.vcpu.take().ok_or(TestGuestError::Thread)?;
            let ctx = VcpuContext {
                io_bus: Bus::new(),
                mmio_bus: self.mmio.clone(),
                memory: self.memory.clone(),
                control: self.control.clone(),
            };
            let handle = std::thread::spawn(move || {
                run_loop(&mut vcpu, 0, &ctx);
                vcpu
            });
            self.vcpu = Some(handle.join().map_err(|_| TestGuestError::Thread)?);
            Ok(match self.control.outcome() {
                Some(r) => Outcome::Stopped(r),
                None => Outcome::Paused,
            })
        }

        /// The machine's state (vCPU registers, then the GIC, then RAM).
        pub fn save(&self) -> Result<SavedGuest, TestGuestError> {
            let vcpu = self.vcpu().save_state()?;
            let mpidr = self.vcpu().mpidr()?;
            let gic = self.vm.save_gic(&[mpidr])?;
            let mut memory = vec![0u8; MEMORY_BYTES as usize];
            self.memory.read(RAM_BASE, &mut memory)?;
            Ok(SavedGuest { vcpu, gic, memory })
        }

        /// A machine resumed from `saved`: vCPU registers, then the GIC.
        pub fn resume(saved: &SavedGuest) -> Result<Self, TestGuestError> {
            let memory = GuestMemory::anonymous(&[(RAM_BASE, MEMORY_BYTES)])?;
            memory.write(RAM_BASE, &saved.memory)?;
            let g = Self::create(memory, None)?;
            g.vcpu().restore_state(&saved.vcpu)?;
            let mpidr = g.vcpu().mpidr()?;
            g.vm.restore_gic(&[mpidr], &saved.gic)?;
            Ok(g)
        }
    }

    /// Write `saved` to `path`.
    pub fn write_state(path: &std::path::Path, saved: &SavedGuest) -> Result<(), TestGuestError> {
        let err = |msg: String| TestGuestError::State {
            path: path.display().to_string(),
            msg,
        };
        let mut bytes = STATE_MAGIC.to_vec();
        bytes.extend(postcard::to_stdvec(saved).map_err(|e| err(e.to_string()))?);
        std::fs::write(path, bytes).map_err(|e| err(e.to_string()))
    }

    /// Read a state file written by [`write_state`].
    pub fn read_state(path: &std::path::Path) -> Result<SavedGuest, TestGuestError> {
        let err = |msg: String| TestGuestError::State {
            path: path.display().to_string(),
            msg,
        };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let body = bytes
            .strip_prefix(STATE_MAGIC.as_slice())
            .ok_or_else(|| err("not an aarch64 test guest state".into()))?;
        let saved: SavedGuest = postcard::from_bytes(body).map_err(|e| err(e.to_string()))?;
        if saved.memory.len() as u64 != MEMORY_BYTES {
            return Err(err(format!("{} bytes of memory", saved.memory.len())));
        }
        Ok(saved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_is_the_checked_in_assembly() {
        // Starts with `movz x28, #0x900, lsl #16` (d2a1201c), ends with the strings and constants.
        assert_eq!(&IMAGE[..4], &0xd2a1_201cu32.to_le_bytes());
        let text = String::from_utf8_lossy(IMAGE);
        assert!(text.contains("smolvm test guest: counter="));
        assert!(text.contains(" status="));
        assert!(IMAGE.len().is_multiple_of(4));
    }

    /// With the cross binutils installed, the checked-in bytes are what the source assembles to.
    #[test]
    fn image_matches_the_source_when_an_assembler_is_installed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/testguest/guest-aarch64.S");
        let obj = dir.path().join("g.o");
        let bin = dir.path().join("g.bin");
        let ok = std::process::Command::new("aarch64-linux-gnu-as")
            .arg("-o")
            .arg(&obj)
            .arg(src)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("SKIP: aarch64-linux-gnu-as not installed");
            return;
        }
        let copied = std::process::Command::new("aarch64-linux-gnu-objcopy")
            .args(["-O", "binary", "-j", ".text"])
            .arg(&obj)
            .arg(&bin)
            .status()
            .expect("aarch64-linux-gnu-objcopy");
        assert!(copied.success());
        assert_eq!(std::fs::read(&bin).expect("assembled"), IMAGE);
    }

    #[test]
    fn layout_fits_in_memory() {
        for a in [
            LOAD_ADDR + IMAGE.len() as u64,
            STACK_TOP,
            PARAMS_ADDR + 24,
            BLOCK_ADDR + 4096,
        ] {
            assert!(a > RAM_BASE && a <= RAM_BASE + MEMORY_BYTES);
        }
        assert_eq!(
            params_bytes(&Params {
                report_every: 0,
                limit: 9,
                exit_status: 7
            })[..8],
            1u64.to_le_bytes()
        );
        assert_ne!(expected_checksum(7), expected_checksum(8));
    }
}
