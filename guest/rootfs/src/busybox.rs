//! The busybox base: Debian's static busybox, its applet links, and a minimal `/etc`.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::fsutil::{elf_interp, lchown, mkdir_mode, set_mode};
use crate::mkfs::run;
use crate::{cache_dir, Error, Result};

/// Finds a static busybox, in order: `$SMOLVM_BUSYBOX`; the cached extraction of Debian's
/// `busybox-static` package; a fresh `apt-get download busybox-static` extracted with
/// `dpkg-deb -x` into the cache (so the host need not have the package installed); the
/// host's own `/bin/busybox` if it is static.
pub fn find_busybox() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SMOLVM_BUSYBOX").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return check_static(&p).map(|_| p);
    }
    let cache = cache_dir().join("rootfs").join("busybox-static");
    let cached = cache.join("bin").join("busybox");
    if check_static(&cached).is_ok() {
        return Ok(cached);
    }
    let download_err = match download(&cache) {
        Ok(()) => match check_static(&cached) {
            Ok(()) => return Ok(cached),
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    };
    for host in ["/bin/busybox", "/usr/bin/busybox"] {
        let host = PathBuf::from(host);
        if check_static(&host).is_ok() {
            return Ok(host);
        }
    }
    Err(Error::NoBusybox(format!(
        "downloading busybox-static failed ({download_err}) and the host has no static /bin/busybox"
    )))
}

fn check_static(path: &Path) -> Result<()> {
    let bytes = fs::read(path).map_err(|e| Error::io("reading", path, e))?;
    match elf_interp(&bytes) {
        Ok(false) => Ok(()),
        Ok(true) => Err(Error::NoBusybox(format!(
            "{} is dynamically linked",
            path.display()
        ))),
        Err(reason) => Err(Error::NoBusybox(format!("{}: {reason}", path.display()))),
    }
}

/// Downloads `busybox-static` with apt and extracts it to `dest`, atomically.
fn download(dest: &Path) -> Result<()> {
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
            .args(["download", "-q", "busybox-static"])
            .current_dir(work.path()),
        "apt-get download busybox-static",
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

/// Fills `root` (an empty directory) with the busybox base.
pub(crate) fn stage(root: &Path) -> Result<()> {
    let busybox = find_busybox()?;
    stage_with(root, &busybox)
}

fn stage_with(root: &Path, busybox: &Path) -> Result<()> {
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

    // The static binary runs on the host too, so it can list its own applets.
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
    let list = String::from_utf8_lossy(&out.stdout);
    for applet in list.lines().map(str::trim) {
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
