#!/usr/bin/env bash
# Boot benchmark: time-to-init and time-to-exit of the default guest under
# QEMU TCG (reference) and Matryoshka. Thin wrapper over bench/boot_timer.py.
#
# Usage: bench/boot.sh [RUNS] [boot_timer.py options...]
#   RUNS defaults to 3. Examples:
#     bench/boot.sh                      # 3 runs, engines qemu-tcg,matryoshka
#     bench/boot.sh 5 --timeout 600
#     bench/boot.sh 3 --engines qemu-tcg,qemu-kvm,matryoshka --json /tmp/boot.json
# Environment: MATRYOSHKA (binary, default target/release/matryoshka),
#   MATRYOSHKA_ARGS, QEMU, QEMU_EXTRA, BENCH_LOG_DIR (default /tmp/matryoshka-bench).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

RUNS=3
if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then RUNS="$1"; shift; fi

# Build (or reuse the cached) default guest; its stdout lists the artifacts.
"$REPO/guest/build.sh" >/dev/null

exec python3 "$REPO/bench/boot_timer.py" --runs "$RUNS" "$@"
