"""The parts of pyroute2 the sensor uses, imported without pyroute2's package ``__init__``.

That ``__init__`` imports the whole library (IPDB, NDB, conntrack, nftables, nl80211, plan9 and
more: 163 modules, about 8 MiB of the sensor's resident memory) whatever submodule is asked
for. The sensor needs three: netlink's message classes and constants, sock_diag's and
rtnetlink's messages, and ``setns``. So the package is registered first as a module over its
own directory, whose submodules import as usual (also as its attributes: ``from pyroute2
import netns``); the first lookup of anything else on it (say ``from pyroute2 import IPRoute``
elsewhere in the same process) runs the real ``__init__`` then, so other users of pyroute2 see
the whole package.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType


def _register_without_init() -> None:
    """Put pyroute2 in ``sys.modules`` without running its ``__init__`` (see the module)."""
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None:
        raise ImportError("pyroute2 is not installed", name="pyroute2")
    package = importlib.util.module_from_spec(spec)
    lock = threading.RLock()
    ran: list[bool] = []

    def complete(name: str) -> object:
        if importlib.util.find_spec(f"pyroute2.{name}") is not None:
            return importlib.import_module(f"pyroute2.{name}")  # ``from pyroute2 import netns``
        with lock:
            if not ran:
                ran.append(True)
                spec.loader.exec_module(package)  # type: ignore[union-attr]
        try:
            return package.__dict__[name]
        except KeyError:
            raise AttributeError(f"module 'pyroute2' has no attribute {name!r}") from None

    package.__getattr__ = complete  # type: ignore[method-assign]
    sys.modules["pyroute2"] = package


def _part(name: str) -> ModuleType:
    _register_without_init()
    return importlib.import_module(name)


netlink = _part("pyroute2.netlink")
diag = _part("pyroute2.netlink.diag")
rtnl = _part("pyroute2.netlink.rtnl")
ifinfmsg = _part("pyroute2.netlink.rtnl.ifinfmsg").ifinfmsg
setns = _part("pyroute2.netns").setns
