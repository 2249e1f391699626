#!/usr/bin/env bash
# Builds the busybox root image with the agent as /sbin/init; rebuilds only when the agent
# or the builder changed.
#
#   build-busybox.sh [--arch x86_64|arm64]
#
# x86_64 (the default, or SMOLVM_ROOTFS_ARCH): target/guest/busybox.ext4 from Debian's
# busybox-static and target/guest/smol-agent (or $SMOLVM_AGENT).
# arm64: target/guest/aarch64/busybox.ext4 from busybox-static:arm64 (downloaded and cached
# in ~/.cache/smolvm/rootfs/busybox-static-arm64) and target/guest/aarch64/smol-agent (or
# $SMOLVM_AGENT). The builder runs on the host either way; it follows the agent's
# architecture (guest/rootfs/src/busybox.rs explains how the arm64 applet list is found).
set -euo pipefail
cd "$(dirname "$0")/../.."
arch=${SMOLVM_ROOTFS_ARCH:-x86_64}
while (($#)); do
    case "$1" in
        --arch)
            (($# >= 2)) || { echo "build-busybox.sh: --arch needs a value (x86_64 or arm64)" >&2; exit 2; }
            arch=$2
            shift 2
            ;;
        --arch=*) arch=${1#--arch=}; shift ;;
        *) echo "build-busybox.sh: unknown argument $1 (usage: build-busybox.sh [--arch x86_64|arm64])" >&2; exit 2 ;;
    esac
done
case "$arch" in
    x86_64) dir=target/guest ;;
    arm64 | aarch64) dir=target/guest/aarch64 ;;
    *) echo "build-busybox.sh: unknown architecture $arch (x86_64 or arm64)" >&2; exit 2 ;;
esac
agent=${SMOLVM_AGENT:-$dir/smol-agent}
out=$dir/busybox.ext4
if [[ ! -f $agent ]]; then
    echo "build-busybox.sh: no agent at $agent; build it first (guest/agent/build.sh --arch $arch)" >&2
    exit 1
fi
if [[ -f $out && $out -nt $agent && $out -nt guest/rootfs/src && $out -nt ${BASH_SOURCE[0]} ]] \
    && [[ -z $(find guest/rootfs/src -newer "$out" -print -quit) ]]; then
    echo "$out is up to date"
    exit 0
fi
cargo run -q --release -p smolvm-rootfs --bin smolvm-rootfs -- \
    --base busybox --agent "$agent" -o "$out"
