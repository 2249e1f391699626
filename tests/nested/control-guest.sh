#!/bin/sh
# Runs inside the kvm_amd host of tests/nested/control: boots each kernel CONTROL_BOOTS
# times under QEMU/KVM with 2 vCPUs and reports how each boot ended.
mkdir -p /var/tmp
boots=${CONTROL_BOOTS:-4} lim=${CONTROL_LIMIT:-200}
for kernel in vmlinux vmlinuz; do
    b=0 ok=0 failed=0
    if [ "$kernel" = vmlinux ]; then
        root="-drive id=root,file=/work/l2.ext4,format=raw,if=none,snapshot=on -device virtio-blk-device,drive=root"
        init="root=/dev/vda rw init=/init"
    else
        root="-initrd /work/l2.cpio" init="rdinit=/init"
    fi
    while [ $b -lt "$boots" ]; do
        b=$((b + 1)) start=$(date +%s)
        # The monitor shares the serial line (mon:stdio); at the limit, C-a c switches to it
        # and the registers of every vCPU are printed before QEMU quits.
        rm -f /tmp/feed; mkfifo /tmp/feed
        (sleep "$lim"; printf '\001c'; sleep 1; printf 'info registers -a\n'; sleep 3; printf 'q\n'; sleep 2) >/tmp/feed &
        feeder=$!
        /work/qemu-system-x86_64 -M microvm,acpi=off -accel kvm -cpu host -smp 2 -m 256 \
            -nographic -no-reboot -nodefaults -serial mon:stdio -L /work/share \
            -kernel /work/$kernel $root \
            -append "console=ttyS0 reboot=k panic=-1 no_timer_check clocksource=kvm-clock $init control.execs=${CONTROL_EXECS:-1000}" \
            </tmp/feed >/tmp/console 2>&1 &
        qemu=$!
        # A reset does not always end QEMU (the guest kernel's reboot may find no way to
        # reset a microvm), so a finished boot is ended here.
        while kill -0 $qemu 2>/dev/null; do
            if grep -q CONTROL-DONE /tmp/console; then sleep 1; kill $qemu; break; fi
            sleep 1
        done
        wait $qemu 2>/dev/null
        pkill -P $feeder 2>/dev/null; kill $feeder 2>/dev/null
        took=$(($(date +%s) - start))
        if grep -q CONTROL-DONE /tmp/console; then
            ok=$((ok + 1))
            echo "$kernel boot $b: ok, $took s ($(grep -o 'CONTROL-DONE.*' /tmp/console))"
        else
            failed=$((failed + 1))
            cp /tmp/console "/out/$kernel-boot-$b.log"
            echo "$kernel boot $b: FAILED after $took s (log: $kernel-boot-$b.log)"
            grep -m1 -A30 'BUG:\|Oops\|PANIC\|Kernel panic\|double fault\|general protection\|stall' /tmp/console |
                sed 's/^/    | /'
            grep 'RIP=\|^CS =\|CR0=' /tmp/console | sed 's/^/    monitor| /'
        fi
    done
    echo "RESULT $kernel boots=$boots ok=$ok failed=$failed"
done
