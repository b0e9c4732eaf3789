"""The peers a user would pick instead of Packetless, run as they come: ``ss -tinpe`` polled
every 100 ms (``python -m bench.peers ss OUT``), and Debian's ``tcplife-bpfcc -s``; plus the
parsers that turn their output and our sensor's records into one per-socket view.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SS_ARGV = ["ss", "-tinpeH"]
_USERS = re.compile(r'users:\(\("([^"]*)",pid=(\d+)')
_INO = re.compile(r"\bino:(\d+)")
_FIELD = re.compile(r"\b(bytes_acked|bytes_received):(\d+)")


@dataclass
class SocketView:
    """What one tool says of one local socket."""

    local_port: int
    remote_port: int
    bytes_sent: int | None
    bytes_received: int | None
    pid: int | None
    complete: bool = True  # START and END seen (our sensor), always True for the peers


def _split_endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else 0


def parse_ss(text: str) -> dict[tuple[str, int, str, int, int], tuple[int, int, int | None]]:
    """``ss -tinpeH`` output -> {(local ip, port, remote ip, port, inode): (acked, received, pid)}."""
    out: dict[tuple[str, int, str, int, int], tuple[int, int, int | None]] = {}
    head = ""
    for line in [*text.splitlines(), ""]:
        if line[:1].isspace():
            head += " " + line
            continue
        cols = head.split()
        ino = _INO.search(head)
        if len(cols) >= 5 and ino and ino.group(1) != "0":  # ino 0: orphaned, no owner left
            local, remote = _split_endpoint(cols[3]), _split_endpoint(cols[4])
            users = _USERS.search(head)
            fields = dict(_FIELD.findall(head))
            out[(*local, *remote, int(ino.group(1)))] = (
                int(fields.get("bytes_acked", 0)), int(fields.get("bytes_received", 0)),
                int(users.group(2)) if users else None)
        head = line
    return out


def ss_poll(out: Path, interval: float = 0.1, max_s: float = 3600.0) -> None:
    """Poll ss until SIGINT/SIGTERM (or ``max_s``); keep each socket's last sample; write JSON."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    last: dict[tuple[str, int, str, int, int], tuple[int, int, int | None]] = {}
    polls = 0
    deadline = time.monotonic() + max_s
    print("ready", flush=True)
    while not stop.is_set() and time.monotonic() < deadline:
        t0 = time.monotonic()
        text = subprocess.run(SS_ARGV, capture_output=True, text=True, check=False).stdout
        last.update(parse_ss(text))
        polls += 1
        stop.wait(max(0.0, interval - (time.monotonic() - t0)))
    out.write_text(json.dumps({"polls": polls, "sockets": [[*k, *v] for k, v in last.items()]}))


def ss_views(path: Path) -> list[SocketView]:
    data = json.loads(path.read_text())
    return [SocketView(lport, rport, acked, received, pid)
            for _lip, lport, _rip, rport, _ino, acked, received, pid in data["sockets"]]


def tcplife_views(path: Path) -> list[SocketView]:
    """``tcplife-bpfcc -s`` CSV; TX_KB/RX_KB are KiB (bytes // 1024), reported as bytes."""
    views = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                views.append(SocketView(int(row["LPORT"]), int(row["RPORT"]),
                                        int(row["TX_KB"]) * 1024, int(row["RX_KB"]) * 1024,
                                        int(row["PID"])))
            except (KeyError, TypeError, ValueError):
                continue
    return views


def tcplife_lost(err: Path) -> int:
    """Samples bcc says it lost (perf buffer overflow), from tcplife's stderr."""
    if not err.exists():
        return 0
    return sum(int(m) for m in re.findall(r"Possibly lost (\d+) samples", err.read_text()))


def packetless_records(path: Path) -> list[dict]:
    """The monitor's records (the SUMMARY line left out)."""
    with path.open() as f:
        return [r for r in map(json.loads, f) if r["type"] != "SUMMARY"]


def other_records(path: Path) -> int:
    """Records the monitor saw of other programs' flows (from its SUMMARY line)."""
    with path.open() as f:
        return sum(r.get("other_records", 0) for r in map(json.loads, f) if r["type"] == "SUMMARY")


def packetless_views(records: list[dict]) -> list[SocketView]:
    """One view per socket cookie: the END's counters and the owner, complete if START too."""
    starts = {r["cookie"] for r in records if r["type"] == "START"}
    views = []
    for r in records:
        if r["type"] in ("END", "FAILURE"):
            views.append(SocketView(r["local_port"], r["remote_port"], r["bytes_sent"],
                                    r["bytes_received"], r["pid"], r["cookie"] in starts))
    return views


def final_drops(records: list[dict]) -> dict[str, int]:
    drops = [r["drops"] for r in records if r["type"] == "DROPS" and r.get("drops")]
    return drops[-1] if drops else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("tool", choices=["ss"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--interval", type=float, default=0.1)
    args = parser.parse_args()
    ss_poll(args.out, args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
