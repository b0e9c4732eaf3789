"""The Netlink sensor, container and process metadata against real containers and processes.

Two testbox containers on a user-defined bridge exchange known bytes; snapshots taken inside
their namespaces must show their sockets, tcp_info and interfaces; every record published
must be valid Avro for its schema.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pytest

import schemas
from sensor import netlink
from sensor.containers import ContainerOptions, ContainerWatcher
from sensor.netlink import NetlinkOptions, NetlinkSensor
from sensor.netlink import run as run_netlink
from sensor.netns import Namespace
from sensor.processes import (
    REDACTED,
    LineageScanner,
    ProcessCache,
    ProcessOptions,
    RedactRule,
    redact,
)
from tests.support.capabilities import require_root

PAYLOAD = 12345
SCHEMA_OF_TOPIC = {"raw.netlink": "NetlinkEvent", "meta.containers": "Container",
                   "meta.processes": "ProcessEvent"}


class Published:
    """A ``publish`` callable collecting (topic, key, value) and checking values against Avro
    (tombstones, None, apart)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, dict[str, Any]]] = []
        self.tombstones: list[tuple[str, str, int]] = []  # topic, key, values before it
        self._parsed = {topic: fastavro.parse_schema(schemas.load(name))
                        for topic, name in SCHEMA_OF_TOPIC.items()}
        self._lock = threading.Lock()

    def __call__(self, topic: str, key: str, value: dict[str, Any] | None) -> None:
        if value is None:
            with self._lock:
                self.tombstones.append((topic, key, len(self.items)))
            return
        fastavro.validation.validate(value, self._parsed[topic], raise_errors=True)
        with self._lock:
            self.items.append((topic, key, value))

    def values(self, topic: str, key: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [v for t, k, v in self.items if t == topic and key in (None, k)]


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() > deadline:
            assert result, f"condition not met within {timeout} s"
            return result
        time.sleep(every)


def netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def ss_cookies(pid: int) -> dict[tuple[int, int], int]:
    """(local port, remote port) -> cookie as iproute2's ss prints it inside pid's namespace."""
    out = subprocess.run(["nsenter", "-t", str(pid), "-n", "ss", "-tane"], check=True,
                         capture_output=True, text=True).stdout
    cookies = {}
    for line in out.splitlines():
        ports = re.findall(r":(\d+|\*)\s", line)
        cookie = re.search(r"\bsk:([0-9a-f]+)", line)
        if cookie and len(ports) >= 2:
            remote = 0 if ports[1] == "*" else int(ports[1])
            cookies[(int(ports[0]), remote)] = int(cookie.group(1), 16)
    return cookies


@pytest.fixture
def pair(containers, docker_network) -> Iterator[dict[str, Any]]:
    """A server (nc echo on 8080) and a client that sent PAYLOAD bytes and keeps the
    connection open, both on a user-defined bridge network."""
    require_root()
    labels = {"packetless.test": "netlink", "tier": "server"}
    server = containers(["nc", "-ll", "-p", "8080", "-e", "/bin/cat"],
                        network=docker_network.name, labels=labels)
    server.reload()
    server_ip = server.attrs["NetworkSettings"]["Networks"][docker_network.name]["IPAddress"]
    client = containers(["sh", "-c", f"(head -c {PAYLOAD} /dev/zero; sleep 600) | "
                                     f"nc {server_ip} 8080 > /dev/null"],
                        network=docker_network.name, labels={"tier": "client"})
    client.reload()
    yield {"server": server, "client": client, "server_ip": server_ip, "labels": labels,
           "server_pid": server.attrs["State"]["Pid"], "client_pid": client.attrs["State"]["Pid"]}


def _sockets(events: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [v["socket"] | {"netns_inode": v["netns_inode"]} for _, v in events
            if v["kind"] == "SOCKET"]


@pytest.mark.docker
def test_container_sockets_and_interfaces(pair: dict[str, Any]) -> None:
    published = Published()
    sensor = NetlinkSensor(NetlinkOptions(host_name="testhost", unchanged_every=1))
    server, client = pair["server"], pair["client"]

    def settled() -> list[tuple[str, dict[str, Any]]] | None:
        events = sensor.snapshot()
        for key, value in events:
            published("raw.netlink", key, value)
        done = [s for s in _sockets(events) if s["tcp"] and s["tcp"]["bytes_received"] == PAYLOAD
                and s["tcp"]["bytes_acked"] >= PAYLOAD
                and (s["container_id"], s["remote_port"] == 8080) in ((client.id, True),
                                                                       (server.id, False))]
        return events if len(done) == 2 else None

    events = wait_for(settled)
    sockets = _sockets(events)
    conn = next(s for s in sockets if s["container_id"] == client.id and s["remote_port"] == 8080)
    assert conn["netns_inode"] == netns_inode(pair["client_pid"]) != netns_inode(os.getpid())
    assert conn["state"] == "ESTABLISHED" and conn["transport"] == "tcp"
    assert conn["remote_ip"] == pair["server_ip"]
    tcp = conn["tcp"]
    assert tcp["rtt_us"] > 0 and tcp["segs_out"] > 2 and tcp["segs_in"] > 2
    assert tcp["bytes_acked"] in (PAYLOAD, PAYLOAD + 1)  # the SYN may count
    assert tcp["bytes_sent"] == PAYLOAD and tcp["retransmits"] == 0
    assert conn["process"]["comm"] == "nc" and conn["process"]["container_id"] == client.id
    assert conn["pid"] in {p.pid for p in _container_processes(pair["client_pid"])}

    listener = next(s for s in sockets if s["container_id"] == server.id
                    and s["local_port"] == 8080 and s["state"] == "LISTEN")
    accepted = next(s for s in sockets if s["container_id"] == server.id
                    and s["local_port"] == 8080 and s["remote_port"] == conn["local_port"])
    assert listener["netns_inode"] == accepted["netns_inode"] == netns_inode(pair["server_pid"])
    assert accepted["tcp"]["bytes_received"] == PAYLOAD
    assert accepted["tcp"]["bytes_acked"] in (PAYLOAD, PAYLOAD + 1)
    assert accepted["process"]["comm"] in ("nc", "cat")
    assert accepted["cgroup_id"] == os.stat(
        f"/sys/fs/cgroup/unified/docker/{server.id}").st_ino

    # The cookie is the kernel's: ss (iproute2) prints the same one, and it is stable.
    assert ss_cookies(pair["client_pid"])[(conn["local_port"], 8080)] == conn["cookie"]
    assert ss_cookies(pair["server_pid"])[(8080, conn["local_port"])] == accepted["cookie"]
    again = {s["cookie"] for s in _sockets(sensor.snapshot())}
    assert {conn["cookie"], accepted["cookie"], listener["cookie"]} <= again
    assert len({conn["cookie"], accepted["cookie"], listener["cookie"]}) == 3

    # Interfaces: the client's eth0 inside its namespace and its host-side veth peer.
    keys = {k: v["interface"] for k, v in events if v["kind"] == "INTERFACE"}
    eth0 = keys[f"testhost:if:{client.id[:12]}/eth0"]
    assert eth0["container_id"] == client.id and not eth0["host_namespace"]
    assert eth0["tx_bytes"] > PAYLOAD and eth0["rx_bytes"] > PAYLOAD
    assert eth0["peer_name"] is not None and eth0["peer_name"].startswith("veth")
    veth = keys[f"testhost:if:{eth0['peer_name']}"]
    assert veth["host_namespace"] and veth["container_id"] == client.id
    assert veth["peer_name"] == "eth0" and veth["ifindex"] == eth0["peer_ifindex"]
    assert veth["rx_bytes"] == pytest.approx(eth0["tx_bytes"], abs=2000)


@pytest.mark.docker
def test_idle_sockets_are_republished_every_n_snapshots(pair: dict[str, Any]) -> None:
    sensor = NetlinkSensor(NetlinkOptions(host_name="h", interfaces=False, unchanged_every=4))

    def listeners(events: list[tuple[str, dict[str, Any]]]) -> list[int]:
        return [s["cookie"] for s in _sockets(events)
                if s["container_id"] == pair["server"].id and s["state"] == "LISTEN"]

    cookies = wait_for(lambda: listeners(sensor.snapshot()))
    shown = [listeners(sensor.snapshot()) for _ in range(8)]
    for cookie in cookies:  # each listening socket once every 4 snapshots
        seen = [cookie in round_ for round_ in shown]
        assert seen[:4].count(True) == 1 and seen[4:] == seen[:4], shown


def test_idle_sockets_take_turns() -> None:
    """Idle sockets are republished once every N snapshots each, a share of them per snapshot,
    not all in the same one (which would cost as much as the first snapshot)."""
    server = socket.create_server(("127.0.0.1", 0))
    pairs = []
    for _ in range(100):
        client = socket.create_connection(server.getsockname())
        pairs.append((client, server.accept()[0]))
    ours = {(s.getsockname()[1], s.getpeername()[1]) for pair in pairs for s in pair}
    try:
        sensor = NetlinkSensor(NetlinkOptions(host_name="h", interfaces=False, udp=False,
                                              other_namespaces=False, unchanged_every=4))
        sensor.snapshot()
        rounds = [[s["cookie"] for s in _sockets(sensor.snapshot())
                   if (s["local_port"], s["remote_port"]) in ours and s["state"] == "ESTABLISHED"]
                  for _ in range(8)]
    finally:
        for pair in pairs:
            for sock in pair:
                sock.close()
        server.close()
    assert all(20 <= len(r) <= 80 for r in rounds), [len(r) for r in rounds]  # of 200
    first, second = rounds[:4], rounds[4:]
    assert sorted(c for r in first for c in r) == sorted(c for r in second for c in r)
    assert len({c for r in first for c in r}) == 200 == sum(len(r) for r in first)


def test_time_wait_sockets_only_when_asked() -> None:
    """Netlink mode dumps TIME_WAIT sockets (they show connections shorter than a snapshot);
    eBPF mode leaves them out (eBPF gave their ENDs): there the socket's last snapshot is its
    SOCKET_CLOSED, and the TIME_WAIT socket is never published."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted = server.accept()[0]
    ports = client.getsockname()[1], server.getsockname()[1]
    sensors = {tw: NetlinkSensor(NetlinkOptions(host_name="h", interfaces=False, udp=False,
                                                other_namespaces=False, time_wait=tw))
               for tw in (True, False)}

    def seen(tw: bool) -> list[tuple[str, str]]:
        return [(v["kind"], v["socket"]["state"]) for _, v in sensors[tw].snapshot()
                if v["socket"]
                and (v["socket"]["local_port"], v["socket"]["remote_port"]) == ports]

    try:
        assert seen(True) == seen(False) == [("SOCKET", "ESTABLISHED")]
        client.close()  # the side that closes first waits in TIME_WAIT
        accepted.close()
        assert wait_for(lambda: seen(True) == [("SOCKET", "TIME_WAIT")])
        assert seen(False) == [("SOCKET_CLOSED", "ESTABLISHED")]
        assert seen(False) == []
    finally:
        server.close()


def _container_processes(pid: int) -> list[Any]:
    import psutil
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


@pytest.mark.docker
def test_closed_socket_and_run_loop(pair: dict[str, Any]) -> None:
    published = Published()
    stop = threading.Event()
    options = NetlinkOptions(host_name="testhost", interval_s=0.3)
    thread = threading.Thread(target=run_netlink, args=(published, stop, options))
    thread.start()
    try:
        def client_socket() -> dict[str, Any] | None:
            return next((v["socket"] for v in published.values("raw.netlink")
                         if v["kind"] == "SOCKET" and v["socket"]["container_id"]
                         == pair["client"].id and v["socket"]["remote_port"] == 8080
                         and v["socket"]["tcp"]["bytes_received"] == PAYLOAD), None)

        cookie = wait_for(client_socket)["cookie"]
        pair["client"].kill()
        closed = wait_for(lambda: [v for v in published.values("raw.netlink",
                                                                f"testhost:{cookie}")
                                   if v["kind"] == "SOCKET_CLOSED"])
        assert len(closed) == 1
        last = closed[0]["socket"]
        if last["state"] == "TIME_WAIT":  # seen after the kill: it comes without tcp_info
            assert last["tcp"] is None
        else:
            assert last["tcp"]["bytes_received"] == PAYLOAD
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.mark.docker
def test_container_metadata_lifecycle(docker_client, containers) -> None:
    published = Published()
    stop = threading.Event()
    watcher = ContainerWatcher(published, ContainerOptions(host_name="testhost"))
    thread = threading.Thread(target=watcher.run, args=(stop,))
    thread.start()
    try:
        container = containers(["sleep", "600"], labels={"app": "meta", "team": "net"})

        def running() -> list[dict[str, Any]]:
            return [v for v in published.values("meta.containers", container.id)
                    if v["state"] == "RUNNING" and v["pid"]]

        record = wait_for(running)[-1]
        assert watcher.available
        assert record["name"] == container.name
        assert record["image"] == "packetless-testbox:latest"
        assert record["labels"] == {"app": "meta", "team": "net"}
        assert record["runtime"] == "docker" and record["oci_runtime"] == "runc"
        assert record["cgroup_path"] == f"/docker/{container.id}"
        assert record["cgroup_id"] == os.stat(
            f"/sys/fs/cgroup/unified/docker/{container.id}").st_ino
        assert record["netns_inode"] == netns_inode(record["pid"])
        assert record["ip_addresses"] and record["exit_code"] is None

        container.rename(container.name + "-renamed")
        wait_for(lambda: any(v["event"] == "rename" and v["name"].endswith("-renamed")
                             for v in published.values("meta.containers", container.id)))
        container.stop(timeout=1)
        ended = wait_for(lambda: [v for v in published.values("meta.containers", container.id)
                                  if v["state"] == "STOPPED" and v["event"] == "die"])[-1]
        assert ended["exit_code"] == 137 and ended["finished_at_ms"] >= record["started_at_ms"]
        assert ended["pid"] is None and ended["cgroup_id"] == record["cgroup_id"]
        container.remove()
        removed = wait_for(lambda: [v for v in published.values("meta.containers",
                                                                container.id)
                                    if v["state"] == "REMOVED"])
        assert removed[-1]["name"] == container.name + "-renamed"
        # behind the REMOVED record, a tombstone: the compacted topic forgets the container
        wait_for(lambda: any(t[:2] == ("meta.containers", container.id)
                             for t in published.tombstones))
        (at,) = [n for topic, key, n in published.tombstones if key == container.id]
        before = [v for _t, k, v in published.items[:at] if k == container.id]
        assert before[-1]["state"] == "REMOVED"
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.mark.docker
def test_container_first_seen_by_cgroup_is_resolved(docker_client, containers) -> None:
    container = containers(["nc", "-ll", "-p", "9090", "-e", "/bin/cat"],
                           labels={"seen": "by-cgroup"})
    published = Published()
    watcher = ContainerWatcher(published, ContainerOptions(host_name="testhost"))
    sensor = NetlinkSensor(NetlinkOptions(host_name="testhost", interfaces=False,
                                          unchanged_every=1, on_container=watcher.resolve))
    wait_for(lambda: any(s["container_id"] == container.id and s["local_port"] == 9090
                         for s in _sockets(sensor.snapshot())))
    records = published.values("meta.containers", container.id)
    assert len(records) == 1 and records[0]["event"] == "resolve"
    assert records[0]["labels"] == {"seen": "by-cgroup"}
    sensor.snapshot()
    assert len(published.values("meta.containers", container.id)) == 1


@pytest.mark.docker
def test_container_removed_mid_inspect(docker_client, containers) -> None:
    since = time.time() - 1
    container = containers(["sleep", "600"], labels={"gone": "soon"})
    container.remove(force=True)
    until = time.time() + 1
    published = Published()
    watcher = ContainerWatcher(published, ContainerOptions(host_name="testhost"))
    assert watcher.resolve(container.id) is None
    events = [e for e in docker_client.events(since=since, until=until, decode=True,
                                              filters={"container": container.id})]
    for event in events:  # replayed after removal: every inspect finds nothing
        watcher.handle_event(event)
    records = published.values("meta.containers", container.id)
    assert [r["event"] for r in records][-2:] == ["die", "destroy"]
    die, destroyed = records[-2:]
    assert die["state"] == "STOPPED" and die["exit_code"] == 137
    assert destroyed["state"] == "REMOVED" and destroyed["name"] == container.name
    assert destroyed["labels"] == {"gone": "soon"}
    assert destroyed["image"] == "packetless-testbox:latest"


class _UnixProxy(socketserver.ThreadingUnixStreamServer):
    """A Docker socket that can disappear: forwards to the real one until shut down."""

    daemon_threads = True

    def __init__(self, path: str, target: str) -> None:
        self.target, self.connections = target, []

        class Handler(socketserver.BaseRequestHandler):
            def handle(inner) -> None:
                upstream = socket.socket(socket.AF_UNIX)
                upstream.connect(target)
                self.connections += [inner.request, upstream]
                pump = threading.Thread(target=_pump, args=(upstream, inner.request),
                                        daemon=True)
                pump.start()
                _pump(inner.request, upstream)
                pump.join()

        super().__init__(path, Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def vanish(self) -> None:
        self.shutdown()
        self.server_close()
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        os.unlink(self.server_address)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


@pytest.mark.docker
def test_docker_socket_disappears(docker_client, tmp_path: Path,
                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="sensor.containers")
    path = str(tmp_path / "docker.sock")
    published = Published()
    stop = threading.Event()
    watcher = ContainerWatcher(published, ContainerOptions(
        host_name="testhost", docker_url=f"unix://{path}", reconnect_s=0.2))
    thread = threading.Thread(target=watcher.run, args=(stop,))
    thread.start()
    try:
        time.sleep(1.0)  # no socket at all: keeps retrying, says so once
        assert thread.is_alive() and not watcher.available and watcher.last_error
        assert len([r for r in caplog.records if "unavailable" in r.message]) == 1
        proxy = _UnixProxy(path, "/var/run/docker.sock")
        wait_for(lambda: watcher.available)
        syncs = len([v for v in published.values("meta.containers") if v["event"] == "sync"])
        proxy.vanish()
        wait_for(lambda: not watcher.available)
        assert thread.is_alive()
        proxy = _UnixProxy(path, "/var/run/docker.sock")
        wait_for(lambda: watcher.available)
        if syncs:  # engine has containers: they are published again after reconnection
            wait_for(lambda: len([v for v in published.values("meta.containers")
                                  if v["event"] == "sync"]) >= 2 * syncs)
        assert any("available again" in r.message for r in caplog.records)
    finally:
        stop.set()
        thread.join(timeout=10)
    proxy.vanish()
    assert not thread.is_alive()


def _unprivileged_snapshot(queue: Any) -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    client.sendall(b"x" * 1000)
    accepted.recv(1000)
    sensor = NetlinkSensor(NetlinkOptions(host_name="h", processes=ProcessCache()))
    events = sensor.snapshot()
    sensor.snapshot()
    port = server.getsockname()[1]
    mine = [s for s in _sockets(events) if port in (s["local_port"], s["remote_port"])]
    queue.put({"mine": mine, "limitations": sensor.limitations, "pid": os.getpid(),
               "interfaces": sum(v["kind"] == "INTERFACE" for _, v in events)})


def test_unprivileged_sees_own_sockets(caplog: pytest.LogCaptureFixture) -> None:
    require_root()  # to drop to nobody
    NetlinkSensor(NetlinkOptions(host_name="h")).snapshot()  # imports everything first
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_unprivileged_snapshot, args=(queue,))
    child.start()
    result = queue.get(timeout=60)
    child.join(timeout=30)
    assert child.exitcode == 0
    named = [m.split("without ")[1].split(" ")[0] for m in result["limitations"]]
    assert named == ["CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"]
    mine = result["mine"]
    assert {s["state"] for s in mine} == {"LISTEN", "ESTABLISHED"} and len(mine) == 3
    assert all(s["uid"] == 65534 and s["pid"] == result["pid"] for s in mine)
    assert all(s["process"]["user_name"] == "nobody" for s in mine)
    received = [s["tcp"]["bytes_received"] for s in mine if s["state"] == "ESTABLISHED"]
    assert sorted(received) == [0, 1000]
    assert result["interfaces"] > 0


def test_compared_counters_agree_with_tcp_info() -> None:
    """The three counters a snapshot compares are read at a remembered offset, without the
    rest of the message: they equal the full tcp_info of every socket, also when the
    attributes before it differ (a socket with a mark has one more)."""
    require_root()  # SO_MARK
    names = ("segs_in", "segs_out", "retransmits")
    order = sorted(names, key=netlink._member_offsets().__getitem__)
    server = socket.create_server(("127.0.0.1", 0))
    clients = []
    for mark in (0, 7, 0, 9, 0):
        client = socket.socket()
        if mark:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        client.connect(server.getsockname())
        client.sendall(b"x" * (100 + mark))
        clients.append((client, server.accept()[0]))
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, netlink.NETLINK_SOCK_DIAG) as nl:
            nl.bind((0, 0))
            found = list(netlink.dump_sockets(nl, socket.AF_INET, socket.IPPROTO_TCP))
        ours = [m for m in found if server.getsockname()[1] in (netlink.details(m).sport,
                                                                netlink.details(m).dport)]
        assert len(ours) == 11  # the listener, and both ends of 5 connections
        assert all(netlink.details(m).tcp_info is not None for m in ours)
        for msg in found:  # the host's too: TIME_WAIT sockets come without tcp_info
            info = netlink.details(msg).tcp_info
            full = dict(zip(netlink._TCP_NAMES, info or (), strict=False))
            assert msg.counters == tuple(full[name] for name in order if info), msg
    finally:
        for pair in clients:
            for sock in pair:
                sock.close()
        server.close()


@contextlib.contextmanager
def _varied_sockets() -> Iterator[list[socket.socket]]:
    """Sockets with different attribute sets: TCP listeners and connections over IPv4 and IPv6
    (one with a mark, one with another congestion control, one in TIME_WAIT), UDP sockets."""
    held: list[socket.socket] = []
    try:
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            server = socket.create_server((host, 0), family=family)
            held.append(server)
            for option in ((socket.SOL_SOCKET, socket.SO_MARK, 5),
                           (socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"reno"), None):
                client = socket.socket(family)
                if option:
                    client.setsockopt(*option)
                client.connect(server.getsockname()[:2])
                client.sendall(b"x" * 700)
                held += [client, server.accept()[0]]
            with socket.create_connection(server.getsockname()[:2]):  # closed first: TIME_WAIT
                server.accept()[0].close()
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((host, 0))
            peer = socket.socket(family, socket.SOCK_DGRAM)
            peer.connect(udp.getsockname()[:2])
            held += [udp, peer]
        yield held
    finally:
        for sock in held:
            sock.close()


def test_layouts_read_what_the_walk_reads() -> None:
    """Messages read through a layout remembered from an earlier message of the dump give the
    heads and details that walking their attributes gives, for every host socket, across
    sockets whose attributes differ (so that the layouts switch within a dump)."""
    require_root()  # SO_MARK
    with _varied_sockets() as ours, \
            socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, netlink.NETLINK_SOCK_DIAG) as nl:
        nl.bind((0, 0))
        inodes = {os.fstat(sock.fileno()).st_ino for sock in ours}
        found = [(transport, msg)
                 for seq, (family, protocol, transport, _) in enumerate(netlink.DUMPS, 1)
                 for msg in netlink.dump_sockets(nl, family, protocol, seq)]
    layouts: dict[str, set[tuple[int, ...]]] = {}
    for transport, msg in found:
        walked = netlink._walk(msg.family, msg.data, msg.offset, msg.end)
        assert netlink.details(msg) == walked
        assert msg.head == netlink._head(msg.data, msg.offset + netlink._NLMSGHDR.size, msg.end)
        if msg.inode in inodes or msg.state == 6:  # ours, and TIME_WAIT ones (no inode)
            assert msg.layout is not None, walked
            layouts.setdefault(transport, set()).add(msg.layout.expected[3:])
            assert (walked.tcp_info is not None) == (transport == "tcp" and msg.state != 6)
        if msg.layout is not None:  # what a first snapshot reads of an idle socket
            activity, cgroup = msg.layout.activity, msg.layout.cgroup
            assert (activity.unpack_from(msg.data, msg.offset) if activity else None) == (
                None if walked.tcp_info is None else
                tuple(walked.tcp_info[netlink._TCP_NAMES.index(name)]
                      for name in ("last_data_sent_ms", "last_data_recv_ms")))
            assert (cgroup.unpack_from(msg.data, msg.offset)[0] if cgroup else None) == \
                walked.cgroup_id
    assert {msg.inode for _, msg in found} >= inodes
    assert {netlink.details(m).congestion for _, m in found if m.inode in inodes} >= {"reno", None}
    # established, TIME_WAIT, another congestion name's length, IPv6 listeners (their v6only
    # flag); UDP sockets over IPv4 and IPv6: layouts of their own
    assert len(layouts["tcp"]) >= 4 and len(layouts["udp"]) >= 2, layouts


def _replay(datagrams: list[bytes]) -> list[netlink.DiagMessage]:
    """dump_sockets over a socketpair whose other end answers with ``datagrams``, then DONE."""
    def message(msg_type: int, body: bytes) -> bytes:
        return netlink._NLMSGHDR.pack(16 + len(body), msg_type, 2, 1, 0) + body

    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, kernel:
        ours.settimeout(5)
        for data in [*datagrams, message(netlink.NLMSG_DONE, b"\0" * 4)]:
            kernel.send(data)
        return list(netlink.dump_sockets(ours, socket.AF_INET, socket.IPPROTO_TCP))


def test_a_layout_is_used_only_where_it_fits() -> None:
    """Messages of equal length with other attributes, or attributes a layout cannot read
    (a short tcp_info, a malformed attribute), are read as the walk reads them."""
    def attr(kind: int, payload: bytes) -> bytes:
        return (struct.pack("=HH", 4 + len(payload), kind) + payload).ljust(
            (4 + len(payload) + 3) & ~3, b"\0")

    def message(cookie: int, *attrs: bytes) -> bytes:
        body = netlink._INET_DIAG_MSG.pack(
            2, 1, 0, 0, 0x5000, 0x9000, b"\x7f\0\0\1".ljust(16, b"\0"),
            b"\x7f\0\0\2".ljust(16, b"\0"), 3, cookie, 0, 1, 2, 0, 100 + cookie)
        body += b"".join(attrs)
        return netlink._NLMSGHDR.pack(16 + len(body), netlink.SOCK_DIAG_BY_FAMILY, 2, 1,
                                      0) + body

    info = bytes(range(256)) * 2
    cgroup, cong = attr(netlink.INET_DIAG_CGROUP_ID, struct.pack("=Q", 77)), attr(
        netlink.INET_DIAG_CONG, b"cubic\0\0\0")
    messages = [
        message(1, cgroup, cong, attr(netlink.INET_DIAG_INFO, info[:netlink._TCP_INFO.size])),
        message(2, cgroup, cong, attr(netlink.INET_DIAG_INFO, info[1:netlink._TCP_INFO.size + 1])),
        message(3, cong, cgroup, attr(netlink.INET_DIAG_INFO, info[:netlink._TCP_INFO.size])),
        message(4, cgroup, cong, attr(netlink.INET_DIAG_INFO, info[:netlink._TCP_INFO.size - 8]),
                attr(99, b"\0" * 4)),  # short tcp_info, same length
        message(5, cgroup, attr(netlink.INET_DIAG_CONG, b"bbr\0\0\0\0\0"),
                attr(netlink.INET_DIAG_INFO, info[:netlink._TCP_INFO.size])),
        message(6, cgroup, cong, struct.pack("=HH", 2, 1) + b"\0" * 4),  # malformed
        message(7, cgroup, cgroup),  # cgroup id twice: the walk keeps the last one
    ]
    found = _replay([b"".join(messages[:3]), b"".join(messages[3:])])
    assert [m.cookie for m in found] == [1, 2, 3, 4, 5, 6, 7]
    for msg in found:
        walked = netlink._walk(msg.family, msg.data, msg.offset, msg.end)
        assert netlink.details(msg) == walked
        assert msg.head == netlink._head(msg.data, msg.offset + netlink._NLMSGHDR.size, msg.end)
    assert [m.layout is not None for m in found] == [True, True, True, False, True, False, False]
    assert found[0].layout is found[1].layout is not found[2].layout
    assert netlink.details(found[4]).congestion == "bbr"
    assert netlink.details(found[1]).tcp_info != netlink.details(found[0]).tcp_info


def test_rows_copied_through_layouts_equal_rows_packed_from_walks() -> None:
    """The kept rows a snapshot copies from messages of a layout, a batch at a time (messages
    one after the other, or apart, among others), equal those packed from a walk of each
    message; a congestion name longer than the row's field is cut alike."""
    def attr(kind: int, payload: bytes) -> bytes:
        return (struct.pack("=HH", 4 + len(payload), kind) + payload).ljust(
            (4 + len(payload) + 3) & ~3, b"\0")

    def message(cookie: int, *attrs: bytes) -> bytes:
        body = netlink._INET_DIAG_MSG.pack(
            2, 1, 0, 0, 0x5000 + cookie, 0x9000, b"\x7f\0\0\1".ljust(16, b"\0"),
            b"\x7f\0\0\2".ljust(16, b"\0"), 3, cookie, 0, 1, 2, 0, 100 + cookie)
        body += b"".join(attrs)
        return netlink._NLMSGHDR.pack(16 + len(body), netlink.SOCK_DIAG_BY_FAMILY, 2, 1,
                                      0) + body

    def info(cookie: int) -> bytes:
        return attr(netlink.INET_DIAG_INFO,
                    bytes((cookie + i) % 256 for i in range(netlink._TCP_INFO.size)))

    def cgroup(cookie: int) -> bytes:
        return attr(netlink.INET_DIAG_CGROUP_ID, struct.pack("=Q", 1000 + cookie))

    cong = attr(netlink.INET_DIAG_CONG, b"cubic\0")
    long_cong = attr(netlink.INET_DIAG_CONG, b"a-congestion-name-of-24\0")
    a = [message(c, cgroup(c), cong, info(c)) for c in range(1, 7)]
    b = [message(c, cong, cgroup(c), info(c)) for c in range(11, 14)]
    c = [message(c, long_cong, info(c)) for c in range(21, 23)]
    found = _replay([a[0] + a[1] + b[0] + a[2] + b[1] + b[2] + a[3],  # a apart, b apart
                     c[0] + c[1] + a[4] + a[5]])  # one after the other
    assert len(found) == 11 and all(m.layout is not None for m in found)
    assert len({id(m.layout) for m in found}) == 3
    dump = netlink._Dump(1, "tcp", "ipv4", socket.AF_INET, [])
    copied, written = netlink._KeptSockets(), netlink._KeptSockets()
    copied.begin()
    written.begin()
    for pid, m in enumerate(found):
        message_ = (m.head, m.data, m.offset, m.end, -1)
        copied.copy(copied.store(m.cookie, -1, 0, None, None), 7, pid or None, dump.kind,
                    m.data, m.offset, m.layout)
        written.write(written.store(m.cookie, -1, 0, None, None),
                      netlink._row(7, pid or None, dump, message_))
    copied.end([])
    assert copied.rows == written.rows
    kept = [netlink._kept_record(copied.kept(slot)) for slot in range(len(found))]
    assert [record["cookie"] for _, record in kept] == [m.cookie for m in found]
    assert {record["tcp"]["congestion"] for _, record in kept} == {"cubic", "a-congestion-nam"}
    assert kept[1][1]["pid"] == 1 and kept[0][1]["pid"] is None and kept[0][0] == 7
    # a kept socket dumped twice in one snapshot through two layouts, after another socket of
    # the first: its row is the one of its last message
    slot_x, slot_s = copied.find([found[0].cookie, found[1].cookie])
    copied.begin()
    for slot, m in ((slot_x, found[0]), (slot_s, found[2]), (slot_s, found[3])):
        copied.copy(copied.store(m.cookie, slot, 0, None, None), 7, None, dump.kind, m.data,
                    m.offset, m.layout)
    copied.flush()
    last = found[3]
    assert copied.rows[slot_s * netlink._ROW.size:(slot_s + 1) * netlink._ROW.size] == \
        netlink._ROW.pack(*netlink._row(7, None, dump, (last.head, last.data, last.offset,
                                                        last.end, -1)))
    # rows of a few messages each from many buffers (a snapshot republishing one idle socket
    # in 12) keep at most COPY_BUFFERS buffers waiting, and are copied all the same
    apart = _replay([message(c, cgroup(c), cong, info(c))
                     for c in range(100, 100 + 3 * netlink.COPY_BUFFERS)])
    assert len({id(m.data) for m in apart}) == 3 * netlink.COPY_BUFFERS
    copied, written = netlink._KeptSockets(), netlink._KeptSockets()
    copied.begin()
    written.begin()
    for m in apart:
        copied.copy(copied.store(m.cookie, -1, 0, None, None), 7, None, dump.kind, m.data,
                    m.offset, m.layout)
        assert len(copied._copies) < netlink.COPY_BUFFERS
        written.write(written.store(m.cookie, -1, 0, None, None),
                      netlink._row(7, None, dump, (m.head, m.data, m.offset, m.end, -1)))
    copied.end([])
    assert copied.rows == written.rows


def test_tcp_record_takes_the_members_in_their_order() -> None:
    """A SocketTcpInfo record has the _TCP_NAMES members in their order, then the congestion
    name; an unlimited pacing rate and a zero delivery rate are None."""
    names = [*netlink._TCP_NAMES, "congestion"]
    info = tuple(range(1, len(netlink._TCP_NAMES) + 1))
    record = vars(netlink._TcpRecord(info, "cubic"))
    assert list(record) == names and list(record.values()) == [*info, "cubic"]
    rates = dict(zip(netlink._TCP_NAMES, info, strict=True))
    for pacing, delivery, expected in ((netlink._PACING_UNLIMITED, 0, (None, None)),
                                       (netlink._PACING_UNLIMITED - 1, 5,
                                        (netlink._PACING_UNLIMITED - 1, 5))):
        rates.update(pacing_rate=pacing, delivery_rate=delivery)
        record = vars(netlink._TcpRecord(tuple(rates.values()), None))
        assert list(record) == names and record["congestion"] is None
        assert (record["pacing_rate"], record["delivery_rate"]) == expected


def test_links_dumped_as_pyroute2_iproute_dumps_them() -> None:
    """The sensor's RTM_GETLINK dump (pyroute2's messages on its own socket, without IPRoute)
    gives the INTERFACE records IPRoute.get_links gives, for the host's links and those of a new
    namespace (loopback down, a bridge, a veth pair with one end up)."""
    require_root()
    from pyroute2 import IPRoute

    name = f"pl-links-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for command in (["link", "add", "br-t", "type", "bridge"],
                        ["link", "add", "ve-a", "mtu", "1400", "type", "veth", "peer", "name",
                         "ve-b"], ["link", "set", "ve-a", "up"]):
            subprocess.run(["ip", "-n", name, *command], check=True)
        sensor = NetlinkSensor(NetlinkOptions(host_name="h"))
        counters = {"rx_bytes", "tx_bytes", "rx_packets", "tx_packets", "multicast"}
        for namespace in (Namespace(1, "/proc/self/ns/net", host=True),
                          Namespace(2, f"/run/netns/{name}", host=False, container_id="c1")):
            ours = sensor._links(namespace)
            with IPRoute(fileno=sensor._open(namespace, netlink.NETLINK_ROUTE)) as ipr:
                theirs = [netlink._link_record(msg, namespace) for msg in ipr.get_links()]
            if namespace.host:  # the host's counters move between the two dumps
                ours, theirs = ([{k: v for k, v in link.items() if k not in counters}
                                 for link in links] for links in (ours, theirs))
            else:
                assert {link["name"] for link in ours} == {"lo", "br-t", "ve-a", "ve-b"}
                assert {link["kind"] for link in ours} == {None, "bridge", "veth"}
                ve_a = next(link for link in ours if link["name"] == "ve-a")
                assert ve_a["mtu"] == 1400 and ve_a["peer_ifindex"] > 0
            assert ours == theirs and ours
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def test_records_from_layouts_equal_records_from_walks() -> None:
    """The records a snapshot builds through layouts equal those built by walking every
    message (a _Dump that names no layout), and those rebuilt from what is kept of them."""
    require_root()
    sensor = NetlinkSensor(NetlinkOptions(host_name="h", interfaces=False,
                                          other_namespaces=False))
    namespace = next(iter(netlink.discover_namespaces(other=False).values()))
    with _varied_sockets():
        state = netlink._Snapshot(0, 1, sensor._owners.read())
        found = list(sensor._messages(namespace))
    compared, kinds = 0, set()
    copied, written = netlink._KeptSockets(), netlink._KeptSockets()
    copied.begin()
    written.begin()
    for dump, message in found:
        walked = netlink._Dump(dump.kind, dump.transport, dump.family_name, dump.family, [])
        pid = state.owners.get(message[0][5])
        record, process, container_id = sensor._socket_record(dump, message, namespace,
                                                       state, pid)
        assert record == sensor._socket_record(walked, (*message[:4], -1), namespace, state,
                                        pid)[0]
        # what is kept for the socket's SOCKET_CLOSED gives the same record again, whether its
        # row is copied through its layout (with the rows of the messages after it) or packed
        # from a walk
        cookie = message[0][1]
        slot = copied.store(cookie, -1, 0, process, container_id)
        if message[4] >= 0:
            copied.copy(slot, namespace.inode, pid, dump.kind, message[1], message[2],
                        dump.layouts[message[4]])
        else:
            copied.write(slot, netlink._row(namespace.inode, pid, dump, message))
        written.write(written.store(cookie, -1, 0, process, container_id),
                      netlink._row(namespace.inode, pid, walked, (*message[:4], -1)))
        assert netlink._kept_record(written.kept(slot)) == (namespace.inode, record)
        compared += message[4] >= 0
        kinds.add((record["transport"], record["family"], record["tcp"] is not None,
                   record["pid"] is not None))
    # messages set aside until the end of a dump give the same heads and records
    waiting = netlink._Waiting()
    for dump, message in found:
        waiting.add(namespace, dump, message)
    assert list(waiting.cookies) == [message[0][1] for _, message in found]
    for (dump, message), (ns, kept_dump, copy) in zip(found, waiting.messages(), strict=True):
        assert ns is namespace and kept_dump is dump and copy[0] == message[0]
        pid = state.owners.get(message[0][5])
        assert sensor._socket_record(dump, copy, namespace, state, pid)[0] == \
            sensor._socket_record(dump, message, namespace, state, pid)[0]
    copied.flush()
    assert compared >= 20 and copied.rows == written.rows
    assert {("tcp", "ipv4", True, True), ("tcp", "ipv6", True, True),
            ("udp", "ipv4", False, True)} <= kinds


def test_kept_sockets_slots_and_index() -> None:
    """The store of kept sockets: a socket keeps its slot until it is gone (a socket set aside
    in the snapshot is not unseen), a gone socket's slot is given to the next new one, and a
    cookie stored twice in one snapshot is indexed once."""
    kept = netlink._KeptSockets()
    rows = [netlink._ROW.unpack(bytes([i]) * netlink._ROW.size) for i in range(4)]
    process = {"pid": 1}

    def store(cookie: int, slot: int, signature: int, row: tuple[Any, ...],
              process: dict[str, Any] | None, container_id: str | None) -> None:
        kept.write(kept.store(cookie, slot, signature, process, container_id), row)

    kept.begin()
    for cookie, row in zip((30, 10, 20), rows, strict=False):
        store(cookie, -1, cookie * 7, row, process, f"c{cookie}")
    kept.end([])
    assert len(kept) == 3 and kept.find([10, 20, 30, 15, 40, 0]) == [1, 2, 0, -1, -1, -1]
    assert kept.kept(1) == (rows[1], process, "c10") and kept.signatures[2] == 140
    kept.begin()
    kept.seen[1] = 1
    assert kept.unseen() == [(20, 2), (30, 0)]
    assert kept.unseen(np.array([30, 40], np.uint64)) == [(20, 2)]  # 30 waits for its owner
    store(20, 2, 1, rows[3], None, None)  # changed: same slot, new values
    assert kept.unseen() == [(30, 0)] and kept.kept(2) == (rows[3], None, None)
    kept.end([0])
    assert kept.find([30, 10, 20]) == [-1, 1, 2] and kept.processes[0] is None
    kept.begin()
    store(50, -1, 5, rows[0], None, None)  # takes the slot 30 left
    store(50, -1, 5, rows[0], None, None)  # the same cookie again: a new slot
    kept.end([])
    assert len(kept) == 3 and kept.find([50]) == [3]
    assert len(kept.signatures) == len(kept.processes) == netlink.SLOTS_ADDED  # grown at once
    kept.begin()
    store(60, -1, 6, rows[0], None, None)  # the slot freed by the duplicate
    kept.end([])
    assert kept.find([10, 20, 50, 60]) == [1, 2, 3, 0]


def _linger_close(sock: socket.socket) -> None:
    """Close with a reset: both ends are gone at once (no TIME_WAIT)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_changed_sockets_republished_closed_ones_reported() -> None:
    """Between snapshots an unchanged socket is not published again, a socket that exchanged
    data is, and a socket gone is published as SOCKET_CLOSED with the values of its last
    SOCKET record; a new socket after that is published as new."""
    server = socket.create_server(("127.0.0.1", 0))
    pairs = []
    for _ in range(30):
        client = socket.create_connection(server.getsockname())
        pairs.append((client, server.accept()[0]))

    def ports(pair: tuple[socket.socket, socket.socket]) -> set[tuple[int, int]]:
        return {(s.getsockname()[1], s.getpeername()[1]) for s in pair}

    ours = set().union(*(ports(pair) for pair in pairs))

    def snapshot() -> dict[str, dict[tuple[int, int], dict[str, Any]]]:
        found: dict[str, dict[tuple[int, int], dict[str, Any]]] = {}
        for _, value in sensor.snapshot():
            sock = value["socket"]
            if sock is not None and (sock["local_port"], sock["remote_port"]) in ours:
                found.setdefault(value["kind"], {})[sock["local_port"], sock["remote_port"]] = sock
        return found

    # an idle socket takes its turn when (snapshot count + cookie) % unchanged_every is 0: with
    # 1000, one of these 60 sockets did at the second snapshot about one run in 16
    sensor = NetlinkSensor(NetlinkOptions(host_name="h", interfaces=False, udp=False,
                                          other_namespaces=False, unchanged_every=1 << 62))
    try:
        first = snapshot()
        assert set(first) == {"SOCKET"} and set(first["SOCKET"]) == ours
        assert all(s["state"] == "ESTABLISHED" and s["pid"] == os.getpid()
                   for s in first["SOCKET"].values())
        assert snapshot() == {}
        changed, closed = pairs[0], pairs[1]
        closed_ports = ports(closed)
        changed[0].sendall(b"x" * 1000)
        assert changed[1].recv(2000)
        _linger_close(closed[0])
        _linger_close(closed[1])
        time.sleep(0.2)
        third = snapshot()
        assert set(third) == {"SOCKET", "SOCKET_CLOSED"}
        assert set(third["SOCKET"]) == ports(changed)
        assert sum(s["tcp"]["bytes_received"] for s in third["SOCKET"].values()) == 1000
        assert third["SOCKET_CLOSED"] == {k: first["SOCKET"][k] for k in closed_ports}
        assert snapshot() == {}
        client = socket.create_connection(server.getsockname())
        pairs.append((client, server.accept()[0]))
        ours |= ports(pairs[-1])
        assert set(snapshot()) == {"SOCKET"}
        slots = sensor._kept.find([s["cookie"] for s in first["SOCKET"].values()])
        assert [slot >= 0 for slot in slots] == [k not in closed_ports for k in first["SOCKET"]]
    finally:
        for pair in pairs[2:]:
            for sock in pair:
                sock.close()
        server.close()


def test_process_gone_before_lookup() -> None:
    child = subprocess.Popen(["sleep", "30"])
    cache = ProcessCache()
    live = cache.lookup(child.pid)
    assert live["exe"] and live["exe"].endswith("sleep") and live["args"] == ["sleep", "30"]
    assert live["ppid"] == os.getpid() and live["parent_name"]
    child.kill()
    child.wait()
    gone = cache.lookup(child.pid, comm="sleep", uid=0, gid=0, tid=child.pid)
    assert gone["comm"] == "sleep" and gone["uid"] == 0 and gone["user_name"] == "root"
    assert gone["exe"] is None and gone["args"] == [] and gone["ppid"] is None
    # a pid whose current process started at another time is not the one the kernel meant
    me = cache.lookup(os.getpid(), comm="old", start_time_ms=1000)
    assert me["comm"] == "old" and me["exe"] is None


def test_snapshots_survive_process_and_socket_churn() -> None:
    """Processes holding sockets live ~0.1 s each: their sockets and /proc entries vanish
    while snapshots read them; snapshots must go on and report the sockets closed."""
    require_root()
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    stop = threading.Event()

    def accept_and_hold() -> None:
        held: list[tuple[float, socket.socket]] = []
        server.settimeout(0.05)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append((time.monotonic(), server.accept()[0]))
            while held and time.monotonic() - held[0][0] > 0.3:
                held.pop(0)[1].close()
        for _, conn in held:
            conn.close()

    acceptor = threading.Thread(target=accept_and_hold)
    acceptor.start()
    churn = subprocess.Popen(["busybox", "sh", "-c", "while :; do busybox nc 127.0.0.1 "
                              f"{port} & busybox usleep 100000; kill $!; done"])
    try:
        sensor = NetlinkSensor(NetlinkOptions(host_name="h", interfaces=False))
        closed, owned = 0, 0
        deadline = time.monotonic() + 20  # a loaded host takes seconds per snapshot
        while time.monotonic() < deadline and not (closed and owned):
            for _, value in sensor.snapshot():
                sock = value["socket"]
                if value["kind"] == "INTERFACE" or port not in (sock["local_port"],
                                                                sock["remote_port"]):
                    continue
                # accepted sides close fully; client sides linger in TIME_WAIT (same cookie)
                closed += value["kind"] == "SOCKET_CLOSED" and sock["local_port"] == port
                owned += sock["process"] is not None and sock["process"]["args"][1:2] == ["nc"]
        assert closed > 0 and owned > 0
    finally:
        churn.kill()
        churn.wait()
        stop.set()
        acceptor.join()
        server.close()


def test_lineage_exec_and_exit() -> None:
    published = Published()
    scanner = LineageScanner(ProcessOptions(host_name="h"))
    first = scanner.scan()
    assert first and {v["type"] for _, v in first} == {"RUNNING"}
    args = [sys.executable, "-c", "import time; time.sleep(30)", "--token=abc"]
    child = subprocess.Popen(args)
    try:
        wait_for(lambda: b"--token" in Path(f"/proc/{child.pid}/cmdline").read_bytes())
        for key, value in scanner.scan():
            published("meta.processes", key, value)
        execs = [v for v in published.values("meta.processes", f"h:{child.pid}")]
        assert [v["type"] for v in execs] == ["EXEC"]
        assert execs[0]["process"]["args"] == [*args[:3], f"--token={REDACTED}"]
    finally:
        child.kill()
        child.wait()
    for key, value in scanner.scan():
        published("meta.processes", key, value)
    exits = [v for v in published.values("meta.processes", f"h:{child.pid}")
             if v["type"] == "EXIT"]
    assert len(exits) == 1 and exits[0]["process"]["start_time_ms"] is not None


@pytest.mark.parametrize(("args", "expected"), [
    (["app", "--password=s3cr3t", "--port", "80"], ["app", f"--password={REDACTED}", "--port", "80"]),
    (["app", "--token", "abc", "x"], ["app", "--token", REDACTED, "x"]),
    (["env", "AWS_SECRET_ACCESS_KEY=k", "PGPASSWORD=p", "run"],
     ["env", f"AWS_SECRET_ACCESS_KEY={REDACTED}", f"PGPASSWORD={REDACTED}", "run"]),
    (["curl", "https://u:pw@h/x?access_token=t&a=1"],
     ["curl", f"https://u:{REDACTED}@h/x?access_token={REDACTED}&a=1"]),
    (["mysql", "-uroot", "-phunter2", "db"], ["mysql", "-uroot", f"-p{REDACTED}", "db"]),
    (["nc", "-ll", "-p", "8080", "-e", "/bin/cat"], ["nc", "-ll", "-p", "8080", "-e", "/bin/cat"]),
    (["sshpass", "-p", "pw", "ssh", "h"], ["sshpass", "-p", REDACTED, "ssh", "h"]),
    (["worker", "token=abc"], ["worker", f"token={REDACTED}"]),
    ([], []),
])
def test_redact_defaults(args: list[str], expected: list[str]) -> None:
    assert redact(args) == expected


def test_redact_configured_patterns() -> None:
    rules = [r"^--license=(?P<secret>.+)$", RedactRule(re.compile("^-k$"), next_arg=True)]
    assert redact(["x", "--license=L", "-k", "K", "--password=p"], rules) == [
        "x", f"--license={REDACTED}", "-k", REDACTED, "--password=p"]


def test_first_snapshot_defers_idle_sockets() -> None:
    """On the sensor's first snapshot a socket idle for an interval waits for its turn among the
    idle ones (published within ``unchanged_every`` snapshots), a busy one is published at
    once, and one closed before its turn is published as SOCKET_CLOSED with its values."""
    every = 4
    server = socket.create_server(("127.0.0.1", 0))
    pairs = []
    for _ in range(16):
        client = socket.create_connection(server.getsockname())
        pairs.append((client, server.accept()[0]))
    ports = {(s.getsockname()[1], s.getpeername()[1]): index
             for index, pair in enumerate(pairs) for s in pair}
    sensor = NetlinkSensor(NetlinkOptions(host_name="h", interval_s=0.5, interfaces=False,
                                          udp=False, other_namespaces=False,
                                          unchanged_every=every))
    stop = threading.Event()

    def exchange(pair: tuple[socket.socket, socket.socket]) -> None:
        while not stop.wait(0.02):
            pair[0].sendall(b"x")
            pair[1].recv(10)

    def snapshot() -> dict[tuple[str, tuple[int, int]], dict[str, Any]]:
        return {(value["kind"], (sock["local_port"], sock["remote_port"])): sock
                for _, value in sensor.snapshot()
                if (sock := value["socket"]) is not None
                and (sock["local_port"], sock["remote_port"]) in ports}

    pump = threading.Thread(target=exchange, args=(pairs[0],))
    pump.start()
    try:
        time.sleep(1.0)  # the others idle for two intervals
        first = snapshot()
        assert {kind for kind, _ in first} == {"SOCKET"}
        published = {key: 1 for _, key in first}
        busy_ports = {key for key, index in ports.items() if index == 0}
        assert busy_ports <= set(published)
        # an idle socket not yet published, closed before its turn
        closed = next(key for key, index in ports.items()
                      if key not in published and index != 0)
        _linger_close(pairs[ports[closed]][0])
        _linger_close(pairs[ports[closed]][1])
        closed_ports = {key for key, index in ports.items() if index == ports[closed]}
        time.sleep(0.2)
        later = [snapshot() for _ in range(every - 1)]
        assert {key for kind, key in later[0] if kind == "SOCKET_CLOSED"} == closed_ports
        assert all(later[0]["SOCKET_CLOSED", key]["state"] == "ESTABLISHED"
                   and later[0]["SOCKET_CLOSED", key]["pid"] == os.getpid()
                   and later[0]["SOCKET_CLOSED", key]["process"]["pid"] == os.getpid()
                   for key in closed_ports)
        for count, found in enumerate(later, start=2):
            for kind, key in found:
                if kind == "SOCKET":
                    published.setdefault(key, count)
        assert set(published) | closed_ports == set(ports)
        for key, count in published.items():
            cookie = (first.get(("SOCKET", key)) or later[count - 2]["SOCKET", key])["cookie"]
            if key not in busy_ports:  # an idle one: at its turn
                assert (count + cookie) % every == 0, (key, count, cookie)
        assert len(published) > len(first)  # some did wait
    finally:
        stop.set()
        pump.join()
        for pair in pairs:
            for sock in pair:
                sock.close()
        server.close()
