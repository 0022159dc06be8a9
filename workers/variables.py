"""Every variable a worker can compute, as a function ``request -> str``.

The built-in variables are in workers/request.py (``VARIABLES``, and ``$http_NAME`` for
any header).  The configuration adds map variables (``map $source $name {...}``) and
the named captures of ``server_name`` regexes.  A ``VariableTable`` is built once per
worker from the frozen Config; ``getter(name)`` gives the most direct function for a
name, and ``compile_template`` turns a Template's parts into one function, so a request
pays only for the variables its templates actually read.

Map variables and captures are evaluated lazily, at most once per request: the first
use stores the value in ``request.derived``.  Regexes were compiled at load.
"""
from __future__ import annotations

from mplb.vocabulary import HEADER_VARIABLE_PREFIX
from mplb.workers.request import VARIABLES


def _empty(request) -> str:
    return ""


def header_getter(name: str):
    """``$http_x_user`` reads the X-User header (the first value; cookies joined)."""
    header = name[len(HEADER_VARIABLE_PREFIX):].replace("_", "-")
    return lambda request: request.header(header) or ""


def compile_template(parts, getter):
    """One function request -> str for a template, as direct as the template allows."""
    if len(parts) == 1 and parts[0][0]:
        return getter(parts[0][1])
    if all(not is_variable for is_variable, _ in parts):
        literal = "".join(text for _, text in parts)
        return lambda request: literal
    pieces = tuple(getter(text) if is_variable else text for is_variable, text in parts)
    return lambda request: "".join(piece if piece.__class__ is str else piece(request)
                                   for piece in pieces)


def cached(name: str, compute):
    """``compute(request)``, evaluated once per request and kept in ``request.derived``."""
    def value_of(request):
        derived = request.derived
        if derived is None:
            derived = request.derived = {}
        value = derived.get(name)
        if value is None:
            value = derived[name] = compute(request)
        return value
    return value_of


class MapVariable:
    """The value of one ``map`` for a request (see mplb.config.model.VariableMap)."""

    def __init__(self, vmap, table):
        self.vmap = vmap
        self.table = table
        self.source_of = None
        self._values = {}                  # id(Template) -> function
        # A regex entry's value may read that regex's captures: names in lower case.
        self._groups = {id(regex): {name.lower(): index
                                    for name, index in regex.groupindex.items()}
                        for regex, _ in vmap.regexes}

    def prepare(self) -> None:
        """Compile the source and the values, once every map of the table exists."""
        vmap, getter = self.vmap, self.table.getter
        self.source_of = compile_template(vmap.source.parts, getter)
        templates = [vmap.default, *vmap.exact.values()]
        templates += [value for _, value in vmap.leading + vmap.trailing]
        self._values = {id(template): compile_template(template.parts, getter)
                        for template in templates}

    def __call__(self, request) -> str:
        template, match = self.vmap.select(self.source_of(request))
        if match is None:
            return self._values[id(template)](request)
        return "".join(self._part(request, match, is_variable, text)
                       for is_variable, text in template.parts)

    def _part(self, request, match, is_variable, text) -> str:
        if not is_variable:
            return text
        if text.isdigit():
            index = int(text)
            return (match.group(index) or "") if index <= match.re.groups else ""
        index = self._groups[id(match.re)].get(text)
        if index is not None:
            return match.group(index) or ""
        return self.table.getter(text)(request)


class VariableTable:
    """name -> function(request) -> str, for one worker's configuration."""

    def __init__(self, config=None, router=None):
        self.router = router
        self._getters = {}
        self._defined = {}
        self._templates = {}
        if config is not None:
            maps = [MapVariable(vmap, self) for vmap in config.maps.values()]
            for variable in maps:
                self._defined[variable.vmap.name] = cached(variable.vmap.name, variable)
            for name in config.capture_names:
                self._defined.setdefault(name, cached(name, self._capture_getter(name)))
            for variable in maps:
                variable.prepare()

    def getter(self, name: str):
        """The function computing ``$name`` (empty text for a name nothing defines)."""
        getter = self._getters.get(name)
        if getter is None:
            getter = VARIABLES.get(name) or self._defined.get(name)
            if getter is None:
                getter = (header_getter(name) if name.startswith(HEADER_VARIABLE_PREFIX)
                          else _empty)
            self._getters[name] = getter
        return getter

    def value(self, request, name: str) -> str:
        return self.getter(name)(request)

    def compiled(self, parts):
        """``compile_template(parts)``, kept: the configuration has finitely many."""
        render = self._templates.get(parts)
        if render is None:
            render = self._templates[parts] = compile_template(parts, self.getter)
        return render

    def _capture_getter(self, name: str):
        def capture(request):
            conn = request.conn
            return self.router.capture(conn.listen_key, request.host, name)
        return capture


BUILT_IN = VariableTable()           # for code without a worker (tests, tools)
