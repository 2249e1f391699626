//! Start-up benchmark for any set of commands (run by `scripts/bench-packed.sh`; not
//! installed).
//!
//! ```text
//! bench_spawn RUNS :: LABEL CMD [ARGS...] [:: LABEL CMD [ARGS...]]...
//! ```
//! Spawns every command once per round, RUNS rounds (after one warm-up round), interleaved so
//! that load drifts hit all of them alike, each with `SMOLVM_TIMINGS=1`, stdin from
//! `/dev/null` and stdout/stderr piped. It prints, per command, the medians of: the
//! `smolvm-timing` phase marks found on stderr (milliseconds since the VMM's `main`), the
//! time from spawn to the first byte on stdout, and the time from spawn to exit; the first
//! command is the baseline every wall time is divided by. Groups are split on `::`, so a
//! command may itself contain `--`.

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
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

#[derive(Default)]
struct Samples {
    label: String,
    argv: Vec<String>,
    /// Phase name → samples, and the order phases were first seen in.
    phases: BTreeMap<String, Vec<f64>>,
    phase_order: Vec<String>,
    first_byte: Vec<f64>,
    exit: Vec<f64>,
    statuses: BTreeMap<String, usize>,
}

/// One spawn: wall time to the first stdout byte and to exit, and the stderr text.
fn spawn_once(argv: &[String]) -> std::io::Result<(Option<f64>, f64, String, String)> {
    let t = Instant::now();
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .env("SMOLVM_TIMINGS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut first = None;
    let mut buf = [0u8; 4096];
    loop {
        match stdout.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {
                first.get_or_insert_with(|| t.elapsed().as_secs_f64() * 1e3);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let status = child.wait()?;
    let exit = t.elapsed().as_secs_f64() * 1e3;
    let stderr = err_reader.join().unwrap_or_default();
    let status = match status.code() {
        Some(c) => format!("exit {c}"),
        None => format!("{status}"),
    };
    Ok((first, exit, stderr, status))
}

fn parse(args: &[String]) -> Option<(usize, Vec<Samples>)> {
    let runs: usize = args.first()?.parse().ok()?;
    let mut cmds = Vec::new();
    for group in args[1..].split(|a| a == "::").skip(1) {
        let (label, argv) = group.split_first()?;
        if argv.is_empty() {
            return None;
        }
        cmds.push(Samples {
            label: label.clone(),
            argv: argv.to_vec(),
            ..Default::default()
        });
    }
    (!cmds.is_empty() && args.get(1).map(String::as_str) == Some("::")).then_some((runs, cmds))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((runs, mut cmds)) = parse(&args) else {
        eprintln!("usage: bench_spawn RUNS :: LABEL CMD [ARGS...] [:: LABEL CMD [ARGS...]]...");
        return ExitCode::from(2);
    };
    for round in 0..=runs {
        for c in cmds.iter_mut() {
            let (first, exit, stderr, status) = match spawn_once(&c.argv) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot run {}: {e}", c.argv[0]);
                    return ExitCode::from(1);
                }
            };
            if round == 0 {
                continue; // warm-up: page cache, expanded-machine cache, verified stamps
            }
            *c.statuses.entry(status).or_default() += 1;
            if let Some(f) = first {
                c.first_byte.push(f);
            }
            c.exit.push(exit);
            for line in stderr.lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                if let ["smolvm-timing", phase, ms, "ms"] = f.as_slice() {
                    if let Ok(ms) = ms.parse::<f64>() {
                        if !c.phases.contains_key(*phase) {
                            c.phase_order.push((*phase).to_string());
                        }
                        c.phases.entry((*phase).to_string()).or_default().push(ms);
                    }
                }
            }
        }
    }
    let base = median(&cmds[0].exit);
    println!("runs: {runs} (medians, ms); baseline: {}", cmds[0].label);
    for c in &cmds {
        println!("\n[{}] {}", c.label, c.argv.join(" "));
        let statuses: Vec<String> = c
            .statuses
            .iter()
            .map(|(s, n)| format!("{s} x{n}"))
            .collect();
        println!("  status: {}", statuses.join(", "));
        for p in &c.phase_order {
            let v = &c.phases[p];
            println!("  {p:<28} {:>10.3}  (n={})", median(v), v.len());
        }
        if !c.first_byte.is_empty() {
            println!(
                "  {:<28} {:>10.3}",
                "spawn to first stdout byte",
                median(&c.first_byte)
            );
        }
        let e = median(&c.exit);
        println!("  {:<28} {:>10.3}", "spawn to exit", e);
        println!("  {:<28} {:>10.2}", "ratio to baseline", e / base);
    }
    ExitCode::SUCCESS
}
