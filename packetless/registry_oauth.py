"""The schema registry client's OAuth import, deferred until an OAuth client is made.

confluent-kafka's registry client imports authlib (and with it the cryptography package, about
11 MiB resident in the sensor) when it is imported, though only a registry configured for OAuth
uses it, which Packetless never configures. A stand-in module takes its place; its
``OAuth2Client`` and ``AsyncOAuth2Client`` import the real module on first use, so OAuth still
works. ``packetless/__init__.py`` installs it, before anything imports the registry client.
"""

from __future__ import annotations

import importlib
import sys
import threading
import types
from typing import Any

MODULE = "authlib.integrations.httpx_client"
CLIENTS = ("OAuth2Client", "AsyncOAuth2Client")


def defer() -> None:
    """Install the stand-in; a no-op once the real module is loaded."""
    if MODULE in sys.modules:
        return
    stand_in = types.ModuleType(MODULE, __doc__)
    lock = threading.Lock()

    def real(name: str) -> Any:
        with lock:
            if sys.modules.get(MODULE) is stand_in:
                del sys.modules[MODULE]
            return getattr(importlib.import_module(MODULE), name)

    for name in CLIENTS:
        setattr(stand_in, name, lambda *args, _name=name, **kwargs: real(_name)(*args, **kwargs))
    sys.modules[MODULE] = stand_in
