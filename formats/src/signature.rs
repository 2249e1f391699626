//! Signed machines: an Ed25519 signature section (kind 5) and the keys that make and check it.
//!
//! The signature covers the header's fixed fields, every other table entry exactly as stored
//! (kind, flags, compression, offset, lengths, xxh3 checksum) and a SHA-512 digest of every
//! other section's stored bytes, which the section carries. xxh3 detects damage but is not a
//! cryptographic hash, so the digests are what bind the signed bytes: checking a signature
//! hashes the whole stored machine once (`docs/FORMAT.md`, Signature). The signature section
//! is optional (older readers skip it), appears at most once, and is always the last
//! section in the table, written after the data it covers.

use std::fmt;

use ed25519_compact::sha512;

use crate::error::{Error, Result};
use crate::layout::{u16_at, u32_at, ENTRY_LEN};
use crate::reader::MachineReader;
use crate::source::{read_exact_at, ReadAt, CHUNK};
use crate::SectionKind;

/// First eight bytes of a signature section.
pub const SIGNATURE_MAGIC: [u8; 8] = *b"SMOLSIGN";
/// Signature section version this build reads and writes.
pub const SIGNATURE_VERSION: u16 = 1;
/// Algorithm code: Ed25519 (RFC 8032, pure) over the message below, SHA-512 section digests.
pub const ALG_ED25519_SHA512: u16 = 1;
/// Fixed part of a signature section before its digests.
pub const SIGNATURE_HEAD_LEN: usize = 128;
/// One digest record: SHA-512 of one covered section's stored bytes.
pub const DIGEST_LEN: usize = 64;
/// Domain separation: the signed message starts with this, so a smolvm signature can never
/// be taken for a signature over anything else made with the same key.
const DOMAIN: &[u8] = b"smolvm machine signature v1\0";

const PUBLIC_PREFIX: &str = "smolvm-ed25519-public:";
const SECRET_PREFIX: &str = "smolvm-ed25519-secret:";

/// A public key that may sign machines.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

/// A secret signing key (its 32-byte Ed25519 seed).
#[derive(Clone)]
pub struct SecretKey([u8; 32]);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public {})", self.public().id())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        let d = |c: u8| (c as char).to_digit(16);
        *o = (d(s[2 * i])? * 16 + d(s[2 * i + 1])?) as u8;
    }
    Some(out)
}

/// The key text after `prefix`: one line, surrounding whitespace ignored.
fn key_text(text: &str, prefix: &str, what: &str) -> Result<[u8; 32]> {
    let t = text.trim();
    let body = t.strip_prefix(prefix).ok_or_else(|| {
        Error::Key(format!(
            "not a smolvm {what} key (expected one line `{prefix}<64 hex digits>`)"
        ))
    })?;
    unhex32(body).ok_or_else(|| Error::Key(format!("the {what} key is not 64 hex digits")))
}

impl PublicKey {
    /// Parses the one-line text form `smolvm-ed25519-public:<64 hex digits>`.
    pub fn parse(text: &str) -> Result<PublicKey> {
        let k = key_text(text, PUBLIC_PREFIX, "public")?;
        ed25519_compact::PublicKey::new(k)
            .validate()
            .map_err(|_| Error::Key("the public key is not a valid Ed25519 point".into()))?;
        Ok(PublicKey(k))
    }
    /// The one-line text form, newline included.
    pub fn to_text(&self) -> String {
        format!("{PUBLIC_PREFIX}{}\n", hex(&self.0))
    }
    /// A short name for messages: the first 8 bytes of SHA-512 of the key, in hex.
    pub fn id(&self) -> String {
        hex(&sha512::Hash::hash(self.0)[..8])
    }
}

impl SecretKey {
    /// A key from a 32-byte seed (from a CSPRNG for a new key).
    pub fn from_seed(seed: [u8; 32]) -> SecretKey {
        SecretKey(seed)
    }
    /// Parses the one-line text form `smolvm-ed25519-secret:<64 hex digits>`.
    pub fn parse(text: &str) -> Result<SecretKey> {
        key_text(text, SECRET_PREFIX, "secret").map(SecretKey)
    }
    /// The one-line text form, newline included.
    pub fn to_text(&self) -> String {
        format!("{SECRET_PREFIX}{}\n", hex(&self.0))
    }
    fn pair(&self) -> ed25519_compact::KeyPair {
        ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::new(self.0))
    }
    /// Its public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(*self.pair().pk)
    }
}

/// What a machine's signature section says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureInfo {
    /// Index of the signature section in the table.
    pub index: usize,
    /// The key that made it (checked against the trusted keys by [`verify_signature`]).
    pub key: PublicKey,
    /// Sections covered.
    pub covered: usize,
}

/// The signed message: domain, the header's fixed fields, then per covered section its table
/// entry as stored and its SHA-512 digest.
pub(crate) fn message(header: &[u8], entries: &[&[u8]], digests: &[[u8; 64]]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + 32 + entries.len() * 128);
    m.extend_from_slice(DOMAIN);
    // Version, arch, reserved and flags (8..20) and the reserved bytes 40..56: everything in
    // the header that signing does not change (count, table offset and length do).
    m.extend_from_slice(&header[8..20]);
    m.extend_from_slice(&header[40..56]);
    m.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (e, d) in entries.iter().zip(digests) {
        m.extend_from_slice(e);
        m.extend_from_slice(d);
    }
    m
}

/// SHA-512 of `len` bytes at `offset` of `src`, streamed.
pub(crate) fn digest_range<S: ReadAt + ?Sized>(
    src: &S,
    offset: u64,
    len: u64,
    what: &str,
) -> Result<[u8; 64]> {
    let mut h = sha512::Hash::new();
    let mut buf = vec![0u8; CHUNK.min(usize::try_from(len).unwrap_or(CHUNK))];
    let mut pos = 0u64;
    while pos < len {
        let n = usize::try_from(len - pos).unwrap_or(CHUNK).min(buf.len());
        read_exact_at(src, &mut buf[..n], offset + pos, what)?;
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(h.finalize())
}

/// Builds a signature section's bytes for a machine whose header fields are `header` (64
/// bytes; only the fields [`message`] takes are read) and whose covered table entries and
/// section digests are given.
pub(crate) fn encode(
    key: &SecretKey,
    header: &[u8],
    entries: &[&[u8]],
    digests: &[[u8; 64]],
) -> Vec<u8> {
    let msg = message(header, entries, digests);
    let pair = key.pair();
    let sig = pair.sk.sign(&msg, None);
    let mut out = vec![0u8; SIGNATURE_HEAD_LEN];
    out[0..8].copy_from_slice(&SIGNATURE_MAGIC);
    out[8..10].copy_from_slice(&SIGNATURE_VERSION.to_le_bytes());
    out[10..12].copy_from_slice(&ALG_ED25519_SHA512.to_le_bytes());
    out[12..16].copy_from_slice(&(entries.len() as u32).to_le_bytes());
    out[16..48].copy_from_slice(&*pair.pk);
    out[48..112].copy_from_slice(&*sig);
    for d in digests {
        out.extend_from_slice(d);
    }
    out
}

/// A decoded signature section.
struct Parsed {
    key: PublicKey,
    sig: [u8; 64],
    digests: Vec<[u8; 64]>,
}

fn parse(b: &[u8], covered: usize) -> Result<Parsed> {
    let bad = |m: &str| Error::corrupt(format!("signature section: {m}"));
    if b.len() < SIGNATURE_HEAD_LEN || b[0..8] != SIGNATURE_MAGIC {
        return Err(bad("wrong magic or too short"));
    }
    let version = u16_at(b, 8);
    if version != SIGNATURE_VERSION {
        return Err(Error::UnsupportedVersion {
            what: "signature",
            found: version.into(),
            supported: SIGNATURE_VERSION.into(),
        });
    }
    let alg = u16_at(b, 10);
    if alg != ALG_ED25519_SHA512 {
        return Err(Error::BadSignature(format!(
            "unknown signature algorithm {alg}; upgrade smolvm"
        )));
    }
    let n = u32_at(b, 12) as usize;
    if n != covered {
        return Err(Error::BadSignature(format!(
            "it covers {n} sections but the file has {covered} others: sections were added or \
             removed after signing"
        )));
    }
    if b.len() != SIGNATURE_HEAD_LEN + n * DIGEST_LEN || b[112..128].iter().any(|&x| x != 0) {
        return Err(bad("wrong length or reserved bytes set"));
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&b[16..48]);
    let mut sig = [0u8; 64];
    sig.copy_from_slice(&b[48..112]);
    let digests = b[SIGNATURE_HEAD_LEN..]
        .chunks_exact(DIGEST_LEN)
        .map(|c| {
            let mut d = [0u8; 64];
            d.copy_from_slice(c);
            d
        })
        .collect();
    Ok(Parsed {
        key: PublicKey(key),
        sig,
        digests,
    })
}

impl<S: ReadAt> MachineReader<S> {
    /// The signature section, if any, with the key that made it; nothing is checked
    /// beyond its structure (see [`verify_signature`]).
    pub fn signature_info(&self) -> Result<Option<SignatureInfo>> {
        let Some(e) = self.section(SectionKind::Signature) else {
            return Ok(None);
        };
        let p = parse(&self.read_section(e)?, self.table_len() - 1)?;
        Ok(Some(SignatureInfo {
            index: e.index,
            key: p.key,
            covered: p.digests.len(),
        }))
    }
}

/// Checks that `r` is signed by one of `trusted` and that no covered byte changed since:
/// the signature over header fields, table entries and digests, then every covered section's
/// stored bytes against its SHA-512 digest (the whole stored machine is read once). Padding
/// between sections is not covered (it carries nothing; `verify` checks it is zero).
pub fn verify_signature<S: ReadAt>(
    r: &MachineReader<S>,
    trusted: &[PublicKey],
) -> Result<SignatureInfo> {
    let e = r.section(SectionKind::Signature).ok_or(Error::Unsigned)?;
    if e.index + 1 != r.table_len() {
        return Err(Error::BadSignature(
            "the signature is not the last section: sections were added after signing".into(),
        ));
    }
    // The signature's own table entry is the one thing the signature cannot cover: it must
    // be exactly what the writer writes (optional, uncompressed, reserved bytes zero).
    let own = &r.table_bytes()[e.index * ENTRY_LEN as usize..][..ENTRY_LEN as usize];
    if own[4..16].iter().chain(&own[48..64]).any(|&b| b != 0) {
        return Err(Error::BadSignature(
            "the signature's table entry has flags or reserved bytes set".into(),
        ));
    }
    let p = parse(&r.read_section(e)?, r.table_len() - 1)?;
    if !trusted.contains(&p.key) {
        return Err(Error::UntrustedKey(p.key.id()));
    }
    let table = r.table_bytes();
    let entries: Vec<&[u8]> = (0..r.table_len() - 1)
        .map(|i| &table[i * ENTRY_LEN as usize..(i + 1) * ENTRY_LEN as usize])
        .collect();
    let msg = message(r.header_bytes(), &entries, &p.digests);
    let pk = ed25519_compact::PublicKey::new(p.key.0);
    pk.verify(&msg, &ed25519_compact::Signature::new(p.sig))
        .map_err(|_| {
            Error::BadSignature(format!(
                "the signature by key {} does not match the header and section table",
                p.key.id()
            ))
        })?;
    for (i, want) in p.digests.iter().enumerate() {
        let raw = r.raw_entry(i);
        let what = format!("section {i}");
        let got = digest_range(r.source(), r.base() + raw.offset, raw.stored_len, &what)?;
        if &got != want {
            return Err(Error::BadSignature(format!(
                "section {i} ({}) changed after it was signed",
                raw.kind()
            )));
        }
    }
    Ok(SignatureInfo {
        index: e.index,
        key: p.key,
        covered: p.digests.len(),
    })
}

// ---------------------------------------------------------------------------------------
// Attached signatures (docs/DISTRIBUTION.md, "Attached signatures")

/// Domain of an attached signature's message, distinct from the in-file signature's.
const ATTACHED_DOMAIN: &[u8] = b"smolvm attached signature v1\0";
/// Version of the attached signature document this build reads and writes.
pub const ATTACHED_VERSION: u32 = 1;
/// Largest attached signature document accepted (it is about 400 bytes).
pub const ATTACHED_MAX_LEN: usize = 64 * 1024;

/// A signature kept beside a file rather than inside it (pushed to a registry as an OCI
/// artifact whose `subject` is the machine's manifest): Ed25519 by `key` over
/// `"smolvm attached signature v1\0" || size (u64 LE) || SHA-512 of the whole file`.
/// It binds the exact bytes of the file (a machine or a packed executable), whatever its
/// in-file signature says. Serialized as one JSON object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachedSignature {
    /// [`ATTACHED_VERSION`].
    pub version: u32,
    /// The signing key's one-line text form (`smolvm-ed25519-public:<hex>`, no newline).
    pub key: String,
    /// The whole file's length in bytes.
    pub size: u64,
    /// SHA-512 of the whole file, 128 lowercase hex digits.
    pub sha512: String,
    /// The Ed25519 signature, 128 lowercase hex digits.
    pub signature: String,
}

/// Length and SHA-512 of everything `src` holds (a whole file), streamed.
pub fn whole_digest<S: ReadAt + ?Sized>(src: &S) -> Result<(u64, [u8; 64])> {
    let len = src.size().map_err(|e| Error::Io {
        context: "file length".into(),
        source: e,
    })?;
    Ok((len, digest_range(src, 0, len, "the file")?))
}

fn attached_message(size: u64, sha512: &[u8; 64]) -> Vec<u8> {
    let mut m = Vec::with_capacity(ATTACHED_DOMAIN.len() + 8 + 64);
    m.extend_from_slice(ATTACHED_DOMAIN);
    m.extend_from_slice(&size.to_le_bytes());
    m.extend_from_slice(sha512);
    m
}

fn unhex64(s: &str) -> Option<[u8; 64]> {
    let a = unhex32(s.get(..64)?)?;
    let b = unhex32(s.get(64..)?)?;
    let mut out = [0u8; 64];
    out[..32].copy_from_slice(&a);
    out[32..].copy_from_slice(&b);
    Some(out)
}

impl AttachedSignature {
    /// Signs a file of `size` bytes whose SHA-512 is `sha512`.
    pub fn sign(key: &SecretKey, size: u64, sha512: &[u8; 64]) -> AttachedSignature {
        let sig = key.pair().sk.sign(attached_message(size, sha512), None);
        AttachedSignature {
            version: ATTACHED_VERSION,
            key: key.public().to_text().trim_end().to_string(),
            size,
            sha512: hex(sha512),
            signature: hex(&*sig),
        }
    }

    /// The JSON document.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an attached signature serializes")
    }

    /// Parses a JSON document: bounded, every field well-formed (lowercase hex of the right
    /// length, a valid public key), the version known. Nothing is verified yet.
    pub fn parse(bytes: &[u8]) -> Result<AttachedSignature> {
        let bad = |m: String| Error::BadSignature(format!("attached signature: {m}"));
        if bytes.len() > ATTACHED_MAX_LEN {
            return Err(bad(format!("{} bytes", bytes.len())));
        }
        let a: AttachedSignature = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        a.check()?;
        Ok(a)
    }

    /// Parses a JSON array of documents (the file `smolpack pull --cache --signatures`
    /// writes), each checked as by [`AttachedSignature::parse`]; malformed ones are dropped.
    pub fn parse_list(bytes: &[u8]) -> Result<Vec<AttachedSignature>> {
        if bytes.len() > ATTACHED_MAX_LEN * 16 {
            return Err(Error::BadSignature(format!(
                "attached signatures: {} bytes",
                bytes.len()
            )));
        }
        let v: Vec<AttachedSignature> = serde_json::from_slice(bytes)
            .map_err(|e| Error::BadSignature(format!("attached signatures: {e}")))?;
        Ok(v.into_iter().filter(|a| a.check().is_ok()).collect())
    }

    fn check(&self) -> Result<()> {
        let bad = |m: String| Error::BadSignature(format!("attached signature: {m}"));
        if self.version != ATTACHED_VERSION {
            return Err(Error::UnsupportedVersion {
                what: "attached signature",
                found: self.version,
                supported: ATTACHED_VERSION,
            });
        }
        let lower_hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        for (name, v) in [("sha512", &self.sha512), ("signature", &self.signature)] {
            if v.len() != 128 || !lower_hex(v) {
                return Err(bad(format!("{name} is not 128 lowercase hex digits")));
            }
        }
        self.public_key()?;
        Ok(())
    }

    /// The signing key.
    pub fn public_key(&self) -> Result<PublicKey> {
        PublicKey::parse(&self.key)
    }

    /// Checks that this signature is by one of `trusted` and covers exactly a file of `size`
    /// bytes whose SHA-512 is `sha512`; returns the key.
    pub fn verify(&self, size: u64, sha512: &[u8; 64], trusted: &[PublicKey]) -> Result<PublicKey> {
        let key = self.public_key()?;
        if !trusted.contains(&key) {
            return Err(Error::UntrustedKey(key.id()));
        }
        let (Some(want), Some(sig)) = (unhex64(&self.sha512), unhex64(&self.signature)) else {
            return Err(Error::BadSignature(
                "attached signature: malformed hex".into(),
            ));
        };
        let pk = ed25519_compact::PublicKey::new(key.0);
        let signed = attached_message(self.size, &want);
        if pk
            .verify(&signed, &ed25519_compact::Signature::new(sig))
            .is_err()
        {
            return Err(Error::BadSignature(format!(
                "the attached signature by key {} does not match what it says it signs",
                key.id()
            )));
        }
        if self.size != size || &want != sha512 {
            return Err(Error::BadSignature(format!(
                "the attached signature by key {} is for another file ({} bytes, SHA-512 {}…)",
                key.id(),
                self.size,
                &self.sha512[..16]
            )));
        }
        Ok(key)
    }
}

/// Verifies `file` against attached signatures (JSON documents): the first by a trusted key
/// that covers the file's exact bytes wins. With none, the error says why the last one failed
/// (untrusted keys come before mismatches in that order of preference).
pub fn verify_attached<S: ReadAt + ?Sized>(
    src: &S,
    signatures: &[AttachedSignature],
    trusted: &[PublicKey],
) -> Result<PublicKey> {
    if signatures.is_empty() {
        return Err(Error::Unsigned);
    }
    let (size, sha512) = whole_digest(src)?;
    let mut last = None;
    for s in signatures {
        match s.verify(size, &sha512, trusted) {
            Ok(k) => return Ok(k),
            Err(Error::UntrustedKey(_)) if last.is_some() => {}
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or(Error::Unsigned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_bad_text_is_refused() {
        let k = SecretKey::from_seed([7; 32]);
        let again = SecretKey::parse(&k.to_text()).unwrap();
        assert_eq!(again.public(), k.public());
        let p = PublicKey::parse(&k.public().to_text()).unwrap();
        assert_eq!(p, k.public());
        assert_eq!(p.id().len(), 16);
        assert!(
            PublicKey::parse(&k.to_text()).is_err(),
            "a secret key is no public key"
        );
        assert!(SecretKey::parse(&p.to_text()).is_err());
        assert!(PublicKey::parse("smolvm-ed25519-public:00").is_err());
        assert!(PublicKey::parse(&format!("{PUBLIC_PREFIX}{}", "zz".repeat(32))).is_err());
        assert!(format!("{k:?}").contains(&p.id()), "Debug shows no secret");
        assert!(!format!("{k:?}").contains(&hex(&[7; 32])));
    }

    #[test]
    fn parse_never_panics_on_short_or_odd_input() {
        for len in 0..300 {
            let mut b = vec![0u8; len];
            if len >= 8 {
                b[..8].copy_from_slice(&SIGNATURE_MAGIC);
            }
            if len >= 12 {
                b[8] = 1;
                b[10] = 1;
            }
            let _ = parse(&b, 1);
            let _ = parse(&b, 0);
        }
    }

    #[test]
    fn attached_signatures_bind_the_whole_file() {
        let k = SecretKey::from_seed([3; 32]);
        let other = SecretKey::from_seed([4; 32]);
        let file = b"some machine bytes".to_vec();
        let (size, digest) = whole_digest(&file).unwrap();
        let a = AttachedSignature::sign(&k, size, &digest);
        let back = AttachedSignature::parse(&a.to_bytes()).unwrap();
        assert_eq!(back, a);
        assert_eq!(
            verify_attached(&file, std::slice::from_ref(&back), &[k.public()]).unwrap(),
            k.public()
        );
        // Not a trusted key.
        assert!(matches!(
            verify_attached(&file, std::slice::from_ref(&back), &[other.public()]),
            Err(Error::UntrustedKey(_))
        ));
        // Another file.
        let mut changed = file.clone();
        changed[0] ^= 1;
        let e = verify_attached(&changed, std::slice::from_ref(&back), &[k.public()]).unwrap_err();
        assert!(e.to_string().contains("another file"), "{e}");
        // A tampered signature, or a tampered digest or size under the same signature.
        let mut t = back.clone();
        t.signature
            .replace_range(0..1, if &t.signature[..1] == "0" { "1" } else { "0" });
        let e = verify_attached(&file, &[t], &[k.public()]).unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
        let mut t = back.clone();
        t.size += 1;
        assert!(matches!(
            verify_attached(&file, &[t], &[k.public()]),
            Err(Error::BadSignature(_))
        ));
        // One good signature among bad ones is enough; none at all is "not signed".
        let bad = AttachedSignature::sign(&other, size, &digest);
        assert!(verify_attached(&file, &[bad, a.clone()], &[k.public()]).is_ok());
        assert!(matches!(
            verify_attached(&file, &[], &[k.public()]),
            Err(Error::Unsigned)
        ));
        // Malformed documents.
        for text in [
            "",
            "{}",
            r#"{"version":2,"key":"","size":1,"sha512":"","signature":""}"#,
        ] {
            assert!(AttachedSignature::parse(text.as_bytes()).is_err(), "{text}");
        }
        let mut upper = a.clone();
        upper.sha512 = upper.sha512.to_uppercase();
        assert!(AttachedSignature::parse(&upper.to_bytes()).is_err());
    }

    proptest::proptest! {
        /// Any bytes: parsing never panics, and what parses serializes back to a document
        /// that parses the same.
        #[test]
        fn attached_parse_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            if let Ok(a) = AttachedSignature::parse(&bytes) {
                proptest::prop_assert_eq!(AttachedSignature::parse(&a.to_bytes()).unwrap(), a);
            }
        }
    }
}
