//! Finding the guest artifacts a build needs: the kernel and the static agent.
//!
//! An explicit path (`--kernel`, `--agent`) wins, then the environment (`SMOLVM_KERNEL`,
//! `SMOLVM_AGENT`), then the guest directory of the repository the `smolpack` executable or
//! the current directory lives in (`scripts/setup` puts them there). A build makes a machine
//! for the host's architecture, so the artifacts are the host's: `target/guest/vmlinux` and
//! `target/guest/smol-agent` on x86_64, `target/guest/aarch64/Image` and
//! `target/guest/aarch64/smol-agent` on aarch64 (`scripts/setup --aarch64`).

use std::path::{Path, PathBuf};

use smolvm_formats::Arch;

/// The guest directory for `arch`, relative to the target directory.
fn guest_subdir(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "guest",
        Arch::Aarch64 => "guest/aarch64",
    }
}

/// A guest artifact the build needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Artifact {
    /// The guest kernel: `vmlinux` (an uncompressed ELF) on x86_64, `Image` (the arm64
    /// boot image) on aarch64.
    Kernel,
    /// The static guest agent, installed as `/sbin/init`.
    Agent,
}

impl Artifact {
    /// File name in the guest directory of `arch`.
    pub fn file_name(self, arch: Arch) -> &'static str {
        match (self, arch) {
            (Artifact::Kernel, Arch::X86_64) => "vmlinux",
            (Artifact::Kernel, Arch::Aarch64) => "Image",
            (Artifact::Agent, _) => "smol-agent",
        }
    }

    /// The environment variable that overrides the search.
    pub fn env_var(self) -> &'static str {
        match self {
            Artifact::Kernel => "SMOLVM_KERNEL",
            Artifact::Agent => "SMOLVM_AGENT",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Artifact::Kernel => "--kernel",
            Artifact::Agent => "--agent",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Artifact::Kernel => "guest kernel",
            Artifact::Agent => "guest agent",
        }
    }

    fn how_to_build(self, arch: Arch) -> &'static str {
        match (self, arch) {
            (Artifact::Kernel, Arch::X86_64) => "scripts/setup (or guest/kernel/build.sh)",
            (Artifact::Agent, Arch::X86_64) => "scripts/setup (or guest/agent/build.sh)",
            (_, Arch::Aarch64) => "scripts/setup --aarch64",
        }
    }
}

/// A guest artifact that could not be found.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// Given explicitly (flag or environment) but not a file.
    #[error("{what} {} (from {source_name}) is not a file: fix the path, or unset it to use target/{file}", path.display())]
    NotAFile {
        what: &'static str,
        path: PathBuf,
        source_name: String,
        /// Its place in the target directory, e.g. `guest/vmlinux`.
        file: String,
    },
    /// A host architecture with no guest artifacts.
    #[error("smolpack builds machines on x86_64 and aarch64 hosts only")]
    UnsupportedHost,
    /// Not found anywhere searched.
    #[error("{what} not found: looked for target/{file} near {searched}; build it with {how}, or pass {flag} PATH / set {env}")]
    Missing {
        what: &'static str,
        /// Its place in the target directory, e.g. `guest/vmlinux`.
        file: String,
        searched: String,
        how: &'static str,
        flag: &'static str,
        env: &'static str,
    },
}

/// Finds the host architecture's `artifact`: `explicit` (a flag), else its environment
/// variable, else the guest directory beside the executable, above the current directory, or
/// in the repository this executable was built from (a build with `CARGO_TARGET_DIR`
/// elsewhere).
pub fn locate(artifact: Artifact, explicit: Option<&Path>) -> Result<PathBuf, ArtifactError> {
    let Some(arch) = Arch::host() else {
        return Err(ArtifactError::UnsupportedHost);
    };
    let env = std::env::var_os(artifact.env_var()).filter(|v| !v.is_empty());
    let exe = std::env::current_exe().ok();
    let cwd = std::env::current_dir().ok();
    let source_repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent();
    locate_in(
        artifact,
        arch,
        explicit,
        env.as_deref().map(Path::new),
        &[exe.as_deref(), cwd.as_deref(), source_repo],
    )
}

/// [`locate`] with its inputs given: the search starts at each of `starts` and walks up.
pub fn locate_in(
    artifact: Artifact,
    arch: Arch,
    explicit: Option<&Path>,
    env: Option<&Path>,
    starts: &[Option<&Path>],
) -> Result<PathBuf, ArtifactError> {
    let given = explicit
        .map(|p| (p, artifact.flag().to_string()))
        .or_else(|| env.map(|p| (p, artifact.env_var().to_string())));
    if let Some((path, source_name)) = given {
        if path.is_file() {
            return Ok(path.to_path_buf());
        }
        return Err(ArtifactError::NotAFile {
            what: artifact.what(),
            path: path.to_path_buf(),
            source_name,
            file: format!("{}/{}", guest_subdir(arch), artifact.file_name(arch)),
        });
    }
    let name = artifact.file_name(arch);
    let sub = guest_subdir(arch);
    let in_target = Path::new("target").join(sub);
    let mut searched = Vec::new();
    for start in starts.iter().flatten() {
        searched.push(start.display().to_string());
        for dir in start.ancestors() {
            // `DIR/target/guest/NAME` from inside a repository, `DIR/guest/NAME` when DIR is
            // the target directory holding the executable (`target/release/smolpack`).
            for candidate in [dir.join(&in_target).join(name), dir.join(sub).join(name)] {
                if candidate.is_file()
                    && candidate.parent().is_some_and(|p| p.ends_with(&in_target))
                {
                    return Ok(candidate);
                }
            }
        }
    }
    Err(ArtifactError::Missing {
        what: artifact.what(),
        file: format!("{sub}/{name}"),
        searched: if searched.is_empty() {
            "nothing (no executable or current directory)".into()
        } else {
            searched.join(" and ")
        },
        how: artifact.how_to_build(arch),
        flag: artifact.flag(),
        env: artifact.env_var(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const X86: Arch = Arch::X86_64;

    #[test]
    fn explicit_then_env_then_search() {
        let t = tempfile::tempdir().unwrap();
        let guest = t.path().join("repo/target/guest");
        std::fs::create_dir_all(&guest).unwrap();
        std::fs::create_dir_all(t.path().join("repo/target/release")).unwrap();
        std::fs::create_dir_all(t.path().join("repo/examples/hello")).unwrap();
        std::fs::write(guest.join("vmlinux"), "k").unwrap();
        let other = t.path().join("other-kernel");
        std::fs::write(&other, "k2").unwrap();

        let exe = t.path().join("repo/target/release/smolpack");
        let cwd = t.path().join("repo/examples/hello");
        let k = Artifact::Kernel;
        // Found from the executable's directory and from a directory inside the repo.
        assert_eq!(
            locate_in(k, X86, None, None, &[Some(&exe), None]).unwrap(),
            guest.join("vmlinux")
        );
        assert_eq!(
            locate_in(k, X86, None, None, &[None, Some(&cwd)]).unwrap(),
            guest.join("vmlinux")
        );
        // The environment beats the search, a flag beats the environment.
        assert_eq!(
            locate_in(k, X86, None, Some(&other), &[Some(&exe)]).unwrap(),
            other
        );
        assert_eq!(
            locate_in(k, X86, Some(&guest.join("vmlinux")), Some(&other), &[]).unwrap(),
            guest.join("vmlinux")
        );
        // A wrong explicit path is an error, not a silent fallback.
        let e = locate_in(
            k,
            X86,
            Some(Path::new("/nope/vmlinux")),
            None,
            &[Some(&exe)],
        )
        .unwrap_err();
        assert!(e.to_string().contains("--kernel"), "{e}");
        let e = locate_in(k, X86, None, Some(Path::new("/nope")), &[Some(&exe)]).unwrap_err();
        assert!(e.to_string().contains("SMOLVM_KERNEL"), "{e}");
        // Missing: says where it looked and how to build it.
        let e = locate_in(Artifact::Agent, X86, None, None, &[Some(&exe), Some(&cwd)]).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("target/guest/smol-agent"), "{msg}");
        assert!(msg.contains("guest/agent/build.sh"), "{msg}");
        assert!(
            msg.contains("--agent") && msg.contains("SMOLVM_AGENT"),
            "{msg}"
        );
        assert!(msg.contains(&exe.display().to_string()), "{msg}");
    }

    #[test]
    fn a_guest_directory_outside_target_is_not_taken() {
        let t = tempfile::tempdir().unwrap();
        // `repo/guest/` holds sources, not artifacts.
        std::fs::create_dir_all(t.path().join("repo/guest")).unwrap();
        std::fs::write(t.path().join("repo/guest/vmlinux"), "k").unwrap();
        let start = t.path().join("repo");
        assert!(locate_in(Artifact::Kernel, X86, None, None, &[Some(&start)]).is_err());
    }

    #[test]
    fn aarch64_looks_for_its_image_in_its_own_directory() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("repo/target");
        std::fs::create_dir_all(target.join("guest/aarch64")).unwrap();
        std::fs::create_dir_all(target.join("release")).unwrap();
        // The x86_64 kernel and agent are there, the arm64 ones not yet.
        std::fs::write(target.join("guest/vmlinux"), "k").unwrap();
        std::fs::write(target.join("guest/smol-agent"), "a").unwrap();
        let exe = target.join("release/smolpack");
        let arm = Arch::Aarch64;
        let e = locate_in(Artifact::Kernel, arm, None, None, &[Some(&exe)]).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("target/guest/aarch64/Image"), "{msg}");
        assert!(msg.contains("scripts/setup --aarch64"), "{msg}");
        assert!(locate_in(Artifact::Agent, arm, None, None, &[Some(&exe)]).is_err());
        // Once built, found from the executable and from the repository alike.
        std::fs::write(target.join("guest/aarch64/Image"), "k").unwrap();
        std::fs::write(target.join("guest/aarch64/smol-agent"), "a").unwrap();
        for start in [exe.as_path(), t.path().join("repo").as_path()] {
            assert_eq!(
                locate_in(Artifact::Kernel, arm, None, None, &[Some(start)]).unwrap(),
                target.join("guest/aarch64/Image")
            );
            assert_eq!(
                locate_in(Artifact::Agent, arm, None, None, &[Some(start)]).unwrap(),
                target.join("guest/aarch64/smol-agent")
            );
        }
        // x86_64 still takes its own.
        assert_eq!(
            locate_in(Artifact::Agent, X86, None, None, &[Some(&exe)]).unwrap(),
            target.join("guest/smol-agent")
        );
    }
}
