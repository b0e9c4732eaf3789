"""Flow state, pure logic: merges the eBPF events and Netlink snapshots of each socket (by cookie)
and the two sockets of one connection (by normalized 5-tuple) into one flow, idempotently, and
decides when to emit START, UPDATE (active timeout, late enrichment) and END.

Waiting for more events (join delay, END grace, idle timeout, linger) counts event time, against
a watermark (``Clock``): a worker behind its input, which reads a flow's two sockets far apart,
does not END a flow whose peer it simply has not read yet; a caught-up worker, whose watermark
is the wall clock, ENDs on time. Only the active timeout (how often UPDATEs go out) counts
processing time. ``DueIndex`` finds the flows whose next due time (``next_due``) has come.
"""

from __future__ import annotations

import hashlib
import heapq
import ipaddress
import re
from collections.abc import Iterable, Iterator, MutableMapping
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any

CLIENT, SERVER = "client", "server"
IANA = {"tcp": 6, "udp": 17}
# Linux's default net.ipv4.ip_local_port_range: a port there is most likely a client's
EPHEMERAL = range(32768, 61000)
CLOSED_STATES = frozenset({"CLOSE", "TIME_WAIT"})
COUNTERS = ("bytes_sent", "bytes_received", "packets_sent", "packets_received", "retransmits")
# an IPv4 address as ``ipaddress`` reads one (decimal octets up to 255 without leading zeros);
# groups: the first three octets, the first octet
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
IPV4 = re.compile(rf"(({_OCTET})\.{_OCTET}\.{_OCTET})\.{_OCTET}")


def normalize_ip(ip: str) -> str:
    """The canonical text of ``ip``; IPv4-mapped IPv6 (``::ffff:a.b.c.d``) becomes IPv4. Text
    without a colon is left as it is: an IPv4 address that ``ipaddress`` accepts is canonical
    already (no leading zeros), and text that it refuses is not an address."""
    return ip if ":" not in ip else _normalize_ipv6(ip)


@lru_cache(maxsize=65536)
def _normalize_ipv6(ip: str) -> str:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def family_of(ip: str) -> str:
    return "ipv6" if ":" in ip else "ipv4"


@lru_cache(maxsize=65536)
def network(ip: str) -> str | None:
    """The /24 (IPv4) or /64 (IPv6) of ``ip``; None for addresses that are always local
    (loopback, unspecified) or not addresses at all. An IPv4 address is read by ``IPV4``, the
    rest by ``ipaddress``."""
    v4 = IPV4.fullmatch(ip)
    if v4 is not None:
        return None if v4[2] == "127" or ip == "0.0.0.0" else f"{v4[1]}.0/24"
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if addr.is_loopback or addr.is_unspecified:
        return None
    return str(ipaddress.ip_network(f"{ip}/{24 if addr.version == 4 else 64}", strict=False))


@lru_cache(maxsize=65536)
def _loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


@dataclass
class LocalAddresses:
    """Where the other end of a flow may be a socket of the same host: loopback, and the networks
    (/24, /64) of the flow's own addresses, of the host's containers (metadata, read whole by
    every worker) and of the host's local sockets (each raw stage sends the addresses it learns
    to every flows partition, and all it knows again every ``LOCAL_RESEND_S``; after a restart
    it sends those of the flows read back from the tables too): every worker has the same
    answer, whichever partitions it has. A flow whose peer is elsewhere need not
    wait for the peer's socket (join delay, END grace), only until the watermark has passed the
    flow's time: the addresses are learnt from the sockets as they are read, so until then the
    peer's network may be unknown only because no socket of it was read yet (a server's socket
    read before that of its first client on the host, which is in another raw partition)."""

    networks: dict[str, set[str]] = field(default_factory=dict)  # host -> networks

    def add(self, host: str, ip: str) -> None:
        net = network(ip)
        if net is not None:
            self.networks.setdefault(host, set()).add(net)

    def may_be_local(self, host: str, ip: str, own: Iterable[str] = ()) -> bool:
        """Whether ``ip`` may be a socket of ``host``, for a flow with local addresses ``own``."""
        net = network(ip)
        return (net is None or net in self.networks.get(host, ())
                or any(network(mine) == net for mine in own))


@dataclass
class Observation:
    """One socket at one instant, from either sensor: what both raw topics have in common."""

    host: str
    cookie: int
    ts_ns: int
    source: str  # ebpf | netlink
    kind: str  # the raw event type (START, UPDATE, END, ..., SOCKET, SOCKET_CLOSED)
    transport: str
    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int
    start_ns: int | None = None  # when the sensor says the flow started
    role: str | None = None
    netns_inode: int | None = None
    bytes_sent: int | None = None
    bytes_received: int | None = None
    packets_sent: int | None = None
    packets_received: int | None = None
    retransmits: int | None = None
    srtt_us: int | None = None
    rttvar_us: int | None = None
    state: str | None = None
    process: dict[str, Any] | None = None
    container_id: str | None = None
    cgroup_id: int | None = None
    closed: bool = False
    failed: bool = False
    error: str | None = None

    def __post_init__(self) -> None:
        self.local_ip = normalize_ip(self.local_ip)
        self.remote_ip = normalize_ip(self.remote_ip)

    @property
    def local(self) -> tuple[str, int]:
        return (self.local_ip, self.local_port)

    @property
    def remote(self) -> tuple[str, int]:
        return (self.remote_ip, self.remote_port)

    def flow_key(self) -> str:
        """The key both sockets of one connection share: host, transport, sorted endpoints, and
        the network namespace when the connection cannot leave it (loopback, or a socket talking
        to its own address): the same such 5-tuple in two namespaces is two connections. (The
        two ends of any other connection may be in two namespaces: containers on a bridge.)"""
        a, b = sorted([self.local, self.remote])
        scope = self.host
        if self.netns_inode is not None and (self.remote_ip == self.local_ip
                                             or _loopback(self.remote_ip)):
            scope = f"{self.host}|{self.netns_inode}"
        return f"{scope}|{self.transport}|{a[0]}|{a[1]}|{b[0]}|{b[1]}"

    def to_row(self) -> list[Any]:
        """The values in field order: an observation on the internal topic (JSON half the size
        of a dict's, and faster both ways)."""
        return list(self.__dict__.values())

    @classmethod
    def from_row(cls, row: list[Any] | dict[str, Any]) -> Observation:
        """The observation of ``to_row`` (or of a dict of its fields, the earlier format)."""
        if isinstance(row, dict):
            return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})
        return cls(*row)


@dataclass
class SocketState:
    """What is known of one local socket, merged from all its observations."""

    cookie: int
    local_ip: str
    local_port: int
    role: str | None = None
    netns_inode: int | None = None
    first_ns: int = 0
    last_ns: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    packets_sent: int = 0
    packets_received: int = 0
    retransmits: int = 0
    srtt_us: int | None = None
    rttvar_us: int | None = None
    rtt_ns: int = 0  # event time of srtt_us
    state: str | None = None
    state_ns: int = 0
    process: dict[str, Any] | None = None
    container_id: str | None = None
    closed: bool = False
    closed_ns: int | None = None
    failed: bool = False
    error: str | None = None
    ebpf: bool = False  # followed by the eBPF sensor
    ebpf_closed: bool = False  # its eBPF END or FAILURE came: its counters are final
    sent: list[int] = field(default_factory=list)  # what the latest ``activity`` passed on

    def reopened_by(self, obs: Observation) -> bool:
        """Whether ``obs`` starts a new flow on this closed socket (a UDP socket talking to the
        same peer again after its flow went idle)."""
        return self.closed and obs.kind == "START" and obs.ts_ns > (self.closed_ns or 0)

    def merge(self, obs: Observation) -> bool:
        """Fold ``obs`` in; True when anything changed. Cumulative counters take the maximum,
        RTT and state the latest by event time: duplicates and late events change nothing."""
        before = self.__dict__.copy()
        start = min(obs.start_ns or obs.ts_ns, obs.ts_ns)
        self.first_ns = min(self.first_ns, start) if self.first_ns else start
        self.last_ns = max(self.last_ns, obs.ts_ns)
        for name in COUNTERS:
            value = getattr(obs, name)
            if value is not None and value > getattr(self, name):
                setattr(self, name, value)
        if obs.srtt_us is not None and obs.ts_ns > self.rtt_ns:
            self.srtt_us, self.rttvar_us, self.rtt_ns = obs.srtt_us, obs.rttvar_us, obs.ts_ns
        if obs.state is not None and obs.ts_ns >= self.state_ns and not (self.closed and
                                                                          obs.state == "ESTABLISHED"):
            self.state, self.state_ns = obs.state, obs.ts_ns
        if obs.role and (self.role is None or obs.source == "ebpf"):
            self.role = obs.role
        self.netns_inode = self.netns_inode or obs.netns_inode
        self.container_id = self.container_id or obs.container_id
        if obs.process and _richer(obs.process, self.process):
            self.process = obs.process
        if obs.closed or obs.failed or (obs.state in CLOSED_STATES and obs.source == "netlink"):
            self.closed = True
            self.closed_ns = max(self.closed_ns or 0, obs.ts_ns)
        if obs.failed:
            self.failed, self.error = True, obs.error or self.error
        if obs.source == "ebpf":
            self.ebpf = True
            self.ebpf_closed = self.ebpf_closed or obs.closed or obs.failed
        return self.__dict__ != before

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SocketState:
        return cls(**{k: v for k, v in data.items() if k in _SOCKET_FIELDS})


_SOCKET_FIELDS = frozenset(f.name for f in fields(SocketState))


def _richer(new: dict[str, Any], old: dict[str, Any] | None) -> bool:
    """Whether process record ``new`` should replace ``old`` (another process, or more known)."""
    if new == old:  # most observations repeat the process their socket has
        return False
    if old is None or new.get("pid") != old.get("pid"):
        return old is None or bool(new.get("exe"))
    return sum(v not in (None, [], "") for v in new.values()) > sum(
        v not in (None, [], "") for v in old.values())


@dataclass
class Activity:
    """Where one socket of a container stands, for the windows of its container (and pod):
    its counters so far, its latest RTT sample, whether it failed or closed. The windows
    stage counts the difference to what it already counted of ``socket``, which it keeps with
    the windows themselves: an activity repeated after a crash of either stage adds nothing."""

    entity: str  # container id, or "<namespace>/<pod>" for a pod
    entity_type: str  # CONTAINER | POD
    container_id: str
    host: str
    socket: str  # TCP: the socket's cookie; UDP: "<flow id>|<cookie>" (one peer, one flow)
    role: str
    ts_ns: int  # the socket's latest event
    failed: bool
    closed: bool
    bytes_in: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    packets_out: int = 0
    retransmits: int = 0
    rtt_ns: int = 0  # event time of the RTT sample
    rtt_us: int | None = None
    rttvar_us: int | None = None


@dataclass
class FlowConfig:
    """Timing of flow events (seconds; of processing time for the active timeout, of event time
    for the others: see ``Clock``)."""

    active_timeout_s: float = 10.0  # UPDATE at most this often while a flow changes
    idle_timeout_s: float = 300.0  # END for a flow with no event for this long
    join_delay_s: float = 2.0  # wait this long for the other end before START
    end_grace_s: float = 2.0  # wait this long for the other end's close before END
    linger_s: float = 30.0  # keep an ended flow this long to absorb late duplicates


@dataclass(frozen=True)
class Clock:
    """The two times of the flow logic. ``now_ms``: processing time (the worker's wall clock),
    which paces UPDATEs. ``watermark_ns``: event time (the sensors' ``ts_ns``) before which
    every observation of the flow's partition has been read (0: not known yet); it is the
    wall clock when the worker is caught up. A flow's waits run from its flow time (the
    ``*_ns`` times of ``FlowState``, see ``time_of``)."""

    now_ms: int
    watermark_ns: int

    def time_of(self, event_ns: int) -> int:
        """The flow time of an event read now: its event time, but no earlier than the
        watermark (the events of a host whose clock runs behind get the whole wait, from their
        arrival) and no later than the wall clock (nor do those of one whose clock runs ahead
        wait longer)."""
        return max(self.watermark_ns, min(event_ns, self.now_ms * 1_000_000))


@dataclass
class FlowState:
    """One connection: up to two local sockets (client, server) and what was emitted of it."""

    key: str
    flow_id: str
    host: str
    transport: str
    partition: int = 0
    sockets: dict[str, SocketState] = field(default_factory=dict)
    retired: list[int] = field(default_factory=list)  # cookies of earlier flows on this tuple
    seen_ns: int = 0  # flow time (see ``Clock``) of the first observation
    changed_ns: int = 0  # flow time of the latest change
    emitted_ms: int = 0  # processing time of the latest emission
    sequence: int = 0  # events emitted so far
    started: bool = False
    ended: bool = False
    ended_ns: int = 0  # flow time of the END
    dirty: bool = False  # changed since the latest emission
    ended_with: int = 0  # sockets known when END was emitted (a late peer re-emits END)
    enrichment: str = ""  # signature of the metadata known at the latest emission

    @classmethod
    def new(cls, obs: Observation, clock: Clock, partition: int = 0) -> FlowState:
        key = obs.flow_key()
        flow_id = hashlib.sha256(f"{key}|{obs.cookie}|{obs.ts_ns}".encode()).hexdigest()[:32]
        return cls(key=key, flow_id=flow_id, host=obs.host, transport=obs.transport,
                   partition=partition, seen_ns=clock.time_of(obs.ts_ns))

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "sockets": {k: s.to_dict() for k, s in self.sockets.items()},
                "retired": list(self.retired)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlowState:
        """The state of ``to_dict``; fields of an earlier version (processing times) are left
        out: such a flow's waits are over."""
        data = {k: v for k, v in data.items() if k in _FLOW_FIELDS}
        data["sockets"] = {k: SocketState.from_dict(v) for k, v in data["sockets"].items()}
        return cls(**data)

    # -- who is who

    def endpoints(self) -> tuple[tuple[str, int], tuple[str, int]]:
        """(client, server) addresses."""
        _host, _t, ip1, p1, ip2, p2 = self.key.rsplit("|", 5)
        a, b = (ip1, int(p1)), (ip2, int(p2))
        return (a, b) if self._client_is(a, b) else (b, a)

    def _client_is(self, a: tuple[str, int], b: tuple[str, int]) -> bool:
        for sock in self.sockets.values():
            if sock.role:
                at_a = (sock.local_ip, sock.local_port) == a
                return at_a == (sock.role == CLIENT)
        ephemeral_a, ephemeral_b = a[1] in EPHEMERAL, b[1] in EPHEMERAL
        if ephemeral_a != ephemeral_b:
            return ephemeral_a
        return a[1] > b[1]

    def socket_at(self, endpoint: tuple[str, int]) -> SocketState | None:
        return next((s for s in self.sockets.values()
                     if (s.local_ip, s.local_port) == endpoint), None)

    def role_of(self, sock: SocketState) -> str:
        client, _server = self.endpoints()
        return CLIENT if (sock.local_ip, sock.local_port) == client else SERVER

    @property
    def failed(self) -> bool:
        return any(s.failed for s in self.sockets.values())

    def all_closed(self) -> bool:
        return bool(self.sockets) and all(s.closed for s in self.sockets.values())

    def both_ends(self) -> bool:
        return len(self.sockets) == 2

    def final(self) -> bool:
        """Whether the closed sockets' counters are final: on a host followed by eBPF (a socket
        of the flow seen by it), only an eBPF END says so; Netlink's TIME_WAIT or vanished
        socket comes without counters (or with older ones) and may be read before that END."""
        return (not any(s.ebpf for s in self.sockets.values())
                or all(s.ebpf_closed for s in self.sockets.values()))

    def last_ns(self) -> int:
        return max((s.last_ns for s in self.sockets.values()), default=0)

    def first_ns(self) -> int:
        return min((s.first_ns for s in self.sockets.values()), default=0)

    def closed_ns(self) -> int:
        return max((s.closed_ns or s.last_ns for s in self.sockets.values()), default=0)

    def missing_peer(self) -> str | None:
        """The IP of the endpoint without a known socket (None when both or none are known)."""
        if len(self.sockets) != 1:
            return None
        sock = next(iter(self.sockets.values()))
        client, server = self.endpoints()
        return server[0] if (sock.local_ip, sock.local_port) == client else client[0]


_FLOW_FIELDS = frozenset(f.name for f in fields(FlowState))


@dataclass
class Emission:
    """A flow event to publish, described by the flow's state when it is published."""

    type: str  # START | UPDATE | END
    sequence: int
    end_reason: str | None = None


def observe(state: FlowState | None, obs: Observation, clock: Clock, partition: int = 0,
            ) -> tuple[FlowState, list[tuple[FlowState, Emission]], SocketState | None]:
    """Fold ``obs`` into the flow of its 5-tuple.

    Returns the flow's new state (a new flow when the tuple is reused by new sockets), the
    events owed by an older flow it replaced (with that flow's state), and the socket that
    changed (None when the observation was a duplicate or belongs to a retired flow).
    """
    owed: list[tuple[FlowState, Emission]] = []
    if state is not None and obs.cookie in state.retired:
        return state, owed, None
    known = state.sockets.get(str(obs.cookie)) if state is not None else None
    if known is not None and obs.source == "ebpf" and obs.ts_ns < known.first_ns:
        return state, owed, None  # type: ignore[return-value]  # of an earlier flow of the socket
    reopened = known is not None and known.reopened_by(obs)
    reused = (state is not None and known is None
              and state.socket_at(obs.local) is not None)  # the tuple is reused by a new socket
    if state is not None and (reused or reopened):
        if not state.ended:
            owed += [(state, e) for e in finish(state, clock,
                                                "closed" if state.all_closed() else "idle")]
        retired = [*state.retired[-6:], *(int(c) for c in state.sockets if int(c) != obs.cookie)]
        state = FlowState.new(obs, clock, partition)
        state.retired = retired
    if state is None:
        state = FlowState.new(obs, clock, partition)
    sock = state.sockets.get(str(obs.cookie))
    if sock is None:
        sock = SocketState(cookie=obs.cookie, local_ip=obs.local_ip, local_port=obs.local_port)
        state.sockets[str(obs.cookie)] = sock
    if not sock.merge(obs):
        return state, owed, None
    state.changed_ns = clock.time_of(state.last_ns())
    state.dirty = True
    state.partition = partition
    return state, owed, sock


def finish(state: FlowState, clock: Clock, reason: str) -> list[Emission]:
    """START (unless a failed connect) if not yet emitted, then END; marks the state ended."""
    out: list[Emission] = []
    if state.failed and not state.started:
        reason = "failed"
    elif not state.started:
        out.append(_emit(state, "START", clock.now_ms))
    state.ended, state.ended_with = True, len(state.sockets)
    state.ended_ns = max(clock.watermark_ns, state.changed_ns)
    out.append(_emit(state, "END", clock.now_ms, reason))
    return out


def _emit(state: FlowState, kind: str, now_ms: int, reason: str | None = None) -> Emission:
    if kind == "START":
        state.started = True
    emission = Emission(kind, state.sequence, reason)
    state.sequence += 1
    state.emitted_ms = now_ms
    state.dirty = False
    return emission


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


def due(state: FlowState, clock: Clock, cfg: FlowConfig, enrichment: str = "",
        peer_may_come: bool = True) -> list[Emission]:
    """The events owed by ``state`` at ``clock``; ``enrichment`` is the signature of the
    metadata now known for it (a change triggers an UPDATE); ``peer_may_come`` False when the
    missing end cannot be a local socket: no join delay, no END grace, only a wait until the
    watermark has passed the flow's time (see ``LocalAddresses``)."""
    out: list[Emission] = []
    now_ms, watermark = clock.now_ms, clock.watermark_ns
    if state.ended:
        if len(state.sockets) > state.ended_with or (state.enrichment
                                                     and enrichment != state.enrichment):
            state.ended_with = len(state.sockets)
            out.append(_emit(state, "END", now_ms, "failed" if state.failed else "closed"))
        state.enrichment = enrichment
        return out
    if state.all_closed():
        settled = state.final() and (state.both_ends() or (not peer_may_come
                                                           and watermark > state.changed_ns))
        if settled or state.failed or watermark >= state.changed_ns + _ns(cfg.end_grace_s):
            out += finish(state, clock, "failed" if state.failed and not state.started else "closed")
    elif watermark >= state.changed_ns + _ns(cfg.idle_timeout_s):
        out += finish(state, clock, "idle")
    elif not state.started:
        if (state.both_ends() or (not peer_may_come and watermark > state.seen_ns)
                or watermark >= state.seen_ns + _ns(cfg.join_delay_s)):
            out.append(_emit(state, "START", now_ms))
    elif not any(s.closed for s in state.sockets.values()):  # closing: END comes next
        timed_out = state.dirty and (now_ms - state.emitted_ms) / 1000 >= cfg.active_timeout_s
        if timed_out or (state.enrichment and enrichment != state.enrichment):
            out.append(_emit(state, "UPDATE", now_ms))
    state.enrichment = enrichment
    return out


def expired(state: FlowState, clock: Clock, cfg: FlowConfig) -> bool:
    """Whether an ended flow can be forgotten."""
    return state.ended and clock.watermark_ns >= state.ended_ns + _ns(cfg.linger_s)


def activity(state: FlowState, sock: SocketState, container_id: str, pod: str | None,
             step_ms: int) -> list[Activity]:
    """The window inputs of one changed socket (for its container, and its pod if any); empty
    when nothing the windows count changed since the socket's previous activity."""
    step = sock.last_ns // 1_000_000 // step_ms * step_ms
    signature = [sock.bytes_received, sock.bytes_sent, sock.packets_received, sock.packets_sent,
                 sock.retransmits, sock.rtt_ns, step, sock.failed, sock.closed]
    if signature == sock.sent:
        return []
    sock.sent = signature
    # a TCP socket's counters run from its start to its close, across flows of it (one that
    # went idle ended, and a later packet starts another); a UDP flow's start from 0
    socket = str(sock.cookie) if state.transport == "tcp" else f"{state.flow_id}|{sock.cookie}"
    base = dict(container_id=container_id, host=state.host, socket=socket,
                role=state.role_of(sock), ts_ns=sock.last_ns, failed=sock.failed,
                closed=sock.closed, bytes_in=sock.bytes_received, bytes_out=sock.bytes_sent,
                packets_in=sock.packets_received, packets_out=sock.packets_sent,
                retransmits=sock.retransmits, rtt_ns=sock.rtt_ns, rtt_us=sock.srtt_us,
                rttvar_us=sock.rttvar_us)
    out = [Activity(entity=container_id, entity_type="CONTAINER", **base)]  # type: ignore[arg-type]
    if pod:
        out.append(Activity(entity=pod, entity_type="POD", **base))  # type: ignore[arg-type]
    return out


NEVER = 1 << 63  # a time that never comes


def next_due(state: FlowState, cfg: FlowConfig, peer_may_come: bool = True) -> tuple[int, int]:
    """When ``due`` (with the same ``peer_may_come``) or ``expired`` may next have something to
    do: once the processing time (ms) reaches the first or the watermark (ns) the second."""
    if state.ended:
        return NEVER, state.ended_ns + _ns(cfg.linger_s)
    when = state.changed_ns + _ns(cfg.idle_timeout_s)
    if state.all_closed():
        grace = 1 if not peer_may_come and state.final() else _ns(cfg.end_grace_s)
        return NEVER, min(when, state.changed_ns + grace)
    if not state.started:
        join = 1 if not peer_may_come else _ns(cfg.join_delay_s)
        return NEVER, min(when, state.seen_ns + join)
    if state.dirty and not any(s.closed for s in state.sockets.values()):
        return state.emitted_ms + round(cfg.active_timeout_s * 1000), when
    return NEVER, when


class DueIndex(MutableMapping[bytes, tuple[int, int]]):
    """Flow key -> its next due time (processing ms, watermark ns; see ``next_due``), and the
    keys due by a clock (``ready``) in O((due + stale) log n) rather than a pass over every key:
    one heap of (time, key) per clock. The mapping is the truth: a heap entry counts while it
    equals its key's time (a key set to another time leaves its older entries behind, dropped
    when they come up); a heap holding more than twice as many entries as there are keys, plus
    ``SLACK``, is rebuilt from the mapping, so that keys set often do not grow it without bound.
    Every key has its current entry in each heap whose time is not ``NEVER``."""

    SLACK = 1024

    def __init__(self) -> None:
        self.times: dict[bytes, tuple[int, int]] = {}
        self.heaps: tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]] = ([], [])

    def __getitem__(self, key: bytes) -> tuple[int, int]:
        return self.times[key]

    def __setitem__(self, key: bytes, when: tuple[int, int]) -> None:
        old = self.times.get(key)
        self.times[key] = when
        for clock, heap in enumerate(self.heaps):
            if when[clock] < NEVER and (old is None or old[clock] != when[clock]):
                heapq.heappush(heap, (when[clock], key))
                self._compact(clock)

    def __delitem__(self, key: bytes) -> None:
        del self.times[key]
        self._compact(0)
        self._compact(1)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.times)

    def __len__(self) -> int:
        return len(self.times)

    def __contains__(self, key: object) -> bool:
        return key in self.times

    def _compact(self, clock: int) -> None:
        if len(self.heaps[clock]) > 2 * len(self.times) + self.SLACK:
            heap = [(when[clock], key) for key, when in self.times.items() if when[clock] < NEVER]
            heapq.heapify(heap)
            self.heaps[clock][:] = heap

    def ready(self, now_ms: int, watermark_ns: int, limit: int) -> list[bytes]:
        """The keys due by the processing time ``now_ms`` (their ms has come) or the watermark
        ``watermark_ns`` (their ns has), at most ``limit``, the longest due first: by the
        whole milliseconds since the sooner of the two (ties: by processing time first, then
        by the exact time, then by key). Their entries stay: a key is due again until set."""
        heaps = self.heaps
        taken: dict[bytes, None] = {}  # in order
        kept: tuple[set[bytes], set[bytes]] = (set(), set())  # keys whose entry was put aside
        aside: list[tuple[int, tuple[int, bytes]]] = []
        while len(taken) < limit:
            late_ms = heaps[0][0][0] - now_ms if heaps[0] and heaps[0][0][0] <= now_ms else None
            late_ns = ((heaps[1][0][0] - watermark_ns) // 1_000_000
                       if heaps[1] and heaps[1][0][0] <= watermark_ns else None)
            if late_ns is not None and (late_ms is None or late_ns < late_ms):
                clock = 1
            elif late_ms is not None:
                clock = 0
            else:
                break
            entry = heapq.heappop(heaps[clock])
            when, key = entry
            current = self.times.get(key)
            if current is None or current[clock] != when or key in kept[clock]:
                continue  # stale, or a second entry of the same time
            kept[clock].add(key)
            aside.append((clock, entry))
            taken[key] = None
        for clock, entry in aside:
            heapq.heappush(heaps[clock], entry)
        return list(taken)
