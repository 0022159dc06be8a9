"""Render the directive reference (reStructuredText, nginx style) from the registry.

Generated, never hand-written, so the documentation cannot drift from what ``load``
accepts.  ``python -m mplb.config.docs`` prints it; the docs build includes the output.
"""
from __future__ import annotations

import sys

from mplb.config import nginx, registry
from mplb.config.values import VARIABLES

SECTIONS = (
    ("Main context", registry.MAIN),
    ("upstream block", registry.UPSTREAM),
    ("server block", registry.SERVER),
    ("location block", registry.LOCATION),
)
CONTEXT_NAMES = {registry.MAIN: "main, http"}

UNITS = """\
Units
-----

Times accept ``ms``, ``s``, ``m``, ``h`` and ``d`` suffixes, combinable from the largest
unit down (``1h30m``); a bare number is seconds.  Sizes accept ``k``, ``m`` and ``g``
(1024-based, either case); a bare number is bytes.

Variables usable in ``proxy_set_header`` values (``$name`` or ``${name}``), in ``return``,
in ``map`` and as the ``consistent_hash`` (``hash``) key: {variables}, ``$http_NAME`` for
any request header (lower case, dashes as underscores), every ``map`` variable, and the
named captures of ``server_name`` regexes.

Directives marked *inherited* are valid at main level, in ``server`` and in ``location``;
a level that does not set one takes the enclosing level's value.  ``proxy_set_header``
and the ``allow``/``deny`` rules are inherited as a whole, and only by a level that has
none of its own (the nginx rule).
"""


def home_context(entry: registry.Directive) -> str:
    """The section a directive is documented in: the innermost context it belongs to."""
    if entry.inherited:
        return registry.SERVER
    if len(entry.contexts) > 3:     # include: anywhere
        return registry.MAIN
    for _, context in reversed(SECTIONS):
        if context in entry.contexts:
            return context
    return registry.MAIN


def render_directive(entry: registry.Directive) -> str:
    title = entry.name
    if entry.name == "server":
        title = f"server ({'upstream' if registry.UPSTREAM in entry.contexts else 'block'})"
    if entry.name in ("http", "events"):
        contexts = "main"
    elif len(entry.contexts) > 3:
        contexts = "any"
    else:
        contexts = ", ".join(CONTEXT_NAMES.get(ctx, ctx) for ctx in entry.contexts)
    syntax = f"{entry.name} {entry.syntax}".replace(" ;", ";")
    default = "—" if entry.default == "—" else f"``{entry.default}``"
    lines = [title, "~" * len(title), "",
             f":Syntax: ``{syntax}``",
             f":Default: {default}",
             f":Context: {contexts}" + (" (inherited)" if entry.inherited else ""), ""]
    if not entry.supported:
        lines += ["*Not supported yet: refused at load.*", ""]
    lines += [entry.help, "", "Example::", ""]
    lines += ["    " + line for line in entry.example.splitlines()]
    lines.append("")
    return "\n".join(lines)


NGINX_INTRO = """\
nginx directives
----------------

Directives of nginx that mplb does not implement.  Those that only tune nginx itself are
accepted, each with one warning naming its file and line (``mplb -t`` prints them as
``mplb: [warn] FILE:LINE: ...``; a running mplb logs them at start and at every reload).
Those that would change what a client or a backend sees are refused: an error names the
file, the line and the directive.  Any other directive is unknown, also an error.
``include mime.types`` (any path ending in ``mime.types``, present or not) is ignored
with a warning and not read.  ``listen`` parameters ``{listen_ignored}`` are ignored with
a warning; ``{listen_refused}`` are refused.
"""


def render_nginx_tables() -> str:
    """The nginx-only directives, grouped by reason: ignored first, then refused."""
    intro = NGINX_INTRO.replace("{listen_ignored}", "``, ``".join(nginx.LISTEN_IGNORED))
    intro = intro.replace("{listen_refused}", "``, ``".join(nginx.LISTEN_REFUSED))
    parts = [intro]
    for heading, ignored in (("Accepted with a warning", True), ("Refused", False)):
        groups = {}
        for entry in nginx.TABLE:
            if entry.only is not None:
                value = " | ".join(entry.only)
                reason = entry.why if ignored else entry.refused_why
                groups.setdefault(reason, []).append(
                    f"``{entry.name} {value}``" if ignored else
                    f"``{entry.name}`` (other than {value})")
            elif entry.ignored == ignored:
                groups.setdefault(entry.why, []).append(f"``{entry.name}``")
        parts += [f"{heading}:", ""]
        parts += [f"- {', '.join(names)}: {reason}." for reason, names in groups.items()]
        parts.append("")
    return "\n".join(parts)


def render_reference() -> str:
    """The whole directive reference as one reStructuredText document."""
    title = "mplb directive reference"
    variables = ", ".join(f"``${name}``" for name in sorted(VARIABLES))
    units = UNITS.replace("{variables}", variables)
    parts = [title, "=" * len(title), "", units]
    for heading, context in SECTIONS:
        parts += [heading, "-" * len(heading), ""]
        for entry in registry.DIRECTIVES:
            if home_context(entry) == context:
                parts.append(render_directive(entry))
    parts.append(render_nginx_tables())
    return "\n".join(parts)


BEGIN_MARK = ".. BEGIN DIRECTIVE REFERENCE (generated by python -m mplb.config.docs --update)"
END_MARK = ".. END DIRECTIVE REFERENCE"


def embed_reference(text: str) -> str:
    """``text`` (README.rst) with the part between the markers replaced by the reference."""
    head, begin, rest = text.partition(BEGIN_MARK)
    _, end, tail = rest.partition(END_MARK)
    if not begin or not end:
        raise ValueError("README markers for the directive reference are missing")
    return f"{head}{BEGIN_MARK}\n\n{render_reference().rstrip()}\n\n{END_MARK}{tail}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--update"] and len(argv) == 2:
        with open(argv[1], encoding="utf-8") as handle:
            text = handle.read()
        with open(argv[1], "w", encoding="utf-8") as handle:
            handle.write(embed_reference(text))
        return 0
    sys.stdout.write(render_reference())
    return 0


if __name__ == "__main__":
    sys.exit(main())
