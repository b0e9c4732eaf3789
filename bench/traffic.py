"""Known loopback TCP traffic for the benchmarks, as separate processes with known pids.

``server PORT``: per connection, reads an 8-byte header (request size A, response size B), A
bytes, writes B bytes, then waits for the client's close. ``client PORT OUT FIRST COUNT``:
connections FIRST..FIRST+COUNT-1 with sizes ``sizes(i)``, their local ports written to OUT.
``latency PORT OUT COUNT RATE``: small exchanges, recording when each socket was closed.
``hold PORT COUNT``: holds COUNT open connections until stdin closes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import socket
import socketserver
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HEADER = struct.Struct("!II")
HOLD_CHUNK = 9000  # connections per holder process (RLIMIT_NOFILE is 20,000 here)


def sizes(i: int) -> tuple[int, int]:
    """Distinct request/response sizes of connection ``i`` (not multiples of 1 KiB)."""
    return 3001 + 997 * i, 20011 + 1009 * i


def hold_ms(i: int) -> int:
    """Every 4th connection closes at once, the others stay open 300 ms after the exchange."""
    return 0 if i % 4 == 0 else 300


def truth(i: int) -> tuple[int, int]:
    """(bytes the client sends, bytes it receives) for connection ``i``."""
    a, b = sizes(i)
    return HEADER.size + a, b


def _read(sock: socket.socket, n: int) -> int:
    got = 0
    while got < n:
        chunk = sock.recv(min(65536, n - got))
        if not chunk:
            break
        got += len(chunk)
    return got


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        header = sock.recv(HEADER.size, socket.MSG_WAITALL)
        if len(header) != HEADER.size:
            return
        a, b = HEADER.unpack(header)
        _read(sock, a)
        if b:
            sock.sendall(b"s" * b)
        sock.settimeout(30)
        while sock.recv(65536):
            pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


def server(port: int) -> None:
    with _Server(("127.0.0.1", port), _Handler) as srv:
        print("ready", os.getpid(), flush=True)
        srv.serve_forever(poll_interval=0.2)


def _one(port: int, i: int) -> dict[str, int]:
    a, b = sizes(i)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        local = sock.getsockname()[1]
        sock.sendall(HEADER.pack(a, b) + b"c" * a)
        got = _read(sock, b)
        time.sleep(hold_ms(i) / 1000)
    return {"i": i, "pid": os.getpid(), "client_port": local, "server_port": port,
            "received": got}


def client(port: int, out: Path, first: int, count: int) -> None:
    with ThreadPoolExecutor(max_workers=10) as pool:
        done = list(pool.map(lambda i: _one(port, i), range(first, first + count)))
    out.write_text(json.dumps(done))


def latency(port: int, out: Path, count: int, rate: float) -> None:
    """``count`` exchanges of 100 bytes each way, paced at ``rate``/s; close time per port."""
    closes = []
    start = time.monotonic()
    for i in range(count):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            local = sock.getsockname()[1]
            sock.sendall(HEADER.pack(100, 100) + b"c" * 100)
            _read(sock, 100)
        closes.append({"client_port": local, "closed_ns": time.time_ns()})
    out.write_text(json.dumps(closes))


def hold(port: int, count: int) -> None:
    """Open ``count`` connections to a listener of our own on ``port`` (each side reads or
    writes one byte), print ``held COUNT``, keep them until stdin closes (at most one hour).
    Both ends live in this process: 2 descriptors per connection, within RLIMIT_NOFILE."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if 2 * count + 64 > hard:
        raise SystemExit(f"hold: {count} connections need {2 * count + 64} descriptors; "
                         f"RLIMIT_NOFILE allows {hard}")
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    held: list[socket.socket] = []
    deadline = time.monotonic() + 3600
    while len(held) < 2 * count and time.monotonic() < deadline:
        batch = []
        for _ in range(min(1000, count - len(held) // 2)):
            c = socket.create_connection(("127.0.0.1", port))
            c.send(b"x")
            batch.append(c)
        for c in batch:
            conn, _ = listener.accept()
            conn.recv(1)
            held += [c, conn]
    print("held", len(held) // 2, flush=True)
    select.select([sys.stdin], [], [], max(0.0, deadline - time.monotonic()))
    for s in held:
        s.close()
    listener.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("server").add_argument("port", type=int)
    c = sub.add_parser("client")
    for name, kind in (("port", int), ("out", Path), ("first", int), ("count", int)):
        c.add_argument(name, type=kind)
    lat = sub.add_parser("latency")
    for name, kind in (("port", int), ("out", Path), ("count", int), ("rate", float)):
        lat.add_argument(name, type=kind)
    h = sub.add_parser("hold")
    h.add_argument("port", type=int)
    h.add_argument("count", type=int)
    args = parser.parse_args()
    if args.mode == "server":
        server(args.port)
    elif args.mode == "client":
        client(args.port, args.out, args.first, args.count)
    elif args.mode == "latency":
        latency(args.port, args.out, args.count, args.rate)
    else:
        hold(args.port, args.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
