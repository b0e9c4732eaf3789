"""The Avro contract: one documented ``.avsc`` file per record type, loaded here.

Files are named ``<namespace>.<Name>.avsc`` so that a record may refer to another by its full
name (``"type": "packetless.Process"``); fastavro resolves such references from this folder and
``load`` returns the self-contained schema that is registered with the schema registry.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import fastavro.schema

HERE = Path(__file__).resolve().parent
NAMESPACE = "packetless"


def path(name: str) -> Path:
    """The file of record type ``name`` (``"EbpfEvent"`` or ``"packetless.EbpfEvent"``)."""
    full = name if "." in name else f"{NAMESPACE}.{name}"
    return HERE / f"{full}.avsc"


@cache
def load(name: str) -> dict[str, Any]:
    """The self-contained schema of record type ``name``, named references expanded."""
    return fastavro.schema.load_schema(str(path(name)), _write_hint=False)


def text(name: str) -> str:
    """The schema of ``name`` as canonical-enough JSON text, as sent to the registry."""
    return json.dumps(load(name), separators=(",", ":"))


def defaults(name: str) -> dict[str, Any]:
    """A fresh record of type ``name``: every field at its schema default (None when it has none)."""
    return copy.deepcopy({f["name"]: f.get("default") for f in load(name)["fields"]})


def record(name: str, **values: Any) -> dict[str, Any]:
    """A record of type ``name``: schema defaults overridden by ``values`` (names checked)."""
    rec = defaults(name)
    unknown = values.keys() - rec.keys()
    if unknown:
        raise KeyError(f"not in packetless.{name}: {sorted(unknown)}")
    rec.update(values)
    return rec


def names() -> list[str]:
    """All record types defined here, by short name."""
    return sorted(p.name.removesuffix(".avsc").split(".", 1)[1] for p in HERE.glob("*.avsc"))
