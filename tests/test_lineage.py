"""eBPF process lineage (sensor/lineage.py, bpf/processes.c) on the real kernel: processes that
live far shorter than any /proc scan get EXEC and EXIT with their parent, and a second exec in
the same pid is a new EXEC naming the new program. Every record validates against the schema.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import fastavro
import fastavro.validation
import pytest

import schemas
from sensor import lineage
from sensor.processes import ProcessCache
from tests.support.capabilities import require, require_root

pytestmark = pytest.mark.bpf


class Feed:
    """A running lineage feed collecting what it publishes."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def publish(self, suffix: str, key: str, value: dict[str, Any]) -> None:
        assert suffix == "meta.processes" and key == f"test:{value['process']['pid']}"
        with self.lock:
            self.events.append(value)

    def of(self, pid: int) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.events if e["process"]["pid"] == pid]

    def wait_for(self, pid: int, kinds: list[str], timeout: float = 20) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e["type"] for e in self.of(pid)]
            if found == kinds or self.error:
                break
            time.sleep(0.05)
        assert self.error is None, self.error
        return self.of(pid)


@pytest.fixture
def feed() -> Iterator[Feed]:
    require_root()
    require(lineage.available(), "tracefs with the sched tracepoints")
    running = Feed()

    def work() -> None:
        try:
            lineage.run(running.publish, running.stop,
                        lineage.LineageOptions(host_name="test", cache=ProcessCache()),
                        ready=running.ready.set)
        except BaseException as error:  # reported by the test
            running.error = error
            running.ready.set()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    assert running.ready.wait(120) and running.error is None, running.error
    yield running
    running.stop.set()
    thread.join(30)
    assert not thread.is_alive()


def test_running_processes_are_listed_once(feed: Feed) -> None:
    deadline = time.monotonic() + 30
    while not feed.of(os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.1)
    mine = feed.of(os.getpid())
    assert [e["type"] for e in mine] == ["RUNNING"]
    assert mine[0]["process"]["ppid"] == os.getppid()


def test_short_lived_process_exec_and_exit(feed: Feed) -> None:
    started = time.time()
    child = subprocess.run(["/bin/sh", "-c", "echo $$; exit 3"], capture_output=True, text=True,
                           check=False)
    assert child.returncode == 3
    pid = int(child.stdout)
    events = feed.wait_for(pid, ["EXEC", "EXIT"])
    print(f"\nlineage: pid {pid}: {[(e['type'], e['process']['comm']) for e in events]}")
    assert [e["type"] for e in events] == ["EXEC", "EXIT"]
    exec_, exit_ = events
    assert all(e["source"] == "EBPF" for e in events)
    assert exec_["process"]["ppid"] == os.getpid()  # forked by this test's process
    assert exec_["process"]["exe"] in ("/bin/sh", "/usr/bin/dash", "/bin/dash")
    assert exec_["process"]["uid"] == os.getuid() and exec_["process"]["comm"] == "sh"
    assert exit_["process"]["start_time_ms"] == exec_["process"]["start_time_ms"]
    assert started * 1000 - 1000 <= exec_["timestamp_ms"] <= exit_["timestamp_ms"] \
        <= time.time() * 1000 + 1000
    parsed = fastavro.parse_schema(schemas.load("ProcessEvent"))
    for event in events:
        fastavro.validation.validate(event, parsed, raise_errors=True)


def test_exec_in_the_same_pid_names_the_new_program(feed: Feed) -> None:
    child = subprocess.Popen(["/bin/sh", "-c", "exec sleep 0.3"])
    child.wait(30)
    events = feed.wait_for(child.pid, ["EXEC", "EXEC", "EXIT"])
    assert [e["type"] for e in events] == ["EXEC", "EXEC", "EXIT"]
    assert [e["process"]["comm"] for e in events[:2]] == ["sh", "sleep"]
    assert events[1]["process"]["args"] == ["sleep", "0.3"]
    assert events[1]["process"]["exe"].endswith("/sleep")
