"""``packetless sensor``: run the host sensor's parts and publish what they see to Kafka.

eBPF mode follows every flow in the kernel; Netlink mode (no root, no bcc) takes sock_diag
snapshots. In both modes the Netlink snapshots (tcp_info, interface counters), the Docker
metadata watcher and the process lineage feed run beside it, sharing one cgroup resolver and
one process cache. Metrics are served on ``--web-host:--metrics-port`` (127.0.0.1 by default).
The C heap is kept near what is in use (``packetless.heap``).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from packetless import heap
from packetless.config import Settings
from packetless.kafka import Publisher, dead_letter_record
from packetless.topics import topic_name
from sensor import containers, ebpf, lineage, netlink, processes
from sensor.cgroups import CgroupResolver
from sensor.processes import ProcessCache

log = logging.getLogger(__name__)

EVENTS = Counter("packetless_sensor_events", "Records the sensor produced, by record type", ["type"])
LOST = Counter("packetless_sensor_lost_events", "Kernel events lost before user space read them")
SPOOL = Gauge("packetless_sensor_spool_bytes", "Bytes spooled while Kafka is unreachable")
MAP_FILL = Gauge("packetless_sensor_bpf_map_fill_ratio",
                 "Entries / max_entries of each BPF hash map; near 1 new sockets go untracked",
                 ["map"])
UNENCODABLE = Counter("packetless_sensor_unencodable_records",
                      "Records that did not fit their schema, sent to the dead letter topic",
                      ["type"])
PRODUCE_LATENCY = Histogram("packetless_sensor_produce_latency_seconds",
                            "Seconds from queueing a record to the broker's acknowledgement")
TOPIC_TYPES = {"raw.ebpf": "ebpf", "raw.netlink": "netlink", "meta.containers": "container",
               "meta.processes": "process"}

Publish = Callable[[str, str, dict[str, Any] | None], None]  # None: a tombstone


@dataclass
class Part:
    """One sensor part running in its own thread; ``essential`` parts stop the sensor on failure."""

    name: str
    target: Callable[[], None]
    essential: bool
    error: BaseException | None = None


def choose_mode(requested: str) -> tuple[str, str]:
    """The mode to run (``ebpf`` or ``netlink``) and why."""
    if requested == "netlink":
        return "netlink", "requested"
    ok, why = ebpf.available()
    if ok:
        return "ebpf", why
    if requested == "ebpf":
        raise SystemExit(f"packetless sensor: eBPF mode requested but unavailable: {why}")
    return "netlink", f"eBPF unavailable ({why}); falling back to Netlink snapshots"


def make_publish(publisher: Publisher, on_container: Callable[[str], object]) -> Publish:
    """``publish`` for the parts: counts by type, follows kernel loss reports, makes sure the
    metadata of a container first seen in the kernel gets published, sends."""

    lost_seen = 0
    counted: dict[str, Any] = {}  # suffix -> its EVENTS child (labels() costs more than inc())

    def publish(suffix: str, key: str, record: dict[str, Any] | None) -> None:
        nonlocal lost_seen
        if record is None:  # a tombstone (compacted topics): what the key named is gone
            publisher.tombstone(suffix, key)
            return
        events = counted.get(suffix)
        if events is None:
            events = counted[suffix] = EVENTS.labels(TOPIC_TYPES.get(suffix, suffix))
        events.inc()
        if suffix == "raw.ebpf" and record.get("drops"):
            lost = record["drops"]["ring_buffer"]  # cumulative since the sensor started
            LOST.inc(max(0, lost - lost_seen))
            lost_seen = max(lost, lost_seen)
        if suffix == "raw.ebpf" and record.get("container_id"):
            on_container(record["container_id"])
        try:
            publisher.send(suffix, key, record)
        except (ValueError, TypeError, OverflowError) as exc:  # the record breaks its schema
            UNENCODABLE.labels(TOPIC_TYPES.get(suffix, suffix)).inc()
            log.error("a %s record does not fit its schema (%s): sent to the dead letter topic",
                      suffix, exc)
            publisher.send("dlq", key, dead_letter_record(
                topic=topic_name(publisher.settings, suffix), partition=-1, offset=-1,
                timestamp_ms=None, key=key.encode(), headers=[], kind="unencodable",
                value=json.dumps(record, default=repr, ensure_ascii=True).encode(),
                reason=f"{type(exc).__name__}: {exc}"[:2000], consumer="sensor",
                host=publisher.settings.host_name))

    return publish


def run_lineage(publish: Publish, stop: threading.Event, mode: str, host: str,
                cache: ProcessCache) -> None:
    """Process lineage: the sched tracepoints in eBPF mode, /proc scans otherwise or when the
    tracepoint program cannot load (said once, with the reason)."""
    if mode == "ebpf":
        ready = threading.Event()
        try:
            lineage.run(publish, stop, lineage.LineageOptions(host_name=host, cache=cache),
                        ready=ready.set)
            return
        except Exception as exc:
            if ready.is_set():
                raise
            log.warning("process lineage from the sched tracepoints unavailable (%s): "
                        "scanning /proc instead", exc)
    processes.run(publish, stop, processes.ProcessOptions(host_name=host, cache=cache))


def main(settings: Settings, mode: str = "auto", update_interval: float = 10.0,
         snapshot_interval: float = 5.0, metrics_port: int = 9464,
         web_host: str = "127.0.0.1") -> int:
    """Run until SIGINT/SIGTERM; returns the exit code."""
    heap.tune()
    mode, why = choose_mode(mode)
    print(f"packetless sensor: mode {mode} ({why})", flush=True)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    status = settings.data_dir / "sensor.json"
    started = time.monotonic()

    def mark_ready() -> None:
        took = time.monotonic() - started
        print(f"packetless sensor: observing ({mode}, ready after {took:.1f}s)", flush=True)
        write_status(status, {"mode": mode, "why": why, "ready": True,
                              "ready_after_s": round(took, 1)})

    write_status(status, {"mode": mode, "why": why, "ready": False})
    if metrics_port:
        try:
            start_http_server(metrics_port, addr=web_host)
        except OSError as exc:
            print(f"packetless sensor: cannot serve /metrics on {web_host}:{metrics_port}: "
                  f"{exc.strerror} (choose another --metrics-port, or 0 for none)", flush=True)
            return 2
    publisher = Publisher(settings, spool="sensor", on_latency=PRODUCE_LATENCY.observe)
    stop = threading.Event()
    cgroups = CgroupResolver()
    cache = ProcessCache(cgroups=cgroups)
    host = settings.host_name
    watcher = containers.ContainerWatcher(
        lambda *args: publish(*args), containers.ContainerOptions(host_name=host, cgroups=cgroups))
    publish = make_publish(publisher, watcher.resolve)
    parts = [
        Part("containers", lambda: watcher.run(stop), essential=False),
        Part("processes", lambda: run_lineage(publish, stop, mode, host, cache), essential=False),
        Part("netlink", lambda: netlink.run(publish, stop, netlink.NetlinkOptions(
            host_name=host, interval_s=snapshot_interval, processes=cache, cgroups=cgroups,
            on_container=watcher.resolve, time_wait=mode == "netlink")),
            essential=mode == "netlink"),
    ]
    if mode == "ebpf":
        parts.append(Part("ebpf", lambda: ebpf.run(publish, stop, ebpf.EbpfOptions(
            host_name=host, update_interval_s=update_interval, cgroups=cgroups, processes=cache,
            on_map_fill=set_map_fill), ready=mark_ready), essential=True))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    threads = [threading.Thread(target=_guard, args=(p, stop), name=p.name, daemon=True)
               for p in parts]
    for t in threads:
        t.start()
    if mode == "netlink":
        mark_ready()
    next_trim = time.monotonic() + heap.TRIM_INTERVAL_S
    while not stop.wait(1.0):
        SPOOL.set(publisher.spool_bytes)
        if time.monotonic() >= next_trim:
            heap.trim()
            next_trim = time.monotonic() + heap.TRIM_INTERVAL_S
    for t in threads:
        t.join(timeout=15)
    left = publisher.close()  # what is still undelivered stays in the spool for the next start
    if left:
        log.warning("%d records not yet delivered are kept in the spool for the next start", left)
    failed = [p for p in parts if p.essential and p.error is not None]
    return 1 if failed else 0


def set_map_fill(fill: dict[str, float]) -> None:
    """Export the eBPF sensor's map fill ratios."""
    for name, ratio in fill.items():
        MAP_FILL.labels(name).set(ratio)


def write_status(path: Path, status: dict[str, Any]) -> None:
    """Replace the status file atomically (``up`` and tests poll it)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status))
    tmp.replace(path)


def _guard(part: Part, stop: threading.Event) -> None:
    """Run one part; an essential part's failure stops the sensor, others are logged."""
    try:
        part.target()
    except BaseException as exc:  # reported, and for essential parts fatal
        part.error = exc
        log.exception("sensor part %s failed", part.name)
        if part.essential:
            stop.set()
