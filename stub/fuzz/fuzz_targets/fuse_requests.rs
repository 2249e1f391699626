//! Arbitrary FUSE requests fed to the share server (the virtio-fs device's
//! request parser and every operation behind it) over a small read-write
//! host directory and a read-only one. The input is a sequence of requests,
//! each a little-endian `u16` length and that many bytes (a header whose
//! length field is taken as it comes), plus a `u16` reply room. The server
//! must answer each with an error or a reply that fits the room, never
//! panic, and never touch anything outside its two directories.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use smolvm::devices::virtio::fs::fuse::{opcode, parse_header, Request};
use smolvm::devices::virtio::fs::{Server, ShareConfig};

/// Two shares, built once: `rw/` (a file, a directory, a symlink out) and
/// `ro/` (a file). The fuzzer may change `rw/` freely.
fn shares() -> &'static [ShareConfig] {
    static DIRS: OnceLock<(tempfile::TempDir, Vec<ShareConfig>)> = OnceLock::new();
    &DIRS
        .get_or_init(|| {
            let d = tempfile::tempdir().expect("temp dir");
            let (rw, ro): (PathBuf, PathBuf) = (d.path().join("rw"), d.path().join("ro"));
            std::fs::create_dir_all(rw.join("dir")).expect("mkdir");
            std::fs::create_dir_all(&ro).expect("mkdir");
            std::fs::write(rw.join("file"), b"fuzz").expect("write");
            std::fs::write(ro.join("file"), b"read only").expect("write");
            std::os::unix::fs::symlink("/etc", rw.join("out")).expect("symlink");
            let cfg = vec![
                ShareConfig {
                    host: rw,
                    read_only: false,
                },
                ShareConfig {
                    host: ro,
                    read_only: true,
                },
            ];
            (d, cfg)
        })
        .1
}

fuzz_target!(|data: &[u8]| {
    let mut server = Server::new(shares()).expect("shares open");
    let mut rest = data;
    for _ in 0..64 {
        if rest.len() < 4 {
            break;
        }
        let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        let room = u16::from_le_bytes([rest[2], rest[3]]) as usize;
        rest = &rest[4..];
        let req = &rest[..len.min(rest.len())];
        rest = &rest[req.len()..];
        let _ = Request::parse(req);
        // fallocate would reserve real disk space on the fuzzing host.
        if parse_header(req).is_ok_and(|h| h.opcode == opcode::FALLOCATE) {
            continue;
        }
        if let Some(reply) = server.handle(req, room.max(16)) {
            assert!(reply.len() >= 16 && reply.len() <= room.max(16));
            let declared = u32::from_le_bytes([reply[0], reply[1], reply[2], reply[3]]);
            assert_eq!(declared as usize, reply.len());
        }
    }
    let (inodes, handles) = server.counts();
    assert!(inodes <= 64 && handles <= 64);
});
