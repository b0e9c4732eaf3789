"""A bounded on-disk FIFO of Kafka records (one SQLite file in the data dir) for broker outages.

Records wait here, in sequence order, until Kafka answers again; they survive a process restart.
Overflow policy: when the spooled bytes would exceed the bound, the OLDEST records are dropped
(and counted in ``dropped``), so that the freshest observations are kept.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
# Accounted per record on top of topic, key, value and headers: its columns and index entry.
RECORD_OVERHEAD = 48

Headers = list[tuple[str, bytes]]


class SpoolError(RuntimeError):
    """The spool file cannot be used (held by another process, unreadable); says which and why."""


def digest(key: bytes | None, value: bytes | None) -> bytes:
    """A 16-byte fingerprint of a record's key and value (None and b"" differ)."""
    h = hashlib.blake2b(digest_size=16)
    for part in (key, value):
        h.update(b"\xff" if part is None else len(part).to_bytes(8, "big") + part)
    return h.digest()


@dataclass
class SpoolRecord:
    """One spooled record.

    ``suffix`` is set when ``value`` is schemaless Avro (written with the local schema of topic
    ``suffix`` because the registry was unreachable) to be framed with a schema id at replay.
    ``partition`` is set when an earlier attempt may have reached the broker (it timed out
    in flight): the replayer then looks for the record in that partition before sending it again.
    """

    seq: int
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers | None = None
    timestamp_ms: int = 0
    suffix: str | None = None
    partition: int | None = None

    @property
    def size(self) -> int:
        """Bytes this record counts against the spool's bound."""
        heads = sum(len(k) + len(v) for k, v in self.headers or [])
        return (RECORD_OVERHEAD + len(self.topic) + len(self.key or b"") + len(self.value or b"")
                + heads)


def _pack_headers(headers: Headers | None) -> str | None:
    if not headers:
        return None
    return json.dumps([[k, base64.b64encode(v).decode()] for k, v in headers])


def _unpack_headers(text: str | None) -> Headers | None:
    if text is None:
        return None
    return [(k, base64.b64decode(v)) for k, v in json.loads(text)]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    key BLOB,
    value BLOB,
    headers TEXT,
    timestamp_ms INTEGER NOT NULL,
    suffix TEXT,
    partition INTEGER,
    digest BLOB,
    size INTEGER NOT NULL
)
"""
_CHUNK = 500
_COLUMNS = "seq, topic, key, value, headers, timestamp_ms, suffix, partition"


class Spool:
    """A byte-bounded FIFO in SQLite (WAL, one writer at a time; safe to share between threads).

    ``put`` adds records (dropping the oldest beyond ``max_bytes``), ``head`` reads the oldest,
    ``delete`` removes records once delivered. An exclusive lock file keeps a second process
    (or a second Publisher) off the same spool.
    """

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lockfile = open(self.path.with_suffix(".lock"), "a+")  # noqa: SIM115 (held open)
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._lockfile.close()
            raise SpoolError(f"spool {self.path} is in use by another publisher") from exc
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # before the table exists
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a commit survives a crash of this process (not necessarily a power cut)
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
            count, total, last = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(MAX(seq), 0) FROM spool").fetchone()
        except sqlite3.Error as exc:
            self._lockfile.close()
            raise SpoolError(f"spool {self.path} cannot be opened: {exc}") from exc
        self._lock = threading.Lock()
        self.records = count
        self.bytes = total
        self.peak_bytes = total
        self.dropped = 0
        self.last_seq = last
        self._leased_through = 0

    def __len__(self) -> int:
        return self.records

    def put(self, records: Iterable[SpoolRecord]) -> int:
        """Add records in one transaction; returns how many records were dropped to make room.

        A record larger than the whole bound is dropped by itself; otherwise the oldest records
        go (records leased by ``head`` are spared, so the bound may be passed by one lease).
        """
        with self._lock:
            dropped_before = self.dropped
            rows = []
            for rec in records:
                size = rec.size
                if size > self.max_bytes:
                    self.dropped += 1
                    continue
                mark = digest(rec.key, rec.value) if rec.partition is not None else None
                rows.append((rec.seq, rec.topic, rec.key, rec.value, _pack_headers(rec.headers),
                             rec.timestamp_ms, rec.suffix, rec.partition, mark, size))
                self.last_seq = max(self.last_seq, rec.seq)
            if rows:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("INSERT INTO spool VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                self.records += len(rows)
                self.bytes += sum(r[-1] for r in rows)
                if self.bytes > self.max_bytes:
                    self._evict()
                self._db.execute("COMMIT")
            self.peak_bytes = max(self.peak_bytes, self.bytes)
            return self.dropped - dropped_before

    def _evict(self) -> None:
        """Delete the oldest unleased records until the bound holds (inside a transaction)."""
        excess = self.bytes - self.max_bytes
        freed = count = 0
        last = None
        for seq, size in self._db.execute(
                "SELECT seq, size FROM spool WHERE seq > ? ORDER BY seq", (self._leased_through,)):
            if freed >= excess:
                break
            freed += size
            count += 1
            last = seq
        if last is None:
            return
        self._db.execute("DELETE FROM spool WHERE seq > ? AND seq <= ?", (self._leased_through, last))
        self.records -= count
        self.bytes -= freed
        self.dropped += count

    def head(self, limit: int) -> list[SpoolRecord]:
        """The ``limit`` oldest records, leased: eviction leaves them alone until ``release``."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM spool ORDER BY seq LIMIT ?", (limit,)).fetchall()
            self._leased_through = rows[-1][0] if rows else 0
        return [SpoolRecord(seq, topic, key, value, _unpack_headers(heads), ts, suffix, part)
                for seq, topic, key, value, heads, ts, suffix, part in rows]

    def release(self) -> None:
        """End the lease of the last ``head``."""
        with self._lock:
            self._leased_through = 0

    def delete(self, seqs: Iterable[int]) -> int:
        """Remove delivered records; returns how many were still there."""
        keys = list(seqs)
        removed = freed = 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i:i + _CHUNK]
                sizes = self._db.execute(
                    f"DELETE FROM spool WHERE seq IN ({','.join('?' * len(chunk))}) RETURNING size",
                    chunk).fetchall()
                removed += len(sizes)
                freed += sum(s for (s,) in sizes)
            self._db.execute("COMMIT")
            self.records -= removed
            self.bytes -= freed
            if self.records == 0 and removed:
                self._db.execute("PRAGMA incremental_vacuum")
        return removed

    def uncertain(self) -> list[tuple[int, str, int, int, bytes]]:
        """(seq, topic, partition, timestamp_ms, digest) of the records that may be in Kafka."""
        with self._lock:
            return self._db.execute(
                "SELECT seq, topic, partition, timestamp_ms, digest FROM spool "
                "WHERE partition IS NOT NULL ORDER BY seq").fetchall()

    def mark(self, items: Iterable[tuple[int, int | None, bytes | None]]) -> None:
        """Set (seq, partition, digest) of records: a partition and the digest of what was sent
        when an attempt may have reached Kafka, (None, None) once it is known not to have."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("UPDATE spool SET partition = ?, digest = ? WHERE seq = ?",
                                 [(part, mark, seq) for seq, part, mark in items])
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._lockfile.close()
