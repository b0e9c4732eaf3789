"""Sensor capacity: connection churn at fixed rates; a step passes when no event was lost
(drops.ring_buffer == 0, no map full) and every socket of every connection has its START and
END. Item 3a: the eBPF part alone, publishing to a list (2k, 5k, 10k, 15k/s). Item 3c: the whole
``packetless sensor`` publishing to the Kafka of a local stack (5k, 10k/s), read back from
raw.ebpf.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path

from bench import peers
from bench.common import (
    PYTHON,
    REPO,
    TIME_WAIT_LOW,
    Item,
    Monitor,
    fmt,
    loadgen,
    new_port,
    start_monitor,
    time_wait_low,
)
from bench.stack import LocalStack, metric, raw_since, start

STEPS = (2000, 5000, 10000, 15000)
SENSOR_STEPS = (5000, 10000)
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


def _best(results: list[dict[str, float | int | bool]]) -> float:
    """The highest rate of a step without loss (0 if none): its target when the load generator
    reached 99% of it (it runs a few connections short), else what it reached."""
    return max((float(r["target"]) if r["achieved"] >= 0.99 * r["target"] else float(r["achieved"])
                for r in results if r["ok"]), default=0.0)


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
    best = _best(results)
    item.targets.append((f">= 10,000 new flows/s with zero loss (best zero-loss step: "
                         f"{best:,.0f}/s)", best >= 10_000))
    item.notes.append(f"{seconds:g} s per step; each step starts a fresh sensor (counters from 0); "
                      "'other flows' are records of other programs' traffic on this shared "
                      "machine that the sensor followed meanwhile; the sensor publishes to a "
                      "list here (no Kafka)")
    return item


def _start_sensor(stack: LocalStack, run_dir: Path, rate: int,
                  tree: Path) -> tuple[Monitor, int]:
    """``packetless sensor --mode ebpf`` of source tree ``tree`` on the stack, with a data dir
    (spool) of its own; its metrics port. Returns once it observes."""
    data = run_dir / f"sensor-{rate}-{time.monotonic_ns()}"
    data.mkdir(parents=True)
    port = new_port()
    s = stack.settings
    argv = [PYTHON, "-m", "packetless", "sensor", "--mode", "ebpf", "--data-dir", str(data),
            "--bootstrap-servers", s.bootstrap_servers, "--registry-url", s.registry_url,
            "--topic-prefix", s.topic_prefix, "--metrics-port", str(port)]
    with (data / "sensor.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=tree)
    deadline = time.monotonic() + 180
    status = data / "sensor.json"
    while not (status.exists() and json.loads(status.read_text() or "{}").get("ready")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the sensor did not start: see {data / 'sensor.log'}")
        time.sleep(0.2)
    return Monitor("sensor", proc, data / "sensor.log"), port


def raw_flows(stack: LocalStack, since_ms: int, port: int,
              max_s: float = 300.0) -> tuple[set[int], set[int], dict[str, int]]:
    """Cookies of the START and END records on raw.ebpf since ``since_ms`` of sockets on
    ``port`` (either end), and the loss counters of the latest DROPS record."""
    starts: set[int] = set()
    ends: set[int] = set()
    drops: tuple[int, dict[str, int]] = (0, {})
    for rec in raw_since(stack.settings, since_ms, max_s):
        if rec.get("type") == "DROPS":
            if rec["timestamp_ns"] >= drops[0]:
                drops = (rec["timestamp_ns"], rec["drops"] or {})
        elif port in (rec.get("local_port"), rec.get("remote_port")):
            if rec["type"] == "START":
                starts.add(rec["cookie"])
            elif rec["type"] == "END":
                ends.add(rec["cookie"])
    return starts, ends, drops[1]


def sensor_step(stack: LocalStack, run_dir: Path, rate: int, seconds: float,
                tree: Path = REPO) -> dict[str, float | int | bool]:
    """One churn step under a fresh ``packetless sensor`` (of this source tree, or of another
    one to compare): what reached raw.ebpf, its losses (metric and DROPS record) and the CPU
    seconds it spent on the step."""
    time_wait = time_wait_low()
    since_ms = int(time.time() * 1000)  # this sensor's records only: its DROPS are the last
    mon, metrics_port = _start_sensor(stack, run_dir, rate, tree)
    try:
        port = new_port()
        cpu0 = mon.cpu()
        out = subprocess.run([str(loadgen()), "churn", str(port), str(CLIENTS), str(SERVERS),
                              str(rate), str(seconds)], capture_output=True, text=True,
                             timeout=seconds + 60, check=True).stdout.split()
        cpu = mon.settled_cpu(60) - cpu0
        time.sleep(6)  # a scan reports the drops (every 5 s at most)
        lost_metric = metric(metrics_port, "packetless_sensor_lost_events_total")
    finally:
        mon.stop(120)  # SIGINT: the last DROPS record, the queue flushed
    conns, elapsed = int(out[0]), float(out[1])
    starts, ends, drops = raw_flows(stack, since_ms, port)
    complete = len(starts & ends)
    lost = sum(drops.values()) if drops else -1
    return {"target": rate, "achieved": conns / elapsed, "sockets": 2 * conns,
            "starts": len(starts), "ends": len(ends), "complete": complete,
            "ring_buffer": drops.get("ring_buffer", -1),
            "metric": -1 if lost_metric is None else int(lost_metric), "lost": lost,
            "ok": lost == 0 and complete == 2 * conns, "cpu": cpu,
            "events": len(starts) + len(ends), "time_wait": time_wait}


def run_sensor(run_dir: Path, quick: bool) -> Item:
    """Item 3c on a local stack whose stream worker is paused (SIGSTOP) during the steps: the
    sensor and the broker get the machine."""
    item = Item("3c. Capacity: the whole sensor publishing to Kafka (packetless sensor)")
    seconds = 8.0 if quick else 60.0  # the target holds for 60 s
    stack = start(run_dir / "stack", sensor=False)
    worker = stack.parts["streams"]
    try:
        os.kill(worker, signal.SIGSTOP)
        results = [sensor_step(stack, run_dir, rate, seconds) for rate in SENSOR_STEPS]
    finally:
        os.kill(worker, signal.SIGCONT)
        stack.stop()
    item.commands += [stack.command, "packetless sensor --mode ebpf --data-dir D "
                      "--bootstrap-servers B --registry-url R --metrics-port P",
                      f"loadgen churn PORT {CLIENTS} {SERVERS} RATE {seconds:g}"]
    rows = [[fmt(r["target"], 0), fmt(r["achieved"], 0), str(r["sockets"]), str(r["starts"]),
             str(r["ends"]), str(r["complete"]), str(r["ring_buffer"]), str(r["metric"]),
             str(r["lost"]), "yes" if r["ok"] else "NO", fmt(r["cpu"], 2),
             fmt(1e6 * r["cpu"] / max(1, r["events"]), 0)] for r in results]
    item.tables.append((["target conn/s", "achieved conn/s", "sockets", "START on raw.ebpf",
                         "END on raw.ebpf", "with START+END", "ring buffer drops",
                         "lost_events metric", "all losses", "zero loss", "sensor CPU s",
                         "CPU us per START/END"], rows))
    best = _best(results)
    item.targets.append((f">= 10,000 new flows/s with zero loss, published to Kafka (best "
                         f"zero-loss step: {best:,.0f}/s)", best >= 10_000))
    item.notes.append(f"{seconds:g} s per step, each under a fresh sensor (counters from 0) "
                      "started once TIME_WAIT sockets were under "
                      f"{TIME_WAIT_LOW} ({', '.join(str(r['time_wait']) for r in results)}); "
                      "sensor CPU s: from the start of the step until the sensor settled "
                      "(all threads: eBPF, Netlink snapshots, librdkafka); the stream worker "
                      "is paused meanwhile")
    return item
