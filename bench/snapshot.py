"""Bench item 6: CPU time of one Netlink snapshot (sensor/netlink.py) of 100,000 live sockets.

Holder processes keep loopback connections open (both ends local: two sockets each); the item
times NetlinkSensor.snapshot() in this process, split into the /proc owner scan and the rest.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bench import traffic
from bench.common import Item, fmt, release_holders, start_holder
from sensor import netlink
from sensor.processes import ProcessCache

TARGET_SOCKETS = 100_000
TARGET_CPU_S = 2.0
T = TypeVar("T")


def _hold(run_dir: Path, connections: int) -> list[subprocess.Popen[bytes]]:
    """Holder processes for ``connections`` loopback connections, all open on return."""
    holders: list[subprocess.Popen[bytes]] = []
    try:
        while connections > 0:
            chunk = min(traffic.HOLD_CHUNK, connections)
            holders.append(start_holder(run_dir / f"hold-{len(holders)}.log", chunk)[0])
            connections -= chunk
    except BaseException:
        release_holders(holders)
        raise
    return holders


def _timed(fn: Callable[[], T]) -> tuple[T, float, float]:
    """``fn()``, its CPU seconds (this process) and its wall seconds."""
    cpu, wall = time.process_time(), time.monotonic()
    result = fn()
    return result, time.process_time() - cpu, time.monotonic() - wall


def run(run_dir: Path, quick: bool) -> Item:
    item = Item("6. Netlink snapshot: CPU of one snapshot of all sockets")
    run_dir.mkdir(parents=True, exist_ok=True)
    sockets = 20_000 if quick else TARGET_SOCKETS
    holders = _hold(run_dir, sockets // 2)
    rows: list[list[str]] = []
    seen = 0
    cpus: list[float] = []
    try:
        sensor = netlink.NetlinkSensor(netlink.NetlinkOptions(
            interfaces=False, other_namespaces=False, processes=ProcessCache()))
        for label in ("first (all published)", "second (unchanged skipped)"):
            owners, owners_cpu, _ = _timed(netlink.socket_owners)
            events, cpu, wall = _timed(sensor.snapshot)
            seen = seen or len(events)  # the first snapshot publishes every socket
            tcp = sum(1 for _, e in events if e["socket"] and e["socket"]["transport"] == "tcp")
            rows.append([label, f"{len(events):,}", f"{tcp:,}", fmt(cpu, 2), fmt(wall, 2),
                         fmt(owners_cpu, 2), f"{len(owners):,}"])
            if not cpus:
                cpus.append(cpu)
    finally:
        release_holders(holders)
    total_cpu = cpus[0]
    item.tables.append((["snapshot", "events (first: every socket)", "tcp events", "CPU s",
                         "wall s",
                         "of which /proc owner scan CPU s (measured apart)",
                         "socket inodes with an owner"], rows))
    per_100k = total_cpu * TARGET_SOCKETS / max(seen, 1)
    item.targets.append((f"a snapshot of {TARGET_SOCKETS:,} sockets in under {TARGET_CPU_S} s of "
                         f"one core (measured {seen:,} sockets: {total_cpu:.2f} s CPU, "
                         f"{per_100k:.2f} s per 100,000)",
                         per_100k < TARGET_CPU_S if not quick else None))
    item.notes.append(f"{sockets // 2:,} loopback connections held by processes of "
                      f"{traffic.HOLD_CHUNK:,}; the snapshot runs in the bench process with "
                      "process lookups (psutil) of the holders; host namespace only")
    item.commands.append("python -m bench --items 6")
    return item
