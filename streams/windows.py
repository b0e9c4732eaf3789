"""Per-container and per-pod windows, pure logic: socket activity (cumulative, from the flow
stage) is turned into deltas against what each socket already counted, kept in the same state,
so a replayed activity counts nothing twice, and added to per-step buckets; tumbling (one step)
and hopping (several steps) windows are merges of buckets, emitted as
``packetless.ContainerMetrics`` once closed. RTT quantiles come from DDSketch (mergeable, 1%
relative accuracy).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ddsketch import DDSketch
from ddsketch.mapping import LogarithmicMapping

from streams.flows import CLIENT, Activity

ACCURACY = 0.01
_COUNTERS = ("bytes_in", "bytes_out", "packets_in", "packets_out", "retransmits")
MAPPING = LogarithmicMapping(ACCURACY)  # DDSketch's own: bins are DDSketch bins


@dataclass
class RttAgg:
    """Mergeable RTT aggregate: exact count, sums and max, and a DDSketch for quantiles (kept as
    its bins: key -> count, so that it serializes to JSON)."""

    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    total_var: float = 0.0
    max: float = 0.0
    bins: dict[str, float] = field(default_factory=dict)

    def add(self, rtt_us: float, rttvar_us: float | None) -> None:
        self.n += 1
        self.total += rtt_us
        self.total_sq += rtt_us * rtt_us
        self.total_var += rttvar_us or 0.0
        self.max = max(self.max, rtt_us)
        key = str(MAPPING.key(max(rtt_us, 1.0)))
        self.bins[key] = self.bins.get(key, 0.0) + 1

    def merge(self, other: RttAgg) -> None:
        self.n += other.n
        self.total += other.total
        self.total_sq += other.total_sq
        self.total_var += other.total_var
        self.max = max(self.max, other.max)
        for key, count in other.bins.items():
            self.bins[key] = self.bins.get(key, 0.0) + count

    def stats(self) -> dict[str, Any]:
        """A ``packetless.RttStats`` record."""
        if not self.n:
            return {"samples": 0, "mean_us": None, "variance_us2": None, "mean_rttvar_us": None,
                    "p50_us": None, "p95_us": None, "p99_us": None, "max_us": None}
        sketch = DDSketch(ACCURACY)
        for key, count in self.bins.items():
            sketch.add(MAPPING.value(int(key)), count)
        mean = self.total / self.n
        return {"samples": self.n, "mean_us": mean,
                "variance_us2": max(self.total_sq / self.n - mean * mean, 0.0),
                "mean_rttvar_us": self.total_var / self.n,
                "p50_us": sketch.get_quantile_value(0.5), "p95_us": sketch.get_quantile_value(0.95),
                "p99_us": sketch.get_quantile_value(0.99), "max_us": self.max}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RttAgg:
        return cls(**data)


@dataclass
class Bucket:
    """One step of one entity. Distinct flows are counted without keeping flow ids: ``client``
    and ``server`` are histograms of sockets newly active in this step by ``gap``, the number
    of steps since their previous active step (the last slot: never, or a whole window ago). A
    socket is new to a window that starts after its previous active step."""

    client: list[int] = field(default_factory=list)
    server: list[int] = field(default_factory=list)
    started: int = 0
    failed: int = 0
    containers: list[str] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    packets_out: int = 0
    retransmits: int = 0
    rtt_client: RttAgg = field(default_factory=RttAgg)
    rtt_server: RttAgg = field(default_factory=RttAgg)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Bucket:
        data = dict(data)
        data["rtt_client"] = RttAgg.from_dict(data["rtt_client"])
        data["rtt_server"] = RttAgg.from_dict(data["rtt_server"])
        return cls(**data)


@dataclass
class Counted:
    """What the windows already counted of one socket (the latest of each of its counters)."""

    bytes_in: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    packets_out: int = 0
    retransmits: int = 0
    rtt_ns: int = 0  # event time of the latest RTT sample counted
    step_ms: int = 0  # its latest active step
    failed: bool = False
    closed: bool = False


@dataclass
class WindowConfig:
    """Window sizes (seconds): tumbling windows of one step, hopping windows of hop_s."""

    step_s: float = 10.0
    hop_s: float = 60.0
    grace_s: float = 5.0  # how long after its end a window waits for late activity
    # an open socket without activity for this long is forgotten (longer than the flow stage
    # keeps an idle flow: idle timeout plus linger)
    forget_s: float = 900.0

    @property
    def step_ms(self) -> int:
        return round(self.step_s * 1000)

    def closed_by(self, now_ms: int) -> int:
        """The end of the last step whose windows are closed at ``now_ms`` (past the grace)."""
        return (now_ms - round(self.grace_s * 1000)) // self.step_ms * self.step_ms

    @property
    def steps(self) -> int:
        """Steps per hopping window (also the largest gap counted)."""
        return max(math.ceil(self.hop_s / self.step_s), 1)

    @property
    def hop_ms(self) -> int:
        return self.steps * self.step_ms


def _distinct(buckets: list[Bucket | None], role: str) -> int:
    """Distinct sockets of ``role`` active in consecutive steps ``buckets`` (oldest first)."""
    total = 0
    for j, b in enumerate(buckets):
        if b is not None:
            hist = b.client if role == CLIENT else b.server
            total += sum(hist[j + 1:])
    return total


@dataclass
class EntityState:
    """The windows state of one container or pod: per-step buckets not yet forgotten."""

    entity: str
    entity_type: str
    host: str = ""
    name: str | None = None
    namespace: str | None = None
    pod_name: str | None = None
    image: str | None = None
    buckets: dict[str, Bucket] = field(default_factory=dict)
    sockets: dict[str, Counted] = field(default_factory=dict)  # by Activity.socket
    emitted_upto_ms: int = 0  # windows ending at or before this were emitted
    late: int = 0  # activities that arrived after their window was emitted

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EntityState:
        data = dict(data)
        data["buckets"] = {k: Bucket.from_dict(v) for k, v in data["buckets"].items()}
        data["sockets"] = {k: Counted(**v) for k, v in data.get("sockets", {}).items()}
        return cls(**data)

    def describe(self, name: str | None, namespace: str | None, pod_name: str | None,
                 image: str | None) -> None:
        """Names from container metadata (the latest known win)."""
        self.name = name or self.name
        self.namespace = namespace or self.namespace
        self.pod_name = pod_name or self.pod_name
        self.image = image or self.image

    def apply(self, act: Activity, cfg: WindowConfig) -> bool:
        """Add to its step what ``act`` says its socket did since what was counted of it (a
        repeated activity adds nothing); False (and nothing added) when that step's windows
        were already emitted."""
        self.host = act.host
        step = cfg.step_ms
        start = act.ts_ns // 1_000_000 // step * step
        if not self.emitted_upto_ms:
            self.emitted_upto_ms = start
        if start + step <= self.emitted_upto_ms:
            self.late += 1
            return False
        counted = self.sockets.get(act.socket)
        started = counted is None
        if counted is None:
            counted = self.sockets[act.socket] = Counted()
            gap: int | None = cfg.steps  # new: counted in every window that holds this step
        else:
            gap = min((start - counted.step_ms) // step, cfg.steps) if start > counted.step_ms \
                else None
        deltas: dict[str, int] = {}
        for name in _COUNTERS:
            now, was = getattr(act, name), getattr(counted, name)
            deltas[name] = max(now - was, 0)
            setattr(counted, name, max(now, was))
        sample = act.rtt_us is not None and act.rtt_ns > counted.rtt_ns
        failed = act.failed and not counted.failed and act.role == CLIENT
        counted.rtt_ns = max(counted.rtt_ns, act.rtt_ns)
        counted.step_ms = max(counted.step_ms, start)
        counted.failed = counted.failed or act.failed
        counted.closed = counted.closed or act.closed
        if gap is None and not any(deltas.values()) and not sample and not failed:
            return True
        b = self.buckets.get(str(start))
        if b is None:
            b = self.buckets[str(start)] = Bucket(client=[0] * (cfg.steps + 1),
                                                  server=[0] * (cfg.steps + 1))
        if gap is not None:
            (b.client if act.role == CLIENT else b.server)[gap] += 1
        b.started += started
        b.failed += failed
        if act.container_id not in b.containers:
            b.containers.append(act.container_id)
        for name, delta in deltas.items():
            setattr(b, name, getattr(b, name) + delta)
        if sample:
            (b.rtt_client if act.role == CLIENT else b.rtt_server).add(act.rtt_us, act.rttvar_us)
        return True

    def close(self, now_ms: int, cfg: WindowConfig,
              emitted_ms: int | None = None) -> list[dict[str, Any]]:
        """The ContainerMetrics records of the windows that closed by ``now_ms`` (event time:
        the watermark), stamped ``emitted_ms`` (the wall clock; default ``now_ms``); forgets the
        steps no open window needs."""
        step, hop, n = cfg.step_ms, cfg.hop_ms, cfg.steps
        emitted_ms = now_ms if emitted_ms is None else emitted_ms
        limit = cfg.closed_by(now_ms)
        ends = sorted({int(b) + step * k for b in self.buckets for k in range(1, n + 1)
                       if self.emitted_upto_ms < int(b) + step * k <= limit})
        out = []
        for end in ends:
            tumbling = self.buckets.get(str(end - step))
            if tumbling is not None:
                out.append(self._record(end - step, step, step, [tumbling], emitted_ms))
            if n > 1:
                covered = [self.buckets.get(str(end - hop + step * j)) for j in range(n)]
                if any(covered):
                    out.append(self._record(end - hop, hop, step, covered, emitted_ms))
        self.emitted_upto_ms = max(self.emitted_upto_ms, limit)
        self.buckets = {s: b for s, b in self.buckets.items() if int(s) >= limit - hop}
        # a closed socket's activity is late from now on; an open one may resume
        forget = self.emitted_upto_ms - round(cfg.forget_s * 1000)
        self.sockets = {k: c for k, c in self.sockets.items()
                        if c.step_ms + step > (self.emitted_upto_ms if c.closed else forget)}
        return out

    def idle(self) -> bool:
        """Nothing left to emit and no open socket: the entity can be forgotten."""
        return not self.buckets and not self.sockets

    def _record(self, start: int, size: int, step: int, buckets: list[Bucket | None],
                now_ms: int) -> dict[str, Any]:
        present = [b for b in buckets if b is not None]
        rtt_client, rtt_server = RttAgg(), RttAgg()
        for b in present:
            rtt_client.merge(b.rtt_client)
            rtt_server.merge(b.rtt_server)

        def total(name: str) -> int:
            return sum(getattr(b, name) for b in present)

        return {
            "entity_type": self.entity_type, "entity_id": self.entity,
            "name": self.name, "namespace": self.namespace, "pod_name": self.pod_name,
            "image": self.image if self.entity_type == "CONTAINER" else None,
            "host_name": self.host,
            "containers": len({c for b in present for c in b.containers}),
            "window_start_ms": start, "window_end_ms": start + size,
            "window_size_ms": size, "window_step_ms": step,
            "flows_as_client": _distinct(buckets, CLIENT),
            "flows_as_server": _distinct(buckets, "server"),
            "flows_started": total("started"), "failed_connects": total("failed"),
            "bytes_in": total("bytes_in"), "bytes_out": total("bytes_out"),
            "packets_in": total("packets_in"), "packets_out": total("packets_out"),
            "retransmits": total("retransmits"),
            "rtt_as_client": rtt_client.stats(), "rtt_as_server": rtt_server.stats(),
            "emitted_ms": now_ms,
        }
