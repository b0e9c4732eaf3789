"""The ``packetless`` command: one console script for the stack, the sensor, the stream worker
and the tools that read their output.

Every option may also come from ``PACKETLESS_<OPTION>`` (e.g. ``PACKETLESS_BOOTSTRAP_SERVERS``)
or from the TOML config file (top-level keys for all commands, a ``[command]`` table for one).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from confluent_kafka import KafkaException

from packetless.config import (
    DEFAULT_CACHE_DIR,
    DEFAULT_DATA_DIR,
    LIBRDKAFKA_LOG,
    Settings,
    read_config_file,
)

COMMANDS = ("up", "down", "sensor", "streams", "tail", "top", "doctor")


def _opt(*names: str, **kwargs: Any) -> Callable:
    """A click option whose environment variable is ``PACKETLESS_<OPTION>``."""
    long = next(n for n in names if n.startswith("--"))
    env = "PACKETLESS_" + long[2:].replace("-", "_").upper()
    kwargs.setdefault("show_default", True)
    return click.option(*names, envvar=env, show_envvar=True, **kwargs)


def settings_options(func: Callable) -> Callable:
    """Options shared by every command that talks to Kafka; they build ``Settings``."""
    defaults = Settings()
    options = [
        _opt("--data-dir", type=click.Path(path_type=Path), default=DEFAULT_DATA_DIR,
             help="Where state, logs and the local broker's data live."),
        _opt("--cache-dir", type=click.Path(path_type=Path), default=DEFAULT_CACHE_DIR,
             help="Where downloaded Kafka and registry builds are kept."),
        _opt("--bootstrap-servers", default=defaults.bootstrap_servers, help="Kafka brokers."),
        _opt("--registry-url", default=defaults.registry_url,
             help="Confluent-compatible schema registry URL."),
        _opt("--topic-prefix", default=defaults.topic_prefix, help="Prefix of every topic name."),
        _opt("--host-name", default=defaults.host_name, help="This host's name in every record."),
        _opt("--security-protocol", default="PLAINTEXT",
             type=click.Choice(["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]),
             help="Kafka security protocol."),
        _opt("--sasl-mechanism", default=None, help="e.g. SCRAM-SHA-512 or PLAIN."),
        _opt("--sasl-username", default=None, help="SASL user."),
        _opt("--sasl-password", default=None, help="SASL password (prefer the env variable)."),
        _opt("--ssl-ca-location", default=None, help="CA bundle for TLS to Kafka."),
        _opt("--ssl-certificate-location", default=None, help="Client certificate for mTLS."),
        _opt("--ssl-key-location", default=None, help="Client key for mTLS."),
    ]

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        keys = [k for k in Settings.__dataclass_fields__ if k in kwargs]
        settings = Settings.from_mapping({k: kwargs.pop(k) for k in keys})
        return func(settings, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


class ConfigGroup(click.Group):
    """Loads the TOML config file into click's default map before running a command."""

    def invoke(self, ctx: click.Context) -> Any:
        path = ctx.params.get("config")
        try:
            data = read_config_file(path)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        common = {k.replace("-", "_"): v for k, v in data.items() if not isinstance(v, dict)}
        ctx.default_map = {
            cmd: {**common, **{k.replace("-", "_"): v for k, v in data.get(cmd, {}).items()}}
            for cmd in COMMANDS
        }
        return super().invoke(ctx)


@click.group(cls=ConfigGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", type=click.Path(path_type=Path, dir_okay=False), envvar="PACKETLESS_CONFIG",
              default=None, help="TOML config file (default /etc/packetless/packetless.toml if present).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(config: Path | None, verbose: int) -> None:
    """Packetless: container-aware network flows from eBPF and Netlink, on Kafka."""
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    LIBRDKAFKA_LOG.setLevel([logging.CRITICAL, logging.WARNING, logging.DEBUG][min(verbose, 2)])


@main.command()
@settings_options
@_opt("--detach", is_flag=True, default=False, help="Run in the background; stop with 'down'.")
@_opt("--no-sensor", is_flag=True, default=False, help="Start Kafka, registry and worker only.")
@_opt("--kafka-port", type=int, default=9092, help="Local broker port (127.0.0.1).")
@_opt("--registry-port", type=int, default=8081, help="Local registry port (127.0.0.1).")
@_opt("--web-port", type=int, default=6066, help="Stream worker's web views (127.0.0.1).")
@_opt("--metrics-port", type=int, default=9464, help="Sensor's /metrics (127.0.0.1).")
def up(settings: Settings, detach: bool, no_sensor: bool, kafka_port: int, registry_port: int,
       web_port: int, metrics_port: int) -> None:
    """Start the embedded local stack: Kafka (KRaft), the schema registry, the sensor and a
    stream worker. Ctrl-C or SIGTERM stops everything."""
    from deploy import stack

    options = stack.StackOptions(settings=settings, sensor=not no_sensor,
                                 kafka_port=kafka_port, registry_port=registry_port,
                                 web_port=web_port, metrics_port=metrics_port)
    try:
        sys.exit(stack.up_detached(options) if detach else stack.up(options))
    except stack.StackError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@_opt("--data-dir", type=click.Path(path_type=Path), default=DEFAULT_DATA_DIR,
      help="Data dir of the stack to stop.")
@_opt("--timeout", type=float, default=60.0, help="Seconds to wait for a clean stop.")
def down(data_dir: Path, timeout: float) -> None:
    """Stop a stack started with 'up --detach'."""
    from deploy import stack

    try:
        click.echo(stack.down(data_dir, timeout))
    except stack.StackError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@settings_options
@_opt("--mode", type=click.Choice(["auto", "ebpf", "netlink"]), default="auto",
      help="auto: eBPF when it can load, else Netlink (saying why).")
@_opt("--update-interval", type=float, default=10.0, help="Seconds between flow UPDATE events.")
@_opt("--snapshot-interval", type=float, default=5.0, help="Seconds between Netlink snapshots.")
@_opt("--metrics-port", type=int, default=9464, help="Prometheus /metrics port (0: off).")
@_opt("--web-host", default="127.0.0.1", help="Address of the /metrics endpoint.")
def sensor(settings: Settings, **options: Any) -> None:
    """Run the host sensor alone against any Kafka."""
    from sensor import run

    sys.exit(run.main(settings, **options))


@main.command()
@settings_options
@_opt("--web-port", type=int, default=6066, help="Port of the web views and /metrics.")
@_opt("--web-host", default="127.0.0.1", help="Address of the web views.")
@_opt("--workers-group", default="packetless-streams", help="Consumer group / Faust app id.")
@_opt("--streams-partitions", type=int, default=None, help="Partitions of internal topics [4].")
@_opt("--tick-interval", type=float, default=None, help="Seconds between timeout checks [1].")
@_opt("--active-timeout", type=float, default=None, help="UPDATE of a live flow every S seconds [10].")
@_opt("--idle-timeout", type=float, default=None, help="END a flow silent for S s (event time) [300].")
@_opt("--join-delay", type=float, default=None, help="START waits S s (event time) for the other end [2].")
@_opt("--end-grace", type=float, default=None, help="END waits S s (event time) for the other end [2].")
@_opt("--flow-linger", type=float, default=None, help="Keep ended flows S s (event time) for late data [30].")
@_opt("--window-step", type=float, default=None, help="Tumbling window / hop step, seconds [10].")
@_opt("--window-hop", type=float, default=None, help="Hopping window size, seconds [60].")
@_opt("--window-grace", type=float, default=None, help="Late activity accepted for S seconds [5].")
def streams(settings: Settings, **options: Any) -> None:
    """Run one Faust stream worker against any Kafka."""
    from streams import app

    sys.exit(app.main(settings, **options))


@main.command()
@settings_options
@click.argument("topic")
@_opt("--from-beginning", is_flag=True, default=False, help="Start at the oldest record.")
@_opt("--max-messages", type=int, default=None, help="Exit after N records.")
@_opt("--timeout", type=float, default=None, help="Exit after S seconds without a record.")
@_opt("--to-end", is_flag=True, default=False,
      help="Exit once the records that were there when tail started are printed.")
def tail(settings: Settings, topic: str, from_beginning: bool, max_messages: int | None,
         timeout: float | None, to_end: bool) -> None:
    """Print TOPIC as JSON lines (Avro decoded through the registry)."""
    from packetless.tail import tail as run_tail

    try:
        run_tail(settings, topic, from_beginning, max_messages, timeout, to_end)
    except (KeyError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    except KafkaException as exc:
        raise click.ClickException(f"Kafka at {settings.bootstrap_servers}: {exc.args[0].str()}") from exc
    except KeyboardInterrupt:
        pass


@main.command()
@settings_options
@_opt("--web-url", default="http://127.0.0.1:6066", help="The stream worker's web views.")
@_opt("--refresh", type=float, default=2.0, help="Seconds between refreshes.")
def top(settings: Settings, web_url: str, refresh: float) -> None:
    """Live table of containers and pods: flows, bytes, RTT, retransmissions."""
    from packetless import top as top_mod

    sys.exit(top_mod.main(web_url, refresh))


@main.command()
@settings_options
@_opt("--json", "as_json", is_flag=True, default=False, help="Machine-readable output.")
def doctor(settings: Settings, as_json: bool) -> None:
    """Check every prerequisite, explain what is missing, say which sensor mode will run."""
    from packetless import doctor as doctor_mod

    results = doctor_mod.checks(settings)
    mode, why = doctor_mod.sensor_mode(results)
    if as_json:
        click.echo(json.dumps({"checks": [r.__dict__ for r in results],
                               "sensor_mode": mode, "why": why}, indent=2))
        return
    for r in results:
        mark = click.style("ok  ", fg="green") if r.ok else click.style("FAIL", fg="red")
        click.echo(f"{mark} {r.name:26} {r.detail}")
        if not r.ok and r.remedy:
            click.echo(f"     {'':26} fix: {r.remedy}")
    click.echo(f"\nsensor mode: {mode} ({why})")
