"""Bench item 6: CPU time of one Netlink snapshot (sensor/netlink.py) of 100,000 live sockets.

Holder processes keep loopback connections open (both ends local: two sockets each); the item
times NetlinkSensor.events() in this process, taking the events one at a time as the sensor
publishes them; a full read of the /proc socket owners apart.
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
from sensor.owners import SocketOwners
from sensor.processes import ProcessCache

TARGET_SOCKETS = 100_000
TARGET_CPU_S = 2.0
# Opening 50,000 connections leaves the kernel work for a moment after (acknowledgements,
# timers), which it charges to whatever process runs then: timed right away, the same first
# snapshot took 1.55-1.93 s CPU instead of 1.27-1.33 s.
SETTLE_S = 5.0
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


def _count(sensor: netlink.NetlinkSensor) -> int:
    """The events of one snapshot (the first publishes every socket)."""
    return sum(1 for _ in sensor.events())


def run(run_dir: Path, quick: bool) -> Item:
    item = Item("6. Netlink snapshot: CPU of one snapshot of all sockets")
    run_dir.mkdir(parents=True, exist_ok=True)
    sockets = 20_000 if quick else TARGET_SOCKETS
    every = netlink.NetlinkOptions().unchanged_every
    holders = _hold(run_dir, sockets // 2)
    rows: list[list[str]] = []
    try:
        time.sleep(SETTLE_S)
        sensor = netlink.NetlinkSensor(netlink.NetlinkOptions(
            interfaces=False, other_namespaces=False, processes=ProcessCache()))
        owners, owners_cpu, _ = _timed(SocketOwners().read)  # a full read
        seen, first_cpu, first_wall = _timed(lambda: _count(sensor))
        later = [_timed(lambda: _count(sensor)) for _ in range(every)]
    finally:
        release_holders(holders)
    cpus = sorted(cpu for _, cpu, _ in later)
    published = [count for count, _, _ in later]
    rows.append(["first (every socket published)", f"{seen:,}", fmt(first_cpu, 2),
                 fmt(first_wall, 2)])
    rows.append([f"the next {every} (idle sockets republished by turns: 1/{every} each)",
                 f"{min(published):,}-{max(published):,}",
                 f"median {fmt(cpus[len(cpus) // 2], 2)}, max {fmt(cpus[-1], 2)}",
                 f"max {fmt(max(wall for _, _, wall in later), 2)}"])
    item.tables.append((["snapshot", "events", "CPU s", "wall s"], rows))
    scale = TARGET_SOCKETS / max(seen, 1)
    item.targets.append((f"every snapshot after the first of {TARGET_SOCKETS:,} sockets in under "
                         f"{TARGET_CPU_S} s of one core (measured {seen:,} sockets: max "
                         f"{cpus[-1]:.2f} s CPU, {cpus[-1] * scale:.2f} s per 100,000)",
                         cpus[-1] * scale < TARGET_CPU_S if not quick else None))
    item.targets.append((f"the first snapshot (all {TARGET_SOCKETS:,} sockets published) in under "
                         f"{TARGET_CPU_S} s of one core (measured {first_cpu:.2f} s CPU, "
                         f"{first_cpu * scale:.2f} s per 100,000)",
                         first_cpu * scale < TARGET_CPU_S if not quick else None))
    item.notes.append(f"{sockets // 2:,} loopback connections held by processes of "
                      f"{traffic.HOLD_CHUNK:,}, settled {SETTLE_S:g} s; the snapshot runs in the "
                      "bench process with process lookups (psutil) of the holders; host "
                      "namespace only; a full "
                      f"read of the /proc socket owners takes {owners_cpu:.2f} s CPU measured "
                      f"apart ({len(owners):,} socket inodes with an owner); later snapshots read "
                      "only new descriptors and those of closed sockets (sensor/owners.py)")
    item.commands.append("python -m bench --items 6")
    return item
