"""Item 2, overhead: loopback request/response and connection-churn throughput without
monitoring and under each monitor, interleaved (none, ours, tcplife, ss; repeated) so that
machine noise hits all alike; plus each monitor's CPU for that work.
"""

from __future__ import annotations

import os
import statistics
import subprocess
from pathlib import Path

from bench import peers
from bench.common import Item, bpf_program_stats, bpf_stats, fmt, loadgen, new_port, start_monitor

CONFIGS = ("none", "packetless", "tcplife", "ss")
NAMES = {"none": "no monitor", "packetless": "Packetless (eBPF sensor)",
         "tcplife": "tcplife-bpfcc", "ss": "ss -tinpe every 100 ms"}
RR_CLIENTS, RR_SIZE = 4, 1024
CHURN_CLIENTS, CHURN_SERVERS = 2, 2


def _load(argv: list[str], seconds: float) -> float:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=True)
    count, elapsed = out.stdout.split()
    return int(count) / float(elapsed)


def run(run_dir: Path, quick: bool) -> Item:
    item = Item("2. Overhead: throughput under monitoring, monitor CPU")
    rounds, seconds = (1, 4.0) if quick else (3, 10.0)
    gen = str(loadgen())
    rr_cmd = f"loadgen rr PORT {RR_CLIENTS} {seconds:g} {RR_SIZE}"
    churn_cmd = f"loadgen churn PORT {CHURN_CLIENTS} {CHURN_SERVERS} 0 {seconds:g}"
    item.commands += [rr_cmd, churn_cmd]
    rr: dict[str, list[float]] = {c: [] for c in CONFIGS}
    churn: dict[str, list[float]] = {c: [] for c in CONFIGS}
    rr_cpu: dict[str, list[float]] = {c: [] for c in CONFIGS}
    churn_cpu: dict[str, list[float]] = {c: [] for c in CONFIGS}
    lost: dict[str, int] = {c: 0 for c in CONFIGS}
    for _ in range(rounds):
        for config in CONFIGS:
            rr_port, churn_port = new_port(), new_port()
            mon = (start_monitor(config, run_dir, [rr_port, churn_port])
                   if config != "none" else None)
            try:
                c0 = mon.cpu() if mon else 0.0
                rr[config].append(_load([gen, "rr", str(rr_port), str(RR_CLIENTS), str(seconds),
                                         str(RR_SIZE)], seconds))
                c1 = mon.settled_cpu() if mon else 0.0
                rate = _load([gen, "churn", str(churn_port), str(CHURN_CLIENTS),
                              str(CHURN_SERVERS), "0", str(seconds)], seconds)
                churn[config].append(rate)
                c2 = mon.settled_cpu() if mon else 0.0
            finally:
                if mon:
                    mon.stop()
            if mon:
                rr_cpu[config].append((c1 - c0) / seconds)
                churn_cpu[config].append((c2 - c1) / (rate * seconds) * 10_000)
                if config == "packetless":
                    lost[config] += peers.final_drops(
                        peers.packetless_records(mon.out)).get("ring_buffer", 0)
                elif config == "tcplife":
                    lost[config] += peers.tcplife_lost(mon.out.with_suffix(".err"))
    rows = []
    for config in CONFIGS:
        rr_ratio = statistics.median(a / b for a, b in zip(rr[config], rr["none"], strict=True))
        churn_ratio = statistics.median(a / b for a, b in zip(churn[config], churn["none"],
                                                              strict=True))
        rows.append([NAMES[config], fmt(statistics.median(rr[config]), 0), fmt(rr_ratio, 3),
                     fmt(statistics.median(churn[config]), 0), fmt(churn_ratio, 3),
                     fmt(statistics.median(rr_cpu[config]), 3) if rr_cpu[config] else "-",
                     fmt(statistics.median(churn_cpu[config]), 2) if churn_cpu[config] else "-",
                     str(lost[config]) if config in ("packetless", "tcplife") else "-"])
    item.tables.append((["monitor", "req/resp ops/s", "ratio", "churn conn/s", "ratio",
                         "monitor CPU s/s (req/resp)", "monitor CPU s / 10k flows (churn)",
                         "events lost"], rows))
    ours_rr = statistics.median(a / b for a, b in zip(rr["packetless"], rr["none"], strict=True))
    item.targets.append((f"request/response throughput ratio with our sensor >= 0.98 "
                         f"(measured {ours_rr:.3f})", ours_rr >= 0.98))
    item.notes.append(f"{rounds} round(s) of {seconds:g} s per workload and monitor, order "
                      f"{', '.join(CONFIGS)} in each round; ratios are medians of per-round "
                      "ratios to the unmonitored run of the same round")
    item.notes.append("monitor CPU is user + system time of the monitor process (and its "
                      "children: ss); in-kernel BPF program time runs in the workload's context "
                      "and shows only in the throughput ratio")
    headers, bpf_rows, per_op = _bpf_costs(run_dir, gen, seconds)
    item.tables.append((headers, bpf_rows))
    cpu_per_op = (os.cpu_count() or 1) * 1e9 / statistics.median(rr["none"])
    estimate = cpu_per_op / (cpu_per_op + per_op)
    item.notes.append(f"estimate from the in-kernel cost alone: unmonitored, one req/resp op "
                      f"costs at most {cpu_per_op:,.0f} ns of CPU ({os.cpu_count()} CPUs / median "
                      f"ops/s); our programs add {per_op:,.0f} ns per op, so the ratio is at "
                      f"best {estimate:.3f} when the workload is CPU-bound (this one is: 4 "
                      "clients + 4 servers on the machine's CPUs)")
    item.notes.append("per-round raw numbers: " + "; ".join(
        f"{c}: rr {[round(x) for x in rr[c]]}, churn {[round(x) for x in churn[c]]}"
        for c in CONFIGS))
    return item


def _bpf_costs(run_dir: Path, gen: str, seconds: float) -> tuple[list[str], list[list[str]],
                                                                 float]:
    """In-kernel cost of our BPF programs per request/response op and per churned connection
    (kernel.bpf_stats_enabled on for this extra run only)."""
    rows = []
    rr_port, churn_port = new_port(), new_port()
    mon = start_monitor("packetless", run_dir, [rr_port, churn_port])
    try:
        with bpf_stats():
            s0 = bpf_program_stats(mon.proc.pid)
            ops = _load([gen, "rr", str(rr_port), str(RR_CLIENTS), str(seconds), str(RR_SIZE)],
                        seconds) * seconds
            s1 = bpf_program_stats(mon.proc.pid)
            conns = _load([gen, "churn", str(churn_port), str(CHURN_CLIENTS), str(CHURN_SERVERS),
                           "0", str(seconds)], seconds) * seconds
            s2 = bpf_program_stats(mon.proc.pid)
    finally:
        mon.stop()
    for name in sorted(s2):
        d1 = [s1[name][k] - s0.get(name, (0, 0))[k] for k in (0, 1)]
        d2 = [s2[name][k] - s1[name][k] for k in (0, 1)]
        rows.append([name, fmt(d1[0] / ops, 2), fmt(d1[1] / max(d1[0], 1), 0), fmt(d1[1] / ops, 0),
                     fmt(d2[0] / conns, 1), fmt(d2[1] / conns, 0)])
    total_rr = sum(s1[n][1] - s0.get(n, (0, 0))[1] for n in s1) / ops
    total_churn = sum(s2[n][1] - s1[n][1] for n in s2) / conns
    rows.append(["all programs", "", "", fmt(total_rr, 0), "", fmt(total_churn, 0)])
    return (["our BPF program (bpf_stats run)", "runs per req/resp op", "ns per run",
             "ns per op", "runs per churned connection", "ns per connection"], rows, total_rr)
