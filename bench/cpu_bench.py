#!/usr/bin/env python3
"""CPU benchmark driver (python3 stdlib only); bench/cpu.sh builds and calls it.

Runs the workloads of bench/workloads/ (static binaries, built by cpu.sh into
--bin-dir) natively on the host and inside the default guest under each
emulating engine, one guest boot per engine, all workloads and repeats in
that boot:

  native      the binaries on this host (the reference; always run)
  qemu-tcg    qemu-system-x86_64 -accel tcg -cpu $QEMU_CPU (default Nehalem)
  interp      matryoshka run --cpu-engine interp
  jit         matryoshka run --cpu-engine jit

If `matryoshka run --help` lists no --cpu-engine flag, the binary has one
engine (the interpreter): `interp` runs it without the flag and is labelled
so, and `jit` is reported missing. Missing engines are reported loudly and
never get numbers.

The run order is native, jit, native again, then the others: the host's
speed may drift over the minutes QEMU and the interpreter take, so the jit
runs between two native passes, whose samples together are the reference
(the table notes how far the two passes moved apart).

Each workload times itself with CLOCK_MONOTONIC inside the guest and prints
`BENCH name=.. seconds=.. checksum=.. size=..`; boot time is therefore not in
the workload times. Its checksum must equal the native one (a mismatch is a
loud failure and exit status 1). The host also timestamps the guest's console
lines, and a guest time that disagrees with the host's view is flagged.
"""

import argparse
import json
import math
import os
import platform
import re
import resource
import select
import shutil
import shlex
import signal
import statistics
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no bench/__pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import boot_timer  # noqa: E402  (engine_argv, default_cmdline, MARKER)

REPO = boot_timer.REPO

# name, default size (~0.3-0.6 s natively on a current x86-64 host), CPU-bound?
WORKLOADS = [
    ("int", 100, True),
    ("fp", 200, True),
    ("mem", 12, False),
    ("syscall", 1000, False),
    ("forkexec", 5000, False),
]
QUICK_DIV = 10
NATIVE_MIN_REPEAT = 5
ALL_ENGINES = ["native", "qemu-tcg", "interp", "jit"]
LABELS = {"native": "native", "qemu-tcg": "qemu-tcg", "interp": "mat-interp", "jit": "mat-jit"}

BENCH_RE = re.compile(r"BENCH name=(\w+) seconds=([0-9.]+) checksum=([0-9a-f]+) size=(\d+)")
T0_RE = re.compile(r"BENCH-T0 name=(\w+)")
FAIL_RE = re.compile(r"BENCH-FAIL name=(\w+) rep=(\d+) rc=(\d+)")
DONE = "BENCH-ALL-DONE"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def loud(msg):
    bar = "!" * 78
    log(f"{bar}\n!! {msg}\n{bar}")


def run_streaming(argv, timeout, log_path, cwd=REPO):
    """Run argv with stdout+stderr captured; timestamp each output line.

    Returns a dict: lines [(t, text)] (t = seconds since launch), init_s (first
    MATRYOSHKA-INIT-START), exit_s, rc, timed_out, cpu_s (the child's user+sys
    time: well below wall_s means the host CPU was contended), load (mean of the
    1-minute load average sampled during the run)."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    loads = [os.getloadavg()[0]]
    t_load = time.monotonic()
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)
    fd = proc.stdout.fileno()
    raw = bytearray()
    pending = b""
    lines = []
    init_s = None
    timed_out = False
    deadline = t0 + timeout
    marker = boot_timer.MARKER.decode()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
        if time.monotonic() - t_load >= 5.0:
            loads.append(os.getloadavg()[0])
            t_load = time.monotonic()
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        now = time.monotonic() - t0
        if not chunk:
            break
        raw += chunk
        pending += chunk
        *done, pending = pending.split(b"\n")
        for b in done:
            text = b.decode("utf-8", "replace").rstrip("\r")
            lines.append((now, text))
            if init_s is None and marker in text:
                init_s = now
    if pending:
        lines.append((time.monotonic() - t0, pending.decode("utf-8", "replace")))
    rc, exit_s, timed_out = boot_timer.reap(proc, timed_out, deadline, t0, 1.0)
    proc.stdout.close()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if log_path:
        with open(log_path, "wb") as f:
            f.write(raw)
    return {"lines": lines, "init_s": init_s, "exit_s": exit_s, "rc": rc,
            "timed_out": timed_out, "wall_s": time.monotonic() - t0, "cpu_s": cpu_s,
            "load": statistics.mean(loads)}


def parse_results(lines, expect):
    """Collect BENCH results from timestamped console lines.

    expect: {name: size}. Returns (per-workload dict, list of problems)."""
    res = {name: {"seconds": [], "host_seconds": [], "checksums": set()} for name in expect}
    problems = []
    begin_t = {}
    done = False
    for t, text in lines:
        m = T0_RE.search(text)
        if m:
            begin_t[m.group(1)] = t
            continue
        m = FAIL_RE.search(text)
        if m:
            problems.append(f"{m.group(1)} rep {m.group(2)} exited with status {m.group(3)}")
            continue
        m = BENCH_RE.search(text)
        if m:
            name, secs, csum, size = m.group(1), float(m.group(2)), m.group(3), int(m.group(4))
            if name not in res:
                problems.append(f"unexpected result line: {text.strip()}")
                continue
            if size != expect[name]:
                problems.append(f"{name}: ran size {size}, expected {expect[name]}")
            r = res[name]
            r["seconds"].append(secs)
            r["checksums"].add(csum)
            # Host view: from the program's T0 line to its result line (plus
            # console latency).
            r["host_seconds"].append(t - begin_t[name] if name in begin_t else None)
            continue
        if DONE in text:
            done = True
    if not done:
        problems.append("the run did not finish (no BENCH-ALL-DONE)")
    return res, problems


def stat(values, how):
    if not values:
        return None
    return min(values) if how == "best" else statistics.median(values)


def geomean(xs):
    xs = [x for x in xs if x is not None and x > 0]
    if not xs:
        return None
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def cpu_engine_flag(binary):
    """(has --cpu-engine, help text or error)."""
    try:
        out = subprocess.run([binary, "run", "--help"], capture_output=True, text=True,
                             timeout=60, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    return "--cpu-engine" in out.stdout + out.stderr, out.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"sizes divided by {QUICK_DIV} (a smoke test)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply all sizes by this")
    ap.add_argument("--engines", default=",".join(ALL_ENGINES),
                    help="comma list of native, qemu-tcg, interp, jit (native is always run: "
                         "it gives the reference times and checksums)")
    ap.add_argument("--workloads", default=",".join(w[0] for w in WORKLOADS),
                    help="comma list of workloads")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each workload (in one boot per engine)")
    ap.add_argument("--stat", choices=["median", "best"], default="median",
                    help="how repeats are combined")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per guest boot, seconds")
    ap.add_argument("--bin-dir", default=os.path.join(REPO, "bench/out/bin"))
    ap.add_argument("--kernel", default=os.path.join(REPO, "guest/out/vmlinuz"))
    ap.add_argument("--initrd", default=os.path.join(REPO, "bench/out/initramfs-bench.cpio"))
    ap.add_argument("--memory", default="512M")
    ap.add_argument("--qemu", default=os.environ.get("QEMU", "qemu-system-x86_64"))
    ap.add_argument("--qemu-cpu", default=os.environ.get("QEMU_CPU", "Nehalem"),
                    help="QEMU CPU model; keep it without AVX like the Matryoshka CPU, so the "
                         "guest's glibc picks the same string/memory routines")
    ap.add_argument("--matryoshka", default=os.environ.get("MATRYOSHKA",
                                                           "target/release/matryoshka"))
    ap.add_argument("--log-dir", default=os.path.join(REPO, "bench/out/logs"))
    ap.add_argument("--json", default=os.path.join(REPO, "bench/out/results.json"),
                    help="write results here ('' to skip)")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")

    t_start = time.monotonic()
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    known = {w[0]: w for w in WORKLOADS}
    for n in names:
        if n not in known:
            ap.error(f"unknown workload {n!r} (known: {', '.join(known)})")
    div = QUICK_DIV if args.quick else 1
    sizes = {n: max(1, round(known[n][1] * args.scale / div)) for n in names}
    cpu_bound = [n for n in names if known[n][2]]

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in engines:
        if e not in ALL_ENGINES:
            ap.error(f"unknown engine {e!r} (known: {', '.join(ALL_ENGINES)})")
    if "native" not in engines:
        engines.insert(0, "native")
    for p in (args.kernel, args.initrd):
        if not os.path.isfile(p):
            sys.exit(f"cpu_bench: {p} missing (run bench/cpu.sh, which builds it)")
    os.makedirs(args.log_dir, exist_ok=True)

    spec = " ".join(f"{n}:{sizes[n]}" for n in names)
    # The native reference is cheap: repeat it more, it sets every ratio.
    native_reps = max(args.repeat, NATIVE_MIN_REPEAT)
    cmdline = (f'{boot_timer.default_cmdline()} '
               f'matryoshka.cmd="/bench/run.sh {args.repeat} {spec}"')

    # Matryoshka engine selection.
    mat_bin = args.matryoshka
    if not os.path.isabs(mat_bin):
        mat_bin = os.path.join(REPO, mat_bin)
    mat_orig = mat_bin
    if os.access(mat_bin, os.X_OK) and any(e in engines for e in ("interp", "jit")):
        # Run a private copy: a rebuild during the benchmark (others share the
        # target dir) must not swap engines between columns.
        snap = os.path.join(args.log_dir, "matryoshka.snapshot")
        shutil.copy2(mat_bin, snap + ".tmp")
        os.replace(snap + ".tmp", snap)
        mat_bin = snap
    has_flag, _ = (cpu_engine_flag(mat_bin) if os.access(mat_bin, os.X_OK) else (False, ""))

    results = {}
    meta = {"sizes": sizes, "repeat": args.repeat, "stat": args.stat, "cmdline": cmdline,
            "host": platform.node(), "cpu": cpu_model(), "loadavg_start": os.getloadavg(),
            "matryoshka": mat_orig, "matryoshka_has_cpu_engine_flag": has_flag,
            "matryoshka_mtime": (time.ctime(os.path.getmtime(mat_bin))
                                 if os.path.exists(mat_bin) else None),
            "qemu_cpu": args.qemu_cpu}
    log(f"sizes: {spec}  repeat: {args.repeat} ({args.stat})  load avg: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    # Run order: the translator right after the native reference, then the
    # native programs once more, then the slow engines. This host's speed
    # drifts over minutes (shared machine), and the jit's ratio is the one
    # measured against targets: it is taken between two native passes, and
    # the reference is the native samples of both.
    plan = [("native", "native")]
    if "jit" in engines:
        plan += [("jit", "jit"), ("native", "native#2")]
    plan += [(e, e) for e in engines if e not in ("native", "jit")]
    for engine, key in plan:
        res = {"engine": engine, "label": LABELS[engine], "status": "ok"}
        results[key] = res
        log_path = os.path.join(args.log_dir, f"{key.replace('#', '-')}.log")
        if engine == "native":
            argv = ["sh", os.path.join(args.bin_dir, "run.sh"), str(native_reps)] + spec.split()
        else:
            ns = argparse.Namespace(qemu=args.qemu, memory=args.memory, kernel=args.kernel,
                                    initrd=args.initrd, qemu_extra=f"-cpu {args.qemu_cpu}",
                                    matryoshka=mat_bin, matryoshka_extra="")
            if engine in ("interp", "jit"):
                extra = ["--no-reboot", "--memory", args.memory]
                if not os.access(mat_bin, os.X_OK):
                    ns = None
                    res["status"] = "missing"
                    res["why"] = f"{mat_orig} not built (cargo build --release)"
                elif has_flag:
                    extra += ["--cpu-engine", engine]
                elif engine == "jit":
                    ns = None
                    res["status"] = "missing"
                    res["why"] = (f"{mat_orig} has no --cpu-engine flag (`run --help`): "
                                  "the JIT is not in this build")
                else:
                    res["label"] = "mat-interp*"
                    res["note"] = ("no --cpu-engine flag in this build: ran its only "
                                   "engine, the interpreter")
                if ns is not None:
                    ns.matryoshka_extra = shlex.join(extra)
                    argv, why = boot_timer.engine_argv("matryoshka", ns, cmdline)
            else:
                argv, why = boot_timer.engine_argv(engine, ns, cmdline)
            if res["status"] == "missing":
                pass
            elif argv is None:
                res["status"] = "missing"
                res["why"] = why + (" (apt-get install qemu-system-x86)"
                                    if engine.startswith("qemu") else " (cargo build --release)")
            if res["status"] == "missing":
                loud(f"{engine}: MISSING — {res['why']}; its column has no numbers")
                continue
        res["argv"] = argv
        log(f"[{engine}] running: {shlex.join(argv)}")
        r = run_streaming(argv, args.timeout, log_path)
        res.update({"boot_init_s": r["init_s"] if engine != "native" else None,
                    "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "load": r["load"],
                    "rc": r["rc"], "log": log_path})
        wl, problems = parse_results(r["lines"], sizes)
        if r["timed_out"]:
            problems.append(f"timed out after {args.timeout:.0f} s")
        elif r["rc"] != 0:
            problems.append(f"exit status {r['rc']}")
        res["workloads"] = {}
        for n in names:
            w = wl[n]
            entry = {"seconds": w["seconds"], "host_seconds": w["host_seconds"],
                     "checksums": sorted(w["checksums"]),
                     "time_s": stat(w["seconds"], args.stat)}
            want = native_reps if engine == "native" else args.repeat
            if len(w["seconds"]) < want:
                problems.append(f"{n}: {len(w['seconds'])}/{want} results")
            if len(w["checksums"]) > 1:
                problems.append(f"{n}: checksum differs between repeats {sorted(w['checksums'])}")
            res["workloads"][n] = entry
        res["problems"] = problems
        if problems:
            res["status"] = "failed"
            loud(f"{engine}: FAILED — {'; '.join(problems)} (log: {log_path})")
            for _, text in r["lines"][-10:]:
                log(f"    | {text}")
        log(f"[{engine}] done in {r['wall_s']:.1f} s" +
            (f", boot to init {r['init_s']:.2f} s" if r["init_s"] else ""))

    # The second native pass joins the first; how far apart they came out
    # tells how much the host drifted around the jit's run.
    second = results.pop("native#2", None)
    drift = {}
    if second is not None:
        first = results["native"]
        first["problems"] += second.get("problems", [])
        if second["status"] == "failed":
            first["status"] = "failed"
        for n, w in first.get("workloads", {}).items():
            w2 = second.get("workloads", {}).get(n)
            if not w2:
                continue
            a, b = w["time_s"], w2["time_s"]
            if a and b:
                drift[n] = b / a - 1
            w["seconds"] = w["seconds"] + w2["seconds"]
            w["host_seconds"] = w["host_seconds"] + w2["host_seconds"]
            w["checksums"] = sorted(set(w["checksums"]) | set(w2["checksums"]))
            if len(w["checksums"]) > 1:
                first["status"] = "failed"
                first["problems"].append(f"{n}: checksum differs between native passes")
            w["time_s"] = stat(w["seconds"], args.stat)
        first["drift_after_jit"] = drift
    results = {e: results[e] for e in engines if e in results}

    # Checksums against native, ratios and geomeans.
    native = results["native"]["workloads"]
    mismatches = []
    for engine, res in results.items():
        if "workloads" not in res:
            continue
        for n, w in res["workloads"].items():
            ref = native[n]
            if engine != "native" and w["checksums"] and ref["checksums"] and \
                    w["checksums"] != ref["checksums"]:
                w["checksum_ok"] = False
                mismatches.append(f"{engine}/{n}: {w['checksums']} != native {ref['checksums']}")
            else:
                w["checksum_ok"] = bool(w["checksums"])
            if w["time_s"] is not None and ref["time_s"]:
                w["ratio"] = w["time_s"] / ref["time_s"]
            # Guest clock sanity: the guest's own time must not exceed what
            # the host saw, nor be far below it.
            for g, h in zip(w["seconds"], w["host_seconds"]):
                if h is not None and (g > h + 0.2 or (h - g > 1.0 and g < 0.8 * h)):
                    w["clock_warning"] = f"guest {g:.3f} s vs host {h:.3f} s"
        ratios = {n: res["workloads"][n].get("ratio") for n in names}
        if all(res["workloads"][n].get("checksum_ok") for n in names):
            res["geomean_cpu"] = geomean([ratios[n] for n in cpu_bound]) \
                if all(ratios[n] for n in cpu_bound) else None
            res["geomean_all"] = geomean(list(ratios.values())) \
                if all(ratios.values()) else None

    print_table(results, names, cpu_bound, args)
    if drift:
        print("native before -> after the jit's run: " +
              ", ".join(f"{n} {100 * d:+.1f}%" for n, d in drift.items()))
        moved = [n for n, d in drift.items() if abs(d) > 0.05]
        if moved:
            print(f"WARNING: the host's speed moved by more than 5% around the jit's run "
                  f"({', '.join(moved)}): its ratios are uncertain by that much")
    total = time.monotonic() - t_start
    meta["loadavg_end"] = os.getloadavg()
    meta["total_wall_s"] = total
    print(f"\nharness wall time: {total:.0f} s   load avg at end: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for engine, res in results.items():
        for n, w in res.get("workloads", {}).items():
            if "clock_warning" in w:
                print(f"WARNING {engine}/{n}: guest clock disagrees with host: "
                      f"{w['clock_warning']}")
    ncpu = os.cpu_count() or 1
    # A single-vCPU engine is busy all the time: CPU time well below wall time
    # (or more runnable tasks than CPUs) means it waited for a CPU.
    busy = [f"{e} (load {r['load']:.1f}, CPU/wall {r['cpu_s'] / r['wall_s']:.2f})"
            for e, r in results.items()
            if "load" in r and (r["load"] > 1.5 * ncpu or r["cpu_s"] < 0.85 * r["wall_s"])]
    if busy:
        print(f"WARNING: the host ({ncpu} CPUs) was contended during: {', '.join(busy)}; "
              "other processes competed with the engine, its times may be inflated")
    if mismatches:
        loud("CHECKSUM MISMATCH (emulated result differs from native):\n!!   " +
             "\n!!   ".join(mismatches))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2, default=list)
        print(f"results: {args.json}")
    failed = [e for e, r in results.items() if r["status"] == "failed"]
    return 1 if mismatches or failed else 0


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_table(results, names, cpu_bound, args):
    cols = list(results)
    w0 = 22
    cw = 18
    print()
    print(f"{'':<{w0}}" + "".join(f"{results[e]['label']:>{cw}}" for e in cols))
    print(f"{'workload':<{w0}}" + "".join(
        f"{'s':>{cw}}" if e == "native" else f"{'s   x native':>{cw}}" for e in cols))
    print("-" * (w0 + cw * len(cols)))

    def cell(e, n):
        res = results[e]
        if res["status"] == "missing":
            return "missing"
        w = res.get("workloads", {}).get(n)
        if not w or w["time_s"] is None:
            return "FAILED"
        if not w.get("checksum_ok", True):
            return "BAD CHECKSUM"
        if e == "native":
            return f"{w['time_s']:.3f}"
        r = w.get("ratio")
        return f"{w['time_s']:.2f} {r:7.1f}x" if r else f"{w['time_s']:.2f}       -"

    for n in names:
        print(f"{n:<{w0}}" + "".join(f"{cell(e, n):>{cw}}" for e in cols))
    print("-" * (w0 + cw * len(cols)))

    def gm_cell(e, key):
        res = results[e]
        if e == "native":
            return "1.0x"
        if res["status"] == "missing":
            return "missing"
        g = res.get(key)
        return f"{g:.1f}x" if g else "-"

    print(f"{'geomean CPU (' + ','.join(cpu_bound) + ')':<{w0}}" +
          "".join(f"{gm_cell(e, 'geomean_cpu'):>{cw}}" for e in cols))
    print(f"{'geomean all':<{w0}}" + "".join(f"{gm_cell(e, 'geomean_all'):>{cw}}" for e in cols))

    def boot_cell(e, key):
        res = results[e]
        if e == "native":
            return "-"
        if res["status"] == "missing":
            return "missing"
        v = res.get(key)
        return f"{v:.2f}" if v is not None else "-"

    print(f"{'boot to init (s)':<{w0}}" + "".join(f"{boot_cell(e, 'boot_init_s'):>{cw}}"
                                                  for e in cols))
    print(f"{'whole run wall (s)':<{w0}}" + "".join(
        f"{results[e].get('wall_s', 0):>{cw}.1f}" if 'wall_s' in results[e]
        else f"{'missing':>{cw}}" for e in cols))
    print(f"{'whole run CPU (s)':<{w0}}" + "".join(
        f"{results[e]['cpu_s']:>{cw}.1f}" if 'cpu_s' in results[e]
        else f"{'missing':>{cw}}" for e in cols))
    print(f"{'host load avg':<{w0}}" + "".join(
        f"{results[e]['load']:>{cw}.2f}" if 'load' in results[e]
        else f"{'missing':>{cw}}" for e in cols))
    passes = 2 if "jit" in results else 1
    print(f"(workload times: {args.stat} of {args.repeat} (native: {args.stat} of "
          f"{passes} x {max(args.repeat, NATIVE_MIN_REPEAT)}), guest CLOCK_MONOTONIC inside the "
          "program; ratios = time / native time; geomeans of those ratios)")
    for e, res in results.items():
        if res.get("note"):
            print(f"{res['label']}: {res['note']}")
        if res["status"] == "missing":
            print(f"{res['label']}: MISSING: {res['why']}")
        elif res["status"] == "failed":
            print(f"{res['label']}: FAILED: {'; '.join(res['problems'])}")


if __name__ == "__main__":
    sys.exit(main())
