"""Packaging for mplb: the master side and shared state (mplb/) and the data plane.

The repository keeps the data plane in its top-level ``workers/`` folder; it is
installed as the subpackage ``mplb.workers``, so the distribution adds no top-level
name of its own besides ``mplb`` (the package index already has a ``workers``).
"""
from setuptools import find_packages, setup

setup(
    name="mplb",
    version="0.1.0",
    description="Multi-process pre-fork HTTP and WebSocket load balancer",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    packages=find_packages(include=["mplb", "mplb.*"]) + ["mplb.workers"],
    package_dir={"mplb.workers": "workers"},
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
