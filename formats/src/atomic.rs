//! Atomic file creation: write to a temp file in the destination directory, fsync, rename,
//! fsync the directory. A crash or an early drop leaves no file under the final name.
//!
//! The temp file is `.NAME.PID.N.tmp` beside `NAME`, and its writer holds an exclusive
//! `flock` on it from creation until it is renamed or removed. A process killed with
//! SIGKILL cannot delete its temp file, but the kernel drops its lock, so a temp file
//! whose lock can be taken (`LOCK_EX|LOCK_NB`) is a leftover and one whose lock cannot is
//! being written right now. [`remove_leftovers_of`] (called by every new writer of the same
//! file) and [`remove_leftovers`] (`smolpack gc`) delete only the former.
//!
//! The two sides cannot race: a writer creates its file with `O_EXCL`, takes the lock
//! (blocking) and then checks that the name still leads to the file it holds, trying a new
//! name if a cleaner removed it in between; a cleaner removes a file only while it holds
//! that file's lock and the name still leads to it.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// How many fresh names a writer tries when cleaners keep removing its temp file.
const CREATE_TRIES: u32 = 16;

/// Takes an exclusive `flock` on `file`, waiting for it when `wait`; `Ok(false)` when it
/// does not wait and another open file holds the lock.
pub fn lock_exclusive(file: &File, wait: bool) -> io::Result<bool> {
    let op = if wait {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    loop {
        // SAFETY: flock on a valid open fd changes only the lock state of its open file
        // description; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if !wait => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// Whether `path` (not following a final symlink) is the very file open as `file`.
pub fn is_same_file(path: &Path, file: &File) -> io::Result<bool> {
    let (a, b) = match (fs::symlink_metadata(path), file.metadata()) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        (Err(e), _) | (_, Err(e)) => return Err(e),
    };
    Ok(a.dev() == b.dev() && a.ino() == b.ino())
}

/// The temp-file name of a writer of `name`: `.NAME.PID.N.tmp`.
fn temp_name(name: &OsStr, n: u64) -> String {
    format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        n
    )
}

/// Whether `file_name` is the name of a writer's temp file: `.NAME.PID.N.tmp` (PID and N
/// decimal), for the final name `of` when given, for any name otherwise.
pub fn is_temp_name(file_name: &OsStr, of: Option<&OsStr>) -> bool {
    let Some(s) = file_name.to_str() else {
        return false;
    };
    let Some(rest) = s.strip_prefix('.').and_then(|r| r.strip_suffix(".tmp")) else {
        return false;
    };
    let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
    let mut parts = rest.rsplitn(3, '.');
    let (Some(n), Some(pid), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    if !digits(n) || !digits(pid) || name.is_empty() {
        return false;
    }
    match of {
        Some(of) => Some(name) == of.to_str(),
        None => true,
    }
}

/// Removes the regular file `path` if no process holds its lock; `Ok(false)` when one does
/// (a live writer) or when it is gone or not a regular file.
pub fn remove_if_unlocked(path: &Path) -> io::Result<bool> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ELOOP) => {
            return Ok(false)
        }
        Err(e) => return Err(e),
    };
    if !file.metadata()?.is_file() || !lock_exclusive(&file, false)? {
        return Ok(false);
    }
    // Still the file we locked (another cleaner may have removed it meanwhile); it is
    // removed while the lock is held, so no writer can have started using it.
    if !is_same_file(path, &file)? {
        return Ok(false);
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// What a cleanup removed and what it could not.
#[derive(Debug, Default)]
pub struct Sweep {
    /// Leftovers removed, sorted.
    pub removed: Vec<PathBuf>,
    /// Leftovers that could not be removed, with why.
    pub failed: Vec<(PathBuf, io::Error)>,
}

/// Removes the leftover temp files in `dir` (of the final name `of` when given), skipping
/// those a live writer holds.
fn sweep(dir: &Path, of: Option<&OsStr>) -> io::Result<Sweep> {
    let mut removed = Vec::new();
    let mut failed = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if !is_temp_name(&name, of) {
            continue;
        }
        let path = entry.path();
        match remove_if_unlocked(&path) {
            Ok(true) => removed.push(path),
            Ok(false) => {}
            Err(e) => failed.push((path, e)),
        }
    }
    removed.sort();
    Ok(Sweep { removed, failed })
}

/// Removes every leftover temp file in `dir` (`.NAME.PID.N.tmp` whose lock can be taken);
/// fails only when `dir` cannot be listed.
pub fn remove_leftovers(dir: &Path) -> io::Result<Sweep> {
    sweep(dir, None)
}

/// Removes the leftover temp files of writers of `final_path` (killed before they could
/// clean up), leaving those of live writers. Best effort: returns what it removed.
pub fn remove_leftovers_of(final_path: &Path) -> Vec<PathBuf> {
    let Some(name) = final_path.file_name() else {
        return Vec::new();
    };
    sweep(&parent_dir(final_path), Some(name))
        .map(|s| s.removed)
        .unwrap_or_default()
}

/// The directory `path` is in (`.` for a bare name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A temp file that becomes `final_path` on [`AtomicFile::commit`] and is deleted otherwise.
#[derive(Debug)]
pub struct AtomicFile {
    final_path: PathBuf,
    tmp_path: PathBuf,
    file: File,
    committed: bool,
}

impl AtomicFile {
    /// Creates and locks the temp file, then removes the leftovers of earlier writers of
    /// `final_path` that were killed.
    pub fn create(final_path: &Path) -> Result<AtomicFile> {
        let name = final_path.file_name().ok_or_else(|| {
            Error::InvalidInput(format!("{} is not a file path", final_path.display()))
        })?;
        let dir = parent_dir(final_path);
        let mut tries = 0;
        let (tmp_path, file) = loop {
            let tmp_path = dir.join(temp_name(name, COUNTER.fetch_add(1, Ordering::Relaxed)));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&tmp_path)
                .map_err(|e| Error::io(format!("creating {}", tmp_path.display()), e))?;
            let locked = lock_exclusive(&file, true)
                .map_err(|e| Error::io(format!("locking {}", tmp_path.display()), e))?;
            let ours = locked
                && is_same_file(&tmp_path, &file)
                    .map_err(|e| Error::io(format!("checking {}", tmp_path.display()), e))?;
            if ours {
                break (tmp_path, file);
            }
            // A cleaner took it for a leftover before the lock was ours: try a fresh name.
            tries += 1;
            if tries >= CREATE_TRIES {
                return Err(Error::io(
                    format!("creating a temp file beside {}", final_path.display()),
                    io::Error::other("it keeps being removed by a cleaner"),
                ));
            }
        };
        remove_leftovers_of(final_path);
        Ok(AtomicFile {
            final_path: final_path.to_path_buf(),
            tmp_path,
            file,
            committed: false,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn tmp_path(&self) -> &Path {
        &self.tmp_path
    }

    /// Flushes to disk, optionally sets the permission bits, and renames into place.
    pub fn commit(mut self, mode: Option<u32>) -> Result<()> {
        let ctx = |what: &str| format!("{what} {}", self.tmp_path.display());
        if let Some(mode) = mode {
            self.file
                .set_permissions(fs::Permissions::from_mode(mode))
                .map_err(|e| Error::io(ctx("setting permissions of"), e))?;
        }
        self.file
            .sync_all()
            .map_err(|e| Error::io(ctx("syncing"), e))?;
        fs::rename(&self.tmp_path, &self.final_path).map_err(|e| {
            Error::io(
                format!(
                    "renaming {} to {}",
                    self.tmp_path.display(),
                    self.final_path.display()
                ),
                e,
            )
        })?;
        self.committed = true;
        let dir = parent_dir(&self.final_path);
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))?;
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            // Removed while still locked (the file closes after this), like a cleaner does.
            let _ = fs::remove_file(&self.tmp_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_are_recognised() {
        let yes = |s: &str, of: Option<&str>| is_temp_name(OsStr::new(s), of.map(OsStr::new));
        assert!(yes(".app.12.0.tmp", None));
        assert!(yes(".app.12.0.tmp", Some("app")));
        assert!(yes(".a.b.smolmachine.7.31.tmp", Some("a.b.smolmachine")));
        assert!(!yes(".app.12.0.tmp", Some("ap")));
        assert!(!yes(".app.12.0.tmp", Some("pp")));
        assert!(!yes(".app.x.0.tmp", None));
        assert!(!yes(".app.12..tmp", None));
        assert!(!yes("..12.0.tmp", None));
        assert!(!yes("app.12.0.tmp", None));
        assert!(!yes(".app.12.0.tmpx", None));
        assert!(!yes(".12.0.tmp", None));
        assert_eq!(
            temp_name(OsStr::new("m"), 3),
            format!(".m.{}.3.tmp", std::process::id())
        );
        assert!(yes(&temp_name(OsStr::new("m"), 3), Some("m")));
    }

    #[test]
    fn a_locked_temp_survives_and_an_unlocked_one_goes() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.bin");
        let live = AtomicFile::create(&out).unwrap();
        let dead = dir.path().join(".out.bin.999999.0.tmp");
        fs::write(&dead, b"partial").unwrap();
        let other = dir.path().join(".other.1.2.tmp");
        fs::write(&other, b"x").unwrap();
        let keep = dir.path().join("out.bin.1.2.tmp");
        fs::write(&keep, b"not ours").unwrap();

        // A second writer of the same name removes the dead one, not the live one's.
        let second = AtomicFile::create(&out).unwrap();
        assert!(!dead.exists());
        assert!(live.tmp_path().exists());
        assert!(
            other.exists(),
            "another file's temp is not this writer's business"
        );

        // The sweep of the whole directory takes the other leftover only.
        let swept = remove_leftovers(dir.path()).unwrap();
        assert_eq!(swept.removed, vec![other.clone()]);
        assert!(swept.failed.is_empty());
        assert!(live.tmp_path().exists() && second.tmp_path().exists() && keep.exists());

        // Once its writer is gone (a killed process closes it too), the file is removable.
        let tmp = live.tmp_path().to_path_buf();
        let copy = dir.path().join(".out.bin.999998.0.tmp");
        fs::hard_link(&tmp, &copy).unwrap();
        assert!(
            !remove_if_unlocked(&copy).unwrap(),
            "locked through another name"
        );
        drop(live);
        assert!(!tmp.exists());
        assert!(remove_if_unlocked(&copy).unwrap());
        second.commit(None).unwrap();
        assert!(out.exists());
        assert_eq!(
            remove_leftovers(dir.path()).unwrap().removed,
            Vec::<PathBuf>::new()
        );
    }

    #[test]
    fn symlinks_and_directories_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("precious");
        fs::write(&target, b"keep").unwrap();
        let link = dir.path().join(".x.1.1.tmp");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let sub = dir.path().join(".y.1.1.tmp");
        fs::create_dir(&sub).unwrap();
        let swept = remove_leftovers(dir.path()).unwrap();
        assert!(
            swept.removed.is_empty() && swept.failed.is_empty(),
            "{swept:?}"
        );
        assert!(target.exists() && link.exists() && sub.exists());
    }
}
