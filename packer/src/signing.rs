//! `smolpack keygen`, `smolpack sign` and `smolpack verify --key`: Ed25519 keys in one-line
//! text files and the signature section of a machine (`smolvm_formats::signature`).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use smolvm_formats::signature::{verify_signature, PublicKey, SecretKey, SignatureInfo};
use smolvm_formats::{trailer, MachineReader, MachineWriter};

use crate::gc::{self, ScratchDir};

/// Why a key or signature operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{} already exists; keygen never overwrites a key (remove it first)", .0.display())]
    Exists(PathBuf),
    #[error("{}: {error}", path.display())]
    File {
        path: PathBuf,
        error: smolvm_formats::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SignError + '_ {
    move |error| SignError::Io {
        path: path.to_path_buf(),
        error,
    }
}

fn file_err(path: &Path) -> impl FnOnce(smolvm_formats::Error) -> SignError + '_ {
    move |error| SignError::File {
        path: path.to_path_buf(),
        error,
    }
}

/// Writes a new key pair: `PREFIX.key` (secret, mode 0600) and `PREFIX.pub`. Neither may
/// exist. Returns the public key.
pub fn keygen(prefix: &Path) -> Result<PublicKey, SignError> {
    let secret_path = with_suffix(prefix, "key");
    let public_path = with_suffix(prefix, "pub");
    for p in [&secret_path, &public_path] {
        if p.exists() {
            return Err(SignError::Exists(p.clone()));
        }
    }
    let mut seed = [0u8; 32];
    let urandom = Path::new("/dev/urandom");
    File::open(urandom)
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(io_err(urandom))?;
    let key = SecretKey::from_seed(seed);
    let write = |path: &Path, mode: u32, text: &str| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(io_err(path))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(io_err(path))
    };
    write(&secret_path, 0o600, &key.to_text())?;
    write(&public_path, 0o644, &key.public().to_text())?;
    Ok(key.public())
}

fn with_suffix(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_os_string();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// Reads a secret key file.
pub fn read_secret(path: &Path) -> Result<SecretKey, SignError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    SecretKey::parse(&text).map_err(file_err(path))
}

/// Reads a public key file.
pub fn read_public(path: &Path) -> Result<PublicKey, SignError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    PublicKey::parse(&text).map_err(file_err(path))
}

/// Signs `path` in place (atomically: a copy is signed, checked and renamed over it). A
/// packed executable keeps its stub; an existing signature is replaced. Returns the key id.
pub fn sign(path: &Path, key: &SecretKey) -> Result<String, SignError> {
    let r = MachineReader::open(path).map_err(file_err(path))?;
    r.verify().map_err(file_err(path))?;
    let Some(t) = r.trailer().copied() else {
        MachineWriter::copy_from(&r, path, Some(key)).map_err(file_err(path))?;
        check(path, &key.public())?;
        return Ok(key.public().id());
    };
    // A packed executable: sign its payload beside it, then pack the same stub with it.
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    gc::remove_scratch_leftovers(&dir, gc::PACK_PREFIX);
    let scratch = ScratchDir::create(&dir, gc::PACK_PREFIX).map_err(io_err(path))?;
    let payload = scratch.path().join("payload.smolmachine");
    MachineWriter::copy_from(&r, &payload, Some(key)).map_err(file_err(path))?;
    let mut stub = vec![0u8; t.stub_len as usize];
    use std::os::unix::fs::FileExt;
    r.file().read_exact_at(&mut stub, 0).map_err(io_err(path))?;
    use std::os::unix::fs::PermissionsExt;
    let mode = r
        .file()
        .metadata()
        .map_err(io_err(path))?
        .permissions()
        .mode()
        & 0o7777;
    let signed = MachineReader::open(&payload).map_err(file_err(&payload))?;
    trailer::pack_from(stub.as_slice(), "its own stub", mode, &signed, path)
        .map_err(file_err(path))?;
    check(path, &key.public())?;
    Ok(key.public().id())
}

fn check(path: &Path, key: &PublicKey) -> Result<SignatureInfo, SignError> {
    let r = MachineReader::open(path).map_err(file_err(path))?;
    verify_signature(&r, &[*key]).map_err(file_err(path))
}

/// `smolpack verify --key PUB...`: every checksum and zero padding, then the signature by one
/// of `keys` over every section.
pub fn verify(path: &Path, keys: &[PublicKey]) -> Result<SignatureInfo, SignError> {
    let r = MachineReader::open(path).map_err(file_err(path))?;
    if let Some(t) = r.trailer() {
        trailer::check_stub_extent(r.file(), t).map_err(file_err(path))?;
    }
    r.verify().map_err(file_err(path))?;
    verify_signature(&r, keys).map_err(file_err(path))
}

/// Whether `verify` failed only because the machine carries no signature by a trusted key
/// (unsigned, or signed by another key): the case an attached signature may settle.
pub fn is_unsigned_or_untrusted(e: &SignError) -> bool {
    matches!(
        e,
        SignError::File {
            error: smolvm_formats::Error::Unsigned | smolvm_formats::Error::UntrustedKey(_),
            ..
        }
    )
}

/// `smolpack verify --key PUB REF` for a machine not signed inside by a trusted key: its
/// checksums, then the attached signatures fetched from the registry, until one by a trusted
/// key covers the file's exact bytes. Returns that key and the signature manifest's digest,
/// or why none does (one clause, to follow the in-file refusal).
pub fn verify_attached(
    path: &Path,
    keys: &[PublicKey],
    found: &[crate::registry::Attached],
) -> Result<(PublicKey, String), String> {
    if found.is_empty() {
        return Err("no signature is attached to it in the registry".into());
    }
    let r = MachineReader::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    r.verify().map_err(|e| format!("{}: {e}", path.display()))?;
    let (size, sha512) = smolvm_formats::signature::whole_digest(r.file())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut why = Vec::new();
    for a in found {
        match &a.signature {
            Ok(sig) => match sig.verify(size, &sha512, keys) {
                Ok(k) => return Ok((k, a.manifest_digest.clone())),
                Err(e) => why.push(format!("{}: {e}", a.manifest_digest)),
            },
            Err(e) => why.push(e.to_string()),
        }
    }
    Err(format!(
        "no signature attached to it in the registry verifies ({})",
        why.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_a_pair_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("release");
        let public = keygen(&prefix).unwrap();
        let secret = read_secret(&dir.path().join("release.key")).unwrap();
        assert_eq!(secret.public(), public);
        assert_eq!(
            read_public(&dir.path().join("release.pub")).unwrap(),
            public
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join("release.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the secret key is private");
        assert!(matches!(keygen(&prefix), Err(SignError::Exists(_))));
        let other = keygen(&dir.path().join("other")).unwrap();
        assert_ne!(other, public, "keys are random");
        let err = read_public(&dir.path().join("release.key")).unwrap_err();
        assert!(err.to_string().contains("not a smolvm public key"), "{err}");
    }
}
