//! The KVM backend (`kvm-ioctls`).
//!
//! Only standard KVM API is used, so the same code runs on hardware KVM
//! (Intel/AMD) and on PVM hosts.

#[cfg(target_arch = "aarch64")]
pub mod aarch64;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

use std::cell::Cell;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::thread::RawPthread;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use super::{HypervisorError, VcpuExit};
use crate::memory::GuestMemory;

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

thread_local! {
    /// `kvm_run.immediate_exit` of the vCPU this thread runs, or null.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only an async-signal-safe volatile store: if the thread is inside
    // KVM_RUN the signal itself makes it return EINTR; if it is about to
    // enter, immediate_exit makes that entry return at once.
    let p = IMMEDIATE_EXIT.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: `p` points into this thread's vCPU kvm_run mapping, set by
        // arm_kick and cleared by disarm_kick before the vCPU leaves the thread.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick) {
            log::error!("cannot install the vCPU kick signal handler: {e}");
        }
    });
}

/// The KVM device node: `SMOLVM_KVM_DEVICE` when set (a container that
/// mounts it elsewhere; tests), else `/dev/kvm`.
pub fn device_path() -> PathBuf {
    match std::env::var_os("SMOLVM_KVM_DEVICE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from("/dev/kvm"),
    }
}

/// An open `/dev/kvm`.
pub struct KvmHypervisor {
    kvm: Arc<Kvm>,
}

impl KvmHypervisor {
    /// Open the KVM device ([`device_path`]) and check the API version and
    /// the capabilities the VMM relies on.
    pub fn new() -> Result<Self, HypervisorError> {
        Self::open(&device_path())
    }

    /// [`new`](Self::new) with the device node at `path`.
    pub fn open(path: &Path) -> Result<Self, HypervisorError> {
        let cpath = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| HypervisorError::open(path, std::io::ErrorKind::InvalidInput.into()))?;
        let kvm = Kvm::new_with_path(&cpath).map_err(|e| HypervisorError::open(path, e.into()))?;
        if kvm.get_api_version() != 12 {
            return Err(HypervisorError::Missing("KVM API version 12"));
        }
        for (cap, name) in [
            (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (kvm_ioctls::Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (kvm_ioctls::Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(HypervisorError::Missing(name));
            }
        }
        install_kick_handler();
        Ok(KvmHypervisor { kvm: Arc::new(kvm) })
    }

    /// The underlying handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }
}

#[cfg(target_arch = "x86_64")]
impl super::HypervisorX86_64 for KvmHypervisor {
    fn supported_cpuid(&self) -> Result<Vec<kvm_bindings::kvm_cpuid_entry2>, HypervisorError> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| HypervisorError::op("KVM_GET_SUPPORTED_CPUID", e))?;
        Ok(cpuid.as_slice().to_vec())
    }
}

impl super::Hypervisor for KvmHypervisor {
    type Vm = KvmVm;

    fn open_default() -> Result<Self, HypervisorError> {
        Self::new()
    }

    fn create_vm(&self) -> Result<KvmVm, HypervisorError> {
        let fd = self
            .kvm
            .create_vm()
            .map_err(|e| HypervisorError::op("KVM_CREATE_VM", e))?;
        Ok(KvmVm {
            fd,
            kvm: self.kvm.clone(),
            #[cfg(target_arch = "aarch64")]
            gic: std::sync::OnceLock::new(),
        })
    }
}

/// A KVM VM.
pub struct KvmVm {
    fd: VmFd,
    kvm: Arc<Kvm>,
    /// The vgic-v3 device, once created (`VmAarch64::create_gic`).
    #[cfg(target_arch = "aarch64")]
    gic: std::sync::OnceLock<kvm_ioctls::DeviceFd>,
}

impl KvmVm {
    /// The VM file descriptor, for backend-specific setup.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
}

/// A guest interrupt line backed by an irqfd: each `trigger` makes KVM
/// inject GSI `gsi` through the in-kernel IRQ chip (edge: assert, deassert).
pub struct IrqFdLine {
    fd: vmm_sys_util::eventfd::EventFd,
    gsi: u32,
}

impl super::InterruptLine for IrqFdLine {
    fn trigger(&self) -> Result<(), HypervisorError> {
        self.fd
            .write(1)
            .map_err(|e| HypervisorError::op("irqfd write", e))
    }

    fn gsi(&self) -> u32 {
        self.gsi
    }
}

impl super::Vm for KvmVm {
    type Vcpu = KvmVcpu;
    type InterruptLine = IrqFdLine;

    /// An irqfd for GSI `gsi` (needs the IRQ chip, which every machine has).
    /// Devices get one each at build and at resume.
    fn interrupt_line(&self, gsi: u32) -> Result<IrqFdLine, HypervisorError> {
        let fd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| HypervisorError::op("eventfd", e))?;
        self.fd
            .register_irqfd(&fd, gsi)
            .map_err(|e| HypervisorError::op("KVM_IRQFD", e))?;
        Ok(IrqFdLine { fd, gsi })
    }

    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        host_addr: *mut u8,
        size: u64,
    ) -> Result<(), HypervisorError> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the caller guarantees the host range stays mapped for the
        // life of the VM.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(|e| HypervisorError::op("KVM_SET_USER_MEMORY_REGION", e))
    }

    fn create_vcpu(&self, id: u32) -> Result<KvmVcpu, HypervisorError> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| HypervisorError::op("KVM_CREATE_VCPU", e))?;
        #[cfg(target_arch = "aarch64")]
        aarch64::init_vcpu(&self.fd, &fd, id)?;
        #[cfg(target_arch = "x86_64")]
        let xsave_fam = x86_64::xsave_fam_len(&self.fd);
        #[cfg(not(target_arch = "x86_64"))]
        let xsave_fam = 0;
        Ok(KvmVcpu {
            fd,
            id,
            kvm: self.kvm.clone(),
            xsave_fam,
            #[cfg(target_arch = "x86_64")]
            model: crate::arch::x86_64::cpu_model::CpuModel::Host,
            #[cfg(target_arch = "x86_64")]
            count: 1,
        })
    }
}

/// A KVM vCPU.
pub struct KvmVcpu {
    fd: VcpuFd,
    id: u32,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    kvm: Arc<Kvm>,
    /// u32 words of XSAVE state past the legacy 4 KiB (KVM_CAP_XSAVE2).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    xsave_fam: usize,
    /// The machine's CPU model: which MSRs are saved, whether the TSC rate
    /// must match (set before a boot or restore).
    #[cfg(target_arch = "x86_64")]
    model: crate::arch::x86_64::cpu_model::CpuModel,
    /// The machine's vCPU count (its CPUID topology).
    #[cfg(target_arch = "x86_64")]
    count: u32,
}

impl KvmVcpu {
    /// The vCPU file descriptor, for backend-specific state.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }
}

impl super::Vcpu for KvmVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn run(&mut self) -> Result<VcpuExit<'_>, HypervisorError> {
        use kvm_ioctls::VcpuExit as K;
        let run_ptr: *const kvm_bindings::kvm_run = self.fd.get_kvm_run();
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(VcpuExit::Interrupted)
            }
            Err(e) => return Err(HypervisorError::op("KVM_RUN", e)),
        };
        let exit = match exit {
            // kvm-ioctls gives the `size * count` bytes of a (string) port
            // access but not the access size, which is in kvm_run.
            K::IoIn(port, data) => VcpuExit::IoIn {
                port,
                // SAFETY: run_ptr is this vCPU's kvm_run mapping, alive as long
                // as the fd; the exit reason says `io` is the live union
                // member, and `io.size` does not overlap the data area that
                // `data` borrows.
                size: unsafe { (*run_ptr).__bindgen_anon_1.io.size },
                data,
            },
            K::IoOut(port, data) => VcpuExit::IoOut {
                port,
                // SAFETY: as for IoIn.
                size: unsafe { (*run_ptr).__bindgen_anon_1.io.size },
                data,
            },
            K::MmioRead(addr, data) => VcpuExit::MmioRead { addr, data },
            K::MmioWrite(addr, data) => VcpuExit::MmioWrite { addr, data },
            K::Hlt => VcpuExit::Hlt,
            K::Shutdown => VcpuExit::Shutdown,
            K::Intr => VcpuExit::Interrupted,
            K::FailEntry(reason, _) => VcpuExit::FailEntry { reason },
            K::SystemEvent(kind, _) => VcpuExit::SystemEvent { kind },
            K::InternalError => {
                // SAFETY: run_ptr is this vCPU's kvm_run mapping, alive as long
                // as the fd; the exit reason says `internal` is the live union member.
                let internal = unsafe { (*run_ptr).__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                VcpuExit::InternalError {
                    suberror: internal.suberror,
                    data: internal.data[..n].to_vec(),
                }
            }
            K::Unknown => VcpuExit::Unhandled("unknown"),
            K::Exception => VcpuExit::Unhandled("exception"),
            K::Hypercall(_) => VcpuExit::Unhandled("hypercall"),
            K::Debug(_) => VcpuExit::Unhandled("debug"),
            K::IrqWindowOpen => VcpuExit::Unhandled("irq window open"),
            K::Nmi => VcpuExit::Unhandled("nmi"),
            K::X86Rdmsr(_) => VcpuExit::Unhandled("rdmsr"),
            K::X86Wrmsr(_) => VcpuExit::Unhandled("wrmsr"),
            K::MemoryFault { .. } => VcpuExit::Unhandled("memory fault"),
            _ => VcpuExit::Unhandled("other"),
        };
        Ok(exit)
    }

    fn set_immediate_exit(&mut self, on: bool) {
        self.fd.set_kvm_immediate_exit(u8::from(on));
    }

    fn arm_kick(&mut self) {
        let p = &mut self.fd.get_kvm_run().immediate_exit as *mut u8;
        IMMEDIATE_EXIT.with(|c| c.set(p));
    }

    fn disarm_kick(&mut self) {
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    }

    fn kick_thread(thread: RawPthread) {
        // SAFETY: the caller passes a thread that has not been joined yet;
        // the handler only touches that thread's own kvm_run.
        let rc = unsafe { libc::pthread_kill(thread as libc::pthread_t, kick_signal()) };
        if rc != 0 {
            log::debug!("vCPU kick: pthread_kill returned {rc}");
        }
    }

    fn describe_position(&self, memory: &GuestMemory) -> String {
        #[cfg(target_arch = "x86_64")]
        {
            x86_64::describe_position(&self.fd, memory)
        }
        #[cfg(target_arch = "aarch64")]
        {
            aarch64::describe_position(&self.fd, memory)
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            let _ = memory;
            String::from("position unknown")
        }
    }
}
