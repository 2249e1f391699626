//! The hypervisor's share of a resume's VMM side (x86_64 Linux; not installed).
//!
//! ```text
//! bench_kvm_floor [ROUNDS] [MEMORY_MIB | MACHINE]
//! ```
//! Repeats, ROUNDS times (default 51, after one warm-up round), exactly the hypervisor calls a
//! resume makes before it restores state, through the same backend and helpers: open
//! `/dev/kvm`, `KVM_CREATE_VM`, register the guest's memory (one slot per region as
//! `vstate::vm::register_memory` does), the IRQ chip with the PIT, and one vCPU; then drops
//! them. The memory is MEMORY_MIB of anonymous memory (default 256), or a `.smolmachine`'s,
//! mapped from its file as a resume maps it (`builder::snapshot_memory`), mapped anew each
//! round. It prints each step's minimum and median in milliseconds. Nothing
//! else a resume does (reading and mapping the file, devices, threads, filters) is in these
//! numbers: they are what a VMM on this host cannot go below for these steps.

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn main() -> std::process::ExitCode {
    use smolvm::hypervisor::{Backend, Hypervisor, Vm, VmX86_64};
    use smolvm::memory::GuestMemory;
    use std::time::Instant;

    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(51);
    let source = args.next().unwrap_or_else(|| "256".into());
    let plan = match source.parse::<u64>() {
        Ok(_) => None,
        Err(_) => match smolvm::builder::SnapshotPlan::open(std::path::Path::new(&source)) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("bench_kvm_floor: {source}: {e}");
                return std::process::ExitCode::FAILURE;
            }
        },
    };
    let regions = smolvm::arch::x86_64::layout::ram_regions(source.parse().unwrap_or(0) << 20);
    let steps = ["open", "create-vm", "memory", "irqchip+pit", "vcpu", "drop"];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); steps.len()];
    // The first round is a process's first VM, as in every resume; the rest repeat it warm.
    let mut first = vec![0.0; steps.len()];
    for round in 0..=rounds {
        let memory = match &plan {
            Some(p) => smolvm::builder::snapshot_memory(p).map_err(|e| e.to_string()),
            None => GuestMemory::anonymous(&regions).map_err(|e| e.to_string()),
        };
        let memory = match memory {
            Ok(m) => m,
            Err(e) => {
                eprintln!("bench_kvm_floor: cannot map the guest's memory: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        let mut at = Instant::now();
        let mut lap = |i: usize| {
            let now = Instant::now();
            let ms = (now - at).as_secs_f64() * 1e3;
            if round > 0 {
                samples[i].push(ms);
            } else {
                first[i] = ms;
            }
            at = now;
        };
        let result = (|| -> Result<(), smolvm::hypervisor::HypervisorError> {
            let hv = Backend::open_default()?;
            lap(0);
            let vm = hv.create_vm()?;
            lap(1);
            // SAFETY: `memory` outlives `vm`, which is dropped at the end of this closure.
            unsafe { smolvm::vstate::vm::register_memory(&vm, &memory)? };
            lap(2);
            vm.create_irqchip(true)?;
            lap(3);
            let vcpu = vm.create_vcpu(0)?;
            lap(4);
            drop(vcpu);
            drop(vm);
            drop(hv);
            lap(5);
            Ok(())
        })();
        if let Err(e) = result {
            eprintln!("bench_kvm_floor: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    let stat = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        (v[0], v[v.len() / 2])
    };
    let what = match plan {
        Some(_) => format!("mapped from {source}"),
        None => format!("{source} MiB anonymous"),
    };
    println!("{rounds} rounds after the first, guest memory {what}; ms: step first min median");
    let (mut first_sum, mut min_sum, mut med_sum) = (0.0, 0.0, 0.0);
    for ((name, v), first) in steps.iter().zip(samples.iter_mut()).zip(&first) {
        let (min, med) = stat(v);
        println!("{name:12} {first:7.3} {min:7.3} {med:7.3}");
        if *name != "drop" {
            first_sum += first;
            min_sum += min;
            med_sum += med;
        }
    }
    println!(
        "{:12} {first_sum:7.3} {min_sum:7.3} {med_sum:7.3}",
        "to-vcpu"
    );
    std::process::ExitCode::SUCCESS
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn main() {
    eprintln!("bench_kvm_floor measures x86_64 Linux KVM only");
}
