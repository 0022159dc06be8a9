"""The import rules that keep the layout honest (docs/ARCHITECTURE.md, "Map").

Checked twice: on the source (each module's own imports, read with ast) and at run
time (what importing the master side really pulls in, in a fresh interpreter).
"""
import ast
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASTER_SIDE = ("mplb.cli", "mplb.master", "mplb.listeners", "mplb.workerboot",
               "mplb.health", "mplb.reservation", "mplb.logs", "mplb.errors",
               "mplb.control", "mplb.store.sync", "mplb.store.client", "mplb.store.codec",
               "mplb.store.plan")


def module_files(package_dir):
    return sorted(glob.glob(os.path.join(ROOT, package_dir, "**", "*.py"), recursive=True))


def imports_of(path, top_level_only=False):
    """Modules a file imports (absolute names); with ``top_level_only``, only the
    imports that run when the module is imported, not those inside functions."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def mplb_imports(path, top_level_only=False):
    return {name for name in imports_of(path, top_level_only)
            if name == "mplb" or name.startswith("mplb.")}


def loaded_after(statement):
    """Module names present after running ``statement`` in a fresh interpreter."""
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_master_side_never_loads_gevent_nor_the_data_plane(tmp_path):
    conf = tmp_path / "t.conf"
    conf.write_text("upstream a { server 127.0.0.1:1; }\n"
                    "server { listen 127.0.0.1:1; location / { proxy_pass a; } }\n")
    loaded = loaded_after(f"import {', '.join(MASTER_SIDE)}\n"
                          f"from mplb.config import load; load({str(conf)!r})")
    assert not {m for m in loaded if m.split(".")[0] == "gevent"}
    assert not {m for m in loaded if m.startswith("mplb.workers") or m == "workers"}


@pytest.mark.parametrize("path", module_files("mplb/config"), ids=os.path.basename)
def test_configuration_never_imports_the_data_plane(path):
    forbidden = ("mplb.workers", "mplb.balancing", "mplb.methods", "mplb.persistence",
                 "mplb.shm", "mplb.status", "mplb.master")
    bad = {name for name in mplb_imports(path) if name.startswith(forbidden)}
    assert not bad, f"{os.path.relpath(path, ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", module_files("mplb/shm"), ids=os.path.basename)
def test_shared_layout_imports_nothing_above_it(path):
    allowed = {"mplb.errors"}
    bad = {name for name in mplb_imports(path)
           if not name.startswith("mplb.shm") and name not in allowed
           and not name.startswith("mplb.errors.")}
    assert not bad, f"{os.path.relpath(path, ROOT)} imports {sorted(bad)}"


def test_the_master_without_a_store_never_loads_redis(tmp_path):
    conf = tmp_path / "t.conf"
    conf.write_text("upstream a { server 127.0.0.1:1; }\n"
                    "server { listen 127.0.0.1:1; location / { proxy_pass a; } }\n")
    loaded = loaded_after("import mplb.cli, mplb.master, mplb.workerboot, mplb.health\n"
                          f"from mplb.config import load; load({str(conf)!r})")
    assert not {m for m in loaded if m.split(".")[0] == "redis"
                or m.startswith("mplb.store.")}


def test_vocabulary_imports_nothing_of_mplb():
    assert not mplb_imports(os.path.join(ROOT, "mplb", "vocabulary.py"))


@pytest.mark.parametrize("module", MASTER_SIDE)
def test_master_side_modules_import_no_gevent_at_module_level(module):
    path = os.path.join(ROOT, *module.split(".")) + ".py"
    names = imports_of(path, top_level_only=True)
    bad = {n for n in names if n.split(".")[0] == "gevent" or n.startswith("mplb.workers")}
    assert not bad, f"{module} imports {sorted(bad)}"


def test_nothing_imports_a_top_level_workers_package():
    for path in module_files("mplb") + module_files("workers") + module_files("tests"):
        names = imports_of(path)
        assert not {n for n in names if n == "workers" or n.startswith("workers.")}, path


def test_the_distribution_installs_only_mplb(tmp_path):
    """The package index already has a 'workers': the data plane installs as
    mplb.workers and the build holds no other top-level package."""
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib",
                             str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["mplb"]
    for module in ("worker.py", "tunnel.py", "process.py"):
        assert (tmp_path / "mplb" / "workers" / module).exists()


def test_workers_compute_exactly_the_variables_the_vocabulary_names():
    from mplb import vocabulary
    from mplb.workers.request import VARIABLES
    assert set(VARIABLES) == set(vocabulary.VARIABLES)


def test_every_method_name_has_a_plugin():
    from mplb import methods, vocabulary
    assert set(methods.PLUGINS) == set(vocabulary.METHODS)
