#!/usr/bin/env bash
# Builds the static guest agent and installs it; prints the path.
#
#   build.sh [--arch x86_64|arm64]
#
# x86_64 (the default, or SMOLVM_AGENT_ARCH) is built with the project's toolchain and
# installed as target/guest/smol-agent. arm64 (aarch64) is cross-built like the aarch64 stub
# (scripts/build-aarch64): Debian's /usr/bin/cargo and /usr/bin/rustc, which carry the
# aarch64 standard library (libstd-rust-web-dev:arm64, `scripts/setup --aarch64`), linked
# by aarch64-linux-gnu-gcc (.cargo/config.toml), in target/aarch64-cross so that the two
# compilers never share artifacts; it is installed as target/guest/aarch64/smol-agent.
# With an explicit --target, RUSTFLAGS apply to the agent only, not to build scripts or
# proc-macros, so crt-static does not leak into host tools.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
arch="${SMOLVM_AGENT_ARCH:-x86_64}"
while (($#)); do
    case "$1" in
        --arch)
            (($# >= 2)) || { echo "build.sh: --arch needs a value (x86_64 or arm64)" >&2; exit 2; }
            arch=$2
            shift 2
            ;;
        --arch=*) arch=${1#--arch=}; shift ;;
        *) echo "build.sh: unknown argument $1 (usage: build.sh [--arch x86_64|arm64])" >&2; exit 2 ;;
    esac
done
cd "$root"
case "$arch" in
    x86_64)
        target=x86_64-unknown-linux-gnu
        target_dir="${CARGO_TARGET_DIR:-$root/target}"
        dest="$root/target/guest/smol-agent"
        RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
            cargo build --profile agent -p smolvm-agent --bin smol-agent --target "$target" >&2
        ;;
    arm64 | aarch64)
        target=aarch64-unknown-linux-gnu
        target_dir="$root/target/aarch64-cross"
        dest="$root/target/guest/aarch64/smol-agent"
        for tool in /usr/bin/rustc /usr/bin/cargo aarch64-linux-gnu-gcc; do
            command -v "$tool" >/dev/null || {
                echo "build.sh: $tool is missing: run scripts/setup --aarch64" >&2
                exit 125
            }
        done
        RUSTC=/usr/bin/rustc RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
            CARGO_TARGET_DIR="$target_dir" \
            /usr/bin/cargo build --profile agent -p smolvm-agent --bin smol-agent --target "$target" >&2
        ;;
    *) echo "build.sh: unknown architecture $arch (x86_64 or arm64)" >&2; exit 2 ;;
esac
bin="$target_dir/$target/agent/smol-agent"
if ! file "$bin" | grep -q 'statically linked\|static-pie linked'; then
    echo "build.sh: $bin is not statically linked: $(file -b "$bin")" >&2
    exit 1
fi
mkdir -p "$(dirname "$dest")"
# -C: an unchanged agent keeps its mtime, so build-busybox.sh finds its image up to date.
install -C -m 0755 "$bin" "$dest"
echo "$dest"
