#!/usr/bin/env bash
# Runs the agent's unit tests on arm64: cross-builds them static for aarch64 (Debian's rustc,
# target/aarch64-cross, like build.sh --arch arm64), copies the test executable into the
# arm64 busybox root (smolvm-rootfs --copy) and runs it as the init script's command in the
# arm64 guest kernel under QEMU TCG (the machine guest/kernel/check-arm64.sh uses). This is
# where the architecture-specific code (the system-call numbers of the warm stdin
# detection) is exercised on aarch64; the x86_64 host cannot run the tests itself.
#
# Needs scripts/setup --aarch64 (the kernel Image and the agent). Exits 0 when the tests
# passed, 1 with the guest's output otherwise, 2 when something is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
image=target/guest/aarch64/Image
agent=target/guest/aarch64/smol-agent
for f in "$image" "$agent"; do
    [[ -f $f ]] || { echo "test-aarch64: $f is missing (scripts/setup --aarch64)" >&2; exit 2; }
done
for tool in /usr/bin/cargo qemu-system-aarch64; do
    command -v "$tool" >/dev/null || { echo "test-aarch64: $tool is missing (scripts/setup --aarch64)" >&2; exit 2; }
done
tests=$(RUSTC=/usr/bin/rustc RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=target/aarch64-cross \
    /usr/bin/cargo test --release --target aarch64-unknown-linux-gnu -p smolvm-agent --lib --no-run \
    --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1)
[[ -n $tests && -f $tests ]] || { echo "test-aarch64: building the aarch64 unit tests failed" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo run -q --release -p smolvm-rootfs --bin smolvm-rootfs -- --base busybox --agent "$agent" \
    --copy "$tests:/agent-tests" -o "$work/root.ext4" >/dev/null
script='mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t tmpfs tmpfs /tmp; cd /tmp; /agent-tests --test-threads 1; echo agent-tests-exit=$?; poweroff -f'
set +e
timeout "${SMOLVM_CHECK_TIMEOUT:-300}" qemu-system-aarch64 -M virt,gic-version=3 -cpu cortex-a72 -smp 2 -m 512 \
    -nographic -no-reboot -kernel "$image" \
    -append "console=ttyAMA0 root=/dev/vda rw panic=-1 quiet init=/bin/sh -- -c \"$script\"" \
    -drive "file=$work/root.ext4,format=raw,if=none,id=root" -device virtio-blk-device,drive=root \
    </dev/null >"$work/out" 2>&1
rc=$?
set -e
tr -d '\r' <"$work/out" >"$work/log"
if ((rc == 0)) && grep -qx 'agent-tests-exit=0' "$work/log"; then
    grep -E '^test result:' "$work/log"
    echo "test-aarch64: ok: the agent's unit tests passed on aarch64 (QEMU TCG)"
    exit 0
fi
cat "$work/log"
echo "test-aarch64: FAILED (qemu exit $rc)" >&2
exit 1
