"""``packetless up`` / ``down``: start and supervise the embedded local stack on this host.

Order: Kafka broker, schema registry, topics and schemas, stream worker, sensor. Each part runs
as a child process in its own process group; if one dies the others are stopped and the cause is
reported; Ctrl-C or SIGTERM stops everything in reverse order. ``stack.json`` in the data dir
says what runs, so that ``down`` can stop a detached stack.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from deploy import broker, registry
from packetless.config import Settings
from packetless.kafka import ensure_schemas, ensure_topics
from packetless.ports import port_free, port_taken_message
from packetless.serde import Codec

STOP_TIMEOUT = 30.0


class StackError(RuntimeError):
    """The stack could not start or stop; the message names the cause."""


@dataclass
class StackOptions:
    """What ``up`` starts and where."""

    settings: Settings
    sensor: bool = True
    kafka_port: int = 9092
    registry_port: int = 8081
    web_port: int = 6066
    metrics_port: int = 9464


@dataclass
class Part:
    """One supervised child process."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class Stack:
    """The running parts, in start order, and the state file describing them."""

    options: StackOptions
    parts: list[Part] = field(default_factory=list)
    info: dict[str, object] = field(default_factory=dict)

    @property
    def state_file(self) -> Path:
        return state_file(self.options.settings.data_dir)

    def write_state(self, status: str) -> None:
        self.info.update(status=status, pid=os.getpid(),
                         parts={p.name: p.proc.pid for p in self.parts})
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.info, indent=2))
        tmp.replace(self.state_file)

    def stop(self, say: Callable[[str], None]) -> None:
        for part in reversed(self.parts):
            if part.proc.poll() is None:
                say(f"stopping {part.name} (pid {part.proc.pid})")
                stop_process_group(part.proc.pid, STOP_TIMEOUT)
        self.state_file.unlink(missing_ok=True)


def state_file(data_dir: Path) -> Path:
    return Path(data_dir) / "stack.json"


def stop_process_group(pid: int, timeout: float) -> None:
    """SIGTERM the process group led by ``pid``, SIGKILL it after ``timeout`` seconds."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        os.killpg(pid, signal.SIGKILL)
    # children that outlived their leader
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _say(line: str) -> None:
    print(f"packetless: {line}", file=sys.stderr, flush=True)


def _spawn(name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> Part:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **(env or {})})
    return Part(name, proc, log)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "packetless", *args]


def _already_running(data_dir: Path) -> int | None:
    path = state_file(data_dir)
    if not path.exists():
        return None
    try:
        pid = int(json.loads(path.read_text())["pid"])
    except (ValueError, KeyError, OSError):
        return None
    return pid if psutil.pid_exists(pid) else None


def start_infrastructure(options: StackOptions, stack: Stack, say: Callable[[str], None]) -> None:
    """Start Kafka and the registry, create the topics and register the schemas."""
    s = options.settings
    s.bootstrap_servers = f"127.0.0.1:{options.kafka_port}"
    s.registry_url = f"http://127.0.0.1:{options.registry_port}/apis/ccompat/v7"
    try:
        t0 = time.monotonic()
        classpath = broker.ensure_fetched(s.cache_dir, say)
        cfg = broker.BrokerConfig(data_dir=s.data_dir, port=options.kafka_port,
                                  controller_port=options.kafka_port + 1)
        broker.prepare(cfg, classpath)
        say(f"starting Kafka {broker.KAFKA_VERSION} on {cfg.bootstrap}")
        proc = broker.start(cfg, classpath)
        stack.parts.append(Part("kafka", proc, cfg.console_log))
        broker.wait_ready(cfg.bootstrap, 120, logs=[cfg.server_log, cfg.console_log], proc=proc)
        say(f"Kafka ready ({time.monotonic() - t0:.1f}s)")
    except broker.BrokerError as exc:
        raise StackError(str(exc)) from exc
    try:
        t0 = time.monotonic()
        runner = registry.ensure_built(s.cache_dir, say)
        say(f"starting the schema registry on 127.0.0.1:{options.registry_port}")
        part = _spawn("registry", registry.command(runner, s.data_dir, options.registry_port,
                                                  s.bootstrap_servers), s.data_dir / "logs" / "registry.log")
        stack.parts.append(part)
        registry.wait_ready(s.registry_url, 180, proc=part.proc, log=part.log)
        say(f"schema registry ready ({time.monotonic() - t0:.1f}s)")
    except registry.RegistryError as exc:
        raise StackError(str(exc)) from exc
    created = ensure_topics(s)
    ids = ensure_schemas(Codec(s))
    say(f"topics: {len(created)} created; schemas: {len(ids)} registered (BACKWARD)")
    stack.info.update(bootstrap_servers=s.bootstrap_servers, registry_url=s.registry_url)


def start_workers(options: StackOptions, stack: Stack, say: Callable[[str], None]) -> None:
    """Start the stream worker and, unless disabled, the sensor, against the local stack."""
    s = options.settings
    logs = s.data_dir / "logs"
    env = {"PACKETLESS_BOOTSTRAP_SERVERS": s.bootstrap_servers,
           "PACKETLESS_REGISTRY_URL": s.registry_url, "PACKETLESS_DATA_DIR": str(s.data_dir),
           "PACKETLESS_TOPIC_PREFIX": s.topic_prefix}
    stack.parts.append(_spawn("streams", _cli("streams", "--web-port", str(options.web_port)),
                              logs / "streams.log", env))
    if options.sensor:
        status = s.data_dir / "sensor.json"
        status.unlink(missing_ok=True)
        say("starting the sensor (compiling the eBPF programs takes a few seconds)")
        part = _spawn("sensor", _cli("sensor", "--metrics-port", str(options.metrics_port)),
                      logs / "sensor.log", env)
        stack.parts.append(part)
        info = _wait_sensor(part, status, 180)
        say(f"sensor observing in {info['mode']} mode ({info['why']}), "
            f"ready after {info['ready_after_s']}s")
        stack.info.update(sensor_mode=info["mode"])
    stack.info.update(web=f"http://127.0.0.1:{options.web_port}", logs=str(logs))


def _wait_sensor(part: Part, status: Path, timeout: float) -> dict[str, object]:
    """The sensor's status once it observes; StackError if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if part.proc.poll() is not None:
            raise StackError(f"the sensor exited with code {part.proc.returncode}; see {part.log}")
        if status.exists():
            info = json.loads(status.read_text() or "{}")
            if info.get("ready"):
                return info
        time.sleep(0.3)
    raise StackError(f"the sensor was not observing after {timeout:g}s; see {part.log}")


def _status(stack: Stack) -> str:
    info = stack.info
    lines = ["", "Packetless is up:"]
    lines += [f"  {p.name:9} pid {p.proc.pid:<8} log {p.log}" for p in stack.parts]
    lines += [f"  Kafka      {info['bootstrap_servers']}", f"  registry   {info['registry_url']}",
              f"  sensor     {info.get('sensor_mode', 'not started (--no-sensor)')} mode",
              f"  web views  {info['web']}/containers  /pods  /flows  /healthz  /metrics",
              "  watch flows:  packetless tail packetless.flows.ecs",
              "  live table:   packetless top",
              "  stop:         Ctrl-C (or 'packetless down' when detached)", ""]
    return "\n".join(lines)


def check_ports(options: StackOptions) -> None:
    """StackError naming the option unless every port the stack listens on is distinct and free
    on 127.0.0.1: said before anything starts, rather than found later as a part that crashed."""
    wanted = {"--kafka-port": options.kafka_port,
              "the Kafka controller (--kafka-port + 1)": options.kafka_port + 1,
              "--registry-port": options.registry_port, "--web-port": options.web_port}
    if options.sensor and options.metrics_port:
        wanted["--metrics-port"] = options.metrics_port
    owner: dict[int, str] = {}
    for name, port in wanted.items():
        if port in owner:
            raise StackError(f"{owner[port]} and {name} are both port {port}")
        owner[port] = name
        if not port_free("127.0.0.1", port):
            raise StackError(f"{name}: {port_taken_message(port)}")


def up(options: StackOptions, say: Callable[[str], None] = _say) -> int:
    """Run the stack in the foreground until a signal or a crash; returns the exit code."""
    data_dir = options.settings.data_dir
    if (pid := _already_running(data_dir)) is not None:
        raise StackError(f"a stack already runs from {data_dir} (pid {pid}); "
                         "stop it with 'packetless down'")
    check_ports(options)
    data_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(options)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.write_state("starting")
        start_infrastructure(options, stack, say)
        start_workers(options, stack, say)
        stack.write_state("ready")
        print(_status(stack), file=sys.stderr, flush=True)
        code = 0
        while not stopping.wait(0.5):
            dead = next((p for p in stack.parts if p.proc.poll() is not None), None)
            if dead is not None:
                say(f"{dead.name} exited with code {dead.proc.returncode}; see {dead.log}. "
                    "Stopping the rest.")
                code = 1
                break
        return code
    except StackError as exc:
        say(f"cannot start: {exc}")
        return 1
    finally:
        stack.write_state("stopping")
        stack.stop(say)
        say("stopped")


def up_detached(options: StackOptions, timeout: float = 900.0) -> int:
    """Start ``up`` in the background and return once it is ready (or has failed)."""
    data_dir = options.settings.data_dir
    if (pid := _already_running(data_dir)) is not None:
        raise StackError(f"a stack already runs from {data_dir} (pid {pid})")
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [a for a in sys.argv[1:] if a != "--detach"]
    log = data_dir / "logs" / "up.log"
    part = _spawn("up", _cli(*argv), log, {"PACKETLESS_DATA_DIR": str(data_dir)})
    deadline = time.monotonic() + timeout
    offset = 0
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if len(text) > offset:
            print(text[offset:], end="", file=sys.stderr, flush=True)
            offset = len(text)
        if part.proc.poll() is not None:
            return part.proc.returncode or 1
        path = state_file(data_dir)
        if path.exists() and json.loads(path.read_text() or "{}").get("status") == "ready":
            time.sleep(0.5)
            print(log.read_text(errors="replace")[offset:], end="", file=sys.stderr, flush=True)
            _say(f"running in the background (pid {part.proc.pid}); stop with 'packetless down'")
            return 0
        time.sleep(0.5)
    stop_process_group(part.proc.pid, STOP_TIMEOUT)
    raise StackError(f"the stack was not ready after {timeout:g}s; see {log}")


def down(data_dir: Path, timeout: float = 60.0) -> str:
    """Stop the stack started from ``data_dir``; returns what was done."""
    path = state_file(data_dir)
    if not path.exists():
        return f"no stack runs from {data_dir}"
    info = json.loads(path.read_text())
    pid = int(info["pid"])
    if psutil.pid_exists(pid):
        os.kill(pid, signal.SIGTERM)
        try:
            psutil.Process(pid).wait(timeout)
        except psutil.TimeoutExpired as exc:
            raise StackError(f"the stack (pid {pid}) did not stop within {timeout:g}s") from exc
        except psutil.NoSuchProcess:
            pass
    for child in info.get("parts", {}).values():  # parts of a supervisor that died abruptly
        if psutil.pid_exists(child):
            stop_process_group(child, STOP_TIMEOUT)
    path.unlink(missing_ok=True)
    return f"stopped the stack from {data_dir}"
