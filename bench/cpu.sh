#!/usr/bin/env bash
# CPU benchmark: the same static workloads (bench/workloads/) natively, under
# QEMU TCG and under Matryoshka (each CPU engine), with ratios to native and
# geometric means. The table is printed by bench/cpu_bench.py.
#
# Usage: bench/cpu.sh [--quick] [--repeat N] [--engines LIST] [--json FILE] ...
#   bench/cpu.sh --help            all options
#   bench/cpu.sh --quick           small sizes (a smoke test, a few minutes)
#   bench/cpu.sh --engines native,qemu-tcg,interp --repeat 3
# Environment: MATRYOSHKA (binary, default target/release/matryoshka), QEMU,
#   QEMU_CPU (default Nehalem: SSE4.2/POPCNT, no AVX, like the Matryoshka CPU).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="$REPO/bench/out"

for arg in "$@"; do
    if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
        exec python3 "$REPO/bench/cpu_bench.py" --help
    fi
done

command -v gcc >/dev/null || { echo "cpu.sh: gcc not found (apt-get install gcc libc6-dev)" >&2; exit 1; }
command -v cpio >/dev/null || { echo "cpu.sh: cpio not found (apt-get install cpio)" >&2; exit 1; }

# The default guest (cached; builds on first use).
"$REPO/guest/build.sh" >/dev/null

# Workloads: static binaries, used natively and copied into the guest.
make -s -C "$REPO/bench/workloads" OUT="$OUT/bin"

# Guest initramfs = the default one + a second newc archive holding /bench.
# Linux unpacks concatenated archives (each compressed or not) in order.
stage="$OUT/stage"
rm -rf "$stage"
mkdir -p "$stage/bench"
cp "$OUT"/bin/{int,fp,mem,syscall,forkexec,nop,run.sh} "$stage/bench/"
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) \
    | gzip -6 -n > "$OUT/bench.cpio.gz"
cat "$REPO/guest/out/initramfs.cpio" "$OUT/bench.cpio.gz" > "$OUT/initramfs-bench.cpio.tmp"
mv "$OUT/initramfs-bench.cpio.tmp" "$OUT/initramfs-bench.cpio"
rm -rf "$stage"

exec python3 "$REPO/bench/cpu_bench.py" --bin-dir "$OUT/bin" \
    --initrd "$OUT/initramfs-bench.cpio" "$@"
