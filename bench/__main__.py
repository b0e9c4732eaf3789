"""``python -m bench [--quick] [--items 1,2,3,4,5,6]``: runs the benchmark items (3 includes 3c
and 3d, which ``--items 3c`` or ``--items 3d`` run alone), prints their tables and writes
bench/RESULTS.md (machine, load, command lines, numbers, targets met).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import accuracy, capacity, overhead, pipeline, snapshot
from bench.common import REPO, Item, foreign_cgroup_programs, loadavg, loadgen, machine


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _met(met: bool | None) -> str:
    return "n/a" if met is None else "met" if met else "NOT met"


def _text(item: Item) -> list[str]:
    out = [f"## {item.title}", ""]
    for headers, rows in item.tables:
        out += [*_table(headers, rows), ""]
    for text, met in item.targets:
        out.append(f"- **target** {text}: **{_met(met)}**")
    out += [f"- {n}" for n in item.notes]
    if item.commands:
        out += ["- commands: " + "; ".join(f"`{c}`" for c in item.commands)]
    return [*out, ""]


def _failed(title: str) -> Item:
    item = Item(f"{title} (FAILED)")
    item.notes.append("error: " + traceback.format_exc().strip().splitlines()[-1])
    item.targets.append(("item ran", False))
    traceback.print_exc()
    return item


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter runs (about 12 minutes)")
    parser.add_argument("--items", default="1,2,3,4,5,6", help="comma-separated item numbers")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "RESULTS.md")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (BPF, netns, cgroups)", file=sys.stderr)
        return 2
    wanted = set(args.items.split(","))
    run_dir = Path(tempfile.mkdtemp(prefix="packetless-bench-"))
    loadgen()
    facts = machine()
    facts["foreign BPF programs on the cgroup2 root at start"] = str(foreign_cgroup_programs())
    started = time.monotonic()
    steps: list[tuple[str, str, Callable[[], list[Item]]]] = [
        ("1", "1. Accuracy", lambda: [accuracy.run(run_dir / "accuracy", args.quick)]),
        ("2", "2. Overhead", lambda: [overhead.run(run_dir / "overhead", args.quick)]),
        ("3", "3a. Capacity", lambda: [capacity.run(run_dir / "capacity", args.quick)]),
        ("3", "3b. Worker", lambda: [pipeline.worker_rate(run_dir / "worker", args.quick)]),
        ("3c", "3c. Whole sensor", lambda: [capacity.run_sensor(run_dir / "sensor", args.quick)]),
        ("3d", "3d. Worker backlog",
         lambda: [pipeline.worker_backlog(run_dir / "worker-backlog", args.quick)]),
        ("4", "4./5. Latency and memory",
         lambda: pipeline.with_sensor(run_dir / "stack", args.quick, "4" in wanted,
                                      "5" in wanted)),
        ("6", "6. Netlink snapshot", lambda: [snapshot.run(run_dir / "snapshot", args.quick)]),
    ]
    if "5" in wanted:
        wanted.add("4")
    if "3" in wanted:
        wanted.update(("3c", "3d"))
    items: list[Item] = []
    loads: list[str] = []
    for key, title, fn in steps:
        if key not in wanted:
            continue
        print(f"bench: {title} (load average {loadavg()})", file=sys.stderr, flush=True)
        loads.append(f"{title}: {loadavg()}")
        done = len(items)
        try:
            items += fn()
        except Exception:
            items.append(_failed(title))
        for item in items[done:]:
            print("\n".join(_text(item)), flush=True)
    facts["load average before each item"] = "; ".join(loads)
    facts["foreign BPF programs on the cgroup2 root at end"] = str(foreign_cgroup_programs())
    facts["duration"] = f"{(time.monotonic() - started) / 60:.1f} min"
    argv = " ".join(["bench/run", *sys.argv[1:]])
    lines = ["# Packetless benchmarks", "",
             f"Command: `{argv}` (mode: {'quick' if args.quick else 'full'}).", "",
             "| machine | |", "|---|---|", *[f"| {k} | {v} |" for k, v in facts.items()], "",
             "The machine is shared with other work running at the same time (see the load "
             "averages): absolute numbers are noisy; ratios come from interleaved runs.", ""]
    lines += ["## Summary", "", "| item | target | met |", "|---|---|---|"]
    for item in items:
        for text, met in item.targets:
            lines.append(f"| {item.title} | {text} | {_met(met)} |")
    lines.append("")
    for item in items:
        lines += _text(item)
    args.out.write_text("\n".join(lines))
    print(f"bench: wrote {args.out}; work files in {run_dir}", file=sys.stderr)
    if not os.environ.get("PACKETLESS_BENCH_KEEP"):
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
