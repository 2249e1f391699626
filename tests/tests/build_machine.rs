//! `smolpack build` end to end on the real Linux guest: one machine is built for this whole
//! file (a boot costs 40 s or more on an emulating host) and resumed by each test with
//! `smolvm run`. Each test starts few guest processes, since each costs about a second there.
//!
//! Needs /dev/kvm and the guest artifacts (`scripts/setup`); skips loudly without them,
//! except under `CI=true`, where it fails.

mod build_util;

use std::path::PathBuf;
use std::sync::OnceLock;

use build_util::{describe, guest, smolpack_build, smolvm_run};
use smolvm_formats::MachineReader;

/// The machine: a file written by a setup step, a web server and a counter left running.
const SMOLFILE: &str = r#"
name = "buildtest"

[base]
type = "busybox"

[[copy]]
from = "www/"
to = "/var/www"

[[setup]]
run = "echo written-at-build > /etc/built-marker && echo setup-output-is-streamed"

[[service]]
name = "web"
run = ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/var/www"]
ready = { tcp = 8080, timeout = "5m" }

# Counts in a shell variable and publishes each value; ready once it reached 3. Paced by read
# timeouts on a pseudo-terminal master that never has input: no process per tick.
[[service]]
name = "counter"
run = ["/bin/sh", "-c", """
exec 3<>/dev/ptmx || exit 1
i=0
while :; do
  i=$((i + 1))
  echo "$i" >/run/counter
  [ "$i" = 3 ] && : >/run/counter-ready
  read -t 0.5 _ <&3
done
"""]
ready = { file = "/run/counter-ready", timeout = "5m" }

[run]
cmd = ["/bin/cat", "/etc/built-marker"]
"#;

const PAGE: &str = "<h1>served from the snapshot</h1>\n";

struct Built {
    _dir: tempfile::TempDir,
    path: PathBuf,
    stderr: String,
    stdout: String,
}

/// Builds the machine once for every test of this file; `None` when skipped. A failed build
/// fails every test with its output (and is not retried by each of them).
fn machine(test: &str) -> Option<&'static Built> {
    static MACHINE: OnceLock<Result<Built, String>> = OnceLock::new();
    let guest = guest(test)?;
    let built = MACHINE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("www")).unwrap();
        std::fs::write(dir.path().join("www/index.html"), PAGE).unwrap();
        let smolfile = dir.path().join("Smolfile");
        std::fs::write(&smolfile, SMOLFILE).unwrap();
        let path = dir.path().join("buildtest.smolmachine");
        let out = smolpack_build(&guest, &smolfile, &path);
        if !out.status.success() {
            return Err(format!("build failed: {}", describe(&out)));
        }
        Ok(Built {
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            _dir: dir,
            path,
        })
    });
    match built {
        Ok(b) => Some(b),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn file_written_during_build_is_there_after_resume() {
    let Some(m) = machine("file_written_during_build_is_there_after_resume") else {
        return;
    };
    // The default command from [run].
    let out = smolvm_run(&m.path, &[]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "written-at-build\n");

    // The build showed the step, its output, the services and the result.
    assert!(
        m.stderr.contains("setup: echo written-at-build"),
        "{}",
        m.stderr
    );
    assert!(
        m.stderr.contains("setup-output-is-streamed"),
        "{}",
        m.stderr
    );
    assert!(m.stderr.contains("service: web"), "{}", m.stderr);
    assert!(m.stdout.starts_with("built "), "{}", m.stdout);

    // The manifest carries the Smolfile's run settings.
    let r = MachineReader::open(&m.path).unwrap();
    let manifest = r.manifest().unwrap();
    assert_eq!(manifest.name, "buildtest");
    assert_eq!(manifest.cmd, ["/bin/cat", "/etc/built-marker"]);
    assert!(manifest.producer.starts_with("smolpack "));
    assert!(!manifest.kernel_cmdline.is_empty());
    r.verify().unwrap();
}

#[test]
fn service_answers_at_once_after_resume_with_its_build_pid() {
    let Some(m) = machine("service_answers_at_once_after_resume_with_its_build_pid") else {
        return;
    };
    let manifest = MachineReader::open(&m.path).unwrap().manifest().unwrap();
    let build_pid: u32 = manifest.extra["service.web.pid"].parse().unwrap();
    // One try, no retry: the server must already be listening.
    let script =
        "read pid </run/web.pid; read comm </proc/$pid/comm; echo \"pid=$pid comm=$comm\"; \
                  wget -qO- http://127.0.0.1:8080/";
    let out = smolvm_run(&m.path, &["/bin/sh", "-c", script]);
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.splitn(2, '\n');
    assert_eq!(
        lines.next().unwrap(),
        format!("pid={build_pid} comm=busybox"),
        "{}",
        describe(&out)
    );
    assert_eq!(lines.next().unwrap(), PAGE, "{}", describe(&out));
}

#[test]
fn counter_continues_from_its_snapshot_value() {
    let Some(m) = machine("counter_continues_from_its_snapshot_value") else {
        return;
    };
    // Read the counter, let it tick, read it again. `read` fails on a value without its
    // newline: a write in progress (the file is truncated, then written), so read again.
    let script = "exec 3<>/dev/ptmx
                  get() { until read -r v </run/counter; do :; done; }
                  get; a=$v; read -t 1 _ <&3; get; echo \"$a $v\"";
    let out = smolvm_run(&m.path, &["/bin/sh", "-c", script]);
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let nums: Vec<u64> = stdout
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    let [first, second] = nums[..] else {
        panic!("{}", describe(&out));
    };
    // The snapshot was taken once it had reached 3: it goes on from there, it does not
    // start again, and it still runs.
    assert!(first >= 3, "{}", describe(&out));
    assert!(second > first, "{}", describe(&out));
}
