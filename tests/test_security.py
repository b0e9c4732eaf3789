"""TLS and SASL/SCRAM-SHA-512 to Kafka, against a real broker with a SASL_SSL listener.

A throw-away CA and broker certificate (for 127.0.0.1) are made with ``cryptography``; the
SCRAM user is created when the broker's storage is formatted (BrokerConfig.scram_users). The
Publisher produces through SASL_SSL and a consumer reads back; a wrong password, an unknown CA
and a plaintext client are refused with a clear error.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from deploy import broker
from packetless.config import Settings
from packetless.kafka import Publisher, consumer, ensure_topics
from packetless.topics import topic_name
from tests.conftest import free_port

pytestmark = pytest.mark.kafka

USER = "alice"
PASSWORD = "alice-scram-secret"


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_pki(folder: Path, ca_name: str = "packetless test CA") -> tuple[Path, Path]:
    """(ca.pem, broker.pem): a CA and a broker key+certificate for 127.0.0.1/localhost, PEM."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name(ca_name)).issuer_name(_name(ca_name))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    ca_pem = folder / "ca.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    # Kafka's PEM key store: a PKCS#8 private key followed by the certificate chain
    broker_pem = folder / "broker.pem"
    broker_pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
        + cert.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM))
    broker_pem.chmod(0o600)
    return ca_pem, broker_pem


@dataclass
class SecureBroker:
    cfg: broker.BrokerConfig
    sasl_port: int
    ca: Path
    proc: subprocess.Popen[bytes]

    def settings(self, password: str = PASSWORD, ca: Path | None = None) -> Settings:
        return Settings(data_dir=self.cfg.data_dir, bootstrap_servers=f"127.0.0.1:{self.sasl_port}",
                        registry_url="http://127.0.0.1:1/unused", topic_prefix="secure.",
                        security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                        sasl_username=USER, sasl_password=password,
                        ssl_ca_location=str(ca or self.ca))


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    data = tmp_path_factory.mktemp("secure")
    ca, key_store = make_pki(data / "pki")
    port, controller, sasl = free_port(), free_port(), free_port()
    cfg = broker.BrokerConfig(data, port=port, controller_port=controller, scram_users={USER: PASSWORD},
                              extra_properties={
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller},"
                     f"SASL_SSL://127.0.0.1:{sasl}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port},SASL_SSL://127.0.0.1:{sasl}",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL",
        "sasl.enabled.mechanisms": "SCRAM-SHA-512",
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config":
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(key_store),
    })
    classpath = broker.ensure_fetched(broker.DEFAULT_CACHE_DIR, print)
    broker.prepare(cfg, classpath)
    proc = broker.start(cfg, classpath)
    try:
        broker.wait_ready(cfg.bootstrap, 120, logs=[cfg.server_log, cfg.console_log], proc=proc)
        yield SecureBroker(cfg, sasl, ca, proc)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def test_publisher_produces_over_sasl_ssl_and_consumer_reads(secure_broker: SecureBroker) -> None:
    s = secure_broker.settings()
    assert ensure_topics(s, ["flows.ecs"])  # the admin client goes through SASL_SSL as well
    pub = Publisher(s)
    t0 = time.monotonic()
    for seq in range(500):
        pub.send("flows.ecs", f"k{seq % 8}", {"seq": seq})
    assert pub.flush(30) == 0 and pub.delivered == 500 and pub.failed == 0
    cons = consumer(s, None)
    cons.subscribe([topic_name(s, "flows.ecs")])
    seqs: list[int] = []
    deadline = time.monotonic() + 30
    while len(seqs) < 500 and time.monotonic() < deadline:
        seqs += [json.loads(m.value())["seq"] for m in cons.consume(500, timeout=1.0) if not m.error()]
    cons.close()
    print(f"\nSASL_SSL (SCRAM-SHA-512, TLS with a private CA): produced 500, read back {len(seqs)} "
          f"in {time.monotonic() - t0:.1f} s")
    assert sorted(seqs) == list(range(500))


def _refusal(settings: Settings) -> str:
    """What librdkafka says (distinct errors) when an admin client with ``settings`` asks for
    metadata; the request itself must fail."""
    errors: list[str] = []
    client = AdminClient({**settings.kafka_config(), "log_level": 0,
                          "error_cb": lambda e: errors.append(re.sub(r" \(after \d+ms.*", "", e.str()))})
    with pytest.raises(KafkaException) as refused:
        client.list_topics(timeout=8)
    client.poll(1)
    return " | ".join(dict.fromkeys([*errors, refused.value.args[0].str()]))


def test_wrong_password_is_refused_clearly(secure_broker: SecureBroker,
                                           caplog: pytest.LogCaptureFixture) -> None:
    bad = secure_broker.settings(password="not-the-password")
    said = _refusal(bad)
    print(f"\nwrong password: {said}")
    assert "Authentication failed" in said and "SCRAM-SHA-512" in said
    # the Publisher says the same in its log and delivers nothing
    pub = Publisher(bad, **{"message.timeout.ms": 3000})
    with caplog.at_level(logging.WARNING, logger="packetless.kafka"):
        pub.send("flows.ecs", "k", {"seq": 0})
        pub.flush(5)
    assert pub.delivered == 0 and pub.failed == 1
    assert any("Authentication failed" in r.getMessage() for r in caplog.records)


def test_unknown_ca_and_plaintext_are_refused(secure_broker: SecureBroker, tmp_path: Path) -> None:
    other_ca, _ = make_pki(tmp_path, "some other CA")
    said = _refusal(secure_broker.settings(ca=other_ca))
    print(f"\nunknown CA: {said}")
    assert "certificate verify failed" in said
    plain = Settings(bootstrap_servers=f"127.0.0.1:{secure_broker.sasl_port}")
    print(f"plaintext client on the SASL_SSL port: {_refusal(plain)}")
