//! Atomic file creation: write to a temp file in the destination directory, fsync, rename,
//! fsync the directory. A crash or an early drop leaves no file under the final name.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temp file that becomes `final_path` on [`AtomicFile::commit`] and is deleted otherwise.
#[derive(Debug)]
pub(crate) struct AtomicFile {
    final_path: PathBuf,
    tmp_path: PathBuf,
    file: File,
    committed: bool,
}

impl AtomicFile {
    pub(crate) fn create(final_path: &Path) -> Result<AtomicFile> {
        let name = final_path.file_name().ok_or_else(|| {
            Error::InvalidInput(format!("{} is not a file path", final_path.display()))
        })?;
        let dir = match final_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp_path = dir.join(format!(
            ".{}.{}.{}.tmp",
            name.to_string_lossy(),
            std::process::id(),
            n
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp_path)
            .map_err(|e| Error::io(format!("creating {}", tmp_path.display()), e))?;
        Ok(AtomicFile {
            final_path: final_path.to_path_buf(),
            tmp_path,
            file,
            committed: false,
        })
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    pub(crate) fn tmp_path(&self) -> &Path {
        &self.tmp_path
    }

    /// Flushes to disk, optionally sets the permission bits, and renames into place.
    pub(crate) fn commit(mut self, mode: Option<u32>) -> Result<()> {
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
        let dir = match self.final_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))?;
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp_path);
        }
    }
}
