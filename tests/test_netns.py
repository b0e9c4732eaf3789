"""Naming network namespaces from their kernel cookies, against real namespaces (ip netns)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from sensor.netns import NetnsCookies, cookie_of, socket_in
from tests.support.capabilities import require, require_root

NAMED = "/run/netns"


@contextlib.contextmanager
def named_netns() -> Iterator[tuple[int, int]]:
    """A new named network namespace while the context lasts: (inode, cookie)."""
    name = f"pl-ns-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        path = f"{NAMED}/{name}"
        with socket_in(path, socket.AF_INET, socket.SOCK_DGRAM) as sock:
            yield os.stat(path).st_ino, cookie_of(sock)
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


@pytest.fixture
def iproute() -> None:
    require_root()
    require(shutil.which("ip") is not None, "iproute2")


def test_host_and_new_namespace(iproute: None) -> None:
    cookies = NetnsCookies()
    with socket.socket() as own:
        assert cookies.inode(cookie_of(own)) == os.stat("/proc/self/ns/net").st_ino
    with named_netns() as (inode, cookie):
        assert cookies.inode(cookie) == inode
    assert cookies.inode(cookie) == inode  # remembered after the namespace is gone
    assert cookies.inode(cookie + 1_000_000) is None  # never made: unknown, not a guess


def test_namespace_with_a_reused_inode(iproute: None) -> None:
    """The kernel hands a freed namespace's inode to a later namespace: a scan must not take
    that inode as already known (the sensor once gave such namespaces no inode at all).

    Namespaces are made one after the other, each deleted before the next, until one gets the
    inode of the one before it, which the previous scan saw (proc inodes go lowest free first).
    A batch deleted together may keep its inodes for a long while: over 30 s seen here."""
    cookies = NetnsCookies()
    previous: tuple[int, int] | None = None  # inode, cookie
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, "the kernel reused no namespace inode"
        with named_netns() as (inode, cookie):
            assert cookies.inode(cookie) == inode
        if previous is not None and previous[0] == inode:
            break
        previous = inode, cookie
        time.sleep(0.2)  # the kernel frees a namespace's inode a moment after it is deleted
    assert cookie != previous[1]
    assert cookies.inode(previous[1]) == inode  # remembered after the namespace is gone
