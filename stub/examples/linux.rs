//! Boot a Linux guest, run a command through the agent, optionally save it
//! (and with `SMOLVM_RESUME=1` resume it): a hand driver for the Linux path
//! and the machine maker of `scripts/bench-resume.sh linux`.
//!
//! `cargo run --release -p smolvm --example linux -- KERNEL ROOTFS [OUT.smolmachine]`
//! with `SMOLVM_CONSOLE=1` to see the kernel log, `SMOLVM_BOOT=pvh|linux64` to pick the
//! entry (x86_64) and `SMOLVM_VCPUS=N` for N vCPUs.

use std::time::Instant;

use smolvm::linux::{boot_linux, resume_linux, LinuxConfig, ResumeOptions};

struct Stderr;

impl log::Log for Stderr {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        eprintln!("smolvm: {}: {}", r.level(), r.args());
    }
    fn flush(&self) {}
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kernel, rootfs, rest @ ..] = args.as_slice() else {
        eprintln!("usage: linux KERNEL ROOTFS [OUT.smolmachine]");
        std::process::exit(2);
    };
    let mut cfg = LinuxConfig::new(kernel, rootfs);
    if std::env::var_os("SMOLVM_CONSOLE").is_some() {
        cfg.console = Some(Box::new(std::io::stderr()));
    }
    match std::env::var("SMOLVM_BOOT").as_deref() {
        Ok("pvh") => cfg.boot_protocol = smolvm::linux::BootProtocol::Pvh,
        Ok("linux64") => cfg.boot_protocol = smolvm::linux::BootProtocol::Linux64,
        _ => {}
    }
    if let Some(n) = std::env::var("SMOLVM_VCPUS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cfg.vcpus = n;
    }
    if let Ok(extra) = std::env::var("SMOLVM_EXTRA_CMDLINE") {
        cfg.extra_cmdline = extra;
    }
    if log::set_logger(&Stderr).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
    let t = Instant::now();
    let mut m = boot_linux(cfg)?;
    eprintln!("agent ready after {:.1} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let out = m.agent().run_capture(["echo", "hello from the guest"])?;
    eprintln!(
        "echo: {:?} {:?} in {:.2} s",
        String::from_utf8_lossy(&out.stdout),
        out.status,
        t.elapsed().as_secs_f64()
    );
    if let Some(path) = rest.first() {
        let t = Instant::now();
        let manifest = smolvm_formats::Manifest {
            name: "linux-example".into(),
            cmd: vec!["/bin/sh".into(), "-l".into()],
            ..Default::default()
        };
        m.save(path.as_ref(), &manifest, smolvm_formats::Compression::None)?;
        eprintln!("saved {path} in {:.2} s", t.elapsed().as_secs_f64());
        if std::env::var_os("SMOLVM_RESUME").is_some() {
            drop(m);
            let t = Instant::now();
            let r = resume_linux(path.as_ref(), ResumeOptions::default())?;
            eprintln!("resumed in {:.3} s", t.elapsed().as_secs_f64());
            let out = r.agent().run_capture(["cat", "/proc/uptime"])?;
            eprintln!("after resume: {:?}", String::from_utf8_lossy(&out.stdout));
        }
    }
    Ok(())
}
