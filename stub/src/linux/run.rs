//! `smolvm run` and `smolvm shell` for Linux machines: resume, run one
//! command with the caller's stdio (pipes, or a raw-mode terminal when stdin
//! is one), exit with its status. Nothing is written back unless `--save`
//! names a file.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

use smolvm_agent::client::ClientError;
use smolvm_agent::protocol::{ExecRequest, ExitStatus, WinSize};
use smolvm_formats::{
    Compression, GuestRegion, MachineReader, MachineWriter, Manifest, SectionKind,
};

use super::{resume_linux, LinuxError, LinuxExit, ResumeOptions};
use crate::timing;

/// What `smolvm run` should do.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Arguments replacing the manifest's `cmd` (the entrypoint stays).
    pub args: Option<Vec<String>>,
    /// Run this argv instead of entrypoint and cmd (`smolvm shell`).
    pub argv: Option<Vec<String>>,
    /// Write the machine as it is at exit to this file.
    pub save: Option<PathBuf>,
}

/// The cache directory for expanded machines.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("SMOLVM_CACHE") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
            PathBuf::from(home).join(".cache").join("smolvm")
        }
    }
}

/// A path to a machine whose memory and disks can be mapped in place:
/// `path` itself, or for a compressed machine an uncompressed copy in
/// `${SMOLVM_CACHE:-~/.cache/smolvm}/expanded/<content hash>.smolmachine`,
/// written once (atomically) and reused.
pub fn mappable_machine(path: &Path) -> Result<PathBuf, LinuxError> {
    let r = MachineReader::open(path)?;
    let memory_ok = r.memory_layout()?.mappable;
    let disks_ok = r.disks()?.iter().all(|d| d.mappable);
    if memory_ok && disks_ok {
        return Ok(path.to_owned());
    }
    let mut h = DefaultHasher::new();
    r.len().hash(&mut h);
    for s in r.sections() {
        (s.kind.code(), s.checksum, s.stored_len, s.logical_len).hash(&mut h);
    }
    let dir = cache_dir().join("expanded");
    std::fs::create_dir_all(&dir)?;
    let dest = dir.join(format!("{:016x}.smolmachine", h.finish()));
    if let Ok(cached) = MachineReader::open(&dest) {
        if cached.memory_layout().is_ok_and(|m| m.mappable)
            && cached.disks().is_ok_and(|d| d.iter().all(|d| d.mappable))
        {
            return Ok(dest);
        }
    }
    expand(&r, &dest)?;
    timing::mark("machine-expanded");
    Ok(dest)
}

/// Rewrite `r` uncompressed at `dest` (through the atomic writer).
fn expand(r: &MachineReader, dest: &Path) -> Result<(), LinuxError> {
    let mut w = MachineWriter::create(dest, r.arch())?;
    w.add_manifest(&r.manifest()?)?;
    w.add_blob(
        SectionKind::VmState,
        &r.read_blob(SectionKind::VmState)?,
        Compression::None,
    )?;
    // Expanded into lazily zeroed anonymous memory (a failed reservation is
    // an error, not an abort), then written out region by region.
    let layout = r.memory_layout()?;
    let sizes: Vec<(u64, u64)> = layout
        .regions
        .iter()
        .map(|reg| (reg.guest_addr, reg.size))
        .collect();
    let mem = crate::vstate::memory::GuestMemory::expanded(&sizes, |i, bytes| {
        r.read_memory_region(i, bytes).map_err(LinuxError::File)
    })?;
    // SAFETY: this memory belongs to no VM; nothing else writes it.
    let slices = unsafe { mem.region_slices() };
    let regions: Vec<GuestRegion<'_>> = slices
        .into_iter()
        .map(|(guest_addr, data)| GuestRegion { guest_addr, data })
        .collect();
    w.add_memory(&regions, Compression::None)?;
    drop(regions);
    drop(mem);
    let dir = dest.parent().unwrap_or(Path::new("."));
    for d in r.disks()? {
        let mut tmp = tempfile::tempfile_in(dir)?;
        r.extract_disk(&d, &tmp)?;
        w.add_disk(&d.name, &mut tmp, Compression::None)?;
    }
    w.finish()?;
    Ok(())
}

/// Records that a machine file's sections passed their checksums, keyed by
/// the file's identity and change time: any write to the file (or a new
/// file at that path) changes the key, so only an untouched, already
/// verified file skips hashing on later runs.
struct VerifiedStamp(PathBuf);

impl VerifiedStamp {
    fn of(path: &Path) -> Option<VerifiedStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        let name = format!(
            "{:x}-{:x}-{:x}-{}.{}-{}.{}",
            m.dev(),
            m.ino(),
            m.size(),
            m.ctime(),
            m.ctime_nsec(),
            m.mtime(),
            m.mtime_nsec()
        );
        Some(VerifiedStamp(cache_dir().join("verified").join(name)))
    }

    fn is_recorded(&self) -> bool {
        self.0.is_file()
    }

    /// Best effort: a failure only means the next run hashes again.
    fn record(&self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::create_dir_all(dir).and_then(|_| std::fs::write(&self.0, b""));
        }
    }
}

/// The command a run executes: `argv`, or entrypoint + (`args` or cmd).
pub fn command_for(manifest: &Manifest, opts: &RunOptions) -> Result<Vec<String>, LinuxError> {
    if let Some(argv) = &opts.argv {
        return Ok(argv.clone());
    }
    let mut argv = manifest.entrypoint.clone();
    argv.extend(opts.args.clone().unwrap_or_else(|| manifest.cmd.clone()));
    if argv.is_empty() {
        return Err(LinuxError::Config(
            "the machine has no entrypoint or cmd: name a command after `--`".into(),
        ));
    }
    Ok(argv)
}

/// The exit status a shell would report: the code, or 128 + the signal.
pub fn exit_code(status: ExitStatus) -> i32 {
    match status {
        ExitStatus::Code(c) => c & 0xff,
        ExitStatus::Signal(s) => 128 + (s & 0x7f),
    }
}

fn is_tty(fd: i32) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

fn window_size() -> WinSize {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into the struct we pass.
    let ok = unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_row > 0 && ws.ws_col > 0 {
        WinSize {
            rows: ws.ws_row,
            cols: ws.ws_col,
        }
    } else {
        WinSize { rows: 24, cols: 80 }
    }
}

/// The caller's terminal in raw mode for as long as this lives.
struct RawMode(libc::termios);

impl RawMode {
    fn enter() -> io::Result<RawMode> {
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 and a valid termios pointer.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let orig = t;
        // SAFETY: cfmakeraw edits the struct in place.
        unsafe { libc::cfmakeraw(&mut t) };
        // SAFETY: fd 0 and a valid termios.
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RawMode(orig))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read in `enter`.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.0) };
    }
}

static RESIZED: AtomicBool = AtomicBool::new(false);
static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_winch(_: libc::c_int) {
    RESIZED.store(true, Ordering::SeqCst);
}

static SIGNALS_SEEN: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_forwarded(sig: libc::c_int) {
    // The first signal goes to the guest command; a second one ends smolvm
    // (the guest may be unable to act on the first).
    if SIGNALS_SEEN.fetch_add(1, Ordering::SeqCst) >= 1 {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + sig) };
    }
    PENDING_SIGNAL.store(sig, Ordering::SeqCst);
}

fn install(sig: libc::c_int, handler: extern "C" fn(libc::c_int)) {
    // SAFETY: the handlers only store to atomics (async-signal-safe), and
    // sigaction is given a zeroed, then filled, struct.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}

fn copy_out(mut from: impl Read, to: &mut dyn Write) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).and_then(|_| to.flush()).is_err() {
                    // Keep draining so the command is not blocked on a full window.
                    continue;
                }
            }
        }
    }
}

/// Resume the machine in `path`, run the command, and return the exit code.
pub fn run(path: &Path, opts: &RunOptions) -> Result<i32, LinuxError> {
    let path = mappable_machine(path)?;
    let manifest = MachineReader::open(&path)?.manifest()?;
    let argv = command_for(&manifest, opts)?;
    let console = std::env::var_os("SMOLVM_CONSOLE")
        .filter(|v| v == "1")
        .map(|_| Box::new(io::stderr()) as super::console::ConsoleSink);
    let stamp = VerifiedStamp::of(&path);
    let verified_before = stamp.as_ref().is_some_and(VerifiedStamp::is_recorded);
    let mut m = resume_linux(
        &path,
        ResumeOptions {
            console,
            verify: !verified_before,
            ..Default::default()
        },
    )?;
    if !verified_before {
        if let Some(s) = &stamp {
            s.record();
        }
    }
    let tty = is_tty(0);
    let req = ExecRequest {
        argv,
        env: manifest.env.clone(),
        cwd: (!manifest.workdir.is_empty()).then(|| manifest.workdir.clone()),
        user: None,
        tty: tty.then(window_size),
    };
    let code = match run_exec(&m, req, tty) {
        Ok(status) => exit_code(status),
        // The guest ended under the command (`reboot`, `poweroff`, a panic).
        Err(e) if m.has_stopped() => match m.wait_exit(Duration::from_secs(5))? {
            Some(LinuxExit::Reboot) | Some(LinuxExit::PowerOff) => {
                if opts.save.is_some() {
                    return Err(LinuxError::Config(
                        "the guest shut down, so there is no machine left to save".into(),
                    ));
                }
                0
            }
            Some(LinuxExit::Panic(tail)) => {
                return Err(LinuxError::Guest {
                    why: "the guest kernel panicked".into(),
                    tail,
                })
            }
            Some(LinuxExit::Error(why)) => {
                return Err(LinuxError::Guest {
                    why,
                    tail: m.console_tail(),
                })
            }
            None => return Err(e),
        },
        // Like a shell: a command that cannot be started exits 127.
        Err(LinuxError::Agent(ClientError::ExecFailed(why))) => {
            eprintln!("smolvm: the command could not start: {why}");
            127
        }
        Err(e) => return Err(e),
    };
    if let Some(out) = &opts.save {
        m.save(out, &manifest, Compression::None)?;
    }
    drop(m);
    timing::mark("machine-dropped");
    Ok(code)
}

fn run_exec(
    m: &super::LinuxMachine,
    req: ExecRequest,
    tty: bool,
) -> Result<ExitStatus, LinuxError> {
    let mut handle = m.agent().exec(req)?;
    timing::mark("exec-sent");
    let raw = if tty { RawMode::enter().ok() } else { None };
    install(libc::SIGWINCH, on_winch);
    if !tty {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
            install(sig, on_forwarded);
        }
    }
    let mut stdin = handle.stdin();
    // Not joined: a read of the caller's stdin may block past the command's end.
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            let mut input = io::stdin().lock();
            loop {
                match input.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if stdin.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            let _ = stdin.close();
        })?;
    let out = handle.take_stdout();
    let err = handle.take_stderr();
    let done = AtomicBool::new(false);
    let h = &handle;
    std::thread::scope(|s| {
        let o = s.spawn(move || {
            if let Some(r) = out {
                copy_out(r, &mut io::stdout());
            }
        });
        let e = s.spawn(move || {
            if let Some(r) = err {
                copy_out(r, &mut io::stderr());
            }
        });
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                if RESIZED.swap(false, Ordering::SeqCst) && tty {
                    let _ = h.resize(window_size());
                }
                let sig = PENDING_SIGNAL.swap(0, Ordering::SeqCst);
                if sig != 0 {
                    let _ = h.signal(sig);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let _ = o.join();
        let _ = e.join();
        done.store(true, Ordering::SeqCst);
    });
    let status = handle.wait()?;
    drop(raw);
    timing::mark("command-exited");
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(exit_code(ExitStatus::Code(0)), 0);
        assert_eq!(exit_code(ExitStatus::Code(3)), 3);
        assert_eq!(exit_code(ExitStatus::Signal(9)), 137);
        assert_eq!(exit_code(ExitStatus::Signal(15)), 143);
    }

    #[test]
    fn command_is_entrypoint_then_args_or_cmd() {
        let m = Manifest {
            entrypoint: vec!["/app".into()],
            cmd: vec!["--serve".into()],
            ..Default::default()
        };
        let mut o = RunOptions::default();
        assert_eq!(command_for(&m, &o).unwrap(), ["/app", "--serve"]);
        o.args = Some(vec!["x".into()]);
        assert_eq!(command_for(&m, &o).unwrap(), ["/app", "x"]);
        o.argv = Some(vec!["/bin/sh".into(), "-l".into()]);
        assert_eq!(command_for(&m, &o).unwrap(), ["/bin/sh", "-l"]);
        assert!(command_for(&Manifest::default(), &RunOptions::default()).is_err());
    }
}
