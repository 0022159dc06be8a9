"""Request routing as nginx does it: virtual server by Host, then location by URI.

Both tables are built once per worker from the frozen Config, so a request costs a
dict lookup or two and, only when the configuration has regex locations, a regex scan.
"""
from __future__ import annotations

from typing import Optional

from mplb.config.model import first_match, match_wildcards


class ServerNameTable:
    """Virtual servers sharing one listen socket, selected by host name.

    Order of precedence (nginx): exact name, longest leading wildcard
    (``*.example.com``), longest trailing wildcard (``example.*``), regex names
    (``~pattern``) in file order, else the ``default_server`` or the first block.
    """

    def __init__(self, vservers, listen_key):
        self.exact = {}
        self.leading = []     # (suffix '.example.com', vserver), longest first
        self.trailing = []    # (prefix 'example.', vserver), longest first
        self.regexes = []
        self.default = vservers[0]
        for vserver in vservers:
            for listen in vserver.listens:
                if listen.key == listen_key and listen.default_server:
                    self.default = vserver
            for name in vserver.server_names:
                self._add_name(name, vserver)
            self.regexes.extend((regex, vserver) for regex in vserver.name_regexes)
        self.leading.sort(key=lambda item: -len(item[0]))
        self.trailing.sort(key=lambda item: -len(item[0]))
        self._cache = {}

    def _add_name(self, name, vserver):
        if name.startswith("*."):
            self.leading.append((name[1:], vserver))
        elif name.startswith("."):
            # '.example.com' matches example.com and *.example.com (nginx)
            self.exact.setdefault(name[1:], vserver)
            self.leading.append((name, vserver))
        elif name.endswith(".*"):
            self.trailing.append((name[:-1], vserver))
        else:
            self.exact.setdefault(name, vserver)

    def select(self, host: str):
        """Return the virtual server for a lower-case host name without port."""
        vserver = self.exact.get(host)
        if vserver is not None:
            return vserver
        cached = self._cache.get(host)
        if cached is not None:
            return cached
        vserver = self._select_slow(host)
        if len(self._cache) < 4096:
            self._cache[host] = vserver
        return vserver

    def _select_slow(self, host):
        return self._select_named(host)[0]

    def _select_named(self, host):
        """(vserver, the regex match that chose it or None), past the exact names."""
        vserver = match_wildcards(host, self.leading, self.trailing)
        if vserver is not None:
            return vserver, None
        vserver, match = first_match(self.regexes, host)
        return (vserver, match) if match is not None else (self.default, None)

    def capture(self, host: str, name: str) -> str:
        """``$name`` from the server_name regex that chose this host's server ("" when
        an exact or wildcard name chose it, or that regex has no such group)."""
        if not self.regexes or host in self.exact:
            return ""
        _, match = self._select_named(host)
        if match is None:
            return ""
        for group, index in match.re.groupindex.items():
            if group.lower() == name:
                return match.group(index) or ""
        return ""


class LocationTable:
    """nginx location matching for one virtual server.

    Exact (``=``) first; then the longest matching prefix; if that prefix has ``^~``
    it wins; otherwise regex locations in file order, the first match wins; else the
    longest prefix.  No match gives None (the caller answers 404).
    """

    def __init__(self, locations):
        self.exact = {}
        self.prefixes = []
        self.regexes = []
        for location in locations:
            if location.modifier == "=":
                self.exact.setdefault(location.pattern, location)
            elif location.modifier in ("", "^~"):
                self.prefixes.append(location)
            else:
                self.regexes.append(location)
        self.prefixes.sort(key=lambda loc: -len(loc.pattern))
        self._cache = {}

    def match(self, uri: str) -> Optional[object]:
        location = self.exact.get(uri)
        if location is not None:
            return location
        cached = self._cache.get(uri)
        if cached is not None:
            return cached
        location = self._match_slow(uri)
        if location is not None and len(self._cache) < 4096:
            self._cache[uri] = location
        return location

    def _match_slow(self, uri):
        best = None
        for location in self.prefixes:
            if uri.startswith(location.pattern):
                best = location
                break
        if best is not None and best.modifier == "^~":
            return best
        for location in self.regexes:
            if location.regex.search(uri):
                return location
        return best


class Answer:
    """A server-level ``return``: every URI gets it (nginx runs it before locations)."""

    def __init__(self, location):
        self.location = location

    def match(self, uri: str):
        return self.location


class Router:
    """Per-listen-socket routing tables built once from the Config."""

    def __init__(self, config):
        by_listen = {}
        for vserver in config.servers:
            for listen in vserver.listens:
                by_listen.setdefault(listen.key, []).append(vserver)
        self.names = {key: ServerNameTable(vservers, key) for key, vservers in by_listen.items()}
        self.locations = {id(vserver): (LocationTable(vserver.locations)
                                        if vserver.answer is None else Answer(vserver.answer))
                          for vserver in config.servers}

    def capture(self, listen_key, host: str, name: str) -> str:
        """A named capture of the server_name regex that selected the request's server."""
        return self.names[listen_key].capture(host, name)

    def route(self, listen_key, host: str, uri: str):
        """Return (vserver, location or None)."""
        vserver = self.names[listen_key].select(host)
        return vserver, self.locations[id(vserver)].match(uri)
