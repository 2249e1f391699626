//! The OCI base: two-layer images built here (docker-save tar, OCI layout directory and OCI
//! layout tar; gzip, zstd and plain layers) with whiteouts, an opaque directory, symlinks,
//! hard links and owners.

mod rootfs_util;

use std::io::Write;
use std::path::Path;

use rootfs_util::*;
use sha2::{Digest, Sha256};
use smolvm_rootfs::{build, Base, RootfsSpec};
use tar::{EntryType, Header};

fn entry(
    b: &mut tar::Builder<Vec<u8>>,
    path: &str,
    kind: EntryType,
    mode: u32,
    uid: u64,
    data: &[u8],
    link: Option<&str>,
) {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(uid);
    h.set_mtime(1_700_000_000);
    h.set_size(data.len() as u64);
    if let Some(l) = link {
        h.set_link_name(l).unwrap();
    }
    b.append_data(&mut h, path, data).unwrap();
}

fn dir(b: &mut tar::Builder<Vec<u8>>, path: &str) {
    entry(b, path, EntryType::Directory, 0o755, 0, b"", None);
}

fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
    entry(b, path, EntryType::Regular, 0o644, 0, data, None);
}

/// The lower layer, gzip-compressed.
fn layer1() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for d in [
        "etc/", "usr/", "usr/bin/", "del/", "opq/", "opq/sub/", "app/",
    ] {
        dir(&mut b, d);
    }
    file(&mut b, "etc/hostname", b"oci\n");
    file(&mut b, "usr/bin/tool", b"tool v1\n");
    entry(
        &mut b,
        "bin",
        EntryType::Symlink,
        0o777,
        0,
        b"",
        Some("usr/bin"),
    );
    file(&mut b, "del/gone.txt", b"bye\n");
    file(&mut b, "del/stays.txt", b"still here\n");
    file(&mut b, "opq/old1", b"old\n");
    file(&mut b, "opq/sub/old2", b"old\n");
    file(&mut b, "becomes-dir", b"a file first\n");
    // Links that would leave the image if followed on the host.
    entry(&mut b, "evil", EntryType::Symlink, 0o777, 0, b"", Some("/"));
    entry(
        &mut b,
        "up",
        EntryType::Symlink,
        0o777,
        0,
        b"",
        Some("../../../../.."),
    );
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

/// The upper layer, uncompressed.
fn layer2() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, "del/.wh.gone.txt", b"");
    // The opaque marker comes after an entry of its own layer, which must survive.
    dir(&mut b, "opq/");
    file(&mut b, "opq/new", b"new\n");
    file(&mut b, "opq/.wh..wh..opq", b"");
    file(&mut b, "app/file", b"shared inode\n");
    entry(
        &mut b,
        "app/hard",
        EntryType::Link,
        0o644,
        0,
        b"",
        Some("app/file"),
    );
    entry(
        &mut b,
        "app/secret",
        EntryType::Regular,
        0o750,
        1000,
        b"s3cret\n",
        None,
    );
    entry(
        &mut b,
        "home/user/",
        EntryType::Directory,
        0o700,
        1000,
        b"",
        None,
    );
    entry(
        &mut b,
        "app/link",
        EntryType::Symlink,
        0o777,
        0,
        b"",
        Some("/etc/hostname"),
    );
    // Through the merged-/usr symlink of the lower layer.
    file(&mut b, "bin/added", b"via symlink\n");
    entry(
        &mut b,
        "becomes-dir/",
        EntryType::Directory,
        0o755,
        0,
        b"",
        None,
    );
    file(&mut b, "becomes-dir/inner", b"inner\n");
    file(&mut b, "usr/bin/tool", b"tool v2\n");
    file(&mut b, "evil/smolvm-oci-escape-test", b"must stay inside\n");
    file(&mut b, "up/smolvm-oci-escape-test2", b"must stay inside\n");
    b.into_inner().unwrap()
}

const CONFIG: &str = r#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/bin:/bin","GREETING=hi"],"Entrypoint":null,"Cmd":["/bin/sh"],"WorkingDir":"/app"},"rootfs":{"type":"layers","diff_ids":[]}}"#;

fn sha(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        file(&mut b, name, data);
    }
    b.into_inner().unwrap()
}

fn docker_save() -> Vec<u8> {
    let manifest = r#"[{"Config":"cfg.json","RepoTags":["test:latest"],"Layers":["l1/layer.tar","l2/layer.tar"]}]"#;
    tar_of(&[
        ("manifest.json", manifest.as_bytes()),
        ("cfg.json", CONFIG.as_bytes()),
        ("l1/layer.tar", &layer1()),
        // The upper layer zstd-compressed here, plain in the OCI layout.
        ("l2/layer.tar", &zstd::encode_all(&layer2()[..], 3).unwrap()),
    ])
}

/// An OCI image layout: index (with a foreign-platform entry first) → index → manifest.
fn oci_layout_files() -> Vec<(String, Vec<u8>)> {
    let l1 = layer1();
    let l2 = layer2();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
        "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":{}}},
        "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:{}","size":{}}},
                  {{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{}","size":{}}}]}}"#,
        sha(CONFIG.as_bytes()),
        CONFIG.len(),
        sha(&l1),
        l1.len(),
        sha(&l2),
        l2.len()
    );
    let inner = format!(
        r#"{{"schemaVersion":2,"manifests":[
        {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{}","size":1,"platform":{{"architecture":"arm64","os":"linux"}}}},
        {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{}","size":{},"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
        "0".repeat(64),
        sha(manifest.as_bytes()),
        manifest.len()
    );
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"sha256:{}","size":{}}}]}}"#,
        sha(inner.as_bytes()),
        inner.len()
    );
    let blob = |d: &[u8]| (format!("blobs/sha256/{}", sha(d)), d.to_vec());
    vec![
        (
            "oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ),
        ("index.json".into(), index.into_bytes()),
        blob(inner.as_bytes()),
        blob(manifest.as_bytes()),
        blob(CONFIG.as_bytes()),
        blob(&l1),
        blob(&l2),
    ]
}

fn write_tree(dir: &Path, files: &[(String, Vec<u8>)]) {
    for (name, data) in files {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
}

fn check_image(img: &Path, agent: &Path) {
    assert_fsck_clean(img);
    assert_agent_installed(img, agent);
    // Whiteout: gone, sibling kept.
    assert!(stat(img, "/del/gone.txt").is_none());
    assert!(stat(img, "/del/.wh.gone.txt").is_none());
    assert_eq!(cat(img, "/del/stays.txt").unwrap(), b"still here\n");
    // Opaque directory: lower content gone, this layer's entry kept, marker not copied.
    assert_eq!(ls(img, "/opq"), vec!["new".to_string()]);
    // Owners and modes from the tar headers.
    let secret = stat(img, "/app/secret").unwrap();
    assert_eq!(
        (secret.mode & 0o7777, secret.uid, secret.gid),
        (0o750, 1000, 1000)
    );
    assert_eq!(cat(img, "/app/secret").unwrap(), b"s3cret\n");
    let home = stat(img, "/home/user").unwrap();
    assert_eq!(
        (home.kind.as_str(), home.mode & 0o7777, home.uid),
        ("directory", 0o700, 1000)
    );
    // Hard link shares the inode.
    let f = stat(img, "/app/file").unwrap();
    let h = stat(img, "/app/hard").unwrap();
    assert_eq!((f.inode, f.links), (h.inode, 2));
    // Symlinks stay symlinks with their targets.
    assert_eq!(
        stat(img, "/app/link").unwrap().link_dest.as_deref(),
        Some("/etc/hostname")
    );
    assert_eq!(
        stat(img, "/bin").unwrap().link_dest.as_deref(),
        Some("usr/bin")
    );
    // Writes through a lower layer's symlink land inside the image.
    assert_eq!(cat(img, "/usr/bin/added").unwrap(), b"via symlink\n");
    assert_eq!(cat(img, "/usr/bin/tool").unwrap(), b"tool v2\n");
    assert_eq!(stat(img, "/becomes-dir").unwrap().kind, "directory");
    assert_eq!(cat(img, "/becomes-dir/inner").unwrap(), b"inner\n");
    assert_eq!(
        cat(img, "/smolvm-oci-escape-test").unwrap(),
        b"must stay inside\n"
    );
    assert_eq!(
        cat(img, "/smolvm-oci-escape-test2").unwrap(),
        b"must stay inside\n"
    );
    assert!(!Path::new("/smolvm-oci-escape-test").exists());
    assert!(!Path::new("/smolvm-oci-escape-test2").exists());
    // Mount points the agent needs are added.
    for d in ["/proc", "/sys", "/dev", "/run", "/tmp"] {
        assert_eq!(stat(img, d).unwrap().kind, "directory", "{d}");
    }
}

#[test]
fn docker_save_archive() {
    if !prerequisites() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let archive = t.path().join("image.tar");
    std::fs::write(&archive, docker_save()).unwrap();
    let img = t.path().join("oci.ext4");
    let agent = agent();
    let info = build(&RootfsSpec::new(Base::Oci { archive }, &agent), &img).unwrap();
    check_image(&img, &agent);
    let cfg = info.oci_config.unwrap();
    assert_eq!(cfg.env, vec!["PATH=/usr/bin:/bin", "GREETING=hi"]);
    assert_eq!(cfg.cmd, vec!["/bin/sh"]);
    assert!(cfg.entrypoint.is_empty());
    assert_eq!(cfg.workdir, "/app");
}

#[test]
fn oci_layout_directory_and_tar() {
    if !prerequisites() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let files = oci_layout_files();
    let layout = t.path().join("layout");
    write_tree(&layout, &files);
    let agent = agent();

    let img = t.path().join("dir.ext4");
    let info = build(
        &RootfsSpec::new(
            Base::Oci {
                archive: layout.clone(),
            },
            &agent,
        ),
        &img,
    )
    .unwrap();
    check_image(&img, &agent);
    assert_eq!(info.oci_config.unwrap().workdir, "/app");

    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    let archive = t.path().join("layout.tar");
    std::fs::write(&archive, tar_of(&refs)).unwrap();
    let img2 = t.path().join("tar.ext4");
    build(&RootfsSpec::new(Base::Oci { archive }, &agent), &img2).unwrap();
    check_image(&img2, &agent);
}

#[test]
fn corrupt_or_malformed_images_are_refused() {
    if !prerequisites() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let agent = agent();
    let img = t.path().join("bad.ext4");

    // A layer blob whose bytes do not match its digest.
    let mut files = oci_layout_files();
    let l2 = files.last_mut().unwrap();
    l2.1[600] ^= 0xff;
    let layout = t.path().join("corrupt");
    write_tree(&layout, &files);
    let err = build(
        &RootfsSpec::new(Base::Oci { archive: layout }, &agent),
        &img,
    )
    .unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");

    // Not an image at all.
    let junk = t.path().join("junk.tar");
    std::fs::write(&junk, tar_of(&[("hello.txt", b"hi")])).unwrap();
    let err = build(&RootfsSpec::new(Base::Oci { archive: junk }, &agent), &img).unwrap_err();
    assert!(err.to_string().contains("manifest.json"), "{err}");

    // Garbage bytes.
    let garbage = t.path().join("garbage.tar");
    std::fs::write(&garbage, vec![0x5a; 10_000]).unwrap();
    assert!(build(
        &RootfsSpec::new(Base::Oci { archive: garbage }, &agent),
        &img
    )
    .is_err());

    // A docker manifest pointing outside the archive.
    let escape = t.path().join("escape.tar");
    let manifest = r#"[{"Config":"../../etc/passwd","Layers":[]}]"#;
    std::fs::write(&escape, tar_of(&[("manifest.json", manifest.as_bytes())])).unwrap();
    let err = build(
        &RootfsSpec::new(Base::Oci { archive: escape }, &agent),
        &img,
    )
    .unwrap_err();
    assert!(err.to_string().contains("outside the archive"), "{err}");

    assert!(!img.exists());
}
