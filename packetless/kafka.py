"""Kafka plumbing shared by the sensor, the stream worker and the CLI.

``Publisher`` produces Avro or JSON records (idempotent, acks=all, compressed, batched);
``ensure_topics`` creates the topics of ``packetless.topics`` and registers their schemas with
compatibility BACKWARD; ``dead_letter`` keeps a record that could not be processed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from confluent_kafka.schema_registry import Schema

import schemas
from packetless.config import Settings
from packetless.serde import Codec
from packetless.topics import TOPICS, topic_name

log = logging.getLogger(__name__)

PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "compression.type": "lz4",
    "linger.ms": 50,
    "batch.num.messages": 10000,
    "message.timeout.ms": 300000,
}


class Publisher:
    """Produces records to Packetless topics by suffix; Avro topics are encoded with ``Codec``."""

    def __init__(self, settings: Settings, codec: Codec | None = None,
                 on_error: Callable[[str], None] | None = None, **overrides: Any) -> None:
        self.settings = settings
        self.codec = codec or Codec(settings)
        conf = {**settings.kafka_config(), **PRODUCER_DEFAULTS, **overrides}
        self.producer = Producer(conf)
        self.delivered = 0
        self.failed = 0
        self._on_error = on_error or (lambda msg: log.error("delivery failed: %s", msg))

    def _delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is None:
            self.delivered += 1
        else:
            self.failed += 1
            self._on_error(str(err))

    def send(self, suffix: str, key: str | bytes | None, value: dict[str, Any],
             headers: dict[str, bytes] | None = None) -> None:
        """Queue ``value`` for topic ``suffix``; Avro or JSON by the topic's definition."""
        if TOPICS[suffix].schema is None:
            payload = json.dumps(value, separators=(",", ":"), default=str).encode()
        else:
            payload = self.codec.encode(suffix, value)
        self.produce_raw(topic_name(self.settings, suffix), key, payload, headers)

    def produce_raw(self, topic: str, key: str | bytes | None, payload: bytes | None,
                    headers: dict[str, bytes] | None = None) -> None:
        """Queue already-encoded bytes, waiting for room when the local queue is full."""
        while True:
            try:
                self.producer.produce(topic, payload, key, headers=headers,
                                      on_delivery=self._delivery)
                break
            except BufferError:
                self.producer.poll(0.1)
        self.producer.poll(0)

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for outstanding deliveries; returns how many are still pending."""
        return self.producer.flush(timeout)


def dead_letter(publisher: Publisher, msg: Message, kind: str, reason: str,
                consumer: str) -> None:
    """Publish ``msg`` unchanged on the DLQ topic with why it could not be processed."""
    ts_type, ts = msg.timestamp()
    publisher.send("dlq", msg.key(), {
        "reason": reason,
        "error_type": kind,
        "source_topic": msg.topic(),
        "source_partition": msg.partition(),
        "source_offset": msg.offset(),
        "source_timestamp_ms": ts if ts_type else None,
        "key": msg.key(),
        "value": msg.value(),
        "headers": {k: v or b"" for k, v in (msg.headers() or [])},
        "consumer": consumer,
        "host": publisher.settings.host_name,
        "timestamp_ms": int(time.time() * 1000),
    })


def admin(settings: Settings) -> AdminClient:
    return AdminClient(settings.kafka_config())


def ensure_topics(settings: Settings, suffixes: Iterable[str] | None = None,
                  timeout: float = 30.0) -> list[str]:
    """Create the missing Packetless topics; returns the names created."""
    client = admin(settings)
    existing = set(client.list_topics(timeout=timeout).topics)
    wanted = [TOPICS[s] for s in (suffixes or TOPICS)]
    new = [NewTopic(topic_name(settings, t.suffix), num_partitions=t.partitions,
                    replication_factor=1, config=t.config())
           for t in wanted if topic_name(settings, t.suffix) not in existing]
    if not new:
        return []
    created = []
    for name, future in client.create_topics(new, operation_timeout=timeout).items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    return created


def ensure_schemas(codec: Codec, suffixes: Iterable[str] | None = None) -> dict[str, int]:
    """Register each Avro topic's schema under ``<topic>-value`` with compatibility BACKWARD.

    Returns subject -> schema id. An incompatible change to a schema file is refused by the
    registry here, before anything is produced with it.
    """
    ids: dict[str, int] = {}
    codec.client.set_compatibility(level="BACKWARD")  # the default for subjects created later
    subjects = set(codec.client.get_subjects())
    for suffix in suffixes or TOPICS:
        schema_name = TOPICS[suffix].schema
        if schema_name is None:
            continue
        subject = f"{topic_name(codec.settings, suffix)}-value"
        if subject not in subjects:
            codec.client.set_compatibility(subject, "BACKWARD")
        ids[subject] = codec.client.register_schema(subject, Schema(schemas.text(schema_name), "AVRO"))
    return ids


def consumer(settings: Settings, group: str | None, **overrides: Any) -> Consumer:
    """A consumer; without a group, an anonymous one that commits nothing."""
    conf: dict[str, Any] = {
        **settings.kafka_config(),
        "group.id": group or f"packetless-anon-{time.monotonic_ns()}",
        "enable.auto.commit": group is not None,
        "auto.offset.reset": "earliest",
    }
    conf.update(overrides)
    return Consumer(conf)
