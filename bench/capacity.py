"""Item 3a, sensor capacity: connection churn at fixed rates (2k, 5k, 10k, 15k/s) under our
sensor; a step passes when no event was lost (drops.ring_buffer == 0, no map full) and every
socket of every connection has its START and END.
"""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path

from bench import peers
from bench.common import Item, fmt, loadgen, new_port, start_monitor

STEPS = (2000, 5000, 10000, 15000)
CLIENTS, SERVERS = 2, 2


def step(run_dir: Path, rate: int, seconds: float) -> dict[str, float | int | bool]:
    port = new_port()
    mon = start_monitor("packetless", run_dir, [port])
    try:
        out = subprocess.run([str(loadgen()), "churn", str(port), str(CLIENTS), str(SERVERS),
                              str(rate), str(seconds)], capture_output=True, text=True,
                             timeout=seconds + 60, check=True).stdout.split()
    finally:
        mon.stop(120)
    conns, elapsed = int(out[0]), float(out[1])
    records = peers.packetless_records(mon.out)
    starts = {r["cookie"] for r in records if r["type"] == "START"}
    ends = {r["cookie"] for r in records if r["type"] == "END"}
    drops = peers.final_drops(records)
    lags = [(r["published_ns"] - r["timestamp_ns"]) / 1e6 for r in records if r["type"] == "END"]
    complete = len(starts & ends)
    lost = sum(drops.values()) if drops else -1
    return {"target": rate, "achieved": conns / elapsed, "connections": conns,
            "sockets": 2 * conns, "complete": complete, "ring_buffer": drops.get("ring_buffer", -1),
            "lost": lost, "ok": lost == 0 and complete == 2 * conns,
            "lag_p50": statistics.median(lags) if lags else 0.0,
            "lag_max": max(lags) if lags else 0.0,
            "others": peers.other_records(mon.out) / elapsed}


def run(run_dir: Path, quick: bool) -> Item:
    item = Item("3a. Capacity: new TCP flows/s followed with zero loss (our sensor)")
    seconds = 4.0 if quick else 10.0
    item.commands.append(f"loadgen churn PORT {CLIENTS} {SERVERS} RATE {seconds:g}")
    results = [step(run_dir, rate, seconds) for rate in STEPS]
    rows = [[fmt(r["target"], 0), fmt(r["achieved"], 0), str(r["sockets"]), str(r["complete"]),
             str(r["ring_buffer"]), str(r["lost"]), "yes" if r["ok"] else "NO",
             fmt(r["lag_p50"], 1), fmt(r["lag_max"], 0), fmt(r["others"], 0)] for r in results]
    item.tables.append((["target conn/s", "achieved conn/s", "sockets", "with START+END",
                         "ring buffer drops", "all losses", "zero loss",
                         "END publish lag p50 ms", "max ms", "other flows' records/s"], rows))
    passed = [r["achieved"] for r in results if r["ok"]]
    best = max(passed) if passed else 0.0
    item.targets.append((f">= 10,000 new flows/s with zero loss (best zero-loss step: "
                         f"{best:,.0f}/s)", best >= 10_000))
    item.notes.append(f"{seconds:g} s per step; each step starts a fresh sensor (counters from 0); "
                      "'other flows' are records of other programs' traffic on this shared "
                      "machine that the sensor followed meanwhile; the sensor publishes to a "
                      "list here (no Kafka)")
    return item
