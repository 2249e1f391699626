//! The busybox root filesystem: layout, agent install, copies, sizing and atomic output.

mod rootfs_util;

use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rootfs_util::*;
use smolvm_rootfs::{build, default_size, Base, Error, RootfsSpec};

#[test]
fn busybox_image_has_userland_etc_and_agent() {
    if !prerequisites() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("bb.ext4");
    let agent = agent();
    let info = build(&RootfsSpec::new(Base::Busybox, &agent), &img).unwrap();

    assert_eq!(info.path, img);
    assert_eq!(info.size, std::fs::metadata(&img).unwrap().len());
    assert_eq!(info.size, default_size(info.content_bytes));
    assert!(info.allocated < info.size, "image is not sparse: {info:?}");
    assert_fsck_clean(&img);

    let sb = superblock(&img);
    assert!(sb.contains("smolroot"), "label missing:\n{sb}");
    assert!(sb.contains(&info.uuid), "uuid missing:\n{sb}");
    let features = sb
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap();
    assert!(!features.contains("has_journal"), "{features}");

    assert_agent_installed(&img, &agent);
    let bb = stat(&img, "/bin/busybox").expect("/bin/busybox");
    assert_eq!(
        (bb.kind.as_str(), bb.mode & 0o777, bb.uid),
        ("regular", 0o755, 0)
    );
    for applet in ["/bin/sh", "/bin/ls", "/usr/bin/wc", "/sbin/ifconfig"] {
        let s = stat(&img, applet).unwrap_or_else(|| panic!("{applet} missing"));
        assert_eq!(s.link_dest.as_deref(), Some("/bin/busybox"), "{applet}");
    }
    let sbin = ls(&img, "/sbin");
    assert!(sbin.contains(&"init".to_string()) && sbin.contains(&"smol-agent".to_string()));
    // The invocation-protocol helpers (docs/WARM.md).
    let helper = stat(&img, "/usr/bin/smolvm-invoke").expect("smolvm-invoke missing");
    assert_eq!(helper.link_dest.as_deref(), Some("/sbin/smol-agent"));
    let module = cat(&img, "/usr/lib/smolvm/python/smolvm_invoke.py").expect("module missing");
    assert!(String::from_utf8(module).unwrap().contains("def wait("));

    let passwd = String::from_utf8(cat(&img, "/etc/passwd").unwrap()).unwrap();
    assert!(passwd.starts_with("root:x:0:0:"), "{passwd}");
    assert!(passwd.contains("\nnobody:x:65534:65534:"), "{passwd}");
    let group = String::from_utf8(cat(&img, "/etc/group").unwrap()).unwrap();
    assert!(group.contains("root:x:0:") && group.contains("nobody:x:65534:"));
    assert_eq!(cat(&img, "/etc/hostname").unwrap(), b"smolvm\n");
    assert_eq!(cat(&img, "/etc/resolv.conf").unwrap(), b"");
    assert!(String::from_utf8(cat(&img, "/etc/profile").unwrap())
        .unwrap()
        .contains("PS1="));
    assert!(String::from_utf8(cat(&img, "/etc/hosts").unwrap())
        .unwrap()
        .contains("127.0.0.1"));
    for (dir, mode) in [
        ("/proc", 0o555),
        ("/sys", 0o555),
        ("/dev", 0o755),
        ("/run", 0o755),
        ("/tmp", 0o1777),
        ("/var/tmp", 0o1777),
        ("/root", 0o700),
    ] {
        let s = stat(&img, dir).unwrap_or_else(|| panic!("{dir} missing"));
        assert_eq!(
            (s.kind.as_str(), s.mode & 0o7777, s.uid),
            ("directory", mode, 0),
            "{dir}"
        );
        assert!(ls(&img, dir).is_empty(), "{dir} is not empty");
    }
}

#[test]
fn copies_are_owned_by_root_and_land_where_asked() {
    if !prerequisites() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let app = t.path().join("app");
    std::fs::create_dir_all(app.join("static")).unwrap();
    std::fs::write(app.join("static/index.html"), "<h1>hi</h1>\n").unwrap();
    std::fs::write(app.join("run.sh"), "#!/bin/sh\necho run\n").unwrap();
    std::fs::set_permissions(app.join("run.sh"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::chown(app.join("run.sh"), Some(1000), Some(1000)).unwrap();
    symlink("static/index.html", app.join("index")).unwrap();
    std::fs::hard_link(app.join("run.sh"), app.join("run2.sh")).unwrap();
    let motd = t.path().join("motd");
    std::fs::write(&motd, "welcome\n").unwrap();

    let img = t.path().join("copies.ext4");
    let agent = agent();
    let mut spec = RootfsSpec::new(Base::Busybox, &agent);
    spec.copies = vec![
        (app.clone(), PathBuf::from("/srv/app")),
        (motd.clone(), PathBuf::from("/etc/")),
        (motd.clone(), PathBuf::from("/opt/greeting.txt")),
        // A copy into /bin lands in the existing directory.
        (motd.clone(), PathBuf::from("/bin")),
    ];
    build(&spec, &img).unwrap();

    assert_eq!(
        cat(&img, "/srv/app/static/index.html").unwrap(),
        b"<h1>hi</h1>\n"
    );
    let run = stat(&img, "/srv/app/run.sh").unwrap();
    assert_eq!(
        (run.mode & 0o7777, run.uid, run.gid, run.links),
        (0o750, 0, 0, 2)
    );
    assert_eq!(stat(&img, "/srv/app/run2.sh").unwrap().inode, run.inode);
    let link = stat(&img, "/srv/app/index").unwrap();
    assert_eq!(link.link_dest.as_deref(), Some("static/index.html"));
    assert_eq!(cat(&img, "/etc/motd").unwrap(), b"welcome\n");
    assert_eq!(cat(&img, "/opt/greeting.txt").unwrap(), b"welcome\n");
    assert_eq!(cat(&img, "/bin/motd").unwrap(), b"welcome\n");
    // The host file keeps its owner; only the image copy is root's.
    assert_eq!(std::fs::metadata(app.join("run.sh")).unwrap().uid(), 1000);
    assert_fsck_clean(&img);
}

#[test]
fn explicit_size_and_size_errors() {
    if !prerequisites() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("sized.ext4");
    let mut spec = RootfsSpec::new(Base::Busybox, agent());
    spec.size = Some(96 << 20);
    let info = build(&spec, &img).unwrap();
    assert_eq!(info.size, 96 << 20);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 96 << 20);
    assert_fsck_clean(&img);

    spec.size = Some(1 << 20);
    let err = build(&spec, &t.path().join("tiny.ext4")).unwrap_err();
    assert!(matches!(err, Error::SizeTooSmall { .. }), "{err}");
    assert!(err.to_string().contains("too small"), "{err}");
    assert!(!t.path().join("tiny.ext4").exists());
}

#[test]
fn bad_agent_and_guest_paths_fail_cleanly_and_keep_the_old_image() {
    if !prerequisites() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("keep.ext4");
    std::fs::write(&img, "previous image").unwrap();

    let script = t.path().join("agent.sh");
    std::fs::write(&script, "#!/bin/sh\n").unwrap();
    let err = build(&RootfsSpec::new(Base::Busybox, &script), &img).unwrap_err();
    assert!(matches!(err, Error::BadAgent { .. }), "{err}");
    assert!(err.to_string().contains("not an ELF"), "{err}");

    // Test binaries themselves are dynamically linked.
    let dynamic = std::env::current_exe().unwrap();
    let err = build(&RootfsSpec::new(Base::Busybox, &dynamic), &img).unwrap_err();
    assert!(err.to_string().contains("dynamically linked"), "{err}");

    let err = build(
        &RootfsSpec::new(Base::Busybox, t.path().join("missing")),
        &img,
    )
    .unwrap_err();
    assert!(err.to_string().contains("cannot read"), "{err}");

    let mut spec = RootfsSpec::new(Base::Busybox, agent());
    spec.copies = vec![(script.clone(), PathBuf::from("relative/path"))];
    let err = build(&spec, &img).unwrap_err();
    assert!(err.to_string().contains("absolute"), "{err}");

    assert_eq!(std::fs::read(&img).unwrap(), b"previous image");
    // Nothing is left behind: no staging tree, no temporary image.
    let left: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// An aarch64 agent makes an aarch64 image: busybox-static:arm64 with the same applet links
/// as the x86_64 image (the builder cannot run the arm64 busybox; it proves the host list is
/// its own). Needs the arm64 agent (`scripts/setup --aarch64`); skips loudly without it, fails
/// under `CI=true`.
#[test]
fn aarch64_agent_gets_the_arm64_busybox_with_the_same_applets() {
    if !prerequisites() {
        return;
    }
    let arm_agent =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest/aarch64/smol-agent");
    if !arm_agent.is_file() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "no {} (CI=true: run scripts/setup --aarch64)",
            arm_agent.display()
        );
        eprintln!(
            "SKIPPED: no {} (scripts/setup --aarch64)",
            arm_agent.display()
        );
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let arm = t.path().join("arm.ext4");
    let x86 = t.path().join("x86.ext4");
    build(&RootfsSpec::new(Base::Busybox, &arm_agent), &arm).unwrap();
    build(&RootfsSpec::new(Base::Busybox, agent()), &x86).unwrap();
    assert_fsck_clean(&arm);
    assert_agent_installed(&arm, &arm_agent);
    let bb = cat(&arm, "/bin/busybox").expect("/bin/busybox");
    // e_machine 183: EM_AARCH64.
    assert_eq!(u16::from_le_bytes([bb[0x12], bb[0x13]]), 183);
    for applet in ["/bin/sh", "/bin/ls", "/usr/bin/wc", "/sbin/ifconfig"] {
        let s = stat(&arm, applet).unwrap_or_else(|| panic!("{applet} missing"));
        assert_eq!(s.link_dest.as_deref(), Some("/bin/busybox"), "{applet}");
    }
    for dir in ["/bin", "/sbin", "/usr/bin", "/usr/sbin"] {
        assert_eq!(ls(&arm, dir), ls(&x86, dir), "{dir}");
    }
}

/// The Debian and OCI bases are x86_64 only: an aarch64 agent is refused with one line
/// before anything is downloaded.
#[test]
fn debian_and_oci_bases_refuse_an_aarch64_agent() {
    if !prerequisites() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    // A static x86_64 ELF relabelled as aarch64 (the builder reads the header only).
    let mut bytes = std::fs::read(agent()).unwrap();
    bytes[0x12..0x14].copy_from_slice(&183u16.to_le_bytes());
    let fake = t.path().join("agent-aarch64");
    std::fs::write(&fake, bytes).unwrap();
    for base in [
        Base::Debian {
            suite: "bookworm".into(),
            packages: Vec::new(),
        },
        Base::Oci {
            archive: t.path().join("never-read.tar"),
        },
    ] {
        let err = build(&RootfsSpec::new(base, &fake), &t.path().join("x.ext4")).unwrap_err();
        assert!(matches!(err, Error::BaseArch { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("x86_64 only; the agent is aarch64"),
            "{err}"
        );
    }
}
