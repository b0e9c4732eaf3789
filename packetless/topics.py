"""The topics of SPEC.md, defined once: name suffix, value format, schema and layout.

Every full topic name is ``settings.topic_prefix + suffix`` (default prefix ``packetless.``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from packetless.config import Settings

DAY_MS = 24 * 3600 * 1000
# how long a removed container's metadata is kept (for the last events of its flows): in the
# workers' caches, and uncompacted on meta.containers (its REMOVED record, then a tombstone)
REMOVED_CONTAINER_KEEP_MS = 3600 * 1000


@dataclass(frozen=True)
class Topic:
    """One topic: its suffix, what it holds and how it is laid out."""

    suffix: str
    doc: str
    schema: str | None  # Avro record type in schemas/, None for JSON topics
    partitions: int = 4
    compacted: bool = False
    retention_ms: int = 7 * DAY_MS
    extra: dict[str, str] = field(default_factory=dict)

    def config(self) -> dict[str, str]:
        """Topic-level broker configuration."""
        conf = {"cleanup.policy": "compact" if self.compacted else "delete"}
        if not self.compacted:
            conf["retention.ms"] = str(self.retention_ms)
        conf.update(self.extra)
        return conf


TOPICS: dict[str, Topic] = {
    t.suffix: t
    for t in (
        Topic("raw.ebpf", "per-socket flow events from eBPF", "EbpfEvent", retention_ms=DAY_MS),
        Topic("raw.netlink", "sock_diag snapshots and interface counters", "NetlinkEvent",
              retention_ms=DAY_MS),
        Topic("meta.containers", "container metadata and lifecycle, key = container id",
              "Container", partitions=1, compacted=True,
              extra={"min.compaction.lag.ms": str(REMOVED_CONTAINER_KEEP_MS)}),
        Topic("meta.processes", "process metadata and lineage (exec, exit)", "ProcessEvent",
              partitions=1),
        Topic("flows", "enriched flows: START, UPDATE, END", "Flow"),
        Topic("flows.ecs", "flow events as Elastic Common Schema JSON", None),
        Topic("flows.ocsf", "flow events as OCSF Network Activity JSON", None),
        Topic("metrics.containers", "windowed per-container and per-pod statistics",
              "ContainerMetrics", partitions=1),
        Topic("dlq", "input that could not be processed, with the reason", "DeadLetter",
              partitions=1, retention_ms=30 * DAY_MS),
    )
}


def topic_name(settings: Settings, suffix: str) -> str:
    """The full name of topic ``suffix`` under the configured prefix."""
    if suffix not in TOPICS:
        raise KeyError(f"unknown topic {suffix!r}; known: {', '.join(TOPICS)}")
    return settings.topic_prefix + suffix


def topic_for_name(settings: Settings, name: str) -> Topic:
    """The topic definition for a full topic name (with or without the prefix)."""
    suffix = name.removeprefix(settings.topic_prefix)
    if suffix not in TOPICS:
        raise KeyError(f"{name!r} is not a Packetless topic; known: "
                       + ", ".join(settings.topic_prefix + s for s in TOPICS))
    return TOPICS[suffix]
