//! Per-vCPU CPUID: the host's supported CPUID with this vCPU's APIC ID.

use kvm_bindings::kvm_cpuid_entry2;

/// Patch the entries KVM_GET_SUPPORTED_CPUID returned for vCPU `id` of `count`.
///
/// Leaf 1 carries the initial APIC ID and the logical processor count; leaves
/// 0xb and 0x1f carry the x2APIC ID. The hypervisor bit tells the guest it is
/// virtualised.
pub fn patch_for_vcpu(entries: &mut [kvm_cpuid_entry2], id: u32, count: u32) {
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | ((id & 0xff) << 24) | ((count.min(255)) << 16);
                e.ecx |= 1 << 31;
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the count field is valid.
                }
            }
            0xb | 0x1f => e.edx = id,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_apic_ids() {
        let mut entries = vec![
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xdead_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                edx: 9,
                ..Default::default()
            },
        ];
        patch_for_vcpu(&mut entries, 3, 4);
        assert_eq!(entries[0].ebx, 0x0304_0800);
        assert_ne!(entries[0].ecx & (1 << 31), 0);
        assert_eq!(entries[1].edx, 3);
    }
}
