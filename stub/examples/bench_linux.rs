//! Linux resume benchmark (run by `scripts/bench-resume.sh linux`; not installed).
//!
//! ```text
//! bench_linux SMOLVM_BIN MACHINE [RUNS]
//! ```
//! For RUNS rounds (default 10, after one warm-up): `smolvm run MACHINE --
//! true` (spawn to exit, with the in-process phase marks of
//! `SMOLVM_TIMINGS=1`), `smolvm run MACHINE -- echo x` (spawn to the first
//! byte of output), and once a resumed instance holding a command open, its
//! host private memory (`Private_Dirty` of `/proc/PID/smaps_rollup`).
//! Prints medians.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
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

fn private_dirty_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    s.lines()
        .find(|l| l.starts_with("Private_Dirty:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(bin), Some(machine)) = (args.first(), args.get(1)) else {
        eprintln!("usage: bench_linux SMOLVM_BIN MACHINE [RUNS]");
        return ExitCode::from(2);
    };
    let runs: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(10);
    let run = |cmd: &[&str]| {
        Command::new(bin)
            .args(["run", machine, "--"])
            .args(cmd)
            .env("SMOLVM_TIMINGS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    };
    // Warm-up: page cache holds the binary and the machine file.
    let _ = run(&["true"]).and_then(|c| c.wait_with_output());
    let mut phases: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut wall = Vec::new();
    let mut first_output = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let out = match run(&["true"]).and_then(|c| c.wait_with_output()) {
            Ok(o) => o,
            Err(e) => {
                eprintln!("cannot run {bin}: {e}");
                return ExitCode::from(1);
            }
        };
        wall.push(t.elapsed().as_secs_f64() * 1e3);
        if out.status.code() != Some(0) {
            eprintln!(
                "smolvm run failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return ExitCode::from(1);
        }
        for line in String::from_utf8_lossy(&out.stderr).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let ["smolvm-timing", phase, ms, "ms"] = f.as_slice() {
                if let Ok(ms) = ms.parse::<f64>() {
                    phases.entry((*phase).to_string()).or_default().push(ms);
                }
            }
        }
        let t = Instant::now();
        if let Ok(mut c) = run(&["echo", "x"]) {
            let mut b = [0u8; 1];
            if let Some(o) = c.stdout.as_mut() {
                if o.read(&mut b).unwrap_or(0) == 1 {
                    first_output.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            let _ = c.wait();
        }
    }
    // Host memory of one resumed instance while its command runs.
    let mut dirty = None;
    if let Ok(mut c) = Command::new(bin)
        .args(["run", machine, "--", "sh", "-c", "echo ready; read x"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        let mut line = String::new();
        if let Some(o) = c.stdout.take() {
            let _ = BufReader::new(o).read_line(&mut line);
        }
        dirty = private_dirty_kib(c.id());
        if let Some(mut i) = c.stdin.take() {
            let _ = i.write_all(b"\n");
        }
        let _ = c.wait();
    }
    let size = std::fs::metadata(machine).map(|m| m.len()).unwrap_or(0);
    println!("runs: {runs}; machine file: {size} bytes");
    println!(
        "{:<34} {:>10}",
        "phase of `run -- true` (since main)", "median ms"
    );
    for p in [
        "file-mapped",
        "vm-and-vcpus-created",
        "state-restored",
        "devices-restored",
        "sections-verified",
        "vcpus-started",
        "first-guest-exit",
        "agent-resumed",
        "exec-sent",
        "command-exited",
        "machine-dropped",
    ] {
        if let Some(v) = phases.get_mut(p) {
            println!("{p:<34} {:>10.1}", median(v));
        }
    }
    println!(
        "{:<34} {:>10.1}",
        "`run -- true`: spawn to exit",
        median(&mut wall)
    );
    println!(
        "{:<34} {:>10.1}",
        "`run -- echo x`: spawn to output",
        median(&mut first_output)
    );
    match dirty {
        Some(kib) => println!("{:<34} {:>10} KiB", "Private_Dirty of one instance", kib),
        None => println!("Private_Dirty of one instance: not measured"),
    }
    ExitCode::SUCCESS
}
