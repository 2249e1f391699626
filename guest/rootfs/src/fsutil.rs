//! Staging-tree helpers: guest paths resolved inside the staging root, metadata-preserving
//! copies, the agent install, and content accounting.

use std::collections::{HashMap, VecDeque};
use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::{Arch, Error, Result, AGENT_GUEST_PATH};

/// Symlink hops allowed while resolving one guest path (Linux's own limit).
const MAX_SYMLINK_HOPS: u32 = 40;

pub(crate) fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        Ok(())
    } else {
        Err(Error::NotRoot)
    }
}

/// Checks that the agent is a static x86-64 or aarch64 ELF executable, and returns its
/// architecture (the image's): the guest has no dynamic loader to offer PID 1 in a busybox
/// image, and a dynamic one would only fail as a kernel panic.
pub(crate) fn check_agent(path: &Path) -> Result<Arch> {
    let bad = |reason: &str| Error::BadAgent {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let meta = fs::metadata(path).map_err(|e| bad(&format!("cannot read it ({e})")))?;
    if !meta.is_file() {
        return Err(bad("not a regular file"));
    }
    let bytes = fs::read(path).map_err(|e| bad(&format!("cannot read it ({e})")))?;
    match elf_interp(&bytes) {
        Ok((arch, false)) => Ok(arch),
        Ok((_, true)) => Err(bad(
            "dynamically linked; the guest needs a static binary (-C target-feature=+crt-static)",
        )),
        Err(reason) => Err(bad(reason)),
    }
}

/// The architecture of a 64-bit little-endian x86-64 or aarch64 ELF executable, and whether it
/// asks for a program interpreter (is dynamically linked).
pub(crate) fn elf_interp(b: &[u8]) -> std::result::Result<(Arch, bool), &'static str> {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8).map(|s| {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            u64::from_le_bytes(a)
        })
    };
    if b.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF executable");
    }
    let machine = u16_at(0x12);
    let arch = [Arch::X86_64, Arch::Aarch64]
        .into_iter()
        .find(|a| Some(a.elf_machine()) == machine);
    let arch = match arch {
        Some(arch) if b.get(4) == Some(&2) && b.get(5) == Some(&1) => arch,
        _ => return Err("not an x86-64 or aarch64 (64-bit little-endian) executable"),
    };
    let phoff = u64_at(0x20).ok_or("truncated ELF header")?;
    let phentsize = u16_at(0x36).ok_or("truncated ELF header")? as u64;
    let phnum = u16_at(0x38).ok_or("truncated ELF header")? as u64;
    for i in 0..phnum {
        let off = phoff
            .checked_add(i * phentsize)
            .and_then(|o| usize::try_from(o).ok())
            .ok_or("corrupt program headers")?;
        let ty = u32_at(off).ok_or("truncated program headers")?;
        if ty == PT_INTERP {
            return Ok((arch, true));
        }
    }
    Ok((arch, false))
}

pub(crate) fn mkdir_mode(path: &Path, mode: u32) -> Result<()> {
    fs::create_dir(path).map_err(|e| Error::io("creating", path, e))?;
    set_mode(path, mode)
}

pub(crate) fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io("setting the mode of", path, e))
}

fn cstring(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::GuestPath {
        path: path.display().to_string(),
        reason: "contains a NUL byte",
    })
}

/// Sets owners without following a final symlink.
pub(crate) fn lchown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .map_err(|e| Error::io("setting the owner of", path, e))
}

/// Sets the modification time (seconds) without following a final symlink.
pub(crate) fn set_mtime(path: &Path, secs: i64) -> Result<()> {
    let c = cstring(path)?;
    let t = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: 0,
    };
    let times = [t, t];
    // SAFETY: `c` is a valid NUL-terminated path and `times` points to two timespecs,
    // as utimensat requires; neither is retained after the call.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(Error::io(
            "setting the time of",
            path,
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Creates a device node or FIFO (`kind` is `libc::S_IFCHR`, `S_IFBLK` or `S_IFIFO`).
pub(crate) fn mknod(
    path: &Path,
    kind: libc::mode_t,
    perm: u32,
    major: u32,
    minor: u32,
) -> Result<()> {
    let c = cstring(path)?;
    let dev = libc::makedev(major, minor);
    // SAFETY: `c` is a valid NUL-terminated path; mknod only reads it.
    let rc = unsafe { libc::mknod(c.as_ptr(), kind | (perm & 0o7777) as libc::mode_t, dev) };
    if rc != 0 {
        return Err(Error::io(
            "creating the node",
            path,
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Sets one extended attribute without following a final symlink.
pub(crate) fn set_xattr(path: &Path, name: &str, value: &[u8]) -> Result<()> {
    let c = cstring(path)?;
    let n = CString::new(name).map_err(|_| Error::GuestPath {
        path: path.display().to_string(),
        reason: "extended attribute name contains a NUL byte",
    })?;
    // SAFETY: both strings are valid and NUL-terminated; `value` is a live slice of the given length.
    let rc = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(Error::io(
            "setting an extended attribute on",
            path,
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Copies the extended attributes of `src` to `dst` (neither followed if a symlink).
/// File systems without xattr support simply have none to copy.
fn copy_xattrs(src: &Path, dst: &Path) -> Result<()> {
    let c = cstring(src)?;
    // SAFETY: a null buffer of size 0 asks only for the needed length.
    let len = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    if len <= 0 {
        return Ok(());
    }
    let mut names = vec![0u8; len as usize];
    // SAFETY: `names` is a writable buffer of the length passed.
    let len = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if len < 0 {
        return Err(Error::io(
            "listing extended attributes of",
            src,
            io::Error::last_os_error(),
        ));
    }
    names.truncate(len as usize);
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let Ok(cname) = CString::new(name) else {
            continue;
        };
        // SAFETY: null buffer with size 0 queries the value length.
        let vlen = unsafe { libc::lgetxattr(c.as_ptr(), cname.as_ptr(), std::ptr::null_mut(), 0) };
        if vlen < 0 {
            continue;
        }
        let mut value = vec![0u8; vlen as usize];
        // SAFETY: `value` is a writable buffer of the length passed.
        let vlen = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if vlen < 0 {
            continue;
        }
        value.truncate(vlen as usize);
        set_xattr(dst, &String::from_utf8_lossy(name), &value)?;
    }
    Ok(())
}

/// Splits a guest path into its normal components; `..` is kept as a component so that
/// resolution can clamp it at the root.
fn guest_components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

/// Resolves a guest path to a host path inside `root`, following symlinks found in the
/// staging tree as the guest would see them (absolute targets restart at `root`, `..` stops
/// at `root`). The last component is followed only when `follow_last` is set.
///
/// This keeps every write inside the staging tree even when an image ships a symlink such as
/// `etc -> /host/etc`, and makes merged-/usr images (`/bin -> usr/bin`) work.
pub(crate) fn resolve_in_root(root: &Path, guest: &Path, follow_last: bool) -> Result<PathBuf> {
    let mut queue = guest_components(guest);
    let mut resolved: Vec<OsString> = Vec::new();
    let mut hops = 0;
    while let Some(comp) = queue.pop_front() {
        if comp == ".." {
            resolved.pop();
            continue;
        }
        let is_last = queue.is_empty();
        if !is_last || follow_last {
            let mut candidate = root.to_path_buf();
            candidate.extend(&resolved);
            candidate.push(&comp);
            if let Ok(meta) = fs::symlink_metadata(&candidate) {
                if meta.file_type().is_symlink() {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(Error::GuestPath {
                            path: guest.display().to_string(),
                            reason: "too many levels of symbolic links",
                        });
                    }
                    let target = fs::read_link(&candidate)
                        .map_err(|e| Error::io("reading the link", &candidate, e))?;
                    if target.is_absolute() {
                        resolved.clear();
                    }
                    for c in guest_components(&target).into_iter().rev() {
                        queue.push_front(c);
                    }
                    continue;
                }
            }
        }
        resolved.push(comp);
    }
    let mut out = root.to_path_buf();
    out.extend(&resolved);
    Ok(out)
}

/// Checks that a guest destination is an absolute path.
pub(crate) fn check_guest_path(path: &Path) -> Result<()> {
    if !path.is_absolute() {
        return Err(Error::GuestPath {
            path: path.display().to_string(),
            reason: "guest paths must be absolute",
        });
    }
    Ok(())
}

/// Creates a guest directory (and missing parents, mode 0755, owned by root) inside `root`,
/// returning its host path.
pub(crate) fn mkdir_in_root(root: &Path, guest: &Path) -> Result<PathBuf> {
    let host = resolve_in_root(root, guest, true)?;
    match fs::symlink_metadata(&host) {
        Ok(m) if m.is_dir() => return Ok(host),
        Ok(_) => remove_any(&host)?,
        Err(_) => {}
    }
    fs::create_dir_all(&host).map_err(|e| Error::io("creating", &host, e))?;
    Ok(host)
}

/// Removes whatever is at `path` (a directory tree, a file, a link); absent is fine.
pub(crate) fn remove_any(path: &Path) -> Result<()> {
    let res = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    res.map_err(|e| Error::io("removing", path, e))
}

/// Makes room for a new entry at `path`: removes anything there unless both the old and the
/// new entry are directories (a directory's contents survive a later layer's re-declaration).
pub(crate) fn clear_for(path: &Path, new_is_dir: bool) -> Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() && new_is_dir => Ok(true),
        Ok(_) => remove_any(path).map(|_| false),
        Err(_) => Ok(false),
    }
}

/// How copied files are owned in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owners {
    /// Keep the host's uid/gid (a prepared root tree).
    Preserve,
    /// root:root (application files from the host, whose uids mean nothing in the guest).
    Root,
}

/// Copies the tree at `src` into the existing directory `dst` (contents, not the directory
/// itself), preserving modes, times, symlinks, hard links, device nodes and extended
/// attributes. `dst` is a host path already resolved inside the staging root.
pub(crate) fn copy_tree(src: &Path, dst: &Path, owners: Owners) -> Result<()> {
    let mut links = HashMap::new();
    copy_dir_contents(src, dst, owners, &mut links)?;
    let meta = fs::metadata(src).map_err(|e| Error::io("reading", src, e))?;
    apply_meta(src, dst, &meta, owners)
}

fn copy_dir_contents(
    src: &Path,
    dst: &Path,
    owners: Owners,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(src)
        .map_err(|e| Error::io("reading", src, e))?
        .collect::<io::Result<_>>()
        .map_err(|e| Error::io("reading", src, e))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let s = entry.path();
        let d = dst.join(entry.file_name());
        copy_entry(&s, &d, owners, links)?;
    }
    Ok(())
}

fn copy_entry(
    s: &Path,
    d: &Path,
    owners: Owners,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> Result<()> {
    let meta = fs::symlink_metadata(s).map_err(|e| Error::io("reading", s, e))?;
    let ft = meta.file_type();
    let existed_as_dir = clear_for(d, ft.is_dir())?;
    if !ft.is_dir() && meta.nlink() > 1 {
        if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
            return fs::hard_link(first, d).map_err(|e| Error::io("linking", d, e));
        }
        links.insert((meta.dev(), meta.ino()), d.to_path_buf());
    }
    if ft.is_dir() {
        if !existed_as_dir {
            fs::create_dir(d).map_err(|e| Error::io("creating", d, e))?;
        }
        copy_dir_contents(s, d, owners, links)?;
    } else if ft.is_symlink() {
        let target = fs::read_link(s).map_err(|e| Error::io("reading the link", s, e))?;
        symlink(&target, d).map_err(|e| Error::io("creating the link", d, e))?;
    } else if ft.is_file() {
        let mut from = fs::File::open(s).map_err(|e| Error::io("opening", s, e))?;
        let mut to = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(d)
            .map_err(|e| Error::io("creating", d, e))?;
        io::copy(&mut from, &mut to).map_err(|e| Error::io("copying into", d, e))?;
    } else {
        let kind = if ft.is_char_device() {
            libc::S_IFCHR
        } else if ft.is_block_device() {
            libc::S_IFBLK
        } else if ft.is_fifo() {
            libc::S_IFIFO
        } else {
            // Sockets are runtime objects; a copy of one means nothing in the guest.
            return Ok(());
        };
        let rdev = meta.rdev();
        mknod(d, kind, meta.mode(), libc::major(rdev), libc::minor(rdev))?;
    }
    apply_meta(s, d, &meta, owners)
}

fn apply_meta(s: &Path, d: &Path, meta: &fs::Metadata, owners: Owners) -> Result<()> {
    let (uid, gid) = match owners {
        Owners::Preserve => (meta.uid(), meta.gid()),
        Owners::Root => (0, 0),
    };
    // Owners first: chown clears set-id bits, which the mode then restores.
    lchown(d, uid, gid)?;
    if !meta.file_type().is_symlink() {
        set_mode(d, meta.mode() & 0o7777)?;
    }
    copy_xattrs(s, d)?;
    set_mtime(d, meta.mtime())
}

/// Copies a host file or directory to an absolute guest destination, owned by root.
pub(crate) fn copy_in(root: &Path, src: &Path, dst: &Path) -> Result<()> {
    check_guest_path(dst)?;
    let meta = fs::symlink_metadata(src).map_err(|e| Error::io("reading", src, e))?;
    if meta.is_dir() {
        let host = mkdir_in_root(root, dst)?;
        return copy_tree(src, &host, Owners::Root);
    }
    let dst_str = dst.as_os_str().as_bytes();
    let into_dir = dst_str.ends_with(b"/")
        || fs::metadata(resolve_in_root(root, dst, true)?).is_ok_and(|m| m.is_dir());
    let guest_file = if into_dir {
        let name = src.file_name().ok_or_else(|| Error::GuestPath {
            path: src.display().to_string(),
            reason: "source has no file name",
        })?;
        dst.join(name)
    } else {
        dst.to_path_buf()
    };
    let parent = guest_file.parent().unwrap_or(Path::new("/"));
    let host_parent = mkdir_in_root(root, parent)?;
    let name = guest_file.file_name().ok_or_else(|| Error::GuestPath {
        path: dst.display().to_string(),
        reason: "destination has no file name",
    })?;
    let mut links = HashMap::new();
    copy_entry(src, &host_parent.join(name), Owners::Root, &mut links)
}

/// Creates the directories the agent mounts file systems on, when the base lacks them.
pub(crate) fn ensure_mountpoints(root: &Path) -> Result<()> {
    for (dir, mode) in [
        ("/proc", 0o555),
        ("/sys", 0o555),
        ("/dev", 0o755),
        ("/run", 0o755),
        ("/tmp", 0o1777),
        ("/root", 0o700),
    ] {
        let host = resolve_in_root(root, Path::new(dir), true)?;
        if fs::symlink_metadata(&host).is_err() {
            fs::create_dir_all(&host).map_err(|e| Error::io("creating", &host, e))?;
            set_mode(&host, mode)?;
        }
    }
    Ok(())
}

/// Installs the agent as `/sbin/smol-agent` (root, 0755) with `/sbin/init` linking to it.
pub(crate) fn install_agent(root: &Path, agent: &Path) -> Result<()> {
    let guest = Path::new(AGENT_GUEST_PATH);
    let parent = guest.parent().unwrap_or(Path::new("/sbin"));
    let host_dir = mkdir_in_root(root, parent)?;
    let name = guest.file_name().unwrap_or(OsStr::new("smol-agent"));
    let host = host_dir.join(name);
    remove_any(&host)?;
    let mut from = fs::File::open(agent).map_err(|e| Error::io("opening", agent, e))?;
    let mut to = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&host)
        .map_err(|e| Error::io("creating", &host, e))?;
    io::copy(&mut from, &mut to).map_err(|e| Error::io("copying into", &host, e))?;
    lchown(&host, 0, 0)?;
    set_mode(&host, 0o755)?;
    let init = host_dir.join("init");
    remove_any(&init)?;
    symlink(name, &init).map_err(|e| Error::io("creating the link", &init, e))?;
    install_invoke_helpers(root)
}

/// The Python module of the invocation protocol (docs/WARM.md).
const PYTHON_HELPER: &str = include_str!("../../agent/helpers/smolvm_invoke.py");

/// Installs the invocation-protocol helpers (docs/WARM.md): `/usr/bin/smolvm-invoke` (a link
/// to the agent, which serves it under that name) and the Python module `smolvm_invoke` in
/// `/usr/lib/smolvm/python`, and in `/usr/lib/python3/dist-packages` when the image has
/// that directory (Debian's Python, any version, finds it there).
fn install_invoke_helpers(root: &Path) -> Result<()> {
    let bin = mkdir_in_root(root, Path::new("/usr/bin"))?.join("smolvm-invoke");
    remove_any(&bin)?;
    symlink(AGENT_GUEST_PATH, &bin).map_err(|e| Error::io("creating the link", &bin, e))?;
    let mut dirs = vec![mkdir_in_root(root, Path::new("/usr/lib/smolvm/python"))?];
    let dist = resolve_in_root(root, Path::new("/usr/lib/python3/dist-packages"), true)?;
    if dist.is_dir() {
        dirs.push(dist);
    }
    for dir in dirs {
        let file = dir.join("smolvm_invoke.py");
        remove_any(&file)?;
        fs::write(&file, PYTHON_HELPER).map_err(|e| Error::io("writing", &file, e))?;
        lchown(&file, 0, 0)?;
        set_mode(&file, 0o644)?;
    }
    Ok(())
}

/// Content accounting of a staged tree.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Usage {
    /// Bytes the tree needs in 4 KiB blocks (file data, directories, long symlink targets).
    pub bytes: u64,
    /// Inodes the tree needs.
    pub entries: u64,
}

pub(crate) fn usage(root: &Path) -> Result<Usage> {
    const BLOCK: u64 = 4096;
    let mut usage = Usage::default();
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        usage.entries += 1;
        usage.bytes += BLOCK;
        for entry in fs::read_dir(&dir).map_err(|e| Error::io("reading", &dir, e))? {
            let entry = entry.map_err(|e| Error::io("reading", &dir, e))?;
            let meta = entry
                .metadata()
                .map_err(|e| Error::io("reading", entry.path(), e))?;
            if meta.is_dir() {
                stack.push(entry.path());
                continue;
            }
            if meta.nlink() > 1 && !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            usage.entries += 1;
            // Symlink targets under 60 bytes live inside the inode.
            if meta.is_file() || (meta.file_type().is_symlink() && meta.len() >= 60) {
                usage.bytes += meta.len().div_ceil(BLOCK) * BLOCK;
            }
        }
    }
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_follows_links_inside_root() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        symlink("usr/bin", root.join("bin")).unwrap();
        symlink("/etc-real", root.join("etc")).unwrap();
        symlink("../../../../..", root.join("usr/up")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        assert_eq!(
            resolve_in_root(root, Path::new("/bin/ls"), false).unwrap(),
            root.join("usr/bin/ls")
        );
        // Absolute targets restart at the staging root, never the host's.
        assert_eq!(
            resolve_in_root(root, Path::new("/etc/passwd"), false).unwrap(),
            root.join("etc-real/passwd")
        );
        // `..` clamps at the root.
        assert_eq!(
            resolve_in_root(root, Path::new("/usr/up/x"), false).unwrap(),
            root.join("x")
        );
        assert_eq!(
            resolve_in_root(root, Path::new("../../x"), false).unwrap(),
            root.join("x")
        );
        // The last component is not followed unless asked.
        assert_eq!(
            resolve_in_root(root, Path::new("/bin"), false).unwrap(),
            root.join("bin")
        );
        assert_eq!(
            resolve_in_root(root, Path::new("/bin"), true).unwrap(),
            root.join("usr/bin")
        );
        assert!(resolve_in_root(root, Path::new("/loop/x"), false).is_err());
    }

    #[test]
    fn elf_checks() {
        assert_eq!(elf_interp(b"#!/bin/sh\n"), Err("not an ELF executable"));
        assert!(elf_interp(b"\x7fELF").is_err());
        let own = fs::read(std::env::current_exe().unwrap()).unwrap();
        // Test binaries are dynamically linked unless built with crt-static.
        assert_eq!(elf_interp(&own).map(|(arch, _)| arch), Ok(Arch::host()));
        // The machine field decides the architecture; anything else is refused.
        let mut other = own.clone();
        other[0x12..0x14].copy_from_slice(&Arch::Aarch64.elf_machine().to_le_bytes());
        assert_eq!(elf_interp(&other).map(|(arch, _)| arch), Ok(Arch::Aarch64));
        other[0x12..0x14].copy_from_slice(&40u16.to_le_bytes()); // EM_ARM (32-bit)
        assert!(elf_interp(&other).is_err());
        if let Ok(bb) = fs::read("/bin/busybox") {
            if elf_interp(&bb).is_ok_and(|(_, interp)| !interp) {
                eprintln!("/bin/busybox is static");
            }
        }
    }

    #[test]
    fn default_size_has_headroom() {
        assert_eq!(crate::default_size(0), 32 << 20);
        let s = crate::default_size(100 << 20);
        assert_eq!(s, 157 << 20);
        assert_eq!(s % (1 << 20), 0);
        assert_eq!(crate::default_size(1), 33 << 20);
    }
}
