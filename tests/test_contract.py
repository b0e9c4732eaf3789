"""The Avro contract on the real broker and registry: every schema round-trips field by field,
compatibility BACKWARD refuses a breaking change, and bad bytes end in the DLQ."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import threading
import time
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext
from fastavro.utils import generate_many

import schemas
from packetless.config import Settings
from packetless.consume import consume
from packetless.kafka import Publisher, consumer, ensure_schemas, ensure_topics
from packetless.serde import Codec, union_branches
from packetless.topics import TOPICS, topic_name

pytestmark = pytest.mark.kafka

AVRO_TOPICS = [t.suffix for t in TOPICS.values() if t.schema]


def read_all(settings: Settings, suffix: str, expected: int, timeout: float = 30.0) -> list[Any]:
    """The raw messages of a topic from the beginning, until ``expected`` were read."""
    cons = consumer(settings, None)
    cons.subscribe([topic_name(settings, suffix)])
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expected and time.monotonic() < deadline:
            msg = cons.poll(0.5)
            if msg is not None and not msg.error():
                out.append(msg)
    finally:
        cons.close()
    return out


def test_every_record_type_has_documented_fields() -> None:
    for name in schemas.names():
        schema = json.loads(schemas.path(name).read_text())
        assert schema.get("doc"), f"{name} has no doc"
        for f in schema["fields"]:
            assert f.get("doc"), f"{name}.{f['name']} has no doc"
        fastavro.parse_schema(schemas.load(name))


def test_named_union_branches_encode_the_same_bytes() -> None:
    """The serializer names the union branch of records (a shortcut for fastavro): the bytes
    are those fastavro writes when it finds the branch itself."""
    for name in schemas.names():
        schema = schemas.load(name)
        parsed, hint = fastavro.parse_schema(schema), union_branches(schema)
        for rec in generate_many(schema, 30):
            plain, named = io.BytesIO(), io.BytesIO()
            fastavro.schemaless_writer(plain, parsed, rec)
            fastavro.schemaless_writer(named, parsed, hint(rec, None))
            assert plain.getvalue() == named.getvalue(), name
    sample = {"process": {"pid": 1}, "drops": None}
    assert union_branches(schemas.load("EbpfEvent"))(sample, None)["process"] == (
        "packetless.Process", {"pid": 1})
    assert sample["process"] == {"pid": 1}  # the caller's record is left alone


@pytest.mark.parametrize("suffix", AVRO_TOPICS)
def test_every_schema_round_trips_through_registry(settings: Settings, suffix: str) -> None:
    schema = schemas.load(TOPICS[suffix].schema)
    records = list(generate_many(schema, 20))
    # a private prefix keeps this test's records apart from the others'
    topic_settings = Settings(**{**settings.__dict__, "topic_prefix": f"rt{os.getpid()}."})
    codec = Codec(topic_settings)
    pub = Publisher(topic_settings, codec)
    ensure_topics(topic_settings, [suffix])
    for i, rec in enumerate(records):
        pub.send(suffix, f"k{i}", rec)
    assert pub.flush(30) == 0 and pub.failed == 0
    msgs = read_all(topic_settings, suffix, len(records))
    assert len(msgs) == len(records)
    decoded = {m.key().decode(): codec.decode(suffix, m.value()) for m in msgs}
    for i, rec in enumerate(records):
        got = decoded[f"k{i}"]
        for field in schema["fields"]:
            assert got[field["name"]] == rec[field["name"]], (suffix, field["name"])
    # the wire format is Confluent's: magic byte 0, then the id the registry gave the subject
    magic, schema_id = struct.unpack(">bI", msgs[0].value()[:5])
    latest = codec.client.get_latest_version(f"{topic_settings.topic_prefix}{suffix}-value")
    assert magic == 0 and schema_id == latest.schema_id
    # the Codec's fast writer (every record after a topic's first) writes the very bytes of the
    # plain AvroSerializer
    ctx = SerializationContext(topic_name(topic_settings, suffix), MessageField.VALUE)
    assert [codec.encode(suffix, rec) for rec in records] == [codec.serializer(suffix)(rec, ctx)
                                                              for rec in records]


def test_backward_compatibility_is_enforced(settings: Settings) -> None:
    client = Codec(settings).client
    subject = f"compat-test-{os.getpid()}-value"
    base = schemas.load("DeadLetter")
    client.set_compatibility(subject, "BACKWARD")
    client.register_schema(subject, Schema(json.dumps(base), "AVRO"))
    breaking = {**base, "fields": [*base["fields"],
                                   {"name": "new_required", "type": "string", "doc": "x"}]}
    with pytest.raises(SchemaRegistryError) as err:
        client.register_schema(subject, Schema(json.dumps(breaking), "AVRO"))
    assert err.value.http_status_code == 409
    compatible = {**base, "fields": [*base["fields"], {"name": "new_optional",
                                     "type": ["null", "string"], "default": None, "doc": "x"}]}
    new_id = client.register_schema(subject, Schema(json.dumps(compatible), "AVRO"))
    assert client.get_latest_version(subject).schema_id == new_id


def test_workers_starting_together_register_the_same_ids(settings: Settings) -> None:
    """Several processes registering the schemas of a new prefix at once all succeed."""
    fresh = dataclasses.replace(settings, topic_prefix=f"together{os.getpid()}.")
    results: list[dict[str, int] | BaseException] = []

    def register() -> None:
        try:
            results.append(ensure_schemas(Codec(fresh)))
        except BaseException as error:  # reported below
            results.append(error)

    threads = [threading.Thread(target=register) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert len(results) == 4 and all(r == results[0] for r in results)
    assert len(results[0]) == len(AVRO_TOPICS)


def test_the_project_schemas_are_registered_with_backward(settings: Settings) -> None:
    client = Codec(settings).client
    for suffix in AVRO_TOPICS:
        subject = f"{topic_name(settings, suffix)}-value"
        assert client.get_compatibility(subject) == "BACKWARD"


def test_bad_input_goes_to_the_dlq_and_valid_records_still_pass(settings: Settings) -> None:
    prefix = f"bad{os.getpid()}."
    s = Settings(**{**settings.__dict__, "topic_prefix": prefix})
    ensure_topics(s, ["raw.ebpf", "dlq"])
    codec = Codec(s)
    pub = Publisher(s, codec)
    valid = list(generate_many(schemas.load("EbpfEvent"), 3))
    good = codec.encode("raw.ebpf", valid[0])
    bad = {
        "random": os.urandom(64),
        "bad_magic": b"\x07" + good[1:],
        "unknown_schema": b"\x00" + struct.pack(">I", 987654) + good[5:],
        "truncated": good[: max(6, len(good) // 3)],
    }
    raw_topic = topic_name(s, "raw.ebpf")
    pub.send("raw.ebpf", "v0", valid[0])
    for key, payload in bad.items():
        pub.produce_raw(raw_topic, key, payload)
    pub.send("raw.ebpf", "v1", valid[1])
    pub.send("raw.ebpf", "v2", valid[2])
    assert pub.flush(30) == 0

    handled: dict[str, dict[str, Any]] = {}
    stop = threading.Event()
    result: list[Any] = []

    def handle(_suffix: str, msg: Any, record: dict[str, Any] | None) -> None:
        handled[msg.key().decode()] = record

    worker = threading.Thread(target=lambda: result.append(
        consume(s, ["raw.ebpf"], f"dlq-test-{os.getpid()}", handle, stop, name="test")))
    worker.start()
    try:
        dead = read_all(s, "dlq", len(bad), timeout=60)
        deadline = time.monotonic() + 30
        while len(handled) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join(30)
    assert set(handled) == {"v0", "v1", "v2"}
    assert handled["v2"] == valid[2]
    assert result[0].dead_lettered == len(bad)
    letters = {m.key().decode(): codec.decode("dlq", m.value()) for m in dead}
    assert set(letters) == set(bad)
    for key, letter in letters.items():
        assert letter["source_topic"] == raw_topic
        assert letter["value"] == bad[key]
        assert letter["source_partition"] >= 0 and letter["source_offset"] >= 0
        assert letter["reason"]
    assert letters["bad_magic"]["error_type"] == "bad_magic"
    assert letters["unknown_schema"]["error_type"] == "unknown_schema"
    assert "987654" in letters["unknown_schema"]["reason"]
    assert letters["truncated"]["error_type"] in {"truncated", "invalid_record"}
    assert letters["random"]["error_type"] in {"bad_magic", "not_avro", "unknown_schema",
                                               "truncated", "invalid_record"}
