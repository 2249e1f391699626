#!/bin/sh
# The hardware-KVM checks, run by busybox sh inside the QEMU guest of scripts/nested, where
# /dev/kvm is kvm_amd. tests/nested/run puts the files under test into /work and calls
#
#   sh /work/guest.sh PART...
#
# Parts: vmm (the VMM test-guest test executables: vmm_*, packed_runtime), hello1 and hello2 (examples/hello built
# here with 1 and 2 vCPUs: run, exit codes, stdin/stdout, --save chain, pack), host (a machine
# built outside QEMU, on the host's KVM, resumed here), spin2 and spin4 (busy work on every
# vCPU of a 2- and 4-vCPU machine, saved and resumed mid-work), resume-only (just the host
# machine, for other CPU models), resume-sregs (the host machine on a CPU with fewer
# features), cpu-build and cpu-run (CPU models: a default-model and a --cpu host machine built
# on one CPU, resumed or refused on another; see part_cpu_build), bench (timings), chan (channel
# throughput, scripts/bench-channel.sh).
#
# Each check prints one line: `ok - NAME`, `FAIL - NAME: why` or, for a failure that is
# known today, `xfail - NAME: what happens` (exactly, so a change shows); a known failure
# that passes prints `XPASS - NAME` and counts as a failure so that it gets promoted to a
# plain check. The exit status is 1 when anything failed.
set -u
cd /work
# Each smolvm, smolpack or packed run is killed after this many seconds (status 137; KILL,
# because smolvm forwards a first TERM to the guest's command), so a hang fails its check
# instead of the whole QEMU run.
LIMIT=${NESTED_CHECK_TIMEOUT:-300}
# The console, for hang dumps from inside redirected checks.
exec 3>&1
# dump_threads WHY: every thread of every process but the kernel's, with its state, last CPU,
# kernel wait channel, system call and kernel stack, then the CPUs' interrupt counts and the
# kernel log's tail; to the console. What a hang looks like from kvm_amd's host.
dump_threads() {
    {
        echo "NESTED-HANG-DUMP: $1"
        cat /proc/loadavg
        for pd in /proc/[0-9]*; do
            # Kernel threads have an empty command line (/proc files all show size 0, so
            # read it rather than test -s).
            cmd="$(tr '\0' ' ' <"$pd/cmdline" 2>/dev/null | cut -c1-160)"
            [ -n "$cmd" ] || continue
            echo "-- pid ${pd#/proc/}: $cmd"
            for t in "$pd"/task/*; do
                set -- $(sed 's/^.*) //' "$t/stat" 2>/dev/null)
                # After the comm: state is field 1, processor field 37.
                echo "   tid ${t##*/} $(cat "$t/comm" 2>/dev/null) state $1 cpu ${37:-?} wchan $(cat "$t/wchan" 2>/dev/null) syscall $(cut -d' ' -f1-3 "$t/syscall" 2>/dev/null)"
                sed 's/^/      /' "$t/stack" 2>/dev/null
            done
        done
        echo "-- /proc/interrupts"
        cat /proc/interrupts
        # Where the guest is: kvm_amd's exits for one second carry each vCPU's guest RIP (a
        # spinning guest still exits on every host timer tick). Look the addresses up in
        # target/guest/vmlinux (nm).
        tr=/sys/kernel/tracing
        if [ -d "$tr/events/kvm" ] || mount -t tracefs tracefs "$tr" 2>/dev/null; then
            echo 0 >"$tr/tracing_on"
            : >"$tr/trace"
            echo 1 >"$tr/events/kvm/kvm_exit/enable"
            echo 1 >"$tr/tracing_on"
            sleep 1
            echo 0 >"$tr/tracing_on"
            echo 0 >"$tr/events/kvm/kvm_exit/enable"
            echo "-- kvm_exit for 1 s: $(grep -c 'kvm_exit:' "$tr/trace") exits; by reason and RIP (top 20):"
            sed -n 's/.*kvm_exit: vcpu \([0-9]*\) reason \([A-Za-z_0-9]*\).* rip \(0x[0-9a-f]*\).*/vcpu\1 \2 \3/p' "$tr/trace" |
                sort | uniq -c | sort -rn | head -20
        else
            echo "-- no tracefs: guest RIPs unknown"
        fi
        echo "-- dmesg"
        dmesg | tail -20
        echo "NESTED-HANG-DUMP end"
    } >&3 2>&1
}
# limited SECS CMD...: CMD in its own process group, killed (the whole group, SIGKILL) after
# SECS seconds, with the thread dump first; its status (137 when killed).
limited() {
    secs=$1
    shift
    # A background job's stdin would be /dev/null: hand it the caller's explicitly.
    exec 5<&0
    setsid "$@" <&5 5<&- &
    pid=$!
    exec 5<&-
    waited=0
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$waited" -ge "$secs" ]; then
            dump_threads "$* still running after $secs s"
            kill -KILL -"$pid" 2>/dev/null || kill -KILL "$pid"
            break
        fi
        sleep 1
        waited=$((waited + 1))
    done
    wait "$pid"
}
smolvm() { limited "$LIMIT" /work/smolvm "$@"; }
smolpack() { limited "$LIMIT" /work/smolpack "$@"; }
export SMOLVM_KERNEL=/work/vmlinux SMOLVM_AGENT=/work/smol-agent
T=/tmp/nested-checks
mkdir -p "$T"
failed=0

ok() { echo "ok - $1"; }
fail() {
    echo "FAIL - $1: $2"
    failed=1
}
# xfail NAME CONDITION-HOLDS DETAIL: CONDITION-HOLDS is 0 when the known failure happened.
xfail() {
    if [ "$2" = 0 ]; then
        echo "xfail - $1: $3"
    else
        echo "XPASS - $1: known to fail, now passes; make it a plain check"
        failed=1
    fi
}
# show FILE: a file's text, indented, for a failure's details.
show() { sed 's/^/    | /' "$1" | head -40; }
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# expect NAME WANT_STATUS WANT_STDOUT_FILE CMD...: runs CMD with stdout and stderr apart;
# checks the status, stdout against the file's bytes, and that stderr is empty.
expect() {
    name=$1 want=$2 wantout=$3
    shift 3
    "$@" >"$T/out" 2>"$T/err"
    got=$?
    if [ "$got" != "$want" ]; then
        fail "$name" "exit status $got, want $want; stderr:"
        show "$T/err"
        return 1
    fi
    if ! cmp -s "$T/out" "$wantout"; then
        fail "$name" "stdout differs from the expected; got:"
        show "$T/out"
        return 1
    fi
    if [ -s "$T/err" ]; then
        fail "$name" "stderr not empty:"
        show "$T/err"
        return 1
    fi
    ok "$name"
}
want() { printf "$@" >"$T/want"; }

part_vmm() {
    for t in vmm_boot vmm_snapshot vmm_corrupt packed_runtime; do
        start=$(now)
        # A hang fails the check instead of the whole QEMU run.
        limited "$LIMIT" env CI=true "./$t" --test-threads=2 >"$T/$t.log" 2>&1
        rc=$?
        summary=$(grep '^test result:' "$T/$t.log" | tail -1)
        if [ "$rc" = 0 ]; then
            ok "vmm: $t ($summary; $(since "$start") s)"
        else
            fail "vmm: $t" "exit status $rc ($summary):"
            grep -E '^test .*FAILED|panicked|^---- ' "$T/$t.log" | head -20 | sed 's/^/    | /'
            tail -30 "$T/$t.log" | sed 's/^/    | /'
        fi
    done
}

# The checks every hello machine gets: default command, arguments, exit codes, stdin, a
# --save chain (each step sees the last one's disk and memory, the input file never changes),
# the server started at build time, and pack.
hello_checks() {
    tag=$1 m=$2 vcpus=$3
    built=$(smolvm run "$m" -- cat /etc/motd 2>/dev/null)
    want 'hello from smolvm\n%s\n[a b]\n[c]\n' "$built"
    expect "$tag: run greet with arguments" 0 "$T/want" smolvm run "$m" -- greet "a b" c
    want 'hello from smolvm\n%s\n' "$built"
    expect "$tag: run the default command" 0 "$T/want" smolvm run "$m"
    want '%s\n' "$vcpus"
    expect "$tag: nproc is $vcpus" 0 "$T/want" smolvm run "$m" -- nproc
    : >"$T/want"
    expect "$tag: exit status 7" 7 "$T/want" smolvm run "$m" -- sh -c 'exit 7'
    expect "$tag: false gives 1" 1 "$T/want" smolvm run "$m" -- false
    expect "$tag: killed by SIGTERM gives 143" 143 "$T/want" smolvm run "$m" -- sh -c 'kill -TERM $$'
    smolvm run "$m" -- no-such-command >"$T/out" 2>"$T/err"
    rc=$?
    if [ "$rc" = 127 ] && [ ! -s "$T/out" ]; then ok "$tag: missing command gives 127"; else
        fail "$tag: missing command gives 127" "exit status $rc"
        show "$T/err"
    fi
    head -c 65536 /dev/urandom >"$T/in"
    cp "$T/in" "$T/want"
    start=$(now)
    expect "$tag: 64 KiB of stdin back through cat" 0 "$T/want" sh -c "timeout -s KILL $LIMIT ./smolvm run '$m' -- cat <'$T/in'"
    echo "    (64 KiB through cat: $(since "$start") s)"
    want '3\n'
    expect "$tag: stdin pipe into wc" 0 "$T/want" sh -c "echo hi | timeout -s KILL $LIMIT ./smolvm run '$m' -- wc -c"
    want '<!doctype html>\n'
    expect "$tag: server started at build time answers" 0 "$T/want" \
        sh -c "timeout -s KILL $LIMIT ./smolvm run '$m' -- wget -qO- http://127.0.0.1:8080/ | head -1"
    # Concurrent instances of one file: each its own machine (private memory, own disk
    # overlay), each with its own arguments, status and output.
    for i in 1 2 3; do
        timeout -s KILL "$LIMIT" ./smolvm run "$m" -- sh -c "echo inst$i > /root/c; sleep 1; cat /root/c; exit $((i + 10))" \
            >"$T/conc$i.out" 2>"$T/conc$i.err" &
        eval "pid$i=\$!"
    done
    bad=""
    for i in 1 2 3; do
        eval "wait \$pid$i"
        rc=$?
        [ "$rc" = $((i + 10)) ] && [ "$(cat "$T/conc$i.out")" = "inst$i" ] && [ ! -s "$T/conc$i.err" ] ||
            bad="$bad instance $i: exit status $rc, stdout '$(head -c 200 "$T/conc$i.out")', stderr '$(head -c 300 "$T/conc$i.err")';"
    done
    if [ -z "$bad" ]; then ok "$tag: three concurrent instances"; else fail "$tag: three concurrent instances" "$bad"; fi
    # --save chain: disk (/root/s) and memory (/tmp/s, a tmpfs) carry over.
    rm -f "$T/s1" "$T/s2"
    want ''
    expect "$tag: --save step 1" 0 "$T/want" \
        smolvm run "$m" --save "$T/s1" -- sh -c 'echo one > /root/s; echo mem1 > /tmp/s'
    want 'one\nmem1\n'
    expect "$tag: --save step 2 sees step 1" 0 "$T/want" \
        smolvm run "$T/s1" --save "$T/s2" -- sh -c 'cat /root/s /tmp/s; echo two >> /root/s; echo mem2 >> /tmp/s'
    want 'one\ntwo\nmem1\nmem2\n'
    expect "$tag: --save step 3 sees step 2" 0 "$T/want" smolvm run "$T/s2" -- cat /root/s /tmp/s
    want 'one\nmem1\n'
    expect "$tag: the saved input is unchanged" 0 "$T/want" smolvm run "$T/s1" -- cat /root/s /tmp/s
    : >"$T/want"
    expect "$tag: the original machine is unchanged" 1 "$T/want" smolvm run "$m" -- test -e /root/s
    # Packed executable.
    rm -f "$T/packed"
    if smolpack pack "$m" -o "$T/packed" >"$T/pack.log" 2>&1; then ok "$tag: pack"; else
        fail "$tag: pack" "smolpack pack failed:"
        show "$T/pack.log"
        return
    fi
    want 'hello from smolvm\n%s\n[x y]\n' "$built"
    expect "$tag: packed greet" 0 "$T/want" timeout -s KILL "$LIMIT" "$T/packed" greet "x y"
    : >"$T/want"
    expect "$tag: packed exit status 5" 5 "$T/want" timeout -s KILL "$LIMIT" "$T/packed" sh -c 'exit 5'
    want 'packed\n'
    expect "$tag: packed stdin" 0 "$T/want" sh -c "echo packed | timeout -s KILL $LIMIT '$T/packed' cat"
    [ "$tag" = hello1 ] && io_checks "$tag" "$m"
}

# The machine's ways to the host on kvm_amd: a shared directory both ways (virtio-fs) and a
# published port (the agent channel). The network is part_net.
io_checks() {
    tag=$1 m=$2
    rm -rf "$T/share"
    mkdir -p "$T/share"
    echo from-host >"$T/share/in"
    want 'from-host\n'
    if expect "$tag: -v share read and written" 0 "$T/want" \
        smolvm run -v "$T/share:/mnt/s:rw" "$m" -- sh -c 'cat /mnt/s/in; echo from-guest > /mnt/s/out'; then
        if [ "$(cat "$T/share/out" 2>/dev/null)" = from-guest ]; then ok "$tag: the guest's file is on the host"; else
            fail "$tag: the guest's file is on the host" "$T/share/out: $(cat "$T/share/out" 2>&1)"
        fi
    fi
    # -p: the web server started at build time, from this host.
    exec 6<&0
    (smolvm run -p 18080:8080 "$m" -- sh -c 'echo ready; sleep 120' <&6 >"$T/fwd.out" 2>"$T/fwd.err") &
    fwd=$!
    exec 6<&-
    waited=0
    until grep -q ready "$T/fwd.out" 2>/dev/null || [ "$waited" -ge "$LIMIT" ]; do sleep 1; waited=$((waited + 1)); done
    got=$(wget -qO- http://127.0.0.1:18080/ 2>&1 | head -1)
    if [ "$got" = '<!doctype html>' ]; then ok "$tag: -p 18080:8080 reaches the guest's server"; else
        fail "$tag: -p 18080:8080 reaches the guest's server" "got '$got'"
        show "$T/fwd.err"
    fi
    kill -TERM "$fwd" 2>/dev/null
    pkill -TERM -f "smolvm run -p 18080" 2>/dev/null
    wait "$fwd" 2>/dev/null
}

# The opt-in network on kvm_amd (virtio-net, gateway 10.0.2.2 = this host's 127.0.0.1).
part_net() {
    tag=net m="$T/hello1.smolmachine"
    [ -f "$m" ] || build_hello hello1 1 "$m" || return
    # --net: a server on this host's loopback, reached through the gateway.
    mkdir -p "$T/www"
    echo through-the-gateway >"$T/www/f"
    busybox httpd -p 127.0.0.1:18090 -h "$T/www"
    want 'through-the-gateway\n'
    expect "$tag: --net reaches a host server through 10.0.2.2" 0 "$T/want" \
        smolvm run --net "$m" -- wget -qO- http://10.0.2.2:18090/f
    : >"$T/want"
    expect "$tag: --net-allow refuses another destination" 1 "$T/want" \
        smolvm run --net-allow 127.0.0.1:1 "$m" -- sh -c 'wget -qO- http://10.0.2.2:18090/f 2>/dev/null'
    pkill -f "httpd -p 127.0.0.1:18090" 2>/dev/null
}

# build_hello TAG VCPUS OUT: examples/hello with [resources] vcpus replaced.
build_hello() {
    tag=$1 vcpus=$2 out=$3 extra=${4:-}
    rm -rf "$T/src-$tag"
    cp -r /work/hello "$T/src-$tag"
    sed -i "s/^vcpus = .*/vcpus = $vcpus/" "$T/src-$tag/Smolfile"
    grep -q "^vcpus = $vcpus\$" "$T/src-$tag/Smolfile" || { fail "$tag: Smolfile" "no vcpus line to change"; return 1; }
    start=$(now)
    # -v: the guest's console goes into the log, so a failed or hung build shows where the
    # guest was.
    # shellcheck disable=SC2086 # $extra: flags, word-split on purpose
    if smolpack build -v $extra "$T/src-$tag/Smolfile" -o "$out" >"$T/build-$tag.log" 2>&1; then
        ok "$tag: smolpack build examples/hello with $vcpus vCPU(s) ($(since "$start") s)"
        echo "NESTED-BUILD-SECONDS $tag $(since "$start")"
    else
        fail "$tag: smolpack build" "failed after $(since "$start") s:"
        tail -30 "$T/build-$tag.log" | sed 's/^/    | /'
        return 1
    fi
}

part_hello1() { build_hello hello1 1 "$T/hello1.smolmachine" && hello_checks hello1 "$T/hello1.smolmachine" 1; }
part_hello2() { build_hello hello2 2 "$T/hello2.smolmachine" && hello_checks hello2 "$T/hello2.smolmachine" 2; }

# A machine built on the host's /dev/kvm (outside QEMU) and packed there.
part_host() {
    m=/work/hello-host.smolmachine
    built=$(smolvm run "$m" -- cat /etc/motd 2>"$T/err")
    rc=$?
    if [ "$rc" != 0 ]; then
        # The rest would only wait out the same limit again.
        fail "host: host-built machine resumes" "exit status $rc (137: killed after $LIMIT s); stderr:"
        show "$T/err"
        return
    fi
    want 'hello from smolvm\n%s\n[a b]\n' "$built"
    smolvm run "$m" -- greet "a b" >"$T/out" 2>"$T/err"
    rc=$?
    if [ "$rc" = 0 ] && cmp -s "$T/out" "$T/want"; then
        ok "host: host-built machine resumes and runs greet"
    else
        fail "host: host-built machine resumes and runs greet" "exit status $rc; stdout and stderr:"
        show "$T/out"
        show "$T/err"
    fi
    if [ -s "$T/err" ]; then
        fail "host: nothing on stderr" "stderr was:"
        show "$T/err"
    else
        ok "host: nothing on stderr"
    fi
    want 'hello from smolvm\n%s\n[p]\n' "$built"
    timeout -s KILL "$LIMIT" /work/hello-host greet p >"$T/out" 2>"$T/err"
    rc=$?
    if [ "$rc" = 0 ] && cmp -s "$T/out" "$T/want"; then ok "host: packed ./hello built on the host runs"; else
        fail "host: packed ./hello built on the host runs" "exit status $rc; stdout and stderr:"
        show "$T/out"
        show "$T/err"
    fi
    : >"$T/want"
    timeout -s KILL "$LIMIT" /work/hello-host sh -c 'exit 9' >"$T/out" 2>/dev/null
    rc=$?
    if [ "$rc" = 9 ]; then ok "host: packed exit status 9"; else fail "host: packed exit status 9" "got $rc"; fi
    want 'hi\n'
    sh -c "echo hi | timeout -s KILL $LIMIT /work/hello-host cat" >"$T/out" 2>/dev/null
    if cmp -s "$T/out" "$T/want"; then ok "host: packed stdin"; else fail "host: packed stdin" "got $(cat "$T/out")"; fi
    # Saved here, the machine is this host's: it resumes without the cross-host messages.
    rm -f "$T/host-saved"
    smolvm run "$m" --save "$T/host-saved" -- sh -c 'echo kept > /root/k' >"$T/out" 2>"$T/err"
    rc=$?
    if [ "$rc" = 0 ]; then ok "host: host-built machine saved here (--save)"; else
        fail "host: host-built machine saved here (--save)" "exit status $rc (137: killed after $LIMIT s); stderr:"
        show "$T/err"
    fi
    want 'kept\n'
    expect "host: host-built machine saved here resumes with its disk" 0 "$T/want" \
        smolvm run "$T/host-saved" -- cat /root/k
}

# Only the resume of the host-built machine: what other CPU models are checked for.
part_resume_only() {
    m=/work/hello-host.smolmachine
    smolvm run "$m" -- greet r >"$T/out" 2>"$T/err"
    rc=$?
    if [ "$rc" = 0 ] && grep -qx '\[r\]' "$T/out"; then
        ok "resume-only: host-built machine runs greet"
    else
        fail "resume-only: host-built machine runs greet" "exit status $rc; stdout and stderr:"
        show "$T/out"
        show "$T/err"
    fi
}

# On CPU models whose features are a subset of the building host's (qemu64,+svm,+npt): the
# host-built machine, built with the default CPU model, resumes there too.
part_resume_sregs() {
    smolvm run /work/hello-host.smolmachine -- greet r >"$T/out" 2>"$T/err"
    rc=$?
    if [ "$rc" = 0 ] && grep -qx '\[r\]' "$T/out" && [ ! -s "$T/err" ]; then
        ok "resume-sregs: host-built machine on a CPU with fewer features runs, silently"
    else
        fail "resume-sregs: host-built machine on a CPU with fewer features runs, silently" "exit status $rc:"
        show "$T/out"
        show "$T/err"
    fi
}

# CPU models. cpu-build (on a CPU with many features, -cpu max): examples/hello built with the
# default model (x86-64) and with --cpu host, both checked here and written to $NESTED_OUT for
# cpu-run. cpu-run (on a CPU with fewer features: -cpu qemu64,+svm,+npt, -cpu EPYC): the default
# machine resumes silently with the right clock; the host-model machine is refused with the
# one-line message (or, on a CPU that has every feature it was shown, runs).
part_cpu_build() {
    build_hello cpu-default 1 "$T/hello-default.smolmachine" || return
    want 'hello from smolvm\n%s\n[m]\n' "$(smolvm run "$T/hello-default.smolmachine" -- cat /etc/motd 2>/dev/null)"
    expect "cpu-build: default model runs where it was built" 0 "$T/want" \
        smolvm run "$T/hello-default.smolmachine" -- greet m
    start=$(now)
    if smolpack build --cpu host "$T/src-cpu-default/Smolfile" -o "$T/hello-hostcpu.smolmachine" \
        >"$T/build-hostcpu.log" 2>&1; then
        ok "cpu-build: smolpack build --cpu host ($(since "$start") s)"
    else
        fail "cpu-build: smolpack build --cpu host" "failed:"
        tail -30 "$T/build-hostcpu.log" | sed 's/^/    | /'
        return
    fi
    # Its own build line: the two builds may fall in different minutes.
    want 'hello from smolvm\n%s\n[m]\n' "$(smolvm run "$T/hello-hostcpu.smolmachine" -- cat /etc/motd 2>/dev/null)"
    expect "cpu-build: host model runs where it was built" 0 "$T/want" \
        smolvm run "$T/hello-hostcpu.smolmachine" -- greet m
    for m in default hostcpu; do
        if grep -q "\"cpu\": \"$( [ $m = default ] && echo x86-64 || echo host)\"" "$T/hello-$m.smolmachine"; then
            ok "cpu-build: manifest of hello-$m names its model"
        else
            fail "cpu-build: manifest of hello-$m names its model" "no cpu field"
        fi
        cp "$T/hello-$m.smolmachine" "$NESTED_OUT/" || fail "cpu-build: copy to $NESTED_OUT" "cp failed"
    done
}

part_cpu_run() {
    m=/work/hello-default.smolmachine
    smolvm run "$m" -- greet x >"$T/out" 2>"$T/err"
    rc=$?
    if [ "$rc" = 0 ] && grep -qx '\[x\]' "$T/out"; then
        ok "cpu-run: default-model machine built on -cpu max runs here"
    else
        fail "cpu-run: default-model machine built on -cpu max runs here" "exit status $rc; stdout and stderr:"
        show "$T/out"
        show "$T/err"
    fi
    if [ -s "$T/err" ]; then
        fail "cpu-run: nothing on stderr" "stderr was:"
        show "$T/err"
    else
        ok "cpu-run: nothing on stderr"
    fi
    # The guest's clock after a resume on a host with another TSC: kvmclock keeps it right.
    host_before=$(date +%s)
    smolvm run "$m" -- sh -c 'date +%s; sleep 1; date +%s' >"$T/out" 2>"$T/err"
    host_after=$(date +%s)
    set -- $(cat "$T/out")
    if [ $# = 2 ] && [ "$1" -ge "$((host_before - 2))" ] && [ "$2" -le "$((host_after + 2))" ] &&
        [ "$2" -ge "$(($1 + 1))" ]; then
        ok "cpu-run: guest date and sleep 1 agree with the host ($host_before..$host_after: $1, $2)"
    else
        fail "cpu-run: guest date and sleep 1 agree with the host" "host $host_before..$host_after, guest: $(tr '\n' ' ' <"$T/out")"
        show "$T/err"
    fi
    smolvm run /work/hello-hostcpu.smolmachine -- greet x >"$T/out" 2>"$T/err"
    rc=$?
    if [ "$rc" = 125 ] && [ "$(wc -l <"$T/err")" = 1 ] &&
        grep -q 'this machine needs a CPU with .*; this host lacks \(it\|them\): rebuild it with --cpu x86-64' "$T/err"; then
        ok "cpu-run: --cpu host machine refused in one line, exit 125 ($(cat "$T/err"))"
    elif [ "$rc" = 0 ] && grep -qx '\[x\]' "$T/out" && [ "${NESTED_HOSTCPU_MAY_RUN:-0}" = 1 ]; then
        ok "cpu-run: --cpu host machine runs (this CPU has every feature it was shown)"
    else
        fail "cpu-run: --cpu host machine refused with the message" "exit status $rc; stdout and stderr:"
        show "$T/out"
        show "$T/err"
    fi
}

# A machine whose service keeps one busy loop pinned to each vCPU; the build snapshots it
# mid-work. Checks: nproc, every loop advancing on its own CPU after resume, and the counts
# carried through a --save and resumed again.
part_spin() {
    n=$1 tag=spin$1
    d="$T/src-$tag"
    rm -rf "$d"
    mkdir -p "$d"
    cp /work/spin.sh "$d/spin"
    cat >"$d/Smolfile" <<EOF
name = "spin"

[base]
type = "busybox"

[resources]
vcpus = $n
memory = "256M"

[[copy]]
from = "spin"
to = "/usr/local/bin/spin"

[[service]]
name = "spin"
run = ["/usr/local/bin/spin", "start", "$n"]
ready = { exec = ["/usr/local/bin/spin", "ready", "$n"], timeout = "10m" }

[run]
cmd = ["/usr/local/bin/spin", "check", "$n"]
EOF
    start=$(now)
    if smolpack build "$d/Smolfile" -o "$T/$tag.smolmachine" >"$T/build-$tag.log" 2>&1; then
        ok "$tag: smolpack build with $n vCPUs and a busy loop per vCPU ($(since "$start") s)"
    else
        fail "$tag: smolpack build" "failed after $(since "$start") s:"
        tail -30 "$T/build-$tag.log" | sed 's/^/    | /'
        return
    fi
    smolvm run "$T/$tag.smolmachine" --save "$T/$tag-2.smolmachine" >"$T/out" 2>"$T/err"
    rc=$?
    if [ "$rc" = 0 ]; then ok "$tag: resumed, every vCPU's loop advances on its own CPU"; else
        fail "$tag: resumed, every vCPU's loop advances on its own CPU" "exit status $rc:"
        show "$T/out"
        show "$T/err"
        return
    fi
    sed 's/^/    /' "$T/out"
    # shellcheck disable=SC2046 # one count per CPU
    set -- $(sed -n 's/^cpu [0-9]*: count [0-9]* -> \([0-9]*\),.*/\1/p' "$T/out")
    if [ $# != "$n" ]; then
        fail "$tag: counts" "$# counts printed, want $n"
        return
    fi
    smolvm run "$T/$tag-2.smolmachine" -- /usr/local/bin/spin check "$n" "$@" >"$T/out" 2>"$T/err"
    rc=$?
    if [ "$rc" = 0 ]; then ok "$tag: saved mid-work, resumed again: counts continue"; else
        fail "$tag: saved mid-work, resumed again: counts continue" "exit status $rc:"
        show "$T/out"
        show "$T/err"
    fi
    sed 's/^/    /' "$T/out"
}

part_bench() {
    ./testguest snapshot "$T/tg.smolmachine" --at 2 --exit-after 1 --every 1000 --limit 100000 \
        --status 0 >/dev/null
    smolpack pack "$T/tg.smolmachine" -o "$T/testapp" >/dev/null
    echo "NESTED-BENCH testguest"
    ./bench_spawn "${BENCH_RUNS:-15}" :: true /usr/bin/true :: testapp "$T/testapp" \
        :: smolvm-run ./smolvm run "$T/tg.smolmachine"
    m="$T/hello1.smolmachine"
    [ -f "$m" ] || build_hello hello1 1 "$m" || return
    smolpack pack "$m" -o "$T/hello" >/dev/null
    echo "NESTED-BENCH hello"
    ./bench_spawn "${BENCH_HELLO_RUNS:-5}" :: true /usr/bin/true :: hello "$T/hello" true \
        :: smolvm-run ./smolvm run "$m" -- true :: hello-echo "$T/hello" echo x
    # examples/hello's default run (greet) warm, as the Smolfile has it, and cold: the same
    # Smolfile without its `warm` line.
    rm -rf "$T/src-cold"
    cp -r /work/hello "$T/src-cold"
    sed -i '/^warm = /d' "$T/src-cold/Smolfile"
    if ! smolpack build "$T/src-cold/Smolfile" -o "$T/hello-cold.smolmachine" >"$T/build-cold.log" 2>&1; then
        fail "bench: cold hello" "smolpack build failed"
        tail -20 "$T/build-cold.log" | sed 's/^/    | /'
        return
    fi
    smolpack pack "$T/hello-cold.smolmachine" -o "$T/hello-cold" >/dev/null
    echo "NESTED-BENCH hello warm and cold"
    ./bench_spawn "${BENCH_HELLO_RUNS:-5}" :: true /usr/bin/true :: cold "$T/hello-cold" \
        :: warm "$T/hello"
}

# The agent channel's throughput here, beside the guest's own pipe (scripts/bench-channel.sh):
# CHAN_MIB MiB (default 16), CHAN_RUNS runs (default 3).
part_chan() {
    m="$T/hello1.smolmachine"
    [ -f "$m" ] || build_hello hello1 1 "$m" || return
    echo "NESTED-BENCH channel"
    # Under the watchdog: a stalled transfer dumps every thread's kernel stack.
    if limited "${CHAN_LIMIT:-900}" sh /work/bench-channel.sh /work/smolvm "$m" "${CHAN_MIB:-16}" "${CHAN_RUNS:-3}"; then
        ok "chan: channel benchmark"
    else
        fail "chan: channel benchmark" "scripts/bench-channel.sh failed"
    fi
}

part_shares() {
    m="$T/bench-shares.smolmachine"
    if [ ! -f "$m" ]; then
        start=$(now)
        smolpack build /work/bench-shares/Smolfile -o "$m" >"$T/build-shares.log" 2>&1 || {
            fail "shares: smolpack build" "failed:"; tail -30 "$T/build-shares.log" | sed 's/^/    | /'; return; }
        echo "NESTED-BUILD-SECONDS bench-shares $(since "$start")"
    fi
    echo "NESTED-BENCH shares"
    if limited "${SHARES_LIMIT:-1800}" env MIB="${SHARES_MIB:-100}" FILES="${SHARES_FILES:-10000}" \
        sh /work/bench-shares.sh /work/smolvm "$m" "${SHARES_RUNS:-3}"; then
        ok "shares: share benchmark"
    else
        fail "shares: share benchmark" "scripts/bench-shares.sh failed"
    fi
}

# Repeats, to reproduce intermittent hangs: NESTED_LOOP runs (default 20) of one resume, each
# limited to NESTED_LOOP_LIMIT s (default 120) with the thread dump on a hang; prints a tally.
# loop-host: the host-built (1-vCPU) machine runs greet, with the guest kernel's log kept.
# loop-vmm: the packed_runtime test executable. loop-hello2: a 2-vCPU machine built here.
part_loop() {
    what=$1 n=${NESTED_LOOP:-20} lim=${NESTED_LOOP_LIMIT:-120} i=0 good=0
    case "$what" in
        hello2) [ -f "$T/hello2.smolmachine" ] || build_hello hello2 2 "$T/hello2.smolmachine" || return ;;
        hello2z) [ -f "$T/hello2z.smolmachine" ] || build_hello hello2z 2 "$T/hello2z.smolmachine" --compress || return ;;
        hello2long) [ -f "$T/hello2.smolmachine" ] || build_hello hello2 2 "$T/hello2.smolmachine" || return ;;
        hello1) [ -f "$T/hello1.smolmachine" ] || build_hello hello1 1 "$T/hello1.smolmachine" || return ;;
    esac
    while [ "$i" -lt "$n" ]; do
        i=$((i + 1))
        start=$(now)
        case "$what" in
            host) limited "$lim" env SMOLVM_CONSOLE=1 /work/smolvm run /work/hello-host.smolmachine -- greet r >"$T/out" 2>"$T/err" ;;
            hello2) limited "$lim" env SMOLVM_CONSOLE=1 /work/smolvm run "$T/hello2.smolmachine" -- greet r >"$T/out" 2>"$T/err" ;;
            hello1) limited "$lim" env SMOLVM_CONSOLE=1 /work/smolvm run "$T/hello1.smolmachine" -- greet r >"$T/out" 2>"$T/err" ;;
            # Long runs: a failure per unit of guest work, not per resume, shows here.
            hello2long) limited "$lim" env SMOLVM_CONSOLE=1 /work/smolvm run "$T/hello2.smolmachine" -- \
                sh -c 'for c in 0 1; do (i=0; while [ $i -lt ${NESTED_LONG:-400} ]; do taskset -c $c /bin/true; i=$((i+1)); done) & done; wait' >"$T/out" 2>"$T/err" ;;
            hello2z) limited "$lim" env SMOLVM_CONSOLE=1 /work/smolvm run "$T/hello2z.smolmachine" -- greet r >"$T/out" 2>"$T/err" ;;
            vmm) limited "$lim" env CI=true ./packed_runtime --test-threads=2 >"$T/out" 2>"$T/err" ;;
        esac
        rc=$?
        if [ "$rc" = 0 ]; then
            good=$((good + 1))
            echo "loop-$what $i: ok ($(since "$start") s)"
        else
            fail "loop-$what $i" "exit status $rc after $(since "$start") s; stdout and stderr tails:"
            tail -30 "$T/out" | sed 's/^/    | /'
            # The start of a guest oops says where it began; the tail only how it ended.
            awk '!s && /BUG:|Oops|PANIC|general protection|double fault|stack guard|detected stalls/ {s=1}
                 s && n < 70 {print "    oops| " $0; n++}' "$T/err"
            tail -60 "$T/err" | sed 's/^/    | /'
        fi
    done
    echo "NESTED-LOOP $what: $good of $n passed"
}

echo "kvm: $(cat /sys/module/kvm_amd/parameters/nested 2>/dev/null | sed 's/^/nested=/') npt=$(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null) vgif=$(cat /sys/module/kvm_amd/parameters/vgif 2>/dev/null), $(nproc) CPUs, CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
for p in "$@"; do
    part_start=$(now)
    echo "== $p"
    case "$p" in
        vmm) part_vmm ;;
        hello1) part_hello1 ;;
        hello2) part_hello2 ;;
        host) part_host ;;
        resume-only) part_resume_only ;;
        resume-sregs) part_resume_sregs ;;
        cpu-build) part_cpu_build ;;
        cpu-run) part_cpu_run ;;
        spin2) part_spin 2 ;;
        spin4) part_spin 4 ;;
        bench) part_bench ;;
        chan) part_chan ;;
        shares) part_shares ;;
        net) part_net ;;
        loop-host) part_loop host ;;
        loop-vmm) part_loop vmm ;;
        loop-hello2) part_loop hello2 ;;
        loop-hello2z) part_loop hello2z ;;
        loop-hello2long) part_loop hello2long ;;
        loop-hello1) part_loop hello1 ;;
        *) fail "part $p" "unknown part" ;;
    esac
    echo "== $p: $(since "$part_start") s"
done
exit $failed
