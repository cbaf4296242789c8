#!/usr/bin/env python3
"""Boot benchmark for the Matryoshka default guest (python3 stdlib only).

For each engine and each run, launch the VMM with the guest kernel/initrd and
the command line `<default cmdline> matryoshka.poweroff_after_init`, stream the
guest console (the child's stdout+stderr), and record with time.monotonic():

  init  wall time from launch until the console shows MATRYOSHKA-INIT-START
        (the first thing the guest's /init prints)
  exit  wall time from launch until the VMM process exits (the guest ran
        `poweroff -f` right after printing the marker)

A run is OK when the marker was seen and the process exited with status 0
before the timeout. An engine whose binary is missing is reported as "not
available"; an engine whose first run fails is reported as "failed" (the rest of
its runs are skipped unless --keep-going) -- neither aborts the benchmark.

Engines:
  qemu-tcg    qemu-system-x86_64 -accel tcg (the reference)
  qemu-kvm    qemu-system-x86_64 -accel kvm (opt-in, needs /dev/kvm)
  matryoshka  $MATRYOSHKA (default target/release/matryoshka) run --kernel ...
"""

import argparse
import json
import os
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

MARKER = b"MATRYOSHKA-INIT-START"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_cmdline():
    path = os.path.join(REPO, "guest", "out", "cmdline")
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "console=ttyS0,115200 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1 loglevel=4 nokaslr cryptomgr.notests"


def engine_argv(engine, args, cmdline):
    """Return (argv, None) or (None, reason-not-available)."""
    if engine in ("qemu-tcg", "qemu-kvm"):
        qemu = shutil.which(args.qemu) or (args.qemu if os.access(args.qemu, os.X_OK) else None)
        if not qemu:
            return None, f"{args.qemu} not found"
        accel = "tcg" if engine == "qemu-tcg" else "kvm"
        if accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return None, "/dev/kvm not accessible"
        argv = [qemu, "-accel", accel, "-m", args.memory, "-smp", "1",
                "-kernel", args.kernel, "-initrd", args.initrd, "-append", cmdline,
                "-serial", "stdio", "-display", "none", "-monitor", "none",
                "-no-reboot"]
        argv += shlex.split(args.qemu_extra)
        return argv, None
    if engine == "matryoshka":
        binary = args.matryoshka
        if not os.path.isabs(binary) and os.sep in binary:
            binary = os.path.join(REPO, binary)
        elif os.sep not in binary:
            binary = shutil.which(binary) or binary
        if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
            return None, f"{binary} not built"
        argv = [binary, "run", "--kernel", args.kernel, "--initrd", args.initrd,
                "--cmdline", cmdline]
        argv += shlex.split(args.matryoshka_extra)
        return argv, None
    return None, f"unknown engine {engine!r}"


def reap(proc, timed_out, deadline, t0, min_wait):
    """Wait for (or kill, past the deadline) a process started in its own
    session. Returns (exit code, seconds from t0 to exit or None, timed_out)."""
    if not timed_out:
        # stdout closed: the process is exiting (or closed its stdout early).
        try:
            rc = proc.wait(timeout=max(min_wait, deadline - time.monotonic()))
            return rc, time.monotonic() - t0, False
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.wait(), None, True


def run_once(argv, timeout, log_path):
    """Launch argv, stream its output; return a result dict."""
    buf = bytearray()
    t_init = None
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=REPO)
    fd = proc.stdout.fileno()
    deadline = t0 + timeout
    timed_out = False
    eof = False
    while not eof:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        now = time.monotonic()
        if not chunk:
            eof = True
            break
        # Search only the new bytes plus an overlap for a marker split across reads.
        start = max(0, len(buf) - len(MARKER) + 1)
        buf += chunk
        if t_init is None and buf.find(MARKER, start) >= 0:
            t_init = now - t0
    rc, t_exit, timed_out = reap(proc, timed_out, deadline, t0, 0.0)
    proc.stdout.close()
    if log_path:
        with open(log_path, "wb") as f:
            f.write(buf)
    ok = (not timed_out) and rc == 0 and t_init is not None
    if timed_out:
        why = f"timeout after {timeout:.0f}s" + ("" if t_init else " (no marker)")
    elif rc != 0:
        why = f"exit status {rc}"
    elif t_init is None:
        why = "exited without printing the marker"
    else:
        why = ""
    tail = bytes(buf[-600:]).decode("utf-8", "replace")
    return {"ok": ok, "init_s": t_init, "exit_s": t_exit, "rc": rc,
            "timed_out": timed_out, "why": why, "tail": tail, "log": log_path}


def fmt(x):
    return "-" if x is None else f"{x:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--runs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300.0, help="per-run timeout, seconds")
    ap.add_argument("--engines", default="qemu-tcg,matryoshka",
                    help="comma list of qemu-tcg, qemu-kvm, matryoshka")
    ap.add_argument("--kernel", default=os.path.join(REPO, "guest/out/vmlinuz"))
    ap.add_argument("--initrd", default=os.path.join(REPO, "guest/out/initramfs.cpio"))
    ap.add_argument("--cmdline", default=None,
                    help="base kernel cmdline (default: guest/out/cmdline); "
                         "matryoshka.poweroff_after_init is appended")
    ap.add_argument("--memory", default="512M", help="QEMU -m")
    ap.add_argument("--qemu", default=os.environ.get("QEMU", "qemu-system-x86_64"))
    ap.add_argument("--qemu-extra", default=os.environ.get("QEMU_EXTRA", ""),
                    help="extra QEMU arguments (shell-split)")
    ap.add_argument("--matryoshka", default=os.environ.get("MATRYOSHKA", "target/release/matryoshka"))
    ap.add_argument("--matryoshka-extra", default=os.environ.get("MATRYOSHKA_ARGS", ""),
                    help="extra matryoshka run arguments (shell-split)")
    ap.add_argument("--log-dir", default=os.environ.get("BENCH_LOG_DIR", "/tmp/matryoshka-bench"),
                    help="console logs go here (one file per engine/run)")
    ap.add_argument("--json", default=None, help="also write results as JSON to this file")
    ap.add_argument("--keep-going", action="store_true",
                    help="do all runs of an engine even after a failed run")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()

    for p in (args.kernel, args.initrd):
        if not os.path.isfile(p):
            sys.exit(f"boot_timer: {p} missing (run guest/build.sh)")
    base = args.cmdline if args.cmdline is not None else default_cmdline()
    cmdline = (base + " matryoshka.poweroff_after_init").strip()
    os.makedirs(args.log_dir, exist_ok=True)

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    results = {}
    print(f"kernel:  {args.kernel}", file=sys.stderr)
    print(f"initrd:  {args.initrd}", file=sys.stderr)
    print(f"cmdline: {cmdline}", file=sys.stderr)
    for engine in engines:
        argv, unavailable = engine_argv(engine, args, cmdline)
        res = {"engine": engine, "status": "ok", "runs": [], "argv": argv}
        results[engine] = res
        if unavailable:
            res["status"] = "not available"
            res["why"] = unavailable
            print(f"[{engine}] not available: {unavailable}", file=sys.stderr)
            continue
        if args.verbose:
            print(f"[{engine}] {shlex.join(argv)}", file=sys.stderr)
        for i in range(args.runs):
            log = os.path.join(args.log_dir, f"{engine}-run{i + 1}.log")
            try:
                r = run_once(argv, args.timeout, log)
            except OSError as e:
                r = {"ok": False, "init_s": None, "exit_s": None, "rc": None,
                     "timed_out": False, "why": f"launch failed: {e}", "tail": "", "log": None}
            res["runs"].append(r)
            status = "ok" if r["ok"] else f"FAILED ({r['why']})"
            print(f"[{engine}] run {i + 1}/{args.runs}: init {fmt(r['init_s'])} s, "
                  f"exit {fmt(r['exit_s'])} s  {status}  log: {r['log']}", file=sys.stderr)
            if not r["ok"]:
                if args.verbose or i == 0:
                    for line in r["tail"].splitlines()[-8:]:
                        print(f"    | {line}", file=sys.stderr)
                if not args.keep_going:
                    break
        good = [r for r in res["runs"] if r["ok"]]
        if not good:
            res["status"] = "failed"
            res["why"] = res["runs"][-1]["why"] if res["runs"] else "no runs"
        else:
            if len(good) < len(res["runs"]) or len(res["runs"]) < args.runs:
                res["status"] = "partial"
            res["median_init_s"] = statistics.median(r["init_s"] for r in good)
            res["median_exit_s"] = statistics.median(r["exit_s"] for r in good)

    ref = results.get("qemu-tcg")
    ref_ok = ref is not None and "median_exit_s" in ref
    print()
    hdr = f"{'engine':<12} {'runs ok':>7} {'init (s)':>9} {'exit (s)':>9} {'init/TCG':>9} {'exit/TCG':>9}  status"
    print(hdr)
    print("-" * len(hdr))
    for engine, res in results.items():
        good = [r for r in res["runs"] if r["ok"]]
        mi, me = res.get("median_init_s"), res.get("median_exit_s")
        ri = re_ = "-"
        if ref_ok and mi is not None:
            ri = f"{mi / ref['median_init_s']:.2f}x"
            re_ = f"{me / ref['median_exit_s']:.2f}x"
            res["ratio_init_vs_tcg"] = mi / ref["median_init_s"]
            res["ratio_exit_vs_tcg"] = me / ref["median_exit_s"]
        status = res["status"]
        if status in ("failed", "not available"):
            status += f": {res.get('why', '')}"
        print(f"{engine:<12} {len(good):>3}/{len(res['runs']) if res['runs'] else 0:<3} "
              f"{fmt(mi):>9} {fmt(me):>9} {ri:>9} {re_:>9}  {status}")
    print("(times are medians of OK runs, wall clock from launch; ratios vs qemu-tcg)")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cmdline": cmdline, "kernel": args.kernel, "initrd": args.initrd,
                       "runs": args.runs, "timeout_s": args.timeout,
                       "results": results}, f, indent=2)
    # Exit 0 if the reference engine worked (or was not requested); the
    # benchmark's purpose is to report, not to gate.
    if ref is not None and not ref_ok:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
