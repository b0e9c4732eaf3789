"""The local stack as users drive it: restart keeps topics, schemas and data; ``tail`` decodes
through the registry; a taken port gives a clear message, not a stack trace."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import ConfigResource, NewTopic
from fastavro.utils import generate_many

import schemas
from packetless.config import Settings
from packetless.kafka import Publisher, admin, complete_configs, create_topics, ensure_topics
from packetless.serde import Codec
from packetless.topics import REMOVED_CONTAINER_KEEP_MS, TOPICS, topic_name
from tests.conftest import free_port, free_port_pair, start_stack

pytestmark = pytest.mark.kafka


def cli(*args: str, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "packetless", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def env_for(settings: Settings) -> dict[str, str]:
    return {"PACKETLESS_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "PACKETLESS_REGISTRY_URL": settings.registry_url,
            "PACKETLESS_TOPIC_PREFIX": settings.topic_prefix}


@pytest.mark.parametrize(("suffix", "schema", "count"), [
    ("meta.containers", "Container", 3), ("meta.processes", "ProcessEvent", 5)])
def test_tail_prints_decoded_json_lines_up_to_the_end(settings: Settings, suffix: str,
                                                      schema: str, count: int) -> None:
    records = list(generate_many(schemas.load(schema), count))
    pub = Publisher(settings)
    for i, rec in enumerate(records):
        pub.send(suffix, f"tail-{i}", rec)
    assert pub.flush(30) == 0
    out = cli("tail", f"packetless.{suffix}", "--from-beginning", "--to-end",
              env=env_for(settings), timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines[-count:] == records  # sensors of earlier tests may have published before


def test_tail_refuses_an_unknown_topic(settings: Settings) -> None:
    out = cli("tail", "no.such.topic", "--timeout", "1", env=env_for(settings))
    assert out.returncode != 0
    assert "not a Packetless topic" in out.stderr and "Traceback" not in out.stderr


def test_created_topics_are_in_the_brokers_metadata_once_ensure_topics_returns(
        settings: Settings) -> None:
    """A client that looks right after the creation (a stream worker joining its group) must find
    every partition led. The broker answers a creation up to seconds before its metadata has the
    topics, more often when creations follow each other (here three sets, back to back)."""
    for i in range(3):
        fresh = Settings(**{**settings.__dict__, "topic_prefix": f"vis{os.getpid()}x{i}."})
        assert len(ensure_topics(fresh)) == len(TOPICS)
        listed = admin(fresh).list_topics(timeout=10).topics
        for suffix, topic in TOPICS.items():
            meta = listed.get(topic_name(fresh, suffix))
            assert meta is not None and meta.error is None, (i, suffix)
            assert [p.leader >= 0 for p in meta.partitions.values()] == [True] * topic.partitions


def test_existing_topics_get_the_settings_they_lack_and_keep_their_own(settings: Settings) -> None:
    """Topics made by an earlier version lack a newer setting of their definition (meta.containers'
    compaction lag): ``ensure_topics`` sets it. A value an operator set on a topic (raw.ebpf's
    retention) stays."""
    s = Settings(**{**settings.__dict__, "topic_prefix": f"cfg{os.getpid()}."})
    client = admin(s)
    containers, raw = topic_name(s, "meta.containers"), topic_name(s, "raw.ebpf")
    create_topics(client, [NewTopic(containers, 1, 1, config={"cleanup.policy": "compact"}),
                           NewTopic(raw, 4, 1, config={"cleanup.policy": "delete",
                                                       "retention.ms": "3600000"})])
    assert ensure_topics(s, ["meta.containers", "raw.ebpf"]) == []
    resources = [ConfigResource(ConfigResource.Type.TOPIC, name) for name in (containers, raw)]
    configs = {r.name: f.result(30) for r, f in client.describe_configs(resources).items()}
    assert configs[containers]["min.compaction.lag.ms"].value == str(REMOVED_CONTAINER_KEEP_MS)
    assert configs[raw]["retention.ms"].value == "3600000"
    assert complete_configs(client, {t: TOPICS[suffix].config() for t, suffix in (
        (containers, "meta.containers"), (raw, "raw.ebpf"))}) == {}


def test_topics_whose_settings_cannot_be_read_are_left_as_they_are(
        settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A principal allowed to create topics but not to read or alter their configurations
    starts all the same, and is told what to set by hand."""
    import packetless.kafka

    def refused(*_args: object) -> dict[str, dict[str, str]]:
        raise KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "not allowed"))

    s = Settings(**{**settings.__dict__, "topic_prefix": f"acl{os.getpid()}."})
    assert len(ensure_topics(s, ["meta.containers"])) == 1
    monkeypatch.setattr(packetless.kafka, "complete_configs", refused)
    assert ensure_topics(s, ["meta.containers"]) == []
    assert "min.compaction.lag.ms" in caplog.text and "not allowed" in caplog.text


def test_restart_keeps_topics_schemas_and_data(tmp_path: Path) -> None:
    kafka_port, registry_port = free_port_pair(), free_port()
    first = start_stack(tmp_path, kafka_port, registry_port)
    try:
        s = first.options.settings
        codec = Codec(s)
        subject = f"{topic_name(s, 'raw.ebpf')}-value"
        schema_id = codec.client.get_latest_version(subject).schema_id
        record = next(iter(generate_many(schemas.load("EbpfEvent"), 1)))
        pub = Publisher(s, codec)
        pub.send("raw.ebpf", "restart", record)
        assert pub.flush(30) == 0
    finally:
        first.stop(print)
    second = start_stack(tmp_path, kafka_port, registry_port)
    try:
        s = second.options.settings
        codec = Codec(s)
        assert codec.client.get_latest_version(subject).schema_id == schema_id
        out = cli("tail", "packetless.raw.ebpf", "--from-beginning", "--max-messages", "1",
                  "--timeout", "30", env=env_for(s))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout.splitlines()[0]) == json.loads(json.dumps(record))
        topics = admin(s).list_topics(timeout=10).topics
        assert {topic_name(s, t) for t in TOPICS} <= set(topics)
    finally:
        second.stop(print)


@pytest.mark.parametrize("option", ["--kafka-port", "--registry-port", "--web-port",
                                    "--metrics-port"])
def test_up_names_a_taken_port_before_starting_anything(tmp_path: Path, option: str) -> None:
    ports = {"--kafka-port": free_port_pair(), "--registry-port": free_port(), "--web-port": free_port(),
             "--metrics-port": free_port()}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports[option]))
        busy.listen()
        out = cli("up", "--data-dir", str(tmp_path),
                  *(str(a) for pair in ports.items() for a in pair))
    assert out.returncode != 0
    assert f"{option}: port {ports[option]} is taken by another process" in out.stderr, out.stderr
    assert "starting" not in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_streams_names_a_taken_web_port(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", free_port())) as busy:
        port = busy.getsockname()[1]
        out = cli("streams", "--web-port", str(port), "--data-dir", str(tmp_path), timeout=60)
    assert out.returncode == 2, out.stderr
    assert f"on 127.0.0.1:{port}: port {port} is taken by another process" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr


def test_up_refuses_one_port_for_two_parts(tmp_path: Path) -> None:
    kafka, shared = free_port_pair(), free_port()
    out = cli("up", "--data-dir", str(tmp_path), "--kafka-port", str(kafka),
              "--registry-port", str(free_port()), "--web-port", str(shared),
              "--metrics-port", str(shared))
    assert out.returncode != 0
    assert f"--web-port and --metrics-port are both port {shared}" in out.stderr, out.stderr
    assert "starting" not in out.stderr, out.stderr
