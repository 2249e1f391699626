//! Registry references as `smolvm run` recognises them: `REGISTRY/NAME:TAG`,
//! `REGISTRY/NAME@sha256:HEX` or both (docs/DISTRIBUTION.md).
//!
//! The stub has no registry client: when its FILE argument is not an existing path and reads
//! as a reference by these rules, it asks `smolpack pull --cache` for the machine. The rules
//! are stricter than a registry's own grammar so that a mistyped path is not taken for a
//! reference: the first component must name a registry host (it holds a `.` or a `:` port,
//! or is `localhost`), and a tag or a digest must be given.

/// Longest reference accepted (the distribution spec limits repository names to 255).
pub const MAX_REFERENCE_LEN: usize = 512;

/// The parts of a recognised reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefParts<'a> {
    /// `host[:port]`.
    pub registry: &'a str,
    /// The repository path below the registry.
    pub repository: &'a str,
    /// The tag, if one is given.
    pub tag: Option<&'a str>,
    /// The hex of a `@sha256:` digest, if one is given.
    pub digest: Option<&'a str>,
}

/// Splits `s` into a reference's parts, or `None` when it does not read as one.
pub fn parse_reference(s: &str) -> Option<RefParts<'_>> {
    if s.is_empty() || s.len() > MAX_REFERENCE_LEN || !s.is_ascii() {
        return None;
    }
    let (name_tag, digest) = match s.split_once('@') {
        Some((n, d)) => {
            let hex = d.strip_prefix("sha256:")?;
            let ok = hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !ok {
                return None;
            }
            (n, Some(hex))
        }
        None => (s, None),
    };
    let (registry, rest) = name_tag.split_once('/')?;
    if !is_registry(registry) {
        return None;
    }
    let (repository, tag) = match rest.rsplit_once(':') {
        Some((r, t)) => (r, Some(t)),
        None => (rest, None),
    };
    if let Some(t) = tag {
        if !is_tag(t) {
            return None;
        }
    }
    if tag.is_none() && digest.is_none() {
        return None;
    }
    if repository.is_empty() || !repository.split('/').all(is_path_component) {
        return None;
    }
    Some(RefParts {
        registry,
        repository,
        tag,
        digest,
    })
}

/// Whether `s` reads as a registry reference (see the module's rules).
pub fn looks_like_reference(s: &str) -> bool {
    parse_reference(s).is_some()
}

/// `host[:port]`: DNS labels (letters, digits, `-`), dots between, optional numeric port;
/// a `.`, a port, or `localhost` tells it from a repository name.
fn is_registry(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    let labels_ok = !host.is_empty()
        && host.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    labels_ok && (host.contains('.') || port.is_some() || host == "localhost")
}

/// A repository path component: lowercase letters and digits, separated by `.`, `_`, `__`
/// or runs of `-`.
fn is_path_component(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &s[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn is_tag(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn references_are_recognised() {
        for yes in [
            "127.0.0.1:5000/hello:1",
            "localhost/app:latest",
            "localhost:5000/team/app:v1.2-rc_3",
            "ghcr.io/owner/app:main",
            "registry.example.com/a/b/c:x",
        ] {
            assert!(looks_like_reference(yes), "{yes}");
        }
        let with_digest = format!("ghcr.io/o/app@sha256:{D}");
        let p = parse_reference(&with_digest).unwrap();
        assert_eq!(p.registry, "ghcr.io");
        assert_eq!(p.repository, "o/app");
        assert_eq!(p.tag, None);
        assert_eq!(p.digest, Some(D));
        let both = format!("localhost:5000/app:1@sha256:{D}");
        let p = parse_reference(&both).unwrap();
        assert_eq!((p.registry, p.tag), ("localhost:5000", Some("1")));
    }

    #[test]
    fn paths_and_bad_references_are_not() {
        for no in [
            "",
            "hello.smolmachine",
            "./app",
            "/tmp/app:1",
            "target/hello.smolmachine",
            "dir/app:1",              // no registry host
            "ghcr.io/owner/app",      // no tag or digest
            "ghcr.io/Owner/app:1",    // uppercase repository
            "ghcr.io/owner/app:",     // empty tag
            "ghcr.io/owner/app:-x",   // tag starts with '-'
            "ghcr.io//app:1",         // empty component
            "ghcr.io/app@sha256:abc", // short digest
            "ghcr.io/app@sha512:abc", // other algorithm
            "localhost:port/app:1",   // non-numeric port
            "-x.io/app:1",            // bad label
            "ghcr.io/app:1 x",        // space
            "ghcr.io/a..b:1",         // bad separator
            "ghcr.io/caf\u{e9}:1",    // not ASCII
        ] {
            assert!(!looks_like_reference(no), "{no}");
        }
        assert!(!looks_like_reference(&format!(
            "ghcr.io/app@sha256:{}",
            D.to_uppercase()
        )));
        assert!(!looks_like_reference(&"a".repeat(MAX_REFERENCE_LEN + 1)));
    }

    proptest! {
        #[test]
        fn never_panics_and_parts_rebuild_the_input(s in "\\PC{0,80}") {
            if let Some(p) = parse_reference(&s) {
                let mut back = format!("{}/{}", p.registry, p.repository);
                if let Some(t) = p.tag { back = format!("{back}:{t}"); }
                if let Some(d) = p.digest { back = format!("{back}@sha256:{d}"); }
                prop_assert_eq!(back, s);
            }
        }

        #[test]
        fn generated_references_parse(
            host in "[a-z][a-z0-9]{0,8}\\.[a-z]{2,4}",
            port in proptest::option::of(1u16..),
            repo in "[a-z0-9]{1,6}(/[a-z0-9]{1,6}){0,2}",
            tag in "[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}",
        ) {
            let registry = match port { Some(p) => format!("{host}:{p}"), None => host };
            let s = format!("{registry}/{repo}:{tag}");
            let p = parse_reference(&s).expect("a well-formed reference");
            prop_assert_eq!(p.registry, registry.as_str());
            prop_assert_eq!(p.repository, repo.as_str());
            prop_assert_eq!(p.tag, Some(tag.as_str()));
        }
    }
}
