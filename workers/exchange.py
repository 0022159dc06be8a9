"""The Exchange: what a client connection asks of whatever answers one request.

A ClientConnection (workers.http) makes one Exchange per request once its head is
complete and routed: an UpstreamExchange (workers.proxy) when a backend answers, a
LocalAnswer or StatusAnswer (workers.localanswer) when mplb does.  The connection then
only ever calls the three methods below, so it never needs to know which one it has.
"""
from __future__ import annotations

from typing import Optional, Protocol


class Exchange(Protocol):
    """One request's way to its answer."""

    settings: Optional[object]      # the location's ProxySettings (None before routing)

    def send_body(self, request) -> None:
        """Pass on (or discard) the body chunks the parser collected so far."""

    def finish(self, request, force_close: bool = False) -> bool:
        """The request is complete: deliver the answer; True if the connection may
        carry another request (``force_close`` says it may not)."""

    def abort(self) -> None:
        """The client is gone or the connection fails: release what is held."""
