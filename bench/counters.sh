#!/usr/bin/env bash
# Hardware counters of one workload: natively and under Matryoshka, per the
# same amount of work, so that the translator's overhead shows as ratios of
# instructions, cycles, branches and branch misses (not only of seconds).
#
# Usage: bench/counters.sh WORKLOAD SMALL LARGE   e.g. bench/counters.sh int 10 210
# The guest boots twice (sizes SMALL and LARGE); the difference between the
# two runs is the work of LARGE - SMALL units, with boot and set-up cancelled
# out. The native binary runs LARGE - SMALL units once.
# Needs perf (apt-get install linux-perf) and bench/cpu.sh run once (it
# builds bench/out/). Environment: MATRYOSHKA (binary, default
# target/release/matryoshka), ENGINE (default jit).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$REPO/bench/out"
MAT="${MATRYOSHKA:-$REPO/target/release/matryoshka}"
ENGINE="${ENGINE:-jit}"

if [[ $# -ne 3 ]]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
w="$1" small="$2" large="$3"
[[ "$small" =~ ^[0-9]+$ && "$large" =~ ^[0-9]+$ && "$large" -gt "$small" ]] || {
    echo "counters.sh: SMALL and LARGE must be integers with LARGE > SMALL" >&2
    exit 2
}
command -v perf >/dev/null || { echo "counters.sh: perf not found (apt-get install linux-perf)" >&2; exit 1; }
for f in "$OUT/bin/$w" "$OUT/initramfs-bench.cpio" "$MAT"; do
    [[ -e "$f" ]] || { echo "counters.sh: $f is missing (run bench/cpu.sh --quick once, and cargo build --release)" >&2; exit 1; }
done

events=instructions,cycles,branches,branch-misses
# perf stat -x, prints "value,unit,event,..." on stderr; keep "event value".
count() { perf stat -x, -e "$events" "$@" 2>&1 >/dev/null | awk -F, '$3 ~ /^[a-z-]+$/ {print $3, $1}'; }

guest() {
    count "$MAT" run --cpu-engine "$ENGINE" --no-reboot --memory 512M \
        --kernel "$REPO/guest/out/vmlinuz" --initrd "$OUT/initramfs-bench.cpio" \
        --cmdline "$(cat "$REPO/guest/out/cmdline") matryoshka.cmd=\"/bench/run.sh 1 $w:$1\""
}

native="$(count "$OUT/bin/$w" $((large - small)))"
g_small="$(guest "$small")"
g_large="$(guest "$large")"

python3 - "$w" "$((large - small))" "$native" "$g_small" "$g_large" <<'EOF'
import sys
w, units = sys.argv[1], sys.argv[2]
def parse(s):
    d = {}
    for line in s.splitlines():
        k, v = line.split()
        if v.isdigit():
            d[k] = int(v)
    return d
nat, small, large = (parse(s) for s in sys.argv[3:6])
print(f"{w}: {units} units, Matryoshka minus its boot, against native")
print(f"{'event':<14}{'native':>16}{'matryoshka':>16}{'ratio':>8}")
for k in ["instructions", "cycles", "branches", "branch-misses"]:
    if k not in nat or k not in small or k not in large:
        print(f"{k:<14}{'not counted':>16}")
        continue
    m = large[k] - small[k]
    print(f"{k:<14}{nat[k]:>16,}{m:>16,}{m / nat[k]:>8.2f}")
EOF
