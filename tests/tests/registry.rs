//! `smolpack push`/`pull`, `smolpack verify --key PUB REF` and `smolvm run REF` against a
//! real OCI registry: Debian's `docker-registry` (distribution 2.8) started per test as an
//! ordinary process on a free loopback port, with a config file and storage in a temp dir.
//!
//! Without `/usr/bin/docker-registry` (or `SMOLVM_REGISTRY`) the tests skip loudly, except
//! under `CI=true`, where they fail (scripts/setup installs it). The `smolvm run REF` tests
//! also need /dev/kvm and the test guest (same rule). Every process has a deadline.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use smolvm_formats::{Compression, MachineReader, Manifest, SectionKind};

mod build_util;
#[path = "../../stub/tests/common/mod.rs"]
mod vmm_common;

use build_util::describe;

const DEADLINE: Duration = Duration::from_secs(120);

/// A registry process, killed (and its storage removed) when dropped.
struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn registry_binary(test: &str) -> Option<PathBuf> {
    let bin = std::env::var_os("SMOLVM_REGISTRY")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/docker-registry"));
    if bin.is_file() {
        return Some(bin);
    }
    let why = format!(
        "{test} needs the OCI registry {} (apt-get install docker-registry; scripts/setup does)",
        bin.display()
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why} (CI=true requires it)");
    }
    eprintln!("SKIPPED: {why}");
    None
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl Registry {
    fn start(test: &str) -> Option<Registry> {
        let bin = registry_binary(test)?;
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("temp dir");
            let port = free_port();
            let config = dir.path().join("config.yml");
            fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n\
                     http:\n  addr: 127.0.0.1:{port}\n",
                    dir.path().join("storage").display()
                ),
            )
            .unwrap();
            let log = fs::File::create(dir.path().join("registry.log")).unwrap();
            let child = Command::new(&bin)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("starting docker-registry");
            let mut r = Registry { child, port, dir };
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(20) {
                if r.get("/v2/", "*/*").is_some_and(|(s, _)| s == 200) {
                    return Some(r);
                }
                if r.child.try_wait().unwrap().is_some() {
                    break; // the port was taken meanwhile: try another
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("docker-registry did not start");
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn reference(&self, name_tag: &str) -> String {
        format!("{}/{name_tag}", self.host())
    }

    /// A plain HTTP/1.0 GET: status and body.
    fn get(&self, path: &str, accept: &str) -> Option<(u16, Vec<u8>)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: {accept}\r\n\r\n"
        )
        .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).ok()?;
        let split = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&buf[..split]).to_string();
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, buf[split + 4..].to_vec()))
    }

    /// The platform manifest a tag names (through its index).
    fn manifest(&self, repo: &str, tag: &str) -> serde_json::Value {
        let (s, body) = self
            .get(
                &format!("/v2/{repo}/manifests/{tag}"),
                "application/vnd.oci.image.index.v1+json",
            )
            .expect("GET index");
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
        let index: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(index["artifactType"], "application/vnd.smolvm.machine.v1");
        let entries = index["manifests"].as_array().unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0]["platform"]["architecture"], "amd64");
        assert_eq!(entries[0]["platform"]["os"], "linux");
        let digest = entries[0]["digest"].as_str().unwrap();
        let (s, body) = self
            .get(
                &format!("/v2/{repo}/manifests/{digest}"),
                "application/vnd.oci.image.manifest.v1+json",
            )
            .expect("GET manifest");
        assert_eq!(s, 200);
        serde_json::from_slice(&body).unwrap()
    }

    /// The JSON a tag or digest names (index accepted), or `None` when it does not exist.
    fn json(&self, repo: &str, reference: &str) -> Option<serde_json::Value> {
        let (s, body) = self
            .get(
                &format!("/v2/{repo}/manifests/{reference}"),
                "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json",
            )
            .expect("GET manifest");
        (s == 200).then(|| serde_json::from_slice(&body).unwrap())
    }

    /// Every blob file of the storage (layers, configs, manifests, indexes).
    fn blob_files(&self) -> Vec<PathBuf> {
        let root = self
            .dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256");
        let mut out = Vec::new();
        for a in fs::read_dir(&root).into_iter().flatten().flatten() {
            for b in fs::read_dir(a.path()).into_iter().flatten().flatten() {
                out.push(b.path().join("data"));
            }
        }
        out.sort();
        out
    }

    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir.path().join(format!(
            "storage/docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    }
}

/// Runs `cmd` with piped output and a deadline.
fn run(mut cmd: Command) -> Output {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let a = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = so.read_to_end(&mut b);
        b
    });
    let b = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = se.read_to_end(&mut b);
        b
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} hung");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: a.join().unwrap(),
        stderr: b.join().unwrap(),
    }
}

/// A scratch area: its own machine cache and no Docker credentials or trust keys.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn cache(&self) -> PathBuf {
        self.path("cache")
    }
    fn env(&self, cmd: &mut Command) {
        cmd.env("SMOLVM_CACHE", self.cache())
            .env("DOCKER_CONFIG", self.path("docker"))
            .env("SMOLVM_TRUST_DIR", self.path("no-trust"))
            .env_remove("SMOLVM_TRUST")
            .env_remove("XDG_CACHE_HOME");
    }
    fn smolpack(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(build_util::bin("smolpack", "smolpack"));
        cmd.args(args);
        self.env(&mut cmd);
        run(cmd)
    }
    fn ok(&self, args: &[&str]) -> String {
        let o = self.smolpack(args);
        assert!(o.status.success(), "smolpack {args:?}: {}", describe(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The one `error: ...` line and the exit status of a failed smolpack.
fn failure(o: &Output) -> (i32, String) {
    assert!(!o.status.success(), "expected a failure: {}", describe(o));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "one line: {}", describe(o));
    (o.status.code().expect("an exit status"), err)
}

/// The number after `key` in a summary line ("3 blobs uploaded").
fn count(summary: &str, key: &str) -> usize {
    let at = summary
        .find(key)
        .unwrap_or_else(|| panic!("{key} in {summary}"));
    summary[..at]
        .split_whitespace()
        .last()
        .unwrap()
        .parse()
        .unwrap()
}

/// A machine whose memory holds `fill` in a few pages and which has a disk; never resumed.
fn machine(path: &Path, fill: u8, disk_fill: u8) {
    machine_for(path, fill, disk_fill, smolvm_formats::Arch::X86_64)
}

/// The same for a guest architecture (the header says which; never resumed).
fn machine_for(path: &Path, fill: u8, disk_fill: u8, arch: smolvm_formats::Arch) {
    use smolvm_formats::{GuestRegion, MachineWriter};
    let mut mem = vec![0u8; 256 * 4096];
    mem[4096..3 * 4096].fill(fill);
    mem[100 * 4096..110 * 4096].fill(fill ^ 0x55);
    let mut disk = tempfile::tempfile().unwrap();
    disk.write_all(&vec![disk_fill; 300 * 1024]).unwrap();
    let mut w = MachineWriter::create(path, arch).unwrap();
    w.add_manifest(&Manifest {
        name: "regtest".into(),
        producer: "smolvm-tests".into(),
        vcpus: 1,
        memory_bytes: mem.len() as u64,
        host_profile: "kvm".into(),
        ..Default::default()
    })
    .unwrap();
    w.add_blob(SectionKind::VmState, b"state", Compression::None)
        .unwrap();
    w.add_memory(
        &[GuestRegion {
            guest_addr: 0,
            data: &mem,
        }],
        Compression::None,
    )
    .unwrap();
    w.add_disk("root", &mut disk, Compression::None).unwrap();
    w.finish().unwrap();
}

fn sha256_file(p: &Path) -> String {
    format!("{:x}", Sha256::digest(fs::read(p).unwrap()))
}

#[test]
fn push_then_pull_gives_the_same_bytes_with_one_layer_per_component() {
    let Some(reg) = Registry::start("push_then_pull_gives_the_same_bytes") else {
        return;
    };
    let sc = Scratch::new();
    let m = sc.path("m.smolmachine");
    machine(&m, 0x11, 0x22);
    let r = reg.reference("team/regtest:v1");
    let out = sc.ok(&["push", s(&m), &r]);
    assert!(out.starts_with(&format!("pushed {r}")), "{out}");

    // The layout: artifact type, config, one titled layer per component at its offset.
    let mf = reg.manifest("team/regtest", "v1");
    assert_eq!(mf["artifactType"], "application/vnd.smolvm.machine.v1");
    assert_eq!(
        mf["config"]["mediaType"],
        "application/vnd.smolvm.machine.config.v1+json"
    );
    let titles: Vec<&str> = mf["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l["annotations"]["org.opencontainers.image.title"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(
        titles,
        ["header", "manifest", "vm-state", "memory", "disk.0", "table"]
    );
    for l in mf["layers"].as_array().unwrap() {
        assert!(l["mediaType"]
            .as_str()
            .unwrap()
            .starts_with("application/vnd.smolvm.machine."));
        assert!(l["annotations"]["dev.smolvm.offset"].is_string());
    }

    let back = sc.path("back.smolmachine");
    let out = sc.ok(&["pull", &r, "-o", s(&back)]);
    assert!(out.contains("6 blobs downloaded"), "{out}");
    assert_eq!(
        fs::read(&back).unwrap(),
        fs::read(&m).unwrap(),
        "byte for byte"
    );
    assert_eq!(
        fs::metadata(&back).unwrap().permissions().mode() & 0o111,
        0,
        "a machine is not executable"
    );
    // Nothing left behind: no temp files, no blobs in the cache once assembled.
    let names: Vec<_> = fs::read_dir(sc.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    let blobs = sc.cache().join("machines/blobs");
    assert_eq!(fs::read_dir(&blobs).unwrap().count(), 0);

    // By digest, and into the content-addressed cache.
    let digest = out.split(['(', ')']).nth(1).unwrap().to_string();
    assert!(digest.starts_with("sha256:"), "{out}");
    let by_digest = reg.reference(&format!("team/regtest@{digest}"));
    let cached = sc.ok(&["pull", &by_digest, "--cache"]);
    let cached = PathBuf::from(cached.trim());
    assert_eq!(
        cached,
        sc.cache()
            .join(format!("machines/sha256-{}", sha256_file(&m)))
    );
    assert_eq!(fs::read(&cached).unwrap(), fs::read(&m).unwrap());
    // A second pull finds it there and downloads nothing.
    let again = sc.ok(&["pull", &r, "-o", s(&sc.path("again.smolmachine"))]);
    assert!(again.contains("already in the cache"), "{again}");
    assert_eq!(
        fs::read(sc.path("again.smolmachine")).unwrap(),
        fs::read(&m).unwrap()
    );
}

#[test]
fn packed_executables_round_trip_and_pull_pack_makes_one() {
    let Some(reg) = Registry::start("packed_executables_round_trip") else {
        return;
    };
    let sc = Scratch::new();
    let m = sc.path("m.smolmachine");
    machine(&m, 0x33, 0x44);
    let app = sc.path("app");
    sc.ok(&["pack", s(&m), "-o", s(&app)]);
    let r = reg.reference("packed:1");
    sc.ok(&["push", s(&app), &r]);
    let titles: Vec<String> = reg.manifest("packed", "1")["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l["annotations"]["org.opencontainers.image.title"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(titles.first().map(String::as_str), Some("stub"));
    assert_eq!(titles.last().map(String::as_str), Some("trailer"));
    let back = sc.path("back");
    sc.ok(&["pull", &r, "-o", s(&back)]);
    assert_eq!(fs::read(&back).unwrap(), fs::read(&app).unwrap());
    assert_eq!(
        fs::metadata(&back).unwrap().permissions().mode() & 0o111,
        0o111
    );

    // A pushed machine pulled with --pack: a packed executable for this host.
    let rm = reg.reference("plain:1");
    sc.ok(&["push", s(&m), &rm]);
    let packed = sc.path("packed");
    let out = sc.ok(&["pull", &rm, "--pack", "-o", s(&packed)]);
    assert!(out.contains("packed "), "{out}");
    let r = MachineReader::open(&packed).unwrap();
    assert!(r.trailer().is_some(), "a packed executable");
    assert_eq!(r.manifest().unwrap().name, "regtest");
    assert_eq!(
        fs::metadata(&packed).unwrap().permissions().mode() & 0o111,
        0o111
    );
}

#[test]
fn a_second_push_uploads_only_the_changed_layers() {
    let Some(reg) = Registry::start("a_second_push_uploads_only_the_changed_layers") else {
        return;
    };
    let sc = Scratch::new();
    let a = sc.path("a.smolmachine");
    let b = sc.path("b.smolmachine");
    machine(&a, 0x01, 0x77);
    machine(&b, 0x02, 0x77); // same disk, manifest and state; other memory
    let r = reg.reference("app:latest");
    let first = sc.ok(&["push", s(&a), &r]);
    assert_eq!(
        count(&first, "blobs uploaded"),
        7,
        "config and six layers: {first}"
    );
    let before = reg.blob_files().len();
    let second = sc.ok(&["push", s(&b), &r]);
    // Changed: the memory, the table (its checksums), the header (its checksum covers the
    // table) and the config (the file's hash). Kept: manifest, vm-state, disk.
    assert_eq!(count(&second, "blobs uploaded"), 4, "{second}");
    assert_eq!(count(&second, "already there"), 3, "{second}");
    // The registry's storage grew by those four plus the new manifest and index.
    assert_eq!(reg.blob_files().len(), before + 4 + 2);
    // Pushing the same file again uploads nothing.
    let third = sc.ok(&["push", s(&b), &r]);
    assert_eq!(count(&third, "blobs uploaded"), 0, "{third}");
    let back = sc.path("back");
    sc.ok(&["pull", &r, "-o", s(&back)]);
    assert_eq!(fs::read(&back).unwrap(), fs::read(&b).unwrap());
}

#[test]
fn a_corrupted_blob_in_the_registry_is_refused() {
    let Some(reg) = Registry::start("a_corrupted_blob_in_the_registry_is_refused") else {
        return;
    };
    let sc = Scratch::new();
    let m = sc.path("m.smolmachine");
    machine(&m, 0x05, 0x06);
    let r = reg.reference("bad:1");
    sc.ok(&["push", s(&m), &r]);
    let mf = reg.manifest("bad", "1");
    let memory = mf["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["annotations"]["org.opencontainers.image.title"] == "memory")
        .unwrap();
    let digest = memory["digest"].as_str().unwrap();
    let blob = reg.blob_file(digest);
    let mut bytes = fs::read(&blob).unwrap();
    bytes[100] ^= 0xff;
    fs::write(&blob, &bytes).unwrap();

    let out = sc.path("out.smolmachine");
    let o = sc.smolpack(&["pull", &r, "-o", s(&out)]);
    let (code, line) = failure(&o);
    assert_eq!(code, 5, "{line}");
    assert!(
        line.starts_with(&format!("error: cannot pull {r}: refused layer memory")),
        "{line}"
    );
    assert!(!out.exists(), "nothing under the output name");
    // The bad blob is not kept; a retry is refused the same way.
    let blobs = sc.cache().join("machines/blobs");
    let hex = digest.strip_prefix("sha256:").unwrap();
    for e in fs::read_dir(&blobs).unwrap() {
        let n = e.unwrap().file_name().into_string().unwrap();
        assert!(!n.contains(hex), "{n} kept");
    }
    let (code, _) = failure(&sc.smolpack(&["pull", &r, "--cache"]));
    assert_eq!(code, 5);
}

#[test]
fn wrong_tags_and_unreachable_registries_get_one_line_and_their_status() {
    let Some(reg) = Registry::start("wrong_tags_and_unreachable_registries") else {
        return;
    };
    let sc = Scratch::new();
    let m = sc.path("m.smolmachine");
    machine(&m, 0x07, 0x08);
    sc.ok(&["push", s(&m), &reg.reference("known:1")]);
    for r in [reg.reference("known:2"), reg.reference("unknown:1")] {
        let (code, line) = failure(&sc.smolpack(&["pull", &r, "-o", s(&sc.path("x"))]));
        assert_eq!(code, 4, "{line}");
        assert!(line.contains("not found in"), "{line}");
    }
    // Nothing listens on this port.
    let closed = format!("127.0.0.1:{}/app:1", free_port());
    let (code, line) = failure(&sc.smolpack(&["pull", &closed, "-o", s(&sc.path("x"))]));
    assert_eq!(code, 3, "{line}");
    assert!(line.contains("cannot reach registry 127.0.0.1:"), "{line}");
    let (code, line) = failure(&sc.smolpack(&["push", s(&m), &closed]));
    assert_eq!(code, 3, "{line}");
    // smolvm run REF: the same cause, as smolvm's one line, status 125.
    let mut cmd = Command::new(build_util::bin("smolvm", "smolvm"));
    cmd.args(["run", &closed]);
    sc.env(&mut cmd);
    let o = run(cmd);
    let (code, line) = failure(&o);
    assert_eq!(code, 125, "{line}");
    assert!(
        line.starts_with(&format!("smolvm: cannot pull {closed}: cannot reach")),
        "{line}"
    );
    // A path that does not exist and is no reference stays a missing file.
    let mut cmd = Command::new(build_util::bin("smolvm", "smolvm"));
    cmd.args(["run", "no/such/file.smolmachine"]);
    let (code, line) = failure(&run(cmd));
    assert_eq!(code, 125);
    assert!(!line.contains("pull"), "{line}");
}

#[test]
fn a_killed_pull_resumes_from_its_verified_and_partial_blobs() {
    let Some(reg) = Registry::start("a_killed_pull_resumes") else {
        return;
    };
    let sc = Scratch::new();
    let m = sc.path("m.smolmachine");
    machine(&m, 0x09, 0x0a);
    let r = reg.reference("resume:1");
    sc.ok(&["push", s(&m), &r]);
    let mf = reg.manifest("resume", "1");
    let layer = |title: &str| {
        mf["layers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["annotations"]["org.opencontainers.image.title"] == title)
            .unwrap()
            .clone()
    };
    let bytes_of = |l: &serde_json::Value| {
        let off: usize = l["annotations"]["dev.smolvm.offset"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let len = l["size"].as_u64().unwrap() as usize;
        fs::read(&m).unwrap()[off..off + len].to_vec()
    };
    // What a pull killed mid-way leaves: the memory blob verified, half of the disk blob.
    let blobs = sc.cache().join("machines/blobs");
    fs::create_dir_all(&blobs).unwrap();
    let mem = layer("memory");
    let disk = layer("disk.0");
    let name = |l: &serde_json::Value| l["digest"].as_str().unwrap().replace(':', "-");
    fs::write(blobs.join(name(&mem)), bytes_of(&mem)).unwrap();
    let d = bytes_of(&disk);
    fs::write(
        blobs.join(format!("{}.partial", name(&disk))),
        &d[..d.len() / 2],
    )
    .unwrap();
    let back = sc.path("back");
    let out = sc.ok(&["pull", &r, "-o", s(&back)]);
    assert_eq!(count(&out, "from the cache"), 1, "{out}");
    assert_eq!(count(&out, "resumed"), 1, "{out}");
    assert_eq!(fs::read(&back).unwrap(), fs::read(&m).unwrap());
}

#[test]
fn verify_by_reference_checks_the_signature_inside() {
    let Some(reg) = Registry::start("verify_by_reference") else {
        return;
    };
    let sc = Scratch::new();
    let m = sc.path("m.smolmachine");
    machine(&m, 0x0b, 0x0c);
    let key = sc.path("rel");
    sc.ok(&["keygen", "-o", s(&key)]);
    let unsigned = reg.reference("sig:unsigned");
    sc.ok(&["push", s(&m), &unsigned]);
    sc.ok(&["sign", "--key", &format!("{}.key", s(&key)), s(&m)]);
    let signed = reg.reference("sig:signed");
    sc.ok(&["push", s(&m), &signed]);
    let pub_key = format!("{}.pub", s(&key));
    let out = sc.ok(&["verify", "--key", &pub_key, &signed]);
    assert!(
        out.starts_with("ok: ") && out.contains("signed by key"),
        "{out}"
    );
    assert_eq!(
        reg.manifest("sig", "signed")["layers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["mediaType"] == "application/vnd.smolvm.machine.signature.v1")
            .count(),
        1
    );
    let (code, line) = failure(&sc.smolpack(&["verify", "--key", &pub_key, &unsigned]));
    assert_eq!(code, 1);
    assert!(line.contains("not signed"), "{line}");
}

/// The test guest, snapshotted mid-count; `smolvm run REF` pulls it through smolpack and
/// resumes it; `pull --pack` gives a runnable executable.
#[test]
fn smolvm_runs_a_reference_and_pull_pack_runs() {
    let test = "smolvm_runs_a_reference_and_pull_pack_runs";
    if !vmm_common::kvm_ready(test) {
        return;
    }
    let Some(reg) = Registry::start(test) else {
        return;
    };
    let sc = Scratch::new();
    let params = smolvm::testguest::Params {
        report_every: 1000,
        limit: 10_000,
        exit_status: 7,
    };
    let (guest, _) = smolvm::testguest::boot_and_pause_at(&params, 3).expect("boot and pause");
    let m = sc.path("guest.smolmachine");
    guest
        .save(
            &m,
            &Manifest {
                name: "testguest".into(),
                ..Default::default()
            },
            Compression::None,
        )
        .expect("save");
    drop(guest);
    let r = reg.reference("guest:1");
    sc.ok(&["push", s(&m), &r]);
    let smolvm = build_util::bin("smolvm", "smolvm");
    for attempt in ["pulled", "cached"] {
        let mut cmd = Command::new(&smolvm);
        cmd.args(["run", &r]);
        sc.env(&mut cmd);
        let o = run(cmd);
        assert_eq!(o.status.code(), Some(7), "{attempt}: {}", describe(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("smolvm test guest"),
            "{attempt}: {}",
            describe(&o)
        );
    }
    let cached = sc
        .cache()
        .join(format!("machines/sha256-{}", sha256_file(&m)));
    assert_eq!(fs::read(&cached).unwrap(), fs::read(&m).unwrap());
    // With a trust key: the unsigned machine is refused after the pull, before it runs;
    // the signed one (pushed under another tag) runs.
    let key = sc.path("rel");
    sc.ok(&["keygen", "-o", s(&key)]);
    let pub_key = format!("{}.pub", s(&key));
    let mut cmd = Command::new(&smolvm);
    cmd.args(["run", "--trust", &pub_key, &r]);
    sc.env(&mut cmd);
    let o = run(cmd);
    let (code, line) = failure(&o);
    assert_eq!(code, 125, "{line}");
    assert!(line.contains("not signed"), "{line}");
    assert!(o.stdout.is_empty(), "nothing ran: {}", describe(&o));
    sc.ok(&["sign", "--key", &format!("{}.key", s(&key)), s(&m)]);
    let signed = reg.reference("guest:signed");
    sc.ok(&["push", s(&m), &signed]);
    let mut cmd = Command::new(&smolvm);
    cmd.args(["run", "--trust", &pub_key, &signed]);
    sc.env(&mut cmd);
    let o = run(cmd);
    assert_eq!(o.status.code(), Some(7), "{}", describe(&o));

    let app = sc.path("app");
    sc.ok(&["pull", &r, "--pack", "-o", s(&app)]);
    let mut cmd = Command::new(&app);
    sc.env(&mut cmd);
    let o = run(cmd);
    assert_eq!(o.status.code(), Some(7), "{}", describe(&o));
}

/// The platform manifest digest a pushed tag's index names for `architecture`.
fn entry_digest(index: &serde_json::Value, architecture: &str) -> String {
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["platform"]["architecture"] == architecture)
        .unwrap_or_else(|| panic!("no {architecture} entry in {index}"))["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `push --key` and `sign --key K REF` attach signatures through the referrers tag schema
/// (`sha256-HEX` names an index of signature manifests whose subject is the machine's);
/// `verify --key PUB REF` and `smolvm run --trust PUB REF` accept an unsigned machine
/// through them, and refuse a wrong key or a tampered signature.
#[test]
fn attached_signatures_are_found_verified_and_refused() {
    let Some(reg) = Registry::start("attached_signatures") else {
        return;
    };
    let sc = Scratch::new();
    let m = sc.path("m.smolmachine");
    machine(&m, 0x21, 0x22);
    for k in ["rel", "other", "third"] {
        sc.ok(&["keygen", "-o", s(&sc.path(k))]);
    }
    let key = |k: &str, ext: &str| format!("{}.{ext}", s(&sc.path(k)));
    let r = reg.reference("att:1");
    let out = sc.ok(&["push", "--key", &key("rel", "key"), s(&m), &r]);
    assert!(out.contains("attached signature sha256:"), "{out}");

    // The fallback tag: an index listing one signature manifest, whose subject is the
    // machine's manifest and whose one layer is the signature document.
    let subject = entry_digest(&reg.json("att", "1").unwrap(), "amd64");
    let tag = subject.replace(':', "-");
    let index = reg.json("att", &tag).expect("the referrers tag exists");
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{index}");
    assert_eq!(
        entries[0]["artifactType"],
        "application/vnd.smolvm.signature.v1"
    );
    let sig_manifest = reg
        .json("att", entries[0]["digest"].as_str().unwrap())
        .unwrap();
    assert_eq!(sig_manifest["subject"]["digest"], subject.as_str());
    assert_eq!(
        sig_manifest["layers"][0]["mediaType"],
        "application/vnd.smolvm.signature.v1+json"
    );
    let doc_digest = sig_manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();

    // Found and verified; the machine itself is unsigned.
    let out = sc.ok(&["verify", "--key", &key("rel", "pub"), &r]);
    assert!(out.contains("attached signature sha256:"), "{out}");
    // Another key: refused, one line, status 1.
    let (code, line) = failure(&sc.smolpack(&["verify", "--key", &key("other", "pub"), &r]));
    assert_eq!(code, 1, "{line}");
    assert!(line.contains("not a trusted key"), "{line}");
    // An unsigned push with nothing attached.
    let bare = reg.reference("att:bare");
    let m2 = sc.path("m2.smolmachine");
    machine(&m2, 0x23, 0x24);
    sc.ok(&["push", s(&m2), &bare]);
    let (code, line) = failure(&sc.smolpack(&["verify", "--key", &key("rel", "pub"), &bare]));
    assert_eq!(code, 1, "{line}");
    assert!(line.contains("no signature is attached"), "{line}");

    // `sign --key K REF` attaches a second signature; the index keeps both.
    let out = sc.ok(&["sign", "--key", &key("other", "key"), &r]);
    assert!(out.contains("2 signatures"), "{out}");
    assert_eq!(
        reg.json("att", &tag).unwrap()["manifests"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    sc.ok(&["verify", "--key", &key("other", "pub"), &r]);

    // smolvm run --trust: the wrong key is refused before anything runs; the right one gets
    // past the trust check (this test machine then fails to resume, for another reason).
    let smolvm = |trust: &str| {
        let mut cmd = Command::new(build_util::bin("smolvm", "smolvm"));
        cmd.args(["run", "--trust", trust, &r]);
        sc.env(&mut cmd);
        run(cmd)
    };
    let (code, line) = failure(&smolvm(&key("third", "pub")));
    assert_eq!(code, 125, "{line}");
    assert!(line.contains("refusing to run it"), "{line}");
    let o = smolvm(&key("rel", "pub"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !err.contains("refusing") && !err.contains("signed") && !err.contains("cannot pull"),
        "past the trust check: {}",
        describe(&o)
    );
    // Past it: the test machine's fake state (or host profile) stops the resume.
    assert!(err.contains("cannot resume"), "{}", describe(&o));

    // Tampered: the signature document in the registry's storage changed. Refused with
    // that key; the other signature still verifies for its key.
    let blob = reg.blob_file(&doc_digest);
    let mut bytes = fs::read(&blob).unwrap();
    let at = bytes.len() - 10;
    bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
    fs::write(&blob, &bytes).unwrap();
    let (code, line) = failure(&sc.smolpack(&["verify", "--key", &key("rel", "pub"), &r]));
    assert_eq!(code, 1, "{line}");
    assert!(line.contains("verifies"), "{line}");
    sc.ok(&["verify", "--key", &key("other", "pub"), &r]);
    let (code, line) = failure(&smolvm(&key("rel", "pub")));
    assert_eq!(code, 125, "{line}");
    assert!(line.contains("refusing to run it"), "{line}");
}

/// One tag, two platforms: an aarch64 push keeps the x86_64 entry and the other way round;
/// a re-push replaces only its platform's entry; a tag without this host's platform is one
/// line and status 4.
#[test]
fn one_reference_serves_several_platforms() {
    let Some(reg) = Registry::start("one_reference_serves_several_platforms") else {
        return;
    };
    let sc = Scratch::new();
    let x86 = sc.path("x86.smolmachine");
    let arm = sc.path("arm.smolmachine");
    let x86b = sc.path("x86b.smolmachine");
    machine(&x86, 0x31, 0x32);
    machine_for(&arm, 0x33, 0x34, smolvm_formats::Arch::Aarch64);
    machine(&x86b, 0x35, 0x36);
    let r = reg.reference("multi:1");
    sc.ok(&["push", s(&x86), &r]);
    sc.ok(&["push", s(&arm), &r]);
    let index = reg.json("multi", "1").unwrap();
    let arches: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["platform"]["architecture"].as_str().unwrap())
        .collect();
    assert_eq!(arches, ["amd64", "arm64"], "{index}");
    let arm_digest = entry_digest(&index, "arm64");
    let x86_digest = entry_digest(&index, "amd64");
    // Pull picks the host's platform.
    let back = sc.path("back");
    sc.ok(&["pull", &r, "-o", s(&back)]);
    assert_eq!(fs::read(&back).unwrap(), fs::read(&x86).unwrap());
    // Re-push x86_64: its entry changes, the arm64 one stays.
    sc.ok(&["push", s(&x86b), &r]);
    let index = reg.json("multi", "1").unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2);
    assert_eq!(entry_digest(&index, "arm64"), arm_digest);
    assert_ne!(entry_digest(&index, "amd64"), x86_digest);
    sc.ok(&["pull", &r, "-o", s(&back)]);
    assert_eq!(fs::read(&back).unwrap(), fs::read(&x86b).unwrap());
    // Only arm64 at a tag: not found for this host, one line, status 4.
    let only_arm = reg.reference("multi:arm");
    sc.ok(&["push", s(&arm), &only_arm]);
    let (code, line) = failure(&sc.smolpack(&["pull", &only_arm, "-o", s(&sc.path("x"))]));
    assert_eq!(code, 4, "{line}");
    assert!(
        line.contains("has no machine for this host's platform linux/amd64 (it has: linux/arm64)"),
        "{line}"
    );
}
