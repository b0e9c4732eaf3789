"""The Packetless eBPF sensor in a process of its own, publishing to an in-memory list (no Kafka),
so that the benchmarks can measure its CPU and memory apart from the workload's.

``python -m bench.monitor OUT [--ports P,...]``: prints ``ready`` once attached, keeps the
records that touch the given ports (all without ``--ports``) plus DROPS, and on SIGTERM stops
the sensor and writes them to OUT as JSON lines, then a SUMMARY line counting the others.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from typing import Any

from sensor import ebpf

KEPT = ("type", "cookie", "role", "local_ip", "local_port", "remote_ip", "remote_port",
        "bytes_sent", "bytes_received", "timestamp_ns", "reason", "cgroup_id", "container_id",
        "netns_inode", "drops")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--ports", default="")
    args = parser.parse_args()
    ports = {int(p) for p in args.ports.split(",") if p}
    records: list[dict[str, Any]] = []
    others = 0  # records of flows on other ports (other programs' traffic)
    stop = threading.Event()
    ready = threading.Event()

    def publish(_topic: str, _key: str, record: dict[str, Any]) -> None:
        nonlocal others
        if record["type"] == "DROPS":
            if not ready.is_set():
                ready.set()
                print("ready", flush=True)
        elif ports and record.get("local_port") not in ports \
                and record.get("remote_port") not in ports:
            others += 1
            return
        kept = {k: record.get(k) for k in KEPT}
        process = record.get("process") or {}
        kept.update(pid=process.get("pid"), comm=process.get("comm"),
                    published_ns=time.time_ns())
        records.append(kept)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ebpf.run(publish, stop, ebpf.EbpfOptions())
    with open(args.out, "w") as out:
        for rec in records:
            out.write(json.dumps(rec) + "\n")
        out.write(json.dumps({"type": "SUMMARY", "other_records": others}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
