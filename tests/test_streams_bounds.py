"""The stream worker's memory bounds that need no broker: internal messages carry at most
``MESSAGE_ROWS`` items (the flows and windows stages take them a bounded number at a time);
the free pages of the C heap go back to the system (``packetless.heap``)."""

from __future__ import annotations

import subprocess
import sys

import orjson

from streams.app import MESSAGE_BYTES, MESSAGE_ROWS, _fitting


def test_internal_messages_hold_at_most_message_rows_items() -> None:
    rows = [[i, "10.0.0.1", 443] for i in range(2 * MESSAGE_ROWS + 7)]
    parts = [orjson.loads(data) for data in _fitting(rows)]
    assert [len(p) for p in parts] == [MESSAGE_ROWS, MESSAGE_ROWS, 7]
    assert [row for part in parts for row in part] == rows


def test_large_rows_are_split_by_size_within_the_row_limit() -> None:
    rows = [["x" * 2000, i] for i in range(MESSAGE_ROWS)]  # 2 MB of JSON in MESSAGE_ROWS rows
    datas = list(_fitting(rows))
    assert len(datas) > 1 and all(len(d) <= MESSAGE_BYTES for d in datas)
    assert [row for d in datas for row in orjson.loads(d)] == rows


# Blocks of 16 KiB (malloc'd: Python's own allocator takes only small objects), each followed by
# a small one kept alive, as a batch's transient buffers among longer-lived state; RSS in MiB
# once the large ones are freed, then after ``heap.trim``.
HEAP_SCRIPT = """
import gc, json
from packetless import heap

def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS"))

blocks, kept = [], []
for i in range(12800):
    blocks.append(bytes(16384) + str(i).encode())
    kept.append(str(i).encode() * 40)
held = rss()
del blocks
gc.collect()
freed = rss()
released = heap.trim()
print(json.dumps([held, freed, rss(), released]))
"""


def test_trim_gives_the_free_heap_pages_back() -> None:
    """200 MiB freed between blocks still in use stay resident until ``trim``."""
    out = subprocess.run([sys.executable, "-c", HEAP_SCRIPT], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    held, freed, trimmed, released = orjson.loads(out)
    assert held - freed < 50, (held, freed)  # glibc kept the freed pages
    assert released and freed - trimmed > 150, (freed, trimmed)
