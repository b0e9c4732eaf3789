"""``packetless tail``: print the records of one topic as JSON lines, Avro decoded via the registry.

Records that cannot be decoded are reported on stderr (with topic, partition, offset and the
reason) and skipped; tail never stops on bad input.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from typing import Any, TextIO

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, TopicPartition

from packetless.config import Settings
from packetless.kafka import consumer
from packetless.serde import Codec, DecodeError
from packetless.topics import topic_for_name


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return str(value)


def tail(settings: Settings, topic: str, from_beginning: bool, max_messages: int | None,
         timeout: float | None, to_end: bool = False, out: TextIO = sys.stdout,
         err: TextIO = sys.stderr) -> int:
    """Print records until ``max_messages`` were printed, ``timeout`` idle seconds passed, or
    (``to_end``) every partition was read up to where it ended when tail started.

    Returns the number of records printed.
    """
    definition = topic_for_name(settings, topic)
    name = settings.topic_prefix + definition.suffix
    codec = Codec(settings) if definition.schema else None
    cons = consumer(settings, None)
    metadata = cons.list_topics(name, timeout=10)
    if metadata.topics[name].error is not None:
        raise RuntimeError(f"topic {name}: {metadata.topics[name].error.str()}")
    start = OFFSET_BEGINNING if from_beginning else OFFSET_END
    partitions = list(metadata.topics[name].partitions)
    # --to-end: partition -> its end offset now; tail stops once each non-empty one got there
    marks = {p: cons.get_watermark_offsets(TopicPartition(name, p), timeout=10)
             for p in partitions} if to_end else {}
    ends = {p: high for p, (_low, high) in marks.items()}
    pending = {p for p, (low, high) in marks.items() if high > low} if from_beginning else set()
    cons.assign([TopicPartition(name, p, start) for p in partitions])
    printed = 0
    last = time.monotonic()
    try:
        while max_messages is None or printed < max_messages:
            if timeout is not None and time.monotonic() - last > timeout:
                break
            if to_end and not pending:
                break
            msg = cons.poll(0.5)
            if msg is None:
                continue
            last = time.monotonic()
            if to_end and (msg.offset() or 0) >= ends.get(msg.partition(), 0) - 1:
                pending.discard(msg.partition())
            if msg.error():
                print(json.dumps({"error": msg.error().str()}), file=err)
                continue
            try:
                record = (codec.decode(definition.suffix, msg.value()) if codec
                          else json.loads(msg.value() or b"null"))
            except (DecodeError, ValueError) as exc:
                reason = exc.reason if isinstance(exc, DecodeError) else f"not JSON: {exc}"
                print(json.dumps({"error": reason, "topic": msg.topic(),
                                  "partition": msg.partition(), "offset": msg.offset()}), file=err)
                continue
            out.write(json.dumps(record, default=_json_default, ensure_ascii=False) + "\n")
            out.flush()
            printed += 1
    finally:
        cons.close()
    return printed
