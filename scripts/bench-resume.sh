#!/usr/bin/env bash
# Resume benchmark: build smolvm (release), snapshot the test guest so that
# the resumed guest's first exit is its exit-port write, then time
# `smolvm run` against spawning /bin/true. Usage: scripts/bench-resume.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-30}"
target="${CARGO_TARGET_DIR:-target}"
cargo build --release -p smolvm --bin smolvm --example testguest --example bench_resume
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
machine="$work/bench.smolmachine"
"$target/release/examples/testguest" snapshot "$machine" --at 2 --exit-after 1 \
    --every 1000 --limit 100000 --status 0 >/dev/null
echo "machine: $(stat -c %s "$machine") bytes; host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r), $( [ -d /sys/module/kvm_pvm ] && echo PVM || echo hardware KVM)"
"$target/release/examples/bench_resume" "$target/release/smolvm" "$machine" "$runs"
