//! Errors of the root filesystem builders.

use std::path::PathBuf;

/// Why an image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("building a root filesystem needs root (file owners are copied into the image); run as root")]
    NotRoot,
    #[error("`{tool}` not found; {hint}")]
    ToolMissing {
        tool: &'static str,
        hint: &'static str,
    },
    #[error("`{tool}` failed ({status}): {output}")]
    ToolFailed {
        tool: String,
        status: std::process::ExitStatus,
        output: String,
    },
    #[error("agent {}: {reason}; build it with guest/agent/build.sh", path.display())]
    BadAgent { path: PathBuf, reason: String },
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("guest path {path:?} is invalid: {reason}")]
    GuestPath { path: String, reason: &'static str },
    #[error("image size {requested} bytes is too small for the content; use at least {needed} bytes or leave the size unset")]
    SizeTooSmall { requested: u64, needed: u64 },
    #[error("no static busybox: {0}; install Debian's busybox-static or set SMOLVM_BUSYBOX to a static busybox")]
    NoBusybox(String),
    #[error("no static {arch} busybox: {reason}; run `scripts/setup --aarch64` (dpkg --add-architecture arm64 and apt-get update) or set {env} to a static {arch} busybox")]
    NoForeignBusybox {
        arch: &'static str,
        env: &'static str,
        reason: String,
    },
    #[error("the busybox applets of {}: {reason}", path.display())]
    Applets { path: PathBuf, reason: String },
    #[error("the {base} base is built for x86_64 only; the agent is {arch} (use the busybox or dir base)")]
    BaseArch {
        base: &'static str,
        arch: &'static str,
    },
    #[error("invalid Debian {what} {value:?}: use lowercase letters, digits and . + -")]
    DebianName { what: &'static str, value: String },
    #[error("OCI image {}: {reason}", archive.display())]
    Oci { archive: PathBuf, reason: String },
    #[error("OCI layer {layer}: entry {entry:?}: {reason}")]
    OciEntry {
        layer: String,
        entry: String,
        reason: String,
    },
}

impl Error {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
