"""Raw sensor records (``packetless.EbpfEvent``, ``packetless.NetlinkEvent``) as flow
``Observation``s: the only place that knows the raw schemas' field names; and fast Avro
decoding (cavro with the schemas cached per schema id; packetless.serde.Codec writes with cavro).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cavro

import schemas
from packetless.serde import Codec
from packetless.topics import TOPICS
from streams.flows import CLIENT, SERVER, Observation

CLOSING_EBPF = frozenset({"END", "FAILURE"})
# a listening port no snapshot showed for this long is forgotten (the sensor shows an idle socket
# every 12 snapshots: every minute by default)
LISTENER_KEEP_S = 1800.0


# cavro (Cython) reads these records several times faster than fastavro
CAVRO = cavro.Options(record_decodes_to_dict=True)


class RawDecoder:
    """Decodes Confluent-framed Avro with cavro, resolving each writer schema (fetched from the
    registry once per id) to our reader schema: tens of times faster than ``Codec.decode`` per
    record. Anything unusual goes through ``Codec.decode``, which raises the classified
    ``DecodeError`` for the DLQ."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._readers: dict[tuple[str, int], Callable[[bytes], Any]] = {}

    def decode(self, suffix: str, data: bytes | None) -> dict[str, Any] | None:
        if data is None or len(data) < 6 or data[0] != 0:
            return self.codec.decode(suffix, data)
        schema_id = int.from_bytes(data[1:5], "big")
        read = self._readers.get((suffix, schema_id))
        if read is None:
            try:
                writer = self.codec.client.get_schema(schema_id).schema_str
                reader = schemas.load(TOPICS[suffix].schema or "")
                ours = cavro.Schema(json.dumps(reader), options=CAVRO)
                theirs = cavro.Schema(writer, options=CAVRO)
                # the same schema needs no resolution, which reads several times faster
                read = (ours if json.loads(writer) == reader
                        else ours.reader_for_writer(theirs)).binary_decode
            except Exception:  # unknown id, registry down, schema with references: classify
                return self.codec.decode(suffix, data)
            self._readers[(suffix, schema_id)] = read
        try:
            return read(data[5:])
        except Exception:  # garbage after a valid header: let Codec say what is wrong
            return self.codec.decode(suffix, data)


@dataclass
class Listeners:
    """Listening ports seen in Netlink snapshots: a Netlink socket on one is a server. Those
    not seen for ``LISTENER_KEEP_S`` are forgotten: containers come and go, each with its
    network namespace."""

    ports: OrderedDict[tuple[str, int | None, int], float] = field(default_factory=OrderedDict)

    def add(self, host: str, netns: int | None, port: int, now: float | None = None) -> None:
        """A listener seen at ``now`` (``time.monotonic``)."""
        now = time.monotonic() if now is None else now
        key = (host, netns, port)
        self.ports[key] = now
        self.ports.move_to_end(key)
        while True:
            oldest, seen = next(iter(self.ports.items()))
            if seen >= now - LISTENER_KEEP_S:
                return
            del self.ports[oldest]

    def role(self, host: str, netns: int | None, local_port: int) -> str | None:
        return SERVER if (host, netns, local_port) in self.ports else None


def from_ebpf(rec: dict[str, Any]) -> Observation | None:
    """The observation of one eBPF event; None for events that are not about a connection
    (DROPS, or a socket without a remote end)."""
    if rec["type"] == "DROPS" or not rec.get("remote_port") or not rec.get("transport"):
        return None
    role = (rec.get("role") or "").lower()
    process = rec.get("process")
    return Observation(
        host=rec["host_name"], cookie=rec["cookie"], ts_ns=rec["timestamp_ns"], source="ebpf",
        kind=rec["type"], transport=rec["transport"], local_ip=rec["local_ip"],
        local_port=rec["local_port"], remote_ip=rec["remote_ip"], remote_port=rec["remote_port"],
        start_ns=rec.get("start_ns"), role=role if role in (CLIENT, SERVER) else None,
        netns_inode=rec.get("netns_inode"),
        bytes_sent=rec.get("bytes_sent"), bytes_received=rec.get("bytes_received"),
        packets_sent=rec.get("packets_sent"), packets_received=rec.get("packets_received"),
        retransmits=rec.get("retransmits"), srtt_us=rec.get("srtt_us"),
        rttvar_us=rec.get("rttvar_us"), state=rec.get("state"), process=process,
        container_id=rec.get("container_id") or (process or {}).get("container_id"),
        cgroup_id=rec.get("cgroup_id"), closed=rec["type"] in CLOSING_EBPF,
        failed=rec["type"] == "FAILURE", error=rec.get("error"))


def from_netlink(rec: dict[str, Any], listeners: Listeners) -> Observation | None:
    """The observation of one Netlink socket record; None for interfaces, listeners and
    unconnected sockets (a listener is remembered to tell servers from clients)."""
    sock = rec.get("socket")
    if rec["kind"] == "INTERFACE" or sock is None:
        return None
    if sock["state"] == "LISTEN":
        listeners.add(rec["host_name"], rec.get("netns_inode"), sock["local_port"])
        return None
    if not sock["remote_port"]:
        return None
    tcp = sock.get("tcp") or {}
    sent = tcp.get("bytes_acked")
    if sent is not None and tcp.get("bytes_sent"):
        # bytes_acked is sequence space: the SYN of an active opener and an acknowledged FIN
        # count too; bytes_sent (retransmissions included; 0 before Linux 4.19) bounds the
        # payload acknowledged
        sent = min(sent, tcp["bytes_sent"])
    return Observation(
        host=rec["host_name"], cookie=sock["cookie"], ts_ns=rec["timestamp_ms"] * 1_000_000,
        source="netlink", kind=rec["kind"], transport=sock["transport"],
        local_ip=sock["local_ip"], local_port=sock["local_port"], remote_ip=sock["remote_ip"],
        remote_port=sock["remote_port"],
        role=listeners.role(rec["host_name"], rec.get("netns_inode"), sock["local_port"]),
        netns_inode=rec.get("netns_inode"),
        bytes_sent=sent, bytes_received=tcp.get("bytes_received"),
        packets_sent=tcp.get("segs_out"), packets_received=tcp.get("segs_in"),
        retransmits=tcp.get("retransmits"), srtt_us=tcp.get("rtt_us"),
        rttvar_us=tcp.get("rttvar_us"), state=sock["state"], process=sock.get("process"),
        container_id=sock.get("container_id"), cgroup_id=sock.get("cgroup_id"),
        closed=rec["kind"] == "SOCKET_CLOSED")
