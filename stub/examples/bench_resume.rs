//! Resume benchmark (run by `scripts/bench-resume.sh`; not installed).
//!
//! ```text
//! bench_resume SMOLVM_BIN MACHINE [RUNS]
//! ```
//! Spawns `SMOLVM_BIN run MACHINE` RUNS times (default 30) with
//! `SMOLVM_TIMINGS=1`, and `/bin/true` as many times, interleaved, and
//! prints the median of each phase: wall time from spawn to exit, and the
//! in-process phase marks (milliseconds since `main` started).

use std::collections::BTreeMap;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(bin), Some(machine)) = (args.first(), args.get(1)) else {
        eprintln!("usage: bench_resume SMOLVM_BIN MACHINE [RUNS]");
        return ExitCode::from(2);
    };
    let runs: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(30);
    let mut phases: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut wall = Vec::new();
    let mut truewall = Vec::new();
    let mut status = None;
    // One warm-up of each, so the page cache holds both binaries and the file.
    for _ in 0..1 {
        let _ = Command::new(bin).args(["run", machine]).output();
        let _ = Command::new("/bin/true").status();
    }
    for _ in 0..runs {
        let t = Instant::now();
        let out = match Command::new(bin)
            .args(["run", machine])
            .env("SMOLVM_TIMINGS", "1")
            .stdin(Stdio::null())
            .output()
        {
            Ok(o) => o,
            Err(e) => {
                eprintln!("cannot run {bin}: {e}");
                return ExitCode::from(1);
            }
        };
        wall.push(t.elapsed().as_secs_f64() * 1e3);
        status = out.status.code();
        for line in String::from_utf8_lossy(&out.stderr).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let ["smolvm-timing", phase, ms, "ms"] = f.as_slice() {
                if let Ok(ms) = ms.parse::<f64>() {
                    phases.entry((*phase).to_string()).or_default().push(ms);
                }
            }
        }
        let t = Instant::now();
        let _ = Command::new("/bin/true").status();
        truewall.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!("runs: {runs}, guest exit status: {status:?}");
    println!("{:<28} {:>10}", "phase (since main)", "median ms");
    let order = [
        "file-mapped",
        "vm-and-vcpus-created",
        "state-restored",
        "first-guest-exit",
        "guest-stopped",
        "machine-dropped",
    ];
    for p in order {
        if let Some(v) = phases.get_mut(p) {
            println!("{p:<28} {:>10.3}", median(v));
        }
    }
    let w = median(&mut wall);
    let t = median(&mut truewall);
    println!("{:<28} {:>10.3}", "smolvm run: spawn to exit", w);
    println!("{:<28} {:>10.3}", "/bin/true: spawn to exit", t);
    println!("{:<28} {:>10.1}", "ratio", w / t);
    ExitCode::SUCCESS
}
