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

/// The hypervisor leaves a Linux guest looks for (`KVM_CPUID_SIGNATURE`,
/// `KVM_CPUID_FEATURES`): "KVMKVMKVM" and kvmclock (both MSR sets) with the
/// stable bit and no-op I/O delay. Used when the host's supported CPUID
/// lacks them; KVM's own values are kept when present.
pub fn kvm_leaves() -> [kvm_cpuid_entry2; 2] {
    const SIG: &[u8; 12] = b"KVMKVMKVM\0\0\0";
    let word = |i: usize| u32::from_le_bytes([SIG[i], SIG[i + 1], SIG[i + 2], SIG[i + 3]]);
    const CLOCKSOURCE: u32 = 1 << 0;
    const NOP_IO_DELAY: u32 = 1 << 1;
    const CLOCKSOURCE2: u32 = 1 << 3;
    const CLOCKSOURCE_STABLE: u32 = 1 << 24;
    [
        kvm_cpuid_entry2 {
            function: 0x4000_0000,
            eax: 0x4000_0001,
            ebx: word(0),
            ecx: word(4),
            edx: word(8),
            ..Default::default()
        },
        kvm_cpuid_entry2 {
            function: 0x4000_0001,
            eax: CLOCKSOURCE | NOP_IO_DELAY | CLOCKSOURCE2 | CLOCKSOURCE_STABLE,
            ..Default::default()
        },
    ]
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

    #[test]
    fn kvm_signature() {
        let [sig, features] = kvm_leaves();
        let mut b = Vec::new();
        for w in [sig.ebx, sig.ecx, sig.edx] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        assert_eq!(&b[..9], b"KVMKVMKVM");
        assert_eq!(sig.eax, 0x4000_0001);
        assert_ne!(features.eax & 1, 0);
    }
}
