#!/usr/bin/env bash
# Builds target/guest/busybox.ext4: the busybox base with the agent from
# target/guest/smol-agent (or $SMOLVM_AGENT) as /sbin/init. Rebuilds only when the
# agent or the builder changed.
set -euo pipefail
cd "$(dirname "$0")/../.."
agent=${SMOLVM_AGENT:-target/guest/smol-agent}
out=target/guest/busybox.ext4
if [[ ! -f $agent ]]; then
    echo "build-busybox.sh: no agent at $agent; build it first (guest/agent/build.sh)" >&2
    exit 1
fi
if [[ -f $out && $out -nt $agent && $out -nt guest/rootfs/src && $out -nt ${BASH_SOURCE[0]} ]] \
    && [[ -z $(find guest/rootfs/src -newer "$out" -print -quit) ]]; then
    echo "$out is up to date"
    exit 0
fi
cargo run -q --release -p smolvm-rootfs --bin smolvm-rootfs -- \
    --base busybox --agent "$agent" -o "$out"
