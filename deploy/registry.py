"""The local schema registry behind `packetless up`: Apicurio Registry with its Confluent API.

Builds a runnable registry from Maven Central (deploy/registry/pom.xml) into a cache outside the
repo, gives its java command line (H2 file storage in the data dir, so schemas survive restarts)
and probes its health; supervision is deploy/stack.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from deploy import maven

APICURIO_VERSION = "2.4.2.Final"
# Quarkus 2.16, which this release is built on, runs on Java 17.
MIN_JAVA = 17
POM = Path(__file__).resolve().parent / "registry" / "pom.xml"
RUNNER = "apicurio-registry-runner.jar"


class RegistryError(RuntimeError):
    """The registry could not be built or did not become ready; the message says why in words."""


def _java() -> str:
    return maven.java(MIN_JAVA, "the schema registry", RegistryError)


def ensure_built(cache_dir: Path, progress: Callable[[str], None]) -> Path:
    """Return the registry's runner jar, building it with Maven on first use (about 1 min, 350 MB).

    A marker written after a complete build (with the pom's hash) makes later calls skip mvn.
    """
    build = Path(cache_dir) / "registry-build"
    runner = build / RUNNER
    marker = build / "built.json"
    pom_sha256 = hashlib.sha256(POM.read_bytes()).hexdigest()
    built = json.loads(marker.read_text()) if marker.exists() and runner.is_file() else {}
    if built.get("pom_sha256") == pom_sha256:
        return runner
    _java()
    staging = build.with_name("registry-build.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    progress(f"building Apicurio Registry {APICURIO_VERSION} with Maven into {build}")
    # -DskipDefault turns off the extra repositories Apicurio's parent POM adds (never needed here).
    maven.run(POM, ["-DskipDefault", f"-DbuildDirectory={staging}", "package"], staging.parent,
              "builds the schema registry", progress, RegistryError)
    if not (staging / RUNNER).is_file():
        raise RegistryError(f"Maven finished but {RUNNER} is not in {staging}")
    shutil.rmtree(build, ignore_errors=True)
    staging.rename(build)
    marker.write_text(json.dumps({"pom_sha256": pom_sha256, "apicurio": APICURIO_VERSION}, indent=1))
    progress(f"Apicurio Registry {APICURIO_VERSION} built: {runner}")
    return runner


def command(runner: Path, data_dir: Path, port: int, bootstrap_servers: str) -> list[str]:
    """The java command line of a registry on 127.0.0.1:port storing into data_dir/registry.

    bootstrap_servers is not used: the KafkaSQL storage of this release is not on Maven Central,
    so schemas live in an H2 database file (data_dir/registry/registry.mv.db) instead.
    """
    db = Path(data_dir).resolve() / "registry" / "registry"
    db.parent.mkdir(parents=True, exist_ok=True)
    props = {
        "quarkus.http.host": "127.0.0.1",
        "quarkus.http.port": str(port),
        # WRITE_DELAY=0: a registered schema is on disk before the HTTP answer, even if killed.
        "quarkus.datasource.jdbc.url": f"jdbc:h2:file:{db};WRITE_DELAY=0",
        # the release defaults (20 initial, 100 max) suit a shared SQL server, not one H2 file
        "quarkus.datasource.jdbc.initial-size": "1",
        "quarkus.datasource.jdbc.min-size": "1",
        "quarkus.datasource.jdbc.max-size": "8",
        # subjects without their own setting are checked BACKWARD (SPEC.md: compatibility BACKWARD)
        "registry.rules.global.compatibility": "BACKWARD",
    }
    return [
        _java(),
        "-Xms32m",
        "-Xmx256m",
        "-XX:+UseSerialGC",
        "-XX:+ExitOnOutOfMemoryError",
        *(f"-D{k}={v}" for k, v in props.items()),
        "-jar",
        str(runner),
    ]


def _log_cause(log: Path | None) -> str | None:
    """The last ERROR line of the registry's log, if any."""
    if log is None:
        return None
    try:
        lines = log.read_text(errors="replace").splitlines()[-400:]
    except OSError:
        return None
    errors = [ln.strip() for ln in lines if " ERROR " in ln or "Exception" in ln]
    return errors[-1] if errors else None


def wait_ready(
    registry_url: str,
    timeout: float,
    *,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Poll the registry's /health/ready (same host as registry_url) until UP, else raise RegistryError.

    proc, if given, is watched for early exit; log explains a failure.
    """
    parts = urllib.parse.urlsplit(registry_url)
    health = f"{parts.scheme}://{parts.netloc}/health/ready"
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if proc is not None and proc.poll() is not None:
            cause = _log_cause(log) or f"exit code {proc.returncode}"
            raise RegistryError(f"schema registry exited before it was ready: {cause}")
        if time.monotonic() > deadline:
            cause = _log_cause(log) or last
            raise RegistryError(f"schema registry at {health} not ready after {timeout:g}s: {cause}")
        try:
            with urllib.request.urlopen(health, timeout=2) as resp:
                if json.load(resp).get("status") == "UP":
                    return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            last = str(exc)
        time.sleep(0.3)
