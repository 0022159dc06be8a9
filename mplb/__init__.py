"""mplb: a multi-process, pre-fork HTTP and WebSocket load balancer."""
import os as _os

__version__ = "0.1.0"

# The data plane is the subpackage mplb.workers.  Installed, it sits in mplb/workers;
# in a source checkout it is the repository's top-level workers/ folder, beside this
# package.  Searching the checkout's root too makes ``mplb.workers`` resolve to the same
# tree as ``mplb`` when a script or test runs from a checkout (two checkouts side by
# side, one installed, never mix).
_HERE = _os.path.dirname(_os.path.abspath(__file__))
_CHECKOUT = _os.path.dirname(_HERE)
if (not _os.path.isdir(_os.path.join(_HERE, "workers"))
        and _os.path.isfile(_os.path.join(_CHECKOUT, "workers", "__init__.py"))):
    __path__.append(_CHECKOUT)

# MPLB_PURE_PYTHON=1 (and, in a checkout, a compiled module older than its source)
# loads the data plane's compiled modules from their .py files: see mplb.compiled.
from mplb.compiled import install_finder as _install_finder  # noqa: E402

_install_finder()
