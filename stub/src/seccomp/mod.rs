//! System call filters for a running machine (seccomp-bpf, built with `seccompiler`).
//!
//! Once a resumed machine is about to run the guest, [`install`] puts every thread of the
//! process under the VMM allow-list (`SECCOMP_FILTER_FLAG_TSYNC`), and each vCPU thread
//! started after that adds the tighter vCPU allow-list on itself ([`enter_vcpu_thread`],
//! called by `Machine::start`'s threads). Threads created later inherit their creator's
//! filters. A call on no list traps: the SIGSYS handler writes one line naming the call
//! and the thread, and the process dies by SIGSYS. The lists and their reasons are in
//! `filters.rs`; the threat model is in docs/ARCHITECTURE.md.
//!
//! Filters are installed by `smolvm run` and packed executables only: `smolpack build`
//! and library users (tests) that never call [`install`] run unfiltered.
//! `SMOLVM_SECCOMP=0` skips the installation, with a warning, for debugging.

mod filters;
mod sigsys;

use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

use seccompiler::BpfProgram;

pub use filters::Role;

/// Errors from building or installing the filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter could not be compiled (a bug in the lists).
    #[error("cannot build the system call filter: {0}")]
    Compile(String),
    /// The kernel refused the filter.
    #[error(
        "cannot install the {role} system call filter: {source} (the kernel needs seccomp \
         filters; SMOLVM_SECCOMP=0 runs without them, for debugging only)"
    )]
    Install {
        role: &'static str,
        #[source]
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
}

impl SeccompError {
    #[cfg(test)]
    fn compile(e: impl std::fmt::Display) -> SeccompError {
        SeccompError::Compile(e.to_string())
    }
}

/// Set once the VMM filter is in place: the program each vCPU thread then adds.
static VCPU_FILTER: OnceLock<BpfProgram> = OnceLock::new();

/// Both programs, compiled for this process.
type Programs = (BpfProgram, BpfProgram);

/// Programs being compiled on a helper thread by [`prepare`], for [`install`] to take.
static PREPARED: Mutex<Option<JoinHandle<Result<Programs, SeccompError>>>> = Mutex::new(None);

/// Set by [`enable_network`]: the VMM list gains the user-mode network's calls.
static NETWORK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The run has the user-mode network (`--net`): its thread may open, connect and poll
/// IPv4 sockets (`filters::NET`). Call it before [`prepare`] and [`install`].
pub fn enable_network() {
    NETWORK.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn compile_both() -> Result<Programs, SeccompError> {
    let pid = std::process::id();
    let vmm = if NETWORK.load(std::sync::atomic::Ordering::SeqCst) {
        Role::VmmNet
    } else {
        Role::Vmm
    };
    Ok((
        filters::compile(vmm, pid)?,
        filters::compile(Role::Vcpu, pid)?,
    ))
}

/// Start compiling the filters on a helper thread, so that [`install`] only installs
/// them: compiling takes about 0.3 ms, which would otherwise sit between restoring the
/// machine and running it. Call it early on the resume path (the thread ends by itself;
/// `install` joins it). Nothing happens when `SMOLVM_SECCOMP=0`.
pub fn prepare() {
    if disabled_by_env() || VCPU_FILTER.get().is_some() {
        return;
    }
    let mut slot = PREPARED.lock().unwrap_or_else(|e| e.into_inner());
    if slot.is_none() {
        // If the thread cannot start, install compiles inline.
        *slot = std::thread::Builder::new()
            .name("seccomp-build".into())
            .spawn(compile_both)
            .ok();
    }
}

/// The variable that turns the filters off.
pub const DISABLE_ENV: &str = "SMOLVM_SECCOMP";

/// Whether `SMOLVM_SECCOMP=0` asks to run without filters.
fn disabled_by_env() -> bool {
    std::env::var_os(DISABLE_ENV).is_some_and(|v| v == "0")
}

/// Put every thread of this process under the VMM filter and arm the vCPU filter for
/// vCPU threads started from now on. Call it after the machine is built and its devices
/// attached, just before its vCPUs start. Returns `false` when `SMOLVM_SECCOMP=0`
/// disabled it (a warning is printed); calling it again is a no-op.
///
/// Every thread must still be unfiltered (TSYNC refuses diverging filter trees).
pub fn install() -> Result<bool, SeccompError> {
    if VCPU_FILTER.get().is_some() {
        return Ok(true);
    }
    if disabled_by_env() {
        eprintln!(
            "smolvm: WARNING: {DISABLE_ENV}=0: system call filtering is OFF; a guest that \
             takes over the VMM gets everything this user can do. Use it only to debug."
        );
        return Ok(false);
    }
    // Both programs are built before anything is installed: by `prepare`'s thread (joined
    // here, so it is gone before TSYNC) or now.
    let prepared = PREPARED.lock().unwrap_or_else(|e| e.into_inner()).take();
    let (vmm, vcpu) = match prepared.map(|h| h.join()) {
        Some(Ok(programs)) => programs?,
        Some(Err(_)) | None => compile_both()?,
    };
    sigsys::install_handler().map_err(SeccompError::Handler)?;
    seccompiler::apply_filter_all_threads(&vmm).map_err(|source| SeccompError::Install {
        role: "VMM",
        source,
    })?;
    let _ = VCPU_FILTER.set(vcpu);
    Ok(true)
}

/// Whether [`install`] put the filters in place.
pub fn is_installed() -> bool {
    VCPU_FILTER.get().is_some()
}

/// On a vCPU thread, before it first enters the guest: add the vCPU filter when the
/// process is filtered (nothing otherwise).
pub fn enter_vcpu_thread() -> Result<(), SeccompError> {
    let Some(prog) = VCPU_FILTER.get() else {
        return Ok(());
    };
    block_host_signals();
    seccompiler::apply_filter(prog).map_err(|source| SeccompError::Install {
        role: "vCPU",
        source,
    })
}

/// Signals sent to the whole process (the forwarded SIGINT/SIGTERM/SIGHUP/SIGQUIT,
/// SIGWINCH, ...) are for the VMM threads: their handlers may make calls the vCPU list
/// does not have (restoring the terminal), so a vCPU thread blocks them and the kernel
/// delivers them to another thread. The kick and fault signals stay deliverable.
fn block_host_signals() {
    const HOST: [libc::c_int; 12] = [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGWINCH,
        libc::SIGCHLD,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGALRM,
        libc::SIGCONT,
        libc::SIGURG,
        libc::SIGIO,
    ];
    // SAFETY: a sigset_t on the stack, filled by sigemptyset/sigaddset and read by
    // pthread_sigmask; only this thread's mask changes.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in HOST {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// The allowed system calls of `role` (names, and why each is there), for documentation
/// and tests.
pub fn allow_list(role: Role) -> Vec<(&'static str, &'static str)> {
    filters::allowed(role)
        .iter()
        .map(|a| (a.name(), a.why))
        .collect()
}

/// The name of x86_64 system call `nr`, when the report table knows it.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    sigsys::syscall_name(nr)
}
