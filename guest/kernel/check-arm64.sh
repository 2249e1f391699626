#!/usr/bin/env bash
# An independent boot check of the arm64 guest kernel, without smolvm's VMM: QEMU's `virt`
# machine under TCG (no KVM), GICv3, two Cortex-A72 CPUs started through PSCI (QEMU's
# firmware-less virt machine offers PSCI over the hvc conduit, as KVM does), its PL011 as
# the console, and the busybox root image as a virtio-blk disk on one of the virtio-mmio
# transports of QEMU's device tree, read-only. A small shell script as init prints proof
# lines (user space reached, both CPUs online, /dev/vda, the virtio RNG, the drivers from
# the device tree, what the kernel log says of PSCI, the GIC and the timer) and powers off
# (PSCI SYSTEM_OFF), which ends QEMU.
#
#   check-arm64.sh [IMAGE [ROOTFS]]
#
# Defaults: target/guest/aarch64/Image and target/guest/aarch64/busybox.ext4 (scripts/setup
# --aarch64). Exits 0 when every proof line came, 1 with QEMU's whole output when one did
# not (or QEMU ran past SMOLVM_CHECK_TIMEOUT seconds, default 180), 2 when an input or
# qemu-system-aarch64 is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
image=${1:-target/guest/aarch64/Image}
rootfs=${2:-target/guest/aarch64/busybox.ext4}
timeout_s=${SMOLVM_CHECK_TIMEOUT:-180}
for f in "$image" "$rootfs"; do
    [[ -f $f ]] || { echo "check-arm64: $f is missing (scripts/setup --aarch64 builds it)" >&2; exit 2; }
done
command -v qemu-system-aarch64 >/dev/null ||
    { echo "check-arm64: qemu-system-aarch64 is missing (apt-get install qemu-system-arm)" >&2; exit 2; }

# The guest's init: `/bin/sh -c SCRIPT`. The kernel hands everything after `--` to init,
# a double-quoted argument as one, so SCRIPT holds no double quotes. The kernel log
# repeats the command line, so the patterns grep looks for there do not match their own
# text ([P]SCI), and the proof lines are only counted at the start of a line.
script=$(
    cat <<'EOF'
mount -t proc proc /proc; mount -t sysfs sysfs /sys;
echo smolvm-check: user space $(uname -m) $(uname -r);
echo smolvm-check: cpus online $(cat /sys/devices/system/cpu/online);
test -b /dev/vda && echo smolvm-check: block /dev/vda $(cat /sys/block/vda/size) sectors;
test -c /dev/hwrng && echo smolvm-check: rng $(cat /sys/class/misc/hw_random/rng_current) $(head -c 32 /dev/hwrng | wc -c) bytes;
for d in platform/drivers/virtio-mmio platform/drivers/of_serial amba/drivers/uart-pl011; do
test -d /sys/bus/$d && echo smolvm-check: driver $d; done;
dmesg | grep -E -o '(psci: [P]SCIv[0-9.]+|GIC[v]3: [0-9]+ SPIs|arch_timer: [c]p15 timer.*|s[m]p: Brought up.*)' | sed 's/^/smolvm-check: kernel /';
poweroff -f
EOF
)
script=${script//$'\n'/ }
cmdline="console=ttyAMA0 earlycon root=/dev/vda ro panic=-1 init=/bin/sh -- -c \"$script\""

expect=(
    'smolvm-check: user space aarch64 '
    'smolvm-check: cpus online 0-1'
    'smolvm-check: block /dev/vda '
    'smolvm-check: rng virtio_rng.0 32 bytes'
    'smolvm-check: driver platform/drivers/virtio-mmio'
    'smolvm-check: driver platform/drivers/of_serial'
    'smolvm-check: driver amba/drivers/uart-pl011'
    'smolvm-check: kernel psci: PSCIv'
    'smolvm-check: kernel GICv3: '
    'smolvm-check: kernel arch_timer: cp15 timer'
    'smolvm-check: kernel smp: Brought up 1 node, 2 CPUs'
    'reboot: Power down'
)

out=$(mktemp)
trap 'rm -f "$out"' EXIT
started=$EPOCHREALTIME
set +e
timeout "$timeout_s" qemu-system-aarch64 -M virt,gic-version=3 -cpu cortex-a72 -smp 2 -m 512 \
    -nographic -no-reboot -kernel "$image" -append "$cmdline" \
    -drive "file=$rootfs,format=raw,if=none,id=root,readonly=on" -device virtio-blk-device,drive=root \
    -device virtio-rng-device </dev/null >"$out" 2>&1
rc=$?
set -e
took=$(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
missing=()
for line in "${expect[@]}"; do
    tr -d '\r' <"$out" | awk -v p="$line" 'index($0, p) == 1 { found = 1 } END { exit !found }' ||
        missing+=("$line")
done
if ((rc == 0 && ${#missing[@]} == 0)); then
    tr -d '\r' <"$out" | grep '^smolvm-check:'
    echo "check-arm64: ok: $image booted to user space and powered off in ${took} s (QEMU TCG)"
    exit 0
fi
cat "$out"
echo "check-arm64: FAILED after ${took} s (qemu exit $rc$( ((rc == 124)) && echo ", timed out after ${timeout_s} s"))" >&2
for line in "${missing[@]}"; do echo "check-arm64: missing: $line" >&2; done
exit 1
