"""The Faust stream worker: raw sensor records -> enriched flows (Avro, ECS, OCSF) and
per-container/pod windows, with state in RocksDB tables (rocksdict) backed by changelog topics.

Stages: raw stage (a librdkafka consumer thread outside Faust: decode, dead-letter, repartition
by flow 5-tuple) -> flows agent (flows table, flow events, activity repartitioned by
container/pod) -> windows agent (windows table, ContainerMetrics). Timeouts and window closing
run on records in the internal topics (watermarks, see below), so that every table change
happens in stream context and is changelogged. Every
stage works on batches (internal messages of at most ``MESSAGE_ROWS`` items, one table write per
key per batch); output records go through librdkafka, flushed before the batch's table writes
and before its input is acked.

Memory stays bounded however far behind the worker is (it reads more slowly, it does not grow):
librdkafka reads at most ``RAW_PREFETCH_KB`` of raw records ahead; Faust holds at most
``QUEUE_MESSAGES`` internal messages per topic and an agent takes ``BATCH_MESSAGES`` at a time;
a flows batch ends at ``FLOW_BATCH`` observations (and a tick loads at most that many due flows),
so its output records and table writes are bounded too; a stage waits until at most
``CHANGELOG_PENDING`` of its table writes wait for Faust's producer; RocksDB memtables and
block cache per table partition are ``ROCKSDB``.

Watermarks (event time, see ``streams.flows.Clock``): the observations of one flows partition
come from every raw partition of both raw topics (eBPF, Netlink), read by the raw stages of all
workers. After each batch, and every ``tick_s`` when idle, a raw stage sends each flows partition,
behind the batch's observations, the progress of each raw partition it reads: the wall clock
(less one fetch wait) when it has read all the partition held, else the latest event time read
in it (a sensor publishes its records about in order; the END grace covers the rest). The flows
agent keeps the highest progress of each raw partition per flows partition; the partition's
watermark is the lowest over all raw partitions (0 until each reported). A quiet or empty raw
partition is caught up, so its progress is the wall clock and stalls nothing; one whose reader
died holds the watermark until the group gives it to another worker. Each watermark record is
also the flows partition's tick. After a batch with watermarks, the flows agent passes its
partitions' watermarks on to every activity partition, behind the batch's activity; the windows
of an activity partition close (step end + grace) at the lowest watermark over all flows
partitions, so that a worker behind, or restarted on a backlog, counts every flow in its windows
instead of closing them on the wall clock before their activity came.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sys
import threading
import time
import weakref
import zlib
from collections import defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import faust
import orjson
from aiokafka import AIOKafkaConsumer
from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import NewTopic
from faust.streams import _current_event
from mode.utils.times import want_seconds
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client import Counter as PCounter

from packetless import heap
from packetless.config import Settings
from packetless.kafka import (
    PRODUCER_DEFAULTS,
    admin,
    create_topics,
    dead_letter_record,
    ensure_schemas,
    ensure_topics,
)
from packetless.ports import port_free, port_taken_message
from packetless.serde import Codec, DecodeError
from packetless.topics import topic_name
from streams import ecs, ocsf
from streams.flows import (
    Activity,
    Clock,
    DueIndex,
    Emission,
    FlowConfig,
    FlowState,
    LocalAddresses,
    Observation,
    activity,
    due,
    expired,
    network,
    next_due,
    observe,
)
from streams.meta import Awaiting, MetaCache
from streams.raw import Listeners, RawDecoder, from_ebpf, from_netlink
from streams.records import awaited, container_of, enrichment, flow_record
from streams.windows import EntityState, WindowConfig

log = logging.getLogger(__name__)

WATERMARK_KEY = b"\x00watermark"  # internal messages carry raw stage progress (see RawStage)
BATCH_KEY = b"\x00batch"  # internal messages carry a list of observations or activities
LOCAL_KEY = b"\x00local"  # ... or [host, address] pairs of local sockets (see RawStage)
LOCAL_RESEND_S = 30.0  # how often a raw stage sends all the local addresses it knows again
BATCH_MAX = 5000  # records per batch of a stage
MESSAGE_BYTES = 900_000  # an internal message stays below Kafka's default limit (1 MiB)
MESSAGE_ROWS = 1000  # items per internal message
FLOW_BATCH = 20_000  # observations and due flows per batch of the flows stage
BATCH_MESSAGES = 128  # internal messages an agent takes at a time
QUEUE_MESSAGES = 256  # internal messages Faust holds per topic (it stops fetching at 80 %)
RAW_PREFETCH_KB = 16384  # raw records librdkafka reads ahead of the raw stage
CHANGELOG_PENDING = BATCH_MAX  # table writes Faust may hold unsent when a batch ends
CHANGELOG_BATCH_BYTES = 262_144  # per changelog partition and request (Faust's default: 16 KiB)
# RocksDB of each table partition: 2 memtables of 8 MiB, 16 MiB of block cache (Faust's
# defaults: 3 of 64 MiB and 2 GiB)
ROCKSDB = {"write_buffer_size": 8 << 20, "max_write_buffer_number": 2,
           "block_cache_size": 16 << 20}
BATCH_WITHIN_S = 0.02  # a stage waits at most this long to fill a batch
FETCH_WAIT_MS = 100  # the raw consumer's fetch wait: how stale its idea of a partition's end is
VIEW_KEEP_MS = 15 * 60 * 1000  # entities leave the web views (and /metrics) this long after their last window
RTT_QUANTILES = {"0.5": "p50_us", "0.95": "p95_us", "0.99": "p99_us"}  # label -> RttStats field
METRICS_BACKLOG = 5000  # records of metrics.containers re-read at start for the web views
PROMETHEUS_TYPE = "text/plain; version=0.0.4"  # aiohttp refuses a charset parameter here


# tuning option (CLI keyword / PACKETLESS_<NAME> variable) -> (section, attribute)
TUNING = {
    "streams_partitions": (None, "partitions"), "tick_interval": (None, "tick_s"),
    "active_timeout": ("flow", "active_timeout_s"), "idle_timeout": ("flow", "idle_timeout_s"),
    "join_delay": ("flow", "join_delay_s"), "end_grace": ("flow", "end_grace_s"),
    "flow_linger": ("flow", "linger_s"), "window_step": ("windows", "step_s"),
    "window_hop": ("windows", "hop_s"), "window_grace": ("windows", "grace_s"),
}


@dataclass
class StreamOptions:
    """Tuning of the worker (see ``TUNING`` for the option names; seconds unless said)."""

    partitions: int = 4  # of the internal repartition topics and the tables
    tick_s: float = 0.25
    flow: FlowConfig = field(default_factory=FlowConfig)
    windows: WindowConfig = field(default_factory=WindowConfig)

    @classmethod
    def from_options(cls, **overrides: Any) -> StreamOptions:
        """Defaults, then the command's tuning options (None ignored)."""
        values = {k: v for k, v in overrides.items() if v is not None}
        opts = cls()
        for name, value in values.items():
            if name not in TUNING:
                raise TypeError(f"unknown streams option {name!r}; known: {', '.join(TUNING)}")
            section, attr = TUNING[name]
            target = getattr(opts, section) if section else opts
            setattr(target, attr, type(getattr(target, attr))(value))
        return opts


class Metrics:
    """Prometheus metrics of the worker (own registry, served at /metrics)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.records = PCounter("packetless_streams_events", "Input records read, by topic",
                                ["topic"], registry=r)
        self.dead = PCounter("packetless_streams_dead_letters", "Records sent to the DLQ",
                             ["error_type"], registry=r)
        self.flow_events = PCounter("packetless_streams_flow_events", "Flow events emitted",
                                    ["type"], registry=r)
        self.flow_event_types = {t: self.flow_events.labels(t) for t in ("START", "UPDATE", "END")}
        self.windows = PCounter("packetless_streams_window_records",
                                "ContainerMetrics records emitted", ["entity_type"], registry=r)
        self.errors = PCounter("packetless_streams_processing_errors",
                               "Internal records a stage failed on (logged)", ["stage"], registry=r)
        self.late = PCounter("packetless_streams_late_activity",
                             "Activity that arrived after its window was emitted", registry=r)
        self.rate = Gauge("packetless_streams_events_per_second",
                          "Raw records processed per second (last 10 s)", registry=r)
        self.lag = Gauge("packetless_streams_consumer_lag", "Raw records not yet processed",
                         ["topic", "partition"], registry=r)
        self.tables = Gauge("packetless_streams_table_keys", "Keys in a local table",
                            ["table"], registry=r)
        self.meta = Gauge("packetless_streams_metadata_entries", "Known containers, processes",
                          ["kind"], registry=r)
        self.container_rtt = Gauge("packetless_container_rtt_seconds",
                                   "RTT of a container's TCP flows in its last closed 10 s window",
                                   ["container", "quantile", "role"], registry=r)
        self.container_bytes = PCounter("packetless_container_bytes",
                                        "Payload bytes of a container's flows, by closed window",
                                        ["container", "direction"], registry=r)
        self.processed: deque[tuple[float, int]] = deque(maxlen=20)
        self.total = 0

    def observe_window(self, record: dict[str, Any]) -> None:
        """Per-container series from a closed tumbling ContainerMetrics window."""
        name = _series_name(record)
        self.container_bytes.labels(name, "in").inc(record["bytes_in"])
        self.container_bytes.labels(name, "out").inc(record["bytes_out"])
        for role in ("client", "server"):
            stats = record[f"rtt_as_{role}"]
            for quantile, field_name in RTT_QUANTILES.items():
                if stats[field_name] is not None:
                    self.container_rtt.labels(name, quantile, role).set(stats[field_name] / 1e6)

    def forget_containers(self, names: set[str]) -> None:
        """Remove the series of containers no longer seen."""
        for name in names:
            with contextlib.suppress(KeyError):  # never observed
                for direction in ("in", "out"):
                    self.container_bytes.remove(name, direction)
            for quantile in RTT_QUANTILES:
                for role in ("client", "server"):
                    with contextlib.suppress(KeyError):  # no RTT as this role
                        self.container_rtt.remove(name, quantile, role)


@dataclass
class Touched:
    """A flow read in the current batch: the event it came with (its partition), its state
    (None: unknown), and the table value it was read as."""

    event: Any
    state: FlowState | None
    stored: dict[str, Any] | None


@dataclass
class FlowBatch:
    """What one batch of the flows stage touched: flows by key, activity by partition, the
    table writes (key, value; None deletes) with the event each belongs to, its size
    (observations and due flows folded in), and the partitions that got a watermark (their
    latest watermark event), which tick once the batch's observations are in."""

    flows: dict[bytes, Touched] = field(default_factory=dict)
    ticks: dict[int, Any] = field(default_factory=dict)
    activity: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    writes: list[tuple[Any, bytes, bytes | None]] = field(default_factory=list)
    size: int = 0


class Outputs:
    """Output records (flows, ECS, OCSF, windows, DLQ, internal batches) through one librdkafka
    producer: a few microseconds a record, against tens through aiokafka. A stage flushes it
    (off the event loop) before it writes its tables and its input records are acknowledged:
    at least once."""

    def __init__(self, settings: Settings) -> None:
        self.topics = {s: topic_name(settings, s) for s in ("flows", "flows.ecs", "flows.ocsf",
                                                           "metrics.containers", "dlq")}
        self.errors: list[str] = []
        self.pending = 0
        self.producer = Producer({**settings.kafka_config(), **PRODUCER_DEFAULTS,
                                  "linger.ms": 5, "delivery.report.only.error": True,
                                  "on_delivery": self._delivered})

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.errors.append(f"{msg.topic()}: {err}")

    def send(self, suffix: str, key: bytes | None, value: bytes, partition: int = -1) -> None:
        while True:
            try:
                self.producer.produce(self.topics[suffix], value, key, partition)
                break
            except BufferError:
                self.producer.poll(0.05)
        self.pending += 1

    async def flush(self) -> None:
        """Wait (off the event loop) until every record sent so far is delivered."""
        if self.pending or self.errors:
            await asyncio.get_running_loop().run_in_executor(None, self.flush_now)

    def flush_now(self) -> None:
        """Wait until every record sent so far is delivered; raises if one could not be."""
        if self.pending:
            self.pending = 0
            left = self.producer.flush(120.0)
            if left:
                raise RuntimeError(f"{left} output records not delivered in 120 s")
        if self.errors:
            raise RuntimeError(f"output records not delivered: {self.errors[:3]}")


class RawStage:
    """Stage 1, in its own thread and outside Faust: a librdkafka consumer of the raw topics (in
    the consumer group ``<workers group>-raw``) decodes each batch into observations, sends them
    to the internal sockets topic (one message per flows partition), and stores the batch's
    offsets once that is delivered (at least once). Faust's consumer reads a few thousand records
    a second here, librdkafka's hundreds of thousands: raw records are most of the input. Behind
    each batch, and every ``tick_s`` when idle, it sends every flows partition its progress (the
    module docstring's watermarks)."""

    def __init__(self, settings: Settings, group: str, sockets_topic: str, partitions: int,
                 metrics: Metrics, tick_s: float) -> None:
        self.settings = settings
        self.group = group
        self.partitions = partitions
        self.metrics = metrics
        self.tick_s = tick_s
        self.codec = Codec(settings)
        self.decoder = RawDecoder(self.codec)
        self.outputs = Outputs(settings)
        self.outputs.topics["sockets"] = sockets_topic
        self.listeners = Listeners()
        self.local: dict[tuple[str, str | None], str] = {}  # (host, network) -> an address
        self.learnt: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()  # see ``learn``
        self.local_sent = 0.0
        self.topics = {topic_name(settings, s): s for s in ("raw.ebpf", "raw.netlink")}
        self.lag: dict[tuple[str, int], int] = {}
        self.positions: dict[tuple[str, int], int] = {}  # next offset to read, once known
        self.read_ns: dict[tuple[str, int], int] = {}  # latest event time read, by partition
        self.counts: dict[str, int] = {}  # partitions of each raw topic (by suffix)
        self.marked_at = 0.0
        self.assigned: list[str] = []
        self.joined = threading.Event()  # the first assignment (possibly empty) came
        self.consumer = Consumer({**settings.kafka_config(), "group.id": f"{group}-raw",
                                  "enable.auto.commit": True, "enable.auto.offset.store": False,
                                  "auto.offset.reset": "earliest", "session.timeout.ms": 10000,
                                  "heartbeat.interval.ms": 2000,
                                  "fetch.wait.max.ms": FETCH_WAIT_MS,
                                  "queued.max.messages.kbytes": RAW_PREFETCH_KB})

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set (within a batch interval); closes the consumer."""
        metadata = self.consumer.list_topics(timeout=30).topics
        self.counts = {suffix: len(metadata[name].partitions) for name, suffix in self.topics.items()}
        self.consumer.subscribe(list(self.topics), on_assign=self._assigned,
                                on_revoke=self._revoked)
        try:
            while not stop.is_set():
                msgs = self.consumer.consume(BATCH_MAX, BATCH_WITHIN_S)
                if msgs:
                    self.batch(msgs)
                elif time.monotonic() - self.marked_at >= self.tick_s:
                    self.share_local(len(self.local))
                    self.watermark()
                    self.outputs.flush_now()
        finally:
            self.consumer.close()

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions this group never committed start where the worker's Faust group, which
        read the raw topics before this stage existed, had got to (not at the beginning). The
        others start at their committed offsets (the positions the watermarks start from)."""
        committed = consumer.committed(partitions, timeout=30)
        starts = {(tp.topic, tp.partition): tp.offset for tp in committed if tp.offset >= 0}
        fresh = [tp for tp in committed if tp.offset < 0]
        if fresh:
            legacy = Consumer({**self.settings.kafka_config(), "group.id": self.group})
            try:
                starts.update({(tp.topic, tp.partition): tp.offset
                               for tp in legacy.committed(fresh, timeout=30) if tp.offset >= 0})
            finally:
                legacy.close()
        for tp in partitions:
            tp.offset = starts.get((tp.topic, tp.partition), tp.offset)
        self.positions = starts
        consumer.assign(partitions)
        self.assigned = sorted(f"{tp.topic}:{tp.partition}" for tp in partitions)
        self.joined.set()

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned = []
        self.lag.clear()
        self.positions.clear()
        self.read_ns.clear()

    def batch(self, msgs: list[Message]) -> None:
        """Observations of ``msgs`` to the flows partitions of their flows, then the offsets."""
        rows: dict[int, list[list[Any]]] = {}
        read: dict[str, int] = {}
        ends: dict[tuple[str, int], int] = {}
        known = len(self.local)
        for msg in msgs:
            if msg.error():
                log.warning("raw consumer: %s", msg.error())
                continue
            topic = msg.topic()
            read[topic] = read.get(topic, 0) + 1
            tp = (topic, msg.partition())
            ends[tp] = msg.offset() + 1
            obs = self.observation(msg)
            if obs is not None:
                partition = _partition(obs.flow_key().encode(), self.partitions)
                rows.setdefault(partition, []).append(obs.to_row())
                self.local.setdefault((obs.host, network(obs.local_ip)), obs.local_ip)
                if obs.ts_ns > self.read_ns.get(tp, 0):
                    self.read_ns[tp] = obs.ts_ns
        self.share_local(known)  # before the batch's observations
        for partition, items in rows.items():
            for data in _fitting(items):
                self.outputs.send("sockets", BATCH_KEY, data, partition)
        self.positions.update(ends)
        self.watermark()
        self.outputs.flush_now()
        for topic, count in read.items():
            self.metrics.records.labels(self.topics[topic]).inc(count)
        self.metrics.total += sum(read.values())
        if ends:
            self.consumer.store_offsets(offsets=[TopicPartition(t, p, offset)
                                                 for (t, p), offset in ends.items()])

    def learn(self, host: str, ip: str) -> None:
        """An address of ``host`` read back from the flows table (any thread): a worker that
        restarts knows its flows' networks again before their sockets are read again."""
        self.learnt.put((host, ip))

    def share_local(self, known: int) -> None:
        """Send every flows partition the host addresses known when some were learnt since
        there were ``known`` (from the sockets read, or by ``learn``), and every
        ``LOCAL_RESEND_S``."""
        while not self.learnt.empty():
            host, ip = self.learnt.get_nowait()
            self.local.setdefault((host, network(ip)), ip)
        if len(self.local) > known or time.monotonic() - self.local_sent >= LOCAL_RESEND_S:
            self.local_sent = time.monotonic()
            pairs = [[host, ip] for (host, _net), ip in self.local.items()]
            for data in _fitting(pairs):
                for partition in range(self.partitions):
                    self.outputs.send("sockets", LOCAL_KEY, data, partition)

    def watermark(self) -> None:
        """Measure the lag of each assigned partition (its records after the position, from the
        offsets the latest fetch brought; partitions not fetched yet are left out) and send
        every flows partition the progress of each: the wall clock less a fetch wait when it
        was read to its end, else the latest event time read in it, if any."""
        self.marked_at = time.monotonic()
        caught_up_ns = time.time_ns() - FETCH_WAIT_MS * 1_000_000
        progress = []
        for tp in self.consumer.assignment():
            key = (tp.topic, tp.partition)
            low, high = self.consumer.get_watermark_offsets(tp, cached=True)
            # the consumer starts at the log's start when it has no committed offset, and is
            # never before it (retention may have deleted what it had not read)
            position = max(self.positions.get(key, -1), low)
            if high < 0 or position < 0:
                continue
            lag = self.lag[key] = max(high - position, 0)
            ns = caught_up_ns if lag == 0 else self.read_ns.get(key)
            if ns is not None:
                progress.append([self.topics[tp.topic], tp.partition, ns])
        data = _json({"partitions": self.counts, "progress": progress})
        for partition in range(self.partitions):
            self.outputs.send("sockets", WATERMARK_KEY, data, partition)

    def observation(self, msg: Message) -> Observation | None:
        """The observation of one raw record; None for records without one (and for bad
        records, which go to the DLQ)."""
        suffix = self.topics[msg.topic()]
        try:
            record = self.decoder.decode(suffix, msg.value())
        except DecodeError as exc:
            self.dead_letter(msg, exc.kind, exc.reason)
            return None
        try:
            return (from_ebpf(record) if suffix == "raw.ebpf"
                    else from_netlink(record, self.listeners)) if record else None
        except (KeyError, TypeError, ValueError) as exc:
            self.dead_letter(msg, "processing_error", f"{type(exc).__name__}: {exc}")
            return None

    def dead_letter(self, msg: Message, kind: str, reason: str) -> None:
        """Keep ``msg`` unchanged on the DLQ with why it could not be processed."""
        self.metrics.dead.labels(kind).inc()
        ts_type, ts = msg.timestamp()
        value = self.codec.encode("dlq", dead_letter_record(
            topic=msg.topic(), partition=msg.partition(), offset=msg.offset(),
            timestamp_ms=ts if ts_type != TIMESTAMP_NOT_AVAILABLE else None, key=msg.key(),
            value=msg.value(), headers=list(msg.headers() or []), kind=kind, reason=reason,
            consumer="streams", host=self.settings.host_name))
        self.outputs.send("dlq", msg.key(), value)


class Worker:
    """The Faust app and everything its agents share."""

    def __init__(self, settings: Settings, workers_group: str, web_host: str, web_port: int,
                 options: StreamOptions) -> None:
        self.settings = settings
        self.options = options
        self.codec = Codec(settings)
        self.decoder = RawDecoder(self.codec)
        self.outputs = Outputs(settings)
        self.local = LocalAddresses()
        self.entity_cache: dict[int, dict[bytes, EntityState]] = {}
        self.meta = MetaCache()
        self.meta_ready = asyncio.Event()
        self.metrics = Metrics()
        self.latest: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        # partition -> flow key -> next due (processing ms, watermark ns): see ``next_due``
        self.due: defaultdict[int, DueIndex] = defaultdict(DueIndex)
        self.marks: dict[int, dict[tuple[str, int], int]] = {}  # partition -> raw progress
        self.watermarks: dict[int, int] = {}  # partition -> its watermark (module docstring)
        # activity partition -> flows partition -> its latest watermark
        self.window_marks: dict[int, dict[int, int]] = {}
        self.windows_closed: dict[int, int] = {}  # activity partition -> its latest closing
        self.awaiting: dict[int, Awaiting] = {}  # flows whose metadata is not all known
        self.lingering: dict[int, set[bytes]] = {}  # ended flows that only wait to be forgotten
        self.indexed: set[int] = set()
        self.meta_seen: dict[int, int] = {}
        self.started = time.time()
        n = options.partitions
        datadir = settings.data_dir / "streams" / f"{workers_group}-{web_port}"
        datadir.mkdir(parents=True, exist_ok=True)
        self.app = faust.App(
            workers_group, broker=[f"kafka://{b}" for b in settings.bootstrap_servers.split(",")],
            broker_credentials=_credentials(settings), store="rocksdb://",
            datadir=str(datadir),
            topic_partitions=n, topic_replication_factor=1, topic_disable_leader=True,
            consumer_auto_offset_reset="earliest", processing_guarantee="at_least_once",
            web_enabled=True, web_port=web_port, web_bind=web_host, web_host=web_host,
            web_in_thread=False, broker_commit_interval=1.0, stream_recovery_delay=0.0,
            table_standby_replicas=0, producer_acks=-1,
            # a killed worker's partitions move after 10 s instead of Faust's 60
            broker_session_timeout=10.0, broker_heartbeat_interval=2.0,
            producer_linger=0.02,  # batch the many small output records
            producer_max_batch_size=CHANGELOG_BATCH_BYTES,  # a flow's state is a few KiB
        )
        app = self.app
        # table writes wait in Faust's producer buffer; past 100 it stalls the streams in
        # 0.1 s steps, and one batch writes up to a few thousand keys
        app.producer.buffer.max_messages = 4 * BATCH_MAX

        # values are JSON lists (``_fitting``) read by the agents with orjson (``_items``)
        self.sockets_topic = app.topic(f"{workers_group}-sockets", internal=True, partitions=n,
                                       key_serializer="raw", value_serializer="raw",
                                       maxsize=QUEUE_MESSAGES)
        self.activity_topic = app.topic(f"{workers_group}-activity", internal=True, partitions=n,
                                        key_serializer="raw", value_serializer="raw",
                                        maxsize=QUEUE_MESSAGES)
        self.outputs.topics["activity"] = self.activity_topic.get_topic_name()
        # keys are bytes, values the JSON of the dataclasses' state (``_json``, ``_state``):
        # encoded once here, where Faust's JSON serializer would encode twice (store, changelog)
        self.flows = app.Table("flows", default=None, partitions=n, key_type=bytes,
                               value_type=bytes, options=dict(ROCKSDB))
        self.entities = app.Table("entities", default=None, partitions=n, key_type=bytes,
                                  value_type=bytes, options=dict(ROCKSDB))
        app.agent(self.sockets_topic, name="flows")(self.flows_agent)
        app.agent(self.activity_topic, name="windows")(self.windows_agent)
        app.timer(options.tick_s)(self.tick)
        app.timer(heap.TRIM_INTERVAL_S)(self.trim_heap)
        app.on_partitions_revoked.connect(self.on_revoked)
        app.task(self.metadata_task)
        self.raw = RawStage(settings, workers_group, self.sockets_topic.get_topic_name(), n,
                            self.metrics, options.tick_s)
        self.raw_thread = ThreadPoolExecutor(1, thread_name_prefix="raw-stage")
        app.task(self.raw_task)
        for path, view in (("/containers", self.view_containers), ("/pods", self.view_pods),
                           ("/flows", self.view_flows), ("/healthz", self.view_health),
                           ("/metrics", self.view_metrics)):
            app.page(path)(_as_view(view))

    def create_internal_topics(self) -> None:
        """The app's internal topics (repartition topics, table changelogs) as Faust would
        declare them, created before it starts: Faust declares them as its consumer joins the
        group, which may then not see them yet, ignore them for minutes, or stop on a table
        whose changelog seems to have 0 partitions. The raw stage also sends to one."""
        wanted = []
        for topic in (self.sockets_topic, self.activity_topic, self.flows.changelog_topic,
                      self.entities.changelog_topic):
            config = {key: str(value) for key, value in (topic.config or {}).items()}
            policy = [name for name, on in (("compact", topic.compacting),
                                            ("delete", topic.deleting)) if on]
            if policy:
                config["cleanup.policy"] = ",".join(policy)
            if topic.retention:
                config["retention.ms"] = str(round(want_seconds(topic.retention) * 1000))
            wanted.append(NewTopic(topic.get_topic_name(), num_partitions=topic.partitions,
                                   replication_factor=1, config=config))
        create_topics(admin(self.settings), wanted)

    # -- stage 1: raw records -> observations keyed by flow (see RawStage)

    async def raw_task(self) -> None:
        """Runs stage 1 in its own thread (the internal topics exist: see ``main``); a failure
        of the stage crashes the worker."""
        stop = threading.Event()
        try:
            await asyncio.get_running_loop().run_in_executor(self.raw_thread, self.raw.run, stop)
        finally:
            stop.set()
            self.raw_thread.shutdown(wait=True)

    # -- stage 2: flows

    async def flows_agent(self, stream: faust.StreamT) -> None:
        """Batches of observations and watermarks: each flow touched is read from the table
        once, settled once, and written back once per batch. A batch ends after the message that
        brought it to ``FLOW_BATCH`` observations or due flows, so that what it holds stays
        bounded however far behind the stage is; the batches of one take share its time. A
        watermark is also a tick: the flows due by then join the batch."""
        await self.meta_ready.wait()
        async for events in stream.take_events(BATCH_MESSAGES, within=BATCH_WITHIN_S):
            now = _now_ms()
            batch = FlowBatch()
            for event in events:
                if event.key == WATERMARK_KEY:
                    self.watermark(event)
                    batch.ticks[event.message.partition] = event
                elif event.key == LOCAL_KEY:
                    for host, ip in self._items(event, "flows"):
                        self.local.add(host, ip)
                else:
                    for item in self._items(event, "flows"):
                        try:
                            self.flow_event(event, Observation.from_row(item), now, batch)
                        except Exception:  # a bug must not stop the stream; counted, logged
                            self.metrics.errors.labels("flows").inc()
                            log.exception("flows: cannot process %r", item)
                if batch.size >= FLOW_BATCH:
                    await self.flows_done(batch, now)
                    batch = FlowBatch()
            await self.flows_done(batch, now)

    async def flows_done(self, batch: FlowBatch, now: int) -> None:
        """Tick, settle a batch, deliver its output records, then write its flows."""
        for event in batch.ticks.values():
            self.flows_tick(event, now, batch)
        self.settle(batch, now)
        for partition, items in batch.activity.items():
            for data in _fitting(items):
                self.outputs.send("activity", BATCH_KEY, data, partition)
        if batch.ticks:  # behind the batch's activity: the windows close on these
            data = _json({"partitions": self.options.partitions,
                          "progress": [[p, self.watermarks.get(p, 0)] for p in batch.ticks]})
            for partition in range(self.options.partitions):
                self.outputs.send("activity", WATERMARK_KEY, data, partition)
        await self.outputs.flush()
        _write(self.flows, batch.writes)
        await self.changelog_ebb()

    async def changelog_ebb(self) -> None:
        """Wait until Faust holds at most ``CHANGELOG_PENDING`` table writes not yet handed to
        its producer: it sends them one by one from an unbounded queue and only slows its
        consumer for them, so a stage that writes faster would pile them up in memory."""
        buffer = self.app.producer.buffer
        while buffer.size > CHANGELOG_PENDING:
            await buffer.flush_atmost(buffer.size - CHANGELOG_PENDING)

    def watermark(self, event: Any) -> None:
        """Fold a raw stage's progress into the watermark of the event's partition."""
        partition = event.message.partition
        try:
            report = orjson.loads(event.value)
            marks = self.marks.setdefault(partition, {})
            for suffix, raw_partition, ns in report["progress"]:
                if ns > marks.get((suffix, raw_partition), 0):
                    marks[(suffix, raw_partition)] = ns
            self.watermarks[partition] = min(
                (marks.get((suffix, p), 0) for suffix, count in report["partitions"].items()
                 for p in range(count)), default=0)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            self.metrics.errors.labels("flows").inc()
            log.error("flows: not a watermark at %s[%d]@%d", event.message.topic, partition,
                      event.message.offset)

    def clock(self, partition: int, now: int) -> Clock:
        return Clock(now, self.watermarks.get(partition, 0))

    def _items(self, event: Any, stage: str) -> list[Any]:
        """The items of an internal batch message (JSON written by ``_fitting``)."""
        try:
            items = orjson.loads(event.value)
            if isinstance(items, list):
                return items
        except orjson.JSONDecodeError:
            pass
        self.metrics.errors.labels(stage).inc()
        log.error("%s: not a batch at %s[%d]@%d", stage, event.message.topic,
                  event.message.partition, event.message.offset)
        return []

    def _load(self, event: Any, key: bytes, batch: FlowBatch) -> Touched:
        """A flow of the batch, read from the table the first time. Once its partition is
        indexed, a flow missing from the index is missing from the table too (every table
        write of a partition updates its index): a new flow is not looked up."""
        touched = batch.flows.get(key)
        if touched is None:
            partition = event.message.partition
            if partition in self.indexed and key not in self.due.get(partition, ()):
                stored = None
            else:
                _current_event.set(weakref.ref(event))
                stored = _state(self.flows.get(key))
            touched = batch.flows[key] = Touched(event, FlowState.from_dict(stored) if stored
                                                 else None, stored)
        return touched

    def flow_event(self, event: Any, obs: Observation, now: int, batch: FlowBatch) -> None:
        """Fold one socket observation into its flow; publish what an older flow of the same
        tuple owed; pass the socket's activity on."""
        batch.size += 1
        touched = self._load(event, obs.flow_key().encode(), batch)
        partition = event.message.partition
        state, owed, sock = observe(touched.state, obs, self.clock(partition, now), partition)
        for old, emission in owed:
            self.publish_flow(old, emission, now)
        touched.state = state
        if sock is not None:
            self.report(state, sock, batch)

    def settle(self, batch: FlowBatch, now: int) -> None:
        """Emit what the touched flows owe now, index when they may next owe something, and
        write them back (or forget them once expired)."""
        for key, touched in batch.flows.items():
            state = touched.state
            if state is None:
                continue
            sig = enrichment(state, self.meta)
            peer = state.missing_peer()
            own = [sock.local_ip for sock in state.sockets.values()]
            clock = self.clock(state.partition, now)
            peer_may_come = peer is not None and self.local.may_be_local(state.host, peer, own)
            for emission in due(state, clock, self.options.flow, sig, peer_may_come):
                self.publish_flow(state, emission, now)
            index = self.due[state.partition]
            awaiting = self.awaiting.setdefault(state.partition, Awaiting())
            lingering = self.lingering.setdefault(state.partition, set())
            if expired(state, clock, self.options.flow):
                if touched.stored is not None:
                    batch.writes.append((touched.event, key, None))
                index.pop(key, None)
                awaiting.discard(key)
                lingering.discard(key)
                continue
            index[key] = next_due(state, self.options.flow, peer_may_come)
            awaiting.wait(key, awaited(state, self.meta) if "false" in sig else set())
            if state.ended and "false" not in sig:
                lingering.add(key)
            else:
                lingering.discard(key)
            value = state.to_dict()
            if value != touched.stored:
                batch.writes.append((touched.event, key, _json(value)))

    def report(self, state: FlowState, sock: Any, batch: FlowBatch) -> None:
        """Pass what a socket of a container did on to the windows of its container and pod."""
        container = container_of(state, sock, self.meta)
        if not container:
            return
        cfg = self.options.windows
        for act in activity(state, sock, container, self.meta.pod_of(container), cfg.step_ms):
            partition = _partition(act.entity.encode(), self.options.partitions)
            batch.activity.setdefault(partition, []).append(act.__dict__)

    def flows_tick(self, event: Any, now: int, batch: FlowBatch) -> None:
        """Flow timeouts of one partition: the flows whose next due time has come (by the
        processing time or by the watermark) join the batch (START after the join delay,
        UPDATE, END, forget), at most ``FLOW_BATCH`` a tick, the longest due first. The index
        (``DueIndex``) finds them without a pass over every live flow of the partition.

        The index is rebuilt from the table when the partition is (re)assigned (and the
        networks of its flows' sockets are local again: ``LocalAddresses``), and flows
        lacking metadata are revisited when the metadata they lack came (``Awaiting``). An
        ended flow with all its metadata that is not in the batch has nothing left to emit:
        once due it is deleted unread."""
        partition = event.message.partition
        index = self.due[partition]
        if partition not in self.indexed:
            local: set[tuple[str, str]] = set()
            for key, data in self.flows.items():
                stored = _state(data)
                if stored and stored["partition"] == partition:
                    index[key] = (0, 0)
                    local.update((stored["host"], sock["local_ip"])
                                 for sock in stored["sockets"].values())
            for host, ip in local:
                self.local.add(host, ip)
                self.raw.learn(host, ip)  # for the other workers too
            self.indexed.add(partition)
        seen = self.meta_seen.get(partition)
        if self.meta.version != seen:
            self.meta_seen[partition] = self.meta.version
            changed = self.meta.changed_since(seen) if seen is not None else None
            for key in self.awaiting.get(partition, Awaiting()).lacking(changed):
                index[key] = (0, 0)
        lingering = self.lingering.get(partition, set())
        for key in index.ready(now, self.watermarks.get(partition, 0), FLOW_BATCH):
            batch.size += 1
            if key in lingering and key not in batch.flows:
                batch.writes.append((event, key, None))
                del index[key]
                lingering.discard(key)
            elif self._load(event, key, batch).state is None:
                index.pop(key, None)

    def on_revoked(self, *args: Any, **kwargs: Any) -> None:
        """After a rebalance the flow index and the entities are read again from the tables, and
        the watermarks from the internal topic."""
        self.indexed.clear()
        self.due.clear()
        self.marks.clear()
        self.watermarks.clear()
        self.window_marks.clear()
        self.windows_closed.clear()
        self.awaiting.clear()
        self.lingering.clear()
        self.entity_cache.clear()

    def publish_flow(self, state: FlowState, emission: Emission, now: int) -> None:
        record = flow_record(state, emission, self.meta, now)
        key = record["flow_id"].encode()
        self.metrics.flow_event_types[emission.type].inc()
        self.outputs.send("flows", key, self.codec.encode("flows", record))
        for doc in ecs.documents(record):
            self.outputs.send("flows.ecs", key, orjson.dumps(doc))
        for doc in ocsf.events(record):
            self.outputs.send("flows.ocsf", key, orjson.dumps(doc))

    # -- stage 3: windows

    async def windows_agent(self, stream: faust.StreamT) -> None:
        """Batches of activity and watermarks; entities are kept in memory per partition and
        written to the table once per batch when changed. A partition's windows close after
        the batch's activity, on its latest watermark, when that closes another step."""
        cfg = self.options.windows
        async for events in stream.take_events(BATCH_MESSAGES, within=BATCH_WITHIN_S):
            now = _now_ms()
            changed: dict[bytes, tuple[Any, EntityState | None]] = {}
            marks: dict[int, tuple[Any, int]] = {}  # partition -> (event, watermark ms)
            for event in events:
                states = self._entities_of(event.message.partition)
                if event.key == WATERMARK_KEY:
                    watermark_ns = self.windows_watermark(event)
                    if watermark_ns:
                        marks[event.message.partition] = (event, watermark_ns // 1_000_000)
                    continue
                for item in self._items(event, "windows"):
                    try:
                        act = Activity(**item)
                        key = act.entity.encode()
                        state = states.get(key) or EntityState(entity=act.entity,
                                                               entity_type=act.entity_type)
                        self._describe(state, act.container_id)
                        if not state.apply(act, cfg):
                            self.metrics.late.inc()
                        states[key] = state
                        changed[key] = (event, state)
                    except Exception:  # a bug must not stop the stream; counted and logged
                        self.metrics.errors.labels("windows").inc()
                        log.exception("windows: cannot process %r", item)
            for partition, (event, watermark_ms) in marks.items():
                limit = cfg.closed_by(watermark_ms)
                if limit > self.windows_closed.get(partition, 0):
                    self.windows_closed[partition] = limit
                    self.windows_tick(event, self._entities_of(partition), watermark_ms, now,
                                      changed)
            writes = [(event, key, _json({"partition": event.message.partition,
                                          "state": state.to_dict()}) if state is not None else None)
                      for key, (event, state) in changed.items()
                      if state is not None or self.entities.get(key) is not None]
            await self.outputs.flush()
            _write(self.entities, writes)
            await self.changelog_ebb()

    def _entities_of(self, partition: int) -> dict[bytes, EntityState]:
        """The entities of ``partition``, read from the table once after an assignment."""
        states = self.entity_cache.get(partition)
        if states is None:
            states = self.entity_cache[partition] = {
                key: EntityState.from_dict(stored["state"])
                for key, stored in ((k, _state(v)) for k, v in self.entities.items())
                if stored and stored["partition"] == partition}
        return states

    def _describe(self, state: EntityState, container_id: str) -> None:
        ref = self.meta.container_ref(container_id) or {}
        if state.entity_type == "CONTAINER":
            state.describe(ref.get("name"), ref.get("pod_namespace"), ref.get("pod_name"),
                           ref.get("image"))
        else:
            state.describe(ref.get("pod_name"), ref.get("pod_namespace"), ref.get("pod_name"), None)

    def windows_watermark(self, event: Any) -> int:
        """Fold a flows partition's watermark into those the event's activity partition got;
        the lowest over all flows partitions (0 until each reported)."""
        partition = event.message.partition
        try:
            report = orjson.loads(event.value)
            marks = self.window_marks.setdefault(partition, {})
            for flows_partition, ns in report["progress"]:
                if ns > marks.get(flows_partition, 0):
                    marks[flows_partition] = ns
            return min((marks.get(p, 0) for p in range(report["partitions"])), default=0)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            self.metrics.errors.labels("windows").inc()
            log.error("windows: not a watermark at %s[%d]@%d", event.message.topic, partition,
                      event.message.offset)
            return 0

    def windows_tick(self, event: Any, states: dict[bytes, EntityState], watermark_ms: int,
                     now: int, changed: dict[bytes, tuple[Any, EntityState | None]]) -> None:
        """Emit the windows of one partition that closed by ``watermark_ms`` (event time);
        forget idle entities."""
        for key, state in list(states.items()):
            before = state.to_dict()
            if state.entity_type == "CONTAINER":  # metadata may have come after the activity
                self._describe(state, state.entity)
            for rec in state.close(watermark_ms, self.options.windows, now):
                self.metrics.windows.labels(rec["entity_type"]).inc()
                self.outputs.send("metrics.containers",
                                  f"{rec['entity_type']}:{rec['entity_id']}".encode(),
                                  self.codec.encode("metrics.containers", rec))
            if state.idle():
                del states[key]
                changed[key] = (event, None)
            elif state.to_dict() != before:
                changed[key] = (event, state)

    # -- ticks, metadata

    async def tick(self) -> None:
        """The rates and entities of the web views (the flows partitions tick on their
        watermarks, and the activity partitions on those the flows partitions pass on)."""
        self._rate()
        self.forget_quiet(_now_ms())

    def forget_quiet(self, now_ms: int) -> None:
        """Entities without a window for ``VIEW_KEEP_MS`` leave the web views, and the series of
        containers no longer listed leave /metrics: a host that runs many short-lived containers
        would otherwise list and export every one the worker has seen."""
        quiet = [key for key, entry in self.latest.items()
                 if max(w["window_end_ms"] for w in entry.values()) < now_ms - VIEW_KEEP_MS]
        gone: set[str] = set()
        for key in quiet:
            windows = self.latest.pop(key).values()
            if key[0] == "CONTAINER":
                gone.update(_series_name(w) for w in windows)
        if not gone:
            return
        listed = {_series_name(w) for key, entry in self.latest.items() if key[0] == "CONTAINER"
                  for w in entry.values()}
        self.metrics.forget_containers(gone - listed)

    async def trim_heap(self) -> None:
        """Free C heap pages back to the system, off the event loop (``packetless.heap``): with
        30,000 live flows, about 40 % of the worker's RSS was such pages."""
        await asyncio.get_running_loop().run_in_executor(None, heap.trim)

    async def metadata_task(self) -> None:
        """Follow meta.containers from the beginning and meta.processes from its last records
        that the cache can hold (every worker needs all of them; older process records would be
        read only to be evicted, and a busy host writes millions a week), and the recent
        metrics.containers (for the web views). The flows agent waits until the metadata
        present at start has been read."""
        names = {s: topic_name(self.settings, s) for s in ("meta.containers", "meta.processes",
                                                           "metrics.containers")}
        consumer = AIOKafkaConsumer(*names.values(), bootstrap_servers=self.settings.bootstrap_servers,
                                    enable_auto_commit=False, group_id=None,
                                    auto_offset_reset="earliest",
                                    **_aiokafka_security(self.settings))
        await consumer.start()
        try:
            while {tp.topic for tp in consumer.assignment()} != set(names.values()):
                await asyncio.sleep(0.1)  # without a group, all partitions once metadata is in
            tps = sorted(consumer.assignment())
            ends = await consumer.end_offsets(tps)
            begins = await consumer.beginning_offsets(tps)
            backlogs = {names["metrics.containers"]: METRICS_BACKLOG,
                        names["meta.processes"]: self.meta.max_processes}
            for tp in tps:
                if tp.topic in backlogs:
                    consumer.seek(tp, max(begins[tp], ends[tp] - backlogs[tp.topic]))
            pending = {tp for tp in tps if tp.topic != names["metrics.containers"]
                       and ends[tp] > begins[tp]}
            if not pending:
                self.meta_ready.set()
            while True:
                batches = await consumer.getmany(timeout_ms=500, max_records=2000)
                for tp, msgs in batches.items():
                    for msg in msgs:
                        self._metadata(names, msg)
                    if tp in pending and await consumer.position(tp) >= ends[tp]:
                        pending.discard(tp)
                self.meta.expire(_now_ms())
                if not pending and not self.meta_ready.is_set():
                    log.info("metadata read: %d containers, %d processes",
                             len(self.meta.containers), len(self.meta.processes))
                    self.meta_ready.set()
        finally:
            await consumer.stop()

    def _metadata(self, names: dict[str, str], msg: Any) -> None:
        suffix = next(s for s, n in names.items() if n == msg.topic)
        try:
            record = self.decoder.decode(suffix, msg.value)
        except DecodeError as exc:
            log.warning("%s[%d]@%d: %s", msg.topic, msg.partition, msg.offset, exc.reason)
            return
        if suffix == "meta.containers":
            self.meta.add_container(msg.key.decode() if msg.key else None, record, msg.timestamp)
            for ip in record.get("ip_addresses") or [] if record else []:
                self.local.add(record["host_name"], ip)
        elif record is None:
            return
        elif suffix == "meta.processes":
            self.meta.add_process(record)
        else:
            kind = "tumbling" if record["window_size_ms"] == record["window_step_ms"] else "hopping"
            entry = self.latest.setdefault((record["entity_type"], record["entity_id"]), {})
            if record["window_end_ms"] >= entry.get(kind, {}).get("window_end_ms", 0):
                entry[kind] = record
                if kind == "tumbling" and record["entity_type"] == "CONTAINER":
                    self.metrics.observe_window(record)

    # -- web views

    def _entities(self, entity_type: str) -> list[dict[str, Any]]:
        items = []
        for (etype, entity_id), entry in self.latest.items():
            if etype != entity_type:
                continue
            main = entry.get("hopping") or entry["tumbling"]
            items.append({"id": entity_id, "name": main["name"], "namespace": main["namespace"],
                          "pod_name": main["pod_name"], "image": main["image"],
                          "host_name": main["host_name"], "window": main,
                          "tumbling": entry.get("tumbling")})
        return sorted(items, key=lambda i: (i["name"] or "", i["id"]))

    async def view_containers(self, web: Any, request: Any) -> Any:
        """Latest window statistics of every container (hopping window first)."""
        return web.json({"containers": self._entities("CONTAINER")})

    async def view_pods(self, web: Any, request: Any) -> Any:
        return web.json({"pods": self._entities("POD")})

    async def view_flows(self, web: Any, request: Any) -> Any:
        """Flows of this worker's partitions that involve ``?container=ID`` (all without it)."""
        wanted = request.query.get("container")
        now = _now_ms()
        flows = []
        for data in list(self.flows.values()):
            stored = _state(data)
            if not stored:
                continue
            state = FlowState.from_dict(stored)
            rec = flow_record(state, Emission("END" if state.ended else "UPDATE", state.sequence,
                                              None), self.meta, now)
            ids = {(rec[side]["container"] or {}).get("id") for side in ("client", "server")}
            if wanted and not any(i and i.startswith(wanted) for i in ids):
                continue
            rec["active"] = not state.ended
            flows.append(rec)
        flows.sort(key=lambda r: -r["timestamp_ms"])
        mine = {tp.partition for tp in self.app.assignor.assigned_actives()
                if tp.topic == self.sockets_topic.get_topic_name()}
        return web.json({"flows": flows[:1000],
                         "partial": len(mine) < self.options.partitions})

    async def view_health(self, web: Any, request: Any) -> Any:
        """``ok`` once the metadata present at start was read and the raw stage joined its
        consumer group (it processes what comes from then on)."""
        ok = self.meta_ready.is_set() and self.raw.joined.is_set()
        body = {"status": "ok" if ok else "starting", "metadata_ready": self.meta_ready.is_set(),
                "raw_joined": self.raw.joined.is_set(),
                "uptime_s": round(time.time() - self.started, 1),
                "partitions": sorted([f"{tp.topic}:{tp.partition}"
                                      for tp in self.app.assignor.assigned_actives()]
                                     + self.raw.assigned)}
        return web.json(body, status=200 if ok else 503)

    async def view_metrics(self, web: Any, request: Any) -> Any:
        m = self.metrics
        m.lag.clear()
        for (topic, partition), lag in list(self.raw.lag.items()):
            m.lag.labels(topic, str(partition)).set(lag)
        m.tables.labels("flows").set(sum(1 for _ in self.flows))
        m.tables.labels("entities").set(sum(1 for _ in self.entities))
        m.meta.labels("containers").set(len(self.meta.containers))
        m.meta.labels("processes").set(len(self.meta.processes))
        return web.bytes(generate_latest(m.registry), content_type=PROMETHEUS_TYPE)

    def _rate(self) -> None:
        samples = self.metrics.processed
        samples.append((time.monotonic(), self.metrics.total))
        window = [s for s in samples if s[0] >= samples[-1][0] - 10]
        if len(window) > 1 and window[-1][0] > window[0][0]:
            self.metrics.rate.set((window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0]))


def _as_view(handler: Any) -> Any:
    """A Faust page function (called as an unbound View method) that runs ``handler``."""

    async def page(view: Any, request: Any) -> Any:
        return await handler(view, request)

    return page


def _series_name(record: dict[str, Any]) -> str:
    """The ``container`` label of a ContainerMetrics record's series."""
    return record["name"] or record["entity_id"][:12]


def _partition(key: bytes, partitions: int) -> int:
    """The internal partition of a flow or entity key (the same in every worker)."""
    return zlib.crc32(key) % partitions


def _now_ms() -> int:
    return round(time.time() * 1000)


def _json(doc: Any) -> bytes:
    """Compact JSON (orjson: about 10 times the standard library's speed on our documents), with
    non-string keys (the windows' buckets). The ECS and OCSF documents, whose keys are all
    strings, take orjson's default, about 1.6 times faster."""
    return orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS)


def _fitting(items: list[Any]) -> Iterator[bytes]:
    """The JSON of ``items`` in consecutive parts of at most ``MESSAGE_ROWS`` items that each
    fit one Kafka message (halved until each does; a batch of records with long command lines
    can be several megabytes)."""
    if len(items) > MESSAGE_ROWS:
        for start in range(0, len(items), MESSAGE_ROWS):
            yield from _fitting(items[start:start + MESSAGE_ROWS])
        return
    data = _json(items)
    if len(data) > MESSAGE_BYTES and len(items) > 1:
        half = len(items) // 2
        yield from _fitting(items[:half])
        yield from _fitting(items[half:])
    else:
        yield data


def _write(table: Any, writes: list[tuple[Any, bytes, bytes | None]]) -> None:
    """A batch's table writes (None deletes), each changelogged with its event. A stage makes
    them once its output records are delivered: a state restored after a crash never says
    that something was emitted when it was not (it may say less: then it is emitted again)."""
    for event, key, value in writes:
        _current_event.set(weakref.ref(event))
        if value is None:
            del table[key]
        else:
            table[key] = value


def _state(data: bytes | None) -> Any:
    """A table value (``_json`` bytes, or JSON that Faust's serializer wrote; None: deleted)."""
    return orjson.loads(data) if data else None


def _ssl_context(settings: Settings) -> Any:
    from aiokafka.helpers import create_ssl_context

    return create_ssl_context(cafile=settings.ssl_ca_location,
                              certfile=settings.ssl_certificate_location,
                              keyfile=settings.ssl_key_location)


def _credentials(settings: Settings) -> Any:
    """Faust broker credentials for the configured security protocol."""
    proto = settings.security_protocol
    if proto == "PLAINTEXT":
        return None
    ssl = _ssl_context(settings) if proto.endswith("SSL") else None
    if proto.startswith("SASL"):
        return faust.SASLCredentials(username=settings.sasl_username,
                                     password=settings.sasl_password,
                                     mechanism=settings.sasl_mechanism or "PLAIN", ssl_context=ssl)
    return faust.SSLCredentials(ssl)


def _aiokafka_security(settings: Settings) -> dict[str, Any]:
    proto = settings.security_protocol
    if proto == "PLAINTEXT":
        return {}
    conf: dict[str, Any] = {"security_protocol": proto}
    if proto.endswith("SSL"):
        conf["ssl_context"] = _ssl_context(settings)
    if proto.startswith("SASL"):
        conf.update(sasl_mechanism=settings.sasl_mechanism or "PLAIN",
                    sasl_plain_username=settings.sasl_username,
                    sasl_plain_password=settings.sasl_password)
    return conf


def main(settings: Settings, web_port: int = 6066, web_host: str = "127.0.0.1",
         workers_group: str = "packetless-streams", **tuning: Any) -> int:
    """Run one worker until SIGINT/SIGTERM; returns the exit code."""
    if not port_free(web_host, web_port):
        print(f"packetless streams: cannot serve the web views on {web_host}:{web_port}: "
              f"{port_taken_message(web_port)} (choose another --web-port)", file=sys.stderr)
        return 2
    heap.tune()
    options = StreamOptions.from_options(**tuning)
    ensure_topics(settings)
    ensure_schemas(Codec(settings))
    worker = Worker(settings, workers_group, web_host, web_port, options)
    worker.create_internal_topics()
    faust_worker = faust.Worker(worker.app, loglevel=logging.getLogger().getEffectiveLevel()
                                or logging.INFO, quiet=True)
    faust_worker.spinner = None  # its handler would turn the root logger to DEBUG (costly)
    try:
        faust_worker.execute_from_commandline()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0

