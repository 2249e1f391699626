#!/usr/bin/env bash
# Resume benchmarks. Usage:
#   scripts/bench-resume.sh [RUNS]            the VMM test guest (default 30 runs)
#   scripts/bench-resume.sh linux [RUNS]      a Linux machine (default 10 runs)
#
# Test guest: build smolvm (release), snapshot the test guest so that the
# resumed guest's first exit is its exit-port write, then time `smolvm run`
# against spawning /bin/true.
#
# Linux: boot target/guest/vmlinux (or SMOLVM_KERNEL) with
# target/guest/busybox.ext4 (or SMOLVM_ROOTFS) once, save it, then time
# `smolvm run MACHINE -- true` (VMM phases, spawn to exit), spawn to the
# first output of `-- echo x`, and one instance's host private memory.
# The boot takes minutes on a PVM host; the machine is kept in
# ${SMOLVM_BENCH_MACHINE:-$target/bench-linux.smolmachine} and reused.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
host="host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs, kernel $(uname -r), $( [ -d /sys/module/kvm_pvm ] && echo PVM || echo hardware KVM)"
if [ "${1:-}" = linux ]; then
	runs="${2:-10}"
	cargo build --release -p smolvm --bin smolvm --example linux --example bench_linux
	machine="${SMOLVM_BENCH_MACHINE:-$target/bench-linux.smolmachine}"
	if [ ! -f "$machine" ]; then
		kernel="${SMOLVM_KERNEL:-target/guest/vmlinux}"
		rootfs="${SMOLVM_ROOTFS:-target/guest/busybox.ext4}"
		echo "booting $kernel with $rootfs to build $machine (minutes under PVM)"
		"$target/release/examples/linux" "$kernel" "$rootfs" "$machine"
	fi
	echo "$host"
	"$target/release/examples/bench_linux" "$target/release/smolvm" "$machine" "$runs"
	exit 0
fi
runs="${1:-30}"
cargo build --release -p smolvm --bin smolvm --example testguest --example bench_spawn
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
machine="$work/bench.smolmachine"
"$target/release/examples/testguest" snapshot "$machine" --at 2 --exit-after 1 \
    --every 1000 --limit 100000 --status 0 >/dev/null
echo "machine: $(stat -c %s "$machine") bytes; $host"
"$target/release/examples/bench_spawn" "$runs" :: true /bin/true \
    :: smolvm-run "$target/release/smolvm" run "$machine"
