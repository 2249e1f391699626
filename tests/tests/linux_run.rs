//! A real Linux guest on the VMM: booted once (the shared fixture), saved,
//! then resumed by `smolvm run` for each behaviour: output, exit codes,
//! stdin, disk and memory state across the snapshot, pristine runs, fresh
//! entropy and clock, `--save`, concurrency, damaged files, reboot and
//! power-off, a compressed machine, a kernel that cannot find its root, and every smolvm
//! thread running under its seccomp filter.

#[path = "linux_common/mod.rs"]
mod linux_common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::SystemTime;

use linux_common::{describe, fixture, run_in, smolvm, Fixture, MARKER, MARKER_TEXT};
use smolvm_formats::{MachineReader, SectionKind};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ok_run(fx: &Fixture, file: &Path, argv: &[&str]) -> String {
    let o = run_in(fx, file, argv);
    assert_eq!(o.status.code(), Some(0), "{argv:?}: {}", describe(&o));
    stdout(&o)
}

#[test]
fn echo_output_arrives_after_resume() {
    let Some(fx) = fixture("echo_output_arrives_after_resume") else {
        return;
    };
    assert_eq!(
        ok_run(fx, &fx.machine, &["echo", "hello", "world"]),
        "hello world\n"
    );
    // Without `--` the manifest's cmd runs.
    let o = smolvm(fx, &["run".as_ref(), fx.machine.as_os_str()], b"");
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert_eq!(stdout(&o), "default command\n");
}

#[test]
fn exit_codes_and_signals_propagate() {
    let Some(fx) = fixture("exit_codes_and_signals_propagate") else {
        return;
    };
    let code = |argv: &[&str]| run_in(fx, &fx.machine, argv).status.code();
    assert_eq!(code(&["true"]), Some(0));
    assert_eq!(code(&["sh", "-c", "exit 3"]), Some(3));
    assert_eq!(code(&["sh", "-c", "kill -9 $$"]), Some(128 + 9));
}

#[test]
fn stdin_is_piped_through_byte_identical() {
    let Some(fx) = fixture("stdin_is_piped_through_byte_identical") else {
        return;
    };
    // 64 KiB of every byte value, in a pattern that is not periodic at 4 KiB.
    let input: Vec<u8> = (0..64u32 << 10)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let o = smolvm(
        fx,
        &[
            "run".as_ref(),
            fx.machine.as_os_str(),
            "--".as_ref(),
            "cat".as_ref(),
        ],
        &input,
    );
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert_eq!(o.stdout.len(), input.len());
    assert!(o.stdout == input, "cat returned different bytes");
}

fn fingerprint(p: &Path) -> (Vec<u8>, SystemTime) {
    (
        fs::read(p).unwrap(),
        fs::metadata(p).unwrap().modified().unwrap(),
    )
}

#[test]
fn runs_are_pristine_and_see_the_snapshot_disk() {
    let Some(fx) = fixture("runs_are_pristine_and_see_the_snapshot_disk") else {
        return;
    };
    let before = fingerprint(&fx.machine);
    let o = run_in(
        fx,
        &fx.machine,
        &["sh", "-c", &format!("cat {MARKER} && rm {MARKER}")],
    );
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert_eq!(
        stdout(&o).trim(),
        MARKER_TEXT,
        "file written before the snapshot"
    );
    // The deletion vanished with that run.
    assert_eq!(
        ok_run(fx, &fx.machine, &["cat", MARKER]).trim(),
        MARKER_TEXT
    );
    let after = fingerprint(&fx.machine);
    assert!(before.0 == after.0, "the machine file changed");
    assert_eq!(before.1, after.1, "the machine file's mtime changed");
}

#[test]
fn each_resume_gets_fresh_entropy_and_the_host_clock() {
    let Some(fx) = fixture("each_resume_gets_fresh_entropy_and_the_host_clock") else {
        return;
    };
    let now = || {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let script = "date +%s; head -c 16 /dev/urandom | od -An -tx1";
    let t0 = now();
    let a = ok_run(fx, &fx.machine, &["sh", "-c", script]);
    let t1 = now();
    let b = ok_run(fx, &fx.machine, &["sh", "-c", script]);
    let (a_time, a_rand) = a.split_once('\n').expect("two lines");
    let (_, b_rand) = b.split_once('\n').expect("two lines");
    assert_ne!(a_rand.trim(), "", "no random bytes: {a}");
    assert_ne!(
        a_rand, b_rand,
        "two resumes read the same /dev/urandom bytes"
    );
    // The guest's clock is the host's at resume: `date` ran between t0 and t1
    // (whole seconds, so allow the truncation of one second each side).
    let guest: f64 = a_time.trim().parse().expect("date +%s");
    assert!(
        guest >= t0.floor() - 1.0 && guest <= t1 + 1.0,
        "guest clock {guest} outside host interval [{t0}, {t1}]"
    );
}

#[test]
fn save_then_resume_the_saved_machine_twice() {
    let Some(fx) = fixture("save_then_resume_the_saved_machine_twice") else {
        return;
    };
    let dir = tempfile::tempdir_in(&fx.scratch).unwrap();
    let one = dir.path().join("one.smolmachine");
    let two = dir.path().join("two.smolmachine");
    let o = smolvm(
        fx,
        &[
            "run".as_ref(),
            "--save".as_ref(),
            one.as_os_str(),
            fx.machine.as_os_str(),
            "--".as_ref(),
            "sh".as_ref(),
            "-c".as_ref(),
            "echo first > /root/saved".as_ref(),
        ],
        b"",
    );
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    // A snapshot of a resumed machine resumes, and can be saved again.
    let o = smolvm(
        fx,
        &[
            "run".as_ref(),
            one.as_os_str(),
            "--save".as_ref(),
            two.as_os_str(),
            "--".as_ref(),
            "sh".as_ref(),
            "-c".as_ref(),
            "cat /root/saved; echo second >> /root/saved".as_ref(),
        ],
        b"",
    );
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert_eq!(stdout(&o), "first\n");
    // Saving over the file being run is safe: the writer renames a new file
    // into place while the running machine keeps the old one mapped.
    let o = smolvm(
        fx,
        &[
            "run".as_ref(),
            "--save".as_ref(),
            two.as_os_str(),
            two.as_os_str(),
            "--".as_ref(),
            "sh".as_ref(),
            "-c".as_ref(),
            "cat /root/saved; echo third >> /root/saved".as_ref(),
        ],
        b"",
    );
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert_eq!(stdout(&o), "first\nsecond\n");
    assert_eq!(
        ok_run(fx, &two, &["cat", "/root/saved"]),
        "first\nsecond\nthird\n"
    );
    // The original never saw any of it.
    let o = run_in(fx, &fx.machine, &["cat", "/root/saved"]);
    assert_ne!(o.status.code(), Some(0), "{}", describe(&o));
}

#[test]
fn eight_concurrent_runs_of_one_file() {
    let Some(fx) = fixture("eight_concurrent_runs_of_one_file") else {
        return;
    };
    let outs: Vec<_> = (0..8)
        .map(|i| {
            let file = fx.machine.clone();
            std::thread::spawn(move || {
                let fx = fixture("eight_concurrent_runs_of_one_file").unwrap();
                (i, run_in(fx, &file, &["echo", &format!("run {i}")]))
            })
        })
        .collect();
    for h in outs {
        let (i, o) = h.join().unwrap();
        assert_eq!(o.status.code(), Some(0), "run {i}: {}", describe(&o));
        assert_eq!(stdout(&o), format!("run {i}\n"));
    }
}

/// Copy the machine with one byte of `kind`'s section flipped.
fn with_flipped_byte(fx: &Fixture, kind: SectionKind, name: &str) -> std::path::PathBuf {
    let r = MachineReader::open(&fx.machine).unwrap();
    let s = r.section(kind).unwrap().clone();
    let dst = fx.scratch.join(name);
    fs::copy(&fx.machine, &dst).unwrap();
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dst)
        .unwrap();
    // A byte of stored data: for images, past the index at the section start.
    let at = s.file_offset + s.stored_len - 4096 - 17;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x20], at).unwrap();
    dst
}

#[test]
fn damaged_machines_are_refused_before_the_guest_runs() {
    let Some(fx) = fixture("damaged_machines_are_refused_before_the_guest_runs") else {
        return;
    };
    let mut cases = vec![
        (
            "memory",
            with_flipped_byte(fx, SectionKind::Memory, "bad-mem.smolmachine"),
        ),
        (
            "state",
            with_flipped_byte(fx, SectionKind::VmState, "bad-state.smolmachine"),
        ),
    ];
    let r = MachineReader::open(&fx.machine).unwrap();
    let disk = r
        .sections()
        .iter()
        .find(|s| s.kind == SectionKind::Disk)
        .unwrap()
        .clone();
    let dst = fx.scratch.join("bad-disk.smolmachine");
    fs::copy(&fx.machine, &dst).unwrap();
    let f = fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(&dst)
        .unwrap();
    let at = disk.file_offset + disk.stored_len / 2;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 1], at).unwrap();
    cases.push(("disk", dst));
    let cut = fx.scratch.join("truncated.smolmachine");
    let bytes = fs::read(&fx.machine).unwrap();
    fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    cases.push(("truncated", cut));
    for (what, file) in cases {
        let o = run_in(fx, &file, &["echo", "must not run"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(125), "{what}: {}", describe(&o));
        assert!(
            !stdout(&o).contains("must not run"),
            "{what}: {}",
            describe(&o)
        );
        assert!(err.contains("smolvm: cannot"), "{what}: {}", describe(&o));
        assert!(
            !err.contains("vcpus-started"),
            "{what}: the guest ran: {}",
            describe(&o)
        );
    }
}

#[test]
fn reboot_and_poweroff_end_the_vm() {
    let Some(fx) = fixture("reboot_and_poweroff_end_the_vm") else {
        return;
    };
    for cmd in ["reboot", "poweroff"] {
        let o = run_in(fx, &fx.machine, &[cmd]);
        assert_eq!(o.status.code(), Some(0), "{cmd}: {}", describe(&o));
    }
}

#[test]
fn compressed_machine_is_expanded_once_into_the_cache() {
    let Some(fx) = fixture("compressed_machine_is_expanded_once_into_the_cache") else {
        return;
    };
    assert!(
        fs::metadata(&fx.compressed).unwrap().len() < fs::metadata(&fx.machine).unwrap().len(),
        "compression made the file no smaller"
    );
    assert_eq!(
        ok_run(fx, &fx.compressed, &["cat", MARKER]).trim(),
        MARKER_TEXT
    );
    let cache = fx.scratch.join("cache/expanded");
    let entries: Vec<_> = fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let first = fs::metadata(&entries[0]).unwrap().modified().unwrap();
    assert_eq!(ok_run(fx, &fx.compressed, &["echo", "again"]), "again\n");
    assert_eq!(
        fs::metadata(&entries[0]).unwrap().modified().unwrap(),
        first
    );
}

#[test]
fn a_kernel_without_its_root_fails_readably() {
    let Some((kernel, rootfs)) =
        linux_common::artifacts("a_kernel_without_its_root_fails_readably")
    else {
        return;
    };
    let mut cfg = smolvm::linux::LinuxConfig::new(kernel, rootfs);
    cfg.extra_cmdline = "root=/dev/vdq".into();
    // The fixture boots through PVH (the default with this kernel); this one
    // takes the 64-bit entry with the zero page, so both protocols boot.
    cfg.boot_protocol = smolvm::linux::BootProtocol::Linux64;
    let err = match smolvm::linux::boot_linux(cfg) {
        Ok(_) => panic!("a guest without its root became ready"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("panicked"), "{err}");
    assert!(err.contains("last kernel console lines"), "{err}");
    assert!(
        err.contains("VFS"),
        "the console tail lacks the kernel's reason: {err}"
    );
}

/// Copy the fixture with `host_profile` in its manifest replaced.
fn with_host_profile(fx: &Fixture, profile: &str, name: &str) -> std::path::PathBuf {
    use smolvm_formats::{Arch, Compression, GuestRegion, MachineWriter};
    let r = MachineReader::open(&fx.machine).unwrap();
    let mut manifest = r.manifest().unwrap();
    manifest.host_profile = profile.into();
    let dst = fx.scratch.join(name);
    let mut w = MachineWriter::create(&dst, Arch::X86_64).unwrap();
    w.add_manifest(&manifest).unwrap();
    w.add_blob(
        SectionKind::VmState,
        &r.read_blob(SectionKind::VmState).unwrap(),
        Compression::None,
    )
    .unwrap();
    let layout = r.memory_layout().unwrap();
    let bufs: Vec<(u64, Vec<u8>)> = layout
        .regions
        .iter()
        .enumerate()
        .map(|(i, reg)| {
            let mut b = vec![0u8; reg.size as usize];
            r.read_memory_region(i, &mut b).unwrap();
            (reg.guest_addr, b)
        })
        .collect();
    let regions: Vec<GuestRegion<'_>> = bufs
        .iter()
        .map(|(a, b)| GuestRegion {
            guest_addr: *a,
            data: b,
        })
        .collect();
    w.add_memory(&regions, Compression::None).unwrap();
    for d in r.disks().unwrap() {
        let mut tmp = tempfile::tempfile_in(&fx.scratch).unwrap();
        r.extract_disk(&d, &tmp).unwrap();
        w.add_disk(&d.name, &mut tmp, Compression::None).unwrap();
    }
    w.finish().unwrap();
    dst
}

#[test]
fn a_hardware_built_machine_is_refused_on_pvm() {
    let Some(fx) = fixture("a_hardware_built_machine_is_refused_on_pvm") else {
        return;
    };
    if smolvm::host::HostProfile::detect() != smolvm::host::HostProfile::KvmPvm {
        eprintln!("a_hardware_built_machine_is_refused_on_pvm: not a PVM host; nothing to refuse");
        return;
    }
    let file = with_host_profile(fx, "kvm", "hardware-built.smolmachine");
    let o = run_in(fx, &file, &["echo", "must not run"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{}", describe(&o));
    assert!(
        err.contains("built on a 'kvm' host") && err.contains("'kvm-pvm'"),
        "{}",
        describe(&o)
    );
    assert!(!err.contains("vcpus-started"), "{}", describe(&o));
}

#[test]
fn a_packed_executable_resumes_its_linux_machine() {
    let Some(fx) = fixture("a_packed_executable_resumes_its_linux_machine") else {
        return;
    };
    let packed = fx.scratch.join("hello-packed");
    smolvm_formats::trailer::pack(&linux_common::smolvm_bin(), &fx.machine, &packed)
        .expect("packing the machine onto the smolvm stub");
    // Its arguments replace the manifest's cmd.
    let o = std::process::Command::new(&packed)
        .args(["sh", "-c", &format!("cat {MARKER}; exit 4")])
        .env("SMOLVM_CACHE", fx.scratch.join("cache"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", describe(&o));
    assert_eq!(stdout(&o).trim(), MARKER_TEXT);
}

#[test]
fn shell_reads_commands_from_piped_stdin() {
    let Some(fx) = fixture("shell_reads_commands_from_piped_stdin") else {
        return;
    };
    // Without a terminal, `smolvm shell` runs `/bin/sh -l` on pipes.
    let o = smolvm(
        fx,
        &["shell".as_ref(), fx.machine.as_os_str()],
        format!("cat {MARKER}\nexit 6\n").as_bytes(),
    );
    assert_eq!(o.status.code(), Some(6), "{}", describe(&o));
    assert_eq!(stdout(&o).trim(), MARKER_TEXT);
}

/// The host streams stdin into a guest command while the machine is saved
/// three times. The command sees every byte exactly once, and each saved
/// machine resumes with an agent that answers and a command whose output
/// through the same console is byte-exact. End to end only: the agent's
/// credit flow keeps host input from arriving inside a save's window in
/// practice, so the device pause itself is proven by
/// `device_manager::tests::console_flood_during_saves_restores_consistently`.
/// About 110 s on PVM besides the shared fixture (three saves of 256 MiB,
/// three resumes).
#[test]
fn saves_during_a_stdin_flood_resume_consistently() {
    use smolvm::linux::{resume_linux, ResumeOptions};
    use smolvm_agent::protocol::ExecRequest;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    let Some(fx) = fixture("saves_during_a_stdin_flood_resume_consistently") else {
        return;
    };
    let dir = tempfile::tempdir_in(&fx.scratch).unwrap();
    let t0 = std::time::Instant::now();
    let mut m = resume_linux(&fx.machine, ResumeOptions::default()).expect("resume the fixture");
    let mut h = m
        .agent()
        .exec(ExecRequest::new(["wc", "-c"]))
        .expect("start wc");
    let mut out = h.take_stdout().expect("wc's stdout");
    let written = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stdin = h.stdin();
        let (written, stop) = (written.clone(), stop.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut stdin = stdin;
            let chunk: Vec<u8> = (0..16 * 1024u32).map(|i| (i * 31 % 251) as u8).collect();
            while !stop.load(Ordering::SeqCst) {
                stdin.write_all(&chunk).expect("stdin of wc");
                written.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
        })
    };
    let wait_for_more = |from: u64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while written.load(Ordering::SeqCst) < from + 256 * 1024 {
            assert!(
                std::time::Instant::now() < deadline,
                "the stdin flood stalled"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    };
    let mut saved = Vec::new();
    for i in 0..3 {
        wait_for_more(written.load(Ordering::SeqCst));
        let file = dir.path().join(format!("flood-{i}.smolmachine"));
        m.save(
            &file,
            &Default::default(),
            smolvm_formats::Compression::None,
        )
        .expect("save during the flood");
        m.unpause().expect("unpause after the save");
        saved.push(file);
    }
    wait_for_more(written.load(Ordering::SeqCst));
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    h.close_stdin().unwrap();
    let mut counted = String::new();
    std::io::Read::read_to_string(&mut out, &mut counted).unwrap();
    assert_eq!(
        h.wait().unwrap(),
        smolvm_agent::protocol::ExitStatus::Code(0)
    );
    assert_eq!(
        counted.trim(),
        written.load(Ordering::SeqCst).to_string(),
        "wc saw another byte count than the host sent"
    );
    m.shutdown();
    eprintln!(
        "flood: {} bytes through 3 saves in {:.1} s",
        written.load(Ordering::SeqCst),
        t0.elapsed().as_secs_f64()
    );

    let expected: String = (1..=20000).map(|i| format!("{i}\n")).collect();
    for file in &saved {
        let r = resume_linux(file, ResumeOptions::default())
            .unwrap_or_else(|e| panic!("resuming {}: {e}", file.display()));
        r.agent().ping().expect("the resumed agent answers");
        let o = r.agent().run_capture(["seq", "1", "20000"]).unwrap();
        assert_eq!(o.status, smolvm_agent::protocol::ExitStatus::Code(0));
        assert!(
            o.stdout == expected.as_bytes(),
            "seq output differs after resuming {}",
            file.display()
        );
        r.shutdown();
    }
    eprintln!(
        "flood: saved machines resumed and checked after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn the_command_runs_with_every_smolvm_thread_under_seccomp() {
    use std::io::{BufRead, Write};
    let Some(fx) = fixture("the_command_runs_with_every_smolvm_thread_under_seccomp") else {
        return;
    };
    // The compressed machine: its expansion happens before the filters go on.
    let mut child = std::process::Command::new(linux_common::smolvm_bin())
        .args(["run".as_ref(), fx.compressed.as_os_str()])
        .args(["--", "sh", "-c", "echo ready; read line; echo got $line"])
        .env("SMOLVM_CACHE", fx.scratch.join("cache"))
        .env_remove("SMOLVM_SECCOMP")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    // The guest command runs: every thread of smolvm is filtered (mode 2); vCPU
    // threads carry their own filter on top of the VMM one.
    let mut threads = Vec::new();
    for t in fs::read_dir(format!("/proc/{}/task", child.id())).unwrap() {
        let Ok(status) = fs::read_to_string(t.unwrap().path().join("status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        threads.push((field("Name:"), field("Seccomp:"), field("Seccomp_filters:")));
    }
    assert!(threads.len() >= 3, "{threads:?}");
    for (name, mode, filters) in &threads {
        assert_eq!(mode, "2", "thread {name} runs unfiltered: {threads:?}");
        let want = if name.starts_with("vcpu") { "2" } else { "1" };
        if name != "kvm-nx-lpage-re" {
            assert_eq!(filters, want, "thread {name}: {threads:?}");
        }
    }
    assert!(threads.iter().any(|t| t.0 == "vcpu0"), "{threads:?}");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"input\n").unwrap();
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert_eq!(rest, "got input\n");
}
