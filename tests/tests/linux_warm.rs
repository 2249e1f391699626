//! A warm entrypoint on the real Linux guest (docs/WARM.md): `smolpack build` snapshots the
//! command blocked on its stdin; the run without arguments resumes that very process (its
//! build-time pid, in the manifest), any other run starts the command afresh with the same
//! results, and a machine saved after a warm run has no warm process left.
//!
//! One machine is built for the whole file (a boot costs 40 s or more on an emulating host).
//! Needs /dev/kvm and the guest artifacts (`scripts/setup`); skips loudly without them,
//! except under `CI=true`, where it fails.

mod build_util;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use build_util::{bin, describe, guest, smolpack_build};
use smolvm_formats::MachineReader;

/// A filter that says which process it is, then numbers its input lines (busybox's `read`
/// waits in poll(2) on its stdin first).
const FILTER: &str = r#"#!/bin/sh
echo "pid $$"
n=0
while read -r line; do n=$((n + 1)); echo "$n: $line"; done
echo "total $n" >&2
exit 3
"#;

const SMOLFILE: &str = r#"
name = "warmtest"

[base]
type = "busybox"

[[copy]]
from = "filter"
to = "/usr/local/bin/filter"

[run]
entrypoint = ["/bin/sh", "/usr/local/bin/filter"]
warm = true
warm_timeout = "10m"
"#;

/// `smolvm run [--save OUT] MACHINE [-- ARGS...]` with `input` on stdin.
fn run(machine: &Path, save: Option<&Path>, args: &[&str], input: &[u8]) -> Output {
    let mut cmd = Command::new(bin("smolvm", "smolvm"));
    cmd.arg("run");
    if let Some(s) = save {
        cmd.arg("--save").arg(s);
    }
    cmd.arg(machine);
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running smolvm run");
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// The pid the filter printed, and the rest of its stdout.
fn split_pid(out: &Output) -> (u32, String) {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (first, rest) = text.split_once('\n').unwrap_or((&text, ""));
    let pid = first
        .strip_prefix("pid ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid line: {}", describe(out)));
    (pid, rest.to_string())
}

#[test]
fn warm_run_resumes_the_build_process_and_others_fall_back() {
    let Some(guest) = guest("warm_run_resumes_the_build_process_and_others_fall_back") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("filter"), FILTER).unwrap();
    let smolfile = dir.path().join("Smolfile");
    std::fs::write(&smolfile, SMOLFILE).unwrap();
    let machine = dir.path().join("warm.smolmachine");
    let built = smolpack_build(&guest, &smolfile, &machine);
    assert!(built.status.success(), "{}", describe(&built));
    assert!(
        String::from_utf8_lossy(&built.stderr).contains("warm: /bin/sh /usr/local/bin/filter"),
        "{}",
        describe(&built)
    );
    let manifest = MachineReader::open(&machine).unwrap().manifest().unwrap();
    assert_eq!(manifest.extra["run.warm"], "stdin");
    let warm_pid: u32 = manifest.extra["run.warm.pid"].parse().unwrap();

    // The run without arguments: the process started at build time, its start-up output
    // (printed before the snapshot) included, the exit status passed through.
    let input = b"alpha\nbeta gamma\n";
    let expected = "1: alpha\n2: beta gamma\n";
    let warm = run(&machine, None, &[], input);
    assert_eq!(warm.status.code(), Some(3), "{}", describe(&warm));
    assert_eq!(split_pid(&warm), (warm_pid, expected.to_string()));
    assert!(String::from_utf8_lossy(&warm.stderr).contains("total 2"));

    // Other arguments: a fresh exec of the same program, the same results.
    let cold = run(&machine, None, &["ignored-arg"], input);
    assert_eq!(cold.status.code(), Some(3), "{}", describe(&cold));
    let (pid, text) = split_pid(&cold);
    assert_ne!(
        pid, warm_pid,
        "a non-matching run must not get the warm process"
    );
    assert_eq!(text, expected);

    // The machine file is unchanged: the next plain run is warm again. Saved after it,
    // the machine has no warm process left and starts the command afresh, correctly.
    let saved = dir.path().join("saved.smolmachine");
    let again = run(&machine, Some(&saved), &[], b"x\n");
    assert_eq!(again.status.code(), Some(3), "{}", describe(&again));
    assert_eq!(split_pid(&again), (warm_pid, "1: x\n".to_string()));
    let after = run(&saved, None, &[], b"x\n");
    assert_eq!(after.status.code(), Some(3), "{}", describe(&after));
    let (pid, text) = split_pid(&after);
    assert_ne!(pid, warm_pid);
    assert_eq!(text, "1: x\n");
}
