#!/bin/sh
# Published-port throughput and request rate, beside the same server reached from inside the
# guest as the baseline. Usage:
#   scripts/bench-forward.sh SMOLVM MACHINE [KIB] [REQS] [RUNS]
#
# MACHINE is examples/hello built by `smolpack build` (busybox httpd on guest port 8080,
# serving /var/www); SMOLVM the smolvm binary to run it with. One run of
#   smolvm run -p 127.0.0.1:PORT:8080 MACHINE -- sh -c GUEST
# (PORT: $BENCH_PORT, or one derived from this shell's pid) where GUEST writes a KIB KiB
# file (default 1024) of random bytes into /var/www and then, inside the guest, times with
# /proc/uptime (busybox date has no %N):
#   small  REQS (default 20) sequential GETs of index.html (179 B) with busybox wget
#   big    RUNS (default 3) GETs of the KIB KiB file
#   start  REQS runs of wget against a closed port (the cost of starting wget there, which
#          the host's requests do not pay inside the guest)
# prints them and `ready`; this script then does the same GETs from the host through the
# published port with curl (or wget), timed with the host's /proc/uptime (10 ms steps), and
# closes the command's stdin to end the run. Byte counts are checked on both sides. Printed:
# the medians, requests/s and MiB/s from them, the ratio forward / in-guest, and where the
# smolvm process's CPU time went during the host's requests (the vCPU thread, which runs
# the guest, against every other thread of the VMM: the forwarding, the agent channel).
set -eu
smolvm=$1 machine=$2 kib=${3:-1024} reqs=${4:-20} runs=${5:-3}
port=${BENCH_PORT:-$((20000 + $$ % 20000))}
work=$(mktemp -d)
pid=""
cleanup() {
    exec 3>&- 2>/dev/null || true
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
if [ -d /sys/module/kvm_pvm ]; then kvm=PVM
elif [ -d /sys/module/kvm_amd ]; then kvm="hardware KVM (kvm_amd)"
elif [ -d /sys/module/kvm_intel ]; then kvm="hardware KVM (kvm_intel)"
else kvm="KVM of unknown kind"; fi
host="host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(grep -c ^processor /proc/cpuinfo) CPUs, kernel $(uname -r), $kvm"

# The guest side. `ms` sets $t to the uptime in ms without a fork (ash's read builtin);
# the uptime has two decimals, so "SEC.CC" without its dot is centiseconds.
guest='kib=$1 reqs=$2 runs=$3
ms() { read up _ < /proc/uptime; t=$(( ${up%.*}${up#*.} * 10 )); }
dd if=/dev/urandom of=/var/www/big bs=1024 count=$kib 2>/dev/null
u=http://127.0.0.1:8080
wget -q -O /tmp/check $u/big && echo "bytes $(wc -c < /tmp/check) $(wc -c < /var/www/big)"
rm -f /tmp/check
i=0; while [ $i -lt $reqs ]; do
    ms; a=$t; wget -q -O /dev/null $u/index.html; ms; echo "small $((t - a))"; i=$((i + 1))
done
i=0; while [ $i -lt $runs ]; do
    ms; a=$t; wget -q -O /dev/null $u/big; ms; echo "big $((t - a))"; i=$((i + 1))
done
i=0; while [ $i -lt $reqs ]; do
    ms; a=$t; wget -q -O /dev/null http://127.0.0.1:1/ 2>/dev/null; ms; echo "start $((t - a))"; i=$((i + 1))
done
echo ready
exec cat > /dev/null'

mkfifo "$work/stdin"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
"$smolvm" run -p "127.0.0.1:$port:8080" "$machine" -- sh -c "$guest" sh "$kib" "$reqs" "$runs" \
    < "$work/stdin" > "$work/guest" &
pid=$!
exec 3> "$work/stdin"
until grep -q '^ready' "$work/guest"; do
    kill -0 "$pid" 2>/dev/null || { echo "smolvm ended early:" >&2; cat "$work/guest" >&2; exit 1; }
    sleep 1
done
echo "guest side done, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
set -- $(grep '^bytes' "$work/guest")
[ "$2" = "$((kib * 1024))" ] && [ "$3" = "$2" ] || { echo "in-guest GET: $2 bytes of $3" >&2; exit 1; }

ms() { read up _ < /proc/uptime; t=$(( ${up%.*}${up#*.} * 10 )); }
if command -v curl > /dev/null; then
    get() { curl -s -o "$2" -w '%{http_code}' "http://127.0.0.1:$port/$1" > "$work/code"; }
else
    get() { wget -q -O "$2" "http://127.0.0.1:$port/$1"; echo 200 > "$work/code"; }
fi
# CPU ticks of the whole smolvm process, and of its vCPU thread.
ticks() { awk '{print $14 + $15}' "$1"; }
vcpu_stat=$(grep -l '^vcpu0$' /proc/"$pid"/task/*/comm | sed 's/comm$/stat/')
get big "$work/big"
[ "$(cat "$work/code")" = 200 ] && [ "$(wc -c < "$work/big")" = "$((kib * 1024))" ] \
    || { echo "GET through the forward: $(wc -c < "$work/big") bytes, status $(cat "$work/code")" >&2; exit 1; }
all0=$(ticks /proc/"$pid"/stat) vcpu0=$(ticks "$vcpu_stat")
ms; start=$t
fwd_small="" fwd_big=""
i=0; while [ "$i" -lt "$reqs" ]; do
    ms; a=$t; get index.html /dev/null; ms; fwd_small="$fwd_small $((t - a))"; i=$((i + 1))
    [ "$(cat "$work/code")" = 200 ] || { echo "GET / through the forward: status $(cat "$work/code")" >&2; exit 1; }
done
i=0; while [ "$i" -lt "$runs" ]; do
    ms; a=$t; get big /dev/null; ms; fwd_big="$fwd_big $((t - a))"; i=$((i + 1))
done
ms; wall=$((t - start))
all1=$(ticks /proc/"$pid"/stat) vcpu1=$(ticks "$vcpu_stat")
hz=$(getconf CLK_TCK)
exec 3>&-
wait "$pid" || { echo "smolvm failed" >&2; exit 1; }
pid=""

median() { tr ' ' '\n' | grep . | sort -n | awk '{v[NR]=$1} END{print v[int((NR+1)/2)]}'; }
g_small=$(grep '^small' "$work/guest" | cut -d' ' -f2 | tr '\n' ' ')
g_big=$(grep '^big' "$work/guest" | cut -d' ' -f2 | tr '\n' ' ')
g_start=$(grep '^start' "$work/guest" | cut -d' ' -f2 | tr '\n' ' ')
echo "$host"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg); $reqs small GETs, $runs GETs of $kib KiB"
fs=$(echo "$fwd_small" | median) gs=$(echo "$g_small" | median) st=$(echo "$g_start" | median)
fb=$(echo "$fwd_big" | median) gb=$(echo "$g_big" | median)
awk -v fs="$fs" -v gs="$gs" -v st="$st" -v fb="$fb" -v gb="$gb" -v kib="$kib" \
    -v afs="$fwd_small" -v ags="$g_small" -v ast="$g_start" -v afb="$fwd_big" -v agb="$g_big" 'BEGIN{
    printf "small GET, forward:  median %6d ms = %7.2f req/s   (ms:%s)\n", fs, 1000/fs, afs
    printf "small GET, in guest: median %6d ms = %7.2f req/s   (ms:%s)\n", gs, 1000/gs, ags
    printf "  wget start in the guest (closed port): median %d ms   (ms:%s)\n", st, ast
    if (gs > st) printf "  in guest without the wget start: %d ms = %.2f req/s\n", gs-st, 1000/(gs-st)
    printf "  forward / in guest: %.2f x the request rate\n", gs/fs
    printf "%d KiB GET, forward:  median %6d ms = %7.3f MiB/s   (ms:%s)\n", kib, fb, kib/1024/(fb/1000), afb
    printf "%d KiB GET, in guest: median %6d ms = %7.3f MiB/s   (ms:%s)\n", kib, gb, kib/1024/(gb/1000), agb
    printf "  forward / in guest: %.2f x the MiB/s\n", gb/fb
}'
awk -v all=$((all1 - all0)) -v vcpu=$((vcpu1 - vcpu0)) -v hz="$hz" -v wall="$wall" 'BEGIN{
    printf "during the forward GETs (%.1f s): smolvm used %.1f s of CPU, %.1f s on the vCPU thread (the guest), %.1f s on its other threads\n",
        wall/1000, all/hz, vcpu/hz, (all-vcpu)/hz
}'
