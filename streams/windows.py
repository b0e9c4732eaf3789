"""Per-container and per-pod windows, pure logic: socket activity (cumulative counters) becomes
per-step buckets of deltas and RTT sketches; tumbling (one step) and hopping (several steps)
windows are merges of buckets, emitted as ``packetless.ContainerMetrics`` once closed.

Deltas are taken against the last counters seen per socket, so repeated or reordered activity
counts once. RTT quantiles come from DDSketch (mergeable, 1% relative accuracy).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ddsketch import DDSketch
from ddsketch.mapping import LogarithmicMapping

from streams.flows import CLIENT, Activity

ACCURACY = 0.01
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
    """One step of one entity: deltas and distinct flows (sets kept as sorted lists)."""

    flows_client: list[str] = field(default_factory=list)
    flows_server: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    packets_out: int = 0
    retransmits: int = 0
    rtt_client: RttAgg = field(default_factory=RttAgg)
    rtt_server: RttAgg = field(default_factory=RttAgg)

    def merge(self, other: Bucket) -> None:
        for name in ("flows_client", "flows_server", "started", "failed", "containers"):
            setattr(self, name, sorted(set(getattr(self, name)) | set(getattr(other, name))))
        for name in ("bytes_in", "bytes_out", "packets_in", "packets_out", "retransmits"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.rtt_client.merge(other.rtt_client)
        self.rtt_server.merge(other.rtt_server)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Bucket:
        data = dict(data)
        data["rtt_client"] = RttAgg.from_dict(data["rtt_client"])
        data["rtt_server"] = RttAgg.from_dict(data["rtt_server"])
        return cls(**data)


def _add(items: list[str], item: str) -> None:
    if item not in items:
        items.append(item)
        items.sort()


@dataclass
class WindowConfig:
    """Window sizes (seconds): tumbling windows of one step, hopping windows of hop_s."""

    step_s: float = 10.0
    hop_s: float = 60.0
    grace_s: float = 5.0  # how long after its end a window waits for late activity
    socket_linger_s: float = 120.0  # counters of a quiet closed socket are forgotten after this

    @property
    def step_ms(self) -> int:
        return round(self.step_s * 1000)

    @property
    def hop_ms(self) -> int:
        return math.ceil(self.hop_s / self.step_s) * self.step_ms


@dataclass
class SocketMark:
    """The counters of one socket already counted in buckets."""

    bytes_in: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    packets_out: int = 0
    retransmits: int = 0
    rtt_ns: int = 0
    last_ns: int = 0
    failed: bool = False
    closed: bool = False


@dataclass
class EntityState:
    """The windows state of one container or pod."""

    entity: str
    entity_type: str
    host: str = ""
    name: str | None = None
    namespace: str | None = None
    pod_name: str | None = None
    image: str | None = None
    sockets: dict[str, SocketMark] = field(default_factory=dict)
    buckets: dict[str, Bucket] = field(default_factory=dict)
    emitted_upto_ms: int = 0  # windows ending at or before this were emitted
    late: int = 0  # activity that arrived after its window was emitted

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EntityState:
        data = dict(data)
        data["sockets"] = {k: SocketMark(**v) for k, v in data["sockets"].items()}
        data["buckets"] = {k: Bucket.from_dict(v) for k, v in data["buckets"].items()}
        return cls(**data)

    def describe(self, name: str | None, namespace: str | None, pod_name: str | None,
                 image: str | None) -> None:
        """Names from container metadata (the latest known win)."""
        self.name = name or self.name
        self.namespace = namespace or self.namespace
        self.pod_name = pod_name or self.pod_name
        self.image = image or self.image

    def apply(self, act: Activity, cfg: WindowConfig) -> bool:
        """Count what ``act`` adds to what was already counted; False when it was late."""
        self.host = act.host
        sock_key = f"{act.host}:{act.cookie}"
        mark = self.sockets.get(sock_key)
        new = mark is None
        mark = mark or SocketMark()
        self.sockets[sock_key] = mark
        step = cfg.step_ms
        start = act.ts_ns // 1_000_000 // step * step
        if not self.emitted_upto_ms:
            self.emitted_upto_ms = start
        late = start + step <= self.emitted_upto_ms
        bucket = Bucket() if late else self.buckets.setdefault(str(start), Bucket())
        deltas = {"bytes_in": act.bytes_in - mark.bytes_in, "bytes_out": act.bytes_out - mark.bytes_out,
                  "packets_in": act.packets_in - mark.packets_in,
                  "packets_out": act.packets_out - mark.packets_out,
                  "retransmits": act.retransmits - mark.retransmits}
        for name, delta in deltas.items():
            if delta > 0:
                setattr(bucket, name, getattr(bucket, name) + delta)
                setattr(mark, name, getattr(mark, name) + delta)
        _add(bucket.flows_client if act.role == CLIENT else bucket.flows_server, act.flow_id)
        _add(bucket.containers, act.container_id)
        if new:
            _add(bucket.started, act.flow_id)
        if act.failed and not mark.failed and act.role == CLIENT:
            _add(bucket.failed, act.flow_id)
        mark.failed = mark.failed or act.failed
        if act.srtt_us is not None and act.rtt_ns > mark.rtt_ns:
            (bucket.rtt_client if act.role == CLIENT else bucket.rtt_server).add(
                act.srtt_us, act.rttvar_us)
            mark.rtt_ns = act.rtt_ns
        mark.last_ns = max(mark.last_ns, act.ts_ns)
        mark.closed = mark.closed or act.closed
        self.late += late
        return not late

    def close(self, now_ms: int, cfg: WindowConfig) -> list[dict[str, Any]]:
        """The ContainerMetrics records of the windows that closed by ``now_ms``; prunes state."""
        step, hop = cfg.step_ms, cfg.hop_ms
        limit = (now_ms - round(cfg.grace_s * 1000)) // step * step
        ends = sorted({int(b) + step * k for b in self.buckets for k in range(1, hop // step + 1)
                       if self.emitted_upto_ms < int(b) + step * k <= limit})
        out = []
        for end in ends:
            tumbling = self.buckets.get(str(end - step))
            if tumbling is not None:
                out.append(self._record(end - step, step, step, tumbling, now_ms))
            if hop > step:
                merged = Bucket()
                covered = [b for s, b in self.buckets.items() if end - hop <= int(s) < end]
                for b in covered:
                    merged.merge(b)
                if covered:
                    out.append(self._record(end - hop, hop, step, merged, now_ms))
        self.emitted_upto_ms = max(self.emitted_upto_ms, limit)
        self.buckets = {s: b for s, b in self.buckets.items() if int(s) >= limit - hop}
        linger_ns = round(cfg.socket_linger_s * 1e9)
        self.sockets = {k: m for k, m in self.sockets.items()
                        if not (m.closed and m.last_ns < limit * 1_000_000 - linger_ns)}
        return out

    def idle(self) -> bool:
        """Nothing left to emit or to remember: the entity can be forgotten."""
        return not self.buckets and not self.sockets

    def _record(self, start: int, size: int, step: int, b: Bucket, now_ms: int) -> dict[str, Any]:
        return {
            "entity_type": self.entity_type, "entity_id": self.entity,
            "name": self.name, "namespace": self.namespace, "pod_name": self.pod_name,
            "image": self.image if self.entity_type == "CONTAINER" else None,
            "host_name": self.host, "containers": len(b.containers),
            "window_start_ms": start, "window_end_ms": start + size,
            "window_size_ms": size, "window_step_ms": step,
            "flows_as_client": len(b.flows_client), "flows_as_server": len(b.flows_server),
            "flows_started": len(b.started), "failed_connects": len(b.failed),
            "bytes_in": b.bytes_in, "bytes_out": b.bytes_out,
            "packets_in": b.packets_in, "packets_out": b.packets_out,
            "retransmits": b.retransmits,
            "rtt_as_client": b.rtt_client.stats(), "rtt_as_server": b.rtt_server.stats(),
            "emitted_ms": now_ms,
        }
