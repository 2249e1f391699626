//! The share server: FUSE requests answered from host directories.
//!
//! One server serves every share of a machine. Node 1 is a synthetic,
//! read-only root whose entries `0`, `1`, ... are the shares' roots; the
//! agent mounts the device once and bind-mounts entry N at share N's guest
//! path.
//!
//! Confinement. An inode is remembered as its path relative to its share's
//! root, never as an open descriptor, and every access resolves that path
//! again with `openat2(root, path, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS)`: no symlink is followed on the host (the guest
//! sees symlinks as symlinks and resolves them in its own namespace), no `..`
//! climbs out, and a host directory renamed out of the share is simply gone.
//! Entry operations use a parent descriptor obtained that way plus one name
//! the parser checked (no `/`, not `.` or `..`). Files are opened for I/O by
//! reopening the verified `O_PATH` descriptor through `/proc/self/fd`, so only
//! regular files and directories are ever opened (never a device node or
//! FIFO, and never an object swapped in after the check). The resolved
//! object's device and inode numbers must match the ones looked up, or the
//! request fails with `ESTALE` (the guest looks the name up again).
//!
//! Policy. Read-only shares refuse every change with `EROFS` here, whatever
//! the guest's mount says. Created files get no setuid/setgid bits and are
//! owned by the host user running the VMM (which the guest sees as uid and
//! gid 0; other owners show as 65534); ownership changes are accepted and
//! ignored. Each share holds at most [`MAX_INODES`] inodes and
//! [`MAX_HANDLES`] open files; requests past that get `ENFILE`/`EMFILE`.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use super::fuse::{self, fattr, init_flags, opcode, Attr, Op, Request, Wr};

/// Most inodes one share may have known to the guest at once.
pub const MAX_INODES: usize = 32768;
/// Most open files and directories per share.
pub const MAX_HANDLES: usize = 1024;
/// Largest read or write payload (also announced as `max_write`).
pub const MAX_IO: usize = 1 << 20;
/// Largest request accepted: a maximal write and its headers.
pub const MAX_REQUEST: usize = MAX_IO + 4096;
/// Seconds the guest may cache entries and attributes.
const TTL_S: u64 = 1;
/// The synthetic root's node ID (`FUSE_ROOT_ID`).
pub const ROOT_ID: u64 = 1;
/// Owner shown for host files not owned by the VMM's user.
const NOBODY: u32 = 65534;

/// One host directory to share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareConfig {
    /// The host directory.
    pub host: PathBuf,
    /// Whether the guest may change it.
    pub read_only: bool,
}

/// Why a share could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// The host directory cannot be opened.
    #[error("cannot share {path}: {err}")]
    Open { path: String, err: io::Error },
    /// This host kernel lacks `openat2` (Linux 5.6).
    #[error("sharing directories needs Linux 5.6 or newer on the host (openat2)")]
    NoOpenat2,
}

struct Share {
    root: OwnedFd,
    read_only: bool,
    inodes: usize,
    handles: usize,
}

struct Inode {
    share: usize,
    /// Relative to the share's root; empty for the root itself.
    path: Vec<u8>,
    dev: u64,
    ino: u64,
    nlookup: u64,
}

enum HandleKind {
    File(File),
    Dir(File),
    /// The synthetic root's listing.
    Root,
}

struct Handle {
    share: Option<usize>,
    kind: HandleKind,
}

/// The FUSE server behind the virtio-fs device.
pub struct Server {
    shares: Vec<Share>,
    inodes: HashMap<u64, Inode>,
    by_key: HashMap<(usize, u64, u64), u64>,
    next_node: u64,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    uid: u32,
    gid: u32,
    max_inodes: usize,
    max_handles: usize,
}

type Res<T> = Result<T, i32>;

fn errno(e: io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn last() -> i32 {
    errno(io::Error::last_os_error())
}

fn cstr(b: &[u8]) -> Res<CString> {
    CString::new(b).map_err(|_| libc::EINVAL)
}

/// `openat2(dir, path, flags | O_CLOEXEC, resolve)`, retried when the kernel
/// asks (a rename raced the walk). All opens of the server go through here,
/// so the vCPU threads that run it need `openat2` and not `openat`.
fn openat2(dir: i32, path: &std::ffi::CStr, flags: i32, mode: u32, resolve: u64) -> Res<OwnedFd> {
    // SAFETY: open_how is plain data; all-zero is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = if flags & (libc::O_CREAT | libc::O_TMPFILE) != 0 {
        u64::from(mode)
    } else {
        0
    };
    how.resolve = resolve;
    loop {
        // SAFETY: `path` is a NUL-terminated string and `how` a valid
        // open_how of the size passed; the kernel returns a new fd or -1.
        let r = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir,
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if r >= 0 {
            // SAFETY: the kernel returned a new descriptor we now own.
            return Ok(unsafe { OwnedFd::from_raw_fd(r as i32) });
        }
        let e = last();
        if e != libc::EAGAIN && e != libc::EINTR {
            return Err(e);
        }
    }
}

/// `path` under `dir` with no symlink followed and no escape
/// (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`, and
/// `O_NOFOLLOW` for the last component); an empty path means `dir` itself.
fn open_beneath(dir: BorrowedFd<'_>, path: &[u8], flags: i32, mode: u32) -> Res<OwnedFd> {
    let p = cstr(if path.is_empty() { b"." } else { path })?;
    openat2(
        dir.as_raw_fd(),
        &p,
        flags | libc::O_NOFOLLOW,
        mode,
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    )
}

fn fstat(fd: BorrowedFd<'_>) -> Res<libc::stat> {
    // SAFETY: stat is plain data, filled in by the kernel.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open and `st` a writable stat.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(last());
    }
    Ok(st)
}

/// `/proc/self/fd/N`, to reopen or change an `O_PATH` descriptor's object
/// (which the kernel resolves to that exact inode, never by name).
fn proc_path(fd: BorrowedFd<'_>) -> CString {
    // No NUL can appear in a formatted number.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

fn reopen(fd: BorrowedFd<'_>, flags: i32) -> Res<File> {
    let p = proc_path(fd);
    // The one magic link followed: our own descriptor's.
    openat2(libc::AT_FDCWD, &p, flags | libc::O_NOCTTY, 0, 0).map(File::from)
}

fn is(st: &libc::stat, fmt: u32) -> bool {
    st.st_mode & libc::S_IFMT == fmt
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(parent.len() + 1 + name.len());
    if !parent.is_empty() {
        p.extend_from_slice(parent);
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Mode bits the guest may set: permissions and sticky, never setuid/setgid.
fn safe_mode(mode: u32) -> u32 {
    mode & 0o1777
}

impl Server {
    /// Open every share's root (symlinks in the configured host path are
    /// the user's choice and are followed once, here).
    pub fn new(configs: &[ShareConfig]) -> Result<Self, ShareError> {
        let mut shares = Vec::with_capacity(configs.len());
        for c in configs {
            let p = CString::new(c.host.as_os_str().as_bytes()).map_err(|_| ShareError::Open {
                path: c.host.display().to_string(),
                err: io::ErrorKind::InvalidInput.into(),
            })?;
            // SAFETY: `p` is NUL-terminated; open returns a new fd or -1.
            let fd = unsafe {
                libc::open(
                    p.as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            };
            if fd < 0 {
                return Err(ShareError::Open {
                    path: c.host.display().to_string(),
                    err: io::Error::last_os_error(),
                });
            }
            // SAFETY: a new descriptor we now own.
            let root = unsafe { OwnedFd::from_raw_fd(fd) };
            if let Err(libc::ENOSYS) = open_beneath(root.as_fd(), b"", libc::O_PATH, 0) {
                return Err(ShareError::NoOpenat2);
            }
            shares.push(Share {
                root,
                read_only: c.read_only,
                inodes: 0,
                handles: 0,
            });
        }
        if !shares.is_empty() {
            raise_fd_limit(shares.len() * MAX_HANDLES + 256);
        }
        Ok(Server {
            shares,
            inodes: HashMap::new(),
            by_key: HashMap::new(),
            next_node: ROOT_ID + 1,
            handles: HashMap::new(),
            next_fh: 1,
            // SAFETY: getters without arguments or failure modes.
            uid: unsafe { libc::geteuid() },
            // SAFETY: as above.
            gid: unsafe { libc::getegid() },
            max_inodes: MAX_INODES,
            max_handles: MAX_HANDLES,
        })
    }

    /// Lower the caps (tests reach them without 32768 files).
    #[cfg(test)]
    pub fn set_limits(&mut self, inodes: usize, handles: usize) {
        self.max_inodes = inodes;
        self.max_handles = handles;
    }

    /// How many shares are served.
    pub fn share_count(&self) -> usize {
        self.shares.len()
    }

    /// Inodes and open handles the guest holds now (for tests and limits).
    pub fn counts(&self) -> (usize, usize) {
        (self.inodes.len(), self.handles.len())
    }

    /// Answer one request. `max_reply` is the room the guest gave for the
    /// reply; `None` for requests that take no reply.
    pub fn handle(&mut self, buf: &[u8], max_reply: usize) -> Option<Vec<u8>> {
        let req = match Request::parse(buf) {
            Ok(r) => r,
            Err(e) => {
                log::debug!("virtio-fs: {e}");
                return fuse::parse_header(buf)
                    .ok()
                    .filter(|h| h.opcode != opcode::FORGET && h.opcode != opcode::BATCH_FORGET)
                    .map(|h| fuse::reply_err(h.unique, libc::EINVAL));
            }
        };
        if req.op.no_reply() {
            self.forget(&req);
            return None;
        }
        let unique = req.header.unique;
        let out = match self.dispatch(&req, max_reply) {
            Ok(body) => fuse::reply(unique, 0, &body),
            Err(e) => fuse::reply_err(unique, e),
        };
        if out.len() > max_reply {
            // Only data replies can grow, and those are clamped; an error
            // header always fits the 16 bytes the guest must give.
            return Some(fuse::reply_err(unique, libc::ERANGE));
        }
        Some(out)
    }

    fn forget(&mut self, req: &Request<'_>) {
        match &req.op {
            Op::Forget { nlookup } => self.forget_one(req.header.nodeid, *nlookup),
            Op::BatchForget { forgets } => {
                for &(node, n) in forgets {
                    self.forget_one(node, n);
                }
            }
            _ => {}
        }
    }

    fn forget_one(&mut self, node: u64, n: u64) {
        let Some(i) = self.inodes.get_mut(&node) else {
            return;
        };
        i.nlookup = i.nlookup.saturating_sub(n);
        if i.nlookup == 0 {
            let share = i.share;
            let key = (i.share, i.dev, i.ino);
            self.inodes.remove(&node);
            if self.by_key.get(&key) == Some(&node) {
                self.by_key.remove(&key);
            }
            self.shares[share].inodes -= 1;
        }
    }

    fn inode(&self, node: u64) -> Res<&Inode> {
        self.inodes.get(&node).ok_or(libc::ESTALE)
    }

    fn writable(&self, share: usize) -> Res<()> {
        if self.shares[share].read_only {
            Err(libc::EROFS)
        } else {
            Ok(())
        }
    }

    /// The inode's object as an `O_PATH` descriptor, checked to be the one
    /// that was looked up.
    fn open_node(&self, node: u64) -> Res<(usize, OwnedFd, libc::stat)> {
        let i = self.inode(node)?;
        let fd = open_beneath(self.shares[i.share].root.as_fd(), &i.path, libc::O_PATH, 0)?;
        let st = fstat(fd.as_fd())?;
        if st.st_dev != i.dev || st.st_ino != i.ino {
            return Err(libc::ESTALE);
        }
        Ok((i.share, fd, st))
    }

    /// A directory node's share, path and `O_PATH` descriptor, for entry
    /// operations. The synthetic root is read-only.
    fn open_dir(&self, node: u64) -> Res<(usize, Vec<u8>, OwnedFd)> {
        if node == ROOT_ID {
            return Err(libc::EROFS);
        }
        let (share, fd, st) = self.open_node(node)?;
        if !is(&st, libc::S_IFDIR) {
            return Err(libc::ENOTDIR);
        }
        Ok((share, self.inode(node)?.path.clone(), fd))
    }

    fn attr(&self, st: &libc::stat) -> Attr {
        let map = |id: u32, own: u32| if id == own { 0 } else { NOBODY };
        let mut mode = st.st_mode;
        if !is(st, libc::S_IFDIR) {
            mode &= !(libc::S_ISUID | libc::S_ISGID);
        }
        Attr {
            ino: st.st_ino,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: st.st_atime as u64,
            mtime: st.st_mtime as u64,
            ctime: st.st_ctime as u64,
            atimensec: st.st_atime_nsec as u32,
            mtimensec: st.st_mtime_nsec as u32,
            ctimensec: st.st_ctime_nsec as u32,
            mode,
            // st_nlink is u64 on x86_64 and u32 on aarch64.
            #[allow(clippy::unnecessary_cast)]
            nlink: st.st_nlink as u32,
            uid: map(st.st_uid, self.uid),
            gid: map(st.st_gid, self.gid),
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
        }
    }

    fn root_attr(&self) -> Attr {
        Attr {
            ino: ROOT_ID,
            mode: libc::S_IFDIR | 0o555,
            nlink: 2 + self.shares.len() as u32,
            blksize: 4096,
            ..Attr::default()
        }
    }

    /// Remember (or count again) the object at `path` in `share` and give
    /// its entry reply.
    fn add_entry(&mut self, share: usize, path: Vec<u8>, st: &libc::stat) -> Res<Vec<u8>> {
        let key = (share, st.st_dev, st.st_ino);
        let node = match self.by_key.get(&key) {
            Some(&n) => {
                let i = self.inodes.get_mut(&n).ok_or(libc::EIO)?;
                i.nlookup += 1;
                // The latest name is the one to resolve from now on.
                i.path = path;
                n
            }
            None => {
                if self.shares[share].inodes >= self.max_inodes {
                    return Err(libc::ENFILE);
                }
                let n = self.next_node;
                self.next_node += 1;
                self.inodes.insert(
                    n,
                    Inode {
                        share,
                        path,
                        dev: st.st_dev,
                        ino: st.st_ino,
                        nlookup: 1,
                    },
                );
                self.by_key.insert(key, n);
                self.shares[share].inodes += 1;
                n
            }
        };
        let mut w = Wr::default();
        w.entry(node, &self.attr(st), TTL_S);
        Ok(w.buf)
    }

    fn lookup_path(&mut self, share: usize, path: Vec<u8>) -> Res<Vec<u8>> {
        let fd = open_beneath(self.shares[share].root.as_fd(), &path, libc::O_PATH, 0)?;
        let st = fstat(fd.as_fd())?;
        self.add_entry(share, path, &st)
    }

    fn new_handle(&mut self, share: Option<usize>, kind: HandleKind) -> Res<u64> {
        if let Some(s) = share {
            if self.shares[s].handles >= self.max_handles {
                return Err(libc::EMFILE);
            }
            self.shares[s].handles += 1;
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, Handle { share, kind });
        Ok(fh)
    }

    fn release(&mut self, fh: u64) {
        if let Some(h) = self.handles.remove(&fh) {
            if let Some(s) = h.share {
                self.shares[s].handles -= 1;
            }
        }
    }

    fn file(&self, fh: u64) -> Res<(&File, Option<usize>)> {
        match self.handles.get(&fh) {
            Some(Handle {
                kind: HandleKind::File(f),
                share,
            }) => Ok((f, *share)),
            Some(_) => Err(libc::EISDIR),
            None => Err(libc::EBADF),
        }
    }

    /// Open flags the guest may pass on: access mode, append, truncate,
    /// direct I/O and sync; never create, follow or terminal flags.
    fn open_flags(&self, share: usize, flags: u32) -> Res<i32> {
        let flags = flags as i32;
        let acc = flags & libc::O_ACCMODE;
        let keep = libc::O_APPEND | libc::O_TRUNC | libc::O_DIRECT | libc::O_SYNC | libc::O_DSYNC;
        if acc != libc::O_RDONLY || flags & (libc::O_TRUNC | libc::O_APPEND) != 0 {
            self.writable(share)?;
        }
        Ok(acc | (flags & keep))
    }

    fn open_file(&mut self, node: u64, flags: u32) -> Res<u64> {
        if node == ROOT_ID {
            return Err(libc::EISDIR);
        }
        let (share, fd, st) = self.open_node(node)?;
        if is(&st, libc::S_IFDIR) {
            return Err(libc::EISDIR);
        }
        if !is(&st, libc::S_IFREG) {
            // Device nodes, FIFOs and sockets are never opened on the host.
            return Err(libc::EACCES);
        }
        let flags = self.open_flags(share, flags)?;
        if self.shares[share].handles >= self.max_handles {
            return Err(libc::EMFILE);
        }
        let f = reopen(fd.as_fd(), flags)?;
        self.new_handle(Some(share), HandleKind::File(f))
    }

    fn dispatch(&mut self, req: &Request<'_>, max_reply: usize) -> Res<Vec<u8>> {
        let node = req.header.nodeid;
        let room = max_reply.saturating_sub(fuse::OUT_HEADER_LEN);
        let mut w = Wr::default();
        match &req.op {
            Op::Init {
                major,
                minor,
                max_readahead,
                flags,
            } => {
                if *major != fuse::KERNEL_VERSION {
                    return Err(libc::EPROTO);
                }
                let want = init_flags::ASYNC_READ
                    | init_flags::ATOMIC_O_TRUNC
                    | init_flags::BIG_WRITES
                    | init_flags::AUTO_INVAL_DATA
                    | init_flags::PARALLEL_DIROPS
                    | init_flags::MAX_PAGES;
                w.u32(fuse::KERNEL_VERSION)
                    .u32((*minor).min(fuse::KERNEL_MINOR_VERSION))
                    .u32((*max_readahead).min(MAX_IO as u32))
                    .u32(flags & want)
                    .u16(16) // max_background
                    .u16(12) // congestion_threshold
                    .u32(MAX_IO as u32)
                    .u32(1) // time_gran
                    .u16((MAX_IO / 4096) as u16)
                    .u16(0)
                    .u32(0)
                    .bytes(&[0; 28]);
            }
            Op::Destroy => {
                self.handles.clear();
                self.inodes.clear();
                self.by_key.clear();
                for s in &mut self.shares {
                    s.inodes = 0;
                    s.handles = 0;
                }
            }
            Op::Lookup { name } => {
                if node == ROOT_ID {
                    let idx = std::str::from_utf8(name)
                        .ok()
                        .filter(|s| !s.starts_with('0') || s.len() == 1)
                        .and_then(|s| s.parse::<usize>().ok())
                        .filter(|&i| i < self.shares.len())
                        .ok_or(libc::ENOENT)?;
                    return self.lookup_path(idx, Vec::new());
                }
                let i = self.inode(node)?;
                let (share, path) = (i.share, join(&i.path, name));
                return self.lookup_path(share, path);
            }
            Op::Getattr { fh } => {
                if node == ROOT_ID {
                    w.attr_out(&self.root_attr(), TTL_S);
                } else {
                    let st = match fh.and_then(|fh| self.file(fh).ok()) {
                        Some((f, _)) => fstat(f.as_fd())?,
                        None => self.open_node(node)?.2,
                    };
                    w.attr_out(&self.attr(&st), TTL_S);
                }
            }
            Op::Setattr(s) => {
                let (share, fd, st) = self.open_node(node)?;
                self.writable(share)?;
                if is(&st, libc::S_IFLNK) {
                    return Err(libc::EOPNOTSUPP);
                }
                let p = proc_path(fd.as_fd());
                if s.valid & fattr::MODE != 0 {
                    // SAFETY: `p` is NUL-terminated.
                    if unsafe { libc::chmod(p.as_ptr(), safe_mode(s.mode)) } < 0 {
                        return Err(last());
                    }
                }
                if s.valid & fattr::SIZE != 0 {
                    if !is(&st, libc::S_IFREG) {
                        return Err(libc::EINVAL);
                    }
                    let size = i64::try_from(s.size).map_err(|_| libc::EFBIG)?;
                    let by_fh = (s.valid & fattr::FH != 0)
                        .then(|| self.file(s.fh).ok())
                        .flatten();
                    // SAFETY: a valid fd or NUL-terminated path.
                    let r = unsafe {
                        match by_fh {
                            Some((f, _)) => libc::ftruncate(f.as_raw_fd(), size),
                            None => libc::truncate(p.as_ptr(), size),
                        }
                    };
                    if r < 0 {
                        return Err(last());
                    }
                }
                let ts = |set: u32, now: u32, sec: u64, nsec: u32| {
                    if s.valid & now != 0 {
                        libc::timespec {
                            tv_sec: 0,
                            tv_nsec: libc::UTIME_NOW,
                        }
                    } else if s.valid & set != 0 {
                        libc::timespec {
                            tv_sec: sec as i64,
                            tv_nsec: i64::from(nsec),
                        }
                    } else {
                        libc::timespec {
                            tv_sec: 0,
                            tv_nsec: libc::UTIME_OMIT,
                        }
                    }
                };
                if s.valid & (fattr::ATIME | fattr::MTIME | fattr::ATIME_NOW | fattr::MTIME_NOW)
                    != 0
                {
                    let times = [
                        ts(fattr::ATIME, fattr::ATIME_NOW, s.atime, s.atimensec),
                        ts(fattr::MTIME, fattr::MTIME_NOW, s.mtime, s.mtimensec),
                    ];
                    // SAFETY: `p` is NUL-terminated, `times` two timespecs.
                    if unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) } < 0
                    {
                        return Err(last());
                    }
                }
                // FATTR_UID/GID: every file belongs to the host user; accepted
                // and ignored so that tools run as root inside keep working.
                let st = fstat(fd.as_fd())?;
                w.attr_out(&self.attr(&st), TTL_S);
            }
            Op::Readlink => {
                if node == ROOT_ID {
                    return Err(libc::EINVAL);
                }
                let (_, fd, st) = self.open_node(node)?;
                if !is(&st, libc::S_IFLNK) {
                    return Err(libc::EINVAL);
                }
                let mut buf = vec![0u8; fuse::PATH_MAX];
                // SAFETY: an empty path reads the O_PATH symlink itself into
                // `buf`, at most its length.
                let n = unsafe {
                    libc::readlinkat(
                        fd.as_raw_fd(),
                        c"".as_ptr(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                    )
                };
                if n < 0 {
                    return Err(last());
                }
                buf.truncate(n as usize);
                return Ok(buf);
            }
            Op::Symlink { name, target } => {
                let (share, path, dir) = self.open_dir(node)?;
                self.writable(share)?;
                let (t, n) = (cstr(target)?, cstr(name)?);
                // SAFETY: NUL-terminated strings and an open directory fd.
                if unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), n.as_ptr()) } < 0 {
                    return Err(last());
                }
                return self.lookup_path(share, join(&path, name));
            }
            Op::Mknod {
                name,
                mode,
                rdev: _,
                umask,
            } => {
                let (share, path, dir) = self.open_dir(node)?;
                self.writable(share)?;
                let fmt = mode & libc::S_IFMT;
                if ![libc::S_IFREG, libc::S_IFIFO, libc::S_IFSOCK].contains(&fmt) {
                    // No device nodes.
                    return Err(libc::EPERM);
                }
                let n = cstr(name)?;
                let m = fmt | safe_mode(mode & !umask);
                // SAFETY: an open directory fd and a NUL-terminated name.
                if unsafe { libc::mknodat(dir.as_raw_fd(), n.as_ptr(), m, 0) } < 0 {
                    return Err(last());
                }
                return self.lookup_path(share, join(&path, name));
            }
            Op::Mkdir { name, mode, umask } => {
                let (share, path, dir) = self.open_dir(node)?;
                self.writable(share)?;
                let n = cstr(name)?;
                // SAFETY: an open directory fd and a NUL-terminated name.
                if unsafe { libc::mkdirat(dir.as_raw_fd(), n.as_ptr(), safe_mode(mode & !umask)) }
                    < 0
                {
                    return Err(last());
                }
                return self.lookup_path(share, join(&path, name));
            }
            Op::Unlink { name } | Op::Rmdir { name } => {
                let (share, _, dir) = self.open_dir(node)?;
                self.writable(share)?;
                let flags = if matches!(req.op, Op::Rmdir { .. }) {
                    libc::AT_REMOVEDIR
                } else {
                    0
                };
                let n = cstr(name)?;
                // SAFETY: an open directory fd and a NUL-terminated name.
                if unsafe { libc::unlinkat(dir.as_raw_fd(), n.as_ptr(), flags) } < 0 {
                    return Err(last());
                }
            }
            Op::Rename {
                newdir,
                flags,
                old,
                new,
            } => {
                let (share, opath, odir) = self.open_dir(node)?;
                if *newdir == ROOT_ID || self.inode(*newdir)?.share != share {
                    return Err(libc::EXDEV);
                }
                let (_, npath, ndir) = self.open_dir(*newdir)?;
                self.writable(share)?;
                if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
                    return Err(libc::EINVAL);
                }
                let (o, n) = (cstr(old)?, cstr(new)?);
                // SAFETY: open directory fds and NUL-terminated names.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_renameat2,
                        odir.as_raw_fd(),
                        o.as_ptr(),
                        ndir.as_raw_fd(),
                        n.as_ptr(),
                        *flags,
                    )
                };
                if r < 0 {
                    return Err(last());
                }
                let (from, to) = (join(&opath, old), join(&npath, new));
                self.renamed(share, &from, &to, flags & libc::RENAME_EXCHANGE != 0);
            }
            Op::Link { oldnodeid, name } => {
                let (share, path, dir) = self.open_dir(node)?;
                let (oshare, ofd, ost) = self.open_node(*oldnodeid)?;
                if oshare != share {
                    return Err(libc::EXDEV);
                }
                self.writable(share)?;
                if is(&ost, libc::S_IFDIR) {
                    return Err(libc::EPERM);
                }
                drop(ofd);
                let opath = self.inode(*oldnodeid)?.path.clone();
                let (oparent, oname) = match opath.iter().rposition(|&c| c == b'/') {
                    Some(i) => (opath[..i].to_vec(), opath[i + 1..].to_vec()),
                    None => (Vec::new(), opath.clone()),
                };
                let odir = open_beneath(
                    self.shares[share].root.as_fd(),
                    &oparent,
                    libc::O_PATH | libc::O_DIRECTORY,
                    0,
                )?;
                let (on, nn) = (cstr(&oname)?, cstr(name)?);
                // SAFETY: open directory fds and NUL-terminated names; flags
                // 0 links a symlink itself, never its target.
                if unsafe {
                    libc::linkat(
                        odir.as_raw_fd(),
                        on.as_ptr(),
                        dir.as_raw_fd(),
                        nn.as_ptr(),
                        0,
                    )
                } < 0
                {
                    return Err(last());
                }
                return self.lookup_path(share, join(&path, name));
            }
            Op::Open { flags } => {
                let fh = self.open_file(node, *flags)?;
                w.open_out(fh, 0);
            }
            Op::Create {
                name,
                flags,
                mode,
                umask,
            } => {
                let (share, path, dir) = self.open_dir(node)?;
                self.writable(share)?;
                if self.shares[share].handles >= self.max_handles {
                    return Err(libc::EMFILE);
                }
                let oflags = self.open_flags(share, *flags)?;
                let m = safe_mode(mode & !umask);
                let child = join(&path, name);
                let f =
                    match open_beneath(dir.as_fd(), name, oflags | libc::O_CREAT | libc::O_EXCL, m)
                    {
                        Ok(fd) => File::from(fd),
                        Err(libc::EEXIST) if *flags as i32 & libc::O_EXCL == 0 => {
                            // It exists: open it like OPEN would, after a lookup.
                            let entry = self.lookup_path(share, child.clone())?;
                            let nodeid =
                                u64::from_le_bytes(entry[..8].try_into().unwrap_or_default());
                            let fh = match self.open_file(nodeid, *flags) {
                                Ok(fh) => fh,
                                Err(e) => {
                                    self.forget_one(nodeid, 1);
                                    return Err(e);
                                }
                            };
                            w.bytes(&entry).open_out(fh, 0);
                            return Ok(w.buf);
                        }
                        Err(e) => return Err(e),
                    };
                let st = fstat(f.as_fd())?;
                let entry = self.add_entry(share, child, &st)?;
                let fh = self.new_handle(Some(share), HandleKind::File(f))?;
                w.bytes(&entry).open_out(fh, 0);
            }
            Op::Read { fh, offset, size } => {
                let (f, _) = self.file(*fh)?;
                let n = (*size as usize).min(MAX_IO).min(room);
                let mut buf = vec![0u8; n];
                let off = i64::try_from(*offset).map_err(|_| libc::EINVAL)?;
                // SAFETY: `buf` is writable for `n` bytes.
                let r = unsafe { libc::pread(f.as_raw_fd(), buf.as_mut_ptr().cast(), n, off) };
                if r < 0 {
                    return Err(last());
                }
                buf.truncate(r as usize);
                return Ok(buf);
            }
            Op::Write { fh, offset, data } => {
                let (f, share) = self.file(*fh)?;
                if let Some(s) = share {
                    self.writable(s)?;
                }
                let off = i64::try_from(*offset).map_err(|_| libc::EINVAL)?;
                // SAFETY: `data` is readable for its length.
                let r =
                    unsafe { libc::pwrite(f.as_raw_fd(), data.as_ptr().cast(), data.len(), off) };
                if r < 0 {
                    return Err(last());
                }
                w.u32(r as u32).u32(0);
            }
            Op::Statfs => {
                let root = if node == ROOT_ID || !self.inodes.contains_key(&node) {
                    self.shares.first().map(|s| s.root.as_raw_fd())
                } else {
                    Some(self.shares[self.inode(node)?.share].root.as_raw_fd())
                };
                // SAFETY: statfs is plain data filled in by the kernel.
                let mut s: libc::statfs = unsafe { std::mem::zeroed() };
                if let Some(fd) = root {
                    // SAFETY: an open fd and a writable statfs.
                    if unsafe { libc::fstatfs(fd, &mut s) } < 0 {
                        return Err(last());
                    }
                }
                w.u64(s.f_blocks)
                    .u64(s.f_bfree)
                    .u64(s.f_bavail)
                    .u64(s.f_files)
                    .u64(s.f_ffree)
                    .u32(s.f_bsize as u32)
                    .u32(s.f_namelen as u32)
                    .u32(s.f_frsize as u32)
                    .u32(0)
                    .bytes(&[0; 24]);
            }
            Op::Release { fh } | Op::Releasedir { fh } => self.release(*fh),
            Op::Flush { fh } => {
                self.file(*fh)?;
            }
            Op::Fsync { fh, datasync } | Op::Fsyncdir { fh, datasync } => {
                let fd = match self.handles.get(fh).map(|h| &h.kind) {
                    Some(HandleKind::File(f)) | Some(HandleKind::Dir(f)) => f.as_raw_fd(),
                    Some(HandleKind::Root) => return Ok(Vec::new()),
                    None => return Err(libc::EBADF),
                };
                // SAFETY: an open fd.
                let r = unsafe {
                    if *datasync {
                        libc::fdatasync(fd)
                    } else {
                        libc::fsync(fd)
                    }
                };
                if r < 0 {
                    return Err(last());
                }
            }
            Op::Opendir { .. } => {
                let fh = if node == ROOT_ID {
                    self.new_handle(None, HandleKind::Root)?
                } else {
                    let (share, fd, st) = self.open_node(node)?;
                    if !is(&st, libc::S_IFDIR) {
                        return Err(libc::ENOTDIR);
                    }
                    if self.shares[share].handles >= self.max_handles {
                        return Err(libc::EMFILE);
                    }
                    let d = reopen(fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
                    self.new_handle(Some(share), HandleKind::Dir(d))?
                };
                w.open_out(fh, 0);
            }
            Op::Readdir { fh, offset, size } => {
                let max = (*size as usize).min(room).min(MAX_IO);
                return match self.handles.get(fh).map(|h| &h.kind) {
                    Some(HandleKind::Root) => Ok(self.root_listing(*offset, max)),
                    Some(HandleKind::Dir(d)) => read_dir(d, *offset, max),
                    Some(HandleKind::File(_)) => Err(libc::ENOTDIR),
                    None => Err(libc::EBADF),
                };
            }
            Op::Fallocate {
                fh,
                offset,
                length,
                mode,
            } => {
                let (f, share) = self.file(*fh)?;
                if let Some(s) = share {
                    self.writable(s)?;
                }
                let (o, l) = (
                    i64::try_from(*offset).map_err(|_| libc::EINVAL)?,
                    i64::try_from(*length).map_err(|_| libc::EINVAL)?,
                );
                // SAFETY: an open fd.
                if unsafe { libc::fallocate(f.as_raw_fd(), *mode as i32, o, l) } < 0 {
                    return Err(last());
                }
            }
            Op::Lseek { fh, offset, whence } => {
                let (f, _) = self.file(*fh)?;
                let o = i64::try_from(*offset).map_err(|_| libc::EINVAL)?;
                // SAFETY: an open fd; the result is checked.
                let r = unsafe { libc::lseek(f.as_raw_fd(), o, *whence as i32) };
                if r < 0 {
                    return Err(last());
                }
                w.u64(r as u64);
            }
            Op::Syncfs => {}
            Op::Unsupported(_) => return Err(libc::ENOSYS),
            Op::Forget { .. } | Op::BatchForget { .. } | Op::Interrupt => {}
        }
        Ok(w.buf)
    }

    /// After a rename in `share`, inodes under `from` live under `to` (and
    /// the other way round for an exchange).
    fn renamed(&mut self, share: usize, from: &[u8], to: &[u8], exchange: bool) {
        let moved = |p: &[u8], a: &[u8], b: &[u8]| -> Option<Vec<u8>> {
            if p == a {
                Some(b.to_vec())
            } else if p.len() > a.len() && p.starts_with(a) && p[a.len()] == b'/' {
                let mut n = b.to_vec();
                n.extend_from_slice(&p[a.len()..]);
                Some(n)
            } else {
                None
            }
        };
        for i in self.inodes.values_mut().filter(|i| i.share == share) {
            if let Some(n) = moved(&i.path, from, to) {
                i.path = n;
            } else if exchange {
                if let Some(n) = moved(&i.path, to, from) {
                    i.path = n;
                }
            }
        }
    }

    fn root_listing(&self, offset: u64, max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let dt_dir = u32::from(libc::DT_DIR);
        let names: Vec<Vec<u8>> = [b".".to_vec(), b"..".to_vec()]
            .into_iter()
            .chain((0..self.shares.len()).map(|i| i.to_string().into_bytes()))
            .collect();
        for (i, name) in names.iter().enumerate().skip(offset as usize) {
            if !fuse::push_dirent(
                &mut out,
                max,
                ROOT_ID + i as u64,
                i as u64 + 1,
                dt_dir,
                name,
            ) {
                break;
            }
        }
        out
    }
}

/// One `READDIR` page of a host directory from `offset` (a `d_off` cookie
/// from a previous page, or 0).
fn read_dir(d: &File, offset: u64, max: usize) -> Res<Vec<u8>> {
    let off = i64::try_from(offset).map_err(|_| libc::EINVAL)?;
    // SAFETY: an open directory fd; the result is checked.
    if unsafe { libc::lseek(d.as_raw_fd(), off, libc::SEEK_SET) } < 0 {
        return Err(last());
    }
    let mut raw = vec![0u8; max.clamp(512, 64 * 1024)];
    // SAFETY: `raw` is writable for its length; getdents64 fills whole
    // records only.
    let n = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            d.as_raw_fd(),
            raw.as_mut_ptr(),
            raw.len(),
        )
    };
    if n < 0 {
        return Err(last());
    }
    let raw = &raw[..n as usize];
    let mut out = Vec::new();
    let mut at = 0usize;
    // linux_dirent64: ino u64, off i64, reclen u16, type u8, name NUL.
    while at + 19 <= raw.len() {
        let rec = &raw[at..];
        let ino = u64::from_ne_bytes(rec[0..8].try_into().unwrap_or_default());
        let doff = u64::from_ne_bytes(rec[8..16].try_into().unwrap_or_default());
        let reclen = u16::from_ne_bytes([rec[16], rec[17]]) as usize;
        if reclen < 19 || reclen > rec.len() {
            break;
        }
        let typ = u32::from(rec[18]);
        let name_area = &rec[19..reclen];
        let name = &name_area[..name_area
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(name_area.len())];
        if !fuse::push_dirent(&mut out, max, ino, doff, typ, name) {
            break;
        }
        at += reclen;
    }
    Ok(out)
}

/// Raise the soft open-file limit to at least `want` (up to the hard limit),
/// since each open guest file holds a host descriptor.
fn raise_fd_limit(want: usize) {
    // SAFETY: rlimit is plain data filled in by the kernel.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: a writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0 && rl.rlim_cur < want as u64 {
        rl.rlim_cur = (want as u64).min(rl.rlim_max);
        // SAFETY: a valid rlimit; failure leaves the old limit.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) };
    }
}
