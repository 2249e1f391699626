//! The Debian base: `debootstrap --variant=minbase`, cached by (suite, packages, mirror).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::fsutil::{copy_tree, set_mode, Owners};
use crate::mkfs::run;
use crate::{cache_dir, Error, Result};

/// The mirror used unless `$SMOLVM_DEBIAN_MIRROR` names another.
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
}

/// FNV-1a: a stable hash for cache directory names (the full key is also stored and
/// compared, so a collision only costs a rebuild).
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The cache key text and directory for a Debian base.
fn cache_entry(suite: &str, packages: &[String], mirror: &str) -> (String, PathBuf) {
    let mut pkgs: Vec<&str> = packages.iter().map(String::as_str).collect();
    pkgs.sort_unstable();
    pkgs.dedup();
    let key = format!(
        "debootstrap --variant=minbase --arch=amd64\nsuite={suite}\nmirror={mirror}\npackages={}\n",
        pkgs.join(",")
    );
    let dir = cache_dir()
        .join("rootfs")
        .join(format!("debian-{suite}-{:016x}", fnv1a(key.as_bytes())));
    (key, dir)
}

/// Returns the cached debootstrap tree for (suite, packages), building it on a miss.
fn cached_tree(suite: &str, packages: &[String]) -> Result<PathBuf> {
    if !valid_name(suite) {
        return Err(Error::DebianName {
            what: "suite",
            value: suite.into(),
        });
    }
    if let Some(bad) = packages.iter().find(|p| !valid_name(p)) {
        return Err(Error::DebianName {
            what: "package name",
            value: bad.clone(),
        });
    }
    let mirror = std::env::var("SMOLVM_DEBIAN_MIRROR")
        .ok()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| DEFAULT_MIRROR.to_string());
    let (key, dir) = cache_entry(suite, packages, &mirror);
    let tree = dir.join("root");
    if fs::read_to_string(dir.join("key")).is_ok_and(|k| k == key) && tree.is_dir() {
        return Ok(tree);
    }
    let debootstrap = crate::mkfs::find_tool(
        "debootstrap",
        "install debootstrap (apt-get install debootstrap)",
    )?;
    let parent = dir.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| Error::io("creating", parent, e))?;
    let work = tempfile::Builder::new()
        .prefix(".debian-build-")
        .tempdir_in(parent)
        .map_err(|e| Error::io("creating a directory in", parent, e))?;
    let target = work.path().join("root");
    let mut cmd = Command::new(debootstrap);
    cmd.args(["--variant=minbase", "--arch=amd64"]);
    if !packages.is_empty() {
        cmd.arg(format!("--include={}", packages.join(",")));
    }
    cmd.arg(suite).arg(&target).arg(&mirror);
    run(&mut cmd, "debootstrap")?;
    clean(&target)?;
    fs::write(work.path().join("key"), &key)
        .map_err(|e| Error::io("writing", work.path().join("key"), e))?;
    let _ = fs::remove_dir_all(&dir);
    let work = work.keep();
    if let Err(e) = fs::rename(&work, &dir) {
        let _ = fs::remove_dir_all(&work);
        if !tree.is_dir() {
            return Err(Error::io("moving into the cache", &dir, e));
        }
    }
    Ok(tree)
}

/// Drops what a machine image does not need: downloaded packages, apt lists, logs; and
/// replaces host-derived files (debootstrap copies the host's resolv.conf and hostname).
fn clean(root: &Path) -> Result<()> {
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let d = root.join(dir);
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_file() && p.file_name().is_some_and(|n| n != "lock") {
                fs::remove_file(&p).map_err(|err| Error::io("removing", &p, err))?;
            }
        }
    }
    for file in [
        "var/cache/apt/pkgcache.bin",
        "var/cache/apt/srcpkgcache.bin",
    ] {
        let _ = fs::remove_file(root.join(file));
    }
    let _ = fs::remove_dir_all(root.join("debootstrap"));
    for (name, content) in [
        ("etc/hostname", "smolvm\n"),
        ("etc/resolv.conf", ""),
        (
            "etc/hosts",
            "127.0.0.1\tlocalhost smolvm\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        ),
    ] {
        let p = root.join(name);
        // resolv.conf may be a dangling symlink in some setups; replace it with a file.
        let _ = fs::remove_file(&p);
        fs::write(&p, content).map_err(|e| Error::io("writing", &p, e))?;
        set_mode(&p, 0o644)?;
    }
    Ok(())
}

/// Fills `root` with the Debian base.
pub(crate) fn stage(root: &Path, suite: &str, packages: &[String]) -> Result<()> {
    let tree = cached_tree(suite, packages)?;
    copy_tree(&tree, root, Owners::Preserve)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(valid_name("bookworm"));
        assert!(valid_name("python3.11"));
        assert!(valid_name("g++"));
        assert!(!valid_name(""));
        assert!(!valid_name("-rf"));
        assert!(!valid_name("a,b"));
        assert!(!valid_name("Python"));
        assert!(!valid_name("a b"));
    }

    #[test]
    fn cache_key_ignores_package_order() {
        let a = cache_entry("bookworm", &["b".into(), "a".into(), "a".into()], "m");
        let b = cache_entry("bookworm", &["a".into(), "b".into()], "m");
        let c = cache_entry("trixie", &["a".into(), "b".into()], "m");
        assert_eq!(a, b);
        assert_ne!(a.1, c.1);
    }
}
