"""Hostile or odd hosts against the real sensor (eBPF mode, real kernel, the session's Kafka).

Processes with non-UTF-8 and huge (adversarial) command lines, and a storm of short-lived
Docker containers each making one connection: the sensor keeps running, its records decode,
and every flow is either attributed to its container or reported unresolved, never missing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import pytest

from packetless.config import Settings
from packetless.kafka import consumer
from packetless.serde import Codec
from packetless.topics import topic_name
from tests.support.capabilities import require_root
from tests.test_sensor_cli import records, sensor_process, stop_sensor, wait_mode

pytestmark = [pytest.mark.kafka, pytest.mark.bpf]

CLIENT = ("import os, socket\n"
          "s = socket.create_connection(('127.0.0.1', int(os.environ['PL_PORT'])))\n"
          "s.sendall(b'h' * int(os.environ['PL_BYTES']))\n"
          "s.shutdown(socket.SHUT_WR)\n"
          "s.recv(1)\n")
ARGS_LIMIT = 65536  # published command lines stay far below Kafka's 1 MB message limit


@dataclass
class Server:
    """A server reading each connection to its end ((peer, first bytes, byte count) in
    ``received``; a peer address may come back, from another client), then holding it open
    until ``release`` is set: clients live until the test lets them go."""

    host: str = "127.0.0.1"
    received: list[tuple[tuple[str, int], bytes, int]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.sock = socket.create_server((self.host, 0), backlog=1024)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn, peer[:2]), daemon=True).start()

    def _read(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        head, got = b"", 0
        while data := conn.recv(65536):
            head, got = head or data[:64], got + len(data)
        self.received.append((peer, head, got))
        self.release.wait()
        conn.close()

    def close(self) -> None:
        self.release.set()
        self.sock.close()


@pytest.fixture
def ebpf_sensor(settings: Settings, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``packetless sensor --mode ebpf`` publishing to the session's Kafka, once observing."""
    require_root()
    proc = sensor_process(settings, tmp_path, "--mode", "ebpf")
    try:
        assert wait_mode(proc, tmp_path)["mode"] == "ebpf"
        yield proc
    finally:
        assert stop_sensor(proc), "the sensor did not stop within 60 s of SIGTERM"


def connect_from(argv: list[bytes], port: int, n: int) -> subprocess.Popen[bytes]:
    """A Python client sending ``n`` bytes to ``port``, with ``argv`` after its code."""
    env = {**os.environ, "PL_PORT": str(port), "PL_BYTES": str(n)}
    return subprocess.Popen([sys.executable.encode(), b"-c", CLIENT.encode(), *argv], env=env)


def test_odd_and_huge_command_lines(settings: Settings, ebpf_sensor: subprocess.Popen[bytes]
                                    ) -> None:
    proc = ebpf_sensor
    server = Server()
    odd = [b"\xff\xfe-caf\xe9", "naïve-ü".encode(), b"--password=s\xffcret"]
    # ~1 MB: one argument quadratic redaction rules would take minutes on, nine of 100 kB
    huge = [b"--" + b"password" * 16_000 + b"!"] + [b"A" * 100_000] * 9
    sizes = {"odd": sum(map(len, odd)), "huge": sum(map(len, huge))}
    since = time.time()
    clients = {name: connect_from(argv, server.port, 10_000 + i)
               for i, (name, argv) in enumerate((("odd", odd), ("huge", huge)))}
    pids = {client.pid: name for name, client in clients.items()}

    def ours(kind: str) -> Callable[[dict[str, Any]], bool]:
        return lambda r: (r["type"] == kind and r["role"] == "CLIENT"
                          and r["remote_port"] == server.port)

    started = time.monotonic()
    encoded: list[int] = []
    starts = records(settings, "raw.ebpf", ours("START"), 2, since=since,
                     sizes=encoded)  # clients wait
    largest = max(encoded, default=0)
    took = time.monotonic() - started
    server.close()
    for client in clients.values():
        assert client.wait(30) == 0
    ends = records(settings, "raw.ebpf", ours("END"), 2, since=since)
    assert proc.poll() is None, "the sensor stopped"
    by_name = {pids[r["process"]["pid"]]: r for r in starts if r["process"]["pid"] in pids}
    assert set(by_name) == {"odd", "huge"}, starts
    assert sorted(r["bytes_sent"] for r in ends) == [10_000, 10_001]
    for name in ("odd", "huge"):
        assert by_name[name]["process"]["args"][:3] == [sys.executable, "-c", CLIENT]
    assert by_name["odd"]["process"]["args"][3:] == [
        "\ufffd\ufffd-caf\ufffd", "naïve-ü", "--password=<redacted>"]
    huge_args = by_name["huge"]["process"]["args"]
    published = sum(map(len, huge_args))
    assert published <= ARGS_LIMIT and "truncated" in huge_args[-1], huge_args[-1][:200]
    assert huge_args[3].startswith("--passwordpassword")
    print(f"\nhostile command lines: odd {sizes['odd']} bytes -> "
          f"{by_name['odd']['process']['args'][3:]}; huge {sizes['huge']} bytes -> {published} "
          f"chars in {len(huge_args)} args (last: {huge_args[-1]!r}); START records on Kafka "
          f"after {took:.1f} s, largest {largest} bytes; END bytes exact; sensor running")


def meta_containers(settings: Settings, ids: set[str], timeout: float = 30) -> dict[str, dict]:
    """The latest meta.containers record of each of ``ids`` found within ``timeout``."""
    codec = Codec(settings)
    cons = consumer(settings, None)
    cons.subscribe([topic_name(settings, "meta.containers")])
    found: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    try:
        while set(found) != ids and time.monotonic() < deadline:
            msg = cons.poll(0.5)
            if msg is None or msg.error():
                continue
            rec = codec.decode("meta.containers", msg.value())
            if rec is not None and rec["id"] in ids:
                found[rec["id"]] = rec
    finally:
        cons.close()
    return found


@pytest.mark.slow
@pytest.mark.docker
def test_short_lived_container_storm(settings: Settings, docker_client: docker.DockerClient,
                                     testbox_image: str, docker_network: Any,
                                     ebpf_sensor: subprocess.Popen[bytes]) -> None:
    """Containers started as fast as the engine allows, each connecting once and exiting
    (``--rm``): every connection must come out attributed to its container or unresolved."""
    count = int(os.environ.get("PACKETLESS_HOSTILE_CONTAINERS", "150"))
    gateway = docker_network.attrs["IPAM"]["Config"][0]["Gateway"]
    server = Server(host=gateway)
    server.release.set()  # containers exit at once

    def one(index: int) -> str:
        container = docker_client.containers.run(
            testbox_image, ["sh", "-c", f"hostname | nc {gateway} {server.port}"],
            detach=True, auto_remove=True, network=docker_network.name,
            name=f"pl-storm-{os.getpid()}-{index}")
        return container.id

    started, started_ns = time.monotonic(), time.time_ns()
    with ThreadPoolExecutor(max_workers=2) as pool:
        ids = list(pool.map(one, range(count)))
    launch_s = time.monotonic() - started
    by_short = {cid[:12]: cid for cid in ids}
    deadline = time.monotonic() + 120
    while len(server.received) < count and time.monotonic() < deadline:
        time.sleep(0.5)
    # the containers that connected from each address (the engine reuses addresses, and a
    # port may come back): an END is right when it names one of them
    candidates: dict[tuple[str, int], list[str | None]] = {}
    for peer, head, _ in server.received:
        candidates.setdefault(peer, []).append(by_short.get(head.strip().decode(errors="replace")))
    ends = records(settings, "raw.ebpf", lambda r: r["type"] == "END" and r["role"] == "CLIENT"
                   and r["remote_ip"] == gateway and r["remote_port"] == server.port
                   and r["timestamp_ns"] >= started_ns, len(server.received),
                   since=started_ns / 1e9, timeout=60 + count / 2)
    server.close()
    if ebpf_sensor.poll() is not None:
        output = ebpf_sensor.stdout.read().decode(errors="replace") if ebpf_sensor.stdout else ""
        pytest.fail(f"the sensor stopped ({ebpf_sensor.returncode}):\n{output[-6000:]}")
    reports = records(settings, "raw.ebpf", lambda r: r["type"] == "DROPS"
                      and r["timestamp_ns"] >= started_ns, 1_000_000, since=started_ns / 1e9,
                      timeout=5)
    drops = {k: v for k, v in reports[-1]["drops"].items() if v} if reports else {}
    got: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in ends:
        got.setdefault((r["local_ip"], r["local_port"]), []).append(r)
    attributed, unresolved, wrong = [], [], []
    for r in ends:
        if r["container_id"] is None:
            unresolved.append(r)
        elif r["container_id"] in candidates.get((r["local_ip"], r["local_port"]), []):
            attributed.append(r)
        else:
            wrong.append(r)
    missing = sum(max(0, len(cids) - len(got.get(peer, []))) for peer, cids in candidates.items())
    meta = meta_containers(settings, {r["container_id"] for r in attributed})
    with_meta = [r for r in attributed if meta.get(r["container_id"], {}).get("image")
                 == testbox_image]
    reused = sum(len(cids) - 1 for cids in candidates.values())
    print(f"\ncontainer storm: {count} containers started in {launch_s:.1f} s "
          f"({count / launch_s:.1f}/s), {len(server.received)} connections reached the server "
          f"({reused} from an address and port used before), {len(ends)} END records: "
          f"{len(attributed)} attributed to their container id "
          f"({len(with_meta)} with metadata resolved), {len(unresolved)} reported unresolved "
          f"(cgroup ids {sorted({r['cgroup_id'] for r in unresolved})[:5]}), "
          f"{len(wrong)} wrong, {missing} missing; kernel losses reported {drops}; "
          f"sensor running")
    assert len(server.received) == count
    assert None not in {c for cids in candidates.values() for c in cids}
    assert not wrong and missing <= sum(drops.values())  # lost only where it says so
    assert all(r["cgroup_id"] is not None for r in unresolved)  # the kernel's fact is kept
