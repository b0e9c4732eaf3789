"""Capability checks for tests that need root, BPF, Kafka or Docker.

Outside CI a missing capability skips the test with the reason; in CI (``CI`` or
``PACKETLESS_STRICT`` set) it fails it, so that a machine lacking BPF or Docker cannot pass.
"""

from __future__ import annotations

import os

import pytest

STRICT = bool(os.environ.get("CI") or os.environ.get("PACKETLESS_STRICT"))


def require(ok: bool, why: str) -> None:
    """Fail (in CI) or skip (elsewhere) the calling test unless ``ok``; ``why`` names what is missing."""
    if ok:
        return
    if STRICT:
        pytest.fail(f"required capability missing: {why}", pytrace=False)
    pytest.skip(f"capability missing (this fails in CI): {why}")


def require_root() -> None:
    require(os.geteuid() == 0, "root (euid 0)")
