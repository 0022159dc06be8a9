"""``mplb-stats [-pid FILE | -conf FILE] [--watch SECONDS] [--json]``: a running mplb at a glance.

Finds the master (``-pid`` names its pid file; ``-conf`` uses the configuration's ``pid``
directive or else looks for the process titled ``mplb: master process -conf FILE``;
with neither, the only process titled ``mplb: master process ...``), its workers (the
master's children), and prints per process pid, role, generation, CPU %, RSS, open TCP
connections and uptime, then the per-server counters read from the master's shared
memory segment (``/dev/shm/mplb.<pid>``) mapped read-only.  Server rows are grouped by
upstream when ``-conf`` is given; otherwise they are listed by URL as the segment knows
them.

Needs no privileges: what the kernel does not let this user see (another user's open
connections, an unreadable segment) is shown as ``-`` / ``null`` with a warning.

Exit status: 0 on success, 1 when no master (or no readable pid file) is found, 2 on a
usage error or when several masters match (they are listed; pick one with ``-pid``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import psutil

from mplb.dashboard import human_bytes, human_duration, store_text
from mplb.shm import MASTER_TITLE, SharedState, segment_owner, segment_path

WORKER_TITLE = "mplb: worker process"
CPU_SAMPLE = 0.2
CLEAR = "\x1b[H\x1b[2J"


class StatsError(Exception):
    """A condition to report in one line; ``code`` is the exit status."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


def build_parser():
    parser = argparse.ArgumentParser(
        prog="mplb-stats",
        description="Show the processes and per-server counters of a running mplb.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("-pid", "--pid", dest="pid_file", metavar="FILE",
                       help="the master's pid file")
    where.add_argument("-conf", "--conf", "-c", dest="conf", metavar="FILE",
                       help="the master's configuration file (its pid directive, else the "
                            "process titled 'mplb: master process -conf FILE'); also "
                            "names the upstream of each server")
    parser.add_argument("--watch", "-watch", dest="watch", type=float, metavar="SECONDS",
                        help="redraw every SECONDS until interrupted")
    parser.add_argument("--json", "-json", dest="json", action="store_true",
                        help="print one JSON document (one per line with --watch)")
    parser.add_argument("--shm-dir", default="/dev/shm", help=argparse.SUPPRESS)
    return parser


# -- finding the master -------------------------------------------------------------------

def title_of(proc) -> str:
    """The process title as ``ps`` shows it (setproctitle rewrites the command line)."""
    try:
        return " ".join(part for part in proc.cmdline() if part).strip()
    except (psutil.Error, OSError):
        return ""


def conf_in_title(title: str):
    """FILE from ``mplb: master process -conf FILE`` (None if not a master title)."""
    if not title.startswith(MASTER_TITLE):
        return None
    rest = title[len(MASTER_TITLE):].strip()
    if rest.startswith("-conf "):
        return rest[len("-conf "):].strip()
    return rest or None


def all_masters() -> list:
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        if title_of(proc).startswith(MASTER_TITLE):
            found.append(proc)
    return found


def same_file(conf: str, title_conf: str, proc) -> bool:
    """Whether the master's ``-conf`` (relative to its cwd) names the file ``conf``."""
    if title_conf is None:
        return False
    if title_conf == conf:
        return True
    candidates = [title_conf]
    if not os.path.isabs(title_conf):
        try:
            candidates = [os.path.join(proc.cwd(), title_conf)]
        except (psutil.Error, OSError):
            candidates = [title_conf]
    want = os.path.realpath(conf)
    return any(os.path.realpath(c) == want for c in candidates)


def read_pid_file(path: str) -> int:
    try:
        with open(path) as handle:
            return int(handle.read().strip())
    except OSError as exc:
        raise StatsError(f'cannot read pid file "{path}": {exc.strerror}')
    except ValueError:
        raise StatsError(f'invalid pid file "{path}"')


def master_from_pid(pid: int, origin: str):
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            raise psutil.NoSuchProcess(pid)
    except psutil.NoSuchProcess:
        raise StatsError(f"no process with pid {pid} (from {origin}); is mplb running?")
    except psutil.AccessDenied:
        pass
    title = title_of(proc)
    if title and not title.startswith(MASTER_TITLE):
        raise StatsError(f'pid {pid} (from {origin}) is not an mplb master: "{title[:80]}"')
    return proc


def load_config(path: str, warnings: list):
    """The configuration at ``path`` (None, with a warning, when it does not load)."""
    from mplb.config import load
    from mplb.errors import MplbError
    try:
        return load(path)
    except (MplbError, OSError) as exc:
        warnings.append(f"cannot load {path} ({exc}); servers are listed by URL")
        return None


def find_master(args, config, warnings: list):
    """The master's psutil.Process per the command line (raises StatsError)."""
    if args.pid_file:
        return master_from_pid(read_pid_file(args.pid_file), f"pid file {args.pid_file}")
    if args.conf:
        if config is not None and config.pid:
            if os.path.exists(config.pid):
                return master_from_pid(read_pid_file(config.pid), f"pid file {config.pid}")
            warnings.append(f"pid file {config.pid} (from {args.conf}) is missing; "
                            "searching processes")
        matches = [p for p in all_masters() if same_file(args.conf, conf_in_title(title_of(p)), p)]
        if not matches:
            raise StatsError(f"no running mplb master with -conf {args.conf}")
        if len(matches) > 1:
            raise StatsError(several(matches), code=2)
        return matches[0]
    matches = all_masters()
    if not matches:
        raise StatsError("no running mplb master found (use -pid FILE or -conf FILE)")
    if len(matches) > 1:
        raise StatsError(several(matches), code=2)
    return matches[0]


def several(procs) -> str:
    lines = ["several mplb masters are running; choose one with -pid FILE (or -conf FILE):"]
    for proc in sorted(procs, key=lambda p: p.pid):
        lines.append(f"  {proc.pid:>8}  {title_of(proc)}")
    return "\n".join(lines)


# -- one snapshot -------------------------------------------------------------------------

class Sampler:
    """psutil.Process objects kept across frames so cpu_percent covers the interval."""

    def __init__(self):
        self.procs = {}

    def prime(self, procs) -> bool:
        """Start CPU accounting for processes not seen before; True if any were new."""
        fresh = False
        for proc in procs:
            if proc.pid not in self.procs:
                self.procs[proc.pid] = proc
                try:
                    proc.cpu_percent(None)
                except psutil.Error:
                    pass
                fresh = True
        return fresh

    def get(self, proc):
        return self.procs.get(proc.pid, proc)

    def forget_others(self, pids):
        for pid in list(self.procs):
            if pid not in pids:
                del self.procs[pid]


def process_info(proc, role, generation, now) -> dict:
    info = {"pid": proc.pid, "role": role, "generation": generation, "title": title_of(proc),
            "cpu_percent": None, "rss": None, "connections": None, "listening": None,
            "threads": None, "uptime_s": None, "status": None}
    try:
        with proc.oneshot():
            info["status"] = proc.status()
            info["uptime_s"] = round(max(0.0, now - proc.create_time()), 1)
            try:
                info["cpu_percent"] = round(proc.cpu_percent(None), 1)
            except psutil.AccessDenied:
                pass
            try:
                info["rss"] = proc.memory_info().rss
                info["threads"] = proc.num_threads()
            except psutil.AccessDenied:
                pass
    except psutil.NoSuchProcess:
        info["status"] = "gone"
        return info
    except psutil.AccessDenied:
        pass
    try:
        conns = (proc.net_connections(kind="tcp") if hasattr(proc, "net_connections")
                 else proc.connections(kind="tcp"))
        info["listening"] = sum(1 for c in conns if c.status == psutil.CONN_LISTEN)
        info["connections"] = len(conns) - info["listening"]
    except (psutil.AccessDenied, psutil.NoSuchProcess):
        pass
    return info


class Stats:
    """State kept between frames: the master, its segment mapping and the CPU sampler."""

    def __init__(self, args):
        self.args = args
        self.warnings_static = []
        self.config = load_config(args.conf, self.warnings_static) if args.conf else None
        self.master = None
        self.shared = None
        self.shared_pid = None
        self.sampler = Sampler()

    def close(self):
        if self.shared is not None:
            self.shared.close()
            self.shared = None

    def _master(self, warnings):
        if self.master is not None:
            try:
                if self.master.is_running() and self.master.status() != psutil.STATUS_ZOMBIE:
                    return self.master
            except psutil.Error:
                pass
        self.master = find_master(self.args, self.config, warnings)
        return self.master

    def _segment(self, pid, warnings):
        if self.shared is not None and self.shared_pid == pid:
            return self.shared
        self.close()
        path = segment_path(pid, self.args.shm_dir)
        try:
            if segment_owner(path) != pid:
                warnings.append(f"shared memory {path} is stale (its master no longer "
                                f"runs); ignored")
                return None
            self.shared = SharedState.open_readonly(path)
            self.shared_pid = pid
        except FileNotFoundError:
            warnings.append(f"shared memory {path} not found")
        except PermissionError:
            warnings.append(f"shared memory {path}: permission denied")
        except (OSError, ValueError) as exc:
            warnings.append(f"shared memory {path}: {exc}")
        if self.shared is not None and self.shared.master_pid != pid:
            warnings.append(f"shared memory {path} belongs to pid {self.shared.master_pid}")
        return self.shared

    def snapshot(self) -> dict:
        from mplb import status
        warnings = list(self.warnings_static)
        master = self._master(warnings)
        shared = self._segment(master.pid, warnings)
        try:
            children = master.children(recursive=False)
        except psutil.Error:
            children = []
        procs = [master] + children
        if self.sampler.prime(procs):
            time.sleep(CPU_SAMPLE)
        self.sampler.forget_others({p.pid for p in procs})
        data = status.collect(shared, self.config) if shared is not None else None
        generations = {w["pid"]: w["generation"] for w in (data or {}).get("workers", [])}
        now = time.time()
        rows = [process_info(self.sampler.get(master), "master",
                             data["generation"] if data else None, now)]
        for child in sorted(children, key=lambda p: p.pid):
            title = title_of(child)
            role = "worker" if title.startswith(WORKER_TITLE) or child.pid in generations \
                else "child"
            rows.append(process_info(self.sampler.get(child), role,
                                     generations.get(child.pid), now))
        doc = {
            "time": round(now, 3),
            "master": {"pid": master.pid, "title": title_of(master),
                       "conf": conf_in_title(title_of(master)),
                       "shm": segment_path(master.pid, self.args.shm_dir),
                       "generation": data["generation"] if data else None,
                       "reloads": data["reloads"] if data else None,
                       "uptime_s": data["uptime_s"] if data else rows[0]["uptime_s"]},
            "processes": rows,
            "servers": [],
            "persistence": {},
            "store": data.get("store") if data else None,
            "warnings": warnings,
        }
        if data is not None:
            if self.config is not None:
                for name, info in data["upstreams"].items():
                    doc["persistence"][name] = {
                        "kind": info["persistence"], "entries": info["persistence_entries"],
                        "capacity": info["persistence_capacity"]}
                    for server in info["servers"]:
                        doc["servers"].append(dict(server, upstream=name))
            else:
                doc["servers"] = [dict(server, upstream=None) for server in data["servers"]]
                doc["persistence"] = data.get("persistence_tables", {})
        return doc


# -- rendering ----------------------------------------------------------------------------

def _cell(value, fmt=str):
    return "-" if value is None else fmt(value)


def _table(headers, rows, right=()) -> list:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [line(headers)] + [line(r) for r in rows]


def format_text(doc) -> str:
    m = doc["master"]
    out = [f"mplb master {m['pid']}"
           + (f"  conf {m['conf']}" if m.get("conf") else "")
           + f"  generation {_cell(m['generation'])}  reloads {_cell(m['reloads'])}"
           + f"  uptime {human_duration(m['uptime_s'])}"
           + time.strftime("  at %H:%M:%S", time.localtime(doc["time"]))]
    store = doc.get("store")
    if store:
        out.append(f"store {store.get('url') or '(see -conf)'}  {store_text(store)}"
                   + (f"  dropped {store['dropped']}" if store.get("dropped") else ""))
    out.append("")
    rows = [[str(p["pid"]), p["role"], _cell(p["generation"]),
             _cell(p["cpu_percent"], lambda v: f"{v:.1f}"), _cell(p["rss"], human_bytes),
             _cell(p["connections"]), _cell(p["listening"]), human_duration(p["uptime_s"]),
             _cell(p["status"])]
            for p in doc["processes"]]
    out += _table(["PID", "ROLE", "GEN", "CPU%", "RSS", "CONNS", "LISTEN", "UPTIME", "STATUS"],
                  rows, right={0, 2, 3, 4, 5, 6, 7})
    out.append("")
    if doc["servers"]:
        rows = [[_cell(s.get("upstream")), s["server"], s["state"], _cell(s.get("weight")),
                 str(s["active"]), str(s["tunnels"]), str(s["requests"]), str(s["failures"]),
                 human_bytes(s["bytes_in"]), human_bytes(s["bytes_out"])]
                for s in doc["servers"]]
        out += _table(["UPSTREAM", "SERVER", "STATE", "WEIGHT", "ACTIVE", "TUNNELS",
                       "REQUESTS", "FAILURES", "BYTES_IN", "BYTES_OUT"],
                      rows, right={3, 4, 5, 6, 7, 8, 9})
    else:
        out.append("(no server counters)")
    tables = [(name, t) for name, t in doc["persistence"].items()
              if t.get("kind", "table") != "none"]
    if tables:
        out.append("")
        out += _table(["PERSISTENCE", "KIND", "ENTRIES", "CAPACITY"],
                      [[name, t.get("kind", "-"), str(t["entries"]), str(t["capacity"])]
                       for name, t in tables], right={2, 3})
    for warning in doc["warnings"]:
        out.append(f"warning: {warning}")
    return "\n".join(out) + "\n"


# -- main ---------------------------------------------------------------------------------

def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.watch is not None and not args.watch > 0:
        print("mplb-stats: --watch needs a positive number of seconds", file=sys.stderr)
        return 2
    stats = Stats(args)
    try:
        if args.watch is None:
            try:
                doc = stats.snapshot()
            except StatsError as exc:
                print(f"mplb-stats: {exc}", file=sys.stderr)
                return exc.code
            sys.stdout.write(json.dumps(doc, indent=2) + "\n" if args.json else format_text(doc))
            return 0
        return watch(stats, args)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return 0
    finally:
        stats.close()


def watch(stats, args) -> int:
    """Redraw every ``args.watch`` seconds until interrupted (errors are shown, not fatal)."""
    while True:
        try:
            doc = stats.snapshot()
            frame = None
        except StatsError as exc:
            doc, frame = None, f"mplb-stats: {exc}\n(retrying every {args.watch:g}s)\n"
            stats.master = None
        if args.json:
            sys.stdout.write(json.dumps(doc if doc is not None else
                                        {"time": round(time.time(), 3), "error": frame.strip()})
                             + "\n")
        else:
            text = frame if doc is None else format_text(doc)
            sys.stdout.write(CLEAR + text + f"\n(every {args.watch:g}s; Ctrl-C to quit)\n")
        sys.stdout.flush()
        time.sleep(args.watch)


if __name__ == "__main__":
    sys.exit(main())
