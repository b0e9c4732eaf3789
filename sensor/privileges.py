"""The Linux capabilities the sensor uses: which it holds, which are missing, what each one buys.

``CAPABILITIES`` is the documented least-privilege set (README, deploy manifests); eBPF mode
checks the ones it cannot run without, the other parts say what they cannot see without theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Capability:
    """One capability of the sensor's set; ``ebpf`` when eBPF mode cannot run without it."""

    name: str
    number: int
    needed_for: str
    without: str
    ebpf: bool


CAPABILITIES: tuple[Capability, ...] = (
    Capability("CAP_BPF", 39, "load the BPF programs and create their maps",
               "eBPF mode is unavailable (Netlink fallback)", ebpf=True),
    Capability("CAP_PERFMON", 38, "load the tracepoint programs (they read kernel memory) "
               "and attach them", "eBPF mode is unavailable (Netlink fallback)", ebpf=True),
    Capability("CAP_NET_ADMIN", 12, "load and attach the cgroup sock, sock_ops and skb programs",
               "eBPF mode is unavailable (Netlink fallback)", ebpf=True),
    Capability("CAP_DAC_READ_SEARCH", 2, "read tracefs event formats when not uid 0 (bcc "
               "compiles the tracepoint arguments from them) and list other users' "
               "/proc/<pid>/fd", "eBPF mode is unavailable unless uid 0 owns tracefs; sockets "
               "of other users' processes have no owner in Netlink snapshots", ebpf=False),
    Capability("CAP_SYS_PTRACE", 19, "read /proc/<pid>/exe, fd links and ns/net of other "
               "users' processes", "executables of other users' processes and their socket "
               "owners (Netlink) stay unknown", ebpf=False),
    Capability("CAP_SYS_ADMIN", 21, "setns() into containers' network namespaces for Netlink "
               "snapshots (tcp_info and interface counters inside containers) and to name the "
               "namespaces of eBPF events",
               "Netlink snapshots cover the sensor's own network namespace only; eBPF events "
               "in other namespaces name them only while their process can be read", ebpf=False),
)
BY_NAME = {cap.name: cap for cap in CAPABILITIES}
# The kernel accepts CAP_SYS_ADMIN wherever these are checked (bpf_capable(), perfmon_capable(),
# bpf_net_capable()): kernels before 5.8 know only CAP_SYS_ADMIN for BPF.
IMPLIED_BY_SYS_ADMIN = frozenset({"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"})


def effective(status: Path = Path("/proc/self/status")) -> frozenset[str]:
    """Names of the capabilities of ``CAPABILITIES`` in the effective set of this process."""
    for line in status.read_text().splitlines():
        if line.startswith("CapEff:"):
            bits = int(line.split()[1], 16)
            return frozenset(cap.name for cap in CAPABILITIES if bits >> cap.number & 1)
    return frozenset()


def missing(names: tuple[str, ...] | list[str], held: frozenset[str] | None = None) -> list[str]:
    """The capabilities of ``names`` this process lacks (CAP_SYS_ADMIN standing in where the
    kernel lets it)."""
    held = effective() if held is None else held
    return [name for name in names if name not in held
            and not (name in IMPLIED_BY_SYS_ADMIN and "CAP_SYS_ADMIN" in held)]


def ebpf_missing(held: frozenset[str] | None = None) -> list[str]:
    """The capabilities eBPF mode needs and this process lacks."""
    return missing([cap.name for cap in CAPABILITIES if cap.ebpf], held)


def limitation(name: str) -> str:
    """What the sensor cannot see without ``name``, naming it (for logs and the status)."""
    cap = BY_NAME[name]
    return f"without {cap.name} ({cap.needed_for}): {cap.without}"
