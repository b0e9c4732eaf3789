"""The local Apache Kafka broker (KRaft, combined broker+controller) behind `packetless up`.

Fetches its jars from Maven Central (deploy/kafka/pom.xml) into a cache outside the repo, writes
server.properties, formats storage once, and starts/probes the JVM; supervision is deploy/stack.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from deploy import maven
from packetless.ports import port_free, port_taken_message

KAFKA_VERSION = "4.1.1"
MIN_JAVA = 17
DEPLOY_DIR = Path(__file__).resolve().parent
POM = DEPLOY_DIR / "kafka" / "pom.xml"
LOG4J_CONFIG = DEPLOY_DIR / "log4j2.properties"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "packetless"


class BrokerError(RuntimeError):
    """The broker could not be fetched, prepared or started; the message says why in words."""


@dataclass
class BrokerConfig:
    """Where and how the local broker runs; everything it writes lives under data_dir/kafka."""

    data_dir: Path
    port: int = 9092
    controller_port: int = 9093
    host: str = "127.0.0.1"
    heap: str = "512m"
    # Extra server.properties entries, applied last (e.g. an SSL/SASL listener: override
    # listeners, advertised.listeners, listener.security.protocol.map and add ssl.*/sasl.*).
    extra_properties: dict[str, str] = field(default_factory=dict)
    # SASL/SCRAM-SHA-512 users (name -> password) created when the storage is formatted, so that
    # a SASL listener in extra_properties accepts them from the first start (KRaft keeps SCRAM
    # credentials in its metadata log; later changes go through the admin API).
    scram_users: dict[str, str] = field(default_factory=dict)

    @property
    def kafka_dir(self) -> Path:
        return Path(self.data_dir) / "kafka"

    @property
    def log_dir(self) -> Path:
        """Kafka's log.dirs: topic partitions, the KRaft metadata log and meta.properties."""
        return self.kafka_dir / "data"

    @property
    def logs_dir(self) -> Path:
        """Human-readable logs: server.log (log4j2) and broker.out (the JVM's console)."""
        return self.kafka_dir / "logs"

    @property
    def properties_file(self) -> Path:
        return self.kafka_dir / "server.properties"

    @property
    def console_log(self) -> Path:
        return self.logs_dir / "broker.out"

    @property
    def server_log(self) -> Path:
        return self.logs_dir / "server.log"

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"


def _java() -> str:
    return maven.java(MIN_JAVA, f"Kafka {KAFKA_VERSION}", BrokerError)


def ensure_fetched(cache_dir: Path, progress: Callable[[str], None]) -> Path:
    """Return the directory of the broker's jars, downloading them with Maven on first use.

    A marker written after a complete download (with the pom's hash) makes later calls skip mvn.
    """
    home = Path(cache_dir) / f"kafka-{KAFKA_VERSION}"
    libs = home / "libs"
    marker = home / "fetched.json"
    pom_sha256 = hashlib.sha256(POM.read_bytes()).hexdigest()
    if marker.exists():
        record = json.loads(marker.read_text())
        if record.get("pom_sha256") == pom_sha256 and all(
            (libs / jar).is_file() for jar in record.get("jars", [""])
        ):
            return libs
    _java()
    staging = home / "libs.partial"
    shutil.rmtree(staging, ignore_errors=True)
    home.mkdir(parents=True, exist_ok=True)
    progress(f"fetching Apache Kafka {KAFKA_VERSION} with Maven into {libs}")
    maven.run(POM, ["org.apache.maven.plugins:maven-dependency-plugin:copy-dependencies",
                    f"-DoutputDirectory={staging}"], home,
              f"downloads Kafka {KAFKA_VERSION}", progress, BrokerError)
    jars = sorted(p.name for p in staging.glob("*.jar"))
    if f"kafka_2.13-{KAFKA_VERSION}.jar" not in jars:
        raise BrokerError(f"Maven finished but kafka_2.13-{KAFKA_VERSION}.jar is not in {staging}")
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)
    try:
        _build_class_archive(libs, progress)
    except (BrokerError, OSError, subprocess.SubprocessError) as exc:
        progress(f"no class archive, the broker will start slower: {exc}")
    marker.write_text(json.dumps({"pom_sha256": pom_sha256, "jars": jars}, indent=1))
    progress(f"Kafka {KAFKA_VERSION}: {len(jars)} jars in {libs}")
    return libs


def class_archive(classpath: Path) -> Path:
    """The broker's AppCDS archive (JDK dynamic CDS): warm starts take ~3 s instead of ~7 s."""
    return classpath.parent / "kafka.jsa"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _build_class_archive(classpath: Path, progress: Callable[[str], None]) -> None:
    """Record the classes a broker loads up to readiness, from one throw-away training run."""
    archive = class_archive(classpath)
    archive.unlink(missing_ok=True)
    partial = archive.with_suffix(".jsa.partial")
    partial.unlink(missing_ok=True)
    progress("recording the broker's classes for faster starts (one training start)")
    with tempfile.TemporaryDirectory(prefix="packetless-kafka-cds-") as data:
        cfg = BrokerConfig(Path(data), port=_free_port(), controller_port=_free_port(), heap="256m")
        prepare(cfg, classpath)
        cmd = command(cfg, classpath)
        cmd.insert(1, f"-XX:ArchiveClassesAtExit={partial}")
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_ready(cfg.bootstrap, 120, logs=[cfg.server_log], proc=proc)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(120)
    partial.rename(archive)


def server_properties(cfg: BrokerConfig) -> dict[str, str]:
    """server.properties for a single-node KRaft cluster listening on loopback only."""
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"{cfg.host}:{cfg.controller_port}",
        "listeners": f"PLAINTEXT://{cfg.host}:{cfg.port},CONTROLLER://{cfg.host}:{cfg.controller_port}",
        "advertised.listeners": f"PLAINTEXT://{cfg.host}:{cfg.port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(cfg.log_dir),
        "num.partitions": "1",
        "default.replication.factor": "1",
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "false",
        "num.network.threads": "2",
        "num.io.threads": "4",
        "log.retention.hours": "168",
    }
    props.update(cfg.extra_properties)
    return props


def cluster_id(cfg: BrokerConfig) -> str:
    """The cluster id kept in data_dir/kafka/cluster.id, created (Kafka's Uuid format) once."""
    path = cfg.kafka_dir / "cluster.id"
    if path.exists():
        return path.read_text().strip()
    new = "-"
    while new.startswith("-"):  # Kafka's Uuid.randomUuid avoids ids that look like options
        new = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new + "\n")
    return new


def _jvm_logging(cfg: BrokerConfig) -> list[str]:
    return [f"-Dkafka.logs.dir={cfg.logs_dir}", f"-Dlog4j2.configurationFile={LOG4J_CONFIG}"]


def prepare(cfg: BrokerConfig, classpath: Path) -> None:
    """Write server.properties and format the storage unless it already holds a cluster."""
    cfg.logs_dir.mkdir(parents=True, exist_ok=True)
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(f"{k}={v}\n" for k, v in server_properties(cfg).items())
    cfg.properties_file.write_text("# Written by packetless (deploy/broker.py)\n" + text)
    if (cfg.log_dir / "meta.properties").exists():
        return
    cmd = [
        _java(),
        "-Xmx256m",
        *_jvm_logging(cfg),
        "-cp",
        f"{classpath}/*",
        "kafka.tools.StorageTool",
        "format",
        "--cluster-id",
        cluster_id(cfg),
        "--config",
        str(cfg.properties_file),
        "--standalone",
        *(arg for name, password in cfg.scram_users.items()
          for arg in ("--add-scram", f"SCRAM-SHA-512=[name={name},password={password}]")),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        out = (done.stdout + done.stderr).strip().splitlines()
        raise BrokerError(
            f"formatting Kafka storage in {cfg.log_dir} failed: "
            f"{out[-1] if out else f'exit {done.returncode}'}"
        )


def command(cfg: BrokerConfig, classpath: Path) -> list[str]:
    """The broker's java command line: small fixed heap, G1 sized for a 2-core machine."""
    archive = class_archive(classpath)
    return [
        _java(),
        f"-Xms{cfg.heap}",
        f"-Xmx{cfg.heap}",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:InitiatingHeapOccupancyPercent=35",
        "-XX:+ExplicitGCInvokesConcurrent",
        "-XX:ParallelGCThreads=2",
        "-XX:ConcGCThreads=1",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        *([f"-XX:SharedArchiveFile={archive}"] if archive.exists() else []),
        *_jvm_logging(cfg),
        "-cp",
        f"{classpath}/*",
        "kafka.Kafka",
        str(cfg.properties_file),
    ]


def start(cfg: BrokerConfig, classpath: Path) -> subprocess.Popen[bytes]:
    """Start the prepared broker in its own process group, console output to broker.out."""
    for port in (cfg.port, cfg.controller_port):
        if not port_free(cfg.host, port):
            raise BrokerError(f"cannot start Kafka: {port_taken_message(port)}")
    if not cfg.properties_file.exists():
        raise BrokerError(f"{cfg.properties_file} is missing: call prepare() first")
    cfg.logs_dir.mkdir(parents=True, exist_ok=True)
    with cfg.console_log.open("ab") as out:
        return subprocess.Popen(
            command(cfg, classpath),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cfg.kafka_dir,
            start_new_session=True,
        )


def _tail(path: Path, size: int = 65536) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - size))
            return f.read().decode(errors="replace").splitlines()
    except OSError:
        return []


def failure_cause(logs: list[Path]) -> str | None:
    """Why the broker failed, read from the tails of its logs (None when nothing stands out)."""
    lines = [ln for path in logs for ln in _tail(path)]
    for line in lines:
        if "Address already in use" in line:
            match = re.search(r":(\d+)[:\s.]*Address already in use", line)
            return port_taken_message(int(match[1])) if match else line.strip()
    errors = [ln.strip() for ln in lines if re.search(r"\b(ERROR|FATAL)\b", ln)]
    return errors[-1] if errors else None


def wait_ready(
    bootstrap: str,
    timeout: float,
    *,
    logs: list[Path] | None = None,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll the broker with an AdminClient until it returns metadata, else raise BrokerError.

    logs (server.log, broker.out) explain a failure; proc, if given, is watched for early exit.
    """
    # Quiet (refusals are expected while the JVM starts) and short reconnect backoff, so
    # readiness is noticed within half a second.
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0, "reconnect.backoff.max.ms": 500})
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if proc is not None and proc.poll() is not None:
            cause = failure_cause(logs or []) or f"exit code {proc.returncode}"
            raise BrokerError(f"Kafka broker exited before it was ready: {cause}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            cause = failure_cause(logs or []) or last
            raise BrokerError(f"Kafka broker at {bootstrap} not ready after {timeout:g}s: {cause}")
        try:
            if admin.list_topics(timeout=max(0.5, min(2.0, remaining))).brokers:
                return
        except KafkaException as exc:
            last = exc.args[0].str() if exc.args else str(exc)
        time.sleep(0.2)
