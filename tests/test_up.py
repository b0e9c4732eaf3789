"""The product as a newcomer meets it: ``packetless up --detach``, traffic between two real Docker
containers, the flow read back with ``packetless tail``, ``packetless top`` showing the
containers, and ``packetless down`` leaving no process behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import free_port, free_port_pair
from tests.support.capabilities import require, require_root

pytestmark = [pytest.mark.kafka, pytest.mark.bpf, pytest.mark.docker]

PAYLOAD = 54_321


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "packetless", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def stack_up(tmp_path: Path, docker_client: Any) -> Iterator[dict[str, Any]]:
    """A detached local stack with the sensor; stopped (and checked for leftovers) afterwards."""
    require_root()
    ports = {"kafka": free_port_pair(), "registry": free_port(), "web": free_port(),
             "metrics": free_port()}
    data = tmp_path / "data"
    out = cli("up", "--detach", "--data-dir", str(data), "--kafka-port", str(ports["kafka"]),
              "--registry-port", str(ports["registry"]), "--web-port", str(ports["web"]),
              "--metrics-port", str(ports["metrics"]))
    assert out.returncode == 0, out.stderr
    assert "sensor observing in ebpf mode" in out.stderr, out.stderr
    state = json.loads((data / "stack.json").read_text())
    pids = [state["pid"], *state["parts"].values()]
    yield {"data": data, "ports": ports, "pids": pids}
    down = cli("down", "--data-dir", str(data))
    assert down.returncode == 0, down.stderr
    time.sleep(1)
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert not alive, f"left running: {alive}"
    leftovers = [p.pid for p in psutil.process_iter(["cmdline"])
                 if any(str(data) in arg for arg in (p.info["cmdline"] or []))]
    assert not leftovers, f"processes still using {data}: {leftovers}"


def tail(up: dict[str, Any], topic: str, seconds: float = 10) -> list[dict[str, Any]]:
    p = up["ports"]
    out = subprocess.run(
        [sys.executable, "-m", "packetless", "tail", topic, "--from-beginning", "--to-end",
         "--timeout", str(seconds), "--bootstrap-servers", f"127.0.0.1:{p['kafka']}", "--registry-url",
         f"http://127.0.0.1:{p['registry']}/apis/ccompat/v7"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def wait_for(what: Callable[[], Any], timeout: float, every: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := what():
            return result
        time.sleep(every)
    return None


def test_up_flows_from_containers_tail_top_down(stack_up: dict[str, Any], docker_network: Any,
                                                containers: Callable[..., Any]) -> None:
    server = containers(["nc", "-ll", "-p", "8080", "-e", "/bin/cat"],
                        network=docker_network.name)
    time.sleep(1)
    server.reload()
    client = containers(["sh", "-c", f"head -c {PAYLOAD} /dev/zero | nc -w 3 {server.name} 8080 "
                                      "> /dev/null; sleep 600"], network=docker_network.name)

    def ends() -> list[dict[str, Any]]:
        docs = tail(stack_up, "packetless.flows.ecs")
        return [d for d in docs if d["event"]["action"] == "flow_end"
                and d.get("destination", {}).get("port") == 8080
                and d.get("network", {}).get("transport") == "tcp"]

    found = wait_for(lambda: len(ends()) >= 2 and ends(), timeout=120, every=5)
    assert found, "no END documents for the container flow"
    by_direction = {d["network"]["direction"]: d for d in found}
    egress, ingress = by_direction["egress"], by_direction["ingress"]
    assert egress["container"]["name"] == client.name
    assert ingress["container"]["name"] == server.name
    assert egress["container"]["id"] == client.id and ingress["container"]["id"] == server.id
    for doc in (egress, ingress):
        assert doc["source"]["bytes"] == PAYLOAD and doc["destination"]["bytes"] == PAYLOAD
        assert doc["network"]["community_id"] == egress["network"]["community_id"]
    assert egress["process"]["name"] == "nc" and ingress["process"]["name"] in {"nc", "cat"}
    assert egress["packetless"]["peer"]["container"]["name"] == server.name

    require(shutil.which("tmux") is not None, "tmux (apt-get install tmux)")
    session = f"pltop{os.getpid()}"
    web = f"http://127.0.0.1:{stack_up['ports']['web']}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "220", "-y", "50",
                    f"{sys.executable} -m packetless top --web-url {web} --refresh 1"], check=True)
    try:
        last = [""]

        def screen() -> str | None:
            last[0] = subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                     capture_output=True, text=True).stdout
            return last[0] if client.name in last[0] and server.name in last[0] else None

        shown = wait_for(screen, timeout=90)
        assert shown, f"top never showed both containers; last screen:\n{last[0]}"
        assert "Containers" in shown and "RTT" in shown
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
