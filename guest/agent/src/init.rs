//! Duties of PID 1 in the guest: early mounts, hostname, loopback, signal routing and
//! power-off, plus the privileged [`GuestSystem`] used for quiesce and resume.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::Duration;

use crate::agent::System;
use crate::agent_log;
use crate::protocol::{
    Applied, NetConfig, ShareMount, WallClock, CMDLINE_AGENT_KEY, CMDLINE_HOSTNAME_KEY,
    DEFAULT_AGENT_PORT, DEFAULT_HOSTNAME, MAX_ENTROPY,
};
use crate::sys::{self, cvt};

/// `_IOW('R', 0x03, int[2])`: add entropy and credit it.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Where the virtio-fs device (tag [`SHARES_TAG`]) is mounted; entry N is share N.
pub const SHARES_DIR: &str = "/run/smolvm/shares";
/// The virtio-fs tag of the VMM's share device.
pub const SHARES_TAG: &str = "smolvm";

/// The real system: what PID 1 in the guest does for quiesce, resume and shares.
#[derive(Debug, Default)]
pub struct GuestSystem {
    /// Guest paths of the mounted shares, in mount order.
    shares: Vec<String>,
    /// The virtio-mmio platform device `net_up` bound (unbound by `net_down`).
    net_device: Option<String>,
}

impl System for GuestSystem {
    fn quiesce(&mut self) -> (Applied, Applied) {
        // SAFETY: sync takes no arguments and cannot fail.
        unsafe { libc::sync() };
        let drop = match fs::write("/proc/sys/vm/drop_caches", b"3") {
            Ok(()) => Applied::Applied,
            Err(e) => Applied::Failed(format!("write /proc/sys/vm/drop_caches: {e}")),
        };
        (Applied::Applied, drop)
    }

    fn set_clock(&mut self, now: WallClock) -> Applied {
        let ts = libc::timespec {
            tv_sec: now.secs as libc::time_t,
            tv_nsec: now.nanos.min(999_999_999) as libc::c_long,
        };
        // SAFETY: `ts` is a valid timespec for the kernel to read.
        match cvt(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }) {
            Ok(_) => Applied::Applied,
            Err(e) => Applied::Failed(format!("clock_settime: {e}")),
        }
    }

    fn add_entropy(&mut self, bytes: &[u8]) -> Applied {
        match add_entropy(bytes) {
            Ok(()) => Applied::Applied,
            Err(e) => Applied::Failed(e.to_string()),
        }
    }

    fn net_up(&mut self, config: &NetConfig) -> Result<(), String> {
        let dev = match &self.net_device {
            Some(d) => d.clone(),
            None => {
                let d = bind_unbound_virtio_mmio()?;
                self.net_device = Some(d.clone());
                d
            }
        };
        let ifname = wait_for_interface(&dev, Duration::from_secs(30))?;
        configure_interface(&ifname, config).map_err(|e| format!("configure {ifname}: {e}"))?;
        let dns = std::net::Ipv4Addr::from(config.dns);
        fs::write("/etc/resolv.conf", format!("nameserver {dns}\n"))
            .map_err(|e| format!("write /etc/resolv.conf: {e}"))?;
        Ok(())
    }

    fn net_down(&mut self) -> Result<(), String> {
        if let Some(dev) = &self.net_device {
            fs::write(format!("{VIRTIO_MMIO_DRIVER}/unbind"), dev)
                .map_err(|e| format!("unbind {dev}: {e}"))?;
            self.net_device = None;
        }
        Ok(())
    }

    fn mount_shares(&mut self, shares: &[ShareMount]) -> Result<(), String> {
        if shares.is_empty() {
            return Ok(());
        }
        if !mounted_points().contains(SHARES_DIR) {
            fs::create_dir_all(SHARES_DIR).map_err(|e| format!("mkdir {SHARES_DIR}: {e}"))?;
            // nosuid/nodev: a host file's bits never grant anything in the guest.
            mount(
                SHARES_TAG,
                SHARES_DIR,
                "virtiofs",
                libc::MS_NOSUID | libc::MS_NODEV,
                "",
            )
            .map_err(|e| {
                format!(
                    "cannot mount the share device ({e}); the machine may predate shares: \
                     rebuild it with the current smolpack"
                )
            })?;
        }
        for s in shares {
            if !s.path.starts_with('/') || s.path.split('/').any(|c| c == "..") {
                return Err(format!(
                    "share path {} must be absolute, without '..'",
                    s.path
                ));
            }
            let src = format!("{SHARES_DIR}/{}", s.index);
            fs::create_dir_all(&s.path).map_err(|e| format!("mkdir {}: {e}", s.path))?;
            mount(&src, &s.path, "", libc::MS_BIND, "")
                .map_err(|e| format!("mount {} at {}: {e}", s.index, s.path))?;
            self.shares.push(s.path.clone());
            let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV;
            if s.read_only {
                flags |= libc::MS_RDONLY;
            }
            mount("", &s.path, "", flags, "")
                .map_err(|e| format!("remount {} read-only: {e}", s.path))?;
        }
        Ok(())
    }

    fn unmount_shares(&mut self) -> Result<(), String> {
        while let Some(path) = self.shares.last() {
            let c = CString::new(path.as_str()).map_err(|_| format!("bad path {path}"))?;
            // SAFETY: a valid NUL-terminated path.
            if let Err(e) = cvt(unsafe { libc::umount2(c.as_ptr(), 0) }) {
                return Err(if e.raw_os_error() == Some(libc::EBUSY) {
                    format!("files on the share at {path} are still open")
                } else {
                    format!("unmount {path}: {e}")
                });
            }
            self.shares.pop();
        }
        if mounted_points().contains(SHARES_DIR) {
            let c = CString::new(SHARES_DIR).unwrap_or_default();
            // SAFETY: a valid NUL-terminated path.
            if let Err(e) = cvt(unsafe { libc::umount2(c.as_ptr(), 0) }) {
                return Err(if e.raw_os_error() == Some(libc::EBUSY) {
                    format!("files on {SHARES_DIR} are still open")
                } else {
                    format!("unmount {SHARES_DIR}: {e}")
                });
            }
        }
        Ok(())
    }
}

#[repr(C)]
struct RandPoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; MAX_ENTROPY],
}

fn add_entropy(bytes: &[u8]) -> io::Result<()> {
    let urandom = fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    let len = bytes.len().min(MAX_ENTROPY);
    let mut info = RandPoolInfo {
        entropy_count: (len * 8) as libc::c_int,
        buf_size: len as libc::c_int,
        buf: [0; MAX_ENTROPY],
    };
    info.buf[..len].copy_from_slice(&bytes[..len]);
    // SAFETY: RNDADDENTROPY reads `buf_size` bytes after the two ints of a valid struct.
    cvt(unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, &info) })
        .map_err(|e| io::Error::new(e.kind(), format!("RNDADDENTROPY: {e}")))?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    cvt(unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) })
        .map_err(|e| io::Error::new(e.kind(), format!("RNDRESEEDCRNG: {e}")))?;
    Ok(())
}

/// Settings read from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    pub agent_port: String,
    pub hostname: String,
}

impl BootConfig {
    pub fn from_cmdline(cmdline: &str) -> Self {
        BootConfig {
            agent_port: sys::cmdline_value(cmdline, CMDLINE_AGENT_KEY)
                .unwrap_or_else(|| DEFAULT_AGENT_PORT.into()),
            hostname: sys::cmdline_value(cmdline, CMDLINE_HOSTNAME_KEY)
                .unwrap_or_else(|| DEFAULT_HOSTNAME.into()),
        }
    }
}

fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let c = |s: &str| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let (src, target, fstype, data) = (c(src)?, c(target)?, c(fstype)?, c(data)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    cvt(unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    })?;
    Ok(())
}

fn mounted_points() -> HashSet<String> {
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

/// Mounts the pseudo filesystems a userland expects, skipping those already there.
pub fn mount_filesystems() {
    let _ = fs::create_dir_all("/proc");
    if !Path::new("/proc/self").exists() {
        if let Err(e) = mount(
            "proc",
            "/proc",
            "proc",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "",
        ) {
            agent_log!("mount /proc failed: {e}");
        }
    }
    let nsne = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let table: [(&str, &str, &str, libc::c_ulong, &str); 6] = [
        ("sysfs", "/sys", "sysfs", nsne, ""),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "gid=5,mode=0620,ptmxmode=0666",
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777",
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=0755",
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777",
        ),
    ];
    for (src, target, fstype, flags, data) in table {
        if mounted_points().contains(target) {
            continue;
        }
        let _ = fs::create_dir_all(target);
        if let Err(e) = mount(src, target, fstype, flags, data) {
            agent_log!("mount {target} ({fstype}) failed: {e}");
        }
    }
    let ptmx_ok = fs::metadata("/dev/ptmx")
        .map(|m| m.file_type().is_char_device())
        .unwrap_or(false);
    if !ptmx_ok {
        let _ = fs::remove_file("/dev/ptmx");
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    for (link, to) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if fs::symlink_metadata(link).is_err() {
            let _ = std::os::unix::fs::symlink(to, link);
        }
    }
}

/// Sets the kernel hostname.
pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    cvt(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })?;
    Ok(())
}

/// The guest kernel's virtio-mmio platform driver in sysfs.
const VIRTIO_MMIO_DRIVER: &str = "/sys/bus/platform/drivers/virtio-mmio";

/// Bind the virtio-mmio driver to the platform devices that have none (the network slot,
/// which read as "no device" when the kernel probed it): returns the one that bound.
fn bind_unbound_virtio_mmio() -> Result<String, String> {
    let dir = "/sys/bus/platform/devices";
    let mut names: Vec<String> = fs::read_dir(dir)
        .map_err(|e| format!("read {dir}: {e}"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        // `virtio-mmio.N` when declared on the command line (x86_64), `ADDR.virtio_mmio`
        // from the device tree (aarch64).
        .filter(|n| n.starts_with("virtio-mmio.") || n.ends_with(".virtio_mmio"))
        .filter(|n| !Path::new(dir).join(n).join("driver").exists())
        .collect();
    names.sort();
    let mut last = String::from("no unbound virtio-mmio device: the machine has no network slot");
    for n in names {
        match fs::write(format!("{VIRTIO_MMIO_DRIVER}/bind"), &n) {
            Ok(()) => return Ok(n),
            Err(e) => last = format!("bind {n}: {e}"),
        }
    }
    Err(last)
}

/// The network interface of platform device `dev` once the driver made it.
fn wait_for_interface(dev: &str, timeout: Duration) -> Result<String, String> {
    let start = std::time::Instant::now();
    let base = Path::new("/sys/bus/platform/devices").join(dev);
    loop {
        if let Ok(entries) = fs::read_dir(&base) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with("virtio") {
                    if let Ok(mut ifs) = fs::read_dir(e.path().join("net")) {
                        if let Some(Ok(i)) = ifs.next() {
                            return Ok(i.file_name().to_string_lossy().into_owned());
                        }
                    }
                }
            }
        }
        if start.elapsed() > timeout {
            return Err(format!("no network interface appeared on {dev}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sockaddr_in(ip: [u8; 4]) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; any bytes are a valid sockaddr.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Address, netmask, up, default route.
fn configure_interface(ifname: &str, c: &NetConfig) -> io::Result<()> {
    // SAFETY: socket takes plain integers; the result is checked.
    let s = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `s` is a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(s) };
    let fd = sock.as_raw_fd();
    let named = || {
        // SAFETY: ifreq is plain old data; zeroed is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, b) in req.ifr_name.iter_mut().zip(ifname.bytes().take(15)) {
            *d = b as libc::c_char;
        }
        req
    };
    let mut req = named();
    req.ifr_ifru.ifru_addr = sockaddr_in(c.address);
    // SAFETY: SIOCSIFADDR reads a valid ifreq.
    cvt(unsafe { libc::ioctl(fd, libc::SIOCSIFADDR, &req) })?;
    let mask = if c.prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(c.prefix.min(32)))
    };
    let mut req = named();
    req.ifr_ifru.ifru_netmask = sockaddr_in(mask.to_be_bytes());
    // SAFETY: SIOCSIFNETMASK reads a valid ifreq.
    cvt(unsafe { libc::ioctl(fd, libc::SIOCSIFNETMASK, &req) })?;
    let mut req = named();
    // SAFETY: SIOCGIFFLAGS fills the flags of a valid ifreq.
    cvt(unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: the kernel just wrote the flags member of the union.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads a valid ifreq.
    cvt(unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) })?;
    // SAFETY: rtentry is plain old data; zeroed is valid.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in([0; 4]);
    rt.rt_genmask = sockaddr_in([0; 4]);
    rt.rt_gateway = sockaddr_in(c.gateway);
    rt.rt_flags = (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort;
    // SAFETY: SIOCADDRT reads a valid rtentry.
    match cvt(unsafe { libc::ioctl(fd, libc::SIOCADDRT, &rt) }) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Brings up `lo` (the kernel then assigns 127.0.0.1/8 and ::1 itself).
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: socket takes plain integers; the result is checked.
    let s = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `s` is a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: ifreq is plain old data; zeroed is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, b) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS fills the flags of a valid ifreq.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: the kernel just wrote the flags member of the union.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads a valid ifreq.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) })?;
    Ok(())
}

/// Locks the agent's pages in memory. The page cache is dropped before every snapshot
/// (so a machine does not carry the build's files), which would also drop the agent's
/// code that is not mapped at that moment: the first run after a resume would then read
/// the code of its paths from disk, page by page (measured on PVM: 20 ms of `Resume`
/// alone). Locked, the whole binary stays resident and in the snapshot (about 1.5 MiB).
pub fn keep_code_resident() {
    // SAFETY: mlockall takes flags only.
    if unsafe { libc::mlockall(libc::MCL_CURRENT) } < 0 {
        agent_log!(
            "cannot lock the agent in memory: {}",
            io::Error::last_os_error()
        );
    }
}

/// Blocks the signals PID 1 handles and returns a non-blocking signalfd for them. Children
/// get an empty mask back before exec.
pub fn signal_fd() -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t for these calls.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in [
            libc::SIGCHLD,
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGPWR,
        ] {
            libc::sigaddset(&mut set, s);
        }
        cvt(libc::sigprocmask(
            libc::SIG_BLOCK,
            &set,
            std::ptr::null_mut(),
        ))?;
    }
    // SAFETY: `set` is initialised; -1 asks for a new descriptor.
    let fd = cvt(unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) })?;
    // SAFETY: `fd` is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reaps every exited child (orphans adopted by PID 1) without blocking.
pub fn reap_orphans() {
    while sys::try_wait(-1).is_some() {}
}

/// Drains a signalfd; returns `Some(reboot)` if a shutdown signal arrived.
pub fn drain_signals(fd: RawFd) -> Option<bool> {
    sys::read_signals(fd).1
}

/// Waits up to `timeout` for a signal on `fd`.
pub fn wait_signal(fd: RawFd, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
}

/// Stops every process, syncs and powers off (or reboots). Never returns: if the reboot
/// call itself fails, PID 1 sleeps forever rather than exit (which would panic the kernel).
pub fn power_off(reboot: bool) -> ! {
    agent_log!("{}", if reboot { "rebooting" } else { "powering off" });
    let _ = io::stderr().flush();
    // SAFETY: plain syscalls without pointers.
    unsafe {
        libc::kill(-1, libc::SIGTERM);
    }
    // Give processes a moment to exit cleanly, reaping as they go.
    for _ in 0..20 {
        reap_orphans();
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: plain syscalls without pointers.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
        libc::sync();
    }
    reap_orphans();
    let cmd = if reboot {
        libc::RB_AUTOBOOT
    } else {
        libc::RB_POWER_OFF
    };
    // SAFETY: reboot(2) with a valid command; on success it does not return.
    unsafe { libc::reboot(cmd) };
    agent_log!("reboot(2) failed: {}", io::Error::last_os_error());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// The device node of the virtio-console port called `name`: the `vportNpM` directory of
/// `sysfs` (normally `/sys/class/virtio-ports`) whose `name` file holds it, as `/dev/vportNpM`.
pub fn find_virtio_port(sysfs: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    let mut found: Vec<_> = fs::read_dir(sysfs)
        .ok()?
        .flatten()
        .filter(|e| fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.trim_end() == name))
        .map(|e| std::path::Path::new("/dev").join(e.file_name()))
        .collect();
    found.sort();
    found.into_iter().next()
}

/// Where the agent's port is, from the `smolvm.agent=` value: a path is taken as it is; a
/// name is looked up among the virtio-console ports, falling back to [`DEFAULT_AGENT_PORT`]
/// (a machine with a single-port console) when that exists and no port has the name. `None`
/// while neither exists yet (the port is named a moment after the driver probes).
pub fn resolve_agent_port(configured: &str) -> Option<String> {
    if configured.starts_with('/') {
        return Some(configured.to_string());
    }
    if let Some(p) = find_virtio_port(std::path::Path::new("/sys/class/virtio-ports"), configured) {
        return Some(p.to_string_lossy().into_owned());
    }
    std::path::Path::new(DEFAULT_AGENT_PORT)
        .exists()
        .then(|| DEFAULT_AGENT_PORT.to_string())
}

/// Opens the agent port read-write.
pub fn open_port(path: &str) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_config_defaults_and_overrides() {
        let d = BootConfig::from_cmdline("console=ttyS0 quiet");
        assert_eq!(d.agent_port, "/dev/hvc0");
        assert_eq!(d.hostname, "smolvm");
        let c = BootConfig::from_cmdline("smolvm.agent=/dev/hvc2 smolvm.hostname=db");
        assert_eq!(c.agent_port, "/dev/hvc2");
        assert_eq!(c.hostname, "db");
        let n = BootConfig::from_cmdline("smolvm.agent=org.smolvm.agent");
        assert_eq!(n.agent_port, "org.smolvm.agent");
        assert_eq!(
            resolve_agent_port("/dev/hvc3").as_deref(),
            Some("/dev/hvc3")
        );
    }

    #[test]
    fn virtio_ports_are_found_by_name() {
        let d = tempfile::tempdir().unwrap();
        for (dir, name) in [("vport0p0", "other\n"), ("vport1p0", "org.smolvm.agent\n")] {
            fs::create_dir(d.path().join(dir)).unwrap();
            fs::write(d.path().join(dir).join("name"), name).unwrap();
        }
        fs::create_dir(d.path().join("vport2p0")).unwrap(); // unnamed
        assert_eq!(
            find_virtio_port(d.path(), "org.smolvm.agent"),
            Some(std::path::PathBuf::from("/dev/vport1p0"))
        );
        assert_eq!(find_virtio_port(d.path(), "missing"), None);
        assert_eq!(find_virtio_port(&d.path().join("nope"), "other"), None);
    }

    #[test]
    fn rand_pool_info_layout_matches_the_kernel() {
        assert_eq!(std::mem::offset_of!(RandPoolInfo, buf), 8);
    }
}
