"""``sensor.containers``: a Docker engine that goes away does not stop the sensor."""

from __future__ import annotations

from pathlib import Path

import docker

from sensor.containers import ContainerOptions, ContainerWatcher


def test_resolving_a_container_while_the_engine_is_gone_returns_none(tmp_path: Path) -> None:
    """The eBPF part resolves containers inside its publish: an engine that went away after
    the client connected (requests raises an OSError, not a DockerException) must not stop it."""
    watcher = ContainerWatcher(lambda *_: None, ContainerOptions(host_name="h"))
    watcher._client = docker.DockerClient(base_url=f"unix://{tmp_path}/gone.sock", version="1.43")
    assert watcher.resolve("0" * 64) is None
    assert not watcher.available and watcher.last_error
