"""Command line: ``mplb -conf FILE [-v] [-t] [-workers N] [-pid FILE] [-s SIGNAL]``.

The only module that prints and exits; everything below it raises.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

from mplb.errors import MplbError

DEFAULT_CONF = "etc/loadbalancer.conf"
SIGNALS = {"reload": signal.SIGHUP, "stop": signal.SIGTERM, "quit": signal.SIGQUIT,
           "reopen": signal.SIGUSR1}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="mplb", description="Multi-process pre-fork HTTP and WebSocket load balancer.")
    parser.add_argument("-conf", "--conf", "-c", dest="conf", default=DEFAULT_CONF,
                        metavar="FILE", help=f"configuration file (default {DEFAULT_CONF})")
    parser.add_argument("-v", dest="verbose", action="store_true",
                        help="verbose: debug logging, one line per upgrade request")
    parser.add_argument("-t", dest="test", action="store_true",
                        help="check the configuration and exit")
    parser.add_argument("-workers", "--workers", dest="workers", type=int, metavar="N",
                        help="override worker_processes")
    parser.add_argument("-pid", "--pid", dest="pid", metavar="FILE",
                        help="write the master's pid to FILE")
    parser.add_argument("-s", dest="signal", choices=sorted(SIGNALS),
                        help="send a signal to the running master and exit")
    return parser


def fail(message, code=1):
    print(f"mplb: {message}", file=sys.stderr)
    return code


def send_signal(args, config_pid):
    pid_file = args.pid or config_pid
    if not pid_file:
        return fail('no pid file: use -pid FILE or the "pid" directive')
    try:
        with open(pid_file) as handle:
            pid = int(handle.read().strip())
    except (OSError, ValueError) as exc:
        return fail(f'invalid pid file "{pid_file}": {exc}')
    try:
        os.kill(pid, SIGNALS[args.signal])
    except ProcessLookupError:
        return fail(f"no master process with pid {pid}")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.workers is not None and args.workers < 1:
        return fail("-workers must be at least 1")
    from mplb.config import load
    try:
        config = load(args.conf)
    except MplbError as exc:
        if args.test:
            print(f"mplb: {exc}", file=sys.stderr)
            print(f"mplb: configuration file {args.conf} test failed", file=sys.stderr)
            return 1
        if not args.signal:
            return fail(str(exc))
        config = None
    if args.test:
        for warning in config.warnings:
            print(f"mplb: [warn] {warning}", file=sys.stderr)
        print(f"mplb: the configuration file {args.conf} syntax is ok", file=sys.stderr)
        print(f"mplb: configuration file {args.conf} test is successful", file=sys.stderr)
        return 0
    if args.signal:
        return send_signal(args, config.pid if config else None)
    from setproctitle import setproctitle
    from mplb import logs
    from mplb.master import Master
    setproctitle(f"mplb: master process -conf {args.conf}")
    logs.setup(config.error_log, args.verbose)
    logs.warn_config(config)
    master = Master(config, args.conf, verbose=args.verbose, workers_override=args.workers,
                    pid_file=args.pid)
    try:
        master.start()
    except MplbError as exc:
        master.cleanup()
        return fail(str(exc))
    except OSError as exc:
        master.cleanup()
        return fail(str(exc))
    code = master.run()
    if code:
        return fail("a worker process failed to start; see the log above", code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
