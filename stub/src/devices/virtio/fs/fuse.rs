//! The FUSE wire format as virtio-fs carries it: request parsing and reply
//! encoding. Everything here works on plain byte slices, so the parser can be
//! fuzzed and property-tested without guest memory or a host directory.
//!
//! Only the subset of FUSE 7.31 the share server implements is decoded; any
//! other opcode parses as [`Op::Unsupported`] and is answered `ENOSYS`. A
//! request that is short, names with a NUL missing or a `/` inside, or whose
//! header length disagrees with the bytes received, is [`ParseError`], which
//! the server answers with `EINVAL` when the header was readable.

/// FUSE major version spoken.
pub const KERNEL_VERSION: u32 = 7;
/// Newest FUSE minor version spoken (replies use the older of this and the
/// guest's).
pub const KERNEL_MINOR_VERSION: u32 = 31;
/// Size of `fuse_in_header`.
pub const IN_HEADER_LEN: usize = 40;
/// Size of `fuse_out_header`.
pub const OUT_HEADER_LEN: usize = 16;
/// Longest name accepted in a request (Linux's `NAME_MAX`).
pub const NAME_MAX: usize = 255;
/// Longest symlink target accepted (Linux's `PATH_MAX`).
pub const PATH_MAX: usize = 4096;

/// Opcodes (`enum fuse_opcode`).
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const SYNCFS: u32 = 50;
}

/// `fuse_setattr_in.valid` bits.
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
}

/// `fuse_init_in/out.flags` bits used here.
pub mod init_flags {
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const ATOMIC_O_TRUNC: u32 = 1 << 3;
    pub const BIG_WRITES: u32 = 1 << 5;
    pub const DONT_MASK: u32 = 1 << 6;
    pub const AUTO_INVAL_DATA: u32 = 1 << 12;
    pub const PARALLEL_DIROPS: u32 = 1 << 18;
    pub const MAX_PAGES: u32 = 1 << 22;
}

/// Why a request could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Fewer bytes than the header.
    #[error("FUSE request shorter than its header")]
    NoHeader,
    /// The header's length field disagrees with the bytes received.
    #[error("FUSE request length {0} does not match the {1} bytes received")]
    BadLength(u32, usize),
    /// The body is shorter than the opcode's fixed part.
    #[error("FUSE request body too short for its opcode")]
    Short,
    /// A name is unterminated, empty, too long, or holds a `/`.
    #[error("FUSE request carries an invalid name")]
    BadName,
}

/// `fuse_in_header`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// `fuse_setattr_in`, the fields used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SetattrIn {
    pub valid: u32,
    pub fh: u64,
    pub size: u64,
    pub atime: u64,
    pub mtime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// A decoded request body; names are single path components (checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op<'a> {
    Init {
        major: u32,
        minor: u32,
        max_readahead: u32,
        flags: u32,
    },
    Destroy,
    Lookup {
        name: &'a [u8],
    },
    Forget {
        nlookup: u64,
    },
    BatchForget {
        forgets: Vec<(u64, u64)>,
    },
    Getattr {
        fh: Option<u64>,
    },
    Setattr(SetattrIn),
    Readlink,
    Symlink {
        name: &'a [u8],
        target: &'a [u8],
    },
    Mknod {
        name: &'a [u8],
        mode: u32,
        rdev: u32,
        umask: u32,
    },
    Mkdir {
        name: &'a [u8],
        mode: u32,
        umask: u32,
    },
    Unlink {
        name: &'a [u8],
    },
    Rmdir {
        name: &'a [u8],
    },
    Rename {
        newdir: u64,
        flags: u32,
        old: &'a [u8],
        new: &'a [u8],
    },
    Link {
        oldnodeid: u64,
        name: &'a [u8],
    },
    Open {
        flags: u32,
    },
    Opendir {
        flags: u32,
    },
    Read {
        fh: u64,
        offset: u64,
        size: u32,
    },
    Readdir {
        fh: u64,
        offset: u64,
        size: u32,
    },
    Write {
        fh: u64,
        offset: u64,
        data: &'a [u8],
    },
    Statfs,
    Release {
        fh: u64,
    },
    Releasedir {
        fh: u64,
    },
    Fsync {
        fh: u64,
        datasync: bool,
    },
    Fsyncdir {
        fh: u64,
        datasync: bool,
    },
    Flush {
        fh: u64,
    },
    Create {
        name: &'a [u8],
        flags: u32,
        mode: u32,
        umask: u32,
    },
    Fallocate {
        fh: u64,
        offset: u64,
        length: u64,
        mode: u32,
    },
    Lseek {
        fh: u64,
        offset: u64,
        whence: u32,
    },
    Syncfs,
    Interrupt,
    /// Known to FUSE but not served (xattrs, locks, ioctl, ...): `ENOSYS`.
    Unsupported(u32),
}

impl Op<'_> {
    /// Whether the opcode gets no reply (forgets and interrupts).
    pub fn no_reply(&self) -> bool {
        matches!(
            self,
            Op::Forget { .. } | Op::BatchForget { .. } | Op::Interrupt
        )
    }
}

/// A decoded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub header: InHeader,
    pub op: Op<'a>,
}

/// Little-endian cursor over a request body.
struct Rd<'a> {
    b: &'a [u8],
}

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ParseError> {
        if self.b.len() < n {
            return Err(ParseError::Short);
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u32(&mut self) -> Result<u32, ParseError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, ParseError> {
        let lo = u64::from(self.u32()?);
        let hi = u64::from(self.u32()?);
        Ok(lo | hi << 32)
    }
    /// A NUL-terminated string (the NUL is consumed, not returned).
    fn cstr(&mut self, max: usize) -> Result<&'a [u8], ParseError> {
        let end = self
            .b
            .iter()
            .take(max + 1)
            .position(|&c| c == 0)
            .ok_or(ParseError::BadName)?;
        let s = &self.b[..end];
        self.b = &self.b[end + 1..];
        Ok(s)
    }
    /// A directory entry name: one component, not `.` or `..`.
    fn name(&mut self) -> Result<&'a [u8], ParseError> {
        let n = self.cstr(NAME_MAX)?;
        if !valid_name(n) {
            return Err(ParseError::BadName);
        }
        Ok(n)
    }
    /// A name that is the whole rest of the body (an embedded NUL is not a
    /// shorter name plus ignored bytes, but a bad request).
    fn last_name(&mut self) -> Result<&'a [u8], ParseError> {
        let n = self.name()?;
        if !self.b.is_empty() {
            return Err(ParseError::BadName);
        }
        Ok(n)
    }
}

/// Whether `n` is a usable single path component: not empty, not `.` or `..`,
/// no `/` or NUL, at most [`NAME_MAX`] bytes.
pub fn valid_name(n: &[u8]) -> bool {
    !n.is_empty()
        && n.len() <= NAME_MAX
        && n != b"."
        && n != b".."
        && !n.iter().any(|&c| c == b'/' || c == 0)
}

impl<'a> Request<'a> {
    /// Decode one request (header and body, exactly `header.len` bytes).
    pub fn parse(buf: &'a [u8]) -> Result<Self, ParseError> {
        let header = parse_header(buf)?;
        if header.len as usize != buf.len() {
            return Err(ParseError::BadLength(header.len, buf.len()));
        }
        let mut r = Rd {
            b: &buf[IN_HEADER_LEN..],
        };
        use opcode::*;
        let op = match header.opcode {
            INIT => {
                let major = r.u32()?;
                let minor = r.u32()?;
                let max_readahead = r.u32()?;
                let flags = r.u32()?;
                Op::Init {
                    major,
                    minor,
                    max_readahead,
                    flags,
                }
            }
            DESTROY => Op::Destroy,
            LOOKUP => Op::Lookup {
                name: r.last_name()?,
            },
            FORGET => Op::Forget { nlookup: r.u64()? },
            BATCH_FORGET => {
                let count = r.u32()? as usize;
                r.u32()?;
                // Bounded by the bytes present, not by `count`.
                if r.b.len() / 16 < count {
                    return Err(ParseError::Short);
                }
                let mut forgets = Vec::with_capacity(count);
                for _ in 0..count {
                    forgets.push((r.u64()?, r.u64()?));
                }
                Op::BatchForget { forgets }
            }
            GETATTR => {
                let flags = r.u32()?;
                r.u32()?;
                let fh = r.u64()?;
                // FUSE_GETATTR_FH
                Op::Getattr {
                    fh: (flags & 1 != 0).then_some(fh),
                }
            }
            SETATTR => {
                let valid = r.u32()?;
                r.u32()?;
                let fh = r.u64()?;
                let size = r.u64()?;
                r.u64()?; // lock_owner
                let atime = r.u64()?;
                let mtime = r.u64()?;
                r.u64()?; // ctime
                let atimensec = r.u32()?;
                let mtimensec = r.u32()?;
                r.u32()?; // ctimensec
                let mode = r.u32()?;
                r.u32()?;
                let uid = r.u32()?;
                let gid = r.u32()?;
                r.u32()?;
                Op::Setattr(SetattrIn {
                    valid,
                    fh,
                    size,
                    atime,
                    mtime,
                    atimensec,
                    mtimensec,
                    mode,
                    uid,
                    gid,
                })
            }
            READLINK => Op::Readlink,
            SYMLINK => {
                let name = r.name()?;
                let target = r.cstr(PATH_MAX)?;
                if target.is_empty() {
                    return Err(ParseError::BadName);
                }
                Op::Symlink { name, target }
            }
            MKNOD => {
                let mode = r.u32()?;
                let rdev = r.u32()?;
                let umask = r.u32()?;
                r.u32()?;
                Op::Mknod {
                    name: r.name()?,
                    mode,
                    rdev,
                    umask,
                }
            }
            MKDIR => {
                let mode = r.u32()?;
                let umask = r.u32()?;
                Op::Mkdir {
                    name: r.name()?,
                    mode,
                    umask,
                }
            }
            UNLINK => Op::Unlink {
                name: r.last_name()?,
            },
            RMDIR => Op::Rmdir {
                name: r.last_name()?,
            },
            RENAME => {
                let newdir = r.u64()?;
                Op::Rename {
                    newdir,
                    flags: 0,
                    old: r.name()?,
                    new: r.name()?,
                }
            }
            RENAME2 => {
                let newdir = r.u64()?;
                let flags = r.u32()?;
                r.u32()?;
                Op::Rename {
                    newdir,
                    flags,
                    old: r.name()?,
                    new: r.name()?,
                }
            }
            LINK => {
                let oldnodeid = r.u64()?;
                Op::Link {
                    oldnodeid,
                    name: r.name()?,
                }
            }
            OPEN | OPENDIR => {
                let flags = r.u32()?;
                r.u32()?;
                if header.opcode == OPEN {
                    Op::Open { flags }
                } else {
                    Op::Opendir { flags }
                }
            }
            READ | READDIR => {
                let fh = r.u64()?;
                let offset = r.u64()?;
                let size = r.u32()?;
                r.take(20)?; // read_flags, lock_owner, flags, padding
                if header.opcode == READ {
                    Op::Read { fh, offset, size }
                } else {
                    Op::Readdir { fh, offset, size }
                }
            }
            WRITE => {
                let fh = r.u64()?;
                let offset = r.u64()?;
                let size = r.u32()? as usize;
                r.take(20)?; // write_flags, lock_owner, flags, padding
                if r.b.len() != size {
                    return Err(ParseError::Short);
                }
                Op::Write {
                    fh,
                    offset,
                    data: r.b,
                }
            }
            STATFS => Op::Statfs,
            RELEASE | RELEASEDIR => {
                let fh = r.u64()?;
                r.take(16)?;
                if header.opcode == RELEASE {
                    Op::Release { fh }
                } else {
                    Op::Releasedir { fh }
                }
            }
            FSYNC | FSYNCDIR => {
                let fh = r.u64()?;
                let datasync = r.u32()? & 1 != 0;
                r.u32()?;
                if header.opcode == FSYNC {
                    Op::Fsync { fh, datasync }
                } else {
                    Op::Fsyncdir { fh, datasync }
                }
            }
            FLUSH => {
                let fh = r.u64()?;
                r.take(16)?;
                Op::Flush { fh }
            }
            CREATE => {
                let flags = r.u32()?;
                let mode = r.u32()?;
                let umask = r.u32()?;
                r.u32()?;
                Op::Create {
                    name: r.name()?,
                    flags,
                    mode,
                    umask,
                }
            }
            FALLOCATE => {
                let fh = r.u64()?;
                let offset = r.u64()?;
                let length = r.u64()?;
                let mode = r.u32()?;
                r.u32()?;
                Op::Fallocate {
                    fh,
                    offset,
                    length,
                    mode,
                }
            }
            LSEEK => {
                let fh = r.u64()?;
                let offset = r.u64()?;
                let whence = r.u32()?;
                r.u32()?;
                Op::Lseek { fh, offset, whence }
            }
            SYNCFS => Op::Syncfs,
            INTERRUPT => Op::Interrupt,
            other => Op::Unsupported(other),
        };
        Ok(Request { header, op })
    }
}

/// Decode only the header (to answer a request whose body is bad).
pub fn parse_header(buf: &[u8]) -> Result<InHeader, ParseError> {
    if buf.len() < IN_HEADER_LEN {
        return Err(ParseError::NoHeader);
    }
    let mut r = Rd {
        b: &buf[..IN_HEADER_LEN],
    };
    Ok(InHeader {
        len: r.u32()?,
        opcode: r.u32()?,
        unique: r.u64()?,
        nodeid: r.u64()?,
        uid: r.u32()?,
        gid: r.u32()?,
        pid: r.u32()?,
    })
}

/// `fuse_attr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: u64,
    pub mtime: u64,
    pub ctime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub ctimensec: u32,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

/// Builds a reply body, little-endian.
#[derive(Default)]
pub struct Wr {
    pub buf: Vec<u8>,
}

impl Wr {
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }
    /// `fuse_attr` (88 bytes).
    pub fn attr(&mut self, a: &Attr) -> &mut Self {
        self.u64(a.ino)
            .u64(a.size)
            .u64(a.blocks)
            .u64(a.atime)
            .u64(a.mtime)
            .u64(a.ctime)
            .u32(a.atimensec)
            .u32(a.mtimensec)
            .u32(a.ctimensec)
            .u32(a.mode)
            .u32(a.nlink)
            .u32(a.uid)
            .u32(a.gid)
            .u32(a.rdev)
            .u32(a.blksize)
            .u32(0)
    }
    /// `fuse_entry_out` (128 bytes).
    pub fn entry(&mut self, nodeid: u64, a: &Attr, valid_s: u64) -> &mut Self {
        self.u64(nodeid)
            .u64(0)
            .u64(valid_s)
            .u64(valid_s)
            .u32(0)
            .u32(0)
            .attr(a)
    }
    /// `fuse_attr_out` (104 bytes).
    pub fn attr_out(&mut self, a: &Attr, valid_s: u64) -> &mut Self {
        self.u64(valid_s).u32(0).u32(0).attr(a)
    }
    /// `fuse_open_out` (16 bytes).
    pub fn open_out(&mut self, fh: u64, open_flags: u32) -> &mut Self {
        self.u64(fh).u32(open_flags).u32(0)
    }
}

/// A complete reply: `fuse_out_header` followed by `body`.
pub fn reply(unique: u64, error: i32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OUT_HEADER_LEN + body.len());
    let len = (OUT_HEADER_LEN + body.len()) as u32;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&error.to_le_bytes());
    out.extend_from_slice(&unique.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// An error reply (`errno` positive; sent negated).
pub fn reply_err(unique: u64, errno: i32) -> Vec<u8> {
    reply(unique, -errno, &[])
}

/// Append one `fuse_dirent` to `out` if it fits in `max` bytes total;
/// returns whether it did.
pub fn push_dirent(
    out: &mut Vec<u8>,
    max: usize,
    ino: u64,
    off: u64,
    typ: u32,
    name: &[u8],
) -> bool {
    let len = 24 + name.len();
    let padded = (len + 7) & !7;
    if out.len() + padded > max {
        return false;
    }
    out.extend_from_slice(&ino.to_le_bytes());
    out.extend_from_slice(&off.to_le_bytes());
    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
    out.extend_from_slice(&typ.to_le_bytes());
    out.extend_from_slice(name);
    out.resize(out.len() + (padded - len), 0);
    true
}

#[cfg(test)]
pub(crate) mod build {
    //! Request encoders for tests (the guest kernel's side).
    use super::*;

    pub fn req(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
        let mut w = Wr::default();
        w.u32((IN_HEADER_LEN + body.len()) as u32)
            .u32(opcode)
            .u64(unique)
            .u64(nodeid)
            .u32(0)
            .u32(0)
            .u32(1)
            .u32(0)
            .bytes(body);
        w.buf
    }

    pub fn cstr(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_lookup_and_rejects_bad_names() {
        let r = req(opcode::LOOKUP, 7, 1, &cstr("a.txt"));
        let p = Request::parse(&r).unwrap();
        assert_eq!(p.header.unique, 7);
        assert_eq!(p.op, Op::Lookup { name: b"a.txt" });
        for bad in ["..", ".", "a/b", "/etc", ""] {
            let r = req(opcode::LOOKUP, 7, 1, &cstr(bad));
            assert_eq!(Request::parse(&r), Err(ParseError::BadName), "{bad:?}");
        }
        // No terminating NUL.
        let r = req(opcode::LOOKUP, 7, 1, b"abc");
        assert_eq!(Request::parse(&r), Err(ParseError::BadName));
        // Over NAME_MAX.
        let r = req(opcode::LOOKUP, 7, 1, &cstr(&"x".repeat(256)));
        assert_eq!(Request::parse(&r), Err(ParseError::BadName));
    }

    #[test]
    fn length_must_match() {
        let mut r = req(opcode::GETATTR, 1, 1, &[0; 16]);
        r.push(0);
        assert!(matches!(Request::parse(&r), Err(ParseError::BadLength(..))));
        assert_eq!(Request::parse(&r[..10]), Err(ParseError::NoHeader));
        let r = req(opcode::GETATTR, 1, 1, &[0; 8]);
        assert_eq!(Request::parse(&r), Err(ParseError::Short));
    }

    #[test]
    fn write_size_must_match_data() {
        let mut body = Wr::default();
        body.u64(3).u64(0).u32(5).bytes(&[0; 20]).bytes(b"hello");
        let r = req(opcode::WRITE, 1, 2, &body.buf);
        let p = Request::parse(&r).unwrap();
        assert_eq!(
            p.op,
            Op::Write {
                fh: 3,
                offset: 0,
                data: b"hello"
            }
        );
        let mut body = Wr::default();
        body.u64(3).u64(0).u32(99).bytes(&[0; 20]).bytes(b"hello");
        assert_eq!(
            Request::parse(&req(opcode::WRITE, 1, 2, &body.buf)),
            Err(ParseError::Short)
        );
    }

    #[test]
    fn batch_forget_count_is_bounded_by_bytes() {
        let mut body = Wr::default();
        body.u32(u32::MAX).u32(0).u64(5).u64(1);
        assert_eq!(
            Request::parse(&req(opcode::BATCH_FORGET, 1, 0, &body.buf)),
            Err(ParseError::Short)
        );
    }

    #[test]
    fn dirents_are_padded_and_bounded() {
        let mut out = Vec::new();
        assert!(push_dirent(&mut out, 64, 1, 1, 4, b"abc"));
        assert_eq!(out.len(), 32);
        assert!(!push_dirent(&mut out, 64, 2, 2, 4, b"0123456789"));
        assert_eq!(out.len(), 32);
    }

    proptest! {
        /// Arbitrary bytes never panic the parser, and a parsed request's
        /// names are always single safe components.
        #[test]
        fn parse_never_panics(mut body in proptest::collection::vec(any::<u8>(), 0..512),
                              opcode in 0u32..60, nodeid in any::<u64>(), fix_len in any::<bool>()) {
            let mut r = req(opcode, 1, nodeid, &[]);
            r.append(&mut body);
            if fix_len {
                let len = r.len() as u32;
                r[..4].copy_from_slice(&len.to_le_bytes());
            }
            if let Ok(p) = Request::parse(&r) {
                let names: Vec<&[u8]> = match p.op {
                    Op::Lookup { name } | Op::Unlink { name } | Op::Rmdir { name }
                    | Op::Mkdir { name, .. } | Op::Mknod { name, .. } | Op::Create { name, .. }
                    | Op::Link { name, .. } | Op::Symlink { name, .. } => vec![name],
                    Op::Rename { old, new, .. } => vec![old, new],
                    _ => vec![],
                };
                for n in names {
                    prop_assert!(valid_name(n));
                }
            }
        }
    }
}
