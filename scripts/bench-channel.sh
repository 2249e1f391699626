#!/bin/sh
# Agent channel throughput and exec latency, beside the guest's own pipe as the ceiling. Usage:
#   scripts/bench-channel.sh SMOLVM MACHINE [MIB] [RUNS]
#
# MACHINE is a Linux machine with busybox (examples/hello built by `smolpack build`);
# SMOLVM the smolvm binary to run it with (so a build of another commit can be measured the
# same way). POSIX sh and busybox tools only, so the same script runs on the development host
# and inside the nested hardware-KVM host (tests/nested/run chan). For each of RUNS runs
# (default 3) it times, from the SMOLVM_TIMINGS marks `exec-sent` to `command-exited` (the
# command's own time, without the resume):
#   in   MIB MiB of stdin into the guest:   smolvm run M -- wc -c < file
#   out  MIB MiB of stdout out of the guest: smolvm run M -- head -c N /dev/zero
#   cat  MIB MiB through cat both ways:      smolvm run M -- cat < file
#   pipe MIB MiB through a pipe in the guest: smolvm run M -- sh -c 'head -c N /dev/zero | wc -c'
#   true one small exec:                     smolvm run M -- true
# checks the byte counts, and prints the median of each with the host and its load average.
# `pipe` is the baseline: the same bytes moved by the guest alone, from one process to
# another, which is what every channel transfer ends in (the agent writes the command's stdin
# pipe, or reads its stdout pipe), so no channel can be faster than it on that guest kernel.
# The `exec-sent` mark comes before the resume's `Resume` round trip (the command is sent
# right behind it), so each transfer's MiB/s is computed from its median minus the median of
# `true` (the same round trip and one exec).
set -eu
smolvm=$1 machine=$2 mib=${3:-64} runs=${4:-3}
bytes=$((mib * 1048576))
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
head -c "$bytes" /dev/urandom > "$work/in"
if [ -d /sys/module/kvm_pvm ]; then kvm=PVM
elif [ -d /sys/module/kvm_amd ]; then kvm="hardware KVM (kvm_amd)"
elif [ -d /sys/module/kvm_intel ]; then kvm="hardware KVM (kvm_intel)"
else kvm="KVM of unknown kind"; fi
host="host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(grep -c ^processor /proc/cpuinfo) CPUs, kernel $(uname -r), $kvm"

# ms between exec-sent and command-exited in a SMOLVM_TIMINGS stderr file
phase() { awk '$2=="exec-sent"{a=$3} $2=="command-exited"{b=$3} END{print b-a}' "$1"; }
median() { tr ' ' '\n' | grep . | sort -n | awk '{v[NR]=$1} END{print v[int((NR+1)/2)]}'; }
check() { [ "$(echo "$2" | tr -d ' ')" = "$bytes" ] || { echo "$1: got $2 bytes, not $bytes" >&2; exit 1; }; }

ms_in="" ms_out="" ms_cat="" ms_pipe="" ms_true=""
i=1
while [ "$i" -le "$runs" ]; do
    echo "run $i/$runs, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    got=$(SMOLVM_TIMINGS=1 "$smolvm" run "$machine" -- wc -c < "$work/in" 2> "$work/t")
    check in "$got"
    ms_in="$ms_in $(phase "$work/t")"
    got=$(SMOLVM_TIMINGS=1 "$smolvm" run "$machine" -- head -c "$bytes" /dev/zero 2> "$work/t" | wc -c)
    check out "$got"
    ms_out="$ms_out $(phase "$work/t")"
    SMOLVM_TIMINGS=1 "$smolvm" run "$machine" -- cat < "$work/in" 2> "$work/t" > "$work/out"
    cmp -s "$work/in" "$work/out" || { echo "cat: output differs" >&2; exit 1; }
    ms_cat="$ms_cat $(phase "$work/t")"
    got=$(SMOLVM_TIMINGS=1 "$smolvm" run "$machine" -- sh -c "head -c $bytes /dev/zero | wc -c" 2> "$work/t")
    check pipe "$got"
    ms_pipe="$ms_pipe $(phase "$work/t")"
    SMOLVM_TIMINGS=1 "$smolvm" run "$machine" -- true 2> "$work/t"
    ms_true="$ms_true $(phase "$work/t")"
    i=$((i + 1))
done
echo "$host"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg); $runs runs, $mib MiB"
t=$(echo "$ms_true" | median)
echo "true median ${t} ms from exec-sent to command-exited (the resume's agent round trip and one exec)   (ms:$ms_true)"
p=$(echo "$ms_pipe" | median)
for kind in in out cat pipe; do
    eval "all=\$ms_$kind"
    m=$(echo "$all" | median)
    awk -v k="$kind" -v m="$m" -v t="$t" -v p="$p" -v mib="$mib" -v all="$all" \
        'BEGIN{printf "%-4s median %8.0f ms, %8.0f ms without true: %8.3f MiB/s, %5.2f x pipe   (ms:%s)\n",
               k, m, m-t, mib/((m-t)/1000), (p-t)/(m-t), all}'
done
