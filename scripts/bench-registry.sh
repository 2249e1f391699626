#!/usr/bin/env bash
# Push and pull times and sizes through a local registry (docs/BENCHMARKS.md, "Registry").
#
#   scripts/bench-registry.sh FILE...
#
# Starts Debian's docker-registry on a free loopback port with its storage in a temp dir,
# then for each FILE: a first push (every layer uploaded), a second push of the same file
# (nothing uploaded), a pull to a fresh file and a pull into a fresh cache (timed with
# `date +%s%N`); checks the pulled file is byte-identical; prints one Markdown row per FILE.
# Each timing is the best of REPEAT runs (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
repeat=${REPEAT:-3}
smolpack=${SMOLPACK:-target/release/smolpack}
registry=${SMOLVM_REGISTRY:-/usr/bin/docker-registry}
[[ -x $smolpack ]] || cargo build --release -q -p smolpack
[[ -x $registry ]] || { echo "no $registry (apt-get install docker-registry)" >&2; exit 1; }

work=$(mktemp -d)
pid=
cleanup() { [[ -n $pid ]] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/config.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $work/storage
http:
  addr: 127.0.0.1:$port
EOF
"$registry" serve "$work/config.yml" >"$work/registry.log" 2>&1 &
pid=$!
for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$port/v2/" >/dev/null 2>&1 && break
    sleep 0.1
done

ms() { echo $(( ($2 - $1) / 1000000 )); }
best() { sort -n | head -1; }

echo "| file | size | layers | first push | second push (0 uploaded) | pull -o | pull --cache |"
echo "|---|---|---|---|---|---|---|"
n=0
for f in "$@"; do
    n=$((n + 1))
    size=$(stat -c %s "$f")
    first=(); second=(); pullo=(); pullc=()
    for r in $(seq "$repeat"); do
        ref="127.0.0.1:$port/bench$n-$r:1"
        t0=$(date +%s%N); out=$("$smolpack" push "$f" "$ref"); t1=$(date +%s%N)
        first+=("$(ms "$t0" "$t1")")
        layers=$(sed -E 's/.*: ([0-9]+) layers.*/\1/' <<<"$out")
        t0=$(date +%s%N); out2=$("$smolpack" push "$f" "$ref"); t1=$(date +%s%N)
        grep -q " 0 blobs uploaded" <<<"$out2" || { echo "second push uploaded: $out2" >&2; exit 1; }
        second+=("$(ms "$t0" "$t1")")
        rm -rf "$work/cache"
        t0=$(date +%s%N); SMOLVM_CACHE=$work/cache "$smolpack" pull "$ref" -o "$work/out" >/dev/null; t1=$(date +%s%N)
        pullo+=("$(ms "$t0" "$t1")")
        cmp "$f" "$work/out"
        rm -rf "$work/cache" "$work/out"
        t0=$(date +%s%N); SMOLVM_CACHE=$work/cache "$smolpack" pull "$ref" --cache >/dev/null; t1=$(date +%s%N)
        pullc+=("$(ms "$t0" "$t1")")
        rm -rf "$work/cache"
    done
    printf '| %s | %s B | %s | %s ms | %s ms | %s ms | %s ms |\n' "$(basename "$f")" "$size" "$layers" \
        "$(printf '%s\n' "${first[@]}" | best)" "$(printf '%s\n' "${second[@]}" | best)" \
        "$(printf '%s\n' "${pullo[@]}" | best)" "$(printf '%s\n' "${pullc[@]}" | best)"
done
echo
echo "registry storage: $(du -sb "$work/storage" | cut -f1) B"
