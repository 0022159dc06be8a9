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


def test_readme_is_valid_restructuredtext():
    """The package index renders README.rst: a broken title or a stray line shows there."""
    import docutils.core
    import docutils.utils

    quiet = docutils.utils.Reporter.SEVERE_LEVEL + 1     # keep them in the tree, unprinted
    document = docutils.core.publish_doctree(
        read("README.rst"), settings_overrides={"report_level": quiet, "halt_level": quiet})
    problems = [node.astext() for node in document.findall(docutils.nodes.system_message)
                if node["level"] >= docutils.utils.Reporter.WARNING_LEVEL]
    assert problems == []
