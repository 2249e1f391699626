//! The invocation protocol: how a warm program, started at build time, receives each run
//! (argv, environment, working directory and its three stdio descriptors) over a Unix
//! socket in the guest. docs/WARM.md is the language-neutral description; this module is
//! the reference encoder and decoder, the agent's side (send with `SCM_RIGHTS`), and the
//! program's side used by `smolvm-invoke`.
//!
//! 1. The program connects to the socket named by `SMOLVM_INVOKE_SOCKET` (default
//!    [`DEFAULT_SOCKET`]) and writes the 16 bytes of [`REQUEST`].
//! 2. It reads the invocation: a little-endian `u32` length, then that many bytes of
//!    payload. The first `recvmsg` carries exactly three descriptors (`SCM_RIGHTS`): the
//!    run's stdin, stdout and stderr.
//! 3. The payload is a sequence of NUL-terminated fields: the version `1`; the flags
//!    (`reseed`, or empty); the working directory; argc in decimal; argc arguments; envc
//!    in decimal; envc `NAME=VALUE` strings. Nothing follows the last field.
//! 4. Optionally, once its run is over, the program closes its copies of the run's stdio
//!    and writes [`exit_report`] (`exit N\n`) on the same connection: the run ends with
//!    status N without waiting for the process to be gone.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Where the agent listens unless `SMOLVM_INVOKE_SOCKET` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/smolvm/invoke.sock";
/// The variable the agent sets in a warm program's environment naming the socket.
pub const SOCKET_ENV: &str = "SMOLVM_INVOKE_SOCKET";
/// The variable the agent sets beside [`SOCKET_ENV`]: how many words the warm command line
/// had when the agent started it. A script's interpreter sees another count (a `#!` line
/// adds the interpreter and replaces `argv[0]` with the script's path), so the shell helper
/// takes the program's words of a run from this, less the script's own argument count.
pub const ARGC_ENV: &str = "SMOLVM_INVOKE_ARGC";
/// The variable naming the FIFO a shell script sources (`. "$SMOLVM_INVOKE_SH"`) to take
/// its run over without starting a process: the shell way in, beside the socket.
pub const SH_ENV: &str = "SMOLVM_INVOKE_SH";
/// What a program writes after connecting.
pub const REQUEST: &[u8; 16] = b"smolvm-invoke 1\n";
/// Largest payload either side accepts.
pub const MAX_INVOCATION: usize = 1 << 20;
/// The protocol version, the first field of every invocation.
pub const VERSION: &str = "1";

/// One run handed to a warm program.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Invocation {
    /// The whole command line, as a fresh exec would get it (`argv[0]` is the program).
    pub argv: Vec<String>,
    /// The whole environment of the run.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: String,
    /// The program should reseed its random generators (always set by this agent).
    pub reseed: bool,
}

/// Why an invocation could not be decoded or received.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error("invocation of {0} bytes exceeds the {MAX_INVOCATION}-byte limit")]
    TooLarge(usize),
    #[error("invocation ends inside a field (no NUL terminator)")]
    Unterminated,
    #[error("invocation lacks its {0} field")]
    Missing(&'static str),
    #[error("invocation version {0:?} is not {VERSION:?}")]
    Version(String),
    #[error("invocation field {0} is not UTF-8")]
    NotUtf8(&'static str),
    #[error("invocation count {0:?} is not a decimal number in range")]
    BadCount(String),
    #[error("invocation has {0} bytes after its last field")]
    Trailing(usize),
    #[error("environment entry {0:?} has no '=' or an empty name")]
    BadEnv(String),
    #[error("a NUL byte inside a field cannot be encoded")]
    Nul,
    #[error("invocation carried {0} descriptors, not 3")]
    Descriptors(usize),
    #[error("exit report {0:?} is not `exit N` with N from 0 to 255")]
    BadReport(String),
    #[error("invocation socket: {0}")]
    Io(#[from] io::Error),
}

/// Longest exit report: `exit 255\n`.
pub const EXIT_REPORT_MAX: usize = 9;

/// The report a warm program may write when its run is over (docs/WARM.md, step 6):
/// `exit N\n`, N the run's status in decimal. A process's own end (unmapping its memory,
/// closing its files) comes after its last output and can be a good part of a short run
/// on an emulating host; the report lets the run end first.
pub fn exit_report(status: u8) -> String {
    format!("exit {status}\n")
}

/// Parses what a warm program wrote after its run: `Ok(Some(status))` for a whole report,
/// `Ok(None)` while `bytes` is the start of one (read on), an error for anything else.
pub fn parse_exit_report(bytes: &[u8]) -> Result<Option<u8>, InvokeError> {
    let bad = || InvokeError::BadReport(String::from_utf8_lossy(bytes).into_owned());
    if bytes.len() > EXIT_REPORT_MAX {
        return Err(bad());
    }
    const WORD: &[u8] = b"exit ";
    let head = bytes.len().min(WORD.len());
    if bytes[..head] != WORD[..head] {
        return Err(bad());
    }
    let rest = &bytes[head..];
    let (digits, whole) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) if i + 1 == rest.len() && head == WORD.len() => (&rest[..i], true),
        Some(_) => return Err(bad()),
        None => (rest, false),
    };
    if !digits.iter().all(u8::is_ascii_digit)
        || digits.len() > 3
        || (digits.len() > 1 && digits[0] == b'0')
    {
        return Err(bad());
    }
    if !whole {
        return Ok(None);
    }
    // All ASCII digits, at most three: parses, and only the range can fail.
    let n: u32 = std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse().ok())
        .ok_or_else(bad)?;
    u8::try_from(n).map(Some).map_err(|_| bad())
}

/// Encodes the payload (without the length prefix).
pub fn encode(inv: &Invocation) -> Result<Vec<u8>, InvokeError> {
    let mut out = Vec::new();
    let mut field = |s: &str| -> Result<(), InvokeError> {
        if s.as_bytes().contains(&0) {
            return Err(InvokeError::Nul);
        }
        out.extend_from_slice(s.as_bytes());
        out.push(0);
        Ok(())
    };
    field(VERSION)?;
    field(if inv.reseed { "reseed" } else { "" })?;
    field(&inv.cwd)?;
    field(&inv.argv.len().to_string())?;
    for a in &inv.argv {
        field(a)?;
    }
    field(&inv.env.len().to_string())?;
    for (k, v) in &inv.env {
        if k.is_empty() || k.contains('=') {
            return Err(InvokeError::BadEnv(k.clone()));
        }
        field(&format!("{k}={v}"))?;
    }
    if out.len() > MAX_INVOCATION {
        return Err(InvokeError::TooLarge(out.len()));
    }
    Ok(out)
}

/// Decodes a payload; anything but exactly one well-formed invocation is an error.
pub fn decode(payload: &[u8]) -> Result<Invocation, InvokeError> {
    if payload.len() > MAX_INVOCATION {
        return Err(InvokeError::TooLarge(payload.len()));
    }
    let mut rest = payload;
    let mut next = |what: &'static str| -> Result<&str, InvokeError> {
        if rest.is_empty() {
            return Err(InvokeError::Missing(what));
        }
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(InvokeError::Unterminated)?;
        let s = std::str::from_utf8(&rest[..end]).map_err(|_| InvokeError::NotUtf8(what))?;
        rest = &rest[end + 1..];
        Ok(s)
    };
    let version = next("version")?;
    if version != VERSION {
        return Err(InvokeError::Version(version.to_string()));
    }
    let reseed = match next("flags")? {
        "" => false,
        "reseed" => true,
        other => return Err(InvokeError::BadCount(other.to_string())),
    };
    let cwd = next("cwd")?.to_string();
    // Every field takes at least its NUL: a count beyond the payload is refused before
    // anything is allocated for it. Only plain decimal digits, as the encoder writes them
    // (`str::parse` would also take a leading `+`, which would not encode back the same).
    let count = |s: &str, left: usize| -> Result<usize, InvokeError> {
        let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        match s.parse::<usize>() {
            Ok(n) if digits && n <= left && (s == "0" || !s.starts_with('0')) => Ok(n),
            _ => Err(InvokeError::BadCount(s.to_string())),
        }
    };
    let argc = count(next("argc")?, payload.len())?;
    let mut argv = Vec::with_capacity(argc);
    for _ in 0..argc {
        argv.push(next("argument")?.to_string());
    }
    let envc = count(next("envc")?, payload.len())?;
    let mut env = Vec::with_capacity(envc);
    for _ in 0..envc {
        let e = next("environment")?;
        match e.split_once('=') {
            Some((k, v)) if !k.is_empty() => env.push((k.to_string(), v.to_string())),
            _ => return Err(InvokeError::BadEnv(e.to_string())),
        }
    }
    if !rest.is_empty() {
        return Err(InvokeError::Trailing(rest.len()));
    }
    Ok(Invocation {
        argv,
        env,
        cwd,
        reseed,
    })
}

/// Sends `inv` with the three stdio descriptors: the length and payload in one `sendmsg`
/// whose control message carries the descriptors, then whatever did not fit.
pub fn send(sock: &UnixStream, inv: &Invocation, stdio: [RawFd; 3]) -> Result<(), InvokeError> {
    let payload = encode(inv)?;
    let mut msg = Vec::with_capacity(4 + payload.len());
    msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    msg.extend_from_slice(&payload);
    let fd_bytes = std::mem::size_of::<[RawFd; 3]>();
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: msg.as_ptr() as *mut libc::c_void,
        iov_len: msg.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header; the fields are set below.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr().cast();
    hdr.msg_controllen = space as _;
    // SAFETY: `hdr` points at `control`, which has room for one cmsghdr with three fds.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&hdr);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
        std::ptr::copy_nonoverlapping(stdio.as_ptr(), libc::CMSG_DATA(cmsg).cast(), 3);
    }
    let sent = loop {
        // SAFETY: `hdr` and everything it points to are valid for the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    };
    let mut rest = &msg[sent..];
    while !rest.is_empty() {
        // SAFETY: `rest` is a valid readable slice.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        rest = &rest[n as usize..];
    }
    Ok(())
}

/// The program's side: connects to `path`, asks for the invocation and waits for it.
/// Returns it with the three descriptors (stdin, stdout, stderr) to install.
pub fn wait(path: &str) -> Result<(Invocation, [OwnedFd; 3]), InvokeError> {
    use std::io::Write;
    let mut sock = UnixStream::connect(path)?;
    sock.write_all(REQUEST)?;
    let mut head = [0u8; 4];
    let fds = recv_with_fds(&sock, &mut head)?;
    let len = u32::from_le_bytes(head) as usize;
    if len > MAX_INVOCATION {
        return Err(InvokeError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    sock.read_exact(&mut payload)?;
    Ok((decode(&payload)?, fds))
}

/// Reads exactly `buf.len()` bytes, the first `recvmsg` taking the descriptors with them.
fn recv_with_fds(sock: &UnixStream, buf: &mut [u8]) -> Result<[OwnedFd; 3], InvokeError> {
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE((8 * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header; the fields are set below.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr().cast();
    hdr.msg_controllen = space as _;
    let n = loop {
        // SAFETY: `hdr` and the buffers it points to are valid and writable.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut hdr, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    };
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into `control`.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&hdr);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    // The kernel installed each descriptor for us: we own it now.
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&hdr, cmsg);
        }
    }
    if n == 0 {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    let mut got = n;
    let mut sock_ref = sock;
    while got < buf.len() {
        let m = sock_ref.read(&mut buf[got..])?;
        if m == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        got += m;
    }
    let count = fds.len();
    <[OwnedFd; 3]>::try_from(fds).map_err(|_| InvokeError::Descriptors(count))
}

/// Formats `s` as one single-quoted POSIX shell word.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Whether `name` can be a shell variable's name (others cannot be exported by a shell).
pub fn shell_name_ok(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `export` lines for the run's environment, one per variable a shell can hold.
pub fn shell_exports(env: &[(String, String)]) -> String {
    let mut out = String::new();
    for (k, v) in env.iter().filter(|(k, _)| shell_name_ok(k)) {
        out.push_str(&format!("export {k}={}\n", shell_quote(v)));
    }
    out
}

/// Where a script that sourced [`SH_ENV`] finds its run's stdio: FIFOs the agent made,
/// and the FIFO it opens and closes to say it holds them.
pub struct ShellStdio<'a> {
    pub stdin: &'a str,
    pub stdout: &'a str,
    pub stderr: &'a str,
    pub ack: &'a str,
    /// Where the shell's `EXIT` trap reports the run's status (see [`exit_report`]).
    pub exit: &'a str,
}

/// The commands a shell script runs with `. "$SMOLVM_INVOKE_SH"` to become the run `inv`,
/// with shell builtins only (no process starts, which is the point):
/// - opens the run's stdio FIFOs onto 0, 1 and 2, then opens and closes `ack` so the
///   agent stops holding the stdin FIFO open (until then its early end cannot be lost);
/// - sets the shell's `EXIT` trap to close its stdio and write [`exit_report`] with the
///   shell's status into the `exit` FIFO, so the run ends before the shell process is gone
///   (subshells do not inherit the trap; a script that sets its own `EXIT` trap replaces
///   it, and its run then ends when the shell has exited, as without a report). The FIFO
///   is opened read-write (`<>`), which never blocks, whatever the agent does;
/// - unsets `unset` (the start-up's variables the run lacks), exports the run's variables,
///   changes directory;
/// - sets the positional parameters to the run's arguments: `argv` less the words that
///   were the program's, found as at the start the command line had `start_argc` words of
///   which the script got `$#` (a `#!` line changes the count: docs/WARM.md). Must be
///   sourced at the script's top level, where `$#` is still the start-up's.
pub fn shell_takeover(
    inv: &Invocation,
    stdio: &ShellStdio,
    start_argc: usize,
    unset: &[&str],
) -> String {
    let q = shell_quote;
    let mut out = format!(
        "exec 0<{} 1>{} 2>{}\n: >{}\n",
        q(stdio.stdin),
        q(stdio.stdout),
        q(stdio.stderr),
        q(stdio.ack)
    );
    let report = format!(
        "__smolvm_status=$?; exec 0<&- 1>&- 2>&-; echo \"exit $__smolvm_status\" 1<>{}",
        q(stdio.exit)
    );
    // bash (and zsh and ksh) also run the `EXIT` trap when a fatal signal kills them, with
    // `$?` the last command's status: the report would turn "killed by SIGTERM" into
    // "exit 0". Those shells get no report; their runs end with the process. busybox ash
    // and dash run it only on an exit. `[` is a builtin: nothing is forked.
    out.push_str(&format!(
        "if [ -z \"${{BASH_VERSION-}}${{ZSH_VERSION-}}${{KSH_VERSION-}}\" ]; then trap -- {} EXIT; fi\n",
        q(&report)
    ));
    let unset: Vec<&str> = unset.iter().copied().filter(|k| shell_name_ok(k)).collect();
    if !unset.is_empty() {
        out.push_str(&format!("unset {}\n", unset.join(" ")));
    }
    out.push_str(&shell_exports(&inv.env));
    out.push_str(&format!("cd -- {}\n", q(&inv.cwd)));
    out.push_str(&format!("__smolvm_skip=$(({start_argc} - $#))\nset --"));
    for a in &inv.argv {
        out.push(' ');
        out.push_str(&q(a));
    }
    // A count out of range would make `shift` end the script: no arguments then.
    out.push_str(
        "\nif [ 0 -le \"$__smolvm_skip\" ] && [ \"$__smolvm_skip\" -le $# ]; \
         then shift \"$__smolvm_skip\"; else set --; fi\nunset __smolvm_skip\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Invocation {
        Invocation {
            argv: vec![
                "python3".into(),
                "/app/x.py".into(),
                "a b".into(),
                "".into(),
            ],
            env: vec![("PATH".into(), "/bin".into()), ("X".into(), "a=b".into())],
            cwd: "/tmp".into(),
            reseed: true,
        }
    }

    #[test]
    fn exit_reports_parse_whole_partial_and_bad() {
        for status in 0..=255u8 {
            let r = exit_report(status);
            assert!(r.len() <= EXIT_REPORT_MAX);
            assert_eq!(parse_exit_report(r.as_bytes()).unwrap(), Some(status));
            for cut in 0..r.len() {
                assert_eq!(parse_exit_report(&r.as_bytes()[..cut]).unwrap(), None);
            }
        }
        for bad in [
            &b"exit\n"[..],
            b"exit \n",
            b"exit 256\n",
            b"exit 007\n",
            b"exit 1\n\n",
            b"exit -1\n",
            b"exit 1 \n",
            b"Exit 1\n",
            b"exit 1000",
            b"quit",
            b"exit 12345",
        ] {
            assert!(parse_exit_report(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn shell_takeover_reports_through_an_exit_trap() {
        let stdio = ShellStdio {
            stdin: "/run/i",
            stdout: "/run/o",
            stderr: "/run/e",
            ack: "/run/a",
            exit: "/run/it's",
        };
        let code = shell_takeover(&sample(), &stdio, 2, &[]);
        let trap = code.lines().find(|l| l.contains("trap ")).unwrap();
        assert_eq!(
            trap,
            r#"if [ -z "${BASH_VERSION-}${ZSH_VERSION-}${KSH_VERSION-}" ]; then trap -- '__smolvm_status=$?; exec 0<&- 1>&- 2>&-; echo "exit $__smolvm_status" 1<>'\''/run/it'\''\'\'''\''s'\''' EXIT; fi"#
        );
        // The trap is set once the run's stdio is open, before anything of the run.
        let lines: Vec<&str> = code.lines().collect();
        assert!(lines[0].starts_with("exec 0<"));
        assert_eq!(lines[2], trap);
    }

    #[test]
    fn round_trip_and_exact_bytes() {
        let inv = sample();
        let bytes = encode(&inv).unwrap();
        assert_eq!(
            bytes,
            b"1\0reseed\0/tmp\x004\0python3\0/app/x.py\0a b\0\x002\0PATH=/bin\0X=a=b\0"
        );
        assert_eq!(decode(&bytes).unwrap(), inv);
    }

    #[test]
    fn malformed_payloads_are_refused() {
        let good = encode(&sample()).unwrap();
        assert!(matches!(
            decode(&good[..good.len() - 1]),
            Err(InvokeError::Unterminated)
        ));
        let mut extra = good.clone();
        extra.push(b'x');
        assert!(decode(&extra).is_err());
        assert!(matches!(
            decode(b"2\0\0/\x000\x000\0"),
            Err(InvokeError::Version(_))
        ));
        assert!(matches!(
            decode(b"1\0\0/\x0099999\0"),
            Err(InvokeError::BadCount(_))
        ));
        assert!(matches!(
            decode(b"1\0\0/\x0001\0a\x000\0"),
            Err(InvokeError::BadCount(_))
        ));
        // Found by the decode_invocation fuzz target: "+0" parsed as 0 and encoded back as "0".
        assert!(matches!(
            decode(b"1\0\0p\x003\0\0\0/\0+0\0"),
            Err(InvokeError::BadCount(c)) if c == "+0"
        ));
        assert!(matches!(
            decode(b"1\0\0/\x00+1\0a\x000\0"),
            Err(InvokeError::BadCount(_))
        ));
        assert!(matches!(
            decode(b"1\0\0/\x000\x001\0=x\0"),
            Err(InvokeError::BadEnv(_))
        ));
        assert!(matches!(
            decode(b"1\0\0/\x000\x001\0noeq\0"),
            Err(InvokeError::BadEnv(_))
        ));
        assert!(matches!(decode(b""), Err(InvokeError::Missing("version"))));
        assert!(matches!(decode(b"1\0\xff\0"), Err(InvokeError::NotUtf8(_))));
        let mut nul = sample();
        nul.argv.push("a\0b".into());
        assert!(matches!(encode(&nul), Err(InvokeError::Nul)));
    }

    #[test]
    fn send_and_wait_pass_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let p = path.to_str().unwrap().to_string();
        let t = std::thread::spawn(move || wait(&p).unwrap());
        let (mut conn, _) = listener.accept().unwrap();
        let mut req = [0u8; 16];
        conn.read_exact(&mut req).unwrap();
        assert_eq!(&req, REQUEST);
        let (r, w) = crate::sys::pipe().unwrap();
        let inv = sample();
        send(&conn, &inv, [r.as_raw_fd(), w.as_raw_fd(), w.as_raw_fd()]).unwrap();
        let (got, fds) = t.join().unwrap();
        assert_eq!(got, inv);
        // The received write end feeds our read end.
        let mut f = std::fs::File::from(fds.into_iter().nth(1).unwrap());
        std::io::Write::write_all(&mut f, b"through").unwrap();
        drop(f);
        drop(w);
        let mut out = String::new();
        std::fs::File::from(r).read_to_string(&mut out).unwrap();
        assert_eq!(out, "through");
    }
}
