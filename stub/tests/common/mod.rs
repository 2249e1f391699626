//! Helpers shared by the VMM integration tests (real /dev/kvm).
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use smolvm::machine::Machine;
use smolvm::testguest::{self, Params, Report};

/// Whether KVM tests can run here. Without /dev/kvm (or the assembled test
/// guest) they are skipped loudly, except under CI=true where that fails.
pub fn kvm_ready(test: &str) -> bool {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let guest = !testguest::IMAGE.is_empty();
    if kvm && guest {
        return true;
    }
    let why = if kvm {
        "the test guest was not assembled (binutils missing)"
    } else {
        "/dev/kvm is not available"
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: {why} (CI=true requires it)");
    }
    eprintln!("SKIPPING {test}: {why}");
    false
}

/// Standard parameters: report every 1000 iterations, stop at 10000 with status 9.
pub const PARAMS: Params = Params {
    report_every: 1000,
    limit: 10_000,
    exit_status: 9,
};

/// Boot the test guest, pause it from another thread at report `at`, and
/// return the paused machine, the reports seen and the counter then.
pub fn boot_and_pause(params: &Params, at: usize) -> (Machine, Vec<Report>, u64) {
    let (m, reports) = testguest::boot_and_pause_at(params, at as u64).expect("boot and pause");
    let counter = m
        .memory()
        .read_u64(testguest::COUNTER_ADDR)
        .expect("counter");
    assert_eq!(
        counter,
        at as u64 * params.report_every,
        "paused at the held report"
    );
    (m, reports, counter)
}

/// Reports and exit status of a resumed child process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildRun {
    pub reports: Vec<(u64, u64, u64)>,
    pub status: Option<i32>,
    pub stderr: String,
}

/// Env var that turns a test binary into a resume child.
pub const CHILD_ENV: &str = "SMOLVM_TEST_RESUME_CHILD";

/// Run the test binary's `child` test in a new process that resumes `file`.
pub fn spawn_child(child_test: &str, file: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().expect("current exe"))
        .args([
            "--ignored",
            "--exact",
            child_test,
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn child")
}

/// Collect a child's output.
pub fn collect(child: std::process::Child) -> ChildRun {
    let out = child.wait_with_output().expect("child output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut reports = Vec::new();
    let mut status = None;
    for line in stdout.lines() {
        // libtest prints "test child ... " without a newline before the
        // child's first line.
        let line = line.find("child-").map_or(line, |i| &line[i..]);
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["child-report", c, s, m] => reports.push((
                c.parse().expect("counter"),
                s.parse().expect("checksum"),
                m.parse().expect("memory checksum"),
            )),
            ["child-exit", s] => status = Some(s.parse().expect("status")),
            _ => {}
        }
    }
    ChildRun {
        reports,
        status,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Body of the child test: when CHILD_ENV is set, resume that file, print
/// reports and the exit status, and exit the process with it.
pub fn child_main() {
    let Some(file) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let mut m = smolvm::builder::resume(Path::new(&file)).expect("resume");
    let rx = testguest::attach_reporter(&mut m).expect("reporter");
    let printer = std::thread::spawn(move || {
        for r in rx {
            println!(
                "child-report {} {} {}",
                r.counter, r.checksum, r.memory_checksum
            );
        }
    });
    let reason = m.run_to_exit().expect("run");
    drop(m);
    printer.join().expect("printer");
    match reason {
        smolvm::vstate::vcpu::ExitReason::Exited(s) => {
            println!("child-exit {s}");
            std::process::exit(0);
        }
        other => {
            println!("child-stopped {other:?}");
            std::process::exit(1);
        }
    }
}

/// Check that resumed reports continue the count after `saved` and that the
/// guest's checksums match the block in memory and the formula.
pub fn check_continuation(run: &ChildRun, saved: u64, params: &Params) {
    assert_eq!(
        run.status,
        Some(i32::from(params.exit_status)),
        "child: {run:?}"
    );
    let first_expected = (saved / params.report_every + 1) * params.report_every;
    let counters: Vec<u64> = run.reports.iter().map(|r| r.0).collect();
    let expected: Vec<u64> = (first_expected..=params.limit)
        .step_by(params.report_every as usize)
        .collect();
    assert_eq!(
        counters, expected,
        "resumed reports do not continue from {saved}"
    );
    for &(c, sum, mem) in &run.reports {
        assert_eq!(
            sum, mem,
            "guest checksum differs from memory at counter {c}"
        );
        assert_eq!(
            sum,
            testguest::expected_checksum(c),
            "block content wrong at counter {c}"
        );
    }
}
