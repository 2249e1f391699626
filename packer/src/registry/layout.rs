//! How a machine file maps onto an OCI artifact's layers, and back (docs/DISTRIBUTION.md).
//!
//! A file is cut into components at its own structure: the header, each section, the
//! section table, and for a packed executable the stub and the trailer. Each component is
//! one layer whose annotations say where it goes (`dev.smolvm.offset`); bytes no layer covers
//! are zero (the format's padding: a non-zero gap gets a `raw` layer of its own). A rebuilt
//! machine whose disk did not change has the same disk layer, so a second push uploads only
//! the changed layers.
//!
//! [`plan_assembly`] checks a pulled manifest's layers before anything is downloaded: the
//! manifest comes from the network and decides where bytes are written.

use std::collections::BTreeMap;

use smolvm_formats::{MachineReader, SectionKind};

/// `artifactType` of a machine's manifest and of the index above it.
pub const ARTIFACT_TYPE: &str = "application/vnd.smolvm.machine.v1";
/// Media type of the config blob ([`super::ArtifactConfig`], JSON).
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.smolvm.machine.config.v1+json";
/// Prefix of every layer media type.
pub const LAYER_PREFIX: &str = "application/vnd.smolvm.machine.";
/// Annotation: the layer's byte offset in the file.
pub const OFFSET_ANNOTATION: &str = "dev.smolvm.offset";
/// Annotation: the layer's file name when extracted (OCI's standard title).
pub const TITLE_ANNOTATION: &str = "org.opencontainers.image.title";
/// Most layers a pulled manifest may have (the format allows 1024 sections).
pub const MAX_LAYERS: usize = 2048;
/// Largest file a pull assembles (1 TiB, the format's region cap).
pub const MAX_FILE_LEN: u64 = 1 << 40;

/// One layer's worth of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    /// `header`, `manifest`, `vm-state`, `memory`, `disk.0`, `table`, `stub`, ...
    pub title: String,
    /// `application/vnd.smolvm.machine.<part>.v1`.
    pub media_type: String,
    /// Absolute offset in the file.
    pub offset: u64,
    pub len: u64,
}

fn media_type(part: &str) -> String {
    format!("{LAYER_PREFIX}{part}.v1")
}

fn component(title: impl Into<String>, part: &str, offset: u64, len: u64) -> Component {
    Component {
        title: title.into(),
        media_type: media_type(part),
        offset,
        len,
    }
}

/// The components of an opened machine or packed executable, sorted by offset, without the
/// zero gaps between them. `read_at` reads raw file bytes, to find non-zero gaps.
pub fn components(
    r: &MachineReader,
    read_at: &dyn Fn(u64, &mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<Vec<Component>> {
    let base = r.base();
    let mut out = Vec::new();
    let file_len = match r.trailer() {
        Some(t) => {
            out.push(component("stub", "stub", 0, t.stub_len));
            let end = t.payload_offset + t.payload_len;
            out.push(component(
                "trailer",
                "trailer",
                end,
                smolvm_formats::trailer::TRAILER_LEN,
            ));
            end + smolvm_formats::trailer::TRAILER_LEN
        }
        None => r.len(),
    };
    out.push(component("header", "header", base, 64));
    let mut disks = 0;
    for s in r.sections() {
        let (title, part) = match s.kind {
            SectionKind::Manifest => ("manifest".to_string(), "manifest"),
            SectionKind::VmState => ("vm-state".to_string(), "vm-state"),
            SectionKind::Memory => ("memory".to_string(), "memory"),
            SectionKind::Disk => {
                disks += 1;
                (format!("disk.{}", disks - 1), "disk")
            }
            SectionKind::Signature => ("signature".to_string(), "signature"),
            _ => (format!("section.{}", s.index), "section"),
        };
        out.push(component(title, part, s.file_offset, s.stored_len));
    }
    let table_len = 64 * r.header().section_count as u64;
    out.push(component(
        "table",
        "table",
        base + r.header().table_offset,
        table_len,
    ));
    out.retain(|c| c.len > 0);
    out.sort_by_key(|c| c.offset);
    // Whatever lies between components: zero padding, or a raw layer (sections a reader
    // skipped, say) so that the file always comes back byte for byte.
    let mut raw = Vec::new();
    let mut pos = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for c in out
        .iter()
        .chain(std::iter::once(&component("end", "end", file_len, 0)))
    {
        if c.offset > pos && !zero_range(read_at, pos, c.offset - pos, &mut buf)? {
            raw.push(component(format!("raw.{pos}"), "raw", pos, c.offset - pos));
        }
        pos = pos.max(c.offset + c.len);
    }
    out.extend(raw);
    out.sort_by_key(|c| c.offset);
    Ok(out)
}

fn zero_range(
    read_at: &dyn Fn(u64, &mut [u8]) -> std::io::Result<()>,
    mut off: u64,
    mut len: u64,
    buf: &mut [u8],
) -> std::io::Result<bool> {
    while len > 0 {
        let n = len.min(buf.len() as u64) as usize;
        read_at(off, &mut buf[..n])?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        off += n as u64;
        len -= n as u64;
    }
    Ok(true)
}

/// A layer of a pulled manifest, as far as assembly needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRef {
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    pub annotations: Option<BTreeMap<String, String>>,
}

/// Where one verified blob goes in the assembled file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// `sha256:<64 hex>`, checked to be exactly that (it becomes a file name).
    pub digest: String,
    pub offset: u64,
    pub len: u64,
    pub title: String,
}

/// Checks a pulled manifest's layers against the file length its config gives and returns
/// where each goes: every media type one of ours, every digest a well-formed sha256, every
/// size positive, offsets inside the file, sorted and not overlapping.
pub fn plan_assembly(layers: &[LayerRef], file_len: u64) -> Result<Vec<Placement>, String> {
    if file_len == 0 || file_len > MAX_FILE_LEN {
        return Err(format!("file length {file_len} is out of range"));
    }
    if layers.is_empty() || layers.len() > MAX_LAYERS {
        return Err(format!(
            "{} layers (1 to {MAX_LAYERS} expected)",
            layers.len()
        ));
    }
    let mut out = Vec::with_capacity(layers.len());
    let mut end = 0u64;
    for (i, l) in layers.iter().enumerate() {
        if !l.media_type.starts_with(LAYER_PREFIX) {
            return Err(format!("layer {i} has media type {:?}", l.media_type));
        }
        if !is_sha256_digest(&l.digest) {
            return Err(format!("layer {i} has digest {:?}", l.digest));
        }
        let len = u64::try_from(l.size)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("layer {i} has size {}", l.size))?;
        let ann = l.annotations.as_ref();
        let offset: u64 = ann
            .and_then(|a| a.get(OFFSET_ANNOTATION))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("layer {i} has no valid {OFFSET_ANNOTATION} annotation"))?;
        let stop = offset
            .checked_add(len)
            .filter(|&s| s <= file_len)
            .ok_or_else(|| format!("layer {i} ({offset}+{len}) lies outside the file"))?;
        if offset < end {
            return Err(format!(
                "layer {i} at {offset} overlaps or precedes the one before"
            ));
        }
        end = stop;
        let title = ann
            .and_then(|a| a.get(TITLE_ANNOTATION))
            .cloned()
            .unwrap_or_else(|| format!("layer.{i}"));
        out.push(Placement {
            digest: l.digest.clone(),
            offset,
            len,
            title,
        });
    }
    Ok(out)
}

/// `sha256:` followed by exactly 64 lowercase hex digits.
pub fn is_sha256_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

// ---------------------------------------------------------------------------------------
// Manifests and indexes from the registry: parsed and checked here, as bytes, so that the
// whole path from a registry's answer to a download plan is property-tested and fuzzed
// (`packer/fuzz`, target `registry_layout`).

/// OCI media types.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// The OCI empty config (`{}`), used by signature artifacts.
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const OCI_EMPTY_DIGEST: &str =
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
/// `artifactType` of an attached signature's manifest.
pub const SIGNATURE_ARTIFACT_TYPE: &str = "application/vnd.smolvm.signature.v1";
/// Media type of its one layer (`smolvm_formats::signature::AttachedSignature`, JSON).
pub const SIGNATURE_LAYER_MEDIA_TYPE: &str = "application/vnd.smolvm.signature.v1+json";
/// Most entries read from an index (platforms, or referrers of one manifest).
pub const MAX_INDEX_ENTRIES: usize = 4096;

/// A descriptor as the registry's JSON has it (only the fields we read).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// `platform` of an index entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct PlatformJson {
    pub architecture: String,
    pub os: String,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexJson {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    artifact_type: Option<String>,
    manifests: Vec<serde_json::Value>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestJson {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    artifact_type: Option<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
    #[serde(default)]
    subject: Option<Descriptor>,
}

/// What a tag or digest named: an image index (its entries) or an image manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Named {
    /// An index; `ours` when its `artifactType` is [`ARTIFACT_TYPE`]. Entries that are not
    /// well-formed descriptors are dropped.
    Index {
        ours: bool,
        entries: Vec<Descriptor>,
    },
    /// An image manifest (the body, parsed again by [`machine_manifest`]).
    Manifest,
}

/// Sorts a manifest body fetched by tag or digest into index or manifest.
pub fn classify(body: &[u8]) -> Result<Named, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    if v.get("manifests").is_some() {
        let i: IndexJson =
            serde_json::from_value(v).map_err(|e| format!("not an image index: {e}"))?;
        if i.schema_version != 2 || i.media_type.as_deref().is_some_and(|m| m != OCI_INDEX) {
            return Err("not an OCI image index (schemaVersion 2)".into());
        }
        if i.manifests.len() > MAX_INDEX_ENTRIES {
            return Err(format!("an index of {} entries", i.manifests.len()));
        }
        let entries = i
            .manifests
            .into_iter()
            .filter_map(|e| serde_json::from_value::<Descriptor>(e).ok())
            .collect();
        Ok(Named::Index {
            ours: i.artifact_type.as_deref() == Some(ARTIFACT_TYPE),
            entries,
        })
    } else if v.get("layers").is_some() {
        Ok(Named::Manifest)
    } else {
        Err("neither an image index nor an image manifest".into())
    }
}

/// The entry of an index for `os`/`architecture`: `Ok(None)` when there is none; an error
/// when the entry there is not an image manifest with a well-formed digest.
pub fn pick_platform<'a>(
    entries: &'a [Descriptor],
    os: &str,
    architecture: &str,
) -> Result<Option<&'a Descriptor>, String> {
    let Some(e) = entries.iter().find(|e| {
        e.platform
            .as_ref()
            .is_some_and(|p| p.os == os && p.architecture == architecture)
    }) else {
        return Ok(None);
    };
    if !is_sha256_digest(&e.digest) || e.media_type != OCI_MANIFEST || e.size <= 0 {
        return Err(format!(
            "index entry for {os}/{architecture}: {:?} {:?}",
            e.media_type, e.digest
        ));
    }
    Ok(Some(e))
}

/// The platforms an index serves, `os/architecture`, for messages.
pub fn platforms(entries: &[Descriptor]) -> Vec<String> {
    entries
        .iter()
        .filter_map(|e| e.platform.as_ref())
        .map(|p| format!("{}/{}", p.os, p.architecture))
        .collect()
}

/// A machine's image manifest, checked: ours (artifact type and config media type), its
/// config descriptor well-formed; the layers are checked by [`plan_assembly`] against the
/// file length the config gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineManifest {
    pub config: Descriptor,
    pub layers: Vec<LayerRef>,
}

/// Parses and checks a machine's image manifest.
pub fn machine_manifest(body: &[u8]) -> Result<MachineManifest, String> {
    let m: ManifestJson =
        serde_json::from_slice(body).map_err(|e| format!("not an image manifest: {e}"))?;
    if m.schema_version != 2 || m.media_type.as_deref().is_some_and(|t| t != OCI_MANIFEST) {
        return Err("not an OCI image manifest (schemaVersion 2)".into());
    }
    if m.artifact_type.as_deref() != Some(ARTIFACT_TYPE) || m.config.media_type != CONFIG_MEDIA_TYPE
    {
        return Err(format!(
            "it is not a smolvm machine (artifact type {:?})",
            m.artifact_type.as_deref().unwrap_or("none")
        ));
    }
    if !is_sha256_digest(&m.config.digest) || !(1..4 << 20).contains(&m.config.size) {
        return Err(format!(
            "config descriptor {:?} of {} bytes",
            m.config.digest, m.config.size
        ));
    }
    if m.layers.is_empty() || m.layers.len() > MAX_LAYERS {
        return Err(format!(
            "{} layers (1 to {MAX_LAYERS} expected)",
            m.layers.len()
        ));
    }
    let layers = m
        .layers
        .into_iter()
        .map(|l| LayerRef {
            media_type: l.media_type,
            digest: l.digest,
            size: l.size,
            annotations: l.annotations,
        })
        .collect();
    Ok(MachineManifest {
        config: m.config,
        layers,
    })
}

/// The referrers tag of the OCI 1.1 "referrers tag schema": `sha256-<hex>` for a subject
/// `sha256:<hex>`.
pub fn referrers_tag(subject: &str) -> Option<String> {
    is_sha256_digest(subject).then(|| subject.replacen(':', "-", 1))
}

/// The attached signatures listed in a referrers index (by `artifactType`): their manifest
/// descriptors, well-formed, at most [`MAX_INDEX_ENTRIES`].
pub fn signature_entries(entries: &[Descriptor]) -> Vec<Descriptor> {
    entries
        .iter()
        .filter(|e| {
            e.artifact_type.as_deref() == Some(SIGNATURE_ARTIFACT_TYPE)
                && e.media_type == OCI_MANIFEST
                && is_sha256_digest(&e.digest)
                && (1..4 << 20).contains(&e.size)
        })
        .cloned()
        .collect()
}

/// Checks an attached signature's manifest: our artifact type, `subject` the machine's
/// manifest `subject`, exactly one layer of [`SIGNATURE_LAYER_MEDIA_TYPE`], small and with a
/// well-formed digest. Returns that layer.
pub fn signature_manifest(body: &[u8], subject: &str) -> Result<Descriptor, String> {
    let m: ManifestJson =
        serde_json::from_slice(body).map_err(|e| format!("not an image manifest: {e}"))?;
    if m.schema_version != 2 || m.artifact_type.as_deref() != Some(SIGNATURE_ARTIFACT_TYPE) {
        return Err(format!(
            "not a smolvm signature (artifact type {:?})",
            m.artifact_type.as_deref().unwrap_or("none")
        ));
    }
    if m.subject.as_ref().map(|s| s.digest.as_str()) != Some(subject) {
        return Err(format!("its subject is not {subject}"));
    }
    let [layer] = m.layers.as_slice() else {
        return Err(format!("{} layers (1 expected)", m.layers.len()));
    };
    if layer.media_type != SIGNATURE_LAYER_MEDIA_TYPE
        || !is_sha256_digest(&layer.digest)
        || !(1..=smolvm_formats::signature::ATTACHED_MAX_LEN as i64).contains(&layer.size)
    {
        return Err(format!(
            "signature layer {:?} {:?} of {} bytes",
            layer.media_type, layer.digest, layer.size
        ));
    }
    Ok(layer.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn layer(offset: &str, size: i64) -> LayerRef {
        LayerRef {
            media_type: media_type("memory"),
            digest: format!("sha256:{}", "ab".repeat(32)),
            size,
            annotations: Some(BTreeMap::from([(
                OFFSET_ANNOTATION.to_string(),
                offset.to_string(),
            )])),
        }
    }

    #[test]
    fn good_layers_are_placed() {
        let p = plan_assembly(&[layer("0", 64), layer("128", 10)], 200).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!((p[1].offset, p[1].len), (128, 10));
        assert_eq!(p[0].title, "layer.0");
    }

    #[test]
    fn bad_layers_are_refused() {
        let cases: Vec<(Vec<LayerRef>, u64)> = vec![
            (vec![], 10),
            (vec![layer("0", 64)], 0),
            (vec![layer("0", 64)], 63),
            (vec![layer("0", 0)], 64),
            (vec![layer("0", -1)], 64),
            (vec![layer("x", 1)], 64),
            (vec![layer("18446744073709551615", 2)], 64),
            (vec![layer("10", 10), layer("15", 10)], 64),
            (vec![layer("20", 10), layer("0", 10)], 64),
            (
                vec![LayerRef {
                    media_type: "application/octet-stream".into(),
                    ..layer("0", 1)
                }],
                64,
            ),
            (
                vec![LayerRef {
                    digest: "sha256:../../etc/passwd".into(),
                    ..layer("0", 1)
                }],
                64,
            ),
            (
                vec![LayerRef {
                    annotations: None,
                    ..layer("0", 1)
                }],
                64,
            ),
        ];
        for (layers, len) in cases {
            assert!(plan_assembly(&layers, len).is_err(), "{layers:?} in {len}");
        }
    }

    #[test]
    fn digests() {
        assert!(is_sha256_digest(&format!("sha256:{}", "0f".repeat(32))));
        assert!(!is_sha256_digest(&format!("sha256:{}", "0F".repeat(32))));
        assert!(!is_sha256_digest(&format!("sha512:{}", "0f".repeat(32))));
        assert!(!is_sha256_digest("sha256:0f"));
    }

    proptest! {
        /// Whatever a manifest says, a plan never places bytes outside the file or twice.
        #[test]
        fn plans_stay_inside_the_file(
            raw in proptest::collection::vec((0u64..300, -2i64..120), 0..8),
            file_len in 0u64..400,
        ) {
            let layers: Vec<LayerRef> =
                raw.iter().map(|&(o, s)| layer(&o.to_string(), s)).collect();
            if let Ok(plan) = plan_assembly(&layers, file_len) {
                let mut end = 0;
                for p in &plan {
                    prop_assert!(p.offset >= end && p.len > 0);
                    end = p.offset + p.len;
                    prop_assert!(end <= file_len);
                }
            }
        }
    }

    fn manifest_json(layers: &[(i64, u64)]) -> String {
        let ls: Vec<serde_json::Value> = layers
            .iter()
            .map(|&(size, off)| {
                serde_json::json!({
                    "mediaType": media_type("memory"),
                    "digest": format!("sha256:{}", "ab".repeat(32)),
                    "size": size,
                    "annotations": { OFFSET_ANNOTATION: off.to_string() },
                })
            })
            .collect();
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": format!("sha256:{}", "cd".repeat(32)), "size": 10},
            "layers": ls,
        })
        .to_string()
    }

    #[test]
    fn registry_answers_are_sorted_and_checked() {
        let m = manifest_json(&[(64, 0), (10, 128)]);
        assert_eq!(classify(m.as_bytes()), Ok(Named::Manifest));
        let mm = machine_manifest(m.as_bytes()).unwrap();
        assert_eq!(plan_assembly(&mm.layers, 200).unwrap().len(), 2);
        let other = m.replace(ARTIFACT_TYPE, "application/vnd.other");
        assert!(machine_manifest(other.as_bytes())
            .unwrap_err()
            .contains("not a smolvm machine"));
        let d = format!("sha256:{}", "ef".repeat(32));
        let index = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "artifactType": ARTIFACT_TYPE,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": d, "size": 5,
                 "platform": {"os": "linux", "architecture": "arm64"}},
                {"mediaType": OCI_MANIFEST, "digest": "sha256:bad", "size": 5,
                 "platform": {"os": "linux", "architecture": "amd64"}},
                {"junk": true},
            ]
        })
        .to_string();
        let Ok(Named::Index {
            ours: true,
            entries,
        }) = classify(index.as_bytes())
        else {
            panic!("an index of ours");
        };
        assert_eq!(entries.len(), 2, "the junk entry is dropped");
        assert_eq!(platforms(&entries), ["linux/arm64", "linux/amd64"]);
        assert_eq!(
            pick_platform(&entries, "linux", "arm64")
                .unwrap()
                .unwrap()
                .digest,
            d
        );
        assert!(
            pick_platform(&entries, "linux", "amd64").is_err(),
            "a bad digest"
        );
        assert_eq!(pick_platform(&entries, "linux", "riscv64"), Ok(None));
        assert_eq!(
            referrers_tag(&d).unwrap(),
            format!("sha256-{}", "ef".repeat(32))
        );
        assert_eq!(referrers_tag("sha256:../x"), None);
        let sig = serde_json::json!({
            "schemaVersion": 2, "artifactType": SIGNATURE_ARTIFACT_TYPE,
            "config": {"mediaType": OCI_EMPTY, "digest": OCI_EMPTY_DIGEST, "size": 2},
            "layers": [{"mediaType": SIGNATURE_LAYER_MEDIA_TYPE, "digest": d, "size": 400}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": d, "size": 5},
        })
        .to_string();
        assert!(signature_manifest(sig.as_bytes(), &d).is_ok());
        assert!(signature_manifest(sig.as_bytes(), OCI_EMPTY_DIGEST)
            .unwrap_err()
            .contains("subject"));
    }

    proptest! {
        /// Any bytes, and any single-byte change of a good manifest or index: the parsers
        /// never panic, and whatever they accept keeps its promises.
        #[test]
        fn registry_parsers_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..400),
            layers in proptest::collection::vec((-2i64..300, 0u64..600), 0..6),
            at in any::<usize>(),
            to in any::<u8>(),
            file_len in 0u64..1000,
        ) {
            let mut mutated = manifest_json(&layers).into_bytes();
            let i = at % mutated.len();
            mutated[i] = to;
            for body in [&bytes[..], &mutated[..]] {
                if let Ok(Named::Index { entries, .. }) = classify(body) {
                    if let Ok(Some(e)) = pick_platform(&entries, "linux", "amd64") {
                        prop_assert!(is_sha256_digest(&e.digest));
                    }
                }
                if let Ok(m) = machine_manifest(body) {
                    prop_assert!(is_sha256_digest(&m.config.digest));
                    if let Ok(plan) = plan_assembly(&m.layers, file_len) {
                        let mut end = 0;
                        for p in &plan {
                            prop_assert!(p.offset >= end && p.len > 0);
                            end = p.offset + p.len;
                            prop_assert!(end <= file_len);
                        }
                    }
                }
                let _ = signature_manifest(body, OCI_EMPTY_DIGEST);
            }
        }
    }
}
