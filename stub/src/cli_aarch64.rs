//! `smolvm` on aarch64 Linux, first slice: the VMM test guest on KVM.
//!
//! ```text
//! smolvm testguest [--report-every N] [--limit N] [--status S]
//!                  [--save-at K --save FILE] [--resume FILE]
//! ```
//! Runs the test guest (`testguest_aarch64`) to its exit and exits with its
//! status; with `--save-at K --save FILE` it stops right after the guest's
//! K-th report instead, writes the machine to FILE and exits 0; `--resume
//! FILE` goes on from such a file. Exit status: the guest's; 125 when the
//! VMM failed; 2 for a usage error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use smolvm::testguest_aarch64::{self as tg, Outcome, Params, TestGuest};
use smolvm::vstate::vcpu::ExitReason;

const USAGE: &str = "usage: smolvm testguest [--report-every N] [--limit N] [--status S] [--save-at K --save FILE] [--resume FILE]";

struct Args {
    params: Params,
    save_at: Option<u64>,
    save: Option<PathBuf>,
    resume: Option<PathBuf>,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut a = Args {
        params: Params {
            report_every: 1000,
            limit: 10_000,
            exit_status: 0,
        },
        save_at: None,
        save: None,
        resume: None,
    };
    let mut it = args.iter();
    match it.next().map(String::as_str) {
        Some("testguest") => {}
        _ => return Err(USAGE.into()),
    }
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} wants a value"));
        let num = |v: &String| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: not a number: {v}"))
        };
        match flag.as_str() {
            "--report-every" => a.params.report_every = num(value()?)?,
            "--limit" => a.params.limit = num(value()?)?,
            "--status" => {
                let v = value()?;
                a.params.exit_status = v
                    .parse()
                    .map_err(|_| format!("--status: 0 to 255, got {v}"))?
            }
            "--save-at" => a.save_at = Some(num(value()?)?),
            "--save" => a.save = Some(PathBuf::from(value()?)),
            "--resume" => a.resume = Some(PathBuf::from(value()?)),
            _ => return Err(format!("unknown argument {flag}\n{USAGE}")),
        }
    }
    if a.save_at.is_some() != a.save.is_some() {
        return Err("--save-at and --save go together".into());
    }
    Ok(a)
}

fn run(a: &Args) -> Result<u8, String> {
    let t0 = Instant::now();
    let mut guest = match &a.resume {
        Some(path) => {
            let saved = tg::read_state(path).map_err(|e| e.to_string())?;
            TestGuest::resume(&saved).map_err(|e| e.to_string())?
        }
        None => TestGuest::boot(&a.params, a.save_at).map_err(|e| e.to_string())?,
    };
    let t_ready = t0.elapsed();
    let outcome = guest.run().map_err(|e| e.to_string())?;
    let t_run = t0.elapsed() - t_ready;
    let reports = guest.reports.lock().map(|r| r.clone()).unwrap_or_default();
    for r in &reports {
        if r.checksum != r.memory_checksum || r.checksum != tg::expected_checksum(r.counter) {
            return Err(format!(
                "report at counter {} has a wrong checksum",
                r.counter
            ));
        }
    }
    eprintln!(
        "testguest: {} reports (last counter {}), ready in {:.1} ms, ran {:.1} ms",
        reports.len(),
        reports.last().map_or(0, |r| r.counter),
        t_ready.as_secs_f64() * 1e3,
        t_run.as_secs_f64() * 1e3
    );
    match outcome {
        Outcome::Paused => {
            let path = a.save.as_ref().ok_or("paused without --save")?;
            let t = Instant::now();
            let saved = guest.save().map_err(|e| e.to_string())?;
            tg::write_state(path, &saved).map_err(|e| e.to_string())?;
            eprintln!(
                "testguest: saved at counter {} ({} registers, {} GIC distributor words) in {:.1} ms",
                reports.last().map_or(0, |r| r.counter),
                saved.vcpu.regs.len(),
                saved.gic.dist.len(),
                t.elapsed().as_secs_f64() * 1e3
            );
            Ok(0)
        }
        Outcome::Stopped(ExitReason::Exited(s)) => Ok(s),
        Outcome::Stopped(other) => Err(format!("the guest stopped: {other:?}")),
    }
}

pub(crate) fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a = match parse(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("smolvm: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&a) {
        Ok(s) => ExitCode::from(s),
        Err(e) => {
            eprintln!("smolvm: {e}");
            ExitCode::from(125)
        }
    }
}
