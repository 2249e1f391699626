//! `smolpack push`, `smolpack pull` and `smolpack verify --key PUB REF`: machines and packed
//! executables in OCI registries (docs/DISTRIBUTION.md).
//!
//! A file becomes an OCI artifact: an image index (one entry per platform) pointing at an
//! image manifest with `artifactType` [`layout::ARTIFACT_TYPE`], a JSON config
//! ([`ArtifactConfig`]: the file's length and SHA-256, the machine's manifest) and one layer
//! per component of the file ([`layout`]). A push uploads only the layers the registry does
//! not have. A pull checks the manifest's layout before downloading, verifies every blob's
//! digest before it gets its final name in the blob cache, assembles the file in a temp file,
//! checks the whole file's SHA-256 against the config and renames it into place. Verified
//! blobs stay in the cache until the file is assembled, so a killed pull resumes where it
//! was (a blob cut short resumes with an HTTP range request).
//!
//! The client is `oci-client` (rustls) on a current-thread tokio runtime; only smolpack
//! carries it, never the stub.

pub mod layout;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{
    ImageIndexEntry, OciDescriptor, OciImageIndex, OciImageManifest, Platform,
    OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use smolvm_formats::atomic::AtomicFile;
use smolvm_formats::signature::{AttachedSignature, SecretKey};
use smolvm_formats::MachineReader;

use layout::{Component, Placement};

/// Exit status of `smolpack` when the registry cannot be reached.
pub const EXIT_UNREACHABLE: u8 = 3;
/// Exit status when the reference (tag, digest or repository) does not exist.
pub const EXIT_NOT_FOUND: u8 = 4;
/// Exit status when what the registry sent is refused: a blob or manifest whose digest does
/// not match, a manifest that is not a smolvm machine or lays out bytes outside the file.
pub const EXIT_CORRUPT: u8 = 5;
/// Exit status when the registry refuses the credentials (or their absence).
pub const EXIT_DENIED: u8 = 6;

/// The most bytes of one manifest or config accepted from a registry.
const MAX_JSON_LEN: usize = 4 << 20;

/// Why a registry operation failed; [`RegistryError::exit_code`] is the documented status.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0:?} is not a registry reference: {1}")]
    BadReference(String, String),
    #[error("cannot reach registry {registry}: {detail}")]
    Unreachable { registry: String, detail: String },
    #[error("{what} not found in {registry}")]
    NotFound { registry: String, what: String },
    #[error("{reference} has no machine for this host's platform {want} (it has: {have})")]
    NoPlatform {
        reference: String,
        want: String,
        have: String,
    },
    #[error("refused {what}: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("registry {registry} denied access: {detail}")]
    Denied { registry: String, detail: String },
    #[error("registry {registry}: {detail}")]
    Other { registry: String, detail: String },
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: {error}", path.display())]
    File {
        path: PathBuf,
        error: smolvm_formats::Error,
    },
}

impl RegistryError {
    /// The exit status `smolpack` ends with for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            RegistryError::Unreachable { .. } => EXIT_UNREACHABLE,
            RegistryError::NotFound { .. } | RegistryError::NoPlatform { .. } => EXIT_NOT_FOUND,
            RegistryError::Corrupt { .. } => EXIT_CORRUPT,
            RegistryError::Denied { .. } => EXIT_DENIED,
            _ => 1,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |error| RegistryError::Io {
        path: path.to_path_buf(),
        error,
    }
}

fn file_err(path: &Path) -> impl FnOnce(smolvm_formats::Error) -> RegistryError + '_ {
    move |error| RegistryError::File {
        path: path.to_path_buf(),
        error,
    }
}

/// The innermost cause of an error, for a short line ("Connection refused (os error 111)").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Sorts a client error into the documented kinds; `what` names the object asked for.
fn classify(registry: &str, what: &str, e: OciDistributionError) -> RegistryError {
    let registry = registry.to_string();
    let what = what.to_string();
    match e {
        OciDistributionError::RequestError(r) if r.is_connect() || r.is_timeout() => {
            RegistryError::Unreachable {
                registry,
                detail: root_cause(&r),
            }
        }
        OciDistributionError::RequestError(r) => RegistryError::Other {
            registry,
            detail: root_cause(&r),
        },
        OciDistributionError::ImageManifestNotFoundError(_) => {
            RegistryError::NotFound { registry, what }
        }
        OciDistributionError::ServerError { code: 404, .. } => {
            RegistryError::NotFound { registry, what }
        }
        OciDistributionError::ServerError {
            code: 401 | 403,
            message,
            ..
        }
        | OciDistributionError::AuthenticationFailure(message) => RegistryError::Denied {
            registry,
            detail: one_line(&message),
        },
        OciDistributionError::UnauthorizedError { .. } => RegistryError::Denied {
            registry,
            detail: format!("{what}: authentication required"),
        },
        OciDistributionError::RegistryError { envelope, .. } => {
            let first = envelope.errors.first();
            let detail = first
                .map(|e| one_line(&e.message))
                .unwrap_or_else(|| "unknown error".into());
            match first.map(|e| &e.code) {
                Some(
                    OciErrorCode::ManifestUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::BlobUnknown
                    | OciErrorCode::NotFound,
                ) => RegistryError::NotFound { registry, what },
                Some(OciErrorCode::Unauthorized | OciErrorCode::Denied) => {
                    RegistryError::Denied { registry, detail }
                }
                _ => RegistryError::Other {
                    registry,
                    detail: format!("{what}: {detail}"),
                },
            }
        }
        OciDistributionError::DigestError(d) => RegistryError::Corrupt {
            what,
            detail: d.to_string(),
        },
        other => RegistryError::Other {
            registry,
            detail: format!("{what}: {}", one_line(&other.to_string())),
        },
    }
}

fn one_line(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let s = s.trim();
    if s.chars().count() > 200 {
        s.chars().take(200).collect::<String>() + "…"
    } else {
        s.to_string()
    }
}

/// The config blob of a machine artifact (JSON, [`layout::CONFIG_MEDIA_TYPE`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ArtifactConfig {
    /// `machine` (a `.smolmachine`) or `packed` (a packed executable).
    pub kind: String,
    /// The whole file's length.
    pub size: u64,
    /// The whole file's SHA-256, `sha256:<hex>`: the pulled file must hash to it.
    pub sha256: String,
    /// Guest architecture (`x86_64`).
    pub arch: String,
    /// The key id of the signature inside the file, if it is signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_by: Option<String>,
    /// The machine's own manifest (name, command, resources).
    pub machine: serde_json::Value,
}

/// Platform of the index entry for this host's machines: OCI names (GOARCH, GOOS).
fn platform_of(arch: smolvm_formats::Arch) -> Platform {
    let architecture = match arch {
        smolvm_formats::Arch::X86_64 => "amd64",
        smolvm_formats::Arch::Aarch64 => "arm64",
    };
    Platform {
        architecture: architecture.into(),
        os: "linux".into(),
        os_version: None,
        os_features: None,
        variant: None,
        features: None,
    }
}

/// This host's platform, the index entry a pull picks.
fn host_platform() -> Platform {
    platform_of(smolvm_formats::Arch::host().unwrap_or(smolvm_formats::Arch::X86_64))
}

/// Whether `registry` (`host[:port]`) is on the loopback interface: such registries are
/// spoken to over plain HTTP without `--insecure`, as Docker does.
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, _)| h)
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A parsed reference and a client for its registry.
struct Session {
    client: Client,
    reference: Reference,
    registry: String,
    auth: RegistryAuth,
}

/// Connection settings shared by push and pull.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// Plain HTTP even for a registry that is not on the loopback interface.
    pub insecure: bool,
}

fn parse_reference(reference: &str) -> Result<Reference, RegistryError> {
    reference
        .parse::<Reference>()
        .map_err(|e| RegistryError::BadReference(reference.to_string(), e.to_string()))
}

impl Session {
    fn new(reference: &str, conn: &Connection) -> Result<Session, RegistryError> {
        let reference = parse_reference(reference)?;
        let registry = reference.resolve_registry().to_string();
        let protocol = if conn.insecure || is_loopback(&registry) {
            ClientProtocol::HttpsExcept(vec![registry.clone()])
        } else {
            ClientProtocol::Https
        };
        let client = Client::new(ClientConfig {
            protocol,
            connect_timeout: Some(Duration::from_secs(15)),
            platform_resolver: None,
            ..Default::default()
        });
        let auth = docker_credentials(&registry);
        Ok(Session {
            client,
            reference,
            registry,
            auth,
        })
    }

    fn err(&self, what: &str) -> impl FnOnce(OciDistributionError) -> RegistryError + '_ {
        let what = what.to_string();
        move |e| classify(&self.registry, &what, e)
    }

    /// The token flow (or basic auth) for `op`; also the first contact with the registry.
    async fn login(&self, op: RegistryOperation) -> Result<(), RegistryError> {
        self.client
            .auth(&self.reference, &self.auth, op)
            .await
            .map(|_| ())
            .map_err(self.err("the registry's API"))
    }

    fn with_digest(&self, digest: &str) -> Reference {
        Reference::with_digest(
            self.reference.registry().to_string(),
            self.reference.repository().to_string(),
            digest.to_string(),
        )
    }

    /// Whether the repository has the blob `digest` (a one-byte range read: the client has no
    /// HEAD for blobs).
    async fn has_blob(&self, digest: &str, size: u64) -> Result<bool, RegistryError> {
        let desc = OciDescriptor {
            digest: digest.to_string(),
            size: size as i64,
            ..Default::default()
        };
        match self
            .client
            .pull_blob_stream_partial(&self.reference, &desc, 0, Some(1))
            .await
        {
            Ok(_) => Ok(true),
            Err(OciDistributionError::ServerError { code: 404, .. }) => Ok(false),
            Err(e) => match classify(&self.registry, "a blob", e) {
                RegistryError::NotFound { .. } => Ok(false),
                other => Err(other),
            },
        }
    }
}

/// Credentials for `registry` from the Docker config file (`$DOCKER_CONFIG/config.json`,
/// else `~/.docker/config.json`): a credential helper named for the registry in
/// `credHelpers`, else the `credsStore` helper, else an `auths` entry's `auth` (base64
/// `user:password`) or `username`/`password`. Anonymous otherwise (OAuth `identitytoken`s
/// are not used).
pub fn docker_credentials(registry: &str) -> RegistryAuth {
    let path = match std::env::var_os("DOCKER_CONFIG").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d).join("config.json"),
        None => match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".docker/config.json"),
            None => return RegistryAuth::Anonymous,
        },
    };
    let Ok(text) = fs::read_to_string(&path) else {
        return RegistryAuth::Anonymous;
    };
    credentials_with(&text, registry, |helper| {
        run_credential_helper(Path::new(&format!("docker-credential-{helper}")), registry)
    })
}

/// The credentials a config's text gives for `registry`, `run` asking a helper by name.
fn credentials_with(
    text: &str,
    registry: &str,
    run: impl Fn(&str) -> Option<RegistryAuth>,
) -> RegistryAuth {
    if let Some(auth) = credential_helper(text, registry).and_then(|h| run(&h)) {
        return auth;
    }
    credentials_from_config(text, registry).unwrap_or(RegistryAuth::Anonymous)
}

/// The credential helper a Docker config names for `registry`: its `credHelpers` entry
/// (`host[:port]`, as for `auths`), else `credsStore`.
pub fn credential_helper(text: &str, registry: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let hub = registry == "index.docker.io" || registry == "docker.io";
    let per_registry = v
        .get("credHelpers")
        .and_then(|h| h.as_object())
        .and_then(|h| {
            h.iter().find_map(|(k, name)| {
                let host = config_host(k);
                (host == registry || (hub && host.ends_with("docker.io")))
                    .then(|| name.as_str().map(str::to_string))
                    .flatten()
            })
        });
    per_registry
        .or_else(|| {
            v.get("credsStore")
                .and_then(|s| s.as_str())
                .map(str::to_string)
        })
        .filter(|n| {
            !n.is_empty()
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        })
}

fn config_host(k: &str) -> &str {
    k.trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or("")
}

/// Runs `docker-credential-NAME get` with the registry on stdin (Docker's credential helper
/// protocol) and reads `{"Username": ..., "Secret": ...}` from its stdout. `None` when the
/// helper is missing, fails (it has no entry: "credentials not found") or answers otherwise.
/// Docker Hub is asked for as `https://index.docker.io/v1/`, as `docker login` stores it.
pub fn run_credential_helper(program: &Path, registry: &str) -> Option<RegistryAuth> {
    use std::process::{Command, Stdio};
    let server = if registry == "index.docker.io" || registry == "docker.io" {
        "https://index.docker.io/v1/".to_string()
    } else {
        registry.to_string()
    };
    let mut child = Command::new(program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(server.as_bytes()).ok()?;
    let out = child.wait_with_output().ok()?;
    if !out.status.success() {
        return None;
    }
    helper_answer(&out.stdout)
}

/// A credential helper's answer: `Username` and `Secret`; a username `<token>` means the
/// secret is an identity token, which is not used.
pub fn helper_answer(stdout: &[u8]) -> Option<RegistryAuth> {
    let v: serde_json::Value = serde_json::from_slice(stdout).ok()?;
    let user = v.get("Username")?.as_str()?;
    let secret = v.get("Secret")?.as_str()?;
    if user.is_empty() || user == "<token>" {
        return None;
    }
    Some(RegistryAuth::Basic(user.to_string(), secret.to_string()))
}

/// The credentials for `registry` in a Docker config file's text.
pub fn credentials_from_config(text: &str, registry: &str) -> Option<RegistryAuth> {
    use base64::Engine as _;
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let auths = v.get("auths")?.as_object()?;
    let hub = registry == "index.docker.io" || registry == "docker.io";
    let entry = auths.iter().find_map(|(k, e)| {
        let host = config_host(k);
        let matches = host == registry || (hub && host.ends_with("docker.io"));
        matches.then_some(e)
    })?;
    if let Some(auth) = entry.get("auth").and_then(|a| a.as_str()) {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()?;
        let s = String::from_utf8(raw).ok()?;
        let (u, p) = s.split_once(':')?;
        return Some(RegistryAuth::Basic(u.to_string(), p.to_string()));
    }
    let u = entry.get("username")?.as_str()?;
    let p = entry.get("password")?.as_str()?;
    Some(RegistryAuth::Basic(u.to_string(), p.to_string()))
}

fn runtime() -> Result<tokio::runtime::Runtime, RegistryError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err(Path::new("the async runtime")))
}

fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A byte progress bar on stderr when it is a terminal; hidden otherwise.
fn bar(total: u64, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(total);
    let style = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    b.set_style(style);
    b.set_message(what.to_string());
    b
}

// ---------------------------------------------------------------------------------------
// push

/// What `push` did.
#[derive(Debug, Clone)]
pub struct PushReport {
    pub reference: String,
    /// Digest of the index the tag now names.
    pub index_digest: String,
    /// Digest of this platform's manifest.
    pub manifest_digest: String,
    /// Layers in the manifest.
    pub layers: usize,
    /// Blobs (layers and config) uploaded, and their bytes.
    pub uploaded: usize,
    pub uploaded_bytes: u64,
    /// Blobs the registry already had.
    pub reused: usize,
    pub file_len: u64,
    pub took: Duration,
    /// The signature attached by `push --key`.
    pub attached: Option<AttachReport>,
}

impl PushReport {
    pub fn summary(&self) -> String {
        let attached = self
            .attached
            .as_ref()
            .map(|a| format!("\n{}", a.summary()))
            .unwrap_or_default();
        format!(
            "pushed {} ({}): {} layers, {} blobs uploaded ({}), {} already there, {} in {}; index {}{attached}",
            self.reference,
            self.manifest_digest,
            self.layers,
            self.uploaded,
            crate::progress::format_size(self.uploaded_bytes),
            self.reused,
            crate::progress::format_size(self.file_len),
            crate::progress::format_duration(self.took),
            self.index_digest,
        )
    }
}

fn read_range(file: &File, path: &Path, offset: u64, len: u64) -> Result<Vec<u8>, RegistryError> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset).map_err(io_err(path))?;
    Ok(buf)
}

/// Pushes `file` (a `.smolmachine` or packed executable) to `reference` (which needs a tag).
/// With `key`, a signature of the whole file by that key is attached to the pushed manifest
/// (an OCI referrer: see [`AttachReport`]).
pub fn push(
    file: &Path,
    reference: &str,
    conn: &Connection,
    key: Option<&SecretKey>,
) -> Result<PushReport, RegistryError> {
    let started = Instant::now();
    let reader = MachineReader::open(file).map_err(file_err(file))?;
    if let Some(t) = reader.trailer() {
        smolvm_formats::trailer::check_stub_extent(reader.file(), t).map_err(file_err(file))?;
    }
    reader.verify().map_err(file_err(file))?;
    let f = reader.file();
    let file_len = f.metadata().map_err(io_err(file))?.len();
    let read_at = |off: u64, buf: &mut [u8]| f.read_exact_at(buf, off);
    let comps = layout::components(&reader, &read_at).map_err(io_err(file))?;

    // The whole file's SHA-256 and each component's, in one pass over the file.
    let mut whole = Sha256::new();
    let mut digests = Vec::with_capacity(comps.len());
    let mut pos = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let zeros = vec![0u8; 1 << 20];
    for c in &comps {
        while pos < c.offset {
            let n = (c.offset - pos).min(zeros.len() as u64) as usize;
            whole.update(&zeros[..n]);
            pos += n as u64;
        }
        let mut h = Sha256::new();
        let mut left = c.len;
        let mut off = c.offset;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            f.read_exact_at(&mut buf[..n], off).map_err(io_err(file))?;
            h.update(&buf[..n]);
            whole.update(&buf[..n]);
            off += n as u64;
            left -= n as u64;
        }
        pos = c.offset + c.len;
        digests.push(format!("sha256:{}", hex(&h.finalize())));
    }
    while pos < file_len {
        let n = (file_len - pos).min(zeros.len() as u64) as usize;
        whole.update(&zeros[..n]);
        pos += n as u64;
    }
    let file_sha = format!("sha256:{}", hex(&whole.finalize()));
    let attached_sig = match key {
        Some(k) => {
            let (size, sha512) =
                smolvm_formats::signature::whole_digest(f).map_err(file_err(file))?;
            Some(AttachedSignature::sign(k, size, &sha512))
        }
        None => None,
    };

    let signed_by = reader.signature_info().ok().flatten().map(|s| s.key.id());
    let machine = reader
        .manifest()
        .ok()
        .and_then(|m| serde_json::to_value(m).ok())
        .unwrap_or(serde_json::Value::Null);
    let config = ArtifactConfig {
        kind: if reader.trailer().is_some() {
            "packed"
        } else {
            "machine"
        }
        .into(),
        size: file_len,
        sha256: file_sha.clone(),
        arch: reader.arch().to_string(),
        signed_by: signed_by.clone(),
        machine,
    };
    let config_bytes = serde_json::to_vec(&config).expect("config serializes");
    let config_digest = format!("sha256:{}", sha256_hex(&config_bytes));

    let session = Session::new(reference, conn)?;
    let Some(tag) = session.reference.tag().map(str::to_string) else {
        return Err(RegistryError::BadReference(
            reference.to_string(),
            "push needs a tag (REGISTRY/NAME:TAG)".into(),
        ));
    };
    let rt = runtime()?;
    rt.block_on(async {
        session.login(RegistryOperation::Push).await?;
        let mut uploaded = 0;
        let mut uploaded_bytes = 0;
        let mut reused = 0;
        let total: u64 = comps.iter().map(|c| c.len).sum();
        let progress = bar(total, "push");
        // The config first, then every layer the registry lacks.
        if session
            .has_blob(&config_digest, config_bytes.len() as u64)
            .await?
        {
            reused += 1;
        } else {
            session
                .client
                .push_blob(&session.reference, &config_bytes, &config_digest)
                .await
                .map_err(session.err("the config blob"))?;
            uploaded += 1;
            uploaded_bytes += config_bytes.len() as u64;
        }
        let mut seen = std::collections::BTreeSet::new();
        for (c, d) in comps.iter().zip(&digests) {
            progress.set_message(format!("push {}", c.title));
            if !seen.insert(d.clone()) || session.has_blob(d, c.len).await? {
                reused += 1;
            } else {
                let data = read_range(f, file, c.offset, c.len)?;
                session
                    .client
                    .push_blob(&session.reference, &data, d)
                    .await
                    .map_err(session.err(&format!("layer {}", c.title)))?;
                uploaded += 1;
                uploaded_bytes += c.len;
            }
            progress.inc(c.len);
        }
        progress.finish_and_clear();

        let manifest = image_manifest(&comps, &digests, &config_digest, &config_bytes, &config);
        let manifest_bytes = serde_json::to_vec(&manifest).expect("manifest serializes");
        let manifest_digest = format!("sha256:{}", sha256_hex(&manifest_bytes));
        session
            .client
            .push_manifest_raw(
                &session.with_digest(&manifest_digest),
                manifest_bytes.clone(),
                OCI_IMAGE_MEDIA_TYPE.parse().expect("a header value"),
            )
            .await
            .map_err(session.err("the manifest"))?;

        // The index: this platform's entry, beside the other platforms' entries of the index
        // the tag named before (if it was one of ours).
        let platform = platform_of(reader.arch());
        let mut entries = existing_entries(&session).await;
        entries.retain(|e| {
            !matches!(&e.platform, Some(p)
                if p.architecture == platform.architecture && p.os == platform.os)
        });
        entries.push(ImageIndexEntry {
            media_type: OCI_IMAGE_MEDIA_TYPE.into(),
            digest: manifest_digest.clone(),
            size: manifest_bytes.len() as i64,
            platform: Some(platform),
            annotations: None,
        });
        entries.sort_by(|a, b| {
            let k = |e: &ImageIndexEntry| {
                e.platform
                    .as_ref()
                    .map(|p| (p.os.clone(), p.architecture.clone()))
            };
            k(a).cmp(&k(b))
        });
        let index = OciImageIndex {
            schema_version: 2,
            media_type: Some(OCI_IMAGE_INDEX_MEDIA_TYPE.into()),
            manifests: entries,
            artifact_type: Some(layout::ARTIFACT_TYPE.into()),
            annotations: None,
        };
        let index_bytes = serde_json::to_vec(&index).expect("index serializes");
        let index_digest = format!("sha256:{}", sha256_hex(&index_bytes));
        let tag_ref = Reference::with_tag(
            session.reference.registry().to_string(),
            session.reference.repository().to_string(),
            tag,
        );
        session
            .client
            .push_manifest_raw(
                &tag_ref,
                index_bytes,
                OCI_IMAGE_INDEX_MEDIA_TYPE.parse().expect("a header value"),
            )
            .await
            .map_err(session.err("the index"))?;
        let attached = match &attached_sig {
            Some(sig) => Some(
                session
                    .attach(&manifest_digest, manifest_bytes.len() as i64, sig)
                    .await?,
            ),
            None => None,
        };
        Ok(PushReport {
            attached,
            reference: reference.to_string(),
            index_digest,
            manifest_digest,
            layers: comps.len(),
            uploaded,
            uploaded_bytes,
            reused,
            file_len,
            took: started.elapsed(),
        })
    })
}

fn image_manifest(
    comps: &[Component],
    digests: &[String],
    config_digest: &str,
    config_bytes: &[u8],
    config: &ArtifactConfig,
) -> OciImageManifest {
    let layers = comps
        .iter()
        .zip(digests)
        .map(|(c, d)| OciDescriptor {
            media_type: c.media_type.clone(),
            digest: d.clone(),
            size: c.len as i64,
            urls: None,
            annotations: Some(BTreeMap::from([
                (layout::TITLE_ANNOTATION.to_string(), c.title.clone()),
                (layout::OFFSET_ANNOTATION.to_string(), c.offset.to_string()),
            ])),
        })
        .collect();
    let mut annotations = BTreeMap::from([
        ("dev.smolvm.file.kind".to_string(), config.kind.clone()),
        ("dev.smolvm.file.sha256".to_string(), config.sha256.clone()),
        ("dev.smolvm.file.size".to_string(), config.size.to_string()),
    ]);
    if let Some(k) = &config.signed_by {
        annotations.insert("dev.smolvm.signed-by".into(), k.clone());
    }
    if let Some(name) = config.machine.get("name").and_then(|n| n.as_str()) {
        annotations.insert(layout::TITLE_ANNOTATION.into(), name.to_string());
    }
    OciImageManifest {
        schema_version: 2,
        media_type: Some(OCI_IMAGE_MEDIA_TYPE.into()),
        config: OciDescriptor {
            media_type: layout::CONFIG_MEDIA_TYPE.into(),
            digest: config_digest.to_string(),
            size: config_bytes.len() as i64,
            urls: None,
            annotations: None,
        },
        layers,
        subject: None,
        artifact_type: Some(layout::ARTIFACT_TYPE.into()),
        annotations: Some(annotations),
    }
}

/// The entries of the smolvm index the tag names now, if any.
async fn existing_entries(session: &Session) -> Vec<ImageIndexEntry> {
    let Ok((body, _)) = session
        .client
        .pull_manifest_raw(
            &session.reference,
            &session.auth,
            &[OCI_IMAGE_INDEX_MEDIA_TYPE],
        )
        .await
    else {
        return Vec::new();
    };
    match serde_json::from_slice::<OciImageIndex>(&body) {
        Ok(i) if i.artifact_type.as_deref() == Some(layout::ARTIFACT_TYPE) => i.manifests,
        _ => Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------
// pull

/// Where a pull puts the file.
#[derive(Debug, Clone)]
pub enum Destination {
    /// This path (atomically).
    Output(PathBuf),
    /// The content-addressed cache ([`machines_dir`]).
    Cache,
}

/// What `pull` did.
#[derive(Debug, Clone)]
pub struct PullReport {
    pub reference: String,
    /// The file written (the output, or the cache entry).
    pub path: PathBuf,
    pub manifest_digest: String,
    /// Length of the manifest, for descriptors that name it (an attached signature's subject).
    pub manifest_size: i64,
    pub config: ArtifactConfig,
    pub layers: usize,
    /// Blobs downloaded (wholly or the rest of a cut one), and their bytes.
    pub downloaded: usize,
    pub downloaded_bytes: u64,
    /// Blobs found verified in the cache (from a pull that was killed).
    pub cached: usize,
    /// Blobs whose download resumed from a partial one.
    pub resumed: usize,
    /// The file was in the machine cache already: nothing was downloaded.
    pub from_cache: bool,
    pub took: Duration,
}

impl PullReport {
    pub fn summary(&self) -> String {
        if self.from_cache {
            return format!(
                "pulled {} ({}): {} already in the cache at {}",
                self.reference,
                self.manifest_digest,
                crate::progress::format_size(self.config.size),
                self.path.display()
            );
        }
        format!(
            "pulled {} ({}) to {}: {} layers, {} blobs downloaded ({}), {} from the cache, {} resumed, {} in {}",
            self.reference,
            self.manifest_digest,
            self.path.display(),
            self.layers,
            self.downloaded,
            crate::progress::format_size(self.downloaded_bytes),
            self.cached,
            self.resumed,
            crate::progress::format_size(self.config.size),
            crate::progress::format_duration(self.took),
        )
    }
}

/// `${SMOLVM_CACHE:-${XDG_CACHE_HOME:-~/.cache}/smolvm}/machines`: pulled files named
/// `sha256-<hex of the whole file>`, and `blobs/` with the verified blobs of pulls not yet
/// assembled.
pub fn machines_dir() -> PathBuf {
    let base = match std::env::var_os("SMOLVM_CACHE").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
            Some(x) => PathBuf::from(x).join("smolvm"),
            None => smolvm::linux::run::cache_dir(),
        },
    };
    base.join("machines")
}

/// The cache entry for a file whose SHA-256 is `digest` (`sha256:<hex>`).
pub fn cache_path(digest: &str) -> PathBuf {
    machines_dir().join(digest.replace(':', "-"))
}

/// Resolves `reference` to this platform's manifest: its digest and checked content.
async fn resolve(
    session: &Session,
) -> Result<(String, i64, layout::MachineManifest), RegistryError> {
    let what = format!("{}", session.reference);
    let (body, digest) = session
        .client
        .pull_manifest_raw(
            &session.reference,
            &session.auth,
            &[OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE],
        )
        .await
        .map_err(session.err(&what))?;
    check_json_digest(&body, &digest, &what)?;
    let corrupt = |detail: String| RegistryError::Corrupt {
        what: what.clone(),
        detail,
    };
    let (body, digest) = match layout::classify(&body).map_err(corrupt)? {
        layout::Named::Index { entries, .. } => {
            let want = host_platform();
            let entry = layout::pick_platform(&entries, &want.os, &want.architecture)
                .map_err(corrupt)?
                .ok_or_else(|| RegistryError::NoPlatform {
                    reference: what.clone(),
                    want: format!("{}/{}", want.os, want.architecture),
                    have: layout::platforms(&entries).join(", "),
                })?;
            let by_digest = session.with_digest(&entry.digest);
            let (body, _) = session
                .client
                .pull_manifest_raw(&by_digest, &session.auth, &[OCI_IMAGE_MEDIA_TYPE])
                .await
                .map_err(session.err(&format!("manifest {}", entry.digest)))?;
            check_json_digest(&body, &entry.digest, &what)?;
            (body, entry.digest.clone())
        }
        layout::Named::Manifest => (body, digest),
    };
    let manifest = layout::machine_manifest(&body).map_err(corrupt)?;
    Ok((digest, body.len() as i64, manifest))
}

/// A manifest or index body: bounded, and hashing to the digest it was fetched under.
fn check_json_digest(body: &[u8], digest: &str, what: &str) -> Result<(), RegistryError> {
    if body.len() > MAX_JSON_LEN {
        return Err(RegistryError::Corrupt {
            what: what.to_string(),
            detail: format!("manifest of {} bytes", body.len()),
        });
    }
    let got = format!("sha256:{}", sha256_hex(body));
    if digest.starts_with("sha256:") && got != digest {
        return Err(RegistryError::Corrupt {
            what: what.to_string(),
            detail: format!("its digest is {got}, not {digest}"),
        });
    }
    Ok(())
}

/// Pulls `reference` into `dest`; the file is byte for byte the one pushed.
pub fn pull(
    reference: &str,
    dest: &Destination,
    conn: &Connection,
) -> Result<PullReport, RegistryError> {
    let started = Instant::now();
    let session = Session::new(reference, conn)?;
    let rt = runtime()?;
    rt.block_on(async {
        session.login(RegistryOperation::Pull).await?;
        let (manifest_digest, manifest_size, manifest) = resolve(&session).await?;

        // The config: small, verified, and it gives the file's length and hash.
        let mut config_bytes = Vec::new();
        let config_desc = OciDescriptor {
            media_type: manifest.config.media_type.clone(),
            digest: manifest.config.digest.clone(),
            size: manifest.config.size,
            ..Default::default()
        };
        session
            .client
            .pull_blob(&session.reference, &config_desc, &mut config_bytes)
            .await
            .map_err(session.err("the config blob"))?;
        let config: ArtifactConfig =
            serde_json::from_slice(&config_bytes).map_err(|e| RegistryError::Corrupt {
                what: "the config blob".into(),
                detail: e.to_string(),
            })?;
        if !layout::is_sha256_digest(&config.sha256) {
            return Err(RegistryError::Corrupt {
                what: "the config blob".into(),
                detail: format!("file digest {:?}", config.sha256),
            });
        }
        let plan = layout::plan_assembly(&manifest.layers, config.size).map_err(|detail| {
            RegistryError::Corrupt {
                what: format!("manifest {manifest_digest}"),
                detail,
            }
        })?;

        let cached = cache_path(&config.sha256);
        let path = match dest {
            Destination::Output(p) => p.clone(),
            Destination::Cache => cached.clone(),
        };
        let mut report = PullReport {
            reference: reference.to_string(),
            path: path.clone(),
            manifest_digest: manifest_digest.clone(),
            manifest_size,
            config: config.clone(),
            layers: plan.len(),
            downloaded: 0,
            downloaded_bytes: 0,
            cached: 0,
            resumed: 0,
            from_cache: false,
            took: Duration::ZERO,
        };
        let mode = if config.kind == "packed" {
            0o755
        } else {
            0o644
        };
        // Already in the machine cache (a `smolvm run REF` before, say): copy it, checked.
        if cached.is_file() {
            if matches!(dest, Destination::Output(_)) {
                assemble_from_cache(&cached, &path, &config, mode)?;
            }
            report.from_cache = true;
            report.took = started.elapsed();
            return Ok(report);
        }

        let blobs = machines_dir().join("blobs");
        fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        let total: u64 = plan.iter().map(|p| p.len).sum();
        let progress = bar(total, "pull");
        for p in &plan {
            progress.set_message(format!("pull {}", p.title));
            fetch_blob(&session, p, &blobs, &progress, &mut report).await?;
        }
        progress.finish_and_clear();
        if matches!(dest, Destination::Cache) {
            fs::create_dir_all(machines_dir()).map_err(io_err(&machines_dir()))?;
        }
        assemble(&plan, &blobs, &path, &config, mode)?;
        // The blobs are in the file now; a later pull of the same file finds it (cache) or
        // downloads again (output).
        for p in &plan {
            let _ = fs::remove_file(blob_path(&blobs, &p.digest));
        }
        report.took = started.elapsed();
        Ok(report)
    })
}

fn blob_path(blobs: &Path, digest: &str) -> PathBuf {
    blobs.join(digest.replace(':', "-"))
}

/// Makes sure the verified blob for `p` is in `blobs`: found there, resumed from a partial
/// download, or downloaded; its digest checked before it gets its final name.
async fn fetch_blob(
    session: &Session,
    p: &Placement,
    blobs: &Path,
    progress: &indicatif::ProgressBar,
    report: &mut PullReport,
) -> Result<(), RegistryError> {
    let done = blob_path(blobs, &p.digest);
    if done.metadata().is_ok_and(|m| m.len() == p.len) {
        report.cached += 1;
        progress.inc(p.len);
        return Ok(());
    }
    let partial = blobs.join(format!("{}.partial", p.digest.replace(':', "-")));
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&partial)
        .map_err(io_err(&partial))?;
    // Two pulls of the same blob at once: the second waits, then finds it done.
    smolvm_formats::atomic::lock_exclusive(&file, true).map_err(io_err(&partial))?;
    if done.metadata().is_ok_and(|m| m.len() == p.len) {
        report.cached += 1;
        progress.inc(p.len);
        return Ok(());
    }
    let mut have = file.metadata().map_err(io_err(&partial))?.len();
    if have > p.len {
        file.set_len(0).map_err(io_err(&partial))?;
        have = 0;
    }
    let mut hasher = Sha256::new();
    if have > 0 {
        let mut r = File::open(&partial).map_err(io_err(&partial))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = have;
        while left > 0 {
            let n = r.read(&mut buf).map_err(io_err(&partial))?;
            if n == 0 {
                break;
            }
            let n = n.min(left as usize);
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
    }
    progress.inc(have);
    let what = format!("layer {} ({})", p.title, p.digest);
    if have < p.len {
        let desc = OciDescriptor {
            digest: p.digest.clone(),
            size: p.len as i64,
            ..Default::default()
        };
        let response = session
            .client
            .pull_blob_stream_partial(&session.reference, &desc, have, None)
            .await
            .map_err(session.err(&what))?;
        let stream = match response {
            oci_client::client::BlobResponse::Partial(s) if have > 0 => {
                report.resumed += 1;
                s
            }
            oci_client::client::BlobResponse::Partial(s) => s,
            oci_client::client::BlobResponse::Full(s) => {
                // No range support: start over.
                progress.set_position(progress.position().saturating_sub(have));
                file.set_len(0).map_err(io_err(&partial))?;
                have = 0;
                hasher = Sha256::new();
                s
            }
        };
        report.downloaded += 1;
        let mut stream = stream.stream;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut file);
        use std::io::Seek;
        w.seek(std::io::SeekFrom::Start(have))
            .map_err(io_err(&partial))?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| RegistryError::Other {
                registry: session.registry.clone(),
                detail: format!("{what}: {e}"),
            })?;
            have += chunk.len() as u64;
            if have > p.len {
                drop(w);
                let _ = fs::remove_file(&partial);
                return Err(RegistryError::Corrupt {
                    what,
                    detail: format!("the registry sent more than its {} bytes", p.len),
                });
            }
            hasher.update(&chunk);
            w.write_all(&chunk).map_err(io_err(&partial))?;
            report.downloaded_bytes += chunk.len() as u64;
            progress.inc(chunk.len() as u64);
        }
        w.flush().map_err(io_err(&partial))?;
    }
    let got = format!("sha256:{}", hex(&hasher.finalize()));
    if have != p.len || got != p.digest {
        // Never kept: the next pull downloads it afresh.
        let _ = fs::remove_file(&partial);
        return Err(RegistryError::Corrupt {
            what,
            detail: if have != p.len {
                format!("{have} bytes instead of {}", p.len)
            } else {
                format!("its content hashes to {got}")
            },
        });
    }
    file.sync_all().map_err(io_err(&partial))?;
    fs::rename(&partial, &done).map_err(io_err(&done))?;
    Ok(())
}

/// Writes the file from its verified blobs into a temp file beside `path`, checks the whole
/// file's SHA-256 and that it opens as a machine, then renames it into place.
fn assemble(
    plan: &[Placement],
    blobs: &Path,
    path: &Path,
    config: &ArtifactConfig,
    mode: u32,
) -> Result<(), RegistryError> {
    let out = AtomicFile::create(path).map_err(file_err(path))?;
    let f = out.file();
    f.set_len(config.size).map_err(io_err(out.tmp_path()))?;
    let mut whole = Sha256::new();
    let zeros = vec![0u8; 1 << 20];
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    let feed_zeros = |whole: &mut Sha256, from: u64, to: u64| {
        let mut at = from;
        while at < to {
            let n = (to - at).min(zeros.len() as u64) as usize;
            whole.update(&zeros[..n]);
            at += n as u64;
        }
    };
    for p in plan {
        feed_zeros(&mut whole, pos, p.offset);
        let src = blob_path(blobs, &p.digest);
        let mut r = File::open(&src).map_err(io_err(&src))?;
        let mut off = p.offset;
        let mut left = p.len;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            r.read_exact(&mut buf[..n]).map_err(io_err(&src))?;
            whole.update(&buf[..n]);
            f.write_all_at(&buf[..n], off)
                .map_err(io_err(out.tmp_path()))?;
            off += n as u64;
            left -= n as u64;
        }
        pos = p.offset + p.len;
    }
    feed_zeros(&mut whole, pos, config.size);
    finish_assembly(out, whole, path, config, mode)
}

/// Copies a cached file to `path`, checking its hash on the way.
fn assemble_from_cache(
    cached: &Path,
    path: &Path,
    config: &ArtifactConfig,
    mode: u32,
) -> Result<(), RegistryError> {
    let out = AtomicFile::create(path).map_err(file_err(path))?;
    let mut r = File::open(cached).map_err(io_err(cached))?;
    let mut whole = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut w = out.file();
    loop {
        let n = r.read(&mut buf).map_err(io_err(cached))?;
        if n == 0 {
            break;
        }
        whole.update(&buf[..n]);
        w.write_all(&buf[..n]).map_err(io_err(out.tmp_path()))?;
    }
    finish_assembly(out, whole, path, config, mode)
}

fn finish_assembly(
    out: AtomicFile,
    whole: Sha256,
    path: &Path,
    config: &ArtifactConfig,
    mode: u32,
) -> Result<(), RegistryError> {
    let got = format!("sha256:{}", hex(&whole.finalize()));
    if got != config.sha256 {
        return Err(RegistryError::Corrupt {
            what: format!("the assembled {}", path.display()),
            detail: format!("it hashes to {got}, not {}", config.sha256),
        });
    }
    MachineReader::open(out.tmp_path()).map_err(|error| RegistryError::Corrupt {
        what: format!("the assembled {}", path.display()),
        detail: error.to_string(),
    })?;
    out.commit(Some(mode)).map_err(file_err(path))
}

/// `smolpack verify --key PUB REF`: pulls the reference into the cache (or finds it there)
/// and returns what the pull found (the cached path, the manifest digest), to be verified
/// like a file.
pub fn pull_for_verify(reference: &str, conn: &Connection) -> Result<PullReport, RegistryError> {
    pull(reference, &Destination::Cache, conn)
}

// ---------------------------------------------------------------------------------------
// attached signatures (OCI 1.1 referrers, through the referrers tag schema)

/// One attached signature found for a manifest: its signature manifest's digest and the
/// document, or why it was refused (a blob that does not hash to its digest, a manifest or
/// document that does not parse).
#[derive(Debug)]
pub struct Attached {
    pub manifest_digest: String,
    pub signature: Result<AttachedSignature, RegistryError>,
}

/// What attaching a signature did.
#[derive(Debug, Clone)]
pub struct AttachReport {
    /// The signed machine's manifest.
    pub subject: String,
    /// The signature's manifest.
    pub signature_manifest: String,
    /// The referrers tag (`sha256-<hex of subject>`) and how many signatures it lists now.
    pub tag: String,
    pub listed: usize,
    pub key_id: String,
}

impl AttachReport {
    pub fn summary(&self) -> String {
        format!(
            "attached signature {} by key {} to {} (listed under tag {}, {} signature{})",
            self.signature_manifest,
            self.key_id,
            self.subject,
            self.tag,
            self.listed,
            if self.listed == 1 { "" } else { "s" }
        )
    }
}

impl Session {
    /// Uploads `data` as the blob `digest` unless the repository has it.
    async fn ensure_blob(
        &self,
        data: &[u8],
        digest: &str,
        what: &str,
    ) -> Result<(), RegistryError> {
        if !self.has_blob(digest, data.len() as u64).await? {
            self.client
                .push_blob(&self.reference, data, digest)
                .await
                .map_err(self.err(what))?;
        }
        Ok(())
    }

    fn with_tag(&self, tag: &str) -> Reference {
        Reference::with_tag(
            self.reference.registry().to_string(),
            self.reference.repository().to_string(),
            tag.to_string(),
        )
    }

    /// The manifest or index a tag names, or `None` when the tag does not exist.
    async fn get_tag(&self, tag: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        match self
            .client
            .pull_manifest_raw(
                &self.with_tag(tag),
                &self.auth,
                &[OCI_IMAGE_INDEX_MEDIA_TYPE],
            )
            .await
        {
            Ok((body, digest)) => {
                check_json_digest(&body, &digest, &format!("tag {tag}"))?;
                Ok(Some(body))
            }
            Err(e) => match classify(&self.registry, &format!("tag {tag}"), e) {
                RegistryError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    /// Pushes `sig` as an artifact whose subject is the manifest `subject` (`subject_size`
    /// bytes), then adds it to the referrers index at the tag `sha256-<hex>` (read, changed,
    /// written back: entries of other tools and other signatures are kept).
    async fn attach(
        &self,
        subject: &str,
        subject_size: i64,
        sig: &AttachedSignature,
    ) -> Result<AttachReport, RegistryError> {
        let key_id = sig
            .public_key()
            .map(|k| k.id())
            .unwrap_or_else(|_| "?".into());
        let doc = sig.to_bytes();
        let doc_digest = format!("sha256:{}", sha256_hex(&doc));
        self.ensure_blob(b"{}", layout::OCI_EMPTY_DIGEST, "the empty config")
            .await?;
        self.ensure_blob(&doc, &doc_digest, "the signature blob")
            .await?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": layout::OCI_MANIFEST,
            "artifactType": layout::SIGNATURE_ARTIFACT_TYPE,
            "config": {
                "mediaType": layout::OCI_EMPTY,
                "digest": layout::OCI_EMPTY_DIGEST,
                "size": 2,
            },
            "layers": [{
                "mediaType": layout::SIGNATURE_LAYER_MEDIA_TYPE,
                "digest": doc_digest,
                "size": doc.len(),
                "annotations": { "dev.smolvm.signed-by": key_id },
            }],
            "subject": {
                "mediaType": layout::OCI_MANIFEST,
                "digest": subject,
                "size": subject_size,
            },
            "annotations": { "dev.smolvm.signed-by": key_id },
        });
        let body = serde_json::to_vec(&manifest).expect("a manifest serializes");
        let digest = format!("sha256:{}", sha256_hex(&body));
        let size = body.len();
        self.client
            .push_manifest_raw(
                &self.with_digest(&digest),
                body,
                OCI_IMAGE_MEDIA_TYPE.parse().expect("a header value"),
            )
            .await
            .map_err(self.err("the signature manifest"))?;

        let tag = layout::referrers_tag(subject).ok_or_else(|| RegistryError::Corrupt {
            what: "the manifest digest".into(),
            detail: subject.to_string(),
        })?;
        // Keep whatever the index lists (other signatures, other tools' referrers), less an
        // entry for this very manifest.
        let mut entries: Vec<serde_json::Value> = match self.get_tag(&tag).await? {
            Some(body) => serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("manifests").and_then(|m| m.as_array()).cloned())
                .unwrap_or_default(),
            None => Vec::new(),
        };
        entries.retain(|e| e.get("digest").and_then(|d| d.as_str()) != Some(digest.as_str()));
        entries.push(serde_json::json!({
            "mediaType": layout::OCI_MANIFEST,
            "digest": digest,
            "size": size,
            "artifactType": layout::SIGNATURE_ARTIFACT_TYPE,
            "annotations": { "dev.smolvm.signed-by": key_id },
        }));
        let listed = entries.len();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": layout::OCI_INDEX,
            "manifests": entries,
        });
        self.client
            .push_manifest_raw(
                &self.with_tag(&tag),
                serde_json::to_vec(&index).expect("an index serializes"),
                OCI_IMAGE_INDEX_MEDIA_TYPE.parse().expect("a header value"),
            )
            .await
            .map_err(self.err("the referrers index"))?;
        Ok(AttachReport {
            subject: subject.to_string(),
            signature_manifest: digest,
            tag,
            listed,
            key_id,
        })
    }

    /// The attached signatures of the manifest `subject`, from its referrers tag.
    async fn attached(&self, subject: &str) -> Result<Vec<Attached>, RegistryError> {
        let Some(tag) = layout::referrers_tag(subject) else {
            return Ok(Vec::new());
        };
        let Some(body) = self.get_tag(&tag).await? else {
            return Ok(Vec::new());
        };
        let entries = match layout::classify(&body) {
            Ok(layout::Named::Index { entries, .. }) => layout::signature_entries(&entries),
            _ => return Ok(Vec::new()),
        };
        let mut out = Vec::new();
        for e in entries {
            let signature = self.fetch_signature(&e.digest, subject).await;
            out.push(Attached {
                manifest_digest: e.digest,
                signature,
            });
        }
        Ok(out)
    }

    async fn fetch_signature(
        &self,
        digest: &str,
        subject: &str,
    ) -> Result<AttachedSignature, RegistryError> {
        let what = format!("attached signature {digest}");
        let (body, _) = self
            .client
            .pull_manifest_raw(
                &self.with_digest(digest),
                &self.auth,
                &[OCI_IMAGE_MEDIA_TYPE],
            )
            .await
            .map_err(self.err(&what))?;
        check_json_digest(&body, digest, &what)?;
        let layer = layout::signature_manifest(&body, subject).map_err(|detail| {
            RegistryError::Corrupt {
                what: what.clone(),
                detail,
            }
        })?;
        let desc = OciDescriptor {
            media_type: layer.media_type.clone(),
            digest: layer.digest.clone(),
            size: layer.size,
            ..Default::default()
        };
        let mut doc = Vec::new();
        self.client
            .pull_blob(&self.reference, &desc, &mut doc)
            .await
            .map_err(self.err(&what))?;
        // The client checks the digest when the registry sends one; check it always.
        let got = format!("sha256:{}", sha256_hex(&doc));
        if got != layer.digest {
            return Err(RegistryError::Corrupt {
                what,
                detail: format!("its content hashes to {got}, not {}", layer.digest),
            });
        }
        AttachedSignature::parse(&doc).map_err(|e| RegistryError::Corrupt {
            what,
            detail: e.to_string(),
        })
    }
}

/// The attached signatures of the machine manifest `subject` in the repository of
/// `reference`.
pub fn attached_signatures(
    reference: &str,
    subject: &str,
    conn: &Connection,
) -> Result<Vec<Attached>, RegistryError> {
    let session = Session::new(reference, conn)?;
    runtime()?.block_on(async {
        session.login(RegistryOperation::Pull).await?;
        session.attached(subject).await
    })
}

/// `smolpack sign --key KEY REF`: pulls the machine REF names for this platform (into the
/// cache, checked as every pull), signs the whole file's bytes and attaches the signature.
pub fn sign_reference(
    reference: &str,
    key: &SecretKey,
    conn: &Connection,
) -> Result<AttachReport, RegistryError> {
    let report = pull(reference, &Destination::Cache, conn)?;
    let file = File::open(&report.path).map_err(io_err(&report.path))?;
    let (size, sha512) =
        smolvm_formats::signature::whole_digest(&file).map_err(file_err(&report.path))?;
    let sig = AttachedSignature::sign(key, size, &sha512);
    let session = Session::new(reference, conn)?;
    runtime()?.block_on(async {
        session.login(RegistryOperation::Push).await?;
        session
            .attach(&report.manifest_digest, report.manifest_size, &sig)
            .await
    })
}

/// `smolpack pull --cache --signatures`: writes the attached signatures of the pulled file
/// that were fetched intact (the documents, as a JSON array) beside the cached file, as
/// `sha256-HEX.signatures`; `None` when there are none. `smolvm run REF` with a trust key
/// checks them itself when the file carries no trusted signature inside.
pub fn cache_signatures(
    report: &PullReport,
    conn: &Connection,
) -> Result<Option<PathBuf>, RegistryError> {
    let found = attached_signatures(&report.reference, &report.manifest_digest, conn)?;
    let docs: Vec<AttachedSignature> = found.into_iter().filter_map(|a| a.signature.ok()).collect();
    if docs.is_empty() {
        return Ok(None);
    }
    let path = signatures_path(&report.config.sha256);
    let out = AtomicFile::create(&path).map_err(file_err(&path))?;
    let mut w = out.file();
    w.write_all(&serde_json::to_vec(&docs).expect("signatures serialize"))
        .map_err(io_err(out.tmp_path()))?;
    out.commit(Some(0o644)).map_err(file_err(&path))?;
    Ok(Some(path))
}

/// The attached signatures file beside a cached file whose SHA-256 is `digest`.
pub fn signatures_path(digest: &str) -> PathBuf {
    machines_dir().join(format!("{}.signatures", digest.replace(':', "-")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries() {
        for yes in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:80",
            "127.1.2.3",
            "[::1]:5000",
        ] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in [
            "ghcr.io",
            "10.0.0.1:5000",
            "localhost.example.com",
            "[::2]:1",
        ] {
            assert!(!is_loopback(no), "{no}");
        }
    }

    #[test]
    fn docker_config_credentials() {
        let text = r#"{"auths": {
            "https://ghcr.io": {"auth": "dXNlcjpwYTpzcw=="},
            "127.0.0.1:5000": {"username": "u", "password": "p"},
            "https://index.docker.io/v1/": {"auth": "aHViOmh1Yg=="},
            "quay.io": {"identitytoken": "tok"}
        }}"#;
        let basic = |u: &str, p: &str| Some(RegistryAuth::Basic(u.into(), p.into()));
        assert_eq!(
            credentials_from_config(text, "ghcr.io"),
            basic("user", "pa:ss")
        );
        assert_eq!(
            credentials_from_config(text, "127.0.0.1:5000"),
            basic("u", "p")
        );
        assert_eq!(
            credentials_from_config(text, "index.docker.io"),
            basic("hub", "hub")
        );
        assert_eq!(credentials_from_config(text, "quay.io"), None);
        assert_eq!(credentials_from_config("not json", "ghcr.io"), None);
    }

    #[test]
    fn credential_helpers_are_found_and_run() {
        let text = r#"{"credsStore": "desktop",
            "credHelpers": {"ghcr.io": "gh", "127.0.0.1:5000": "../evil"},
            "auths": {"quay.io": {"auth": "dTpw"}}}"#;
        assert_eq!(credential_helper(text, "ghcr.io").as_deref(), Some("gh"));
        assert_eq!(
            credential_helper(text, "quay.io").as_deref(),
            Some("desktop")
        );
        // A name that is not a plain word is never run.
        assert_eq!(credential_helper(text, "127.0.0.1:5000"), None);
        assert_eq!(credential_helper(r#"{"auths": {}}"#, "ghcr.io"), None);
        assert_eq!(
            helper_answer(br#"{"ServerURL":"ghcr.io","Username":"me","Secret":"s3"}"#),
            Some(RegistryAuth::Basic("me".into(), "s3".into()))
        );
        assert_eq!(
            helper_answer(br#"{"Username":"<token>","Secret":"t"}"#),
            None
        );
        assert_eq!(helper_answer(b"credentials not found"), None);

        // A fake helper on PATH: it gets `get` and the registry on stdin.
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("docker-credential-fake");
        fs::write(
            &script,
            "#!/bin/sh\n[ \"$1\" = get ] || exit 2\nread host\n\
             [ \"$host\" = reg.example:5000 ] || { echo 'credentials not found'; exit 1; }\n\
             echo '{\"ServerURL\":\"reg.example:5000\",\"Username\":\"bob\",\"Secret\":\"pw\"}'\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            run_credential_helper(&script, "reg.example:5000"),
            Some(RegistryAuth::Basic("bob".into(), "pw".into()))
        );
        assert_eq!(run_credential_helper(&script, "other.example"), None);
        assert_eq!(
            run_credential_helper(&dir.path().join("missing"), "reg.example:5000"),
            None
        );
        // The helper first, the `auths` entry when it has nothing.
        let cfg = r#"{"credHelpers": {"reg.example:5000": "fake", "other.example": "fake"},
            "auths": {"other.example": {"auth": "dTpw"}, "plain.example": {"auth": "dTpw"}}}"#;
        let with = |registry: &str| {
            credentials_with(cfg, registry, |name| {
                assert_eq!(name, "fake");
                run_credential_helper(&script, registry)
            })
        };
        assert_eq!(
            with("reg.example:5000"),
            RegistryAuth::Basic("bob".into(), "pw".into())
        );
        assert_eq!(
            with("other.example"),
            RegistryAuth::Basic("u".into(), "p".into())
        );
        assert_eq!(
            with("plain.example"),
            RegistryAuth::Basic("u".into(), "p".into())
        );
        assert_eq!(with("none.example"), RegistryAuth::Anonymous);
    }

    #[test]
    fn cache_paths_are_content_addressed() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let p = cache_path(&d);
        assert!(p.ends_with(format!("machines/sha256-{}", "ab".repeat(32))));
    }

    #[test]
    fn exit_codes() {
        let r = |d: &str| d.to_string();
        assert_eq!(
            RegistryError::Unreachable {
                registry: r("a"),
                detail: r("b")
            }
            .exit_code(),
            3
        );
        assert_eq!(
            RegistryError::NotFound {
                registry: r("a"),
                what: r("b")
            }
            .exit_code(),
            4
        );
        assert_eq!(
            RegistryError::Corrupt {
                what: r("a"),
                detail: r("b")
            }
            .exit_code(),
            5
        );
    }
}
