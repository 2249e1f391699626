#!/bin/sh
# A filter with a slow start-up: builds a table, then waits (as a real tool loading its
# data would), then numbers the lines of its stdin.
i=0
table=""
while [ $i -lt 200 ]; do table="$table $i"; i=$((i+1)); done
sleep 3
n=0
while read -r line; do n=$((n+1)); echo "$n: $line"; done
echo "total $n" >&2
exit 3
