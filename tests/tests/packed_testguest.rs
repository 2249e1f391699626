//! `smolpack pack` as a product, on the VMM test guest: a machine packed with the stub built
//! into smolpack (no `--stub`) runs as `./app` wherever the file goes (renamed, symlinked,
//! moved, two at once), reports the guest's exit status, and every kind of damage (strip,
//! truncation, flipped bytes) ends in a clear error and an exit status, never a signal or a
//! hang. `inspect` names the stub's target; `unpack` gives the machine back byte for byte.
//!
//! The machine tests need /dev/kvm and the assembled test guest: they skip loudly without
//! them, except under `CI=true`, where they fail. The packing tests without a guest (atomic
//! output, unpack errors, targets) run everywhere. Every process a test starts has a
//! deadline: a hang fails the test.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use smolvm::testguest::{self, Params};
use smolvm_formats::{trailer, Compression, MachineReader, Manifest, SectionKind};

mod build_util;
// The VMM tests' helpers: `kvm_ready` (KVM and the assembled test guest, or a loud skip).
#[path = "../../stub/tests/common/mod.rs"]
mod vmm_common;
use vmm_common::kvm_ready;

/// The test guest counts to `limit` and exits with `exit_status`.
const PARAMS: Params = Params {
    report_every: 1000,
    limit: 10_000,
    exit_status: 7,
};
/// How long one run of a packed executable may take: a resume and a few thousand guest
/// loop iterations take milliseconds; this only catches hangs.
const DEADLINE: Duration = Duration::from_secs(20);
/// How long a `smolpack` command may take.
const TOOL_DEADLINE: Duration = Duration::from_secs(300);

/// Runs `cmd` to completion with piped output; a run past `deadline` is killed and fails
/// the test.
fn run_until(mut cmd: Command, deadline: Duration) -> Output {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = spawn(&mut cmd);
    wait_until(child, deadline, &what)
}

/// Spawns `cmd`, retrying while the executable is "busy": tests write executables while
/// other test threads fork, and a child forked in between holds the written file open for
/// the moment until its exec (ETXTBSY).
fn spawn(cmd: &mut Command) -> Child {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Ok(c) => return c,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("spawning {cmd:?}: {e}"),
        }
    }
}

/// Collects a spawned child's output, killing it (and failing) past `deadline`.
fn wait_until(mut child: Child, deadline: Duration, what: &str) -> Output {
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let so = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let se = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for a child") {
            break s;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} hung: killed after {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: so.join().expect("stdout reader"),
        stderr: se.join().expect("stderr reader"),
    }
}

fn describe(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `smolpack ARGS...`.
fn smolpack(args: &[&std::ffi::OsStr]) -> Output {
    let mut cmd = Command::new(build_util::bin("smolpack", "smolpack"));
    cmd.args(args);
    run_until(cmd, TOOL_DEADLINE)
}

fn os(s: &str) -> &std::ffi::OsStr {
    s.as_ref()
}

/// `smolpack pack MACHINE -o OUT [EXTRA...]`, which must succeed.
fn pack(machine: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec![os("pack"), machine.as_os_str(), os("-o"), out.as_os_str()];
    args.extend(extra.iter().map(|a| os(a)));
    let o = smolpack(&args);
    assert!(o.status.success(), "smolpack pack failed: {}", describe(&o));
}

/// The one `error: ...` line of a failed smolpack command.
fn error_line(o: &Output) -> String {
    assert!(!o.status.success(), "expected a failure: {}", describe(o));
    let s = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(s.lines().count(), 1, "one stderr line: {}", describe(o));
    assert!(s.starts_with("error: "), "{}", describe(o));
    s
}

/// The test guest, snapshotted mid-count, packed raw and compressed; built once per test
/// binary.
struct Fixture {
    dir: tempfile::TempDir,
    machine: PathBuf,
    app: PathBuf,
    app_zstd: PathBuf,
}

fn fixture(test: &str) -> Option<&'static Fixture> {
    if !kvm_ready(test) {
        return None;
    }
    static FX: OnceLock<Fixture> = OnceLock::new();
    Some(FX.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let (m, reports) =
            testguest::boot_and_pause_at(&PARAMS, 3).expect("boot the test guest and pause it");
        assert_eq!(reports.len(), 3);
        let machine = dir.path().join("guest.smolmachine");
        let manifest = Manifest {
            name: "testguest".into(),
            ..Default::default()
        };
        m.save(&machine, &manifest, Compression::None)
            .expect("save the test guest");
        drop(m);
        let app = dir.path().join("app");
        pack(&machine, &app, &[]);
        let app_zstd = dir.path().join("app-zstd");
        pack(&machine, &app_zstd, &["--compress"]);
        Fixture {
            dir,
            machine,
            app,
            app_zstd,
        }
    }))
}

impl Fixture {
    /// A fresh scratch directory (removed with the fixture's).
    fn scratch(&self, name: &str) -> PathBuf {
        let d = self.dir.path().join(name);
        fs::create_dir_all(&d).expect("scratch dir");
        d
    }

    /// `exe` as a command, its cache in the fixture's directory.
    fn command(&self, exe: &Path) -> Command {
        let mut cmd = Command::new(exe);
        cmd.env("SMOLVM_CACHE", self.dir.path().join("cache"));
        // No trusted keys unless a test sets some: the host's trust directory stays out.
        cmd.env("SMOLVM_TRUST_DIR", self.dir.path().join("no-trust-dir"));
        cmd.env_remove("SMOLVM_TRUST");
        cmd
    }

    fn run(&self, exe: &Path) -> Output {
        run_until(self.command(exe), DEADLINE)
    }
}

/// A run that resumed the guest to its end: the guest's exit status and its line on stdout.
fn assert_guest_ran(o: &Output) {
    assert_eq!(
        o.status.code(),
        Some(i32::from(PARAMS.exit_status)),
        "the guest's exit status: {}",
        describe(o)
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("smolvm test guest"),
        "the guest's line on stdout: {}",
        describe(o)
    );
}

/// Why a run is not a clean failure (an exit status, no signal, non-zero, and one `smolvm:`
/// line on stderr), or `None` when it is.
fn unclean_failure(o: &Output) -> Option<&'static str> {
    let stderr = String::from_utf8_lossy(&o.stderr);
    if o.status.signal().is_some() {
        Some("killed by a signal")
    } else if o.status.success() {
        Some("succeeded")
    } else if stderr.lines().count() != 1 {
        Some("not exactly one stderr line")
    } else if !stderr.starts_with("smolvm: ") {
        Some("stderr is not a smolvm: line")
    } else {
        None
    }
}

fn assert_clean_failure(o: &Output, what: &str) {
    if let Some(why) = unclean_failure(o) {
        panic!("{what}: {why}: {}", describe(o));
    }
}

#[test]
fn packed_guest_runs_with_its_exit_status() {
    let Some(fx) = fixture("packed_guest_runs_with_its_exit_status") else {
        return;
    };
    let mode = fs::metadata(&fx.app).unwrap().permissions().mode();
    assert_eq!(mode & 0o111, 0o111, "the packed file is executable");
    let o = fx.run(&fx.app);
    assert_guest_ran(&o);
    // The file is never modified by running it.
    let again = fx.run(&fx.app);
    assert_guest_ran(&again);
    assert_eq!(o.stdout, again.stdout, "same machine, same output");
}

#[test]
fn renamed_symlinked_and_moved_copies_run() {
    let Some(fx) = fixture("renamed_symlinked_and_moved_copies_run") else {
        return;
    };
    let here = fx.scratch("copies");
    let renamed = here.join("renamed-app");
    fs::copy(&fx.app, &renamed).unwrap();
    let link = here.join("link-to-app");
    std::os::unix::fs::symlink(&renamed, &link).unwrap();
    let rel_link = here.join("relative-link");
    std::os::unix::fs::symlink("renamed-app", &rel_link).unwrap();
    let other = fx.scratch("elsewhere/deeper");
    let moved = other.join("app");
    fs::copy(&fx.app, &moved).unwrap();
    for exe in [&renamed, &link, &rel_link, &moved] {
        let o = fx.run(exe);
        assert_guest_ran(&o);
    }
    // Run from another working directory through a relative path.
    let mut cmd = fx.command(Path::new("./deeper/app"));
    cmd.current_dir(fx.dir.path().join("elsewhere"));
    assert_guest_ran(&run_until(cmd, DEADLINE));
}

#[test]
fn two_packed_files_run_at_once() {
    let Some(fx) = fixture("two_packed_files_run_at_once") else {
        return;
    };
    let copy = fx.scratch("twins").join("twin");
    fs::copy(&fx.app, &copy).unwrap();
    let start = |exe: &Path| {
        let mut cmd = fx.command(exe);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        spawn(&mut cmd)
    };
    // The same file twice and a copy, all running together.
    let children = [start(&fx.app), start(&fx.app), start(&copy)];
    for (i, c) in children.into_iter().enumerate() {
        let o = wait_until(c, DEADLINE, &format!("concurrent run {i}"));
        assert_guest_ran(&o);
    }
}

#[test]
fn compressed_pack_runs_and_is_smaller() {
    let Some(fx) = fixture("compressed_pack_runs_and_is_smaller") else {
        return;
    };
    let raw = fs::metadata(&fx.app).unwrap().len();
    let zstd = fs::metadata(&fx.app_zstd).unwrap().len();
    assert!(zstd < raw, "compressed {zstd} bytes, raw {raw}");
    let r = MachineReader::open(&fx.app_zstd).unwrap();
    let mem = r.section(SectionKind::Memory).unwrap();
    assert_eq!(mem.compression, Compression::Zstd);
    r.verify().unwrap();
    // The first run expands into the cache, later runs map it from there.
    assert_guest_ran(&fx.run(&fx.app_zstd));
    assert_guest_ran(&fx.run(&fx.app_zstd));
}

#[test]
fn stripped_copy_says_so() {
    let Some(fx) = fixture("stripped_copy_says_so") else {
        return;
    };
    let stripped = fx.scratch("strip").join("app");
    fs::copy(&fx.app, &stripped).unwrap();
    match Command::new("strip").arg(&stripped).status() {
        Ok(s) if s.success() => {}
        _ => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("`strip` (binutils) is required under CI=true");
            }
            eprintln!("SKIPPING stripped_copy_says_so: `strip` (binutils) is not installed");
            return;
        }
    }
    assert!(
        fs::metadata(&stripped).unwrap().len() < fs::metadata(&fx.app).unwrap().len(),
        "strip removed the payload"
    );
    let o = fx.run(&stripped);
    assert_clean_failure(&o, "stripped");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("strip"),
        "the message names strip: {}",
        describe(&o)
    );
    // The packer says the same.
    let out = fx.scratch("strip").join("m.smolmachine");
    let o = smolpack(&[
        os("unpack"),
        stripped.as_os_str(),
        os("-o"),
        out.as_os_str(),
    ]);
    let line = error_line(&o);
    assert!(
        line.contains("not a packed executable (no trailer; was it stripped?)"),
        "{line}"
    );
    assert!(!out.exists());
}

#[test]
fn truncated_files_fail_cleanly() {
    let Some(fx) = fixture("truncated_files_fail_cleanly") else {
        return;
    };
    let bytes = fs::read(&fx.app).unwrap();
    let t = trailer::locate_in(bytes.as_slice()).unwrap().unwrap();
    let len = bytes.len() as u64;
    let cuts = [
        ("inside the trailer", len - 1),
        (
            "at the start of the trailer",
            len - trailer::TRAILER_LEN + 8,
        ),
        ("at the end of the payload", len - trailer::TRAILER_LEN),
        ("inside the payload", t.payload_offset + t.payload_len / 2),
        ("after the payload header", t.payload_offset + 100),
        ("at the payload", t.payload_offset),
        ("just after the stub", t.stub_len),
    ];
    let dir = fx.scratch("truncated");
    let mut problems = Vec::new();
    for (what, cut) in cuts {
        let p = dir.join(format!("cut-{cut}"));
        fs::write(&p, &bytes[..cut as usize]).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        let o = fx.run(&p);
        if let Some(why) = unclean_failure(&o) {
            problems.push(format!(
                "truncated {what} (at byte {cut}): {why}: {}",
                describe(&o)
            ));
        }
    }
    build_util::assert_no_problems(&problems);
}

/// splitmix64: a small seeded generator, so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn flipped_payload_bytes_are_refused_before_the_guest_runs() {
    let Some(fx) = fixture("flipped_payload_bytes_are_refused_before_the_guest_runs") else {
        return;
    };
    let bytes = fs::read(&fx.app).unwrap();
    let r = MachineReader::open(&fx.app).unwrap();
    let base = r.base();
    let h = r.header();
    let table = (h.table_offset, u64::from(h.section_count) * 64);
    let sec = |k| {
        let s = r.section(k).unwrap();
        (s.offset, s.stored_len)
    };
    // Six flips in each part of the payload: (offset in the machine, length).
    let parts = [
        ("header", (0, 64)),
        ("table", table),
        ("manifest", sec(SectionKind::Manifest)),
        ("state", sec(SectionKind::VmState)),
        ("memory", sec(SectionKind::Memory)),
    ];
    let mut rng = Rng(0x5eed_f11b);
    let dir = fx.scratch("flips");
    let mut problems = Vec::new();
    for (part, (off, len)) in parts {
        for i in 0..6 {
            let at = base + off + rng.below(len);
            let bit = 1u8 << rng.below(8);
            let mut b = bytes.clone();
            b[at as usize] ^= bit;
            let p = dir.join(format!("{part}-{i}"));
            fs::write(&p, &b).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
            let o = fx.run(&p);
            let what = format!("{part}: bit {bit:#x} flipped at byte {at}");
            // Every flip is refused before the guest runs, memory included (its checksums
            // are checked first, even for bytes the guest would never read): one line,
            // status 125, no guest output. Never a signal, never a hang.
            if let Some(why) = unclean_failure(&o) {
                problems.push(format!("{what}: {why}: {}", describe(&o)));
            } else if o.status.code() != Some(125) || !o.stdout.is_empty() {
                problems.push(format!("{what}: not refused: {}", describe(&o)));
            }
        }
    }
    build_util::assert_no_problems(&problems);
}

#[test]
fn inspect_names_the_stub_target() {
    let Some(fx) = fixture("inspect_names_the_stub_target") else {
        return;
    };
    let o = smolpack(&[os("inspect"), fx.app.as_os_str()]);
    assert!(o.status.success(), "{}", describe(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("x86_64-linux (static)"), "{text}");
    let o = smolpack(&[os("inspect"), os("--json"), fx.app.as_os_str()]);
    assert!(o.status.success(), "{}", describe(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["packed"]["stub_target"], "x86_64-linux");
    assert_eq!(j["packed"]["stub_linkage"], "static");
    assert_eq!(j["packed"]["stub_check"], "ok");
    assert_eq!(j["ok"], true);
}

#[test]
fn unpack_round_trips_byte_for_byte() {
    let Some(fx) = fixture("unpack_round_trips_byte_for_byte") else {
        return;
    };
    let dir = fx.scratch("unpack");
    let out = dir.join("back.smolmachine");
    let o = smolpack(&[os("unpack"), fx.app.as_os_str(), os("-o"), out.as_os_str()]);
    assert!(o.status.success(), "{}", describe(&o));
    assert_eq!(
        fs::read(&out).unwrap(),
        fs::read(&fx.machine).unwrap(),
        "unpacked machine differs from the one packed"
    );
    // A packed executable is a valid input to pack: its payload is reused as is.
    let repacked = dir.join("repacked");
    pack(&fx.app, &repacked, &[]);
    assert_guest_ran(&fx.run(&repacked));
    let out2 = dir.join("back2.smolmachine");
    let o = smolpack(&[
        os("unpack"),
        repacked.as_os_str(),
        os("-o"),
        out2.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", describe(&o));
    assert_eq!(fs::read(&out2).unwrap(), fs::read(&fx.machine).unwrap());
}

#[test]
fn compressed_unpack_is_a_machine_that_runs_when_repacked() {
    let Some(fx) = fixture("compressed_unpack_is_a_machine_that_runs_when_repacked") else {
        return;
    };
    let dir = fx.scratch("unpack-zstd");
    let out = dir.join("zstd.smolmachine");
    let o = smolpack(&[
        os("unpack"),
        fx.app_zstd.as_os_str(),
        os("-o"),
        out.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", describe(&o));
    let o = smolpack(&[os("verify"), out.as_os_str()]);
    assert!(o.status.success(), "{}", describe(&o));
    let r = MachineReader::open(&out).unwrap();
    let orig = MachineReader::open(&fx.machine).unwrap();
    assert_eq!(r.manifest().unwrap(), orig.manifest().unwrap());
    assert_eq!(
        r.read_blob(SectionKind::VmState).unwrap(),
        orig.read_blob(SectionKind::VmState).unwrap()
    );
    // The same guest memory, byte for byte.
    let layout = orig.memory_layout().unwrap();
    for (i, reg) in layout.regions.iter().enumerate() {
        let mut a = vec![0u8; reg.size as usize];
        let mut b = vec![0u8; reg.size as usize];
        orig.read_memory_region(i, &mut a).unwrap();
        r.read_memory_region(i, &mut b).unwrap();
        assert!(a == b, "memory region {i} differs after compression");
    }
    let repacked = dir.join("repacked");
    pack(&out, &repacked, &[]);
    assert_guest_ran(&fx.run(&repacked));
}

// ---- Packing without a guest: a small synthetic machine is enough. ----

/// Whether this smolpack carries the x86_64-linux stub (the tests below need it).
fn carries_host_stub(test: &str) -> bool {
    let o = smolpack(&[os("pack"), os("--list-targets")]);
    assert!(o.status.success(), "{}", describe(&o));
    let list = String::from_utf8_lossy(&o.stdout);
    let carried = list
        .lines()
        .any(|l| l.starts_with("x86_64-linux") && l.contains("carried,"));
    if !carried && cfg!(all(target_arch = "x86_64", target_os = "linux")) {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: smolpack carries no x86_64-linux stub (CI=true requires it)");
        }
        eprintln!("SKIPPING {test}: this smolpack was built without its x86_64-linux stub");
    }
    carried
}

/// Every file in `dir` (to catch leftover temporary files).
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn failed_pack_leaves_no_output_and_keeps_an_existing_one() {
    if !carries_host_stub("failed_pack_leaves_no_output_and_keeps_an_existing_one") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.smolmachine");
    build_util::sample_machine(&m, "sample");
    // Damage a byte of memory data: the header still opens, the checksum fails.
    let r = MachineReader::open(&m).unwrap();
    let data_at = r.memory_layout().unwrap().regions[0]
        .runs
        .iter()
        .find(|x| !x.zero)
        .and_then(|x| x.file_offset)
        .unwrap();
    drop(r);
    let mut bytes = fs::read(&m).unwrap();
    bytes[data_at as usize] ^= 0xff;
    let bad = dir.path().join("bad.smolmachine");
    fs::write(&bad, &bytes).unwrap();

    for compress in [false, true] {
        let flags: &[&str] = if compress { &["--compress"] } else { &[] };
        let out = dir.path().join("app");
        let before = listing(dir.path());
        let mut args = vec![os("pack"), bad.as_os_str(), os("-o"), out.as_os_str()];
        args.extend(flags.iter().map(|a| os(a)));
        let line = error_line(&smolpack(&args));
        assert!(line.contains("checksum"), "{line}");
        assert!(!out.exists(), "no output after a failed pack");
        assert_eq!(listing(dir.path()), before, "no temporary files left");

        // An existing output is left untouched.
        fs::write(&out, b"keep me").unwrap();
        let before = listing(dir.path());
        error_line(&smolpack(&args));
        assert_eq!(fs::read(&out).unwrap(), b"keep me");
        assert_eq!(listing(dir.path()), before, "no temporary files left");
        fs::remove_file(&out).unwrap();
    }
    // A good pack over an existing file replaces it.
    let out = dir.path().join("app");
    fs::write(&out, b"old").unwrap();
    pack(&m, &out, &[]);
    assert_eq!(MachineReader::open(&out).unwrap().len(), {
        fs::metadata(&m).unwrap().len()
    });
}

#[test]
fn pack_unpack_round_trip_without_a_guest() {
    if !carries_host_stub("pack_unpack_round_trip_without_a_guest") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.smolmachine");
    build_util::sample_machine(&m, "sample");
    for (flags, name) in [(&[][..], "raw"), (&["--compress"][..], "zstd")] {
        let app = dir.path().join(format!("app-{name}"));
        pack(&m, &app, flags);
        let t = trailer::verify_packed(fs::File::open(&app).unwrap(), None).unwrap();
        assert_eq!(t.payload_offset % 65536, 0);
        let back = dir.path().join(format!("back-{name}.smolmachine"));
        let o = smolpack(&[os("unpack"), app.as_os_str(), os("-o"), back.as_os_str()]);
        assert!(o.status.success(), "{}", describe(&o));
        if name == "raw" {
            assert_eq!(fs::read(&back).unwrap(), fs::read(&m).unwrap());
        } else {
            let r = MachineReader::open(&back).unwrap();
            r.verify().unwrap();
            let mut got = vec![0u8; 64 * 4096];
            r.read_memory_region(0, &mut got).unwrap();
            let mut want = vec![0u8; 64 * 4096];
            MachineReader::open(&m)
                .unwrap()
                .read_memory_region(0, &mut want)
                .unwrap();
            assert!(got == want);
            assert_eq!(
                r.section(SectionKind::Memory).unwrap().compression,
                Compression::Zstd
            );
        }
    }
}

#[test]
fn unpack_refuses_what_is_not_packed() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.smolmachine");
    build_util::sample_machine(&m, "sample");
    let out = dir.path().join("out.smolmachine");
    let line = error_line(&smolpack(&[
        os("unpack"),
        m.as_os_str(),
        os("-o"),
        out.as_os_str(),
    ]));
    assert!(line.contains("not a packed executable"), "{line}");
    let line = error_line(&smolpack(&[
        os("unpack"),
        os("/bin/true"),
        os("-o"),
        out.as_os_str(),
    ]));
    assert!(
        line.contains("not a packed executable (no trailer; was it stripped?)"),
        "{line}"
    );
    assert!(!out.exists());
}

#[test]
fn targets_are_listed_and_checked() {
    let o = smolpack(&[os("pack"), os("--list-targets")]);
    assert!(o.status.success(), "{}", describe(&o));
    let list = String::from_utf8_lossy(&o.stdout);
    for name in ["x86_64-linux", "aarch64-linux", "aarch64-macos"] {
        assert!(list.lines().any(|l| l.starts_with(name)), "{list}");
    }
    assert!(list.contains("applevisor"), "{list}");

    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.smolmachine");
    build_util::sample_machine(&m, "sample");
    let out = dir.path().join("app");
    let try_target = |t: &str| {
        error_line(&smolpack(&[
            os("pack"),
            m.as_os_str(),
            os("-o"),
            out.as_os_str(),
            os("--target"),
            os(t),
        ]))
    };
    let line = try_target("riscv64-linux");
    assert!(
        line.contains("unknown target") && line.contains("x86_64-linux"),
        "{line}"
    );
    let line = try_target("aarch64-macos");
    assert!(
        line.contains(
            "the aarch64-macos stub will be added with the Apple Silicon backend (applevisor)"
        ),
        "{line}"
    );
    // An x86_64 machine for aarch64-linux: refused for its architecture where this build
    // carries the aarch64 stub, else because it does not.
    let line = try_target("aarch64-linux");
    if list
        .lines()
        .any(|l| l.starts_with("aarch64-linux") && l.contains("carried,"))
    {
        assert!(
            line.contains(
                "is a machine for x86_64, but aarch64-linux stubs resume aarch64 machines"
            ),
            "{line}"
        );
    } else {
        assert!(line.contains("scripts/setup --aarch64"), "{line}");
    }
    assert!(!out.exists());

    // A stub for another target than the one asked for is refused.
    let line = error_line(&smolpack(&[
        os("pack"),
        m.as_os_str(),
        os("-o"),
        out.as_os_str(),
        os("--target"),
        os("aarch64-linux"),
        os("--stub"),
        os("/bin/true"),
    ]));
    assert!(
        line.contains("not on the requested target aarch64-linux"),
        "{line}"
    );
    assert!(!out.exists());
}

/// On an x86_64 host, `smolpack pack --target aarch64-linux` packs an aarch64 machine onto
/// the embedded aarch64 stub (where this build carries it: x86_64 CI does), and
/// `--list-targets` shows both Linux targets carried.
#[test]
fn aarch64_machines_pack_for_aarch64_linux() {
    let o = smolpack(&[os("pack"), os("--list-targets")]);
    let list = String::from_utf8_lossy(&o.stdout).into_owned();
    let carried = |name: &str| {
        list.lines()
            .any(|l| l.starts_with(name) && l.contains("carried,"))
    };
    if !carried("aarch64-linux") {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true") || !cfg!(target_arch = "x86_64"),
            "CI=true: smolpack must carry the aarch64-linux stub: {list}"
        );
        eprintln!("SKIP: this smolpack does not carry the aarch64-linux stub:\n{list}");
        return;
    }
    assert!(carried("x86_64-linux"), "{list}");
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("arm.smolmachine");
    let mut mem = vec![0u8; 16 * 4096];
    mem[4096..8192].fill(0x5a);
    build_util::machine_for_arch(
        &m,
        "arm",
        &mem,
        Compression::None,
        smolvm_formats::Arch::Aarch64,
    );
    let app = dir.path().join("arm-app");
    let o = smolpack_ok(&[
        os("pack"),
        m.as_os_str(),
        os("-o"),
        app.as_os_str(),
        os("--target"),
        os("aarch64-linux"),
    ]);
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("for aarch64-linux"), "{said}");
    let file = fs::File::open(&app).unwrap();
    let id = trailer::elf_identity(&file).unwrap();
    assert_eq!(id.machine, 183, "EM_AARCH64: {id:?}");
    assert!(!id.dynamic, "static: {id:?}");
    trailer::verify_packed(fs::File::open(&app).unwrap(), None).unwrap();
    assert_eq!(
        MachineReader::open(&app).unwrap().arch(),
        smolvm_formats::Arch::Aarch64
    );
    let o = smolpack_ok(&[os("inspect"), app.as_os_str()]);
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("stub aarch64-linux (static)"), "{said}");
    // The same machine for x86_64-linux (the default here): one line, nothing written.
    let out = dir.path().join("x86-app");
    let line = error_line(&smolpack(&[
        os("pack"),
        m.as_os_str(),
        os("-o"),
        out.as_os_str(),
        os("--target"),
        os("x86_64-linux"),
    ]));
    assert!(
        line.contains("is a machine for aarch64, but x86_64-linux stubs resume x86_64 machines"),
        "{line}"
    );
    assert!(!out.exists());
}

/// `smolpack ARGS...`, which must succeed.
fn smolpack_ok(args: &[&std::ffi::OsStr]) -> Output {
    let o = smolpack(args);
    assert!(
        o.status.success(),
        "smolpack {args:?} failed: {}",
        describe(&o)
    );
    o
}

/// A run refused by the trust check: exit 125, one `smolvm:` line containing `needle`, and
/// the guest never ran.
fn assert_refused(o: &Output, needle: &str, what: &str) {
    assert_clean_failure(o, what);
    assert_eq!(o.status.code(), Some(125), "{what}: {}", describe(o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains(needle),
        "{what}: wanted {needle:?}: {}",
        describe(o)
    );
    assert!(
        o.stdout.is_empty(),
        "{what}: the guest ran: {}",
        describe(o)
    );
}

#[test]
fn signed_machines_run_only_with_a_trusted_signature() {
    let Some(fx) = fixture("signed_machines_run_only_with_a_trusted_signature") else {
        return;
    };
    let d = fx.scratch("signed");
    for k in ["a", "b"] {
        smolpack_ok(&[os("keygen"), os("-o"), d.join(k).as_os_str()]);
    }
    let (a_key, a_pub, b_pub) = (d.join("a.key"), d.join("a.pub"), d.join("b.pub"));
    let signed = d.join("signed.smolmachine");
    fs::copy(&fx.machine, &signed).unwrap();
    smolpack_ok(&[
        os("sign"),
        os("--key"),
        a_key.as_os_str(),
        signed.as_os_str(),
    ]);
    let o = smolpack_ok(&[
        os("verify"),
        os("--key"),
        a_pub.as_os_str(),
        signed.as_os_str(),
    ]);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("ok: "));
    let e = error_line(&smolpack(&[
        os("verify"),
        os("--key"),
        b_pub.as_os_str(),
        signed.as_os_str(),
    ]));
    assert!(e.contains("not a trusted key"), "{e}");

    let smolvm = build_util::bin("smolvm", "smolvm");
    let run = |file: &Path, trust: &[&Path], env: &[(&str, &std::ffi::OsStr)]| {
        let mut cmd = fx.command(&smolvm);
        cmd.arg("run");
        for t in trust {
            cmd.arg("--trust").arg(t);
        }
        cmd.arg(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        run_until(cmd, DEADLINE)
    };
    // No trust configured: signed and unsigned both run.
    assert_guest_ran(&run(&signed, &[], &[]));
    assert_guest_ran(&run(&fx.machine, &[], &[]));
    // --trust, SMOLVM_TRUST and the trust directory each require the signature.
    assert_guest_ran(&run(&signed, &[&a_pub], &[]));
    assert_guest_ran(&run(&signed, &[&b_pub, &a_pub], &[]));
    assert_guest_ran(&run(&signed, &[], &[("SMOLVM_TRUST", a_pub.as_os_str())]));
    let trust_dir = d.join("trust.d");
    fs::create_dir_all(&trust_dir).unwrap();
    fs::copy(&a_pub, trust_dir.join("release.pub")).unwrap();
    let dir_env = [("SMOLVM_TRUST_DIR", trust_dir.as_os_str())];
    assert_guest_ran(&run(&signed, &[], &dir_env));
    assert_refused(
        &run(&fx.machine, &[&a_pub], &[]),
        "is not signed",
        "unsigned, --trust",
    );
    assert_refused(
        &run(&fx.machine, &[], &dir_env),
        "is not signed",
        "unsigned, trust dir",
    );
    assert_refused(
        &run(&signed, &[&b_pub], &[]),
        "not a trusted key",
        "another key",
    );
    let env_b = [("SMOLVM_TRUST", b_pub.as_os_str())];
    assert_refused(
        &run(&signed, &[], &env_b),
        "not a trusted key",
        "SMOLVM_TRUST other key",
    );
    let missing = d.join("missing.pub");
    assert_refused(
        &run(&signed, &[&missing], &[]),
        "cannot read trusted key",
        "missing key",
    );

    // A byte of memory changed after signing, every checksum resealed: refused before the
    // guest runs.
    let mut bytes = fs::read(&signed).unwrap();
    let r = MachineReader::open(&signed).unwrap();
    let mem = r.section(SectionKind::Memory).unwrap().file_offset as usize;
    bytes[mem + 100] ^= 0x5a;
    smolvm_formats::testing::reseal(&mut bytes);
    let tampered = d.join("tampered.smolmachine");
    fs::write(&tampered, &bytes).unwrap();
    assert_refused(
        &run(&tampered, &[&a_pub], &[]),
        "bad signature",
        "tampered memory",
    );

    // Packed: the executable carries the signature, through unpack and pack again.
    let app = d.join("app");
    pack(&signed, &app, &[]);
    let trust_a = [("SMOLVM_TRUST", a_pub.as_os_str())];
    let run_app = |exe: &Path, env: &[(&str, &std::ffi::OsStr)]| {
        let mut cmd = fx.command(exe);
        for (k, v) in env {
            cmd.env(k, v);
        }
        run_until(cmd, DEADLINE)
    };
    assert_guest_ran(&run_app(&app, &trust_a));
    assert_refused(
        &run_app(&app, &env_b),
        "not a trusted key",
        "packed, other key",
    );
    assert_refused(
        &run_app(&fx.app, &trust_a),
        "is not signed",
        "unsigned packed",
    );
    let back = d.join("back.smolmachine");
    smolpack_ok(&[os("unpack"), app.as_os_str(), os("-o"), back.as_os_str()]);
    let again = d.join("again");
    pack(&back, &again, &[]);
    assert_guest_ran(&run_app(&again, &trust_a));
    // Compressing drops the signature unless pack signs again with --key.
    let zstd = d.join("app-zstd");
    let o = smolpack_ok(&[
        os("pack"),
        signed.as_os_str(),
        os("-o"),
        zstd.as_os_str(),
        os("--compress"),
    ]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("dropped"),
        "{}",
        describe(&o)
    );
    assert_refused(
        &run_app(&zstd, &trust_a),
        "is not signed",
        "compressed, unsigned",
    );
    let o = smolpack_ok(&[
        os("pack"),
        signed.as_os_str(),
        os("-o"),
        zstd.as_os_str(),
        os("--compress"),
        os("--key"),
        a_key.as_os_str(),
    ]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("signed by key"),
        "{}",
        describe(&o)
    );
    assert_guest_ran(&run_app(&zstd, &trust_a));
    // Signing a packed executable in place keeps it runnable and signs its payload.
    let unsigned_app = d.join("unsigned-app");
    fs::copy(&fx.app, &unsigned_app).unwrap();
    smolpack_ok(&[
        os("sign"),
        os("--key"),
        a_key.as_os_str(),
        unsigned_app.as_os_str(),
    ]);
    assert_guest_ran(&run_app(&unsigned_app, &trust_a));
    smolpack_ok(&[
        os("verify"),
        os("--key"),
        a_pub.as_os_str(),
        unsigned_app.as_os_str(),
    ]);
}
