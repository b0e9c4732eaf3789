"""Avro in the Confluent wire format (magic byte 0, 4-byte schema id) through the schema registry.

Serialization registers the schemas of ``schemas/`` through confluent-kafka's AvroSerializer
(first record of a topic), then writes the same bytes with cavro (``RecordWriter``); decoding
classifies every failure (not Avro, wrong magic byte, unknown schema id, truncated record,
schema mismatch) into a ``DecodeError`` so that callers can dead-letter the record.
"""

from __future__ import annotations

import json
import operator
import re
import struct
from collections.abc import Callable
from typing import Any

import cavro
import fastavro.schema
import orjson
from confluent_kafka.schema_registry import SchemaRegistryClient, SchemaRegistryError
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext, SerializationError

import schemas
from packetless.config import Settings
from packetless.topics import TOPICS, topic_name

MAGIC = 0
HEADER = struct.Struct(">bI")
FLOATS = re.compile(r'"(float|double)"')
# orjson writes only the plain JSON types: other values (an ISO date and its text) could share
# a JSON text with a value of another Avro encoding
JSON_PLAIN = (orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME
              | orjson.OPT_PASSTHROUGH_SUBCLASS)
# Fields whose values are shared dicts that nobody changes once made: the process records of the
# eBPF sensor's owners (one per process and OWNER_TTL_NS, see sensor.ebpf.EbpfSensor._owner) and
# of the Netlink sensor's sockets (one per process and snapshot, see NetlinkSensor._owner).
SHARED_FIELDS: dict[str, tuple[str, ...]] = {"packetless.EbpfEvent": ("process",),
                                              "packetless.NetlinkEvent": ("socket.process",)}
# Fields whose values recur from record to record, as new dicts each time: the processes and
# containers of flow events (a process has many flows); their bytes are reused by value.
RECURRING_FIELDS: dict[str, tuple[str, ...]] = {
    "packetless.Flow": ("client.process", "server.process", "client.container",
                        "server.container")}
# Runs of string and enum fields whose values recur together from record to record (a sensor's
# host and boot, a flow's transport and local address, a record type's state and reason): their
# bytes are reused by value.
TEXT_RUNS: dict[str, tuple[tuple[str, ...], ...]] = {
    "packetless.EbpfEvent": (("type", "host_name", "boot_id"),
                             ("transport", "family", "role", "local_ip"),
                             ("state", "previous_state", "reason", "error", "process_source"))}
SHARED_CACHE = 4096
# cavro writes a named type defined in an earlier segment again: each segment is its own schema
SEGMENT_OPTIONS = cavro.Options(named_type_names_must_be_unique=False)
# field name, the union branch to name (None: a record field that is not a union), its own plan
Plan = list[tuple[str, "str | None", "Plan"]]
# what a part of a RecordWriter writes: a run of fields, a shared field, a recurring field, texts
_FIELDS, _SHARED, _RECURRING, _TEXTS = range(4)


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


class RecordWriter:
    """Schemaless Avro of a record schema, written by cavro: the bytes fastavro (AvroSerializer)
    writes, several times faster. Avro writes a record as its fields' encodings one after the
    other, so the ``shared`` fields (values that are never changed once made) are written once
    per value object and their bytes reused, the ``recurring`` fields (values made anew for
    each record, often equal to earlier ones) once per distinct value (by its JSON), the
    ``texts`` (runs of consecutive string or enum fields, nullable or not, whose values recur
    together) once per distinct tuple of values, and the runs of other fields between them by
    schemas of their own (the record's fields in schema order, references expanded). A path
    ``a.b`` names field ``b`` of the record (or null-or-record union) in field ``a``.
    """

    def __init__(self, schema: dict[str, Any], shared: tuple[str, ...] = (),
                 recurring: tuple[str, ...] = (), texts: tuple[tuple[str, ...], ...] = ()) -> None:
        expanded = fastavro.schema.expand_schema(schema)
        own: dict[str, bool] = {}  # shared field -> whether known by value (recurring)
        inner: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        for paths, by_value in ((shared, False), (recurring, True)):
            for path in paths:
                head, _, rest = path.partition(".")
                if rest:
                    ids, values = inner.get(head, ((), ()))
                    inner[head] = (ids, (*values, rest)) if by_value else ((*ids, rest), values)
                else:
                    own[head] = by_value
        runs = {names[0]: names for names in texts}
        self._parts: list[tuple[int, Any, Callable[[Any], bytes]]] = []
        run: list[dict[str, Any]] = []
        fields = expanded["fields"]
        at = 0
        while at <= len(fields):
            field = fields[at] if at < len(fields) else None
            at += 1
            if field is not None and field["name"] not in own and field["name"] not in inner \
                    and field["name"] not in runs:
                run.append(field)
                continue
            if run:
                self._parts.append((_FIELDS, None, self._segment(expanded, run)))
                run = []
            if field is None:
                continue
            name = field["name"]
            if name in runs:
                texts_run = _text_run(fields, at - 1, runs[name])
                at += len(texts_run) - 1
                self._parts.append((_TEXTS, operator.itemgetter(*runs[name]),
                                    self._segment(expanded, texts_run)))
            elif name in inner:
                self._parts.append((_FIELDS, None, _within(field, *inner[name])))
            else:
                if own[name] and FLOATS.search(json.dumps(field["type"])):
                    raise ValueError(f"recurring field {name!r} holds floating point "
                                     "numbers (JSON writes NaN as null)")
                self._parts.append((_RECURRING if own[name] else _SHARED, name,
                                    self._segment(expanded, [field])))
        self._shared: dict[int, tuple[Any, bytes]] = {}  # id(value) -> (value, its bytes)
        self._recurring: dict[tuple[str, bytes], bytes] = {}  # (field, value's JSON) -> bytes
        self._texts: dict[tuple[Any, Any], bytes] = {}  # (run's getter, its values) -> bytes

    @staticmethod
    def _segment(record: dict[str, Any], fields: list[dict[str, Any]]) -> Callable[[Any], bytes]:
        return cavro.Schema(json.dumps({**record, "fields": fields}),
                            options=SEGMENT_OPTIONS).binary_encode

    def __call__(self, value: dict[str, Any]) -> bytes:
        out = []
        for kind, arg, write in self._parts:
            if kind == _FIELDS:
                out.append(write(value))
            elif kind == _TEXTS:
                out.append(self._by_texts(arg, value, write))
            elif kind == _RECURRING:
                out.append(self._by_value(arg, value.get(arg), write))
            else:
                item = value.get(arg)
                known = self._shared.get(id(item))
                if known is None or known[0] is not item:  # the value kept alive keeps its id
                    if len(self._shared) >= SHARED_CACHE:
                        self._shared.clear()
                    known = self._shared[id(item)] = (item, write({arg: item}))
                out.append(known[1])
        return b"".join(out)

    def _by_texts(self, get: Callable[[Any], Any], value: dict[str, Any],
                  write: Callable[[Any], bytes]) -> bytes:
        """The bytes of a run of ``texts`` fields, known by their values: equal strings (and
        None) have the same Avro, and a value of another type is never equal to a string or
        None (cavro does not coerce). A run with a missing field (its default written) or an
        unhashable value (refused) is written as it is."""
        try:
            key = (get, get(value))
            known = self._texts.get(key)
        except (KeyError, TypeError):
            return write(value)
        if known is None:
            if len(self._texts) >= SHARED_CACHE:
                self._texts.clear()
            known = self._texts[key] = write(value)
        return known

    def _by_value(self, name: str, item: Any, write: Callable[[Any], bytes]) -> bytes:
        """The bytes of a recurring field's value, known by its JSON: values with the same JSON
        have the same keys, and values of the same JSON types, so the same Avro. A value
        without JSON of its own (integers beyond 64 bits, bytes, text that is not UTF-8,
        subclasses, dates, dataclasses: ``JSON_PLAIN``) is written each time (and raises if it
        does not fit)."""
        try:
            key = orjson.dumps(item, option=JSON_PLAIN)
        except TypeError:
            return write({name: item})
        known = self._recurring.get((name, key))
        if known is None:
            if len(self._recurring) >= SHARED_CACHE:
                self._recurring.clear()
            known = self._recurring[(name, key)] = write({name: item})
        return known


def _text_run(fields: list[dict[str, Any]], at: int,
              names: tuple[str, ...]) -> list[dict[str, Any]]:
    """The fields ``names`` (a ``texts`` run) of a record's ``fields``, from index ``at`` on:
    they must follow one another and hold strings or enum symbols (or null)."""
    run = fields[at:at + len(names)]
    if [f["name"] for f in run] != list(names):
        raise ValueError(f"text fields {names} do not follow one another in the record")
    for f in run:
        branches = f["type"] if isinstance(f["type"], list) else [f["type"]]
        if not all(b in ("null", "string") or (isinstance(b, dict) and b.get("type") == "enum")
                   for b in branches):
            raise ValueError(f"text field {f['name']!r} holds more than strings and enums")
    return run


def _within(field: dict[str, Any], shared: tuple[str, ...],
            recurring: tuple[str, ...]) -> Callable[[Any], bytes]:
    """A writer of the record field ``field`` (a record, or a union of null and a record) by a
    RecordWriter of its own, with its ``shared`` and ``recurring`` fields: the union's branch
    index (a zigzag long: index i is the byte 2i) then the record."""
    name, kind = field["name"], field["type"]
    branches = kind if isinstance(kind, list) else [kind]
    records = [i for i, branch in enumerate(branches)
               if isinstance(branch, dict) and branch.get("type") == "record"]
    if len(records) != 1 or len(branches) - ("null" in branches) != 1:
        raise ValueError(f"shared fields inside {name!r} need a record or null-or-record field")
    write = RecordWriter(branches[records[0]], shared, recurring)
    tag = bytes([2 * records[0]]) if isinstance(kind, list) else b""
    null = bytes([2 * branches.index("null")]) if "null" in branches else None

    def within(value: dict[str, Any]) -> bytes:
        item = value.get(name)
        if item is None:
            if null is None:
                raise ValueError(f"field {name!r} is not nullable")
            return null
        if not isinstance(item, dict):
            raise ValueError(f"field {name!r} is not a record: {type(item).__name__}")
        return tag + write(item)

    return within


def registry_client(settings: Settings) -> SchemaRegistryClient:
    """A registry client for the configured (Confluent-compatible) registry URL."""
    return SchemaRegistryClient({"url": settings.registry_url})


class Codec:
    """Serializers and deserializers for all Avro topics, sharing one registry client."""

    def __init__(self, settings: Settings, client: SchemaRegistryClient | None = None) -> None:
        self.settings = settings
        self.client = client or registry_client(settings)
        self._serializers: dict[str, AvroSerializer] = {}
        self._writers: dict[str, tuple[bytes, RecordWriter]] = {}  # suffix -> (header, writer)
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
        """``value`` as Confluent-framed Avro for topic ``suffix``: the first record through
        AvroSerializer (which registers the schema and gives its id), the others by the topic's
        ``RecordWriter`` behind the same header. A value that does not fit raises ValueError
        (or TypeError, OverflowError)."""
        known = self._writers.get(suffix)
        if known is not None:
            return known[0] + known[1](value)
        topic = topic_name(self.settings, suffix)
        data = self.serializer(suffix)(value, SerializationContext(topic, MessageField.VALUE))
        schema = schemas.load(self._schema_name(suffix))
        self._writers[suffix] = (data[:HEADER.size],
                                 RecordWriter(schema, SHARED_FIELDS.get(schema["name"], ()),
                                              RECURRING_FIELDS.get(schema["name"], ()),
                                              TEXT_RUNS.get(schema["name"], ())))
        return data

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
