//! `smolpack inspect` and `smolpack verify`.

use std::path::Path;

use anyhow::{bail, Context};
use serde::Serialize;
use smolpack::targets;
use smolvm_formats::{trailer, MachineReader, Manifest, MemoryLayout, SectionKind};

#[derive(Serialize)]
struct Report {
    file: String,
    /// Present when the file is a packed executable.
    packed: Option<Packed>,
    format_version: String,
    arch: String,
    /// Bytes of the .smolmachine (the payload, in a packed executable).
    machine_len: u64,
    /// The header and table checksum is checked on every open, so it is always "ok" here.
    header_checksum: &'static str,
    manifest: Option<Manifest>,
    sections: Vec<Section>,
    /// Optional table entries this build cannot decode and skips.
    skipped_sections: usize,
    memory: Option<Memory>,
    disks: Vec<Disk>,
    /// "ok", "unchecked" or the error.
    padding: String,
    /// True when everything checked is intact.
    ok: bool,
}

#[derive(Serialize)]
struct Packed {
    /// The target the stub runs on (from its ELF header), e.g. "x86_64-linux", or
    /// "unknown (...)" with the raw fields.
    stub_target: String,
    /// "static", "dynamic", or null when the stub's ELF header is unreadable.
    stub_linkage: Option<&'static str>,
    stub_len: u64,
    stub_elf_extent: Option<u64>,
    payload_offset: u64,
    payload_len: u64,
    /// "ok" or why the stub/payload check failed.
    stub_check: String,
}

#[derive(Serialize)]
struct Section {
    index: usize,
    kind: String,
    required: bool,
    compression: String,
    /// Absolute offset in the file.
    file_offset: u64,
    stored_len: u64,
    logical_len: u64,
    checksum: String,
    /// "ok", "unchecked" or the error.
    status: String,
}

#[derive(Serialize)]
struct Region {
    guest_addr: u64,
    size: u64,
    data_bytes: u64,
    data_runs: usize,
}

#[derive(Serialize)]
struct Memory {
    total_bytes: u64,
    data_bytes: u64,
    zero_ratio: f64,
    granule: u64,
    mappable: bool,
    regions: Vec<Region>,
}

#[derive(Serialize)]
struct Disk {
    name: String,
    size: u64,
    data_bytes: u64,
    zero_ratio: f64,
    mappable: bool,
}

fn ratio(zero: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        zero as f64 / total as f64
    }
}

fn memory_info(l: &MemoryLayout) -> Memory {
    let total = l.total_bytes();
    let data = l.data_bytes();
    Memory {
        total_bytes: total,
        data_bytes: data,
        zero_ratio: ratio(total - data, total),
        granule: l.granule,
        mappable: l.mappable,
        regions: l
            .regions
            .iter()
            .map(|r| Region {
                guest_addr: r.guest_addr,
                size: r.size,
                data_bytes: r.data_bytes(),
                data_runs: r.runs.iter().filter(|x| !x.zero).count(),
            })
            .collect(),
    }
}

fn open(path: &Path) -> anyhow::Result<MachineReader> {
    MachineReader::open(path).with_context(|| path.display().to_string())
}

fn build_report(path: &Path, check: bool) -> anyhow::Result<(Report, Option<String>)> {
    let r = open(path)?;
    let mut first_err: Option<String> = None;
    let mut note = |e: String| {
        if first_err.is_none() {
            first_err = Some(e.clone());
        }
        e
    };

    let packed = r.trailer().map(|t| {
        let (extent, stub_check) = match trailer::check_stub_extent(r.file(), t) {
            Ok(x) => (Some(x), "ok".to_string()),
            Err(e) => (None, note(e.to_string())),
        };
        let (stub_target, stub_linkage) = match trailer::elf_identity(r.file()) {
            Ok(id) => (
                targets::identify(&id)
                    .map(|t| t.name.to_string())
                    .unwrap_or_else(|| targets::describe_elf(&id)),
                Some(if id.dynamic { "dynamic" } else { "static" }),
            ),
            Err(e) => (format!("unknown ({e})"), None),
        };
        Packed {
            stub_target,
            stub_linkage,
            stub_len: t.stub_len,
            stub_elf_extent: extent,
            payload_offset: t.payload_offset,
            payload_len: t.payload_len,
            stub_check,
        }
    });
    let manifest = match r.manifest() {
        Ok(m) => Some(m),
        Err(e) => {
            note(e.to_string());
            None
        }
    };
    let sections = r
        .sections()
        .iter()
        .map(|s| Section {
            index: s.index,
            kind: s.kind.to_string(),
            required: s.required,
            compression: s.compression.to_string(),
            file_offset: s.file_offset,
            stored_len: s.stored_len,
            logical_len: s.logical_len,
            checksum: format!("{:016x}", s.checksum),
            status: if check {
                match r.check_section(s.index) {
                    Ok(()) => "ok".into(),
                    Err(e) => note(e.to_string()),
                }
            } else {
                "unchecked".into()
            },
        })
        .collect();
    if check {
        // Skipped entries are not listed but still hashed.
        let listed: Vec<usize> = r.sections().iter().map(|s| s.index).collect();
        for i in (0..r.table_len()).filter(|i| !listed.contains(i)) {
            if let Err(e) = r.check_section(i) {
                note(e.to_string());
            }
        }
    }
    let memory = match r.section(SectionKind::Memory) {
        None => None,
        Some(_) => match r.memory_layout() {
            Ok(l) => Some(memory_info(&l)),
            Err(e) => {
                note(e.to_string());
                None
            }
        },
    };
    let disks = match r.disks() {
        Ok(d) => d
            .iter()
            .map(|d| {
                let data: u64 = d.runs.iter().filter(|x| !x.zero).map(|x| x.len).sum();
                Disk {
                    name: d.name.clone(),
                    size: d.size,
                    data_bytes: data,
                    zero_ratio: ratio(d.size - data, d.size),
                    mappable: d.mappable,
                }
            })
            .collect(),
        Err(e) => {
            note(e.to_string());
            Vec::new()
        }
    };
    let padding = if check {
        match r.check_padding() {
            Ok(()) => "ok".into(),
            Err(e) => note(e.to_string()),
        }
    } else {
        "unchecked".into()
    };
    let h = r.header();
    let report = Report {
        file: path.display().to_string(),
        packed,
        format_version: format!("{}.{}", h.version_major, h.version_minor),
        arch: r.arch().to_string(),
        machine_len: r.len(),
        header_checksum: "ok",
        manifest,
        sections,
        skipped_sections: r.skipped_sections(),
        memory,
        disks,
        padding,
        ok: first_err.is_none(),
    };
    Ok((report, first_err))
}

/// Human-readable byte count.
fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn print_human(r: &Report) {
    println!("file:      {}", r.file);
    if let Some(p) = &r.packed {
        println!(
            "packed:    stub {}{} {} (ELF extent {}), payload {} at offset {:#x}; stub check: {}",
            p.stub_target,
            p.stub_linkage
                .map(|l| format!(" ({l})"))
                .unwrap_or_default(),
            human(p.stub_len),
            p.stub_elf_extent.map(human).unwrap_or_else(|| "?".into()),
            human(p.payload_len),
            p.payload_offset,
            p.stub_check
        );
    }
    println!(
        "format:    .smolmachine v{}, arch {}, {} sections, {}",
        r.format_version,
        r.arch,
        r.sections.len(),
        human(r.machine_len)
    );
    if let Some(m) = &r.manifest {
        println!(
            "machine:   {:?} by {:?}, created {} (unix), {} vCPU, {} memory, host {:?}, cpu {:?}",
            m.name,
            m.producer,
            m.created_unix_s,
            m.vcpus,
            human(m.memory_bytes),
            m.host_profile,
            m.cpu
        );
        println!(
            "run:       entrypoint {:?} cmd {:?} workdir {:?}",
            m.entrypoint, m.cmd, m.workdir
        );
        println!("kernel:    {:?}", m.kernel_cmdline);
        if !m.env.is_empty() {
            let env: Vec<String> = m.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("env:       {}", env.join(" "));
        }
    }
    println!();
    println!(
        "{:>3}  {:<12} {:<4} {:<5} {:>12} {:>11} {:>11}  {:<16}  status",
        "#", "kind", "req", "comp", "offset", "stored", "logical", "checksum"
    );
    for s in &r.sections {
        println!(
            "{:>3}  {:<12} {:<4} {:<5} {:>12} {:>11} {:>11}  {}  {}",
            s.index,
            s.kind,
            if s.required { "yes" } else { "no" },
            s.compression,
            format!("{:#x}", s.file_offset),
            human(s.stored_len),
            human(s.logical_len),
            s.checksum,
            s.status
        );
    }
    if r.skipped_sections > 0 {
        println!("({} optional sections skipped)", r.skipped_sections);
    }
    if let Some(m) = &r.memory {
        println!();
        println!(
            "memory:    {} in {} regions, {} stored, {:.1}% zero pages, granule {}, {}",
            human(m.total_bytes),
            m.regions.len(),
            human(m.data_bytes),
            m.zero_ratio * 100.0,
            human(m.granule),
            if m.mappable {
                "mappable in place"
            } else {
                "compressed (decompressed on resume)"
            }
        );
        for (i, g) in m.regions.iter().enumerate() {
            println!(
                "  region {i}: guest {:#x}, {}, {} data in {} runs",
                g.guest_addr,
                human(g.size),
                human(g.data_bytes),
                g.data_runs
            );
        }
    }
    for d in &r.disks {
        println!(
            "disk:      {:?} {}, {} stored, {:.1}% zero, {}",
            d.name,
            human(d.size),
            human(d.data_bytes),
            d.zero_ratio * 100.0,
            if d.mappable { "raw" } else { "compressed" }
        );
    }
    println!();
    println!(
        "integrity: header+table {}, sections {}, padding {}",
        r.header_checksum,
        if r.sections.iter().all(|s| s.status == "ok") {
            "ok"
        } else if r.sections.iter().all(|s| s.status == "unchecked") {
            "unchecked"
        } else {
            "FAILED"
        },
        r.padding
    );
}

/// `smolpack inspect FILE [--json] [--no-verify]`.
pub fn inspect(path: &Path, json: bool, check: bool) -> anyhow::Result<()> {
    let (report, err) = build_report(path, check)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_human(&report);
    }
    if let Some(e) = err {
        bail!("{}: {e}", path.display());
    }
    Ok(())
}

/// `smolpack verify FILE`.
pub fn verify(path: &Path) -> anyhow::Result<()> {
    let r = open(path)?;
    if let Some(t) = r.trailer() {
        trailer::check_stub_extent(r.file(), t).with_context(|| path.display().to_string())?;
    }
    let rep = r.verify().with_context(|| path.display().to_string())?;
    println!(
        "ok: {} ({} sections, {} bytes checked)",
        path.display(),
        rep.sections_checked,
        rep.bytes_checked
    );
    Ok(())
}
