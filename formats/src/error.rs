//! Errors of the format crate: every message says what is wrong and what to do about it.

use std::io;

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What can go wrong reading or writing a `.smolmachine` or a packed executable.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call failed; `context` names the file or the step.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The bytes are not a `.smolmachine` (wrong magic).
    #[error("not a .smolmachine file or packed executable: {0}")]
    NotAMachine(String),
    /// An executable without our trailer, e.g. after `strip`.
    #[error(
        "executable has no smolvm trailer: it was never packed, or `strip` removed the payload; \
         re-run `smolpack pack`"
    )]
    TrailerMissing,
    /// Written by a newer, incompatible format revision.
    #[error("{what} format version {found} is not supported (this build reads version {supported}); upgrade smolvm")]
    UnsupportedVersion {
        what: &'static str,
        found: u32,
        supported: u32,
    },
    /// A guest architecture code this build does not know.
    #[error("unknown guest architecture code {0}; upgrade smolvm")]
    UnsupportedArch(u16),
    /// Required feature flags this build does not implement.
    #[error("file needs format features 0x{0:04x} that this build lacks; upgrade smolvm")]
    UnsupportedFeatures(u32),
    /// A required section of a kind this build does not understand.
    #[error("file needs section kind {kind} (section {index}) which this build does not understand; upgrade smolvm")]
    UnknownRequiredSection { index: usize, kind: u32 },
    /// A required section uses a compression this build does not implement.
    #[error("section {index} uses unknown compression code {code}; upgrade smolvm")]
    UnknownCompression { index: usize, code: u8 },
    /// Structural damage: truncation, overlap, out-of-range offsets, bad lengths.
    #[error("corrupt .smolmachine: {0}; rebuild or re-download it")]
    Corrupt(String),
    /// A checksum did not match the bytes it covers.
    #[error("checksum mismatch in {0}: the file is damaged; rebuild or re-download it")]
    ChecksumMismatch(String),
    /// A length exceeds a cap the reader enforces.
    #[error("{what} is {len} bytes, over the {cap}-byte limit; the file is corrupt or hostile")]
    TooLarge { what: String, len: u64, cap: u64 },
    /// The machine claims more guest memory than [`MAX_GUEST_MEMORY`](crate::MAX_GUEST_MEMORY).
    #[error(
        "machine claims {} GiB of guest memory, more than the {} GiB limit",
        gib_up(*.0),
        crate::MAX_GUEST_MEMORY >> 30
    )]
    GuestMemoryTooLarge(u64),
    /// A section that must be present is absent.
    #[error("the file has no {0} section")]
    MissingSection(&'static str),
    /// The manifest JSON does not parse.
    #[error("manifest is not valid JSON: {0}")]
    Manifest(#[from] serde_json::Error),
    /// A caller passed arguments the API cannot honour.
    #[error("{0}")]
    InvalidInput(String),
    /// A signature was required and the machine has none.
    #[error("the machine is not signed, and a trusted key is configured: sign it with `smolpack sign`, or run it without a trust key")]
    Unsigned,
    /// The machine is signed by a key that is not trusted.
    #[error("the machine is signed by key {0}, which is not a trusted key")]
    UntrustedKey(String),
    /// The signature does not match the file.
    #[error("bad signature: {0}")]
    BadSignature(String),
    /// A key file does not parse.
    #[error("{0}")]
    Key(String),
    /// The stub executable is not a usable ELF file.
    #[error("stub is not a usable ELF executable: {0}")]
    Elf(String),
}

/// Bytes in GiB, rounded up (so a claim just over a limit does not read as the limit).
fn gib_up(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 30)
}

impl Error {
    /// Wraps an `io::Error` with the step that failed.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn corrupt(msg: impl Into<String>) -> Self {
        Error::Corrupt(msg.into())
    }
}
