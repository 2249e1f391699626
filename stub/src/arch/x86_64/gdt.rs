//! The boot GDT and the segment registers derived from it.

use kvm_bindings::kvm_segment;

/// Encode a GDT descriptor from its flags (type/S/DPL/P in bits 0..8,
/// AVL/L/D/G in bits 12..16), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << 32)
        | (((flags as u64) & 0xf0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << 32)
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

/// The GDT for a 64-bit entry: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
/// The GDT for a PVH entry: null, flat 32-bit code, flat data, TSS. The
/// kernel loads its own GDT right away; these give consistent segment caches.
pub const PVH_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0x67),
];
/// Selector index of the code segment in [`BOOT_GDT`].
pub const CODE_INDEX: u8 = 1;
/// Selector index of the data segment.
pub const DATA_INDEX: u8 = 2;
/// Selector index of the TSS.
pub const TSS_INDEX: u8 = 3;

/// The segment register that loading selector `index` of `table` would give.
pub fn segment_from_gdt(table: &[u64], index: u8) -> kvm_segment {
    let entry = table.get(index as usize).copied().unwrap_or(0);
    let limit_raw = ((entry & 0x000f_0000_0000_0000) >> 32 | (entry & 0xffff)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        // With G set the limit counts 4 KiB pages; KVM wants it in bytes.
        limit: if g == 1 {
            (limit_raw << 12) | 0xfff
        } else {
            limit_raw
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The GDT as little-endian bytes, ready to write into guest memory.
pub fn gdt_bytes(table: &[u64]) -> Vec<u8> {
    table.iter().flat_map(|e| e.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_known_descriptors() {
        // Reference values of the flat 64-bit code and data descriptors.
        assert_eq!(BOOT_GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x008f_8b00_0000_ffff);
        assert_eq!(gdt_entry(0x9a, 0x1234_5678, 0xabcde), 0x120a_9a34_5678_bcde);
    }

    #[test]
    fn decodes_segments() {
        let cs = segment_from_gdt(&BOOT_GDT, CODE_INDEX);
        assert_eq!(cs.selector, 8);
        assert_eq!((cs.l, cs.db, cs.g, cs.present, cs.s), (1, 0, 1, 1, 1));
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.unusable, 0);
        let ds = segment_from_gdt(&BOOT_GDT, DATA_INDEX);
        assert_eq!((ds.l, ds.db, ds.type_, ds.selector), (0, 1, 3, 16));
        let tss = segment_from_gdt(&BOOT_GDT, TSS_INDEX);
        assert_eq!((tss.type_, tss.s, tss.g), (0xb, 0, 1));
        let null = segment_from_gdt(&BOOT_GDT, 0);
        assert_eq!(null.unusable, 1);
        // Out-of-range indexes read as the null descriptor instead of panicking.
        assert_eq!(segment_from_gdt(&BOOT_GDT, 9).unusable, 1);
        assert_eq!(gdt_bytes(&BOOT_GDT).len(), 32);
    }
}
