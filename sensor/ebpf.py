"""The eBPF half of the sensor: loads bpf/flows.c (compiled by bcc in a child process, see
sensor/bpfload.py), attaches it to the cgroup2 root and turns its ring-buffer events and
in-kernel counters into ``raw.ebpf`` records (schema ``packetless.EbpfEvent``): START/END/FAILURE
per TCP connection and UDP peer, with UPDATEs.

User space keeps each followed flow between its START and END packed (``Live``). A TCP flow
that outlives a scan (at most 5 s; sooner in a burst of new connections, see TCP_YOUNG) moves
out of the dict of young flows into ``TcpFlows``: fixed-size rows of one buffer, found by cookie
through a sorted numpy index, with no Python object per flow (a host can have 100,000 live
sockets and more); a ``Live`` is made for such a flow only while one of its records is built.
Short flows, most of them, never leave the dict.
"""

from __future__ import annotations

import bisect
import ctypes as ct
import hashlib
import importlib.util
import logging
import os
import socket
import struct
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

import schemas
from sensor import bpfload, privileges
from sensor.cgroups import CgroupResolver, cgroup2_root, container_from_cgroup_path
from sensor.netns import NetnsCookies
from sensor.processes import ProcessCache

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent.parent / "bpf" / "flows.c"
TOPIC = "raw.ebpf"
AF_INET, AF_INET6 = 2, 10
PROTO_TCP, PROTO_UDP = 6, 17

# mirrored from bpf/flows.c
EV_START, EV_END, EV_STATE, EV_FAILURE, EV_RELEASE = 1, 2, 3, 4, 5
F_ESTABLISHED, F_FIN_IN, F_FIN_OUT, F_RST_IN, F_FIN_ACKED, F_RELEASED, F_TIMEOUT, F_STARTED = (
    1, 2, 4, 8, 16, 32, 64, 128)
ROLES = {0: "UNKNOWN", 1: "CLIENT", 2: "SERVER"}
SOURCES = {1: "CREATOR", 2: "FIRST_IO", 3: "LISTENER"}
DROP_FIELDS = ("ring_buffer", "tcp_map_full", "udp_map_full", "owner_map_full",
               "socket_map_full")
C_STATE_EVENTS = 1
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
              11: "CLOSING", 12: "NEW_SYN_RECV"}
ABORTIVE_FROM = frozenset({1, 8})  # ESTABLISHED or CLOSE_WAIT straight to CLOSE: RST sent
ERRORS = {"REFUSED": "ECONNREFUSED", "TIMEOUT": "ETIMEDOUT", "UNREACHABLE": "EHOSTUNREACH",
          "RESET_RECEIVED": "ECONNRESET", "RESET_SENT": "ECONNRESET",
          "ABORTED": "ECONNABORTED"}
TRACEFS = Path("/sys/kernel/tracing")
V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
OWNER_TTL_NS = 2_000_000_000
OWNER_CACHE = 4096
ADDRESS_CACHE = 4096
HANDLE_CHUNK = 1024  # events handled between two reads of the ring buffer
BACKLOG_MAX = 262144  # events read ahead of handling at most (about 40 MB)
ENDED_MEMORY = 4096  # TCP cookies remembered after END, to drop a START that raced it
TCP_SLOTS_ADDED = 4096  # rows for TCP flows added at once (mapped apart: no copy, no slack)
# young TCP flows (Live objects in a dict) packed before the next scan once they are this many
# (a burst of new connections, or of STARTs lost and adopted by a scan): the Python heap would
# keep the room of a burst's young flows once they are packed
TCP_YOUNG = 4096
HASH_MAPS = ("tcp_flows", "udp_flows", "owners", "sk_cookie", "listeners")
MAPS = ("events", "drops", "config", *HASH_MAPS)
# the cgroup programs: (function, program type, attach type), kernel UAPI numbers (enum
# bpf_prog_type: CGROUP_SKB 8, CGROUP_SOCK 9, SOCK_OPS 13; enum bpf_attach_type)
CGROUP_PROGRAMS = (("sock_create", 9, 2), ("sock_release", 9, 34), ("sock_ops", 13, 3),
                   ("skb_egress", 8, 1), ("skb_ingress", 8, 0))
UdpKey = tuple[int, bytes, int, int]  # cookie, remote address (16 bytes), remote port, family


class Owner(NamedTuple):
    """struct owner_t of bpf/flows.c: the process that created or first used a socket."""

    cgroup_id: int
    pid: int
    tid: int
    uid: int
    gid: int
    comm: bytes
    source: int
    netns: int  # the cookie of the socket's network namespace (0: unknown)


class Event(NamedTuple):
    """struct event_t of bpf/flows.c, as EVENT decodes it: its owner_t is the last fields."""

    ts_ns: int
    cookie: int
    start_ns: int
    bytes_sent: int
    bytes_received: int
    pkts_sent: int
    pkts_received: int
    srtt_us: int
    rttvar_us: int
    retrans: int
    laddr: bytes
    raddr: bytes
    lport: int
    rport: int
    family: int
    type: int
    proto: int
    role: int
    state: int
    oldstate: int
    flags: int
    owner_cgroup_id: int
    owner_pid: int
    owner_tid: int
    owner_uid: int
    owner_gid: int
    owner_comm: bytes
    owner_source: int
    owner_netns: int


EVENT = struct.Struct("<7Q3I16s16s3H6B" "Q4I16sB7xQ")  # one C call decodes a whole event
EVENT_BYTES = ct.c_char * EVENT.size  # an event in the ring buffer, copied as it is
COUNTERS = slice(3, 10)  # bytes and packets sent and received, srtt, rttvar, retransmits
OWNER = slice(21, 29)


@dataclass
class EbpfOptions:
    """Settings of the eBPF sensor."""

    host_name: str = field(default_factory=socket.gethostname)
    update_interval_s: float = 10.0  # UPDATE for flows living longer, when they changed
    udp_idle_timeout_s: float = 60.0  # a UDP flow without datagrams for this long ENDs
    state_events: bool = False  # publish every TCP state change as STATE
    poll_ms: int = 100  # longest wait for the first event of a batch
    # under load (batches of batch_min events or more), pause batch_ms after each batch so
    # that the next comes bigger (fewer wakeups); light traffic is handled as it comes, while
    # short-lived processes can still be read in /proc
    batch_min: int = 64
    batch_ms: int = 20
    ring_buffer_pages: int = 1024  # 4 MiB
    tcp_entries: int = 131072  # sockets followed at once (100,000 live ones, with room)
    udp_entries: int = 65536
    owner_entries: int = 131072
    cgroup_root: Path | None = None  # default: the cgroup2 mount
    cgroups: CgroupResolver = field(default_factory=CgroupResolver)
    processes: ProcessCache | None = None  # default: a cache sharing ``cgroups``
    # called every map_fill_interval_s with {map name: entries / max_entries} (HASH_MAPS)
    on_map_fill: Callable[[dict[str, float]], None] | None = None
    map_fill_interval_s: float = 5.0


class Flow(NamedTuple):
    """What user space keeps of a followed flow between its START and END: what was last
    reported, and the facts fixed for its life (its records' strings and address texts are
    derived from them when a record is built). ``Live`` holds it packed."""

    reported_ns: int  # when its counters were last reported
    retrans: int  # the retransmits last reported (TCP)
    bytes_sent: int  # the counters last reported
    bytes_received: int
    packets_sent: int
    packets_received: int
    start_ns: int
    local_port: int
    remote_port: int
    proto: int  # PROTO_TCP or PROTO_UDP
    role: int  # a key of ROLES
    family: int  # AF_INET or AF_INET6: of the addresses as kept (see Live.new)
    local_addr: bytes  # 4 bytes (AF_INET) or 16 (AF_INET6)
    remote_addr: bytes


REPORTED = struct.Struct("<QI4Q")  # the first fields of a Flow: rewritten at each report
# a Flow packed: what was reported, the fixed facts, both addresses (by their length)
PACKED = {length: struct.Struct(f"{REPORTED.format}Q2H3B{length}s{length}s") for length in (4, 16)}
UNPACK = {packed.size: packed.unpack for packed in PACKED.values()}
TRANSPORTS = {PROTO_TCP: "tcp", PROTO_UDP: "udp"}
LAST = frozenset({"END", "FAILURE"})  # record types that end a flow


@dataclass(slots=True)
class Live:
    """A followed flow, kept small since there is one per socket (100,000 live sockets at
    once): its ``Flow`` packed in one bytes object (112 bytes with IPv4 addresses, 128 with
    IPv6, where Python ints, tuples and attributes took about 500) and the record fields of
    its owner (see ``EbpfSensor._owner``; shared by the sockets of a process). Its cookie is
    the key of the dict that holds it: with that key and the dict's entry, a TCP flow costs
    about 230 bytes."""

    packed: bytes
    owner: dict[str, Any] | None

    @classmethod
    def new(cls, proto: int, start_ns: int, role: int, family: int, laddr: bytes, lport: int,
            raddr: bytes, rport: int, owner: dict[str, Any] | None) -> Live:
        """A flow with nothing reported yet, from the kernel's facts. IPv4 addresses are kept
        in 4 bytes, those an IPv6 socket has with an IPv4 peer (IPv4-mapped: reported as IPv4
        anyway) too."""
        if family == AF_INET:
            laddr, raddr = laddr[:4], raddr[:4]
        elif laddr[:12] == raddr[:12] == V4_MAPPED_PREFIX:
            family, laddr, raddr = AF_INET, laddr[12:16], raddr[12:16]
        return cls(PACKED[len(laddr)].pack(0, 0, 0, 0, 0, 0, start_ns, lport, rport, proto, role,
                                           family, laddr, raddr), owner)

    def values(self) -> tuple[Any, ...]:
        """The fields of its ``Flow``, in order (a plain tuple: cheaper to build)."""
        return UNPACK[len(self.packed)](self.packed)

    @property
    def flow(self) -> Flow:
        return Flow._make(self.values())

    @property
    def reported(self) -> tuple[int, ...]:
        """(reported_ns, retrans, bytes_sent, bytes_received, packets_sent, packets_received)."""
        return REPORTED.unpack_from(self.packed)

    def report(self, ns: int, retrans: int, counters: tuple[int, ...]) -> None:
        """Remember what was reported (``counters``: bytes and packets sent and received)."""
        self.packed = REPORTED.pack(ns, retrans, *counters) + self.packed[REPORTED.size:]


ROW = PACKED[16].size  # a TCP flow's row in TcpFlows: its Live.packed, NUL-padded
FAMILY_AT = struct.calcsize(f"{REPORTED.format}Q2H2B")  # a Flow's family, after proto and role


@dataclass(slots=True)
class Followed(Live):
    """A ``Live`` made from a row of ``TcpFlows``, while a record of the flow is built: what it
    reports is written back to its row (its owner is the row's, fixed once stored)."""

    flows: TcpFlows
    slot: int

    def report(self, ns: int, retrans: int, counters: tuple[int, ...]) -> None:
        Live.report(self, ns, retrans, counters)
        self.flows.write(self.slot, self.packed)


class TcpFlows:
    """The TCP flows that outlived a scan, by cookie, without a Python object per flow: a
    ``Live`` and its dict entry and key took about 220 bytes of small objects per flow (22 MiB
    for 100,000 sockets), which also kept the Python heap from going back to the system after
    a burst. (Flows younger than a scan stay ``Live`` objects in a dict: most flows are short,
    and a dict costs them nothing more; see EbpfSensor._pack_tcp.)

    A flow has a slot: its ``Live.packed`` at ``slot * ROW`` in one buffer (NUL-padded), its
    cookie (0: a free slot) and owner at ``slot`` in an array and a list. It is found through
    the cookies sorted in a numpy array beside their slots, sorted again after flows are
    added or ended (``index``); until then the entries of the flows ended are stale (their
    slot holds another cookie, or none) and skipped. Slots are never given back (the space of
    131,072 flows is about 13 MiB).
    """

    def __init__(self) -> None:
        self._rows = bytearray()
        self._cookies = array("Q")  # by slot; 0: free
        self._owners: list[dict[str, Any] | None] = []
        self._free = array("I")
        self._keys = np.zeros(0, np.uint64)  # the index: sorted cookies
        self._slots = np.zeros(0, np.uint32)  # and their slots
        # bisect reads a memoryview's items as ints: a lookup without a numpy call
        self._key_view, self._slot_view = memoryview(self._keys), memoryview(self._slots)
        self.last = 0  # the largest indexed cookie: larger ones are not here
        self._changed = False  # flows added or ended since the index was sorted
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, cookie: int) -> bool:
        return self._slot(cookie) >= 0

    def get(self, cookie: int) -> Followed | None:
        slot = self._slot(cookie)
        return None if slot < 0 else self.at(slot)

    def at(self, slot: int) -> Followed:
        """The flow in ``slot``."""
        return Followed(self._packed(slot), self._owners[slot], self, slot)

    def _packed(self, slot: int) -> bytes:
        """The ``Live.packed`` of the flow in ``slot`` (its row without the padding)."""
        start = slot * ROW
        size = PACKED[16 if self._rows[start + FAMILY_AT] == AF_INET6 else 4].size
        return bytes(self._rows[start:start + size])

    def reported(self, slot: int) -> tuple[int, ...]:
        """``Live.reported`` of the flow in ``slot``, without making its ``Live``."""
        return REPORTED.unpack_from(self._rows, slot * ROW)

    def write(self, slot: int, packed: bytes) -> None:
        self._rows[slot * ROW:slot * ROW + len(packed)] = packed

    def add(self, flows: Iterable[tuple[int, Live]]) -> None:
        """Follow the (cookie, flow) ``flows`` (cookies not followed yet), then ``index``."""
        for cookie, live in flows:
            if not self._free:
                self._grow()
            slot = self._free.pop()
            self._rows[slot * ROW:(slot + 1) * ROW] = live.packed.ljust(ROW, b"\0")
            self._cookies[slot] = cookie
            self._owners[slot] = live.owner
            self._count += 1
            self._changed = True
        self.index()

    def pop(self, cookie: int) -> Live | None:
        """Stop following ``cookie``; its flow, or None if it was not followed."""
        slot = self._slot(cookie)
        if slot < 0:
            return None
        live = Live(self._packed(slot), self._owners[slot])
        self._cookies[slot] = 0
        self._owners[slot] = None
        self._free.append(slot)
        self._count -= 1
        self._changed = True
        return live

    def cookies(self) -> np.ndarray:
        """The cookies followed, in no order."""
        by_slot = np.frombuffer(self._cookies, np.uint64)
        return by_slot[by_slot != 0]

    def slots(self, cookies: np.ndarray) -> list[int]:
        """The slot of each of ``cookies`` (-1: not followed), looked up at once."""
        if not len(self._keys):
            return [-1] * len(cookies)
        at = np.minimum(np.searchsorted(self._keys, cookies), len(self._keys) - 1)
        slots = self._slots[at]
        current = np.frombuffer(self._cookies, np.uint64)[slots] == cookies  # not stale
        return np.where((self._keys[at] == cookies) & current, slots.astype(np.int64),
                        -1).tolist()

    def index(self) -> None:
        """Sort the index again, with the flows added and without those ended."""
        if not self._changed:
            return
        by_slot = np.frombuffer(self._cookies, np.uint64)
        slots = np.flatnonzero(by_slot).astype(np.uint32)
        cookies = by_slot[slots]
        del by_slot  # the array may grow again
        order = np.argsort(cookies)
        self._keys, self._slots = cookies[order], slots[order]
        self._key_view, self._slot_view = memoryview(self._keys), memoryview(self._slots)
        self.last = int(self._keys[-1]) if len(self._keys) else 0
        self._changed = False

    def _slot(self, cookie: int) -> int:
        if cookie > self.last:
            return -1
        keys = self._key_view
        at = bisect.bisect_left(keys, cookie)
        if at < len(keys) and keys[at] == cookie:
            slot = self._slot_view[at]
            if self._cookies[slot] == cookie:
                return slot
        return -1

    def _grow(self) -> None:
        """TCP_SLOTS_ADDED more free slots (the lowest given first)."""
        start, count = len(self._cookies), TCP_SLOTS_ADDED
        self._rows += bytes(count * ROW)
        self._cookies.frombytes(bytes(count * self._cookies.itemsize))
        self._owners += [None] * count
        self._free.extend(range(start + count - 1, start - 1, -1))


def available() -> tuple[bool, str]:
    """Whether the eBPF sensor can run here, and if not, why (for doctor and the fallback)."""
    lacking = privileges.ebpf_missing()
    if lacking:
        return False, f"missing capabilities {', '.join(lacking)} (run as root or grant them)"
    if importlib.util.find_spec("bcc") is None:  # not imported here: it loads LLVM
        return False, "bcc is not importable; apt-get install python3-bpfcc and " \
                      "expose /usr/lib/python3/dist-packages/bcc to this Python"
    try:
        bpfload.libbpf()
    except OSError as exc:
        return False, f"libbpf cannot be loaded ({exc}): apt-get install libbpf1"
    build = Path("/lib/modules") / os.uname().release / "build"
    if not (build / "include").is_dir():
        return False, f"no kernel headers at {build}: apt-get install linux-headers-amd64 and " \
                      f"link {build} to /usr/src/linux-headers-<version>-amd64"
    if not (cgroup2_root() / "cgroup.procs").exists():
        return False, "no cgroup2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup/unified)"
    try:
        (TRACEFS / "events" / "sock" / "sock_send_length" / "format").read_bytes()
    except PermissionError:
        return False, f"cannot read {TRACEFS} (owner only): missing CAP_DAC_READ_SEARCH (bcc " \
                      "compiles the tracepoint arguments from its event formats)"
    except OSError:
        return False, f"tracefs is not mounted at {TRACEFS} (mount -t tracefs nodev {TRACEFS}) " \
                      "or the sock tracepoints are missing"
    if not Path("/sys/kernel/btf/vmlinux").exists():
        return False, "the kernel has no BTF (/sys/kernel/btf/vmlinux)"
    return True, "capabilities, bcc, kernel headers, cgroup2 and tracefs are present"


def address(raw: bytes, family: int) -> tuple[str, str]:
    """(ECS network.type, text) of a kernel address; IPv4-mapped IPv6 becomes IPv4."""
    if family == AF_INET:
        return "ipv4", socket.inet_ntop(socket.AF_INET, raw[:4])
    if raw[:12] == V4_MAPPED_PREFIX:
        return "ipv4", socket.inet_ntop(socket.AF_INET, raw[12:16])
    return "ipv6", socket.inet_ntop(socket.AF_INET6, raw[:16])


def end_reason(kind: int, flags: int, oldstate: int) -> str:
    """Why a TCP socket reached CLOSE, from the flags the BPF program kept."""
    if kind == EV_FAILURE:
        if flags & F_RST_IN:
            return "REFUSED"
        if flags & F_TIMEOUT:
            return "TIMEOUT"
        return "ABORTED" if flags & F_RELEASED else "UNREACHABLE"
    if flags & F_RST_IN:
        return "RESET_RECEIVED"
    if flags & F_TIMEOUT:
        return "TIMEOUT"
    return "RESET_SENT" if oldstate in ABORTIVE_FROM else "CLOSED"


class EbpfSensor:
    """The loaded BPF programs and the user-space state of the flows they follow."""

    def __init__(self, options: EbpfOptions,
                 publish: Callable[[str, str, dict[str, Any]], None]) -> None:
        self.options = options
        self.publish = publish
        self.processes = options.processes or ProcessCache(cgroups=options.cgroups)
        self.netns = NetnsCookies(enter=not privileges.missing(["CAP_SYS_ADMIN"]))
        self.boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        self._fields = schemas.defaults("EbpfEvent")
        self._template = {**self._fields, "host_name": options.host_name,
                          "boot_id": self.boot_id}
        self._id_prefix = hashlib.blake2b(f"{options.host_name}|{self.boot_id}|".encode(),
                                          digest_size=16)
        self._addresses: dict[tuple[int, bytes, bytes], tuple[str, str, str]] = {}
        self._tcp: dict[int, Live] = {}  # flows started since the last scan
        self._tcp_packed = TcpFlows()  # the older ones (see _pack_tcp)
        self._tcp_missing: set[int] = set()  # flows gone from the kernel map at the last scan
        self._udp: dict[UdpKey, Live] = {}
        self._udp_by_cookie: dict[int, set[UdpKey]] = {}
        self._ended: OrderedDict[int, None] = OrderedDict()  # TCP cookies ended lately
        self._owners: OrderedDict[tuple[Any, ...], tuple[int, dict[str, Any]]] = OrderedDict()
        self._drops: tuple[int, ...] = (0,) * len(DROP_FIELDS)
        self._pending = bytearray()  # events read ahead, one after the other (EVENT)
        self._links: list[int] = []  # bpf_link fds of the cgroup programs
        self._cgroup_fd = -1
        self._boot_offset = 0
        self._sync_clock()
        self.loaded: bpfload.Loaded | None = None
        self.maps: dict[str, bpfload.BpfMap] = {}
        self._ring: bpfload.RingBuffer | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    def load(self) -> None:
        """Compile bpf/flows.c in a child process (its tracepoint programs attach there) and
        attach the cgroup programs it loaded."""
        o = self.options
        cflags = [f"-DRINGBUF_PAGES={o.ring_buffer_pages}", f"-DTCP_ENTRIES={o.tcp_entries}",
                  f"-DUDP_ENTRIES={o.udp_entries}", f"-DOWNER_ENTRIES={o.owner_entries}",
                  "-Wno-unused-function"]
        programs = tuple(bpfload.Program(*p) for p in CGROUP_PROGRAMS)
        self.loaded = bpfload.load(SOURCE, cflags, MAPS, programs)
        self.maps = self.loaded.maps
        if o.state_events:
            self.maps["config"].update(ct.c_int(0), ct.c_uint64(C_STATE_EVENTS))
        self._cgroup_fd = os.open(o.cgroup_root or cgroup2_root(), os.O_RDONLY | os.O_DIRECTORY)
        for name, _prog_type, attach_type in CGROUP_PROGRAMS:
            self._links.append(bpfload.cgroup_link(self.loaded.programs[name], self._cgroup_fd,
                                                   attach_type))
        self._ring = self.loaded.ring("events", self._on_event)

    def close(self) -> None:
        """Detach every program (close its link and the tracepoints' perf events) and free
        the maps."""
        for link in self._links:
            os.close(link)
        self._links.clear()
        if self._cgroup_fd >= 0:
            os.close(self._cgroup_fd)
            self._cgroup_fd = -1
        self._ring = None
        if self.loaded is not None:
            self.loaded.close()
            self.loaded = None
            self.maps = {}

    def run(self, stop: threading.Event) -> None:
        """Poll events and scan counters until ``stop`` is set, then report the drops."""
        o = self.options
        scan_every = max(0.2, min(5.0, o.update_interval_s / 2, o.udp_idle_timeout_s / 2))
        next_scan = time.monotonic() + scan_every
        next_fill = time.monotonic()
        self._report_drops(time.time_ns(), always=True)  # marks the (re)start: counters from 0
        while not stop.is_set():
            handled = self.poll(o.poll_ms)
            if time.monotonic() >= next_scan:
                self.scan()
                next_scan = time.monotonic() + scan_every
            if o.on_map_fill is not None and time.monotonic() >= next_fill:
                o.on_map_fill(self.map_fill())
                next_fill = time.monotonic() + o.map_fill_interval_s
            if handled >= o.batch_min and not self._pending:
                stop.wait(o.batch_ms / 1000)
        self.poll(0)
        while self._pending:  # the backlog read ahead
            self.poll(0)
        self.scan(always_drops=True)

    # ---- events ----------------------------------------------------------------------------

    def _on_event(self, _ctx: Any, data: Any, size: int) -> int:
        # called from inside libbpf's poll (a ctypes callback: an exception would only be
        # printed): copy only, into one buffer (a bytes object per event, made while the flows'
        # long-lived objects are, would keep the heap of a burst's backlog from going back),
        # through a view of the record (string_at, a foreign call, cost twice as much)
        self._pending += EVENT_BYTES.from_address(data)
        return 0

    def poll(self, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` for kernel events and publish them; returns their number.

        Between chunks the ring buffer is drained into memory (a backlog handled by the next
        poll), so that a slow moment of user space delays events instead of losing them.
        """
        assert self._ring is not None, "load() first"
        self._ring.poll(0 if self._pending else timeout_ms)
        pending, self._pending = memoryview(self._pending), bytearray()
        make = Event._make
        chunk = HANDLE_CHUNK * EVENT.size
        for start in range(0, len(pending), chunk):
            if start and len(self._pending) < BACKLOG_MAX * EVENT.size:
                self._ring.consume()
            for values in EVENT.iter_unpack(pending[start:start + chunk]):
                self._handle(make(values))
            self._pack_tcp_burst()
        return len(pending) // EVENT.size

    def _handle(self, ev: Event) -> None:
        if ev.type == EV_RELEASE:
            self._udp_release(ev)
        elif ev.proto == PROTO_UDP:
            self._udp_start(ev)
        elif ev.type == EV_START:
            self._tcp_start(ev)
        elif ev.type in (EV_END, EV_FAILURE):
            self._tcp_end(ev)
        elif ev.type == EV_STATE:
            live = self._tcp.get(ev.cookie) or self._tcp_packed.get(ev.cookie)
            if live is not None:
                self._emit("STATE", ev.cookie, live, self._ns(ev.ts_ns), counters=ev[COUNTERS],
                           state=TCP_STATES.get(ev.state),
                           previous_state=TCP_STATES.get(ev.oldstate))

    def _live_of(self, proto: int, ev: Event) -> Live:
        return Live.new(proto, self._ns(ev.start_ns), ev.role, ev.family, ev.laddr, ev.lport,
                        ev.raddr, ev.rport, self._owner(ev[OWNER]))

    def _tcp_start(self, ev: Event, synthesized: bool = False) -> Live | None:
        cookie = ev.cookie
        packed = self._tcp_packed  # a new socket's cookie is above all of them: one compare
        if cookie in self._ended or cookie in self._tcp \
                or (cookie <= packed.last and cookie in packed):
            return None  # a first-I/O START racing the END on another CPU
        live = self._tcp[cookie] = self._live_of(PROTO_TCP, ev)
        self._emit("START", cookie, live, self._ns(ev.ts_ns),
                   counters=(0,) * 7 if synthesized else ev[COUNTERS], state="ESTABLISHED")
        return live

    def _tcp_end(self, ev: Event) -> None:
        failed = ev.type == EV_FAILURE
        cookie = ev.cookie
        live = self._tcp.pop(cookie, None) or self._tcp_packed.pop(cookie)
        if live is None and not failed:
            live = self._tcp_start(ev, synthesized=True)  # closed before any I/O, or lost
            self._tcp.pop(cookie, None)
        self._tcp_missing.discard(cookie)
        if live is None:
            live = self._live_of(PROTO_TCP, ev)
        elif live.owner is None and ev.owner_pid:
            live.owner = self._owner(ev[OWNER])
        if not failed:  # (a failed socket may connect() again)
            self._ended[cookie] = None
            if len(self._ended) > ENDED_MEMORY:
                self._ended.popitem(last=False)
        reason = end_reason(ev.type, ev.flags, ev.oldstate)
        self._emit("FAILURE" if failed else "END", cookie, live, self._ns(ev.ts_ns),
                   counters=ev[COUNTERS], state="CLOSE",
                   previous_state=TCP_STATES.get(ev.oldstate), reason=reason,
                   error=ERRORS.get(reason))

    def _udp_start(self, ev: Event) -> None:
        key = (ev.cookie, ev.raddr, ev.rport, ev.family)
        if key in self._udp:
            return
        live = self._live_of(PROTO_UDP, ev)
        self._udp_add(key, live)
        self._emit("START", ev.cookie, live, self._ns(ev.start_ns), counters=(0, 0, 0, 0))

    def _udp_add(self, key: UdpKey, live: Live) -> None:
        self._udp[key] = live
        self._udp_by_cookie.setdefault(key[0], set()).add(key)

    def _udp_release(self, ev: Event) -> None:
        table = self.maps["udp_flows"]
        for key in self._udp_by_cookie.pop(ev.cookie, set()):
            live = self._udp.pop(key)
            if live.owner is None and ev.owner_pid:
                live.owner = self._owner(ev[OWNER])
            value = table.take(self._udp_key(table, key))
            if value is None:
                continue
            self._emit("END", key[0], live, self._ns(ev.ts_ns), counters=_udp_counters(value),
                       reason="SOCKET_CLOSED")

    @staticmethod
    def _udp_key(table: bpfload.BpfMap, key: UdpKey) -> Any:
        ckey = table.Key()
        ckey.cookie = key[0]
        ct.memmove(ckey.raddr, key[1], 16)
        ckey.rport = key[2]
        ckey.family = key[3]
        return ckey

    # ---- periodic scan: UPDATE, RETRANSMIT, UDP idle, lost events, drops -------------------

    def scan(self, always_drops: bool = False) -> None:
        """Read the kernel's flow maps: publish UPDATEs, RETRANSMITs, idle UDP ENDs, DROPS."""
        self._sync_clock()
        now = time.time_ns()
        interval = int(self.options.update_interval_s * 1e9)
        self._scan_tcp(now, interval)
        self._scan_udp(now, interval)
        self._report_drops(now, always_drops)

    def _scan_tcp(self, now: int, interval: int) -> None:
        """The flows of the map a batch at a time: its cookies and, once a flow is due, the
        bytes read of the batch's sockets are numpy arrays (a set and a dict of 100,000 ints
        made at every scan cost 16 MB)."""
        self._pack_tcp()
        flows = self._tcp_packed
        known = flows.cookies()
        in_map: list[np.ndarray] = []
        read: tuple[np.ndarray, np.ndarray] | None = None  # see _bytes_read
        for keys, values, count in self.maps["tcp_flows"].batches():
            cookies = np.frombuffer(keys, np.uint64, count).copy()  # u64 keys
            in_map.append(cookies)
            batch_read: list[int] | None = None
            for i, (cookie, slot) in enumerate(zip(cookies.tolist(), flows.slots(cookies),
                                                   strict=True)):
                f = values[i]
                if slot >= 0:
                    live = None
                    reported = flows.reported(slot)
                else:
                    live = self._tcp.get(cookie)  # adopted by this scan (a batch may repeat)
                    if live is None:
                        if not f.flags & F_STARTED or cookie in self._ended:
                            continue
                        live = self._adopt_tcp(cookie, f)  # its START event was lost
                    reported = live.reported
                retrans = f.retrans
                due = now - reported[0] >= interval
                if not due and retrans <= reported[1]:
                    continue
                if live is None:
                    live = flows.at(slot)
                if batch_read is None:
                    read = read or self._bytes_read()
                    batch_read = _lookup(read, cookies)
                counters = _flow_counters(f, batch_read[i])
                if retrans > reported[1]:
                    live.report(reported[0], retrans, reported[2:])
                    self._emit("RETRANSMIT", cookie, live, now, counters=counters, rtt=_rtt(f),
                               state="ESTABLISHED")
                if due and counters != live.reported[2:]:
                    self._emit("UPDATE", cookie, live, now, counters=counters, rtt=_rtt(f),
                               state="ESTABLISHED")
            self._pack_tcp_burst()  # the flows adopted (after a burst's lost STARTs)
        unseen = known[~np.isin(known, np.concatenate(in_map))] if in_map else known
        missing = self._tcp_missing
        self._tcp_missing = set()
        for cookie in unseen.tolist():
            if cookie not in missing:
                self._tcp_missing.add(cookie)
            elif (live := flows.pop(cookie)) is not None:
                # gone at two scans and no END arrived: the END was lost
                self._emit("END", cookie, live, now, counters=live.reported[2:])

    def _bytes_read(self) -> tuple[np.ndarray, np.ndarray]:
        """The cookies of sk_cookie's sockets, sorted, and the bytes their applications read."""
        table = self.maps["sk_cookie"]
        fields = np.dtype({"names": ["cookie", "rx"], "formats": [np.uint64, np.uint64],
                           "offsets": [table.Leaf.cookie.offset, table.Leaf.rx.offset],
                           "itemsize": ct.sizeof(table.Leaf)})
        cookies, read = [], []
        for _, values, count in table.batches():
            info = np.frombuffer(values, fields, count)
            cookies.append(info["cookie"].copy())
            read.append(info["rx"].copy())
        if not cookies:
            return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
        all_cookies = np.concatenate(cookies)
        order = np.argsort(all_cookies)
        return all_cookies[order], np.concatenate(read)[order]

    def _owner_of(self, cookie: int) -> dict[str, Any] | None:
        """The owner the kernel recorded for a socket, for flows whose event did not carry it."""
        o = self.maps["owners"].lookup(ct.c_uint64(cookie))
        if o is None:
            return None
        return self._owner(tuple(getattr(o, name) for name in Owner._fields))

    def _pack_tcp(self) -> None:
        """Move the young TCP flows (started since the last scan, or the last TCP_YOUNG) into
        ``_tcp_packed``: those still followed then are the long-lived ones, which a host can
        have by the 100,000."""
        if self._tcp:
            self._tcp_packed.add(self._tcp.items())
            self._tcp = {}
        self._tcp_packed.index()

    def _pack_tcp_burst(self) -> None:
        """``_pack_tcp`` already if TCP_YOUNG flows are young (between two batches of events,
        or of a scan's flows: a flow being reported is not moved)."""
        if len(self._tcp) >= TCP_YOUNG:
            self._pack_tcp()

    def _adopt_tcp(self, cookie: int, f: Any) -> Live:
        start_ns = self._ns(f.start_ns)
        live = self._tcp[cookie] = Live.new(PROTO_TCP, start_ns, f.role, f.family,
                                            bytes(f.laddr), f.lport, bytes(f.raddr), f.rport,
                                            self._owner_of(cookie))
        self._emit("START", cookie, live, start_ns, counters=(0, 0, 0, 0), state="ESTABLISHED")
        return live

    def _scan_udp(self, now: int, interval: int) -> None:
        table = self.maps["udp_flows"]
        idle = int(self.options.udp_idle_timeout_s * 1e9)
        for ckey, value in table.items():
            key = (ckey.cookie, bytes(ckey.raddr), ckey.rport, ckey.family)
            live = self._udp.get(key)
            if live is None:  # its START event was lost
                start_ns = self._ns(value.start_ns)
                live = Live.new(PROTO_UDP, start_ns, value.role, ckey.family,
                                bytes(value.laddr), value.lport, key[1], ckey.rport,
                                self._owner_of(ckey.cookie))
                self._udp_add(key, live)
                self._emit("START", key[0], live, start_ns, counters=(0, 0, 0, 0))
            elif live.owner is None:  # a socket older than the sensor: owned at first I/O
                live.owner = self._owner_of(ckey.cookie)
            counters = _udp_counters(value)
            if now - self._ns(value.last_ns) >= idle:
                self._udp.pop(key, None)
                self._udp_by_cookie.get(key[0], set()).discard(key)
                value = table.take(ckey)  # with what came since the map was read
                if value is None:
                    continue
                self._emit("END", key[0], live, self._ns(value.last_ns),
                           counters=_udp_counters(value), reason="IDLE")
            elif now - (reported := live.reported)[0] >= interval and counters != reported[2:]:
                self._emit("UPDATE", key[0], live, now, counters=counters)

    def _report_drops(self, now: int, always: bool) -> None:
        table = self.maps["drops"]
        drops = tuple(table.sum(ct.c_int(i)) for i in range(len(DROP_FIELDS)))
        if drops == self._drops and not always:
            return
        if any(d > p for d, p in zip(drops, self._drops, strict=True)):
            log.warning("eBPF sensor losses: %s", dict(zip(DROP_FIELDS, drops, strict=True)))
        self._drops = drops
        record = dict(self._fields)
        record.update(type="DROPS", host_name=self.options.host_name, boot_id=self.boot_id,
                      cookie=0, timestamp_ns=now, event_id=self._event_id("0||DROPS", now),
                      drops=dict(zip(DROP_FIELDS, drops, strict=True)))
        self.publish(TOPIC, f"{self.options.host_name}:drops", record)

    def map_fill(self) -> dict[str, float]:
        """Entries / max_entries of each BPF hash map (near 1: new sockets go untracked)."""
        return {name: self.maps[name].count() / self.maps[name].max_entries
                for name in HASH_MAPS}

    @property
    def drops(self) -> dict[str, int]:
        """The latest loss counters read from the kernel."""
        return dict(zip(DROP_FIELDS, self._drops, strict=True))

    # ---- records ---------------------------------------------------------------------------

    def _sync_clock(self) -> None:
        self._boot_offset = time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)

    def _ns(self, boot_ns: int) -> int:
        """Epoch nanoseconds of a bpf_ktime_get_boot_ns() value."""
        return boot_ns + self._boot_offset

    def _address(self, family: int, local: bytes, remote: bytes) -> tuple[str, str, str]:
        """(ECS network.type, local, remote address text) of a flow's ends, remembered: a host
        talks with few addresses."""
        key = (family, local, remote)
        if len(self._addresses) >= ADDRESS_CACHE:
            self._addresses.clear()
        network, local_text = address(local, family)
        text = self._addresses[key] = (network, local_text, address(remote, family)[1])
        return text

    def _owner(self, facts: tuple[Any, ...]) -> dict[str, Any] | None:
        """The record fields (process, cgroup, container, netns; shared, read-only) of kernel
        owner facts (an ``Owner`` tuple); cached briefly so that a process opening many
        sockets costs one /proc read per OWNER_TTL_NS."""
        now = time.monotonic_ns()
        cached = self._owners.get(facts)
        if cached is not None and now - cached[0] < OWNER_TTL_NS:
            return cached[1]
        owner = Owner._make(facts)
        if not owner.pid:
            return None
        comm = owner.comm.split(b"\0", 1)[0].decode(errors="replace")
        record = self.processes.lookup(owner.pid, comm=comm,
                                       tid=owner.tid, uid=owner.uid, gid=owner.gid,
                                       cgroup_id=owner.cgroup_id)
        if record.get("container_id") is None and record.get("cgroup_path"):
            ref = container_from_cgroup_path(record["cgroup_path"])
            record["container_id"] = ref.container_id if ref else None
        result = {"process": record, "process_source": SOURCES.get(owner.source),
                  "netns_inode": self.netns.inode(owner.netns, owner.pid),
                  "cgroup_id": record.get("cgroup_id"), "container_id": record.get("container_id")}
        self._owners[facts] = (now, result)
        self._owners.move_to_end(facts)
        if len(self._owners) > OWNER_CACHE:
            self._owners.popitem(last=False)
        return result

    def _event_id(self, text: str, ts: int) -> str:
        """Hex digest of host, boot id, ``text`` (cookie, remote end, type) and ``ts``."""
        hasher = self._id_prefix.copy()
        hasher.update(f"{text}|{ts}".encode())
        return hasher.hexdigest()

    def _emit(self, kind: str, cookie: int, live: Live, ts: int, *,
              counters: tuple[int, ...] = (), rtt: tuple[int, int, int] | None = None,
              **extra: Any) -> None:
        values = live.values()
        (_, retrans, _, _, _, _, start_ns, local_port, remote_port, proto, role, family,
         local_addr, remote_addr) = values
        network, local_ip, remote_ip = (self._addresses.get(values[-3:])  # family, addresses
                                        or self._address(family, local_addr, remote_addr))
        record = self._template.copy()
        (record["cookie"], record["start_ns"], record["transport"], record["family"],
         record["role"], record["local_ip"], record["local_port"], record["remote_ip"],
         record["remote_port"]) = (cookie, start_ns, TRANSPORTS[proto], network, ROLES[role],
                                   local_ip, local_port, remote_ip, remote_port)
        if live.owner is not None:
            record.update(live.owner)
        record["type"] = kind
        record["timestamp_ns"] = ts
        record["event_id"] = self._event_id(f"{cookie}|{remote_ip}:{remote_port}|{kind}", ts)
        if kind != "START":
            record["duration_ns"] = max(0, ts - start_ns)
        if counters:
            reported = counters[:4]
            (record["bytes_sent"], record["bytes_received"], record["packets_sent"],
             record["packets_received"]) = reported
            if kind not in LAST:  # a flow's last record: its Live is dropped
                live.report(ts, retrans, reported)
            if len(counters) > 4:
                record["srtt_us"], record["rttvar_us"], record["retransmits"] = counters[4:7]
        if rtt is not None:
            record["srtt_us"], record["rttvar_us"], record["retransmits"] = rtt
        if extra:
            record.update(extra)
        self.publish(TOPIC, f"{self.options.host_name}:{cookie}", record)


def _flow_counters(f: Any, read: int) -> tuple[int, ...]:
    """Counters of a live TCP flow from its map entry (see tcp_fill_event in flows.c) and the
    bytes its application ``read`` (newer than the entry when the socket only receives)."""
    sent = f.bytes_acked - f.acked0 - (1 if f.flags & F_FIN_ACKED else 0)
    received = f.bytes_received - f.rcvd0 - (1 if f.flags & F_FIN_IN else 0)
    return (max(0, sent), max(received, read), f.segs_out, f.segs_in)


def _lookup(table: tuple[np.ndarray, np.ndarray], cookies: np.ndarray) -> list[int]:
    """The value of each of ``cookies`` in ``table`` (sorted keys, values); 0 if absent."""
    keys, values = table
    if not len(keys):
        return [0] * len(cookies)
    at = np.minimum(np.searchsorted(keys, cookies), len(keys) - 1)
    return np.where(keys[at] == cookies, values[at], 0).tolist()


def _rtt(f: Any) -> tuple[int, int, int]:
    return (f.srtt_us, f.rttvar_us, f.retrans)


def _udp_counters(v: Any) -> tuple[int, ...]:
    return (v.tx_bytes, v.rx_bytes, v.tx_pkts, v.rx_pkts)


def run(publish: Callable[[str, str, dict[str, Any]], None], stop: threading.Event,
        options: EbpfOptions, ready: Callable[[], None] | None = None) -> None:
    """Follow every TCP and UDP flow of the host and ``publish`` raw.ebpf records until ``stop``;
    ``ready`` is called once the programs are compiled and attached."""
    ok, why = available()
    if not ok:
        raise RuntimeError(f"eBPF sensor unavailable: {why}")
    sensor = EbpfSensor(options, publish)
    try:
        sensor.load()
        log.info("eBPF sensor attached to %s", options.cgroup_root or cgroup2_root())
        if ready is not None:
            ready()
        sensor.run(stop)
    finally:
        sensor.close()
