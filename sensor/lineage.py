"""Process lineage in eBPF mode: EXEC and EXIT on ``meta.processes`` from the sched tracepoints
(bpf/processes.c), so processes that live shorter than any /proc scan are seen too.

Processes already running at start are published once as RUNNING (one /proc scan). An EXEC is
completed from /proc while the process lives (exe, redacted command line, parent name); one that
is already gone keeps what the kernel gave (pid, parent pid, comm, uid, gid, cgroup, file).
"""

from __future__ import annotations

import ctypes as ct
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from sensor import bpfload
from sensor.processes import LineageScanner, ProcessCache, ProcessOptions, process_event

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent.parent / "bpf" / "processes.c"
EV_EXEC, EV_EXIT = 1, 2
FILENAME_LEN = 256


class ProcessEventStruct(ct.Structure):
    """bpf/processes.c ``struct process_event_t``."""

    _fields_ = [("ts_ns", ct.c_uint64), ("fork_ns", ct.c_uint64), ("cgroup_id", ct.c_uint64),
                ("type", ct.c_uint32), ("pid", ct.c_uint32), ("ppid", ct.c_uint32),
                ("uid", ct.c_uint32), ("gid", ct.c_uint32), ("comm", ct.c_char * 16),
                ("filename", ct.c_char * FILENAME_LEN)]


@dataclass
class LineageOptions:
    """Settings of the eBPF lineage feed (ring buffer pages, remembered forks)."""

    host_name: str
    cache: ProcessCache = field(default_factory=ProcessCache)
    ring_buffer_pages: int = 64
    parent_entries: int = 65536
    poll_ms: int = 100


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


class LineageFeed:
    """Loads bpf/processes.c and turns its events into ProcessEvent records."""

    def __init__(self, options: LineageOptions, publish: Callable[[str, str, dict[str, Any]],
                                                                    None]) -> None:
        self.options = options
        self.publish = publish
        self.lost = 0
        self._pending: list[ProcessEventStruct] = []
        self._alive: dict[int, dict[str, Any]] = {}
        self._boot_offset_ns = time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        self.loaded: bpfload.Loaded | None = None
        self._ring: bpfload.RingBuffer | None = None

    def load(self) -> None:
        """Compile in a child process (sensor/bpfload.py), where the tracepoints attach."""
        o = self.options
        self.loaded = bpfload.load(SOURCE, [f"-DRINGBUF_PAGES={o.ring_buffer_pages}",
                                            f"-DPARENT_ENTRIES={o.parent_entries}"],
                                   ("process_events", "drops"), ())
        self._ring = self.loaded.ring("process_events", self._on_event)

    def close(self) -> None:
        self._ring = None
        if self.loaded is not None:
            self.loaded.close()
            self.loaded = None

    def running(self) -> None:
        """Publish every process already running as RUNNING (the lineage's starting point)."""
        scanner = LineageScanner(ProcessOptions(self.options.host_name, cache=self.options.cache))
        for key, event in scanner.scan():
            self._alive[event["process"]["pid"]] = event["process"]
            self.publish("meta.processes", key, event)

    def _on_event(self, _ctx: Any, data: Any, _size: int) -> int:
        # a ctypes callback inside libbpf's poll: copy only
        event = ProcessEventStruct()
        ct.memmove(ct.addressof(event), data, ct.sizeof(ProcessEventStruct))
        self._pending.append(event)
        return 0

    def poll(self, timeout_ms: int) -> None:
        """Wait up to ``timeout_ms`` for kernel events, publish them, report ring losses."""
        assert self._ring is not None and self.loaded is not None, "load() first"
        self._ring.poll(timeout_ms)
        pending, self._pending = self._pending, []
        for event in pending:
            self._handle(event)
        lost = self.loaded.maps["drops"].lookup(ct.c_int(0)).value
        if lost > self.lost:
            log.warning("process lineage: %d exec/exit events lost (ring buffer full; raise "
                        "the ring buffer size)", lost - self.lost)
            self.lost = lost

    def _handle(self, event: ProcessEventStruct) -> None:
        o = self.options
        pid = event.pid
        kernel = {"comm": _text(event.comm), "uid": event.uid, "gid": event.gid,
                  "cgroup_id": event.cgroup_id}
        if event.type == EV_EXEC:
            start_ms = self._start_ms(pid, event)
            if start_ms is not None:
                o.cache.forget(pid, start_ms)  # a new program in this process: read it again
            record = o.cache.lookup(pid, start_time_ms=start_ms, **kernel)
            if not record["exe"]:  # gone already: what the kernel said
                record["exe"] = _text(event.filename) or None
                record["ppid"] = record["ppid"] or event.ppid or None
                if record["ppid"] and not record["parent_name"]:
                    record["parent_name"] = self._name(record["ppid"])
            self._alive[pid] = record
            kind = "EXEC"
        elif event.type == EV_EXIT:
            record = self._alive.pop(pid, None) or o.cache.lookup(pid, **kernel)
            if record.get("start_time_ms") is not None:
                o.cache.forget(pid, record["start_time_ms"])
            kind = "EXIT"
        else:
            return
        self.publish("meta.processes", f"{o.host_name}:{pid}", process_event(
            type=kind, timestamp_ms=(event.ts_ns + self._boot_offset_ns) // 1_000_000,
            host_name=o.host_name, source="EBPF", process=record))

    def _start_ms(self, pid: int, event: ProcessEventStruct) -> int | None:
        """Start time of ``pid``: /proc while it lives, else the fork time the kernel saw."""
        started = self.options.cache.start_ms(pid)
        if started is None and event.fork_ns:
            started = (event.fork_ns + self._boot_offset_ns) // 1_000_000
        return started

    def _name(self, pid: int) -> str | None:
        alive = self._alive.get(pid)
        if alive is not None:
            return alive["comm"]
        try:
            return psutil.Process(pid).name()
        except psutil.Error:
            return None


def available() -> bool:
    """Whether the sched tracepoints this feed needs exist (tracefs mounted)."""
    return any(Path(root, "events/sched/sched_process_exec").exists()
               for root in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"))


def run(publish: Callable[[str, str, dict[str, Any]], None], stop: threading.Event,
        options: LineageOptions, ready: Callable[[], None] | None = None) -> None:
    """Publish RUNNING once, then EXEC/EXIT from the kernel until ``stop`` is set; ``ready`` is
    called once the programs are attached and the processes running then are published (a
    process started during that scan may be published as RUNNING and then by its EXEC)."""
    if not available():
        raise RuntimeError("eBPF lineage needs the sched tracepoints: mount tracefs "
                           "(mount -t tracefs nodev /sys/kernel/tracing)")
    feed = LineageFeed(options, publish)
    try:
        feed.load()
        feed.running()
        if ready is not None:
            ready()
        while not stop.is_set():
            feed.poll(options.poll_ms)
        feed.poll(0)
    finally:
        feed.close()
