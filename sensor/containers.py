"""Container metadata and lifecycle from the Docker engine, for the ``meta.containers`` topic.

Lists and inspects containers, then follows Docker events; containers first seen by their
cgroup are resolved on demand. Survives the engine going away and resyncs when it returns.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import docker
import docker.errors

import schemas
from sensor.cgroups import CgroupResolver, cgroup_of_pid, container_from_cgroup_path

log = logging.getLogger(__name__)

TOPIC = "meta.containers"
EVENT_STATES = {"create": "CREATED", "start": "RUNNING", "restart": "RUNNING",
                "unpause": "RUNNING", "pause": "PAUSED", "die": "STOPPED", "stop": "STOPPED",
                "rename": None, "update": None, "destroy": "REMOVED"}
DOCKER_STATES = {"created": "CREATED", "running": "RUNNING", "paused": "PAUSED",
                 "restarting": "RESTARTING", "removing": "STOPPED", "exited": "STOPPED",
                 "dead": "STOPPED"}
K8S_LABELS = {"pod_name": "io.kubernetes.pod.name", "pod_namespace": "io.kubernetes.pod.namespace",
              "pod_uid": "io.kubernetes.pod.uid",
              "k8s_container_name": "io.kubernetes.container.name"}
# Kept from the last record when a stopped container no longer reports them.
STICKY_FIELDS = ("cgroup_path", "cgroup_id", "netns_inode")
MISSING_TTL_S = 30.0
MISSING_MAX = 4096

Publish = Callable[[str, str, dict[str, Any] | None], None]  # None: a tombstone


@dataclass
class ContainerOptions:
    """Settings of the Docker metadata watcher."""

    host_name: str = field(default_factory=socket.gethostname)
    docker_url: str | None = None
    reconnect_s: float = 5.0
    timeout_s: float = 10.0
    cgroups: CgroupResolver = field(default_factory=CgroupResolver)


def _epoch_ms(text: str | None) -> int | None:
    """Docker's RFC 3339 timestamps (nanoseconds allowed), None for its zero time."""
    if not text or text.startswith("0001-"):
        return None
    return round(datetime.fromisoformat(text).timestamp() * 1000)


def container_record(attrs: dict[str, Any], host_name: str, event: str, timestamp_ms: int,
                     cgroups: CgroupResolver | None = None) -> dict[str, Any]:
    """A ``packetless.Container`` dict from ``docker inspect`` output."""
    state = attrs.get("State") or {}
    config = attrs.get("Config") or {}
    labels = config.get("Labels") or {}
    running = bool(state.get("Running"))
    pid = state.get("Pid") or None
    record = schemas.defaults("Container")
    record.update(
        id=attrs["Id"], name=(attrs.get("Name") or "").lstrip("/") or None,
        image=config.get("Image"), image_id=attrs.get("Image"), labels=labels,
        runtime="docker", oci_runtime=(attrs.get("HostConfig") or {}).get("Runtime"),
        state=DOCKER_STATES.get(state.get("Status", ""), "UNKNOWN"), event=event,
        timestamp_ms=timestamp_ms, host_name=host_name, pid=pid,
        started_at_ms=_epoch_ms(state.get("StartedAt")),
        finished_at_ms=None if running else _epoch_ms(state.get("FinishedAt")),
        ip_addresses=sorted({addr for net in ((attrs.get("NetworkSettings") or {})
                                              .get("Networks") or {}).values()
                             for addr in (net.get("IPAddress"), net.get("GlobalIPv6Address"))
                             if addr}),
        **{name: labels.get(label) for name, label in K8S_LABELS.items()},
    )
    if not running and record["finished_at_ms"] is not None:
        record["exit_code"] = state.get("ExitCode")
    if pid is not None:
        path = cgroup_of_pid(pid)
        if path is not None:
            record["cgroup_path"] = path
            record["cgroup_id"] = (cgroups or CgroupResolver()).id_of(path)
            ref = container_from_cgroup_path(path)
            if record["pod_uid"] is None and ref is not None:
                record["pod_uid"] = ref.pod_uid
        try:
            record["netns_inode"] = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            record["netns_inode"] = None
    return record


class ContainerWatcher:
    """Publishes container records: a listing at (re)connection, then one per Docker event.

    ``resolve`` may be called from other threads (the sensor, for a container id seen in a
    cgroup); ``available`` and ``last_error`` tell whether the engine answers.
    """

    def __init__(self, publish: Publish, options: ContainerOptions) -> None:
        self.publish = publish
        self.options = options
        self.available = False
        self.last_error: str | None = None
        self._records: dict[str, dict[str, Any]] = {}
        self._missing: dict[str, float] = {}
        self._lock = threading.Lock()
        self._client: docker.DockerClient | None = None

    def _connect(self) -> docker.DockerClient:
        if self.options.docker_url:
            return docker.DockerClient(base_url=self.options.docker_url,
                                       timeout=int(self.options.timeout_s))
        return docker.from_env(timeout=int(self.options.timeout_s))

    def _inspect(self, container_id: str) -> dict[str, Any] | None:
        """``docker inspect``, None if the container is gone or the engine is unreachable."""
        try:
            if self._client is None:
                self._client = self._connect()
            return self._client.api.inspect_container(container_id)
        except docker.errors.NotFound:
            return None
        # requests' errors (OSError) when the engine goes away between two calls: from the
        # eBPF part's publish they would stop the sensor
        except (docker.errors.DockerException, OSError) as error:
            self._down(error)
            return None

    def _emit(self, record: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            previous = self._records.get(record["id"])
            if previous is not None:
                for name in STICKY_FIELDS:
                    if record[name] is None:
                        record[name] = previous[name]
            if record["state"] == "REMOVED":
                self._records.pop(record["id"], None)
            else:
                self._records[record["id"]] = record
            self._missing.pop(record["id"], None)
        self.publish(TOPIC, record["id"], record)
        if record["state"] == "REMOVED":
            # behind it, a tombstone: the compacted topic then forgets the container (after its
            # min.compaction.lag.ms), instead of keeping a record of every container ever run
            self.publish(TOPIC, record["id"], None)
        return record

    def resolve(self, container_id: str) -> dict[str, Any] | None:
        """The record of ``container_id``, inspecting and publishing it if not yet known.

        None for ids Docker does not know (other runtimes, removed containers); those are not
        asked again for ``MISSING_TTL_S``.
        """
        with self._lock:
            known = self._records.get(container_id)
            missed_at = self._missing.get(container_id)
        if known is not None:
            return known
        if missed_at is not None and time.monotonic() - missed_at < MISSING_TTL_S:
            return None
        attrs = self._inspect(container_id)
        if attrs is None:
            with self._lock:
                now = self._missing[container_id] = time.monotonic()
                if len(self._missing) > MISSING_MAX:  # container churn: forget expired ones
                    self._missing = {cid: at for cid, at in self._missing.items()
                                     if now - at < MISSING_TTL_S}
            return None
        return self._emit(container_record(attrs, self.options.host_name, "resolve",
                                           round(time.time() * 1000), self.options.cgroups))

    def handle_event(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """Publish the record a Docker container event leads to; None for ignored actions."""
        action = (event.get("Action") or event.get("status") or "").split(":")[0]
        if event.get("Type", "container") != "container" or action not in EVENT_STATES:
            return None
        actor = event.get("Actor") or {}
        container_id = actor.get("ID") or event.get("id")
        timestamp_ms = event.get("timeNano", 0) // 1_000_000 or event.get("time", 0) * 1000
        attrs = None if action == "destroy" else self._inspect(container_id)
        if attrs is not None:
            record = container_record(attrs, self.options.host_name, action, timestamp_ms,
                                      self.options.cgroups)
        else:
            record = self._from_event(container_id, action, timestamp_ms,
                                      actor.get("Attributes") or {})
        return self._emit(record)

    def _from_event(self, container_id: str, action: str, timestamp_ms: int,
                    attributes: dict[str, str]) -> dict[str, Any]:
        """The record of a container that could not be inspected (removed), from the last
        record and the event's attributes (name, image, labels, exit code)."""
        with self._lock:
            previous = self._records.get(container_id)
        record = dict(previous) if previous is not None else schemas.defaults("Container")
        if previous is None:
            labels = {k: v for k, v in attributes.items()
                      if k not in ("name", "image", "exitCode", "signal", "oldName")}
            record.update(id=container_id, image=attributes.get("image"), labels=labels,
                          runtime="docker",
                          **{name: labels.get(label) for name, label in K8S_LABELS.items()})
        record.update(name=attributes.get("name", record["name"]), event=action,
                      timestamp_ms=timestamp_ms, host_name=self.options.host_name, pid=None,
                      state=EVENT_STATES[action] or record["state"], ip_addresses=[])
        if action in ("die", "stop", "destroy") and record["finished_at_ms"] is None:
            record["finished_at_ms"] = timestamp_ms
        if "exitCode" in attributes:
            record["exit_code"] = int(attributes["exitCode"])
        return record

    def sync(self) -> None:
        """Publish every container the engine knows; those known before and gone now as REMOVED."""
        client = self._client
        if client is None:
            return
        now_ms = round(time.time() * 1000)
        listed = {summary["Id"] for summary in client.api.containers(all=True)}
        for container_id in sorted(listed):
            attrs = self._inspect(container_id)
            if attrs is not None:
                self._emit(container_record(attrs, self.options.host_name, "sync", now_ms,
                                            self.options.cgroups))
        with self._lock:
            vanished = [cid for cid in self._records if cid not in listed]
        for container_id in vanished:
            self._emit(self._from_event(container_id, "destroy", now_ms, {}))

    def _down(self, error: Exception) -> None:
        if self.available or self.last_error is None:
            log.warning("Docker engine unavailable (%s); container metadata pauses, retrying "
                        "every %.0f s", error, self.options.reconnect_s)
        self.available = False
        self.last_error = str(error)

    def run(self, stop: threading.Event) -> None:
        """Follow the engine until ``stop`` is set, reconnecting after failures; meanwhile
        learn container cgroups as they are created (with or without an engine)."""
        watch = threading.Thread(target=self._watch_cgroups, args=(stop,),
                                 name="cgroup-watch", daemon=True)
        watch.start()
        try:
            self._run(stop)
        finally:
            watch.join(timeout=5)

    def _watch_cgroups(self, stop: threading.Event) -> None:
        try:
            self.options.cgroups.watch(stop)
        except OSError as error:
            log.warning("cannot watch cgroup creation (%s): containers that exit before their "
                        "flows are read may stay unresolved", error)

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self._client = self._connect()
                self._client.ping()
            except docker.errors.DockerException as error:
                self._down(error)
                stop.wait(self.options.reconnect_s)
                continue
            if not self.available and self.last_error is not None:
                log.warning("Docker engine available again; resyncing containers")
            self.available, self.last_error = True, None
            try:
                self._follow(self._client, stop)
            except Exception as error:  # the stream dies in many ways when dockerd goes away
                self._down(error)
            finally:
                self._client.close()
            if not stop.is_set() and not self.available:
                stop.wait(self.options.reconnect_s)

    def _follow(self, client: docker.DockerClient, stop: threading.Event) -> None:
        stream = client.events(decode=True, filters={"type": "container"})
        done = threading.Event()

        def close_on_stop() -> None:
            while not done.is_set():
                if stop.wait(0.5):
                    stream.close()
                    return

        closer = threading.Thread(target=close_on_stop, name="docker-events-closer", daemon=True)
        closer.start()
        try:
            self.sync()
            for event in stream:
                self.handle_event(event)
        except Exception:
            if stop.is_set():
                return
            raise
        finally:
            done.set()
            closer.join()
        if not stop.is_set():
            raise ConnectionError("Docker event stream ended")


def run(publish: Publish, stop: threading.Event, options: ContainerOptions) -> None:
    """Publish container metadata on ``meta.containers`` until ``stop`` is set."""
    ContainerWatcher(publish, options).run(stop)
