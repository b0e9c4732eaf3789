"""cgroup path parsing against real-world paths, and id <-> path resolution on this kernel."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from sensor.cgroups import (
    CgroupResolver,
    ContainerRef,
    cgroup2_root,
    cgroup_of_pid,
    container_from_cgroup_path,
)
from tests.support.capabilities import require_root

ID = "3f4e1c2b9a8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f"
ID2 = "a" * 64
UID = "5d9b3c1e-8f2a-4b6c-9d0e-1f2a3b4c5d6e"
UID_ = UID.replace("-", "_")
STATIC_UID = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"

CASES: list[tuple[str, ContainerRef | None]] = [
    # Docker, cgroupfs driver (this machine) and systemd driver
    (f"/docker/{ID}", ContainerRef("docker", ID)),
    (f"/system.slice/docker-{ID}.scope", ContainerRef("docker", ID)),
    (f"/docker/{ID}/docker/{ID2}", ContainerRef("docker", ID2)),  # docker in docker: innermost
    # containerd (CRI) under Kubernetes, systemd driver: QoS from the slice names
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
     f"cri-containerd-{ID}.scope", ContainerRef("containerd", ID, UID, "burstable")),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
     f"cri-containerd-{ID}.scope", ContainerRef("containerd", ID, UID, "besteffort")),
    (f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope",
     ContainerRef("containerd", ID, UID, "guaranteed")),
    # Kubernetes, cgroupfs driver: runtime not visible in the path
    (f"/kubepods/burstable/pod{UID}/{ID}", ContainerRef(None, ID, UID, "burstable")),
    (f"/kubepods/besteffort/pod{UID}/{ID}", ContainerRef(None, ID, UID, "besteffort")),
    (f"/kubepods/pod{UID}/{ID}", ContainerRef(None, ID, UID, "guaranteed")),
    (f"/kubepods/burstable/pod{STATIC_UID}/{ID}",
     ContainerRef(None, ID, STATIC_UID, "burstable")),  # static pod: config hash as UID
    # CRI-O (systemd and cgroupfs) and dockershim
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{ID}.scope",
     ContainerRef("cri-o", ID, UID, "burstable")),
    (f"/kubepods/burstable/pod{UID}/crio-{ID}", ContainerRef("cri-o", ID, UID, "burstable")),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
     f"docker-{ID}.scope", ContainerRef("docker", ID, UID, "besteffort")),
    # kind / k3s nest a node's hierarchy under its own container
    (f"/docker/{ID2}/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
     f"kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope",
     ContainerRef("containerd", ID, UID, "besteffort")),
    # Podman: rootful systemd, rootless, cgroupfs, and the inner "container" sub-cgroup
    (f"/machine.slice/libpod-{ID}.scope", ContainerRef("podman", ID)),
    (f"/machine.slice/libpod-{ID}.scope/container", ContainerRef("podman", ID)),
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope",
     ContainerRef("podman", ID)),
    (f"/libpod_parent/libpod-{ID}", ContainerRef("podman", ID)),
    # nerdctl (containerd without Kubernetes)
    (f"/system.slice/nerdctl-{ID}.scope", ContainerRef("containerd", ID)),
    # host cgroups and look-alikes: None, no error
    ("/", None),
    ("", None),
    ("/init.scope", None),
    ("/system.slice/sshd.service", None),
    ("/user.slice/user-0.slice/session-3.scope", None),
    (f"/machine.slice/libpod-conmon-{ID}.scope", None),  # podman's monitor, not the container
    (f"/system.slice/{ID}", None),  # a bare id under an unknown parent
    ("/docker/abc123", None),  # short id
    (f"/kubepods/burstable/pod{UID}", None),  # the pod cgroup itself
    ("/kubepods.slice", None),
    ("/process_api/dfc00cdedd87543a56ccf0e5e35f84a6", None),
    ("garbage\n\x00::", None),
]


@pytest.mark.parametrize(("path", "expected"), CASES, ids=[c[0][-60:] or "empty" for c in CASES])
def test_container_from_cgroup_path(path: str, expected: ContainerRef | None) -> None:
    assert container_from_cgroup_path(path) == expected


def test_own_cgroup_resolves_both_ways() -> None:
    path = cgroup_of_pid(os.getpid())
    assert path is not None and path.startswith("/")
    resolver = CgroupResolver()
    cgroup_id = resolver.id_of(path)
    assert cgroup_id == os.stat(cgroup2_root() / path.lstrip("/")).st_ino
    assert CgroupResolver().path_of(cgroup_id) == path


def test_vanished_pid_and_unknown_id() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    assert cgroup_of_pid(child.pid) is None
    resolver = CgroupResolver()
    assert resolver.path_of(2**62) is None
    assert resolver.container_of(2**62) is None


def test_new_cgroup_found_on_miss_and_remembered_after_removal() -> None:
    require_root()
    resolver = CgroupResolver(min_refresh_s=0.1)
    resolver.refresh()
    directory = resolver.root / f"packetless-test-{os.getpid()}"
    directory.mkdir()
    try:
        cgroup_id = directory.stat().st_ino
        assert resolver.path_of(cgroup_id) in (None, "/" + directory.name)  # walked < 0.1 s ago
        time.sleep(0.2)
        assert resolver.path_of(cgroup_id) == "/" + directory.name
    finally:
        directory.rmdir()
    time.sleep(0.2)
    resolver.refresh()  # a walk without it keeps what it knew: its flows may come later
    assert resolver.path_of(cgroup_id) == "/" + directory.name
    misses = resolver.misses
    assert resolver.path_of(2**62) is None and resolver.misses == misses + 1


def test_watch_learns_cgroups_that_vanish_at_once() -> None:
    require_root()
    resolver = CgroupResolver()
    stop = threading.Event()
    watcher = threading.Thread(target=resolver.watch, args=(stop,))
    watcher.start()
    try:
        time.sleep(0.5)  # watching
        outer = resolver.root / f"packetless-watch-{os.getpid()}"
        inner = outer / "inner"
        inner.mkdir(parents=True)
        ids = outer.stat().st_ino, inner.stat().st_ino
        time.sleep(0.2)
        inner.rmdir()
        outer.rmdir()
        time.sleep(0.2)
        assert [resolver.path_of(i) for i in ids] == [f"/{outer.name}", f"/{outer.name}/inner"]
    finally:
        stop.set()
        watcher.join(timeout=5)
    assert not watcher.is_alive()


def test_known_ids_are_bounded() -> None:
    resolver = CgroupResolver(max_entries=3)
    for inode in range(1, 6):
        resolver._remember(inode, f"/c{inode}")
    assert [resolver._paths.get(i) for i in range(1, 6)] == [None, None, "/c3", "/c4", "/c5"]


@pytest.mark.docker
def test_docker_container_cgroup(containers) -> None:
    container = containers(["sleep", "300"])
    container.reload()
    pid = container.attrs["State"]["Pid"]
    path = cgroup_of_pid(pid)
    assert path is not None
    assert container_from_cgroup_path(path) == ContainerRef("docker", container.id)
    resolver = CgroupResolver()
    cgroup_id = os.stat(resolver.root / path.lstrip("/")).st_ino
    assert resolver.container_of(cgroup_id) == ContainerRef("docker", container.id)
