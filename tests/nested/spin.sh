#!/bin/sh
# Busy work on every vCPU of a smolvm machine (installed as /usr/local/bin/spin by the
# Smolfile that tests/nested/guest.sh writes):
#
#   spin start N            one shell loop pinned to each of CPUs 0..N-1 (the service);
#                           loop C writes its count to /run/spin.C every 100 iterations
#   spin ready N            exits 0 once every loop has written a count
#   spin check N [MIN...]   checks nproc is N, each loop runs pinned on its own CPU and its
#                           count advances; with MIN (one count per CPU, the last ones a run
#                           before a --save printed), that every count went on from there
set -u
count() {
    v=""
    tries=0
    while [ -z "$v" ] && [ $tries -lt 100 ]; do
        v=$(cat "/run/spin.$1" 2>/dev/null)
        tries=$((tries + 1))
    done
    echo "${v:-0}"
}
case "$1" in
start)
    c=0
    while [ "$c" -lt "$2" ]; do
        taskset -c "$c" sh -c 'echo $$ > /run/spin.$0.pid; i=0
            while :; do i=$((i + 1)); [ $((i % 100)) = 0 ] && echo $i > /run/spin.$0; done' "$c" &
        c=$((c + 1))
    done
    wait
    ;;
ready)
    c=0
    while [ "$c" -lt "$2" ]; do
        [ -s "/run/spin.$c" ] || exit 1
        c=$((c + 1))
    done
    ;;
check)
    n=$2
    shift 2
    bad=0
    echo "nproc $(nproc), online $(cat /sys/devices/system/cpu/online)"
    [ "$(nproc)" = "$n" ] || { echo "FAIL: nproc is $(nproc), want $n"; bad=1; }
    c=0
    while [ "$c" -lt "$n" ]; do
        pid=$(cat "/run/spin.$c.pid")
        a=$(count "$c")
        if [ $# -gt 0 ]; then
            if [ "$a" -lt "$1" ]; then
                echo "FAIL: cpu $c count $a after resume, was $1 before the save"
                bad=1
            fi
            shift
        fi
        # Wait (bounded) for the loop to advance.
        b=$a
        tries=0
        while [ "$b" -le "$a" ] && [ $tries -lt 60 ]; do
            sleep 0.5
            b=$(count "$c")
            tries=$((tries + 1))
        done
        on=$(cut -d' ' -f39 "/proc/$pid/stat")
        mask=$(taskset -p "$pid" | sed 's/.*: //')
        echo "cpu $c: count $a -> $b, on cpu $on, mask $mask"
        [ "$b" -gt "$a" ] || { echo "FAIL: cpu $c loop did not advance"; bad=1; }
        [ "$on" = "$c" ] || { echo "FAIL: cpu $c loop last ran on cpu $on"; bad=1; }
        [ "$mask" = "$(printf '%x' $((1 << c)))" ] || { echo "FAIL: cpu $c loop mask $mask"; bad=1; }
        c=$((c + 1))
    done
    exit $bad
    ;;
*)
    echo "usage: spin start|ready|check N [MIN...]" >&2
    exit 2
    ;;
esac
