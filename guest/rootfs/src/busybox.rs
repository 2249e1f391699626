//! The busybox base: Debian's static busybox, its applet links, and a minimal `/etc`.
//!
//! The busybox is the image's architecture (its agent's): `busybox-static` for x86_64,
//! `busybox-static:arm64` for aarch64. A busybox of the host's architecture lists its own
//! applets (`--list-full`); one of another architecture cannot run here, so its list is
//! taken from the host's busybox and proven to be the foreign binary's own: both tables
//! busybox compiles in (the applet names, and the packed install directories) are searched
//! for, byte for byte, in the foreign binary (see [`foreign_applets`]).

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::fsutil::{elf_interp, lchown, mkdir_mode, set_mode};
use crate::mkfs::run;
use crate::{cache_dir, Arch, Error, Result};

/// Finds a static busybox of the host's architecture (see [`find_busybox_for`]).
pub fn find_busybox() -> Result<PathBuf> {
    find_busybox_for(Arch::host())
}

/// Where a busybox for `arch` comes from: the variable that overrides the search, the
/// cache directory (under `rootfs/`) and Debian's package name.
fn source_of(arch: Arch) -> (&'static str, &'static str, &'static str) {
    match arch {
        Arch::X86_64 => ("SMOLVM_BUSYBOX", "busybox-static", "busybox-static:amd64"),
        Arch::Aarch64 => (
            "SMOLVM_BUSYBOX_AARCH64",
            "busybox-static-arm64",
            "busybox-static:arm64",
        ),
    }
}

/// Finds a static busybox for `arch`, in order: `$SMOLVM_BUSYBOX` (x86_64) or
/// `$SMOLVM_BUSYBOX_AARCH64`; the cached extraction of Debian's `busybox-static` package
/// of that architecture (`busybox-static`, `busybox-static-arm64` under the cache's
/// `rootfs/`); a fresh `apt-get download busybox-static:ARCH` extracted with `dpkg-deb -x`
/// into the cache (so the host need not have the package installed; arm64 needs
/// `dpkg --add-architecture arm64`); for the host's architecture, the host's own
/// `/bin/busybox` if it is static.
pub fn find_busybox_for(arch: Arch) -> Result<PathBuf> {
    let (env, cache_name, package) = source_of(arch);
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return check_static(&p, arch).map(|_| p);
    }
    let cache = cache_dir().join("rootfs").join(cache_name);
    let cached = cache.join("bin").join("busybox");
    if check_static(&cached, arch).is_ok() {
        return Ok(cached);
    }
    let download_err = match download(&cache, package) {
        Ok(()) => match check_static(&cached, arch) {
            Ok(()) => return Ok(cached),
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    };
    if arch != Arch::host() {
        return Err(Error::NoForeignBusybox {
            arch: arch.name(),
            env,
            reason: format!("downloading {package} failed ({download_err})"),
        });
    }
    for host in ["/bin/busybox", "/usr/bin/busybox"] {
        let host = PathBuf::from(host);
        if check_static(&host, arch).is_ok() {
            return Ok(host);
        }
    }
    Err(Error::NoBusybox(format!(
        "downloading {package} failed ({download_err}) and the host has no static /bin/busybox"
    )))
}

fn check_static(path: &Path, arch: Arch) -> Result<()> {
    let bytes = fs::read(path).map_err(|e| Error::io("reading", path, e))?;
    match elf_interp(&bytes) {
        Ok((got, false)) if got == arch => Ok(()),
        Ok((got, false)) => Err(Error::NoBusybox(format!(
            "{} is {}, not {}",
            path.display(),
            got.name(),
            arch.name()
        ))),
        Ok((_, true)) => Err(Error::NoBusybox(format!(
            "{} is dynamically linked",
            path.display()
        ))),
        Err(reason) => Err(Error::NoBusybox(format!("{}: {reason}", path.display()))),
    }
}

/// Downloads Debian's `package` with apt and extracts it to `dest`, atomically.
fn download(dest: &Path, package: &str) -> Result<()> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| Error::io("creating", parent, e))?;
    let work = tempfile::Builder::new()
        .prefix(".busybox-download-")
        .tempdir_in(parent)
        .map_err(|e| Error::io("creating a directory in", parent, e))?;
    // apt's download sandbox user must be able to write here.
    set_mode(work.path(), 0o777)?;
    run(
        Command::new("apt-get")
            .args(["download", "-q", package])
            .current_dir(work.path()),
        &format!("apt-get download {package}"),
    )?;
    let deb = fs::read_dir(work.path())
        .map_err(|e| Error::io("reading", work.path(), e))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| Error::NoBusybox("apt-get download produced no .deb".into()))?;
    let extracted = work.path().join("x");
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&extracted),
        "dpkg-deb -x",
    )?;
    match fs::rename(&extracted, dest) {
        Ok(()) => Ok(()),
        // Another build filled the cache meanwhile.
        Err(_) if dest.join("bin/busybox").is_file() => Ok(()),
        Err(e) => Err(Error::io("moving into the cache", dest, e)),
    }
}

/// Files of the minimal `/etc`.
const ETC_FILES: &[(&str, &str, u32)] = &[
    (
        "passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        0o644,
    ),
    ("group", "root:x:0:\nnobody:x:65534:\n", 0o644),
    (
        "shadow",
        "root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n",
        0o640,
    ),
    ("hostname", "smolvm\n", 0o644),
    (
        "hosts",
        "127.0.0.1\tlocalhost smolvm\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        0o644,
    ),
    ("resolv.conf", "", 0o644),
    (
        "profile",
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         export PS1='\\h:\\w\\$ '\n\
         umask 022\n",
        0o644,
    ),
    ("shells", "/bin/sh\n/bin/ash\n", 0o644),
    (
        "os-release",
        "NAME=\"smolvm busybox\"\nID=smolvm-busybox\nPRETTY_NAME=\"smolvm (busybox)\"\n",
        0o644,
    ),
];

/// Fills `root` (an empty directory) with the busybox base for `arch`.
pub(crate) fn stage(root: &Path, arch: Arch) -> Result<()> {
    let busybox = find_busybox_for(arch)?;
    let applets = if arch == Arch::host() {
        list_full(&busybox)?
    } else {
        // It cannot run here: the host's busybox lists, the foreign binary's tables prove.
        let reference = find_busybox_for(Arch::host())?;
        let list = list_full(&reference)?;
        let bytes = fs::read(&busybox).map_err(|e| Error::io("reading", &busybox, e))?;
        foreign_applets(&bytes, &list).map_err(|reason| Error::Applets {
            path: busybox.clone(),
            reason: format!(
                "{reason} (checked against the list of {})",
                reference.display()
            ),
        })?
    };
    stage_with(root, &busybox, &applets)
}

/// `busybox --list-full` of a busybox that runs on this host: one applet path per line,
/// relative to `/` (`bin/ls`, `usr/sbin/chroot`).
fn list_full(busybox: &Path) -> Result<String> {
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(|e| Error::io("running", busybox, e))?;
    if !out.status.success() {
        return Err(Error::NoBusybox(format!(
            "{} --list-full failed",
            busybox.display()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The install directories of busybox's `bb_install_loc_t` (include/applet_metadata.h),
/// by value: `BB_DIR_ROOT` = 0, `BB_DIR_BIN`, `BB_DIR_SBIN`, `BB_DIR_USR_BIN`,
/// `BB_DIR_USR_SBIN` = 4, as `--list-full` prints them.
const INSTALL_DIRS: [&str; 5] = ["", "bin", "sbin", "usr/bin", "usr/sbin"];

/// The applets of a busybox binary that cannot run here (`target`, its bytes), given the
/// `--list-full` output of one that can (`reference`), if that list is provably the
/// target's own: it is returned unchanged when `target` contains
///
/// - the applet name table exactly as busybox's build (applets/applet_tables.c) emits it
///   for this list: `applet_names[]`, the names in list order (busybox keeps them sorted),
///   each NUL-terminated, then the string's own NUL; and
/// - the install directory table `applet_install_loc[]` for the list: one 4-bit
///   `bb_install_loc_t` per applet, two per byte, the first in the low nibble.
///
/// Both tables are compiled into every busybox with the installer feature (Debian's
/// static one has it: that is what `--list-full` prints), independent of the CPU, so a
/// busybox whose applets or directories differ from the reference's fails here with the
/// first table that does not match.
pub(crate) fn foreign_applets(
    target: &[u8],
    reference: &str,
) -> std::result::Result<String, String> {
    let mut names = Vec::new();
    let mut locs = Vec::new();
    for line in reference.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (dir, name) = line.rsplit_once('/').unwrap_or(("", line));
        let loc = INSTALL_DIRS.iter().position(|d| *d == dir).ok_or_else(|| {
            format!("the reference list has {line:?}, in no busybox install directory")
        })?;
        if name.is_empty() || name.contains('\0') {
            return Err(format!(
                "the reference list has an empty or invalid name in {line:?}"
            ));
        }
        names.push(name);
        locs.push(loc as u8);
    }
    if names.is_empty() {
        return Err("the reference list is empty".into());
    }
    let mut name_table = Vec::new();
    for name in &names {
        name_table.extend_from_slice(name.as_bytes());
        name_table.push(0);
    }
    name_table.push(0);
    if !contains(target, &name_table) {
        return Err(format!(
            "its applet name table differs from the {} applets of the reference busybox",
            names.len()
        ));
    }
    let loc_table: Vec<u8> = locs
        .chunks(2)
        .map(|pair| pair[0] | pair.get(1).map_or(0, |hi| hi << 4))
        .collect();
    if !contains(target, &loc_table) {
        return Err(
            "its applets have the reference's names but not its install directories".into(),
        );
    }
    Ok(reference.to_string())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn stage_with(root: &Path, busybox: &Path, applets: &str) -> Result<()> {
    for (dir, mode) in [
        ("bin", 0o755),
        ("sbin", 0o755),
        ("usr", 0o755),
        ("usr/bin", 0o755),
        ("usr/sbin", 0o755),
        ("etc", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("run", 0o755),
        ("tmp", 0o1777),
        ("var", 0o755),
        ("var/tmp", 0o1777),
        ("root", 0o700),
        ("home", 0o755),
    ] {
        mkdir_mode(&root.join(dir), mode)?;
    }
    let target = root.join("bin/busybox");
    fs::copy(busybox, &target).map_err(|e| Error::io("copying busybox to", &target, e))?;
    lchown(&target, 0, 0)?;
    set_mode(&target, 0o755)?;

    for applet in applets.lines().map(str::trim) {
        // Only plain relative paths in the directories made above; `linuxrc` and the
        // like stay out, and `sbin/init` is the agent's.
        let ok_dir = ["bin/", "sbin/", "usr/bin/", "usr/sbin/"].iter().any(|d| {
            applet
                .strip_prefix(d)
                .is_some_and(|n| !n.contains('/') && !n.is_empty())
        });
        if !ok_dir || applet.contains("..") || applet == "sbin/init" || applet == "bin/busybox" {
            continue;
        }
        let link = root.join(applet);
        if fs::symlink_metadata(&link).is_ok() {
            continue;
        }
        symlink("/bin/busybox", &link).map_err(|e| Error::io("creating the link", &link, e))?;
    }

    for (name, content, mode) in ETC_FILES {
        let path = root.join("etc").join(name);
        fs::write(&path, content).map_err(|e| Error::io("writing", &path, e))?;
        set_mode(&path, *mode)?;
    }
    let mtab = root.join("etc/mtab");
    symlink("/proc/self/mounts", &mtab).map_err(|e| Error::io("creating the link", &mtab, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The two tables as busybox compiles them for `list`, inside some other bytes.
    fn fake_busybox(list: &str) -> Vec<u8> {
        let mut b = b"\x7fELF other code and strings\0".to_vec();
        let mut locs = Vec::new();
        for line in list.lines() {
            let (dir, name) = line.rsplit_once('/').unwrap_or(("", line));
            b.extend_from_slice(name.as_bytes());
            b.push(0);
            locs.push(INSTALL_DIRS.iter().position(|d| *d == dir).unwrap() as u8);
        }
        b.push(0);
        b.extend_from_slice(b"more data");
        for pair in locs.chunks(2) {
            b.push(pair[0] | pair.get(1).map_or(0, |hi| hi << 4));
        }
        b.extend_from_slice(&[0xff; 7]);
        b
    }

    const LIST: &str =
        "usr/bin/[\nusr/bin/[[\nbin/ash\nsbin/halt\nlinuxrc\nusr/sbin/chroot\nbin/ls\n";

    #[test]
    fn foreign_list_matches_its_tables() {
        let target = fake_busybox(LIST);
        assert_eq!(foreign_applets(&target, LIST).as_deref(), Ok(LIST));
    }

    #[test]
    fn foreign_list_refuses_other_applets_or_directories() {
        // The target lacks `ls`: its name table differs.
        let fewer = LIST.replace("bin/ls\n", "");
        let err = foreign_applets(&fake_busybox(&fewer), LIST).unwrap_err();
        assert!(err.contains("name table"), "{err}");
        // Same names, `halt` in /bin instead of /sbin.
        let moved = LIST.replace("sbin/halt", "bin/halt");
        let err = foreign_applets(&fake_busybox(&moved), LIST).unwrap_err();
        assert!(err.contains("install directories"), "{err}");
        // A reference line outside busybox's directories.
        let err = foreign_applets(&fake_busybox(LIST), "opt/bin/x\n").unwrap_err();
        assert!(err.contains("no busybox install directory"), "{err}");
        assert!(foreign_applets(&fake_busybox(LIST), "").is_err());
    }

    /// Debian's static busybox of this host checks against its own list: the table layout
    /// above is the real one. With the arm64 one cached (`scripts/setup --aarch64`), that
    /// one checks against the host's list too.
    #[test]
    fn real_busybox_tables() {
        let Ok(host) = find_busybox() else {
            eprintln!("no static busybox here; skipped");
            return;
        };
        let list = list_full(&host).unwrap();
        assert!(list.lines().any(|l| l == "bin/sh"), "{list}");
        let own = fs::read(&host).unwrap();
        assert_eq!(foreign_applets(&own, &list).as_deref(), Ok(list.as_str()));
        let arm = cache_dir().join("rootfs/busybox-static-arm64/bin/busybox");
        if let Ok(bytes) = fs::read(&arm) {
            assert_eq!(foreign_applets(&bytes, &list).as_deref(), Ok(list.as_str()));
        }
    }

    proptest! {
        /// Any list of applets in busybox's directories is found in a binary carrying its
        /// tables, and never in one missing an applet's name.
        #[test]
        fn foreign_tables_roundtrip(
            applets in proptest::collection::btree_map("[a-z][a-z0-9_.-]{0,10}", 0usize..5, 1..40),
        ) {
            let list: String = applets
                .iter()
                .map(|(name, dir)| {
                    let dir = INSTALL_DIRS[*dir];
                    if dir.is_empty() { format!("{name}\n") } else { format!("{dir}/{name}\n") }
                })
                .collect();
            let target = fake_busybox(&list);
            prop_assert_eq!(foreign_applets(&target, &list), Ok(list.clone()));
            let first = list.lines().next().unwrap().to_string();
            let without = list.replacen(&format!("{first}\n"), "", 1);
            if !without.is_empty() {
                prop_assert!(foreign_applets(&fake_busybox(&without), &list).is_err());
            }
        }

        /// Arbitrary bytes and lists never panic.
        #[test]
        fn foreign_tables_never_panic(target in proptest::collection::vec(any::<u8>(), 0..256), list in ".{0,64}") {
            let _ = foreign_applets(&target, &list);
        }
    }
}
