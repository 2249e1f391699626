//! The share server against temporary host directories: each confinement
//! and policy rule, and the device end to end through a virtqueue.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::fuse::build::{cstr, req};
use super::fuse::{opcode, Wr};
use super::server::{Server, ShareConfig, MAX_HANDLES, ROOT_ID};

const ROOM: usize = 1 << 21;

/// A guest-side view of one server: sends requests, decodes replies.
struct Client {
    s: Server,
    unique: u64,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

impl Client {
    fn new(shares: &[(&Path, bool)]) -> Self {
        let cfg: Vec<ShareConfig> = shares
            .iter()
            .map(|(p, ro)| ShareConfig {
                host: p.to_path_buf(),
                read_only: *ro,
            })
            .collect();
        let mut c = Client {
            s: Server::new(&cfg).unwrap(),
            unique: 0,
        };
        let mut b = Wr::default();
        b.u32(7).u32(31).u32(1 << 20).u32(0xffff_ffff);
        let r = c.call(opcode::INIT, 0, &b.buf).unwrap();
        assert_eq!(u32_at(&r, 0), 7);
        c
    }

    /// Body of the reply, or the (positive) errno.
    fn call(&mut self, op: u32, node: u64, body: &[u8]) -> Result<Vec<u8>, i32> {
        self.unique += 1;
        let r = self
            .s
            .handle(&req(op, self.unique, node, body), ROOM)
            .expect("a reply");
        assert_eq!(u32_at(&r, 0) as usize, r.len());
        assert_eq!(u64_at(&r, 8), self.unique);
        let err = u32_at(&r, 4) as i32;
        if err != 0 {
            assert!(r.len() == 16);
            return Err(-err);
        }
        Ok(r[16..].to_vec())
    }

    fn lookup(&mut self, dir: u64, name: &str) -> Result<u64, i32> {
        self.call(opcode::LOOKUP, dir, &cstr(name))
            .map(|e| u64_at(&e, 0))
    }

    /// Attr mode from an entry reply.
    fn entry_mode(e: &[u8]) -> u32 {
        u32_at(e, 40 + 60)
    }

    fn share(&mut self, i: usize) -> u64 {
        self.lookup(ROOT_ID, &i.to_string()).unwrap()
    }

    fn open(&mut self, node: u64, flags: i32) -> Result<u64, i32> {
        let mut b = Wr::default();
        b.u32(flags as u32).u32(0);
        self.call(opcode::OPEN, node, &b.buf).map(|r| u64_at(&r, 0))
    }

    fn create(&mut self, dir: u64, name: &str, mode: u32) -> Result<(u64, u64), i32> {
        let mut b = Wr::default();
        b.u32((libc::O_RDWR | libc::O_CREAT) as u32)
            .u32(mode)
            .u32(0o022)
            .u32(0)
            .bytes(&cstr(name));
        self.call(opcode::CREATE, dir, &b.buf)
            .map(|r| (u64_at(&r, 0), u64_at(&r, 128)))
    }

    fn write(&mut self, fh: u64, off: u64, data: &[u8]) -> Result<u32, i32> {
        let mut b = Wr::default();
        b.u64(fh)
            .u64(off)
            .u32(data.len() as u32)
            .bytes(&[0; 20])
            .bytes(data);
        self.call(opcode::WRITE, 0, &b.buf).map(|r| u32_at(&r, 0))
    }

    fn read(&mut self, fh: u64, off: u64, size: u32) -> Result<Vec<u8>, i32> {
        let mut b = Wr::default();
        b.u64(fh).u64(off).u32(size).bytes(&[0; 20]);
        self.call(opcode::READ, 0, &b.buf)
    }

    fn mkdir(&mut self, dir: u64, name: &str, mode: u32) -> Result<u64, i32> {
        let mut b = Wr::default();
        b.u32(mode).u32(0).bytes(&cstr(name));
        self.call(opcode::MKDIR, dir, &b.buf).map(|e| u64_at(&e, 0))
    }

    fn rename(&mut self, dir: u64, old: &str, newdir: u64, new: &str) -> Result<Vec<u8>, i32> {
        let mut b = Wr::default();
        b.u64(newdir).bytes(&cstr(old)).bytes(&cstr(new));
        self.call(opcode::RENAME, dir, &b.buf)
    }

    fn link(&mut self, old: u64, dir: u64, name: &str) -> Result<Vec<u8>, i32> {
        let mut b = Wr::default();
        b.u64(old).bytes(&cstr(name));
        self.call(opcode::LINK, dir, &b.buf)
    }

    fn setattr_mode(&mut self, node: u64, mode: u32) -> Result<u32, i32> {
        let mut b = Wr::default();
        b.u32(super::fuse::fattr::MODE)
            .u32(0)
            .bytes(&[0; 60])
            .u32(mode)
            .bytes(&[0; 16]);
        assert_eq!(b.buf.len(), 88);
        self.call(opcode::SETATTR, node, &b.buf)
            .map(|r| u32_at(&r, 16 + 60))
    }

    fn readdir_names(&mut self, node: u64) -> Vec<String> {
        let mut b = Wr::default();
        b.u32(0).u32(0);
        let fh = u64_at(&self.call(opcode::OPENDIR, node, &b.buf).unwrap(), 0);
        let mut names = Vec::new();
        let mut off = 0u64;
        loop {
            let mut b = Wr::default();
            b.u64(fh).u64(off).u32(200).bytes(&[0; 20]);
            let page = self.call(opcode::READDIR, node, &b.buf).unwrap();
            if page.is_empty() {
                break;
            }
            let mut at = 0;
            while at < page.len() {
                off = u64_at(&page, at + 8);
                let n = u32_at(&page, at + 16) as usize;
                names.push(String::from_utf8(page[at + 24..at + 24 + n].to_vec()).unwrap());
                at += (24 + n + 7) & !7;
            }
        }
        let mut b = Wr::default();
        b.u64(fh).bytes(&[0; 16]);
        self.call(opcode::RELEASEDIR, node, &b.buf).unwrap();
        names.sort();
        names
    }
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn synthetic_root_lists_shares_and_is_read_only() {
    let (a, b) = (tmp(), tmp());
    let mut c = Client::new(&[(a.path(), true), (b.path(), false)]);
    assert_eq!(c.readdir_names(ROOT_ID), [".", "..", "0", "1"]);
    assert_eq!(c.lookup(ROOT_ID, "2"), Err(libc::ENOENT));
    assert_eq!(c.lookup(ROOT_ID, "01"), Err(libc::ENOENT));
    assert_eq!(c.mkdir(ROOT_ID, "x", 0o755), Err(libc::EROFS));
    let s1 = c.share(1);
    assert_eq!(c.rename(s1, "x", ROOT_ID, "y"), Err(libc::EXDEV));
}

#[test]
fn reads_and_writes_with_host_ownership() {
    let d = tmp();
    fs::write(d.path().join("in.txt"), b"hello").unwrap();
    let mut c = Client::new(&[(d.path(), false)]);
    let s = c.share(0);
    let f = c.lookup(s, "in.txt").unwrap();
    let fh = c.open(f, libc::O_RDONLY).unwrap();
    assert_eq!(c.read(fh, 0, 100).unwrap(), b"hello");
    // A guest-created file: the requested mode without setuid/setgid,
    // owned by the user running the server.
    let (node, fh) = c.create(s, "new.txt", 0o6755).unwrap();
    assert!(node > ROOT_ID);
    assert_eq!(c.write(fh, 0, b"abc").unwrap(), 3);
    assert_eq!(c.write(fh, 3, b"def").unwrap(), 3);
    let p = d.path().join("new.txt");
    assert_eq!(fs::read(&p).unwrap(), b"abcdef");
    let md = fs::metadata(&p).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o755);
    // SAFETY: no arguments, no failure.
    assert_eq!(md.uid(), unsafe { libc::geteuid() });
    // chmod cannot set setuid either.
    assert_eq!(c.setattr_mode(node, 0o4777).unwrap() & 0o7777, 0o777);
    assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o777);
    // A host file with setuid shows without it.
    fs::set_permissions(d.path().join("in.txt"), fs::Permissions::from_mode(0o4755)).unwrap();
    let e = c.call(opcode::LOOKUP, s, &cstr("in.txt")).unwrap();
    assert_eq!(Client::entry_mode(&e) & 0o7777, 0o755);
}

#[test]
fn symlinks_are_never_followed_on_the_host() {
    let outside = tmp();
    fs::write(outside.path().join("secret"), b"secret").unwrap();
    let d = tmp();
    std::os::unix::fs::symlink(outside.path(), d.path().join("out")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), d.path().join("s")).unwrap();
    std::os::unix::fs::symlink("../../../../../../etc/passwd", d.path().join("rel")).unwrap();
    let mut c = Client::new(&[(d.path(), false)]);
    let s = c.share(0);
    // The symlink itself is visible and readable as a link...
    let l = c.lookup(s, "s").unwrap();
    assert_eq!(
        c.call(opcode::READLINK, l, &[]).unwrap(),
        outside.path().join("secret").as_os_str().as_encoded_bytes()
    );
    // ...but never opened, walked through or changed on the host.
    assert_eq!(c.open(l, libc::O_RDONLY), Err(libc::EACCES));
    let out = c.lookup(s, "out").unwrap();
    assert_eq!(c.lookup(out, "secret"), Err(libc::ELOOP));
    assert_eq!(c.setattr_mode(l, 0o777), Err(libc::EOPNOTSUPP));
    assert_eq!(fs::read(outside.path().join("secret")).unwrap(), b"secret");
    assert!(fs::symlink_metadata(d.path().join("s"))
        .unwrap()
        .file_type()
        .is_symlink());
    let rel = c.lookup(s, "rel").unwrap();
    assert_eq!(c.open(rel, libc::O_RDONLY), Err(libc::EACCES));
    // A directory swapped for a symlink after lookup is not followed either.
    fs::create_dir(d.path().join("dir")).unwrap();
    let dir = c.lookup(s, "dir").unwrap();
    fs::remove_dir(d.path().join("dir")).unwrap();
    std::os::unix::fs::symlink(outside.path(), d.path().join("dir")).unwrap();
    assert!(c.lookup(dir, "secret").is_err());
    assert!(c.create(dir, "planted", 0o644).is_err());
    assert!(!outside.path().join("planted").exists());
}

#[test]
fn dotdot_slash_and_nul_names_are_refused() {
    let d = tmp();
    fs::create_dir(d.path().join("sub")).unwrap();
    let mut c = Client::new(&[(d.path(), false)]);
    let s = c.share(0);
    let sub = c.lookup(s, "sub").unwrap();
    for bad in ["..", ".", "../x", "/etc", "a/b"] {
        assert_eq!(c.lookup(sub, bad), Err(libc::EINVAL), "{bad}");
        assert_eq!(c.mkdir(sub, bad, 0o755), Err(libc::EINVAL), "{bad}");
    }
    assert_eq!(c.call(opcode::LOOKUP, s, b"a\0b\0"), Err(libc::EINVAL));
    assert_eq!(c.rename(sub, "x", s, ".."), Err(libc::EINVAL));
    // The share root's parent is unreachable: `..` of the root is refused
    // and the root has no name to climb through.
    assert_eq!(c.lookup(s, ".."), Err(libc::EINVAL));
}

#[test]
fn hard_links_and_renames_stay_inside_their_share() {
    let (a, b) = (tmp(), tmp());
    fs::write(a.path().join("f"), b"x").unwrap();
    let mut c = Client::new(&[(a.path(), false), (b.path(), false)]);
    let (s0, s1) = (c.share(0), c.share(1));
    let f = c.lookup(s0, "f").unwrap();
    assert_eq!(c.link(f, s1, "f2"), Err(libc::EXDEV));
    assert_eq!(c.rename(s0, "f", s1, "f"), Err(libc::EXDEV));
    assert!(!b.path().join("f2").exists() && !b.path().join("f").exists());
    // Inside one share both work, and inodes follow a renamed directory.
    c.link(f, s0, "g").unwrap();
    assert_eq!(fs::metadata(a.path().join("g")).unwrap().nlink(), 2);
    let dir = c.mkdir(s0, "d", 0o755).unwrap();
    let (inner, _) = c.create(dir, "inner", 0o644).unwrap();
    c.rename(s0, "d", s0, "e").unwrap();
    assert!(a.path().join("e/inner").exists());
    assert_eq!(c.setattr_mode(inner, 0o600).unwrap() & 0o777, 0o600);
    // A directory cannot be hard-linked.
    assert_eq!(c.link(dir, s0, "dl"), Err(libc::EPERM));
}

#[test]
fn device_nodes_are_not_created_or_opened() {
    let d = tmp();
    let mut c = Client::new(&[(d.path(), false)]);
    let s = c.share(0);
    let mut b = Wr::default();
    b.u32(libc::S_IFCHR | 0o666)
        .u32(libc::makedev(1, 3) as u32)
        .u32(0)
        .u32(0)
        .bytes(&cstr("null"));
    assert_eq!(c.call(opcode::MKNOD, s, &b.buf), Err(libc::EPERM));
    assert!(!d.path().join("null").exists());
    // A FIFO may exist (the guest uses it locally) but is never opened on
    // the host, where opening it would block the VMM.
    let mut b = Wr::default();
    b.u32(libc::S_IFIFO | 0o644)
        .u32(0)
        .u32(0)
        .u32(0)
        .bytes(&cstr("fifo"));
    let e = c.call(opcode::MKNOD, s, &b.buf).unwrap();
    let fifo = u64_at(&e, 0);
    assert_eq!(c.open(fifo, libc::O_RDONLY), Err(libc::EACCES));
    assert_eq!(c.open(fifo, libc::O_WRONLY), Err(libc::EACCES));
    // Device nodes on the host: /dev/null shared is stat-able, not openable.
    let mut c = Client::new(&[(Path::new("/dev"), false)]);
    let s = c.share(0);
    let null = c.lookup(s, "null").unwrap();
    assert_eq!(c.open(null, libc::O_RDWR), Err(libc::EACCES));
}

#[test]
fn read_only_is_enforced_by_the_server() {
    let d = tmp();
    fs::write(d.path().join("f"), b"data").unwrap();
    fs::create_dir(d.path().join("sub")).unwrap();
    let before = fs::read_dir(d.path()).unwrap().count();
    let mut c = Client::new(&[(d.path(), true)]);
    let s = c.share(0);
    let f = c.lookup(s, "f").unwrap();
    assert_eq!(c.open(f, libc::O_WRONLY), Err(libc::EROFS));
    assert_eq!(c.open(f, libc::O_RDWR), Err(libc::EROFS));
    assert_eq!(c.open(f, libc::O_RDONLY | libc::O_TRUNC), Err(libc::EROFS));
    assert_eq!(c.open(f, libc::O_RDONLY | libc::O_APPEND), Err(libc::EROFS));
    assert_eq!(c.create(s, "n", 0o644), Err(libc::EROFS));
    assert_eq!(c.mkdir(s, "n", 0o755), Err(libc::EROFS));
    assert_eq!(c.setattr_mode(f, 0o777), Err(libc::EROFS));
    assert_eq!(c.rename(s, "f", s, "g"), Err(libc::EROFS));
    assert_eq!(c.link(f, s, "g"), Err(libc::EROFS));
    assert_eq!(c.call(opcode::UNLINK, s, &cstr("f")), Err(libc::EROFS));
    assert_eq!(c.call(opcode::RMDIR, s, &cstr("sub")), Err(libc::EROFS));
    let mut b = Wr::default();
    b.bytes(&cstr("l")).bytes(&cstr("f"));
    assert_eq!(c.call(opcode::SYMLINK, s, &b.buf), Err(libc::EROFS));
    // A read handle cannot write even though the guest asks.
    let fh = c.open(f, libc::O_RDONLY).unwrap();
    assert_eq!(c.write(fh, 0, b"x"), Err(libc::EROFS));
    assert_eq!(fs::read(d.path().join("f")).unwrap(), b"data");
    assert_eq!(fs::read_dir(d.path()).unwrap().count(), before);
}

#[test]
fn handles_and_inodes_are_capped() {
    let d = tmp();
    fs::write(d.path().join("f"), b"x").unwrap();
    let mut c = Client::new(&[(d.path(), false)]);
    let s = c.share(0);
    let f = c.lookup(s, "f").unwrap();
    let mut fhs = Vec::new();
    for _ in 0..MAX_HANDLES {
        fhs.push(c.open(f, libc::O_RDONLY).unwrap());
    }
    assert_eq!(c.open(f, libc::O_RDONLY), Err(libc::EMFILE));
    let mut b = Wr::default();
    b.u64(fhs[0]).bytes(&[0; 16]);
    c.call(opcode::RELEASE, f, &b.buf).unwrap();
    c.open(f, libc::O_RDONLY).unwrap();
    // Inodes: a repeated lookup reuses the node; forgetting releases it.
    let f2 = c.lookup(s, "f").unwrap();
    assert_eq!(f, f2);
    let (inodes, _) = c.s.counts();
    let mut b = Wr::default();
    b.u32(1).u32(0).u64(f).u64(2);
    assert!(c
        .s
        .handle(&req(opcode::BATCH_FORGET, 99, 0, &b.buf), ROOM)
        .is_none());
    assert_eq!(c.s.counts().0, inodes - 1);
}

#[test]
fn inode_cap_refuses_lookups_past_the_limit() {
    let d = tmp();
    for i in 0..10 {
        fs::write(d.path().join(i.to_string()), b"").unwrap();
    }
    let mut c = Client::new(&[(d.path(), false)]);
    c.s.set_limits(5, MAX_HANDLES);
    let s = c.share(0);
    for i in 0..4 {
        c.lookup(s, &i.to_string()).unwrap();
    }
    // The share root and four files: full.
    assert_eq!(c.lookup(s, "4"), Err(libc::ENFILE));
    // Known nodes still resolve; forgetting one makes room.
    let n0 = c.lookup(s, "0").unwrap();
    let mut b = Wr::default();
    b.u64(2);
    assert!(c
        .s
        .handle(&req(opcode::FORGET, 50, n0, &b.buf), ROOM)
        .is_none());
    c.lookup(s, "4").unwrap();
}

#[test]
fn host_side_swaps_are_stale_not_followed() {
    let d = tmp();
    fs::write(d.path().join("f"), b"one").unwrap();
    let mut c = Client::new(&[(d.path(), false)]);
    let s = c.share(0);
    let f = c.lookup(s, "f").unwrap();
    // Moved away (so its inode number stays taken) and replaced.
    fs::rename(d.path().join("f"), d.path().join("old")).unwrap();
    fs::write(d.path().join("f"), b"two").unwrap();
    assert_eq!(c.open(f, libc::O_RDONLY), Err(libc::ESTALE));
    // A fresh lookup finds the new file.
    let f2 = c.lookup(s, "f").unwrap();
    let fh = c.open(f2, libc::O_RDONLY).unwrap();
    assert_eq!(c.read(fh, 0, 10).unwrap(), b"two");
}

#[test]
fn malformed_requests_get_error_replies() {
    let d = tmp();
    let mut c = Client::new(&[(d.path(), false)]);
    // Short body, wrong length, unknown opcode, unknown handle.
    assert_eq!(c.call(opcode::GETATTR, 1, &[0; 3]), Err(libc::EINVAL));
    assert_eq!(c.call(999, 1, &[]), Err(libc::ENOSYS));
    assert_eq!(c.read(12345, 0, 10), Err(libc::EBADF));
    assert_eq!(c.call(opcode::GETATTR, 777, &[0; 16]), Err(libc::ESTALE));
    // No header at all: nothing to answer.
    assert!(c.s.handle(&[1, 2, 3], ROOM).is_none());
    // A reply that would not fit is refused, not truncated.
    let f = {
        fs::write(d.path().join("f"), vec![7u8; 4096]).unwrap();
        let s = c.share(0);
        c.lookup(s, "f").unwrap()
    };
    let fh = c.open(f, libc::O_RDONLY).unwrap();
    let mut b = Wr::default();
    b.u64(fh).u64(0).u32(4096).bytes(&[0; 20]);
    let r = c.s.handle(&req(opcode::READ, 5, 0, &b.buf), 100).unwrap();
    assert_eq!(r.len(), 100, "the read is clamped to the room given");
}

mod device {
    use super::*;
    use crate::devices::virtio::fs::{Fs, FsArgs, FsState, TAG};
    use crate::devices::virtio::mmio::{regs, MmioDeviceState, MmioTransport};
    use crate::devices::virtio::testutil::*;
    use crate::devices::virtio::{Persist, COMMON_FEATURES};
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn serves_requests_through_the_queue_and_survives_a_snapshot() {
        let d = tmp();
        fs::write(d.path().join("hello"), b"from the host").unwrap();
        let cfg = [ShareConfig {
            host: d.path().to_path_buf(),
            read_only: true,
        }];
        let m = mem(0x80000);
        let (irq, count) = counting_interrupt();
        let mut t =
            MmioTransport::new(Fs::new(m.clone(), irq, Server::new(&cfg).unwrap()).unwrap());
        // Config space: the tag, then one request queue.
        let mut tag = [0u8; 36];
        crate::devices::bus::BusDevice::read(&mut t, 0x100, &mut tag);
        assert_eq!(&tag[..TAG.len()], TAG.as_bytes());
        let hq = TestQueue::new(&m, 16, GuestAddress(0x1000));
        let mut rq = TestQueue::new(&m, 16, GuestAddress(0x2000));
        handshake(&mut t, COMMON_FEATURES, &[&hq, &rq]);

        let lookup = req(opcode::LOOKUP, 1, ROOT_ID, &cstr("0"));
        m.write_slice(&lookup, GuestAddress(0x10000)).unwrap();
        rq.add(&[
            Desc::r(0x10000, lookup.len() as u32),
            Desc::w(0x11000, 16),
            Desc::w(0x11010, 200),
        ]);
        wr(&mut t, regs::QUEUE_NOTIFY, 1);
        assert_eq!(rq.used_idx(), 1);
        assert_eq!(rq.used_elem(0).1, 16 + 128);
        let mut hdr = [0u8; 16];
        m.read_slice(&mut hdr, GuestAddress(0x11000)).unwrap();
        assert_eq!(u32_at(&hdr, 4), 0, "lookup succeeded");
        assert_eq!(count.count(), 1);

        // Snapshot and restore: the queue continues where it was.
        let state = t.save().unwrap();
        let bytes = postcard::to_allocvec(&state).unwrap();
        let state: MmioDeviceState<FsState> = postcard::from_bytes(&bytes).unwrap();
        let (irq2, _) = counting_interrupt();
        let mut t = MmioTransport::<Fs>::restore(
            FsArgs {
                mem: m.clone(),
                interrupt: irq2,
                server: Server::new(&cfg).unwrap(),
            },
            &state,
        )
        .unwrap();
        // The new server knows no nodes: the old ID is stale, the guest
        // looks it up again.
        let getattr = req(opcode::GETATTR, 2, 2, &[0; 16]);
        m.write_slice(&getattr, GuestAddress(0x12000)).unwrap();
        rq.add(&[
            Desc::r(0x12000, getattr.len() as u32),
            Desc::w(0x13000, 200),
        ]);
        wr(&mut t, regs::QUEUE_NOTIFY, 1);
        assert_eq!(rq.used_idx(), 2);
        m.read_slice(&mut hdr, GuestAddress(0x13000)).unwrap();
        assert_eq!(u32_at(&hdr, 4) as i32, -libc::ESTALE);
        // A forget on the high-priority queue takes no reply.
        let mut hq = hq;
        let forget = req(opcode::FORGET, 3, 2, &1u64.to_le_bytes());
        m.write_slice(&forget, GuestAddress(0x14000)).unwrap();
        hq.add(&[Desc::r(0x14000, forget.len() as u32)]);
        wr(&mut t, regs::QUEUE_NOTIFY, 0);
        assert_eq!(hq.used_idx(), 1);
        assert_eq!(hq.used_elem(0).1, 0);
    }
}
