//! `smolpack pack` and `smolpack unpack`: a machine in, one self-resuming executable out, and
//! back.
//!
//! The stub comes from the target table (embedded at build time) unless `--stub` names one.
//! With `--compress` the payload is the machine re-encoded with zstd memory and disks (the
//! stub expands it once into its cache); without it the payload is the input machine byte for
//! byte, so guest memory maps straight from the executable. The output is verified before it
//! is renamed into place: a failed or killed pack leaves no file under the output name and
//! never replaces an existing one; what a killed pack leaves beside it (a locked temp file,
//! a scratch directory) is removed by the next pack to the same output or `smolpack gc`.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use smolvm_formats::signature::SecretKey;
use smolvm_formats::trailer::{self, ElfIdentity, Trailer};
use smolvm_formats::{Compression, MachineReader, MachineWriter, SectionKind};

use crate::gc::{self, ScratchDir};
use crate::targets::{self, Target, TargetError};

/// What to pack.
#[derive(Debug, Clone, Default)]
pub struct PackOptions {
    /// A `.smolmachine` or a packed executable (its payload is used).
    pub machine: PathBuf,
    /// The executable to write.
    pub output: PathBuf,
    /// Target name; the stub's (with `--stub`) or the host's when `None`.
    pub target: Option<String>,
    /// Re-encode memory and disks with zstd.
    pub compress: bool,
    /// Use this stub instead of the embedded one.
    pub stub: Option<PathBuf>,
    /// Sign the payload with this key (after compressing it, with `compress`).
    pub key: Option<SecretKey>,
}

/// What was packed.
#[derive(Debug, Clone)]
pub struct PackReport {
    pub output: PathBuf,
    pub target: &'static str,
    /// Where the stub came from: "embedded" or its path.
    pub stub_source: String,
    pub trailer: Trailer,
    /// The payload's memory/disk compression.
    pub compressed: bool,
    /// The key that signed the payload, if it is signed.
    pub signed_by: Option<String>,
    /// The input was signed, and re-encoding it dropped the signature (no key was given).
    pub signature_dropped: bool,
}

impl PackReport {
    /// One line for the terminal.
    pub fn summary(&self) -> String {
        let t = &self.trailer;
        format!(
            "packed {} for {}: stub {} bytes ({}), payload {} bytes{} at offset {:#x}, {} bytes in all",
            self.output.display(),
            self.target,
            t.stub_len,
            self.stub_source,
            t.payload_len,
            if self.compressed { " (zstd)" } else { "" },
            t.payload_offset,
            t.payload_offset + t.payload_len + trailer::TRAILER_LEN
        ) + &match (&self.signed_by, self.signature_dropped) {
            (Some(k), _) => format!(", signed by key {k}"),
            (None, true) => ", unsigned: compressing dropped the input's signature (sign the \
                             output, or pack with --key)"
                .to_string(),
            (None, false) => String::new(),
        }
    }
}

/// Why packing or unpacking failed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("{}: {error}", path.display())]
    File {
        path: PathBuf,
        error: smolvm_formats::Error,
    },
    #[error("cannot read the stub {}: {error}", path.display())]
    StubIo {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the stub {} runs on {found}, not on the requested target {target}", path.display())]
    StubMismatch {
        path: PathBuf,
        found: String,
        target: &'static str,
    },
    #[error(
        "the stub {} runs on no known target ({found}); pass a smolvm stub built for one of \
         the targets in `smolpack pack --list-targets`",
        path.display()
    )]
    StubUnknown { path: PathBuf, found: String },
    #[error(
        "{} is a machine for {machine}, but {target} stubs resume {arch} machines: pack it \
         with a --target for {machine}, or build it again on an {arch} host",
        path.display()
    )]
    ArchMismatch {
        path: PathBuf,
        machine: smolvm_formats::Arch,
        target: &'static str,
        arch: smolvm_formats::Arch,
    },
    #[error("cannot create a scratch directory beside {}: {error}", path.display())]
    Scratch {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("packing {}: {error}", path.display())]
    Pack {
        path: PathBuf,
        error: smolvm_formats::Error,
    },
}

/// Where the stub bytes come from.
enum Stub {
    Embedded(&'static [u8]),
    File(PathBuf, File),
}

/// Picks the target and the stub: `--stub` decides the target when `--target` is absent,
/// and must match it when both are given; otherwise the embedded stub of the target (the
/// host's by default).
fn resolve(opts: &PackOptions) -> Result<(&'static Target, Stub), PackError> {
    let Some(path) = &opts.stub else {
        let target = match &opts.target {
            Some(name) => targets::find(name)?,
            None => targets::host()?,
        };
        return Ok((target, Stub::Embedded(target.embedded_stub()?)));
    };
    let wanted = match &opts.target {
        Some(name) => {
            let t = targets::find(name)?;
            t.check_strategy()?;
            Some(t)
        }
        None => None,
    };
    let file = File::open(path).map_err(|error| PackError::StubIo {
        path: path.clone(),
        error,
    })?;
    let id = trailer::elf_identity(&file).map_err(|error| PackError::File {
        path: path.clone(),
        error,
    })?;
    let target = match wanted {
        Some(t) => {
            if !t.matches(&id) {
                return Err(PackError::StubMismatch {
                    path: path.clone(),
                    found: targets::describe_elf(&id),
                    target: t.name,
                });
            }
            t
        }
        None => identify(path, &id)?,
    };
    Ok((target, Stub::File(path.clone(), file)))
}

fn identify(path: &Path, id: &ElfIdentity) -> Result<&'static Target, PackError> {
    match targets::identify(id) {
        Some(t) => {
            t.check_strategy()?;
            Ok(t)
        }
        None => Err(PackError::StubUnknown {
            path: path.to_path_buf(),
            found: targets::describe_elf(id),
        }),
    }
}

/// Whether every memory and disk section of `m` is already zstd-compressed.
fn images_compressed(m: &MachineReader) -> bool {
    m.sections()
        .iter()
        .filter(|s| matches!(s.kind, SectionKind::Memory | SectionKind::Disk))
        .all(|s| s.compression == Compression::Zstd)
}

/// `smolpack pack`.
pub fn pack(opts: &PackOptions) -> Result<PackReport, PackError> {
    let (target, stub) = resolve(opts)?;
    let file_err = |path: &Path| {
        let path = path.to_path_buf();
        move |error| PackError::File { path, error }
    };
    let mut machine = MachineReader::open(&opts.machine).map_err(file_err(&opts.machine))?;
    if machine.arch() != target.arch {
        return Err(PackError::ArchMismatch {
            path: opts.machine.clone(),
            machine: machine.arch(),
            target: target.name,
            arch: target.arch,
        });
    }
    let dir = match opts.output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // What killed packs left beside this output, whether or not this one compresses (the
    // output's own temp files go when its writer starts).
    gc::remove_scratch_leftovers(&dir, gc::PACK_PREFIX);
    // The scratch directory (for the compressed payload) lives beside the output, on the
    // same filesystem, locked while packing runs, and is removed when packing ends either
    // way (or, after a kill, by the next pack there or `smolpack gc`).
    let mut _scratch = None;
    let was_signed = machine.section(SectionKind::Signature).is_some();
    let recompress = opts.compress && !images_compressed(&machine);
    if recompress || opts.key.is_some() {
        machine.verify().map_err(file_err(&opts.machine))?;
        let scratch =
            ScratchDir::create(&dir, gc::PACK_PREFIX).map_err(|error| PackError::Scratch {
                path: opts.output.clone(),
                error,
            })?;
        let payload = scratch.path().join("payload.smolmachine");
        if recompress {
            MachineWriter::compress_from(&machine, &payload, opts.key.as_ref())
        } else {
            MachineWriter::copy_from(&machine, &payload, opts.key.as_ref())
        }
        .map_err(file_err(&opts.machine))?;
        machine = MachineReader::open(&payload).map_err(file_err(&payload))?;
        _scratch = Some(scratch);
    }
    let signed_by = match machine.signature_info() {
        Ok(Some(info)) => Some(info.key.id()),
        _ => None,
    };
    let compressed = images_compressed(&machine)
        && machine
            .sections()
            .iter()
            .any(|s| matches!(s.kind, SectionKind::Memory | SectionKind::Disk));
    let pack_err = |error| PackError::Pack {
        path: opts.output.clone(),
        error,
    };
    let (trailer, stub_source) = match &stub {
        Stub::Embedded(bytes) => {
            let t = trailer::pack_from(*bytes, "the embedded stub", 0o755, &machine, &opts.output)
                .map_err(pack_err)?;
            (t, "embedded".to_string())
        }
        Stub::File(path, file) => {
            let mode = file
                .metadata()
                .map_err(|error| PackError::StubIo {
                    path: path.clone(),
                    error,
                })?
                .permissions()
                .mode();
            let name = path.display().to_string();
            let t = trailer::pack_from(file, &name, (mode & 0o777) | 0o111, &machine, &opts.output)
                .map_err(pack_err)?;
            (t, name)
        }
    };
    Ok(PackReport {
        output: opts.output.clone(),
        target: target.name,
        stub_source,
        trailer,
        compressed,
        signature_dropped: was_signed && signed_by.is_none(),
        signed_by,
    })
}

/// `smolpack unpack PACKED -o MACHINE`: the payload, byte for byte, written atomically.
pub fn unpack(packed: &Path, output: &Path) -> Result<Trailer, PackError> {
    trailer::unpack(packed, output).map_err(|error| PackError::File {
        path: packed.to_path_buf(),
        error,
    })
}

/// What `inspect` shows about the stub of a packed executable: its target and linkage.
pub fn stub_target(file: &File) -> String {
    match trailer::elf_identity(file) {
        Ok(id) => targets::describe_elf(&id),
        Err(e) => format!("unknown ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smolvm_formats::Arch;

    /// A minimal machine for `arch`: packed, never resumed.
    fn machine(path: &Path, arch: Arch) {
        smolvm_formats::testing::write_machine(path, arch, &format!("{arch}-sample"));
    }

    /// A tiny static ELF executable whose header says `e_machine` (it is never run).
    fn fake_stub(path: &Path, e_machine: u16) {
        let mut elf = smolvm_formats::testing::tiny_elf();
        elf[18..20].copy_from_slice(&e_machine.to_le_bytes());
        std::fs::write(path, elf).unwrap();
    }

    fn opts(machine: &Path, output: &Path, target: &str, stub: Option<&Path>) -> PackOptions {
        PackOptions {
            machine: machine.to_path_buf(),
            output: output.to_path_buf(),
            target: Some(target.into()),
            stub: stub.map(Path::to_path_buf),
            ..Default::default()
        }
    }

    /// Whether this build must carry the aarch64-linux stub: x86_64 Linux builds under
    /// `CI=true`, where `scripts/setup --aarch64` installed the cross toolchain.
    fn aarch64_stub_required() -> bool {
        cfg!(all(target_arch = "x86_64", target_os = "linux"))
            && option_env!("SMOLPACK_NO_STUB_BUILD") != Some("1")
            && option_env!("SMOLPACK_STUB_AARCH64_LINUX").is_none()
            && std::env::var("CI").is_ok_and(|v| v == "true")
    }

    #[test]
    fn an_aarch64_machine_packs_onto_the_embedded_aarch64_stub() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("arm.smolmachine");
        machine(&m, Arch::Aarch64);
        let out = dir.path().join("app");
        let target = targets::find("aarch64-linux").unwrap();
        if !target.carried() {
            assert!(
                !aarch64_stub_required(),
                "CI=true: this x86_64 build must carry the aarch64-linux stub (run \
                 scripts/setup --aarch64)"
            );
            let e = pack(&opts(&m, &out, "aarch64-linux", None)).unwrap_err();
            assert!(e.to_string().contains("scripts/setup --aarch64"), "{e}");
            eprintln!("SKIP: this build does not carry the aarch64-linux stub");
            return;
        }
        let report = pack(&opts(&m, &out, "aarch64-linux", None)).unwrap();
        assert_eq!(report.target, "aarch64-linux");
        assert_eq!(report.stub_source, "embedded");
        let file = File::open(&out).unwrap();
        let id = trailer::elf_identity(&file).unwrap();
        assert_eq!(id.machine, 183, "EM_AARCH64");
        assert!(id.is_64 && id.little_endian && !id.dynamic, "{id:?}");
        assert_eq!(stub_target(&file), "aarch64-linux, static");
        let t = trailer::verify_packed(File::open(&out).unwrap(), None).unwrap();
        assert_eq!(t, report.trailer);
        assert_eq!(t.stub_len, target.stub.unwrap().len() as u64);
        assert_eq!(t.payload_offset % 65536, 0);
        let payload = MachineReader::open(&out).unwrap();
        assert_eq!(payload.arch(), Arch::Aarch64);
        assert_eq!(payload.manifest().unwrap().name, "aarch64-sample");
        // The payload is the machine byte for byte.
        let back = dir.path().join("back.smolmachine");
        unpack(&out, &back).unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&m).unwrap());
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o111, 0o111, "executable: {mode:o}");
    }

    #[test]
    fn a_machine_of_another_architecture_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (x86, arm) = (dir.path().join("x86"), dir.path().join("arm"));
        machine(&x86, Arch::X86_64);
        machine(&arm, Arch::Aarch64);
        let (x86_stub, arm_stub) = (dir.path().join("x86-stub"), dir.path().join("arm-stub"));
        fake_stub(&x86_stub, 62);
        fake_stub(&arm_stub, 183);
        let out = dir.path().join("app");
        let e = pack(&opts(&x86, &out, "aarch64-linux", Some(&arm_stub))).unwrap_err();
        assert!(matches!(e, PackError::ArchMismatch { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!(
                "{} is a machine for x86_64, but aarch64-linux stubs resume aarch64 machines: \
                 pack it with a --target for x86_64, or build it again on an aarch64 host",
                x86.display()
            )
        );
        let e = pack(&opts(&arm, &out, "x86_64-linux", Some(&x86_stub))).unwrap_err();
        let line = e.to_string();
        assert!(matches!(e, PackError::ArchMismatch { .. }), "{e:?}");
        assert!(
            line.contains("a machine for aarch64, but x86_64-linux stubs resume x86_64"),
            "{line}"
        );
        assert_eq!(line.lines().count(), 1);
        // The target comes from the stub when --target is absent: refused the same way.
        let mut o = opts(&arm, &out, "x86_64-linux", Some(&x86_stub));
        o.target = None;
        assert!(matches!(pack(&o), Err(PackError::ArchMismatch { .. })));
        // With the embedded stubs, where this build carries them.
        for (m, target) in [(&x86, "aarch64-linux"), (&arm, "x86_64-linux")] {
            if targets::find(target).unwrap().carried() {
                let e = pack(&opts(m, &out, target, None)).unwrap_err();
                assert!(
                    matches!(e, PackError::ArchMismatch { .. }),
                    "{target}: {e:?}"
                );
            }
        }
        assert!(!out.exists(), "a refused pack writes nothing");
        // The matching pairs pack (with the fake stubs).
        pack(&opts(&arm, &out, "aarch64-linux", Some(&arm_stub))).unwrap();
        let id = trailer::elf_identity(&File::open(&out).unwrap()).unwrap();
        assert_eq!(id.machine, 183);
        pack(&opts(&x86, &out, "x86_64-linux", Some(&x86_stub))).unwrap();
        let id = trailer::elf_identity(&File::open(&out).unwrap()).unwrap();
        assert_eq!(id.machine, 62);
    }
}
