"""Shared pieces of the benchmarks: paths, the C load generator, monitor processes (our sensor,
tcplife-bpfcc, ss polling) started and stopped with their CPU accounted, and machine facts.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
WORK = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "packetless" / "bench"
CGROUP2 = Path("/sys/fs/cgroup/unified")
TCPLIFE = "tcplife-bpfcc"
TIME_WAIT_LOW = 2000  # a measurement starts once earlier runs' TIME_WAIT sockets are gone


def loadgen() -> Path:
    """The C load generator, compiled once into the cache directory."""
    source = REPO / "bench" / "loadgen.c"
    binary = WORK / "loadgen"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        WORK.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(source)], check=True)
    return binary


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_next_port = [20000 + os.getpid() % 5000]


def new_port() -> int:
    """A free TCP port (port + 1 free too) outside the ephemeral range, so that no client
    connection holds it; never the same twice in one run."""
    for _ in range(12000):
        port = _next_port[0]
        _next_port[0] = port + 2 if port + 2 < 32000 else 20000
        if _bindable(port) and _bindable(port + 1):
            return port
    raise RuntimeError("no free port")


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU of a process and of its waited-for children."""
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class Monitor:
    """One running monitor: our sensor, tcplife-bpfcc or the ss poller."""

    name: str
    proc: subprocess.Popen[bytes]
    out: Path
    ps: psutil.Process = field(init=False)

    def __post_init__(self) -> None:
        self.ps = psutil.Process(self.proc.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.ps)

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def settled_cpu(self, max_s: float = 30.0) -> float:
        """CPU seconds once the monitor has caught up (under 10% of a core for 0.5 s)."""
        last = self.cpu()
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = self.cpu()
            if now - last < 0.05:
                return now
            last = now
        return last

    def stop(self, timeout: float = 60.0) -> None:
        """SIGINT (tcplife exits on KeyboardInterrupt), then SIGKILL after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _wait_line(path: Path, word: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and word in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}: see {path}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{proc.args} not ready after {timeout}s: see {path}")


def start_monitor(name: str, run_dir: Path, ports: list[int] | None = None) -> Monitor:
    """Start monitor ``name`` (packetless | tcplife | ss) and wait until it observes."""
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp = f"{name}-{time.monotonic_ns()}"
    out = run_dir / f"{stamp}.out"
    log = run_dir / f"{stamp}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if name == "packetless":
        argv = [PYTHON, "-m", "bench.monitor", str(out)]
        if ports:
            argv += ["--ports", ",".join(map(str, ports))]
        ready_file, word = log, "ready"
    elif name == "tcplife":
        argv = [TCPLIFE, "-s"]
        ready_file, word = out, "PID,COMM"
        log = run_dir / f"{stamp}.err"  # bcc's "Possibly lost N samples" lines
    elif name == "ss":
        argv = [PYTHON, "-m", "bench.peers", "ss", str(out)]
        ready_file, word = log, "ready"
    else:
        raise ValueError(name)
    with log.open("wb") as err, (out if name == "tcplife" else log).open("ab") as stdout:
        proc = subprocess.Popen(argv, stdout=stdout,
                                stderr=err if name == "tcplife" else subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=REPO, env=env)
    _wait_line(ready_file, word, proc, 120)
    return Monitor(name, proc, out)


@contextlib.contextmanager
def monitors(names: list[str], run_dir: Path, ports: list[int] | None = None) -> Iterator[
        dict[str, Monitor]]:
    """Run the named monitors for the duration of the block; always stops them."""
    running: dict[str, Monitor] = {}
    try:
        for name in names:
            running[name] = start_monitor(name, run_dir, ports)
        yield running
    finally:
        for mon in running.values():
            mon.stop()


def bpf_programs_using(map_ids: set[int]) -> list[dict[str, Any]]:
    """``bpftool prog show`` of the loaded BPF programs that use any of ``map_ids``: those of a
    sensor, however they are attached (cgroup links, raw tracepoint links, perf events)."""
    shown = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                           check=True).stdout
    return [prog for prog in json.loads(shown) if map_ids & set(prog.get("map_ids", ()))]


def bpf_program_stats(pid: int) -> dict[str, tuple[int, int]]:
    """{program name: (run count, run time ns)} of the BPF programs using the maps process
    ``pid`` holds (counted only while sysctl kernel.bpf_stats_enabled is 1). Programs are found
    by their maps: a program attached through a link or a perf event (the tracepoints) has no
    descriptor of its own in the process."""
    map_ids: set[int] = set()
    for fdinfo in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            map_ids.update(int(line.split()[1]) for line in fdinfo.read_text().splitlines()
                           if line.startswith("map_id:"))
    out: dict[str, tuple[int, int]] = {}
    for prog in bpf_programs_using(map_ids):
        name = prog.get("name", str(prog["id"]))
        old = out.get(name, (0, 0))
        out[name] = (old[0] + prog.get("run_cnt", 0), old[1] + prog.get("run_time_ns", 0))
    return out


@contextlib.contextmanager
def bpf_stats() -> Iterator[None]:
    """kernel.bpf_stats_enabled = 1 for the block (restored after)."""
    knob = Path("/proc/sys/kernel/bpf_stats_enabled")
    before = knob.read_text().strip()
    knob.write_text("1")
    try:
        yield
    finally:
        knob.write_text(before)


def foreign_cgroup_programs() -> int:
    """BPF programs attached to the cgroup2 root by others (other sensors, or leaked ones)."""
    try:
        out = subprocess.run(["bpftool", "cgroup", "show", str(CGROUP2)], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return -1
    return max(0, len([line for line in out.splitlines() if line.strip()]) - 1)


def machine() -> dict[str, str]:
    """What the results were measured on."""
    mem = psutil.virtual_memory().total / 2**30
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "nproc": str(os.cpu_count()), "cpu": cpu, "memory": f"{mem:.1f} GiB",
            "kernel": platform.release(), "python": platform.python_version(),
            "load average (1/5/15 min)": load}


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@dataclass
class Item:
    """The outcome of one benchmark item: tables, targets with whether they were met, notes."""

    title: str
    tables: list[tuple[list[str], list[list[str]]]] = field(default_factory=list)
    targets: list[tuple[str, bool | None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def start_holder(log: Path, count: int, timeout: float = 600) -> tuple[subprocess.Popen[bytes], int]:
    """A ``bench.traffic hold`` process keeping ``count`` loopback connections open on a port
    of its own, once they are all open; its port. Raises if it fails (its log says why)."""
    port = new_port()
    with log.open("wb") as out:
        proc = subprocess.Popen([PYTHON, "-m", "bench.traffic", "hold", str(port), str(count)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.PIPE,
                                cwd=REPO)
    deadline = time.monotonic() + timeout
    while f"held {count}" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            release_holders([proc])
            raise RuntimeError(f"a holder failed: {log.read_text()[-300:]}")
        time.sleep(0.2)
    return proc, port


def release_holders(holders: list[subprocess.Popen[bytes]]) -> None:
    """Let holder processes close their connections and exit (killed after 60 s)."""
    for proc in holders:
        if proc.stdin is not None:
            proc.stdin.close()
    for proc in holders:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def host_tcp() -> dict[str, int]:
    """TCP sockets of this network namespace (/proc/net/sockstat): the sensor sees them all,
    other programs' included, so the measurement says how many there were."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()[1:]
            return {k: int(v) for k, v in zip(fields[::2], fields[1::2], strict=True)}
    return {}


def time_wait_low(max_s: float = 120.0) -> int:
    """Wait until few TCP sockets are in TIME_WAIT (a sensor sees them too); returns how many
    are left."""
    deadline = time.monotonic() + max_s
    while host_tcp().get("tw", 0) > TIME_WAIT_LOW and time.monotonic() < deadline:
        time.sleep(1)
    return host_tcp().get("tw", 0)
