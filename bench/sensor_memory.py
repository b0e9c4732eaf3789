"""``python -m bench.sensor_memory [--connections N] [--tcp-entries N] [--stack [--window-s S]]``:
resident memory of the eBPF sensor after loading and with N live loopback connections (2N
sockets); one JSON line per stage, with the largest mappings. By default the eBPF part alone runs
in a process of its own (with the sensor process's imports; records are counted, not sent); with
``--stack`` the whole ``packetless sensor`` of a local stack (``packetless up``: Kafka, worker)
is measured, and its RSS sampled over a window after each stage (least, median, largest).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import PYTHON, REPO, host_tcp, release_holders, start_holder
from bench.stack import start
from bench.traffic import HOLD_CHUNK

SAMPLE_EVERY_S = 0.25


def rss_mib(pid: int | str = "self", field: str = "VmRSS") -> float:
    """VmRSS (or another field of /proc/<pid>/status in kB, e.g. VmHWM: the peak) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for {pid}")


def stack_stage(stage: str, pid: int, window_s: float) -> str:
    """One JSON line of the stack's sensor: RSS (and its anonymous part: the heaps), its peak,
    the host's TCP sockets, mappings; then the least, median and largest RSS sampled every
    SAMPLE_EVERY_S over ``window_s`` (with 100,000 sockets the RSS swings by up to 20 MiB within
    seconds, with the periodic snapshots and scans: one reading alone is a draw)."""
    line = {"stage": stage, "rss_mib": round(rss_mib(pid), 1),
            "anon_mib": round(rss_mib(pid, "RssAnon"), 1),
            "peak_mib": round(rss_mib(pid, "VmHWM"), 1), "host_tcp": host_tcp(),
            "mappings": mappings(pid)}
    samples = [line["rss_mib"]]
    deadline = time.monotonic() + window_s
    while time.monotonic() < deadline:
        time.sleep(SAMPLE_EVERY_S)
        samples.append(round(rss_mib(pid), 1))
    line["rss_window_mib"] = {"samples": len(samples), "min": min(samples),
                              "median": statistics.median(samples), "max": max(samples)}
    return json.dumps(line)


def mappings(pid: int | str = "self", top: int = 6) -> dict[str, float]:
    """The ``top`` largest resident amounts (MiB) by mapped file, or [heap] / anonymous."""
    sizes: Counter[str] = Counter()
    name = "?"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5:
            name = Path(head[5]).name if len(head) > 5 else "anonymous"
        elif head[0] == "Rss:":
            sizes[name] += int(head[1])
    return {k: round(v / 1024, 1) for k, v in sizes.most_common(top)}


def sensor(tcp_entries: int) -> None:
    """The measured process: stage reports on stdout, one per line read on stdin."""
    def report(stage: str, **extra: Any) -> None:
        print(json.dumps({"stage": stage, "rss_mib": round(rss_mib(), 1), **extra}), flush=True)

    report("python started")
    import sensor.run  # noqa: F401  (the sensor process's imports: Kafka, Avro, pyroute2, ...)
    from sensor import ebpf

    report("sensor imports", modules=len(sys.modules))
    records: Counter[str] = Counter()
    stop = threading.Event()
    s = ebpf.EbpfSensor(ebpf.EbpfOptions(tcp_entries=tcp_entries),
                        lambda _topic, _key, record: records.update([record["type"]]))
    s.load()
    thread = threading.Thread(target=s.run, args=(stop,), daemon=True)
    thread.start()
    time.sleep(2)
    report("loaded", libraries=sorted({Path(p).name for p in _libraries()
                                       if "LLVM" in p or "clang" in p or "bcc" in p}),
           mappings=mappings())
    for line in sys.stdin:
        report(line.strip(), records=dict(records), tcp_live=len(s._tcp), drops=s.drops,
               mappings=mappings())
    stop.set()
    thread.join(60)
    s.close()


def _libraries() -> set[str]:
    return {line.split()[5] for line in Path("/proc/self/maps").read_text().splitlines()
            if len(line.split()) > 5 and ".so" in line.split()[5]}


def hold(work: Path, connections: int, settle_s: float) -> tuple[list[subprocess.Popen[bytes]],
                                                                  str]:
    """Holder processes keeping ``connections`` open, and the stage's name, once settled."""
    holders: list[subprocess.Popen[bytes]] = []
    held, t0 = 0, time.monotonic()
    try:
        while held < connections:
            chunk = min(HOLD_CHUNK, connections - held)
            holders.append(start_holder(work / f"hold-{len(holders)}.log", chunk)[0])
            held += chunk
    except BaseException:
        release_holders(holders)
        raise
    opened = time.monotonic() - t0
    time.sleep(settle_s)
    return holders, f"{held} connections held ({opened:.0f} s to open, {settle_s:g} s settled)"


def in_stack(work: Path, connections: int, settle_s: float, window_s: float) -> None:
    """The ``packetless sensor`` process of a local stack."""
    stack = start(work / "stack", sensor=True)
    holders: list[subprocess.Popen[bytes]] = []
    try:
        pid = stack.parts["sensor"]
        time.sleep(settle_s)
        print(stack_stage("stack sensor ready", pid, window_s), flush=True)
        holders, stage = hold(work, connections, settle_s)
        print(stack_stage(stage, pid, window_s), flush=True)
    finally:
        release_holders(holders)
        stack.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=50_000)
    parser.add_argument("--tcp-entries", type=int, default=131_072)
    parser.add_argument("--settle-s", type=float, default=15.0)
    parser.add_argument("--stack", action="store_true")
    parser.add_argument("--window-s", type=float, default=15.0,
                        help="with --stack: RSS sampled over this long after each stage")
    parser.add_argument("--sensor", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sensor:
        sensor(args.tcp_entries)
        return 0
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"sensor-memory-{os.getpid()}"
    work.mkdir(exist_ok=True)
    if args.stack:
        in_stack(work, args.connections, args.settle_s, args.window_s)
        return 0
    proc = subprocess.Popen([PYTHON, "-m", "bench.sensor_memory", "--sensor", "--tcp-entries",
                             str(args.tcp_entries)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    holders: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(3):
            print(proc.stdout.readline(), end="", flush=True)
        holders, stage = hold(work, args.connections, args.settle_s)
        proc.stdin.write(stage + "\n")
        proc.stdin.flush()
        print(proc.stdout.readline(), end="", flush=True)
    finally:
        release_holders(holders)
        proc.stdin.close()
        proc.wait(120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
