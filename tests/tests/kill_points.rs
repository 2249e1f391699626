//! Kill points: `smolpack pack`, `smolvm run --save OUT` and `smolpack build`, killed with
//! SIGKILL at points spread over their run, never leave a damaged file under the output name
//! (it is absent, the previous file unchanged, or complete: `smolpack verify` passes), and the
//! next run of the same command to the same output removes what the killed one left beside it
//! (temp files, scratch directories) and writes a file that verifies. `smolpack gc` removes
//! leftovers and leaves alone the temp file of a writer that is still running.
//!
//! Each command is first run uncut to measure its duration T (the fastest of three; one for
//! a build); then it is killed at i·T/30 for i = 1..30 plus three random offsets (the seed
//! is printed; `SMOLVM_KILL_SEED` repeats it). `smolvm run --save` gets six more points inside
//! its save of a few milliseconds, timed from the `guest-stopped` timing mark. Every other
//! killed run starts without an output, the others over the output of the previous complete
//! run. Each point prints a line: how the run ended and what it left.
//!
//! A Linux build boots a guest (30-60 s on an emulating KVM host), so by default the build
//! test kills at 7 points only, each timed from the killed run's own progress: three in the
//! rootfs phase and one in the boot (from their step lines), three in the write of the
//! output (from the moment its temp file appears, spread over the write as measured), and
//! every kill is followed by a complete build: 8 complete builds and 7 cut ones, measured at
//! 5 minutes with 30 s builds and 20 minutes on a loaded 2-core host (140 s builds). All
//! 30 + 3 spread-out points run with `SMOLVM_SLOW_TESTS=1` (34 complete builds and 33 cut
//! ones: about 30-60 minutes). The pack, save and gc tests take 10-30 s together. Tests needing `/dev/kvm`, the test guest, the embedded
//! stub or the guest artifacts skip loudly without them, except under `CI=true`, where they
//! fail.

mod build_util;
#[path = "../../stub/tests/common/mod.rs"]
mod vmm_common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use smolvm::testguest::{self, Params};
use smolvm_formats::{atomic, Arch, Compression, GuestRegion, MachineWriter, Manifest};
use smolvm_formats::{MachineReader, SectionKind};

use build_util::{bin, describe};

/// Kill points spread evenly over one uncut run.
const EVEN_POINTS: u32 = 30;
/// Kill points at random offsets.
const RANDOM_POINTS: u32 = 3;
/// Longest a command may run before the test calls it hung.
const DEADLINE: Duration = Duration::from_secs(600);

/// A small xorshift generator, so a failing run can be repeated from its seed.
struct Rng(u64);

impl Rng {
    fn from_env(test: &str) -> Rng {
        let seed = std::env::var("SMOLVM_KILL_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            })
            | 1;
        eprintln!("{test}: SMOLVM_KILL_SEED={seed}");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A duration in `0..max`.
    fn below(&mut self, max: Duration) -> Duration {
        let nanos = max.as_nanos().max(1) as u64;
        Duration::from_nanos(self.next() % nanos)
    }
}

/// What a kill point's delay counts from.
#[derive(Debug, Clone, Copy)]
enum After {
    /// The start of the run.
    Start,
    /// The first stderr line containing this.
    Line(&'static str),
    /// The moment the output's temp file appears (the write itself begins).
    OutputTemp,
}

/// When to kill a run: `delay` after `after`.
#[derive(Debug, Clone)]
struct KillPoint {
    after: After,
    delay: Duration,
}

impl KillPoint {
    fn at(delay: Duration) -> KillPoint {
        KillPoint {
            after: After::Start,
            delay,
        }
    }
}

/// Whether a writer's temp file of `output` is beside it.
fn has_temp(output: &Path) -> bool {
    let (Some(dir), Some(name)) = (output.parent(), output.file_name()) else {
        return false;
    };
    fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| atomic::is_temp_name(&e.file_name(), Some(name)))
    })
}

/// One command under test, writing `output`.
struct Subject {
    name: &'static str,
    /// A fresh command that writes `output`.
    command: Box<dyn Fn() -> Command>,
    /// The exit status of a complete run.
    success: i32,
    output: PathBuf,
}

/// How a run went: exit status, stderr lines with when they came, and its duration.
struct Run {
    status: std::process::ExitStatus,
    lines: Vec<(Duration, String)>,
    took: Duration,
    /// When the output's temp file was first seen, and when it was gone again (renamed).
    temp_seen: Option<Duration>,
    temp_gone: Option<Duration>,
}

impl Run {
    fn stderr(&self) -> String {
        let mut s = String::new();
        for (_, l) in &self.lines {
            s.push_str(l);
            s.push('\n');
        }
        s
    }

    /// When the first stderr line containing `needle` came.
    fn mark(&self, needle: &str) -> Option<Duration> {
        self.lines
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, _)| *t)
    }
}

/// Runs `cmd`, which writes `output`, killing it with SIGKILL at `kill` (if it is still
/// running then).
fn run(mut cmd: Command, kill: Option<&KillPoint>, output: &Path) -> Run {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child: Child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel::<(Duration, String)>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send((start.elapsed(), line)).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    // When the kill is due, once its mark has been seen.
    let mut due = kill.and_then(|k| matches!(k.after, After::Start).then(|| start + k.delay));
    let (mut temp_seen, mut temp_gone) = (None, None);
    let status = loop {
        let now = Instant::now();
        if temp_gone.is_none() {
            match (temp_seen, has_temp(output)) {
                (None, true) => {
                    temp_seen = Some(now - start);
                    if let Some(k) = kill.filter(|k| matches!(k.after, After::OutputTemp)) {
                        due = due.or(Some(now + k.delay));
                    }
                }
                (Some(_), false) => temp_gone = Some(now - start),
                _ => {}
            }
        }
        if due.is_some_and(|d| now >= d) {
            child.kill().expect("SIGKILL");
            break child.wait().expect("reaping a killed child");
        }
        if let Some(s) = child.try_wait().expect("waiting for a child") {
            break s;
        }
        assert!(
            now - start < DEADLINE,
            "{cmd:?} hung: running for {DEADLINE:?}"
        );
        // Woken by the next stderr line at once, so a kill timed from a line is precise;
        // the temp file is looked for every millisecond.
        let nap = due.map_or(Duration::from_millis(1), |d| {
            d.saturating_duration_since(now)
                .min(Duration::from_millis(1))
        });
        if let Ok((t, line)) = rx.recv_timeout(nap) {
            if let Some(After::Line(m)) = kill.map(|k| k.after) {
                if due.is_none() && line.contains(m) {
                    due = kill.map(|k| start + t + k.delay);
                }
            }
            lines.push((t, line));
        }
    };
    let took = start.elapsed();
    reader.join().expect("stderr reader");
    lines.extend(rx.try_iter());
    Run {
        status,
        lines,
        took,
        temp_seen,
        temp_gone,
    }
}

fn sha256(path: &Path) -> Option<Vec<u8>> {
    let bytes = fs::read(path).ok()?;
    Some(Sha256::digest(&bytes).to_vec())
}

/// `smolpack verify PATH`, which must pass.
fn verify(path: &Path) -> Result<(), String> {
    let o = Command::new(bin("smolpack", "smolpack"))
        .arg("verify")
        .arg(path)
        .output()
        .expect("running smolpack verify");
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "smolpack verify {}: {}",
            path.display(),
            describe(&o)
        ))
    }
}

/// The leftovers of writers in `dir`: temp files and smolpack scratch directories.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .expect("listing the output directory")
        .map(|e| e.expect("directory entry").file_name())
        .filter(|n| atomic::is_temp_name(n, None) || n.to_string_lossy().starts_with(".smolpack-"))
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Kills `s` at each point; after each, checks the output name, then runs `s` to completion
/// and checks that no leftover remains and the output verifies. Returns the problems found.
fn kill_at_points(s: &Subject, points: &[KillPoint]) -> Vec<String> {
    let dir = s.output.parent().expect("output directory").to_path_buf();
    let mut problems = Vec::new();
    let (mut killed, mut left_behind, mut replaced) = (0, 0, 0);
    for (i, point) in points.iter().enumerate() {
        if i % 2 == 0 {
            let _ = fs::remove_file(&s.output);
        }
        let before = sha256(&s.output);
        let r = run((s.command)(), Some(point), &s.output);
        let what = format!("{} killed at {point:?} (point {})", s.name, i + 1);
        if r.status.signal() == Some(libc::SIGKILL) {
            killed += 1;
        } else if r.status.code() != Some(s.success) {
            problems.push(format!(
                "{what}: ended uncut but failed: {:?}\n{}",
                r.status,
                r.stderr()
            ));
        }
        let left = leftovers(&dir);
        if !left.is_empty() {
            left_behind += 1;
        }
        eprintln!(
            "{what}: ended after {:?} ({:?}), left {left:?}",
            r.took, r.status
        );
        // The output name: absent, the previous file unchanged, or a complete file.
        let after = sha256(&s.output);
        if after.is_some() && after != before {
            replaced += 1;
            if let Err(e) = verify(&s.output) {
                problems.push(format!("{what}: a damaged file under the output name: {e}"));
            }
        }
        // The next run cleans up and completes.
        let again = run((s.command)(), None, &s.output);
        if again.status.code() != Some(s.success) {
            problems.push(format!(
                "{what}: the next run failed: {:?}\n{}",
                again.status,
                again.stderr()
            ));
            continue;
        }
        let left = leftovers(&dir);
        if !left.is_empty() {
            problems.push(format!("{what}: the next run left {left:?}"));
        }
        if let Err(e) = verify(&s.output) {
            problems.push(format!("{what}: the next run's output: {e}"));
        }
    }
    eprintln!(
        "{}: {} kill points, {killed} hit a running process, {left_behind} left a temp file \
         or scratch directory, {replaced} came after the new file was in place",
        s.name,
        points.len()
    );
    // Most points are inside the run; a machine much slower than the measured run could make
    // a few late ones miss, but never most of them.
    if killed * 2 < points.len() {
        problems.push(format!(
            "{}: only {killed} of {} kill points hit a running process",
            s.name,
            points.len()
        ));
    }
    problems
}

/// Points at i·T/30 (i = 1..30) and three random ones in 0..T.
fn even_and_random(test: &str, t: Duration) -> Vec<KillPoint> {
    let mut rng = Rng::from_env(test);
    let mut v: Vec<KillPoint> = (1..=EVEN_POINTS)
        .map(|i| KillPoint::at(t * i / EVEN_POINTS))
        .collect();
    v.extend((0..RANDOM_POINTS).map(|_| KillPoint::at(rng.below(t))));
    v
}

/// Measures an uncut run of `s` (which must succeed and leave nothing behind): the fastest
/// of `n`, so that the spread-out kill points fall inside the runs they kill.
fn uncut(s: &Subject, n: u32) -> Run {
    let r = (0..n)
        .map(|_| run((s.command)(), None, &s.output))
        .min_by_key(|r| r.took)
        .expect("at least one run");
    assert_eq!(
        r.status.code(),
        Some(s.success),
        "{}: the uncut run failed:\n{}",
        s.name,
        r.stderr()
    );
    verify(&s.output).unwrap();
    eprintln!("{}: one uncut run took {:?}", s.name, r.took);
    r
}

/// A machine with `mib` MiB of memory, every other page pseudo-random (so compressing and
/// copying it takes a measurable time).
fn big_machine(path: &Path, mib: usize) {
    let mut mem = vec![0u8; mib << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for page in mem.chunks_mut(8192) {
        for w in page[..4096].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
    }
    build_util::machine_with_memory(path, "kill-points", &mem, Compression::None);
}

/// Whether this smolpack carries the host's stub (a build with `SMOLPACK_NO_STUB_BUILD=1`
/// does not: then packing needs `--stub`).
fn carries_host_stub(test: &str) -> bool {
    let o = Command::new(bin("smolpack", "smolpack"))
        .args(["pack", "--list-targets"])
        .output()
        .expect("smolpack pack --list-targets");
    let listing = String::from_utf8_lossy(&o.stdout);
    let host = listing
        .lines()
        .any(|l| l.starts_with("x86_64-linux") && l.contains("carried,"));
    if !host {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: smolpack carries no x86_64-linux stub (CI=true requires it)");
        }
        eprintln!("SKIPPED: {test}: smolpack carries no x86_64-linux stub:\n{listing}");
    }
    host
}

#[test]
fn killed_pack_leaves_no_damaged_output() {
    let test = "killed_pack_leaves_no_damaged_output";
    if !carries_host_stub(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let machine = dir.path().join("in.smolmachine");
    big_machine(&machine, 48);
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let output = out_dir.join("app");
    let smolpack = bin("smolpack", "smolpack");
    let (m, o) = (machine.clone(), output.clone());
    // --compress: the pack verifies, compresses into a scratch directory, then writes the
    // executable; every kind of leftover is in play.
    let s = Subject {
        name: "smolpack pack --compress",
        command: Box::new(move || {
            let mut c = Command::new(&smolpack);
            c.arg("pack").arg(&m).arg("-o").arg(&o).arg("--compress");
            c
        }),
        success: 0,
        output,
    };
    let t = uncut(&s, 3).took;
    build_util::assert_no_problems(&kill_at_points(&s, &even_and_random(test, t)));
}

/// The test guest counts to `limit` and exits with `exit_status`.
const PARAMS: Params = Params {
    report_every: 1000,
    limit: 10_000,
    exit_status: 7,
};

/// The timing mark `smolvm run` prints before it saves the test guest.
const STOPPED: &str = "smolvm-timing guest-stopped";
/// Extra kill points inside the save of `smolvm run --save`.
const SAVE_POINTS: u32 = 6;

#[test]
fn killed_save_leaves_no_damaged_output() {
    let test = "killed_save_leaves_no_damaged_output";
    if !vmm_common::kvm_ready(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let machine = dir.path().join("guest.smolmachine");
    let (m, _) = testguest::boot_and_pause_at(&PARAMS, 3).expect("boot the test guest");
    m.save(
        &machine,
        &Manifest {
            name: "testguest".into(),
            ..Default::default()
        },
        Compression::None,
    )
    .expect("save the test guest");
    drop(m);
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let output = out_dir.join("saved.smolmachine");
    let smolvm = bin("smolvm", "smolvm");
    let (m, o) = (machine.clone(), output.clone());
    let s = Subject {
        name: "smolvm run --save",
        command: Box::new(move || {
            let mut c = Command::new(&smolvm);
            c.arg("run").arg("--save").arg(&o).arg(&m);
            // Timing marks on stderr as they happen: `guest-stopped` starts the save.
            c.env("SMOLVM_TIMINGS", "1");
            c
        }),
        success: i32::from(PARAMS.exit_status),
        output,
    };
    let r = uncut(&s, 3);
    let saved = MachineReader::open(&s.output).expect("the saved machine opens");
    assert_eq!(saved.manifest().unwrap().name, "testguest");
    let mut points = even_and_random(test, r.took);
    // The save is a few milliseconds of the run: a few more points inside it, timed from
    // the mark before it.
    let (stopped, saved) = (r.mark(STOPPED), r.mark("machine-saved"));
    let save_len = match (stopped, saved) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => panic!("no timing marks in:\n{}", r.stderr()),
    };
    eprintln!("{test}: the save took {save_len:?}");
    points.extend((0..SAVE_POINTS).map(|i| KillPoint {
        after: After::Line(STOPPED),
        delay: save_len * i / SAVE_POINTS,
    }));
    build_util::assert_no_problems(&kill_at_points(&s, &points));
}

/// The smallest Linux machine: busybox, no setup step, no service.
const SMOLFILE: &str = r#"
name = "killpoints"

[base]
type = "busybox"

[run]
cmd = ["/bin/true"]
"#;

#[test]
fn killed_build_leaves_no_damaged_output() {
    let test = "killed_build_leaves_no_damaged_output";
    let Some(guest) = build_util::guest(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let smolfile = dir.path().join("Smolfile");
    fs::write(&smolfile, SMOLFILE).unwrap();
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let output = out_dir.join("k.smolmachine");
    let smolpack = bin("smolpack", "smolpack");
    let (f, o) = (smolfile.clone(), output.clone());
    let s = Subject {
        name: "smolpack build",
        command: Box::new(move || {
            let mut c = Command::new(&smolpack);
            c.arg("build")
                .arg(&f)
                .arg("-o")
                .arg(&o)
                .arg("--kernel")
                .arg(&guest.kernel)
                .arg("--agent")
                .arg(&guest.agent);
            c
        }),
        success: 0,
        output,
    };
    let r = uncut(&s, 1);
    let points = if std::env::var("SMOLVM_SLOW_TESTS").as_deref() == Ok("1") {
        even_and_random(test, r.took)
    } else {
        // The phases as this run printed them: `[1/3] rootfs: ...`, `[2/3] boot: ...`,
        // `[3/3] save: ...`; kills are timed from the step line of the killed run itself,
        // so a slower or faster boot does not move them out of their phase. The save phase
        // also quiesces the guest and shuts it down after the write; its kills count from
        // the moment the output's temp file appears, spread over the write as measured.
        let mark = |step: &str| {
            r.mark(step)
                .unwrap_or_else(|| panic!("no {step:?} line in:\n{}", r.stderr()))
        };
        let (rootfs, boot, save) = (mark("] rootfs:"), mark("] boot:"), mark("] save:"));
        let (Some(seen), Some(gone)) = (r.temp_seen, r.temp_gone) else {
            panic!(
                "the uncut build's temp file was never seen:\n{}",
                r.stderr()
            );
        };
        let write = gone - seen;
        eprintln!(
            "{test}: rootfs {:?}, boot {:?}, save {:?} (the write {write:?})",
            boot - rootfs,
            save - boot,
            r.took - save
        );
        let mut v: Vec<KillPoint> = [1, 2, 3]
            .into_iter()
            .map(|i| KillPoint {
                after: After::Line("] rootfs:"),
                delay: (boot - rootfs) * i / 4,
            })
            .collect();
        v.push(KillPoint {
            after: After::Line("] boot:"),
            delay: (save - boot) / 2,
        });
        v.extend([0, 1, 2].into_iter().map(|i| KillPoint {
            after: After::OutputTemp,
            delay: write * i / 3,
        }));
        v
    };
    build_util::assert_no_problems(&kill_at_points(&s, &points));
}

#[test]
fn gc_removes_leftovers_but_not_a_live_writers_temp() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    fs::create_dir(&work).unwrap();
    let cache = dir.path().join("cache");
    let expanded = cache.join("expanded");
    fs::create_dir_all(&expanded).unwrap();

    // Leftovers of killed writers: unlocked temp files and scratch directories.
    let dead_temp = work.join(".app.4242.0.tmp");
    fs::write(&dead_temp, b"partial").unwrap();
    let dead_build = work.join(".smolpack-build-AbC123");
    fs::create_dir(&dead_build).unwrap();
    fs::write(dead_build.join("lock"), b"").unwrap();
    fs::write(dead_build.join("rootfs.ext4"), b"partial").unwrap();
    let dead_expanded = expanded.join(".0123abcd.smolmachine.4242.1.tmp");
    fs::write(&dead_expanded, b"partial").unwrap();
    let kept = work.join("app");
    fs::write(&kept, b"a finished file").unwrap();

    // A live writer, in the middle of writing (this process; gc is another one).
    let live_out = work.join("other.smolmachine");
    let mut live = MachineWriter::create(&live_out, Arch::X86_64).unwrap();
    live.add_manifest(&Manifest {
        name: "live".into(),
        ..Default::default()
    })
    .unwrap();
    let live_temps = leftovers(&work)
        .into_iter()
        .filter(|n| n.starts_with(".other.smolmachine."))
        .collect::<Vec<_>>();
    assert_eq!(live_temps.len(), 1, "{live_temps:?}");
    let live_temp = work.join(&live_temps[0]);

    let o = Command::new(bin("smolpack", "smolpack"))
        .arg("gc")
        .current_dir(&work)
        .env("SMOLVM_CACHE", &cache)
        .output()
        .expect("smolpack gc");
    assert!(o.status.success(), "{}", describe(&o));
    assert!(o.stderr.is_empty(), "{}", describe(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let mut lines: Vec<&str> = stdout.lines().collect();
    lines.sort();
    let mut want = vec![
        "removed ./.app.4242.0.tmp".to_string(),
        "removed ./.smolpack-build-AbC123".to_string(),
        format!("removed {}", dead_expanded.display()),
    ];
    want.sort();
    assert_eq!(lines, want, "{}", describe(&o));
    assert!(!dead_temp.exists() && !dead_build.exists() && !dead_expanded.exists());
    assert!(live_temp.exists(), "a live writer's temp file survives gc");
    assert!(kept.exists());
    // ... and the writer finishes its file.
    live.add_blob(SectionKind::VmState, b"state", Compression::None)
        .unwrap();
    let mem = vec![1u8; 65536];
    live.add_memory(
        &[GuestRegion {
            guest_addr: 0,
            data: &mem,
        }],
        Compression::None,
    )
    .unwrap();
    live.finish().unwrap();
    verify(&live_out).unwrap();
    assert!(!live_temp.exists());

    // Nothing left to remove: gc prints nothing.
    let o = Command::new(bin("smolpack", "smolpack"))
        .arg("gc")
        .arg(&work)
        .env("SMOLVM_CACHE", &cache)
        .output()
        .expect("smolpack gc");
    assert!(o.status.success(), "{}", describe(&o));
    assert!(o.stdout.is_empty(), "{}", describe(&o));

    // A directory that is not there is an error.
    let o = Command::new(bin("smolpack", "smolpack"))
        .arg("gc")
        .arg(dir.path().join("missing"))
        .env("SMOLVM_CACHE", &cache)
        .output()
        .expect("smolpack gc");
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("error: cannot clean ") && err.lines().count() == 1,
        "{err}"
    );
}
