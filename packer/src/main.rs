//! `smolpack`: builds, inspects, verifies, packs and unpacks `.smolmachine` files, and cleans
//! up what killed runs left (`gc`).
//!
//! Each subcommand lives in its own module; `main` only parses arguments and turns any error
//! into one `error: ...` line on stderr and a non-zero exit status.

mod inspect;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use smolpack::{build, pack, signing, targets};

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
        cpu: Option<smolvm::arch::x86_64::cpu_model::CpuModel>,
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
    Verify {
        /// A .smolmachine or a packed executable.
        file: PathBuf,
        /// A trusted public key file (`smolpack keygen` writes NAME.pub); may repeat.
        #[arg(long = "key", value_name = "PUB")]
        keys: Vec<PathBuf>,
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
    Sign {
        /// The secret key file (from `smolpack keygen`).
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
        /// The .smolmachine or packed executable to sign.
        file: PathBuf,
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
    /// directories (.smolpack-build-*, .smolpack-pack-*). Looks in each DIR (default: the current directory) and in the expansion cache
    /// (${SMOLVM_CACHE:-~/.cache/smolvm}/expanded). Only leftovers of processes that are gone
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
        Command::Verify { file, keys } => {
            quiet_on_broken_pipe();
            if keys.is_empty() {
                return inspect::verify(&file);
            }
            let keys = keys
                .iter()
                .map(|k| signing::read_public(k))
                .collect::<Result<Vec<_>, _>>()?;
            let info = signing::verify(&file, &keys)?;
            println!(
                "ok: {} (signed by key {}, {} sections covered)",
                file.display(),
                info.key.id(),
                info.covered
            );
            Ok(())
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
        Command::Sign { key, file } => {
            let key = signing::read_secret(&key)?;
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
    let cache = smolpack::gc::expanded_cache_dir();
    let same = |d: &PathBuf| d.canonicalize().ok() == cache.canonicalize().ok();
    if cache.is_dir() && !dirs.iter().any(same) {
        match smolpack::gc::gc_dir(&cache) {
            Ok(r) => reports.push(r),
            Err(e) => eprintln!("warning: cannot clean {}: {e}", cache.display()),
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
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` joins the context chain into one line.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
