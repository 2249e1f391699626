//! `smolpack build`: Smolfile → root filesystem → booted guest → setup steps → services →
//! quiesce → pause → `.smolmachine`.
//!
//! The output is written by the atomic machine writer (temporary file, fsync, rename), and
//! only after every step succeeded: a failed or killed build leaves no output file and never
//! replaces an existing one. Scratch files (the root filesystem image) live in a locked
//! scratch directory beside the output, removed when the build ends either way; after a
//! kill, the next build to that directory (or `smolpack gc`) removes it and the output's
//! temp file (see [`crate::gc`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use smolvm::arch::cpu_model::CpuModel;
use smolvm::linux::{boot_linux, LinuxConfig, LinuxError, LinuxExit, LinuxMachine};
use smolvm_formats::{Compression, Manifest};

use crate::artifacts::{self, Artifact, ArtifactError};
use crate::gc::{self, ScratchDir};
use crate::guest::{self, display_command, GuestError, ServicePaths};
use crate::progress::{format_duration, format_size, LineSplitter, Printer, Progress};
use crate::smolfile::{Smolfile, SmolfileError};

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The Smolfile.
    pub smolfile: PathBuf,
    /// The `.smolmachine` to write.
    pub output: PathBuf,
    /// The guest kernel; found by [`artifacts::locate`] when `None`.
    pub kernel: Option<PathBuf>,
    /// The guest agent; found by [`artifacts::locate`] when `None`.
    pub agent: Option<PathBuf>,
    /// Store memory and disk zstd-compressed (smaller file, slower resume: a compressed
    /// machine cannot be mapped in place).
    pub compress: bool,
    /// Show the guest kernel's console while booting.
    pub verbose: bool,
    /// The CPU model the guest is shown, over the Smolfile's `cpu` (default `x86-64`).
    pub cpu: Option<CpuModel>,
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Smolfile(#[from] SmolfileError),
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    // Causes are part of each message (not `source()`), so a printed chain says them once.
    #[error("cannot write {}: {error}", path.display())]
    Output {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("building the root filesystem: {0}")]
    Rootfs(smolvm_rootfs::Error),
    #[error("booting the machine: {0}")]
    Boot(LinuxError),
    #[error("{at}: setup step {error}{stopped}")]
    Setup {
        at: String,
        error: GuestError,
        stopped: MachineEnd,
    },
    #[error("{at}: {error}{stopped}")]
    Service {
        at: String,
        error: GuestError,
        stopped: MachineEnd,
    },
    #[error("{at}: warm = ...: {error}{stopped}")]
    Warm {
        at: String,
        error: GuestError,
        stopped: MachineEnd,
    },
    #[error("saving the machine: {0}")]
    Save(LinuxError),
}

/// How the machine ended when a guest step failed because it stopped under the step (whose
/// own error, such as "agent connection lost", does not say); empty while it still runs.
// Boxed: it rides in three `BuildError` variants, which must stay small.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MachineEnd(pub Option<Box<String>>);

impl MachineEnd {
    /// Reads `machine`'s end, if it has one (no waiting: a lost agent connection is the
    /// result of the recorded end, so it is there by the time the step fails).
    pub fn of(machine: &mut LinuxMachine) -> MachineEnd {
        MachineEnd(match machine.wait_exit(Duration::ZERO) {
            Ok(Some(end)) => Some(Box::new(describe_end(&end))),
            Ok(None) => None,
            Err(e) => Some(Box::new(e.to_string())),
        })
    }
}

impl std::fmt::Display for MachineEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(how) => write!(
                f,
                " (the machine stopped: {how}; rerun with -v to see its console)"
            ),
            None => Ok(()),
        }
    }
}

/// One line for how a guest ended.
fn describe_end(end: &LinuxExit) -> String {
    match end {
        LinuxExit::Reboot => "the guest rebooted".into(),
        LinuxExit::PowerOff => "the guest powered off".into(),
        LinuxExit::Panic(tail) => match tail.lines().rev().find(|l| l.contains("Kernel panic")) {
            Some(line) => format!("the guest kernel panicked: {}", line.trim()),
            None => "the guest kernel panicked".into(),
        },
        LinuxExit::Error(why) => why.clone(),
    }
}

/// Time spent in each phase of a build.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Phases {
    pub rootfs: Duration,
    pub boot: Duration,
    pub setup: Duration,
    pub services: Duration,
    pub save: Duration,
}

/// What a successful build produced.
#[derive(Debug, Clone)]
pub struct BuildReport {
    /// The machine file.
    pub output: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Wall time of the whole build.
    pub total: Duration,
    /// Wall time per phase.
    pub phases: Phases,
    /// Guest pid of each service, by name.
    pub service_pids: BTreeMap<String, u32>,
}

impl BuildReport {
    /// `built OUT: 12.3 MiB in 58.2s (rootfs 1.2s, boot 41.0s, ...)`.
    pub fn summary(&self) -> String {
        let p = &self.phases;
        format!(
            "built {}: {} in {} (rootfs {}, boot {}, setup {}, services {}, save {})",
            self.output.display(),
            format_size(self.size),
            format_duration(self.total),
            format_duration(p.rootfs),
            format_duration(p.boot),
            format_duration(p.setup),
            format_duration(p.services),
            format_duration(p.save),
        )
    }
}

/// The manifest of a machine built from `sf`. The kernel command line is filled in by the
/// save itself; the services' build-time pids go into `extra` as `service.NAME.pid`.
pub fn manifest(
    sf: &Smolfile,
    host_profile: &str,
    created: SystemTime,
    service_pids: &BTreeMap<String, u32>,
) -> Manifest {
    let mut extra = BTreeMap::new();
    for (name, pid) in service_pids {
        extra.insert(format!("service.{name}.pid"), pid.to_string());
    }
    // `[[volume]]`: the runtime reads these (docs/RUNTIME.md, shared directories).
    for (i, v) in sf.volumes.iter().enumerate() {
        extra.insert(format!("volume.{i}.path"), v.path.clone());
        extra.insert(
            format!("volume.{i}.mode"),
            if v.read_only { "ro" } else { "rw" }.into(),
        );
        if let Some(h) = &v.host {
            extra.insert(format!("volume.{i}.host"), h.clone());
        }
    }
    // `[[port]]`: published by default at run time (docs/RUNTIME.md, published ports).
    for (i, p) in sf.ports.iter().enumerate() {
        extra.insert(format!("port.{i}"), p.spec());
    }
    // `[network]`: the run's default network (docs/RUNTIME.md, network).
    if let Some(allow) = &sf.network {
        extra.insert("network".into(), "on".into());
        if !allow.is_empty() {
            extra.insert("network.allow".into(), allow.join(","));
        }
    }
    // `[run] warm`: informational (the agent decides which run gets the warm process).
    if let Some(w) = &sf.run.warm {
        let mode = match w.kind {
            crate::smolfile::WarmKind::Stdin => "stdin",
            crate::smolfile::WarmKind::Invoke => "invoke",
        };
        extra.insert("run.warm".into(), mode.into());
    }
    Manifest {
        name: sf.name.clone(),
        created_unix_s: created
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
        producer: format!("smolpack {}", env!("CARGO_PKG_VERSION")),
        vcpus: sf.resources.vcpus,
        memory_bytes: sf.resources.memory,
        entrypoint: sf.run.entrypoint.clone(),
        cmd: sf.run.cmd.clone(),
        env: sf.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        workdir: sf.run.workdir.clone().unwrap_or_else(|| "/".into()),
        kernel_cmdline: String::new(),
        host_profile: host_profile.to_string(),
        cpu: sf.resources.cpu.name().to_string(),
        extra,
    }
}

/// Extra kernel command-line options for `sf`: the guest's hostname is the machine's name,
/// then `$SMOLVM_EXTRA_CMDLINE` (for debugging a guest, e.g. `print-fatal-signals=1`).
pub fn extra_cmdline(sf: &Smolfile) -> String {
    let mut line = format!("smolvm.hostname={}", sf.name);
    if let Ok(extra) = std::env::var("SMOLVM_EXTRA_CMDLINE") {
        if !extra.trim().is_empty() {
            line.push(' ');
            line.push_str(extra.trim());
        }
    }
    line
}

/// The phases a build of `sf` shows: rootfs, boot, each setup step, each service, save.
pub fn step_count(sf: &Smolfile) -> usize {
    3 + sf.setup.len() + sf.services.len() + usize::from(sf.run.warm.is_some())
}

/// Builds the machine described by `opts.smolfile` into `opts.output`.
pub fn build(opts: &BuildOptions) -> Result<BuildReport, BuildError> {
    let started = Instant::now();
    let mut sf = Smolfile::load(&opts.smolfile)?;
    let at = |line: usize| format!("{}:{line}", opts.smolfile.display());
    let kernel = artifacts::locate(Artifact::Kernel, opts.kernel.as_deref())?;
    let agent = artifacts::locate(Artifact::Agent, opts.agent.as_deref())?;
    let out_err = |error| BuildError::Output {
        path: opts.output.clone(),
        error,
    };
    if opts.output.is_dir() {
        return Err(out_err(std::io::Error::other(
            "it is a directory; name a file such as app.smolmachine",
        )));
    }
    let out_dir = match opts.output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&out_dir).map_err(out_err)?;
    // What killed builds of this output left: their temp files (their scratch directories
    // go below), so a finished build leaves the directory clean.
    smolvm_formats::atomic::remove_leftovers_of(&opts.output);
    // Scratch space beside the output: this also proves the directory is writable before
    // the slow part starts.
    let scratch = ScratchDir::create(&out_dir, gc::BUILD_PREFIX).map_err(out_err)?;

    let mut progress = Progress::new(step_count(&sf));
    let mut phases = Phases::default();

    // Root filesystem.
    progress.step("rootfs", &base_label(&sf));
    let rootfs = scratch.path().join("rootfs.ext4");
    let info = match smolvm_rootfs::build(&sf.rootfs_spec(&agent), &rootfs) {
        Ok(info) => info,
        Err(e) => {
            progress.failed();
            return Err(BuildError::Rootfs(e));
        }
    };
    if let Some(image) = &info.oci_config {
        sf.apply_image_defaults(image);
    }
    phases.rootfs = progress.done_with(&format!(
        "{} files, {} content, {} disk",
        info.entries,
        format_size(info.content_bytes),
        format_size(info.size)
    ));

    // Boot.
    progress.step("boot", &format!("{}", kernel.display()));
    let mut cfg = LinuxConfig::new(&kernel, &rootfs);
    cfg.vcpus = sf.resources.vcpus;
    cfg.memory_bytes = sf.resources.memory;
    cfg.cpu = opts.cpu.unwrap_or(sf.resources.cpu);
    cfg.extra_cmdline = extra_cmdline(&sf);
    if opts.verbose {
        cfg.console = Some(Box::new(ConsoleLines {
            printer: progress.printer(),
            split: LineSplitter::default(),
        }));
    }
    let mut machine = match boot_linux(cfg) {
        Ok(m) => m,
        Err(e) => {
            progress.failed();
            return Err(BuildError::Boot(e));
        }
    };
    phases.boot = progress.done_with(&format!(
        "{} vCPU, {}",
        sf.resources.vcpus,
        format_size(sf.resources.memory)
    ));

    // Setup steps.
    for step in &sf.setup {
        progress.step("setup", &display_command(&step.run));
        match guest::run_setup_step(machine.agent(), step, &sf.env, &progress) {
            Ok(()) => phases.setup += progress.done(),
            Err(error) => {
                progress.failed();
                return Err(BuildError::Setup {
                    at: at(step.line),
                    error,
                    stopped: MachineEnd::of(&mut machine),
                });
            }
        }
    }

    // Services.
    let paths = ServicePaths::default();
    let mut service_pids = BTreeMap::new();
    for svc in &sf.services {
        progress.step(
            "service",
            &format!("{}: {}", svc.name, display_command(&svc.run)),
        );
        match guest::start_service(machine.agent(), svc, &sf.env, &paths, &progress) {
            Ok(pid) => {
                service_pids.insert(svc.name.clone(), pid);
                phases.services += progress.done_with(&format!("ready, pid {pid}"));
            }
            Err(error) => {
                progress.failed();
                return Err(BuildError::Service {
                    at: at(svc.line),
                    error,
                    stopped: MachineEnd::of(&mut machine),
                });
            }
        }
    }

    // The warm entrypoint, last: nothing else runs between it and the snapshot.
    let mut warm_pid = None;
    if let Some(warm) = &sf.run.warm {
        progress.step("warm", &display_command(&sf.run.argv(&[])));
        match guest::start_warm(machine.agent(), &sf.run, &sf.env, warm) {
            Ok(pid) => {
                warm_pid = Some(pid);
                phases.services += progress.done_with(&format!("waiting, pid {pid}"));
            }
            Err(error) => {
                progress.failed();
                return Err(BuildError::Warm {
                    at: at(warm.line),
                    error,
                    stopped: MachineEnd::of(&mut machine),
                });
            }
        }
    }

    // Snapshot.
    progress.step("save", &format!("{}", opts.output.display()));
    let profile = machine.host_profile();
    let mut manifest = manifest(&sf, profile.as_str(), SystemTime::now(), &service_pids);
    if let Some(pid) = warm_pid {
        manifest
            .extra
            .insert("run.warm.pid".into(), pid.to_string());
    }
    let compression = if opts.compress {
        Compression::Zstd
    } else {
        Compression::None
    };
    if let Err(e) = machine.save(&opts.output, &manifest, compression) {
        progress.failed();
        return Err(BuildError::Save(e));
    }
    machine.shutdown();
    let size = std::fs::metadata(&opts.output).map_err(out_err)?.len();
    phases.save = progress.done_with(&format_size(size));
    progress.finish();
    drop(scratch);

    Ok(BuildReport {
        output: opts.output.clone(),
        size,
        total: started.elapsed(),
        phases,
        service_pids,
    })
}

/// `busybox`, `debian bookworm + python3, curl`, `oci images/redis.tar`, `dir rootfs/`.
fn base_label(sf: &Smolfile) -> String {
    use smolvm_rootfs::Base;
    let base = match &sf.base {
        Base::Busybox => "busybox".to_string(),
        Base::Debian { suite, packages } if packages.is_empty() => format!("debian {suite}"),
        Base::Debian { suite, packages } => format!("debian {suite} + {}", packages.join(", ")),
        Base::Oci { archive } => format!("oci {}", short_path(archive, &sf.dir)),
        Base::Dir { path } => format!("dir {}", short_path(path, &sf.dir)),
    };
    match sf.copies.len() {
        0 => base,
        1 => format!("{base}, 1 copy"),
        n => format!("{base}, {n} copies"),
    }
}

fn short_path(p: &Path, dir: &Path) -> String {
    p.strip_prefix(dir).unwrap_or(p).display().to_string()
}

/// Kernel console bytes → lines above the progress display.
struct ConsoleLines {
    printer: Printer,
    split: LineSplitter,
}

impl Write for ConsoleLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for line in self.split.push(buf) {
            self.printer.line(&format!("  | {line}"));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_machine_is_named_in_the_step_error() {
        let panic = LinuxExit::Panic(
            "[    1.0] something\n[    1.1] Kernel panic - not syncing: Attempted to kill init!\n[    1.2] ---[ end ]---".into(),
        );
        assert_eq!(
            describe_end(&panic),
            "the guest kernel panicked: [    1.1] Kernel panic - not syncing: Attempted to kill init!"
        );
        assert_eq!(describe_end(&LinuxExit::PowerOff), "the guest powered off");
        assert_eq!(MachineEnd(None).to_string(), "");
        assert_eq!(
            MachineEnd(Some(Box::new(describe_end(&LinuxExit::Reboot)))).to_string(),
            " (the machine stopped: the guest rebooted; rerun with -v to see its console)"
        );
    }

    fn hello() -> Smolfile {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello/Smolfile");
        Smolfile::load(&path).unwrap()
    }

    #[test]
    fn manifest_from_the_example() {
        let sf = hello();
        let created = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let pids = BTreeMap::from([("web".to_string(), 42)]);
        let m = manifest(&sf, "kvm-pvm", created, &pids);
        assert_eq!(m.name, "hello");
        assert_eq!(m.created_unix_s, 1_700_000_000);
        assert!(m.producer.starts_with("smolpack "), "{}", m.producer);
        assert_eq!(m.vcpus, 1);
        assert_eq!(m.memory_bytes, 256 << 20);
        assert!(m.entrypoint.is_empty());
        assert_eq!(m.cmd, sf.run.argv(&[]));
        assert_eq!(
            m.env,
            [("GREETING".to_string(), "hello from smolvm".to_string())]
        );
        assert_eq!(m.workdir, "/");
        assert_eq!(m.host_profile, "kvm-pvm");
        assert_eq!(m.extra["service.web.pid"], "42");
        // The manifest is valid for the format.
        assert!(m.to_json().is_ok());
    }

    #[test]
    fn manifest_defaults_and_entrypoint() {
        let dir = tempfile::tempdir().unwrap();
        let sf = Smolfile::parse(
            "name = \"m\"\n[base]\ntype = \"busybox\"\n[run]\nentrypoint = [\"/bin/echo\"]\n",
            dir.path(),
            "Smolfile",
        )
        .unwrap();
        let m = manifest(&sf, "kvm", UNIX_EPOCH, &BTreeMap::new());
        assert_eq!(m.entrypoint, ["/bin/echo"]);
        assert!(m.cmd.is_empty() && m.env.is_empty() && m.extra.is_empty());
        assert_eq!(m.workdir, "/");
    }

    #[test]
    fn manifest_records_the_network_section() {
        let dir = tempfile::tempdir().unwrap();
        let base = "name = \"m\"\n[base]\ntype = \"busybox\"\n";
        let m = |text: &str| {
            let sf = Smolfile::parse(&format!("{base}{text}"), dir.path(), "Smolfile").unwrap();
            manifest(&sf, "kvm", UNIX_EPOCH, &BTreeMap::new()).extra
        };
        assert!(!m("").contains_key("network"));
        assert!(!m("[network]\nenabled = false\n").contains_key("network"));
        let all = m("[network]\n");
        assert_eq!(all["network"], "on");
        assert!(!all.contains_key("network.allow"));
        let some = m("[network]\nallow = [\"127.0.0.1:8080\", \"10.0.0.0/8\"]\n");
        assert_eq!(some["network"], "on");
        assert_eq!(some["network.allow"], "127.0.0.1:8080,10.0.0.0/8");
    }

    #[test]
    fn steps_and_labels() {
        let sf = hello();
        // rootfs, boot, 1 setup, 1 service, warm (greet), save.
        assert_eq!(step_count(&sf), 6);
        assert_eq!(base_label(&sf), "busybox, 2 copies");
        assert!(extra_cmdline(&sf).starts_with("smolvm.hostname=hello"));
    }

    #[test]
    fn warm_failures_name_the_warm_line() {
        let e = BuildError::Warm {
            at: "app/Smolfile:14".into(),
            error: GuestError::Warm(
                "the warm entrypoint `/app/filter` did not block reading its stdin within 2m00s"
                    .into(),
            ),
            stopped: MachineEnd(None),
        };
        assert_eq!(
            e.to_string(),
            "app/Smolfile:14: warm = ...: the warm entrypoint `/app/filter` did not block \
             reading its stdin within 2m00s"
        );
    }

    #[test]
    fn summary_names_every_phase() {
        let r = BuildReport {
            output: "out.smolmachine".into(),
            size: 3 << 20,
            total: Duration::from_millis(61_500),
            phases: Phases {
                rootfs: Duration::from_millis(900),
                boot: Duration::from_secs(40),
                setup: Duration::from_millis(1200),
                services: Duration::from_millis(2500),
                save: Duration::from_millis(700),
            },
            service_pids: BTreeMap::new(),
        };
        assert_eq!(
            r.summary(),
            "built out.smolmachine: 3.0 MiB in 1m01s (rootfs 900ms, boot 40.0s, setup 1.2s, \
             services 2.5s, save 700ms)"
        );
    }
}
