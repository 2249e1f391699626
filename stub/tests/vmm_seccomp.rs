//! System call filters on the VMM test guest: `smolvm run` puts every thread under
//! seccomp before the guest runs (vCPU threads under a second, tighter filter), a call
//! off the allow-list kills the process by SIGSYS with one line naming it and the thread,
//! and `SMOLVM_SECCOMP=0` turns the filters off with a warning.

mod common;

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use smolvm::testguest::{self, Params};
use smolvm_formats::{Compression, Manifest};

/// A guest that counts far beyond any test's life: the tests end it.
const LONG: Params = Params {
    report_every: 1 << 40,
    limit: 1 << 60,
    exit_status: 3,
};

/// Env var that turns this test binary into a probe child: `vmm` or `vcpu`.
const PROBE_ENV: &str = "SMOLVM_TEST_SECCOMP_PROBE";

/// One thread's seccomp lines from /proc/PID/task/TID/status.
#[derive(Debug)]
struct ThreadFilter {
    name: String,
    mode: u32,
    filters: u32,
    /// Blocked signals (`SigBlk`), bit N-1 for signal N.
    blocked: u64,
}

/// Every thread of `pid`, or `None` once the process is gone.
fn thread_filters(pid: u32) -> Option<Vec<ThreadFilter>> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(status) = std::fs::read_to_string(t.ok()?.path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
        };
        out.push(ThreadFilter {
            name: field("Name:").unwrap_or_default(),
            mode: field("Seccomp:").and_then(|v| v.parse().ok()).unwrap_or(0),
            filters: field("Seccomp_filters:")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            blocked: field("SigBlk:")
                .and_then(|v| u64::from_str_radix(&v, 16).ok())
                .unwrap_or(0),
        });
    }
    Some(out)
}

/// Wait until `child` has a thread named `vcpu0` (the vCPUs start after the filters are
/// installed) and return every thread then; panics if the child exits first.
fn threads_once_vcpus_run(child: &mut Child) -> Vec<ThreadFilter> {
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("smolvm ended before its vCPU started: {status:?}: {err}");
        }
        if let Some(threads) = thread_filters(child.id()) {
            if threads.iter().any(|t| t.name == "vcpu0") {
                return threads;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn long_guest(dir: &Path) -> PathBuf {
    // Saved before it first runs: the resume starts it at its entry.
    let m = testguest::boot(&LONG).expect("boot the test guest");
    let path = dir.join("long.smolmachine");
    let manifest = Manifest {
        name: "long".into(),
        ..Default::default()
    };
    m.save(&path, &manifest, Compression::None).expect("save");
    path
}

fn smolvm_run(machine: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_smolvm"));
    c.arg("run")
        .arg(machine)
        .env_remove("SMOLVM_SECCOMP")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

#[test]
fn every_thread_runs_filtered_and_vcpus_doubly() {
    if !common::kvm_ready("every_thread_runs_filtered_and_vcpus_doubly") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let machine = long_guest(dir.path());
    let mut child = smolvm_run(&machine).spawn().unwrap();
    let threads = threads_once_vcpus_run(&mut child);
    child.kill().unwrap();
    child.wait().unwrap();
    for t in &threads {
        assert_eq!(t.mode, 2, "thread {} is not filtered: {threads:?}", t.name);
    }
    let vcpu = threads.iter().find(|t| t.name == "vcpu0").unwrap();
    let main = threads.iter().find(|t| t.name == "smolvm").unwrap();
    assert_eq!(main.filters, 1, "{threads:?}");
    assert_eq!(vcpu.filters, 2, "the vCPU adds its own filter: {threads:?}");
    // Process-wide signals go to VMM threads (their handlers need VMM calls); the kick
    // (SIGRTMIN) still reaches the vCPU.
    let bit = |sig: i32| 1u64 << (sig - 1);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGWINCH] {
        assert_ne!(vcpu.blocked & bit(sig), 0, "signal {sig}: {threads:?}");
        assert_eq!(main.blocked & bit(sig), 0, "signal {sig}: {threads:?}");
    }
    assert_eq!(vcpu.blocked & bit(libc::SIGRTMIN()), 0, "{threads:?}");
}

#[test]
fn smolvm_seccomp_0_runs_unfiltered_with_a_warning() {
    if !common::kvm_ready("smolvm_seccomp_0_runs_unfiltered_with_a_warning") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let machine = long_guest(dir.path());
    let mut child = smolvm_run(&machine)
        .env("SMOLVM_SECCOMP", "0")
        .spawn()
        .unwrap();
    let threads = threads_once_vcpus_run(&mut child);
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(threads.iter().all(|t| t.mode == 0), "{threads:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("smolvm: WARNING: SMOLVM_SECCOMP=0: system call filtering is OFF"),
        "{err}"
    );
}

/// Run this binary's probe child in `role` and return its exit status and stderr.
fn probe(role: &str) -> (std::process::ExitStatus, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "probe_child", "--nocapture"])
        .env(PROBE_ENV, role)
        .env_remove("SMOLVM_SECCOMP")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_forbidden_call_in_a_vmm_thread_kills_by_sigsys_with_one_line() {
    if !common::kvm_ready("a_forbidden_call_in_a_vmm_thread_kills_by_sigsys_with_one_line") {
        return;
    }
    let (status, err) = probe("vmm");
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}: {err}");
    assert_eq!(
        err,
        "smolvm: blocked system call 41 (socket) in thread vmm-probe; \
         this is a bug in smolvm, please report it\n"
    );
}

#[test]
fn a_call_only_vmm_threads_may_make_kills_a_vcpu_thread_by_sigsys() {
    if !common::kvm_ready("a_call_only_vmm_threads_may_make_kills_a_vcpu_thread_by_sigsys") {
        return;
    }
    let (status, err) = probe("vcpu");
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}: {err}");
    assert_eq!(
        err,
        "smolvm: blocked system call 257 (openat) in thread vcpu-probe; \
         this is a bug in smolvm, please report it\n"
    );
}

/// The probe: a test guest machine built and started exactly as `smolvm run` does it
/// (filters installed, then the vCPUs started), then one forbidden call from a thread of
/// the given role. Only runs as the child of the tests above.
#[test]
#[ignore = "child process of the SIGSYS tests"]
fn probe_child() {
    let Ok(role) = std::env::var(PROBE_ENV) else {
        return;
    };
    // No core file for the expected SIGSYS.
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct we pass.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) };
    let mut m = testguest::boot(&LONG).expect("boot the test guest");
    testguest::ignore_reports(&mut m).expect("reports");
    assert!(smolvm::seccomp::install().expect("install the filters"));
    m.start().expect("start");
    let t = std::thread::Builder::new()
        .name(format!("{role}-probe"))
        .spawn(move || match role.as_str() {
            "vmm" => {
                // SAFETY: a raw system call with integer arguments; it must not return.
                unsafe { libc::syscall(libc::SYS_socket, libc::AF_PACKET, libc::SOCK_RAW, 0) };
            }
            _ => {
                smolvm::seccomp::enter_vcpu_thread().expect("vCPU filter");
                // Allowed to VMM threads, not to vCPU threads.
                let _ = std::fs::File::open("/proc/self/status");
            }
        })
        .unwrap();
    let _ = t.join();
    panic!("the forbidden call returned");
}
