use smolvm_formats::*;

#[test]
fn sample_file_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.smolmachine");
    let mut mem = vec![0u8; 1 << 20];
    mem[4096..8192].fill(7);
    mem[(1 << 20) - 10] = 1;
    for codec in [Compression::None, Compression::Zstd] {
        let mut w = MachineWriter::create(&p, Arch::X86_64).unwrap();
        w.add_manifest(&Manifest {
            name: "x".into(),
            vcpus: 1,
            memory_bytes: 1 << 20,
            ..Default::default()
        })
        .unwrap();
        w.add_blob(SectionKind::VmState, b"state", codec).unwrap();
        w.add_memory(
            &[GuestRegion {
                guest_addr: 0x1000_0000,
                data: &mem,
            }],
            codec,
        )
        .unwrap();
        w.finish().unwrap();
        let r = MachineReader::open(&p).unwrap();
        assert_eq!(r.manifest().unwrap().name, "x");
        assert_eq!(r.read_blob(SectionKind::VmState).unwrap(), b"state");
        let l = r.memory_layout().unwrap();
        assert_eq!(l.mappable, codec == Compression::None);
        assert_eq!(l.data_bytes(), 8192);
        let mut out = vec![0xffu8; 1 << 20];
        r.read_memory_region(0, &mut out).unwrap();
        assert_eq!(out, mem);
        r.verify().unwrap();
    }
}
