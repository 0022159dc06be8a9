"""Which modules have a compiled build, and which build this process runs.

Why one list: setup.py compiles exactly these modules with Cython, ``MPLB_PURE_PYTHON=1``
bypasses exactly these, and ``mplb -v`` and the status page report on exactly these.
Each is an ordinary Python module (Cython's pure-Python mode); a ``.pxd`` beside it, when
there is one, gives Cython the types.  Without a compiler the same ``.py`` files run.

This module imports only the standard library: setup.py reads it before anything is
installed.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

# module name -> its source, relative to the repository root
SOURCES = {
    "mplb.workers.deadlines": "workers/deadlines.py",
    "mplb.workers.fastpath": "workers/fastpath.py",
    "mplb.workers.responsehead": "workers/responsehead.py",
}
PURE_PYTHON_ENV = "MPLB_PURE_PYTHON"


def pure_python_forced() -> bool:
    return os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0")


def _source_of(extension_path: str, name: str) -> str:
    return os.path.join(os.path.dirname(extension_path), name.rpartition(".")[2] + ".py")


def _in_checkout(source: str) -> bool:
    """A source checkout (setup.py at the top), where a source can be edited after a build."""
    top = os.path.dirname(os.path.dirname(os.path.abspath(source)))
    return os.path.isfile(os.path.join(top, "setup.py"))


def _stale(extension_path: str, source: str) -> bool:
    """A compiled module built before its ``.py`` or ``.pxd`` was last edited."""
    built = os.path.getmtime(extension_path)
    stem = os.path.splitext(source)[0]
    return any(os.path.exists(path) and os.path.getmtime(path) > built
               for path in (source, stem + ".pxd"))


class SourceFinder:
    """Loads a listed module from its ``.py`` instead of its compiled file, when the
    pure-Python build is asked for, or when (in a checkout) the compiled file is older
    than the source: an edit is never hidden by yesterday's build."""

    def __init__(self, forced: bool):
        self.forced = forced

    def find_spec(self, name, path=None, target=None):
        if name not in SOURCES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            return spec
        source = _source_of(spec.origin, name)
        if not os.path.exists(source):
            return spec
        if self.forced or (_in_checkout(source) and _stale(spec.origin, source)):
            return importlib.util.spec_from_file_location(name, source)
        return spec


def install_finder() -> None:
    """Put the SourceFinder first on the import path (once)."""
    if not any(isinstance(finder, SourceFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, SourceFinder(pure_python_forced()))


def _package_folders(name: str) -> list:
    """Where ``name``'s package (mplb.workers) sits, from mplb's own search path."""
    import mplb
    package = name.split(".")[1]
    return [os.path.join(folder, package) for folder in mplb.__path__]


def module_builds() -> dict:
    """``{module: "compiled" | "python"}`` as this process imports (or would import) them."""
    builds = {}
    for name in SOURCES:
        module = sys.modules.get(name)
        if module is not None:
            origin = getattr(module, "__file__", "") or ""
        else:                # found, not imported: the master never imports the data plane
            spec = SourceFinder(pure_python_forced()).find_spec(name, _package_folders(name))
            origin = spec.origin if spec is not None else ""
        compiled = origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
        builds[name] = "compiled" if compiled else "python"
    return builds


def build_name(builds: dict | None = None) -> str:
    """"compiled" when every listed module is, "pure-python" when none is, else "partial"."""
    kinds = set((builds or module_builds()).values())
    if kinds == {"compiled"}:
        return "compiled"
    return "pure-python" if kinds == {"python"} else "partial"


def describe() -> str:
    """One line for the log: the build, and why when it is not the compiled one."""
    builds = module_builds()
    name = build_name(builds)
    if name == "compiled":
        return "build: compiled (Cython: " + ", ".join(
            module.rpartition(".")[2] for module in builds) + ")"
    if pure_python_forced():
        return f"build: pure-python ({PURE_PYTHON_ENV}=1)"
    missing = [module.rpartition(".")[2] for module, kind in builds.items() if kind == "python"]
    return f"build: {name} (not compiled: {', '.join(missing)})"
