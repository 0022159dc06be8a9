#!/usr/bin/env python3
"""What one idle WebSocket tunnel costs an mplb worker, in user memory (USS).

Starts the benchmark's C backend and one mplb with one worker (scripts/bench's
configuration), opens N idle WebSocket tunnels through it with the benchmark's
wsload, and reports the worker's USS growth per tunnel (what ``scripts/bench``'s
ws-idle scenario measures, but for the worker alone and with N chosen freely).  Then
every tunnel echoes one message, so a broken tunnel shows.  With ``--probe`` the worker
traces its allocations (workers.memprobe) and the script prints where the bytes of a
tunnel went, per source line and per type; tracemalloc inflates USS, so the USS of a
probed run is not the figure to quote.

    scripts/bench_tunnel_memory.py --tunnels 2000           # compiled build
    scripts/bench_tunnel_memory.py --tunnels 2000 --pure    # MPLB_PURE_PYTHON=1
    scripts/bench_tunnel_memory.py --tunnels 2000 --probe --top 25

The last line of output is ``TUNNELMEM {json}``.  Every process it starts is stopped
by pid (a process group each) when it ends, whatever happens.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import shutil
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPORT_TIMEOUT = 30.0


def load_bench():
    """scripts/bench as a module (it has no .py suffix): its tools, configs and PROCS."""
    loader = importlib.machinery.SourceFileLoader("mplb_bench", os.path.join(HERE, "bench"))
    spec = importlib.util.spec_from_loader("mplb_bench", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def worker_pid(bench, master_pid, deadline):
    """The one worker process of the mplb whose master is ``master_pid``."""
    while time.monotonic() < deadline:
        for pid, (ppid, _, _) in bench.proc_stats().items():
            if ppid != master_pid:
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"worker process" in f.read():
                        return pid
            except OSError:
                continue
        time.sleep(0.05)
    raise RuntimeError("mplb started no worker process")


def probe_report(pid, directory, deadline):
    """Ask the worker for a heap report (SIGUSR2) and read it once it is written."""
    path = os.path.join(directory, f"worker-{pid}.json")
    before = os.stat(path).st_mtime_ns if os.path.exists(path) else None
    os.kill(pid, signal.SIGUSR2)
    while time.monotonic() < deadline:
        try:
            if os.stat(path).st_mtime_ns != before:
                with open(path) as f:
                    text = f.read()
                if text.endswith("\n"):
                    return json.loads(text)
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise RuntimeError("the worker wrote no memory report")


def uss_by_mapping(pid) -> dict:
    """The USS of ``pid`` in KiB by kind of mapping: the brk heap (glibc malloc), anonymous
    mappings (pymalloc arenas, large mallocs, thread stacks), files (code, shared memory)."""
    kinds = {"heap": 0, "anon": 0, "file": 0, "other": 0}
    kind = "other"
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                first = line.split(None, 6)
                if "-" in first[0] and len(first) >= 5 and ":" not in first[0]:
                    name = first[5].strip() if len(first) > 5 else ""
                    kind = ("heap" if name == "[heap]" else "anon" if not name
                            else "file" if name.startswith("/") else "other")
                elif first[0] in ("Private_Clean:", "Private_Dirty:"):
                    kinds[kind] += int(first[1])
    except OSError:
        pass
    return kinds


def per_tunnel_diff(before: dict, after: dict, tunnels: int, top: int) -> list:
    """``[[key, value per tunnel, ...]]`` of what grew most between two reports."""
    rows = []
    for key in set(before) | set(after):
        old, new = before.get(key), after.get(key)
        if isinstance(new, list) or isinstance(old, list):
            old, new = old or [0, 0], new or [0, 0]
            rows.append([key, (new[0] - old[0]) / tunnels, (new[1] - old[1]) / tunnels])
        else:
            rows.append([key, ((new or 0) - (old or 0)) / tunnels])
    rows.sort(key=lambda row: -abs(row[1]))
    return [[row[0]] + [round(v, 2) for v in row[1:]] for row in rows[:top]]


def hold_idle(bench, b, target, args, worker, probe_dir):
    """Open the idle tunnels, measure, let each echo once; the figures as a dict."""
    base_worker = bench.memory_kib([worker])[1]
    base_maps = uss_by_mapping(worker)
    base_all = bench.memory_kib(target.pids())[1]
    deadline = time.monotonic() + REPORT_TIMEOUT
    before = probe_report(worker, probe_dir, deadline) if probe_dir else None
    argv = [b.wsload, "-a", bench.HOST, "-p", str(target.ws_port), "-u", "/ws", "-m", "idle",
            "-c", str(args.tunnels), "-r", str(args.rate), "-T", "60", "-H", "120"]
    load = bench.PROCS.start("wsload-idle", argv, os.path.join(b.workdir, "wsload-idle.log"),
                             stdin=bench.subprocess.PIPE, stdout=bench.subprocess.PIPE)
    try:
        ready = bench.read_json_line(load, time.monotonic() + 90)
        if not ready:
            raise RuntimeError("wsload never reported its tunnels open")
        time.sleep(args.hold)
        held_worker = bench.memory_kib([worker])[1]
        held_maps = uss_by_mapping(worker)
        held_all = bench.memory_kib(target.pids())[1]
        after = (probe_report(worker, probe_dir, time.monotonic() + REPORT_TIMEOUT)
                 if probe_dir else None)
        load.stdin.write(b"go\n")
        load.stdin.flush()
        done = bench.read_json_line(load, time.monotonic() + 60)
        if not done:
            raise RuntimeError("wsload never reported the final echo")
    finally:
        bench.PROCS.stop(load)
    opened = max(ready["open"], 1)
    result = {"tunnels": args.tunnels, "opened": ready["open"], "echoed": done["msgs"],
              "worker_uss_base_kib": base_worker, "worker_uss_kib": held_worker,
              "uss_per_tunnel_kib": round((held_worker - base_worker) / opened, 3),
              "all_uss_per_tunnel_kib": round((held_all - base_all) / opened, 3),
              "uss_per_tunnel_by_mapping_b": {
                  kind: round((held_maps[kind] - base_maps[kind]) * 1024 / opened)
                  for kind in held_maps}}
    if probe_dir:
        result["traced_per_tunnel_b"] = round((after["traced"] - before["traced"]) / opened, 1)
        result["lines"] = per_tunnel_diff(before["lines"], after["lines"], opened, args.top)
        result["types"] = per_tunnel_diff(before["types"], after["types"], opened, args.top)
        result["garbage"] = per_tunnel_diff({}, after["garbage"], opened, args.top)
    return result


def measure(args) -> dict:
    bench = load_bench()
    name = "mplb-pure" if args.pure else "mplb"
    bench_args = bench.parse_args(["--targets", name, "--workers", "1",
                                   "--idle-conns", str(args.tunnels)]
                                  + (["--mplb", args.mplb] if args.mplb else []))
    b = bench.Bench(bench_args)
    probe_dir = os.path.join(b.workdir, "memprobe") if args.probe else None
    try:
        if b.mplb_cmd is None:
            raise RuntimeError("no mplb command (--mplb, $MPLB or mplb on PATH)")
        if 2 * args.tunnels + 200 > b.nofile:
            raise RuntimeError(f"{args.tunnels} tunnels need more descriptors than {b.nofile}")
        if probe_dir:
            os.makedirs(probe_dir)
            os.environ["MPLB_MEMPROBE_DIR"] = probe_dir
        b.start_backends()
        target = bench.Target(name, b)
        if not target.start():
            raise RuntimeError(f"mplb did not start (see {b.workdir})")
        worker = worker_pid(bench, target.proc.pid, time.monotonic() + 20)
        time.sleep(0.5)
        result = hold_idle(bench, b, target, args, worker, probe_dir)
        result["build"] = "pure-python" if args.pure else "compiled"
        return result
    finally:
        bench.PROCS.stop_all()
        if not args.keep:
            shutil.rmtree(b.workdir, ignore_errors=True)


def print_result(result: dict) -> None:
    print(f"{result['build']}: {result['opened']}/{result['tunnels']} idle tunnels, "
          f"{result['echoed']} echoed; worker USS {result['worker_uss_base_kib']} -> "
          f"{result['worker_uss_kib']} KiB: {result['uss_per_tunnel_kib']:.2f} KiB/tunnel "
          f"(all mplb processes: {result['all_uss_per_tunnel_kib']:.2f})")
    print("  per tunnel by mapping: " + ", ".join(
        f"{kind} {size} B" for kind, size in result["uss_per_tunnel_by_mapping_b"].items()))
    if "traced_per_tunnel_b" in result:
        print(f"traced by tracemalloc: {result['traced_per_tunnel_b']:.0f} B/tunnel")
        for key, size, count in result["lines"]:
            print(f"  {size:8.1f} B {count:6.2f} blocks  {key}")
        for title, key in (("objects the collector tracks", "types"),
                           ("cyclic garbage (freed only by a collection)", "garbage")):
            print(f"{title}, per tunnel:")
            for name, count in result[key]:
                print(f"  {count:6.2f}  {name}")
    print("TUNNELMEM " + json.dumps(result), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tunnels", type=int, default=2000, help="idle tunnels to open")
    ap.add_argument("--rate", type=int, default=200, help="handshakes in flight at most")
    ap.add_argument("--hold", type=float, default=2.0, help="seconds held before measuring")
    ap.add_argument("--pure", action="store_true", help="MPLB_PURE_PYTHON=1 (the .py files)")
    ap.add_argument("--probe", action="store_true", help="trace the worker's allocations")
    ap.add_argument("--top", type=int, default=20, help="lines and types shown with --probe")
    ap.add_argument("--mplb", help="mplb command (default $MPLB, else mplb on PATH)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    if args.tunnels < 1:
        ap.error("--tunnels must be at least 1")
    try:
        result = measure(args)
    except RuntimeError as exc:
        print(f"bench_tunnel_memory: {exc}", file=sys.stderr)
        return 1
    print_result(result)
    return 0 if result["opened"] == result["echoed"] == args.tunnels else 2


if __name__ == "__main__":
    sys.exit(main())
