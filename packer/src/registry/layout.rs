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
}
