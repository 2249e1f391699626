//! Boot the test guest on real KVM: reports, exit status, unclaimed
//! port/MMIO accesses, pause and continue in process.

mod common;

use smolvm::machine::RunEvent;
use smolvm::testguest::{self, Params, FIXED_REGS};
use smolvm::vstate::vcpu::ExitReason;

#[test]
fn boots_reports_and_exits_with_guest_status() {
    if !common::kvm_ready("boots_reports_and_exits_with_guest_status") {
        return;
    }
    let params = Params {
        report_every: 500,
        limit: 3000,
        exit_status: 7,
    };
    let mut m = testguest::boot(&params).unwrap();
    let rx = testguest::attach_reporter(&mut m).unwrap();
    // The guest first writes to an unclaimed port and an unclaimed MMIO
    // address and checks both read back as all ones (else it exits with 4):
    // reaching the limit with status 7 shows they were logged and ignored.
    let reason = m.run_to_exit().unwrap();
    assert_eq!(reason, ExitReason::Exited(7));
    let reports: Vec<_> = rx.try_iter().collect();
    let counters: Vec<u64> = reports.iter().map(|r| r.counter).collect();
    assert_eq!(counters, vec![500, 1000, 1500, 2000, 2500, 3000]);
    for r in &reports {
        assert_eq!(r.checksum, r.memory_checksum);
        assert_eq!(r.checksum, testguest::expected_checksum(r.counter));
    }
    assert_eq!(m.memory().read_u64(testguest::COUNTER_ADDR).unwrap(), 3000);
}

#[test]
fn pauses_from_another_thread_and_continues() {
    if !common::kvm_ready("pauses_from_another_thread_and_continues") {
        return;
    }
    // A limit the guest never reaches on its own, however fast the host.
    let params = Params {
        report_every: 1000,
        limit: u64::MAX / 2,
        exit_status: 6,
    };
    let (mut m, reports, counter) = common::boot_and_pause(&params, 2);
    assert_eq!(reports.len(), 2);
    assert_eq!(counter, 2000);
    let regs = m.vcpu_regs(0).unwrap();
    assert_eq!(
        [regs.rbx, regs.rbp, regs.r12, regs.r13, regs.r14, regs.r15],
        FIXED_REGS
    );
    assert_eq!(regs.rsi, counter, "register shadow of the counter");
    // Paused: the counter must not move.
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(
        m.memory().read_u64(testguest::COUNTER_ADDR).unwrap(),
        counter
    );
    // Restart and pause again from another thread, several times.
    let mut last = counter;
    for _ in 0..5 {
        m.start().unwrap();
        let pauser = m.pause_handle();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            pauser.pause();
        });
        assert_eq!(m.wait().unwrap(), RunEvent::Paused);
        t.join().unwrap();
        let now = m.memory().read_u64(testguest::COUNTER_ADDR).unwrap();
        assert!(now >= last, "counter went back from {last} to {now}");
        // The pause can land between the guest's store of the counter and
        // its increment of the shadow register.
        let rsi = m.vcpu_regs(0).unwrap().rsi;
        assert!(rsi == now || rsi + 1 == now, "shadow {rsi}, counter {now}");
        last = now;
    }
    assert!(last > counter, "the guest made no progress while running");
    // Let it finish a little later.
    m.memory()
        .write(testguest::PARAMS_ADDR + 8, &(last + 1500).to_le_bytes())
        .unwrap();
    assert_eq!(m.run_to_exit().unwrap(), ExitReason::Exited(6));
    assert_eq!(
        m.memory().read_u64(testguest::COUNTER_ADDR).unwrap(),
        last + 1500
    );
}

/// An instruction KVM's emulator lacks stops a PVM guest with an internal
/// error; the VMM reports the RIP and the instruction bytes. (On hardware
/// KVM the same instruction simply runs, so there the test checks only that
/// the machine stops cleanly.)
#[test]
fn reports_emulation_failure_with_rip_and_bytes() {
    if !common::kvm_ready("reports_emulation_failure_with_rip_and_bytes") {
        return;
    }
    let params = Params {
        report_every: 1000,
        limit: 1000,
        exit_status: 0,
    };
    let mut m = testguest::boot(&params).unwrap();
    // fwait; then the exit port: out %al, $0xf4 with al = 0x2a.
    let code = [0x9b, 0xb0, 0x2a, 0xe6, 0xf4, 0xf4];
    m.memory().write(testguest::LOAD_ADDR, &code).unwrap();
    let reason = m.run_to_exit().unwrap();
    eprintln!(
        "fwait on {}: {reason:?}",
        smolvm::host::HostProfile::detect()
    );
    match (smolvm::host::HostProfile::detect(), reason) {
        (_, ExitReason::Exited(0x2a)) => {}
        (smolvm::host::HostProfile::KvmPvm, ExitReason::Error(msg)) => {
            assert!(msg.contains("RIP 0x100000"), "{msg}");
            assert!(msg.contains("instruction bytes: 9b b0 2a e6"), "{msg}");
        }
        (profile, other) => panic!("{profile}: unexpected {other:?}"),
    }
}

#[test]
fn interrupt_lines_and_reset_hook() {
    if !common::kvm_ready("interrupt_lines_and_reset_hook") {
        return;
    }
    let params = Params {
        report_every: 1000,
        limit: u64::MAX / 2,
        exit_status: 0,
    };
    let mut m = testguest::boot(&params).unwrap();
    // irqfd lines for the legacy and virtio GSIs register and fire (the test
    // guest runs with interrupts off, so they stay pending in the IRQ chip).
    for gsi in [4u32, 5, 6] {
        m.interrupt_line(gsi).unwrap().trigger();
    }
    // Devices stop the machine through the control (e.g. the i8042 reset).
    let control = m.control();
    m.start().unwrap();
    control.finish(ExitReason::Shutdown);
    assert_eq!(m.wait().unwrap(), RunEvent::Stopped(ExitReason::Shutdown));
}
