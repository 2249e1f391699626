//! `smolvm run`, `smolvm shell` and packed executables for Linux machines:
//! resume, run one command with the caller's stdio (pipes, or a raw-mode
//! terminal when stdin and stdout are one), exit with its status. Nothing is
//! written back unless `--save` (or `SMOLVM_SAVE` in a packed executable)
//! names a file.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use smolvm_agent::client::{ClientError, ExecHandle};
use smolvm_agent::protocol::{ExecRequest, ExitStatus, WinSize};
use smolvm_formats::{
    Compression, GuestRegion, MachineReader, MachineWriter, Manifest, SectionKind,
};

use super::{resume_linux_start, LinuxError, LinuxExit, ResumeOptions};
use crate::builder::SnapshotPlan;
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
    /// Host directories to share (`-v`, `SMOLVM_VOLUME`), in order.
    pub volumes: Vec<Volume>,
    /// Ports to publish (`-p`, `SMOLVM_PUBLISH`), before the manifest's own.
    pub ports: Vec<super::publish::Publish>,
    /// What the caller asked of the user-mode network (`--net`, `--net=off`,
    /// `--net-allow`, `SMOLVM_NET`, `SMOLVM_NET_ALLOW`); see [`net_for`].
    pub net: crate::net::NetRequest,
}

/// The machine's own network default, from its manifest (a Smolfile `[network]`: `network`
/// = `on`, `network.allow` = the `--net-allow` specs joined by `,`): `None` when it has
/// none, else its allow list (empty: every destination).
pub fn machine_net(manifest: &Manifest) -> Result<Option<crate::net::AllowList>, String> {
    match manifest.extra.get("network").map(String::as_str) {
        None => Ok(None),
        Some("on") => {
            let rules = match manifest.extra.get("network.allow") {
                Some(list) => crate::net::parse_allow_list(list)
                    .map_err(|e| format!("the machine's manifest: {e}"))?,
                None => Vec::new(),
            };
            Ok(Some(crate::net::AllowList(rules)))
        }
        Some(v) => Err(format!(
            "the machine's manifest: bad network '{v}' (expected on)"
        )),
    }
}

/// The network of a run: the caller's request (`--net`, `--net=off`, `--net-allow`,
/// `SMOLVM_NET`, `SMOLVM_NET_ALLOW`) applied to the machine's `[network]` default.
pub fn net_for(
    manifest: &Manifest,
    request: &crate::net::NetRequest,
) -> Result<Option<crate::net::NetOptions>, String> {
    Ok(request.resolve(machine_net(manifest)?.as_ref()))
}

/// One host directory shared into the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// The host directory (absolute, symlinks resolved).
    pub host: PathBuf,
    /// Where the guest sees it (absolute).
    pub guest: String,
    /// Read-only (the default) or read-write.
    pub read_only: bool,
    /// The spec said `:ro` or `:rw` (otherwise a Smolfile `[[volume]]` for
    /// the same guest path gives the mode).
    pub mode_given: bool,
}

/// Parse `HOST:GUEST[:ro|:rw]` (docker's `-v` syntax; read-only unless
/// `:rw`). The host directory must exist; the guest path must be absolute,
/// not `/` and without `..`. The error is one line naming the spec.
pub fn parse_volume(spec: &str) -> Result<Volume, String> {
    let bad =
        |why: &str| format!("bad volume '{spec}': {why} (expected HOST_DIR:GUEST_DIR[:ro|:rw])");
    let (rest, read_only, mode_given) = match spec.rsplit_once(':') {
        Some((r, "ro")) => (r, true, true),
        Some((r, "rw")) => (r, false, true),
        _ => (spec, true, false),
    };
    let (host, guest) = rest.rsplit_once(':').ok_or_else(|| bad("no guest path"))?;
    if host.is_empty() {
        return Err(bad("empty host path"));
    }
    if !guest.starts_with('/')
        || guest.split('/').any(|c| c == "..")
        || guest.trim_matches('/').is_empty()
    {
        return Err(bad(
            "the guest path must be absolute, not '/', and without '..'",
        ));
    }
    let host =
        std::fs::canonicalize(host).map_err(|e| bad(&format!("host directory {host}: {e}")))?;
    if !host.is_dir() {
        return Err(bad(&format!("{} is not a directory", host.display())));
    }
    Ok(Volume {
        host,
        guest: guest.trim_end_matches('/').to_string(),
        read_only,
        mode_given,
    })
}

/// The shares of a run: the caller's `given` (`-v`, `SMOLVM_VOLUME`), with
/// the mode of the manifest's `volume.N.*` entry (a Smolfile `[[volume]]`)
/// for the same guest path when the spec gave none, then each manifest
/// volume with a `host` that the caller did not share, its host directory
/// taken relative to the current directory.
pub fn volumes_for(manifest: &Manifest, given: &[Volume]) -> Result<Vec<Volume>, String> {
    let mut declared = Vec::new();
    for i in 0.. {
        let Some(path) = manifest.extra.get(&format!("volume.{i}.path")) else {
            break;
        };
        let rw = manifest
            .extra
            .get(&format!("volume.{i}.mode"))
            .map(String::as_str)
            == Some("rw");
        let host = manifest.extra.get(&format!("volume.{i}.host"));
        declared.push((path.as_str(), rw, host));
    }
    let mut out: Vec<Volume> = given.to_vec();
    for v in &mut out {
        if let Some((_, rw, _)) = declared.iter().find(|d| d.0 == v.guest) {
            if !v.mode_given {
                v.read_only = !rw;
            }
        }
    }
    for (path, rw, host) in declared {
        if let Some(host) = host {
            if !out.iter().any(|v| v.guest == path) {
                let mode = if rw { "rw" } else { "ro" };
                out.push(parse_volume(&format!("{host}:{path}:{mode}"))?);
            }
        }
    }
    Ok(out)
}

/// Parse `SMOLVM_VOLUME`: volume specs separated by commas.
pub fn parse_volume_list(list: &str) -> Result<Vec<Volume>, String> {
    list.split(',')
        .filter(|s| !s.is_empty())
        .map(parse_volume)
        .collect()
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

/// Manifest key naming the machine an expanded copy was made from.
const EXPANDED_FROM: &str = "smolvm.expanded-from";

/// Whether every memory region and disk of `r` can be mapped in place.
fn is_mappable(r: &MachineReader) -> bool {
    r.memory_layout().is_ok_and(|m| m.mappable)
        && r.disks().is_ok_and(|d| d.iter().all(|d| d.mappable))
}

/// A machine whose memory and disks can be mapped in place: `plan` itself,
/// or for a compressed machine an uncompressed copy in
/// `${SMOLVM_CACHE:-~/.cache/smolvm}/expanded/<fingerprint>.smolmachine`,
/// written once (atomically) and reused. The name is the xxh3-128 of the
/// machine's header and section table (every section's checksum and length),
/// so it is the same for a `.smolmachine` and its packed executable and does
/// not change between smolvm builds; the copy records that fingerprint and
/// is rebuilt when it does not match.
pub fn mappable_plan(plan: SnapshotPlan) -> Result<SnapshotPlan, LinuxError> {
    let r = &plan.reader;
    if is_mappable(r) {
        return Ok(plan);
    }
    // Expanding takes seconds: find out first that KVM is usable at all.
    drop(<crate::hypervisor::Backend as crate::hypervisor::Hypervisor>::open_default()?);
    let fingerprint = format!("{:032x}", r.fingerprint());
    let dir = cache_dir().join("expanded");
    let dest = dir.join(format!("{fingerprint}.smolmachine"));
    if let Ok(cached) = SnapshotPlan::open(&dest) {
        if is_mappable(&cached.reader)
            && cached.manifest.extra.get(EXPANDED_FROM) == Some(&fingerprint)
        {
            return Ok(cached);
        }
    }
    // What the file claims must fit before anything is allocated or written.
    check_expansion_space(r, &dir)?;
    std::fs::create_dir_all(&dir)?;
    expand(r, &dest, &fingerprint)?;
    timing::mark("machine-expanded");
    Ok(SnapshotPlan::open(&dest)?)
}

/// Most bytes expanding `r` writes: every non-zero byte of its memory and
/// disks, the largest disk once more (extracted to a temporary file before it
/// is copied in), and the headers, indexes and 64 KiB alignment around them.
fn expansion_bytes(r: &MachineReader) -> Result<u64, LinuxError> {
    let data = |runs: &[smolvm_formats::MemRun]| -> u64 {
        runs.iter().filter(|x| !x.zero).map(|x| x.len).sum()
    };
    let index = |runs: &[smolvm_formats::MemRun]| 64 + 16 * runs.len() as u64;
    let align = 2 * smolvm_formats::DATA_ALIGN;
    let mut total = 1u64 << 20;
    for reg in &r.memory_layout()?.regions {
        total = total
            .saturating_add(data(&reg.runs))
            .saturating_add(index(&reg.runs) + align);
    }
    let mut largest_disk = 0;
    for d in r.disks()? {
        let bytes = data(&d.runs);
        largest_disk = largest_disk.max(bytes);
        total = total
            .saturating_add(bytes)
            .saturating_add(index(&d.runs) + align);
    }
    for s in r.sections().iter().filter(|s| !s.kind.is_image()) {
        total = total.saturating_add(s.logical_len);
    }
    Ok(total.saturating_add(largest_disk))
}

/// Bytes an unprivileged user may still write in the file system holding
/// `dir` (or its nearest existing ancestor).
fn free_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let c = std::ffi::CString::new(existing.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs only writes the zeroed struct it is given; `c` is a
    // NUL-terminated path that outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Refuse to expand `r` into `dir` when what it claims does not fit there
/// (a hostile file can claim terabytes in a few KiB).
fn check_expansion_space(r: &MachineReader, dir: &Path) -> Result<(), LinuxError> {
    let needs = expansion_bytes(r)?;
    let free = free_bytes(dir)?;
    if needs > free {
        return Err(LinuxError::NoSpace {
            dir: dir.to_owned(),
            needs_mib: needs.div_ceil(1 << 20),
            free_mib: free >> 20,
        });
    }
    Ok(())
}

/// Rewrite `r` uncompressed at `dest` (through the atomic writer), recording
/// `fingerprint` as its origin.
fn expand(r: &MachineReader, dest: &Path, fingerprint: &str) -> Result<(), LinuxError> {
    let mut w = MachineWriter::create(dest, r.arch())?;
    let mut manifest = r.manifest()?;
    manifest
        .extra
        .insert(EXPANDED_FROM.into(), fingerprint.to_owned());
    w.add_manifest(&manifest)?;
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
    let mem = crate::memory::GuestMemory::expanded(&sizes, |i, bytes| {
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
/// the file's identity and change time: any write to the file (or another
/// file in its place) changes the key, so only an untouched, already
/// verified file skips hashing on later runs.
struct VerifiedStamp(PathBuf);

impl VerifiedStamp {
    fn of(file: &std::fs::File) -> Option<VerifiedStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata().ok()?;
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

/// Whether the command gets a terminal: only when both stdin and stdout are
/// one, so `./app cmd > file` or `./app cmd | less` from a terminal gets
/// plain pipes (no CRLF line endings, no colours meant for a screen).
fn use_tty() -> bool {
    is_tty(0) && is_tty(1)
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

/// The terminal attributes to put back if a second signal ends smolvm while
/// the terminal is raw (read in the signal handler: set once, before raw
/// mode is entered).
static SAVED_TERMIOS: OnceLock<libc::termios> = OnceLock::new();
static RAW_ACTIVE: AtomicBool = AtomicBool::new(false);

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
        let _ = SAVED_TERMIOS.set(orig);
        // SAFETY: cfmakeraw edits the struct in place.
        unsafe { libc::cfmakeraw(&mut t) };
        RAW_ACTIVE.store(true, Ordering::SeqCst);
        // SAFETY: fd 0 and a valid termios.
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) } != 0 {
            RAW_ACTIVE.store(false, Ordering::SeqCst);
            return Err(io::Error::last_os_error());
        }
        Ok(RawMode(orig))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read in `enter`.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.0) };
        RAW_ACTIVE.store(false, Ordering::SeqCst);
    }
}

static RESIZED: AtomicBool = AtomicBool::new(false);
static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);
static SIGNALS_SEEN: AtomicI32 = AtomicI32::new(0);
/// Set when our stdout or stderr turned out to be a closed pipe.
static PIPE_BROKEN: AtomicBool = AtomicBool::new(false);

/// Signals passed on to the guest command.
const FORWARDED: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

extern "C" fn on_winch(_: libc::c_int) {
    RESIZED.store(true, Ordering::SeqCst);
}

extern "C" fn on_forwarded(sig: libc::c_int) {
    // The first signal goes to the guest command; a second one ends smolvm
    // (the guest may be unable to act on the first).
    if SIGNALS_SEEN.fetch_add(1, Ordering::SeqCst) >= 1 {
        if RAW_ACTIVE.load(Ordering::SeqCst) {
            if let Some(t) = SAVED_TERMIOS.get() {
                // SAFETY: tcsetattr is async-signal-safe; `t` was fully
                // written before RAW_ACTIVE was set.
                unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
            }
        }
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + sig) };
    }
    PENDING_SIGNAL.store(sig, Ordering::SeqCst);
}

fn install(sig: libc::c_int, handler: extern "C" fn(libc::c_int)) {
    // SAFETY: the handlers only touch atomics and call async-signal-safe
    // functions, and sigaction is given a zeroed, then filled, struct.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}

/// Copy a command's output stream to ours. When ours is a closed pipe
/// (`./app yes | head -1`) the command is sent SIGPIPE, as a native program
/// writing there would get, and the rest of its output is drained unseen
/// (its window must keep moving for it to reach its end).
fn copy_out(mut from: impl Read, to: &mut dyn Write) {
    let mut buf = vec![0u8; 64 << 10];
    let mut lost = false;
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) if lost => {}
            Ok(n) => {
                if let Err(e) = to.write_all(&buf[..n]).and_then(|_| to.flush()) {
                    lost = true;
                    if e.kind() == io::ErrorKind::BrokenPipe {
                        PIPE_BROKEN.store(true, Ordering::SeqCst);
                    }
                }
            }
        }
    }
}

/// Resume the (validated) machine of `plan`, run the command and return its
/// exit status; `name` names the machine in messages. A compressed machine
/// runs from its expanded copy (see [`mappable_plan`]).
pub fn run(plan: SnapshotPlan, name: &Path, opts: &RunOptions) -> Result<ExitStatus, LinuxError> {
    // The network first: the system call filters depend on it. They compile on a helper
    // thread while the machine is built and go on just before it runs.
    let net = net_for(&plan.manifest, &opts.net).map_err(LinuxError::Config)?;
    if net.is_some() {
        crate::seccomp::enable_network();
    }
    crate::seccomp::prepare();
    let plan = mappable_plan(plan)?;
    let manifest = plan.manifest.clone();
    let argv = command_for(&manifest, opts)?;
    let volumes = volumes_for(&manifest, &opts.volumes).map_err(LinuxError::Config)?;
    // Bound before anything runs: a busy port fails the start, and binding is not allowed
    // once the system call filters are on.
    let ports = super::publish::ports_for(&manifest, &opts.ports).map_err(LinuxError::Publish)?;
    let publisher = super::publish::Publisher::bind(&ports).map_err(LinuxError::Publish)?;
    let console = std::env::var_os("SMOLVM_CONSOLE")
        .filter(|v| v == "1")
        .map(|_| Box::new(io::stderr()) as super::console::ConsoleSink);
    let stamp = VerifiedStamp::of(plan.reader.file());
    let verified_before = stamp.as_ref().is_some_and(VerifiedStamp::is_recorded);
    let (mut m, pending) = resume_linux_start(
        plan,
        name,
        ResumeOptions {
            console,
            verify: !verified_before,
            seccomp: true,
            shares: volumes
                .iter()
                .map(|v| crate::devices::virtio::fs::ShareConfig {
                    host: v.host.clone(),
                    read_only: v.read_only,
                })
                .collect(),
            net: net.clone(),
            ..Default::default()
        },
    )?;
    let mounts: Vec<(String, bool)> = volumes
        .iter()
        .map(|v| (v.guest.clone(), v.read_only))
        .collect();
    m.mount_shares(&mounts)?;
    timing::mark("shares-mounted");
    m.net_up()?;
    if net.is_some() {
        timing::mark("network-up");
    }
    if !verified_before {
        if let Some(s) = &stamp {
            s.record();
        }
    }
    let tty = use_tty();
    let req = ExecRequest {
        argv,
        env: manifest.env.clone(),
        cwd: (!manifest.workdir.is_empty()).then(|| manifest.workdir.clone()),
        user: None,
        tty: tty.then(window_size),
    };
    // Sent right behind `Resume`, without waiting for its answer: the agent handles frames
    // in order, so the command starts after the clock, the entropy and the dropping of the
    // snapshot's execs, and the round trip is saved.
    let handle = m.agent().exec(req);
    timing::mark("exec-sent");
    m.finish_resume(pending)?;
    let forwarding = if publisher.is_empty() {
        None
    } else {
        Some(publisher.start(m.agent().port_connector())?)
    };
    timing::mark("ports-published");
    let status = match handle
        .map_err(LinuxError::from)
        .and_then(|h| run_exec(h, tty))
    {
        Ok(status) => status,
        // The guest ended under the command (`reboot`, `poweroff`, a panic).
        Err(e) if m.has_stopped() => match m.wait_exit(Duration::from_secs(5))? {
            Some(LinuxExit::Reboot) | Some(LinuxExit::PowerOff) => {
                if opts.save.is_some() {
                    return Err(LinuxError::Config(
                        "the guest shut down, so there is no machine left to save".into(),
                    ));
                }
                ExitStatus::Code(0)
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
            ExitStatus::Code(127)
        }
        Err(e) => return Err(e),
    };
    if let Some(out) = &opts.save {
        // Forwarded connections are cut off first: a saved machine holds no open stream.
        if let Some(f) = &forwarding {
            f.stop(Duration::from_secs(30))
                .map_err(LinuxError::Publish)?;
        }
        m.save(out, &manifest, Compression::None)?;
        timing::mark("machine-saved");
    }
    drop(m);
    timing::mark("machine-dropped");
    Ok(status)
}

fn run_exec(mut handle: ExecHandle, tty: bool) -> Result<ExitStatus, LinuxError> {
    let raw = if tty { RawMode::enter().ok() } else { None };
    install(libc::SIGWINCH, on_winch);
    // In raw mode the terminal sends Ctrl-C as a byte (the guest's terminal
    // turns it into SIGINT); these come from `kill`, a closed terminal, or
    // a cooked terminal when stdout is not one.
    for sig in FORWARDED {
        install(sig, on_forwarded);
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
            // End of our stdin is the end of the command's (`echo hi | ./app cat`).
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
        // Polls for the signal handlers' flags (a handler can only set a flag); woken
        // at once when the output has ended, so the run's end waits for no poll.
        let forwarder = s.spawn(|| {
            let mut piped = false;
            while !done.load(Ordering::SeqCst) {
                if RESIZED.swap(false, Ordering::SeqCst) && tty {
                    let _ = h.resize(window_size());
                }
                let sig = PENDING_SIGNAL.swap(0, Ordering::SeqCst);
                if sig != 0 {
                    let _ = h.signal(sig);
                }
                if !piped && PIPE_BROKEN.load(Ordering::SeqCst) {
                    piped = true;
                    let _ = h.signal(libc::SIGPIPE);
                }
                std::thread::park_timeout(Duration::from_millis(20));
            }
        });
        let _ = o.join();
        let _ = e.join();
        done.store(true, Ordering::SeqCst);
        forwarder.thread().unpark();
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
    fn manifest_network_is_the_default() {
        use crate::net::NetRequest;
        let allow = |m: &Manifest, r: NetRequest| {
            net_for(m, &r)
                .unwrap()
                .map(|n| n.allow.0.iter().map(|r| r.to_string()).collect::<Vec<_>>())
        };
        let none = Manifest::default();
        assert_eq!(allow(&none, NetRequest::Default), None);
        assert_eq!(allow(&none, NetRequest::On), Some(vec![]));
        let mut all = Manifest::default();
        all.extra.insert("network".into(), "on".into());
        assert_eq!(allow(&all, NetRequest::Default), Some(vec![]));
        assert_eq!(allow(&all, NetRequest::Off), None);
        let mut some = all.clone();
        some.extra
            .insert("network.allow".into(), "127.0.0.1:8080,10.0.0.0/8".into());
        let list = vec!["127.0.0.1/32:8080".to_string(), "10.0.0.0/8".to_string()];
        assert_eq!(allow(&some, NetRequest::Default), Some(list.clone()));
        assert_eq!(allow(&some, NetRequest::On), Some(list));
        let rule = crate::net::parse_allow("127.0.0.1:9").unwrap();
        assert_eq!(
            allow(&some, NetRequest::Allow(vec![rule])),
            Some(vec!["127.0.0.1/32:9".to_string()])
        );
        let mut bad = all.clone();
        bad.extra.insert("network".into(), "yes".into());
        let e = net_for(&bad, &NetRequest::Default).unwrap_err();
        assert_eq!(e, "the machine's manifest: bad network 'yes' (expected on)");
        bad.extra.insert("network".into(), "on".into());
        bad.extra.insert("network.allow".into(), "x".into());
        assert!(net_for(&bad, &NetRequest::Default)
            .unwrap_err()
            .starts_with("the machine's manifest: bad --net-allow 'x'"));
    }

    #[test]
    fn manifest_volumes_give_modes_and_default_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let mut m = Manifest::default();
        for (k, v) in [
            ("volume.0.path", "/src"),
            ("volume.0.mode", "rw"),
            ("volume.1.path", "/data"),
            ("volume.1.mode", "ro"),
            ("volume.1.host", d.as_str()),
        ] {
            m.extra.insert(k.into(), v.into());
        }
        // No mode in the spec: the Smolfile's rw applies; /data is added.
        let given = vec![parse_volume(&format!("{d}:/src")).unwrap()];
        let v = volumes_for(&m, &given).unwrap();
        assert_eq!(v.len(), 2);
        assert!(!v[0].read_only);
        assert_eq!((v[1].guest.as_str(), v[1].read_only), ("/data", true));
        // An explicit mode wins; a caller's share of /data replaces the default.
        let given = vec![
            parse_volume(&format!("{d}:/src:ro")).unwrap(),
            parse_volume(&format!("{d}:/data:rw")).unwrap(),
        ];
        let v = volumes_for(&m, &given).unwrap();
        assert_eq!(v.len(), 2);
        assert!(v[0].read_only && !v[1].read_only);
        assert!(volumes_for(&Manifest::default(), &[]).unwrap().is_empty());
    }

    /// A compressed machine with 64 KiB of memory and a 1 MiB disk, each with a
    /// little data.
    fn small_compressed(path: &Path) {
        let dir = path.parent().unwrap();
        let mut mem = vec![0u8; 16 * 4096];
        mem[4096..8192].fill(7);
        let disk = dir.join("disk");
        let mut d = vec![0u8; 1 << 20];
        d[..4096].fill(9);
        std::fs::write(&disk, &d).unwrap();
        let mut w = MachineWriter::create(path, smolvm_formats::Arch::X86_64).unwrap();
        w.add_manifest(&Manifest::default()).unwrap();
        w.add_blob(SectionKind::VmState, b"state", Compression::Zstd)
            .unwrap();
        w.add_memory(
            &[GuestRegion {
                guest_addr: 0,
                data: &mem,
            }],
            Compression::Zstd,
        )
        .unwrap();
        w.add_disk(
            "root",
            &mut std::fs::File::open(&disk).unwrap(),
            Compression::Zstd,
        )
        .unwrap();
        w.finish().unwrap();
    }

    #[test]
    fn expansion_needs_the_space_the_file_claims() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("m.smolmachine");
        small_compressed(&m);
        let cache = dir.path().join("cache").join("expanded");
        let r = MachineReader::open(&m).unwrap();
        let needs = expansion_bytes(&r).unwrap();
        // Two data granules, the disk's twice, plus bounded overhead.
        assert!((3 * 4096..4 << 20).contains(&needs), "{needs}");
        check_expansion_space(&r, &cache).unwrap();

        // The same few KiB claiming a 1 TiB disk full of data.
        let mut bytes = std::fs::read(&m).unwrap();
        smolvm_formats::testing::inflate(&mut bytes, SectionKind::Disk, 1 << 40, true);
        std::fs::write(&m, &bytes).unwrap();
        let r = MachineReader::open(&m).unwrap();
        let err = check_expansion_space(&r, &cache).unwrap_err().to_string();
        // (The free space itself moves with whatever else writes to the disk.)
        let want = format!(
            "not enough free space in {} to expand the machine: needs {} MiB, ",
            cache.display(),
            expansion_bytes(&r).unwrap().div_ceil(1 << 20),
        );
        assert!(
            err.starts_with(&want) && err.contains(" MiB free; "),
            "{err}"
        );
        assert!(expansion_bytes(&r).unwrap() > 2 << 40);
        assert!(!cache.exists(), "the check wrote to the cache");
    }

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
