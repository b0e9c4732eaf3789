"""Read Avro topics record by record; whatever cannot be decoded or handled is dead-lettered.

At-least-once: offsets are committed only after the handler (or the DLQ write) is done, so a
crash re-reads records instead of losing them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Message

from packetless.config import Settings
from packetless.kafka import Publisher, consumer, dead_letter
from packetless.serde import Codec, DecodeError
from packetless.topics import topic_for_name, topic_name

log = logging.getLogger(__name__)

Handler = Callable[[str, Message, dict[str, Any] | None], None]


@dataclass
class Counts:
    """What a consume loop did."""

    handled: int = 0
    dead_lettered: int = 0


def consume(settings: Settings, suffixes: list[str], group: str, handle: Handler,
            stop: threading.Event, name: str = "consumer", commit_every: int = 500) -> Counts:
    """Decode records of ``suffixes`` and pass them to ``handle(suffix, msg, record)`` until
    ``stop`` is set; failures go to the DLQ with the reason."""
    codec = Codec(settings)
    publisher = Publisher(settings, codec)
    cons = consumer(settings, group, **{"enable.auto.commit": False})
    cons.subscribe([topic_name(settings, s) for s in suffixes])
    counts = Counts()
    pending = 0
    try:
        while not stop.is_set():
            msg = cons.poll(0.2)
            if msg is None:
                if pending:
                    publisher.flush()
                    cons.commit(asynchronous=False)
                    pending = 0
                continue
            if msg.error():
                log.warning("consumer error: %s", msg.error().str())
                continue
            suffix = topic_for_name(settings, msg.topic()).suffix
            try:
                record = codec.decode(suffix, msg.value())
            except DecodeError as exc:
                dead_letter(publisher, msg, exc.kind, exc.reason, name)
                counts.dead_lettered += 1
            else:
                try:
                    handle(suffix, msg, record)
                    counts.handled += 1
                except Exception as exc:  # a handler bug must not lose the record
                    log.exception("handler failed on %s[%d]@%d", msg.topic(), msg.partition(),
                                  msg.offset())
                    dead_letter(publisher, msg, "processing_error", f"{type(exc).__name__}: {exc}",
                                name)
                    counts.dead_lettered += 1
            pending += 1
            if pending >= commit_every:
                publisher.flush()
                cons.commit(asynchronous=False)
                pending = 0
    finally:
        publisher.flush()
        if pending:
            cons.commit(asynchronous=False)
        cons.close()
    return counts
