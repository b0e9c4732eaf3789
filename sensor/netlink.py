"""The Netlink half of the sensor: periodic sock_diag and RTM_GETLINK snapshots.

Every interval it dumps all TCP/UDP sockets (with tcp_info) and interface counters of the host
and of every other network namespace (containers), and publishes them on ``raw.netlink``.
"""

from __future__ import annotations

import errno
import functools
import gc
import itertools
import logging
import os
import socket
import struct
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sensor import privileges
from sensor.cgroups import CgroupResolver, ContainerRef
from sensor.netns import Namespace, discover_namespaces, socket_in
from sensor.owners import Owners, SocketOwners
from sensor.processes import ProcessCache
from sensor.pyroute2_parts import diag, ifinfmsg, netlink, rtnl

log = logging.getLogger(__name__)

TOPIC = "raw.netlink"
NETLINK_ROUTE, NETLINK_SOCK_DIAG = netlink.NETLINK_ROUTE, netlink.NETLINK_SOCK_DIAG
NLM_F_REQUEST, NLM_F_DUMP = netlink.NLM_F_REQUEST, netlink.NLM_F_DUMP
NLMSG_ERROR, NLMSG_DONE = netlink.NLMSG_ERROR, netlink.NLMSG_DONE
SOCK_DIAG_BY_FAMILY, SS_ALL = diag.SOCK_DIAG_BY_FAMILY, diag.SS_ALL
INET_DIAG_INFO = 2
INET_DIAG_CONG = 4
INET_DIAG_CGROUP_ID = 21
EXTENSIONS = (1 << (INET_DIAG_INFO - 1)) | (1 << (INET_DIAG_CONG - 1))
U64_MAX = (1 << 64) - 1
CONTAINERS_REMEMBERED = 4096
TCP_STATES = ("UNKNOWN", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2",
              "TIME_WAIT", "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING", "NEW_SYN_RECV")
TIME_WAIT, ESTABLISHED = TCP_STATES.index("TIME_WAIT"), TCP_STATES.index("ESTABLISHED")
DUMPS = ((socket.AF_INET, socket.IPPROTO_TCP, "tcp", "ipv4"),
         (socket.AF_INET6, socket.IPPROTO_TCP, "tcp", "ipv6"),
         (socket.AF_INET, socket.IPPROTO_UDP, "udp", "ipv4"),
         (socket.AF_INET6, socket.IPPROTO_UDP, "udp", "ipv6"))

Publish = Callable[[str, str, dict[str, Any]], None]

# sock_diag is decoded with struct: pyroute2's generic decoder costs ~0.5 ms per socket, which
# a host with tens of thousands of sockets cannot afford every few seconds. The tcp_info
# layout is pyroute2's (a prefix of the kernel's struct; shorter kernels are zero-padded).
_NLMSGHDR = struct.Struct("=IHHII")
_RTATTR = struct.Struct("=HH")
_INET_DIAG_REQ_V2 = struct.Struct("=BBBxI48x")
_INET_DIAG_MSG = struct.Struct("=BBBBHH16s16sIQIIIII")
_U64 = struct.Struct("=Q")
# SocketTcpInfo field -> tcp_info member. _TCP_INFO unpacks only these members (the others are
# skipped as padding, which halves the cost per socket); rates get special cases in _TcpRecord.
_TCP_FIELDS = {
    "rtt_us": "tcpi_rtt", "rttvar_us": "tcpi_rttvar", "min_rtt_us": "tcpi_min_rtt",
    "retransmits": "tcpi_total_retrans", "retransmits_current": "tcpi_retransmits",
    "lost": "tcpi_lost", "unacked": "tcpi_unacked", "segs_in": "tcpi_segs_in",
    "segs_out": "tcpi_segs_out", "data_segs_in": "tcpi_data_segs_in",
    "data_segs_out": "tcpi_data_segs_out", "bytes_acked": "tcpi_bytes_acked",
    "bytes_received": "tcpi_bytes_received", "bytes_sent": "tcpi_bytes_sent",
    "bytes_retrans": "tcpi_bytes_retrans", "snd_cwnd": "tcpi_snd_cwnd",
    "snd_mss": "tcpi_snd_mss", "last_data_recv_ms": "tcpi_last_data_recv",
    "last_data_sent_ms": "tcpi_last_data_sent", "busy_time_us": "tcpi_busy_time",
    "delivery_rate": "tcpi_delivery_rate", "pacing_rate": "tcpi_pacing_rate",
}
_TCP_MEMBERS = {member: name for name, member in _TCP_FIELDS.items()}
_TCP_LAYOUT = [(_TCP_MEMBERS.get(member), fmt)
               for member, fmt in diag.inet_diag_msg.tcp_info.fields]
_TCP_INFO = struct.Struct("=" + "".join(
    fmt if name else f"{struct.calcsize('=' + fmt)}x" for name, fmt in _TCP_LAYOUT))
_TCP_NAMES = tuple(name for name, _ in _TCP_LAYOUT if name)
# the tcp_info members that tell an idle socket (see _idle)
_IDLE_MEMBERS = ("last_data_sent_ms", "last_data_recv_ms")
_DIAG_HEAD = struct.Struct("=xB42xQ4xIIII")  # state, cookie, rqueue, wqueue, uid, inode
# inet_diag_msg from its id: ports (network byte order: 2 bytes each, most significant first;
# socket.ntohs parses its argument at each call), addresses, interface
_SOCKID = {socket.AF_INET: "4B4s12x4s12xI", socket.AF_INET6: "4B16s16sI"}
LAYOUTS_REMEMBERED = 64
ADDRESSES_REMEMBERED = 65536


def _struct_at(fields: list[tuple[int, str]]) -> struct.Struct:
    """A struct reading each (byte position, format) of ``fields`` (in ascending positions),
    skipping the bytes between them."""
    layout, at = "=", 0
    for position, fmt in fields:
        layout += f"{position - at}x{fmt}"
        at = position + struct.calcsize("=" + fmt)
    return struct.Struct(layout)


def _member_offsets() -> dict[str, int]:
    offsets, at = {}, 0
    for name, fmt in _TCP_LAYOUT:
        if name:
            offsets[name] = at
        at += struct.calcsize("=" + fmt)
    return offsets


def _counters_struct(names: tuple[str, ...]) -> struct.Struct:
    """A struct reading only the u32 tcp_info members ``names``, in the order of their offsets."""
    return _struct_at([(offset, "I") for offset in sorted(_TCP_OFFSETS[name] for name in names)])


_TCP_OFFSETS = _member_offsets()  # tcp_info member -> its offset


# the counters a snapshot compares, read without the rest of tcp_info
_COUNTERS = _counters_struct(("segs_in", "segs_out", "retransmits"))
# (offset, size) in tcp_info of each _TCP_NAMES member, in that order
_TCP_MEMBER_SPANS = tuple((_TCP_OFFSETS[name], struct.calcsize("=" + fmt))
                          for name, fmt in _TCP_LAYOUT if name)


@dataclass
class NetlinkOptions:
    """Settings of the Netlink sensor.

    ``other_namespaces``: also dump every other network namespace (containers; root only).
    ``unchanged_every``: republish an unchanged socket every N snapshots (see NetlinkSensor).
    ``on_container``: called once per container id seen (e.g. ``ContainerWatcher.resolve``).
    ``time_wait``: also dump TIME_WAIT sockets. They have no owner and no tcp_info, and under
    connection churn the kernel holds up to net.ipv4.tcp_max_tw_buckets of them; in Netlink
    mode they are how a connection shorter than a snapshot interval is seen at all, while in
    eBPF mode every one of them already had its END, with final counters.
    """

    host_name: str = field(default_factory=socket.gethostname)
    interval_s: float = 5.0
    udp: bool = True
    interfaces: bool = True
    other_namespaces: bool = True
    processes: ProcessCache = field(default_factory=ProcessCache)
    cgroups: CgroupResolver = field(default_factory=CgroupResolver)
    unchanged_every: int = 12
    on_container: Callable[[str], object] | None = None
    proc: Path = Path("/proc")
    time_wait: bool = True


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where the attributes of a sock_diag message lie. Most messages of a dump share a few
    layouts (one per socket state, say), so the layout found by walking one message's
    attributes is tried on the next: one struct call checks all its attribute headers
    (``shape`` reads what must equal ``expected``), one reads what a snapshot compares and,
    for the sockets published, one reads the rest."""

    length: int
    expected: tuple[int, ...]  # nlmsg_len, nlmsg_type, nlmsg_seq, each attribute's len and type
    shape: struct.Struct
    compare: struct.Struct  # the message's head (see DiagMessage) from the nlmsghdr
    values: struct.Struct  # the _SOCKID fields, then tcp_info, congestion, cgroup id if there
    tcp_info: slice | None  # where the _TCP_NAMES members lie in what ``values`` reads
    congestion: int | None  # the index of the congestion name's bytes (NUL-padded)
    cgroup_id: int | None
    flags: int  # of its _ROW (_HAS_CGROUP, _HAS_TCP)
    row: _RowSource = field(compare=False)
    # for the sensor's first snapshot, which keeps idle sockets without reading the rest: the
    # tcp_info members that tell (_IDLE_MEMBERS), and the cgroup id, if there
    activity: struct.Struct | None = field(compare=False)
    cgroup: struct.Struct | None = field(compare=False)


# A socket of a dump as a snapshot keeps it: its head (see DiagMessage), data, offset, end and
# the index of its layout in the dump's list (-1: none). A plain tuple costs a quarter of a
# DiagMessage to make, and the garbage collector stops tracking it at its first pass.
Message = tuple[tuple[int, ...], bytes | bytearray, int, int, int]


@dataclass(slots=True)
class DiagMessage:
    """One inet_diag_msg: what every snapshot compares (``head``), and where its message lies
    in ``data`` for ``details`` to read the rest of it (only for the sockets published: most
    are unchanged)."""

    family: int
    head: tuple[int, ...]  # state, cookie, rqueue, wqueue, uid, inode, then _COUNTERS if any
    data: bytes
    offset: int  # of its nlmsghdr
    end: int
    layout: _Layout | None  # None: irregular attributes, ``details`` walks them

    @property
    def state(self) -> int:
        return self.head[0]

    @property
    def cookie(self) -> int:
        return self.head[1]

    @property
    def inode(self) -> int:
        return self.head[5]

    @property
    def counters(self) -> tuple[int, ...]:
        """tcpi_segs_in, _segs_out, _total_retrans (in the order of _COUNTERS); () if none."""
        return self.head[6:]


@dataclass(slots=True)
class DiagDetails:
    """The rest of an inet_diag_msg: addresses, interface and the attributes."""

    sport: int
    dport: int
    src: str
    dst: str
    ifindex: int
    tcp_info: tuple[int, ...] | None = None  # the _TCP_NAMES members, in that order
    congestion: str | None = None
    cgroup_id: int | None = None


def dump_sockets(sock: socket.socket, family: int, protocol: int,
                 seq: int = 1) -> Iterator[DiagMessage]:
    """All sockets of ``family``/``protocol`` in the namespace of the netlink ``sock``."""
    layouts: list[_Layout] = []
    for head, data, offset, end, index in _dump(sock, family, protocol, seq, layouts):
        yield DiagMessage(family, head, data, offset, end, layouts[index] if index >= 0 else None)


def _dump(sock: socket.socket, family: int, protocol: int, seq: int,
          layouts: list[_Layout], states: int = SS_ALL) -> Iterator[Message]:
    """The sockets of a dump (see dump_sockets) in the ``states`` (a bit per TCP_STATES
    index); the layouts their Messages name are added to ``layouts``."""
    request = _INET_DIAG_REQ_V2.pack(family, protocol, EXTENSIONS, states)
    sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(request), SOCK_DIAG_BY_FAMILY,
                             NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + request)
    by_shape: dict[tuple[int, ...], int] = {}  # _Layout.expected -> index (-1: none)
    by_length: dict[int, int] = {}  # message length -> the index of the last layout that long
    last, last_index = None, -1  # the layout of the previous message that had one
    while True:
        data = sock.recv(1 << 20)
        offset, size = 0, len(data)
        while offset + _NLMSGHDR.size <= size:
            if last is not None and offset + last.length <= size \
                    and last.shape.unpack_from(data, offset) == last.expected:
                end = offset + last.length
                yield last.compare.unpack_from(data, offset), data, offset, end, last_index
                offset = (end + 3) & ~3
                continue
            start = offset
            length, msg_type, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size:
                return
            body, end = offset + _NLMSGHDR.size, offset + length
            offset = (end + 3) & ~3
            if msg_seq != seq:
                continue
            if msg_type == NLMSG_DONE:
                return
            if msg_type == NLMSG_ERROR:
                _check_error(data, body, min(end, size), "sock_diag dump")
                continue
            if msg_type == SOCK_DIAG_BY_FAMILY:
                if end > size or end - body < _INET_DIAG_MSG.size:
                    log.warning("skipped a truncated sock_diag message (%d bytes)", end - body)
                    continue
                index = by_length.get(length, -1)
                if index < 0 or layouts[index].shape.unpack_from(data, start) \
                        != layouts[index].expected:
                    index = _layout_index(data, start, end, family, layouts, by_shape)
                if index < 0:
                    yield _head(data, body, end), data, start, end, -1
                    continue
                by_length[length], last, last_index = index, layouts[index], index
                yield last.compare.unpack_from(data, start), data, start, end, index


def _check_error(data: bytes, body: int, end: int, what: str) -> None:
    """Raise the error of the NLMSG_ERROR message whose body is ``data[body:end]`` (a code of 0
    is an acknowledgement, not an error)."""
    if body + 4 > end:
        raise OSError(errno.EPROTO, f"{what}: truncated NLMSG_ERROR reply")
    code = -struct.unpack_from("=i", data, body)[0]
    if code:
        raise OSError(code, f"{what}: {errno.errorcode.get(code, 'unknown error')}")


def dump_links(sock: socket.socket, seq: int = 1) -> Iterator[Any]:
    """The interfaces of the namespace of the NETLINK_ROUTE ``sock`` (an RTM_GETLINK dump), as
    pyroute2's decoded ``ifinfmsg`` messages (what its ``IPRoute.get_links`` gives, without an
    IPRoute: that class brings an asyncio loop per use and 80 more modules)."""
    request = ifinfmsg()
    request["header"].update(type=rtnl.RTM_GETLINK, flags=NLM_F_REQUEST | NLM_F_DUMP,
                             sequence_number=seq)
    request.encode()
    sock.send(request.data)
    while True:
        data = sock.recv(1 << 20)
        offset, size = 0, len(data)
        while offset + _NLMSGHDR.size <= size:
            length, msg_type, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size or offset + length > size:
                raise OSError(errno.EPROTO, "RTM_GETLINK dump: truncated message")
            start, offset = offset, (offset + length + 3) & ~3
            if msg_seq != seq:
                continue
            if msg_type == NLMSG_DONE:
                return
            if msg_type == NLMSG_ERROR:
                _check_error(data, start + _NLMSGHDR.size, start + length, "RTM_GETLINK dump")
            elif msg_type == rtnl.RTM_NEWLINK:
                message = ifinfmsg(data, offset=start, length=length)
                message.decode()
                yield message


def _head(data: bytes, body: int, end: int) -> tuple[int, ...]:
    """DiagMessage.head of the message whose inet_diag_msg starts at ``body``, by a walk."""
    head = _DIAG_HEAD.unpack_from(data, body)
    at = _find_attr(data, body + _INET_DIAG_MSG.size, end, INET_DIAG_INFO)
    if not at:
        return head
    info = data[at + _RTATTR.size:at + _RTATTR.unpack_from(data, at)[0]]
    return head + _COUNTERS.unpack(info[:_COUNTERS.size].ljust(_COUNTERS.size, b"\0"))


def _layout_index(data: bytes, offset: int, end: int, family: int, layouts: list[_Layout],
                  by_shape: dict[tuple[int, ...], int]) -> int:
    """The index in ``layouts`` of the layout of the message ``data[offset:end]`` (from its
    nlmsghdr), added if new; -1 if it has none (see _layout) or too many are known."""
    attrs = list(_attrs(data, offset + _NLMSGHDR.size + _INET_DIAG_MSG.size, end))
    length, msg_type, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
    expected = (length, msg_type, seq, *(part for kind, _, attr_len in attrs
                                         for part in (attr_len, kind)))
    index = by_shape.get(expected)
    if index is None and len(by_shape) < LAYOUTS_REMEMBERED:
        layout = _layout(data, offset, end, family, attrs, expected)
        index = by_shape[expected] = len(layouts) if layout is not None else -1
        if layout is not None:
            layouts.append(layout)
    return -1 if index is None else index


def _layout(data: bytes, offset: int, end: int, family: int, attrs: list[tuple[int, int, int]],
            expected: tuple[int, ...]) -> _Layout | None:
    """The layout of the message ``data[offset:end]`` with attributes ``attrs``; None if their
    walk stops before the end (a malformed one), if tcp_info, congestion or cgroup id come
    twice, if tcp_info is shorter than _TCP_INFO or if the family is not AF_INET(6)."""
    first = offset + _NLMSGHDR.size + _INET_DIAG_MSG.size
    stop = (attrs[-1][1] + attrs[-1][2] + 3) & ~3 if attrs else first
    kinds = [kind for kind, _, _ in attrs
             if kind in (INET_DIAG_INFO, INET_DIAG_CONG, INET_DIAG_CGROUP_ID)]
    if end - stop >= _RTATTR.size or len(set(kinds)) < len(kinds) or family not in _SOCKID:
        return None
    shape = [(0, "IH2xI")]  # nlmsg_len, nlmsg_type, nlmsg_seq
    compare = [(_NLMSGHDR.size, _DIAG_HEAD.format[1:])]
    values = [(_NLMSGHDR.size + 4, _SOCKID[family])]
    count = 7  # values read: the _SOCKID fields
    tcp_info = congestion = cgroup_id = None
    tcp_at = congestion_at = cgroup_at = None  # payload positions, for the _ROW
    for kind, at, attr_len in attrs:
        shape.append((at - offset, "HH"))
        payload, size = at - offset + _RTATTR.size, attr_len - _RTATTR.size
        if kind == INET_DIAG_INFO:
            if size < _TCP_INFO.size:
                return None
            compare.append((payload, _COUNTERS.format[1:]))
            values.append((payload, _TCP_INFO.format[1:]))
            tcp_info, tcp_at = slice(count, count + len(_TCP_NAMES)), payload
            count += len(_TCP_NAMES)
        elif kind == INET_DIAG_CONG:
            values.append((payload, f"{size}s"))
            congestion, count, congestion_at = count, count + 1, (payload, size)
        elif kind == INET_DIAG_CGROUP_ID and size >= _U64.size:
            values.append((payload, "Q"))
            cgroup_id, count, cgroup_at = count, count + 1, payload
    return _Layout(expected[0], expected, _struct_at(shape), _struct_at(compare),
                   _struct_at(values), tcp_info, congestion, cgroup_id,
                   (_HAS_CGROUP if cgroup_at is not None else 0)
                   | (_HAS_TCP if tcp_at is not None else 0),
                   _RowSource.of(tcp_at, congestion_at, cgroup_at),
                   None if tcp_at is None else _struct_at(
                       [(tcp_at + at, "I") for at in sorted(_TCP_OFFSETS[name]
                                                            for name in _IDLE_MEMBERS)]),
                   None if cgroup_at is None else _struct_at([(cgroup_at, "Q")]))


@dataclass(frozen=True)
class _RowSource:
    """Where the bytes of the _ROW of a message of a layout lie in the message (from its
    nlmsghdr), as (row position, message position, size) spans; the other bytes of the row
    are zero, or the netns, pid, kind and flags that _KeptSockets sets."""

    spans: tuple[tuple[int, int, int], ...]

    @classmethod
    def of(cls, tcp_info: int | None, congestion: tuple[int, int] | None,
           cgroup_id: int | None) -> _RowSource:
        """``tcp_info``, ``cgroup_id``: where their payloads lie; ``congestion``: where its
        payload lies, and its size (the row cuts or NUL-pads it)."""
        spans = [(_ROW_DIAG, _NLMSGHDR.size, _INET_DIAG_MSG.size)]
        if cgroup_id is not None:
            spans.append((_ROW_CGROUP, cgroup_id, _U64.size))
        if congestion is not None:
            spans.append((_ROW_CONGESTION, congestion[0],
                          min(congestion[1], _ROW_CONGESTION_SIZE)))
        if tcp_info is not None:
            row_at = _ROW_TCP
            for offset, size in _TCP_MEMBER_SPANS:
                spans.append((row_at, tcp_info + offset, size))
                row_at += size
        merged: list[tuple[int, int, int]] = []
        for row_at, at, size in spans:  # spans that follow each other in both become one
            if merged and merged[-1][0] + merged[-1][2] == row_at \
                    and merged[-1][1] + merged[-1][2] == at:
                merged[-1] = (merged[-1][0], merged[-1][1], merged[-1][2] + size)
            else:
                merged.append((row_at, at, size))
        return cls(tuple(merged))


def _attrs(data: bytes, offset: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, offset, length) of each attribute in ``data[offset:end]``, up to a malformed one."""
    while offset + _RTATTR.size <= end:
        attr_len, attr_type = _RTATTR.unpack_from(data, offset)
        if attr_len < _RTATTR.size or offset + attr_len > end:
            return
        yield attr_type, offset, attr_len
        offset += (attr_len + 3) & ~3


def _find_attr(data: bytes, offset: int, end: int, wanted: int) -> int:
    """The offset of the first attribute of type ``wanted`` in ``data[offset:end]``, else 0."""
    return next((at for kind, at, _ in _attrs(data, offset, end) if kind == wanted), 0)


@functools.lru_cache(maxsize=64)
def _congestion(name: bytes) -> str:
    return name.split(b"\0", 1)[0].decode("ascii", "replace")


_ADDRESSES: dict[bytes, str] = {}  # packed -> text (the two families differ in length)


def _address(family: int, packed: bytes) -> str:
    """inet_ntop, remembered: most sockets share a few local addresses."""
    text = _ADDRESSES.get(packed)
    if text is None:
        if len(_ADDRESSES) >= ADDRESSES_REMEMBERED:
            _ADDRESSES.clear()
        text = _ADDRESSES[packed] = socket.inet_ntop(family, packed)
    return text


def details(msg: DiagMessage) -> DiagDetails:
    """Addresses, ports, interface and attributes of ``msg``."""
    return DiagDetails(*_fields(msg.family, msg.data, msg.offset, msg.end, msg.layout))


def _fields(family: int, data: bytes, offset: int, end: int,
            layout: _Layout | None) -> tuple[Any, ...]:
    """The DiagDetails fields of a message, in their order (a snapshot needs no object)."""
    if layout is None:
        walked = _walk(family, data, offset, end)
        return tuple(getattr(walked, name) for name in DiagDetails.__slots__)
    values = layout.values.unpack_from(data, offset)
    sport_high, sport_low, dport_high, dport_low, src, dst, ifindex = values[:7]
    return (sport_high << 8 | sport_low, dport_high << 8 | dport_low,
            _ADDRESSES.get(src) or _address(family, src),
            _ADDRESSES.get(dst) or _address(family, dst), ifindex,
            values[layout.tcp_info] if layout.tcp_info is not None else None,
            _congestion(values[layout.congestion]) if layout.congestion is not None else None,
            values[layout.cgroup_id] if layout.cgroup_id is not None else None)


def _endpoints(family: int, sport: int, dport: int, src: bytes, dst: bytes
               ) -> tuple[int, int, str, str]:
    """Ports and address texts of an inet_diag_msg's id (network byte order, 16-byte fields)."""
    size = 4 if family == socket.AF_INET else 16
    return (socket.ntohs(sport), socket.ntohs(dport), _address(family, src[:size]),
            _address(family, dst[:size]))


def _walk(family: int, data: bytes, offset: int, end: int) -> DiagDetails:
    """``details`` of the message ``data[offset:end]`` by walking its attributes one by one."""
    body = offset + _NLMSGHDR.size
    (_family, _state, _timer, _retrans, sport, dport, src, dst, ifindex, _cookie, _expires,
     _rqueue, _wqueue, _uid, _inode) = _INET_DIAG_MSG.unpack_from(data, body)
    out = DiagDetails(*_endpoints(family, sport, dport, src, dst), ifindex)
    for attr_type, at, attr_len in _attrs(data, body + _INET_DIAG_MSG.size, end):
        start, size = at + _RTATTR.size, attr_len - _RTATTR.size
        if attr_type == INET_DIAG_INFO:
            if size >= _TCP_INFO.size:
                out.tcp_info = _TCP_INFO.unpack_from(data, start)
            else:  # an older kernel's shorter tcp_info
                out.tcp_info = _TCP_INFO.unpack(data[start:start + size].ljust(_TCP_INFO.size,
                                                                               b"\0"))
        elif attr_type == INET_DIAG_CONG:
            out.congestion = _congestion(data[start:start + size])
        elif attr_type == INET_DIAG_CGROUP_ID and size >= _U64.size:
            out.cgroup_id = _U64.unpack_from(data, start)[0]
    return out


_PACING_UNLIMITED = U64_MAX >> 1  # pacing rates from here up are the kernel's "unlimited"
_UNKNOWN: Any = object()  # not looked up yet (None is an answer)


# The records a snapshot publishes are the ``vars`` of instances of these classes: CPython
# keeps the attributes an ``__init__`` sets in one array, with a key table shared by all
# instances, and makes them a dict without copying; that takes half the time of any other way of
# making a dict of 20 fields (a dict display, ``dict(zip())``, a copy), about 1.2 us each. For
# the 6 fields of a NetlinkEvent, a dict display takes half the time of such an instance.


class _TcpRecord:
    """A SocketTcpInfo record (its ``vars``) of an unpacked ``_TCP_INFO`` (the members in
    ``_TCP_NAMES`` order, which a test checks) and a congestion name. Unpacked to the
    attributes, with the rates' special cases made on them, it takes 1.4 us where 23 arguments
    to a dataclass, then the cases made on its dict, took 2.0 us."""

    def __init__(self, info: tuple[int, ...], congestion: str | None) -> None:
        (self.retransmits_current, self.snd_mss, self.unacked, self.lost,
         self.last_data_sent_ms, self.last_data_recv_ms, self.rtt_us, self.rttvar_us,
         self.snd_cwnd, self.retransmits, self.pacing_rate, self.bytes_acked,
         self.bytes_received, self.segs_out, self.segs_in, self.min_rtt_us, self.data_segs_in,
         self.data_segs_out, self.delivery_rate, self.busy_time_us, self.bytes_sent,
         self.bytes_retrans) = info
        self.congestion = congestion
        if self.pacing_rate >= _PACING_UNLIMITED:
            self.pacing_rate = None
        if not self.delivery_rate:
            self.delivery_rate = None


@dataclass
class _SocketRecord:
    """A SocketSnapshot record (its ``vars``)."""

    cookie: int
    transport: str
    family: str
    state: str
    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int
    bound_ifindex: int | None
    uid: int
    inode: int
    rqueue: int
    wqueue: int
    cgroup_id: int | None
    pid: int | None
    process: dict[str, Any] | None
    container_id: str | None
    tcp: dict[str, Any] | None


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """``items`` in lists of ``size`` (the last one shorter)."""
    items = iter(items)
    while batch := list(itertools.islice(items, size)):
        yield batch


@dataclass
class _Dump:
    """One dump of a namespace (a transport and family), and the layouts of its messages."""

    kind: int  # its index in DUMPS
    transport: str
    family_name: str
    family: int
    layouts: list[_Layout]


class _Waiting:
    """The messages of a snapshot set aside until the end of its dumps (see
    NetlinkSensor._events), copied one after the other into one buffer: a bytes object and a
    head tuple each cost about 800 bytes of small objects per socket, and the tens of thousands
    of sockets opened during a snapshot made the heap grow for good."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.ends = array("Q")  # where each message ends in ``data``
        self.cookies = array("Q")
        self.inodes = array("Q")
        self.indexes = array("b")  # of their layouts in their dumps (-1: none)
        self.namespaces: list[Namespace] = []
        self.dumps: list[_Dump] = []

    def add(self, namespace: Namespace, dump: _Dump, message: Message) -> None:
        head, data, offset, end, index = message
        self.data += memoryview(data)[offset:end]
        self.ends.append(len(self.data))
        self.cookies.append(head[1])
        self.inodes.append(head[5])
        self.indexes.append(index)
        self.namespaces.append(namespace)
        self.dumps.append(dump)

    def messages(self) -> Iterator[tuple[Namespace, _Dump, Message]]:
        """The messages set aside, in their order, with their namespaces and dumps (their data
        is the buffer itself: no more are added once they are read)."""
        data, start = self.data, 0
        for end, index, namespace, dump in zip(self.ends, self.indexes, self.namespaces,
                                               self.dumps, strict=True):
            head = dump.layouts[index].compare.unpack_from(data, start) if index >= 0 \
                else _head(data, start + _NLMSGHDR.size, end)
            yield namespace, dump, (head, data, start, end, index)
            start = end


@dataclass
class _Snapshot:
    """State shared by the per-socket conversions of one snapshot."""

    now_ms: int
    every: int  # idle sockets are republished every ``every`` snapshots
    owners: Owners
    idle_ms: int | None = None  # the sensor's first snapshot: idle sockets wait for their turn
    processes: dict[int, dict[str, Any] | None] = field(default_factory=dict)
    containers: dict[int, ContainerRef | None] = field(default_factory=dict)


# What a snapshot keeps of a published socket until it is gone, to rebuild its record for its
# SOCKET_CLOSED: a fixed-size row (see _KeptSockets), with the socket's process and container id
# (shared): its network namespace inode, pid (-1: none), DUMPS index, flags (_HAS_CGROUP,
# _HAS_TCP), the inet_diag_msg, cgroup id, congestion and the _TCP_NAMES members of tcp_info
# (zeros without).
_ROW = struct.Struct("=IiBB72sQ16s" + "".join(fmt for name, fmt in _TCP_LAYOUT if name))
_ROW_FIELDS = 7
_ROW_NETNS = struct.Struct("=I")  # the first field of a row
_ROW_INODE = struct.Struct(f"={_ROW_NETNS.size + 6 + _INET_DIAG_MSG.size - 4}xI")  # diag's last
# where a row's fields lie: netns and pid (_ROW_HEAD), kind, flags, diag, cgroup id, congestion,
# then the tcp_info members
_ROW_HEAD = np.dtype([("netns", "=u4"), ("pid", "=i4")])
_ROW_KIND, _ROW_FLAGS, _ROW_DIAG = 8, 9, 10
_ROW_CGROUP = _ROW_DIAG + _INET_DIAG_MSG.size
_ROW_CONGESTION, _ROW_CONGESTION_SIZE = _ROW_CGROUP + _U64.size, 16
_ROW_TCP = _ROW_CONGESTION + _ROW_CONGESTION_SIZE
_NO_TCP = (0,) * len(_TCP_NAMES)
_HAS_CGROUP = 1
_HAS_TCP = 2
Kept = tuple[tuple[Any, ...], dict[str, Any] | None, str | None]  # row fields, process, container id
LOOKUP_BATCH = 1024  # sockets of a dump looked up among the kept ones at once
# dump buffers (32 KiB each) that rows waiting to be copied may keep: in a snapshot that
# republishes one idle socket in 12, LOOKUP_BATCH rows came from about 150 of them (5 MiB)
COPY_BUFFERS = 16
SLOTS_ADDED = 1024  # slots for kept sockets added at once (mapped apart: no copy, no slack)


def _signature(head: tuple[int, ...], pid: int | None) -> int:
    """What tells that a socket changed: its head (see DiagMessage) and owner (unsigned: see
    _Copies)."""
    return hash((head, pid)) & U64_MAX


def _idle(state: int, layout: _Layout, message: Message, idle_ms: int) -> bool:
    """Whether a TCP socket of ``layout`` is idle: in TIME_WAIT, or ESTABLISHED with no data
    sent or received for ``idle_ms``."""
    if state == TIME_WAIT:
        return True
    return state == ESTABLISHED and layout.activity is not None \
        and min(layout.activity.unpack_from(message[1], message[2])) >= idle_ms


def _row(netns: int, pid: int | None, dump: _Dump, message: Message) -> tuple[Any, ...]:
    """The fields of the _ROW of a message, from a walk of its attributes (_KeptSockets.copy
    takes a whole row at once from a message with a layout)."""
    _head, data, offset, end, _index = message
    tcp_info, congestion, cgroup_id = _fields(dump.family, data, offset, end, None)[5:]
    diag = data[offset + _NLMSGHDR.size:offset + _NLMSGHDR.size + _INET_DIAG_MSG.size]
    flags = (_HAS_CGROUP if cgroup_id is not None else 0) | (_HAS_TCP if tcp_info is not None
                                                             else 0)
    return (netns, -1 if pid is None else pid, dump.kind, flags, bytes(diag), cgroup_id or 0,
            (congestion or "").encode(), *(_NO_TCP if tcp_info is None else tcp_info))


def _kept_record(kept: Kept) -> tuple[int, dict[str, Any]]:
    """The network namespace inode and record of a kept socket."""
    values, process, container_id = kept
    netns, pid, kind, flags, diag, cgroup_id, congestion = values[:_ROW_FIELDS]
    family, _protocol, transport, family_name = DUMPS[kind]
    (_family, state, _timer, _retrans, sport, dport, src, dst, ifindex, cookie, _expires,
     rqueue, wqueue, uid, inode) = _INET_DIAG_MSG.unpack(diag)
    fields = (*_endpoints(family, sport, dport, src, dst), ifindex,
              values[_ROW_FIELDS:] if flags & _HAS_TCP else None,
              _congestion(congestion) or None, cgroup_id if flags & _HAS_CGROUP else None)
    return netns, _record(transport, family_name, (state, cookie, rqueue, wqueue, uid, inode),
                          fields, None if pid < 0 else pid, process, container_id)


def _record(transport: str, family_name: str, head: tuple[int, ...], fields: tuple[Any, ...],
            pid: int | None, process: dict[str, Any] | None,
            container_id: str | None) -> dict[str, Any]:
    """The SocketSnapshot record of a socket (``head``: DiagMessage.head, ``fields``:
    ``_fields``)."""
    sport, dport, src, dst, ifindex, tcp_info, congestion, cgroup_id = fields
    sock_state, cookie, rqueue, wqueue, uid, inode = head[:6]
    if transport == "udp":
        state_name = "ESTABLISHED" if sock_state == 1 else "CLOSE"
    else:
        state_name = TCP_STATES[sock_state] if sock_state < len(TCP_STATES) else "UNKNOWN"
    return vars(_SocketRecord(
        cookie, transport, family_name, state_name, src, sport, dst, dport, ifindex or None, uid,
        inode, rqueue, wqueue, cgroup_id, pid, process, container_id,
        vars(_TcpRecord(tcp_info, congestion)) if tcp_info is not None and transport == "tcp"
        else None))


@dataclass
class _Copies:
    """Rows to copy from messages of one buffer and layout (see _KeptSockets.copy)."""

    data: bytes | bytearray
    layout: _Layout
    kind: int  # the DUMPS index of the layout's dump
    netns: int
    slots: array[int] = field(default_factory=lambda: array("I"))
    # unsigned arrays: an array of signed integers parses each value appended as a format does
    offsets: array[int] = field(default_factory=lambda: array("Q"))  # of their nlmsghdrs
    pids: array[int] = field(default_factory=lambda: array("I"))  # 0: none


def _whole_messages(copies: _Copies) -> np.ndarray:
    """The messages of ``copies`` whole, one row each (most follow each other: a view reads
    them all)."""
    length = copies.layout.length
    stride = (length + 3) & ~3
    offsets = np.frombuffer(copies.offsets, np.int64)
    if (np.diff(offsets) == stride).all():
        return np.ndarray((len(offsets), length), np.uint8, copies.data, offsets[0],
                          (stride, 1))
    return np.frombuffer(copies.data, np.uint8)[offsets[:, None] + np.arange(length)]


class _KeptSockets:
    """What the snapshots keep of the sockets they published, until they are gone, without a
    Python object per socket: 100,000 sockets kept as a row bytes object, a tuple and a dict
    entry with its key cost 41 MiB, and those long-lived small objects, made among each
    snapshot's short-lived ones, kept much more of the heap from going back to the system.

    A socket has a slot: its row at ``slot * _ROW.size`` in ``rows``, its signature (see
    _signature), process and container id at ``slot`` in ``signatures``, ``processes`` and
    ``containers``. The cookies of the kept sockets are a sorted array beside their slots,
    looked up a batch at a time (``find``). A snapshot marks the slots it saw (``seen``), and
    ``end`` frees those of the sockets gone and adds the new ones to the index.

    The row of a message with a layout is copied from it with those of the messages stored
    after it (``copy``): one numpy gather of the bytes of a batch of rows costs a fraction of
    unpacking and packing each.
    """

    def __init__(self) -> None:
        self.rows = bytearray()
        self.signatures = array("Q")
        self.processes: list[dict[str, Any] | None] = []
        self.containers: list[str | None] = []
        self.seen = bytearray()
        self._free = array("I")
        self._cookies = np.zeros(0, np.uint64)
        self._slots = np.zeros(0, np.uint32)
        self._added_cookies = array("Q")
        self._added_slots = array("I")
        # (buffer id, layout id, netns) -> its rows to copy; the last one used
        self._copies: dict[tuple[int, int, int], _Copies] = {}
        self._last: _Copies | None = None
        self._copying = 0  # rows in _copies

    def __len__(self) -> int:
        return len(self._cookies)

    def begin(self) -> None:
        """A new snapshot: no slot seen yet."""
        self.seen = bytearray(len(self.signatures))

    def find(self, cookies: list[int]) -> list[int]:
        """The slot of each of ``cookies`` (-1: not kept)."""
        if not len(self._cookies):
            return [-1] * len(cookies)
        wanted = np.array(cookies, np.uint64)
        at = np.minimum(np.searchsorted(self._cookies, wanted), len(self._cookies) - 1)
        return np.where(self._cookies[at] == wanted, self._slots[at].astype(np.int64),
                        -1).tolist()

    def store(self, cookie: int, slot: int, signature: int, process: dict[str, Any] | None,
              container_id: str | None) -> int:
        """Keep ``cookie`` in ``slot`` (-1: a new socket, given a free slot), which is returned;
        its row is to be given next (``write`` or ``copy``)."""
        if slot >= 0 and self.seen[slot]:
            self.flush()  # dumped twice in one snapshot: its first row is not to be copied last
        if slot < 0:
            if not self._free:
                self._grow()
            slot = self._free.pop()
            self._added_cookies.append(cookie)
            self._added_slots.append(slot)
        self.processes[slot], self.containers[slot] = process, container_id
        self.signatures[slot] = signature
        self.seen[slot] = 1
        return slot

    def write(self, slot: int, row: tuple[Any, ...]) -> None:
        """The row of ``slot`` from its fields."""
        self.flush()
        _ROW.pack_into(self.rows, slot * _ROW.size, *row)

    def copy(self, slot: int, netns: int, pid: int | None, kind: int, data: bytes | bytearray,
             offset: int, layout: _Layout) -> None:
        """The row of ``slot`` from the message ``data[offset:]`` of ``layout``, of the dump
        ``kind``, owned by ``pid``; copied at the latest when one of the rows is read, or
        LOOKUP_BATCH rows wait, or they keep COPY_BUFFERS of the dump's buffers (``flush``)."""
        copies = self._last
        if copies is None or copies.data is not data or copies.layout is not layout \
                or copies.netns != netns:
            key = (id(data), id(layout), netns)
            copies = self._copies.get(key)
            if copies is None:
                copies = self._copies[key] = _Copies(data, layout, kind, netns)
            self._last = copies
        copies.slots.append(slot)
        copies.offsets.append(offset)
        copies.pids.append(pid or 0)
        self._copying += 1
        if self._copying >= LOOKUP_BATCH or len(self._copies) >= COPY_BUFFERS:
            self.flush()

    def flush(self) -> None:
        """Copy the rows that wait (see ``copy``). A dump's buffers hold about 32 KiB (80
        messages of 400 bytes), so the messages of a layout, namespace and dump are first gathered
        whole into one array, with a numpy call or two per buffer, and their rows' spans copied
        from it: copying the spans buffer by buffer took 1.7 us per row."""
        if not self._copies:
            return
        groups: dict[tuple[int, int, int], list[_Copies]] = {}
        for copies in self._copies.values():
            groups.setdefault((id(copies.layout), copies.netns, copies.kind), []).append(copies)
        rows = np.frombuffer(self.rows, np.uint8).reshape(-1, _ROW.size)
        for group in groups.values():
            first = group[0]
            layout = first.layout
            messages = np.concatenate([_whole_messages(copies) for copies in group])
            block = np.zeros((len(messages), _ROW.size), np.uint8)
            for row_at, at, size in layout.row.spans:
                block[:, row_at:row_at + size] = messages[:, at:at + size]
            head = np.empty(len(messages), _ROW_HEAD)
            pids = np.concatenate([np.frombuffer(copies.pids, np.int32) for copies in group])
            head["netns"], head["pid"] = first.netns, np.where(pids == 0, -1, pids)
            block[:, :_ROW_HEAD.itemsize] = head.view(np.uint8).reshape(-1, _ROW_HEAD.itemsize)
            block[:, _ROW_KIND], block[:, _ROW_FLAGS] = first.kind, layout.flags
            rows[np.concatenate([np.frombuffer(copies.slots, np.uint32)
                                 for copies in group])] = block
        del rows  # the buffer of ``self.rows`` is released: it may grow again
        self._copies, self._last, self._copying = {}, None, 0

    def _grow(self) -> None:
        """SLOTS_ADDED more free slots (the lowest given first)."""
        start, count = len(self.signatures), SLOTS_ADDED
        self.rows += bytes(count * _ROW.size)
        self.signatures.frombytes(bytes(count * self.signatures.itemsize))
        self.processes += [None] * count
        self.containers += [None] * count
        self.seen += bytes(count)
        self._free.extend(range(start + count - 1, start - 1, -1))

    def unseen(self, waiting: np.ndarray | None = None) -> list[tuple[int, int]]:
        """(cookie, slot) of the kept sockets the snapshot has not seen (yet), but for the
        cookies ``waiting`` (set aside, to be seen at the end of the snapshot)."""
        missing = np.frombuffer(bytes(self.seen), np.uint8)[self._slots] == 0
        if waiting is not None and len(waiting):
            missing &= np.isin(self._cookies, waiting, invert=True)
        return list(zip(self._cookies[missing].tolist(), self._slots[missing].tolist(),
                        strict=True))

    def netns(self, slot: int) -> int:
        self.flush()
        return _ROW_NETNS.unpack_from(self.rows, slot * _ROW.size)[0]

    def inode(self, slot: int) -> int:
        self.flush()
        return _ROW_INODE.unpack_from(self.rows, slot * _ROW.size)[0]

    def kept(self, slot: int) -> Kept:
        self.flush()
        return (_ROW.unpack_from(self.rows, slot * _ROW.size), self.processes[slot],
                self.containers[slot])

    def end(self, gone: list[int]) -> None:
        """The snapshot is over: the ``gone`` slots are freed, the new sockets indexed."""
        self.flush()
        for slot in gone:
            self.processes[slot] = self.containers[slot] = None
        self._free.extend(gone)
        cookies, slots = self._cookies, self._slots
        if gone:
            keep = np.isin(slots, np.array(gone, np.uint32), invert=True)
            cookies, slots = cookies[keep], slots[keep]
        if self._added_cookies:
            cookies = np.concatenate((cookies, np.frombuffer(self._added_cookies, np.uint64)))
            slots = np.concatenate((slots, np.frombuffer(self._added_slots, np.uint32)))
            order = np.argsort(cookies, kind="stable")
            cookies, slots = cookies[order], slots[order]
            twice = np.flatnonzero(cookies[1:] == cookies[:-1])  # seen twice in one snapshot
            if len(twice):
                self._free.extend(slots[twice].tolist())
                cookies, slots = np.delete(cookies, twice), np.delete(slots, twice)
        self._cookies, self._slots = cookies, slots
        self._added_cookies, self._added_slots = array("Q"), array("I")


class NetlinkSensor:
    """Takes snapshots and remembers the previous one to report closed sockets.

    A socket is published when it first appears, whenever its state, queues or segment
    counters change, and otherwise every ``unchanged_every`` snapshots (1: always), so idle
    sockets cost little; idle sockets take turns by cookie, so that no snapshot republishes
    them all at once. A socket gone since the previous snapshot is published as SOCKET_CLOSED
    with its last values.
    """

    def __init__(self, options: NetlinkOptions) -> None:
        self.options = options
        held = privileges.effective()
        self.enter_namespaces = options.other_namespaces and not privileges.missing(
            ["CAP_SYS_ADMIN"], held)
        self.limitations: list[str] = []
        self._kept = _KeptSockets()
        self._count = 0
        self._containers_seen: set[str] = set()
        self._owners = SocketOwners(options.proc)
        self._warned: set[str] = set()
        needed = ["CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"]
        if options.other_namespaces:
            needed.insert(0, "CAP_SYS_ADMIN")
        for name in privileges.missing(needed, held):
            self._warn_once(f"Netlink sensor (uid {os.getuid()}) "
                            f"{privileges.limitation(name)}")

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            self.limitations.append(message)
            log.warning("%s", message)

    def snapshot(self) -> list[tuple[str, dict[str, Any]]]:
        """One snapshot of sockets and interfaces: the (key, NetlinkEvent) pairs to publish."""
        return list(self.events())

    def events(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """The (key, NetlinkEvent) pairs of one snapshot, each made as it is asked for: a first
        snapshot of 100,000 sockets would otherwise hold all their records at once.

        The garbage collector waits until the end: while a snapshot allocates, it would
        otherwise run hundreds of times over its objects and, every few snapshots, over all
        the records kept (about 0.3 s for 100,000 sockets each time). One collection of the
        youngest generation at the end takes what the snapshot left."""
        enabled = gc.isenabled()
        gc.disable()
        try:
            yield from self._events()
        finally:
            if enabled:
                gc.enable()
                gc.collect(0)

    def _events(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Sockets are published as they are read, with the owners /proc gave before the dump.
        A socket whose owner that read did not know (opened since, or on a descriptor number
        reused since) waits for the end of the dump: once the closed sockets are known, /proc
        is read again for it (see SocketOwners). The waiting sockets are nearly all of them in
        a burst of new connections: they are kept as arrays and looked up a batch at a time
        like the others (sets and lists of their cookies and inodes as ints took 15 MB of small
        objects while the snapshot ran, and the Python heap kept that room afterwards)."""
        options = self.options
        now_ms = round(time.time() * 1000)
        namespaces = discover_namespaces(options.proc, self.enter_namespaces)
        self._count += 1
        state = _Snapshot(now_ms, max(1, options.unchanged_every), self._owners.read(),
                          round(options.interval_s * 1000) if self._count == 1 else None)
        kept = self._kept
        kept.begin()
        host = options.host_name
        waiting = _Waiting()
        dumped: set[int] = set()
        links: list[tuple[Namespace, dict[str, Any]]] = []
        gone: list[tuple[int, int, int]] = []  # cookie, netns inode, slot
        alive = array("Q")  # the inodes of the sockets dumped
        ownerless = self._owners.ownerless
        try:
            for namespace in namespaces.values():
                try:
                    for batch in _batches(self._messages(namespace), LOOKUP_BATCH):
                        inodes = [message[0][5] for _, message in batch]
                        alive.extend(inodes)
                        slots = kept.find([message[0][1] for _, message in batch])
                        for (dump, message), slot, inode, pid in zip(
                                batch, slots, inodes, state.owners.pids(inodes), strict=True):
                            if inode and pid < 0 and not ownerless(inode):
                                waiting.add(namespace, dump, message)
                            elif event := self._socket(dump, message, namespace, state, slot,
                                                       pid):
                                yield event
                    dumped.add(namespace.inode)
                    if options.interfaces:
                        links += [(namespace, link) for link in self._links(namespace)]
                except OSError as error:
                    self._namespace_error(namespace, error)
            for cookie, slot in kept.unseen(np.frombuffer(waiting.cookies, np.uint64)):
                netns = kept.netns(slot)
                if netns in dumped or netns not in namespaces:
                    gone.append((cookie, netns, slot))
                else:  # its namespace could not be read this time
                    kept.seen[slot] = 1
            self._owners.closed(kept.inode(slot) for _, _, slot in gone)
            if waiting.cookies:
                state.owners = self._owners.complete(np.frombuffer(waiting.inodes, np.uint64),
                                                     np.frombuffer(alive, np.uint64))
                for batch in _batches(waiting.messages(), LOOKUP_BATCH):
                    slots = kept.find([message[0][1] for _, _, message in batch])
                    pids = state.owners.pids([message[0][5] for _, _, message in batch])
                    for (namespace, dump, message), slot, pid in zip(batch, slots, pids,
                                                                     strict=True):
                        if event := self._socket(dump, message, namespace, state, slot, pid):
                            yield event
            for cookie, netns, slot in gone:
                yield f"{host}:{cookie}", self._event("SOCKET_CLOSED", now_ms, netns,
                                                      _kept_record(kept.kept(slot))[1], None)
        finally:
            kept.end([slot for _, _, slot in gone])
        for namespace, link in _pair_veths(links):
            name = link["name"] if namespace.host else f"{namespace.label}/{link['name']}"
            yield f"{host}:if:{name}", self._event("INTERFACE", now_ms, namespace.inode, None,
                                                   link)

    def _socket(self, dump: _Dump, message: Message, namespace: Namespace, state: _Snapshot,
                slot: int, owner: int) -> tuple[str, dict[str, Any]] | None:
        """The SOCKET event of ``message`` if it is to be published (new, changed, or its
        turn among the idle ones); keeps what is kept of it in its ``slot`` (-1: new).
        ``owner``: the pid holding it (-1: none).

        On the sensor's first snapshot an idle socket (see _idle) waits for its turn too: it
        is kept (its process and container looked up, the rest of the message not read), and
        published within ``unchanged_every`` snapshots, at once if it changes. A start on a
        host with many idle connections so costs about what a later snapshot does, and does
        not send them all at once."""
        head, data, offset, _end, index = message
        cookie = head[1]
        pid = owner if owner >= 0 else None
        signature = _signature(head, pid)
        kept = self._kept
        turn = not (self._count + cookie) % state.every
        if slot >= 0 and kept.signatures[slot] == signature and not turn:
            kept.seen[slot] = 1
            return None
        layout = dump.layouts[index] if index >= 0 else None
        if not turn and state.idle_ms is not None and layout is not None \
                and _idle(head[0], layout, message, state.idle_ms):
            cgroup_id = layout.cgroup.unpack_from(data, offset)[0] if layout.cgroup else None
            self._keep(dump, message, namespace, slot, signature, pid,
                       *self._owner(pid, cgroup_id, namespace, state))
            return None
        record, process, container_id = self._socket_record(dump, message, namespace, state,
                                                            pid)
        self._keep(dump, message, namespace, slot, signature, pid, process, container_id)
        return f"{self.options.host_name}:{cookie}", self._event(
            "SOCKET", state.now_ms, namespace.inode, record, None)

    def _keep(self, dump: _Dump, message: Message, namespace: Namespace, slot: int,
              signature: int, pid: int | None, process: dict[str, Any] | None,
              container_id: str | None) -> None:
        """Keep what is kept of a socket in its ``slot`` (-1: new)."""
        kept = self._kept
        slot = kept.store(message[0][1], slot, signature, process, container_id)
        index = message[4]
        if index >= 0:
            kept.copy(slot, namespace.inode, pid, dump.kind, message[1], message[2],
                      dump.layouts[index])
        else:
            kept.write(slot, _row(namespace.inode, pid, dump, message))

    def _namespace_error(self, namespace: Namespace, error: OSError) -> None:
        if namespace.host:
            raise error
        if namespace.pids and not any(os.path.exists(f"{self.options.proc}/{pid}")
                                      for pid in namespace.pids):
            log.debug("network namespace %d vanished during the snapshot", namespace.inode)
        else:
            self._warn_once(f"cannot enter network namespace {namespace.path}: {error}")

    def _event(self, kind: str, now_ms: int, inode: int, sock: dict[str, Any] | None,
               interface: dict[str, Any] | None) -> dict[str, Any]:
        return {"kind": kind, "timestamp_ms": now_ms, "host_name": self.options.host_name,
                "netns_inode": inode, "socket": sock, "interface": interface}

    def _open(self, namespace: Namespace, protocol: int) -> int:
        if namespace.host:
            return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                 protocol).detach()
        return socket_in(namespace.path, socket.AF_NETLINK, socket.SOCK_DGRAM,
                         protocol).detach()

    def _messages(self, namespace: Namespace) -> Iterator[tuple[_Dump, Message]]:
        """Every socket of ``namespace`` as it is read, with its dump (transport and family)."""
        states = SS_ALL if self.options.time_wait else SS_ALL & ~(1 << TIME_WAIT)
        with socket.socket(fileno=self._open(namespace, NETLINK_SOCK_DIAG)) as sock:
            sock.bind((0, 0))
            for kind, (family, protocol, transport, family_name) in enumerate(
                    DUMPS if self.options.udp else DUMPS[:2]):
                dump = _Dump(kind, transport, family_name, family, [])
                for message in _dump(sock, family, protocol, kind + 1, dump.layouts, states):
                    yield dump, message

    def _socket_record(self, dump: _Dump, message: Message, namespace: Namespace,
                       state: _Snapshot, pid: int | None
                       ) -> tuple[dict[str, Any], dict[str, Any] | None, str | None]:
        """The SocketSnapshot record of a message, its process and container id."""
        head, data, offset, end, index = message
        fields = _fields(dump.family, data, offset, end,
                         dump.layouts[index] if index >= 0 else None)
        process, container_id = self._owner(pid, fields[-1], namespace, state)
        return _record(dump.transport, dump.family_name, head, fields, pid, process,
                       container_id), process, container_id

    def _owner(self, pid: int | None, cgroup_id: int | None, namespace: Namespace,
               state: _Snapshot) -> tuple[dict[str, Any] | None, str | None]:
        """The process and container id of a socket held by ``pid`` in cgroup ``cgroup_id``."""
        if pid is None:
            process = None
        else:
            process = state.processes.get(pid, _UNKNOWN)
            if process is _UNKNOWN:
                process = state.processes[pid] = self.options.processes.lookup(pid)
        container_id = None
        if cgroup_id:
            ref = state.containers.get(cgroup_id, _UNKNOWN)
            if ref is _UNKNOWN:
                ref = state.containers[cgroup_id] = self.options.cgroups.container_of(cgroup_id)
            if ref is not None:
                container_id = ref.container_id
        container_id = container_id or (process or {}).get("container_id") \
            or namespace.container_id
        if container_id is not None and container_id not in self._containers_seen:
            if len(self._containers_seen) >= CONTAINERS_REMEMBERED:
                self._containers_seen.clear()  # container churn: resolving again is cheap
            self._containers_seen.add(container_id)
            if self.options.on_container is not None:
                self.options.on_container(container_id)
        return process, container_id

    def _links(self, namespace: Namespace) -> list[dict[str, Any]]:
        with socket.socket(fileno=self._open(namespace, NETLINK_ROUTE)) as sock:
            sock.bind((0, 0))
            return [_link_record(msg, namespace) for msg in dump_links(sock)]


def _link_record(msg: Any, namespace: Namespace) -> dict[str, Any]:
    stats = msg.get_attr("IFLA_STATS64") or msg.get_attr("IFLA_STATS") or {}
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    return {
        "name": msg.get_attr("IFLA_IFNAME"),
        "ifindex": msg["index"],
        "kind": kind,
        "operstate": msg.get_attr("IFLA_OPERSTATE"),
        "mtu": msg.get_attr("IFLA_MTU"),
        "mac": msg.get_attr("IFLA_ADDRESS"),
        "host_namespace": namespace.host,
        "container_id": namespace.container_id,
        "peer_ifindex": msg.get_attr("IFLA_LINK") if kind == "veth" else None,
        "peer_name": None,
        "peer_netns_inode": None,
        **{name: stats.get(name, 0) for name in (
            "rx_bytes", "tx_bytes", "rx_packets", "tx_packets", "rx_errors", "tx_errors",
            "rx_dropped", "tx_dropped", "multicast")},
    }


def _pair_veths(links: list[tuple[Namespace, dict[str, Any]]]
                ) -> list[tuple[Namespace, dict[str, Any]]]:
    """Fill peer fields of veth pairs whose ends point at each other (ifindex <-> IFLA_LINK)
    in different namespaces; a host-side veth takes the container id of its peer's namespace."""
    by_index: dict[int, list[tuple[Namespace, dict[str, Any]]]] = {}
    for namespace, link in links:
        if link["kind"] == "veth":
            by_index.setdefault(link["ifindex"], []).append((namespace, link))
    for namespace, link in links:
        if link["kind"] != "veth" or link["peer_ifindex"] is None:
            continue
        peers = [(ns, peer) for ns, peer in by_index.get(link["peer_ifindex"], [])
                 if ns.inode != namespace.inode and peer["peer_ifindex"] == link["ifindex"]]
        if len(peers) != 1:
            continue
        peer_ns, peer = peers[0]
        link["peer_name"], link["peer_netns_inode"] = peer["name"], peer_ns.inode
        if link["container_id"] is None:
            link["container_id"] = peer_ns.container_id
    return links


def run(publish: Publish, stop: threading.Event, options: NetlinkOptions) -> None:
    """Publish a snapshot on ``raw.netlink`` every ``interval_s`` until ``stop`` is set."""
    sensor = NetlinkSensor(options)
    while not stop.is_set():
        started = time.monotonic()
        published = 0
        try:
            for key, value in sensor.events():
                publish(TOPIC, key, value)
                published += 1
        except OSError:
            log.exception("netlink snapshot failed; retrying next interval")
        log.debug("netlink snapshot: %d records in %.3f s", published, time.monotonic() - started)
        stop.wait(max(0.0, options.interval_s - (time.monotonic() - started)))
