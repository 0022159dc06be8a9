"""Error-log set-up shared by the master and (inherited through fork) the workers.

Lines look like nginx's: ``2026/11/28 13:40:01 [info] 4242#0: message``.  Logs go to
stderr and, with ``error_log FILE``, to that file as well.  The master opens the file
(workers inherit it); on USR1 the master reopens it and passes the new descriptor to
the workers (mplb.logfiles), which never open the path themselves.
"""
from __future__ import annotations

import logging
import os
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


def warn_config(config):
    """Log what a configuration asks that cannot be done here (``Config.warnings``)."""
    for warning in config.warnings:
        logging.getLogger("mplb.master").warning("%s", warning)


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


def _file_handler():
    return next((handler for handler in logging.getLogger("mplb").handlers
                 if isinstance(handler, logging.FileHandler)), None)


def error_log_fd():
    """The descriptor of the error_log file, None when logging to stderr only."""
    handler = _file_handler()
    return handler.stream.fileno() if handler is not None and handler.stream else None


def use_error_log_fd(fd: int) -> None:
    """Worker, after USR1: write the error log to ``fd``, which the master opened anew."""
    handler = _file_handler()
    if handler is None:
        os.close(fd)
        return
    handler.acquire()
    try:
        old, handler.stream = handler.stream, os.fdopen(fd, "a", encoding="utf-8")
        if old is not None:
            old.close()
    finally:
        handler.release()
