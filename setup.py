"""Packaging for mplb: the master side and shared state (mplb/) and the data plane.

The repository keeps the data plane in its top-level ``workers/`` folder; it is
installed as the subpackage ``mplb.workers``, so the distribution adds no top-level
name of its own besides ``mplb`` (the package index already has a ``workers``).
"""
import runpy
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

# The modules with a compiled build, listed once (mplb/compiled.py reads no package).
SOURCES = runpy.run_path("mplb/compiled.py")["SOURCES"]
PURE_PYTHON_NOTE = "mplb: {}: installing the pure-Python build (same behaviour, slower)"


def fallback(reason):
    print(PURE_PYTHON_NOTE.format(reason), file=sys.stderr)


def compiled_extensions():
    """The Cython extensions, or none when Cython is not there."""
    try:
        from Cython.Build import cythonize
    except ImportError:
        fallback("Cython is not installed")
        return []
    # Cython finds each module's .pxd by the name its folder gives (workers.fastpath);
    # setuptools then installs it under the package's name (mplb.workers.fastpath).
    names = {source[:-3].replace("/", "."): name for name, source in SOURCES.items()}
    # -Wno-array-bounds: GCC misreads Cython's comparisons with None as out of bounds.
    extensions = cythonize([Extension(local, [local.replace(".", "/") + ".py"],
                                      extra_compile_args=["-Wno-array-bounds"])
                            for local in names], quiet=True,
                           compiler_directives={"language_level": 3, "binding": False})
    for extension in extensions:
        extension.name = names[extension.name]
    return extensions


class OptionalBuildExt(build_ext):
    """A failed compile (no C compiler, no Python headers) leaves the .py files to run."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure means the fallback
            fallback(f"the fast path did not compile ({exc})")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            fallback(f"{ext.name} did not compile ({exc})")


setup(
    name="mplb",
    version="0.1.0",
    description="Multi-process pre-fork HTTP and WebSocket load balancer",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    packages=find_packages(include=["mplb", "mplb.*"]) + ["mplb.workers"],
    package_dir={"mplb.workers": "workers"},
    ext_modules=compiled_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    python_requires=">=3.9",
    install_requires=[
        "gevent>=23.9",
        "httptools>=0.6",
        "crossplane>=0.5.8",
        "psutil>=5.9",
        "setproctitle>=1.3",
        # shared_store: the master's store threads (imported only when configured)
        "redis>=5.0",
        "hiredis>=2.0; platform_python_implementation == 'CPython'",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-timeout>=2.1",
            "hypothesis>=6",
            "websocket-client>=1.6",
            "websockets>=12",
            "gevent-websocket>=0.10",
            "playwright>=1.40",
            "prometheus_client>=0.17",   # its text parser checks the /status exposition
            "Cython>=3.0",               # make test builds the compiled fast path in place
            "docutils>=0.18",            # the README must render on the package index
        ],
    },
    entry_points={
        "console_scripts": [
            "mplb = mplb.cli:main",
            "mplb-stats = mplb.stats_cli:main",
        ],
    },
    license="MIT",
)
