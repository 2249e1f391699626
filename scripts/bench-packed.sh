#!/usr/bin/env bash
# Packed-executable benchmarks. Usage:
#   scripts/bench-packed.sh [RUNS]           the VMM test guest (default 30 runs)
#   scripts/bench-packed.sh hello [RUNS]     examples/hello as ./hello (default 5 runs)
#
# Both pack the machine with `smolpack pack` (the embedded static stub), then time, interleaved
# in one invocation: spawning /bin/true (the baseline), the packed executable, and `smolvm run`
# of the same machine, with the stub's phase marks (SMOLVM_TIMINGS=1). They also report the
# stub size, the packed sizes raw and `--compress`ed, and the first-run cost of the compressed
# file (expanding it into an empty cache) against its second run.
#
# hello: builds examples/hello once into ${SMOLVM_BENCH_HELLO:-$target/hello.smolmachine}
# (about a minute under PVM) and reuses it.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
host="host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs, kernel $(uname -r), $([ -d /sys/module/kvm_pvm ] && echo PVM || echo hardware KVM)"
mode=testguest
if [ "${1:-}" = hello ]; then
    mode=hello
    shift
fi
cargo build -q --release -p smolpack -p smolvm --bins --example testguest --example bench_spawn
smolpack="$target/release/smolpack"
smolvm="$target/release/smolvm"
bench="$target/release/examples/bench_spawn"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [ "$mode" = testguest ]; then
    runs="${1:-30}"
    machine="$work/testguest.smolmachine"
    "$target/release/examples/testguest" snapshot "$machine" --at 2 --exit-after 1 \
        --every 1000 --limit 100000 --status 0 >/dev/null
    cmd=()
    label=testapp
else
    runs="${1:-5}"
    machine="${SMOLVM_BENCH_HELLO:-$target/hello.smolmachine}"
    if [ ! -f "$machine" ]; then
        echo "building $machine from examples/hello (about a minute under PVM)"
        "$smolpack" build examples/hello/Smolfile -o "$machine"
    fi
    cmd=(true)
    label=hello
fi
packed="$work/$label"
"$smolpack" pack "$machine" -o "$packed" >/dev/null
"$smolpack" pack --compress "$machine" -o "$packed-z" >/dev/null

echo "$host"
"$smolpack" pack --list-targets
echo "machine: $(stat -c %s "$machine") bytes; packed: $(stat -c %s "$packed") bytes raw, $(stat -c %s "$packed-z") bytes --compress"

# First run of the compressed file expands it into an empty cache; the second maps the copy.
cache="$work/cache"
for run in first second; do
    t0=${EPOCHREALTIME/[.,]/}
    SMOLVM_CACHE="$cache" "$packed-z" "${cmd[@]}" >/dev/null
    t1=${EPOCHREALTIME/[.,]/}
    echo "compressed, $run run (SMOLVM_CACHE empty before the first): $(((t1 - t0) / 1000)) ms"
done

if [ "$mode" = hello ]; then
    "$bench" "$runs" :: true /bin/true :: hello "$packed" true :: smolvm-run "$smolvm" run "$machine" -- true \
        :: hello-echo "$packed" echo x
else
    "$bench" "$runs" :: true /bin/true :: testapp "$packed" :: smolvm-run "$smolvm" run "$machine"
fi
