//! Drive the VMM test guest by hand and from the benchmark script (a
//! development tool, not installed with smolvm).
//!
//! ```text
//! testguest boot     [--every N] [--limit L] [--status S]
//! testguest snapshot OUT --at K [--exit-after N] [--every N] [--limit L] [--status S]
//! testguest resume   FILE
//! ```
//! `boot` and `resume` print each report and exit with the guest's status.
//! `snapshot` boots, pauses from another thread after report K, saves to OUT
//! and prints the saved counter.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use smolvm::testguest::{self, Params, Report};
use smolvm::vstate::vcpu::ExitReason;

fn print_report(r: &Report) {
    println!(
        "report counter={} checksum={:#x} memory_checksum={:#x} ok={}",
        r.counter,
        r.checksum,
        r.memory_checksum,
        r.checksum == r.memory_checksum && r.checksum == testguest::expected_checksum(r.counter)
    );
}

fn finish(reason: ExitReason) -> Result<u8> {
    match reason {
        ExitReason::Exited(s) => Ok(s),
        other => bail!("guest stopped: {other:?}"),
    }
}

fn flag(args: &[String], name: &str, default: u64) -> Result<u64> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .ok_or_else(|| anyhow!("{name} needs a value"))?
            .parse()
            .with_context(|| format!("bad {name}")),
        None => Ok(default),
    }
}

fn params(args: &[String]) -> Result<Params> {
    Ok(Params {
        report_every: flag(args, "--every", 1000)?,
        limit: flag(args, "--limit", 20_000)?,
        exit_status: flag(args, "--status", 0)? as u8,
    })
}

fn run_printing(
    machine: &mut smolvm::machine::Machine,
    rx: std::sync::mpsc::Receiver<Report>,
) -> Result<u8> {
    let printer = std::thread::spawn(move || {
        for r in rx {
            print_report(&r);
        }
    });
    let reason = machine.run_to_exit()?;
    if reason != ExitReason::Exited(0) && std::env::var_os("TESTGUEST_DEBUG").is_some() {
        eprintln!("regs: {:x?}", machine.vcpu_regs(0));
    }
    // The report device (and its sender) lives on the machine's bus.
    machine
        .devices_mut()
        .detach_host_io(u64::from(smolvm::testguest::REPORT_PORT));
    let _ = printer.join();
    finish(reason)
}

fn main() -> ExitCode {
    smolvm::timing::start();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = (|| -> Result<u8> {
        match args.first().map(String::as_str) {
            Some("boot") => {
                let mut m = testguest::boot(&params(&args)?)?;
                let rx = testguest::attach_reporter(&mut m)?;
                run_printing(&mut m, rx)
            }
            Some("snapshot") => {
                let out = args.get(1).ok_or_else(|| anyhow!("snapshot needs OUT"))?;
                let at = flag(&args, "--at", 3)?;
                let (m, reports) = testguest::boot_and_pause_at(&params(&args)?, at)?;
                for r in &reports {
                    print_report(r);
                }
                let counter = m.memory().read_u64(testguest::COUNTER_ADDR)?;
                // --exit-after N: the resumed guest stops N iterations later
                // (the benchmark wants the first exit to be the exit port).
                if let Some(i) = args.iter().position(|a| a == "--exit-after") {
                    let n: u64 = args.get(i + 1).ok_or_else(|| anyhow!("--exit-after needs a value"))?.parse()?;
                    m.memory().write(testguest::PARAMS_ADDR + 8, &(counter + n).to_le_bytes())?;
                }
                m.save(Path::new(out), &smolvm_formats::Manifest {
                    name: "testguest".into(),
                    ..Default::default()
                }, smolvm_formats::Compression::None)?;
                println!("saved counter={counter}");
                Ok(0)
            }
            Some("resume") => {
                let file = args.get(1).ok_or_else(|| anyhow!("resume needs FILE"))?;
                let mut m = smolvm::builder::resume(Path::new(file))?;
                let rx = testguest::attach_reporter(&mut m)?;
                run_printing(&mut m, rx)
            }
            _ => bail!("usage: testguest boot|snapshot OUT --at K|resume FILE [--every N --limit L --status S]"),
        }
    })();
    match result {
        Ok(s) => ExitCode::from(s),
        Err(e) => {
            eprintln!("testguest: {e:#}");
            ExitCode::from(125)
        }
    }
}
