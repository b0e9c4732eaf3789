"""``packetless doctor``: checks each prerequisite, explains what is missing and how to fix it.

It also says which sensor mode (eBPF or Netlink) will run on this host.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from packetless.config import Settings

CGROUP2_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
BPF_PROG_TYPES = ("sock_ops", "cgroup_sock", "cgroup_skb", "tracepoint")


@dataclass
class Check:
    """One prerequisite: whether it holds, what was seen, and the remedy when it does not."""

    name: str
    ok: bool
    detail: str
    remedy: str = ""
    required_for: str = "ebpf"  # ebpf | stack | optional


def cgroup2_root() -> Path | None:
    """The cgroup2 mount point (hybrid ``unified`` first), or None."""
    for root in CGROUP2_ROOTS:
        if (root / "cgroup.procs").exists() and (root / "cgroup.controllers").exists():
            return root
    return None


def _bpf_program_types() -> Check:
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    if not Path(bpftool).exists():
        return Check("BPF program types", False, "bpftool not installed",
                     "apt-get install -y bpftool")
    try:
        out = subprocess.run([bpftool, "feature", "probe", "kernel"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("BPF program types", False, f"bpftool failed: {exc}", "run as root")
    missing = [t for t in BPF_PROG_TYPES if f"program_type {t} is available" not in out]
    if missing:
        return Check("BPF program types", False, f"not available: {', '.join(missing)}",
                     "a kernel with CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF (and root) is needed")
    return Check("BPF program types", True, ", ".join(BPF_PROG_TYPES) + " available")


def _headers() -> Check:
    build = Path(f"/lib/modules/{platform.release()}/build")
    if (build / "include").exists() or (build / "Makefile").exists():
        return Check("kernel headers for bcc", True, f"{build} -> {build.resolve()}")
    return Check("kernel headers for bcc", False, f"{build} missing",
                 "run deploy/setup.sh (installs linux-headers-amd64 and links build/source)")


def _bcc() -> Check:
    try:
        import bcc  # noqa: F401
    except ImportError as exc:
        return Check("bcc (python3-bpfcc)", False, str(exc),
                     "apt-get install -y python3-bpfcc, then deploy/setup.sh exposes it to the venv")
    return Check("bcc (python3-bpfcc)", True, "importable")


def _tracefs() -> Check:
    events = Path("/sys/kernel/tracing/events")
    wanted = ("sock/inet_sock_set_state", "sock/sock_send_length", "sched/sched_process_exec",
              "sched/sched_process_exit", "sched/sched_process_fork")
    missing = [name for name in wanted if not (events / name).exists()]
    if not missing:
        return Check("tracefs", True, "sock and sched tracepoints present (flows, lineage)")
    return Check("tracefs", False, f"missing under {events}: {', '.join(missing)}",
                 "mount -t tracefs nodev /sys/kernel/tracing")


def _kafka(settings: Settings) -> Check:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    try:
        meta = AdminClient({**settings.kafka_config(), "log_level": 0}).list_topics(timeout=5)
    except KafkaException as exc:
        return Check("Kafka", False, f"{settings.bootstrap_servers}: {exc.args[0].str()}",
                     "start the local stack with 'packetless up' or set --bootstrap-servers",
                     required_for="stack")
    return Check("Kafka", True, f"{settings.bootstrap_servers} answers ({len(meta.brokers)} broker(s), "
                 f"{len(meta.topics)} topics)", required_for="stack")


def _registry(settings: Settings) -> Check:
    try:
        resp = httpx.get(settings.registry_url.rstrip("/") + "/subjects", timeout=3)
        resp.raise_for_status()
    except httpx.HTTPError as exc:
        return Check("schema registry", False, f"{settings.registry_url}: {exc}",
                     "start the local stack with 'packetless up' or set --registry-url",
                     required_for="stack")
    return Check("schema registry", True, f"{settings.registry_url} answers",
                 required_for="stack")


def _docker() -> Check:
    sock = Path("/var/run/docker.sock")
    if sock.exists() and _unix_connect(sock):
        return Check("Docker socket", True, str(sock), required_for="optional")
    return Check("Docker socket", False, f"{sock} does not answer",
                 "start dockerd to get container names, images and labels "
                 "(cgroup ids still give container ids)", required_for="optional")


def _unix_connect(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def _binary(name: str, remedy: str) -> Check:
    found = shutil.which(name)
    return Check(name, bool(found), found or "not on PATH", remedy, required_for="stack")


def checks(settings: Settings) -> list[Check]:
    """Every check, in the order they are shown."""
    root = cgroup2_root()
    probes: list[Callable[[], Check]] = [
        lambda: Check("root", os.geteuid() == 0, f"euid {os.geteuid()}",
                      "run the sensor as root (or with CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN)"),
        lambda: Check("BTF", Path("/sys/kernel/btf/vmlinux").exists(), "/sys/kernel/btf/vmlinux",
                      "a kernel built with CONFIG_DEBUG_INFO_BTF", required_for="optional"),
        _bpf_program_types,
        _bcc,
        _headers,
        _tracefs,
        lambda: Check("cgroup2", root is not None, str(root or "no cgroup2 mount"),
                      "mount -t cgroup2 none /sys/fs/cgroup/unified"),
        _docker,
        lambda: _binary("java", "apt-get install -y openjdk-17-jre-headless"),
        lambda: _binary("mvn", "apt-get install -y maven"),
        lambda: _kafka(settings),
        lambda: _registry(settings),
    ]
    return [probe() for probe in probes]


def sensor_mode(results: list[Check]) -> tuple[str, str]:
    """The sensor mode that will run, and why."""
    missing = [c.name for c in results if c.required_for == "ebpf" and not c.ok]
    if missing:
        return "netlink", "eBPF needs: " + ", ".join(missing)
    return "ebpf", "all eBPF prerequisites hold"
