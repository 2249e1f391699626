//! Snapshot state: the save/restore contract, the machine state and its
//! versioned, checksummed encoding.
//!
//! The encoded state (the `VmState` section of a `.smolmachine`) is
//! `magic "SMOLVMST" | version u32 | flags u32 | payload length u64 |
//! CRC-32 of the payload u32 | payload`, all little-endian. The payload is
//! `postcard`: a compact serde binary codec with a stable, documented wire
//! format, so KVM's large byte structures (4 KiB XSAVE, 1 KiB LAPIC) stay
//! small and decoding never trusts a length beyond the bytes present. JSON
//! would triple the size of those byte arrays for no reader that needs them.
//! Everything is checked before any KVM object is created.

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
use crate::hypervisor::kvm::x86_64::{VcpuState, VmState};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Magic at the start of an encoded machine state.
pub const STATE_MAGIC: [u8; 8] = *b"SMOLVMST";
/// Version of the state layout this build writes and reads.
pub const STATE_VERSION: u32 = 2;
/// Largest encoded state accepted (vCPU state is about 10 KiB per vCPU): the
/// machine file's blob limit, so what one accepts the other does too.
pub const MAX_STATE_BYTES: usize = smolvm_formats::MAX_BLOB_LEN as usize;
/// Most vCPUs a machine state may hold.
pub const MAX_VCPUS: usize = 256;
const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 4;

/// The save/restore contract of a component: its state is a plain serde
/// struct, separate from the runtime object (which holds fds and threads).
pub trait Persist: Sized {
    /// The saved state.
    type State: Serialize + for<'de> Deserialize<'de>;
    /// What restoring needs besides the state (the VM, an id, ...).
    type Args<'a>;
    /// Failure of save or restore.
    type Error;
    /// Capture the component's state.
    fn save(&self) -> Result<Self::State, Self::Error>;
    /// Rebuild the component from `state`.
    fn restore(args: Self::Args<'_>, state: &Self::State) -> Result<Self, Self::Error>;
}

/// Errors from decoding or validating a machine state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// Larger than [`MAX_STATE_BYTES`].
    #[error("machine state is {len} bytes, more than the {max} accepted; the file is corrupt")]
    TooLarge { len: usize, max: usize },
    /// Shorter than its header or its declared length.
    #[error("machine state is truncated ({len} bytes, {expected} expected); the file is corrupt")]
    Truncated { len: usize, expected: usize },
    /// Not a machine state.
    #[error("machine state has a bad magic; the file is corrupt or not a smolvm machine")]
    BadMagic,
    /// Written by a newer smolvm.
    #[error("machine state version {found} is newer than this smolvm supports ({supported}); upgrade smolvm")]
    FutureVersion { found: u32, supported: u32 },
    /// Written by an older, unsupported layout.
    #[error("machine state version {found} is no longer supported (this smolvm reads {supported}); rebuild the machine")]
    OldVersion { found: u32, supported: u32 },
    /// Unknown flags set.
    #[error("machine state uses unknown flags {0:#x}; upgrade smolvm")]
    UnknownFlags(u32),
    /// Bytes after the declared payload.
    #[error("machine state has {0} trailing bytes; the file is corrupt")]
    Trailing(usize),
    /// The payload checksum does not match.
    #[error("machine state checksum mismatch; the file is corrupt")]
    Checksum,
    /// The payload does not decode.
    #[error("machine state does not decode ({0}); the file is corrupt")]
    Decode(String),
    /// Decoded, but inconsistent.
    #[error("machine state is inconsistent: {0}")]
    Invalid(String),
    /// Encoding failed (a bug).
    #[error("cannot encode machine state: {0}")]
    Encode(String),
}

/// One guest memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionState {
    pub guest_addr: u64,
    pub size: u64,
}

/// Devices of the machine and their saved state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStates {
    /// Port of the exit device, if the machine has one.
    pub exit_port: Option<u16>,
    /// Other devices' state, by device name, each encoded by its device.
    pub blobs: BTreeMap<String, Vec<u8>>,
    /// The devices of a Linux guest (serial, virtio), when it is one.
    pub linux: Option<crate::devices::state::LinuxDeviceStates>,
}

/// Everything needed to resume a machine besides its memory.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineState {
    /// `x86_64`.
    pub arch: String,
    /// `kvm`.
    pub backend: String,
    /// Host profile of the machine that saved it (see [`crate::host`]).
    pub host_profile: String,
    /// Guest memory regions (their bytes are the memory section).
    pub memory: Vec<RegionState>,
    /// Whether the machine has a PIT.
    pub pit: bool,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceStates,
}

/// Encode `value` with the state header.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StateError> {
    let payload = postcard::to_stdvec(value).map_err(|e| StateError::Encode(e.to_string()))?;
    if payload.len() + HEADER_LEN > MAX_STATE_BYTES {
        return Err(StateError::TooLarge {
            len: payload.len() + HEADER_LEN,
            max: MAX_STATE_BYTES,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&STATE_MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Check the header, size cap and checksum, then decode.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, StateError> {
    if bytes.len() > MAX_STATE_BYTES {
        return Err(StateError::TooLarge {
            len: bytes.len(),
            max: MAX_STATE_BYTES,
        });
    }
    if bytes.len() < HEADER_LEN {
        return Err(StateError::Truncated {
            len: bytes.len(),
            expected: HEADER_LEN,
        });
    }
    let u32_at =
        |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    if bytes[..8] != STATE_MAGIC {
        return Err(StateError::BadMagic);
    }
    let version = u32_at(8);
    if version > STATE_VERSION {
        return Err(StateError::FutureVersion {
            found: version,
            supported: STATE_VERSION,
        });
    }
    if version < STATE_VERSION {
        return Err(StateError::OldVersion {
            found: version,
            supported: STATE_VERSION,
        });
    }
    let flags = u32_at(12);
    if flags != 0 {
        return Err(StateError::UnknownFlags(flags));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[16..24]);
    let declared = u64::from_le_bytes(len8);
    let available = (bytes.len() - HEADER_LEN) as u64;
    if declared > available {
        return Err(StateError::Truncated {
            len: bytes.len(),
            expected: HEADER_LEN.saturating_add(usize::try_from(declared).unwrap_or(usize::MAX)),
        });
    }
    if declared < available {
        return Err(StateError::Trailing((available - declared) as usize));
    }
    let payload = &bytes[HEADER_LEN..];
    if crc32fast::hash(payload) != u32_at(24) {
        return Err(StateError::Checksum);
    }
    let (value, rest) =
        postcard::take_from_bytes(payload).map_err(|e| StateError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(StateError::Decode(format!(
            "{} unused payload bytes",
            rest.len()
        )));
    }
    Ok(value)
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
impl MachineState {
    /// Decode and check internal consistency (no host access).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let s: MachineState = decode(bytes)?;
        s.validate()?;
        Ok(s)
    }

    /// Internal consistency: architecture, vCPU ids, memory regions.
    pub fn validate(&self) -> Result<(), StateError> {
        let bad = |m: String| Err(StateError::Invalid(m));
        if self.arch != "x86_64" {
            return bad(format!("architecture '{}' is not x86_64", self.arch));
        }
        if self.backend != "kvm" {
            return bad(format!(
                "saved by backend '{}', this build resumes 'kvm'",
                self.backend
            ));
        }
        if self.vcpus.is_empty() || self.vcpus.len() > MAX_VCPUS {
            return bad(format!("{} vCPUs", self.vcpus.len()));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if v.id as usize != i {
                return bad(format!("vCPU {i} is saved with id {}", v.id));
            }
        }
        if self.memory.is_empty() {
            return bad("no memory regions".into());
        }
        let mut end = 0u64;
        for (i, r) in self.memory.iter().enumerate() {
            if r.size == 0 || !r.size.is_multiple_of(4096) || !r.guest_addr.is_multiple_of(4096) {
                return bad(format!("memory region {i} is not page aligned"));
            }
            if i > 0 && r.guest_addr < end {
                return bad(format!("memory region {i} overlaps or is out of order"));
            }
            end = match r.guest_addr.checked_add(r.size) {
                Some(e) => e,
                None => return bad(format!("memory region {i} wraps")),
            };
        }
        Ok(())
    }

    /// Encode with the state header.
    pub fn to_bytes(&self) -> Result<Vec<u8>, StateError> {
        encode(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        a: u64,
        b: Vec<u8>,
        c: String,
    }

    fn sample() -> Sample {
        Sample {
            a: 0x1122_3344_5566_7788,
            b: vec![1, 2, 3, 4, 5],
            c: "state".into(),
        }
    }

    #[test]
    fn round_trips() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(&bytes[..8], b"SMOLVMST");
        assert_eq!(decode::<Sample>(&bytes).unwrap(), sample());
    }

    #[test]
    fn refuses_damaged_state() {
        let good = encode(&sample()).unwrap();
        for cut in [0, 5, HEADER_LEN - 1, HEADER_LEN, good.len() - 1] {
            assert!(
                matches!(
                    decode::<Sample>(&good[..cut]),
                    Err(StateError::Truncated { .. })
                ),
                "cut at {cut}"
            );
        }
        for bit in 0..good.len() * 8 {
            let mut b = good.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(decode::<Sample>(&b).is_err(), "flip of bit {bit} accepted");
        }
        let mut future = good.clone();
        future[8..12].copy_from_slice(&(STATE_VERSION + 1).to_le_bytes());
        assert_eq!(
            decode::<Sample>(&future).unwrap_err(),
            StateError::FutureVersion {
                found: STATE_VERSION + 1,
                supported: STATE_VERSION
            }
        );
        let huge = vec![0u8; MAX_STATE_BYTES + 1];
        assert!(matches!(
            decode::<Sample>(&huge),
            Err(StateError::TooLarge { .. })
        ));
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(
            decode::<Sample>(&trailing).unwrap_err(),
            StateError::Trailing(1)
        );
        // A header claiming a huge payload is refused without allocating it.
        let mut lying = good.clone();
        lying[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<Sample>(&lying),
            Err(StateError::Truncated { .. })
        ));
    }

    #[test]
    fn refuses_garbage_payload_with_valid_crc() {
        let payload = vec![0xffu8; 64];
        let mut b = Vec::new();
        b.extend_from_slice(&STATE_MAGIC);
        b.extend_from_slice(&STATE_VERSION.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        b.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        b.extend_from_slice(&payload);
        assert!(matches!(decode::<Sample>(&b), Err(StateError::Decode(_))));
    }
}

#[cfg(all(test, target_os = "linux", target_arch = "x86_64"))]
mod machine_state_tests {
    use super::*;
    use crate::hypervisor::kvm::x86_64::FpuState;
    use kvm_bindings::{kvm_cpuid_entry2, kvm_regs, CpuId};

    fn state() -> MachineState {
        let cpuid = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                eax: 0x806f8,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                edx: 0,
                ..Default::default()
            },
        ])
        .unwrap();
        let mut lapic = kvm_bindings::kvm_lapic_state::default();
        lapic.regs[0x20] = 7;
        let vcpu = VcpuState {
            id: 0,
            cpuid,
            mp_state: Default::default(),
            regs: kvm_regs {
                rip: 0x10_0000,
                rbx: 0x1111_1111_1111_1111,
                rflags: 2,
                ..Default::default()
            },
            sregs: Default::default(),
            fpu: FpuState::Xsave((0..1024u32).collect()),
            xcrs: Some(Default::default()),
            debug_regs: Some(Default::default()),
            lapic,
            msrs: vec![(0x10, 12345), (0x6e0, 99), (0xc000_0080, 0x500)],
            vcpu_events: Some(Default::default()),
            tsc_khz: Some(2_400_000),
        };
        let mut devices = DeviceStates {
            exit_port: Some(0xf4),
            ..Default::default()
        };
        devices.blobs.insert("serial".into(), vec![1, 2, 3]);
        MachineState {
            arch: "x86_64".into(),
            backend: "kvm".into(),
            host_profile: "kvm-pvm".into(),
            memory: vec![RegionState {
                guest_addr: 0,
                size: 4 << 20,
            }],
            pit: false,
            vm: VmState {
                pic_master: Default::default(),
                pic_slave: kvm_bindings::kvm_irqchip {
                    chip_id: 1,
                    ..Default::default()
                },
                ioapic: kvm_bindings::kvm_irqchip {
                    chip_id: 2,
                    ..Default::default()
                },
                pit: None,
                clock: Some(kvm_bindings::kvm_clock_data {
                    clock: 42,
                    ..Default::default()
                }),
            },
            vcpus: vec![vcpu],
            devices,
        }
    }

    #[test]
    fn machine_state_round_trips() {
        let s = state();
        let bytes = s.to_bytes().unwrap();
        let back = MachineState::from_bytes(&bytes).unwrap();
        assert_eq!(back.vcpus[0].regs.rip, 0x10_0000);
        assert_eq!(back.vcpus[0].regs.rbx, 0x1111_1111_1111_1111);
        assert_eq!(back.vcpus[0].cpuid.as_slice().len(), 2);
        assert_eq!(back.vcpus[0].cpuid.as_slice()[0].eax, 0x806f8);
        assert_eq!(back.vcpus[0].lapic.regs[0x20], 7);
        assert_eq!(back.vcpus[0].msrs, s.vcpus[0].msrs);
        assert_eq!(back.vcpus[0].fpu, s.vcpus[0].fpu);
        assert_eq!(back.vcpus[0].tsc_khz, Some(2_400_000));
        assert_eq!(back.vm.clock.unwrap().clock, 42);
        assert_eq!(back.vm.ioapic.chip_id, 2);
        assert_eq!(back.devices, s.devices);
        // Re-encoding is stable.
        assert_eq!(back.to_bytes().unwrap(), bytes);
    }

    #[test]
    fn inconsistent_states_are_refused() {
        let mut s = state();
        s.vcpus[0].id = 1;
        assert!(matches!(
            MachineState::from_bytes(&s.to_bytes().unwrap()),
            Err(StateError::Invalid(_))
        ));
        let mut s = state();
        s.vcpus.clear();
        assert!(MachineState::from_bytes(&s.to_bytes().unwrap()).is_err());
        let mut s = state();
        s.memory.push(RegionState {
            guest_addr: 0x1000,
            size: 0x1000,
        });
        assert!(MachineState::from_bytes(&s.to_bytes().unwrap()).is_err());
        let mut s = state();
        s.arch = "aarch64".into();
        assert!(MachineState::from_bytes(&s.to_bytes().unwrap()).is_err());
    }
}
