"""Shared fixtures: one real Kafka broker and schema registry per test session (from the
project's own deploy code, on free loopback ports, in a temporary data dir)."""

from __future__ import annotations

import random
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy import stack
from packetless.config import DEFAULT_CACHE_DIR, Settings
from tests.support.capabilities import require

pytest_plugins = ["tests.support.docker"]


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _ephemeral_range() -> range:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return range(int(low), int(high) + 1)


_ISSUED: set[int] = set()


def free_port(count: int = 1) -> int:
    """A port p such that p .. p + count - 1 are free to listen on and were not handed out before
    in this test session (a port handed out is not bound until its server starts, so two picks
    could otherwise meet), chosen below the ephemeral range so that client connections of a busy
    host (TIME-WAIT) cannot take it meanwhile."""
    ephemeral = _ephemeral_range()
    candidates = [p for p in range(10000, 65535 - count) if p not in ephemeral
                  and p + count - 1 not in ephemeral]
    for _ in range(500):
        p = random.choice(candidates)
        block = range(p, p + count)
        if _ISSUED.isdisjoint(block) and all(_bindable(q) for q in block):
            _ISSUED.update(block)
            return p
    raise RuntimeError("no free port outside the ephemeral range")


def free_port_pair() -> int:
    """A port p such that p and p + 1 (the Kafka controller) are both free."""
    return free_port(2)


def start_stack(data_dir: Path, kafka_port: int | None = None,
                registry_port: int | None = None) -> stack.Stack:
    """Start broker and registry (no sensor, no worker) from ``data_dir``."""
    require(shutil.which("java") is not None, "java (apt-get install openjdk-17-jre-headless)")
    require(shutil.which("mvn") is not None, "mvn (apt-get install maven)")
    settings = Settings(data_dir=data_dir, cache_dir=DEFAULT_CACHE_DIR,
                        topic_prefix="packetless.")
    options = stack.StackOptions(settings=settings, sensor=False,
                                 kafka_port=kafka_port or free_port_pair(),
                                 registry_port=registry_port or free_port())
    running = stack.Stack(options)
    try:
        stack.start_infrastructure(options, running, lambda line: print(f"stack: {line}"))
    except BaseException:
        running.stop(print)
        raise
    return running


@pytest.fixture(scope="session")
def kafka_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack.Stack]:
    """The session's broker and registry; yields the running stack."""
    running = start_stack(tmp_path_factory.mktemp("stack"))
    yield running
    running.stop(print)


@pytest.fixture(scope="session")
def settings(kafka_stack: stack.Stack) -> Settings:
    """Settings pointing at the session's broker and registry."""
    return kafka_stack.options.settings
