//! `smolpack`: builds, inspects, verifies, packs and unpacks `.smolmachine` files, and cleans
//! up what killed runs left (`gc`).
//!
//! Each subcommand lives in its own module; `main` only parses arguments and turns any error
//! into one `error: ...` line on stderr and a non-zero exit status.

mod inspect;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use smolpack::{build, pack, registry, signing, targets};

#[derive(Parser)]
#[command(
    name = "smolpack",
    version,
    about = "Build, inspect, verify and pack .smolmachine files into self-resuming executables"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build a machine from a Smolfile: boot it, run its setup steps, start its services and
    /// snapshot the whole machine into a .smolmachine.
    Build {
        /// The Smolfile.
        smolfile: PathBuf,
        /// Output .smolmachine (written atomically; untouched when the build fails or is
        /// killed).
        #[arg(short, long)]
        output: PathBuf,
        /// Guest kernel (default: $SMOLVM_KERNEL, else target/guest/vmlinux).
        #[arg(long, value_name = "PATH")]
        kernel: Option<PathBuf>,
        /// Guest agent (default: $SMOLVM_AGENT, else target/guest/smol-agent).
        #[arg(long, value_name = "PATH")]
        agent: Option<PathBuf>,
        /// Compress memory and disk with zstd: a smaller file, but resuming it must
        /// decompress instead of mapping the file in place.
        #[arg(long)]
        compress: bool,
        /// Show the guest kernel's console while it boots.
        #[arg(short, long)]
        verbose: bool,
        /// CPU model the guest is shown, over the Smolfile's `cpu`: x86-64 (the default:
        /// runs on any x86_64 KVM host), x86-64-v2, x86-64-v3, x86-64-v4, or host (every
        /// feature of this host: fastest, resumes only on hosts that have them all).
        #[arg(long, value_name = "NAME")]
        cpu: Option<smolvm::arch::cpu_model::CpuModel>,
    },
    /// Show the sections, sizes, compression, zero-page ratio and checksum status of a
    /// .smolmachine or packed executable.
    Inspect {
        /// A .smolmachine or a packed executable.
        file: PathBuf,
        /// Print JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
        /// Skip the per-section checksums (the header and table checksum is always checked).
        #[arg(long)]
        no_verify: bool,
    },
    /// Check every checksum and that all padding is zero; exit status 0 means intact. With
    /// --key, also that the machine is signed by one of these keys and that no byte of it
    /// changed since.
    ///
    /// FILE may be a registry reference (REGISTRY/NAME:TAG or @sha256:...) that is not an
    /// existing path: it is pulled into the machine cache first (see `pull --cache`).
    Verify {
        /// A .smolmachine, a packed executable, or a registry reference.
        file: PathBuf,
        /// A trusted public key file (`smolpack keygen` writes NAME.pub); may repeat.
        #[arg(long = "key", value_name = "PUB")]
        keys: Vec<PathBuf>,
        /// For a reference: speak plain HTTP to its registry (loopback registries always are).
        #[arg(long)]
        insecure: bool,
    },
    /// Push a .smolmachine or packed executable to an OCI registry as REGISTRY/NAME:TAG.
    ///
    /// The file becomes an OCI artifact (docs/DISTRIBUTION.md): one layer per component
    /// (header, manifest, VM state, memory, each disk, table, signature; stub and trailer of a
    /// packed executable), so a second push of a rebuilt machine uploads only the layers that
    /// changed, under an image index with one entry per platform (other platforms' entries
    /// of the tag are kept). Credentials come from ~/.docker/config.json ($DOCKER_CONFIG);
    /// TLS unless the registry is on the loopback interface or --insecure is given.
    /// Exit status: 3 registry unreachable, 4 not found, 5 refused as corrupt, 6 access
    /// denied, 1 anything else.
    #[command(
        after_help = "Example:\n  smolpack push hello.smolmachine ghcr.io/me/hello:1\n  smolpack push hello 127.0.0.1:5000/hello:latest"
    )]
    Push {
        /// The .smolmachine or packed executable (it is verified first).
        file: PathBuf,
        /// Where to: REGISTRY/NAME:TAG.
        reference: String,
        /// Plain HTTP instead of TLS (loopback registries always use plain HTTP).
        #[arg(long)]
        insecure: bool,
        /// Also attach a signature of the whole file by this secret key (an OCI referrer of
        /// the pushed manifest, listed under the tag sha256-HEX; docs/DISTRIBUTION.md).
        #[arg(long, value_name = "KEY")]
        key: Option<PathBuf>,
    },
    /// Pull a machine from an OCI registry: the file comes back byte for byte as pushed.
    ///
    /// Every blob's digest is checked before it is kept; the file is assembled in a temp
    /// file, its SHA-256 checked against the artifact's, and renamed into place. Verified
    /// blobs wait in ${SMOLVM_CACHE:-${XDG_CACHE_HOME:-~/.cache}/smolvm}/machines/blobs
    /// until then, so a killed pull resumes where it stopped. Exit status as for push.
    #[command(
        after_help = "Examples:\n  smolpack pull ghcr.io/me/hello:1 -o hello.smolmachine\n  smolpack pull ghcr.io/me/hello:1 --pack -o hello\n  smolpack pull ghcr.io/me/hello:1 --cache"
    )]
    Pull {
        /// REGISTRY/NAME:TAG or REGISTRY/NAME@sha256:DIGEST.
        reference: String,
        /// Output file (written atomically).
        #[arg(short, long, required_unless_present = "cache")]
        output: Option<PathBuf>,
        /// Write a runnable packed executable for this host's target (whatever was pushed:
        /// a machine is packed with the stub built into smolpack).
        #[arg(long, requires = "output")]
        pack: bool,
        /// Pull into the content-addressed machine cache (…/machines/sha256-HEX) and print
        /// its path on stdout: what `smolvm run REF` does.
        #[arg(long, conflicts_with_all = ["output", "pack"])]
        cache: bool,
        /// Plain HTTP instead of TLS (loopback registries always use plain HTTP).
        #[arg(long)]
        insecure: bool,
        /// Errors as `smolvm: ...` lines (used by `smolvm run REF`).
        #[arg(long, hide = true)]
        for_smolvm: bool,
        /// With --cache: also fetch the attached signatures into the cache and print that
        /// file's path on a second line (used by `smolvm run --trust PUB REF`).
        #[arg(long, hide = true, requires = "cache")]
        signatures: bool,
    },
    /// Write a new Ed25519 signing key pair: NAME.key (secret, mode 0600) and NAME.pub.
    #[command(
        after_help = "Example:\n  smolpack keygen -o release\n  smolpack sign --key release.key app"
    )]
    Keygen {
        /// Path prefix of the two files (never overwritten).
        #[arg(short, long, value_name = "NAME")]
        output: PathBuf,
    },
    /// Sign a .smolmachine or packed executable in place (atomically) with a secret key: a
    /// signature section covering the header, every section's table entry and a SHA-512 of
    /// every section. An existing signature is replaced. Runs with a trust key configured
    /// (`smolvm run --trust PUB`, SMOLVM_TRUST, /etc/smolvm/trust.d) refuse unsigned or
    /// wrongly signed machines.
    ///
    /// FILE may be a registry reference (REGISTRY/NAME:TAG or @sha256:...) that is not an
    /// existing path: the machine is pulled (into the cache), and a signature of its whole
    /// file is attached to its manifest in the registry (an OCI referrer; the pushed machine
    /// is not changed). `smolpack verify --key PUB REF` and `smolvm run --trust PUB REF`
    /// accept it.
    Sign {
        /// The secret key file (from `smolpack keygen`).
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
        /// The .smolmachine or packed executable to sign, or a registry reference.
        file: PathBuf,
        /// For a reference: speak plain HTTP to its registry (loopback registries always are).
        #[arg(long)]
        insecure: bool,
    },
    /// Pack a machine into one self-resuming executable: `./OUT ARGS...` resumes the machine
    /// and runs its command with ARGS.
    ///
    /// The executable is a VMM stub for the target with the machine appended (after the
    /// stub's ELF image, 64 KiB aligned, found through a 64-byte trailer at the end). The
    /// stubs are built into smolpack, so packing needs no network or toolchain; see
    /// --list-targets. The result is verified before it is renamed into place: a failed or
    /// killed pack leaves no file under OUT and never replaces an existing one (a killed
    /// one's temp file is removed by the next pack to OUT, or by `smolpack gc`).
    #[command(
        after_help = "Examples:\n  smolpack pack app.smolmachine -o app\n  smolpack pack app.smolmachine -o app --compress\n  smolpack pack --list-targets"
    )]
    Pack {
        /// The .smolmachine to embed (a packed executable works too: its payload is used).
        #[arg(required_unless_present = "list_targets")]
        machine: Option<PathBuf>,
        /// Output executable (written atomically, mode +x).
        #[arg(short, long, required_unless_present = "list_targets")]
        output: Option<PathBuf>,
        /// Target to pack for, e.g. x86_64-linux (default: this host's; with --stub, the
        /// stub's).
        #[arg(long, value_name = "TARGET")]
        target: Option<String>,
        /// Store memory and disk zstd-compressed: a smaller file to ship; its first run
        /// expands the machine once into the cache (~/.cache/smolvm), later runs map it from
        /// there. Without it the machine is embedded byte for byte and mapped in place.
        #[arg(long)]
        compress: bool,
        /// Use this smolvm stub executable instead of the one built into smolpack.
        #[arg(long, value_name = "PATH")]
        stub: Option<PathBuf>,
        /// Sign the payload with this secret key (after --compress, which drops any
        /// signature the input had).
        #[arg(long, value_name = "KEY")]
        key: Option<PathBuf>,
        /// List the targets, whether this smolpack carries their stub, and its size.
        #[arg(long, conflicts_with_all = ["machine", "output", "target", "compress", "stub", "key"])]
        list_targets: bool,
    },
    /// Remove what killed smolpack and smolvm runs left behind.
    ///
    /// Removes temp files of unfinished outputs (.NAME.PID.N.tmp) and build/pack scratch
    /// directories (.smolpack-build-*, .smolpack-pack-*). Looks in each DIR (default: the current directory), in the expansion cache
    /// (${SMOLVM_CACHE:-~/.cache/smolvm}/expanded) and in the machine cache of pulls
    /// (…/machines, docs/DISTRIBUTION.md). Only leftovers of processes that are gone
    /// are removed: a file or directory that a running build, pack, save or expansion holds
    /// (its flock) is left alone. Prints one `removed PATH` line per removal and exits 0; a
    /// leftover that cannot be removed gets a `warning:` line on stderr; a DIR that cannot be
    /// listed is an error (exit status 1). A build or pack removes the leftovers of earlier
    /// killed runs writing the same output by itself.
    #[command(after_help = "Examples:\n  smolpack gc\n  smolpack gc builds/ dist/")]
    Gc {
        /// Directories to clean (default: the current directory).
        dirs: Vec<PathBuf>,
    },
    /// Write the machine inside a packed executable out as a .smolmachine, byte for byte as
    /// it was packed.
    Unpack {
        /// The packed executable.
        packed: PathBuf,
        /// Output .smolmachine (written atomically).
        #[arg(short, long)]
        output: PathBuf,
    },
}

/// For read-only commands: end quietly, like other command-line tools, when the reader of
/// stdout goes away (`smolpack inspect FILE | head`) instead of failing to print. Commands
/// that write files keep SIGPIPE ignored, so they always clean up.
fn quiet_on_broken_pipe() {
    // SAFETY: restores the default disposition of SIGPIPE; called before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Build {
            smolfile,
            output,
            kernel,
            agent,
            compress,
            verbose,
            cpu,
        } => {
            let report = build::build(&build::BuildOptions {
                smolfile,
                output,
                kernel,
                agent,
                compress,
                verbose,
                cpu,
            })?;
            println!("{}", report.summary());
            Ok(())
        }
        Command::Inspect {
            file,
            json,
            no_verify,
        } => {
            quiet_on_broken_pipe();
            inspect::inspect(&file, json, !no_verify)
        }
        Command::Verify {
            file,
            keys,
            insecure,
        } => {
            quiet_on_broken_pipe();
            let conn = registry::Connection { insecure };
            let (file, pulled) = match file.to_str() {
                Some(r) if !file.exists() && smolvm_formats::reference::looks_like_reference(r) => {
                    let report = registry::pull_for_verify(r, &conn)
                        .map_err(|e| anyhow::Error::new(e).context(format!("cannot pull {r}")))?;
                    (report.path.clone(), Some(report))
                }
                _ => (file, None),
            };
            if keys.is_empty() {
                return inspect::verify(&file);
            }
            let keys = keys
                .iter()
                .map(|k| signing::read_public(k))
                .collect::<Result<Vec<_>, _>>()?;
            match (signing::verify(&file, &keys), pulled) {
                (Ok(info), _) => {
                    println!(
                        "ok: {} (signed by key {}, {} sections covered)",
                        file.display(),
                        info.key.id(),
                        info.covered
                    );
                    Ok(())
                }
                // Not signed inside by a trusted key: a signature attached in the registry
                // may vouch for the file's bytes instead.
                (Err(e), Some(report)) if signing::is_unsigned_or_untrusted(&e) => {
                    let r = &report.reference;
                    let found = registry::attached_signatures(r, &report.manifest_digest, &conn)
                        .map_err(|e| anyhow::Error::new(e).context(format!("cannot pull {r}")))?;
                    let (key, by) = signing::verify_attached(&file, &keys, &found)
                        .map_err(|why| anyhow::anyhow!("{e}, and {why}"))?;
                    println!(
                        "ok: {} (attached signature {by} by key {}, over the whole file)",
                        file.display(),
                        key.id()
                    );
                    Ok(())
                }
                (Err(e), _) => Err(e.into()),
            }
        }
        Command::Keygen { output } => {
            let public = signing::keygen(&output)?;
            println!(
                "wrote {0}.key (secret: keep it private) and {0}.pub (key {1})",
                output.display(),
                public.id()
            );
            Ok(())
        }
        Command::Sign {
            key,
            file,
            insecure,
        } => {
            let key = signing::read_secret(&key)?;
            if let Some(r) = file
                .to_str()
                .filter(|r| !file.exists() && smolvm_formats::reference::looks_like_reference(r))
            {
                let conn = registry::Connection { insecure };
                let report = registry::sign_reference(r, &key, &conn)
                    .map_err(|e| anyhow::Error::new(e).context(format!("cannot sign {r}")))?;
                println!("{}", report.summary());
                return Ok(());
            }
            let id = signing::sign(&file, &key)?;
            println!("signed {} with key {id}", file.display());
            Ok(())
        }
        Command::Pack {
            machine,
            output,
            target,
            compress,
            stub,
            key,
            list_targets,
        } => {
            if list_targets {
                quiet_on_broken_pipe();
                print!("{}", targets::list());
                return Ok(());
            }
            let (Some(machine), Some(output)) = (machine, output) else {
                anyhow::bail!("pack needs MACHINE and -o OUT (or --list-targets)");
            };
            let report = pack::pack(&pack::PackOptions {
                machine,
                output,
                target,
                compress,
                stub,
                key: key.map(|k| signing::read_secret(&k)).transpose()?,
            })?;
            println!("{}", report.summary());
            Ok(())
        }
        Command::Gc { dirs } => gc(dirs),
        Command::Push {
            file,
            reference,
            insecure,
            key,
        } => {
            let conn = registry::Connection { insecure };
            let key = key.map(|k| signing::read_secret(&k)).transpose()?;
            let report = registry::push(&file, &reference, &conn, key.as_ref()).map_err(|e| {
                anyhow::Error::new(e)
                    .context(format!("cannot push {} to {reference}", file.display()))
            })?;
            println!("{}", report.summary());
            Ok(())
        }
        Command::Pull {
            reference,
            output,
            pack: repack,
            cache,
            insecure,
            for_smolvm: _,
            signatures,
        } => {
            let conn = registry::Connection { insecure };
            let dest = match (&output, cache || repack) {
                (Some(o), false) => registry::Destination::Output(o.clone()),
                _ => registry::Destination::Cache,
            };
            let report = registry::pull(&reference, &dest, &conn)
                .map_err(|e| anyhow::Error::new(e).context(format!("cannot pull {reference}")))?;
            if cache {
                println!("{}", report.path.display());
                if signatures {
                    let sigs = registry::cache_signatures(&report, &conn).map_err(|e| {
                        anyhow::Error::new(e).context(format!("cannot pull {reference}"))
                    })?;
                    if let Some(p) = sigs {
                        println!("{}", p.display());
                    }
                }
                return Ok(());
            }
            println!("{}", report.summary());
            if let (true, Some(out)) = (repack, output) {
                let r = pack::pack(&pack::PackOptions {
                    machine: report.path.clone(),
                    output: out,
                    ..Default::default()
                })?;
                println!("{}", r.summary());
            }
            Ok(())
        }
        Command::Unpack { packed, output } => {
            let t = pack::unpack(&packed, &output)?;
            println!(
                "unpacked {} from {}: {} bytes",
                output.display(),
                packed.display(),
                t.payload_len
            );
            Ok(())
        }
    }
}

/// `smolpack gc [DIR...]`: every DIR must be readable; the expansion cache is cleaned too
/// when it exists.
fn gc(dirs: Vec<PathBuf>) -> anyhow::Result<()> {
    let dirs = if dirs.is_empty() {
        vec![PathBuf::from(".")]
    } else {
        dirs
    };
    let mut reports = Vec::new();
    for dir in &dirs {
        let r = smolpack::gc::gc_dir(dir)
            .map_err(|e| anyhow::anyhow!("cannot clean {}: {e}", dir.display()))?;
        reports.push(r);
    }
    for cache in [smolpack::gc::expanded_cache_dir(), registry::machines_dir()] {
        let same = |d: &PathBuf| d.canonicalize().ok() == cache.canonicalize().ok();
        if cache.is_dir() && !dirs.iter().any(same) {
            match smolpack::gc::gc_dir(&cache) {
                Ok(r) => reports.push(r),
                Err(e) => eprintln!("warning: cannot clean {}: {e}", cache.display()),
            }
        }
    }
    for r in reports {
        for p in &r.removed {
            println!("removed {}", p.display());
        }
        for (p, e) in &r.failed {
            eprintln!("warning: cannot remove {}: {e}", p.display());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let for_smolvm = matches!(
        cli.command,
        Command::Pull {
            for_smolvm: true,
            ..
        }
    );
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` joins the context chain into one line.
            let prefix = if for_smolvm { "smolvm" } else { "error" };
            eprintln!("{prefix}: {e:#}");
            // Registry failures have their own documented statuses (docs/DISTRIBUTION.md).
            let code = e
                .chain()
                .find_map(|c| c.downcast_ref::<registry::RegistryError>())
                .map_or(1, |r| r.exit_code());
            ExitCode::from(code)
        }
    }
}
