"""Builds the ``packetless.Flow`` record of a flow event from the flow state and the metadata
known when it is emitted; ECS and OCSF documents are derived from this record.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import struct
from functools import lru_cache
from typing import Any

from streams.flows import IANA, Emission, FlowState, SocketState, family_of
from streams.meta import MetaCache, MetaKey

_SEED = struct.pack("!H", 0)  # Community ID seed
_PORTS = struct.Struct("!HH")


@lru_cache(maxsize=65536)  # a flow's events share it
def community_id(transport: str, src_ip: str, src_port: int, dst_ip: str, dst_port: int) -> str:
    """Community ID v1 (seed 0, base64) of a TCP or UDP 5-tuple: SHA-1 of the seed, the
    addresses, the protocol, a pad byte and the ports, in network byte order, the smaller
    endpoint first. (The ``communityid`` package, whose reference vectors the tests check,
    re-validates and re-builds its tuple several times and formats it for a log line on every
    call: about 10 times slower.)"""
    family = socket.AF_INET6 if ":" in src_ip else socket.AF_INET
    src = (socket.inet_pton(family, src_ip), src_port)
    dst = (socket.inet_pton(family, dst_ip), dst_port)
    (a, a_port), (b, b_port) = (src, dst) if src <= dst else (dst, src)
    data = b"".join((_SEED, a, b, bytes((IANA[transport], 0)), _PORTS.pack(a_port, b_port)))
    return "1:" + base64.b64encode(hashlib.sha1(data).digest()).decode()


def _endpoint(ip: str, port: int, sock: SocketState | None, host: str,
              meta: MetaCache) -> dict[str, Any]:
    if sock is None:
        return {"ip": ip, "port": port, "local": False, "socket_cookie": None, "netns_inode": None,
                "process": None, "container": None, "bytes_sent": None, "bytes_received": None,
                "packets_sent": None, "packets_received": None, "srtt_us": None,
                "rttvar_us": None, "retransmits": None, "tcp_state": None, "first_seen_ns": None,
                "last_seen_ns": None, "closed": False}
    process = meta.process(host, sock.process)
    container_id = sock.container_id or (process or {}).get("container_id")
    return {"ip": ip, "port": port, "local": True, "socket_cookie": sock.cookie,
            "netns_inode": sock.netns_inode, "process": process,
            "container": meta.container_ref(container_id),
            "bytes_sent": sock.bytes_sent, "bytes_received": sock.bytes_received,
            "packets_sent": sock.packets_sent, "packets_received": sock.packets_received,
            "srtt_us": sock.srtt_us, "rttvar_us": sock.rttvar_us,
            "retransmits": sock.retransmits, "tcp_state": sock.state,
            "first_seen_ns": sock.first_ns, "last_seen_ns": sock.last_ns, "closed": sock.closed}


def container_of(state: FlowState, sock: SocketState, meta: MetaCache) -> str | None:
    """The container of a local socket: its own, else its process's."""
    if sock.container_id:
        return sock.container_id
    process = meta.process(state.host, sock.process)
    return (process or {}).get("container_id")


def enrichment(state: FlowState, meta: MetaCache) -> str:
    """Signature of the metadata known for the flow's sockets (see ``flows.due``)."""
    return meta.signature(*_described(state, meta))


def awaited(state: FlowState, meta: MetaCache) -> set[MetaKey]:
    """The containers and processes of the flow's sockets whose metadata is not known yet."""
    return meta.missing(*_described(state, meta))


def _described(state: FlowState, meta: MetaCache) -> tuple[str, list[str | None],
                                                          list[dict[str, Any] | None]]:
    """The host, containers and processes of the flow's sockets, which metadata describes."""
    socks = list(state.sockets.values())
    return state.host, [container_of(state, s, meta) for s in socks], [s.process for s in socks]


def flow_record(state: FlowState, emission: Emission, meta: MetaCache, now_ms: int) -> dict[str, Any]:
    """The ``packetless.Flow`` record of ``emission``."""
    (cip, cport), (sip, sport) = state.endpoints()
    csock, ssock = state.socket_at((cip, cport)), state.socket_at((sip, sport))
    client = _endpoint(cip, cport, csock, state.host, meta)
    server = _endpoint(sip, sport, ssock, state.host, meta)

    def sent(own: SocketState | None, peer: SocketState | None, what: str) -> int:
        if own is not None:
            return getattr(own, f"{what}_sent")
        return getattr(peer, f"{what}_received") if peer is not None else 0

    rtt_sock = csock if csock is not None and csock.srtt_us is not None else ssock
    last_ns = state.last_ns()
    return {
        "flow_id": state.flow_id, "type": emission.type, "sequence": emission.sequence,
        "end_reason": emission.end_reason if emission.type == "END" else None,
        "error": next((s.error for s in state.sockets.values() if s.error), None),
        "timestamp_ms": last_ns // 1_000_000, "emitted_ms": now_ms,
        "start_ns": state.first_ns(),
        "end_ns": state.closed_ns() if emission.type == "END" else None,
        "host_name": state.host, "transport": state.transport,
        "iana_number": IANA.get(state.transport, 0), "family": family_of(cip),
        "community_id": community_id(state.transport, cip, cport, sip, sport),
        "client": client, "server": server,
        "client_bytes": sent(csock, ssock, "bytes"), "server_bytes": sent(ssock, csock, "bytes"),
        "client_packets": sent(csock, ssock, "packets"),
        "server_packets": sent(ssock, csock, "packets"),
        "retransmits": sum(s.retransmits for s in state.sockets.values()),
        "rtt_us": rtt_sock.srtt_us if rtt_sock is not None else None,
    }
