//! The Debian base (debootstrap). Slow and needs the network on a cache miss, so it runs
//! only with `SMOLVM_SLOW_TESTS=1`.

mod rootfs_util;

use rootfs_util::*;
use smolvm_rootfs::{build, Base, RootfsSpec};

#[test]
fn debian_minbase_with_a_package() {
    if std::env::var("SMOLVM_SLOW_TESTS").as_deref() != Ok("1") {
        eprintln!("SKIPPED: the Debian rootfs test runs only with SMOLVM_SLOW_TESTS=1 (debootstrap, network)");
        return;
    }
    if !prerequisites() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("debian.ext4");
    let agent = agent();
    let spec = RootfsSpec::new(
        Base::Debian {
            suite: "bookworm".into(),
            packages: vec!["procps".into()],
        },
        &agent,
    );
    let started = std::time::Instant::now();
    let info = build(&spec, &img).unwrap();
    eprintln!(
        "debian image: {info:?} in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    assert_fsck_clean(&img);
    // bookworm is merged-/usr: /sbin -> usr/sbin, and the agent went through it.
    assert_eq!(
        stat(&img, "/sbin").unwrap().link_dest.as_deref(),
        Some("usr/sbin")
    );
    assert_agent_installed(&img, &agent);
    assert!(cat(&img, "/etc/debian_version")
        .unwrap()
        .starts_with(b"12."));
    assert_eq!(stat(&img, "/usr/bin/ps").unwrap().kind, "regular");
    assert_eq!(cat(&img, "/etc/resolv.conf").unwrap(), b"");
    assert!(ls(&img, "/var/cache/apt/archives")
        .iter()
        .all(|n| !n.ends_with(".deb")));
}
