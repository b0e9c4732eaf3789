"""Broker outages: the Publisher spools to disk while Kafka is down and replays in order after.

The kafka-marked tests run a private broker and registry, kill the broker (SIGKILL or SIGTERM)
while records keep coming, restart it on the same data dir and ports, and check that every record
arrived exactly once and in order per key; a spool smaller than the outage drops exactly the
oldest records and counts them. The Spool tests at the top need no broker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from confluent_kafka import Producer

from deploy import broker, registry, stack
from packetless.config import Settings
from packetless.kafka import Publisher, consumer, ensure_schemas, ensure_topics
from packetless.serde import Codec
from packetless.spool import Spool, SpoolError, SpoolRecord
from packetless.topics import topic_name
from tests.conftest import start_stack
from tests.test_streams_kafka import (
    FIXTURE,
    LONG_GRACE,
    Reader,
    StreamWorker,
    check_load,
    connections,
    load_settled,
    produce,
    wait_for,
)

SUFFIX = "flows.ecs"  # JSON: the registry plays no part here
KEYS = 16
PAD = "x" * 250


# -- the spool alone ----------------------------------------------------------------------------

def _rec(seq: int, size: int = 100) -> SpoolRecord:
    return SpoolRecord(seq, "t", f"k{seq:04d}".encode(), b"v" * size, [("h", b"1")], seq)


def test_spool_is_fifo_and_survives_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite")
    spool.put([_rec(3), _rec(1)])
    spool.put([_rec(2)])
    assert [r.seq for r in spool.head(10)] == [1, 2, 3]
    assert spool.head(10)[0].headers == [("h", b"1")]
    spool.release()
    assert spool.delete([1]) == 1
    size = spool.bytes
    spool.close()
    again = Spool(tmp_path / "s.sqlite")
    assert [r.seq for r in again.head(10)] == [2, 3]
    assert (len(again), again.bytes, again.last_seq) == (2, size, 3)
    again.close()


def test_spool_is_held_by_one_publisher(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite")
    with pytest.raises(SpoolError, match="in use"):
        Spool(tmp_path / "s.sqlite")
    spool.close()
    Spool(tmp_path / "s.sqlite").close()


def test_spool_bound_drops_oldest_and_counts(tmp_path: Path) -> None:
    one = _rec(1).size
    spool = Spool(tmp_path / "s.sqlite", max_bytes=10 * one)
    for seq in range(1, 26):
        spool.put([_rec(seq)])
    assert spool.dropped == 15 and len(spool) == 10 and spool.bytes <= spool.max_bytes
    assert [r.seq for r in spool.head(100)] == list(range(16, 26))
    # leased records (being replayed) are spared: the next-oldest go instead
    spool.put([_rec(26), _rec(27)])
    assert [r.seq for r in spool.head(100)][:10] == list(range(16, 26))
    spool.release()
    # a late record older than all others is itself the oldest, hence the one dropped
    spool.put([_rec(5)])
    assert 5 not in [r.seq for r in spool.head(100)]
    # a record larger than the whole bound is dropped alone
    before = len(spool)
    assert spool.put([_rec(99, size=11 * one)]) == 1 and len(spool) == before
    spool.close()


# -- against a real broker ------------------------------------------------------------------


@dataclass
class Load:
    """Sends numbered records at a steady rate from a thread, as a sensor would."""

    pub: Publisher
    rate: float
    sent: int = 0
    worst_send_s: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.is_set():
            due = int((time.monotonic() - t0) * self.rate)
            while self.sent < due:
                begin = time.monotonic()
                send(self.pub, self.sent)
                self.worst_send_s = max(self.worst_send_s, time.monotonic() - begin)
                self.sent += 1
            time.sleep(0.005)


def send(pub: Publisher, seq: int) -> None:
    pub.send(SUFFIX, f"k{seq % KEYS}", {"seq": seq, "pad": PAD})


@pytest.fixture(scope="module")
def private_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack.Stack]:
    running = start_stack(tmp_path_factory.mktemp("outage"))
    yield running
    running.stop(print)


def fresh_settings(running: stack.Stack, name: str) -> Settings:
    """The private stack's settings with a topic prefix of this test's own."""
    base = running.options.settings
    s = Settings(**{**base.__dict__, "topic_prefix": f"{name}{os.getpid()}."})
    ensure_topics(s, [SUFFIX])
    return s


def kill_broker(running: stack.Stack, sig: signal.Signals) -> None:
    part = next(p for p in running.parts if p.name == "kafka")
    os.killpg(part.proc.pid, sig)
    part.proc.wait(90)


def restart_broker(running: stack.Stack) -> float:
    """Start the broker again on its data dir and ports; returns seconds until it answered."""
    t0 = time.monotonic()
    s = running.options.settings
    port = running.options.kafka_port
    cfg = broker.BrokerConfig(data_dir=s.data_dir, port=port, controller_port=port + 1)
    classpath = broker.ensure_fetched(s.cache_dir, print)
    proc = broker.start(cfg, classpath)
    running.parts = [p for p in running.parts if p.name != "kafka"]
    running.parts.insert(0, stack.Part("kafka", proc, cfg.console_log))
    broker.wait_ready(cfg.bootstrap, 120, logs=[cfg.server_log, cfg.console_log], proc=proc)
    return time.monotonic() - t0


def read_seqs(s: Settings, expected: int, timeout: float = 60.0) -> dict[str, list[int]]:
    """key -> sequence numbers in log order, reading the topic until ``expected`` records."""
    cons = consumer(s, None)
    cons.subscribe([topic_name(s, SUFFIX)])
    per_key: dict[str, list[int]] = defaultdict(list)
    count = 0
    idle_until = time.monotonic() + timeout
    try:
        while time.monotonic() < idle_until:
            for msg in cons.consume(1000, timeout=1.0):
                if msg.error():
                    continue
                per_key[msg.key().decode()].append(json.loads(msg.value())["seq"])
                count += 1
                idle_until = time.monotonic() + (5.0 if count >= expected else timeout)
    finally:
        cons.close()
    return per_key


def check_exactly_once_in_order(per_key: dict[str, list[int]], produced: set[int]
                                ) -> tuple[int, int, int]:
    """(delivered, lost, duplicates); asserts per-key order."""
    for key, seqs in per_key.items():
        assert seqs == sorted(seqs), f"{key} out of order"
    got = [seq for seqs in per_key.values() for seq in seqs]
    return len(got), len(produced - set(got)), len(got) - len(set(got))


@pytest.mark.kafka
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_outage_loses_nothing_and_keeps_order(private_stack: stack.Stack,
                                              sig: signal.Signals) -> None:
    s = fresh_settings(private_stack, f"out{sig.name.lower()}")
    pub = Publisher(s, spool=f"outage-{sig.name}")
    load = Load(pub, rate=2000)
    thread = threading.Thread(target=load.run)
    thread.start()
    try:
        time.sleep(5)
        kill_broker(private_stack, sig)
        down_at = time.monotonic()
        time.sleep(20)
        ready_s = restart_broker(private_stack)
        outage_s = time.monotonic() - down_at
        time.sleep(5)
    finally:
        load.stop.set()
        thread.join()
    assert pub.flush(180) == 0
    produced = set(range(load.sent))
    delivered, lost, dups = check_exactly_once_in_order(read_seqs(s, load.sent), produced)
    print(f"\noutage ({sig.name}, broker away {outage_s:.1f} s, restart {ready_s:.1f} s): "
          f"produced {load.sent}, delivered {delivered}, lost {lost}, duplicates {dups}, "
          f"spooled {pub.spooled}, replayed {pub.replayed}, found already in Kafka "
          f"{pub.confirmed}, dropped {pub.dropped}, spool peak {pub.spool_peak_bytes / 1e6:.1f} MB, "
          f"slowest send {load.worst_send_s * 1000:.0f} ms")
    assert pub.close() == 0
    assert (lost, dups, pub.dropped) == (0, 0, 0)
    assert delivered == load.sent and pub.spooled > 0 and pub.replayed > 0
    assert load.worst_send_s < 2.0, "the sensor must keep going while Kafka is away"


@pytest.mark.kafka
def test_full_spool_drops_exactly_the_oldest(private_stack: stack.Stack) -> None:
    s = fresh_settings(private_stack, "bound")
    record = 300  # about one spooled record, in bytes
    pub = Publisher(s, spool="bound", spool_max_bytes=400 * record, **{"message.timeout.ms": 4000})
    before = 100
    for seq in range(before):
        send(pub, seq)
    assert pub.flush(30) == 0
    kill_broker(private_stack, signal.SIGKILL)
    during = 3000
    for seq in range(before, before + during):
        send(pub, seq)
    deadline = time.monotonic() + 30  # until every record is in the spool (or dropped from it)
    while pub.spooled < during and time.monotonic() < deadline:
        pub.flush(0.5)
    assert pub.spooled == during
    restart_broker(private_stack)
    assert pub.flush(120) == 0
    per_key = read_seqs(s, before + during - pub.dropped)
    got = {seq for seqs in per_key.values() for seq in seqs}
    missing = sorted(set(range(before + during)) - got)
    print(f"\nbounded spool ({400 * record} bytes): outage records "
          f"{during}, spooled {pub.spooled}, dropped {pub.dropped}, missing {len(missing)} "
          f"(seq {missing[0]}..{missing[-1]}), delivered {len(got)}, spool peak "
          f"{pub.spool_peak_bytes} bytes")
    assert pub.dropped == len(missing) > 0
    assert missing == list(range(before, before + len(missing))), "the oldest must go first"
    assert check_exactly_once_in_order(per_key, got)[2] == 0, "no duplicates"
    assert pub.close() == 0


@pytest.mark.kafka
def test_spool_is_replayed_by_the_next_process(private_stack: stack.Stack) -> None:
    s = fresh_settings(private_stack, "restart")
    kill_broker(private_stack, signal.SIGTERM)
    first = Publisher(s, spool="restart", **{"message.timeout.ms": 3000})
    count = 2000
    for seq in range(count):
        send(first, seq)
    left = first.close(timeout=5)
    assert left == count, "undelivered records stay in the spool file"
    restart_broker(private_stack)
    second = Publisher(s, spool="restart")
    assert second.spool_records == count
    assert second.flush(120) == 0
    delivered, lost, dups = check_exactly_once_in_order(read_seqs(s, count), set(range(count)))
    print(f"\nrestart: spooled by the first publisher {left}, replayed by the second "
          f"{second.replayed}, delivered {delivered}, lost {lost}, duplicates {dups}")
    assert (delivered, lost, dups) == (count, 0, 0) and second.replayed == count
    second.close()


@pytest.mark.kafka
def test_in_flight_records_found_in_kafka_are_not_sent_twice(private_stack: stack.Stack) -> None:
    """Records that timed out in flight may still have been written: the replayer looks for them
    in their partition first. Here 50 such records did reach Kafka and 50 did not."""
    s = fresh_settings(private_stack, "inflight")
    topic = topic_name(s, SUFFIX)
    producer = Producer(s.kafka_config())
    partitions: dict[int, int] = {}
    ts = int(time.time() * 1000)
    values = {seq: json.dumps({"seq": seq, "pad": PAD}).encode() for seq in range(100)}
    for seq in range(50):
        producer.produce(topic, values[seq], f"k{seq % KEYS}", timestamp=ts,
                         on_delivery=lambda _err, msg, seq=seq: partitions.__setitem__(seq, msg.partition()))
    assert producer.flush(30) == 0 and len(partitions) == 50
    spool = Spool(s.data_dir / "spool" / "inflight.sqlite")
    spool.put(SpoolRecord(seq + 1, topic, f"k{seq % KEYS}".encode(), values[seq], None, ts, None,
                          partitions.get(seq, seq % 4)) for seq in range(100))
    spool.close()
    pub = Publisher(s, spool="inflight")
    assert pub.flush(60) == 0
    delivered, lost, dups = check_exactly_once_in_order(read_seqs(s, 100), set(range(100)))
    print(f"\nin flight at the outage: 100 uncertain, found already in Kafka {pub.confirmed}, "
          f"replayed {pub.replayed}, delivered {delivered}, duplicates {dups}")
    assert (pub.confirmed, pub.replayed, delivered, lost, dups) == (50, 50, 100, 0, 0)
    pub.close()


def restart_registry(running: stack.Stack) -> None:
    s = running.options.settings
    runner = registry.ensure_built(s.cache_dir, print)
    log = s.data_dir / "logs" / "registry.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(registry.command(runner, s.data_dir, running.options.registry_port,
                                                 s.bootstrap_servers),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    running.parts = [p for p in running.parts if p.name != "registry"]
    running.parts.insert(1, stack.Part("registry", proc, log))
    registry.wait_ready(s.registry_url, 180, proc=proc, log=log)


@pytest.mark.kafka
def test_registry_outage_spools_unencoded_and_frames_at_replay(private_stack: stack.Stack) -> None:
    s = fresh_settings(private_stack, "noreg")
    ensure_topics(s, ["dlq"])
    part = next(p for p in private_stack.parts if p.name == "registry")
    os.killpg(part.proc.pid, signal.SIGKILL)
    part.proc.wait(30)
    pub = Publisher(s, spool="noreg")
    sent = [{"reason": f"r{i}", "error_type": "not_avro", "source_topic": "t",
             "source_partition": 0, "source_offset": i, "source_timestamp_ms": None, "key": None,
             "value": bytes([i % 256]) * 10, "headers": {}, "consumer": "test", "host": "h",
             "timestamp_ms": i} for i in range(300)]
    t0 = time.monotonic()
    for i, value in enumerate(sent):
        pub.send("dlq", f"k{i % 4}", value)
    send_s = time.monotonic() - t0
    assert pub.spool_records == len(sent), "no schema id yet: all wait in the spool"
    restart_registry(private_stack)
    assert pub.flush(120) == 0
    codec = Codec(s)
    cons = consumer(s, None)
    cons.subscribe([topic_name(s, "dlq")])
    got: list[dict] = []
    deadline = time.monotonic() + 60
    while len(got) < len(sent) and time.monotonic() < deadline:
        got += [codec.decode("dlq", m.value()) for m in cons.consume(500, timeout=1.0)
                if not m.error()]
    cons.close()
    print(f"\nregistry outage: {len(sent)} Avro records sent in {send_s:.1f} s, spooled unencoded "
          f"{pub.spooled}, framed and replayed {pub.replayed}, read back {len(got)}")
    assert got == sent  # one partition: the order is the sending order
    pub.close()


@pytest.mark.kafka
def test_stream_worker_rides_out_broker_and_registry_restarts(private_stack: stack.Stack,
                                                              tmp_path: Path) -> None:
    """Connections keep coming (through a spooling Publisher, as from a sensor) while the broker
    and the registry are killed and started again under a running stream worker: the worker
    keeps going, every connection ends, once each (a repeated END is the same event), exactly,
    and the container windows add up to exactly the bytes sent."""
    base = private_stack.options.settings
    s = Settings(**{**base.__dict__, "topic_prefix": f"wo{os.getpid()}.",
                    "data_dir": tmp_path / "data"})
    ensure_topics(s)
    ensure_schemas(Codec(s))
    n = 300
    fixture = json.loads(FIXTURE.read_text())
    produce(s, fixture["meta"], int(time.time() * 1000) - fixture["origin_ms"])
    worker = StreamWorker(s, f"g{s.topic_prefix[:-1]}", tmp_path / "worker.log", LONG_GRACE)
    readers = {x: Reader(s, x) for x in ("flows", "metrics.containers")}
    flows, windows = readers["flows"].records, readers["metrics.containers"].records
    pub = Publisher(s, spool="worker-outage")
    outage: dict[str, float] = {}

    def restart_both() -> None:  # while connections keep coming
        t0 = time.monotonic()
        part = next(p for p in private_stack.parts if p.name == "registry")
        os.killpg(part.proc.pid, signal.SIGKILL)
        part.proc.wait(30)
        kill_broker(private_stack, signal.SIGKILL)
        time.sleep(5)
        restart_broker(private_stack)
        restart_registry(private_stack)
        outage["s"] = time.monotonic() - t0

    restarter = threading.Thread(target=restart_both)
    try:
        worker.start()
        for i, records in enumerate(connections(n, spread_s=30)):
            for rec in records:
                pub.send(rec["topic"], rec["key"], rec["value"])
            if i == n // 4:
                restarter.start()
        restarter.join(300)
        assert outage, "broker and registry not restarted"
        assert pub.flush(180) == 0  # (sends that failed went to the spool)
        wait_for(readers, lambda: load_settled(flows, windows, n), 300, worker)
        time.sleep(3)
        for r in readers.values():
            r.poll(1)
        print(f"\nbroker and registry restarted under a worker (away {outage['s']:.1f} s, spooled "
              f"{pub.spooled}, replayed {pub.replayed}, failed sends {pub.failed}): "
              f"{check_load(flows, windows, n)}")
        assert worker.alive()
        assert b"packetless_streams_late_activity_total 0.0" in worker.get("/metrics")
    finally:
        worker.stop()
        pub.close()
        for r in readers.values():
            r.close()
