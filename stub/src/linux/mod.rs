//! Linux guests: boot a kernel with the project's devices and agent, save
//! the whole machine (vCPUs, memory, devices, disk) into a `.smolmachine`,
//! and resume it without booting.
//!
//! ```no_run
//! # fn main() -> Result<(), smolvm::linux::LinuxError> {
//! use smolvm::linux::{boot_linux, resume_linux, LinuxConfig, ResumeOptions};
//! let mut m = boot_linux(LinuxConfig::new("vmlinux", "rootfs.ext4"))?;
//! let out = m.agent().run_capture(["echo", "hi"])?;
//! m.save("hello.smolmachine".as_ref(), &Default::default(), smolvm_formats::Compression::None)?;
//! m.shutdown();
//! let r = resume_linux("hello.smolmachine".as_ref(), ResumeOptions::default())?;
//! # let _ = (out, r); Ok(()) }
//! ```
//!
//! Boot and resume share the machine builder and the device manager's
//! attach helpers; they differ only in where memory, registers and device
//! state come from ([`devices::LinuxDevices`] attaches the devices for a
//! boot and gives a resume their host ends). After a resume the agent is sent `Resume`
//! (wall clock, fresh entropy) before anything else runs.

pub mod boot;
pub mod console;
pub mod devices;
pub mod disk;
pub mod publish;
pub mod run;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use smolvm_agent::client::{Client, ClientError, PendingResume};
use smolvm_agent::protocol::{QuiesceReport, WallClock};
use smolvm_formats::{Compression, MachineReader, MachineWriter, Manifest, SectionKind};

use crate::arch::cpu_model::CpuModel;
use crate::builder::{
    build_for_boot, build_from_snapshot_with, BootConfig, BuildError, SnapshotPlan,
};
use crate::devices::virtio::block::{CowDisk, DiskError};
use crate::devices::virtio::fs::{Server, ShareConfig};
use crate::host::HostProfile;
use crate::machine::{Machine, MachineError, RunEvent};
use crate::snapshot::Guest;
use crate::timing;
use crate::vstate::vcpu::ExitReason;

use console::{AgentBridge, ConsoleLog, ConsoleSink, KernelEnd, SocketSink};
use devices::{LinuxDevices, ROOT_DISK};

/// The agent's port in the guest: the name of port 0 of the multiport virtio console
/// (`/dev/vportNp0`, found by the agent in `/sys/class/virtio-ports/*/name`).
pub const AGENT_PORT: &str = crate::devices::virtio::console::AGENT_PORT_NAME;
/// Default guest memory.
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// Default wait for a booting guest's agent (PVM hosts boot in 30-120 s).
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Default wait for agent control requests (quiesce, resume, handshakes).
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(120);
/// Kernel log lines quoted in errors.
const TAIL_LINES: usize = 40;

/// Errors of Linux machines.
#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// The kernel image cannot be loaded.
    #[error("kernel {path}: {msg}")]
    Kernel { path: PathBuf, msg: String },
    /// The root filesystem image cannot be used.
    #[error("root disk: {0}")]
    Disk(#[from] DiskError),
    /// A bad configuration.
    #[error("invalid Linux machine configuration: {0}")]
    Config(String),
    /// A device could not be created or restored.
    #[error("device setup failed: {0}")]
    Device(String),
    /// The machine file has no Linux guest in it.
    #[error("{0} holds no Linux guest (it was not saved by a Linux machine)")]
    NotLinux(PathBuf),
    /// Reading or writing a machine file failed.
    #[error("machine file: {0}")]
    File(#[from] smolvm_formats::Error),
    /// The guest stopped, panicked or never became ready.
    #[error("{why}\n--- last kernel console lines ---\n{tail}\n--- end of console ---")]
    Guest { why: String, tail: String },
    /// The agent failed a request.
    #[error("guest agent: {0}")]
    Agent(#[from] ClientError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Too little room to expand a compressed machine into the cache.
    #[error(
        "not enough free space in {} to expand the machine: needs {needs_mib} MiB, \
         {free_mib} MiB free; free some space or set SMOLVM_CACHE to another directory",
        dir.display()
    )]
    NoSpace {
        dir: PathBuf,
        needs_mib: u64,
        free_mib: u64,
    },
    /// A port cannot be published (bad spec in the manifest, host port busy).
    #[error("{0}")]
    Publish(String),
}

impl From<crate::memory::MemoryError> for LinuxError {
    fn from(e: crate::memory::MemoryError) -> Self {
        LinuxError::Machine(MachineError::Memory(e))
    }
}

impl From<crate::hypervisor::HypervisorError> for LinuxError {
    fn from(e: crate::hypervisor::HypervisorError) -> Self {
        LinuxError::Machine(MachineError::Hypervisor(e))
    }
}

/// Which boot protocol enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BootProtocol {
    /// PVH when the kernel has the PVH note, else the 64-bit entry (the default).
    #[default]
    Auto,
    /// `startup_64` in long mode with the zero page.
    Linux64,
    /// The PVH entry (32-bit protected mode, `hvm_start_info`); the kernel
    /// must carry the PVH note.
    Pvh,
}

/// How to boot a Linux guest.
pub struct LinuxConfig {
    /// An uncompressed x86_64 `vmlinux` (ELF).
    pub kernel: PathBuf,
    /// The root filesystem image: only read; guest writes go to a private
    /// overlay.
    pub rootfs: PathBuf,
    /// vCPUs: must be 1 on PVM hosts.
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Mount the root read-only (the overlay still exists).
    pub read_only: bool,
    /// Extra kernel command-line options (appended last).
    pub extra_cmdline: String,
    /// Also copy the kernel log here (it is always kept as a tail).
    pub console: Option<ConsoleSink>,
    /// How long to wait for the agent to become ready.
    pub boot_timeout: Duration,
    /// How long agent control requests may take.
    pub agent_timeout: Duration,
    /// How to enter the kernel.
    pub boot_protocol: BootProtocol,
    /// The CPU model the guest is shown (default: the portable `x86-64`).
    pub cpu: CpuModel,
}

impl LinuxConfig {
    /// One vCPU, [`DEFAULT_MEMORY`], read-write root, default timeouts.
    pub fn new(kernel: impl Into<PathBuf>, rootfs: impl Into<PathBuf>) -> Self {
        LinuxConfig {
            kernel: kernel.into(),
            rootfs: rootfs.into(),
            vcpus: 1,
            memory_bytes: DEFAULT_MEMORY,
            read_only: false,
            extra_cmdline: String::new(),
            console: None,
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
            agent_timeout: DEFAULT_AGENT_TIMEOUT,
            boot_protocol: BootProtocol::Auto,
            cpu: CpuModel::default(),
        }
    }
}

/// How to resume a Linux machine.
pub struct ResumeOptions {
    /// Also copy the kernel log here.
    pub console: Option<ConsoleSink>,
    /// How long agent control requests may take (the resume itself too).
    pub agent_timeout: Duration,
    /// Check the memory and disk sections' checksums before the guest runs
    /// (hashes the stored bytes, in parallel with building the VM).
    pub verify: bool,
    /// Put the process under the system call filters just before the vCPUs start
    /// (`crate::seccomp::install`; `smolvm run` sets it).
    pub seccomp: bool,
    /// Host directories the machine's virtio-fs device serves (entry N of
    /// the device's root is share N; the agent mounts them, see
    /// [`LinuxMachine::mount_shares`]).
    pub shares: Vec<ShareConfig>,
    /// Give the guest the user-mode network (`--net`); the agent brings it up in
    /// [`LinuxMachine::net_up`]. `None`: the network slot stays empty.
    pub net: Option<crate::net::NetOptions>,
}

impl Default for ResumeOptions {
    fn default() -> Self {
        ResumeOptions {
            console: None,
            agent_timeout: DEFAULT_AGENT_TIMEOUT,
            verify: true,
            seccomp: false,
            shares: Vec::new(),
            net: None,
        }
    }
}

/// How a Linux machine ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinuxExit {
    /// The guest rebooted (`reboot`): the VM ends.
    Reboot,
    /// The guest powered off.
    PowerOff,
    /// The kernel panicked; the message has the console tail.
    Panic(String),
    /// Anything else (an emulation failure, a halt).
    Error(String),
}

/// A running (or paused) Linux guest with its agent connection.
pub struct LinuxMachine {
    // Field order is drop order: the client and bridge go before the machine.
    client: Client,
    watch: Option<StopWatch>,
    bridge: Option<AgentBridge>,
    devices: LinuxDevices,
    machine: Machine,
    log: Arc<ConsoleLog>,
    cmdline: String,
    quiesced: bool,
    /// The agent mounted host directory shares (unmounted before a save).
    shares_mounted: bool,
    /// The user-mode network's thread, when the run has one.
    network: Option<crate::net::stack::Network>,
    /// The agent brought the network card up (taken down before a save).
    net_up: bool,
}

impl LinuxMachine {
    /// Joins a built or restored machine to its agent and starts it, for boot and resume
    /// alike: the bridge pumps host bytes from `sockets.0` into the agent console, then
    /// `before_start` runs (the last set-up, e.g. installing the system call filters) and
    /// the vCPUs start; the stop watch (it ends waiting calls when the guest stops) and the
    /// client on `sockets.1` start their threads while the guest wakes. Nothing is lost by
    /// that order: what the agent sends meanwhile waits in the socket pair, and a guest that
    /// already stopped is seen by the watch's first look.
    fn connect_and_start(
        mut machine: Machine,
        devices: LinuxDevices,
        log: Arc<ConsoleLog>,
        cmdline: String,
        (vmm_end, client_end): (UnixStream, UnixStream),
        agent_timeout: Duration,
        before_start: impl FnOnce() -> Result<(), LinuxError>,
    ) -> Result<LinuxMachine, LinuxError> {
        let bridge = AgentBridge::start(vmm_end, devices.console.clone())?;
        before_start()?;
        machine.start()?;
        timing::mark("vcpus-started");
        let client = (|| -> Result<_, LinuxError> {
            let watch = StopWatch::start(machine.control(), client_end.try_clone()?)?;
            Ok((watch, Client::from_unix_stream(client_end)?))
        })();
        let (watch, client) = match client {
            Ok(c) => c,
            Err(e) => {
                // The vCPUs stop before the bridge goes, as in `Drop for LinuxMachine`.
                stop_vcpus(&mut machine);
                drop(bridge);
                return Err(e);
            }
        };
        client.set_timeout(Some(agent_timeout));
        Ok(LinuxMachine {
            client,
            watch: Some(watch),
            bridge: Some(bridge),
            devices,
            machine,
            log,
            cmdline,
            quiesced: false,
            shares_mounted: false,
            network: None,
            net_up: false,
        })
    }
}

fn wall_clock() -> WallClock {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    WallClock {
        secs: now.as_secs() as i64,
        nanos: now.subsec_nanos(),
    }
}

/// The fresh host entropy every `Resume` carries (at boot and at each resume), so no two
/// runs of one snapshot share their random state.
fn resume_entropy() -> std::io::Result<[u8; 64]> {
    let mut entropy = [0u8; 64];
    crate::devices::virtio::rng::host_random(&mut entropy)?;
    Ok(entropy)
}

/// A halted guest idles forever with interrupts off: end the machine when
/// the kernel says so.
fn end_on_halt(log: &ConsoleLog, machine: &Machine) {
    let control = machine.control();
    log.on_halt(Box::new(move || control.finish(ExitReason::Halted)));
}

/// Boot `cfg.kernel` with `cfg.rootfs` and wait until the agent is ready.
pub fn boot_linux(mut cfg: LinuxConfig) -> Result<LinuxMachine, LinuxError> {
    let profile = HostProfile::detect();
    if profile == HostProfile::KvmPvm && cfg.vcpus != 1 {
        return Err(LinuxError::Config(format!(
            "{} vCPUs asked for, but PVM hosts run Linux guests with one (its multi-CPU \
             paravirtual hypercalls do not complete there)",
            cfg.vcpus
        )));
    }
    let mut machine = build_for_boot(&BootConfig {
        vcpus: cfg.vcpus,
        memory_bytes: cfg.memory_bytes,
        pit: true,
        exit_port: None,
        cpu: cfg.cpu,
    })?;
    let disk = CowDisk::open(&cfg.rootfs)?;
    let log = ConsoleLog::new(cfg.console.take());
    end_on_halt(&log, &machine);
    let (vmm_end, client_end) = UnixStream::pair()?;
    let devices = LinuxDevices::attach(
        &mut machine,
        disk,
        cfg.read_only,
        log.clone(),
        SocketSink(vmm_end.try_clone()?),
    )?;
    let fragments = LinuxDevices::cmdline_fragments();
    let cmdline = boot::compose_cmdline(&boot::CmdlineParts {
        profile,
        devices: &fragments,
        root_rw: !cfg.read_only,
        agent_port: AGENT_PORT,
        extra: &cfg.extra_cmdline,
        cpu: cfg.cpu,
    })?;
    log::debug!("kernel command line: {cmdline}");
    machine.set_guest(Guest::Linux {
        cmdline: cmdline.clone(),
    });
    boot::load_and_enter(&mut machine, &cfg, &cmdline)?;
    let mut m = LinuxMachine::connect_and_start(
        machine,
        devices,
        log,
        cmdline,
        (vmm_end, client_end),
        cfg.agent_timeout,
        || Ok(()),
    )?;
    m.wait_first_ready(cfg.boot_timeout)?;
    // The host's clock and fresh entropy, as at every resume: an arm64 guest has no wall
    // clock of its own (no RTC in the device model; an x86_64 one reads kvmclock's), and a
    // build's setup steps must see the host's time on both.
    let entropy = resume_entropy()?;
    if let Err(e) = m.client.resume(wall_clock(), &entropy) {
        return Err(m.guest_error(format!(
            "cannot send the booted guest's agent its clock: {e}"
        )));
    }
    Ok(m)
}

/// Resume the Linux machine saved in `path` (a `.smolmachine` or a packed
/// executable; its memory and disk sections must be uncompressed, see
/// `smolvm run`, which expands compressed files into a cache first). The agent gets the host's clock and fresh
/// entropy before this returns.
pub fn resume_linux(path: &Path, opts: ResumeOptions) -> Result<LinuxMachine, LinuxError> {
    resume_linux_plan(SnapshotPlan::open(path)?, path, opts)
}

/// [`resume_linux`] of a machine already opened and validated (a packed
/// executable keeps the one descriptor of its own file); `path` only names it
/// in messages.
pub fn resume_linux_plan(
    plan: SnapshotPlan,
    path: &Path,
    opts: ResumeOptions,
) -> Result<LinuxMachine, LinuxError> {
    let (m, pending) = resume_linux_start(plan, path, opts)?;
    m.finish_resume(pending)?;
    Ok(m)
}

/// [`resume_linux_plan`] up to sending the agent its `Resume`, without waiting for the
/// answer: the caller sends its first command right behind it (the agent applies the clock
/// and entropy and drops the previous host's execs before it reads the next frame), then
/// calls [`LinuxMachine::finish_resume`].
pub fn resume_linux_start(
    plan: SnapshotPlan,
    path: &Path,
    opts: ResumeOptions,
) -> Result<(LinuxMachine, PendingResume), LinuxError> {
    let Guest::Linux { cmdline } = plan.state.guest.clone() else {
        return Err(LinuxError::NotLinux(path.to_owned()));
    };
    let file_len = plan.reader.file().metadata()?.len();
    let disk_layout = plan
        .reader
        .disks()?
        .into_iter()
        .find(|d| d.name == ROOT_DISK)
        .ok_or_else(|| {
            LinuxError::Device(format!("{} has no '{ROOT_DISK}' disk", path.display()))
        })?;
    // Damage in memory or disk data is found before the guest runs; the
    // hashing overlaps with creating the VM.
    let verifier = if opts.verify {
        let reader = MachineReader::from_file(
            plan.reader.file().try_clone()?,
            plan.reader.base(),
            plan.reader.len(),
        )?;
        let indexes: Vec<usize> = reader
            .sections()
            .iter()
            .filter(|s| matches!(s.kind, SectionKind::Memory | SectionKind::Disk))
            .map(|s| s.index)
            .collect();
        Some(std::thread::spawn(
            move || -> Result<(), smolvm_formats::Error> {
                for i in indexes {
                    reader.check_section(i)?;
                }
                Ok(())
            },
        ))
    } else {
        None
    };
    let file = Arc::new(plan.reader.file().try_clone()?);
    let base = disk::RunMapDisk::new(file, file_len, &disk_layout)
        .map_err(|e| LinuxError::Device(e.to_string()))?;
    let disk = CowDisk::from_disk_base(Box::new(base))?;
    let log = ConsoleLog::new(opts.console);
    let (vmm_end, client_end) = UnixStream::pair()?;
    let server = Server::new(&opts.shares).map_err(|e| LinuxError::Config(e.to_string()))?;
    let ends = LinuxDevices::host_ends(disk, log.clone(), SocketSink(vmm_end.try_clone()?), server);
    let mut machine = build_from_snapshot_with(plan, ends)?;
    let net_parts = if LinuxDevices::has_net_slot(&cmdline) {
        LinuxDevices::attach_net_slot(&mut machine, opts.net.is_some())?
    } else if opts.net.is_some() {
        return Err(LinuxError::Config(
            "this machine was built without a network slot: rebuild it with the current \
             smolpack to use --net"
                .into(),
        ));
    } else {
        None
    };
    let network = match (net_parts, opts.net) {
        (Some(parts), Some(net)) => Some(crate::net::stack::Network::start(parts, net)?),
        _ => None,
    };
    end_on_halt(&log, &machine);
    let devices = LinuxDevices::of(&machine)?;
    timing::mark("devices-restored");
    let seccomp = opts.seccomp;
    let mut m = LinuxMachine::connect_and_start(
        machine,
        devices,
        log,
        cmdline,
        (vmm_end, client_end),
        opts.agent_timeout,
        || {
            if let Some(v) = verifier {
                match v.join() {
                    Ok(r) => r?,
                    Err(_) => return Err(LinuxError::Device("checksum thread panicked".into())),
                }
                timing::mark("sections-verified");
            }
            if seccomp {
                crate::seccomp::install().map_err(|e| LinuxError::Config(e.to_string()))?;
                timing::mark("filters-installed");
            }
            Ok(())
        },
    )?;
    m.network = network;
    timing::mark("agent-connected");
    let entropy = resume_entropy()?;
    match m.client.resume_start(wall_clock(), &entropy) {
        Ok(pending) => Ok((m, pending)),
        Err(e) => Err(m.guest_error(format!(
            "cannot send the resumed guest's agent its clock: {e}"
        ))),
    }
}

impl LinuxMachine {
    /// Waits for the agent's answer to the `Resume` sent by [`resume_linux_start`].
    pub fn finish_resume(&self, pending: PendingResume) -> Result<(), LinuxError> {
        match self.client.resume_finish(pending) {
            Ok(report) => log::debug!("agent resumed: {report:?}"),
            Err(e) => {
                return Err(
                    self.guest_error(format!("the resumed guest's agent did not answer: {e}"))
                )
            }
        }
        timing::mark("agent-resumed");
        Ok(())
    }

    /// The agent client: run commands, quiesce, shut down.
    pub fn agent(&self) -> &Client {
        &self.client
    }

    /// The last lines of the kernel log.
    pub fn console_tail(&self) -> String {
        self.log.tail_lines(TAIL_LINES)
    }

    /// The kernel command line the guest booted with.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// The host profile this machine runs under.
    pub fn host_profile(&self) -> HostProfile {
        self.machine.host_profile()
    }

    fn guest_error(&self, why: String) -> LinuxError {
        LinuxError::Guest {
            why,
            tail: self.console_tail(),
        }
    }

    fn stopped_why(&self, reason: &ExitReason) -> String {
        match (self.log.kernel_end(), reason) {
            (KernelEnd::Panic, _) => "the guest kernel panicked".into(),
            (KernelEnd::PowerOff, _) => "the guest powered off".into(),
            (KernelEnd::Restart, _) => "the guest rebooted".into(),
            (_, ExitReason::Error(e)) => format!("the guest stopped: {e}"),
            (_, r) => format!("the guest stopped ({r:?})"),
        }
    }

    /// Wait for the agent's first `Ready`, then handshake. A guest that
    /// stops first (a panic resets it) ends the wait: the stop watch closes
    /// the agent connection.
    fn wait_first_ready(&mut self, timeout: Duration) -> Result<(), LinuxError> {
        if let Err(e) = self.client.wait_ready(timeout) {
            // A stop closes the connection just after it is recorded.
            if let Some(reason) = self.machine.control().outcome() {
                let why = format!("{} before its agent was ready", self.stopped_why(&reason));
                return Err(self.guest_error(why));
            }
            return Err(self.guest_error(match e {
                ClientError::Timeout(..) => format!(
                    "the guest's agent was not ready after {} s (is the virtio port {} the \
                     smolvm agent's port, and /sbin/init the agent?)",
                    timeout.as_secs(),
                    AGENT_PORT
                ),
                e => format!("the guest's agent failed before it was ready: {e}"),
            }));
        }
        self.client
            .handshake()
            .map_err(|e| self.guest_error(format!("agent handshake failed: {e}")))?;
        Ok(())
    }

    /// Ask the agent to sync, drop caches and hold new work (before a save).
    pub fn quiesce(&mut self) -> Result<QuiesceReport, LinuxError> {
        let r = self.client.quiesce()?;
        self.quiesced = true;
        Ok(r)
    }

    /// Have the agent mount the shares the machine was resumed with
    /// ([`ResumeOptions::shares`], in that order) at their guest paths
    /// (`paths[i]` for share `i`).
    pub fn mount_shares(&mut self, shares: &[(String, bool)]) -> Result<(), LinuxError> {
        if shares.is_empty() {
            return Ok(());
        }
        if self.machine.devices().virtio_fs().is_none() {
            return Err(LinuxError::Config(
                "this machine was built without host directory shares: rebuild it with the \
                 current smolpack"
                    .into(),
            ));
        }
        let mounts = shares
            .iter()
            .enumerate()
            .map(
                |(i, (path, read_only))| smolvm_agent::protocol::ShareMount {
                    index: i as u32,
                    path: path.clone(),
                    read_only: *read_only,
                },
            )
            .collect();
        self.shares_mounted = true;
        self.client.mount_shares(mounts).map_err(|e| match e {
            ClientError::Agent(why) => LinuxError::Config(format!("cannot mount a share: {why}")),
            e => e.into(),
        })
    }

    /// Have the agent bring the network card up (bind its driver, address, route, DNS),
    /// when the machine was resumed with a network.
    pub fn net_up(&mut self) -> Result<(), LinuxError> {
        if self.network.is_none() {
            return Ok(());
        }
        let config = smolvm_agent::protocol::NetConfig {
            address: crate::net::GUEST_IP.octets(),
            prefix: crate::net::PREFIX_LEN,
            gateway: crate::net::GATEWAY_IP.octets(),
            dns: crate::net::DNS_IP.octets(),
        };
        self.net_up = true;
        self.client.net_up(config).map_err(|e| match e {
            ClientError::Agent(why) => {
                LinuxError::Config(format!("cannot bring the network up: {why}"))
            }
            e => e.into(),
        })
    }

    /// Take the network away before a save: the agent unbinds the card's driver, the
    /// network thread stops (its connections are closed) and the slot is emptied, so the
    /// saved machine has no network card, whatever this run had.
    pub fn net_down(&mut self) -> Result<(), LinuxError> {
        if self.net_up {
            self.client.net_down().map_err(|e| match e {
                ClientError::Agent(why) => LinuxError::Config(format!(
                    "cannot save the machine: cannot take the network down: {why}"
                )),
                e => e.into(),
            })?;
            self.net_up = false;
        }
        if let Some(mut n) = self.network.take() {
            n.stop();
        }
        if let Some(slot) = self.machine.devices().net_slot() {
            let mut s = slot.lock().unwrap_or_else(|e| e.into_inner());
            if s.driver_active() {
                return Err(LinuxError::Config(
                    "cannot save the machine: the guest still drives the network card".into(),
                ));
            }
            s.clear();
        }
        Ok(())
    }

    /// Have the agent unmount the shares (a save does this first); refuses
    /// while files on a share are open.
    pub fn unmount_shares(&mut self) -> Result<(), LinuxError> {
        if !self.shares_mounted {
            return Ok(());
        }
        if let Some(why) = self.client.unmount_shares()? {
            return Err(LinuxError::Config(format!(
                "cannot save the machine: {why} (close them before the command exits)"
            )));
        }
        self.shares_mounted = false;
        Ok(())
    }

    /// Park the vCPUs.
    fn pause(&mut self) -> Result<(), LinuxError> {
        if !self.machine.is_running() {
            return Ok(());
        }
        match self.machine.pause()? {
            RunEvent::Paused => Ok(()),
            RunEvent::Stopped(reason) => {
                let why = self.stopped_why(&reason);
                Err(self.guest_error(why))
            }
        }
    }

    /// Save the whole machine to `path` atomically: quiesce the agent (if
    /// not done yet), pause (vCPUs, then devices: the agent bridge only
    /// buffers host input from here on), then write the manifest, state
    /// (vCPUs, VM, devices), memory and the merged root disk. The machine
    /// stays paused and quiesced: call [`LinuxMachine::unpause`] to go on
    /// (devices resume, then vCPUs), or drop it.
    pub fn save(
        &mut self,
        path: &Path,
        manifest: &Manifest,
        compression: Compression,
    ) -> Result<(), LinuxError> {
        self.unmount_shares()?;
        self.net_down()?;
        if !self.quiesced {
            self.quiesce()?;
        }
        self.pause()?;
        let mut manifest = manifest.clone();
        manifest.kernel_cmdline = self.cmdline.clone();
        let mut w = MachineWriter::create(path, crate::machine::HOST_ARCH)?;
        self.machine
            .write_snapshot(&mut w, &manifest, compression)?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut merged = tempfile::tempfile_in(dir).or_else(|_| tempfile::tempfile())?;
        self.devices.write_merged_disk(&merged)?;
        w.add_disk(ROOT_DISK, &mut merged, compression)?;
        w.finish()?;
        Ok(())
    }

    /// Start the vCPUs again after a save and release the agent's quiesce.
    pub fn unpause(&mut self) -> Result<(), LinuxError> {
        if !self.machine.is_running() {
            self.machine.start()?;
        }
        if self.quiesced {
            self.client.unquiesce()?;
            self.quiesced = false;
        }
        Ok(())
    }

    /// Wait until the guest ends (reboot, power-off, panic), at most
    /// `timeout`; `None` when it is still running then.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<LinuxExit>, LinuxError> {
        let Some(reason) = self.machine.control().wait_outcome(Some(timeout)) else {
            return Ok(None);
        };
        if self.machine.is_running() {
            self.machine.wait()?;
        }
        Ok(Some(match (self.log.kernel_end(), reason) {
            (KernelEnd::Panic, _) => LinuxExit::Panic(self.console_tail()),
            (KernelEnd::PowerOff, _) => LinuxExit::PowerOff,
            (KernelEnd::Restart, _) | (KernelEnd::None, ExitReason::Shutdown) => LinuxExit::Reboot,
            (_, ExitReason::Error(e)) => LinuxExit::Error(e),
            (_, r) => LinuxExit::Error(format!("{r:?}")),
        }))
    }

    /// Whether the guest has stopped.
    pub fn has_stopped(&self) -> bool {
        self.machine.control().outcome().is_some()
    }

    /// End the machine now (no guest shutdown: its disk overlay and memory
    /// are private, so nothing is lost that was not saved).
    pub fn shutdown(self) {
        drop(self);
    }
}

/// Closes the agent connection when the guest stops, so waiting client
/// calls fail (`Disconnected`) instead of waiting for a guest that is gone.
/// It waits on the run control's outcome; dropping the machine records one.
struct StopWatch {
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StopWatch {
    fn start(
        control: Arc<crate::vstate::vcpu::RunControl>,
        client_end: UnixStream,
    ) -> std::io::Result<StopWatch> {
        let thread = std::thread::Builder::new()
            .name("guest-watch".into())
            .spawn(move || {
                control.wait_outcome(None);
                let _ = client_end.shutdown(std::net::Shutdown::Both);
            })?;
        Ok(StopWatch {
            thread: Some(thread),
        })
    }
}

impl Drop for StopWatch {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LinuxMachine {
    fn drop(&mut self) {
        // Stop the vCPUs (the stop watch wakes too) before the bridge, so no
        // device writes to its socket as it closes.
        stop_vcpus(&mut self.machine);
        timing::mark("vcpus-stopped");
        self.watch.take();
        self.bridge.take();
        timing::mark("agent-closed");
    }
}

/// Records an end (a no-op when the guest already stopped) so the vCPUs stop, and
/// waits for them.
fn stop_vcpus(machine: &mut Machine) {
    machine
        .control()
        .finish(ExitReason::Error("machine shut down".into()));
    if machine.is_running() {
        let _ = machine.wait();
    }
}
