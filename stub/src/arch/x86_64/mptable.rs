//! An Intel MultiProcessor Specification 1.4 table: how a guest without ACPI
//! learns about more than one CPU, the I/O APIC and the ISA interrupt
//! routing. Linux finds the floating pointer by scanning the last KiB below
//! 640 KiB; the configuration table follows it.

/// Where the floating pointer goes (the start of the EBDA, outside the e820 RAM map).
pub const MPTABLE_ADDR: u64 = 0x9fc00;
/// The local APIC's default base.
pub const APIC_DEFAULT_BASE: u32 = 0xfee0_0000;
/// The I/O APIC's default base.
pub const IOAPIC_DEFAULT_BASE: u32 = 0xfec0_0000;
/// ISA interrupt lines routed to I/O APIC pins of the same number.
pub const ISA_IRQS: u8 = 16;

const SPEC_REV: u8 = 4;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

/// Errors from building the table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    /// APIC IDs are one byte and the I/O APIC takes the next one.
    #[error("{0} vCPUs do not fit an MP table (at most 254)")]
    TooManyCpus(u32),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)))
}

/// The floating pointer and configuration table for `cpus` vCPUs (APIC IDs
/// `0..cpus`, the first the bootstrap processor), as bytes to write at
/// [`MPTABLE_ADDR`].
pub fn mptable(cpus: u32) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > 254 {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus as u8;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let mut e = [0u8; 20];
        e[0] = ENTRY_PROCESSOR;
        e[1] = id as u8;
        e[2] = APIC_VERSION;
        e[3] = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        // Signature: family 6; features: FPU and APIC.
        e[4..8].copy_from_slice(&0x600u32.to_le_bytes());
        e[8..12].copy_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&e);
        count += 1;
    }
    let mut bus = [0u8; 8];
    bus[0] = ENTRY_BUS;
    bus[1] = 0;
    bus[2..8].copy_from_slice(b"ISA   ");
    entries.extend_from_slice(&bus);
    count += 1;
    let mut ioapic = [0u8; 8];
    ioapic[0] = ENTRY_IOAPIC;
    ioapic[1] = ioapic_id;
    ioapic[2] = IOAPIC_VERSION;
    ioapic[3] = 1; // enabled
    ioapic[4..8].copy_from_slice(&IOAPIC_DEFAULT_BASE.to_le_bytes());
    entries.extend_from_slice(&ioapic);
    count += 1;
    for irq in 0..ISA_IRQS {
        // ISA defaults (flags 0): edge triggered, active high; IRQ n → pin n.
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    // LINT0 ExtINT and LINT1 NMI on every local APIC (ID 0xff), as the VMM
    // programs them.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = MPTABLE_ADDR + 16;
    let mut header = [0u8; 44];
    header[0..4].copy_from_slice(b"PCMP");
    let len = (header.len() + entries.len()) as u16;
    header[4..6].copy_from_slice(&len.to_le_bytes());
    header[6] = SPEC_REV;
    header[8..16].copy_from_slice(b"SMOLVM  ");
    header[16..28].copy_from_slice(b"000000000000");
    header[34..36].copy_from_slice(&count.to_le_bytes());
    header[36..40].copy_from_slice(&APIC_DEFAULT_BASE.to_le_bytes());
    let mut table = header.to_vec();
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = [0u8; 16];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&(table_addr as u32).to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = SPEC_REV;
    fp[10] = checksum(&fp);
    let mut out = fp.to_vec();
    out.extend_from_slice(&table);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    #[test]
    fn structure_and_checksums() {
        let t = mptable(4).unwrap();
        let (fp, table) = t.split_at(16);
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(sum(fp), 0);
        assert_eq!(
            u32::from_le_bytes(fp[4..8].try_into().unwrap()) as u64,
            MPTABLE_ADDR + 16
        );
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        // 4 CPUs, bus, I/O APIC, 16 ISA lines, 2 local lines.
        assert_eq!(count, 4 + 1 + 1 + 16 + 2);
        assert_eq!(table.len(), 44 + 4 * 20 + 8 + 8 + 16 * 8 + 2 * 8);
        // The first processor is the bootstrap one, the others are not.
        assert_eq!(table[44 + 3], CPU_ENABLED | CPU_BOOTSTRAP);
        assert_eq!(table[44 + 20 + 3], CPU_ENABLED);
        // The I/O APIC ID follows the CPUs'.
        assert_eq!(table[44 + 80 + 8 + 1], 4);
        assert!(mptable(0).is_err());
        assert!(mptable(255).is_err());
        // The largest table still ends below 1 MiB.
        assert!(MPTABLE_ADDR + mptable(254).unwrap().len() as u64 <= 0x10_0000);
    }
}
