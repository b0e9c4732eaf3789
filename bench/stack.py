"""The local stack for the benchmarks (``packetless up --detach`` on private ports and a private
data dir; ``packetless down``), and Kafka look-ups on it: topic sizes, readiness.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from confluent_kafka import Consumer, TopicPartition

from bench.common import PYTHON, REPO, new_port
from packetless.config import Settings
from packetless.topics import topic_name


@dataclass
class LocalStack:
    """A running stack: its settings and the pids of its parts."""

    data_dir: Path
    settings: Settings
    parts: dict[str, int]
    command: str
    web_port: int
    metrics_port: int

    def process(self, part: str) -> psutil.Process:
        return psutil.Process(self.parts[part])

    def stop(self) -> None:
        subprocess.run([PYTHON, "-m", "packetless", "down", "--data-dir", str(self.data_dir)],
                       cwd=REPO, capture_output=True, timeout=180, check=False)


def start(data_dir: Path, sensor: bool) -> LocalStack:
    """``packetless up --detach`` with a fresh data dir; waits until the worker answers."""
    kafka, registry, web, metrics = new_port(), new_port(), new_port(), new_port()
    argv = ["packetless", "up", "--detach", "--data-dir", str(data_dir), "--kafka-port",
            str(kafka), "--registry-port", str(registry), "--web-port", str(web),
            "--metrics-port", str(metrics)] + ([] if sensor else ["--no-sensor"])
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir.parent / f"{data_dir.name}-up.log").open("wb") as log:
        subprocess.run([PYTHON, "-m", *argv], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                       timeout=900, check=True)
    info = json.loads((data_dir / "stack.json").read_text())
    settings = Settings(data_dir=data_dir, bootstrap_servers=f"127.0.0.1:{kafka}",
                        registry_url=f"http://127.0.0.1:{registry}/apis/ccompat/v7")
    stack = LocalStack(data_dir, settings, info["parts"], " ".join(argv), web, metrics)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{web}/healthz", timeout=2) as r:
                if r.status == 200:
                    return stack
        except OSError:
            pass
        time.sleep(1)
    stack.stop()
    raise RuntimeError("the stream worker did not become healthy within 180 s")


def metric(port: int, name: str, labels: str = "") -> float | None:
    """The sum of the samples of ``name`` whose line contains ``labels``, from a Prometheus
    endpoint on 127.0.0.1; None when unreachable or absent."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return None
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + "{") or line.startswith(name + " ")
              if labels in line]
    return sum(values) if values else None


def wait_caught_up(stack: LocalStack, max_s: float,
                   backlog: int = 500) -> tuple[float | None, bool]:
    """Wait until the worker's consumer lag on the raw topics is under ``backlog`` (other
    programs' traffic keeps the topics growing on a shared machine); returns the lag."""
    deadline = time.monotonic() + max_s
    lag = None
    while time.monotonic() < deadline:
        lag = metric(stack.web_port, "packetless_streams_consumer_lag", "raw.")
        if lag is not None and lag < backlog:
            return lag, True
        time.sleep(2)
    return lag, False


class Offsets:
    """High watermarks of topics of the stack (sum over partitions)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.consumer = Consumer({**settings.kafka_config(), "group.id": "bench-offsets",
                                  "enable.auto.commit": False})

    def partitions(self, suffix: str) -> list[TopicPartition]:
        name = topic_name(self.settings, suffix)
        meta = self.consumer.list_topics(name, timeout=10).topics[name]
        return [TopicPartition(name, p) for p in meta.partitions]

    def size(self, suffix: str) -> int:
        return sum(self.consumer.get_watermark_offsets(tp, timeout=10)[1]
                   for tp in self.partitions(suffix))

    def settle(self, suffix: str, quiet_s: float, max_s: float) -> tuple[int, float, bool]:
        """Wait until the topic stops growing for ``quiet_s`` (at most ``max_s``); returns its
        size, the monotonic time it last grew, and whether it settled."""
        size, grew = self.size(suffix), time.monotonic()
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = self.size(suffix)
            if now != size:
                size, grew = now, time.monotonic()
            elif time.monotonic() - grew >= quiet_s:
                return size, grew, True
        return size, grew, False

    def close(self) -> None:
        self.consumer.close()


def latest_drops(settings: Settings, max_s: float = 60.0) -> dict[str, int]:
    """The sensor's latest loss counters: the last DROPS record on raw.ebpf."""
    from confluent_kafka import OFFSET_BEGINNING

    from packetless.serde import Codec

    name = topic_name(settings, "raw.ebpf")
    consumer = Consumer({**settings.kafka_config(), "group.id": f"bench-drops-{time.time_ns()}",
                         "enable.auto.commit": False})
    try:
        parts = consumer.list_topics(name, timeout=10).topics[name].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)[1]
                for p in parts}
        consumer.assign([TopicPartition(name, p, OFFSET_BEGINNING) for p in parts])
        last: tuple[int, bytes] | None = None
        pending = {p for p, end in ends.items() if end > 0}
        deadline = time.monotonic() + max_s
        while pending and time.monotonic() < deadline:
            for msg in consumer.consume(5000, 1.0):
                if msg.error():
                    continue
                if msg.key() and msg.key().endswith(b":drops") and \
                        (last is None or msg.timestamp()[1] >= last[0]):
                    last = (msg.timestamp()[1], msg.value())
                if msg.offset() + 1 >= ends[msg.partition()]:
                    pending.discard(msg.partition())
        if last is None:
            return {}
        record = Codec(settings).decode("raw.ebpf", last[1]) or {}
        return record.get("drops") or {}
    finally:
        consumer.close()


def raw_since(settings: Settings, since_ms: int, max_s: float = 300.0
              ) -> Iterator[dict[str, Any]]:
    """The raw.ebpf records produced since ``since_ms`` (up to the end of each partition as it
    was when called), decoded."""
    from packetless.serde import Codec
    from streams.raw import RawDecoder

    decoder = RawDecoder(Codec(settings))
    name = topic_name(settings, "raw.ebpf")
    consumer = Consumer({**settings.kafka_config(), "group.id": f"bench-raw-{time.time_ns()}",
                         "enable.auto.commit": False})
    try:
        parts = consumer.list_topics(name, timeout=10).topics[name].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)[1]
                for p in parts}
        starts = consumer.offsets_for_times([TopicPartition(name, p, since_ms) for p in parts],
                                            timeout=10)
        todo = [tp for tp in starts if 0 <= tp.offset < ends[tp.partition]]
        consumer.assign(todo)
        pending = {tp.partition for tp in todo}
        deadline = time.monotonic() + max_s
        while pending and time.monotonic() < deadline:
            for msg in consumer.consume(5000, 1.0):
                if msg.error():
                    continue
                if msg.offset() + 1 >= ends[msg.partition()]:
                    pending.discard(msg.partition())
                yield decoder.decode("raw.ebpf", msg.value()) or {}
    finally:
        consumer.close()


def raw_starts(settings: Settings, since_ms: int, ports: set[int], max_s: float = 300.0) -> int:
    """raw.ebpf START records produced since ``since_ms`` of sockets on ``ports`` (either end)."""
    return sum(1 for rec in raw_since(settings, since_ms, max_s)
               if rec.get("type") == "START" and (rec.get("local_port") in ports
                                                  or rec.get("remote_port") in ports))
