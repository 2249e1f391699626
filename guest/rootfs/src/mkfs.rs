//! Turning a staging directory into an ext4 image with `mkfs.ext4 -d`.
//!
//! Choices, and why:
//! - **No journal** (`-O ^has_journal`). The image is the read-only base of a machine: every
//!   run writes to a copy-on-write overlay whose state is captured together with guest memory
//!   in the snapshot, so the journal would protect nothing a snapshot does not already make
//!   consistent, while costing 4–64 MiB of image, a jbd2 thread whose periodic commits dirty
//!   overlay blocks and guest memory after every resume, and slower writes. An unclean guest
//!   death only loses that run's overlay.
//! - **No lazy initialisation** (`lazy_itable_init=0`). Otherwise the guest kernel zeroes the
//!   inode tables in a background thread after mount, writing to the disk (and dirtying the
//!   snapshot) long after build. The image file stays sparse: zeroed ranges are holes.
//! - **4 KiB blocks, no reserved blocks** (`-b 4096 -m 0`): page-sized blocks suit mmap and
//!   the page cache; a single-purpose guest runs as root, so the 5 % reserve is wasted space.
//! - An explicit inode count so images of many small files (OCI layers) do not run out.

use std::fs;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result, LABEL};

/// The least room over the content that the file system needs for its own metadata.
pub(crate) const MIN_OVERHEAD: u64 = 8 << 20;

/// Finds an e2fsprogs tool on PATH or in the sbin directories root normally has.
pub(crate) fn find_tool(name: &'static str, hint: &'static str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(Error::ToolMissing { tool: name, hint })
}

/// Makes the child die with this thread (SIGKILL): a `smolpack build` killed while
/// `mkfs.ext4` or `debootstrap` runs would otherwise leave the tool writing into the scratch
/// directory that the next build is removing (and that removal then fails).
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions (prctl, getppid, _exit); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent died before the prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(137);
            }
            Ok(())
        });
    }
}

/// Runs a command, turning a non-zero exit into an error carrying the tail of its output.
/// The command dies if this process does.
pub(crate) fn run(cmd: &mut Command, tool: &str) -> Result<()> {
    die_with_parent(cmd);
    let out = cmd.output().map_err(|e| Error::io("running", tool, e))?;
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    let text = text.trim();
    let tail: String = {
        let start = text
            .char_indices()
            .rev()
            .nth(2000)
            .map(|(i, _)| i)
            .unwrap_or(0);
        text[start..].to_string()
    };
    Err(Error::ToolFailed {
        tool: tool.to_string(),
        status: out.status,
        output: tail,
    })
}

/// A random (version 4) UUID, so each image has its own identity.
fn random_uuid() -> Result<String> {
    let mut b = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| Error::io("reading", "/dev/urandom", e))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// Removes the temporary image unless the build got as far as renaming it.
struct TempImage(Option<PathBuf>);

impl Drop for TempImage {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// Writes an ext4 image of `size` bytes holding the tree at `root` to `out`, atomically.
/// Returns the file system UUID.
pub(crate) fn make_image(root: &Path, out: &Path, size: u64, entries: u64) -> Result<String> {
    let mkfs = find_tool("mkfs.ext4", "install e2fsprogs (apt-get install e2fsprogs)")?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "rootfs.ext4".into());
    let tmp = out.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let guard = TempImage(Some(tmp.clone()));
    {
        // A sparse file: mkfs writes only metadata and content, the rest stays holes.
        let f = fs::File::create(&tmp).map_err(|e| Error::io("creating", &tmp, e))?;
        f.set_len(size).map_err(|e| Error::io("sizing", &tmp, e))?;
    }
    let uuid = random_uuid()?;
    // One inode per 16 KiB of disk, and always room for the content plus a margin.
    let inodes = (size / 16384).max(entries + entries / 4 + 4096);
    run(
        Command::new(&mkfs)
            .args([
                "-F", "-q", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0",
            ])
            .arg("-N")
            .arg(inodes.to_string())
            .args(["-L", LABEL, "-U", &uuid, "-O", "^has_journal"])
            .args([
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
            ])
            .arg("-d")
            .arg(root)
            .arg(&tmp),
        "mkfs.ext4",
    )?;
    let f = fs::File::open(&tmp).map_err(|e| Error::io("opening", &tmp, e))?;
    f.sync_all().map_err(|e| Error::io("syncing", &tmp, e))?;
    fs::rename(&tmp, out).map_err(|e| Error::io("renaming the image to", out, e))?;
    let mut guard = guard;
    guard.0 = None;
    if let Some(dir) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(uuid)
}
