//! `smolvm`: resume a machine.
//!
//! `smolvm run FILE [-- ARGS...]` resumes the machine in FILE (a
//! `.smolmachine` or a packed executable) and exits with the guest's exit
//! status. A packed executable (this binary with a machine appended) resumes
//! its own machine, passing all of its arguments on.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use smolvm::linux::run::RunOptions;
use smolvm::timing;

const USAGE: &str = concat!(
    "usage: smolvm run [--save OUT] FILE [-- ARGS...]\n",
    "       smolvm shell [--save OUT] FILE\n",
    "  run    Resume the machine in FILE (.smolmachine or packed executable) and run its\n",
    "         entrypoint with its cmd (or with ARGS after `--`) on this terminal's stdio;\n",
    "         exit with the command's status (128+N for signal N). FILE is never modified;\n",
    "         --save OUT writes the machine as it is at exit to OUT.\n",
    "  shell  Resume FILE and open an interactive shell (/bin/sh -l) in it.\n",
    "Environment: SMOLVM_TIMINGS=1 prints resume phase times to stderr; SMOLVM_LOG=debug|info|warn;\n",
    "SMOLVM_CONSOLE=1 copies the guest kernel log to stderr; SMOLVM_CACHE (default ~/.cache/smolvm)\n",
    "holds expanded copies of compressed machines."
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

/// Resume `path` and return the guest's exit status: a Linux machine runs
/// a command through its agent, the VMM test guest runs to its exit port.
fn run(path: &Path, opts: &RunOptions) -> Result<u8> {
    if is_linux_machine(path) {
        let code = smolvm::linux::run::run(path, opts)
            .with_context(|| format!("cannot run {}", path.display()))?;
        return Ok(code as u8);
    }
    run_test_guest(path)
}

/// Whether the machine's state holds a Linux guest (a damaged or unreadable
/// file goes the test-guest way, which reports why it cannot resume).
fn is_linux_machine(path: &Path) -> bool {
    smolvm_formats::MachineReader::open(path)
        .and_then(|r| r.read_blob(smolvm_formats::SectionKind::VmState))
        .ok()
        .and_then(|b| smolvm::snapshot::MachineState::from_bytes(&b).ok())
        .is_some_and(|s| s.devices.linux.is_some())
}

/// The VMM test guest: resume and run to its exit port.
fn run_test_guest(path: &Path) -> Result<u8> {
    let mut machine = smolvm::builder::resume(path)
        .with_context(|| format!("cannot resume {}", path.display()))?;
    machine.start()?;
    let reason = machine.run_to_exit()?;
    timing::mark("guest-stopped");
    drop(machine);
    timing::mark("machine-dropped");
    match reason {
        smolvm::vstate::vcpu::ExitReason::Exited(status) => Ok(status),
        smolvm::vstate::vcpu::ExitReason::Shutdown => {
            bail!("the guest shut down (triple fault or reset) without an exit status")
        }
        smolvm::vstate::vcpu::ExitReason::Halted => {
            bail!("the guest halted without an exit status")
        }
        smolvm::vstate::vcpu::ExitReason::Error(e) => bail!("{e}"),
    }
}

/// Parse `[--save OUT] FILE [-- ARGS...]` (`--save` may also follow FILE).
fn parse_run(args: &[String], shell: bool) -> Option<(PathBuf, RunOptions)> {
    let mut opts = RunOptions::default();
    let mut file = None;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--save" => {
                opts.save = Some(PathBuf::from(args.get(i + 1)?));
                i += 2;
            }
            "--" if !shell => {
                opts.args = Some(args[i + 1..].to_vec());
                break;
            }
            a if a.starts_with("--save=") => {
                opts.save = Some(PathBuf::from(&a["--save=".len()..]));
                i += 1;
            }
            a if file.is_none() && !a.starts_with('-') => {
                file = Some(PathBuf::from(a));
                i += 1;
            }
            _ => return None,
        }
    }
    if shell {
        opts.argv = Some(vec!["/bin/sh".into(), "-l".into()]);
    }
    Some((file?, opts))
}

/// When this executable carries a machine, its path.
fn packed_self() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let file = std::fs::File::open(&exe).ok()?;
    match smolvm_formats::trailer::locate(&file) {
        Ok(Some(_)) => Some(exe),
        _ => None,
    }
}

fn main() -> ExitCode {
    timing::start();
    init_logging();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = if let Some(exe) = packed_self() {
        let opts = RunOptions {
            args: (!args.is_empty()).then(|| args.clone()),
            ..Default::default()
        };
        run(&exe, &opts)
    } else {
        match args.first().map(String::as_str) {
            Some(cmd @ ("run" | "shell")) => match parse_run(&args[1..], cmd == "shell") {
                Some((file, opts)) => run(&file, &opts),
                None => {
                    eprintln!("{USAGE}");
                    return ExitCode::from(2);
                }
            },
            Some("--version" | "-V") => {
                println!("smolvm {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            Some("--help" | "-h") => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            eprintln!("smolvm: {e:#}");
            ExitCode::from(125)
        }
    }
}
