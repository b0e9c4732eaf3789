"""Real-broker tests of deploy/broker.py: fetch, format once, produce/consume, restart with data.

Each kafka-marked test runs its own Kafka 4.1.1 JVM on free loopback ports in a tmp data dir and
stops it; the fetch error tests run the real mvn/java lookups without a broker.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from deploy import broker
from packetless.ports import port_free
from tests.conftest import free_port

READY_TIMEOUT = 90.0


def make_config(data_dir: Path, port: int | None = None) -> broker.BrokerConfig:
    return broker.BrokerConfig(data_dir, port=port or free_port(), controller_port=free_port())


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM the broker's process group and wait for a clean exit (143 = died of SIGTERM)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    return proc.wait(timeout=60)


@pytest.fixture(scope="module")
def classpath() -> Path:
    lines: list[str] = []
    return broker.ensure_fetched(broker.DEFAULT_CACHE_DIR, lines.append)


def launch(cfg: broker.BrokerConfig, classpath: Path) -> subprocess.Popen[bytes]:
    broker.prepare(cfg, classpath)
    proc = broker.start(cfg, classpath)
    try:
        broker.wait_ready(cfg.bootstrap, READY_TIMEOUT, logs=[cfg.server_log, cfg.console_log], proc=proc)
    except BaseException:
        stop(proc)
        raise
    return proc


@pytest.fixture
def running(tmp_path: Path, classpath: Path) -> Iterator[broker.BrokerConfig]:
    cfg = make_config(tmp_path)
    proc = launch(cfg, classpath)
    yield cfg
    stop(proc)


def create_topic(bootstrap: str, name: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])[name].result(30)


def consume_all(bootstrap: str, topic: str, expect: int) -> list[tuple[bytes, bytes]]:
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4()}", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    got: list[tuple[bytes, bytes]] = []
    try:
        for _ in range(60):
            msg = consumer.poll(1.0)
            if msg is not None and msg.error() is None:
                got.append((msg.key(), msg.value()))
                if len(got) >= expect:
                    break
    finally:
        consumer.close()
    return got


@pytest.mark.kafka
def test_fetch_is_cached(classpath: Path) -> None:
    lines: list[str] = []
    assert broker.ensure_fetched(broker.DEFAULT_CACHE_DIR, lines.append) == classpath
    assert lines == []  # second call never runs mvn
    jars = {p.name for p in classpath.glob("*.jar")}
    assert {"kafka_2.13-4.1.1.jar", "log4j-core-2.24.3.jar", "log4j-slf4j-impl-2.24.3.jar"} <= jars
    archive = broker.class_archive(classpath)
    assert archive.stat().st_size > 10_000_000  # the training run recorded the broker's classes
    cfg = broker.BrokerConfig(Path("/nonexistent"))
    assert f"-XX:SharedArchiveFile={archive}" in broker.command(cfg, classpath)


@pytest.mark.kafka
def test_produce_consume_survives_restart(tmp_path: Path, classpath: Path) -> None:
    cfg = make_config(tmp_path)
    topic = "packetless.test.restart"
    proc = launch(cfg, classpath)
    try:
        meta = (cfg.log_dir / "meta.properties").read_text()
        assert f"cluster.id={broker.cluster_id(cfg)}" in meta
        create_topic(cfg.bootstrap, topic)
        producer = Producer({"bootstrap.servers": cfg.bootstrap, "acks": "all"})
        producer.produce(topic, key=b"k1", value=b"before restart")
        assert producer.flush(30) == 0
        assert consume_all(cfg.bootstrap, topic, 1) == [(b"k1", b"before restart")]
    finally:
        assert stop(proc) in (0, 143)
    log = cfg.server_log.read_text()
    assert "Kafka Server started" in log  # the log4j2 binding and config work
    assert "shut down completely" in log  # clean shutdown is logged to the end

    proc = launch(cfg, classpath)  # same data dir: must not re-format
    try:
        assert (cfg.log_dir / "meta.properties").read_text() == meta
        topics = AdminClient({"bootstrap.servers": cfg.bootstrap}).list_topics(timeout=10).topics
        assert topic in topics
        assert consume_all(cfg.bootstrap, topic, 1) == [(b"k1", b"before restart")]
    finally:
        assert stop(proc) in (0, 143)


@pytest.mark.kafka
def test_taken_port_is_reported_before_start(
    running: broker.BrokerConfig, tmp_path: Path, classpath: Path
) -> None:
    assert not port_free(running.host, running.port)
    cfg = make_config(tmp_path / "second", port=running.port)
    broker.prepare(cfg, classpath)
    with pytest.raises(
        broker.BrokerError,
        match=f"port {running.port} is taken by another "
        r"process \(java pid \d+\)",
    ):
        broker.start(cfg, classpath)


@pytest.mark.kafka
def test_taken_port_is_read_from_the_broker_log(
    running: broker.BrokerConfig, tmp_path: Path, classpath: Path
) -> None:
    """If the port is grabbed between the check and the bind, wait_ready explains it."""
    cfg = make_config(tmp_path / "second", port=running.port)
    broker.prepare(cfg, classpath)
    with cfg.console_log.open("ab") as out:
        proc = subprocess.Popen(
            broker.command(cfg, classpath), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        with pytest.raises(broker.BrokerError, match=f"port {running.port} is taken"):
            broker.wait_ready(
                f"{cfg.host}:{free_port()}", READY_TIMEOUT, logs=[cfg.server_log, cfg.console_log], proc=proc
            )
    finally:
        stop(proc)


def test_fetch_without_mvn_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    java = shutil.which("java")
    if java is not None:
        (bindir / "java").symlink_to(java)
    monkeypatch.setenv("PATH", str(bindir))
    expected = "Maven \\(mvn\\) is not installed" if java else "Java is not installed"
    with pytest.raises(broker.BrokerError, match=expected):
        broker.ensure_fetched(tmp_path / "cache", lambda line: None)


@pytest.mark.kafka
def test_fetch_failure_names_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty Maven repo behind a refused proxy: the error carries Maven's transfer failure."""
    proxy = free_port()
    monkeypatch.setenv(
        "MAVEN_OPTS",
        f"-Dmaven.repo.local={tmp_path / 'm2'} "
        f"-Dhttps.proxyHost=127.0.0.1 -Dhttps.proxyPort={proxy} "
        f"-Dhttp.proxyHost=127.0.0.1 -Dhttp.proxyPort={proxy}",
    )
    lines: list[str] = []
    with pytest.raises(broker.BrokerError, match=r"failed.*Connection refused"):
        broker.ensure_fetched(tmp_path / "cache", lines.append)
    assert lines[0].startswith("fetching Apache Kafka 4.1.1")
    assert not (tmp_path / "cache" / "kafka-4.1.1" / "fetched.json").exists()


def test_wait_ready_times_out_with_cause() -> None:
    port = free_port()
    with pytest.raises(broker.BrokerError, match=f"127.0.0.1:{port} not ready after 2s"):
        broker.wait_ready(f"127.0.0.1:{port}", 2.0)


def test_server_properties_extra_hook(tmp_path: Path) -> None:
    cfg = broker.BrokerConfig(
        tmp_path,
        extra_properties={
            "listeners": "PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093,SASL_SSL://127.0.0.1:9094",
            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
        },
    )
    props = broker.server_properties(cfg)
    assert props["listeners"].endswith("SASL_SSL://127.0.0.1:9094")
    assert props["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert props["auto.create.topics.enable"] == "false"
    assert props["log.dirs"] == str(tmp_path / "kafka" / "data")


@pytest.mark.kafka
def test_aiokafka_produce_consume(running: broker.BrokerConfig) -> None:
    """aiokafka 0.14 (Faust's client) against the 4.1.1 broker, with a consumer group."""
    topic = "packetless.test.aiokafka"
    create_topic(running.bootstrap, topic)

    async def roundtrip() -> tuple[bytes | None, bytes | None, int | None]:
        producer = AIOKafkaProducer(bootstrap_servers=running.bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"from aiokafka", key=b"a1")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=running.bootstrap,
            group_id="packetless-aiokafka-test",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            msg = await asyncio.wait_for(consumer.getone(), timeout=30)
            await consumer.commit()
            committed = await consumer.committed(msg_tp := next(iter(consumer.assignment())))
            assert msg_tp.topic == topic
            return msg.key, msg.value, committed
        finally:
            await consumer.stop()

    key, value, committed = asyncio.run(roundtrip())
    assert (key, value, committed) == (b"a1", b"from aiokafka", 1)
    assert consume_all(running.bootstrap, topic, 1) == [(b"a1", b"from aiokafka")]
