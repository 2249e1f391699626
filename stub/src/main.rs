//! `smolvm`: resume a machine.
//!
//! `smolvm run FILE [-- ARGS...]` resumes the machine in FILE (a
//! `.smolmachine` or a packed executable) and exits with the guest's exit
//! status. A packed executable (this binary with a machine appended) resumes
//! its own machine, passing all of its arguments on.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use smolvm::timing;

const USAGE: &str = "usage: smolvm run FILE [-- ARGS...]\n\
    Resume the machine in FILE (.smolmachine or packed executable) and exit with its status.\n\
    Environment: SMOLVM_TIMINGS=1 prints resume phase times to stderr; SMOLVM_LOG=debug|info|warn.";

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

/// Resume `path` and return the guest's exit status.
fn run(path: &Path, _guest_args: &[String]) -> Result<u8> {
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
        run(&exe, &args)
    } else {
        match args.first().map(String::as_str) {
            Some("run") => match args.get(1) {
                Some(file) if file != "--" => {
                    let rest = match args.get(2).map(String::as_str) {
                        Some("--") => &args[3..],
                        _ => &args[2..],
                    };
                    run(Path::new(file), rest)
                }
                _ => {
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
