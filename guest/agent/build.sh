#!/usr/bin/env bash
# Builds the static guest agent and installs it as target/guest/smol-agent; prints the path.
# With an explicit --target, RUSTFLAGS apply to the agent only, not to build scripts or
# proc-macros, so crt-static does not leak into host tools.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
target=x86_64-unknown-linux-gnu
target_dir="${CARGO_TARGET_DIR:-$root/target}"
cd "$root"
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --profile agent -p smolvm-agent --bin smol-agent --target "$target" >&2
bin="$target_dir/$target/agent/smol-agent"
if ! file "$bin" | grep -q 'statically linked\|static-pie linked'; then
    echo "build.sh: $bin is not statically linked: $(file -b "$bin")" >&2
    exit 1
fi
mkdir -p "$root/target/guest"
install -m 0755 "$bin" "$root/target/guest/smol-agent"
echo "$root/target/guest/smol-agent"
