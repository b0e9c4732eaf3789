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
         timeout: float | None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Print records until ``max_messages`` were printed or ``timeout`` idle seconds passed.

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
    cons.assign([TopicPartition(name, p, start) for p in metadata.topics[name].partitions])
    printed = 0
    last = time.monotonic()
    try:
        while max_messages is None or printed < max_messages:
            if timeout is not None and time.monotonic() - last > timeout:
                break
            msg = cons.poll(0.5)
            if msg is None:
                continue
            last = time.monotonic()
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
