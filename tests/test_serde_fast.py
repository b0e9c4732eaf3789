"""Codec's fast writer (cavro, shared fields' bytes reused) writes the very bytes of
AvroSerializer and fastavro: records as the eBPF sensor builds them, and generated ones."""

from __future__ import annotations

import io
import os
import socket
from typing import Any

import fastavro
import fastavro.schema
import pytest
from confluent_kafka.serialization import MessageField, SerializationContext
from fastavro.utils import generate_many

import schemas
from packetless import serde
from packetless.config import Settings
from packetless.serde import SHARED_CACHE, Codec, RecordWriter
from packetless.topics import topic_name
from sensor import ebpf, netlink


def _fastavro(schema: dict[str, Any], value: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), value)
    return out.getvalue()


def sensor_records() -> list[dict[str, Any]]:
    """raw.ebpf records made by ``EbpfSensor._emit``: START/UPDATE/END/FAILURE of TCP and UDP
    flows, IPv4 and IPv6, owned by this process, by a vanished one (nulls) and by none."""
    records: list[dict[str, Any]] = []
    sensor = ebpf.EbpfSensor(ebpf.EbpfOptions(host_name="test-host"),
                             lambda _t, _k, rec: records.append(rec))
    me = os.getpid()
    owners = [sensor._owner((1, me, me, 0, 0, b"python\0", 1, 0)),
              sensor._owner((7, 2**22 + 1, 2**22 + 1, 1000, 1000, b"gone\0", 2, 0)),  # no /proc
              None]
    v4 = socket.inet_pton(socket.AF_INET, "127.0.0.1") + bytes(12)
    v6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    mapped = ebpf.V4_MAPPED_PREFIX + socket.inet_pton(socket.AF_INET, "10.1.2.3")
    flows = [(ebpf.PROTO_TCP, ebpf.AF_INET, v4, v4), (ebpf.PROTO_TCP, ebpf.AF_INET6, v6, v6),
             (ebpf.PROTO_UDP, ebpf.AF_INET6, mapped, mapped), (ebpf.PROTO_UDP, ebpf.AF_INET, v4, v4)]
    cookie = 0
    for owner in owners:
        for proto, family, laddr, raddr in flows:
            cookie += 1
            live = ebpf.Live.new(proto, 10**18, 1 + cookie % 2, family, laddr, 40000 + cookie,
                                 raddr, 443, owner)
            sensor._emit("START", cookie, live, 10**18 + 1)
            sensor._emit("UPDATE", cookie, live, 10**18 + 2, counters=(1, 2**40, 3, 4, 50, 5, 0))
            sensor._emit("END", cookie, live, 10**18 + 3, counters=(5, 6, 7, 8), rtt=(60, 7, 1),
                         reason="RESET_RECEIVED")
            sensor._emit("FAILURE", cookie, live, 10**18 + 4, reason="REFUSED",
                         error="ECONNREFUSED", state="SYN_SENT")
    return records


def test_sensor_records_are_varied() -> None:
    records = sensor_records()
    assert {r["type"] for r in records} == {"START", "UPDATE", "END", "FAILURE"}
    assert {r["family"] for r in records} == {"ipv4", "ipv6"}
    assert any(r["process"] is None for r in records)
    assert any(r["process"] and r["process"]["exe"] is None for r in records)  # vanished owner
    assert any(r["process"] and r["process"]["pid"] == os.getpid() for r in records)


def test_writer_writes_fastavro_bytes() -> None:
    """As Codec writes raw.ebpf: the process shared, the recurring texts by value."""
    schema = schemas.load("EbpfEvent")
    write = RecordWriter(schema, serde.SHARED_FIELDS[schema["name"]], (),
                         serde.TEXT_RUNS[schema["name"]])
    records = sensor_records()
    for rec in records + records:  # the second time the process bytes come from the cache
        assert write(rec) == _fastavro(schema, rec), rec["type"]


@pytest.mark.parametrize("name", schemas.names())
def test_writer_cut_at_any_field(name: str) -> None:
    """Cut at each field in turn (named types defined before the cut used after it too)."""
    schema = schemas.load(name)
    records = list(generate_many(schema, 15))
    expected = [_fastavro(schema, rec) for rec in records]
    for field in [None, *schema["fields"]]:
        write = RecordWriter(schema, () if field is None else (field["name"],))
        assert [write(rec) for rec in records] == expected, (name, field and field["name"])


def _record_fields(schema: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """Fields of ``schema`` holding a record (or null or a record), with that record's fields."""
    out = []
    for field in fastavro.schema.expand_schema(schema)["fields"]:
        kind = field["type"]
        branches = kind if isinstance(kind, list) else [kind]
        records = [b for b in branches if isinstance(b, dict) and b.get("type") == "record"]
        if len(records) == 1 and len(branches) - ("null" in branches) == 1:
            out.append((field["name"], [f["name"] for f in records[0]["fields"]]))
    return out


@pytest.mark.parametrize("name", schemas.names())
def test_writer_cut_inside_any_record_field(name: str) -> None:
    """A shared path into a nested record (``socket.process``), at each of its fields."""
    schema = schemas.load(name)
    records = list(generate_many(schema, 15))
    expected = [_fastavro(schema, rec) for rec in records]
    for outer, inner in _record_fields(schema):
        for field in inner:
            write = RecordWriter(schema, (f"{outer}.{field}",))
            assert [write(rec) for rec in records + records] == expected + expected, \
                (name, outer, field)


def test_netlink_records_with_shared_processes() -> None:
    """Records of a real Netlink snapshot (sockets of this process, of others, none; interfaces;
    closed sockets), the process of each socket written once per process record."""
    schema = schemas.load("NetlinkEvent")
    write = RecordWriter(schema, serde.SHARED_FIELDS["packetless.NetlinkEvent"])
    sensor = netlink.NetlinkSensor(netlink.NetlinkOptions(other_namespaces=False))
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        client.sendall(b"x" * 1000)
        accepted.recv(1000)
        records = [rec for _, rec in sensor.events()]
        client.close()
        accepted.close()
    records += [rec for _, rec in sensor.events()]
    kinds = {rec["kind"] for rec in records}
    assert kinds == {"SOCKET", "SOCKET_CLOSED", "INTERFACE"}, kinds
    mine = [rec for rec in records if rec["socket"] and rec["socket"]["process"]
            and rec["socket"]["process"]["pid"] == os.getpid()]
    assert mine and all(rec["socket"]["tcp"] for rec in mine)
    for rec in records + records:
        assert write(rec) == _fastavro(schema, rec), rec["kind"]


def test_shared_bytes_follow_the_value_object() -> None:
    """A shared value's bytes are reused for the same object only, also beyond the cache size."""
    schema = schemas.load("EbpfEvent")
    write = RecordWriter(schema, ("process",))
    base = sensor_records()[0]
    for i in range(SHARED_CACHE + 10):
        rec = {**base, "process": {**base["process"], "pid": i, "args": [str(i)] * (i % 3)}}
        assert write(rec) == _fastavro(schema, rec)


def test_unfit_records_raise_value_errors() -> None:
    """make_publish sends records that raise these to the dead letter topic."""
    write = RecordWriter(schemas.load("EbpfEvent"), ("process",))
    good = sensor_records()[0]
    for bad in ({**good, "local_port": "x"}, {**good, "cookie": 2**70},
                {**good, "process": {**good["process"], "pid": None}},
                {**good, "process": {**good["process"], "comm": "x\udcff"}},  # not UTF-8
                {k: v for k, v in good.items() if k != "host_name"}):
        with pytest.raises((ValueError, TypeError, OverflowError)):
            write(bad)


@pytest.mark.kafka
def test_codec_encode_is_avro_serializer_bytes(settings: Settings) -> None:
    """Codec.encode (fast after the first record) against the plain AvroSerializer."""
    codec = Codec(settings)
    plain = codec.serializer("raw.ebpf")
    ctx = SerializationContext(topic_name(settings, "raw.ebpf"), MessageField.VALUE)
    records = sensor_records()
    assert [codec.encode("raw.ebpf", r) for r in records + records] == \
        [plain(r, ctx) for r in records + records]
    with pytest.raises(ValueError):
        codec.encode("raw.ebpf", {**records[0], "remote_port": "https"})


def test_recurring_fields_are_written_by_value() -> None:
    """Flow records whose processes and containers are new dicts each time: equal values reuse
    their bytes, and a changed value (one field, a field's type, key order) never gets the
    bytes of another; values without JSON are written (or refused) as they are."""
    schema = schemas.load("Flow")
    write = RecordWriter(schema, (), serde.RECURRING_FIELDS["packetless.Flow"])
    base = next(iter(generate_many(schema, 1)))
    process = {**schemas.defaults("Process"), "pid": 7, "comm": "curl", "args": ["curl", "-s"],
               "uid": 0, "start_time_ms": 1}
    container = {**schemas.defaults("ContainerRef"), "id": "c" * 64, "labels": {"a": "b"}}
    variants = [process, {**process, "args": ["curl"]}, {**process, "uid": None},
                {**process, "pid": 8}, dict(reversed(process.items())), None]
    records = []
    for proc in variants:
        for ref in (container, {**container, "labels": {}}, None):
            client = {**base["client"], "process": proc and dict(proc), "container": ref}
            server = {**base["server"], "process": None, "container": ref and dict(ref)}
            records.append({**base, "client": client, "server": server})
    for rec in records + records:
        assert write(rec) == _fastavro(schema, rec)
    for bad in ({**process, "pid": 2**70}, {**process, "comm": "x\udcff"}, {**process, "pid": "7"}):
        with pytest.raises((ValueError, TypeError, OverflowError)):
            write({**base, "client": {**base["client"], "process": bad}})


def test_recurring_values_are_written_once_per_field() -> None:
    """Equal values of a field are written once; two fields with the same value (the same
    JSON) keep their own bytes."""
    inner = {"type": "record", "name": "I", "fields": [{"name": "n", "type": "long"}]}
    schema = {"type": "record", "name": "R", "fields": [
        {"name": "a", "type": ["null", inner]}, {"name": "b", "type": ["I", "null"]}]}
    write = RecordWriter(schema, (), ("a", "b"))
    records = [{"a": a, "b": b} for a in (None, {"n": 1}, {"n": 2}) for b in (None, {"n": 1})]
    for rec in records + [{"a": dict(r["a"] or {}) or None, "b": r["b"]} for r in records]:
        assert write(rec) == _fastavro(schema, rec)
    assert len(write._recurring) == 5  # a: None, 1, 2; b: None, 1


def test_recurring_fields_refuse_floating_point() -> None:
    """JSON writes NaN as null: a recurring value with floats could take a null's bytes."""
    schema = {"type": "record", "name": "R", "fields": [
        {"name": "inner", "type": ["null", {"type": "record", "name": "I", "fields": [
            {"name": "x", "type": ["null", "double"]}]}]}]}
    with pytest.raises(ValueError, match="floating point"):
        RecordWriter(schema, (), ("inner",))


def test_text_runs_are_written_by_their_values() -> None:
    """A run of string and enum fields reuses the bytes of equal values only: a change of one
    field (None, an empty string, another symbol) is written anew; a run with a missing field
    (its default) or a value Avro refuses is written as it is."""
    schema = {"type": "record", "name": "R", "fields": [
        {"name": "n", "type": "long"},
        {"name": "a", "type": "string"},
        {"name": "b", "type": ["null", "string"], "default": None},
        {"name": "c", "type": ["null", {"type": "enum", "name": "E", "symbols": ["X", "Y"]}]},
        {"name": "m", "type": ["null", "long"]}]}
    write = RecordWriter(schema, (), (), (("a", "b", "c"),))
    records = [{"n": n, "a": a, "b": b, "c": c, "m": n or None}
               for n in (0, 2**40) for a in ("", "x") for b in (None, "", "x", "é")
               for c in (None, "X", "Y")]
    for rec in records + [dict(r) for r in records]:
        assert write(rec) == _fastavro(schema, rec)
    assert len(write._texts) == 2 * 4 * 3
    missing = {"n": 1, "a": "x", "c": "X", "m": None}
    assert write(missing) == _fastavro(schema, missing)
    for bad in ({**records[0], "b": 1}, {**records[0], "b": ["x"]}, {**records[0], "c": "Z"}):
        with pytest.raises((ValueError, TypeError, OverflowError)):
            write(bad)


@pytest.mark.parametrize("run", [("b", "a"), ("a", "c"), ("a", "n"), ("c", "m")])
def test_text_runs_are_consecutive_texts(run: tuple[str, ...]) -> None:
    schema = {"type": "record", "name": "R", "fields": [
        {"name": "n", "type": "long"}, {"name": "a", "type": "string"},
        {"name": "b", "type": "string"}, {"name": "c", "type": ["null", "string"]},
        {"name": "m", "type": ["null", "long"]}]}
    with pytest.raises(ValueError):
        RecordWriter(schema, (), (), (run,))
