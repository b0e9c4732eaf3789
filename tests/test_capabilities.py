"""``packetless sensor`` as a non-root user holding exactly the documented capabilities.

The real sensor (eBPF on this kernel, the session's Kafka) runs as uid 65534 through setpriv
with an ambient capability set: first the whole set of sensor/privileges.py, then with
capabilities removed, checking what each one buys (README, "Security"). Also: the deploy
manifests grant that set, and no code of the sensor or the CLI runs a shell.
"""

from __future__ import annotations

import ast
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from packetless.config import Settings
from sensor.privileges import CAPABILITIES, ebpf_missing, effective, missing
from tests.conftest import free_port
from tests.support.capabilities import require, require_root
from tests.test_deploy import documented_capabilities
from tests.test_sensor_cli import exchange, records, stop_sensor, wait_mode

UID = 65534
REPO = Path(__file__).resolve().parent.parent
FULL = tuple(cap.name for cap in CAPABILITIES)
# In a private mount namespace, bind-mounts the interpreter's prefix where the sensor's uid can
# reach it (pyenv under /root, mode 0700, here), then runs the rest of the command line.
EXPOSE = ('mount --bind "$1" "$2" && mount -t tmpfs -o mode=755 none "$3" && mkdir -p "$1" '
          '&& mount --move "$2" "$1" && shift 3 && exec "$@"')


def _unreachable_ancestor(path: Path) -> Path | None:
    """The outermost directory above ``path`` that other users cannot search, if any."""
    for parent in reversed(path.parents):
        if not parent.stat().st_mode & stat.S_IXOTH:
            return parent
    return None


@pytest.fixture
def run_as() -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], Path]]]:
    """Factory ``run_as(settings, caps, *args) -> (process, data_dir)``: the sensor as uid
    65534 with exactly ``caps`` (effective, permitted, inheritable, ambient and bounding)."""
    require_root()
    require(shutil.which("setpriv") is not None, "setpriv (util-linux)")
    started: list[tuple[subprocess.Popen[bytes], Path]] = []
    scratch: list[Path] = []

    def start(settings: Settings, caps: tuple[str, ...], *args: str
              ) -> tuple[subprocess.Popen[bytes], Path]:
        data_dir = Path(tempfile.mkdtemp(prefix="pl-caps-"))
        scratch.append(data_dir)
        os.chown(data_dir, UID, UID)
        spec = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in caps)])
        command = ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups",
                   f"--inh-caps={spec}", f"--ambient-caps={spec}", f"--bounding-set={spec}",
                   sys.executable, "-m", "packetless", "sensor", "--metrics-port",
                   str(free_port()), "--update-interval", "1", *args]
        hidden = _unreachable_ancestor(Path(sys.base_prefix))
        if hidden is not None:
            assert _unreachable_ancestor(Path(sys.prefix)) is None, "venv unreachable"
            mount_point = tempfile.mkdtemp(prefix="pl-prefix-")
            scratch.append(Path(mount_point))
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", EXPOSE,
                       "sh", sys.base_prefix, mount_point, str(hidden), *command]
        env = {"PATH": os.environ["PATH"], "HOME": str(data_dir), "LANG": "C.UTF-8",
               "PACKETLESS_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
               "PACKETLESS_REGISTRY_URL": settings.registry_url,
               "PACKETLESS_TOPIC_PREFIX": settings.topic_prefix,
               "PACKETLESS_DATA_DIR": str(data_dir)}
        proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        started.append((proc, data_dir))
        return proc, data_dir

    yield start
    for proc, _ in started:
        stop_sensor(proc)
    for path in scratch:
        shutil.rmtree(path, ignore_errors=True)


def identity(pid: int) -> tuple[list[int], set[str], set[str]]:
    """(uids, effective and bounding capabilities among the documented ones) of ``pid``."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines())

    def names(field: str) -> set[str]:
        bits = int(status[field], 16)
        assert bits & ~sum(1 << c.number for c in CAPABILITIES) == 0, f"{field} {bits:x}"
        return {c.name for c in CAPABILITIES if bits >> c.number & 1}

    return [int(u) for u in status["Uid"].split()], names("CapEff"), names("CapBnd")


def stop(proc: subprocess.Popen[bytes]) -> str:
    """SIGTERM the sensor; its whole output."""
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    return out.decode(errors="replace")


def flow_ends(settings: Settings) -> tuple[int, int, int, list[dict]]:
    """A loopback exchange by this (root) process: (bytes sent, received, ports, END records)."""
    n, m = 54_321, 12_345
    since = time.time()
    client_port, server_port = exchange(n, m)

    def ours(rec: dict) -> bool:
        return rec["type"] == "END" and {rec["local_port"], rec["remote_port"]} == {
            client_port, server_port}

    return n, m, client_port, records(settings, "raw.ebpf", ours, 2, since=since)


def check_flow(settings: Settings, exe_readable: bool) -> str:
    """Exact bytes and this process as the owner of both ends; the figures as text."""
    n, m, client_port, ends = flow_ends(settings)
    assert len(ends) == 2, ends
    by_role = {r["role"]: r for r in ends}
    assert (by_role["CLIENT"]["bytes_sent"], by_role["CLIENT"]["bytes_received"]) == (n, m)
    assert (by_role["SERVER"]["bytes_sent"], by_role["SERVER"]["bytes_received"]) == (m, n)
    exe = os.readlink(f"/proc/{os.getpid()}/exe")
    for r in ends:
        assert r["process"]["pid"] == os.getpid() and r["process"]["uid"] == 0
        assert r["process"]["args"][:1] == sys.orig_argv[:1]  # /proc/<pid>/cmdline: no privilege
        assert r["process"]["exe"] == (exe if exe_readable else None)
        assert r["netns_inode"] == os.stat("/proc/self/ns/net").st_ino  # the kernel's cookie
    client = by_role["CLIENT"]
    return (f"client port {client_port} sent {client['bytes_sent']} received "
            f"{client['bytes_received']}, pid {client['process']['pid']}, "
            f"exe {client['process']['exe']}")


@pytest.mark.kafka
@pytest.mark.bpf
def test_documented_set_runs_ebpf_as_non_root(settings: Settings, run_as) -> None:
    proc, data_dir = run_as(settings, FULL)
    info = wait_mode(proc, data_dir)
    uids, effective, bounding = identity(proc.pid)
    assert uids == [UID] * 4 and effective == bounding == set(FULL)
    assert info["mode"] == "ebpf", info
    figures = check_flow(settings, exe_readable=True)
    out = stop(proc)
    assert "without CAP_" not in out, out
    assert proc.returncode == 0, out
    print(f"\ncapabilities: uid {UID} with {','.join(FULL)}: mode ebpf (ready after "
          f"{info['ready_after_s']} s); {figures}")


# (capabilities removed from the documented set, mode, capability the sensor must name)
CASES = [
    (("CAP_SYS_ADMIN",), "ebpf", "CAP_SYS_ADMIN"),
    (("CAP_SYS_PTRACE",), "ebpf", "CAP_SYS_PTRACE"),
    (("CAP_DAC_READ_SEARCH",), "netlink", "CAP_DAC_READ_SEARCH"),
    (("CAP_SYS_ADMIN", "CAP_BPF"), "netlink", "CAP_BPF"),
    (("CAP_SYS_ADMIN", "CAP_PERFMON"), "netlink", "CAP_PERFMON"),
    (("CAP_SYS_ADMIN", "CAP_NET_ADMIN"), "netlink", "CAP_NET_ADMIN"),
    # the kernel accepts CAP_SYS_ADMIN for all three (bpf_capable(), perfmon_capable(), ...)
    (("CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"), "ebpf", None),
]


@pytest.mark.kafka
@pytest.mark.bpf
@pytest.mark.parametrize(("removed", "mode", "named"), CASES,
                         ids=["-".join(c.removeprefix("CAP_") for c in r) for r, _, _ in CASES])
def test_each_capability(settings: Settings, run_as, removed: tuple[str, ...], mode: str,
                         named: str | None) -> None:
    caps = tuple(c for c in FULL if c not in removed)
    proc, data_dir = run_as(settings, caps)
    info = wait_mode(proc, data_dir)
    assert identity(proc.pid)[1] == set(caps)
    assert info["mode"] == mode, info
    figures = ""
    if mode == "ebpf":
        figures = check_flow(settings, exe_readable="CAP_SYS_PTRACE" in caps)
    else:
        assert named in info["why"], info
    out = stop(proc)
    assert proc.returncode == 0, out
    if named is not None:
        assert f"without {named}" in out or named in info["why"], out
        said = next(line for line in (info["why"], *out.splitlines()) if named in line)
        said = said[max(0, said.index(named) - 21):][:140]
    else:
        assert "without CAP_" not in out, out
        said = "nothing missing"
    print(f"\ncapabilities: without {','.join(removed)}: mode {mode} ({said}) "
          f"{figures}")


@pytest.mark.kafka
@pytest.mark.bpf
@pytest.mark.parametrize("removed", ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"])
def test_ebpf_mode_requested_names_the_missing_capability(settings: Settings, run_as,
                                                          removed: str) -> None:
    caps = tuple(c for c in FULL if c not in (removed, "CAP_SYS_ADMIN"))
    proc, _ = run_as(settings, caps, "--mode", "ebpf")
    out = proc.communicate(timeout=120)[0].decode(errors="replace")
    assert proc.returncode != 0 and f"eBPF mode requested but unavailable: missing " \
        f"capabilities {removed}" in out, out


def test_deploy_manifests_grant_the_documented_set() -> None:
    documented = {cap.name.removeprefix("CAP_") for cap in CAPABILITIES}
    assert documented_capabilities() == documented  # sensor.yaml's header explains each one
    sensor = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())["services"][
        "sensor"]
    assert set(sensor["cap_add"]) == documented and sensor["cap_drop"] == ["ALL"]


def test_no_shell_outs() -> None:
    """No shell anywhere in sensor/ and packetless/; the only subprocesses are doctor's bpftool
    and the sensor's BPF loader (our own module), with fixed argument lists (nothing observed
    on the host reaches a command line)."""
    callers: dict[str, list[str]] = {}
    for path in sorted([*(REPO / "sensor").glob("*.py"), *(REPO / "packetless").glob("*.py")]):
        where = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text(), where)):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in ("subprocess", "pty", "os"), f"{where}:{node.lineno}"
            if not isinstance(node, ast.Call):
                continue
            assert not any(k.arg == "shell" for k in node.keywords), f"{where}:{node.lineno}"
            func = node.func
            if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)):
                continue
            module, name = func.value.id, func.attr
            assert not (module == "os" and name.startswith(("system", "popen", "exec", "spawn"))
                        ), f"{where}:{node.lineno}: os.{name}"
            if module == "subprocess":
                callers.setdefault(where, []).append(ast.unparse(node.args[0]))
    assert callers == {"packetless/doctor.py": ["[bpftool, 'feature', 'probe', 'kernel']"],
                       "sensor/bpfload.py": ["[sys.executable, '-m', 'sensor.bpfload', "
                                             "str(theirs.fileno())]"]}


def test_missing_capabilities(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t000000c000001000\n")  # BPF, PERFMON, NET_ADMIN
    held = effective(status)
    assert held == {"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"}
    assert ebpf_missing(held) == [] and missing(["CAP_SYS_PTRACE"], held) == ["CAP_SYS_PTRACE"]
    assert ebpf_missing(frozenset({"CAP_PERFMON"})) == ["CAP_BPF", "CAP_NET_ADMIN"]
    assert ebpf_missing(frozenset({"CAP_SYS_ADMIN"})) == []  # the kernel accepts it for all three
