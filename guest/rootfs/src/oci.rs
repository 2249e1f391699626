//! The OCI base: an image archive (`docker save` output, an OCI image-layout tar, or an
//! unpacked layout directory) whose layers are applied in order into the staging tree.
//!
//! Layers are tar streams, gzip- or zstd-compressed or plain (recognised by their magic
//! bytes, not their declared media type, which older tools get wrong). Each layer is read
//! twice: first its whiteouts (`.wh.NAME` deletes NAME, `.wh..wh..opq` empties its
//! directory) are applied to what the lower layers left, then its entries are extracted.
//! That keeps an opaque marker from deleting entries of its own layer, whatever the order
//! of entries in the stream. Owners, modes, times, symlinks, hard links, device nodes and
//! `SCHILY.xattr.*` attributes come from the tar headers. Every path is resolved inside the
//! staging root, so a hostile layer (`../..`, a symlink to `/`) cannot write outside it.

use std::fs;
use std::io::{self, Read, Seek};
use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::fsutil::{
    clear_for, lchown, mknod, remove_any, resolve_in_root, set_mode, set_mtime, set_xattr,
};
use crate::{Error, Result};

/// The image configuration relevant to running it: what `docker run` would use by default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct OciConfig {
    /// `KEY=value` environment entries.
    #[serde(rename = "Env", default, deserialize_with = "null_as_empty")]
    pub env: Vec<String>,
    /// The entrypoint argv.
    #[serde(rename = "Entrypoint", default, deserialize_with = "null_as_empty")]
    pub entrypoint: Vec<String>,
    /// The default command argv.
    #[serde(rename = "Cmd", default, deserialize_with = "null_as_empty")]
    pub cmd: Vec<String>,
    /// The working directory (empty when unset).
    #[serde(rename = "WorkingDir", default, deserialize_with = "null_as_empty")]
    pub workdir: String,
    /// The user (empty when unset).
    #[serde(rename = "User", default, deserialize_with = "null_as_empty")]
    pub user: String,
}

fn null_as_empty<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Deserialize)]
struct ImageConfigFile {
    #[serde(default, deserialize_with = "null_as_empty")]
    config: OciConfig,
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

/// An image index or a manifest: which one it is shows in which field is present.
#[derive(Deserialize)]
struct IndexOrManifest {
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// One entry of a `docker save` manifest.json.
#[derive(Deserialize)]
struct DockerImage {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// A layer to apply: its file and, for OCI layouts, the digest to check it against.
struct Layer {
    path: PathBuf,
    digest: Option<String>,
}

/// Applies the image at `archive` into `root`; `scratch` is a directory for unpacking an
/// archive file. Returns the image configuration.
pub(crate) fn stage(root: &Path, archive: &Path, scratch: &Path) -> Result<OciConfig> {
    let err = |reason: String| Error::Oci {
        archive: archive.to_path_buf(),
        reason,
    };
    let meta = fs::metadata(archive).map_err(|e| Error::io("reading", archive, e))?;
    let layout = if meta.is_dir() {
        archive.to_path_buf()
    } else {
        let dir = scratch.join("oci-archive");
        fs::create_dir(&dir).map_err(|e| Error::io("creating", &dir, e))?;
        let reader = decompress(archive).map_err(|e| err(format!("cannot read it: {e}")))?;
        tar::Archive::new(reader)
            .unpack(&dir)
            .map_err(|e| err(format!("cannot unpack it: {e}")))?;
        dir
    };
    let (layers, config) = if layout.join("index.json").is_file() {
        oci_layout(&layout).map_err(err)?
    } else if layout.join("manifest.json").is_file() {
        docker_layout(&layout).map_err(err)?
    } else {
        return Err(err(
            "no index.json (OCI layout) or manifest.json (docker save) at its top level".into(),
        ));
    };
    for layer in &layers {
        if let Some(digest) = &layer.digest {
            verify_digest(&layer.path, digest).map_err(err)?;
        }
        apply_layer(root, &layer.path)?;
    }
    Ok(config)
}

/// Opens a file through gzip or zstd decompression when its magic bytes say so.
fn decompress(path: &Path) -> io::Result<Box<dyn Read>> {
    let mut f = fs::File::open(path)?;
    let mut magic = [0u8; 4];
    let n = read_up_to(&mut f, &mut magic)?;
    f.seek(io::SeekFrom::Start(0))?;
    let r = io::BufReader::new(f);
    Ok(match &magic[..n] {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(r)),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(zstd::stream::read::Decoder::with_buffer(r)?),
        _ => Box::new(r),
    })
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Maps a digest to its blob file, refusing anything that is not `alg:hex`.
fn blob_path(layout: &Path, digest: &str) -> std::result::Result<PathBuf, String> {
    let (alg, hex) = digest
        .split_once(':')
        .ok_or_else(|| format!("malformed digest {digest:?}"))?;
    let alg_ok = !alg.is_empty()
        && alg
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b));
    let hex_ok = !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit());
    if !alg_ok || !hex_ok {
        return Err(format!("malformed digest {digest:?}"));
    }
    Ok(layout.join("blobs").join(alg).join(hex))
}

fn verify_digest(path: &Path, digest: &str) -> std::result::Result<(), String> {
    let Some(expected) = digest.strip_prefix("sha256:") else {
        // Other algorithms are not checked; sha256 is what every tool writes.
        return Ok(());
    };
    let mut f = fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h).map_err(|e| format!("{}: {e}", path.display()))?;
    let got: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if !got.eq_ignore_ascii_case(expected) {
        return Err(format!(
            "blob {digest} is corrupt (its content hashes to sha256:{got})"
        ));
    }
    Ok(())
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> std::result::Result<T, String> {
    let bytes = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

fn read_blob_json<T: for<'de> Deserialize<'de>>(
    layout: &Path,
    digest: &str,
) -> std::result::Result<T, String> {
    let path = blob_path(layout, digest)?;
    verify_digest(&path, digest)?;
    read_json(&path)
}

/// Whether an index entry can run here: linux/amd64, or no platform stated.
fn runs_here(d: &Descriptor) -> bool {
    match &d.platform {
        Some(p) => p.os == "linux" && p.architecture == "amd64",
        None => true,
    }
}

fn oci_layout(layout: &Path) -> std::result::Result<(Vec<Layer>, OciConfig), String> {
    let mut doc: IndexOrManifest = read_json(&layout.join("index.json"))?;
    // Follow nested indexes (a multi-platform image inside a layout) down to a manifest.
    for _ in 0..8 {
        if let (Some(config), Some(layers)) = (&doc.config, &doc.layers) {
            let cfg: ImageConfigFile = read_blob_json(layout, &config.digest)?;
            let layers = layers
                .iter()
                .map(|l| {
                    Ok(Layer {
                        path: blob_path(layout, &l.digest)?,
                        digest: Some(l.digest.clone()),
                    })
                })
                .collect::<std::result::Result<_, String>>()?;
            return Ok((layers, cfg.config));
        }
        let manifests = doc
            .manifests
            .as_ref()
            .ok_or("an index without manifests, or a manifest without layers")?;
        let pick = manifests.iter().find(|d| runs_here(d)).ok_or_else(|| {
            format!(
                "no linux/amd64 image among its {} manifests",
                manifests.len()
            )
        })?;
        doc = read_blob_json(layout, &pick.digest)?;
    }
    Err("image indexes nested too deeply".into())
}

/// A relative path inside the archive, refusing absolute paths and `..`.
fn archive_rel(layout: &Path, p: &str) -> std::result::Result<PathBuf, String> {
    let rel = Path::new(p);
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!(
            "manifest.json names a path outside the archive: {p:?}"
        ));
    }
    Ok(layout.join(rel))
}

fn docker_layout(layout: &Path) -> std::result::Result<(Vec<Layer>, OciConfig), String> {
    let images: Vec<DockerImage> = read_json(&layout.join("manifest.json"))?;
    let image = images.first().ok_or("manifest.json lists no image")?;
    let cfg: ImageConfigFile = read_json(&archive_rel(layout, &image.config)?)?;
    let layers = image
        .layers
        .iter()
        .map(|l| {
            Ok(Layer {
                path: archive_rel(layout, l)?,
                digest: None,
            })
        })
        .collect::<std::result::Result<_, String>>()?;
    Ok((layers, cfg.config))
}

/// A layer entry's path relative to the image root; `None` for the root itself.
fn entry_rel(p: &Path) -> std::result::Result<Option<PathBuf>, String> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err("path leaves the image root".into())
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

fn apply_layer(root: &Path, layer: &Path) -> Result<()> {
    let label = layer
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let open = || {
        decompress(layer)
            .map(tar::Archive::new)
            .map_err(|e| Error::OciEntry {
                layer: label.clone(),
                entry: String::new(),
                reason: e.to_string(),
            })
    };
    let entry_err = |entry: &str, reason: String| Error::OciEntry {
        layer: label.clone(),
        entry: entry.to_string(),
        reason,
    };
    let read_err = |e: io::Error| entry_err("", format!("cannot read the layer: {e}"));

    // Pass 1: whiteouts against the lower layers.
    let mut ar = open()?;
    for entry in ar.entries().map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let path = entry.path().map_err(read_err)?.into_owned();
        let shown = path.display().to_string();
        let Some(rel) = entry_rel(&path).map_err(|r| entry_err(&shown, r))? else {
            continue;
        };
        let Some(name) = rel.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let parent = rel.parent().unwrap_or(Path::new(""));
        if name == OPAQUE {
            let dir = resolve_in_root(root, parent, true)?;
            if let Ok(children) = fs::read_dir(&dir) {
                for child in children.flatten() {
                    remove_any(&child.path())?;
                }
            }
        } else if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            if hidden.starts_with(WHITEOUT) || hidden.is_empty() {
                continue;
            }
            remove_any(&resolve_in_root(root, &parent.join(hidden), false)?)?;
        }
    }

    // Pass 2: the layer's own entries.
    let mut dir_times = Vec::new();
    let mut ar = open()?;
    for entry in ar.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let path = entry.path().map_err(read_err)?.into_owned();
        let shown = path.display().to_string();
        let rel = entry_rel(&path).map_err(|r| entry_err(&shown, r))?;
        let is_whiteout = rel
            .as_ref()
            .and_then(|r| r.file_name())
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(WHITEOUT));
        if is_whiteout {
            continue;
        }
        let header = entry.header().clone();
        let kind = header.entry_type();
        let host = match &rel {
            Some(rel) => resolve_in_root(root, rel, false)?,
            // Only a directory entry may describe the root itself.
            None if kind == tar::EntryType::Directory => root.to_path_buf(),
            None => continue,
        };
        if let Some(parent) = host.parent().filter(|_| rel.is_some()) {
            fs::create_dir_all(parent).map_err(|e| Error::io("creating", parent, e))?;
        }
        let mut uid = header.uid().map_err(|e| entry_err(&shown, e.to_string()))? as u32;
        let mut gid = header.gid().map_err(|e| entry_err(&shown, e.to_string()))? as u32;
        let mode = header
            .mode()
            .map_err(|e| entry_err(&shown, e.to_string()))?;
        let mtime = header.mtime().unwrap_or(0) as i64;
        let mut xattrs = Vec::new();
        if let Ok(Some(pax)) = entry.pax_extensions() {
            for ext in pax.flatten() {
                let Ok(key) = ext.key() else { continue };
                let num = || ext.value().ok().and_then(|v| v.trim().parse::<u32>().ok());
                match key {
                    "uid" => uid = num().unwrap_or(uid),
                    "gid" => gid = num().unwrap_or(gid),
                    k => {
                        if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
                            xattrs.push((name.to_string(), ext.value_bytes().to_vec()));
                        }
                    }
                }
            }
        }
        use tar::EntryType as T;
        match kind {
            T::Directory => {
                if !clear_for(&host, true)? {
                    fs::create_dir(&host).map_err(|e| Error::io("creating", &host, e))?;
                }
                dir_times.push((host.clone(), mtime));
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                clear_for(&host, false)?;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&host)
                    .map_err(|e| Error::io("creating", &host, e))?;
                io::copy(&mut entry, &mut f).map_err(|e| entry_err(&shown, e.to_string()))?;
            }
            T::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(read_err)?
                    .ok_or_else(|| entry_err(&shown, "symlink without a target".into()))?
                    .into_owned();
                clear_for(&host, false)?;
                symlink(&target, &host).map_err(|e| Error::io("creating the link", &host, e))?;
            }
            T::Link => {
                let target = entry
                    .link_name()
                    .map_err(read_err)?
                    .ok_or_else(|| entry_err(&shown, "hard link without a target".into()))?
                    .into_owned();
                let target_rel = entry_rel(&target)
                    .map_err(|r| entry_err(&shown, r))?
                    .ok_or_else(|| entry_err(&shown, "hard link to the image root".into()))?;
                let target_host = resolve_in_root(root, &target_rel, false)?;
                if target_host == host {
                    continue;
                }
                if fs::symlink_metadata(&target_host).is_err() {
                    return Err(entry_err(
                        &shown,
                        format!("hard link to {} which does not exist", target.display()),
                    ));
                }
                clear_for(&host, false)?;
                fs::hard_link(&target_host, &host).map_err(|e| Error::io("linking", &host, e))?;
                // A hard link shares its target's inode and metadata.
                continue;
            }
            T::Char | T::Block | T::Fifo => {
                clear_for(&host, false)?;
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                let node = match kind {
                    T::Char => libc::S_IFCHR,
                    T::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                mknod(&host, node, mode, major, minor)?;
            }
            // Global PAX headers and other metadata-only records carry no file.
            _ => continue,
        }
        lchown(&host, uid, gid)?;
        if kind != T::Symlink {
            set_mode(&host, mode & 0o7777)?;
        }
        for (name, value) in &xattrs {
            set_xattr(&host, name, value)?;
        }
        if kind != T::Directory {
            set_mtime(&host, mtime)?;
        }
    }
    // Directory times last: creating their entries changed them.
    for (dir, mtime) in dir_times.iter().rev() {
        set_mtime(dir, *mtime)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_validated() {
        let l = Path::new("/x");
        assert_eq!(
            blob_path(l, "sha256:abc123").unwrap(),
            Path::new("/x/blobs/sha256/abc123")
        );
        assert!(blob_path(l, "sha256:../../etc").is_err());
        assert!(blob_path(l, "../x:abc").is_err());
        assert!(blob_path(l, "abc").is_err());
        assert!(blob_path(l, "sha256:").is_err());
    }

    #[test]
    fn entry_paths_stay_inside() {
        assert_eq!(
            entry_rel(Path::new("./a/b")).unwrap(),
            Some(PathBuf::from("a/b"))
        );
        assert_eq!(
            entry_rel(Path::new("/a")).unwrap(),
            Some(PathBuf::from("a"))
        );
        assert_eq!(entry_rel(Path::new("./")).unwrap(), None);
        assert!(entry_rel(Path::new("a/../../b")).is_err());
        assert!(archive_rel(Path::new("/l"), "../x").is_err());
        assert!(archive_rel(Path::new("/l"), "/etc/passwd").is_err());
        assert!(archive_rel(Path::new("/l"), "abc/layer.tar").is_ok());
    }

    #[test]
    fn config_nulls_are_empty() {
        let c: ImageConfigFile = serde_json::from_str(
            r#"{"config":{"Env":["A=1"],"Entrypoint":null,"Cmd":["sh"],"WorkingDir":"/w"}}"#,
        )
        .unwrap();
        assert_eq!(c.config.env, vec!["A=1"]);
        assert!(c.config.entrypoint.is_empty());
        assert_eq!(c.config.cmd, vec!["sh"]);
        assert_eq!(c.config.workdir, "/w");
        let c: ImageConfigFile = serde_json::from_str(r#"{"config":null}"#).unwrap();
        assert_eq!(c.config, OciConfig::default());
    }
}
