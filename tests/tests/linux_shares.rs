//! Host directories shared into a real Linux guest (`smolvm run -v`): the
//! CI case (a read-only checkout whose scripts pass and fail, the host tree
//! byte-for-byte unchanged), the development case (a read-write directory
//! the guest changes, seen on the host exactly so and owned by the host
//! user), two machines sharing one directory at once, `--save` with shares,
//! and behind `SMOLVM_SLOW_TESTS=1` a 100 MiB file and 10 000 small files.

#[path = "linux_common/mod.rs"]
mod linux_common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Output;

use linux_common::{describe, fixture, smolvm, Fixture};
use sha2::{Digest, Sha256};

/// `smolvm run [-v SPEC]... FILE -- sh -c SCRIPT`.
fn run_sh(fx: &Fixture, file: &Path, vols: &[String], script: &str) -> Output {
    run_sh_with(fx, file, vols, &[], script)
}

fn run_sh_with(fx: &Fixture, file: &Path, vols: &[String], extra: &[&str], script: &str) -> Output {
    let mut args: Vec<std::ffi::OsString> = vec!["run".into()];
    for v in vols {
        args.push("-v".into());
        args.push(v.into());
    }
    args.extend(extra.iter().map(Into::into));
    args.extend([
        file.as_os_str().to_owned(),
        "--".into(),
        "sh".into(),
        "-c".into(),
        script.into(),
    ]);
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    smolvm(fx, &refs, b"")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Every entry under `dir`: relative path -> (mode, uid, content hash or
/// link target).
fn tree(dir: &Path) -> BTreeMap<String, (u32, u32, String)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u32, u32, String)>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let md = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let what = if md.file_type().is_symlink() {
                fs::read_link(&p).unwrap().display().to_string()
            } else if md.is_dir() {
                walk(root, &p, out);
                "dir".into()
            } else {
                format!("{:x}", Sha256::digest(fs::read(&p).unwrap()))
            };
            out.insert(rel, (md.mode(), md.uid(), what));
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

#[test]
fn ci_checkout_read_only_scripts_pass_and_fail_tree_unchanged() {
    let Some(fx) = fixture("ci_checkout_read_only_scripts_pass_and_fail_tree_unchanged") else {
        return;
    };
    let repo = tempfile::tempdir().unwrap();
    let r = repo.path();
    fs::create_dir_all(r.join("src/lib")).unwrap();
    fs::write(r.join("src/lib/data.txt"), "42\n").unwrap();
    fs::write(
        r.join("pass.sh"),
        "#!/bin/sh\nset -e\ntest \"$(cat /repo/src/lib/data.txt)\" = 42\necho tests passed\n",
    )
    .unwrap();
    fs::write(
        r.join("fail.sh"),
        "#!/bin/sh\necho one test failed >&2\nexit 3\n",
    )
    .unwrap();
    for s in ["pass.sh", "fail.sh"] {
        fs::set_permissions(r.join(s), fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::os::unix::fs::symlink("src/lib/data.txt", r.join("link")).unwrap();
    let before = tree(r);
    let vol = vec![format!("{}:/repo", r.display())];

    let o = run_sh(fx, &fx.machine, &vol, "/repo/pass.sh");
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert_eq!(stdout(&o), "tests passed\n");
    let o = run_sh(fx, &fx.machine, &vol, "/repo/fail.sh");
    assert_eq!(o.status.code(), Some(3), "{}", describe(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("one test failed"));

    // The guest cannot change a read-only share, even as root and even
    // after remounting it read-write.
    let o = run_sh(
        fx,
        &fx.machine,
        &vol,
        "cat /repo/link; ls /repo | sort | tr '\\n' ' '; echo; \
         for c in 'echo x > /repo/new' 'echo x >> /repo/pass.sh' 'rm /repo/fail.sh' \
                  'mv /repo/pass.sh /repo/p' 'mkdir /repo/d' 'chmod 777 /repo/pass.sh' \
                  'ln -s x /repo/l2' 'touch /repo/src/lib/data.txt'; do \
           if sh -c \"$c\" 2>/dev/null; then echo \"WROTE: $c\"; fi; done; \
         mount -o remount,rw /repo 2>/dev/null; \
         if sh -c 'echo x > /repo/new2' 2>/dev/null; then echo 'WROTE after remount'; fi; \
         echo done",
    );
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    let out = stdout(&o);
    assert!(out.starts_with("42\nfail.sh link pass.sh src \n"), "{out}");
    assert!(!out.contains("WROTE"), "{out}");
    assert!(out.ends_with("done\n"), "{out}");
    assert_eq!(tree(r), before, "the host tree changed");
}

#[test]
fn dev_directory_read_write_changes_reach_the_host_as_its_user() {
    let Some(fx) = fixture("dev_directory_read_write_changes_reach_the_host_as_its_user") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::write(d.join("old.txt"), "delete me\n").unwrap();
    fs::write(d.join("host.txt"), "from the host\n").unwrap();
    let vol = vec![format!("{}:/src:rw", d.display())];
    let o = run_sh(
        fx,
        &fx.machine,
        &vol,
        "set -e; cd /src; cat host.txt; \
         echo hello > a.txt; echo world >> a.txt; mv a.txt b.txt; \
         rm old.txt; chmod 640 b.txt; mkdir -p deep/er; echo x > deep/er/f; \
         chmod 4755 deep/er/f; ln -s b.txt lnk; \
         stat -c '%u %g %a' b.txt; stat -c '%a' deep/er/f",
    );
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    // The guest sees its files as root's, without the setuid bit.
    assert_eq!(stdout(&o), "from the host\n0 0 640\n755\n");
    assert_eq!(
        fs::read_to_string(d.join("b.txt")).unwrap(),
        "hello\nworld\n"
    );
    assert!(!d.join("a.txt").exists() && !d.join("old.txt").exists());
    // SAFETY: no arguments, no failure.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    for p in ["b.txt", "deep", "deep/er", "deep/er/f"] {
        let md = fs::metadata(d.join(p)).unwrap();
        assert_eq!((md.uid(), md.gid()), (uid, gid), "{p}");
    }
    assert_eq!(
        fs::metadata(d.join("b.txt")).unwrap().mode() & 0o7777,
        0o640
    );
    assert_eq!(
        fs::metadata(d.join("deep/er/f")).unwrap().mode() & 0o7777,
        0o755
    );
    assert_eq!(fs::read_link(d.join("lnk")).unwrap(), Path::new("b.txt"));
}

#[test]
fn two_machines_share_one_directory_at_once() {
    let Some(fx) = fixture("two_machines_share_one_directory_at_once") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let vol = vec![format!("{}:/shared:rw", dir.path().display())];
    // Each writes its file, then waits (up to 10 minutes) for the other's. The file is
    // written under another name and renamed into place: `echo > FILE` creates it empty
    // before it writes, and the other machine may look in between (and keep the empty
    // file's size in its attribute cache).
    let script = |me: &str, other: &str| {
        format!(
            "echo {me} > /shared/.{me}.tmp && mv /shared/.{me}.tmp /shared/{me}; i=0; \
             while [ ! -e /shared/{other} ] && [ $i -lt 6000 ]; do sleep 0.1; i=$((i+1)); done; \
             cat /shared/{other}"
        )
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| run_sh(fx, &fx.machine, &vol, &script("a", "b")));
        let b = s.spawn(|| run_sh(fx, &fx.machine, &vol, &script("b", "a")));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(a.status.code(), Some(0), "{}", describe(&a));
    assert_eq!(b.status.code(), Some(0), "{}", describe(&b));
    assert_eq!(stdout(&a), "b\n");
    assert_eq!(stdout(&b), "a\n");
}

#[test]
fn save_unmounts_shares_and_refuses_while_files_are_open() {
    let Some(fx) = fixture("save_unmounts_shares_and_refuses_while_files_are_open") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("f"), "host file\n").unwrap();
    let vol = vec![format!("{}:/data", dir.path().display())];
    let out = tempfile::tempdir().unwrap();
    let saved = out.path().join("saved.smolmachine");
    let save = ["--save", saved.to_str().unwrap()];
    // A background process keeps a file open: the save is refused in one line.
    let o = run_sh_with(
        fx,
        &fx.machine,
        &vol,
        &save,
        "sleep 600 < /data/f > /dev/null 2>&1 & echo started",
    );
    assert_eq!(o.status.code(), Some(125), "{}", describe(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    let line = err
        .lines()
        .find(|l| l.contains("still open"))
        .unwrap_or_else(|| panic!("no refusal line: {err}"));
    assert!(line.contains("/data"), "{line}");
    assert!(!saved.exists());
    // Nothing open: saved, and the saved machine holds no share.
    let o = run_sh_with(fx, &fx.machine, &vol, &save, "cat /data/f");
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert_eq!(stdout(&o), "host file\n");
    let o = run_sh(
        fx,
        &saved,
        &[],
        "test -e /data/f && echo mounted || echo gone",
    );
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert_eq!(stdout(&o), "gone\n");
    // Shares can be given again to the saved machine.
    let o = run_sh(fx, &saved, &vol, "cat /data/f");
    assert_eq!(stdout(&o), "host file\n", "{}", describe(&o));
}

fn slow() -> bool {
    let on = std::env::var("SMOLVM_SLOW_TESTS").as_deref() == Ok("1");
    if !on {
        eprintln!("SKIPPED: set SMOLVM_SLOW_TESTS=1 for the large-file and many-file cases");
    }
    on
}

/// Seconds a guest command took, from the `TAG=` line of its output (the
/// script subtracts two `/proc/uptime` readings).
fn elapsed(out: &str, tag: &str) -> f64 {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{tag}=")))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN)
}

#[test]
fn large_file_and_many_small_files() {
    if !slow() {
        return;
    }
    let Some(fx) = fixture("large_file_and_many_small_files") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A 100 MiB file of a known pattern, read in the guest.
    let big: Vec<u8> = (0..100u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    fs::write(d.join("big.in"), &big).unwrap();
    let want = format!("{:x}", Sha256::digest(&big));
    let vol = vec![format!("{}:/s:rw", d.display())];
    let t = |tag: &str, cmd: &str| {
        format!(
            "a=$(cut -d' ' -f1 /proc/uptime); {cmd}; b=$(cut -d' ' -f1 /proc/uptime); \
             awk \"BEGIN {{ print \\\"{tag}=\\\" $b - $a }}\""
        )
    };
    let script = [
        t("read", "sha256sum /s/big.in > /tmp/sum"),
        "cut -d' ' -f1 /tmp/sum".into(),
        t("write", "dd if=/dev/zero of=/s/big.out bs=1M count=100 2>/dev/null; sync"),
        t("localwrite", "dd if=/dev/zero of=/root/big.local bs=1M count=100 2>/dev/null; sync"),
        t("localread", "cat /root/big.local > /dev/null"),
        "rm /root/big.local".into(),
        t(
            "create",
            "mkdir /s/many; cd /s/many; i=0; while [ $i -lt 10000 ]; do echo $i > f$i; i=$((i+1)); done; cd /",
        ),
        t("find", "find /s/many -type f | wc -l > /tmp/count"),
        "cat /tmp/count".into(),
        t("stat", "stat -c %s /s/many/* > /dev/null"),
    ]
    .join("; ");
    let o = run_sh(fx, &fx.machine, &vol, &script);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines.contains(&want.as_str()),
        "checksum of the 100 MiB file: {out}"
    );
    assert!(lines.contains(&"10000"), "find count: {out}");
    assert_eq!(fs::metadata(d.join("big.out")).unwrap().len(), 100 << 20);
    assert_eq!(fs::read_dir(d.join("many")).unwrap().count(), 10000);
    assert_eq!(fs::read_to_string(d.join("many/f9999")).unwrap(), "9999\n");
    for tag in [
        "read",
        "write",
        "localwrite",
        "localread",
        "create",
        "find",
        "stat",
    ] {
        let s = elapsed(&out, tag);
        let rate = if ["read", "write", "localwrite", "localread"].contains(&tag) {
            format!(" ({:.0} MiB/s)", 100.0 / s)
        } else {
            String::new()
        };
        eprintln!("shares benchmark: {tag} {s:.2} s{rate}");
    }
}
