//! The directory base: a host tree copied with owners, modes and links preserved.

mod rootfs_util;

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::PathBuf;

use rootfs_util::*;
use smolvm_rootfs::{build, Base, Error, RootfsSpec};

#[test]
fn directory_base_preserves_metadata() {
    if !prerequisites() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("tree");
    std::fs::create_dir_all(src.join("usr/bin")).unwrap();
    std::fs::create_dir_all(src.join("home/alice")).unwrap();
    std::fs::write(src.join("usr/bin/suid"), "x").unwrap();
    std::fs::set_permissions(
        src.join("usr/bin/suid"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    std::fs::write(src.join("home/alice/notes"), "alice's\n").unwrap();
    std::os::unix::fs::chown(src.join("home/alice"), Some(1001), Some(1002)).unwrap();
    std::os::unix::fs::chown(src.join("home/alice/notes"), Some(1001), Some(1002)).unwrap();
    std::fs::set_permissions(
        src.join("home/alice"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    symlink("usr/bin", src.join("bin")).unwrap();
    // A tree owned by a user still gives the guest a root-owned `/`.
    std::os::unix::fs::chown(&src, Some(1000), Some(1000)).unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::hard_link(src.join("home/alice/notes"), src.join("home/notes-link")).unwrap();
    // An existing /sbin/init is replaced by the agent.
    std::fs::create_dir_all(src.join("sbin")).unwrap();
    std::fs::write(src.join("sbin/init"), "old init").unwrap();

    let img = t.path().join("dir.ext4");
    let agent = agent();
    let mut spec = RootfsSpec::new(Base::Dir { path: src.clone() }, &agent);
    spec.copies = vec![(src.join("home/alice/notes"), PathBuf::from("/bin/notes"))];
    build(&spec, &img).unwrap();

    assert_fsck_clean(&img);
    assert_agent_installed(&img, &agent);
    let root = stat(&img, "/").unwrap();
    assert_eq!((root.mode & 0o7777, root.uid, root.gid), (0o755, 0, 0));
    let suid = stat(&img, "/usr/bin/suid").unwrap();
    assert_eq!((suid.mode & 0o7777, suid.uid), (0o4755, 0));
    let alice = stat(&img, "/home/alice").unwrap();
    assert_eq!(
        (alice.mode & 0o7777, alice.uid, alice.gid),
        (0o700, 1001, 1002)
    );
    let notes = stat(&img, "/home/alice/notes").unwrap();
    assert_eq!((notes.uid, notes.gid, notes.links), (1001, 1002, 2));
    assert_eq!(stat(&img, "/home/notes-link").unwrap().inode, notes.inode);
    assert_eq!(
        stat(&img, "/bin").unwrap().link_dest.as_deref(),
        Some("usr/bin")
    );
    // A copy through the guest's /bin symlink lands in usr/bin, owned by root.
    let copied = stat(&img, "/usr/bin/notes").unwrap();
    assert_eq!((copied.uid, copied.links), (0, 1));
    // Mount points the tree lacked were added.
    assert_eq!(stat(&img, "/tmp").unwrap().mode & 0o7777, 0o1777);
    assert_eq!(stat(&img, "/proc").unwrap().kind, "directory");
}

#[test]
fn missing_or_non_directory_source_is_an_error() {
    if !prerequisites() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("x.ext4");
    let file = t.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let err = build(&RootfsSpec::new(Base::Dir { path: file }, agent()), &img).unwrap_err();
    assert!(matches!(err, Error::NotADirectory(_)), "{err}");
    let err = build(
        &RootfsSpec::new(
            Base::Dir {
                path: t.path().join("nope"),
            },
            agent(),
        ),
        &img,
    )
    .unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}
