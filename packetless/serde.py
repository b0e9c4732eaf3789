"""Avro in the Confluent wire format (magic byte 0, 4-byte schema id) through the schema registry.

Serialization uses confluent-kafka's AvroSerializer with the schemas of ``schemas/``; decoding
classifies every failure (not Avro, wrong magic byte, unknown schema id, truncated record,
schema mismatch) into a ``DecodeError`` so that callers can dead-letter the record.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from confluent_kafka.schema_registry import SchemaRegistryClient, SchemaRegistryError
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext, SerializationError

import schemas
from packetless.config import Settings
from packetless.topics import TOPICS, topic_name

MAGIC = 0
HEADER = struct.Struct(">bI")
# field name, the union branch to name (None: a record field that is not a union), its own plan
Plan = list[tuple[str, "str | None", "Plan"]]


class DecodeError(Exception):
    """A record that cannot be decoded; ``kind`` is a DeadLetter ``error_type``."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _record_of(kind: Any, named: dict[str, dict[str, Any]], namespace: str) -> dict[str, Any] | None:
    """The record schema ``kind`` is or names (recording definitions in ``named``), else None."""
    if isinstance(kind, dict) and kind.get("type") == "record":
        name = kind["name"]
        full = name if "." in name else f"{kind.get('namespace', namespace)}.{name}"
        named[full] = {**kind, "fullname": full}
        return named[full]
    return named.get(kind) if isinstance(kind, str) else None


def _plan(record: dict[str, Any], named: dict[str, dict[str, Any]]) -> Plan:
    namespace = record["fullname"].rpartition(".")[0]
    plan: Plan = []
    for f in record["fields"]:
        branches = f["type"] if isinstance(f["type"], list) else [f["type"]]
        records = [r for r in (_record_of(b, named, namespace) for b in branches) if r is not None]
        if len(records) != 1:
            continue
        inner = _plan(records[0], named)
        union = isinstance(f["type"], list)
        if union or inner:
            plan.append((f["name"], records[0]["fullname"] if union else None, inner))
    return plan


def _named(plan: Plan, value: Any) -> Any:
    """``value`` with the planned unions named; the caller's dicts are left alone (copied only
    where something is named)."""
    if not isinstance(value, dict):
        return value
    out = None
    for name, branch, inner in plan:
        item = value.get(name)
        if item is None:
            continue
        new = _named(inner, item) if inner else item
        if branch:
            new = (branch, new)
        if new is not item:
            if out is None:
                out = dict(value)
            out[name] = new
    return value if out is None else out


def union_branches(schema: dict[str, Any]) -> Callable[[Any, Any], Any]:
    """``to_dict`` for AvroSerializer: names the branch of each union holding a record (fastavro's
    ``(name, value)`` notation); otherwise fastavro finds it by validating the value against
    the branches, which takes longer than writing the whole record."""
    named: dict[str, dict[str, Any]] = {}
    plan = _plan(_record_of(schema, named, "") or {}, named)
    return lambda value, _ctx: _named(plan, value)


def registry_client(settings: Settings) -> SchemaRegistryClient:
    """A registry client for the configured (Confluent-compatible) registry URL."""
    return SchemaRegistryClient({"url": settings.registry_url})


class Codec:
    """Serializers and deserializers for all Avro topics, sharing one registry client."""

    def __init__(self, settings: Settings, client: SchemaRegistryClient | None = None) -> None:
        self.settings = settings
        self.client = client or registry_client(settings)
        self._serializers: dict[str, AvroSerializer] = {}
        self._deserializers: dict[str, AvroDeserializer] = {}

    def serializer(self, suffix: str) -> AvroSerializer:
        if suffix not in self._serializers:
            name = self._schema_name(suffix)
            self._serializers[suffix] = AvroSerializer(
                self.client, schemas.text(name), to_dict=union_branches(schemas.load(name)),
                conf={"auto.register.schemas": True, "normalize.schemas": False},
            )
        return self._serializers[suffix]

    def deserializer(self, suffix: str) -> AvroDeserializer:
        if suffix not in self._deserializers:
            self._deserializers[suffix] = AvroDeserializer(
                self.client, schemas.text(self._schema_name(suffix))
            )
        return self._deserializers[suffix]

    @staticmethod
    def _schema_name(suffix: str) -> str:
        schema = TOPICS[suffix].schema
        if schema is None:
            raise KeyError(f"topic {suffix!r} carries JSON, not Avro")
        return schema

    def encode(self, suffix: str, value: dict[str, Any]) -> bytes:
        """``value`` as Confluent-framed Avro for topic ``suffix`` (registers the schema once)."""
        topic = topic_name(self.settings, suffix)
        return self.serializer(suffix)(value, SerializationContext(topic, MessageField.VALUE))

    def decode(self, suffix: str, data: bytes | None) -> dict[str, Any] | None:
        """The record in ``data``, read with our schema as reader schema; None for a tombstone.

        Raises DecodeError saying what is wrong with the bytes.
        """
        if data is None:
            return None
        if len(data) < HEADER.size + 1:
            raise DecodeError("truncated" if data[:1] == b"\0" else "not_avro",
                              f"{len(data)} bytes is too short for a framed Avro record")
        magic, schema_id = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise DecodeError("bad_magic", f"magic byte {magic & 0xFF:#04x}, expected 0x00")
        topic = topic_name(self.settings, suffix)
        try:
            return self.deserializer(suffix)(data, SerializationContext(topic, MessageField.VALUE))
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                raise DecodeError("unknown_schema", f"unknown schema id {schema_id}") from exc
            raise DecodeError("registry_error", f"registry: {exc}") from exc
        except (EOFError, StopIteration, IndexError, struct.error) as exc:
            raise DecodeError("truncated", f"record ends early ({type(exc).__name__})") from exc
        except SerializationError as exc:
            raise DecodeError("invalid_record", str(exc)) from exc
        except Exception as exc:  # fastavro raises many types on garbage: keep the record
            kind = "schema_mismatch" if "Schema" in type(exc).__name__ else "invalid_record"
            raise DecodeError(kind, f"{type(exc).__name__}: {exc}") from exc
