"""Error-log set-up shared by the master and (inherited through fork) the workers.

Lines look like nginx's: ``2026/11/28 13:40:01 [info] 4242#0: message``.  Logs go to
stderr and, with ``error_log FILE``, to that file as well; USR1 reopens the file.
"""
from __future__ import annotations

import logging
import sys

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
          "error": logging.ERROR}
_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn",
          logging.ERROR: "error", logging.CRITICAL: "crit"}


class _Formatter(logging.Formatter):
    def format(self, record):
        stamp = self.formatTime(record, "%Y/%m/%d %H:%M:%S")
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return f"{stamp} [{_NAMES.get(record.levelno, 'info')}] {record.process}#0: {message}"


def setup(error_log=None, verbose=False):
    """Configure the 'mplb' logger: stderr always, plus the error_log file if any."""
    root = logging.getLogger("mplb")
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    level = logging.DEBUG if verbose else LEVELS.get(getattr(error_log, "level", "info"),
                                                     logging.INFO)
    root.setLevel(level)
    root.propagate = False
    formatter = _Formatter()
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(formatter)
    root.addHandler(stream)
    path = getattr(error_log, "path", None)
    if path and path != "stderr":
        file_handler = logging.FileHandler(path, encoding="utf-8")
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)
    return root


def reopen():
    """USR1: reopen the error_log file (after log rotation moved it away)."""
    for handler in logging.getLogger("mplb").handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                handler.close()
                handler.stream = handler._open()
            finally:
                handler.release()


def warn_config(config) -> None:
    """What a configuration accepted but ignores (nginx-only directives), once a load."""
    log = logging.getLogger("mplb.config")
    for warning in config.warnings:
        log.warning("%s", warning)
