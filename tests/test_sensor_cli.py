"""``packetless sensor`` as users run it: a separate process publishing to the real broker.

Known loopback traffic must come out of ``packetless.raw.ebpf`` with exact bytes and the right
processes, and ``--mode netlink`` must publish socket snapshots instead.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import TopicPartition

import schemas
from packetless.config import Settings
from packetless.kafka import Publisher, consumer
from packetless.serde import Codec
from packetless.topics import topic_name
from sensor import ebpf
from sensor.run import make_publish
from tests.conftest import free_port
from tests.support.capabilities import require_root

pytestmark = [pytest.mark.kafka, pytest.mark.bpf]


def sensor_process(settings: Settings, data_dir: Path, *args: str,
                   metrics_port: int = 0) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PACKETLESS_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
           "PACKETLESS_REGISTRY_URL": settings.registry_url, "PACKETLESS_DATA_DIR": str(data_dir)}
    return subprocess.Popen([sys.executable, "-m", "packetless", "sensor", "--metrics-port",
                             str(metrics_port or free_port()), "--update-interval", "1", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture
def stopper() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        stop_sensor(p)


def wait_mode(proc: subprocess.Popen[bytes], data_dir: Path, timeout: float = 90) -> dict[str, Any]:
    """The sensor's status once it observes (eBPF compiles for a few seconds)."""
    deadline = time.monotonic() + timeout
    status = data_dir / "sensor.json"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        if status.exists() and (info := json.loads(status.read_text() or "{}")).get("ready"):
            return info
        time.sleep(0.2)
    raise AssertionError("sensor did not start")


def exchange(n: int, m: int) -> tuple[int, int]:
    """A loopback TCP exchange: client sends n bytes, server answers m; returns the ports."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        got = 0
        while got < n:
            got += len(conn.recv(65536))
        conn.sendall(b"s" * m)
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    cli = socket.create_connection(("127.0.0.1", port))
    client_port = cli.getsockname()[1]
    cli.sendall(b"c" * n)
    got = 0
    while got < m:
        data = cli.recv(65536)
        if not data:
            break
        got += len(data)
    cli.close()
    t.join()
    srv.close()
    return client_port, port


def records(settings: Settings, suffix: str, match: Any, want: int, *, since: float,
            timeout: float = 60, sizes: list[int] | None = None) -> list[dict]:
    """Up to ``want`` decoded records of ``suffix`` that ``match``, of those produced from
    ``since`` (epoch seconds) on: the session's topics hold every earlier test's records, which a
    host with many sockets makes too many to read through in time. Their encoded sizes are
    appended to ``sizes`` when given."""
    codec = Codec(settings)
    cons = consumer(settings, None)
    topic = topic_name(settings, suffix)
    partitions = cons.list_topics(topic, timeout=10).topics[topic].partitions
    cons.assign(cons.offsets_for_times(
        [TopicPartition(topic, p, round(since * 1000)) for p in partitions], timeout=10))
    found: list[dict] = []
    deadline = time.monotonic() + timeout
    try:
        while len(found) < want and time.monotonic() < deadline:
            msg = cons.poll(0.5)
            if msg is None or msg.error():
                continue
            rec = codec.decode(suffix, msg.value())
            if rec is not None and match(rec):
                found.append(rec)
                if sizes is not None:
                    sizes.append(len(msg.value()))
    finally:
        cons.close()
    return found


def stop_sensor(proc: subprocess.Popen[bytes], timeout: float = 60) -> bool:
    """SIGTERM, then SIGKILL after ``timeout``; whether it stopped in time."""
    if proc.poll() is not None:
        return True
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False
    return True


def test_sensor_publishes_exact_flows(settings: Settings, tmp_path: Path,
                                      stopper: list[subprocess.Popen[bytes]]) -> None:
    require_root()
    metrics_port = free_port()
    proc = sensor_process(settings, tmp_path, "--mode", "ebpf", metrics_port=metrics_port)
    stopper.append(proc)
    assert wait_mode(proc, tmp_path)["mode"] == "ebpf"
    n, m = 123_457, 76_543
    since = time.time()
    client_port, server_port = exchange(n, m)

    def ours(rec: dict) -> bool:
        return rec["type"] == "END" and {rec["local_port"], rec["remote_port"]} == {client_port,
                                                                                     server_port}

    ends = records(settings, "raw.ebpf", ours, 2, since=since)
    assert len(ends) == 2, ends
    by_role = {r["role"]: r for r in ends}
    assert by_role["CLIENT"]["bytes_sent"] == n and by_role["CLIENT"]["bytes_received"] == m
    assert by_role["SERVER"]["bytes_sent"] == m and by_role["SERVER"]["bytes_received"] == n
    for r in ends:
        assert r["process"]["pid"] == os.getpid()
        assert r["process"]["uid"] == os.getuid()
    samples = scrape(metrics_port)
    assert samples['packetless_sensor_events_total{type="ebpf"}'] >= 2
    assert samples["packetless_sensor_produce_latency_seconds_count"] >= 2
    assert samples["packetless_sensor_lost_events_total"] == 0
    # the TCP flow map fills with held connections (2 sockets each, of tcp_entries)
    entries = ebpf.EbpfOptions().tcp_entries
    tcp_fill = 'packetless_sensor_bpf_map_fill_ratio{map="tcp_flows"}'
    assert set(ebpf.HASH_MAPS) == {k.split('"')[1] for k in samples if "map_fill_ratio{" in k}
    before = samples[tcp_fill]
    held = hold_connections(HELD)
    try:
        deadline = time.monotonic() + 30
        while (fill := scrape(metrics_port)[tcp_fill]) < before + HELD / entries:
            assert time.monotonic() < deadline, (before, fill)
            time.sleep(0.5)
    finally:
        for s in held:
            s.close()
    assert fill <= before + (2 * HELD + 200) / entries  # counted once each (others: +-100)
    # lineage in eBPF mode comes from the sched tracepoints: a process of a millisecond
    since = time.time()
    brief = subprocess.run(["/bin/sh", "-c", "echo $$"], capture_output=True, text=True,
                           check=True)
    pid = int(brief.stdout)
    lineage = records(settings, "meta.processes",
                      lambda rec: rec["process"]["pid"] == pid and rec["source"] == "EBPF", 2,
                      since=since)
    assert sorted(r["type"] for r in lineage) == ["EXEC", "EXIT"], lineage
    assert all(r["process"]["ppid"] == os.getpid() for r in lineage)


HELD = 300


def scrape(port: int) -> dict[str, float]:
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
            if line and not line.startswith("#")}


def hold_connections(count: int) -> list[socket.socket]:
    """``count`` open loopback TCP connections (both ends)."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=count)
    held = [srv]
    for _ in range(count):
        held.append(socket.create_connection(("127.0.0.1", srv.getsockname()[1])))
        held.append(srv.accept()[0])
    return held


def test_sensor_netlink_mode_publishes_snapshots(settings: Settings, tmp_path: Path,
                                                 stopper: list[subprocess.Popen[bytes]]) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    cli.sendall(b"x" * 5000)
    conn.recv(65536)
    since = time.time()
    proc = sensor_process(settings, tmp_path, "--mode", "netlink", "--snapshot-interval", "1")
    stopper.append(proc)
    assert wait_mode(proc, tmp_path)["mode"] == "netlink"

    def ours(rec: dict) -> bool:
        sock = rec.get("socket")
        return bool(sock) and port in (sock.get("local_port"), sock.get("remote_port"))

    snaps = records(settings, "raw.netlink", ours, 2, since=since)
    for s in (cli, conn, srv):
        s.close()
    assert len(snaps) >= 2, snaps
    assert all(s["socket"]["cookie"] for s in snaps)


def test_the_sensor_leaves_out_what_only_other_commands_use() -> None:
    """httpx (doctor, top) brings rich and pygments: about 4 MiB of a sensor that never uses
    them. Of pyroute2 the sensor loads only the parts it uses (its package ``__init__`` and
    ``IPRoute`` bring IPDB, NDB, nftables...: about 8 MiB); anything else asked of pyroute2 in
    the same process then loads the whole package, as usual."""
    out = subprocess.run([sys.executable, "-c", """if True:
        import sys, packetless.cli, sensor.run
        unused = ('httpx', 'rich', 'pygments', 'faust', 'pyroute2.ndb', 'pyroute2.ipdb',
                  'pyroute2.iproute', 'pyroute2.nftables')
        print(sorted(set(unused) & set(sys.modules)))
        print(sum(name.startswith('pyroute2') for name in sys.modules) < 110)
        from pyroute2 import IPRoute, NetNS
        import pyroute2
        print(IPRoute.__module__, pyroute2.NDB.__module__, 'pyroute2.ipdb' in sys.modules)
        """], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["[]", "True", "pyroute2.iproute.linux pyroute2.ndb.main True"], \
        out.stdout


def test_a_taken_metrics_port_is_named_not_a_traceback(settings: Settings, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", free_port())) as busy:
        port = busy.getsockname()[1]
        proc = sensor_process(settings, tmp_path, "--mode", "netlink", metrics_port=port)
        out, _ = proc.communicate(timeout=60)
    text = out.decode()
    assert proc.returncode == 2, text
    assert f"cannot serve /metrics on 127.0.0.1:{port}: Address already in use" in text, text
    assert "Traceback" not in text, text


@pytest.mark.kafka
def test_a_record_that_breaks_its_schema_goes_to_the_dead_letter_topic(settings: Settings) -> None:
    """The sensor's publish path never dies on a record its schema refuses: it dead-letters it."""
    publisher = Publisher(settings)
    publish = make_publish(publisher, lambda _container: None)
    key = f"{settings.host_name}:unencodable-{os.getpid()}"
    bad = schemas.record("ProcessEvent", type="EXEC", timestamp_ms=1, host_name="h",
                         source="EBPF", process=schemas.record("Process", pid=1, comm="x\udcff"))
    publish("meta.processes", key, bad)  # a lone surrogate: not UTF-8, Avro refuses it
    publish("meta.processes", key + "-ok", {**bad, "process": {**bad["process"], "comm": "ok"}})
    assert publisher.close() == 0
    codec = Codec(settings)
    cons = consumer(settings, None)
    cons.subscribe([topic_name(settings, "dlq")])
    found: dict[str, Any] | None = None
    deadline = time.monotonic() + 60
    try:
        while found is None and time.monotonic() < deadline:
            msg = cons.poll(0.5)
            if msg is not None and not msg.error() and msg.key() == key.encode():
                found = codec.decode("dlq", msg.value())
    finally:
        cons.close()
    assert found is not None, "no dead letter record"
    assert found["error_type"] == "unencodable" and "surrogates" in found["reason"]
    assert found["source_topic"] == topic_name(settings, "meta.processes")
    assert json.loads(found["value"])["process"]["comm"] == "x\udcff"  # kept, escaped
