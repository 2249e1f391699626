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

#[cfg(target_os = "linux")]
use crate::arch::state::{VcpuState, VmState};
use serde::{Deserialize, Serialize};

/// Magic at the start of an encoded machine state.
pub const STATE_MAGIC: [u8; 8] = *b"SMOLVMST";
/// Version of the state layout this build writes and reads.
pub const STATE_VERSION: u32 = 5;
/// Largest encoded state accepted (vCPU state is about 10 KiB per vCPU): the
/// machine file's blob limit, so what one accepts the other does too.
pub const MAX_STATE_BYTES: usize = smolvm_formats::MAX_BLOB_LEN as usize;
/// Most vCPUs a machine state may hold.
pub const MAX_VCPUS: usize = 256;
const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 4;

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
    #[error("machine state version {found} is no longer supported (this smolvm reads {supported}); rebuild the machine with the current smolpack")]
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

pub use crate::devices::state::{DeviceState, VirtioDeviceState, VirtioSlotState};

/// What runs in the machine, which decides how `smolvm` drives it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Guest {
    /// The VMM test guest: runs to its exit port.
    #[default]
    TestGuest,
    /// A Linux kernel with the smolvm agent.
    Linux {
        /// The kernel command line it booted with.
        cmdline: String,
    },
}

/// Everything needed to resume a machine besides its memory.
#[cfg(target_os = "linux")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineState {
    /// `x86_64` or `aarch64`.
    pub arch: String,
    /// `kvm`.
    pub backend: String,
    /// What runs in the machine.
    pub guest: Guest,
    /// Guest memory regions (their bytes are the memory section).
    pub memory: Vec<RegionState>,
    /// Whether the machine has a PIT (x86_64; always false on aarch64).
    pub pit: bool,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    /// Every attached device, in attach order (see [`crate::device_manager`]).
    pub devices: Vec<DeviceState>,
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

#[cfg(target_os = "linux")]
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
        let host = std::env::consts::ARCH;
        if self.arch != host {
            return bad(format!("architecture '{}' is not {host}", self.arch));
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
        #[cfg(target_arch = "x86_64")]
        for (i, v) in self.vcpus.iter().enumerate() {
            if v.id as usize != i {
                return bad(format!("vCPU {i} is saved with id {}", v.id));
            }
        }
        #[cfg(target_arch = "aarch64")]
        if self.vm.gic.vcpus.len() != self.vcpus.len() {
            return bad(format!(
                "{} vCPUs but GIC state for {}",
                self.vcpus.len(),
                self.vm.gic.vcpus.len()
            ));
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
    use crate::arch::x86_64::state::FpuState;
    use crate::devices::legacy::serial::SerialDeviceState;
    use crate::devices::virtio::block::{BlockConfig, BlockState, DiskState};
    use crate::devices::virtio::console::{ConsoleState, ControlMsg, PortState};
    use crate::devices::virtio::fs::FsState;
    use crate::devices::virtio::mmio::{MmioDeviceState, MmioState};
    use crate::devices::virtio::rng::RngState;
    use crate::devices::virtio::{QueueSnapshot, VirtioCommonState};
    use kvm_bindings::{kvm_cpuid_entry2, kvm_regs, CpuId};

    /// The checked-in encoding of [`state`]; see `golden_bytes_are_stable`.
    const GOLDEN: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/machine_state_v5.bin"
    );

    fn common(seed: u64) -> VirtioCommonState {
        VirtioCommonState {
            acked_features: crate::devices::virtio::COMMON_FEATURES,
            queues: vec![QueueSnapshot {
                max_size: 256,
                size: 128,
                ready: true,
                desc_table: 0x10_0000 + seed * 0x1000,
                avail_ring: 0x10_0800 + seed * 0x1000,
                used_ring: 0x10_0c00 + seed * 0x1000,
                next_avail: 7 + seed as u16,
                next_used: 5 + seed as u16,
                event_idx: true,
            }],
            activated: true,
            broken: false,
            interrupt_status: 1,
        }
    }

    fn transport(seed: u32) -> MmioState {
        MmioState {
            status: 0xf,
            device_features_sel: 1,
            driver_features_sel: seed,
            queue_sel: seed,
            config_generation: 0,
        }
    }

    /// A fixed machine state with every field and every device kind filled.
    fn state() -> MachineState {
        let cpuid = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                eax: 0x806f8,
                ebx: 0x0010_0800,
                ecx: 0xfed8_3203,
                edx: 0x178b_fbff,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                flags: 1,
                eax: 1,
                ..Default::default()
            },
        ])
        .unwrap();
        let mut lapic = kvm_bindings::kvm_lapic_state::default();
        lapic.regs[0x20] = 7;
        lapic.regs[0xf0] = 0x3f;
        let mut sregs = kvm_bindings::kvm_sregs {
            cr0: 0x8005_0033,
            cr3: 0x9000,
            cr4: 0x20,
            efer: 0x500,
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        sregs.cs = kvm_bindings::kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x10,
            type_: 11,
            present: 1,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        sregs.gdt.base = 0x500;
        sregs.gdt.limit = 0x1f;
        let mut xcrs = kvm_bindings::kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].value = 7;
        let debug_regs = kvm_bindings::kvm_debugregs {
            dr6: 0xffff_0ff0,
            dr7: 0x400,
            ..Default::default()
        };
        let mut events = kvm_bindings::kvm_vcpu_events::default();
        events.interrupt.injected = 1;
        events.interrupt.nr = 0x30;
        events.flags = 1;
        let vcpu = VcpuState {
            id: 0,
            cpuid,
            mp_state: kvm_bindings::kvm_mp_state { mp_state: 0 },
            regs: kvm_regs {
                rip: 0x10_0000,
                rsp: 0x18_0000,
                rbx: 0x1111_1111_1111_1111,
                rflags: 0x202,
                ..Default::default()
            },
            sregs,
            fpu: FpuState::Xsave((0..1024u32).collect()),
            xcrs: Some(xcrs),
            debug_regs: Some(debug_regs),
            lapic,
            msrs: vec![(0x10, 12345), (0x6e0, 99), (0xc000_0080, 0x500)],
            vcpu_events: Some(events),
            tsc_khz: Some(2_400_000),
        };
        let mut pit = kvm_bindings::kvm_pit_state2::default();
        pit.channels[0].count = 0x2e9c;
        pit.channels[0].mode = 2;
        pit.flags = 1;
        let devices = vec![
            DeviceState::ExitPort { port: 0xf4 },
            DeviceState::Serial {
                base: 0x3f8,
                irq: 4,
                state: SerialDeviceState {
                    baud_divisor_low: 1,
                    interrupt_enable: 1,
                    interrupt_identification: 0xc1,
                    line_control: 3,
                    line_status: 0x60,
                    modem_control: 8,
                    modem_status: 0xb0,
                    scratch: 0x5a,
                    in_buffer: b"in".to_vec(),
                    ..Default::default()
                },
            },
            DeviceState::I8042,
            DeviceState::VirtioMmio(VirtioSlotState {
                base: 0xd000_0000,
                irq: 5,
                device: VirtioDeviceState::Block(MmioDeviceState {
                    transport: transport(0),
                    device: BlockState {
                        common: common(0),
                        config: BlockConfig {
                            read_only: false,
                            id: "root".into(),
                        },
                        disk: DiskState {
                            capacity_sectors: 2048,
                            block_size: 4096,
                        },
                    },
                }),
            }),
            DeviceState::VirtioMmio(VirtioSlotState {
                base: 0xd000_1000,
                irq: 6,
                device: VirtioDeviceState::Console(MmioDeviceState {
                    transport: transport(1),
                    device: ConsoleState {
                        common: VirtioCommonState {
                            queues: vec![
                                common(1).queues[0],
                                common(2).queues[0],
                                common(3).queues[0],
                                common(4).queues[0],
                            ],
                            ..common(1)
                        },
                        pending_rx: b"pending input".to_vec(),
                        rx_capacity: 1 << 20,
                        port: PortState {
                            name: "org.smolvm.agent".into(),
                            device_ready: true,
                            port_ready: true,
                            guest_open: true,
                            pending_control: vec![ControlMsg {
                                id: 0,
                                event: 6,
                                value: 1,
                                name: Vec::new(),
                            }],
                        },
                    },
                }),
            }),
            DeviceState::VirtioMmio(VirtioSlotState {
                base: 0xd000_2000,
                irq: 7,
                device: VirtioDeviceState::Rng(MmioDeviceState {
                    transport: transport(0),
                    device: RngState { common: common(3) },
                }),
            }),
            DeviceState::VirtioMmio(VirtioSlotState {
                base: 0xd000_5000,
                irq: 11,
                device: VirtioDeviceState::Fs(MmioDeviceState {
                    transport: transport(2),
                    device: FsState {
                        common: VirtioCommonState {
                            queues: vec![common(4).queues[0], common(5).queues[0]],
                            ..common(4)
                        },
                    },
                }),
            }),
        ];
        MachineState {
            arch: "x86_64".into(),
            backend: "kvm".into(),
            guest: Guest::Linux {
                cmdline: "console=ttyS0 reboot=k panic=-1".into(),
            },
            memory: vec![
                RegionState {
                    guest_addr: 0,
                    size: 4 << 20,
                },
                RegionState {
                    guest_addr: 1 << 32,
                    size: 1 << 20,
                },
            ],
            pit: true,
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
                pit: Some(pit),
                clock: Some(kvm_bindings::kvm_clock_data {
                    clock: 42,
                    flags: 2,
                    ..Default::default()
                }),
            },
            vcpus: vec![vcpu],
            devices,
        }
    }

    /// The encoding of one field, for field-by-field comparison of types
    /// without `PartialEq` (KVM's structures).
    fn enc<T: Serialize>(v: &T) -> Vec<u8> {
        postcard::to_stdvec(v).unwrap()
    }

    /// The encoding of [`state`] is the checked-in file, byte for byte, and
    /// the file decodes to [`state`], field by field: a change of postcard,
    /// kvm-bindings or a state struct that alters the format fails here.
    /// After a deliberate format change (with a `STATE_VERSION` bump and a
    /// new file name), regenerate with
    /// `SMOLVM_REGEN_GOLDEN=1 cargo test -p smolvm --lib golden_bytes`.
    #[test]
    fn golden_bytes_are_stable() {
        let s = state();
        let bytes = s.to_bytes().unwrap();
        if std::env::var_os("SMOLVM_REGEN_GOLDEN").is_some() {
            std::fs::write(GOLDEN, &bytes).unwrap();
            eprintln!("wrote {GOLDEN}");
        }
        let golden = std::fs::read(GOLDEN).expect("golden state file (see the test's doc)");
        assert_eq!(
            u32::from_le_bytes([golden[8], golden[9], golden[10], golden[11]]),
            STATE_VERSION,
            "the golden file is for another state version"
        );
        assert!(bytes == golden, "MachineState encoding changed");

        let g = MachineState::from_bytes(&golden).unwrap();
        assert_eq!(g.arch, s.arch);
        assert_eq!(g.backend, s.backend);
        assert_eq!(g.guest, s.guest);
        assert_eq!(g.memory, s.memory);
        assert_eq!(g.pit, s.pit);
        assert_eq!(enc(&g.vm.pic_master), enc(&s.vm.pic_master));
        assert_eq!(enc(&g.vm.pic_slave), enc(&s.vm.pic_slave));
        assert_eq!(enc(&g.vm.ioapic), enc(&s.vm.ioapic));
        assert_eq!(g.vm.pit.unwrap().channels[0].count, 0x2e9c);
        assert_eq!(enc(&g.vm.pit), enc(&s.vm.pit));
        assert_eq!(g.vm.clock.unwrap().clock, 42);
        assert_eq!(enc(&g.vm.clock), enc(&s.vm.clock));
        assert_eq!(g.vcpus.len(), 1);
        let (gv, sv) = (&g.vcpus[0], &s.vcpus[0]);
        assert_eq!(gv.id, sv.id);
        assert_eq!(gv.cpuid.as_slice(), sv.cpuid.as_slice());
        assert_eq!(enc(&gv.mp_state), enc(&sv.mp_state));
        assert_eq!(gv.regs, sv.regs);
        assert_eq!(gv.sregs.cs.selector, 0x10);
        assert_eq!(enc(&gv.sregs), enc(&sv.sregs));
        assert_eq!(gv.fpu, sv.fpu);
        assert_eq!(gv.xcrs.unwrap().xcrs[0].value, 7);
        assert_eq!(enc(&gv.xcrs), enc(&sv.xcrs));
        assert_eq!(enc(&gv.debug_regs), enc(&sv.debug_regs));
        assert_eq!(gv.lapic.regs[0xf0], 0x3f);
        assert_eq!(enc(&gv.lapic), enc(&sv.lapic));
        assert_eq!(gv.msrs, sv.msrs);
        assert_eq!(gv.vcpu_events.unwrap().interrupt.nr, 0x30);
        assert_eq!(enc(&gv.vcpu_events), enc(&sv.vcpu_events));
        assert_eq!(gv.tsc_khz, sv.tsc_khz);
        assert_eq!(g.devices, s.devices);
    }

    #[test]
    fn older_state_versions_are_refused_with_a_rebuild_hint() {
        let mut b = state().to_bytes().unwrap();
        b[8..12].copy_from_slice(&(STATE_VERSION - 1).to_le_bytes());
        let e = MachineState::from_bytes(&b).unwrap_err();
        assert_eq!(
            e,
            StateError::OldVersion {
                found: STATE_VERSION - 1,
                supported: STATE_VERSION
            }
        );
        assert!(e
            .to_string()
            .contains("rebuild the machine with the current smolpack"));
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
        assert_eq!(back.guest, s.guest);
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
