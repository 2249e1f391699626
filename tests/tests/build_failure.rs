//! `smolpack build` failures: a failing setup step stops the build with its output, exit
//! code and Smolfile line and leaves the output alone; a bad Smolfile is refused with its
//! line before anything boots.
//!
//! The setup-step test boots the real Linux guest (needs /dev/kvm and `scripts/setup`; skips
//! loudly without them, except under `CI=true`). The others need no VM.

mod build_util;

use std::path::Path;
use std::process::Command;

use build_util::{bin, describe, guest, line_of, smolpack_build};

/// Names of the entries of `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn failing_setup_step_stops_the_build_and_keeps_the_old_output() {
    let Some(guest) = guest("failing_setup_step_stops_the_build_and_keeps_the_old_output") else {
        return;
    };
    let smolfile_text = r#"name = "fails"

[base]
type = "busybox"

[[setup]]
run = "echo first-step-ran"

[[setup]]
run = "echo about-to-fail; echo complaint-on-stderr >&2; exit 7"

[[setup]]
run = "echo third-step-must-not-run"
"#;
    let dir = tempfile::tempdir().unwrap();
    let smolfile = dir.path().join("Smolfile");
    std::fs::write(&smolfile, smolfile_text).unwrap();
    // An earlier build's output: a failed build must not replace it.
    let out_path = dir.path().join("fails.smolmachine");
    std::fs::write(&out_path, b"an earlier machine").unwrap();

    let out = smolpack_build(&guest, &smolfile, &out_path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let line = line_of(smolfile_text, "about-to-fail") - 1; // the [[setup]] header
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains(&format!("Smolfile:{line}: ")),
        "{}",
        describe(&out)
    );
    assert!(last.contains("exited with status 7"), "{}", describe(&out));
    // The step's output, both streams, was shown; the build went no further.
    assert!(stderr.contains("first-step-ran"), "{}", describe(&out));
    assert!(stderr.contains("about-to-fail"), "{}", describe(&out));
    assert!(stderr.contains("complaint-on-stderr"), "{}", describe(&out));
    assert!(
        !stderr.contains("third-step-must-not-run"),
        "{}",
        describe(&out)
    );
    assert!(!stderr.contains("[5/5] save"), "{}", describe(&out));
    assert!(out.stdout.is_empty(), "{}", describe(&out));
    // The old output is untouched and nothing else was left behind.
    assert_eq!(std::fs::read(&out_path).unwrap(), b"an earlier machine");
    assert_eq!(entries(dir.path()), ["Smolfile", "fails.smolmachine"]);
}

#[test]
fn a_setup_step_that_stops_the_machine_says_how_it_stopped() {
    let Some(guest) = guest("a_setup_step_that_stops_the_machine_says_how_it_stopped") else {
        return;
    };
    // The agent loses its connection when the guest goes away: the error must say why.
    let smolfile_text =
        "name = \"off\"\n\n[base]\ntype = \"busybox\"\n\n[[setup]]\nrun = \"poweroff -f\"\n";
    let dir = tempfile::tempdir().unwrap();
    let smolfile = dir.path().join("Smolfile");
    std::fs::write(&smolfile, smolfile_text).unwrap();
    let out_path = dir.path().join("off.smolmachine");
    let out = smolpack_build(&guest, &smolfile, &out_path);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.contains("Smolfile:6: "), "{}", describe(&out));
    assert!(
        last.contains("(the machine stopped: the guest powered off; rerun with -v"),
        "{}",
        describe(&out)
    );
    assert_eq!(entries(dir.path()), ["Smolfile"]);
}

#[test]
fn bad_smolfile_is_refused_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let smolfile = dir.path().join("Smolfile");
    let text =
        "name = \"bad\"\n[base]\ntype = \"busybox\"\n\n[resources]\nvcpus = 1\nmemroy = \"1G\"\n";
    std::fs::write(&smolfile, text).unwrap();
    let out_path = dir.path().join("bad.smolmachine");
    // No kernel or agent is needed to refuse it: the file is checked first.
    let out = Command::new(bin("smolpack", "smolpack"))
        .arg("build")
        .arg(&smolfile)
        .arg("-o")
        .arg(&out_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{}", describe(&out));
    assert!(
        stderr.starts_with(&format!("error: {}:7:", smolfile.display())),
        "{}",
        describe(&out)
    );
    assert!(stderr.contains("memroy"), "{}", describe(&out));
    assert_eq!(entries(dir.path()), ["Smolfile"]);
}

#[test]
fn missing_kernel_says_how_to_get_one_and_keeps_the_old_output() {
    let dir = tempfile::tempdir().unwrap();
    let smolfile = dir.path().join("Smolfile");
    std::fs::write(&smolfile, "name = \"k\"\n[base]\ntype = \"busybox\"\n").unwrap();
    let out_path = dir.path().join("k.smolmachine");
    std::fs::write(&out_path, b"old").unwrap();
    let out = Command::new(bin("smolpack", "smolpack"))
        .arg("build")
        .arg(&smolfile)
        .arg("-o")
        .arg(&out_path)
        .arg("--kernel")
        .arg(dir.path().join("no-such-vmlinux"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--kernel"), "{}", describe(&out));
    assert!(stderr.contains("no-such-vmlinux"), "{}", describe(&out));
    assert_eq!(std::fs::read(&out_path).unwrap(), b"old");
    assert_eq!(entries(dir.path()), ["Smolfile", "k.smolmachine"]);
}
