//! `smolvm-rootfs`: builds a root filesystem image from the command line.
//!
//! `guest/rootfs/build-busybox.sh` uses it to make `target/guest/busybox.ext4`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use smolvm_rootfs::{build, Base, RootfsSpec};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Kind {
    Busybox,
    Debian,
    Oci,
    Dir,
}

/// Build an ext4 root filesystem image with the smolvm agent as /sbin/init.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The base: busybox, debian, oci (needs --source) or dir (needs --source).
    #[arg(long, value_enum, default_value = "busybox")]
    base: Kind,
    /// The OCI archive or layout directory (oci) or the host directory (dir).
    #[arg(long)]
    source: Option<PathBuf>,
    /// Debian suite (debian).
    #[arg(long, default_value = "bookworm")]
    suite: String,
    /// Extra Debian package (debian); repeatable.
    #[arg(long = "package")]
    packages: Vec<String>,
    /// The static agent binary to install as /sbin/init.
    #[arg(long)]
    agent: PathBuf,
    /// Copy HOST:GUEST into the image; repeatable.
    #[arg(long = "copy", value_name = "HOST:GUEST")]
    copies: Vec<String>,
    /// Image size in bytes (default: content × 1.25 + 32 MiB).
    #[arg(long)]
    size: Option<u64>,
    /// The image to write.
    #[arg(short, long)]
    output: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let source = || args.source.clone().context("this base needs --source PATH");
    let base = match args.base {
        Kind::Busybox => Base::Busybox,
        Kind::Debian => Base::Debian {
            suite: args.suite.clone(),
            packages: args.packages.clone(),
        },
        Kind::Oci => Base::Oci { archive: source()? },
        Kind::Dir => Base::Dir { path: source()? },
    };
    let mut spec = RootfsSpec::new(base, &args.agent);
    spec.size = args.size;
    for c in &args.copies {
        let (host, guest) = c
            .split_once(':')
            .with_context(|| format!("--copy {c:?}: expected HOST:GUEST"))?;
        spec.copies.push((host.into(), guest.into()));
    }
    let started = std::time::Instant::now();
    let info = build(&spec, &args.output)
        .with_context(|| format!("building {}", args.output.display()))?;
    println!(
        "{}: {} MiB image ({} KiB on disk), {} KiB content in {} entries, uuid {}, {:.2} s",
        info.path.display(),
        info.size >> 20,
        info.allocated >> 10,
        info.content_bytes >> 10,
        info.entries,
        info.uuid,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
