//! Helpers for the root filesystem tests: read images with `debugfs` (no mounting needed).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether the test may run: building images needs root (owners) and e2fsprogs. Skips
/// loudly, except under `CI=true`, where a missing prerequisite fails the test.
pub fn prerequisites() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tools = Command::new("debugfs").arg("-V").output().is_ok()
        || Path::new("/usr/sbin/debugfs").exists() && Path::new("/usr/sbin/mkfs.ext4").exists();
    let missing = match (root, tools) {
        (true, true) => return true,
        (false, _) => "root (image owners are copied from the staging tree)",
        (true, false) => "e2fsprogs (mkfs.ext4, debugfs)",
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("rootfs test needs {missing}");
    }
    eprintln!("SKIPPED: rootfs test needs {missing}");
    false
}

/// A static binary to install as the agent: `$SMOLVM_AGENT` or the built agent when
/// present, otherwise the static busybox the builder itself uses.
pub fn agent() -> PathBuf {
    if let Some(p) = std::env::var_os("SMOLVM_AGENT").filter(|p| !p.is_empty()) {
        return p.into();
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest/smol-agent");
    if built.is_file() {
        return built;
    }
    smolvm_rootfs::find_busybox().expect("a static busybox for the test agent")
}

fn debugfs_bin() -> &'static str {
    if Path::new("/usr/sbin/debugfs").exists() {
        "/usr/sbin/debugfs"
    } else {
        "debugfs"
    }
}

/// Runs one debugfs request against an image; returns stdout and stderr.
pub fn debugfs(img: &Path, request: &str) -> (Vec<u8>, String) {
    let out = Command::new(debugfs_bin())
        .arg("-R")
        .arg(request)
        .arg(img)
        .output()
        .expect("run debugfs");
    (
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What `debugfs stat` says about one inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub inode: u64,
    pub kind: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub links: u32,
    pub size: u64,
    pub link_dest: Option<String>,
}

fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let at = text.find(name)? + name.len();
    text[at..].split_whitespace().next()
}

/// `stat` of a guest path, or `None` when it does not exist.
pub fn stat(img: &Path, path: &str) -> Option<Stat> {
    let (out, _) = debugfs(img, &format!("stat \"{path}\""));
    let text = String::from_utf8_lossy(&out);
    let inode = field(&text, "Inode:")?.parse().ok()?;
    let link_dest = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Fast link dest: "))
        .map(|d| d.trim_matches('"').to_string());
    Some(Stat {
        inode,
        kind: field(&text, "Type:")?.to_string(),
        mode: u32::from_str_radix(field(&text, "Mode:")?, 8).ok()?,
        uid: field(&text, "User:")?.parse().ok()?,
        gid: field(&text, "Group:")?.parse().ok()?,
        links: field(&text, "Links:")?.parse().ok()?,
        size: field(&text, "Size:")?.parse().ok()?,
        link_dest,
    })
}

/// The content of a guest file (`None` when it does not exist).
pub fn cat(img: &Path, path: &str) -> Option<Vec<u8>> {
    stat(img, path)?;
    Some(debugfs(img, &format!("cat \"{path}\"")).0)
}

/// Names in a guest directory.
pub fn ls(img: &Path, dir: &str) -> Vec<String> {
    let (out, _) = debugfs(img, &format!("ls -p \"{dir}\""));
    // `ls -p` lines: /inode/mode/uid/gid/name/size/
    String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.split('/').nth(5).map(str::to_string))
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .collect()
}

/// Asserts that `e2fsck -fn` finds the image clean.
pub fn assert_fsck_clean(img: &Path) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(img)
        .output()
        .or_else(|_| {
            Command::new("/usr/sbin/e2fsck")
                .arg("-fn")
                .arg(img)
                .output()
        })
        .expect("run e2fsck");
    assert!(
        out.status.success(),
        "e2fsck -fn found problems: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The superblock summary (`dumpe2fs -h`).
pub fn superblock(img: &Path) -> String {
    let out = Command::new("dumpe2fs")
        .arg("-h")
        .arg(img)
        .output()
        .or_else(|_| {
            Command::new("/usr/sbin/dumpe2fs")
                .arg("-h")
                .arg(img)
                .output()
        })
        .expect("run dumpe2fs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts the agent is installed as /sbin/init.
pub fn assert_agent_installed(img: &Path, agent: &Path) {
    let init = stat(img, "/sbin/init").expect("/sbin/init exists");
    assert_eq!(init.kind, "symlink");
    assert_eq!(init.link_dest.as_deref(), Some("smol-agent"));
    let a = stat(img, "/sbin/smol-agent").expect("/sbin/smol-agent exists");
    assert_eq!(a.kind, "regular");
    assert_eq!((a.mode & 0o7777, a.uid, a.gid), (0o755, 0, 0));
    assert_eq!(
        cat(img, "/sbin/smol-agent").unwrap(),
        std::fs::read(agent).unwrap(),
        "agent content differs"
    );
}
