#!/usr/bin/env bash
# Disk benchmark: boot the Debian image (guest/debian/build-rootfs.sh) under
# QEMU TCG and Matryoshka, both with virtio-blk, and measure in the guest
#   - boot time to the serial login prompt (host clock, from process start),
#   - sequential write of a 256 MiB file (dd bs=1M conv=fsync),
#   - sequential read of it (dd bs=1M iflag=direct, page cache bypassed).
# MiB/s are given both by the host clock around each dd (this includes a
# console round trip) and by dd's own figure in the guest. Each engine works
# on its own sparse copy of the image.
#
# Usage: bench/disk.sh [--engines qemu-tcg,matryoshka[,matryoshka-interp]] [--size-mib 256]
#                      [--timeout 900]
#   matryoshka uses the default CPU engine; matryoshka-interp/-jit force one.
# Environment: MATRYOSHKA (binary, default target/release/matryoshka, built if
#   missing), MATRYOSHKA_ARGS (extra `run` args, e.g. "--cpu-engine interp"),
#   QEMU (default qemu-system-x86_64), BENCH_LOG_DIR (default /tmp/matryoshka-bench).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

"$REPO/guest/build.sh" >/dev/null
"$REPO/guest/debian/build-rootfs.sh" >/dev/null

MATRYOSHKA="${MATRYOSHKA:-$REPO/target/release/matryoshka}"
if [[ ! -x "$MATRYOSHKA" ]]; then
    cargo build --release --bin matryoshka >&2
fi
export MATRYOSHKA

exec python3 - "$@" <<'PYEOF'
import argparse, os, re, select, shlex, shutil, subprocess, sys, tempfile, time

ap = argparse.ArgumentParser(prog="bench/disk.sh")
ap.add_argument("--engines", default="qemu-tcg,matryoshka")
ap.add_argument("--size-mib", type=int, default=256)
ap.add_argument("--timeout", type=float, default=900)
a = ap.parse_args()

out = "guest/out"
cmdline = open(f"{out}/cmdline").read().strip() + " matryoshka.root=/dev/vda"
logdir = os.environ.get("BENCH_LOG_DIR", "/tmp/matryoshka-bench")
os.makedirs(logdir, exist_ok=True)
work = tempfile.mkdtemp(prefix="matryoshka-disk-")


def command(engine, img):
    if engine == "qemu-tcg":
        q = os.environ.get("QEMU", "qemu-system-x86_64")
        if not shutil.which(q):
            sys.exit(f"{q} not found: apt-get install qemu-system-x86")
        return [q, "-accel", "tcg", "-m", "1G", "-smp", "1", "-no-reboot", "-nographic",
                "-nic", "none", "-kernel", f"{out}/vmlinuz", "-initrd", f"{out}/initramfs.cpio",
                "-drive", f"file={img},if=virtio,format=raw", "-append", cmdline]
    if engine in ("matryoshka", "matryoshka-interp", "matryoshka-jit"):
        cpu = {"matryoshka": [], "matryoshka-interp": ["--cpu-engine", "interp"],
               "matryoshka-jit": ["--cpu-engine", "jit"]}[engine]
        return ([os.environ["MATRYOSHKA"], "run", "--no-reboot", "--memory", "1G",
                 "--disk", img, "--cmdline", cmdline] + cpu
                + shlex.split(os.environ.get("MATRYOSHKA_ARGS", "")))
    sys.exit(f"unknown engine {engine!r} (qemu-tcg, matryoshka, matryoshka-interp, matryoshka-jit)")


class Vm:
    def __init__(self, argv, log):
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        self.buf = b""
        self.pos = 0
        self.log = open(log, "wb")

    def wait(self, pat, timeout):
        pat = pat.encode()
        end = time.monotonic() + timeout
        while True:
            i = self.buf.find(pat, self.pos)
            if i >= 0:
                self.pos = i + len(pat)
                return time.monotonic()
            if time.monotonic() > end:
                raise TimeoutError(f"timed out waiting for {pat!r}")
            r, _, _ = select.select([self.p.stdout], [], [], 0.2)
            if r:
                d = os.read(self.p.stdout.fileno(), 65536)
                if not d:
                    raise RuntimeError(f"VM exited ({self.p.wait()}) waiting for {pat!r}")
                self.buf += d
                self.log.write(d)
                self.log.flush()

    def send(self, s):
        self.p.stdin.write(s.encode() + b"\n")
        self.p.stdin.flush()

    def timed(self, cmd, timeout):
        """Run cmd between shell-built markers; returns (seconds, output)."""
        self.send(f"echo T''0; {cmd}; echo T''1")
        t0 = self.wait("T0\r\n", timeout)
        start = self.pos
        t1 = self.wait("T1", timeout)
        return t1 - t0, self.buf[start:self.pos - 2].decode(errors="replace").strip()

    def close(self):
        try:
            self.send("poweroff -f")
            self.p.wait(60)
        except Exception:
            self.p.kill()
            self.p.wait()


rows = []
for engine in a.engines.split(","):
    img = os.path.join(work, f"{engine}.img")
    subprocess.run(["cp", "--sparse=always", f"{out}/debian.img", img], check=True)
    log = os.path.join(logdir, f"disk-{engine}.log")
    print(f"[bench/disk] {engine}: booting (console log: {log})", file=sys.stderr, flush=True)
    vm = Vm(command(engine, img), log)
    try:
        boot = vm.wait("login: root (automatic login)", a.timeout) - vm.t0
        vm.wait(":~# ", a.timeout)
        n = a.size_mib
        ws, wout = vm.timed(f"dd if=/dev/zero of=/root/bench bs=1M count={n} conv=fsync 2>&1 | tail -n1", a.timeout)
        vm.timed("sync; echo 3 > /proc/sys/vm/drop_caches", a.timeout)
        rs, rout = vm.timed(f"dd if=/root/bench of=/dev/null bs=1M iflag=direct 2>&1 | tail -n1", a.timeout)
        def dd_rate(o):  # MiB/s by the guest clock, from dd's "copied, 1.23 s"
            m = re.search(r"copied, ([0-9.]+) s", o)
            return n / float(m.group(1)) if m and float(m.group(1)) > 0 else float("nan")
        rows.append((engine, boot, n / ws, n / rs, dd_rate(wout), dd_rate(rout)))
        print(f"[bench/disk] {engine}: boot {boot:.1f} s; write: {wout}; read: {rout}",
              file=sys.stderr, flush=True)
    finally:
        vm.close()
        os.unlink(img)
shutil.rmtree(work, ignore_errors=True)

print(f"\nDebian 12 guest, virtio-blk raw image, {a.size_mib} MiB sequential, bs=1M")
print("boot: host clock to the autologin line; MiB/s by the host clock around the")
print("command (includes a console round trip) and by dd in the guest")
print(f"{'engine':<18} {'boot (s)':>8} {'write host':>11} {'write dd':>9} {'read host':>10} {'read dd':>9}")
for e, b, w, r, wd, rd in rows:
    print(f"{e:<18} {b:>8.1f} {w:>11.1f} {wd:>9.1f} {r:>10.1f} {rd:>9.1f}")
if len(rows) > 1:
    print(f"ratios to {rows[0][0]} (boot: time, higher is slower; throughput: higher is faster)")
    e0, b0, w0, r0, wd0, rd0 = rows[0]
    for e, b, w, r, wd, rd in rows[1:]:
        print(f"{e:<18} {b / b0:>7.2f}x {w / w0:>10.2f}x {wd / wd0:>8.2f}x {r / r0:>9.2f}x {rd / rd0:>8.2f}x")
PYEOF
