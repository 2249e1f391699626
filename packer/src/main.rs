//! `smolpack`: builds, inspects, verifies and packs `.smolmachine` files.
//!
//! Each subcommand lives in its own module; `main` only parses arguments and turns any error
//! into one `error: ...` line on stderr and a non-zero exit status.

mod inspect;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use smolpack::build;

#[derive(Parser)]
#[command(
    name = "smolpack",
    version,
    about = "Build, inspect, verify and pack .smolmachine files"
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
        /// Output .smolmachine (written atomically; untouched when the build fails).
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
    /// Check every checksum and that all padding is zero; exit status 0 means intact.
    Verify {
        /// A .smolmachine or a packed executable.
        file: PathBuf,
    },
    /// Append a .smolmachine to a VMM stub executable, producing a self-resuming executable.
    Pack {
        /// The smolvm stub executable.
        #[arg(long)]
        stub: PathBuf,
        /// The .smolmachine to embed.
        machine: PathBuf,
        /// Output executable (written atomically, mode +x).
        #[arg(short, long)]
        output: PathBuf,
    },
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
        } => {
            let report = build::build(&build::BuildOptions {
                smolfile,
                output,
                kernel,
                agent,
                compress,
                verbose,
            })?;
            println!("{}", report.summary());
            Ok(())
        }
        Command::Inspect {
            file,
            json,
            no_verify,
        } => inspect::inspect(&file, json, !no_verify),
        Command::Verify { file } => inspect::verify(&file),
        Command::Pack {
            stub,
            machine,
            output,
        } => {
            let t = smolvm_formats::trailer::pack(&stub, &machine, &output)
                .with_context(|| format!("packing {}", output.display()))?;
            println!(
                "packed {}: stub {} bytes, payload {} bytes at offset {}",
                output.display(),
                t.stub_len,
                t.payload_len,
                t.payload_offset
            );
            Ok(())
        }
    }
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
