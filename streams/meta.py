"""Container and process metadata, as read from meta.containers and meta.processes: the latest
record per container id and per (host, pid), used to enrich flows (pure logic; the app feeds it).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

MAX_PROCESSES = 200_000


@dataclass
class MetaCache:
    """The latest container records by id and process records by host and pid."""

    containers: dict[str, dict[str, Any]] = field(default_factory=dict)
    processes: OrderedDict[tuple[str, int], dict[str, Any]] = field(default_factory=OrderedDict)
    max_processes: int = MAX_PROCESSES
    version: int = 0  # changes whenever a container or process record changes the cache

    def add_container(self, key: str | None, record: dict[str, Any] | None) -> None:
        """A meta.containers record; None (a tombstone) forgets the container."""
        if record is None:
            if key and self.containers.pop(key, None) is not None:
                self.version += 1
            return
        current = self.containers.get(record["id"])
        if current is None or record["timestamp_ms"] >= current["timestamp_ms"]:
            self.containers[record["id"]] = record
            self.version += 1

    def add_process(self, record: dict[str, Any]) -> None:
        """A meta.processes record (EXIT keeps the last known process: its flows need it)."""
        proc = record["process"]
        key = (record["host_name"], proc["pid"])
        current = self.processes.get(key)
        if current is not None and (current.get("start_time_ms") or 0) > (proc.get("start_time_ms")
                                                                           or 0):
            return
        self.processes[key] = proc
        self.processes.move_to_end(key)
        self.version += 1
        while len(self.processes) > self.max_processes:
            self.processes.popitem(last=False)

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
        exes = ", ".join(_BOOL[bool((self.process(host, p) or {}).get("exe"))] for p in procs if p)
        return f"[[{known}], [{exes}]]"


_BOOL = {True: "true", False: "false"}
