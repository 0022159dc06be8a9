"""Running the configurations of tests/nginx_configs on mplb and on a real nginx.

A corpus file names loopback ports as placeholders (tests/nginx_configs/README.md):
``ports_of`` finds them, ``substitute`` puts free ports in their place, and ``Nginx``
runs Debian's nginx on the result as a child process with its own prefix, pid file and
logs in a temporary directory (``daemon off``), stopped by pid like every test process.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile

from tests.harness import Process, port_open, wait_for

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nginx_configs")
NGINX = shutil.which("nginx") or next(
    (path for path in ("/usr/sbin/nginx", "/usr/local/nginx/sbin/nginx")
     if os.access(path, os.X_OK)), None)

_ADDRESS = re.compile(r"127\.0\.0\.1:(\d+)")
_LISTEN = re.compile(r"^\s*listen\s+127\.0\.0\.1:(\d+)", re.MULTILINE)


def corpus_files() -> list:
    return sorted(name for name in os.listdir(CORPUS) if name.endswith(".conf"))


def read(name: str) -> str:
    with open(os.path.join(CORPUS, name), encoding="utf-8") as handle:
        return handle.read()


def ports_of(text: str) -> tuple:
    """(listen ports, backend ports) written in a corpus file, in first-seen order."""
    listens = list(dict.fromkeys(int(port) for port in _LISTEN.findall(text)))
    everything = dict.fromkeys(int(port) for port in _ADDRESS.findall(text))
    return listens, [port for port in everything if port not in listens]


def substitute(text: str, mapping: dict) -> str:
    """The file with every placeholder port replaced by ``mapping[port]``."""
    return _ADDRESS.sub(lambda m: f"127.0.0.1:{mapping[int(m.group(1))]}", text)


def is_whole_nginx_conf(text: str) -> bool:
    """A whole nginx.conf (its own events and http blocks) rather than an http include."""
    return re.search(r"^\s*http\s*\{", text, re.MULTILINE) is not None


MAIN_CONF = """\
worker_processes 1;
events {{ worker_connections 512; }}
http {{
    access_log off;
    include {site};
}}
"""


class Nginx(Process):
    """Debian's nginx on one configuration, in the foreground, in a directory of its own."""

    def __init__(self, text: str, ports):
        self.dir = tempfile.mkdtemp(prefix="mplb-test-nginx-")
        for sub in ("logs", "conf"):
            os.makedirs(os.path.join(self.dir, sub))
        conf = os.path.join(self.dir, "conf", "nginx.conf")
        if is_whole_nginx_conf(text):
            main = text
        else:
            site = os.path.join(self.dir, "conf", "site.conf")
            with open(site, "w") as handle:
                handle.write(text)
            main = MAIN_CONF.format(site=site)
        with open(conf, "w") as handle:
            handle.write(main)
        # daemon, pid and the error log as the test needs them, whatever the file says
        globals_ = (f"daemon off; pid {self.dir}/nginx.pid; "
                    f"error_log {self.dir}/logs/error.log info;")
        argv = [NGINX, "-p", self.dir + "/", "-c", conf, "-e", f"{self.dir}/logs/startup.log",
                "-g", globals_]
        super().__init__(argv, name="nginx")
        with self.stopped_on_failure():
            for port in ports:
                wait_for(lambda: port_open(port) or not self.alive(),
                         message=f"nginx port {port}")
                if not self.alive():
                    raise RuntimeError(f"nginx exited early:\n{self.output()}\n"
                                       f"{self.error_log()}")

    def error_log(self) -> str:
        try:
            with open(os.path.join(self.dir, "logs", "error.log")) as handle:
                return handle.read()
        except OSError:
            return ""

    def stop(self, timeout=5.0):
        super().stop(timeout)
        shutil.rmtree(self.dir, ignore_errors=True)
