"""The two builds: the compiled modules listed in mplb.compiled, or their .py files.

``make test`` runs the suite with MPLB_EXPECT_BUILD=compiled, then the end-to-end tests
with MPLB_PURE_PYTHON=1 MPLB_EXPECT_BUILD=pure-python: the first test here fails when
the build that runs is not the one the run meant to test.
"""
import importlib.machinery
import json
import os
import subprocess
import sys

import pytest

from mplb import compiled
from tests.harness import ROOT, Mplb, free_port, get

EXTENSION_SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def test_mplb_reports_the_build_it_runs():
    expected = os.environ.get("MPLB_EXPECT_BUILD") or compiled.build_name()
    port = free_port()
    mplb = Mplb(f"""events {{}}
http {{
    upstream b {{ server 127.0.0.1:9; }}
    server {{
        listen 127.0.0.1:{port};
        location /status {{ mplb_status; }}
        location / {{ proxy_pass http://b; }}
    }}
}}
""", workers=1, wait_ports=[port])
    try:
        code, _, body = get(port, "/status")
        assert code == 200
        assert json.loads(body)["build"] == expected
        code, _, body = get(port, "/status?format=prometheus")
        assert f'mplb_build_info{{build="{expected}"}} 1' in body.decode()
    finally:
        mplb.stop()
    assert f"build: {expected}" in mplb.output()


def _python(code, **env):
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return result


def test_pure_python_switch_loads_every_listed_module_from_its_source():
    out = _python("import importlib, json; from mplb import compiled\n"
                  "files = [importlib.import_module(m).__file__ for m in compiled.SOURCES]\n"
                  "print(json.dumps([files, compiled.build_name(), compiled.describe()]))",
                  MPLB_PURE_PYTHON="1").stdout
    files, name, line = json.loads(out)
    assert files and all(path.endswith(".py") for path in files)
    assert name == "pure-python"
    assert line == "build: pure-python (MPLB_PURE_PYTHON=1)"


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A checkout with a package whose module has a (fake) compiled file beside it."""
    (tmp_path / "setup.py").write_text("")
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    source = package / "mod.py"
    source.write_text("VALUE = 1\n")
    extension = package / ("mod" + EXTENSION_SUFFIX)
    extension.write_bytes(b"not loaded by these tests")
    monkeypatch.setitem(compiled.SOURCES, "pkg.mod", "pkg/mod.py")
    return source, extension, [str(package)]


def _origin(finder, path):
    return finder.find_spec("pkg.mod", path).origin


def test_compiled_module_is_preferred_while_it_is_newer_than_its_source(checkout):
    source, extension, path = checkout
    os.utime(source, (1_000_000, 1_000_000))
    os.utime(extension, (2_000_000, 2_000_000))
    assert _origin(compiled.SourceFinder(forced=False), path) == str(extension)
    assert _origin(compiled.SourceFinder(forced=True), path) == str(source)


def test_an_edited_source_wins_over_an_older_compiled_module(checkout):
    source, extension, path = checkout
    os.utime(extension, (1_000_000, 1_000_000))
    os.utime(source, (2_000_000, 2_000_000))
    assert _origin(compiled.SourceFinder(forced=False), path) == str(source)
    pxd = source.with_suffix(".pxd")              # an edited .pxd counts as an edit too
    pxd.write_text("")
    os.utime(source, (1_000_000, 1_000_000))
    os.utime(extension, (1_500_000, 1_500_000))
    os.utime(pxd, (2_000_000, 2_000_000))
    assert _origin(compiled.SourceFinder(forced=False), path) == str(source)


def test_modules_not_listed_are_left_to_the_usual_finders():
    assert compiled.SourceFinder(forced=True).find_spec("json", None) is None


def test_setup_without_cython_says_so_in_one_line_and_installs_the_fallback():
    result = _python("import sys; sys.modules['Cython'] = None\n"
                     "sys.argv = ['setup.py', '--name']\n"
                     "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))")
    assert result.stdout.strip() == "mplb"
    notes = [line for line in result.stderr.splitlines() if line.startswith("mplb:")]
    assert notes == ["mplb: Cython is not installed: installing the pure-Python build "
                     "(same behaviour, slower)"]


def test_setup_without_a_c_compiler_still_installs(tmp_path):
    result = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "temp")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "CC": "/bin/false", "LDSHARED": "/bin/false"})
    assert result.returncode == 0, result.stderr
    assert "did not compile" in result.stderr
    assert not list((tmp_path / "lib").rglob("*" + EXTENSION_SUFFIX))
