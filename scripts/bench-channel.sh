#!/usr/bin/env bash
# Agent channel throughput and exec latency. Usage:
#   scripts/bench-channel.sh SMOLVM MACHINE [MIB] [RUNS]
#
# MACHINE is a Linux machine with busybox (examples/hello built by `smolpack build`);
# SMOLVM the smolvm binary to run it with (so a build of another commit can be measured the
# same way). For each of RUNS runs (default 3) it times, from the SMOLVM_TIMINGS marks
# `exec-sent` to `command-exited` (the command's own time, without the resume):
#   in   MIB MiB of stdin into the guest:   smolvm run M -- wc -c < file
#   out  MIB MiB of stdout out of the guest: smolvm run M -- head -c N /dev/zero
#   cat  MIB MiB through cat both ways:      smolvm run M -- cat < file
#   true one small exec:                     smolvm run M -- true
# checks the byte counts, and prints the median of each with the host and its load average.
# The `exec-sent` mark comes before the resume's `Resume` round trip (the command is sent
# right behind it), so each transfer's MiB/s is computed from its median minus the median of
# `true` (the same round trip and one exec).
set -euo pipefail
smolvm=$1 machine=$2 mib=${3:-64} runs=${4:-3}
bytes=$((mib * 1048576))
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
head -c "$bytes" /dev/urandom > "$work/in"
host="host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs, kernel $(uname -r), $( [ -d /sys/module/kvm_pvm ] && echo PVM || echo hardware KVM)"

# ms between exec-sent and command-exited in a SMOLVM_TIMINGS stderr file
phase() { awk '$2=="exec-sent"{a=$3} $2=="command-exited"{b=$3} END{print b-a}' "$1"; }
median() { sort -n | awk '{v[NR]=$1} END{print v[int((NR+1)/2)]}'; }

declare -A ms
for kind in in out cat true; do ms[$kind]=""; done
for ((i = 1; i <= runs; i++)); do
    echo "run $i/$runs, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    got=$(SMOLVM_TIMINGS=1 "$smolvm" run "$machine" -- wc -c < "$work/in" 2> "$work/t")
    [ "$(echo "$got" | tr -d ' ')" = "$bytes" ] || { echo "in: got $got bytes" >&2; exit 1; }
    ms[in]+="$(phase "$work/t") "
    got=$(SMOLVM_TIMINGS=1 "$smolvm" run "$machine" -- head -c "$bytes" /dev/zero 2> "$work/t" | wc -c)
    [ "$got" = "$bytes" ] || { echo "out: got $got bytes" >&2; exit 1; }
    ms[out]+="$(phase "$work/t") "
    SMOLVM_TIMINGS=1 "$smolvm" run "$machine" -- cat < "$work/in" 2> "$work/t" > "$work/out"
    cmp -s "$work/in" "$work/out" || { echo "cat: output differs" >&2; exit 1; }
    ms[cat]+="$(phase "$work/t") "
    SMOLVM_TIMINGS=1 "$smolvm" run "$machine" -- true 2> "$work/t"
    ms[true]+="$(phase "$work/t") "
done
echo "$host"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg); $runs runs, $mib MiB"
t=$(echo ${ms[true]} | tr ' ' '\n' | median)
echo "true median ${t} ms from exec-sent to command-exited (the resume's agent round trip and one exec)   (ms: ${ms[true]})"
for kind in in out cat; do
    m=$(echo ${ms[$kind]} | tr ' ' '\n' | median)
    awk -v k="$kind" -v m="$m" -v t="$t" -v mib="$mib" -v all="${ms[$kind]}" \
        'BEGIN{printf "%-4s median %8.0f ms, %8.0f ms without true: %8.3f MiB/s   (ms: %s)\n", k, m, m-t, mib/((m-t)/1000), all}'
done
