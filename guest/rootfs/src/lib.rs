//! Root filesystem image builders.
//!
//! A machine's root disk is an ext4 image whose `/sbin/init` is the static smolvm agent.
//! The builders assemble a staging directory from one base (a busybox userland, a Debian
//! `debootstrap`, an OCI image archive, or a host directory), copy extra files in, install
//! the agent, and turn the directory into an image with `mkfs.ext4 -d` from e2fsprogs, so
//! no loop mounts (and no kernel support) are needed.
//!
//! Owners are copied from the staging directory by `mkfs.ext4 -d`, so building needs root:
//! files staged by an unprivileged user would end up owned by that user's uid in the guest.

mod busybox;
mod debian;
mod error;
mod fsutil;
mod mkfs;
mod oci;

use std::path::{Path, PathBuf};

pub use busybox::{find_busybox, find_busybox_for};
pub use error::Error;
pub use oci::OciConfig;

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where the agent lives in every image; `/sbin/init` is a symlink to it.
pub const AGENT_GUEST_PATH: &str = "/sbin/smol-agent";

/// The ext4 volume label of every image.
pub const LABEL: &str = "smolroot";

/// What the image is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// Debian's `busybox-static` with its applet links and a minimal `/etc`.
    Busybox,
    /// `debootstrap --variant=minbase SUITE` plus `packages` (needs the network on a cache miss).
    Debian {
        /// Debian suite, e.g. `bookworm`.
        suite: String,
        /// Extra packages passed to `debootstrap --include`.
        packages: Vec<String>,
    },
    /// An OCI image: a `docker save` tar, an OCI image-layout tar, or an unpacked layout directory.
    Oci {
        /// The archive file or layout directory on the host.
        archive: PathBuf,
    },
    /// A host directory copied as is (owners, modes, links and extended attributes preserved).
    Dir {
        /// The directory on the host.
        path: PathBuf,
    },
}

/// The architecture of an image: that of its agent (PID 1), which the busybox base follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// x86-64.
    X86_64,
    /// 64-bit Arm (arm64).
    Aarch64,
}

impl Arch {
    /// The architecture this program runs on.
    pub fn host() -> Arch {
        if cfg!(target_arch = "aarch64") {
            Arch::Aarch64
        } else {
            Arch::X86_64
        }
    }

    /// The name Rust and the kernel's `uname -m` use.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// Debian's name for it (`dpkg --print-architecture`).
    pub fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }

    /// The ELF header's `e_machine` (EM_X86_64, EM_AARCH64).
    pub(crate) fn elf_machine(self) -> u16 {
        match self {
            Arch::X86_64 => 62,
            Arch::Aarch64 => 183,
        }
    }
}

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsSpec {
    /// The base file tree.
    pub base: Base,
    /// Host files or directories copied in after the base, as `(host source, absolute guest
    /// destination)`, owned by root in the guest. A directory source copies its contents into
    /// the destination directory; a file source becomes the destination file, or goes inside it
    /// when the destination ends with `/` or is an existing directory.
    pub copies: Vec<(PathBuf, PathBuf)>,
    /// The static agent binary on the host, installed as `/sbin/smol-agent` and `/sbin/init`.
    /// Its architecture (x86-64 or aarch64) is the image's: a busybox base is that
    /// architecture's busybox; the Debian and OCI bases are x86-64 only so far.
    pub agent: PathBuf,
    /// Image size in bytes; `None` sizes the image from its content (see [`default_size`]).
    pub size: Option<u64>,
}

impl RootfsSpec {
    /// A spec with no copies and a size derived from the content.
    pub fn new(base: Base, agent: impl Into<PathBuf>) -> Self {
        RootfsSpec {
            base,
            copies: Vec::new(),
            agent: agent.into(),
            size: None,
        }
    }
}

/// What was built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The image file.
    pub path: PathBuf,
    /// Apparent size of the image in bytes (the file system's size).
    pub size: u64,
    /// Bytes the sparse image file occupies on the host disk.
    pub allocated: u64,
    /// Bytes of file content staged into the image (4 KiB block granularity).
    pub content_bytes: u64,
    /// Files, directories and links staged into the image.
    pub entries: u64,
    /// The file system UUID.
    pub uuid: String,
    /// The image configuration of an OCI base (environment, entrypoint, command, workdir).
    pub oci_config: Option<OciConfig>,
}

/// The image size used when the spec gives none: content × 1.25 plus 32 MiB of headroom
/// (metadata, and room for the guest to write), rounded up to a whole MiB.
pub fn default_size(content_bytes: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    let raw = content_bytes
        .saturating_add(content_bytes / 4)
        .saturating_add(32 * MIB);
    raw.div_ceil(MIB).saturating_mul(MIB)
}

/// The smolvm cache directory: `$SMOLVM_CACHE`, else `$HOME/.cache/smolvm`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SMOLVM_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache").join("smolvm")
}

/// Builds the image described by `spec` at `out`.
///
/// The image is written to a temporary file beside `out` and renamed over it once complete,
/// so `out` is either the old file or the whole new image, never a partial one.
pub fn build(spec: &RootfsSpec, out: &Path) -> Result<ImageInfo> {
    fsutil::require_root()?;
    let arch = fsutil::check_agent(&spec.agent)?;
    let agent = spec.agent.clone();
    let out_dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&out_dir).map_err(|e| Error::io("creating", &out_dir, e))?;
    // Stage next to the output rather than in /tmp: /tmp is often a small tmpfs, and a
    // Debian or OCI tree can be hundreds of MiB.
    let staging_parent = tempfile::Builder::new()
        .prefix(".smolroot-staging-")
        .tempdir_in(&out_dir)
        .map_err(|e| Error::io("creating a staging directory in", &out_dir, e))?;
    let root = staging_parent.path().join("root");
    fsutil::mkdir_mode(&root, 0o755)?;

    let mut oci_config = None;
    match &spec.base {
        Base::Busybox => busybox::stage(&root, arch)?,
        Base::Debian { .. } | Base::Oci { .. } if arch != Arch::X86_64 => {
            return Err(Error::BaseArch {
                base: if matches!(spec.base, Base::Debian { .. }) {
                    "debian"
                } else {
                    "oci"
                },
                arch: arch.name(),
            });
        }
        Base::Debian { suite, packages } => debian::stage(&root, suite, packages)?,
        Base::Oci { archive } => {
            oci_config = Some(oci::stage(&root, archive, staging_parent.path())?);
        }
        Base::Dir { path } => {
            let meta = std::fs::metadata(path).map_err(|e| Error::io("reading", path, e))?;
            if !meta.is_dir() {
                return Err(Error::NotADirectory(path.clone()));
            }
            fsutil::copy_tree(path, &root, fsutil::Owners::Preserve)?;
        }
    }
    // The guest's `/` belongs to root whatever the base's top directory said.
    fsutil::lchown(&root, 0, 0)?;
    fsutil::set_mode(&root, 0o755)?;
    fsutil::ensure_mountpoints(&root)?;
    for (src, dst) in &spec.copies {
        fsutil::copy_in(&root, src, dst)?;
    }
    fsutil::install_agent(&root, &agent)?;

    let usage = fsutil::usage(&root)?;
    let size = match spec.size {
        Some(size) => {
            if size < usage.bytes + mkfs::MIN_OVERHEAD {
                return Err(Error::SizeTooSmall {
                    requested: size,
                    needed: default_size(usage.bytes),
                });
            }
            size
        }
        None => default_size(usage.bytes),
    };
    let uuid = mkfs::make_image(&root, out, size, usage.entries)?;
    drop(staging_parent);

    let meta = std::fs::metadata(out).map_err(|e| Error::io("reading", out, e))?;
    Ok(ImageInfo {
        path: out.to_path_buf(),
        size: meta.len(),
        allocated: std::os::unix::fs::MetadataExt::blocks(&meta) * 512,
        content_bytes: usage.bytes,
        entries: usage.entries,
        uuid,
        oci_config,
    })
}
