//! Feeds arbitrary bytes to what checks a registry's answers before a pull downloads
//! anything (`packer/src/registry/layout.rs`, compiled here as it is): an index or manifest
//! body sorted by `classify`, the platform pick, a machine manifest and its assembly plan,
//! the referrers index and a signature manifest. Any panic is a bug; a plan must stay inside
//! the file, in order, without overlaps. The first 8 bytes are the file length the config
//! would give (little-endian), the rest the JSON body.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../src/registry/layout.rs"]
#[allow(dead_code)]
mod layout;

const SUBJECT: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let file_len = u64::from_le_bytes(data[..8].try_into().unwrap()) % (1 << 41);
    let body = &data[8..];
    if let Ok(layout::Named::Index { entries, .. }) = layout::classify(body) {
        if let Ok(Some(e)) = layout::pick_platform(&entries, "linux", "amd64") {
            assert!(layout::is_sha256_digest(&e.digest));
        }
        for e in layout::signature_entries(&entries) {
            assert!(layout::is_sha256_digest(&e.digest));
        }
        let _ = layout::platforms(&entries);
    }
    if let Ok(m) = layout::machine_manifest(body) {
        assert!(layout::is_sha256_digest(&m.config.digest));
        if let Ok(plan) = layout::plan_assembly(&m.layers, file_len) {
            let mut end = 0;
            for p in &plan {
                assert!(p.offset >= end && p.len > 0 && layout::is_sha256_digest(&p.digest));
                end = p.offset + p.len;
                assert!(end <= file_len);
            }
        }
    }
    if let Ok(l) = layout::signature_manifest(body, SUBJECT) {
        assert!(layout::is_sha256_digest(&l.digest) && l.size > 0);
    }
    let _ = layout::referrers_tag(SUBJECT);
});
