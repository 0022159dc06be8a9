"""Render the directive reference (reStructuredText, nginx style) from the registry.

Generated, never hand-written, so the documentation cannot drift from what ``load``
accepts.  ``python -m mplb.config.docs`` prints it; the docs build includes the output.
"""
from __future__ import annotations

import sys

from mplb.config import registry
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

Variables usable in ``proxy_set_header`` values (``$name`` or ``${name}``) and as the
``consistent_hash`` key: {variables}, and ``$http_NAME`` for any request header (lower
case, dashes as underscores).

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
    return "\n".join(parts)


def main() -> int:
    sys.stdout.write(render_reference())
    return 0


if __name__ == "__main__":
    sys.exit(main())
