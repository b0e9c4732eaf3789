"""A real Docker engine and a local busybox test image for tests (no registry is reachable).

Use from ``tests/conftest.py`` with ``pytest_plugins = ["tests.support.docker"]``: fixtures
``docker_client`` (session), ``testbox_image`` (session), ``docker_network`` and ``containers``.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from docker.models.containers import Container
from docker.models.networks import Network

from tests.support.capabilities import require

log = logging.getLogger(__name__)

TESTBOX_IMAGE = "packetless-testbox:latest"
BUSYBOX = Path("/bin/busybox")
DOCKERD_ARGS = ["--storage-driver=overlay2", "--iptables=false", "--ip6tables=false"]
LOCK_PATH = Path(tempfile.gettempdir()) / "packetless-dockerd.lock"
USERS_PATH = Path(tempfile.gettempdir()) / "packetless-dockerd.users"
READY_TIMEOUT_S = 60.0


def engine_answers() -> bool:
    """True when the Docker socket answers a ping."""
    try:
        client = docker.from_env(timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except docker.errors.DockerException:
        return False


@dataclass
class Engine:
    """A Docker engine in use by this process; ``started`` says whether we launched dockerd."""

    client: docker.DockerClient
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    users_lock: io.TextIOWrapper | None = field(default=None, repr=False)

    @property
    def started(self) -> bool:
        return self.process is not None

    def close(self) -> None:
        """Release the engine; stop dockerd if we started it and no other session still uses it."""
        self.client.close()
        if self.users_lock is None:
            return
        fcntl.flock(self.users_lock, fcntl.LOCK_UN)
        if self.process is not None:
            try:
                fcntl.flock(self.users_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("dockerd (pid %d) left running: another session uses it",
                            self.process.pid)
            else:
                self.process.terminate()
                try:
                    self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
                if self.log_path is not None:
                    self.log_path.unlink(missing_ok=True)
        self.users_lock.close()


def _start_dockerd() -> tuple[subprocess.Popen[bytes], Path]:
    log_path = Path(tempfile.mkstemp(prefix="packetless-dockerd-", suffix=".log")[1])
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            ["dockerd", *DOCKERD_ARGS], stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not engine_answers():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"dockerd did not become ready (log {log_path}):\n{tail}")
        time.sleep(0.2)
    return process, log_path


def ensure_engine() -> Engine:
    """Return a client to a running engine, starting dockerd (as root) when none answers."""
    users = USERS_PATH.open("a")
    with LOCK_PATH.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        process = log_path = None
        if not engine_answers():
            process, log_path = _start_dockerd()
        fcntl.flock(users, fcntl.LOCK_SH)
    return Engine(docker.from_env(timeout=60), process, log_path, users)


def _busybox_rootfs_tar() -> bytes:
    applets = subprocess.run([str(BUSYBOX), "--list"], check=True, capture_output=True,
                             text=True).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("bin", "tmp", "etc", "proc", "sys", "dev"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
            tar.addfile(info)
        tar.add(str(BUSYBOX), arcname="bin/busybox")
        for applet in applets:
            if applet == "busybox":
                continue
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
        for name, text in (("etc/passwd", "root:x:0:0:root:/:/bin/sh\n"
                                          "nobody:x:65534:65534:nobody:/:/bin/false\n"),
                           ("etc/group", "root:x:0:\nnogroup:x:65534:\n")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def ensure_testbox_image(client: docker.DockerClient) -> str:
    """Build ``packetless-testbox:latest`` from Debian's busybox-static once; return its tag."""
    with LOCK_PATH.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client.images.get(TESTBOX_IMAGE)
        except docker.errors.ImageNotFound:
            repository, tag = TESTBOX_IMAGE.split(":")
            client.api.import_image_from_data(
                _busybox_rootfs_tar(), repository=repository, tag=tag, changes=["ENV PATH=/bin"])
            client.images.get(TESTBOX_IMAGE)
    return TESTBOX_IMAGE


def unique_name(prefix: str = "pl-test") -> str:
    """A container or network name unlikely to collide with a parallel run."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Engine]:
    """A running Docker engine for the whole session (started and stopped here if needed)."""
    if not engine_answers():
        require(shutil.which("dockerd") is not None, "dockerd binary (Debian docker.io)")
        require(os.geteuid() == 0, "root, to start dockerd")
    engine = ensure_engine()
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def docker_client(docker_engine: Engine) -> docker.DockerClient:
    """A docker SDK client connected to the session's engine."""
    return docker_engine.client


@pytest.fixture(scope="session")
def testbox_image(docker_client: docker.DockerClient) -> str:
    """Tag of the local busybox image (``/bin`` applets, PATH=/bin)."""
    require(BUSYBOX.exists(), f"{BUSYBOX} (apt-get install busybox-static)")
    return ensure_testbox_image(docker_client)


@pytest.fixture
def docker_network(docker_client: docker.DockerClient) -> Iterator[Network]:
    """A user-defined bridge network, removed after the test."""
    network = docker_client.networks.create(unique_name("pl-net"), driver="bridge")
    yield network
    remove_network(docker_client, network)


def remove_network(client: docker.DockerClient, network: Network, timeout_s: float = 120) -> None:
    """Remove ``network`` with whatever is still on it: containers of the test (removed by
    force) and endpoints whose container is gone or half gone (containers started with
    auto_remove may be leaving it; the engine keeps such an endpoint until it is deleted by
    name with force)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = client.containers.list(all=True, filters={"network": network.id})
        for container in left:
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                container.remove(force=True)
        with contextlib.suppress(docker.errors.NotFound):
            network.reload()
        for endpoint in (network.attrs.get("Containers") or {}).values():
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                client.api.disconnect_container_from_network(endpoint["Name"], network.id,
                                                             force=True)
        try:
            network.remove()
            return
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as error:
            if time.monotonic() > deadline:
                states = {container.name: container.status for container in left}
                raise RuntimeError(f"network {network.name} still in use after {timeout_s} s: "
                                   f"containers {states}, endpoints "
                                   f"{network.attrs.get('Containers')}") from error
            time.sleep(1)


@pytest.fixture
def containers(docker_client: docker.DockerClient,
               testbox_image: str) -> Iterator[Callable[..., Container]]:
    """Factory ``run(command, **kwargs)`` of detached testbox containers, removed after the test."""
    started: list[Container] = []

    def run(command: str | list[str], **kwargs: Any) -> Container:
        kwargs.setdefault("name", unique_name())
        container = docker_client.containers.run(testbox_image, command, detach=True, **kwargs)
        started.append(container)
        return container

    yield run
    for container in started:
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)
