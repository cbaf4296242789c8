#!/bin/sh
# Runs benchmark workloads in order, REPEAT times, from this script's directory
# (the same sequence natively and in the guest, where it is /bench/run.sh).
# Usage: run.sh REPEAT NAME:SIZE...
# Prints BENCH-BEGIN before each program (the host timestamps it to cross-check
# the guest clock), the program's own BENCH line, BENCH-FAIL if it failed, and
# BENCH-ALL-DONE at the end.
dir=$(dirname "$0")
rep=$1
shift
i=1
while [ "$i" -le "$rep" ]; do
    for spec in "$@"; do
        name=${spec%%:*}
        size=${spec#*:}
        echo "BENCH-BEGIN name=$name rep=$i"
        "$dir/$name" "$size"
        rc=$?
        [ "$rc" -eq 0 ] || echo "BENCH-FAIL name=$name rep=$i rc=$rc"
    done
    i=$((i + 1))
done
echo "BENCH-ALL-DONE"
