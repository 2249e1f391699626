//! `smolpack inspect`, `verify` and `pack` as a user runs them: output, JSON, exit codes and
//! the one-line `error: ...` on failure.

mod build_util;

use std::fs;
use std::process::{Command, Output};

fn run(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(build_util::bin("smolpack", "smolpack"))
        .args(args)
        .output()
        .expect("running smolpack")
}

fn stderr_line(o: &Output) -> String {
    let s = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(s.lines().count(), 1, "stderr must be one line, got {s:?}");
    assert!(s.starts_with("error: "), "{s:?}");
    s
}

#[test]
fn inspect_and_verify_a_good_machine() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.smolmachine");
    build_util::sample_machine(&m, "cli");

    let o = run(&["inspect".as_ref(), m.as_os_str()]);
    assert!(o.status.success(), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("\"cli\""), "{out}");
    assert!(out.contains("96.9% zero pages"), "{out}");
    assert!(out.contains("mappable in place"), "{out}");
    assert!(
        out.contains("integrity: header+table ok, sections ok, padding ok"),
        "{out}"
    );

    let o = run(&["inspect".as_ref(), "--json".as_ref(), m.as_os_str()]);
    assert!(o.status.success());
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("valid JSON");
    assert_eq!(j["ok"], true);
    assert_eq!(j["arch"], "x86_64");
    assert_eq!(j["manifest"]["name"], "cli");
    let sections = j["sections"].as_array().unwrap();
    assert_eq!(sections.len(), 3);
    assert!(sections.iter().all(|s| s["status"] == "ok"));
    assert_eq!(sections[1]["compression"], "zstd");
    assert_eq!(j["memory"]["total_bytes"], 64 * 4096);
    assert_eq!(j["memory"]["data_bytes"], 2 * 4096);
    assert_eq!(j["memory"]["mappable"], true);
    assert!(j["packed"].is_null());

    let o = run(&[
        "inspect".as_ref(),
        "--no-verify".as_ref(),
        "--json".as_ref(),
        m.as_os_str(),
    ]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["sections"][0]["status"], "unchecked");

    let o = run(&["verify".as_ref(), m.as_os_str()]);
    assert!(o.status.success(), "{o:?}");
    assert!(o.stderr.is_empty());
}

#[test]
fn damage_gives_one_error_line_and_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.smolmachine");
    build_util::sample_machine(&m, "cli");
    let mut bytes = fs::read(&m).unwrap();
    // The first data byte of guest memory (the memory section is 64 KiB aligned).
    bytes[65536] ^= 0xff;
    let bad = dir.path().join("bad.smolmachine");
    fs::write(&bad, &bytes).unwrap();

    let o = run(&["verify".as_ref(), bad.as_os_str()]);
    assert!(!o.status.success());
    let line = stderr_line(&o);
    assert!(line.contains("checksum mismatch"), "{line}");

    // inspect still shows the report, marks the section, and fails.
    let o = run(&["inspect".as_ref(), bad.as_os_str()]);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("sections FAILED"), "{out}");
    stderr_line(&o);

    // Truncated: refused at open.
    fs::write(&bad, &bytes[..1000]).unwrap();
    let o = run(&["inspect".as_ref(), bad.as_os_str()]);
    assert!(!o.status.success());
    assert!(stderr_line(&o).contains("truncated"));

    let o = run(&["verify".as_ref(), dir.path().join("missing").as_os_str()]);
    assert!(!o.status.success());
    stderr_line(&o);
}

#[test]
fn pack_then_inspect_run_and_strip() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.smolmachine");
    build_util::sample_machine(&m, "cli");
    let stub = dir.path().join("stub");
    fs::copy("/bin/true", &stub).unwrap();
    let app = dir.path().join("app");
    let o = run(&[
        "pack".as_ref(),
        "--stub".as_ref(),
        stub.as_os_str(),
        m.as_os_str(),
        "-o".as_ref(),
        app.as_os_str(),
    ]);
    assert!(o.status.success(), "{o:?}");
    assert!(
        Command::new(&app).status().unwrap().success(),
        "stub still runs"
    );

    let o = run(&["inspect".as_ref(), "--json".as_ref(), app.as_os_str()]);
    assert!(o.status.success(), "{o:?}");
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["packed"]["stub_check"], "ok");
    assert_eq!(j["packed"]["payload_offset"].as_u64().unwrap() % 65536, 0);
    assert_eq!(j["ok"], true);
    let o = run(&["verify".as_ref(), app.as_os_str()]);
    assert!(o.status.success(), "{o:?}");

    // Packing onto an already packed executable is refused.
    let o = run(&[
        "pack".as_ref(),
        "--stub".as_ref(),
        app.as_os_str(),
        m.as_os_str(),
        "-o".as_ref(),
        dir.path().join("x").as_os_str(),
    ]);
    assert!(!o.status.success());
    stderr_line(&o);

    let stripped = dir.path().join("stripped");
    fs::copy(&app, &stripped).unwrap();
    match Command::new("strip").arg(&stripped).status() {
        Ok(s) if s.success() => {
            let o = run(&["inspect".as_ref(), stripped.as_os_str()]);
            assert!(!o.status.success());
            assert!(stderr_line(&o).contains("strip"));
        }
        _ => eprintln!("SKIP strip check: `strip` (binutils) is not installed"),
    }
}

#[test]
fn absurd_guest_memory_claims_are_refused_in_one_line() {
    use smolvm_formats::{Arch, Compression, GuestRegion, MachineWriter, Manifest, SectionKind};
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("huge.smolmachine");
    // Four one-page regions, then each claims 1 TiB: a file of a few hundred KiB that
    // claims 4 TiB of guest memory.
    let page = [1u8; 4096];
    let regions: Vec<GuestRegion<'_>> = (0..4)
        .map(|i| GuestRegion {
            guest_addr: i << 30,
            data: &page,
        })
        .collect();
    let mut w = MachineWriter::create(&m, Arch::X86_64).unwrap();
    w.add_manifest(&Manifest {
        name: "huge".into(),
        vcpus: 1,
        memory_bytes: 4 << 12,
        ..Default::default()
    })
    .unwrap();
    w.add_blob(SectionKind::VmState, b"state", Compression::None)
        .unwrap();
    w.add_memory(&regions, Compression::None).unwrap();
    w.finish().unwrap();
    let mut bytes = fs::read(&m).unwrap();
    smolvm_formats::testing::inflate(&mut bytes, SectionKind::Memory, 1 << 40, false);
    fs::write(&m, &bytes).unwrap();
    let claim = "machine claims 4096 GiB of guest memory, more than the 1024 GiB limit";

    let o = build_util::smolvm_run(&m, &[]);
    assert_eq!(o.status.code(), Some(125), "{}", build_util::describe(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        err.trim_end(),
        format!("smolvm: cannot run {}: {claim}", m.display()),
        "{}",
        build_util::describe(&o)
    );

    for cmd in ["inspect", "verify"] {
        let o = run(&[cmd.as_ref(), m.as_os_str()]);
        assert!(!o.status.success(), "{cmd}: {o:?}");
        assert!(stderr_line(&o).contains(claim), "{cmd}: {o:?}");
    }
}
