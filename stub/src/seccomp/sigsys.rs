//! The report of a blocked system call: a SIGSYS handler that writes one line with
//! `write(2)` and then lets SIGSYS kill the process (its default action), so the exit
//! status says "killed by SIGSYS".

use std::io;

use super::filters;

const PREFIX: &[u8] = b"smolvm: blocked system call ";
const SUFFIX: &[u8] = b"; this is a bug in smolvm, please report it\n";

/// Install the handler for SIGSYS (process-wide). `SA_RESETHAND` puts the default action
/// back on entry, so the re-raise kills; `SA_NODEFER` lets it arrive inside the handler.
pub(super) fn install_handler() -> io::Result<()> {
    // SAFETY: the handler calls only async-signal-safe system calls (prctl, write, getpid,
    // gettid, tgkill, rt_sigprocmask, exit_group) on stack buffers; sigaction gets a
    // zeroed, then filled, struct.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND | libc::SA_NODEFER;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Offset of `si_syscall` in x86_64's `siginfo_t` (`_sigsys`: signo, errno, code, padding,
/// then `_call_addr` at 16 and `_syscall` at 24).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers; for a seccomp
    // trap its `_sigsys` member holds the system call number at this offset.
    let nr =
        unsafe { std::ptr::read_unaligned(info.cast::<u8>().add(SI_SYSCALL_OFFSET).cast::<i32>()) };
    let mut thread = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (NUL-terminated) into the buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, thread.as_mut_ptr()) };
    let thread_len = thread.iter().position(|&b| b == 0).unwrap_or(16);
    let mut buf = [0u8; 256];
    let len = format_report(&mut buf, nr, &thread[..thread_len]);
    // SAFETY: write(2) of a stack buffer, then signals to this very thread; all
    // async-signal-safe. SIGSYS has its default action again (SA_RESETHAND), so it ends the
    // process; unblocking covers threads that run with signals blocked.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        let pid = libc::getpid();
        let tid = libc::syscall(libc::SYS_gettid) as libc::pid_t;
        libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGSYS);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        // Not reached: the signal above ends the process.
        libc::_exit(128 + libc::SIGSYS);
    }
}

/// `smolvm: blocked system call NR (NAME) in thread THREAD; this is a bug...`, without
/// allocating (a signal handler); returns the length written.
pub(super) fn format_report(buf: &mut [u8], nr: i32, thread: &[u8]) -> usize {
    let mut w = Cursor { buf, len: 0 };
    w.put(PREFIX);
    w.num(nr);
    w.put(b" (");
    w.put(syscall_name(nr as i64).unwrap_or("unknown").as_bytes());
    w.put(b") in thread ");
    w.put(thread);
    w.put(SUFFIX);
    w.len
}

struct Cursor<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Cursor<'_> {
    fn put(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn num(&mut self, v: i32) {
        if v < 0 {
            self.put(b"-");
        }
        let mut digits = [0u8; 10];
        let mut i = digits.len();
        let mut v = v.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.put(&digits[i..]);
    }
}

macro_rules! names {
    ($($(#[$m:meta])* $name:ident,)*) => {
        &[$($(#[$m])* (libc::$name, stringify!($name)),)*]
    };
}

/// Names of the calls most likely to be attempted that are not on an allow-list (the
/// allowed ones are named by the lists themselves).
const OTHER_NAMES: &[(i64, &str)] = names![
    SYS_execve,
    SYS_execveat,
    #[cfg(target_arch = "x86_64")]
    SYS_fork,
    #[cfg(target_arch = "x86_64")]
    SYS_vfork,
    SYS_ptrace,
    SYS_kill,
    SYS_tkill,
    SYS_socket,
    SYS_socketpair,
    SYS_connect,
    SYS_bind,
    SYS_listen,
    SYS_accept,
    SYS_setsockopt,
    SYS_getsockopt,
    #[cfg(target_arch = "x86_64")]
    SYS_open,
    #[cfg(target_arch = "x86_64")]
    SYS_creat,
    #[cfg(target_arch = "x86_64")]
    SYS_link,
    #[cfg(target_arch = "x86_64")]
    SYS_symlink,
    SYS_fchmod,
    #[cfg(target_arch = "x86_64")]
    SYS_chown,
    SYS_fchown,
    SYS_fchownat,
    #[cfg(target_arch = "x86_64")]
    SYS_stat,
    #[cfg(target_arch = "x86_64")]
    SYS_lstat,
    #[cfg(target_arch = "x86_64")]
    SYS_access,
    SYS_faccessat,
    SYS_faccessat2,
    #[cfg(target_arch = "x86_64")]
    SYS_readlink,
    SYS_dup,
    #[cfg(target_arch = "x86_64")]
    SYS_dup2,
    SYS_dup3,
    #[cfg(target_arch = "x86_64")]
    SYS_pipe,
    SYS_pipe2,
    #[cfg(target_arch = "x86_64")]
    SYS_poll,
    SYS_ppoll,
    #[cfg(target_arch = "x86_64")]
    SYS_select,
    SYS_pselect6,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    #[cfg(target_arch = "x86_64")]
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_eventfd2,
    SYS_memfd_create,
    SYS_copy_file_range,
    SYS_sendfile,
    SYS_splice,
    SYS_wait4,
    SYS_waitid,
    SYS_mount,
    SYS_umount2,
    SYS_chroot,
    SYS_pivot_root,
    SYS_unshare,
    SYS_setns,
    SYS_setuid,
    SYS_setgid,
    SYS_setresuid,
    SYS_setresgid,
    SYS_capset,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_pidfd_open,
    SYS_pidfd_getfd,
    SYS_bpf,
    SYS_perf_event_open,
    SYS_userfaultfd,
    SYS_io_uring_setup,
    SYS_io_uring_enter,
    SYS_keyctl,
    SYS_add_key,
    SYS_request_key,
    SYS_init_module,
    SYS_finit_module,
    SYS_delete_module,
    SYS_kexec_load,
    SYS_reboot,
    SYS_personality,
    SYS_uname,
    SYS_sysinfo,
    SYS_getrlimit,
    SYS_prlimit64,
    SYS_getuid,
    SYS_geteuid,
    SYS_getcwd,
    SYS_chdir,
    SYS_mlock,
    SYS_membarrier,
    SYS_sched_setaffinity,
    SYS_timerfd_create,
    SYS_signalfd4,
    SYS_rt_sigtimedwait,
    SYS_rt_tgsigqueueinfo,
    SYS_close_range,
];

/// The x86_64 name of system call `nr`, when known.
pub(crate) fn syscall_name(nr: i64) -> Option<&'static str> {
    filters::VMM
        .iter()
        .map(|a| (a.nr, a.sys_name))
        .chain(OTHER_NAMES.iter().copied())
        .find(|&(n, _)| n == nr)
        .map(|(_, name)| name.trim_start_matches("SYS_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_line_is_exact() {
        let mut buf = [0u8; 256];
        let n = format_report(&mut buf, libc::SYS_execve as i32, b"vcpu0");
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "smolvm: blocked system call 59 (execve) in thread vcpu0; \
             this is a bug in smolvm, please report it\n"
        );
        let n = format_report(&mut buf, 100_000, b"main");
        assert!(std::str::from_utf8(&buf[..n])
            .unwrap()
            .starts_with("smolvm: blocked system call 100000 (unknown) in thread main;"));
    }

    #[test]
    fn report_never_overflows() {
        let mut buf = [0u8; 40];
        let n = format_report(&mut buf, -1, &[b'x'; 16]);
        assert_eq!(n, 40);
        assert!(buf.starts_with(b"smolvm: blocked system call -1 ("));
    }

    #[test]
    fn names_are_unique_and_cover_the_lists() {
        for a in filters::VMM.iter().chain(filters::VCPU) {
            assert_eq!(syscall_name(a.nr), Some(a.name()));
        }
        assert_eq!(syscall_name(libc::SYS_socket), Some("socket"));
        for (i, (n, _)) in OTHER_NAMES.iter().enumerate() {
            assert!(!OTHER_NAMES[..i].iter().any(|(m, _)| m == n));
            assert!(!filters::VMM.iter().any(|a| a.nr == *n));
        }
    }
}
