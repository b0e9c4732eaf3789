"""The Netlink half of the sensor: periodic sock_diag and RTM_GETLINK snapshots.

Every interval it dumps all TCP/UDP sockets (with tcp_info) and interface counters of the host
and of every other network namespace (containers), and publishes them on ``raw.netlink``.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink import (
    NETLINK_ROUTE,
    NETLINK_SOCK_DIAG,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
)
from pyroute2.netlink.diag import SOCK_DIAG_BY_FAMILY, SS_ALL, inet_diag_msg

from sensor import privileges
from sensor.cgroups import CgroupResolver, ContainerRef
from sensor.netns import Namespace, discover_namespaces, socket_in
from sensor.owners import SocketOwners
from sensor.processes import ProcessCache

log = logging.getLogger(__name__)

TOPIC = "raw.netlink"
INET_DIAG_INFO = 2
INET_DIAG_CONG = 4
INET_DIAG_CGROUP_ID = 21
EXTENSIONS = (1 << (INET_DIAG_INFO - 1)) | (1 << (INET_DIAG_CONG - 1))
U64_MAX = (1 << 64) - 1
CONTAINERS_REMEMBERED = 4096
TCP_STATES = ("UNKNOWN", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2",
              "TIME_WAIT", "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING", "NEW_SYN_RECV")
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
# skipped as padding, which halves the cost per socket); rates get special cases in _tcp_record.
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
_TCP_LAYOUT = [(_TCP_MEMBERS.get(member), fmt) for member, fmt in inet_diag_msg.tcp_info.fields]
_TCP_INFO = struct.Struct("=" + "".join(
    fmt if name else f"{struct.calcsize('=' + fmt)}x" for name, fmt in _TCP_LAYOUT))
_TCP_NAMES = tuple(name for name, _ in _TCP_LAYOUT if name)
_DIAG_HEAD = struct.Struct("=xB42xQ4xIIII")  # state, cookie, rqueue, wqueue, uid, inode


def _member_offsets() -> dict[str, int]:
    offsets, at = {}, 0
    for name, fmt in _TCP_LAYOUT:
        if name:
            offsets[name] = at
        at += struct.calcsize("=" + fmt)
    return offsets


def _counters_struct(names: tuple[str, ...]) -> struct.Struct:
    """A struct reading only the u32 tcp_info members ``names``, in the order of their offsets."""
    offsets = _member_offsets()
    layout, at = "=", 0
    for offset in sorted(offsets[name] for name in names):
        layout += f"{offset - at}xI"
        at = offset + 4
    return struct.Struct(layout)


# the counters a snapshot compares, read without the rest of tcp_info
_COUNTERS = _counters_struct(("segs_in", "segs_out", "retransmits"))


@dataclass
class NetlinkOptions:
    """Settings of the Netlink sensor.

    ``other_namespaces``: also dump every other network namespace (containers; root only).
    ``unchanged_every``: republish an unchanged socket every N snapshots (see NetlinkSensor).
    ``on_container``: called once per container id seen (e.g. ``ContainerWatcher.resolve``).
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


@dataclass(slots=True)
class DiagMessage:
    """One inet_diag_msg: what every snapshot compares (header fields and three tcp_info
    counters), and where its message lies in ``data``, for ``details`` to read the rest of it
    (only for the sockets published: most are unchanged)."""

    family: int
    state: int
    cookie: int
    rqueue: int
    wqueue: int
    uid: int
    inode: int
    counters: tuple[int, ...]  # tcpi_segs_in, _segs_out, _total_retrans (some order); () if none
    data: bytes
    body: int
    end: int


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
    request = _INET_DIAG_REQ_V2.pack(family, protocol, EXTENSIONS, SS_ALL)
    sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(request), SOCK_DIAG_BY_FAMILY,
                             NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + request)
    # where the previous message had its tcp_info attribute, and its length: they tend to agree
    info_at, info_len = 0, 0
    while True:
        data = sock.recv(1 << 20)
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
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
                if body + 4 > min(end, len(data)):
                    raise OSError(errno.EPROTO, "sock_diag dump: truncated NLMSG_ERROR reply")
                code = -struct.unpack_from("=i", data, body)[0]
                if code:  # 0 is an acknowledgement, not an error
                    raise OSError(code, f"sock_diag dump: {errno.errorcode.get(code, 'unknown error')}")
                continue
            if msg_type == SOCK_DIAG_BY_FAMILY:
                if end > len(data) or end - body < _INET_DIAG_MSG.size:
                    log.warning("skipped a truncated sock_diag message (%d bytes)", end - body)
                    continue
                state, cookie, rqueue, wqueue, uid, inode = _DIAG_HEAD.unpack_from(data, body)
                counters: tuple[int, ...] = ()
                at = body + _INET_DIAG_MSG.size + info_at
                if not info_len or at + info_len > end \
                        or _RTATTR.unpack_from(data, at) != (info_len, INET_DIAG_INFO):
                    at = _find_attr(data, body + _INET_DIAG_MSG.size, end, INET_DIAG_INFO)
                    if at:
                        info_at = at - body - _INET_DIAG_MSG.size
                        info_len = _RTATTR.unpack_from(data, at)[0]
                if at:
                    payload = info_len - _RTATTR.size
                    counters = _COUNTERS.unpack_from(data, at + _RTATTR.size) \
                        if payload >= _COUNTERS.size else _COUNTERS.unpack(
                            data[at + _RTATTR.size:at + info_len].ljust(_COUNTERS.size, b"\0"))
                yield DiagMessage(family, state, cookie, rqueue, wqueue, uid, inode, counters,
                                  data, body, end)


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


def details(msg: DiagMessage) -> DiagDetails:
    """Addresses, ports, interface and attributes of ``msg``."""
    data, body, end = msg.data, msg.body, msg.end
    (_family, _state, _timer, _retrans, sport, dport, src, dst, ifindex, _cookie, _expires,
     _rqueue, _wqueue, _uid, _inode) = _INET_DIAG_MSG.unpack_from(data, body)
    size = 4 if msg.family == socket.AF_INET else 16
    out = DiagDetails(socket.ntohs(sport), socket.ntohs(dport),
                      socket.inet_ntop(msg.family, src[:size]),
                      socket.inet_ntop(msg.family, dst[:size]), ifindex)
    for attr_type, offset, attr_len in _attrs(data, body + _INET_DIAG_MSG.size, end):
        start, size = offset + _RTATTR.size, attr_len - _RTATTR.size
        if attr_type == INET_DIAG_INFO:
            if size >= _TCP_INFO.size:
                out.tcp_info = _TCP_INFO.unpack_from(data, start)
            else:  # an older kernel's shorter tcp_info
                out.tcp_info = _TCP_INFO.unpack(data[start:start + size].ljust(_TCP_INFO.size,
                                                                               b"\0"))
        elif attr_type == INET_DIAG_CONG:
            name = data[start:start + size].split(b"\0", 1)[0]
            out.congestion = name.decode("ascii", "replace")
        elif attr_type == INET_DIAG_CGROUP_ID and size >= _U64.size:
            out.cgroup_id = _U64.unpack_from(data, start)[0]
    return out


def _tcp_record(info: tuple[int, ...], congestion: str | None) -> dict[str, Any]:
    """The SocketTcpInfo record of an unpacked ``_TCP_INFO`` (fields in ``_TCP_NAMES`` order)."""
    record = dict(zip(_TCP_NAMES, info, strict=True))
    if record["pacing_rate"] >= U64_MAX >> 1:  # the kernel's "unlimited"
        record["pacing_rate"] = None
    record["delivery_rate"] = record["delivery_rate"] or None
    record["congestion"] = congestion
    return record


@dataclass
class _Snapshot:
    """State shared by the per-socket conversions of one snapshot."""

    owners: dict[int, int]
    processes: dict[int, dict[str, Any] | None] = field(default_factory=dict)
    containers: dict[int, ContainerRef | None] = field(default_factory=dict)


def _activity(msg: DiagMessage, pid: int | None) -> tuple[Any, ...]:
    """What changes when a socket is used: state, queues, owner and TCP segment counters."""
    return (msg.state, msg.rqueue, msg.wqueue, pid, msg.counters)


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
        self._previous: dict[int, tuple[int, dict[str, Any]]] = {}
        self._published: dict[int, tuple[Any, ...]] = {}  # cookie -> signature published
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
        options = self.options
        now_ms = round(time.time() * 1000)
        namespaces = discover_namespaces(options.proc, self.enter_namespaces)
        events: list[tuple[str, dict[str, Any]]] = []
        current: dict[int, tuple[int, dict[str, Any]]] = {}
        dumps: list[tuple[Namespace, list[tuple[DiagMessage, str, str]]]] = []
        links: list[tuple[Namespace, dict[str, Any]]] = []
        self._count += 1
        every = max(1, options.unchanged_every)
        for namespace in namespaces.values():
            try:
                dumps.append((namespace, list(self._messages(namespace))))
                if options.interfaces:
                    links += [(namespace, link) for link in self._links(namespace)]
            except OSError as error:
                self._namespace_error(namespace, error)
        dumped = {namespace.inode for namespace, _ in dumps}
        state = _Snapshot(self._owners.owners(
            {msg.inode for _, messages in dumps for msg, _, _ in messages if msg.inode}))
        for namespace, messages in dumps:
            for msg, transport, family in messages:
                # Records are built only for sockets published now: most are idle.
                pid = state.owners.get(msg.inode) if msg.inode else None
                signature = _activity(msg, pid)
                last = self._published.get(msg.cookie)
                previous = self._previous.get(msg.cookie)
                if last is None or previous is None or last != signature \
                        or (self._count + msg.cookie) % every == 0:
                    record = self._socket_record(msg, transport, family, namespace, state, pid)
                    self._published[msg.cookie] = signature
                    events.append((f"{options.host_name}:{msg.cookie}",
                                   self._event("SOCKET", now_ms, namespace.inode, socket=record)))
                else:
                    record = previous[1]
                current[msg.cookie] = (namespace.inode, record)
        for cookie, (inode, record) in self._previous.items():
            if cookie in current:
                continue
            if inode in dumped or inode not in namespaces:
                self._published.pop(cookie, None)
                events.append((f"{options.host_name}:{cookie}",
                               self._event("SOCKET_CLOSED", now_ms, inode, socket=record)))
            else:
                current[cookie] = (inode, record)
        self._previous = current
        for namespace, link in _pair_veths(links):
            name = link["name"] if namespace.host else f"{namespace.label}/{link['name']}"
            events.append((f"{options.host_name}:if:{name}",
                           self._event("INTERFACE", now_ms, namespace.inode, interface=link)))
        return events

    def _namespace_error(self, namespace: Namespace, error: OSError) -> None:
        if namespace.host:
            raise error
        if namespace.pids and not any(os.path.exists(f"{self.options.proc}/{pid}")
                                      for pid in namespace.pids):
            log.debug("network namespace %d vanished during the snapshot", namespace.inode)
        else:
            self._warn_once(f"cannot enter network namespace {namespace.path}: {error}")

    def _event(self, kind: str, now_ms: int, inode: int, **sub: Any) -> dict[str, Any]:
        return {"kind": kind, "timestamp_ms": now_ms, "host_name": self.options.host_name,
                "netns_inode": inode, "socket": sub.get("socket"),
                "interface": sub.get("interface")}

    def _open(self, namespace: Namespace, protocol: int) -> int:
        if namespace.host:
            return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                 protocol).detach()
        return socket_in(namespace.path, socket.AF_NETLINK, socket.SOCK_DGRAM,
                         protocol).detach()

    def _messages(self, namespace: Namespace) -> Iterator[tuple[DiagMessage, str, str]]:
        """Every socket of ``namespace``: (message, transport, family name)."""
        dumps = DUMPS if self.options.udp else DUMPS[:2]
        with socket.socket(fileno=self._open(namespace, NETLINK_SOCK_DIAG)) as sock:
            sock.bind((0, 0))
            for seq, (family, protocol, transport, family_name) in enumerate(dumps, 1):
                for msg in dump_sockets(sock, family, protocol, seq):
                    yield msg, transport, family_name

    def _socket_record(self, msg: DiagMessage, transport: str, family: str,
                       namespace: Namespace, state: _Snapshot, pid: int | None
                       ) -> dict[str, Any]:
        more = details(msg)
        process = self._process(pid, state) if pid is not None else None
        ref = self._container(more.cgroup_id, state) if more.cgroup_id else None
        container_id = (ref.container_id if ref else None) \
            or (process or {}).get("container_id") or namespace.container_id
        if container_id is not None and container_id not in self._containers_seen:
            if len(self._containers_seen) >= CONTAINERS_REMEMBERED:
                self._containers_seen.clear()  # container churn: resolving again is cheap
            self._containers_seen.add(container_id)
            if self.options.on_container is not None:
                self.options.on_container(container_id)
        if transport == "udp":
            state_name = "ESTABLISHED" if msg.state == 1 else "CLOSE"
        else:
            state_name = TCP_STATES[msg.state] if msg.state < len(TCP_STATES) else "UNKNOWN"
        return {
            "cookie": msg.cookie,
            "transport": transport,
            "family": family,
            "state": state_name,
            "local_ip": more.src,
            "local_port": more.sport,
            "remote_ip": more.dst,
            "remote_port": more.dport,
            "bound_ifindex": more.ifindex or None,
            "uid": msg.uid,
            "inode": msg.inode,
            "rqueue": msg.rqueue,
            "wqueue": msg.wqueue,
            "cgroup_id": more.cgroup_id,
            "pid": pid,
            "process": process,
            "container_id": container_id,
            "tcp": _tcp_record(more.tcp_info, more.congestion)
            if more.tcp_info is not None and transport == "tcp" else None,
        }

    def _container(self, cgroup_id: int, state: _Snapshot) -> ContainerRef | None:
        if cgroup_id not in state.containers:
            state.containers[cgroup_id] = self.options.cgroups.container_of(cgroup_id)
        return state.containers[cgroup_id]

    def _process(self, pid: int, state: _Snapshot) -> dict[str, Any] | None:
        if pid not in state.processes:
            state.processes[pid] = self.options.processes.lookup(pid)
        return state.processes[pid]

    def _links(self, namespace: Namespace) -> list[dict[str, Any]]:
        with IPRoute(fileno=self._open(namespace, NETLINK_ROUTE)) as ipr:
            return [_link_record(msg, namespace) for msg in ipr.get_links()]


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
        try:
            events = sensor.snapshot()
        except OSError:
            log.exception("netlink snapshot failed; retrying next interval")
            events = []
        for key, value in events:
            publish(TOPIC, key, value)
        log.debug("netlink snapshot: %d records in %.3f s", len(events),
                  time.monotonic() - started)
        stop.wait(max(0.0, options.interval_s - (time.monotonic() - started)))
