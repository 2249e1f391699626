//! The Smolfile: a TOML file declaring a machine (base image, files, setup commands,
//! services left running in the snapshot, environment, default command, resources).
//!
//! Parsing is two steps: serde with `deny_unknown_fields` into raw types whose fields keep
//! their source spans (`toml::Spanned`), then validation into [`Smolfile`]. Both steps
//! report `FILE:LINE:COLUMN: message`, so every mistake names the line to fix.
//! See `docs/SMOLFILE.md` for the reference.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use smolvm::arch::cpu_model::CpuModel;
use toml::Spanned;

pub use smolvm_rootfs::Base;

/// Default guest memory: 256 MiB.
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// Default readiness timeout of a service.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The Debian suite used when `suite` is not given.
pub const DEFAULT_DEBIAN_SUITE: &str = "bookworm";

const MIB: u64 = 1 << 20;
const MIN_MEMORY: u64 = 32 * MIB;
const MAX_MEMORY: u64 = 1 << 40;
const MIN_DISK: u64 = 16 * MIB;
const MAX_DISK: u64 = 2 << 40;
const MAX_VCPUS: i64 = 64;
const MAX_READY_TIMEOUT: Duration = Duration::from_secs(3600);

/// A Smolfile that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SmolfileError {
    /// A syntax, type or validation error at a place in the file.
    #[error("{file}:{line}:{column}: {message}")]
    At {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// The file could not be read.
    #[error("cannot read {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
}

impl SmolfileError {
    /// The 1-based line the error points at, when it points at one.
    pub fn line(&self) -> Option<usize> {
        match self {
            SmolfileError::At { line, .. } => Some(*line),
            SmolfileError::Read { .. } => None,
        }
    }
}

/// A parsed and validated Smolfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Smolfile {
    /// The machine's name.
    pub name: String,
    /// The directory relative host paths were resolved against.
    pub dir: PathBuf,
    /// What the root filesystem is made of (host paths absolute).
    pub base: Base,
    /// vCPUs, memory and disk size.
    pub resources: Resources,
    /// Host files and directories copied into the image, in order.
    pub copies: Vec<Copy>,
    /// Commands run in the booted machine at build time, in order.
    pub setup: Vec<Step>,
    /// Processes started at build time and left running in the snapshot, in order.
    pub services: Vec<Service>,
    /// Environment of setup steps, services and the run command.
    pub env: BTreeMap<String, String>,
    /// What `smolvm run` executes.
    pub run: Run,
    /// `[[volume]]`: host directories the machine expects shared at run time.
    pub volumes: Vec<Volume>,
    /// `[[port]]`: guest ports published by default when the machine runs.
    pub ports: Vec<Port>,
    /// `[network]`: the machine runs with the user-mode network by default (`None`: off),
    /// limited to these `--net-allow` specs (empty: every destination).
    pub network: Option<Vec<String>>,
}

/// A `[[port]]`: a guest TCP port published on the host whenever the machine runs (unless
/// the caller publishes that guest port itself with `-p`/`SMOLVM_PUBLISH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// Guest port (connections go to the guest's 127.0.0.1:guest).
    pub guest: u16,
    /// Host port (default: the guest port).
    pub host: u16,
    /// Host address to listen on (default 127.0.0.1).
    pub address: std::net::IpAddr,
    /// Line in the Smolfile.
    pub line: usize,
}

impl Port {
    /// The mapping as `smolvm run -p` takes it: `ADDRESS:HOST:GUEST`.
    pub fn spec(&self) -> String {
        format!(
            "{}:{}",
            std::net::SocketAddr::new(self.address, self.host),
            self.guest
        )
    }
}

/// A `[[volume]]`: where the machine expects a shared host directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// Guest path.
    pub path: String,
    /// Default mode for a `-v`/`SMOLVM_VOLUME` spec without `:ro|:rw`.
    pub read_only: bool,
    /// Host directory shared when the caller gives none for `path`, relative
    /// to the working directory of the run (`"."`: where the executable runs).
    pub host: Option<String>,
    /// Line in the Smolfile.
    pub line: usize,
}

/// Machine resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    /// Virtual CPUs (1..=64).
    pub vcpus: u32,
    /// Guest memory in bytes (a whole number of MiB).
    pub memory: u64,
    /// Root disk size in bytes; `None` sizes it from the content.
    pub disk_size: Option<u64>,
    /// The CPU model the guest is shown.
    pub cpu: CpuModel,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            vcpus: 1,
            memory: DEFAULT_MEMORY,
            disk_size: None,
            cpu: CpuModel::default(),
        }
    }
}

/// One `[[copy]]`: a host path copied into the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    /// Absolute host path.
    pub from: PathBuf,
    /// Absolute guest path (a trailing `/` means "into this directory").
    pub to: PathBuf,
    /// Line of the entry in the Smolfile.
    pub line: usize,
}

/// One `[[setup]]` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The argv (a string in the file becomes `/bin/sh -c STRING`).
    pub run: Vec<String>,
    /// Working directory (absolute guest path); `None` is `/`.
    pub workdir: Option<String>,
    /// Extra environment over the file's `[env]`.
    pub env: BTreeMap<String, String>,
    /// Line of the entry in the Smolfile.
    pub line: usize,
}

/// One `[[service]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Unique name.
    pub name: String,
    /// The argv (a string in the file becomes `/bin/sh -c STRING`).
    pub run: Vec<String>,
    /// Working directory (absolute guest path); `None` is `/`.
    pub workdir: Option<String>,
    /// Extra environment over the file's `[env]`.
    pub env: BTreeMap<String, String>,
    /// How the build knows the service is ready before the snapshot; `None`: once started.
    pub ready: Option<Ready>,
    /// Line of the entry in the Smolfile.
    pub line: usize,
}

/// A readiness probe and how long to wait for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// What to check.
    pub probe: Probe,
    /// How long to keep checking before the build fails.
    pub timeout: Duration,
}

/// What a readiness probe checks in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A TCP connection to 127.0.0.1:PORT succeeds.
    Tcp(u16),
    /// The guest path exists (a socket, a pid file).
    File(String),
    /// The command exits with status 0.
    Exec(Vec<String>),
}

/// The default command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Run {
    /// Working directory (absolute guest path); `None` is `/`.
    pub workdir: Option<String>,
    /// Prepended to the command.
    pub entrypoint: Vec<String>,
    /// The default command, replaced by arguments given to `smolvm run`.
    pub cmd: Vec<String>,
    /// `warm`: start the entrypoint at build time and snapshot it waiting for its run.
    pub warm: Option<Warm>,
}

/// How a warm entrypoint waits for its run (docs/WARM.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmKind {
    /// `warm = true` (or `"stdin"`): transparent, ready once it blocks reading its stdin.
    Stdin,
    /// `warm = "invoke"`: the invocation protocol.
    Invoke,
}

/// `[run] warm` and `warm_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Warm {
    pub kind: WarmKind,
    /// How long the build waits for it to be ready.
    pub timeout: Duration,
    /// The line of the `warm` key.
    pub line: usize,
}

/// How long a build waits for a warm entrypoint by default.
pub const DEFAULT_WARM_TIMEOUT: Duration = Duration::from_secs(120);

impl Run {
    /// The argv to execute: entrypoint followed by `args`, or by the default command when
    /// `args` is empty.
    pub fn argv(&self, args: &[String]) -> Vec<String> {
        let tail = if args.is_empty() { &self.cmd } else { args };
        self.entrypoint.iter().chain(tail).cloned().collect()
    }
}

impl Smolfile {
    /// Reads and validates the Smolfile at `path`; relative paths in it resolve against its
    /// directory.
    pub fn load(path: &Path) -> Result<Smolfile, SmolfileError> {
        let text = std::fs::read_to_string(path).map_err(|error| SmolfileError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
        let dir = match dir {
            Some(d) => d.to_path_buf(),
            None => PathBuf::from("."),
        };
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        Smolfile::parse(&text, &dir, &path.display().to_string())
    }

    /// Validates Smolfile text; `dir` resolves relative host paths and `file` names the
    /// source in error messages.
    pub fn parse(text: &str, dir: &Path, file: &str) -> Result<Smolfile, SmolfileError> {
        let cx = Cx { text, file, dir };
        let raw: RawSmolfile = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            cx.err(span, e.message().trim_end().to_string())
        })?;
        cx.validate(raw)
    }

    /// Fills what the Smolfile leaves unset from an OCI image's configuration, the way
    /// `docker run` would: image `Env` entries for names `[env]` does not set, `WorkingDir`
    /// when `[run] workdir` is unset, and `Entrypoint`/`Cmd` unless `[run]` sets them
    /// (setting `entrypoint` drops the image's `Cmd`, as Docker does).
    pub fn apply_image_defaults(&mut self, image: &smolvm_rootfs::OciConfig) {
        for entry in &image.env {
            if let Some((k, v)) = entry.split_once('=') {
                self.env
                    .entry(k.to_string())
                    .or_insert_with(|| v.to_string());
            }
        }
        if self.run.workdir.is_none() && image.workdir.starts_with('/') {
            self.run.workdir = Some(image.workdir.clone());
        }
        if self.run.entrypoint.is_empty() {
            self.run.entrypoint = image.entrypoint.clone();
            if self.run.cmd.is_empty() {
                self.run.cmd = image.cmd.clone();
            }
        }
    }

    /// The root filesystem spec for this machine, with `agent` as `/sbin/init`.
    pub fn rootfs_spec(&self, agent: impl Into<PathBuf>) -> smolvm_rootfs::RootfsSpec {
        smolvm_rootfs::RootfsSpec {
            base: self.base.clone(),
            copies: self
                .copies
                .iter()
                .map(|c| (c.from.clone(), c.to.clone()))
                .collect(),
            agent: agent.into(),
            size: self.resources.disk_size,
        }
    }
}

// ---- raw, span-carrying form ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSmolfile {
    name: Spanned<String>,
    base: Spanned<RawBase>,
    #[serde(default)]
    resources: Option<RawResources>,
    #[serde(default)]
    copy: Vec<Spanned<RawCopy>>,
    #[serde(default)]
    setup: Vec<Spanned<RawStep>>,
    #[serde(default)]
    service: Vec<Spanned<RawService>>,
    #[serde(default)]
    env: Option<RawEnv>,
    #[serde(default)]
    run: Option<RawRun>,
    #[serde(default)]
    volume: Vec<Spanned<RawVolume>>,
    #[serde(default)]
    port: Vec<Spanned<RawPort>>,
    #[serde(default)]
    network: Option<Spanned<RawNetwork>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    #[serde(default)]
    enabled: Option<Spanned<toml::Value>>,
    #[serde(default)]
    allow: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    guest: Spanned<i64>,
    host: Option<Spanned<i64>>,
    address: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    path: Spanned<String>,
    mode: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBase {
    #[serde(rename = "type")]
    kind: Spanned<String>,
    suite: Option<Spanned<String>>,
    packages: Option<Spanned<Vec<Spanned<String>>>>,
    archive: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResources {
    vcpus: Option<Spanned<i64>>,
    memory: Option<Spanned<toml::Value>>,
    disk_size: Option<Spanned<toml::Value>>,
    cpu: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCopy {
    from: Spanned<String>,
    to: Spanned<String>,
}

type RawEnv = BTreeMap<Spanned<String>, Spanned<String>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    run: Spanned<Argv>,
    workdir: Option<Spanned<String>>,
    env: Option<RawEnv>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    run: Spanned<Argv>,
    workdir: Option<Spanned<String>>,
    env: Option<RawEnv>,
    ready: Option<Spanned<RawReady>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReady {
    tcp: Option<Spanned<i64>>,
    file: Option<Spanned<String>>,
    exec: Option<Spanned<Argv>>,
    timeout: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRun {
    workdir: Option<Spanned<String>>,
    entrypoint: Option<Spanned<Argv>>,
    cmd: Option<Spanned<Argv>>,
    warm: Option<Spanned<toml::Value>>,
    warm_timeout: Option<Spanned<toml::Value>>,
}

/// A command: an array of strings, or a string run by `/bin/sh -c`.
struct Argv(Vec<String>);

impl<'de> Deserialize<'de> for Argv {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Argv;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of strings or a shell command string")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Argv, E> {
                Ok(Argv(vec!["/bin/sh".into(), "-c".into(), s.into()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Argv, A::Error> {
                let mut v = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    v.push(s);
                }
                Ok(Argv(v))
            }
        }
        d.deserialize_any(V)
    }
}

// ---- validation ----

struct Cx<'a> {
    text: &'a str,
    file: &'a str,
    dir: &'a Path,
}

type R<T> = Result<T, SmolfileError>;

impl Cx<'_> {
    /// 1-based line and column of a byte offset.
    fn position(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (line, before[line_start..].chars().count() + 1)
    }

    fn line(&self, span: &Range<usize>) -> usize {
        self.position(span.start).0
    }

    fn err(&self, span: Range<usize>, message: impl Into<String>) -> SmolfileError {
        let (line, column) = self.position(span.start);
        SmolfileError::At {
            file: self.file.to_string(),
            line,
            column,
            message: message.into(),
        }
    }

    fn validate(&self, raw: RawSmolfile) -> R<Smolfile> {
        let name = self.name(&raw.name, "machine name")?;
        let base = self.base(&raw.base)?;
        let resources = match &raw.resources {
            Some(r) => self.resources(r)?,
            None => Resources::default(),
        };
        let copies = raw
            .copy
            .iter()
            .map(|c| {
                let inner = c.get_ref();
                Ok(Copy {
                    from: self.host_path(&inner.from, "copy source")?,
                    to: PathBuf::from(self.guest_path(&inner.to)?),
                    line: self.line(&c.span()),
                })
            })
            .collect::<R<_>>()?;
        let setup = raw
            .setup
            .iter()
            .map(|s| {
                let inner = s.get_ref();
                Ok(Step {
                    run: self.argv(&inner.run, "run")?,
                    workdir: self.opt_guest_path(&inner.workdir)?,
                    env: self.env(&inner.env)?,
                    line: self.line(&s.span()),
                })
            })
            .collect::<R<_>>()?;
        let mut names = HashSet::new();
        let services = raw
            .service
            .iter()
            .map(|s| {
                let inner = s.get_ref();
                let name = self.name(&inner.name, "service name")?;
                if !names.insert(name.clone()) {
                    return Err(self.err(
                        inner.name.span(),
                        format!("service name {name:?} is used twice; names must be unique"),
                    ));
                }
                Ok(Service {
                    name,
                    run: self.argv(&inner.run, "run")?,
                    workdir: self.opt_guest_path(&inner.workdir)?,
                    env: self.env(&inner.env)?,
                    ready: inner.ready.as_ref().map(|r| self.ready(r)).transpose()?,
                    line: self.line(&s.span()),
                })
            })
            .collect::<R<_>>()?;
        let env = self.env(&raw.env)?;
        let run = match &raw.run {
            Some(r) => Run {
                workdir: self.opt_guest_path(&r.workdir)?,
                entrypoint: self.opt_argv(&r.entrypoint, "entrypoint")?,
                cmd: self.opt_argv(&r.cmd, "cmd")?,
                warm: self.warm(r)?,
            },
            None => Run::default(),
        };
        let mut paths = HashSet::new();
        let volumes = raw
            .volume
            .iter()
            .map(|v| {
                let inner = v.get_ref();
                let path = self.guest_path(&inner.path)?;
                let path = path.trim_end_matches('/').to_string();
                if path.is_empty() || path.split('/').any(|c| c == "..") {
                    return Err(self.err(
                        inner.path.span(),
                        "a volume path must be absolute, not '/', and without '..'",
                    ));
                }
                if !paths.insert(path.clone()) {
                    return Err(self.err(
                        inner.path.span(),
                        format!("volume path {path:?} is used twice"),
                    ));
                }
                let read_only = match inner.mode.as_ref().map(|m| m.get_ref().as_str()) {
                    None | Some("ro") => true,
                    Some("rw") => false,
                    Some(_) => {
                        let m = inner.mode.as_ref().map(|m| m.span()).unwrap_or_default();
                        return Err(self.err(m, "volume mode must be \"ro\" or \"rw\""));
                    }
                };
                let host = inner.host.as_ref().map(|h| h.get_ref().clone());
                if host
                    .as_deref()
                    .is_some_and(|h| h.is_empty() || h.contains(','))
                {
                    let span = inner.host.as_ref().map(|h| h.span()).unwrap_or_default();
                    return Err(self.err(span, "volume host must be a non-empty path without ','"));
                }
                Ok(Volume {
                    path,
                    read_only,
                    host,
                    line: self.line(&v.span()),
                })
            })
            .collect::<R<_>>()?;
        let mut host_ports = HashSet::new();
        let ports = raw
            .port
            .iter()
            .map(|p| {
                let inner = p.get_ref();
                let num = |v: &Spanned<i64>, what: &str| -> R<u16> {
                    u16::try_from(*v.get_ref())
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| self.err(v.span(), format!("{what} must be 1-65535")))
                };
                let guest = num(&inner.guest, "port guest")?;
                let host = match &inner.host {
                    Some(h) => num(h, "port host")?,
                    None => guest,
                };
                let address = match &inner.address {
                    Some(a) => a.get_ref().parse().map_err(|_| {
                        self.err(
                            a.span(),
                            "port address must be an IP address, as \"0.0.0.0\"",
                        )
                    })?,
                    None => std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                };
                if !host_ports.insert((address, host)) {
                    return Err(self.err(p.span(), format!("host port {host} is published twice")));
                }
                Ok(Port {
                    guest,
                    host,
                    address,
                    line: self.line(&p.span()),
                })
            })
            .collect::<R<_>>()?;
        // `[network]`: every allow entry checked as `--net-allow` checks it (so a bad one
        // fails the build, not every run); `enabled = false` keeps the network off.
        let network = match &raw.network {
            None => None,
            Some(n) => {
                let n = n.get_ref();
                let enabled = match &n.enabled {
                    None => None,
                    Some(e) => match e.get_ref() {
                        toml::Value::Boolean(b) => Some((*b, e.span())),
                        _ => {
                            return Err(
                                self.err(e.span(), "[network] enabled must be true or false")
                            )
                        }
                    },
                };
                let allow_err = |span| {
                    self.err(
                        span,
                        "[network] allow must be an array of strings, as [\"127.0.0.1:8080\"]",
                    )
                };
                let allow = match &n.allow {
                    None => Vec::new(),
                    Some(a) => {
                        let toml::Value::Array(items) = a.get_ref() else {
                            return Err(allow_err(a.span()));
                        };
                        items
                            .iter()
                            .map(|v| {
                                let spec = v.as_str().ok_or_else(|| allow_err(a.span()))?;
                                smolvm::net::parse_allow(spec)
                                    .map(|_| spec.to_string())
                                    .map_err(|e| {
                                        self.err(a.span(), format!("[network] allow: {e}"))
                                    })
                            })
                            .collect::<R<Vec<_>>>()?
                    }
                };
                match enabled {
                    Some((false, span)) if !allow.is_empty() => {
                        return Err(self.err(
                            span,
                            "[network] enabled = false with an allow list: drop one of them",
                        ))
                    }
                    Some((false, _)) => None,
                    _ => Some(allow),
                }
            }
        };
        Ok(Smolfile {
            ports,
            network,
            name,
            dir: self.dir.to_path_buf(),
            base,
            resources,
            copies,
            setup,
            services,
            env,
            run,
            volumes,
        })
    }

    fn name(&self, v: &Spanned<String>, what: &str) -> R<String> {
        let s = v.get_ref();
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !ok {
            return Err(self.err(
                v.span(),
                format!(
                    "{what} {s:?} is invalid: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
                ),
            ));
        }
        Ok(s.clone())
    }

    fn base(&self, b: &Spanned<RawBase>) -> R<Base> {
        let raw = b.get_ref();
        let kind = raw.kind.get_ref().as_str();
        let only = |field: &str, span: Range<usize>, owner: &str| {
            self.err(
                span,
                format!("`{field}` applies only to type = \"{owner}\", not \"{kind}\""),
            )
        };
        let need =
            |field: &str| self.err(b.span(), format!("base type \"{kind}\" needs `{field}`"));
        if kind != "debian" {
            if let Some(s) = &raw.suite {
                return Err(only("suite", s.span(), "debian"));
            }
            if let Some(p) = &raw.packages {
                return Err(only("packages", p.span(), "debian"));
            }
        }
        if kind != "oci" {
            if let Some(a) = &raw.archive {
                return Err(only("archive", a.span(), "oci"));
            }
        }
        if kind != "dir" {
            if let Some(p) = &raw.path {
                return Err(only("path", p.span(), "dir"));
            }
        }
        match kind {
            "busybox" => Ok(Base::Busybox),
            "debian" => {
                let suite = match &raw.suite {
                    Some(s) => {
                        self.debian_name(s, "suite")?;
                        s.get_ref().clone()
                    }
                    None => DEFAULT_DEBIAN_SUITE.to_string(),
                };
                let mut packages = Vec::new();
                for p in raw.packages.iter().flat_map(|p| p.get_ref()) {
                    self.debian_name(p, "package name")?;
                    packages.push(p.get_ref().clone());
                }
                Ok(Base::Debian { suite, packages })
            }
            "oci" => {
                let a = raw.archive.as_ref().ok_or_else(|| need("archive"))?;
                Ok(Base::Oci {
                    archive: self.host_path(a, "OCI archive")?,
                })
            }
            "dir" => {
                let p = raw.path.as_ref().ok_or_else(|| need("path"))?;
                let path = self.host_path(p, "base directory")?;
                if !path.is_dir() {
                    return Err(self.err(
                        p.span(),
                        format!("base directory {} is not a directory", path.display()),
                    ));
                }
                Ok(Base::Dir { path })
            }
            other => Err(self.err(
                raw.kind.span(),
                format!(
                    "unknown base type {other:?}; expected \"busybox\", \"debian\", \"oci\" or \"dir\""
                ),
            )),
        }
    }

    fn debian_name(&self, v: &Spanned<String>, what: &str) -> R<()> {
        let s = v.get_ref();
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
        if !ok {
            return Err(self.err(
                v.span(),
                format!("invalid Debian {what} {s:?}: use lowercase letters, digits and . + -"),
            ));
        }
        Ok(())
    }

    fn resources(&self, r: &RawResources) -> R<Resources> {
        let mut out = Resources::default();
        if let Some(v) = &r.vcpus {
            let n = *v.get_ref();
            if !(1..=MAX_VCPUS).contains(&n) {
                return Err(self.err(
                    v.span(),
                    format!("vcpus = {n} is out of range; use 1 to {MAX_VCPUS}"),
                ));
            }
            out.vcpus = n as u32;
        }
        if let Some(v) = &r.memory {
            let bytes = self.size(v, "memory")?;
            if !(MIN_MEMORY..=MAX_MEMORY).contains(&bytes) || !bytes.is_multiple_of(MIB) {
                return Err(self.err(
                    v.span(),
                    "memory must be a whole number of MiB from 32M to 1T".to_string(),
                ));
            }
            out.memory = bytes;
        }
        if let Some(v) = &r.disk_size {
            let bytes = self.size(v, "disk_size")?;
            if !(MIN_DISK..=MAX_DISK).contains(&bytes) || !bytes.is_multiple_of(4096) {
                return Err(self.err(
                    v.span(),
                    "disk_size must be a multiple of 4K from 16M to 2T".to_string(),
                ));
            }
            out.disk_size = Some(bytes);
        }
        if let Some(v) = &r.cpu {
            out.cpu =
                CpuModel::parse(v.get_ref()).map_err(|e| self.err(v.span(), e.to_string()))?;
        }
        Ok(out)
    }

    fn size(&self, v: &Spanned<toml::Value>, what: &str) -> R<u64> {
        match v.get_ref() {
            toml::Value::String(s) => {
                parse_size(s).map_err(|m| self.err(v.span(), format!("{what} = {s:?}: {m}")))
            }
            toml::Value::Integer(n) => Err(self.err(
                v.span(),
                format!("{what} = {n} has no unit; write it as a string with one, e.g. \"{n}M\""),
            )),
            other => Err(self.err(
                v.span(),
                format!(
                    "{what} must be a size string such as \"256M\", not a {}",
                    other.type_str()
                ),
            )),
        }
    }

    fn host_path(&self, v: &Spanned<String>, what: &str) -> R<PathBuf> {
        let s = v.get_ref();
        if s.is_empty() || s.contains('\0') {
            return Err(self.err(v.span(), format!("{what} path is empty or contains NUL")));
        }
        let path = self.dir.join(s);
        if std::fs::symlink_metadata(&path).is_err() {
            return Err(self.err(
                v.span(),
                format!(
                    "{what} {} does not exist (relative paths start at the Smolfile's directory)",
                    path.display()
                ),
            ));
        }
        Ok(path)
    }

    fn guest_path(&self, v: &Spanned<String>) -> R<String> {
        let s = v.get_ref();
        let bad = |m: &str| self.err(v.span(), format!("guest path {s:?} {m}"));
        if !s.starts_with('/') {
            return Err(bad("must be absolute (start with '/')"));
        }
        if s.contains('\0') {
            return Err(bad("contains NUL"));
        }
        if Path::new(s).components().any(|c| c == Component::ParentDir) {
            return Err(bad("must not contain '..'"));
        }
        Ok(s.clone())
    }

    fn opt_guest_path(&self, v: &Option<Spanned<String>>) -> R<Option<String>> {
        v.as_ref().map(|p| self.guest_path(p)).transpose()
    }

    fn argv(&self, v: &Spanned<Argv>, what: &str) -> R<Vec<String>> {
        let argv = &v.get_ref().0;
        if argv.is_empty() || argv[0].is_empty() {
            return Err(self.err(
                v.span(),
                format!(
                    "`{what}` needs a command: a non-empty array whose first item is the program"
                ),
            ));
        }
        if argv.iter().any(|a| a.contains('\0')) {
            return Err(self.err(v.span(), format!("`{what}` contains NUL")));
        }
        Ok(argv.clone())
    }

    fn opt_argv(&self, v: &Option<Spanned<Argv>>, what: &str) -> R<Vec<String>> {
        match v {
            // An explicitly empty array means "none".
            Some(a) if a.get_ref().0.is_empty() => Ok(Vec::new()),
            Some(a) => self.argv(a, what),
            None => Ok(Vec::new()),
        }
    }

    fn env(&self, env: &Option<RawEnv>) -> R<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        for (k, v) in env.iter().flatten() {
            let key = k.get_ref();
            let ok = key
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                return Err(self.err(
                    k.span(),
                    format!("environment name {key:?} is invalid: use letters, digits and '_', not starting with a digit"),
                ));
            }
            if v.get_ref().contains('\0') {
                return Err(self.err(v.span(), format!("the value of {key} contains NUL")));
            }
            out.insert(key.clone(), v.get_ref().clone());
        }
        Ok(out)
    }

    fn ready(&self, r: &Spanned<RawReady>) -> R<Ready> {
        let raw = r.get_ref();
        let mut probes = Vec::new();
        if let Some(t) = &raw.tcp {
            let port = *t.get_ref();
            let port = u16::try_from(port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    self.err(
                        t.span(),
                        format!("tcp port {port} is out of range; use 1 to 65535"),
                    )
                })?;
            probes.push(Probe::Tcp(port));
        }
        if let Some(f) = &raw.file {
            probes.push(Probe::File(self.guest_path(f)?));
        }
        if let Some(e) = &raw.exec {
            probes.push(Probe::Exec(self.argv(e, "exec")?));
        }
        if probes.len() != 1 {
            return Err(self.err(
                r.span(),
                "`ready` needs exactly one of `tcp`, `file` or `exec`".to_string(),
            ));
        }
        let timeout = match &raw.timeout {
            Some(t) => self.timeout(t, "timeout")?,
            None => DEFAULT_READY_TIMEOUT,
        };
        Ok(Ready {
            probe: probes.remove(0),
            timeout,
        })
    }

    /// A timeout value: a duration string or whole seconds, more than zero, at most 1h.
    fn timeout(&self, t: &Spanned<toml::Value>, key: &str) -> R<Duration> {
        let d = match t.get_ref() {
            toml::Value::Integer(n) if *n > 0 => Ok(Duration::from_secs(*n as u64)),
            toml::Value::String(s) => parse_duration(s),
            _ => Err("use a duration such as \"30s\", \"500ms\" or \"2m\"".to_string()),
        }
        .map_err(|m| self.err(t.span(), format!("{key}: {m}")))?;
        if d.is_zero() || d > MAX_READY_TIMEOUT {
            return Err(self.err(
                t.span(),
                format!("{key} must be more than zero and at most 1h"),
            ));
        }
        Ok(d)
    }

    /// `[run] warm` (`true`, `false`, `"stdin"` or `"invoke"`) and `warm_timeout`.
    fn warm(&self, r: &RawRun) -> R<Option<Warm>> {
        let kind = match &r.warm {
            None => None,
            Some(w) => match w.get_ref() {
                toml::Value::Boolean(false) => None,
                toml::Value::Boolean(true) => Some(WarmKind::Stdin),
                toml::Value::String(s) if s == "stdin" => Some(WarmKind::Stdin),
                toml::Value::String(s) if s == "invoke" => Some(WarmKind::Invoke),
                _ => {
                    return Err(self.err(
                        w.span(),
                        "warm must be true, false, \"stdin\" or \"invoke\"",
                    ))
                }
            },
        };
        let timeout = match &r.warm_timeout {
            Some(t) if kind.is_none() => {
                return Err(self.err(t.span(), "warm_timeout needs `warm = true` or \"invoke\""))
            }
            Some(t) => self.timeout(t, "warm_timeout")?,
            None => DEFAULT_WARM_TIMEOUT,
        };
        Ok(match (kind, &r.warm) {
            (Some(kind), Some(w)) => Some(Warm {
                kind,
                timeout,
                line: self.line(&w.span()),
            }),
            _ => None,
        })
    }
}

/// Parses a size such as `"256M"`, `"1GiB"`, `"512k"` or `"4096"` (bytes). Units are
/// binary and case-insensitive: K/KB/KiB = 1024, M = 1024², G = 1024³, T = 1024⁴.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err("expected a number with an optional unit, e.g. \"256M\"".into());
    }
    let n: u64 = s[..digits]
        .parse()
        .map_err(|_| "number too large".to_string())?;
    let unit = s[digits..].trim().to_ascii_lowercase();
    let shift = match unit.as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("unknown unit {unit:?}; use K, M, G or T")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| "size too large".to_string())
}

/// Parses a duration such as `"30s"`, `"500ms"`, `"2m"` or `"1h"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let n: u64 = s[..digits]
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as \"30s\""))?;
    let d = match &s[digits..] {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        u => return Err(format!("unknown unit {u:?} in {s:?}; use ms, s, m or h")),
    };
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with_app() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("app")).unwrap();
        std::fs::write(t.path().join("app/index.html"), "hi").unwrap();
        std::fs::write(t.path().join("img.tar"), "").unwrap();
        t
    }

    #[test]
    fn warm_keys() {
        let base = "name = \"w\"\n[base]\ntype = \"busybox\"\n[run]\nentrypoint = [\"cat\"]\n";
        let s = parse(&format!("{base}warm = true\nwarm_timeout = \"5s\"\n")).unwrap();
        assert_eq!(
            s.run.warm,
            Some(Warm {
                kind: WarmKind::Stdin,
                timeout: Duration::from_secs(5),
                line: 6
            })
        );
        let s = parse(&format!("{base}warm = \"invoke\"\n")).unwrap();
        let w = s.run.warm.unwrap();
        assert_eq!(
            (w.kind, w.timeout),
            (WarmKind::Invoke, DEFAULT_WARM_TIMEOUT)
        );
        assert_eq!(
            parse(&format!("{base}warm = \"stdin\"\n"))
                .unwrap()
                .run
                .warm
                .unwrap()
                .kind,
            WarmKind::Stdin
        );
        assert_eq!(
            parse(&format!("{base}warm = false\n")).unwrap().run.warm,
            None
        );
        assert_eq!(parse(base).unwrap().run.warm, None);
        let e = parse(&format!("{base}warm = \"yes\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(":6:8: warm must be true, false"), "{e}");
        let e = parse(&format!("{base}warm_timeout = \"5s\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("warm_timeout needs"), "{e}");
        let e = parse(&format!("{base}warm = true\nwarm_timeout = \"2h\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("warm_timeout must be more than zero and at most 1h"),
            "{e}"
        );
    }

    fn parse(text: &str) -> R<Smolfile> {
        let t = dir_with_app();
        Smolfile::parse(text, t.path(), "Smolfile")
    }

    fn err(text: &str) -> (usize, String) {
        let e = parse(text).expect_err("expected an error");
        let msg = e.to_string();
        (e.line().expect("error has a line"), msg)
    }

    const FULL: &str = r#"
name = "hello"

[base]
type = "debian"
suite = "bookworm"
packages = ["python3", "curl"]

[resources]
vcpus = 2
memory = "512M"
disk_size = "1G"
cpu = "x86-64-v3"

[[copy]]
from = "app/"
to = "/app"

[[copy]]
from = "app/index.html"
to = "/srv/"

[[setup]]
run = ["sh", "-c", "echo hi > /etc/motd"]

[[setup]]
run = "mkdir -p /var/www && cp /app/index.html /var/www/"
workdir = "/app"
env = { STAGE = "build" }

[[service]]
name = "web"
run = ["httpd", "-f", "-p", "8080"]
ready = { tcp = 8080, timeout = "10s" }

[[service]]
name = "db"
run = ["/usr/bin/db"]
workdir = "/var/lib/db"
ready = { file = "/run/db.sock" }

[env]
GREETING = "hello"
PATH = "/usr/bin:/bin"

[run]
workdir = "/app"
entrypoint = ["/bin/sh", "-c"]
cmd = ["echo hello from smolvm"]
"#;

    #[test]
    fn full_file() {
        let t = dir_with_app();
        let s = Smolfile::parse(FULL, t.path(), "Smolfile").unwrap();
        assert_eq!(s.name, "hello");
        assert_eq!(
            s.base,
            Base::Debian {
                suite: "bookworm".into(),
                packages: vec!["python3".into(), "curl".into()]
            }
        );
        assert_eq!(
            s.resources,
            Resources {
                vcpus: 2,
                memory: 512 << 20,
                disk_size: Some(1 << 30),
                cpu: CpuModel::V3,
            }
        );
        assert_eq!(s.copies.len(), 2);
        assert_eq!(s.copies[0].from, t.path().join("app/"));
        assert_eq!(s.copies[0].to, PathBuf::from("/app"));
        assert_eq!(s.copies[0].line, 15);
        assert_eq!(s.copies[1].to.as_os_str(), "/srv/");
        assert_eq!(s.setup[0].run, ["sh", "-c", "echo hi > /etc/motd"]);
        assert_eq!(
            s.setup[1].run,
            [
                "/bin/sh",
                "-c",
                "mkdir -p /var/www && cp /app/index.html /var/www/"
            ]
        );
        assert_eq!(s.setup[1].workdir.as_deref(), Some("/app"));
        assert_eq!(s.setup[1].env["STAGE"], "build");
        assert_eq!(s.services[0].name, "web");
        assert_eq!(
            s.services[0].ready,
            Some(Ready {
                probe: Probe::Tcp(8080),
                timeout: Duration::from_secs(10)
            })
        );
        assert_eq!(
            s.services[1].ready,
            Some(Ready {
                probe: Probe::File("/run/db.sock".into()),
                timeout: DEFAULT_READY_TIMEOUT
            })
        );
        assert_eq!(s.services[1].line, 36);
        assert_eq!(s.env["GREETING"], "hello");
        assert_eq!(s.run.workdir.as_deref(), Some("/app"));
        assert_eq!(s.run.argv(&[]), ["/bin/sh", "-c", "echo hello from smolvm"]);
        assert_eq!(
            s.run.argv(&["echo bye".into()]),
            ["/bin/sh", "-c", "echo bye"]
        );
        let spec = s.rootfs_spec("/agent");
        assert_eq!(spec.copies.len(), 2);
        assert_eq!(spec.size, Some(1 << 30));
    }

    #[test]
    fn image_defaults_fill_only_unset_values() {
        let image = smolvm_rootfs::OciConfig {
            env: vec![
                "PATH=/usr/bin".into(),
                "GREETING=image".into(),
                "junk".into(),
            ],
            entrypoint: vec!["/entry".into()],
            cmd: vec!["serve".into()],
            workdir: "/srv".into(),
            user: String::new(),
        };
        let head = "name = \"m\"\n[base]\ntype = \"busybox\"\n";
        let mut s = parse(&format!("{head}[env]\nGREETING = \"file\"\n")).unwrap();
        s.apply_image_defaults(&image);
        assert_eq!(s.env["GREETING"], "file");
        assert_eq!(s.env["PATH"], "/usr/bin");
        assert_eq!(s.env.len(), 2);
        assert_eq!(s.run.workdir.as_deref(), Some("/srv"));
        assert_eq!(s.run.argv(&[]), ["/entry", "serve"]);

        let mut s = parse(&format!("{head}[run]\ncmd = [\"other\"]\n")).unwrap();
        s.apply_image_defaults(&image);
        assert_eq!(s.run.argv(&[]), ["/entry", "other"]);

        let mut s = parse(&format!(
            "{head}[run]\nentrypoint = [\"/mine\"]\nworkdir = \"/w\"\n"
        ))
        .unwrap();
        s.apply_image_defaults(&image);
        assert_eq!(s.run.argv(&[]), ["/mine"]);
        assert_eq!(s.run.workdir.as_deref(), Some("/w"));
    }

    #[test]
    fn ports_parse_with_defaults_and_are_checked() {
        let head = "name = \"p\"\n[base]\ntype = \"busybox\"\n";
        let s = parse(&format!(
            "{head}[[port]]\nguest = 80\nhost = 8080\n[[port]]\nguest = 9090\n\
             [[port]]\nguest = 22\nhost = 2222\naddress = \"0.0.0.0\"\n"
        ))
        .unwrap();
        let specs: Vec<String> = s.ports.iter().map(Port::spec).collect();
        assert_eq!(
            specs,
            [
                "127.0.0.1:8080:80",
                "127.0.0.1:9090:9090",
                "0.0.0.0:2222:22"
            ]
        );
        for bad in [
            "guest = 0",
            "guest = 65536",
            "guest = 80\nhost = -1",
            "guest = 80\naddress = \"localhost\"",
            "guest = 80\nproto = \"udp\"",
            "host = 80",
        ] {
            assert!(
                parse(&format!("{head}[[port]]\n{bad}\n")).is_err(),
                "{bad} accepted"
            );
        }
        let twice = format!("{head}[[port]]\nguest = 80\n[[port]]\nguest = 81\nhost = 80\n");
        assert!(parse(&twice)
            .unwrap_err()
            .to_string()
            .contains("published twice"));
    }

    #[test]
    fn volumes_parse_with_defaults_and_are_checked() {
        let head = "name = \"m\"\n[base]\ntype = \"busybox\"\n";
        let s = parse(&format!(
            "{head}[[volume]]\npath = \"/src/\"\nmode = \"rw\"\nhost = \".\"\n\
             [[volume]]\npath = \"/data\"\n"
        ))
        .unwrap();
        assert_eq!(s.volumes.len(), 2);
        assert_eq!(s.volumes[0].path, "/src");
        assert!(!s.volumes[0].read_only);
        assert_eq!(s.volumes[0].host.as_deref(), Some("."));
        assert!(s.volumes[1].read_only && s.volumes[1].host.is_none());
        for bad in [
            "path = \"src\"",
            "path = \"/\"",
            "path = \"/a/../b\"",
            "path = \"/a\"\nmode = \"rx\"",
            "path = \"/a\"\nhost = \"\"",
            "path = \"/a\"\nbogus = 1",
        ] {
            assert!(
                parse(&format!("{head}[[volume]]\n{bad}\n")).is_err(),
                "{bad}"
            );
        }
        let twice = format!("{head}[[volume]]\npath = \"/a\"\n[[volume]]\npath = \"/a/\"\n");
        assert!(parse(&twice)
            .unwrap_err()
            .to_string()
            .contains("used twice"));
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let s = parse("name = \"m\"\n[base]\ntype = \"busybox\"\n").unwrap();
        assert_eq!(s.base, Base::Busybox);
        assert_eq!(s.resources, Resources::default());
        assert_eq!(s.resources.memory, 256 << 20);
        assert!(s.copies.is_empty() && s.setup.is_empty() && s.services.is_empty());
        assert_eq!(s.run, Run::default());
        let s = parse("name = \"m\"\n[base]\ntype = \"debian\"\n").unwrap();
        assert_eq!(
            s.base,
            Base::Debian {
                suite: "bookworm".into(),
                packages: vec![]
            }
        );
    }

    #[test]
    fn unknown_key_names_its_line() {
        let (line, msg) = err(
            "name = \"m\"\n[base]\ntype = \"busybox\"\n\n[resources]\nvcpus = 1\nmemroy = \"1G\"\n",
        );
        assert_eq!(line, 7, "{msg}");
        assert!(msg.contains("Smolfile:7:"), "{msg}");
        assert!(msg.contains("memroy"), "{msg}");
        let (line, msg) = err("name = \"m\"\ncolour = 1\n[base]\ntype = \"busybox\"\n");
        assert_eq!(line, 2, "{msg}");
        let (line, msg) = err("name = \"m\"\n[base]\ntype = \"busybox\"\n[[service]]\nname = \"a\"\nrun = [\"x\"]\nreadiness = 1\n");
        assert_eq!(line, 7, "{msg}");
    }

    #[test]
    fn bad_memory_names_its_line() {
        let base = "name = \"m\"\n[base]\ntype = \"busybox\"\n[resources]\n";
        for (value, needle) in [
            ("\"lots\"", "memory"),
            ("\"256X\"", "unknown unit"),
            ("512", "no unit"),
            ("\"1M\"", "32M"),
            ("\"100000T\"", "1T"),
            ("true", "size string"),
        ] {
            let (line, msg) = err(&format!("{base}vcpus = 1\nmemory = {value}\n"));
            assert_eq!(line, 6, "{value}: {msg}");
            assert!(msg.contains(needle), "{value}: {msg}");
        }
        let (line, msg) = err(&format!("{base}vcpus = 0\n"));
        assert_eq!(line, 5, "{msg}");
        assert!(msg.contains("1 to 64"), "{msg}");
        let (line, msg) = err(&format!("{base}\n\nvcpus = 65\n"));
        assert_eq!(line, 7, "{msg}");
        let (line, _) = err(&format!("{base}disk_size = \"1K\"\n"));
        assert_eq!(line, 5);
        let (line, msg) = err(&format!("{base}vcpus = 1\ncpu = \"skylake\"\n"));
        assert_eq!(line, 6, "{msg}");
        assert!(
            msg.contains("unknown CPU model 'skylake'; use x86-64"),
            "{msg}"
        );
    }

    #[test]
    fn missing_base_type_names_its_line() {
        let (line, msg) = err("name = \"m\"\n\n[base]\npackages = [\"x\"]\n");
        assert!((3..=4).contains(&line), "{msg}");
        assert!(msg.contains("type"), "{msg}");
        let (line, msg) = err("name = \"m\"\n[base]\ntype = \"alpine\"\n");
        assert_eq!(line, 3, "{msg}");
        assert!(msg.contains("busybox"), "{msg}");
        let (_, msg) = err("name = \"m\"\n");
        assert!(msg.contains("base"), "{msg}");
        let (line, msg) = err("name = \"m\"\n[base]\ntype = \"oci\"\n");
        assert_eq!(line, 2, "{msg}");
        assert!(msg.contains("archive"), "{msg}");
        let (line, msg) = err("name = \"m\"\n[base]\ntype = \"busybox\"\npackages = [\"x\"]\n");
        assert_eq!(line, 4, "{msg}");
        assert!(msg.contains("only to type = \"debian\""), "{msg}");
        let (line, msg) =
            err("name = \"m\"\n[base]\ntype = \"debian\"\npackages = [\"ok\",\n \"Bad Name\"]\n");
        assert_eq!(line, 5, "{msg}");
    }

    #[test]
    fn relative_guest_path_names_its_line() {
        let head = "name = \"m\"\n[base]\ntype = \"busybox\"\n";
        let (line, msg) = err(&format!("{head}[[copy]]\nfrom = \"app\"\nto = \"app\"\n"));
        assert_eq!(line, 6, "{msg}");
        assert!(msg.contains("absolute"), "{msg}");
        let (line, msg) = err(&format!(
            "{head}[[copy]]\nfrom = \"app\"\nto = \"/a/../b\"\n"
        ));
        assert_eq!(line, 6, "{msg}");
        let (line, msg) = err(&format!("{head}[[copy]]\nfrom = \"nope\"\nto = \"/a\"\n"));
        assert_eq!(line, 5, "{msg}");
        assert!(msg.contains("does not exist"), "{msg}");
        let (line, msg) = err(&format!("{head}[run]\nworkdir = \"app\"\n"));
        assert_eq!(line, 5, "{msg}");
        let (line, msg) = err(&format!(
            "{head}[[service]]\nname = \"s\"\nrun = \"x\"\nready = {{ file = \"run/x\" }}\n"
        ));
        assert_eq!(line, 7, "{msg}");
    }

    #[test]
    fn commands_services_and_env_are_checked() {
        let head = "name = \"m\"\n[base]\ntype = \"busybox\"\n";
        let (line, msg) = err(&format!("{head}[[setup]]\nrun = []\n"));
        assert_eq!(line, 5, "{msg}");
        assert!(msg.contains("non-empty"), "{msg}");
        let (line, msg) = err(&format!("{head}[[setup]]\nrun = [1, 2]\n"));
        assert_eq!(line, 5, "{msg}");
        let svc = |name: &str, extra: &str| {
            format!("[[service]]\nname = \"{name}\"\nrun = [\"x\"]\n{extra}")
        };
        let (line, msg) = err(&format!("{head}{}{}", svc("web", ""), svc("web", "")));
        assert_eq!(line, 8, "{msg}");
        assert!(msg.contains("unique"), "{msg}");
        let (line, msg) = err(&format!("{head}{}", svc("a b", "")));
        assert_eq!(line, 5, "{msg}");
        let (line, msg) = err(&format!("{head}{}", svc("w", "ready = { tcp = 70000 }\n")));
        assert_eq!(line, 7, "{msg}");
        let (line, msg) = err(&format!(
            "{head}{}",
            svc("w", "ready = { tcp = 1, file = \"/x\" }\n")
        ));
        assert_eq!(line, 7, "{msg}");
        assert!(msg.contains("exactly one"), "{msg}");
        let (line, msg) = err(&format!(
            "{head}{}",
            svc(
                "w",
                "ready = { exec = [\"true\"], timeout = \"5 fortnights\" }\n"
            )
        ));
        assert_eq!(line, 7, "{msg}");
        let (line, msg) = err(&format!("{head}[env]\nOK = \"1\"\n1BAD = \"x\"\n"));
        assert_eq!(line, 6, "{msg}");
        let (line, msg) = err(&format!("{head}[env]\nN = 5\n"));
        assert_eq!(line, 5, "{msg}");
        let (line, msg) = err("name = \"bad name\"\n[base]\ntype = \"busybox\"\n");
        assert_eq!(line, 1, "{msg}");
        let (line, msg) = err("name = \"m\"\n[base\ntype = \"busybox\"\n");
        assert_eq!(line, 2, "{msg}");
    }

    #[test]
    fn network_section() {
        let base = "name = \"n\"\n[base]\ntype = \"busybox\"\n";
        assert_eq!(parse(base).unwrap().network, None);
        assert_eq!(
            parse(&format!("{base}[network]\n")).unwrap().network,
            Some(vec![])
        );
        assert_eq!(
            parse(&format!("{base}[network]\nenabled = true\n"))
                .unwrap()
                .network,
            Some(vec![])
        );
        assert_eq!(
            parse(&format!("{base}[network]\nenabled = false\n"))
                .unwrap()
                .network,
            None
        );
        assert_eq!(
            parse(&format!(
                "{base}[network]\nallow = [\"127.0.0.1:8080\", \"10.0.0.0/8\", \"localhost\"]\n"
            ))
            .unwrap()
            .network,
            Some(vec![
                "127.0.0.1:8080".to_string(),
                "10.0.0.0/8".to_string(),
                "localhost".to_string()
            ])
        );
        // Bad input: one line, naming the key and its line.
        for (text, line, want) in [
            (
                "[network]\nallow = [\"127.0.0.1:80\", \"example.com\"]\n",
                5,
                "[network] allow: bad --net-allow 'example.com': 'example.com' is not an IPv4 address",
            ),
            (
                "[network]\nallow = [\"1.2.3.4:0\"]\n",
                5,
                "[network] allow: bad --net-allow '1.2.3.4:0': the port must be 1-65535",
            ),
            (
                "[network]\nenabled = false\nallow = [\"127.0.0.1\"]\n",
                5,
                "[network] enabled = false with an allow list",
            ),
            (
                "[network]\nenabled = \"yes\"\n",
                5,
                "[network] enabled must be true or false",
            ),
            (
                "[network]\nallow = \"127.0.0.1\"\n",
                5,
                "[network] allow must be an array of strings",
            ),
            (
                "[network]\nallow = [80]\n",
                5,
                "[network] allow must be an array of strings",
            ),
            ("[network]\nallowed = []\n", 5, "allowed"),
        ] {
            let (l, msg) = err(&format!("{base}{text}"));
            assert_eq!(l, line, "{msg}");
            assert!(msg.contains(want), "{msg}");
            assert!(!msg.trim_end().contains('\n'), "{msg}");
        }
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2 G"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("8kb"), Ok(8192));
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("99999999T").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn load_resolves_against_the_files_directory() {
        let t = dir_with_app();
        let path = t.path().join("Smolfile");
        std::fs::write(
            &path,
            "name = \"m\"\n[base]\ntype = \"dir\"\npath = \"app\"\n[[copy]]\nfrom = \"img.tar\"\nto = \"/x\"\n",
        )
        .unwrap();
        let s = Smolfile::load(&path).unwrap();
        assert_eq!(
            s.base,
            Base::Dir {
                path: t.path().join("app")
            }
        );
        assert_eq!(s.copies[0].from, t.path().join("img.tar"));
        let e = Smolfile::load(&t.path().join("missing")).unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
        // Errors name the file as given.
        std::fs::write(&path, "name = 5\n").unwrap();
        let e = Smolfile::load(&path).unwrap_err();
        assert!(
            e.to_string().starts_with(&format!("{}:1:", path.display())),
            "{e}"
        );
    }

    #[test]
    fn example_smolfile_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello/Smolfile");
        let s = Smolfile::load(&path).unwrap();
        assert_eq!(s.name, "hello");
        assert_eq!(s.base, Base::Busybox);
        assert!(!s.setup.is_empty());
        assert!(s.services.iter().any(|s| matches!(
            s.ready,
            Some(Ready {
                probe: Probe::Tcp(8080),
                ..
            })
        )));
        assert!(!s.run.argv(&[]).is_empty());
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn arbitrary_text_never_panics(s in "\\PC*") {
                let _ = Smolfile::parse(&s, Path::new("/nonexistent"), "Smolfile");
            }

            #[test]
            fn mutated_valid_files_never_panic(
                cut in 0usize..FULL.len(),
                insert in "[\\[\\]{}=\"',.#\\n a-z0-9]{0,12}",
                keep_tail in any::<bool>(),
            ) {
                let mut cut = cut;
                while !FULL.is_char_boundary(cut) { cut -= 1; }
                let mut text = FULL[..cut].to_string();
                text.push_str(&insert);
                if keep_tail { text.push_str(&FULL[cut..]); }
                let t = dir_with_app();
                if let Err(e) = Smolfile::parse(&text, t.path(), "Smolfile") {
                    // Every error about the text names a line inside it.
                    let line = e.line().unwrap();
                    prop_assert!(line >= 1 && line <= text.lines().count().max(1) + 1, "{e}");
                }
            }
        }
    }
}
