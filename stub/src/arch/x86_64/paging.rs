//! Identity page tables for a direct 64-bit entry: 2 MiB pages.

const PRESENT_RW: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;
const TWO_MIB: u64 = 2 << 20;
const ONE_GIB: u64 = 1 << 30;

/// Errors from building page tables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PagingError {
    /// The map size must be a non-zero multiple of 1 GiB, at most 512 GiB.
    #[error("identity map of {0:#x} bytes: use a non-zero multiple of 1 GiB up to 512 GiB")]
    BadSize(u64),
}

/// Page-table pages (guest address, 4 KiB contents) identity-mapping
/// `[0, map_bytes)` with 2 MiB pages: a PML4 at `pml4_addr`, then one PDPT
/// page, then one page directory per GiB.
pub fn identity_map(pml4_addr: u64, map_bytes: u64) -> Result<Vec<(u64, Vec<u8>)>, PagingError> {
    if map_bytes == 0 || !map_bytes.is_multiple_of(ONE_GIB) || map_bytes > 512 * ONE_GIB {
        return Err(PagingError::BadSize(map_bytes));
    }
    let gibs = map_bytes / ONE_GIB;
    let pdpt_addr = pml4_addr + 0x1000;
    let mut pages = Vec::with_capacity(2 + gibs as usize);
    let mut pml4 = vec![0u8; 4096];
    pml4[..8].copy_from_slice(&(pdpt_addr | PRESENT_RW).to_le_bytes());
    pages.push((pml4_addr, pml4));
    let mut pdpt = vec![0u8; 4096];
    for g in 0..gibs {
        let pd_addr = pdpt_addr + 0x1000 * (g + 1);
        let i = g as usize * 8;
        pdpt[i..i + 8].copy_from_slice(&(pd_addr | PRESENT_RW).to_le_bytes());
    }
    pages.push((pdpt_addr, pdpt));
    for g in 0..gibs {
        let mut pd = vec![0u8; 4096];
        for e in 0..512u64 {
            let phys = g * ONE_GIB + e * TWO_MIB;
            let i = e as usize * 8;
            pd[i..i + 8].copy_from_slice(&(phys | PRESENT_RW | PAGE_SIZE_2M).to_le_bytes());
        }
        pages.push((pdpt_addr + 0x1000 * (g + 1), pd));
    }
    Ok(pages)
}

/// Translate `vaddr` by walking tables read through `read_u64` (4-level,
/// 4 KiB / 2 MiB / 1 GiB pages). Used to find the instruction bytes of a
/// stopped guest; returns None for an unmapped address.
pub fn translate(
    cr3: u64,
    vaddr: u64,
    mut read_u64: impl FnMut(u64) -> Option<u64>,
) -> Option<u64> {
    const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
    let mut table = cr3 & ADDR_MASK;
    for level in (1..=4u32).rev() {
        let shift = 12 + 9 * (level - 1);
        let index = (vaddr >> shift) & 0x1ff;
        let entry = read_u64(table + index * 8)?;
        if entry & 1 == 0 {
            return None;
        }
        if (level == 2 || level == 3) && entry & PAGE_SIZE_2M != 0 {
            let page_mask = (1u64 << shift) - 1;
            return Some((entry & ADDR_MASK & !page_mask) | (vaddr & page_mask));
        }
        table = entry & ADDR_MASK;
    }
    Some(table | (vaddr & 0xfff))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn entry(pages: &[(u64, Vec<u8>)], addr: u64) -> Option<u64> {
        let page = addr & !0xfff;
        let off = (addr & 0xfff) as usize;
        let (_, data) = pages.iter().find(|(a, _)| *a == page)?;
        Some(u64::from_le_bytes(data[off..off + 8].try_into().ok()?))
    }

    #[test]
    fn identity_maps_every_2m_page() {
        let pages = identity_map(0x9000, 2 << 30).unwrap();
        assert_eq!(pages.len(), 4);
        assert_eq!(pages[0].0, 0x9000);
        assert_eq!(entry(&pages, 0x9000), Some(0xa003));
        assert_eq!(entry(&pages, 0xa000), Some(0xb003));
        assert_eq!(entry(&pages, 0xa008), Some(0xc003));
        assert_eq!(entry(&pages, 0xb008), Some(0x20_0083));
        for vaddr in [
            0u64,
            0x1234,
            0x20_0000,
            0x3fff_ffff,
            0x4000_1234,
            0x7fff_f000,
        ] {
            assert_eq!(translate(0x9000, vaddr, |a| entry(&pages, a)), Some(vaddr));
        }
        assert_eq!(translate(0x9000, 0x8000_0000, |a| entry(&pages, a)), None);
    }

    #[test]
    fn rejects_bad_sizes() {
        assert_eq!(identity_map(0x9000, 0), Err(PagingError::BadSize(0)));
        assert_eq!(
            identity_map(0x9000, 3 << 20),
            Err(PagingError::BadSize(3 << 20))
        );
        assert!(identity_map(0x9000, 513 << 30).is_err());
    }

    #[test]
    fn walks_4k_pages() {
        let mut mem: HashMap<u64, u64> = HashMap::new();
        mem.insert(0x1000, 0x2003);
        mem.insert(0x2000, 0x3003);
        mem.insert(0x3000, 0x4003);
        mem.insert(0x4000 + 5 * 8, 0x77_7003);
        assert_eq!(
            translate(0x1000, 0x5123, |a| mem.get(&a).copied()),
            Some(0x77_7123)
        );
        assert_eq!(translate(0x1000, 0x6123, |a| mem.get(&a).copied()), None);
    }
}
