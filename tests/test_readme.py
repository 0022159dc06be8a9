"""README.rst stays true: the directive reference matches the registry, commands exist."""
import os

from mplb.config.docs import embed_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as handle:
        return handle.read()


def test_directive_reference_is_current():
    text = read("README.rst")
    assert embed_reference(text) == text, \
        "README.rst is stale: run python -m mplb.config.docs --update README.rst"


def test_readme_commands_exist():
    text = read("README.rst")
    makefile = read("Makefile")
    for target in ("demo", "test"):
        assert f"make {target}" in text
        assert f"\n{target}:" in makefile
    assert "make test" in read(".ci/run")
