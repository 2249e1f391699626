#!/bin/sh
# Shared directories (virtio-fs, `-v`) beside the machine's own disk. Usage:
#   scripts/bench-shares.sh SMOLVM MACHINE [RUNS]
#
# MACHINE is a busybox machine with room on its disk for the in-machine side
# (examples/bench-shares: `smolpack build examples/bench-shares/Smolfile -o M`); SMOLVM the
# smolvm binary. POSIX sh and busybox tools only, so the same script runs on the development
# host and inside the nested hardware-KVM host. Each of RUNS runs (default 3) is one
# `smolvm run` with a fresh empty host directory shared `:rw` at /mnt/share; inside it the
# same work is timed on the share and on /root (the machine's ext4 disk), in alternating
# order, from /proc/uptime (10 ms steps; every step takes seconds here):
#   write  MIB MiB (default 100) written sequentially by dd, then fsync'ed
#   read   the same file read back by dd, after the guest's caches were dropped
#   untar  a tarball of FILES small files (default 10,000 of 1 KiB, in 100 directories)
#          extracted, then sync
#   find   `find` over the extracted tree (names only), caches dropped first
#   stat   `du -s` over it (a stat of every file), caches dropped first
#   rm     the tree and the big file removed, then sync
# The host's page cache is not dropped (that needs root): the share's reads come from the
# host's cache, as the disk's blocks do from the machine file's. Prints the median seconds of
# each step on each side, MiB/s for write and read, and the share/disk ratio.
set -eu
smolvm=$1 machine=$2 runs=${3:-3}
mib=${MIB:-100} files=${FILES:-10000}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -d /sys/module/kvm_pvm ]; then kvm=PVM
elif [ -d /sys/module/kvm_amd ]; then kvm="hardware KVM (kvm_amd)"
elif [ -d /sys/module/kvm_intel ]; then kvm="hardware KVM (kvm_intel)"
else kvm="KVM of unknown kind"; fi
host="host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(grep -c ^processor /proc/cpuinfo) CPUs, kernel $(uname -r), $kvm"

# The small files, made once on the host: FILES files of 1 KiB in 100 directories, written
# by the shell's builtin printf (no process per file: the nested host's busybox is slow to
# fork and has no split).
mkdir -p "$work/in/tree"
per=$((files / 100))
blk=$(head -c 762 /dev/urandom | od -An -tx1 | tr -d ' \n' | cut -c1-1017)
d=0
while [ "$d" -lt 100 ]; do
    mkdir "$work/in/tree/d$d"
    j=0
    while [ "$j" -lt "$per" ]; do
        printf '%s%06d\n' "$blk" $((d * per + j)) > "$work/in/tree/d$d/f$j"
        j=$((j + 1))
    done
    d=$((d + 1))
done
(cd "$work/in" && tar -cf small.tar tree && rm -rf tree)

# The guest's side: prints "SIDE STEP SECONDS" lines; $1 is the order of the sides.
cat > "$work/in/bench.sh" <<EOF
set -eu
now() { cut -d' ' -f1 /proc/uptime; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
cp /mnt/in/small.tar /tmp/small.tar
for side in \$1; do
    if [ \$side = share ]; then d=/mnt/share/b; else d=/root/b; fi
    mkdir -p \$d
    t=\$(now); dd if=/dev/zero of=\$d/big bs=1M count=$mib conv=fsync 2>/dev/null
    echo "\$side write \$t \$(now)"
    drop; t=\$(now); dd if=\$d/big of=/dev/null bs=1M 2>/dev/null
    echo "\$side read \$t \$(now)"
    t=\$(now); tar -xf /tmp/small.tar -C \$d; sync
    echo "\$side untar \$t \$(now)"
    n=\$(find \$d/tree -type f | wc -l); [ "\$n" = $((per * 100)) ] || { echo "\$side: \$n files" >&2; exit 1; }
    drop; t=\$(now); find \$d/tree > /dev/null
    echo "\$side find \$t \$(now)"
    drop; t=\$(now); du -s \$d/tree > /dev/null
    echo "\$side stat \$t \$(now)"
    t=\$(now); rm -rf \$d; sync
    echo "\$side rm \$t \$(now)"
done
EOF

: > "$work/results"
i=1
while [ "$i" -le "$runs" ]; do
    echo "run $i/$runs, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    rm -rf "$work/share" && mkdir "$work/share"
    if [ $((i % 2)) = 1 ]; then order="share disk"; else order="disk share"; fi
    "$smolvm" run -v "$work/share:/mnt/share:rw" -v "$work/in:/mnt/in:ro" "$machine" -- \
        sh /mnt/in/bench.sh "$order" > "$work/run"
    awk '{printf "%s %s %.2f\n", $1, $2, $4 - $3}' "$work/run" >> "$work/results"
    # The guest's writes ended on the host and were removed again.
    [ -z "$(ls -A "$work/share")" ] || { echo "share not empty after the run" >&2; exit 1; }
    i=$((i + 1))
done

median() { sort -n | awk '{v[NR]=$1} END{print v[int((NR+1)/2)]}'; }
echo "$host"
echo "load $(cut -d' ' -f1-3 /proc/loadavg), $runs runs, $mib MiB file, $((per * 100)) small files"
printf '%-6s %10s %10s %8s\n' step share_s disk_s share/disk
for step in write read untar find stat rm; do
    s=$(awk -v k="$step" '$1=="share" && $2==k {print $3}' "$work/results" | median)
    d=$(awk -v k="$step" '$1=="disk" && $2==k {print $3}' "$work/results" | median)
    awk -v k="$step" -v s="$s" -v d="$d" -v m="$mib" 'BEGIN{
        r = (d > 0) ? sprintf("%.2f", s / d) : "-"
        if (k == "write" || k == "read")
            printf "%-6s %10s %10s %8s   (%.1f vs %.1f MiB/s)\n", k, s, d, r, m / s, m / d
        else
            printf "%-6s %10s %10s %8s\n", k, s, d, r }'
done
