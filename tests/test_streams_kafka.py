"""The stream worker end to end on the real broker and registry: recorded raw events in, enriched
flows (Avro, ECS, OCSF), per-container/pod windows and DLQ records out; web views; and a
worker killed with SIGKILL that restarts from its changelogs and emits the END it owed."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import ConfigResource

import schemas
from packetless.config import Settings
from packetless.kafka import Publisher, admin, consumer, ensure_schemas, ensure_topics
from packetless.serde import Codec
from packetless.topics import REMOVED_CONTAINER_KEEP_MS, TOPICS, topic_name
from tests.conftest import free_port

pytestmark = pytest.mark.kafka

FIXTURE = Path(__file__).parent / "fixtures" / "streams_scenario.json"
STEP_MS, HOP_MS = 2000, 6000
TUNING = {"PACKETLESS_WINDOW_STEP": "2", "PACKETLESS_WINDOW_HOP": "6",
          "PACKETLESS_WINDOW_GRACE": "5", "PACKETLESS_ACTIVE_TIMEOUT": "2",
          "PACKETLESS_JOIN_DELAY": "1", "PACKETLESS_END_GRACE": "1",
          "PACKETLESS_IDLE_TIMEOUT": "120", "PACKETLESS_FLOW_LINGER": "60",
          "PACKETLESS_TICK_INTERVAL": "0.5", "PACKETLESS_STREAMS_PARTITIONS": "2"}
A, B, C = "a1" * 32, "b2" * 32, "c3" * 32
# Community ID v1 of tcp 172.18.0.2:45678 -> 172.18.0.3:8080 (corelight's reference code)
F1_COMMUNITY_ID = "1:qd11k4++uSc2rIjpGM38GkElxTI="
_COUNTER = iter(range(1000))
# windows that wait for late activity longer than a takeover or an outage lasts (Kafka's session
# timeout, then the new worker's start): then nothing held up by it is late
LONG_GRACE = {"PACKETLESS_WINDOW_GRACE": "60"}


def private(settings: Settings, tmp_path: Path) -> Settings:
    """The session's broker with this test's own topic prefix and data dir."""
    prefix = f"st{os.getpid()}x{next(_COUNTER)}."
    return Settings(**{**settings.__dict__, "topic_prefix": prefix, "data_dir": tmp_path / "data"})


class StreamWorker:
    """``python -m packetless streams`` in a subprocess (its own process group)."""

    def __init__(self, settings: Settings, group: str, log: Path,
                 tuning: dict[str, str] | None = None) -> None:
        self.settings, self.group, self.log = settings, group, log
        self.tuning = {**TUNING, **(tuning or {})}
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, **self.tuning,
               "PACKETLESS_BOOTSTRAP_SERVERS": self.settings.bootstrap_servers,
               "PACKETLESS_REGISTRY_URL": self.settings.registry_url,
               "PACKETLESS_TOPIC_PREFIX": self.settings.topic_prefix,
               "PACKETLESS_DATA_DIR": str(self.settings.data_dir),
               "PACKETLESS_HOST_NAME": "stream-worker"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "packetless", "-v", "streams", "--web-port", str(self.port),
                 "--workers-group", self.group], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, env=env,
                cwd=Path(__file__).resolve().parents[1])
        self.wait_healthy()

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
            body = resp.read()
        return body if path == "/metrics" else json.loads(body)

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"worker exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if self.get("/healthz")["status"] == "ok":
                    return
            except OSError:
                pass
            time.sleep(0.5)
        pytest.fail(f"worker not healthy after {timeout}s:\n{self.tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.killpg(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


class Reader:
    """Everything on one output topic since the beginning, decoded, read incrementally."""

    def __init__(self, settings: Settings, suffix: str) -> None:
        self.suffix = suffix
        self.codec = Codec(settings)
        self.consumer = consumer(settings, None)
        self.consumer.subscribe([topic_name(settings, suffix)])
        self.records: list[Any] = []
        self.raw: list[Any] = []

    def poll(self, seconds: float = 0.5) -> list[Any]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            msg = self.consumer.poll(0.1)
            if msg is None or msg.error():
                continue
            self.raw.append(msg)
            if TOPICS[self.suffix].schema:
                self.records.append(self.codec.decode(self.suffix, msg.value()))
            else:
                self.records.append(json.loads(msg.value()))
        return self.records

    def close(self) -> None:
        self.consumer.close()


def wait_for(readers: dict[str, Reader], done: Callable[[], bool], timeout: float,
             worker: StreamWorker) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in readers.values():
            r.poll(0.2)
        if done():
            return
        assert worker.alive(), worker.tail()
    pytest.fail(f"timed out; worker log:\n{worker.tail()}")


def shift(value: Any, delta_ms: int) -> Any:
    """A copy of a fixture record with its event times moved by ``delta_ms``."""
    value = copy.deepcopy(value)
    for key in ("timestamp_ms", "started_at_ms"):
        if value.get(key) is not None:
            value[key] += delta_ms
    for key in ("timestamp_ns", "start_ns"):
        if value.get(key) is not None:
            value[key] += delta_ms * 1_000_000
    return value


def produce(settings: Settings, records: list[dict[str, Any]], delta_ms: int) -> None:
    pub = Publisher(settings)
    for rec in records:
        pub.send(rec["topic"], rec["key"], shift(rec["value"], delta_ms))
    assert pub.flush(30) == 0 and pub.failed == 0


def flow_of(flows: list[dict[str, Any]], client_port: int) -> list[dict[str, Any]]:
    return [f for f in flows if f["client"]["port"] == client_port]


@pytest.fixture
def stack_settings(settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    s = private(settings, tmp_path)
    ensure_topics(s)
    ensure_schemas(Codec(s))
    yield s


def test_recorded_events_give_enriched_flows_windows_and_dlq(stack_settings: Settings,
                                                             tmp_path: Path) -> None:
    s = stack_settings
    fixture = json.loads(FIXTURE.read_text())
    now = int(time.time() * 1000)
    # all raw events fall in one 2 s step, 8-10 s ahead: its windows close (step + 5 s grace)
    # after a worker slow to start on a loaded host (6 s seen) has read them
    base = (now // STEP_MS + 5) * STEP_MS
    delta = base - fixture["origin_ms"]
    produce(s, fixture["meta"], delta)
    worker = StreamWorker(s, f"g{s.topic_prefix[:-1]}", tmp_path / "worker.log")
    readers = {x: Reader(s, x) for x in ("flows", "flows.ecs", "flows.ocsf", "metrics.containers",
                                         "dlq")}
    try:
        worker.start()
        pub = Publisher(s)
        pub.produce_raw(topic_name(s, "raw.ebpf"), b"node-1:999", b"definitely not avro")
        pub.produce_raw(topic_name(s, "raw.netlink"), b"node-1:998", b"\x00\x7f\xff\xff\xf0\x02\x04")
        assert pub.flush(30) == 0
        produce(s, fixture["raw"], delta)
        flows = readers["flows"].records
        wait_for(readers, lambda: all(any(f["type"] == "END" for f in flow_of(flows, p))
                                      for p in (45678, 51000, 45700, 40100)), 90, worker)
        produce(s, fixture["late_meta"] + fixture["late_raw"], delta)

        def complete() -> bool:
            f4 = flow_of(flows, 40100)
            metrics = readers["metrics.containers"].records
            hopping_a = [m for m in metrics if m["entity_id"] == A and m["window_size_ms"] == HOP_MS]
            return (bool(f4) and f4[-1]["client"]["container"]["name"] == "worker"
                    and len(hopping_a) >= 3 and len(readers["dlq"].records) >= 2
                    and all(any(f["type"] == "END" for f in flow_of(flows, p))
                            for p in (45678, 51000, 45700)))

        wait_for(readers, complete, 90, worker)
        time.sleep(2 * STEP_MS / 1000)  # anything emitted late would show now
        for r in readers.values():
            r.poll(1)
        check_flows(flows)
        check_ecs(readers["flows.ecs"].records, flows)
        check_ocsf(readers["flows.ocsf"].records)
        check_windows(readers["metrics.containers"].records, base)
        check_dlq(s, readers["dlq"].records)
        check_web(worker)
        assert worker.alive()
    finally:
        code = worker.stop()
        for r in readers.values():
            r.close()
    assert code == 0, worker.tail()


def check_flows(flows: list[dict[str, Any]]) -> None:
    assert {f["client"]["port"] for f in flows} == {45678, 51000, 45700, 40100}
    assert len({f["flow_id"] for f in flows}) == 4
    for port in (45678, 51000, 40100):
        events = flow_of(flows, port)
        assert [e["type"] for e in events][:1] == ["START"], events
        assert [e["type"] for e in events].count("START") == 1
        assert [e["sequence"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in flow_of(flows, 45678)] == ["START", "END"]  # late snapshot: no-op
    f1 = flow_of(flows, 45678)[-1]
    assert f1["type"] == "END" and f1["end_reason"] == "closed"
    assert (f1["client"]["ip"], f1["server"]["ip"], f1["server"]["port"]) == ("172.18.0.2",
                                                                              "172.18.0.3", 8080)
    assert f1["client"]["local"] and f1["server"]["local"]
    assert (f1["client"]["socket_cookie"], f1["server"]["socket_cookie"]) == (11, 12)
    assert (f1["client_bytes"], f1["server_bytes"], f1["retransmits"]) == (420, 12000, 1)
    assert (f1["client"]["bytes_received"], f1["server"]["bytes_received"]) == (12000, 420)
    assert f1["client"]["process"]["comm"] == "curl"
    assert f1["server"]["process"]["exe"] == "/usr/sbin/nginx"  # completed from meta.processes
    assert f1["server"]["process"]["user_name"] == "nginx"
    assert f1["client"]["container"]["name"] == "frontend"
    assert f1["client"]["container"]["pod_name"] == "frontend-7d9f"
    assert f1["server"]["container"]["name"] == "api"
    assert f1["server"]["container"]["image"] == "shop/api:2.1"
    assert f1["community_id"] == F1_COMMUNITY_ID
    assert (f1["client"]["srtt_us"], f1["server"]["srtt_us"], f1["rtt_us"]) == (90, 70, 90)
    assert f1["end_ns"] - f1["start_ns"] == 901_000_000
    f2 = flow_of(flows, 51000)[-1]
    assert f2["type"] == "END" and f2["server"]["port"] == 6379
    assert (f2["client"]["process"]["comm"], f2["server"]["process"]["comm"]) == ("redis-cli",
                                                                                  "redis-server")
    assert (f2["client_bytes"], f2["server_bytes"]) == (28, 14)
    assert f2["client"]["container"] is None and f2["client"]["local"] and f2["server"]["local"]
    f3 = flow_of(flows, 45700)
    assert [(e["type"], e["end_reason"], e["error"]) for e in f3] == [("END", "failed",
                                                                      "ECONNREFUSED")]
    assert not f3[0]["server"]["local"] and f3[0]["server"]["port"] == 9999
    f4 = flow_of(flows, 40100)
    assert f4[0]["client"]["container"]["name"] is None  # its metadata came later
    assert f4[-1]["client"]["container"]["name"] == "worker" and f4[-1]["type"] == "END"
    assert (f4[-1]["client_bytes"], f4[-1]["server_bytes"]) == (700, 9000)
    assert not f4[-1]["server"]["local"] and f4[-1]["server"]["process"] is None


ECS_TYPES: dict[str, type | tuple[type, ...]] = {
    "@timestamp": str, "event.kind": str, "event.category": list, "event.type": list,
    "event.action": str, "event.start": str, "event.end": str, "event.duration": int,
    "network.transport": str, "network.type": str, "network.iana_number": str,
    "network.direction": str, "network.community_id": str, "network.bytes": int,
    "network.packets": int, "source.ip": str, "source.port": int, "source.bytes": int,
    "source.packets": int, "destination.ip": str, "destination.port": int,
    "destination.bytes": int, "destination.packets": int, "process.pid": int, "process.name": str,
    "process.executable": str, "process.args": list, "process.command_line": str,
    "process.parent.pid": int, "process.parent.name": str, "process.user.id": str,
    "process.user.name": str, "user.id": str, "user.name": str, "group.id": str,
    "container.id": str, "container.name": str, "container.image.name": str,
    "container.runtime": str, "container.labels": dict, "orchestrator.type": str,
    "orchestrator.namespace": str, "orchestrator.resource.type": str,
    "orchestrator.resource.name": str, "host.name": str, "packetless.flow_id": str,
    "packetless.socket_cookie": int, "packetless.tcp.rtt_us": int, "packetless.tcp.rtt_var_us": int,
    "packetless.tcp.retransmits": int, "packetless.tcp.state": str,
    "packetless.peer.process.pid": int, "packetless.peer.container.name": str,
}


def field(doc: dict[str, Any], path: str) -> Any:
    if path in doc:
        return doc[path]
    value: Any = doc
    for part in path.split("."):
        value = value[part]
    return value


def check_ecs(docs: list[dict[str, Any]], flows: list[dict[str, Any]]) -> None:
    per_socket = sum(f["client"]["local"] + f["server"]["local"] for f in flows)
    assert len(docs) == per_socket
    f1_end = [d for d in docs if d["source"]["port"] == 45678 and d["event"]["action"] == "flow_end"]
    client, server = sorted(f1_end[-2:], key=lambda d: d["network"]["direction"])
    assert (client["network"]["direction"], server["network"]["direction"]) == ("egress", "ingress")
    for doc in (client, server):
        for path, typ in ECS_TYPES.items():
            assert isinstance(field(doc, path), typ), (path, doc)
        assert doc["event"]["kind"] == "event" and doc["event"]["category"] == ["network"]
        assert doc["source"]["ip"] == "172.18.0.2" and doc["destination"]["port"] == 8080
        assert doc["network"]["community_id"] == F1_COMMUNITY_ID
        assert doc["orchestrator"]["type"] == "kubernetes"
        assert doc["orchestrator"]["resource"]["type"] == "pod"
    assert client["process"]["name"] == "curl" and server["process"]["name"] == "nginx"
    assert client["packetless"]["peer"]["process"]["name"] == "nginx"
    assert server["packetless"]["peer"]["container"]["name"] == "frontend"
    assert client["process"]["command_line"].endswith("token=<redacted>")
    assert client["network"]["bytes"] == 12420 and client["source"]["bytes"] == 420
    assert client["event"]["duration"] == 901_000_000
    failed = [d for d in docs if d["source"]["port"] == 45700]
    assert [d["event"]["action"] for d in failed] == ["connection_failed"]
    starts = [d for d in docs if d["event"]["action"] == "flow_start"]
    assert all("end" not in d["event"] for d in starts)


def check_ocsf(events: list[dict[str, Any]]) -> None:
    assert events and all(e["class_uid"] == 4001 and e["category_uid"] == 4 for e in events)
    assert all(e["type_uid"] == 400100 + e["activity_id"] for e in events)
    refused = [e for e in events if e["src_endpoint"]["port"] == 45700]
    assert [(e["activity_id"], e["status_id"]) for e in refused] == [(5, 2)]
    f1_close = [e for e in events if e["src_endpoint"]["port"] == 45678 and e["activity_id"] == 2]
    assert {e["connection_info"]["direction"] for e in f1_close} == {"Outbound", "Inbound"}
    assert all(e["traffic"]["bytes_out"] == 420 and e["traffic"]["bytes_in"] == 12000
               for e in f1_close)


def check_windows(metrics: list[dict[str, Any]], base: int) -> None:
    def of(entity: str, size: int) -> list[dict[str, Any]]:
        return [m for m in metrics if m["entity_id"] == entity and m["window_size_ms"] == size]

    (a,) = of(A, STEP_MS)
    assert (a["window_start_ms"], a["window_end_ms"]) == (base, base + STEP_MS)
    assert (a["entity_type"], a["name"], a["pod_name"], a["namespace"]) == ("CONTAINER", "frontend",
                                                                            "frontend-7d9f", "shop")
    assert (a["flows_as_client"], a["flows_as_server"], a["failed_connects"]) == (2, 0, 1), a
    assert (a["bytes_out"], a["bytes_in"], a["retransmits"]) == (420, 12000, 1), a
    rtt = a["rtt_as_client"]
    assert rtt["samples"] == 3 and rtt["mean_us"] == pytest.approx(90), rtt  # 100, 80, 90
    assert rtt["variance_us2"] == pytest.approx(200 / 3)
    assert rtt["p50_us"] == pytest.approx(90, rel=0.01)
    assert rtt["p99_us"] == pytest.approx(90, rel=0.01), rtt  # DDSketch: rank 1.98 of 0..2
    assert rtt["max_us"] == 100
    assert a["rtt_as_server"]["samples"] == 0
    (b,) = of(B, STEP_MS)
    assert (b["flows_as_client"], b["flows_as_server"], b["bytes_out"], b["bytes_in"]) == (0, 1, 12000,
                                                                                          420)
    assert b["rtt_as_server"]["mean_us"] == pytest.approx(60)  # 50, 60, 70
    (c,) = of(C, STEP_MS)
    assert (c["bytes_out"], c["bytes_in"], c["retransmits"]) == (700, 9000, 2)
    assert c["rtt_as_client"]["mean_us"] == pytest.approx(20000)
    hopping = of(A, HOP_MS)
    assert [m["window_end_ms"] for m in hopping] == [base + STEP_MS * k for k in (1, 2, 3)]
    assert all(m["bytes_out"] == 420 and m["flows_as_client"] == 2 for m in hopping)
    (pod,) = of("shop/frontend-7d9f", STEP_MS)
    assert (pod["entity_type"], pod["bytes_out"], pod["containers"]) == ("POD", 420, 1)
    assert {m["entity_id"] for m in metrics} == {A, B, C, "shop/frontend-7d9f", "shop/api-5c4b"}


def check_dlq(s: Settings, dead: list[dict[str, Any]]) -> None:
    by_topic = {d["source_topic"]: d for d in dead}
    assert set(by_topic) == {topic_name(s, "raw.ebpf"), topic_name(s, "raw.netlink")}
    assert by_topic[topic_name(s, "raw.ebpf")]["value"] == b"definitely not avro"
    assert by_topic[topic_name(s, "raw.ebpf")]["error_type"] == "bad_magic"
    assert by_topic[topic_name(s, "raw.netlink")]["error_type"] == "unknown_schema"
    assert all(d["consumer"] == "streams" and d["source_offset"] == 0 for d in dead)


def check_web(worker: StreamWorker) -> None:
    containers = {c["id"]: c for c in worker.get("/containers")["containers"]}
    assert containers[A]["name"] == "frontend"
    assert containers[A]["window"]["window_size_ms"] == HOP_MS
    assert containers[A]["tumbling"]["bytes_out"] == 420
    pods = {p["id"] for p in worker.get("/pods")["pods"]}
    assert pods == {"shop/frontend-7d9f", "shop/api-5c4b"}
    flows = worker.get(f"/flows?container={A[:12]}")["flows"]
    assert {f["client"]["port"] for f in flows} == {45678, 45700}
    metrics = worker.get("/metrics").decode()
    assert 'packetless_streams_events_total{topic="raw.ebpf"}' in metrics
    assert "packetless_streams_dead_letters_total" in metrics
    assert "packetless_streams_consumer_lag" in metrics
    assert "packetless_streams_late_activity_total 0.0" in metrics  # nothing missed its window


def test_sigkill_restart_emits_owed_end(stack_settings: Settings, tmp_path: Path) -> None:
    """START seen, worker killed, END events produced meanwhile: a worker of the same group
    on an empty data dir (its RocksDB lost too) restores the flow from the changelog and emits
    its END, with what was known before the kill (processes from the START events)."""
    s = stack_settings
    fixture = json.loads(FIXTURE.read_text())
    raw = fixture["raw"]
    starts = [r for r in raw if r["value"].get("cookie") in (11, 12) and r["value"].get("type") == "START"]
    ends = [r for r in raw if r["value"].get("cookie") in (11, 12) and r["value"].get("type") == "END"]
    delta = int(time.time() * 1000) - fixture["origin_ms"]
    produce(s, fixture["meta"], delta)
    group = f"g{s.topic_prefix[:-1]}"
    worker = StreamWorker(s, group, tmp_path / "worker.log")
    readers = {"flows": Reader(s, "flows")}
    try:
        worker.start()
        produce(s, starts, delta)
        wait_for(readers, lambda: any(f["type"] == "START" for f in readers["flows"].records), 60,
                 worker)
        time.sleep(3)  # let the changelog and the offsets be committed
        worker.stop(signal.SIGKILL)
        produce(s, ends, delta)
        fresh = Settings(**{**s.__dict__, "data_dir": tmp_path / "fresh"})
        worker = StreamWorker(fresh, group, tmp_path / "worker2.log")
        worker.start()
        wait_for(readers, lambda: any(f["type"] == "END" for f in readers["flows"].records), 90,
                 worker)
        flows = readers["flows"].records
        end = next(f for f in flows if f["type"] == "END")
        assert end["flow_id"] == flows[0]["flow_id"] and end["sequence"] == 1, [
            (f["type"], f["sequence"], f["client_bytes"]) for f in flows]
        assert (end["client_bytes"], end["server_bytes"]) == (420, 12000)
        assert end["client"]["process"]["comm"] == "curl"
        assert [f["type"] for f in flows].count("START") == 1, flows
    finally:
        worker.stop()
        readers["flows"].close()


def test_worker_reads_only_the_process_records_its_cache_holds(stack_settings: Settings) -> None:
    """At start a worker reads meta.processes from its last records that the process cache can
    hold: older ones would only be evicted (a busy host writes millions a week, and the flows
    wait until the metadata is read). meta.containers is read from the beginning."""
    from streams.app import StreamOptions, Worker

    s = stack_settings
    pub = Publisher(s)
    now = int(time.time() * 1000)
    for pid in range(1, 61):
        process = schemas.record("Process", pid=pid, comm=f"p{pid}", exe=f"/bin/p{pid}",
                                 start_time_ms=now)
        pub.send("meta.processes", f"h1:{pid}", schemas.record(
            "ProcessEvent", type="EXEC", timestamp_ms=now, host_name="h1", source="EBPF",
            process=process))
    pub.send("meta.containers", "c" * 64, {  # a field ``name``: not through schemas.record
        **schemas.defaults("Container"), "id": "c" * 64, "host_name": "h1", "name": "first",
        "runtime": "docker", "state": "RUNNING", "event": "start", "timestamp_ms": now})
    assert pub.flush(30) == 0
    worker = Worker(s, f"g{s.topic_prefix[:-1]}", "127.0.0.1", free_port(), StreamOptions())
    worker.meta.max_processes = 25
    read: list[int] = []
    add = worker.meta.add_process
    worker.meta.add_process = lambda rec: (read.append(rec["process"]["pid"]),  # type: ignore[method-assign]
                                           add(rec))[1]
    metadata_read(worker)
    assert read == list(range(36, 61))
    assert worker.meta.containers["c" * 64]["name"] == "first"


def metadata_read(worker: Any) -> None:
    """Run ``worker``'s metadata task until the metadata present at start is read."""
    async def until_ready() -> None:
        task = asyncio.create_task(worker.metadata_task())
        try:
            await asyncio.wait_for(worker.meta_ready.wait(), 60)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(until_ready())


def test_removed_container_is_tombstoned_and_kept_a_while(stack_settings: Settings) -> None:
    """The sensor writes a tombstone behind a removed container's REMOVED record (``publish``
    with None): on the broker it has no value, so that compaction forgets the container; a
    worker keeps it, as removed at its REMOVED record's time, for its flows' last events."""
    from sensor.run import make_publish
    from streams.app import StreamOptions, Worker

    s = stack_settings
    pub = Publisher(s)
    publish = make_publish(pub, lambda _cid: None)
    removed_ms = int(time.time() * 1000) - 1000
    cid = "d" * 64
    publish("meta.containers", cid, {**schemas.defaults("Container"), "id": cid, "host_name": "h1",
                                     "name": "gone", "runtime": "docker", "state": "REMOVED",
                                     "event": "destroy", "timestamp_ms": removed_ms})
    publish("meta.containers", cid, None)
    assert pub.flush(30) == 0
    reader = consumer(s, None)
    reader.subscribe([topic_name(s, "meta.containers")])
    got: list[Any] = []
    deadline = time.monotonic() + 30
    while len(got) < 2 and time.monotonic() < deadline:
        msg = reader.poll(0.5)
        if msg is not None and not msg.error():
            got.append((msg.key(), msg.value()))
    reader.close()
    assert [k for k, _v in got] == [cid.encode()] * 2 and got[0][1] and got[1][1] is None
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic_name(s, "meta.containers"))
    client = admin(s)  # kept while its answer comes
    config = client.describe_configs([resource])[resource].result(30)
    assert config["min.compaction.lag.ms"].value == str(REMOVED_CONTAINER_KEEP_MS)
    assert config["cleanup.policy"].value == "compact"
    worker = Worker(s, f"g{s.topic_prefix[:-1]}", "127.0.0.1", free_port(), StreamOptions())
    metadata_read(worker)
    assert worker.meta.containers[cid]["name"] == "gone"
    assert worker.meta.removed == {cid: removed_ms}


def test_raw_decoder_agrees_with_codec(stack_settings: Settings) -> None:
    """The worker's fast path decodes exactly as the registry-backed Codec (also records of an
    older writer schema, resolved to ours), and hands bad bytes to Codec's classification."""
    import fastavro
    from confluent_kafka.schema_registry import Schema

    from packetless.serde import DecodeError
    from streams.raw import RawDecoder

    codec = Codec(stack_settings)
    fast = RawDecoder(codec)
    fixture = json.loads(FIXTURE.read_text())
    for rec in fixture["raw"] + fixture["meta"]:
        data = codec.encode(rec["topic"], rec["value"])
        assert fast.decode(rec["topic"], data) == codec.decode(rec["topic"], data) == rec["value"]
    for garbage, kind in ((b"xyz", "not_avro"), (b"\x01\x00\x00\x00\x01\x02", "bad_magic"),
                          (b"\x00\x7f\xff\xff\xf0\x02", "unknown_schema")):
        with pytest.raises(DecodeError) as err:
            fast.decode("raw.ebpf", garbage)
        assert err.value.kind == kind
    data = codec.encode("raw.ebpf", fixture["raw"][0]["value"])
    with pytest.raises(DecodeError):
        fast.decode("raw.ebpf", data[:12])
    # a sensor of an older version: its schema lacks the optional ``drops`` (default null)
    ours = schemas.load("EbpfEvent")
    older = {**ours, "fields": [f for f in ours["fields"] if f["name"] != "drops"]}
    schema_id = codec.client.register_schema(f"older-{os.getpid()}-value",
                                             Schema(json.dumps(older), "AVRO"))
    value = {k: v for k, v in fixture["raw"][0]["value"].items() if k != "drops"}
    framed = io.BytesIO()
    framed.write(b"\0" + schema_id.to_bytes(4, "big"))
    fastavro.schemaless_writer(framed, fastavro.parse_schema(older), value)
    assert fast.decode("raw.ebpf", framed.getvalue()) == {**value, "drops": None} == codec.decode(
        "raw.ebpf", framed.getvalue())


def generated_flows(origin_ms: int) -> list[dict[str, Any]]:
    """raw.ebpf START and END of both sockets of 16 connections of node-1, their cookies spread
    over the raw partitions: container to container, host loopback, and the same loopback
    5-tuple in two network namespaces (two flows)."""
    out = []
    conns = [(f"172.18.0.{2 + i % 3}", 41000 + i, "172.18.0.3", 8080, None) for i in range(10)]
    conns += [("127.0.0.1", 42000 + i, "127.0.0.1", 5432, 4026531840) for i in range(4)]
    conns += [("127.0.0.1", 43000, "127.0.0.1", 6379, ns) for ns in (4026532101, 4026532102)]
    for i, (cip, cport, sip, sport, netns) in enumerate(conns):
        start_ns = (origin_ms + 10 * i) * 1_000_000
        for role, cookie, lip, lport, rip, rport, sent in (
                ("CLIENT", 1000 + 2 * i, cip, cport, sip, sport, 100 + i),
                ("SERVER", 1001 + 2 * i, sip, sport, cip, cport, 5000 + i)):
            for kind, t_ms in (("START", 0), ("END", 300)):
                value = schemas.record(
                    "EbpfEvent", event_id=f"gen-{cookie}-{kind}", type=kind, host_name="node-1",
                    boot_id="gen", cookie=cookie, timestamp_ns=start_ns + t_ms * 1_000_000,
                    start_ns=start_ns, transport="tcp", family="ipv4", role=role, local_ip=lip,
                    local_port=lport, remote_ip=rip, remote_port=rport,
                    netns_inode=netns or (4026532004 if lip == "172.18.0.2" else 4026532005),
                    bytes_sent=sent if kind == "END" else 0,
                    bytes_received=(5000 + i if role == "CLIENT" else 100 + i) if kind == "END"
                    else 0, packets_sent=3, packets_received=3,
                    state="CLOSE" if kind == "END" else "ESTABLISHED")
                out.append({"topic": "raw.ebpf", "key": f"node-1:{cookie}", "value": value})
    return out


def end_flows(flows: list[dict[str, Any]]) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """The latest END of each flow (a late peer corrects an END): by host, transport, both
    endpoints and their namespaces -> bytes each way and which ends are local sockets."""
    out = {}
    for f in flows:
        if f["type"] == "END":
            c, s = f["client"], f["server"]
            key = (f["host_name"], f["transport"], c["ip"], c["port"], c["netns_inode"], s["ip"],
                   s["port"], s["netns_inode"])
            out[key] = (f["client_bytes"], f["server_bytes"], c["local"], s["local"],
                        c["socket_cookie"], s["socket_cookie"], f["end_reason"])
    return out


def run_workers(settings: Settings, tmp_path: Path, count: int,
                raw: list[dict[str, Any]], meta: list[dict[str, Any]], delta_ms: int,
                expected: int) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """``count`` workers of one group on fresh topics; once they split the partitions, the
    raw records; returns the END flows once ``expected`` flows ended and nothing changed."""
    tmp_path.mkdir()
    s = private(settings, tmp_path)
    ensure_topics(s)
    ensure_schemas(Codec(s))
    produce(s, meta, delta_ms)
    group = f"g{s.topic_prefix[:-1]}"
    workers = [StreamWorker(s, group, tmp_path / f"worker{i}.log") for i in range(count)]
    reader = Reader(s, "flows")
    try:
        for w in workers:  # one after the other: concurrent schema registrations may conflict
            w.start()
        deadline = time.monotonic() + 120
        while True:  # every partition owned by one worker, each worker owning some
            owned = [set(w.get("/healthz")["partitions"]) for w in workers]
            mine = [{p for p in o if p.startswith((f"{group}-sockets:", s.topic_prefix + "raw."))}
                    for o in owned]
            internal = int(TUNING["PACKETLESS_STREAMS_PARTITIONS"])
            if all(mine) and sum(map(len, mine)) == len(set().union(*mine)) == internal + 8:
                break
            assert time.monotonic() < deadline, f"partitions not split: {owned}"
            time.sleep(0.5)
        produce(s, raw, delta_ms)
        wait_for({"flows": reader}, lambda: len(end_flows(reader.records)) >= expected, 120,
                 workers[0])
        time.sleep(3)  # a late correction of an END would show now
        reader.poll(1)
        assert all(w.alive() for w in workers)
        return end_flows(reader.records)
    finally:
        for w in workers:
            w.stop()
        reader.close()


def test_two_workers_give_the_same_end_flows_as_one(settings: Settings, tmp_path: Path) -> None:
    """The same recorded raw events through one worker, then (on fresh topics) through two
    workers of one group that split the partitions (raw and internal): the same END flows,
    with the same ends and bytes. Nothing a worker guesses may depend on its partitions."""
    fixture = json.loads(FIXTURE.read_text())
    delta = int(time.time() * 1000) - fixture["origin_ms"]
    raw = fixture["raw"] + generated_flows(fixture["origin_ms"])
    expected = 4 + 16
    one = run_workers(settings, tmp_path / "one", 1, raw, fixture["meta"], delta, expected)
    two = run_workers(settings, tmp_path / "two", 2, raw, fixture["meta"], delta, expected)
    assert len(one) == expected
    both = [v for v in one.values() if v[2] and v[3]]
    assert len(both) == 2 + 16  # F1, F2 and the generated ones have both ends
    same_tuple = [k for k in one if k[3] == 43000]
    assert len(same_tuple) == 2 and {k[4] for k in same_tuple} == {4026532101, 4026532102}
    assert two == one


def connections(n: int, spread_s: float) -> Iterator[list[dict[str, Any]]]:
    """raw.ebpf START and END of both sockets of ``n`` connections from container A to
    container B (each its own namespace), one connection at a time spread over ``spread_s``
    seconds of the wall clock: the records of each, stamped when it is yielded."""
    for i in range(n):
        time.sleep(spread_s / n)
        now_ns = time.time_ns()
        out = []
        for role, cookie, lip, lport, rip, rport, sent, received, container, netns in (
                ("CLIENT", 70_000 + 2 * i, "172.18.0.2", 30_000 + i, "172.18.0.3", 8080,
                 100 + i, 5000 + i, A, 4026532004),
                ("SERVER", 70_001 + 2 * i, "172.18.0.3", 8080, "172.18.0.2", 30_000 + i,
                 5000 + i, 100 + i, B, 4026532005)):
            for kind, ts in (("START", now_ns - 5_000_000), ("END", now_ns)):
                end = kind == "END"
                out.append({"topic": "raw.ebpf", "key": f"node-1:{cookie}", "value": schemas.record(
                    "EbpfEvent", event_id=f"load-{cookie}-{kind}", type=kind, host_name="node-1",
                    boot_id="load", cookie=cookie, timestamp_ns=ts, start_ns=now_ns - 5_000_000,
                    transport="tcp", family="ipv4", role=role, local_ip=lip, local_port=lport,
                    remote_ip=rip, remote_port=rport, netns_inode=netns, container_id=container,
                    bytes_sent=sent if end else 0, bytes_received=received if end else 0,
                    packets_sent=3, packets_received=3, state="CLOSE" if end else "ESTABLISHED",
                    reason="CLOSED" if end else None)})
        yield out


def latest_ends(flows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """flow_id -> its END with the highest sequence (the final one)."""
    out: dict[str, dict[str, Any]] = {}
    for f in flows:
        if f["type"] == "END" and f["sequence"] >= out.get(f["flow_id"], f)["sequence"]:
            out[f["flow_id"]] = f
    return out


def tumbling(windows: list[dict[str, Any]], entity: str) -> dict[int, dict[str, Any]]:
    """The tumbling windows of container ``entity`` by start; of a window emitted again (after
    a crash), the latest."""
    return {w["window_start_ms"]: w for w in windows
            if (w["entity_type"], w["entity_id"]) == ("CONTAINER", entity)
            and w["window_size_ms"] == w["window_step_ms"]}


def window_total(windows: list[dict[str, Any]], entity: str, name: str) -> int:
    return sum(w[name] for w in tumbling(windows, entity).values())


def load_settled(flows: list[dict[str, Any]], windows: list[dict[str, Any]], n: int) -> bool:
    """Whether every connection of ``connections(n)`` ended and the windows hold all bytes."""
    return len(latest_ends(flows)) == n \
        and window_total(windows, A, "bytes_out") >= sum(100 + i for i in range(n)) \
        and window_total(windows, B, "bytes_out") >= sum(5000 + i for i in range(n))


def check_load(flows: list[dict[str, Any]], windows: list[dict[str, Any]], n: int) -> str:
    """Asserts that the ``connections(n)`` ended once each (a repeated END is the same event,
    same flow_id and sequence), their latest END exact, and the container windows add up to
    exactly the bytes sent; returns the figures."""
    ends = [f for f in flows if f["type"] == "END"]
    by_event: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for f in ends:
        by_event.setdefault((f["flow_id"], f["sequence"]), []).append(f)
    for same in by_event.values():  # a repeat is the same event: same id, same content
        assert all({k: v for k, v in f.items() if k != "emitted_ms"}
                   == {k: v for k, v in same[0].items() if k != "emitted_ms"} for f in same)
    latest = latest_ends(flows)
    assert len(latest) == n
    assert sorted((f["client_bytes"], f["server_bytes"]) for f in latest.values()) == [
        (100 + i, 5000 + i) for i in range(n)]
    assert all(f["client"]["container"]["id"] == A and f["server"]["container"]["id"] == B
               for f in latest.values())
    client_sent, server_sent = sum(100 + i for i in range(n)), sum(5000 + i for i in range(n))
    for entity, sent, received in ((A, client_sent, server_sent), (B, server_sent, client_sent)):
        assert (window_total(windows, entity, "bytes_out"),
                window_total(windows, entity, "bytes_in")) == (sent, received)
        assert window_total(windows, entity, "flows_started") == n
    return (f"{n} connections, {len(ends)} END records "
            f"({sum(len(v) - 1 for v in by_event.values())} repeated, same flow_id and "
            f"sequence; {len(by_event) - n} corrected by a later peer); container A sent "
            f"{window_total(windows, A, 'bytes_out')}/{client_sent}, B sent "
            f"{window_total(windows, B, 'bytes_out')}/{server_sent} in "
            f"{len(tumbling(windows, A))}+{len(tumbling(windows, B))} windows")


def test_sigkill_under_load_ends_once_and_windows_add_up(stack_settings: Settings,
                                                         tmp_path: Path) -> None:
    """Connections keep coming while a worker is killed (SIGKILL, its data dir lost) after a
    tenth of their ENDs came out; a new worker of the group takes over. Every connection ends,
    its latest END exact; a repeated END is the same event (flow_id and sequence); and the
    container windows, a repeated window taken once, add up to exactly the bytes sent."""
    s = stack_settings
    n = 600
    fixture = json.loads(FIXTURE.read_text())
    produce(s, fixture["meta"], int(time.time() * 1000) - fixture["origin_ms"])
    group = f"g{s.topic_prefix[:-1]}"
    worker = StreamWorker(s, group, tmp_path / "worker.log", LONG_GRACE)
    readers = {x: Reader(s, x) for x in ("flows", "metrics.containers")}
    flows, windows = readers["flows"].records, readers["metrics.containers"].records
    pub = Publisher(s)
    produced = 0
    try:
        worker.start()
        killed_at = None
        for records in connections(n, spread_s=20):
            for rec in records:
                pub.send(rec["topic"], rec["key"], rec["value"])
                produced += 1
            if killed_at is None:
                readers["flows"].poll(0.01)
                if sum(f["type"] == "END" for f in flows) >= n // 10:
                    worker.stop(signal.SIGKILL)
                    killed_at = produced
        left = pub.flush(120)
        assert left == 0 and pub.failed == 0, f"{left} raw records pending, {pub.failed} failed"
        assert killed_at is not None, "no END before the last connection"
        fresh = Settings(**{**s.__dict__, "data_dir": tmp_path / "fresh"})
        worker = StreamWorker(fresh, group, tmp_path / "worker2.log", LONG_GRACE)
        worker.start()
        wait_for(readers, lambda: load_settled(flows, windows, n), 240, worker)
        time.sleep(3)
        for r in readers.values():
            r.poll(1)
        print(f"\nsigkill under load: {produced} raw records, worker killed after {killed_at}; "
              f"{check_load(flows, windows, n)}")
        assert b"packetless_streams_late_activity_total 0.0" in worker.get("/metrics")
    finally:
        worker.stop()
        for r in readers.values():
            r.close()


BACKLOG_CLIENT, BACKLOG_SERVER = "e5" * 32, "f6" * 32  # their containers


def backlog(n: int, origin_ns: int) -> dict[int, list[tuple[str, dict[str, Any]]]]:
    """raw.ebpf START and END of both sockets of ``n`` loopback connections, by raw partition:
    the clients' (in container BACKLOG_CLIENT) in partition 0, the servers' (BACKLOG_SERVER) in
    partition 1, each in event-time order as a sensor publishes them. A client's records carry a
    long command line (4 times the bytes of a server's): a consumer that reads both partitions a
    megabyte at a time reads the servers far ahead of their clients."""
    out: dict[int, list[tuple[str, dict[str, Any]]]] = {0: [], 1: []}
    for i in range(n):
        start_ns = origin_ns + i * 1_000_000
        for partition, role, cookie, lport, rport, args, container in (
                (0, "CLIENT", 80_000 + 2 * i, 20_000 + i, 8080, ["/usr/bin/client", "x" * 1200],
                 BACKLOG_CLIENT),
                (1, "SERVER", 80_001 + 2 * i, 8080, 20_000 + i, ["/usr/bin/server"],
                 BACKLOG_SERVER)):
            process = schemas.record("Process", pid=100 + partition, tid=100 + partition,
                                     comm=role.lower(), exe=args[0], args=args, uid=0, gid=0,
                                     ppid=1, start_time_ms=origin_ns // 1_000_000)
            for kind, t_ns in (("START", 0), ("END", 500_000)):
                end = kind == "END"
                out[partition].append((f"node-1:{cookie}", schemas.record(
                    "EbpfEvent", event_id=f"backlog-{cookie}-{kind}", type=kind,
                    host_name="node-1", boot_id="backlog", cookie=cookie,
                    timestamp_ns=start_ns + t_ns, start_ns=start_ns, transport="tcp",
                    family="ipv4", role=role, local_ip="127.0.0.1", local_port=lport,
                    remote_ip="127.0.0.1", remote_port=rport, process=process,
                    container_id=container,
                    bytes_sent=(100 if partition == 0 else 5000) if end else 0,
                    bytes_received=(5000 if partition == 0 else 100) if end else 0,
                    packets_sent=3, packets_received=3, state="CLOSE" if end else "ESTABLISHED",
                    reason="CLOSED" if end else None)))
    return out


def test_backlog_ends_each_flow_once(stack_settings: Settings, tmp_path: Path) -> None:
    """A backlog of raw records, produced while no worker runs, read by a worker whose raw
    stage gets the servers' partition far ahead of the clients' (seconds of processing time
    apart, past the join delay and END grace): the END grace and join delay count event time
    against the watermark, so every flow ends exactly once, with both ends, and starts once;
    and the windows close on that watermark, not on the wall clock (600 s after these flows), so
    they count every flow."""
    s = stack_settings
    n = 6000
    codec = Codec(s)
    producer = Producer({**s.kafka_config(), "linger.ms": 50})
    topic = topic_name(s, "raw.ebpf")
    for partition, records in backlog(n, time.time_ns() - 600 * 10**9).items():
        for key, value in records:
            while True:
                try:
                    producer.produce(topic, codec.encode("raw.ebpf", value), key.encode(),
                                     partition=partition)
                    break
                except BufferError:
                    producer.poll(0.1)
    assert producer.flush(60) == 0
    worker = StreamWorker(s, f"g{s.topic_prefix[:-1]}", tmp_path / "worker.log")
    readers = {x: Reader(s, x) for x in ("flows", "metrics.containers")}
    flows, metrics = readers["flows"].records, readers["metrics.containers"].records

    def counted() -> tuple[int, int]:
        """Sockets started in the client container and in the server's, over the latest record
        of each of their tumbling windows (a socket active in two steps is one of the
        flows_as_client of each, but starts once)."""
        latest = {(m["entity_id"], m["window_start_ms"]): m for m in metrics
                  if m["window_size_ms"] == m["window_step_ms"]}
        client, server = (sum(m["flows_started"] for (e, _), m in latest.items() if e == entity)
                          for entity in (BACKLOG_CLIENT, BACKLOG_SERVER))
        return client, server

    try:
        worker.start()
        wait_for(readers, lambda: len(latest_ends(flows)) >= n, 240, worker)
        deadline = time.monotonic() + 60  # the windows close 5 s (grace) behind the watermark
        while counted() != (n, n) and time.monotonic() < deadline:
            for r in readers.values():
                r.poll(0.2)
        time.sleep(5)  # a corrective END (a peer read after its flow ended) would come now
        for r in readers.values():
            r.poll(1)
    finally:
        worker.stop()
        for r in readers.values():
            r.close()
    ends = [f for f in flows if f["type"] == "END"]
    starts = [f for f in flows if f["type"] == "START"]
    print(f"\nbacklog of {4 * n} raw records: {len(starts)} START, {len(ends)} END, "
          f"{sum(f['type'] == 'UPDATE' for f in flows)} UPDATE for {n} flows")
    assert len(ends) == n and len(latest_ends(flows)) == n
    assert all(f["client"]["local"] and f["server"]["local"] for f in ends)
    assert all((f["client_bytes"], f["server_bytes"]) == (100, 5000) for f in ends)
    assert len(starts) == n and all(f["sequence"] == 0 for f in starts)
    assert counted() == (n, n), f"windows counted {counted()} of {n} flows"
