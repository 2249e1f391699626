//! `smolvm`: resume a machine.
//!
//! `smolvm run FILE [-- ARGS...]` resumes the machine in FILE (a
//! `.smolmachine` or a packed executable) and exits with the guest's exit
//! status. A packed executable (this binary with a machine appended) resumes
//! its own machine: before reading any argument it looks for the trailer at
//! the end of its own file, and when there is one every argument goes to the
//! machine's command untouched (less one leading `--`); the runtime then takes
//! its settings from `SMOLVM_*` environment variables only (docs/RUNTIME.md).

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use smolvm::builder::SnapshotPlan;
use smolvm::linux::publish::{parse_publish, parse_publish_list};
use smolvm::linux::run::{parse_volume, parse_volume_list, RunOptions};
use smolvm::net::{parse_allow, parse_allow_list};
use smolvm::snapshot::Guest;
use smolvm::timing;
use smolvm_agent::protocol::ExitStatus;
use smolvm_formats::signature::PublicKey;
use smolvm_formats::MachineReader;

/// Exit status when smolvm itself fails (as `docker run` and `env` do).
const VMM_ERROR: u8 = 125;

const USAGE: &str = concat!(
    "usage: smolvm run [--save OUT] [-v HOST:GUEST[:ro|:rw]]... [-p SPEC]... [--net[=off]]\n",
    "                  [--net-allow HOST|CIDR[:PORT]]... [--trust PUB]... FILE|REF [-- ARGS...]\n",
    "       smolvm shell [--save OUT] [-v HOST:GUEST[:ro|:rw]]... [--trust PUB]... FILE\n",
    "  run    Resume the machine in FILE (.smolmachine or packed executable) and run its\n",
    "         entrypoint with its cmd (or with ARGS after `--`) on this terminal's stdio;\n",
    "         exit with the command's status. FILE is never modified;\n",
    "         --save OUT writes the machine as it is at exit to OUT;\n",
    "         -v HOST:GUEST[:ro|:rw] shares the host directory HOST at GUEST\n",
    "         (read-only unless :rw; repeatable);\n",
    "         -p [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp] forwards connections to the host port\n",
    "         (127.0.0.1 unless HOST_IP) to the guest's 127.0.0.1:GUEST_PORT (repeatable);\n",
    "         --net gives the guest outbound TCP/UDP and DNS through the VMM (gateway\n",
    "         10.0.2.2 = host 127.0.0.1); --net-allow HOST|CIDR[:PORT] (repeatable, implies\n",
    "         --net) allows only those destinations (replacing the machine's [network]\n",
    "         allow list); --net=off: no network even when the Smolfile's [network] is on;\n",
    "         --trust PUB runs FILE only when it is signed by that key (`smolpack sign`).\n",
    "         REF (REGISTRY/NAME:TAG or @sha256:..., not an existing path) is pulled by\n",
    "         `smolpack pull --cache` into ~/.cache/smolvm/machines and run from there.\n",
    "  shell  Resume FILE and open an interactive shell (/bin/sh -l) in it.\n",
    "A packed executable (`smolpack pack`) is this program with a machine appended: it\n",
    "resumes that machine and gives the command ALL of its arguments (SMOLVM_HELP=1 shows\n",
    "its own help).\n",
    "\n",
    "Environment:\n",
    "  SMOLVM_SAVE=PATH        packed executables only: save the machine as it is when the\n",
    "                          command ends to PATH (like `run --save`; `run` ignores it)\n",
    "  SMOLVM_VOLUME=H:G[:rw],...  packed executables only: share host directories\n",
    "                          (like `run -v`; `run` ignores it)\n",
    "  SMOLVM_PUBLISH=8080:80,...  packed executables only: publish ports (like `run -p`;\n",
    "                          `run` ignores it)\n",
    "  SMOLVM_NET=1|0          packed executables only: the network on (like `run --net`)\n",
    "                          or off (like `run --net=off`)\n",
    "  SMOLVM_NET_ALLOW=SPEC,...  packed executables only: like `run --net-allow`\n",
    "  SMOLVM_TIMINGS=1        print resume phase times to stderr\n",
    "  SMOLVM_LOG=LEVEL        error, warn (default), info, debug or off\n",
    "  SMOLVM_CONSOLE=1        copy the guest kernel log to stderr\n",
    "  SMOLVM_CACHE=DIR        where compressed machines are expanded (default ~/.cache/smolvm)\n",
    "  SMOLVM_KVM_DEVICE=PATH  the KVM device node (default /dev/kvm)\n",
    "  SMOLVM_IGNORE_HOST_PROFILE=1  try a machine built on hardware KVM on a PVM host anyway\n",
    "  SMOLVM_SECCOMP=0        debugging only: run without the system call filters\n",
    "  SMOLVM_HELP=1           in a packed executable: print its help instead of running\n",
    "  SMOLVM_TRUST=PUB[:PUB]  run only machines signed by one of these public keys\n",
    "  SMOLVM_TRUST_DIR=DIR    trusted keys (*.pub) instead of /etc/smolvm/trust.d\n",
    "  SMOLVM_SMOLPACK=PATH    the smolpack that pulls REF (default: beside smolvm, or PATH)\n",
    "\n",
    "Exit status: the command's (the test guest's status byte); 128+N when signal N ended\n",
    "it; 127 when it could not start; 125 when smolvm failed; 2 for a usage error;\n",
    "killed by SIGSYS when smolvm made a system call its filter forbids (a bug).\n",
    "Details: docs/RUNTIME.md."
);

struct StderrLogger(log::LevelFilter);

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= self.0
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!(
                "smolvm: {}: {}",
                r.level().as_str().to_lowercase(),
                r.args()
            );
        }
    }
    fn flush(&self) {}
}

fn init_logging() {
    let level = match std::env::var("SMOLVM_LOG").as_deref() {
        Ok("debug") => log::LevelFilter::Debug,
        Ok("info") => log::LevelFilter::Info,
        Ok("error") => log::LevelFilter::Error,
        Ok("off") => log::LevelFilter::Off,
        _ => log::LevelFilter::Warn,
    };
    let logger = Box::leak(Box::new(StderrLogger(level)));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

/// A machine to run and what to call it in messages.
struct Target {
    reader: MachineReader,
    /// The file as the user knows it (FILE, or the packed executable's path).
    name: PathBuf,
}

/// How the machine's command or guest ended.
enum Ended {
    /// Nothing ran (help was printed).
    Nothing,
    /// The guest's command ended (Linux).
    Command(ExitStatus),
    /// The test guest wrote its status byte.
    TestGuest(u8),
}

impl Ended {
    fn code(&self) -> u8 {
        match *self {
            Ended::Nothing => 0,
            Ended::Command(s) => smolvm::linux::run::exit_code(s) as u8,
            Ended::TestGuest(s) => s,
        }
    }
}

/// Resume the machine and return how its command ended: a Linux machine
/// runs a command through its agent, the VMM test guest runs to its exit port.
fn run(plan: SnapshotPlan, name: &Path, opts: &RunOptions) -> Result<Ended> {
    match plan.state.guest {
        // Starts compiling its system call filters itself, once it knows the network.
        Guest::Linux { .. } => {
            let status = smolvm::linux::run::run(plan, name, opts)?;
            Ok(Ended::Command(status))
        }
        Guest::TestGuest if !opts.volumes.is_empty() => {
            anyhow::bail!("the VMM test guest cannot mount shared directories (no -v for it)")
        }
        Guest::TestGuest => {
            // The filters compile while the machine is built; they go on just before it runs.
            smolvm::seccomp::prepare();
            run_test_guest(plan, opts.save.as_deref()).map(Ended::TestGuest)
        }
    }
}

/// The VMM test guest: resume, copy its console to stdout, run to its exit
/// port, then save it when asked to.
fn run_test_guest(plan: SnapshotPlan, save: Option<&Path>) -> Result<u8> {
    let manifest = plan.manifest.clone();
    // Memory is mapped without being read, so check its checksums first (a
    // test guest's memory is a few pages).
    for s in plan.reader.sections() {
        if s.kind == smolvm_formats::SectionKind::Memory {
            plan.reader.check_section(s.index)?;
        }
    }
    let mut machine = smolvm::builder::build_from_snapshot(plan)?;
    // The test guest in machine files is the x86_64 one; aarch64 runs its
    // own with `smolvm testguest` (no machine file of that kind exists there).
    #[cfg(target_arch = "x86_64")]
    {
        smolvm::testguest::attach_console(&mut machine, Box::new(std::io::stdout()))?;
        smolvm::testguest::ignore_reports(&mut machine)?;
    }
    smolvm::seccomp::install()?;
    timing::mark("filters-installed");
    machine.start()?;
    let reason = machine.run_to_exit()?;
    timing::mark("guest-stopped");
    let status = match reason {
        smolvm::vstate::vcpu::ExitReason::Exited(status) => status,
        smolvm::vstate::vcpu::ExitReason::Shutdown => {
            bail!("the guest shut down (triple fault or reset) without an exit status")
        }
        smolvm::vstate::vcpu::ExitReason::Halted => {
            bail!("the guest halted without an exit status")
        }
        smolvm::vstate::vcpu::ExitReason::Error(e) => bail!("{e}"),
    };
    if let Some(out) = save {
        machine
            .save(out, &manifest, smolvm_formats::Compression::None)
            .with_context(|| format!("cannot save the machine to {}", out.display()))?;
        timing::mark("machine-saved");
    }
    drop(machine);
    timing::mark("machine-dropped");
    Ok(status)
}

/// Arguments for the guest's command, which takes UTF-8 strings.
fn utf8_args(args: Vec<OsString>) -> Result<Vec<String>> {
    args.into_iter()
        .enumerate()
        .map(|(i, a)| {
            a.into_string().map_err(|a| {
                anyhow!(
                    "argument {} ({}) is not valid UTF-8, which the machine's command needs",
                    i + 1,
                    a.to_string_lossy()
                )
            })
        })
        .collect()
}

/// `smolvm run`'s arguments.
#[derive(Debug)]
struct RunArgs {
    file: PathBuf,
    opts: RunOptions,
    /// `--trust PUB` key files.
    trust: Vec<PathBuf>,
}

/// Parse `[--save OUT] [-v SPEC]... [--trust PUB]... FILE [-- ARGS...]` (options may also follow FILE).
/// `Ok(None)` is a usage error.
fn parse_run(args: &[OsString], shell: bool) -> Result<Option<RunArgs>> {
    let mut opts = RunOptions::default();
    let mut trust = Vec::new();
    let mut file = None;
    // --net / --net=on, --net=off, and the --net-allow rules, combined at the end.
    let (mut net_on, mut net_off, mut net_rules) = (false, false, Vec::new());
    let mut i = 0;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        match a.as_ref() {
            "--trust" => {
                let Some(k) = args.get(i + 1) else {
                    return Ok(None);
                };
                trust.push(PathBuf::from(k));
                i += 2;
            }
            "--save" => {
                let Some(out) = args.get(i + 1) else {
                    return Ok(None);
                };
                opts.save = Some(PathBuf::from(out));
                i += 2;
            }
            "-v" | "--volume" => {
                let Some(spec) = args.get(i + 1) else {
                    return Ok(None);
                };
                opts.volumes
                    .push(parse_volume(&spec.to_string_lossy()).map_err(anyhow::Error::msg)?);
                i += 2;
            }
            "-p" | "--publish" => {
                let Some(spec) = args.get(i + 1) else {
                    return Ok(None);
                };
                opts.ports
                    .push(parse_publish(&spec.to_string_lossy()).map_err(anyhow::Error::msg)?);
                i += 2;
            }
            "--net" | "--net=on" => {
                net_on = true;
                i += 1;
            }
            "--net=off" => {
                net_off = true;
                i += 1;
            }
            s if s.starts_with("--net=") => {
                anyhow::bail!("bad {s}: expected --net, --net=on or --net=off");
            }
            "--net-allow" => {
                let Some(spec) = args.get(i + 1) else {
                    return Ok(None);
                };
                net_rules.push(parse_allow(&spec.to_string_lossy()).map_err(anyhow::Error::msg)?);
                i += 2;
            }
            s if s.starts_with("--net-allow=") => {
                net_rules
                    .push(parse_allow(&s["--net-allow=".len()..]).map_err(anyhow::Error::msg)?);
                i += 1;
            }
            s if s.starts_with("--publish=") => {
                opts.ports
                    .push(parse_publish(&s["--publish=".len()..]).map_err(anyhow::Error::msg)?);
                i += 1;
            }
            s if s.starts_with("--volume=") => {
                let spec = &s["--volume=".len()..];
                opts.volumes
                    .push(parse_volume(spec).map_err(anyhow::Error::msg)?);
                i += 1;
            }
            "--" if !shell => {
                opts.args = Some(utf8_args(args[i + 1..].to_vec())?);
                break;
            }
            s if s.starts_with("--save=") => {
                use std::os::unix::ffi::OsStrExt;
                let bytes = &args[i].as_bytes()["--save=".len()..];
                opts.save = Some(PathBuf::from(std::ffi::OsStr::from_bytes(bytes)));
                i += 1;
            }
            s if file.is_none() && !s.starts_with('-') => {
                file = Some(PathBuf::from(&args[i]));
                i += 1;
            }
            _ => return Ok(None),
        }
    }
    opts.net = smolvm::net::NetRequest::from_flags(net_on, net_off, net_rules, "--net=off")
        .map_err(anyhow::Error::msg)?;
    if shell {
        opts.argv = Some(vec!["/bin/sh".into(), "-l".into()]);
    }
    Ok(file.map(|file| RunArgs { file, opts, trust }))
}

/// Directory of trusted public keys when `SMOLVM_TRUST_DIR` is not set.
const SYSTEM_TRUST_DIR: &str = "/etc/smolvm/trust.d";

/// The trusted public keys: `--trust` files, `SMOLVM_TRUST` (paths separated by `:`) and
/// every `*.pub` file in `SMOLVM_TRUST_DIR` (default /etc/smolvm/trust.d; absent means
/// none). Any of them unreadable or malformed is an error: a trust setting never silently
/// turns into no check.
fn trusted_keys(cli: &[PathBuf]) -> Result<Vec<PublicKey>> {
    let mut paths: Vec<PathBuf> = cli.to_vec();
    if let Some(v) = std::env::var_os("SMOLVM_TRUST").filter(|v| !v.is_empty()) {
        paths.extend(std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()));
    }
    let dir = std::env::var_os("SMOLVM_TRUST_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(SYSTEM_TRUST_DIR));
    match std::fs::read_dir(&dir) {
        Ok(entries) => {
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "pub"))
                .collect();
            found.sort();
            paths.extend(found);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("cannot read the trust directory {}: {e}", dir.display()),
    }
    paths
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read trusted key {}", p.display()))?;
            PublicKey::parse(&text).with_context(|| format!("trusted key {}", p.display()))
        })
        .collect()
}

/// With trusted keys configured, refuse a machine that is not signed by one of them, before
/// any of its memory is mapped (this reads and hashes the whole stored machine once).
///
/// `attached`: for `smolvm run REF`, the signatures attached to the machine in the registry
/// (a JSON array written by `smolpack pull --cache --signatures`). A machine that carries no
/// signature by a trusted key inside runs when one of them, by a trusted key, covers the
/// file's exact bytes (this hashes the whole file once more; docs/DISTRIBUTION.md).
fn check_trust(reader: &MachineReader, trust: &[PathBuf], attached: Option<&Path>) -> Result<()> {
    use smolvm_formats::signature::{verify_attached, AttachedSignature};
    use smolvm_formats::Error as E;
    let keys = trusted_keys(trust)?;
    if keys.is_empty() {
        return Ok(());
    }
    let inside = smolvm_formats::signature::verify_signature(reader, &keys);
    match (inside, attached) {
        (Ok(_), _) => {}
        (Err(e @ (E::Unsigned | E::UntrustedKey(_))), Some(path)) => {
            let text = std::fs::read(path)
                .with_context(|| format!("cannot read attached signatures {}", path.display()))?;
            let sigs = AttachedSignature::parse_list(&text).unwrap_or_default();
            verify_attached(reader.file(), &sigs, &keys).map_err(|why| {
                anyhow!("refusing to run it: {e}; and its attached signatures: {why}")
            })?;
        }
        (Err(e), _) => return Err(anyhow::Error::new(e).context("refusing to run it")),
    }
    timing::mark("signature-verified");
    Ok(())
}

/// This executable's own machine, when it carries one. `/proc/self/exe` is
/// opened once and that descriptor is kept: the trailer, header and section
/// table are checked on it, and memory and disk are mapped from it, so a
/// file renamed or replaced on disk meanwhile cannot mix two machines.
fn packed_self() -> Result<Option<Target>, smolvm_formats::Error> {
    let Ok(file) = File::open("/proc/self/exe") else {
        return Ok(None);
    };
    let Some(t) = smolvm_formats::trailer::locate(&file)? else {
        return Ok(None);
    };
    timing::mark("trailer-found");
    let reader = MachineReader::from_file(file, t.payload_offset, t.payload_len)?;
    Ok(Some(Target {
        reader,
        name: self_name(),
    }))
}

/// Whether this program was started under its own name (`smolvm`, as
/// installed), rather than as a renamed copy.
fn invoked_as_smolvm() -> bool {
    let name = std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_os_string()));
    !matches!(name, Some(n) if n != "smolvm")
}

/// The path of this executable, for messages.
fn self_name() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("this executable"))
}

/// `SMOLVM_SAVE` of a packed executable, refused early when it names the
/// executable itself (saving would replace the program with a bare machine).
fn save_target(exe: &File) -> Result<Option<PathBuf>> {
    let Some(p) = std::env::var_os("SMOLVM_SAVE").filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let p = PathBuf::from(p);
    use std::os::unix::fs::MetadataExt;
    if let (Ok(target), Ok(me)) = (std::fs::metadata(&p), exe.metadata()) {
        if target.dev() == me.dev() && target.ino() == me.ino() {
            bail!(
                "SMOLVM_SAVE names this executable itself ({}): save to another file",
                p.display()
            );
        }
    }
    Ok(Some(p))
}

fn packed_help(target: &Target) -> String {
    let m = target.reader.manifest().unwrap_or_default();
    let mut command = m.entrypoint.clone();
    command.extend(m.cmd.iter().cloned());
    format!(
        "{name} is a smolvm packed executable: running it resumes the machine inside it\n\
         (\"{machine}\") and runs the machine's command with all of its arguments, which\n\
         replace the machine's default arguments (none are read by smolvm).\n\
         Command: {command}\n\n\
         {env}",
        name = target.name.display(),
        machine = m.name,
        command = if command.is_empty() {
            "(none: give one as arguments)".to_string()
        } else {
            command.join(" ")
        },
        env = &USAGE[USAGE.find("Environment:").unwrap_or(0)..],
    )
}

/// The machine's arguments from a packed executable's own: all of them, less
/// one leading `--` (`./app -- cmd` runs `cmd`, as `docker run IMAGE -- cmd`
/// does; `./app -- -- x` passes `-- x`; `./app --` runs the default command).
fn packed_args(mut args: Vec<OsString>) -> Vec<OsString> {
    if args.first().is_some_and(|a| a == "--") {
        args.remove(0);
    }
    args
}

/// Run this executable's machine with its arguments (see [`packed_args`]).
fn run_packed(target: Target) -> Result<Ended> {
    timing::mark("machine-opened");
    if std::env::var_os("SMOLVM_HELP").is_some_and(|v| !v.is_empty() && v != "0") {
        println!("{}", packed_help(&target));
        return Ok(Ended::Nothing);
    }
    let save = save_target(target.reader.file())?;
    check_trust(&target.reader, &[], None)
        .with_context(|| format!("cannot run {}", target.name.display()))?;
    let volumes = match std::env::var("SMOLVM_VOLUME") {
        Ok(list) => parse_volume_list(&list).map_err(anyhow::Error::msg)?,
        Err(std::env::VarError::NotPresent) => Vec::new(),
        Err(_) => anyhow::bail!("SMOLVM_VOLUME is not valid UTF-8"),
    };
    let ports = match std::env::var("SMOLVM_PUBLISH") {
        Ok(list) => parse_publish_list(&list).map_err(anyhow::Error::msg)?,
        Err(std::env::VarError::NotPresent) => Vec::new(),
        Err(_) => anyhow::bail!("SMOLVM_PUBLISH is not valid UTF-8"),
    };
    let net = packed_net()?;
    let name = target.name;
    let plan = SnapshotPlan::from_reader(target.reader)
        .with_context(|| format!("cannot resume {}", name.display()))?;
    let args = packed_args(std::env::args_os().skip(1).collect());
    let opts = RunOptions {
        args: match plan.state.guest {
            Guest::Linux { .. } if !args.is_empty() => Some(utf8_args(args)?),
            Guest::Linux { .. } | Guest::TestGuest => None,
        },
        save,
        volumes,
        ports,
        net,
        ..Default::default()
    };
    run(plan, &name, &opts)
}

/// `SMOLVM_NET=1|0` and `SMOLVM_NET_ALLOW=SPEC,...` of a packed executable (the second
/// implies the first; `SMOLVM_NET=0` turns off a machine's `[network]` default).
fn packed_net() -> Result<smolvm::net::NetRequest> {
    let (on, off) = match std::env::var("SMOLVM_NET") {
        Ok(v) if v.is_empty() => (false, false),
        Ok(v) if v == "0" => (false, true),
        Ok(v) if v == "1" => (true, false),
        Ok(v) => anyhow::bail!("bad SMOLVM_NET '{v}': expected 1 or 0"),
        Err(std::env::VarError::NotPresent) => (false, false),
        Err(_) => anyhow::bail!("SMOLVM_NET is not valid UTF-8"),
    };
    let rules = match std::env::var("SMOLVM_NET_ALLOW") {
        Ok(list) => parse_allow_list(&list).map_err(anyhow::Error::msg)?,
        Err(std::env::VarError::NotPresent) => Vec::new(),
        Err(_) => anyhow::bail!("SMOLVM_NET_ALLOW is not valid UTF-8"),
    };
    smolvm::net::NetRequest::from_flags(on, off, rules, "SMOLVM_NET=0").map_err(anyhow::Error::msg)
}

/// `smolvm run` / `smolvm shell`; `packed` is set when FILE turns out to be
/// a packed executable.
fn run_file(
    file: &Path,
    opts: &RunOptions,
    trust: &[PathBuf],
    attached: Option<&Path>,
    packed: &mut bool,
) -> Result<Ended> {
    let reader =
        MachineReader::open(file).with_context(|| format!("cannot run {}", file.display()))?;
    timing::mark("machine-opened");
    *packed = reader.trailer().is_some();
    check_trust(&reader, trust, attached)
        .with_context(|| format!("cannot run {}", file.display()))?;
    let plan = SnapshotPlan::from_reader(reader)
        .with_context(|| format!("cannot resume {}", file.display()))?;
    run(plan, file, opts).with_context(|| format!("cannot run {}", file.display()))
}

/// Why `smolvm run REF` could not get the machine.
enum PullError {
    /// `smolpack pull` failed and printed its one line.
    Reported,
    /// smolpack could not be started or said nothing usable.
    Other(anyhow::Error),
}

/// The `smolpack` that pulls references: `SMOLVM_SMOLPACK`, else the one beside this
/// executable, else `smolpack` on `PATH`.
fn smolpack_path() -> PathBuf {
    if let Some(p) = std::env::var_os("SMOLVM_SMOLPACK").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(beside) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("smolpack")))
        .filter(|p| p.is_file())
    {
        return beside;
    }
    PathBuf::from("smolpack")
}

/// `smolvm run REF`: a FILE argument that is not an existing path but reads as a registry
/// reference (`smolvm_formats::reference`) is pulled into the content-addressed machine cache
/// by `smolpack pull --cache REF`, which prints the cached file's path; that file is then run
/// as any other. The stub has no HTTP or TLS client of its own (docs/DISTRIBUTION.md).
/// `Ok(None)`: FILE is a path, run it as it is. With `signatures` (trusted keys are
/// configured), smolpack also fetches the machine's attached signatures and prints the file
/// it wrote them to on a second line, returned beside the machine's path.
fn pull_reference(file: &Path, signatures: bool) -> Result<Option<Pulled>, PullError> {
    if file.symlink_metadata().is_ok() {
        return Ok(None);
    }
    let Some(reference) = file
        .to_str()
        .filter(|s| smolvm_formats::reference::looks_like_reference(s))
    else {
        return Ok(None);
    };
    let smolpack = smolpack_path();
    let mut cmd = std::process::Command::new(&smolpack);
    cmd.args(["pull", "--cache", "--for-smolvm"]);
    if signatures {
        cmd.arg("--signatures");
    }
    let out = cmd
        .arg(reference)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| {
            PullError::Other(anyhow!(
                "cannot pull {reference}: cannot start {} ({e}); install smolpack beside smolvm, \
                 on PATH, or name it in SMOLVM_SMOLPACK",
                smolpack.display()
            ))
        })?;
    if !out.status.success() {
        return Err(PullError::Reported);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines().map(PathBuf::from);
    let path = lines.next();
    let attached = lines.next();
    let Some(path) = path.filter(|p| p.is_file() && lines.next().is_none()) else {
        return Err(PullError::Other(anyhow!(
            "cannot pull {reference}: {} printed no cached file",
            smolpack.display()
        )));
    };
    if attached.is_some() && !signatures {
        return Err(PullError::Other(anyhow!(
            "cannot pull {reference}: {} printed more than the cached file",
            smolpack.display()
        )));
    }
    timing::mark("reference-pulled");
    Ok(Some(Pulled { path, attached }))
}

/// A machine `smolpack pull --cache` put in the cache, and its attached signatures' file.
struct Pulled {
    path: PathBuf,
    attached: Option<PathBuf>,
}

/// Which file an error is about, for [`describe`].
enum Subject<'a> {
    /// This packed executable.
    Packed(&'a Path),
    /// `smolvm run FILE`; `packed` when FILE is a packed executable.
    File { path: &'a Path, packed: bool },
    /// No file (bad arguments).
    None,
}

/// The error as one line: each cause once (a cause whose text an outer
/// message already quotes is left out), and damage said plainly.
fn describe(e: &anyhow::Error, subject: &Subject<'_>) -> String {
    for cause in e.chain() {
        let packed = matches!(
            subject,
            Subject::Packed(_) | Subject::File { packed: true, .. }
        );
        let Some(detail) = cause
            .downcast_ref::<smolvm_formats::Error>()
            .and_then(|f| damage(f, matches!(subject, Subject::Packed(_))))
        else {
            continue;
        };
        let fix = if packed {
            "pack it again"
        } else {
            "rebuild it"
        };
        return match subject {
            Subject::Packed(p) => format!(
                "{} is damaged ({detail}); re-download it or {fix}",
                p.display()
            ),
            Subject::File { path, .. } => format!(
                "cannot run {}: the file is damaged ({detail}); re-download it or {fix}",
                path.display()
            ),
            Subject::None => format!("damaged file ({detail})"),
        };
    }
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

/// What is wrong, when a format error means the bytes are damaged (rather
/// than unsupported, missing or unreadable).
fn damage(e: &smolvm_formats::Error, packed: bool) -> Option<String> {
    use smolvm_formats::Error as E;
    match e {
        E::ChecksumMismatch(what) => Some(format!("checksum mismatch in {what}")),
        E::Corrupt(what) => Some(what.clone()),
        E::TooLarge { what, len, cap } => {
            Some(format!("{what} is {len} bytes, over the {cap}-byte limit"))
        }
        E::MissingSection(what) => Some(format!("it has no {what} section")),
        // The trailer points at the payload: anything else there is damage.
        E::NotAMachine(_) if packed => Some("the payload is not a machine".into()),
        E::Io { context, source } if source.kind() == std::io::ErrorKind::UnexpectedEof => {
            Some(format!("{context}: the file ends early"))
        }
        _ => None,
    }
}

pub(crate) fn main() -> ExitCode {
    timing::start();
    // Before any argument is read: does this executable carry a machine?
    let packed = packed_self();
    init_logging();
    let exe;
    let file;
    let mut file_packed = false;
    let (result, subject) = match packed {
        Ok(Some(target)) => {
            exe = target.name.clone();
            (run_packed(target), Subject::Packed(&exe))
        }
        Err(e) => {
            exe = self_name();
            (Err(anyhow::Error::new(e)), Subject::Packed(&exe))
        }
        Ok(None) => {
            let args: Vec<OsString> = std::env::args_os().skip(1).collect();
            match args.first().and_then(|a| a.to_str()) {
                Some(cmd @ ("run" | "shell")) => match parse_run(&args[1..], cmd == "shell") {
                    Ok(Some(a)) => {
                        // Attached signatures are fetched only when they can matter.
                        let want_sigs = trusted_keys(&a.trust).map_or(true, |k| !k.is_empty());
                        let mut attached = None;
                        file = match pull_reference(&a.file, want_sigs) {
                            Ok(Some(pulled)) => {
                                attached = pulled.attached;
                                pulled.path
                            }
                            Ok(None) => a.file,
                            // smolpack has said why, in one `smolvm:` line.
                            Err(PullError::Reported) => return ExitCode::from(VMM_ERROR),
                            Err(PullError::Other(e)) => {
                                eprintln!("smolvm: {}", describe(&e, &Subject::None));
                                return ExitCode::from(VMM_ERROR);
                            }
                        };
                        let r = run_file(
                            &file,
                            &a.opts,
                            &a.trust,
                            attached.as_deref(),
                            &mut file_packed,
                        );
                        (
                            r,
                            Subject::File {
                                path: &file,
                                packed: file_packed,
                            },
                        )
                    }
                    Ok(None) => {
                        eprintln!("{USAGE}");
                        return ExitCode::from(2);
                    }
                    Err(e) => (Err(e), Subject::None),
                },
                Some("--version" | "-V") => {
                    println!("smolvm {}", env!("CARGO_PKG_VERSION"));
                    return ExitCode::SUCCESS;
                }
                Some("--help" | "-h" | "help") => {
                    println!("{USAGE}");
                    return ExitCode::SUCCESS;
                }
                _ if !invoked_as_smolvm() => {
                    // Under another name and without a trailer: a packed
                    // executable that lost its machine (`strip`, a truncated
                    // copy), not someone asking for smolvm's usage.
                    exe = self_name();
                    let e = anyhow!(
                        "{} has no machine in it (no trailer: was the file stripped?); \
                         re-download it or pack it again",
                        exe.display()
                    );
                    (Err(e), Subject::None)
                }
                _ => {
                    eprintln!("{USAGE}");
                    return ExitCode::from(2);
                }
            }
        }
    };
    match result {
        Ok(ended) => ExitCode::from(ended.code()),
        Err(e) => {
            eprintln!("smolvm: {}", describe(&e, &subject));
            ExitCode::from(VMM_ERROR)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smolvm_formats::Error as E;

    fn line(e: anyhow::Error, packed: bool) -> String {
        let path = Path::new("/x/app");
        if packed {
            describe(&e, &Subject::Packed(path))
        } else {
            describe(
                &e,
                &Subject::File {
                    path,
                    packed: false,
                },
            )
        }
    }

    #[test]
    fn damage_is_said_plainly() {
        let e = anyhow::Error::new(E::ChecksumMismatch("header and section table".into()));
        assert_eq!(
            line(e, true),
            "/x/app is damaged (checksum mismatch in header and section table); re-download it or pack it again"
        );
        let e =
            anyhow::Error::new(E::Corrupt("file is truncated".into())).context("cannot run /x/app");
        assert_eq!(
            line(e, false),
            "cannot run /x/app: the file is damaged (file is truncated); re-download it or rebuild it"
        );
    }

    #[test]
    fn other_errors_keep_their_words_once() {
        // A cause quoted by its wrapper (thiserror `{0}` plus `#[source]`) appears once.
        #[derive(Debug, thiserror::Error)]
        #[error("machine file: {0}")]
        struct Wrap(#[source] E);
        let e = anyhow::Error::new(Wrap(E::UnsupportedArch(9))).context("cannot resume f");
        let s = line(e, false);
        assert_eq!(
            s,
            "cannot resume f: machine file: unknown guest architecture code 9; upgrade smolvm"
        );
        let e = anyhow::Error::new(E::TrailerMissing);
        assert!(line(e, false).contains("`strip` removed the payload"));
    }

    #[test]
    fn packed_arguments_lose_one_leading_double_dash() {
        let a = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(packed_args(a(&["--", "ls", "-l"])), a(&["ls", "-l"]));
        assert_eq!(packed_args(a(&["--", "--", "x"])), a(&["--", "x"]));
        assert_eq!(packed_args(a(&["--"])), a(&[]));
        assert_eq!(packed_args(a(&["ls", "--", "x"])), a(&["ls", "--", "x"]));
        assert_eq!(packed_args(a(&["--help"])), a(&["--help"]));
        assert_eq!(packed_args(a(&[])), a(&[]));
    }

    #[test]
    fn net_flags_parse() {
        let a = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        use smolvm::net::NetRequest;
        let net = |v: &[&str]| parse_run(&a(v), false).map(|r| r.unwrap().opts.net);
        assert_eq!(net(&["m"]).unwrap(), NetRequest::Default);
        assert_eq!(net(&["--net", "m"]).unwrap(), NetRequest::On);
        assert_eq!(net(&["m", "--net=on"]).unwrap(), NetRequest::On);
        assert_eq!(net(&["--net=off", "m"]).unwrap(), NetRequest::Off);
        let err = net(&["--net=maybe", "m"]).unwrap_err().to_string();
        assert_eq!(
            err,
            "bad --net=maybe: expected --net, --net=on or --net=off"
        );
        for v in [
            &["--net=off", "--net", "m"][..],
            &["--net=off", "--net-allow", "127.0.0.1", "m"][..],
        ] {
            let err = net(v).unwrap_err().to_string();
            assert!(
                err == "--net=off: the network cannot be both off and on (drop the off, \
                        or the other network options)",
                "{err}"
            );
        }
        let o = parse_run(
            &a(&["--net-allow", "127.0.0.1:80", "m", "--net-allow=10.0.0.0/8"]),
            false,
        )
        .unwrap()
        .unwrap()
        .opts;
        let NetRequest::Allow(rules) = o.net else {
            panic!("{:?}", o.net)
        };
        let rules: Vec<String> = rules.iter().map(|r| r.to_string()).collect();
        assert_eq!(rules, ["127.0.0.1/32:80", "10.0.0.0/8"]);
        assert!(parse_run(&a(&["m", "--net-allow"]), false)
            .unwrap()
            .is_none());
        let err = parse_run(&a(&["--net-allow", "x", "m"]), false)
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with("bad --net-allow 'x'") && !err.contains('\n'));
    }

    #[test]
    fn run_arguments_parse() {
        let a = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let r = parse_run(
            &a(&["m", "--save", "o", "--trust", "k.pub", "--", "--help", "--"]),
            false,
        )
        .unwrap()
        .unwrap();
        let (f, o) = (r.file, r.opts);
        assert_eq!(r.trust, vec![PathBuf::from("k.pub")]);
        assert!(parse_run(&a(&["m", "--trust"]), false).unwrap().is_none());
        assert_eq!(f, PathBuf::from("m"));
        assert_eq!(o.save, Some(PathBuf::from("o")));
        assert_eq!(o.args, Some(vec!["--help".to_string(), "--".to_string()]));
        assert!(parse_run(&a(&["--bogus", "m"]), false).unwrap().is_none());
        assert!(parse_run(&a(&["--save"]), false).unwrap().is_none());
        assert!(parse_run(&a(&["m", "-v"]), false).unwrap().is_none());
        let dir = std::env::temp_dir();
        let spec = format!("{}:/src:rw", dir.display());
        let o = parse_run(&a(&["-v", &spec, "m", "--volume=/:/host"]), false)
            .unwrap()
            .unwrap()
            .opts;
        assert_eq!(o.volumes.len(), 2);
        let p = parse_run(
            &a(&["-p", "8080:80", "m", "--publish=0.0.0.0:9090:90/tcp"]),
            false,
        )
        .unwrap()
        .unwrap()
        .opts;
        let ports: Vec<String> = p.ports.iter().map(|x| x.to_string()).collect();
        assert_eq!(ports, ["127.0.0.1:8080:80", "0.0.0.0:9090:90"]);
        assert!(parse_run(&a(&["m", "-p"]), false).unwrap().is_none());
        let err = parse_run(&a(&["-p", "80", "m"]), false).err().unwrap();
        assert!(err.to_string().starts_with("bad port mapping '80'"));
        assert_eq!(o.volumes[0].guest, "/src");
        assert!(!o.volumes[0].read_only && o.volumes[1].read_only);
        for bad in [
            "/tmp",
            "/tmp:src",
            "/tmp:/",
            "/tmp:/a/../b",
            "/nonexistent-dir-x:/a",
            "/tmp:/a:rx",
        ] {
            let err = parse_run(&a(&["-v", bad, "m"]), false)
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("bad volume") && !err.contains('\n'),
                "{bad}: {err}"
            );
        }
        use std::os::unix::ffi::OsStringExt;
        let bad = vec![
            OsString::from("m"),
            OsString::from("--"),
            OsString::from_vec(vec![0xff, b'x']),
        ];
        let err = parse_run(&bad, false).err().unwrap().to_string();
        assert!(err.contains("argument 1") && err.contains("UTF-8"), "{err}");
    }
}
