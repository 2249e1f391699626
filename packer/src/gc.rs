//! Scratch directories that a killed `smolpack` cannot leave behind for good, and `smolpack
//! gc`, which removes what killed writers left.
//!
//! `smolpack build` and `smolpack pack --compress` work in a scratch directory beside their
//! output (`.smolpack-build-XXXXXX`, `.smolpack-pack-XXXXXX`). Its owner holds an exclusive
//! `flock` on the `lock` file inside for as long as it works, so a scratch directory whose
//! lock can be taken belongs to a process that is gone (killed with SIGKILL: it could not
//! remove it) and is removed by the next build or pack in that directory or by `smolpack gc`;
//! one that is locked is left alone. Temp files of the atomic writers (`.NAME.PID.N.tmp`)
//! follow the same rule ([`smolvm_formats::atomic`]).
//!
//! The owner creates the lock file with `O_EXCL` in the directory it just made, locks it
//! (blocking) and checks that the name still leads to it; a cleaner removes a directory only
//! while holding its lock, or, with no lock file yet, only when empty (`rmdir`), so it never
//! removes a directory its owner has started to use.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use smolvm_formats::atomic::{self, is_same_file, lock_exclusive, Sweep};

/// Prefix of `smolpack build`'s scratch directories.
pub const BUILD_PREFIX: &str = ".smolpack-build-";
/// Prefix of `smolpack pack --compress`'s scratch directories.
pub const PACK_PREFIX: &str = ".smolpack-pack-";
/// The lock file inside a scratch directory.
const LOCK: &str = "lock";
/// How many fresh directories an owner tries when cleaners keep removing them.
const CREATE_TRIES: u32 = 16;

/// A scratch directory, locked while this value lives and removed when it is dropped.
#[derive(Debug)]
pub struct ScratchDir {
    // Fields drop in order: the directory is removed while the lock is still held.
    dir: tempfile::TempDir,
    _lock: File,
}

impl ScratchDir {
    /// Creates and locks a scratch directory `PREFIXxxxxxx` in `parent`, after removing the
    /// unlocked scratch directories with that prefix there (left by killed runs).
    pub fn create(parent: &Path, prefix: &str) -> io::Result<ScratchDir> {
        remove_scratch_leftovers(parent, prefix);
        for _ in 0..CREATE_TRIES {
            let dir = tempfile::Builder::new().prefix(prefix).tempdir_in(parent)?;
            let path = dir.path().join(LOCK);
            let lock = match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(f) => f,
                // A cleaner removed the directory while it was empty.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if lock_exclusive(&lock, true)? && is_same_file(&path, &lock)? {
                return Ok(ScratchDir { dir, _lock: lock });
            }
            // A cleaner took it for a leftover before the lock was ours.
        }
        Err(io::Error::other(
            "the scratch directory keeps being removed by a cleaner",
        ))
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Whether `name` is a scratch directory name, of `prefix` when given, of either otherwise.
fn is_scratch_name(name: &OsStr, prefix: Option<&str>) -> bool {
    let Some(s) = name.to_str() else {
        return false;
    };
    let matches = |p: &str| s.strip_prefix(p).is_some_and(|rest| !rest.is_empty());
    match prefix {
        Some(p) => matches(p),
        None => matches(BUILD_PREFIX) || matches(PACK_PREFIX),
    }
}

/// Removes the scratch directory `path` if its owner is gone; `Ok(false)` when it is locked
/// (a live owner), not a directory, or not ours to judge (no lock file but not empty).
fn remove_scratch_if_unlocked(path: &Path) -> io::Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    }
    let lock_path = path.join(LOCK);
    let lock = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&lock_path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Killed before it made its lock file, or its owner is about to make it: only
            // an empty directory goes, and then the owner's O_EXCL create fails and it
            // starts over.
            return match fs::remove_dir(path) {
                Ok(()) => Ok(true),
                Err(e)
                    if e.kind() == io::ErrorKind::NotFound
                        || e.kind() == io::ErrorKind::DirectoryNotEmpty =>
                {
                    Ok(false)
                }
                Err(e) => Err(e),
            };
        }
        Err(e) => return Err(e),
    };
    if !lock.metadata()?.is_file() || !lock_exclusive(&lock, false)? {
        return Ok(false);
    }
    if !is_same_file(&lock_path, &lock)? {
        return Ok(false);
    }
    // Removed while the lock is held: an owner that opened the lock file in the meantime
    // waits for it and then finds its directory gone.
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Best effort: removes the unlocked scratch directories with `prefix` in `parent`.
pub fn remove_scratch_leftovers(parent: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        if is_scratch_name(&entry.file_name(), Some(prefix)) {
            let _ = remove_scratch_if_unlocked(&entry.path());
        }
    }
}

/// Removes the leftovers of killed writers in `dir`: temp files of the atomic writers
/// (`.NAME.PID.N.tmp`) and `smolpack` scratch directories, except those a live process
/// holds. Fails only when `dir` cannot be listed.
pub fn gc_dir(dir: &Path) -> io::Result<Sweep> {
    let Sweep {
        mut removed,
        mut failed,
    } = atomic::remove_leftovers(dir)?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if !is_scratch_name(&entry.file_name(), None) {
            continue;
        }
        let path = entry.path();
        match remove_scratch_if_unlocked(&path) {
            Ok(true) => removed.push(path),
            Ok(false) => {}
            Err(e) => failed.push((path, e)),
        }
    }
    removed.sort();
    Ok(Sweep { removed, failed })
}

/// The directory compressed machines are expanded into (`${SMOLVM_CACHE:-~/.cache/smolvm}/
/// expanded`), whose temp files `smolpack gc` also removes.
pub fn expanded_cache_dir() -> PathBuf {
    smolvm::linux::run::cache_dir().join("expanded")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_names() {
        let n = |s: &str, p: Option<&str>| is_scratch_name(OsStr::new(s), p);
        assert!(n(".smolpack-build-a1B2c3", None));
        assert!(n(".smolpack-pack-a1B2c3", Some(PACK_PREFIX)));
        assert!(!n(".smolpack-pack-a1B2c3", Some(BUILD_PREFIX)));
        assert!(!n(".smolpack-build-", None));
        assert!(!n(".smolpack-abcdef", None));
        assert!(!n("smolpack-build-abcdef", None));
    }

    #[test]
    fn gc_removes_dead_scratch_and_temps_and_keeps_live_ones() {
        let dir = tempfile::tempdir().unwrap();
        let live = ScratchDir::create(dir.path(), BUILD_PREFIX).unwrap();
        fs::write(live.path().join("rootfs.ext4"), b"x").unwrap();

        // A dead owner's directory: its lock file exists but nobody holds it.
        let dead = dir.path().join(".smolpack-build-dead01");
        fs::create_dir(&dead).unwrap();
        fs::write(dead.join(LOCK), b"").unwrap();
        fs::write(dead.join("rootfs.ext4"), b"partial").unwrap();
        // Killed before its lock file: empty.
        let empty = dir.path().join(".smolpack-pack-empty1");
        fs::create_dir(&empty).unwrap();
        // No lock file but not empty: not ours to judge.
        let foreign = dir.path().join(".smolpack-pack-other1");
        fs::create_dir(&foreign).unwrap();
        fs::write(foreign.join("data"), b"x").unwrap();
        let temp = dir.path().join(".app.4242.0.tmp");
        fs::write(&temp, b"partial").unwrap();
        let user = dir.path().join("app");
        fs::write(&user, b"keep").unwrap();

        let r = gc_dir(dir.path()).unwrap();
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        let mut want = vec![temp.clone(), dead.clone(), empty.clone()];
        want.sort();
        assert_eq!(r.removed, want);
        assert!(live.path().join("rootfs.ext4").exists());
        assert!(foreign.exists() && user.exists());

        // A new owner in the same directory also sweeps dead ones of its kind.
        let dead2 = dir.path().join(".smolpack-build-dead02");
        fs::create_dir(&dead2).unwrap();
        fs::write(dead2.join(LOCK), b"").unwrap();
        let second = ScratchDir::create(dir.path(), BUILD_PREFIX).unwrap();
        assert!(!dead2.exists());
        assert!(live.path().exists() && second.path().exists());

        let live_path = live.path().to_path_buf();
        drop(live);
        assert!(!live_path.exists(), "removed when dropped");
        let again = gc_dir(dir.path()).unwrap();
        assert!(again.removed.is_empty(), "{:?}", again.removed);
        assert!(second.path().exists());
    }
}
