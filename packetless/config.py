"""Settings shared by every command: where the data lives, how to reach Kafka and the registry.

Values come, by precedence, from command-line options, ``PACKETLESS_<OPTION>`` environment
variables, a TOML config file (``--config`` / ``PACKETLESS_CONFIG``) and the defaults below.
"""

from __future__ import annotations

import logging
import os
import socket
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "packetless"
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "packetless"
# librdkafka's own log lines (e.g. one per failed connect attempt) go here, not to stderr;
# the CLI shows them with -v. Failures reach users through exceptions and delivery reports.
LIBRDKAFKA_LOG = logging.getLogger("packetless.librdkafka")


@dataclass
class Settings:
    """Connection and placement settings; one instance per process."""

    data_dir: Path = DEFAULT_DATA_DIR
    cache_dir: Path = DEFAULT_CACHE_DIR
    bootstrap_servers: str = "127.0.0.1:9092"
    registry_url: str = "http://127.0.0.1:8081/apis/ccompat/v7"
    topic_prefix: str = "packetless."
    host_name: str = field(default_factory=socket.gethostname)
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_ca_location: str | None = None
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    web_host: str = "127.0.0.1"

    def kafka_config(self) -> dict[str, Any]:
        """librdkafka settings for reaching the brokers (security included)."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
            "logger": LIBRDKAFKA_LOG,
        }
        optional = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
        }
        conf.update({k: v for k, v in optional.items() if v})
        return conf

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> Settings:
        """Settings from a mapping of option names (``-`` or ``_``); unknown or None values ignored."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name in known and value is not None:
                kwargs[name] = Path(value) if name.endswith("_dir") else value
        return cls(**kwargs)


def read_config_file(path: Path | None) -> dict[str, Any]:
    """The TOML config file as a flat mapping (top-level keys plus one table per command).

    A missing default file is fine; a named file that is missing or malformed is an error.
    """
    if path is None:
        path = Path(os.environ.get("PACKETLESS_CONFIG", "/etc/packetless/packetless.toml"))
        if not path.exists():
            return {}
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ValueError(f"config file {path} does not exist") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from exc
