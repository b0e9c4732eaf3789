"""cgroup v2 ids, paths and the containers they reveal.

BPF reports ``bpf_get_current_cgroup_id()`` (the inode of the cgroup2 directory) and sock_diag
reports the socket's cgroup id; this maps ids to paths and paths to container/pod references,
learning cgroups as they are created (inotify) so that short-lived containers stay resolvable.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import select
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_HEX64 = r"[0-9a-f]{64}"
# inotify(7): a directory created under a watched one; the queue overflowed; watch removed
IN_CREATE, IN_ONLYDIR, IN_ISDIR = 0x100, 0x01000000, 0x40000000
IN_Q_OVERFLOW, IN_IGNORED = 0x4000, 0x8000
_INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then the name)
_POD_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32}"

# One cgroup path component naming a container, and the runtime it implies (None: unknown).
_CONTAINER_COMPONENTS: tuple[tuple[re.Pattern[str], str | None], ...] = (
    (re.compile(rf"^docker-(?P<id>{_HEX64})\.scope$"), "docker"),
    (re.compile(rf"^cri-containerd-(?P<id>{_HEX64})\.scope$"), "containerd"),
    (re.compile(rf"^nerdctl-(?P<id>{_HEX64})\.scope$"), "containerd"),
    (re.compile(rf"^crio-(?P<id>{_HEX64})(?:\.scope)?$"), "cri-o"),
    (re.compile(rf"^libpod-(?P<id>{_HEX64})(?:\.scope)?$"), "podman"),
    (re.compile(rf"^(?P<id>{_HEX64})$"), None),
)
_POD_COMPONENT = re.compile(
    rf"^(?:[a-z]+-)*?(?:(?P<qos_slice>burstable|besteffort)-)?pod(?P<uid>{_POD_UID})(?:\.slice)?$"
)
_QOS_COMPONENT = re.compile(r"^(?:[a-z]+-)*(?P<qos>burstable|besteffort)(?:\.slice)?$")


@dataclass(frozen=True)
class ContainerRef:
    """A container as a cgroup path reveals it (Kubernetes fields are None outside a pod)."""

    runtime: str | None
    container_id: str
    pod_uid: str | None = None
    qos_class: str | None = None


def container_from_cgroup_path(path: str) -> ContainerRef | None:
    """The container a cgroup v2 path belongs to, or None for a host cgroup.

    Understands Docker (cgroupfs ``/docker/<id>`` and systemd ``docker-<id>.scope``),
    containerd/CRI, CRI-O, Podman and the Kubernetes ``kubepods`` hierarchy (QoS class and
    pod UID, ``_`` or ``-`` separated). The innermost container component wins.
    """
    parts = [p for p in path.strip().split("/") if p]
    for index in range(len(parts) - 1, -1, -1):
        for pattern, runtime in _CONTAINER_COMPONENTS:
            match = pattern.match(parts[index])
            if match is None:
                continue
            parents = parts[:index]
            if runtime is None:
                runtime = _runtime_of_bare_id(parents)
                if runtime == "":
                    continue
            pod_uid, qos = _pod_of(parents)
            return ContainerRef(runtime, match["id"], pod_uid, qos)
    return None


def _runtime_of_bare_id(parents: list[str]) -> str | None:
    """Runtime of a bare ``<64hex>`` component from its parent; "" when it is not a container."""
    if not parents:
        return ""
    parent = parents[-1]
    if parent == "docker":
        return "docker"
    if parent in ("libpod_parent", "machine"):
        return "podman"
    if _POD_COMPONENT.match(parent):
        return None
    return ""


def _pod_of(parents: list[str]) -> tuple[str | None, str | None]:
    """(pod UID, QoS class) from the components above a container, (None, None) outside a pod."""
    if not any("kubepods" in p for p in parents):
        return None, None
    uid = qos = None
    for part in parents:
        if (pod := _POD_COMPONENT.match(part)) is not None:
            uid = pod["uid"].replace("_", "-")
            qos = pod["qos_slice"] or qos
        elif (q := _QOS_COMPONENT.match(part)) is not None:
            qos = q["qos"]
    if uid is None:
        return None, None
    return uid, qos or "guaranteed"


def cgroup2_root() -> Path:
    """Mount point of the cgroup v2 hierarchy (``/sys/fs/cgroup/unified`` in hybrid mode)."""
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return Path(fields[1])
    return Path("/sys/fs/cgroup")


def cgroup_of_pid(pid: int, proc: Path = Path("/proc")) -> str | None:
    """cgroup v2 path of ``pid`` (as in ``/proc/<pid>/cgroup`` ``0::`` line), None if gone."""
    try:
        with open(proc / str(pid) / "cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip() or "/"
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


class CgroupResolver:
    """Maps cgroup ids to cgroup v2 paths by walking the hierarchy; cached, refreshed on miss.

    Ids stay known after their cgroup is removed (up to ``max_entries``, oldest forgotten
    first): a short-lived container's flows are often looked up after it is gone. A miss walks
    the tree again at most once per ``min_refresh_s`` and, on big trees, at most a tenth of the
    time, so that ids of cgroups never seen do not make every lookup walk the tree; ``misses``
    counts the lookups that stayed unresolved.
    """

    def __init__(self, root: Path | None = None, min_refresh_s: float = 0.1,
                 max_entries: int = 65536) -> None:
        self.root = root or cgroup2_root()
        self.min_refresh_s = min_refresh_s
        self.max_entries = max_entries
        self.misses = 0
        self._paths: OrderedDict[int, str] = OrderedDict()
        self._next_walk = float("-inf")
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Walk the whole cgroup2 tree and learn the id of every cgroup in it."""
        started = time.monotonic()
        paths: dict[int, str] = {}
        root = str(self.root)
        for directory, _subdirs, _files in os.walk(root):
            try:
                inode = os.stat(directory).st_ino
            except FileNotFoundError:
                continue
            paths[inode] = "/" + os.path.relpath(directory, root).removeprefix(".")
        took = time.monotonic() - started
        with self._lock:
            for inode, path in paths.items():
                self._remember(inode, path)
            self._next_walk = time.monotonic() + max(self.min_refresh_s, 10 * took)

    def _remember(self, inode: int, path: str) -> None:
        """Record one id (the caller holds the lock)."""
        self._paths[inode] = path
        self._paths.move_to_end(inode)
        while len(self._paths) > self.max_entries:
            self._paths.popitem(last=False)

    def path_of(self, cgroup_id: int) -> str | None:
        """The cgroup v2 path (``/docker/<id>``) of ``cgroup_id``, None if unknown."""
        with self._lock:
            path = self._paths.get(cgroup_id)
            stale = time.monotonic() >= self._next_walk
        if path is None and stale:
            self.refresh()
            with self._lock:
                path = self._paths.get(cgroup_id)
        if path is None:
            self.misses += 1
        return path

    def id_of(self, path: str) -> int | None:
        """The cgroup id (directory inode) of a cgroup v2 path, None if it does not exist."""
        try:
            inode = os.stat(self.root / path.lstrip("/")).st_ino
        except (FileNotFoundError, NotADirectoryError):
            return None
        with self._lock:
            self._remember(inode, path)
        return inode

    def watch(self, stop: threading.Event) -> None:
        """Learn every cgroup as it is created (inotify on each directory of the tree) until
        ``stop``: a container living a few milliseconds is known before its flows are looked
        up. Raises OSError when inotify is unavailable."""
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        watches: dict[int, str] = {}

        def learn(path: str) -> None:
            """Watch ``path``, then learn and watch what it holds (created before the watch)."""
            target = os.fsencode(self.root / path.lstrip("/"))
            wd = libc.inotify_add_watch(fd, target, IN_CREATE | IN_ONLYDIR)
            if wd < 0:
                return  # removed meanwhile, or out of watches (a walk on miss still finds it)
            watches[wd] = path
            try:
                children = [e.name for e in os.scandir(target) if e.is_dir(follow_symlinks=False)]
            except OSError:
                return
            for name in children:
                created(path, name)

        def created(parent: str, name: bytes) -> None:
            child = f"{parent.rstrip('/')}/{os.fsdecode(name)}"
            if self.id_of(child) is not None:
                learn(child)

        try:
            learn("/")
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            while not stop.is_set():
                if not poller.poll(500):
                    continue
                data = os.read(fd, 1 << 16)
                offset = 0
                while offset + _INOTIFY_EVENT.size <= len(data):
                    wd, mask, _cookie, size = _INOTIFY_EVENT.unpack_from(data, offset)
                    name = data[offset + _INOTIFY_EVENT.size:offset + _INOTIFY_EVENT.size + size]
                    offset += _INOTIFY_EVENT.size + size
                    if mask & IN_Q_OVERFLOW:
                        log.warning("cgroup watch overflowed; walking the cgroup tree")
                        learn("/")
                    elif mask & IN_IGNORED:
                        watches.pop(wd, None)
                    elif mask & IN_ISDIR and wd in watches:
                        created(watches[wd], name.rstrip(b"\0"))
        finally:
            os.close(fd)

    def container_of(self, cgroup_id: int) -> ContainerRef | None:
        """The container of ``cgroup_id``, None for host cgroups and unknown ids."""
        path = self.path_of(cgroup_id)
        return container_from_cgroup_path(path) if path is not None else None
