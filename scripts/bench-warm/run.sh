#!/usr/bin/env bash
# Builds scripts/bench-warm/Smolfile warm and cold (warm = false) and times `smolvm run`
# of each with the same stdin, interleaved, RUNS times (default 5); prints every time and
# the medians. Needs /dev/kvm and scripts/setup.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-5}
out=${BENCH_DIR:-target/bench-warm}
mkdir -p "$out"
cargo build -q --release -p smolpack -p smolvm --bins
here=scripts/bench-warm
sed 's/^warm = true/warm = false/; /^warm_timeout/d' $here/Smolfile > $here/Smolfile.cold
trap 'rm -f $here/Smolfile.cold' EXIT
for kind in warm cold; do
    sf=$here/Smolfile; [[ $kind == cold ]] && sf=$here/Smolfile.cold
    [[ -f $out/$kind.smolmachine ]] || target/release/smolpack build "$sf" -o "$out/$kind.smolmachine" \
        --kernel target/guest/vmlinux --agent target/guest/smol-agent >/dev/null
done
input=$(printf 'line %s\n' $(seq 1 20))
declare -A times
for i in $(seq 1 "$runs"); do
    for kind in warm cold; do
        start=$(date +%s.%N)
        got=$(printf '%s\n' "$input" | target/release/smolvm run "$out/$kind.smolmachine" 2>/dev/null) || true
        end=$(date +%s.%N)
        [[ $(printf '%s\n' "$got" | tail -1) == "20: line 20" ]] || { echo "bad output from $kind" >&2; exit 1; }
        t=$(echo "$end - $start" | bc)
        times[$kind]+="$t "
        echo "$kind run $i: $t s"
    done
done
for kind in warm cold; do
    echo "$kind median: $(printf '%s\n' ${times[$kind]} | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}') s"
done
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
