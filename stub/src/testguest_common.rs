//! What the x86_64 and aarch64 test guests (`testguest`, `testguest_aarch64`)
//! have in common: the block checksum both compute, the report they send in
//! four 32-bit writes, and the host's reading of the block. Arch-neutral, so
//! it builds (and is tested) on every host.

use crate::memory::{GuestMemory, MemoryError};

/// Block size in u64 words.
pub const BLOCK_QWORDS: usize = 512;

/// The checksum the guest computes over its block for `counter`.
pub fn expected_checksum(counter: u64) -> u64 {
    let mut sum = 0u64;
    for i in 0..BLOCK_QWORDS as u64 {
        let v = (i + 1).wrapping_mul(counter) ^ 0x9e37_79b9_7f4a_7c15;
        sum = sum.rotate_left(5) ^ v;
    }
    sum
}

/// Checksum of the block at `block_addr` as it is in guest memory.
pub fn block_checksum(memory: &GuestMemory, block_addr: u64) -> Result<u64, MemoryError> {
    let mut block = vec![0u8; BLOCK_QWORDS * 8];
    memory.read(block_addr, &mut block)?;
    Ok(block.chunks_exact(8).fold(0u64, |sum, w| {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        sum.rotate_left(5) ^ u64::from_le_bytes(b)
    }))
}

/// One report of the guest, with the checksum the host read from guest
/// memory at the moment of the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub counter: u64,
    pub checksum: u64,
    pub memory_checksum: u64,
}

/// The report port's four 32-bit registers: counter low/high, checksum
/// low/high; the write of the last one completes a report.
#[derive(Debug, Default)]
pub struct ReportWords([u32; 4]);

impl ReportWords {
    /// Takes a write at `offset` in the port; returns `(counter, checksum)`
    /// when it completes a report. Writes that are not one aligned register
    /// are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<(u64, u64)> {
        let i = usize::try_from(offset / 4).ok().filter(|&i| i < 4)?;
        let bytes: [u8; 4] = data.try_into().ok()?;
        self.0[i] = u32::from_le_bytes(bytes);
        (i == 3).then(|| {
            let w = &self.0;
            (
                u64::from(w[0]) | (u64::from(w[1]) << 32),
                u64::from(w[2]) | (u64::from(w[3]) << 32),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_completes_on_the_last_word() {
        let mut r = ReportWords::default();
        assert_eq!(r.write(0, &7u32.to_le_bytes()), None);
        assert_eq!(r.write(4, &1u32.to_le_bytes()), None);
        assert_eq!(r.write(8, &0xaabb_ccddu32.to_le_bytes()), None);
        assert_eq!(
            r.write(12, &2u32.to_le_bytes()),
            Some(((1 << 32) | 7, (2 << 32) | 0xaabb_ccdd))
        );
        // Bad widths and offsets change nothing.
        assert_eq!(r.write(12, &[1, 2]), None);
        assert_eq!(r.write(16, &0u32.to_le_bytes()), None);
        assert_eq!(
            r.write(12, &2u32.to_le_bytes()),
            Some(((1 << 32) | 7, (2 << 32) | 0xaabb_ccdd))
        );
    }

    #[test]
    fn checksum_depends_on_the_counter() {
        assert_eq!(expected_checksum(7), expected_checksum(7));
        assert_ne!(expected_checksum(7), expected_checksum(8));
    }
}
