"""The stream worker's memory bounds that need no broker: internal messages carry at most
``MESSAGE_ROWS`` items (the flows and windows stages take them a bounded number at a time)."""

from __future__ import annotations

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
