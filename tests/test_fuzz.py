"""Bad input, fuzzed: every decoder either returns a value or fails with its documented error.

Property-based (hypothesis) tests of Codec.decode (real registry), netlink sock_diag parsing,
cgroup path parsing, config file reading and command-line redaction; the slow-marked test runs
the coverage-guided atheris harness ``tests/fuzz_decoders.py`` for PACKETLESS_FUZZ_SECONDS.
Example counts scale with PACKETLESS_FUZZ_EXAMPLES (default 200).
"""

from __future__ import annotations

import errno
import importlib.util
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from fastavro.utils import generate_many
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

import schemas
from packetless.config import Settings, read_config_file
from packetless.serde import Codec, DecodeError
from packetless.topics import TOPICS, topic_name
from sensor import netlink
from sensor.cgroups import container_from_cgroup_path
from sensor.processes import REDACTED, redact
from tests.support.capabilities import require

EXAMPLES = int(os.environ.get("PACKETLESS_FUZZ_EXAMPLES", "200"))
FUZZ_SECONDS = int(os.environ.get("PACKETLESS_FUZZ_SECONDS", "20"))
AVRO_TOPICS = [t.suffix for t in TOPICS.values() if t.schema]
HEX = "0123456789abcdef"

fuzz = hypothesis_settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- Avro records through the registry ----------------------------------------------------------


@pytest.fixture(scope="module")
def codec(settings: Settings) -> Codec:
    return Codec(settings)


def _framed(codec: Codec, suffix: str) -> tuple[int, list[bytes]]:
    """The registered schema id of ``suffix`` and a few valid encoded records."""
    records = list(generate_many(schemas.load(TOPICS[suffix].schema or ""), 5))
    encoded = [codec.encode(suffix, r) for r in records]
    subject = f"{topic_name(codec.settings, suffix)}-value"
    return codec.client.get_latest_version(subject).schema_id, encoded


def _decode_or_dead_letter(codec: Codec, suffix: str, data: bytes) -> None:
    try:
        record = codec.decode(suffix, data)
    except DecodeError as exc:
        assert exc.kind in {"truncated", "not_avro", "bad_magic", "unknown_schema",
                            "registry_error", "invalid_record", "schema_mismatch"}
        assert exc.reason
    else:
        assert isinstance(record, dict)


@pytest.mark.kafka
@pytest.mark.parametrize("suffix", AVRO_TOPICS)
def test_decode_never_crashes(codec: Codec, suffix: str) -> None:
    schema_id, valid = _framed(codec, suffix)
    header = struct.pack(">bI", 0, schema_id)

    @fuzz
    @given(st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=400).map(lambda body: header + body),
        st.tuples(st.sampled_from(valid), st.integers(0, 10_000), st.integers(0, 255),
                  st.booleans()).map(lambda t: _mutate(*t)),
    ))
    @example(b"")
    @example(b"\0")
    @example(header)
    @example(b"\1" + header[1:] + b"\0" * 10)
    def decode(data: bytes) -> None:
        _decode_or_dead_letter(codec, suffix, data)

    decode()


def _mutate(data: bytes, position: int, byte: int, truncate: bool) -> bytes:
    """A valid record cut short, or with one byte changed (the header left alone)."""
    cut = 5 + position % max(1, len(data) - 5)
    if truncate:
        return data[:cut]
    return data[:cut] + bytes([byte]) + data[cut + 1:]


# -- netlink sock_diag replies ------------------------------------------------------------------

_DIAG_SEQ = 7


def _nlmsg(msg_type: int, body: bytes, seq: int = _DIAG_SEQ) -> bytes:
    data = netlink._NLMSGHDR.pack(netlink._NLMSGHDR.size + len(body), msg_type, 2, seq, 0) + body
    return data.ljust((len(data) + 3) & ~3, b"\0")


def _attr(attr_type: int, payload: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(payload), attr_type) + payload
    return data.ljust((len(data) + 3) & ~3, b"\0")


_DIAG_BODY = netlink._INET_DIAG_MSG.pack(2, 1, 0, 0, 0x5000, 0x9000, b"\x7f\0\0\1".ljust(16, b"\0"),
                                         b"\x7f\0\0\1".ljust(16, b"\0"), 1, 42, 0, 0, 0, 0, 0)

diag_attrs = st.lists(st.tuples(
    st.sampled_from([netlink.INET_DIAG_INFO, netlink.INET_DIAG_CONG, netlink.INET_DIAG_CGROUP_ID,
                     0, 1, 3, 0xFFFF]),
    st.binary(max_size=300)), max_size=4)


def _replay_diag(datagrams: list[bytes]) -> list[netlink.DiagMessage]:
    """dump_sockets over a socketpair whose other end answers with ``datagrams`` and DONE."""
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, kernel:
        ours.settimeout(5)
        for data in [*datagrams, _nlmsg(netlink.NLMSG_DONE, b"\0\0\0\0")]:
            kernel.send(data)
        return list(netlink.dump_sockets(ours, socket.AF_INET, socket.IPPROTO_TCP, seq=_DIAG_SEQ))


@fuzz
@given(st.one_of(
    st.lists(st.binary(max_size=600), max_size=3),
    diag_attrs.map(lambda attrs: [_nlmsg(netlink.SOCK_DIAG_BY_FAMILY,
                                         _DIAG_BODY + b"".join(_attr(t, p) for t, p in attrs))]),
    st.tuples(st.binary(max_size=600), st.integers(0, 600)).map(
        lambda t: [_nlmsg(netlink.SOCK_DIAG_BY_FAMILY, _DIAG_BODY + t[0])[:16 + t[1]]]),
    st.binary(max_size=24).map(lambda body: [_nlmsg(netlink.NLMSG_ERROR, body)]),
))
@example([_nlmsg(netlink.NLMSG_ERROR, b"")])
@example([_nlmsg(netlink.NLMSG_ERROR, struct.pack("=i", -(2**31)))])
@example([_nlmsg(netlink.SOCK_DIAG_BY_FAMILY, _DIAG_BODY + _attr(netlink.INET_DIAG_CGROUP_ID, b"\1"))])
@example([_nlmsg(netlink.SOCK_DIAG_BY_FAMILY, _DIAG_BODY[:20])])
def test_sock_diag_parsing_survives_malformed_replies(datagrams: list[bytes]) -> None:
    """Malformed or truncated replies yield sockets or an OSError naming the problem."""
    try:
        for msg in _replay_diag(datagrams):
            assert msg.family == socket.AF_INET
            assert netlink.details(msg).dport == 0x90
    except OSError as exc:
        assert not isinstance(exc, TimeoutError), "a reply must never hang the dump"


def test_sock_diag_error_replies() -> None:
    """An ACK (error 0) is skipped, an error names its errno, a truncated one is EPROTO."""
    ack = _nlmsg(netlink.NLMSG_ERROR, struct.pack("=i", 0))
    found = _replay_diag([ack, _nlmsg(netlink.SOCK_DIAG_BY_FAMILY, _DIAG_BODY)])
    assert [m.cookie for m in found] == [42]
    with pytest.raises(OSError) as refused:
        _replay_diag([_nlmsg(netlink.NLMSG_ERROR, struct.pack("=i", -errno.EPERM))])
    assert refused.value.errno == errno.EPERM and "EPERM" in str(refused.value)
    with pytest.raises(OSError) as truncated:
        _replay_diag([_nlmsg(netlink.NLMSG_ERROR, b"\1\2")])
    assert truncated.value.errno == errno.EPROTO


# -- cgroup paths ---------------------------------------------------------------------------

_container_id = st.text(HEX, min_size=64, max_size=64)
_pod_uid = st.uuids().map(str)
_components = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["docker", "kubepods", "kubepods.slice", "system.slice", "burstable",
                     "kubepods-besteffort.slice", "libpod_parent", "machine", "..", ""]),
    _container_id,
    _container_id.map(lambda i: f"docker-{i}.scope"),
    _container_id.map(lambda i: f"cri-containerd-{i}.scope"),
    _container_id.map(lambda i: f"crio-{i}"),
    _pod_uid.map(lambda u: f"pod{u}"),
    _pod_uid.map(lambda u: f"kubepods-burstable-pod{u.replace('-', '_')}.slice"),
)


@fuzz
@given(st.one_of(st.text(max_size=500), st.lists(_components, max_size=8).map("/".join)))
@example("/" + "a-" * 5000 + "pod")
@example("/kubepods/" + "burstable-" * 3000)
def test_cgroup_paths_never_crash(path: str) -> None:
    t0 = time.monotonic()
    ref = container_from_cgroup_path(path)
    assert time.monotonic() - t0 < 1.0, "no pathological regex backtracking"
    if ref is not None:
        assert re.fullmatch(r"[0-9a-f]{64}", ref.container_id) and ref.container_id in path
        assert ref.pod_uid is None or len(ref.pod_uid) in (32, 36)


# -- config files ---------------------------------------------------------------------------


@fuzz
@given(st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(str.encode),
    st.lists(st.tuples(st.sampled_from(["bootstrap-servers", "data_dir", "[sensor]", "mode"]),
                       st.text(max_size=20)), max_size=5)
    .map(lambda kv: "\n".join(f'{k} = "{v}"' if not k.startswith("[") else k for k, v in kv)
         .encode()),
))
@example(b"\xff\xfe not utf-8")
@example(b"a = " + b"[" * 5000)
def test_config_file_is_a_mapping_or_a_clear_error(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "packetless.toml"
        path.write_bytes(content)
        try:
            config = read_config_file(path)
        except ValueError as exc:
            assert str(path) in str(exc), f"the error must name the file: {exc!r}"
        else:
            assert isinstance(config, dict)


# -- redaction --------------------------------------------------------------------------------

# What a secret may contain (``token=`` values end at & ; , and white space, as in URLs).
_secret = st.text(st.characters(codec="utf-8", exclude_characters="&;,\x00",
                                exclude_categories=("Z", "Cc", "Cs")), min_size=1, max_size=30)
_argv = st.lists(st.text(max_size=20), max_size=6)
_forms = st.sampled_from(["--password={}", "--db-password={}", "-password={}", "token={}",
                          "PGPASSWORD={}", "AWS_SECRET_ACCESS_KEY={}",
                          "https://example.org/?access_token={}", "postgres://u:{}@db/x"])


@fuzz
@given(_argv, _argv, _forms, _secret)
@example([], [], "--password={}", "hunter2 with spaces")
def test_redact_never_leaks_a_secret(before: list[str], after: list[str], form: str,
                                     secret: str) -> None:
    marker = f"S3cr{secret}"  # a value no other argument contains by chance
    if form.startswith("postgres") and any(c in marker for c in "/@"):
        marker = marker.replace("/", "").replace("@", "")
    argv = ["prog", *before, form.format(marker), *after]
    out = redact(argv)
    assert len(out) == len(argv)
    assert not any(marker in arg for arg in out), (argv, out)
    assert any(REDACTED in arg for arg in out)


@fuzz
@given(st.lists(st.text(max_size=40), max_size=10))
def test_redact_never_crashes_and_keeps_the_shape(argv: list[str]) -> None:
    out = redact(argv)
    assert len(out) == len(argv)
    assert all(o == a or REDACTED in o for o, a in zip(out, argv, strict=True))


# -- coverage-guided, minutes long ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.kafka
def test_atheris_harness(settings: Settings, tmp_path: Path) -> None:
    require(importlib.util.find_spec("atheris") is not None,
            "atheris (pip install atheris; in the test extras)")
    harness = Path(__file__).with_name("fuzz_decoders.py")
    env = {**os.environ, "PACKETLESS_REGISTRY_URL": settings.registry_url,
           "PACKETLESS_TOPIC_PREFIX": settings.topic_prefix}
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(harness), f"-max_total_time={FUZZ_SECONDS}", "-rss_limit_mb=4096",
         f"-artifact_prefix={tmp_path}/"],
        env=env, capture_output=True, text=True, timeout=FUZZ_SECONDS + 120, check=False)
    runs = re.findall(r"#(\d+)\s+(?:DONE|pulse|NEW|REDUCE)", done.stderr)
    cov = re.findall(r"cov: (\d+)", done.stderr)
    print(f"\natheris: {FUZZ_SECONDS} s, {runs[-1] if runs else '?'} runs, coverage "
          f"{cov[-1] if cov else '?'} edges, exit {done.returncode} "
          f"({time.monotonic() - t0:.0f} s with start-up)")
    assert done.returncode == 0, done.stderr[-3000:]
