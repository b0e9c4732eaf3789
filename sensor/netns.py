"""Network namespaces: finding them (/proc, /run/netns), creating sockets inside them, and
naming the namespace of a BPF event: programs get its cookie (bpf_get_netns_cookie), users
and /proc know its inode, and SO_NETNS_COOKIE on a socket made inside it joins the two.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sensor.cgroups import cgroup_of_pid, container_from_cgroup_path
from sensor.pyroute2_parts import setns

log = logging.getLogger(__name__)

SO_NETNS_COOKIE = 71  # Linux 5.14, asm-generic/socket.h
COOKIES_REMEMBERED = 4096


@dataclass
class Namespace:
    """A network namespace, entered through ``path`` (one of its processes, or a bind mount)."""

    inode: int
    path: str
    host: bool
    pids: list[int] = field(default_factory=list)
    container_id: str | None = None

    @property
    def label(self) -> str:
        """Short name qualifying interface names outside the host namespace."""
        return self.container_id[:12] if self.container_id else f"netns-{self.inode}"


def socket_in(netns_path: str, family: int, kind: int, protocol: int = 0) -> socket.socket:
    """A socket created inside the network namespace at ``netns_path``.

    setns(CLONE_NEWNET) changes only the calling thread, so a short-lived thread enters the
    namespace and creates the socket, which stays bound to that namespace.
    """
    result: dict[str, Any] = {}

    def enter_and_create() -> None:
        try:
            fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns(fd, flags=0)
            finally:
                os.close(fd)
            result["socket"] = socket.socket(family, kind | socket.SOCK_CLOEXEC, protocol)
        except OSError as error:
            result["error"] = error

    thread = threading.Thread(target=enter_and_create, name="netns-enter")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["socket"]


def discover_namespaces(proc: Path = Path("/proc"), other: bool = True) -> dict[int, Namespace]:
    """Network namespaces by inode: the sensor's own (host) and, if ``other``, every namespace
    a visible process is in, plus named ones under /run/netns."""
    own = proc / "self" / "ns" / "net"
    host_inode = os.stat(own).st_ino
    namespaces = {host_inode: Namespace(host_inode, str(own), host=True)}
    if not other:
        return namespaces
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        path = f"{entry.path}/ns/net"
        try:
            inode = os.stat(path).st_ino
        except OSError:
            continue
        namespace = namespaces.setdefault(inode, Namespace(inode, path, host=False))
        namespace.pids.append(int(entry.name))
    for run_dir in (Path("/run/netns"), Path("/var/run/netns")):
        if run_dir.is_dir():
            for named in run_dir.iterdir():
                try:
                    inode = named.stat().st_ino
                except OSError:
                    continue
                namespaces.setdefault(inode, Namespace(inode, str(named), host=False))
    for namespace in namespaces.values():
        if namespace.host:
            continue
        for pid in sorted(namespace.pids):
            path = cgroup_of_pid(pid, proc)
            ref = container_from_cgroup_path(path) if path else None
            if ref is not None:
                namespace.container_id = ref.container_id
                break
    return namespaces


def cookie_of(sock: socket.socket) -> int:
    """The cookie of the network namespace ``sock`` lives in."""
    return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]


class NetnsCookies:
    """Network namespace cookie -> inode, learned by making a socket in each namespace.

    The host's namespace is known from the start. A cookie seen for the first time triggers a
    scan of the namespaces (entering others needs CAP_SYS_ADMIN) that learns those not seen at
    the previous scan, and all of them if that did not name the cookie (a new namespace may have
    an old one's inode). A namespace that vanished before any scan saw it stays unknown (and is
    not scanned for again), and so does one the sensor may not enter: then the namespace of the
    socket's owner process stands in, if it still runs (a socket is nearly always made in its
    process's namespace).
    """

    def __init__(self, proc: Path = Path("/proc"), enter: bool = True) -> None:
        self.proc = proc
        self.enter = enter
        self._inodes: OrderedDict[int, int | None] = OrderedDict()  # cookie -> inode or unknown
        self._seen: set[int] = set()  # inodes of the previous scan
        self._lock = threading.Lock()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as own:
            host_inode = os.stat(proc / "self" / "ns" / "net").st_ino
            self._inodes[cookie_of(own)] = host_inode
        self._seen.add(host_inode)

    def inode(self, cookie: int, pid: int = 0) -> int | None:
        """The inode of the namespace with ``cookie`` (0: unknown to the kernel program), else
        of process ``pid``'s namespace, else None."""
        inode = self._inodes.get(cookie) if cookie else None
        if inode is None and cookie and cookie not in self._inodes:
            self._scan(cookie)
            inode = self._inodes.setdefault(cookie, None)
        if inode is None and pid:
            try:
                inode = os.stat(self.proc / str(pid) / "ns" / "net").st_ino
            except OSError:
                return None
        return inode

    def _scan(self, cookie: int) -> None:
        """Learn the namespaces not seen before; if ``cookie`` is not among them, also those seen
        before: the kernel gives a freed namespace's inode to the next one made."""
        with self._lock:
            present = discover_namespaces(self.proc, self.enter)
            self._learn(ns for inode, ns in present.items() if inode not in self._seen)
            if cookie not in self._inodes:
                self._learn(ns for inode, ns in present.items()
                            if inode in self._seen and not ns.host)
            self._seen = set(present)
            while len(self._inodes) > COOKIES_REMEMBERED:
                self._inodes.popitem(last=False)

    def _learn(self, namespaces: Iterable[Namespace]) -> None:
        for namespace in namespaces:
            try:
                with socket_in(namespace.path, socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    self._inodes[cookie_of(sock)] = namespace.inode
            except OSError as error:  # gone meanwhile, or not allowed to enter
                log.debug("no cookie for network namespace %d: %s", namespace.inode, error)
