"""The Faust stream worker: raw sensor records -> enriched flows (Avro, ECS, OCSF) and
per-container/pod windows, with state in RocksDB tables (rocksdict) backed by changelog topics.

Stages: raw agent (decode, dead-letter, repartition by flow 5-tuple) -> flows agent (flows
table, flow events, activity repartitioned by container/pod) -> windows agent (windows table,
ContainerMetrics). Timeouts and window closing run on tick records that a timer sends to each
assigned partition, so that every table change happens in stream context and is changelogged.
Every stage works on batches (one internal message per partition per batch, one table write
per key per batch); output records go through librdkafka, flushed before their input is acked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer
from confluent_kafka import KafkaError, Message, Producer
from faust.streams import _current_event
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client import Counter as PCounter

from packetless.config import Settings
from packetless.kafka import PRODUCER_DEFAULTS, dead_letter_record, ensure_schemas, ensure_topics
from packetless.serde import Codec, DecodeError
from packetless.topics import topic_name
from streams import ecs, ocsf
from streams.flows import (
    Activity,
    Emission,
    FlowConfig,
    FlowState,
    LocalAddresses,
    Observation,
    activity,
    due,
    expired,
    next_due,
    observe,
)
from streams.meta import MetaCache
from streams.raw import AvroEncoder, Listeners, RawDecoder, from_ebpf, from_netlink
from streams.records import container_of, enrichment, flow_record
from streams.windows import EntityState, WindowConfig

log = logging.getLogger(__name__)

TICK = b"\x00tick"
BATCH_KEY = b"\x00batch"  # internal messages carry a list of observations or activities
BATCH_MAX = 5000  # records per batch of a stage
BATCH_WITHIN_S = 0.02  # a stage waits at most this long to fill a batch
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
        self.windows = PCounter("packetless_streams_window_records",
                                "ContainerMetrics records emitted", ["entity_type"], registry=r)
        self.errors = PCounter("packetless_streams_processing_errors",
                               "Internal records a stage failed on (logged)", ["stage"], registry=r)
        self.late = PCounter("packetless_streams_late_activity",
                             "Activity that arrived after its window was emitted", registry=r)
        self.rate = Gauge("packetless_streams_events_per_second",
                          "Raw records processed per second (last 10 s)", registry=r)
        self.lag = Gauge("packetless_streams_consumer_lag", "Records not yet processed",
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
        name = record["name"] or record["entity_id"][:12]
        self.container_bytes.labels(name, "in").inc(record["bytes_in"])
        self.container_bytes.labels(name, "out").inc(record["bytes_out"])
        for role in ("client", "server"):
            stats = record[f"rtt_as_{role}"]
            for quantile, field_name in (("0.5", "p50_us"), ("0.95", "p95_us"), ("0.99", "p99_us")):
                if stats[field_name] is not None:
                    self.container_rtt.labels(name, quantile, role).set(stats[field_name] / 1e6)


@dataclass
class Touched:
    """A flow read in the current batch: the event it came with (its partition), its state
    (None: unknown), and the table value it was read as."""

    event: Any
    state: FlowState | None
    stored: dict[str, Any] | None


@dataclass
class FlowBatch:
    """What one batch of the flows stage touched: flows by key, activity by partition."""

    flows: dict[bytes, Touched] = field(default_factory=dict)
    activity: dict[int, list[dict[str, Any]]] = field(default_factory=dict)


class Outputs:
    """Output records (flows, ECS, OCSF, windows, DLQ) through one librdkafka producer: a few
    microseconds a record, against tens through aiokafka. A stage flushes it (off the event
    loop) before the input records of a batch are acknowledged: at least once."""

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

    def send(self, suffix: str, key: bytes | None, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(self.topics[suffix], value, key)
                break
            except BufferError:
                self.producer.poll(0.05)
        self.pending += 1

    async def flush(self) -> None:
        """Wait until every record sent so far is delivered; raises if one could not be."""
        if self.pending:
            self.pending = 0
            left = await asyncio.get_running_loop().run_in_executor(None, self.producer.flush,
                                                                    120.0)
            if left:
                raise RuntimeError(f"{left} output records not delivered in 120 s")
        if self.errors:
            raise RuntimeError(f"output records not delivered: {self.errors[:3]}")


class Worker:
    """The Faust app and everything its agents share."""

    def __init__(self, settings: Settings, workers_group: str, web_host: str, web_port: int,
                 options: StreamOptions) -> None:
        self.settings = settings
        self.options = options
        self.codec = Codec(settings)
        self.decoder = RawDecoder(self.codec)
        self.encoder = AvroEncoder(self.codec)
        self.outputs = Outputs(settings)
        self.local = LocalAddresses()
        self.entity_cache: dict[int, dict[bytes, EntityState]] = {}
        self.meta = MetaCache()
        self.meta_ready = asyncio.Event()
        self.listeners = Listeners()
        self.metrics = Metrics()
        self.latest: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        self.offsets: dict[tuple[str, int], int] = {}
        self.due: dict[int, dict[bytes, int]] = {}  # partition -> flow key -> next due time
        self.incomplete: dict[int, set[bytes]] = {}  # flows whose metadata is not all known
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
        )
        app = self.app
        # table writes wait in Faust's producer buffer; past 100 it stalls the streams in
        # 0.1 s steps, and one batch writes up to a few thousand keys
        app.producer.buffer.max_messages = 4 * BATCH_MAX

        def raw(*suffixes: str) -> faust.TopicT:
            return app.topic(*(topic_name(settings, s) for s in suffixes), key_serializer="raw",
                             value_serializer="raw")

        self.raw_topic = raw("raw.ebpf", "raw.netlink")
        self.sockets_topic = app.topic(f"{workers_group}-sockets", internal=True, partitions=n,
                                       key_serializer="raw", value_serializer="json")
        self.activity_topic = app.topic(f"{workers_group}-activity", internal=True, partitions=n,
                                        key_serializer="raw", value_serializer="json")
        # keys are bytes (raw), values JSON-able dicts of the dataclasses' state
        self.flows = app.Table("flows", default=None, partitions=n, key_type=bytes)
        self.entities = app.Table("entities", default=None, partitions=n, key_type=bytes)
        app.agent(self.raw_topic, name="raw")(self.raw_agent)
        app.agent(self.sockets_topic, name="flows")(self.flows_agent)
        app.agent(self.activity_topic, name="windows")(self.windows_agent)
        app.timer(options.tick_s)(self.tick)
        app.on_partitions_revoked.connect(self.on_revoked)
        app.task(self.metadata_task)
        for path, view in (("/containers", self.view_containers), ("/pods", self.view_pods),
                           ("/flows", self.view_flows), ("/healthz", self.view_health),
                           ("/metrics", self.view_metrics)):
            app.page(path)(_as_view(view))

    # -- stage 1: raw records -> observations keyed by flow

    async def raw_agent(self, stream: faust.StreamT) -> None:
        """Batches of raw records -> one message of observations per flows partition."""
        n = self.options.partitions
        async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            batches: dict[int, list[dict[str, Any]]] = {}
            for event in events:
                obs = self._observation(event.message)
                if obs is not None:
                    key = obs.flow_key().encode()
                    batches.setdefault(_partition(key, n), []).append(obs.to_dict())
            for partition, items in batches.items():
                await self.sockets_topic.send(key=BATCH_KEY, value=items, partition=partition)
            await self.outputs.flush()

    def _observation(self, msg: Any) -> Observation | None:
        """The observation of one raw record; None for records without one (and for bad
        records, which go to the DLQ)."""
        suffix = msg.topic.removeprefix(self.settings.topic_prefix)
        self.metrics.records.labels(suffix).inc()
        self._processed(msg.topic, msg.partition, msg.offset)
        try:
            record = self.decoder.decode(suffix, msg.value)
        except DecodeError as exc:
            self.dead_letter(msg, exc.kind, exc.reason)
            return None
        try:
            return (from_ebpf(record) if suffix == "raw.ebpf"
                    else from_netlink(record, self.listeners)) if record else None
        except (KeyError, TypeError, ValueError) as exc:
            self.dead_letter(msg, "processing_error", f"{type(exc).__name__}: {exc}")
            return None

    def dead_letter(self, msg: Any, kind: str, reason: str) -> None:
        """Keep ``msg`` unchanged on the DLQ with why it could not be processed."""
        self.metrics.dead.labels(kind).inc()
        headers = msg.headers.items() if isinstance(msg.headers, dict) else (msg.headers or [])
        value = self.encoder.encode("dlq", dead_letter_record(
            topic=msg.topic, partition=msg.partition, offset=msg.offset,
            timestamp_ms=round(msg.timestamp * 1000) if msg.timestamp else None, key=msg.key,
            value=msg.value, headers=list(headers), kind=kind, reason=reason, consumer="streams",
            host=self.settings.host_name))
        self.outputs.send("dlq", msg.key, value)

    # -- stage 2: flows

    async def flows_agent(self, stream: faust.StreamT) -> None:
        """Batches of observations and ticks: each flow touched is read from the table once,
        settled once, and written back once per batch."""
        await self.meta_ready.wait()
        async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            now = _now_ms()
            batch = FlowBatch()
            for event in events:
                if event.key == TICK:
                    self.flows_tick(event, now, batch)
                    continue
                for item in event.value:
                    try:
                        self.flow_event(event, Observation.from_dict(item), now, batch)
                    except Exception:  # a bug must not stop the stream; counted and logged
                        self.metrics.errors.labels("flows").inc()
                        log.exception("flows: cannot process %r", item)
            self.settle(batch, now)
            for partition, items in batch.activity.items():
                await self.activity_topic.send(key=BATCH_KEY, value=items, partition=partition)
            await self.outputs.flush()

    def _load(self, event: Any, key: bytes, batch: FlowBatch) -> Touched:
        touched = batch.flows.get(key)
        if touched is None:
            _current_event.set(weakref.ref(event))
            stored = self.flows.get(key)
            touched = batch.flows[key] = Touched(event, FlowState.from_dict(stored) if stored
                                                 else None, stored)
        return touched

    def flow_event(self, event: Any, obs: Observation, now: int, batch: FlowBatch) -> None:
        """Fold one socket observation into its flow; publish what an older flow of the same
        tuple owed; pass the socket's activity on."""
        self.local.add(obs.host, obs.local_ip)
        touched = self._load(event, obs.flow_key().encode(), batch)
        state, owed, sock = observe(touched.state, obs, now, event.message.partition)
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
            for emission in due(state, now, self.options.flow, sig,
                                peer is not None and self.local.may_be_local(state.host, peer)):
                self.publish_flow(state, emission, now)
            index = self.due.setdefault(state.partition, {})
            incomplete = self.incomplete.setdefault(state.partition, set())
            _current_event.set(weakref.ref(touched.event))
            if expired(state, now, self.options.flow):
                del self.flows[key]
                index.pop(key, None)
                incomplete.discard(key)
                continue
            index[key] = next_due(state, self.options.flow)
            if "false" in sig:
                incomplete.add(key)
            else:
                incomplete.discard(key)
            value = state.to_dict()
            if value != touched.stored:
                self.flows[key] = value

    def report(self, state: FlowState, sock: Any, batch: FlowBatch) -> None:
        """Pass what a socket of a container did on to the windows of its container and pod."""
        container = container_of(state, sock, self.meta)
        if not container:
            return
        cfg = self.options.windows
        for act in activity(state, sock, container, self.meta.pod_of(container), cfg.step_ms,
                            cfg.steps):
            partition = _partition(act.entity.encode(), self.options.partitions)
            batch.activity.setdefault(partition, []).append(act.__dict__)

    def flows_tick(self, event: Any, now: int, batch: FlowBatch) -> None:
        """Flow timeouts of one partition: the flows whose next due time has come join the
        batch (START after the join delay, UPDATE, END, forget).

        The index is rebuilt from the table when the partition is (re)assigned, and flows
        lacking metadata are revisited when the metadata changed."""
        partition = event.message.partition
        index = self.due.setdefault(partition, {})
        if partition not in self.indexed:
            for key, stored in self.flows.items():
                if stored and stored["partition"] == partition:
                    index[key] = 0
            self.indexed.add(partition)
        if self.meta.version != self.meta_seen.get(partition):
            self.meta_seen[partition] = self.meta.version
            for key in self.incomplete.get(partition, set()):
                index[key] = 0
        for key in [k for k, when in index.items() if when <= now]:
            if self._load(event, key, batch).state is None:
                index.pop(key, None)

    def on_revoked(self, *args: Any, **kwargs: Any) -> None:
        """After a rebalance the flow index and the entities are read again from the tables."""
        self.indexed.clear()
        self.due.clear()
        self.incomplete.clear()
        self.entity_cache.clear()

    def publish_flow(self, state: FlowState, emission: Emission, now: int) -> None:
        record = flow_record(state, emission, self.meta, now)
        key = record["flow_id"].encode()
        self.metrics.flow_events.labels(emission.type).inc()
        self.outputs.send("flows", key, self.encoder.encode("flows", record))
        for doc in ecs.documents(record):
            self.outputs.send("flows.ecs", key, _json(doc))
        for doc in ocsf.events(record):
            self.outputs.send("flows.ocsf", key, _json(doc))

    # -- stage 3: windows

    async def windows_agent(self, stream: faust.StreamT) -> None:
        """Batches of activity and ticks; entities are kept in memory per partition and
        written to the table once per batch when changed."""
        async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            now = _now_ms()
            changed: dict[bytes, tuple[Any, EntityState | None]] = {}
            for event in events:
                states = self._entities_of(event.message.partition)
                if event.key == TICK:
                    self.windows_tick(event, states, now, changed)
                    continue
                for item in event.value:
                    try:
                        act = Activity(**item)
                        key = act.entity.encode()
                        state = states.get(key) or EntityState(entity=act.entity,
                                                               entity_type=act.entity_type)
                        self._describe(state, act.container_id)
                        if not state.apply(act, self.options.windows):
                            self.metrics.late.inc()
                        states[key] = state
                        changed[key] = (event, state)
                    except Exception:  # a bug must not stop the stream; counted and logged
                        self.metrics.errors.labels("windows").inc()
                        log.exception("windows: cannot process %r", item)
            for key, (event, state) in changed.items():
                _current_event.set(weakref.ref(event))
                if state is not None:
                    self.entities[key] = {"partition": event.message.partition,
                                          "state": state.to_dict()}
                elif self.entities.get(key) is not None:
                    del self.entities[key]
            await self.outputs.flush()

    def _entities_of(self, partition: int) -> dict[bytes, EntityState]:
        """The entities of ``partition``, read from the table once after an assignment."""
        states = self.entity_cache.get(partition)
        if states is None:
            states = self.entity_cache[partition] = {
                key: EntityState.from_dict(stored["state"]) for key, stored in self.entities.items()
                if stored and stored["partition"] == partition}
        return states

    def _describe(self, state: EntityState, container_id: str) -> None:
        ref = self.meta.container_ref(container_id) or {}
        if state.entity_type == "CONTAINER":
            state.describe(ref.get("name"), ref.get("pod_namespace"), ref.get("pod_name"),
                           ref.get("image"))
        else:
            state.describe(ref.get("pod_name"), ref.get("pod_namespace"), ref.get("pod_name"), None)

    def windows_tick(self, event: Any, states: dict[bytes, EntityState], now: int,
                     changed: dict[bytes, tuple[Any, EntityState | None]]) -> None:
        """Emit the windows of one partition that closed; forget idle entities."""
        for key, state in list(states.items()):
            before = state.to_dict()
            if state.entity_type == "CONTAINER":  # metadata may have come after the activity
                self._describe(state, state.entity)
            for rec in state.close(now, self.options.windows):
                self.metrics.windows.labels(rec["entity_type"]).inc()
                self.outputs.send("metrics.containers",
                                  f"{rec['entity_type']}:{rec['entity_id']}".encode(),
                                  self.encoder.encode("metrics.containers", rec))
            if state.idle():
                del states[key]
                changed[key] = (event, None)
            elif state.to_dict() != before:
                changed[key] = (event, state)

    # -- ticks, metadata

    async def tick(self) -> None:
        """Send a tick to every assigned partition of the internal topics."""
        names = {self.sockets_topic.get_topic_name(), self.activity_topic.get_topic_name()}
        topics = {t.get_topic_name(): t for t in (self.sockets_topic, self.activity_topic)}
        for tp in self.app.assignor.assigned_actives():
            if tp.topic in names:
                await topics[tp.topic].send(key=TICK, value={"tick": _now_ms()},
                                            partition=tp.partition)
        self._rate()

    async def metadata_task(self) -> None:
        """Follow meta.containers and meta.processes from the beginning (every worker needs all
        of them) and the recent metrics.containers (for the web views). The flows agent waits
        until the metadata present at start has been read."""
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
            for tp in tps:
                if tp.topic == names["metrics.containers"]:
                    consumer.seek(tp, max(begins[tp], ends[tp] - METRICS_BACKLOG))
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
            self.meta.add_container(msg.key.decode() if msg.key else None, record)
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
        for stored in list(self.flows.values()):
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
        ok = self.meta_ready.is_set()
        body = {"status": "ok" if ok else "starting", "metadata_ready": ok,
                "uptime_s": round(time.time() - self.started, 1),
                "partitions": sorted(f"{tp.topic}:{tp.partition}"
                                     for tp in self.app.assignor.assigned_actives())}
        return web.json(body, status=200 if ok else 503)

    async def view_metrics(self, web: Any, request: Any) -> Any:
        m = self.metrics
        consumer = self.app.consumer
        for tp in consumer.assignment():
            done = self.offsets.get((tp.topic, tp.partition))
            high = consumer.highwater(tp)
            if high is not None:
                m.lag.labels(tp.topic, str(tp.partition)).set(max(high - (done + 1 if done is not None
                                                                           else 0), 0))
        m.tables.labels("flows").set(sum(1 for _ in self.flows))
        m.tables.labels("entities").set(sum(1 for _ in self.entities))
        m.meta.labels("containers").set(len(self.meta.containers))
        m.meta.labels("processes").set(len(self.meta.processes))
        return web.bytes(generate_latest(m.registry), content_type=PROMETHEUS_TYPE)

    def _processed(self, topic: str, partition: int, offset: int) -> None:
        self.offsets[(topic, partition)] = offset
        self.metrics.total += 1

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


def _partition(key: bytes, partitions: int) -> int:
    """The internal partition of a flow or entity key (the same in every worker)."""
    return zlib.crc32(key) % partitions


def _now_ms() -> int:
    return round(time.time() * 1000)


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


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
    options = StreamOptions.from_options(**tuning)
    logging.getLogger("communityid").setLevel(logging.WARNING)  # it logs every computation
    ensure_topics(settings)
    ensure_schemas(Codec(settings))
    worker = Worker(settings, workers_group, web_host, web_port, options)
    faust_worker = faust.Worker(worker.app, loglevel=logging.getLogger().getEffectiveLevel()
                                or logging.INFO, quiet=True)
    faust_worker.spinner = None  # its handler would turn the root logger to DEBUG (costly)
    try:
        faust_worker.execute_from_commandline()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0

