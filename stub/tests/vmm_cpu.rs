//! CPU models: a machine records its model and shows its guest only the
//! model's features; a host that lacks a feature the guest was shown is
//! refused in one line, exit 125, before any vCPU exists.

mod common;

use std::path::{Path, PathBuf};

use smolvm::arch::x86_64::cpu_model::{self, CpuModel, FEATURES};
use smolvm::host::HostProfile;
use smolvm::snapshot::MachineState;
use smolvm_formats::{
    Arch, Compression, GuestRegion, MachineReader, MachineWriter, Manifest, SectionKind,
};

fn snapshot(dir: &Path) -> PathBuf {
    let (m, _, _) = common::boot_and_pause(&common::PARAMS, 2);
    assert_eq!(m.cpu_model(), CpuModel::X86_64);
    let path = dir.join("guest.smolmachine");
    let manifest = Manifest {
        name: "testguest".into(),
        ..Default::default()
    };
    m.save(&path, &manifest, Compression::None).unwrap();
    path
}

/// Rewrite `src` into `dst` with its manifest and state changed by `edit`.
fn rewrite(src: &Path, dst: &Path, edit: impl FnOnce(&mut Manifest, &mut MachineState)) {
    let r = MachineReader::open(src).unwrap();
    let mut manifest = r.manifest().unwrap();
    let mut state = MachineState::from_bytes(&r.read_blob(SectionKind::VmState).unwrap()).unwrap();
    edit(&mut manifest, &mut state);
    let layout = r.memory_layout().unwrap();
    let mut bufs = Vec::new();
    for (i, region) in layout.regions.iter().enumerate() {
        let mut b = vec![0u8; region.size as usize];
        r.read_memory_region(i, &mut b).unwrap();
        bufs.push((region.guest_addr, b));
    }
    let regions: Vec<GuestRegion<'_>> = bufs
        .iter()
        .map(|(a, b)| GuestRegion {
            guest_addr: *a,
            data: b,
        })
        .collect();
    let mut w = MachineWriter::create(dst, Arch::X86_64).unwrap();
    w.add_manifest(&manifest).unwrap();
    w.add_blob(
        SectionKind::VmState,
        &state.to_bytes().unwrap(),
        Compression::None,
    )
    .unwrap();
    w.add_memory(&regions, Compression::None).unwrap();
    w.finish().unwrap();
}

fn run(path: &Path) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smolvm"))
        .arg("run")
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The features guests can use on this host, as the VMM sees them.
fn host_table() -> Vec<kvm_bindings::kvm_cpuid_entry2> {
    if HostProfile::detect() == HostProfile::KvmPvm {
        cpu_model::native_cpuid()
    } else {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap()
            .as_slice()
            .to_vec()
    }
}

#[test]
fn a_default_machine_records_its_model_and_shows_only_its_features() {
    if !common::kvm_ready("a_default_machine_records_its_model_and_shows_only_its_features") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = snapshot(dir.path());
    let r = MachineReader::open(&path).unwrap();
    assert_eq!(r.manifest().unwrap().cpu, "x86-64");
    let state = MachineState::from_bytes(&r.read_blob(SectionKind::VmState).unwrap()).unwrap();
    let model: Vec<&str> = CpuModel::X86_64.features().unwrap();
    let cpuid = state.vcpus[0].cpuid.as_slice();
    for f in FEATURES {
        if cpu_model::has(cpuid, f) {
            assert!(
                model.contains(&f.name),
                "the guest was shown {}: {:x?}",
                f.name,
                cpuid.iter().find(|e| e.function == f.leaf)
            );
        }
    }
    // No invariant TSC, no PMU leaf, no XSAVE leaf.
    assert!(cpuid.iter().all(|e| e.function != 0xa && e.function != 0xd));
    let (code, stderr) = run(&path);
    assert_eq!(
        code,
        Some(i32::from(common::PARAMS.exit_status)),
        "{stderr}"
    );
    assert!(stderr.is_empty(), "a resume prints nothing: {stderr}");
}

#[test]
fn a_host_that_lacks_a_shown_feature_is_refused_in_one_line() {
    let test = "a_host_that_lacks_a_shown_feature_is_refused_in_one_line";
    if !common::kvm_ready(test) {
        return;
    }
    let host = host_table();
    // A feature this host lacks, shown to the guest of a `host` machine as
    // if it came from a richer CPU.
    let Some(lacking) = FEATURES
        .iter()
        .find(|f| !cpu_model::has(&host, f) && f.leaf == 0x8000_0001)
        .or_else(|| FEATURES.iter().find(|f| !cpu_model::has(&host, f)))
    else {
        eprintln!("SKIPPING {test}: this host has every known CPU feature");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = snapshot(dir.path());
    let richer = dir.path().join("richer.smolmachine");
    rewrite(&path, &richer, |m, s| {
        m.cpu = "host".into();
        let mut entries = s.vcpus[0].cpuid.as_slice().to_vec();
        let e = match entries
            .iter_mut()
            .find(|e| e.function == lacking.leaf && e.index == lacking.subleaf)
        {
            Some(e) => e,
            None => {
                entries.push(kvm_bindings::kvm_cpuid_entry2 {
                    function: lacking.leaf,
                    index: lacking.subleaf,
                    ..Default::default()
                });
                entries.last_mut().unwrap()
            }
        };
        let bit = 1u32 << lacking.bit;
        match lacking.reg {
            cpu_model::Reg::Eax => e.eax |= bit,
            cpu_model::Reg::Ebx => e.ebx |= bit,
            cpu_model::Reg::Ecx => e.ecx |= bit,
            cpu_model::Reg::Edx => e.edx |= bit,
        }
        s.vcpus[0].cpuid = kvm_bindings::CpuId::from_entries(&entries).unwrap();
    });
    let (code, stderr) = run(&richer);
    assert_eq!(code, Some(125), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    let want = format!(
        "this machine needs a CPU with {}; this host lacks it: rebuild it with --cpu x86-64",
        lacking.name
    );
    assert!(
        stderr.starts_with("smolvm: cannot run ") && stderr.contains(&want),
        "{stderr}"
    );
    // The same machine as the default model needs only the model's features.
    let portable = dir.path().join("portable.smolmachine");
    rewrite(&richer, &portable, |m, _| m.cpu = "x86-64".into());
    let (code, stderr) = run(&portable);
    assert_eq!(
        code,
        Some(i32::from(common::PARAMS.exit_status)),
        "{stderr}"
    );
}

#[test]
fn an_unknown_model_asks_for_a_newer_smolvm() {
    if !common::kvm_ready("an_unknown_model_asks_for_a_newer_smolvm") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = snapshot(dir.path());
    let future = dir.path().join("future.smolmachine");
    rewrite(&path, &future, |m, _| m.cpu = "x86-64-v9".into());
    let (code, stderr) = run(&future);
    assert_eq!(code, Some(125), "{stderr}");
    assert!(
        stderr.contains(
            "it was built for CPU model 'x86-64-v9', which this smolvm does not know: upgrade smolvm"
        ),
        "{stderr}"
    );
}
