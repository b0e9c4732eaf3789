"""Kafka plumbing shared by the sensor, the stream worker and the CLI.

``Publisher`` produces Avro or JSON records (idempotent, acks=all, compressed, batched), and
with a spool keeps them on disk while Kafka is unreachable, replaying them in order;
``ensure_topics`` creates the topics of ``packetless.topics`` (``create_topics`` returns once the
broker's metadata lists them) and ``ensure_schemas`` registers their schemas with compatibility
BACKWARD; ``dead_letter`` keeps a record that could not be processed.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import fastavro
import fastavro.validation
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ConfigSource,
    NewTopic,
)
from confluent_kafka.schema_registry import Schema, SchemaRegistryError

import schemas
from packetless.config import Settings
from packetless.serde import Codec
from packetless.spool import DEFAULT_MAX_BYTES, Headers, Spool, SpoolRecord, digest
from packetless.topics import TOPICS, topic_name

log = logging.getLogger(__name__)
T = TypeVar("T")

PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "compression.type": "lz4",
    "linger.ms": 50,
    "batch.num.messages": 10000,
    "message.timeout.ms": 300000,
}
# With a spool, undeliverable records come back within 15 s (delivery report) and wait on disk,
# librdkafka holds a bounded amount in memory, and a returning broker is noticed within 1 s.
# A queued record costs about 1 KB resident (payload, librdkafka's copy, the delivery callback):
# 10,000 of them are 0.15 s of a 65,000 records/s burst, which a live local broker keeps below
# (3,000 queued at most, measured); more than that waits on disk while the broker stalls.
SPOOL_PRODUCER: dict[str, Any] = {
    "message.timeout.ms": 15000,
    "queue.buffering.max.messages": 10000,
    "queue.buffering.max.kbytes": 16384,
    "reconnect.backoff.max.ms": 1000,
}
REPLAY_BATCH = 2000
# Records produced directly between two polls for their delivery reports (the spool replayer
# also polls every second). A poll lets go of the GIL and waits to take it back: polled after
# each record, that was 14% of the sensor's eBPF thread at 10,000 connections/s (py-spy), 2.5%.
POLL_EVERY = 500
QUEUE_FULL_WAIT_S = 0.5
REGISTRY_RETRY_S = 10.0
ERROR_LOG_INTERVAL_S = 60.0
# Looking for possibly delivered records reads at most this many records per partition.
MAX_CHECK_SCAN = 500_000
_TRANSIENT = frozenset({
    KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT, KafkaError._TIMED_OUT_QUEUE,
    KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._PURGE_QUEUE,
    KafkaError._PURGE_INFLIGHT, KafkaError._FATAL, KafkaError._AUTHENTICATION,
    KafkaError._SSL, KafkaError.NOT_ENOUGH_REPLICAS, KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NETWORK_EXCEPTION, KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION,
})


def _transient(err: KafkaError) -> bool:
    """A delivery error that Kafka coming back (or a new producer) can cure."""
    return err.code() in _TRANSIENT or err.retriable() or err.fatal()


def _as_bytes(key: str | bytes | None) -> bytes | None:
    return key.encode() if isinstance(key, str) else key


def _header_list(headers: dict[str, bytes] | list[tuple[str, bytes]] | None) -> Headers | None:
    if not headers:
        return None
    items = headers.items() if isinstance(headers, dict) else headers
    return [(k, v.encode() if isinstance(v, str) else v or b"") for k, v in items]


class Publisher:
    """Produces records to Packetless topics by suffix; Avro topics are encoded with ``Codec``.

    With ``spool`` (a name, unique per process role, e.g. ``"sensor"``), records Kafka cannot
    take go to the on-disk ``Spool`` ``<data_dir>/spool/<name>.sqlite`` instead: those whose
    delivery fails (within ``message.timeout.ms``, 15 s), and, from the first failure (or a full
    local queue, or all brokers down) until the spool is empty again, every new record, so that
    the global order is kept. A background thread replays the spool in order once the broker
    answers, deleting records only after their delivery; a record that timed out in flight is
    first looked for in its partition (by key and value) so that it is not written twice.
    Records whose schema id is not known yet while the registry is unreachable are spooled as
    schemaless Avro and framed at replay. Beyond ``spool_max_bytes`` the oldest records are
    dropped and counted (``dropped``). Counters for metrics: ``delivered``, ``failed`` (failed
    delivery attempts), ``spooled``, ``replayed``, ``confirmed`` (found already delivered),
    ``dropped``, ``spool_bytes``, ``spool_records``, ``spool_peak_bytes``; ``on_latency`` gets
    the seconds from queueing to the broker's acknowledgement of each delivered record.
    """

    def __init__(self, settings: Settings, codec: Codec | None = None,
                 on_error: Callable[[str], None] | None = None, *, spool: str | None = None,
                 spool_max_bytes: int = DEFAULT_MAX_BYTES,
                 on_latency: Callable[[float], None] | None = None, **overrides: Any) -> None:
        self.settings = settings
        self.codec = codec or Codec(settings)
        self._on_latency = on_latency
        self.delivered = 0
        self.failed = 0
        self.spooled = 0
        self.replayed = 0
        self.confirmed = 0
        self._on_error = on_error or (lambda msg: log.error("delivery failed: %s", msg))
        self._lock = threading.RLock()
        self._spool = (Spool(Path(settings.data_dir) / "spool" / f"{spool}.sqlite", spool_max_bytes)
                       if spool else None)
        self._conf: dict[str, Any] = {**settings.kafka_config(), **PRODUCER_DEFAULTS,
                                      **(SPOOL_PRODUCER if spool else {}),
                                      "error_cb": self._kafka_error, **overrides}
        self.producer = Producer(self._conf)
        self._seq = self._spool.last_seq if self._spool is not None else 0
        self._direct_pending = 0
        self._unpolled = 0  # records produced directly since the last poll
        self._spooling = self._spool is not None and len(self._spool) > 0
        self._fatal = False
        self._error_logged: dict[int, float] = {}
        self._encodable: set[str] = set()
        self._registry_retry_at = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._replayer: threading.Thread | None = None
        if self._spool is not None:
            self._replayer = threading.Thread(target=self._replay_loop, name="spool-replayer",
                                              daemon=True)
            self._replayer.start()

    @property
    def dropped(self) -> int:
        """Records dropped from the full spool (oldest first) since this publisher started."""
        return self._spool.dropped if self._spool is not None else 0

    @property
    def spool_bytes(self) -> int:
        return self._spool.bytes if self._spool is not None else 0

    @property
    def spool_records(self) -> int:
        return len(self._spool) if self._spool is not None else 0

    @property
    def spool_peak_bytes(self) -> int:
        return self._spool.peak_bytes if self._spool is not None else 0

    def send(self, suffix: str, key: str | bytes | None, value: dict[str, Any],
             headers: dict[str, bytes] | None = None) -> None:
        """Queue ``value`` for topic ``suffix``; Avro or JSON by the topic's definition."""
        topic = topic_name(self.settings, suffix)
        if TOPICS[suffix].schema is None:
            payload = json.dumps(value, separators=(",", ":"), default=str).encode()
        elif (self._spool is not None and suffix not in self._encodable
              and time.monotonic() < self._registry_retry_at):
            self._route(topic, key, self._schemaless(suffix, value), headers, suffix)
            return
        else:
            try:
                payload = self.codec.encode(suffix, value)
            except Exception as exc:
                if self._spool is None or not self._registry_unreachable(exc, suffix, value):
                    raise
                log.warning("schema registry unreachable (%s): spooling %s records unencoded",
                            exc, suffix)
                self._registry_retry_at = time.monotonic() + REGISTRY_RETRY_S
                self._route(topic, key, self._schemaless(suffix, value), headers, suffix)
                return
            self._encodable.add(suffix)
        self.produce_raw(topic, key, payload, headers)

    def tombstone(self, suffix: str, key: str | bytes) -> None:
        """Queue a tombstone (no value) for ``key`` on compacted topic ``suffix``: the topic
        keeps its records of ``key`` only until the broker has compacted them away."""
        self.produce_raw(topic_name(self.settings, suffix), key, None)

    def produce_raw(self, topic: str, key: str | bytes | None, payload: bytes | None,
                    headers: dict[str, bytes] | None = None) -> None:
        """Queue already-encoded bytes: to Kafka, or to the spool while Kafka cannot take them.

        Without a spool, waits for room when the local queue is full.
        """
        if self._spool is None:
            while True:
                try:
                    self.producer.produce(topic, payload, key, headers=headers,
                                          on_delivery=self._delivery)
                    break
                except BufferError:
                    self.producer.poll(0.1)
            self.producer.poll(0)
            return
        self._route(topic, key, payload, headers, None)

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for outstanding deliveries (spool included); returns how many are still pending."""
        if self._spool is None:
            return self.producer.flush(timeout)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            pending = self.producer.flush(max(0.0, min(left, 0.5))) + len(self._spool)
            if pending == 0 or left <= 0:
                return pending
            self._wake.set()

    def close(self, timeout: float = 30.0) -> int:
        """Flush, then keep what is still undelivered in the spool for the next start.

        Returns how many records remain undelivered (spooled, or lost without a spool).
        """
        pending = self.flush(timeout)
        if self._spool is None or self._replayer is None:
            return pending
        self._stop.set()
        self._wake.set()
        self.producer.purge()  # undelivered records come back through their delivery reports
        self._replayer.join()
        self.producer.flush(5.0)
        left = len(self._spool)
        self._spool.close()
        return left

    # -- routing between Kafka and the spool -------------------------------------------------

    def _route(self, topic: str, key: str | bytes | None, payload: bytes | None,
               headers: dict[str, bytes] | None, suffix: str | None) -> None:
        """Produce directly while the spool is empty and Kafka takes records; else spool."""
        with self._lock:
            self._seq += 1
            seq = self._seq
            if self._spooling or suffix is not None:
                self._spooling = True
                self._put(SpoolRecord(seq, topic, _as_bytes(key), payload, _header_list(headers),
                                      int(time.time() * 1000), suffix))
                return
            self._direct_pending += 1
        deadline = time.monotonic() + QUEUE_FULL_WAIT_S
        now_ms = int(time.time() * 1000)
        while True:
            try:
                self.producer.produce(topic, payload, key, headers=headers, timestamp=now_ms,
                                      on_delivery=functools.partial(self._direct_delivery, seq,
                                                                    now_ms))
                break
            except (BufferError, KafkaException) as exc:  # queue full, or a fatal producer error
                if isinstance(exc, KafkaException) and not exc.args[0].fatal():
                    with self._lock:
                        self._direct_pending -= 1
                    raise
                if isinstance(exc, BufferError) and time.monotonic() < deadline:
                    self.producer.poll(0.05)
                    continue
                with self._lock:
                    self._direct_pending -= 1
                    self._begin_spooling("the local queue is full" if isinstance(exc, BufferError)
                                         else str(exc))
                    self._put(SpoolRecord(seq, topic, _as_bytes(key), payload,
                                          _header_list(headers), now_ms))
                self._wake.set()
                return
        self._unpolled += 1
        if self._unpolled >= POLL_EVERY:
            self._unpolled = 0
            self.producer.poll(0)

    def _put(self, record: SpoolRecord) -> None:
        assert self._spool is not None
        first = self._spool.dropped == 0
        if self._spool.put([record]) and first:
            log.warning("spool %s is full (%d bytes): dropping the oldest records",
                        self._spool.path, self._spool.max_bytes)
        self.spooled += 1

    def _begin_spooling(self, why: str) -> None:
        if not self._spooling:
            log.warning("Kafka cannot take records (%s): spooling to %s", why,
                        self._spool.path if self._spool is not None else "-")
            self._spooling = True

    def _delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.delivered += 1
            self._observe_latency(msg)
        else:
            self.failed += 1
            self._on_error(str(err))

    def _observe_latency(self, msg: Message) -> None:
        latency = msg.latency()
        if self._on_latency is not None and latency is not None:
            self._on_latency(latency)

    def _direct_delivery(self, seq: int, timestamp_ms: int, err: KafkaError | None,
                         msg: Message) -> None:
        with self._lock:
            self._direct_pending -= 1
            if err is None:
                self.delivered += 1
                self._observe_latency(msg)
                return
            self.failed += 1
            if not _transient(err):
                self._on_error(f"{msg.topic()}: {err.str()}")
                return
            self._begin_spooling(err.str())
            part = msg.partition()
            self._put(SpoolRecord(seq, msg.topic(), msg.key(), msg.value(), msg.headers(),
                                  timestamp_ms, None, part if part is not None and part >= 0 else None))
        self._wake.set()

    def _kafka_error(self, err: KafkaError) -> None:
        if err.fatal():
            log.error("Kafka producer failed: %s; starting a new producer", err.str())
            self._fatal = True
        elif err.code() == KafkaError._ALL_BROKERS_DOWN and self._spool is not None:
            with self._lock:
                self._begin_spooling(err.str())
        elif err.code() not in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
            now = time.monotonic()
            if now - self._error_logged.get(err.code(), -ERROR_LOG_INTERVAL_S) >= ERROR_LOG_INTERVAL_S:
                self._error_logged[err.code()] = now  # librdkafka repeats it at every retry
                log.warning("Kafka: %s", err.str())
        self._wake.set()

    # -- schemas while the registry is away --------------------------------------------------

    @staticmethod
    @functools.cache
    def _local_schema(suffix: str) -> Any:
        return fastavro.parse_schema(schemas.load(TOPICS[suffix].schema or ""))

    def _schemaless(self, suffix: str, value: dict[str, Any]) -> bytes:
        out = io.BytesIO()
        fastavro.schemaless_writer(out, self._local_schema(suffix), value)
        return out.getvalue()

    def _registry_unreachable(self, exc: Exception, suffix: str, value: dict[str, Any]) -> bool:
        """True when encoding failed for want of the registry, not because of the record."""
        if isinstance(exc, SchemaRegistryError) and 400 <= exc.http_status_code < 500 \
                and exc.http_status_code not in (408, 429):
            return False
        return fastavro.validation.validate(value, self._local_schema(suffix), raise_errors=False)

    # -- replay ------------------------------------------------------------------------------

    def _replay_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            self.producer.poll(0)  # delivery reports also arrive while the application is idle
            if self._fatal:
                self._renew_producer()
            with self._lock:
                ready = self._spooling and self._direct_pending == 0
            if not ready or self._stop.is_set():
                continue
            try:
                self._replay()
            except (KafkaException, sqlite3.Error) as exc:
                log.warning("spool replay interrupted: %s", exc)

    def _renew_producer(self) -> None:
        """Replace a producer that hit a fatal error; its records come back to the spool."""
        with self._lock:
            old, self.producer = self.producer, Producer(self._conf)
            self._fatal = False
            self._spooling = True
        old.purge()
        old.flush(5.0)

    def _broker_answers(self) -> bool:
        try:
            return bool(self.producer.list_topics(timeout=2.0).brokers)
        except KafkaException:
            return False

    def _replay(self) -> None:
        """Send the spool's records in order until it is empty or a delivery fails."""
        assert self._spool is not None
        if not self._broker_answers():
            return
        if self._spool.uncertain():
            self._check_uncertain()
        log.info("Kafka answers: replaying %d spooled records", len(self._spool))
        while not self._stop.is_set():
            batch = self._spool.head(REPLAY_BATCH)
            try:
                if not batch:
                    with self._lock:  # no record can be added meanwhile
                        if not self._spool.head(1):
                            self._spooling = False
                            log.info("spool drained: %d replayed, %d dropped so far",
                                     self.replayed, self.dropped)
                            return
                    continue
                if not self._replay_batch(batch):
                    return
            finally:
                self._spool.release()

    def _replay_batch(self, batch: list[SpoolRecord]) -> bool:
        """Produce ``batch`` and wait for its reports; True when all were delivered."""
        assert self._spool is not None
        results: dict[int, tuple[KafkaError | None, Message]] = {}
        sent = 0
        complete = True
        for rec in batch:
            value = rec.value
            if rec.suffix is not None:
                try:
                    value = self._frame(rec)
                except Exception as exc:  # registry still away: try again later
                    log.warning("cannot frame spooled %s records yet: %s", rec.suffix, exc)
                    complete = False
                    break
                if value is None:
                    continue
            while True:
                try:
                    self.producer.produce(
                        rec.topic, value, rec.key, headers=rec.headers, timestamp=rec.timestamp_ms,
                        on_delivery=lambda err, msg, seq=rec.seq: results.__setitem__(seq, (err, msg)))
                    sent += 1
                    break
                except BufferError:
                    self.producer.poll(0.1)
                except KafkaException as exc:
                    if exc.args[0].fatal():
                        raise
                    self._on_error(f"{rec.topic}: {exc} (spooled record dropped)")
                    self._spool.delete([rec.seq])
                    break
        while len(results) < sent:
            self.producer.poll(0.1)
        done, retry, lost = [], [], []
        for seq, (err, msg) in results.items():
            if err is None:
                done.append(seq)
            elif _transient(err):
                part = msg.partition()
                retry.append((seq, part if part is not None and part >= 0 else None,
                              digest(msg.key(), msg.value())))
            else:
                lost.append(seq)
                self._on_error(f"{msg.topic()}: {err.str()} (spooled record dropped)")
        self._spool.delete(done + lost)
        self._spool.mark(retry)
        with self._lock:
            self.replayed += len(done)
            self.delivered += len(done)
            self.failed += len(retry) + len(lost)
        return complete and not retry

    def _frame(self, rec: SpoolRecord) -> bytes | None:
        """A record spooled as schemaless Avro, framed now; None (and dropped) if unreadable."""
        assert self._spool is not None and rec.suffix is not None
        try:
            value = fastavro.schemaless_reader(io.BytesIO(rec.value or b""),
                                               self._local_schema(rec.suffix), None)
        except Exception as exc:  # written by another version of the schema
            self._on_error(f"spooled {rec.suffix} record unreadable ({exc}); dropped")
            self._spool.delete([rec.seq])
            return None
        framed = self.codec.encode(rec.suffix, value)
        self._encodable.add(rec.suffix)
        return framed

    def _check_uncertain(self) -> None:
        """Find records that timed out in flight but did reach Kafka: delete them from the spool.

        Reads each partition from the earliest such record's timestamp to its end, comparing
        key and value fingerprints; records not found are marked as certainly not delivered.
        """
        assert self._spool is not None
        wanted: dict[tuple[str, int], tuple[int, dict[bytes, int]]] = {}
        for seq, topic, part, ts, mark in self._spool.uncertain():
            since, marks = wanted.get((topic, part), (ts, {}))
            marks[mark] = seq
            wanted[(topic, part)] = (min(since, ts), marks)
        cons = consumer(self.settings, None, **{"enable.partition.eof": True})
        found: list[int] = []
        try:
            for (topic, part), (since, marks) in wanted.items():
                try:
                    found += _scan_partition(cons, topic, part, max(0, since - 1000), marks)
                except KafkaException as exc:
                    if _transient(exc.args[0]):
                        raise
                    log.warning("cannot look for %d spooled records in %s[%d] (%s): sending "
                                "them again, which may duplicate some", len(marks), topic, part,
                                exc.args[0].str())
        finally:
            cons.close()
        all_seqs = [seq for _since, marks in wanted.values() for seq in marks.values()]
        self._spool.delete(found)
        seen = set(found)
        self._spool.mark((seq, None, None) for seq in all_seqs if seq not in seen)
        with self._lock:
            self.confirmed += len(found)
            self.delivered += len(found)
        if found:
            log.info("%d spooled records had reached Kafka before it went away", len(found))


def _scan_partition(cons: Consumer, topic: str, partition: int, since_ms: int,
                    marks: dict[bytes, int]) -> list[int]:
    """Seqs of ``marks`` whose record is in ``topic``/``partition`` at or after ``since_ms``."""
    start = cons.offsets_for_times([TopicPartition(topic, partition, since_ms)], timeout=10)[0]
    _low, high = cons.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
    if start.offset < 0 or start.offset >= high:
        return []
    if high - start.offset > MAX_CHECK_SCAN:
        log.warning("%s[%d]: %d records to check, looking at the first %d only", topic, partition,
                    high - start.offset, MAX_CHECK_SCAN)
    end = min(high, start.offset + MAX_CHECK_SCAN)
    cons.assign([TopicPartition(topic, partition, start.offset)])
    found = []
    position = start.offset
    idle_until = time.monotonic() + 10
    while position < end and time.monotonic() < idle_until:
        for msg in cons.consume(1000, timeout=1.0):
            if msg.error():
                continue
            position = msg.offset() + 1
            idle_until = time.monotonic() + 10
            seq = marks.get(digest(msg.key(), msg.value()))
            if seq is not None:
                found.append(seq)
    cons.unassign()
    return found


def dead_letter_record(*, topic: str, partition: int, offset: int, timestamp_ms: int | None,
                       key: bytes | None, value: bytes | None,
                       headers: list[tuple[str, bytes | None]], kind: str, reason: str,
                       consumer: str, host: str) -> dict[str, Any]:
    """The DeadLetter record of a Kafka record that could not be processed, kept unchanged."""
    return {
        "reason": reason,
        "error_type": kind,
        "source_topic": topic,
        "source_partition": partition,
        "source_offset": offset,
        "source_timestamp_ms": timestamp_ms,
        "key": key,
        "value": value,
        "headers": {k: v or b"" for k, v in headers},
        "consumer": consumer,
        "host": host,
        "timestamp_ms": int(time.time() * 1000),
    }


def dead_letter(publisher: Publisher, msg: Message, kind: str, reason: str,
                consumer: str) -> None:
    """Publish ``msg`` unchanged on the DLQ topic with why it could not be processed."""
    ts_type, ts = msg.timestamp()
    publisher.send("dlq", msg.key(), dead_letter_record(
        topic=msg.topic(), partition=msg.partition(), offset=msg.offset(),
        timestamp_ms=ts if ts_type else None, key=msg.key(), value=msg.value(),
        headers=msg.headers() or [], kind=kind, reason=reason, consumer=consumer,
        host=publisher.settings.host_name))


def admin(settings: Settings) -> AdminClient:
    return AdminClient(settings.kafka_config())


def ensure_topics(settings: Settings, suffixes: Iterable[str] | None = None,
                  timeout: float = 30.0) -> list[str]:
    """Create the missing Packetless topics, and give the existing ones the settings of their
    definition that they lack (``complete_configs``); returns the names created."""
    wanted = [TOPICS[s] for s in (suffixes or TOPICS)]
    client = admin(settings)
    created = create_topics(client, [
        NewTopic(topic_name(settings, t.suffix), num_partitions=t.partitions,
                 replication_factor=1, config=t.config()) for t in wanted], timeout)
    existing = {topic_name(settings, t.suffix): t.config() for t in wanted
                if topic_name(settings, t.suffix) not in created}
    try:
        complete_configs(client, existing, timeout)
    except KafkaException as exc:  # e.g. no right to describe or alter configs: not fatal
        log.warning("could not give the existing topics their settings (%s); set them by hand: "
                    "%s", exc, existing)
    return created


def complete_configs(client: AdminClient, configs: dict[str, dict[str, str]],
                     timeout: float = 30.0) -> dict[str, dict[str, str]]:
    """Set on existing topics the entries of ``configs`` (topic -> settings) that the topic
    does not set itself (a topic made by an earlier version lacks a newer setting); a value an
    operator set on the topic is left as it is. Returns what was set, by topic."""
    resources = [ConfigResource(ConfigResource.Type.TOPIC, name) for name in configs]
    if not resources:
        return {}
    described = client.describe_configs(resources, request_timeout=timeout)
    changes: dict[str, dict[str, str]] = {}
    for resource, future in described.items():
        current = future.result()
        missing = {key: value for key, value in configs[resource.name].items()
                   if key in current and current[key].value != value
                   and ConfigSource(current[key].source) != ConfigSource.DYNAMIC_TOPIC_CONFIG}
        if missing:
            changes[resource.name] = missing
    if changes:
        alter = [ConfigResource(ConfigResource.Type.TOPIC, name, incremental_configs=[
            ConfigEntry(key, value, incremental_operation=AlterConfigOpType.SET)
            for key, value in entries.items()]) for name, entries in changes.items()]
        for future in client.incremental_alter_configs(alter, request_timeout=timeout).values():
            future.result()
    return changes


def create_topics(client: AdminClient, topics: list[NewTopic], timeout: float = 30.0) -> list[str]:
    """Create those of ``topics`` that do not exist yet and return their names once the broker's
    metadata lists each with a leader for every partition.

    A broker answers the creation before its own metadata has the topic (1-3 s later on the local
    stack); a client that looks meanwhile gets "unknown topic", and Faust's consumer, joining its
    group, then ignores the topic until its next metadata refresh, five minutes later.
    """
    existing = set(client.list_topics(timeout=timeout).topics)
    new = [t for t in topics if t.topic not in existing]
    if not new:
        return []
    created = []
    for name, future in client.create_topics(new, operation_timeout=timeout).items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    deadline = time.monotonic() + timeout
    while pending := _not_yet_visible(client, new, timeout):
        if time.monotonic() > deadline:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT,
                                            f"topics created but not in the broker's metadata "
                                            f"after {timeout:g}s: {', '.join(pending)}"))
        time.sleep(0.1)
    return created


def _not_yet_visible(client: AdminClient, topics: list[NewTopic], timeout: float) -> list[str]:
    """The names of ``topics`` the broker's metadata lacks, or lists without every partition led."""
    listed = client.list_topics(timeout=timeout).topics
    return [t.topic for t in topics
            if (meta := listed.get(t.topic)) is None or meta.error is not None
            or len(meta.partitions) != t.num_partitions
            or any(p.leader < 0 for p in meta.partitions.values())]


def ensure_schemas(codec: Codec, suffixes: Iterable[str] | None = None) -> dict[str, int]:
    """Register each Avro topic's schema under ``<topic>-value`` with compatibility BACKWARD.

    Returns subject -> schema id. An incompatible change to a schema file is refused by the
    registry here, before anything is produced with it.
    """
    ids: dict[str, int] = {}
    _retry_conflict(functools.partial(codec.client.set_compatibility,
                                      level="BACKWARD"))  # the default for subjects created later
    subjects = set(codec.client.get_subjects())
    for suffix in suffixes or TOPICS:
        schema_name = TOPICS[suffix].schema
        if schema_name is None:
            continue
        subject = f"{topic_name(codec.settings, suffix)}-value"
        if subject not in subjects:
            _retry_conflict(functools.partial(codec.client.set_compatibility, subject, "BACKWARD"))
        schema = Schema(schemas.text(schema_name), "AVRO")
        ids[subject] = _retry_conflict(functools.partial(codec.client.register_schema, subject,
                                                         schema))
    return ids


def _retry_conflict(call: Callable[[], T], attempts: int = 4) -> T:
    """``call()``, retried on HTTP 409: the registry answers it when another process creates
    the same subject or rule at the same moment (workers starting together); both calls are
    idempotent. A BACKWARD-incompatible schema stays refused and raises after the last try."""
    for attempt in range(1, attempts):
        try:
            return call()
        except SchemaRegistryError as exc:
            if exc.http_status_code != 409:
                raise
            time.sleep(0.2 * attempt)
    return call()


def consumer(settings: Settings, group: str | None, **overrides: Any) -> Consumer:
    """A consumer; without a group, an anonymous one that commits nothing."""
    conf: dict[str, Any] = {
        **settings.kafka_config(),
        "group.id": group or f"packetless-anon-{time.monotonic_ns()}",
        "enable.auto.commit": group is not None,
        "auto.offset.reset": "earliest",
    }
    conf.update(overrides)
    return Consumer(conf)
