"""cgroup v2 ids, paths and the containers they reveal.

BPF reports ``bpf_get_current_cgroup_id()`` (the inode of the cgroup2 directory) and sock_diag
reports the socket's cgroup id; this maps ids to paths and paths to container/pod references.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_HEX64 = r"[0-9a-f]{64}"
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

    A miss walks the tree again at most once per ``min_refresh_s`` so that ids of cgroups
    that no longer exist do not make every lookup walk the tree.
    """

    def __init__(self, root: Path | None = None, min_refresh_s: float = 1.0) -> None:
        self.root = root or cgroup2_root()
        self.min_refresh_s = min_refresh_s
        self._paths: dict[int, str] = {}
        self._walked_at = float("-inf")
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Walk the whole cgroup2 tree and rebuild the id -> path map."""
        paths: dict[int, str] = {}
        root = str(self.root)
        for directory, _subdirs, _files in os.walk(root):
            try:
                inode = os.stat(directory).st_ino
            except FileNotFoundError:
                continue
            paths[inode] = "/" + os.path.relpath(directory, root).removeprefix(".")
        with self._lock:
            self._paths = paths
            self._walked_at = time.monotonic()

    def path_of(self, cgroup_id: int) -> str | None:
        """The cgroup v2 path (``/docker/<id>``) of ``cgroup_id``, None if unknown."""
        with self._lock:
            path = self._paths.get(cgroup_id)
            stale = time.monotonic() - self._walked_at >= self.min_refresh_s
        if path is None and stale:
            self.refresh()
            with self._lock:
                path = self._paths.get(cgroup_id)
        return path

    def id_of(self, path: str) -> int | None:
        """The cgroup id (directory inode) of a cgroup v2 path, None if it does not exist."""
        try:
            inode = os.stat(self.root / path.lstrip("/")).st_ino
        except (FileNotFoundError, NotADirectoryError):
            return None
        with self._lock:
            self._paths[inode] = path
        return inode

    def container_of(self, cgroup_id: int) -> ContainerRef | None:
        """The container of ``cgroup_id``, None for host cgroups and unknown ids."""
        path = self.path_of(cgroup_id)
        return container_from_cgroup_path(path) if path is not None else None
