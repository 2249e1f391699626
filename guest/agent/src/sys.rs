//! Thin, checked wrappers over the Linux system calls the agent needs.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use crate::protocol::{ExitStatus, User, WinSize};

/// Errors of system set-up steps (user lookup, terminals, processes).
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("user {0:?} is not in /etc/passwd: create it in the image or pass a numeric uid")]
    UnknownUser(String),
    #[error("cannot {what}: {source}")]
    Os {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn os_err(what: &'static str) -> SysError {
    SysError::Os {
        what,
        source: io::Error::last_os_error(),
    }
}

/// Converts a `-1` return into the current `errno`.
pub fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Sets or clears `O_NONBLOCK`.
pub fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a caller-owned descriptor touch no memory.
    unsafe {
        let flags = cvt(libc::fcntl(fd, libc::F_GETFL))?;
        let flags = if on {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        cvt(libc::fcntl(fd, libc::F_SETFL, flags))?;
    }
    Ok(())
}

/// A close-on-exec pipe: (read end, write end).
pub fn pipe() -> Result<(OwnedFd, OwnedFd), SysError> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid two-element array for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(os_err("create a pipe"));
    }
    // SAFETY: pipe2 succeeded, so both descriptors are fresh and owned by us.
    unsafe { Ok((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))) }
}

/// Duplicates a descriptor (close-on-exec).
pub fn dup(fd: RawFd) -> Result<OwnedFd, SysError> {
    // SAFETY: F_DUPFD_CLOEXEC on a valid descriptor returns a new one we own.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(os_err("duplicate a descriptor"));
    }
    // SAFETY: `new` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// A new pseudo-terminal: (master, slave). The master is close-on-exec; the slave too (the
/// child gets it through dup2 onto 0/1/2).
pub fn open_pty(size: WinSize) -> Result<(OwnedFd, OwnedFd), SysError> {
    // SAFETY: posix_openpt takes flags only; the result is checked.
    let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if m < 0 {
        return Err(os_err("open /dev/ptmx (is devpts mounted?)"));
    }
    // SAFETY: `m` is a fresh descriptor we own.
    let master = unsafe { OwnedFd::from_raw_fd(m) };
    // SAFETY: grantpt/unlockpt only take the descriptor.
    if unsafe { libc::grantpt(m) } < 0 || unsafe { libc::unlockpt(m) } < 0 {
        return Err(os_err("unlock the pseudo-terminal"));
    }
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `name` is writable for its full length, which is passed.
    if unsafe { libc::ptsname_r(m, name.as_mut_ptr(), name.len()) } != 0 {
        return Err(os_err("name the pseudo-terminal"));
    }
    // SAFETY: ptsname_r NUL-terminated `name` within its length; open reads the string only.
    let s = unsafe {
        libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if s < 0 {
        return Err(os_err("open the pseudo-terminal slave"));
    }
    // SAFETY: `s` is a fresh descriptor we own.
    let slave = unsafe { OwnedFd::from_raw_fd(s) };
    set_winsize(master.as_raw_fd(), size).map_err(|source| SysError::Os {
        what: "set the terminal size",
        source,
    })?;
    Ok((master, slave))
}

/// Sets a terminal's size (the kernel then sends SIGWINCH to its foreground group).
pub fn set_winsize(fd: RawFd, size: WinSize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a `winsize` from the valid pointer.
    cvt(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) })?;
    Ok(())
}

/// Puts a terminal into raw mode (no echo, no line editing, no CR/LF mangling, no flow
/// control) so protocol bytes pass unchanged. Not a terminal: nothing to do.
pub fn make_raw_if_tty(fd: RawFd) -> io::Result<()> {
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(fd) } == 0 {
        return Ok(());
    }
    // SAFETY: zeroed termios is a valid buffer; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid termios to fill.
    cvt(unsafe { libc::tcgetattr(fd, &mut t) })?;
    // SAFETY: `t` is a valid termios to modify in place.
    unsafe { libc::cfmakeraw(&mut t) };
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    // SAFETY: `t` is a valid termios to read.
    cvt(unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) })?;
    Ok(())
}

/// A pidfd for `pid` (Linux 5.3+), readable once the process exits; `None` if unsupported.
pub fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the syscall returned a fresh descriptor (fits in c_int).
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Decodes a `waitpid` status word.
pub fn decode_status(raw: libc::c_int) -> ExitStatus {
    if libc::WIFSIGNALED(raw) {
        ExitStatus::Signal(libc::WTERMSIG(raw))
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(raw))
    }
}

/// Non-blocking wait for `pid` (-1: any child). `Some((pid, status))` when one was reaped.
pub fn try_wait(pid: i32) -> Option<(i32, ExitStatus)> {
    let mut raw = 0;
    loop {
        // SAFETY: `raw` is a valid out-pointer for the status word.
        let r = unsafe { libc::waitpid(pid, &mut raw, libc::WNOHANG) };
        if r > 0 {
            if libc::WIFEXITED(raw) || libc::WIFSIGNALED(raw) {
                return Some((r, decode_status(raw)));
            }
            continue;
        }
        if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return None;
    }
}

/// Blocking wait for `pid`; `None` if it is not our child (already reaped).
pub fn wait_blocking(pid: i32) -> Option<ExitStatus> {
    let mut raw = 0;
    loop {
        // SAFETY: `raw` is a valid out-pointer for the status word.
        let r = unsafe { libc::waitpid(pid, &mut raw, 0) };
        if r == pid && (libc::WIFEXITED(raw) || libc::WIFSIGNALED(raw)) {
            return Some(decode_status(raw));
        }
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return None;
        }
    }
}

/// Sends `sig` to `pid` (negative: a process group).
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill takes plain integers.
    cvt(unsafe { libc::kill(pid, sig) })?;
    Ok(())
}

/// Resolved identity for a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<libc::gid_t>,
    pub name: Option<String>,
    pub home: Option<String>,
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        })
        .collect()
}

/// Groups in `/etc/group` that list `name` as a member.
fn supplementary_groups(text: &str, name: &str) -> Vec<libc::gid_t> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 || !f[3].split(',').any(|m| m == name) {
                return None;
            }
            f[2].parse().ok()
        })
        .collect()
}

/// Resolves `user` against `<etc>/passwd` and `<etc>/group` (read directly: a static binary
/// must not depend on NSS).
pub fn resolve_user(user: &User, etc: &Path) -> Result<Creds, SysError> {
    let passwd = fs::read_to_string(etc.join("passwd")).unwrap_or_default();
    let entries = parse_passwd(&passwd);
    let group = fs::read_to_string(etc.join("group")).unwrap_or_default();
    let found = match user {
        User::Name(n) => match entries.into_iter().find(|e| &e.name == n) {
            Some(e) => Some(e),
            None => match n.parse::<u32>() {
                Ok(uid) => {
                    return Ok(Creds {
                        uid,
                        gid: uid,
                        groups: vec![uid],
                        name: None,
                        home: None,
                    })
                }
                Err(_) => return Err(SysError::UnknownUser(n.clone())),
            },
        },
        User::Id { uid, .. } => entries.into_iter().find(|e| e.uid == *uid),
    };
    let (uid, gid_default) = match (user, &found) {
        (_, Some(e)) => (e.uid, e.gid),
        (User::Id { uid, .. }, None) => (*uid, *uid),
        (User::Name(n), None) => return Err(SysError::UnknownUser(n.clone())),
    };
    let gid = match user {
        User::Id { gid: Some(g), .. } => *g,
        _ => gid_default,
    };
    let mut groups = vec![gid];
    if let Some(e) = &found {
        for g in supplementary_groups(&group, &e.name) {
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
    }
    Ok(Creds {
        uid,
        gid,
        groups,
        name: found.as_ref().map(|e| e.name.clone()),
        home: found.map(|e| e.home),
    })
}

/// Reads `/proc/cmdline`-style text and returns the value of `key=`.
pub fn cmdline_value(cmdline: &str, key: &str) -> Option<String> {
    cmdline.split_ascii_whitespace().find_map(|w| {
        let (k, v) = w.split_once('=')?;
        (k == key).then(|| v.to_string())
    })
}

/// Drains a non-blocking signalfd: (a child exited, `Some(reboot)` if a shutdown signal
/// arrived). SIGTERM and SIGINT (Ctrl-Alt-Del) mean reboot; SIGUSR1, SIGUSR2 and SIGPWR
/// mean power off, as with busybox init.
pub fn read_signals(fd: RawFd) -> (bool, Option<bool>) {
    // SAFETY: signalfd_siginfo is plain old data; zeroed is valid.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    let (mut child, mut shutdown) = (false, None);
    loop {
        // SAFETY: `info` is writable for `size` bytes.
        let n = unsafe { libc::read(fd, (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
        if n != size as isize {
            return (child, shutdown);
        }
        match info.ssi_signo as libc::c_int {
            libc::SIGCHLD => child = true,
            libc::SIGTERM | libc::SIGINT => shutdown = Some(true),
            libc::SIGUSR1 | libc::SIGUSR2 | libc::SIGPWR => shutdown = Some(false),
            _ => {}
        }
    }
}

/// What [`spawn_piped`] starts: every string already NUL-terminated, so the child does no
/// allocation.
pub struct SpawnPlan {
    /// Candidate paths of the program, tried in order as `execvp` would (one when the name
    /// has a `/`, else one per `PATH` directory).
    pub candidates: Vec<CString>,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub cwd: CString,
    /// The child's stdin, stdout and stderr; each must be 3 or above (see [`spawn_piped`]).
    pub stdio: [RawFd; 3],
}

impl SpawnPlan {
    /// Prepares `argv` to run with `env` in `cwd`. `PATH` is taken from `env`, as the
    /// child would see it. A NUL byte in any string is an error.
    pub fn new(
        argv: &[String],
        env: &[(String, String)],
        cwd: &str,
        stdio: [RawFd; 3],
    ) -> io::Result<SpawnPlan> {
        let c = |s: &str| {
            CString::new(s).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the request")
            })
        };
        let prog = argv
            .first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty argv"))?;
        let candidates = if prog.contains('/') {
            vec![c(prog)?]
        } else {
            let path = env
                .iter()
                .rev()
                .find(|(k, _)| k == "PATH")
                .map_or("/usr/local/bin:/usr/bin:/bin", |(_, v)| v.as_str());
            path.split(':')
                .map(|d| if d.is_empty() { "." } else { d })
                .map(|d| c(&format!("{}/{prog}", d.trim_end_matches('/'))))
                .collect::<io::Result<Vec<_>>>()?
        };
        Ok(SpawnPlan {
            candidates,
            argv: argv.iter().map(|a| c(a)).collect::<io::Result<_>>()?,
            envp: env
                .iter()
                .map(|(k, v)| c(&format!("{k}={v}")))
                .collect::<io::Result<_>>()?,
            cwd: c(cwd)?,
            stdio,
        })
    }
}

/// What the vfork child reads: raw pointers into a [`SpawnPlan`] the parent keeps alive
/// (it is suspended until the child execs or exits), and where the child reports an error.
struct ChildArgs {
    candidates: Vec<*const libc::c_char>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    cwd: *const libc::c_char,
    stdio: [RawFd; 3],
    /// errno of the step that failed, 0 if the exec happened.
    error: libc::c_int,
}

/// Stack of the vfork child: it makes a dozen system calls through libc wrappers.
const CHILD_STACK: usize = 64 * 1024;

/// The vfork child: only async-signal-safe calls on memory prepared by the parent, then
/// `execve` or `_exit`. Runs on its own stack, in the parent's address space.
extern "C" fn spawn_child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` the parent passed to clone and keeps alive (it is
    // suspended, CLONE_VFORK); every pointer in it points into the parent's SpawnPlan.
    unsafe {
        let a = &mut *(arg as *mut ChildArgs);
        // Handlers the agent process has (std's SIGSEGV/SIGBUS overflow guards) must not run
        // here, on shared memory: defaults first, then the signal mask is opened.
        for sig in [libc::SIGSEGV, libc::SIGBUS, libc::SIGPIPE] {
            libc::signal(sig, libc::SIG_DFL);
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        let fail = |a: &mut ChildArgs| -> libc::c_int {
            a.error = *libc::__errno_location();
            libc::_exit(127)
        };
        if libc::setsid() < 0 {
            return fail(a);
        }
        for (target, &fd) in a.stdio.iter().enumerate() {
            // Every source is 3 or above, so dup2 always makes a fresh, inheritable copy.
            if libc::dup2(fd, target as libc::c_int) < 0 {
                return fail(a);
            }
        }
        if libc::chdir(a.cwd) < 0 {
            return fail(a);
        }
        let mut err = libc::ENOENT;
        for &path in &a.candidates {
            libc::execve(path, a.argv.as_ptr(), a.envp.as_ptr());
            let e = *libc::__errno_location();
            // As execvp: a missing file (or a non-directory on the way) tries the next
            // directory; a file that is there but not executable is remembered.
            match e {
                libc::ENOENT | libc::ENOTDIR => {}
                libc::EACCES => err = e,
                _ => {
                    err = e;
                    break;
                }
            }
        }
        a.error = err;
        libc::_exit(127)
    }
}

/// Starts `plan` in a new session with `clone(CLONE_VM | CLONE_VFORK)`: no copy of the
/// agent's page tables (a fork's main cost where the guest kernel is emulated) and about a
/// dozen system calls in all. The child's signal mask is empty and SIGPIPE is at its
/// default. Returns the pid; the error of the step that failed otherwise (the child is
/// reaped then). The caller's stdio descriptors must be 3 or above.
pub fn spawn_piped(plan: &SpawnPlan) -> io::Result<i32> {
    if plan.stdio.iter().any(|&fd| fd < 3) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "stdio descriptors below 3",
        ));
    }
    let nul = || std::iter::once(std::ptr::null());
    let mut args = ChildArgs {
        candidates: plan.candidates.iter().map(|c| c.as_ptr()).collect(),
        argv: plan.argv.iter().map(|c| c.as_ptr()).chain(nul()).collect(),
        envp: plan.envp.iter().map(|c| c.as_ptr()).chain(nul()).collect(),
        cwd: plan.cwd.as_ptr(),
        stdio: plan.stdio,
        error: 0,
    };
    let mut stack = vec![0u8; CHILD_STACK];
    // SAFETY: the stack grows down from the end of `stack`, aligned down to 16 bytes; it
    // outlives the child's use of it (CLONE_VFORK suspends us until exec or exit).
    let top = unsafe { stack.as_mut_ptr().add(CHILD_STACK) } as usize & !15;
    // Block every signal around the clone so that no handler of ours runs in the child
    // before it has reset them; the child opens its own mask.
    // SAFETY: sigset_t buffers on the stack, filled by sigfillset / the kernel.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid sigset pointers; only this thread's mask changes.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: `spawn_child` only reads `args` and the plan's strings (alive here) and ends
    // in execve or _exit; CLONE_VM shares our memory, CLONE_VFORK keeps us suspended until
    // then, so `args.error` is final when clone returns.
    let pid = unsafe {
        libc::clone(
            spawn_child,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&mut args as *mut ChildArgs).cast(),
        )
    };
    let clone_err = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    if pid < 0 {
        return Err(clone_err);
    }
    // SAFETY: the child is done with `args` (exec'ed or exited): read the volatile field
    // the other task wrote.
    let error = unsafe { std::ptr::read_volatile(&args.error) };
    drop(stack);
    if error != 0 {
        wait_blocking(pid);
        return Err(io::Error::from_raw_os_error(error));
    }
    Ok(pid)
}

/// A non-blocking TCP connection to `127.0.0.1:port`: the socket and whether the connect is
/// still in progress (finish it with [`socket_error`] once the socket is writable).
pub fn tcp_connect_loopback(port: u16) -> io::Result<(OwnedFd, bool)> {
    // SAFETY: socket takes plain integers; the result is checked.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_in is valid; the fields are set below.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    addr.sin_family = libc::AF_INET as libc::sa_family_t;
    addr.sin_port = port.to_be();
    addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
    // SAFETY: `addr` is a valid sockaddr_in of the given size.
    let r = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r == 0 {
        return Ok((sock, false));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINPROGRESS) {
        return Ok((sock, true));
    }
    Err(e)
}

/// The pending error of a socket (`SO_ERROR`): `None` when there is none.
pub fn socket_error(fd: RawFd) -> io::Result<Option<io::Error>> {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `err` and `len` are valid for getsockopt to write.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok((err != 0).then(|| io::Error::from_raw_os_error(err)))
}

/// System calls a command waiting for input blocks in, by the number the kernel shows in
/// `/proc/PID/syscall` (which differs per architecture: `read` is 0 on x86_64, 63 on
/// arm64): those reading the descriptor in their first argument (read, pread64, readv,
/// preadv, preadv2), those polling an array of `pollfd` (poll, ppoll), a `select` bitmap
/// (select, pselect6), an epoll instance (epoll_wait, epoll_pwait, epoll_pwait2).
#[cfg(target_arch = "x86_64")]
mod waits {
    use libc::*;
    pub const READ: &[u64] = &[
        SYS_read as u64,
        SYS_pread64 as u64,
        SYS_readv as u64,
        SYS_preadv as u64,
        SYS_preadv2 as u64,
    ];
    pub const POLL: &[u64] = &[SYS_poll as u64, SYS_ppoll as u64];
    pub const SELECT: &[u64] = &[SYS_select as u64, SYS_pselect6 as u64];
    pub const EPOLL: &[u64] = &[
        SYS_epoll_wait as u64,
        SYS_epoll_pwait as u64,
        SYS_epoll_pwait2 as u64,
    ];
}
/// arm64 has the generic system call table (asm-generic/unistd.h): no poll, select or
/// epoll_wait, only their ppoll, pselect6 and epoll_pwait successors.
#[cfg(target_arch = "aarch64")]
mod waits {
    use libc::*;
    pub const READ: &[u64] = &[
        SYS_read as u64,
        SYS_pread64 as u64,
        SYS_readv as u64,
        SYS_preadv as u64,
        SYS_preadv2 as u64,
    ];
    pub const POLL: &[u64] = &[SYS_ppoll as u64];
    pub const SELECT: &[u64] = &[SYS_pselect6 as u64];
    pub const EPOLL: &[u64] = &[SYS_epoll_pwait as u64, SYS_epoll_pwait2 as u64];
}
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("the guest agent is built for x86_64 and aarch64 only (sys::waits)");

/// Parses a `/proc/PID/syscall` line: the call number and its six arguments, for a task
/// blocked in a system call (`running` and `-1 ...` give `None`).
pub fn parse_proc_syscall(line: &str) -> Option<(u64, [u64; 6])> {
    let mut it = line.split_ascii_whitespace();
    let nr = it.next()?.parse::<u64>().ok()?;
    let mut args = [0u64; 6];
    for a in &mut args {
        *a = u64::from_str_radix(it.next()?.strip_prefix("0x")?, 16).ok()?;
    }
    Some((nr, args))
}

/// The descriptors with `EPOLLIN` in an epoll instance's `/proc/PID/fdinfo/N` text.
pub fn epoll_read_fds(fdinfo: &str) -> Vec<u64> {
    fdinfo
        .lines()
        .filter_map(|l| {
            let mut it = l.split_ascii_whitespace();
            if it.next()? != "tfd:" {
                return None;
            }
            let fd = it.next()?.parse::<u64>().ok()?;
            if it.next()? != "events:" {
                return None;
            }
            let ev = u32::from_str_radix(it.next()?, 16).ok()?;
            (ev & libc::EPOLLIN as u32 != 0).then_some(fd)
        })
        .collect()
}

/// The session id of process `pid`, from `/proc/PID/stat`.
fn session_of(pid: &str) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid pgrp session ...; comm may hold spaces and parentheses.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_ascii_whitespace().nth(3)?.parse().ok()
}

/// The file ranges process `pid` has mapped (`/proc/PID/maps`): path, offset, length.
pub fn file_mappings(pid: i32) -> Vec<(String, u64, u64)> {
    let Ok(maps) = fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return Vec::new();
    };
    maps.lines().filter_map(parse_maps_line).collect()
}

/// One line of `/proc/PID/maps` (`START-END PERMS OFFSET DEV INODE PATH`), when it maps a
/// file that still exists: its path, offset and length.
pub fn parse_maps_line(line: &str) -> Option<(String, u64, u64)> {
    let mut f = line.splitn(6, ' ');
    let (range, _perms, offset, _dev, inode) =
        (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
    let path = f.next()?.trim_start();
    if inode == "0" || !path.starts_with('/') || path.ends_with(" (deleted)") {
        return None;
    }
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let offset = u64::from_str_radix(offset, 16).ok()?;
    Some((path.to_string(), offset, end.checked_sub(start)?))
}

/// Processes in session `sid`, its leader first.
pub fn session_members(sid: i32) -> Vec<i32> {
    let mut out = vec![sid];
    if let Ok(procs) = fs::read_dir("/proc") {
        out.extend(procs.flatten().filter_map(|p| {
            let name = p.file_name();
            let name = name.to_str()?;
            let pid: i32 = name.parse().ok()?;
            (pid != sid && session_of(name) == Some(sid)).then_some(pid)
        }));
    }
    out
}

/// Reads `len` bytes of `path` from `offset` (less at the end of the file) and discards
/// them, so that they are in the page cache; returns how many were read.
pub fn read_through(path: &str, offset: u64, len: u64, buf: &mut [u8]) -> u64 {
    use std::os::unix::fs::FileExt;
    let Ok(f) = fs::File::open(path) else {
        return 0;
    };
    let mut done = 0;
    while done < len {
        let want = (len - done).min(buf.len() as u64) as usize;
        match f.read_at(&mut buf[..want], offset + done) {
            Ok(0) | Err(_) => break,
            Ok(n) => done += n as u64,
        }
    }
    done
}

/// `len` bytes of process `pid`'s memory at `addr` (we are root, or its parent).
fn read_mem(pid: &str, addr: u64, len: usize) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, addr).ok()?;
    Some(buf)
}

/// Which descriptors a task blocked in system call `nr` with `args` waits to read.
fn waited_fds(pid: &str, nr: u64, args: &[u64; 6]) -> Vec<u64> {
    /// Most descriptors looked at in one poll array or select bitmap.
    const MAX_FDS: u64 = 1024;
    if waits::READ.contains(&nr) {
        return vec![args[0]];
    }
    if waits::POLL.contains(&nr) {
        let n = args[1].min(MAX_FDS) as usize;
        let Some(mem) = read_mem(pid, args[0], n * 8) else {
            return Vec::new();
        };
        // struct pollfd { int fd; short events; short revents; }
        return mem
            .chunks_exact(8)
            .filter(|p| i16::from_ne_bytes([p[4], p[5]]) & libc::POLLIN != 0)
            .filter_map(|p| u64::try_from(i32::from_ne_bytes([p[0], p[1], p[2], p[3]])).ok())
            .collect();
    }
    if waits::SELECT.contains(&nr) {
        let nfds = args[0].min(MAX_FDS);
        if args[1] == 0 || nfds == 0 {
            return Vec::new();
        }
        let Some(bits) = read_mem(pid, args[1], nfds.div_ceil(8) as usize) else {
            return Vec::new();
        };
        return (0..nfds)
            .filter(|&fd| bits[(fd / 8) as usize] & (1 << (fd % 8)) != 0)
            .collect();
    }
    if waits::EPOLL.contains(&nr) {
        return fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", args[0]))
            .map(|t| epoll_read_fds(&t))
            .unwrap_or_default();
    }
    Vec::new()
}

/// True when a thread of `pid` is blocked waiting to read a descriptor that is the pipe
/// `pipe` (the `pipe:[INODE]` name of its `/proc/PID/fd` link): in a read, or in a poll,
/// select or epoll wait that includes it.
fn reads_pipe(pid: &str, pipe: &str) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    for task in tasks.flatten() {
        let Ok(line) = fs::read_to_string(task.path().join("syscall")) else {
            continue;
        };
        let Some((nr, args)) = parse_proc_syscall(&line) else {
            continue;
        };
        let waited = waited_fds(pid, nr, &args);
        if waited.into_iter().any(|fd| {
            fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                .is_ok_and(|l| l.as_os_str() == std::ffi::OsStr::new(pipe))
        }) {
            return true;
        }
    }
    false
}

/// True when some process of session `sid` (the warm command and anything it started) is
/// blocked reading the pipe whose write end is `pipe_end`: the command waits for its stdin.
pub fn session_blocked_on_pipe(sid: i32, pipe_end: RawFd) -> bool {
    // SAFETY: fstat fills the zeroed stat buffer for a descriptor we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(pipe_end, &mut st) } < 0 {
        return false;
    }
    let pipe = format!("pipe:[{}]", st.st_ino);
    let leader = sid.to_string();
    if reads_pipe(&leader, &pipe) {
        return true;
    }
    let Ok(procs) = fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|p| {
        let name = p.file_name();
        let Some(name) = name.to_str() else {
            return false;
        };
        name != leader
            && name.bytes().all(|b| b.is_ascii_digit())
            && session_of(name) == Some(sid)
            && reads_pipe(name, &pipe)
    })
}

/// True when a thread of `pid` itself is blocked reading the named FIFO at `path` (its
/// `/proc/PID/fd` link is the path): a shell script sourcing it waits for its run.
pub fn blocked_reading_fifo(pid: i32, path: &Path) -> bool {
    path.to_str()
        .is_some_and(|p| reads_pipe(&pid.to_string(), p))
}

/// Makes a FIFO at `path` (replacing whatever is there) that only `owner` (or root, with
/// `None`) may open.
pub fn make_fifo(path: &Path, owner: Option<(u32, u32)>) -> Result<(), SysError> {
    let _ = fs::remove_file(path);
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| SysError::Os {
        what: "name a FIFO",
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: `c` is a NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } < 0 {
        return Err(os_err("create a FIFO"));
    }
    if let Some((uid, gid)) = owner {
        // SAFETY: as above.
        if unsafe { libc::chown(c.as_ptr(), uid, gid) } < 0 {
            let e = os_err("hand a FIFO to the command's user");
            let _ = fs::remove_file(path);
            return Err(e);
        }
    }
    Ok(())
}

/// Opens the FIFO at `path` non-blocking and close-on-exec with `mode` (`O_RDONLY`,
/// `O_WRONLY` or `O_RDWR`).
pub fn open_fifo(path: &Path, mode: libc::c_int) -> Result<OwnedFd, SysError> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| SysError::Os {
        what: "name a FIFO",
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: `c` is a NUL-terminated path; the flags ask for nothing unusual.
    let fd = unsafe { libc::open(c.as_ptr(), mode | libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(os_err("open a FIFO"));
    }
    // SAFETY: open succeeded, so `fd` is fresh and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Writes all of `data` into the empty FIFO `fd` in one non-blocking write, first growing
/// the FIFO's buffer when `data` needs more than its default 64 KiB.
pub fn write_whole_fifo(fd: RawFd, data: &[u8]) -> Result<(), SysError> {
    if data.len() > 64 * 1024 {
        // SAFETY: F_SETPIPE_SZ on a descriptor we own.
        if unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, data.len() as libc::c_int) } < 0 {
            return Err(os_err("make room for a shell run in its FIFO"));
        }
    }
    // SAFETY: `data` is readable for its length.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    if n < 0 {
        return Err(os_err("write a shell run into its FIFO"));
    }
    if n as usize != data.len() {
        return Err(SysError::Os {
            what: "write a shell run into its FIFO",
            source: io::Error::from(io::ErrorKind::WriteZero),
        });
    }
    Ok(())
}

/// What process `pid` is doing, for a log line: its `/proc/PID/syscall`, what its
/// descriptor 0 is, and what `pipe_end` is.
pub fn describe_wait(pid: i32, pipe_end: RawFd) -> String {
    let syscall =
        fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_else(|e| format!("({e})"));
    let fd0 = fs::read_link(format!("/proc/{pid}/fd/0"))
        .map(|l| l.display().to_string())
        .unwrap_or_else(|e| format!("({e})"));
    let ours = fs::read_link(format!("/proc/self/fd/{pipe_end}"))
        .map(|l| l.display().to_string())
        .unwrap_or_else(|e| format!("({e})"));
    format!(
        "syscall {}, fd 0 {fd0}, its stdin pipe {ours}",
        syscall.trim()
    )
}

/// The pid at the other end of a Unix socket (`SO_PEERCRED`).
pub fn peer_pid(fd: RawFd) -> io::Result<i32> {
    // SAFETY: an all-zero ucred is valid; getsockopt writes at most `len` bytes into it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: as above.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok(cred.pid)
}

/// The session id of `pid` (`getsid`).
pub fn getsid(pid: i32) -> io::Result<i32> {
    // SAFETY: getsid reads no memory.
    cvt(unsafe { libc::getsid(pid) })
}

#[cfg(test)]
mod tests {

    #[test]
    fn maps_lines_give_the_mapped_file_ranges() {
        assert_eq!(
            parse_maps_line("00400000-00452000 r-xp 00001000 fe:00 1234 /bin/busybox"),
            Some(("/bin/busybox".into(), 0x1000, 0x52000))
        );
        assert_eq!(
            parse_maps_line("7f00-8f00 r--p 00000000 fe:00 99 /usr/lib/a b.so"),
            Some(("/usr/lib/a b.so".into(), 0, 0x1000))
        );
        for not_a_file in [
            "7ffd000-7ffe000 rw-p 00000000 00:00 0 [stack]",
            "01000-02000 rw-p 00000000 00:00 0 ",
            "01000-02000 rw-p 00000000 00:00 0",
            "01000-02000 r-xp 00000000 fe:00 7 /tmp/x (deleted)",
            "02000-01000 r-xp 00000000 fe:00 7 /bin/sh",
            "garbage",
        ] {
            assert_eq!(parse_maps_line(not_a_file), None, "{not_a_file}");
        }
        let own = file_mappings(std::process::id() as i32);
        assert!(!own.is_empty(), "this test's own executable is mapped");
        let mut buf = [0u8; 4096];
        let (path, offset, len) = &own[0];
        assert!(read_through(path, *offset, *len, &mut buf) > 0);
    }

    use super::*;

    #[test]
    fn resolves_users_from_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("passwd"),
            "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:100:Alice:/home/alice:/bin/sh\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("group"),
            "root:x:0:\nusers:x:100:\nwheel:x:10:bob,alice\n",
        )
        .unwrap();
        let c = resolve_user(&User::Name("alice".into()), dir.path()).unwrap();
        assert_eq!((c.uid, c.gid), (1000, 100));
        assert_eq!(c.groups, vec![100, 10]);
        assert_eq!(c.home.as_deref(), Some("/home/alice"));
        let c = resolve_user(
            &User::Id {
                uid: 1000,
                gid: Some(5),
            },
            dir.path(),
        )
        .unwrap();
        assert_eq!((c.uid, c.gid), (1000, 5));
        let c = resolve_user(
            &User::Id {
                uid: 4242,
                gid: None,
            },
            dir.path(),
        )
        .unwrap();
        assert_eq!((c.uid, c.gid, c.home), (4242, 4242, None));
        assert!(matches!(
            resolve_user(&User::Name("mallory".into()), dir.path()),
            Err(SysError::UnknownUser(_))
        ));
    }

    #[test]
    fn proc_syscall_lines() {
        assert_eq!(
            parse_proc_syscall("0 0x0 0x55d0c0 0x1000 0x0 0x0 0x0 0x7ffd 0x7f1\n"),
            Some((0, [0, 0x55d0c0, 0x1000, 0, 0, 0]))
        );
        assert_eq!(
            parse_proc_syscall("7 0x7ffd10 0x1 0xffffffff 0x0 0x0 0x0 0x7ffd 0x7f1"),
            Some((7, [0x7ffd10, 1, 0xffffffff, 0, 0, 0]))
        );
        assert_eq!(parse_proc_syscall("running\n"), None);
        assert_eq!(parse_proc_syscall("-1 0x7ffd 0x7f1\n"), None);
        assert_eq!(parse_proc_syscall("0 0x0"), None);
        assert_eq!(parse_proc_syscall(""), None);
    }

    /// The numbers are the ones the kernel of this architecture reports: `read` is 0 in
    /// x86_64's table and 63 in arm64's (asm-generic) one.
    #[test]
    fn wait_syscall_numbers() {
        #[cfg(target_arch = "x86_64")]
        let (read, ppoll, pselect6, epoll_pwait) = (0, 271, 270, 281);
        #[cfg(target_arch = "aarch64")]
        let (read, ppoll, pselect6, epoll_pwait) = (63, 73, 72, 22);
        assert_eq!(waits::READ[0], read);
        assert!(waits::POLL.contains(&ppoll));
        assert!(waits::SELECT.contains(&pselect6));
        assert!(waits::EPOLL.contains(&epoll_pwait));
        // Every list is disjoint from the others: a number selects one way of reading
        // the waited descriptors.
        let all = [waits::READ, waits::POLL, waits::SELECT, waits::EPOLL].concat();
        let mut sorted = all.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), all.len());
    }

    /// A `cat` in a session of its own, blocked reading its stdin pipe, is found waiting on
    /// that pipe through `/proc/PID/syscall`: the system call numbers above are this
    /// architecture's (the test passes on x86_64 and, run in the arm64 guest, on aarch64).
    #[test]
    fn a_session_reading_its_stdin_pipe_is_seen_waiting() {
        use std::os::unix::process::CommandExt;
        use std::process::{Command, Stdio};
        use std::time::{Duration, Instant};
        let mut cmd = Command::new("cat");
        cmd.stdin(Stdio::piped()).stdout(Stdio::null());
        // SAFETY: setsid is async-signal-safe; the child leads a new session, as a warm
        // command does.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("cat");
        let stdin = child.stdin.take().unwrap();
        let sid = child.id() as i32;
        // A hang guard, not a timing claim: cat reads its stdin as soon as it runs.
        let give_up = Instant::now() + Duration::from_secs(120);
        while !session_blocked_on_pipe(sid, stdin.as_raw_fd()) {
            assert!(
                Instant::now() < give_up,
                "cat never seen reading its pipe: {}",
                fs::read_to_string(format!("/proc/{sid}/syscall")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // Another pipe is not the one it waits on.
        let (_other_r, other_w) = pipe().unwrap();
        assert!(!session_blocked_on_pipe(sid, other_w.as_raw_fd()));
        drop(stdin);
        assert!(child.wait().unwrap().success());
    }

    #[test]
    fn epoll_fdinfo() {
        let t = "pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t1057\n\
                 tfd:        0 events:       19 data:                0  pos:0 ino:4 sdev:d\n\
                 tfd:        5 events:        4 data:                5  pos:0 ino:9 sdev:d\n";
        assert_eq!(epoll_read_fds(t), vec![0]);
        assert!(epoll_read_fds("pos: 0\n").is_empty());
    }

    #[test]
    fn cmdline_keys() {
        let c = "console=hvc0 smolvm.agent=/dev/hvc3 quiet smolvm.hostname=web\n";
        assert_eq!(
            cmdline_value(c, "smolvm.agent").as_deref(),
            Some("/dev/hvc3")
        );
        assert_eq!(cmdline_value(c, "smolvm.hostname").as_deref(), Some("web"));
        assert_eq!(cmdline_value(c, "root"), None);
    }
}
