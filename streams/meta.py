"""Container and process metadata, as read from meta.containers and meta.processes: the latest
record per container id and per (host, pid), used to enrich flows (pure logic; the app feeds it),
and the flows that still lack some of it, by what they lack (``Awaiting``).
"""

from __future__ import annotations

import itertools
import sys
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from packetless.topics import REMOVED_CONTAINER_KEEP_MS

MAX_PROCESSES = 200_000
CHANGES = 65_536  # the latest changes kept, to tell which flows new metadata concerns

MetaKey = str | tuple[str, int]
"""What a metadata record is about: a container id, or a process as (host, pid)."""


@dataclass
class MetaCache:
    """The latest container records by id and process records by host and pid."""

    containers: dict[str, dict[str, Any]] = field(default_factory=dict)
    processes: OrderedDict[tuple[str, int], dict[str, Any]] = field(default_factory=OrderedDict)
    max_processes: int = MAX_PROCESSES
    version: int = 0  # changes whenever a container or process record changes the cache
    changes: deque[MetaKey] = field(default_factory=lambda: deque(maxlen=CHANGES))  # by version
    removed: dict[str, int] = field(default_factory=dict)  # container id -> removed at (ms)

    def add_container(self, key: str | None, record: dict[str, Any] | None, at_ms: int = 0) -> None:
        """A meta.containers record; None (a tombstone, written at ``at_ms``): the container is
        gone, and forgotten as a removed one (``expire``)."""
        if record is None:
            if key is not None and key in self.containers and key not in self.removed:
                self.removed[key] = at_ms
            return
        current = self.containers.get(record["id"])
        if current is None or record["timestamp_ms"] >= current["timestamp_ms"]:
            self.containers[record["id"]] = record
            self._changed(record["id"])
            self.removed.pop(record["id"], None)
            if record.get("state") == "REMOVED":
                self.removed[record["id"]] = record["timestamp_ms"]

    def expire(self, now_ms: int) -> None:
        """Forget the containers removed more than ``REMOVED_CONTAINER_KEEP_MS`` before
        ``now_ms``, in the order their removals came (about their times): a container's
        metadata is kept for the last events of its flows, then the cache would only grow."""
        while self.removed:
            container_id, removed_ms = next(iter(self.removed.items()))
            if removed_ms >= now_ms - REMOVED_CONTAINER_KEEP_MS:
                return
            del self.removed[container_id]
            self.containers.pop(container_id, None)

    def add_process(self, record: dict[str, Any]) -> None:
        """A meta.processes record (EXIT keeps the last known process: its flows need it)."""
        proc = _shared(record["process"])
        key = (record["host_name"], proc["pid"])
        current = self.processes.get(key)
        if current is not None and (current.get("start_time_ms") or 0) > (proc.get("start_time_ms")
                                                                           or 0):
            return
        self.processes[key] = proc
        self.processes.move_to_end(key)
        self._changed(key)
        while len(self.processes) > self.max_processes:
            self.processes.popitem(last=False)

    def _changed(self, key: MetaKey) -> None:
        self.version += 1
        self.changes.append(key)

    def changed_since(self, version: int) -> set[MetaKey] | None:
        """The containers and processes whose records changed the cache after ``version``; None
        when that is further back than the cache remembers."""
        count = self.version - version
        if not 0 <= count <= len(self.changes):
            return None
        return set(itertools.islice(reversed(self.changes), count))

    def process(self, host: str, proc: dict[str, Any] | None) -> dict[str, Any] | None:
        """``proc`` completed from meta.processes (same pid and start time) when it lacks details."""
        if proc is None:
            return None
        known = self.processes.get((host, proc["pid"]))
        if known is None or proc.get("exe"):
            return proc
        started, known_started = proc.get("start_time_ms"), known.get("start_time_ms")
        if started and known_started and abs(started - known_started) > 1000:
            return proc
        return {**known, **{k: v for k, v in proc.items() if v not in (None, [])}}

    def container_ref(self, container_id: str | None) -> dict[str, Any] | None:
        """A ``packetless.ContainerRef`` for ``container_id`` (just the id when not yet known)."""
        if not container_id:
            return None
        c = self.containers.get(container_id)
        if c is None:
            return {"id": container_id, "name": None, "image": None, "runtime": None, "labels": {},
                    "pod_name": None, "pod_namespace": None, "pod_uid": None}
        return {"id": container_id, "name": c.get("name"), "image": c.get("image"),
                "runtime": c.get("runtime"), "labels": dict(c.get("labels") or {}),
                "pod_name": c.get("pod_name"), "pod_namespace": c.get("pod_namespace"),
                "pod_uid": c.get("pod_uid")}

    def pod_of(self, container_id: str | None) -> str | None:
        """``<namespace>/<pod>`` of a container in a Kubernetes pod, else None."""
        c = self.containers.get(container_id or "")
        if c is None or not c.get("pod_name"):
            return None
        return f"{c.get('pod_namespace') or 'default'}/{c['pod_name']}"

    def signature(self, host: str, container_ids: list[str | None],
                  procs: list[dict[str, Any] | None]) -> str:
        """What is known about these containers and processes: a change means new metadata.
        (The JSON of ``[known, exes]``, the flows table's format, written without ``json``.)"""
        known = ", ".join(_BOOL[c in self.containers] for c in container_ids if c)
        exes = ", ".join(_BOOL[self._has_exe(host, p)] for p in procs if p)
        return f"[[{known}], [{exes}]]"

    def missing(self, host: str, container_ids: list[str | None],
                procs: list[dict[str, Any] | None]) -> set[MetaKey]:
        """The containers and processes of these that ``signature`` gives as not known."""
        lacking: set[MetaKey] = {c for c in container_ids if c and c not in self.containers}
        lacking.update((host, p["pid"]) for p in procs if p and not self._has_exe(host, p))
        return lacking

    def _has_exe(self, host: str, proc: dict[str, Any]) -> bool:
        """Whether the details of ``proc`` (its executable first) are known."""
        return bool((self.process(host, proc) or {}).get("exe"))


@dataclass
class Awaiting:
    """The flows of a partition that lack metadata, by what each lacks: new metadata revisits
    the flows it concerns, not every incomplete flow."""

    flows: dict[bytes, set[MetaKey]] = field(default_factory=dict)
    by_key: dict[MetaKey, set[bytes]] = field(default_factory=dict)

    def wait(self, flow: bytes, keys: set[MetaKey]) -> None:
        """``flow`` lacks the metadata of ``keys`` now (none: it has all it needs)."""
        if self.flows.get(flow) == keys:
            return
        self.discard(flow)
        if keys:
            self.flows[flow] = keys
            for key in keys:
                self.by_key.setdefault(key, set()).add(flow)

    def discard(self, flow: bytes) -> None:
        for key in self.flows.pop(flow, ()):
            waiting = self.by_key[key]
            waiting.discard(flow)
            if not waiting:
                del self.by_key[key]

    def lacking(self, changed: set[MetaKey] | None) -> set[bytes]:
        """The flows that lack one of ``changed`` (None: every flow that lacks something)."""
        if changed is None:
            return set(self.flows)
        return set().union(*(self.by_key.get(key, ()) for key in changed))


_BOOL = {True: "true", False: "false"}


def _shared(proc: dict[str, Any]) -> dict[str, Any]:
    """``proc`` with its strings shared with the equal ones the cache already holds
    (``sys.intern``): the processes of a host repeat users, parents, executables, cgroups and
    command lines, and a full cache holds ``MAX_PROCESSES`` of them (about half the memory)."""
    return {name: sys.intern(value) if isinstance(value, str)
            else [sys.intern(arg) for arg in value] if isinstance(value, list) else value
            for name, value in proc.items()}
