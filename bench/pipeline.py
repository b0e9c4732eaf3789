"""Items 3b, 3d, 4 and 5 on the local stack: the stream worker's events/s against a bare Kafka
consumer reading the same records, and its peak memory through a large backlog; close-to-END
latency; sensor and worker memory with 1k, 10k and 100k live loopback connections.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import fastavro
import psutil
from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition

import schemas
from bench import traffic
from bench.common import PYTHON, REPO, Item, fmt, new_port, release_holders, start_holder
from bench.stack import (
    LocalStack,
    Offsets,
    latest_drops,
    metric,
    raw_starts,
    start,
    wait_caught_up,
)
from packetless.serde import Codec
from packetless.topics import TOPICS, topic_name
from sensor.ebpf import EbpfOptions

HOST = "bench-synthetic"
WORKER_TARGET = 20_000  # raw events/s per worker
LATENCY_TARGET_MS = 2000  # p99 from a socket's close to its END on packetless.flows
SENSOR_RSS_TARGET_MIB = 150e6 / 2**20  # issue 3: under 150 MB with 100,000 live sockets,
TARGET_CONNECTIONS = 50_000  # that is 50,000 loopback connections
RSS_WINDOW_S = 15  # the sensor's RSS swings by MiB within seconds (snapshots, scans)
FLOW_SPACING_NS = 50_000  # between the connects of consecutive synthetic flows


# ---- 3b: worker throughput ---------------------------------------------------------------

def synthetic(n_flows: int) -> list[tuple[str, dict[str, Any]]]:
    """START and END of both sockets (client, server) of ``n_flows`` flows, as raw.ebpf records,
    each with its process as the sensor attributes it. As real ones, the flows have times of
    their own (``FLOW_SPACING_NS`` apart, in the recent past), the server accepts a little after
    the client connects, and they last from 1 to 11 ms: the worker formats as many distinct
    times as it would for real traffic (``ecs.iso`` caches them)."""
    base = schemas.defaults("EbpfEvent")
    first = time.time_ns() - n_flows * FLOW_SPACING_NS - 1_000_000_000
    process = {**schemas.defaults("Process"), "tid": 0, "uid": 1000, "gid": 1000,
               "user_name": "bench", "group_name": "bench", "ppid": 1, "parent_name": "init",
               "start_time_ms": first // 1_000_000, "cgroup_id": 1, "cgroup_path": "/"}
    out = []
    for i in range(n_flows):
        cport, sport = 32768 + i % 28000, 8000 + i // 28000
        cip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        connect = first + i * FLOW_SPACING_NS + i * 7919 % 1000
        duration = 1_000_000 + i * 104_729 % 10_000_000
        for side, cookie, lip, lport, rip, rport, opened in (
                ("CLIENT", 2 * i + 1, cip, cport, "10.255.0.1", sport, connect),
                ("SERVER", 2 * i + 2, "10.255.0.1", sport, cip, cport, connect + 31_337)):
            for kind in ("START", "END"):
                rec = dict(base)
                ts = opened + (duration if kind == "END" else 0)
                rec.update(event_id=f"{cookie}-{kind}", type=kind, host_name=HOST, boot_id="bench",
                           cookie=cookie, timestamp_ns=ts, start_ns=opened, transport="tcp",
                           family="ipv4", role=side, local_ip=lip, local_port=lport,
                           remote_ip=rip, remote_port=rport, bytes_sent=100 + i,
                           bytes_received=200 + i, packets_sent=3, packets_received=3,
                           state="CLOSE" if kind == "END" else "ESTABLISHED",
                           process={**process, "pid": 1000 + cookie % 2, "tid": 1000 + cookie % 2,
                                    "comm": side.lower(), "exe": f"/usr/bin/{side.lower()}",
                                    "args": [f"/usr/bin/{side.lower()}", "--port", str(sport)]})
                if kind == "END":
                    rec.update(duration_ns=ts - opened, reason="CLOSED", previous_state="FIN_WAIT2")
                out.append((f"{HOST}:{cookie}", rec))
    return out


def _read_all(settings: Any, n: int, decode: bool, max_s: float) -> float:
    """Records per second of a bare confluent-kafka consumer reading ``n`` raw.ebpf records."""
    consumer = Consumer({**settings.kafka_config(), "group.id": f"bench-bare-{time.time_ns()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    codec = Codec(settings) if decode else None
    consumer.subscribe([topic_name(settings, "raw.ebpf")])
    got, first, last = 0, 0.0, 0.0
    deadline = time.monotonic() + max_s
    try:
        while got < n and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 1.0):
                if msg.error():
                    continue
                if not got:
                    first = time.monotonic()
                if codec is not None:
                    codec.decode("raw.ebpf", msg.value())
                got += 1
                last = time.monotonic()
    finally:
        consumer.close()
    return got / (last - first) if got > 1 and last > first else 0.0


def _thread_cpu(proc: psutil.Process) -> dict[int, float]:
    """CPU seconds (user and system) of each thread of ``proc``, by thread id."""
    return {t.id: t.user_time + t.system_time for t in proc.threads()}


class PeakRss(threading.Thread):
    """The highest RSS of a process, sampled every second until stopped."""

    def __init__(self, proc: psutil.Process) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.stop.wait(1.0)


def worker_backlog(run_dir: Path, quick: bool) -> Item:
    """Item 3d: item 3b's run with a backlog large enough to show whether memory grows."""
    return worker_rate(run_dir, quick, 25000 if quick else 100000)


def worker_rate(run_dir: Path, quick: bool, backlog_flows: int | None = None) -> Item:
    item = Item("3b. Capacity: stream worker events/s vs a bare Kafka consumer (ceiling)"
                if backlog_flows is None else
                "3d. Memory: stream worker peak RSS through a backlog of raw records")
    n_flows = backlog_flows or (2000 if quick else 10000)
    run_dir.mkdir(parents=True, exist_ok=True)
    stack = start(run_dir / "stack-nosensor", sensor=False)
    item.commands.append(stack.command)
    try:
        offsets = Offsets(stack.settings)
        records = synthetic(n_flows)
        codec = Codec(stack.settings)
        t0 = time.monotonic()
        encoded = [(key, codec.encode("raw.ebpf", rec)) for key, rec in records]
        encode_s = time.monotonic() - t0
        producer = Producer(stack.settings.kafka_config())
        topic = topic_name(stack.settings, "raw.ebpf")
        worker_proc = stack.process("streams")
        # the records wait on the topic while the worker is stopped (well within its 10 s
        # session timeout): it then reads a backlog, at its own pace, not the producer's
        worker_proc.suspend()
        try:
            for key, value in encoded:
                while True:
                    try:
                        producer.produce(topic, value, key)
                        break
                    except BufferError:
                        producer.poll(0.05)
            producer.flush(120)
        finally:
            idle_rss = worker_proc.memory_info().rss
            cpu0 = sum(worker_proc.cpu_times()[:2])
            threads0 = _thread_cpu(worker_proc)
            worker_proc.resume()
        t0 = time.monotonic()
        peak = PeakRss(worker_proc)
        peak.start()
        limit = 300 if quick else 600
        wait_caught_up(stack, limit, backlog=1)  # every raw record read (the lag is 0)
        deadline = time.monotonic() + limit  # a long batch can keep the output quiet for 10 s
        while offsets.size("flows") < 2 * n_flows and time.monotonic() < deadline:
            time.sleep(0.5)
        outputs, grew, settled = offsets.settle("flows", quiet_s=10, max_s=limit)
        peak.stop.set()
        peak.join()
        worker = len(records) / (grew - t0)
        worker_cpu = sum(worker_proc.cpu_times()[:2]) - cpu0
        main_cpu = _thread_cpu(worker_proc).get(worker_proc.pid, 0.0) - threads0.get(
            worker_proc.pid, 0.0)
        bare = _read_all(stack.settings, len(records), False, 300)
        decoding = _read_all(stack.settings, len(records), True, 300)
        lag = metric(stack.web_port, "packetless_streams_consumer_lag", "raw.")
        events = {kind: metric(stack.web_port, "packetless_streams_flow_events_total",
                               f'type="{kind}"') for kind in ("START", "UPDATE", "END")}
        offsets.close()
    finally:
        stack.stop()
    n = len(records)
    item.tables.append((["reader", "raw.ebpf records", "records/s", "ratio to bare consumer"], [
        ["bare confluent-kafka consumer", str(n), fmt(bare, 0), "1.000"],
        ["confluent-kafka consumer + Avro decode (Codec)", str(n), fmt(decoding, 0),
         fmt(decoding / bare if bare else None, 3)],
        ["packetless stream worker (raw -> flows, ECS, OCSF, windows)", str(n), fmt(worker, 0),
         fmt(worker / bare if bare else None, 3)],
    ]))
    item.targets.append((f">= {WORKER_TARGET:,} raw events/s per worker (issue 5): the worker "
                         f"reads {fmt(worker, 0)} records/s, "
                         f"{fmt(worker / bare if bare else None, 3)} of the bare consumer, "
                         f"peak RSS {peak.peak / 2**20:,.0f} MiB", worker >= WORKER_TARGET))
    item.notes.append(f"{n_flows} synthetic flows, both sockets, START and END: {n} records "
                      f"(Avro-encoded by packetless.serde.Codec beforehand, {encode_s:.1f} s), "
                      "produced while the worker process was stopped (SIGSTOP, then SIGCONT); "
                      f"the worker wrote {outputs} flow events (expected {2 * n_flows}: START "
                      f"and END per flow){'' if settled else ', still growing at the time limit'}: "
                      + ", ".join(f"{fmt(count, 0)} {kind}" for kind, count in events.items())
                      + " (a flow ENDs again when a peer comes after its END)"
                      "; its time runs from SIGCONT to the last flow event, once its lag on "
                      "raw.ebpf is 0 and its output stopped growing for 10 s (an END is due at "
                      "once when both sockets closed); consumer lag at the end: "
                      f"{fmt(lag, 0)}; the worker used {worker_cpu:.1f} CPU s meanwhile: "
                      f"{n / worker_cpu if worker_cpu else 0:,.0f} records per CPU second, "
                      f"{main_cpu:.1f} CPU s of them in its main thread (Faust's event loop: "
                      "the flows and windows stages; the raw stage has a thread of its own); "
                      f"worker RSS {idle_rss / 2**20:,.0f} MiB before, peak "
                      f"{peak.peak / 2**20:,.0f} MiB (sampled every second)")
    return item


# ---- 4 and 5 on a stack with the sensor ----------------------------------------------------

class FlowWatcher(threading.Thread):
    """Follows packetless.flows (or raw.ebpf) from its end, noting when the END of each
    connection to ``server_port`` arrives, by client port."""

    def __init__(self, stack: LocalStack, server_port: int, suffix: str = "flows") -> None:
        super().__init__(daemon=True)
        self.stack = stack
        self.server_port = server_port
        self.suffix = suffix
        self.arrivals: dict[int, int] = {}
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        settings = self.stack.settings
        # the local schema is the registered one (a fresh stack): fastavro directly, which
        # keeps up with the other programs' records on raw.ebpf better than Codec does
        schema = fastavro.parse_schema(schemas.load(TOPICS[self.suffix].schema or ""))
        name = topic_name(settings, self.suffix)
        consumer = Consumer({**settings.kafka_config(), "group.id": f"bench-lat-{os.getpid()}",
                             "enable.auto.commit": False, "fetch.wait.max.ms": 10})
        parts = consumer.list_topics(name, timeout=10).topics[name].partitions
        consumer.assign([TopicPartition(name, p, OFFSET_END) for p in parts])
        try:
            while not self.stop.is_set():
                for msg in consumer.consume(100, 0.1):
                    if msg.error():
                        continue
                    now = time.time_ns()
                    value = msg.value()
                    if not value:
                        continue
                    rec = fastavro.schemaless_reader(io.BytesIO(value[5:]), schema, None)
                    if not isinstance(rec, dict) or rec["type"] != "END":
                        continue
                    if self.suffix == "flows" and rec["server"]["port"] == self.server_port:
                        self.arrivals.setdefault(rec["client"]["port"], now)
                    elif self.suffix == "raw.ebpf" and rec["remote_port"] == self.server_port:
                        self.arrivals.setdefault(rec["local_port"], now)
                if consumer.assignment() and not self.ready.is_set():
                    self.ready.set()
        finally:
            consumer.close()


def _spawn(argv: list[str], log: Path, stdin: int | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=stdin, cwd=REPO)


def _wait_text(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.1)
    return False


def latency(stack: LocalStack, run_dir: Path, quick: bool) -> Item:
    item = Item("4. Latency: socket close -> END record on packetless.flows (local stack)")
    count, rate = (60, 20.0) if quick else (300, 20.0)
    port = new_port()
    server_log = run_dir / "lat-server.log"
    server = _spawn([PYTHON, "-m", "bench.traffic", "server", str(port)], server_log)
    watcher = FlowWatcher(stack, port)
    raw = FlowWatcher(stack, port, "raw.ebpf")
    try:
        _wait_text(server_log, "ready", server, 30)
        for w in (watcher, raw):
            w.start()
            w.ready.wait(30)
        out = run_dir / "latency.json"
        subprocess.run([PYTHON, "-m", "bench.traffic", "latency", str(port), str(out), str(count),
                        str(rate)], cwd=REPO, check=True, timeout=count / rate + 120)
        closes = {c["client_port"]: c["closed_ns"] for c in json.loads(out.read_text())}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (closes.keys() <= watcher.arrivals.keys()
                                                   and closes.keys() <= raw.arrivals.keys()):
            time.sleep(0.5)
    finally:
        watcher.stop.set()
        raw.stop.set()
        server.terminate()
        server.wait(10)
    rows = []
    for label, w in (("client close -> END on raw.ebpf (sensor + Kafka)", raw),
                     ("client close -> END on packetless.flows (end to end)", watcher)):
        lat = sorted((w.arrivals[p] - t) / 1e6 for p, t in closes.items() if p in w.arrivals)
        p50 = statistics.median(lat) if lat else None
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None
        rows.append([label, str(len(closes)), str(len(lat)), fmt(p50, 0), fmt(p99, 0),
                     fmt(lat[-1] if lat else None, 0)])
    # the loop ends with the end-to-end path: its latencies and p99 are the target's
    item.tables.append((["path", "connections", "END received", "p50 ms", "p99 ms", "max ms"],
                        rows))
    item.targets.append((f"p99 under {LATENCY_TARGET_MS:,} ms from a socket's close to its END on "
                         f"packetless.flows (issue 5): p50 {rows[-1][3]} ms, p99 {rows[-1][4]} ms, "
                         f"{len(lat)} of {len(closes)} ENDs received",
                         p99 is not None and p99 < LATENCY_TARGET_MS and len(lat) == len(closes)))
    item.notes.append(f"{count} connections at {rate:g}/s (100 bytes each way), client closes "
                      "first; latency = arrival of the END (decoded) at a consumer of "
                      "packetless.flows - the client's close(); the worker waits for both ends "
                      "(or the 2 s END grace) and runs on 1 s ticks")
    item.commands.append(f"python -m bench.traffic latency PORT OUT {count} {rate:g}")
    return item


def memory(stack: LocalStack, run_dir: Path, quick: bool) -> Item:
    item = Item("5. Memory: sensor and worker RSS with live loopback connections")
    levels = (1000, 10000) if quick else (1000, 10000, TARGET_CONNECTIONS, 100000)
    holders: list[subprocess.Popen[bytes]] = []
    rows = []
    held = 0
    settled: dict[int, tuple[float, float]] = {}  # connections -> the sensor's RSS window
    try:
        for n in levels:
            t0 = time.monotonic()
            since_ms = int(time.time() * 1000)
            ports: set[int] = set()
            before = held
            while held < n and time.monotonic() - t0 < 900:
                chunk = min(traffic.HOLD_CHUNK, n - held)
                try:
                    proc, port = start_holder(run_dir / f"hold-{len(holders)}.log", chunk)
                except RuntimeError as exc:
                    item.notes.append(str(exc))
                    break
                holders.append(proc)
                ports.add(port)
                held += chunk
            opened_s = time.monotonic() - t0
            time.sleep(15)  # the sensor reads its ring buffer and scans its maps (5 s)
            lag, caught_up = wait_caught_up(stack, 300)
            sensor, worker = stack.process("sensor"), stack.process("streams")
            drops = latest_drops(stack.settings)
            starts = raw_starts(stack.settings, since_ms, ports)
            median, largest = _rss_window(sensor, RSS_WINDOW_S)
            if held == TARGET_CONNECTIONS:
                settled[held] = median, largest
            rows.append([f"{held:,}", fmt(opened_s, 0), f"{starts:,} of {2 * (held - before):,}",
                         f"{median:.1f} / {largest:.1f}",
                         fmt(worker.memory_info().rss / 2**20, 0),
                         fmt(metric(stack.web_port, "packetless_streams_table_keys", 'table="flows"'), 0),
                         fmt(metric(stack.metrics_port, "packetless_sensor_lost_events_total"), 0),
                         str(drops.get("tcp_map_full", "-")), str(drops.get("owner_map_full", "-")),
                         fmt(lag, 0) + ("" if caught_up else " (behind)"),
                         fmt(time.monotonic() - t0, 0)])
            if held < n:
                break
    finally:
        release_holders(holders)
    item.tables.append((["live connections", "open s", "raw START records of new sockets",
                         f"sensor RSS MiB (median / largest of {RSS_WINDOW_S} s)",
                         "worker RSS MiB",
                         "worker flows table keys", "sensor ring losses", "tcp map full",
                         "owner map full", "worker lag (raw records)", "level s"], rows))
    if TARGET_CONNECTIONS in settled:
        median, largest = settled[TARGET_CONNECTIONS]
        item.targets.append((f"sensor RSS under 150 MB ({SENSOR_RSS_TARGET_MIB:.2f} MiB) with "
                             f"100,000 live sockets (issue 3): median {median:.1f} MiB, largest "
                             f"{largest:.1f} MiB of {RSS_WINDOW_S} s",
                             median < SENSOR_RSS_TARGET_MIB))
    else:
        item.targets.append(("sensor RSS with 100,000 live sockets (issue 3): not measured "
                             "(quick mode, or fewer connections held)", None))
    entries = EbpfOptions().tcp_entries
    item.notes.append("each connection is 2 sockets (client and accepted), each has read or "
                      f"written 1 byte; held by processes of {traffic.HOLD_CHUNK:,} connections "
                      "(RLIMIT_NOFILE is capped at 20,000 here); RSS measured 15 s after the "
                      "connections are open, once the worker's lag on the raw topics is under "
                      "500 records (at most 300 s more), the sensor's sampled every 0.25 s for "
                      f"{RSS_WINDOW_S} s; the sensor's default map holds {entries:,} TCP sockets "
                      f"(tcp_entries), i.e. {entries // 2:,} loopback connections")
    item.commands.append(f"python -m bench.traffic hold PORT COUNT (one process per "
                         f"{traffic.HOLD_CHUNK:,})")
    return item


def _rss_window(proc: psutil.Process, seconds: float) -> tuple[float, float]:
    """Median and largest RSS (MiB) of ``proc``, sampled every 0.25 s for ``seconds``."""
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples.append(proc.memory_info().rss / 2**20)
        time.sleep(0.25)
    return statistics.median(samples), max(samples)


def with_sensor(run_dir: Path, quick: bool, lat: bool = True, mem: bool = True) -> list[Item]:
    """Items 4 and/or 5 on one stack started with the sensor."""
    run_dir.mkdir(parents=True, exist_ok=True)
    stack = start(run_dir / "stack-sensor", sensor=True)
    items = []
    try:
        for wanted, fn in ((lat, latency), (mem, memory)):
            if wanted:
                try:
                    items.append(fn(stack, run_dir, quick))
                except Exception as exc:  # the other item still runs; the report says why
                    failed = Item(f"{fn.__name__} (FAILED)", notes=[f"error: {exc!r}"],
                                  targets=[("item ran", False)])
                    items.append(failed)
        for it in items:
            it.commands.insert(0, stack.command)
        return items
    finally:
        stack.stop()
