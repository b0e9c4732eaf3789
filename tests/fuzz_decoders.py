"""Coverage-guided fuzzing (atheris/libFuzzer) of the decoders that read untrusted input.

Targets: cgroup paths, config files, command-line redaction, netlink sock_diag replies and, when
PACKETLESS_REGISTRY_URL is set, Avro records through Codec.decode. Each must return a value or
raise its documented error. Run: ``python tests/fuzz_decoders.py -max_total_time=60``;
PACKETLESS_FUZZ_TARGETS=cgroup,config,redact,sock_diag,avro picks some.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from packetless.config import Settings, read_config_file
    from packetless.serde import Codec, DecodeError
    from packetless.topics import TOPICS, topic_name
    from sensor import netlink
    from sensor.cgroups import container_from_cgroup_path
    from sensor.processes import redact

CONFIG_FILE = Path(tempfile.mkdtemp(prefix="packetless-fuzz-")) / "packetless.toml"


def fuzz_cgroup(fdp: atheris.FuzzedDataProvider) -> None:
    path = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
    ref = container_from_cgroup_path(path)
    assert ref is None or ref.container_id in path


def fuzz_config(fdp: atheris.FuzzedDataProvider) -> None:
    CONFIG_FILE.write_bytes(fdp.ConsumeBytes(fdp.remaining_bytes()))
    try:
        assert isinstance(read_config_file(CONFIG_FILE), dict)
    except ValueError as exc:
        assert str(CONFIG_FILE) in str(exc), f"the error must name the file: {exc!r}"


def fuzz_redact(fdp: atheris.FuzzedDataProvider) -> None:
    argv = [fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40))
            for _ in range(fdp.ConsumeIntInRange(0, 8))]
    assert len(redact(argv)) == len(argv)


def fuzz_sock_diag(fdp: atheris.FuzzedDataProvider) -> None:
    """dump_sockets over a socketpair answering with fuzzed datagrams, then NLMSG_DONE."""
    seq = 7
    done = netlink._NLMSGHDR.pack(20, netlink.NLMSG_DONE, 2, seq, 0) + b"\0" * 4
    datagrams = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2000))
                 for _ in range(fdp.ConsumeIntInRange(1, 3))]
    if fdp.ConsumeBool():  # most inputs: a well-framed message with a fuzzed body
        datagrams = [netlink._NLMSGHDR.pack(16 + len(d), netlink.SOCK_DIAG_BY_FAMILY, 2, seq, 0) + d
                     for d in datagrams]
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, kernel:
        ours.settimeout(5)
        for data in [*datagrams, done]:
            kernel.send(data)
        try:
            for msg in netlink.dump_sockets(ours, socket.AF_INET, socket.IPPROTO_TCP, seq=seq):
                netlink.details(msg)
        except OSError as exc:
            assert not isinstance(exc, TimeoutError), "a reply must never hang the dump"


def avro_target() -> Callable[[atheris.FuzzedDataProvider], None] | None:
    """Codec.decode of each Avro topic, inputs framed with the registered schema id."""
    url = os.environ.get("PACKETLESS_REGISTRY_URL")
    if not url:
        return None
    settings = Settings(registry_url=url,
                        topic_prefix=os.environ.get("PACKETLESS_TOPIC_PREFIX", "packetless."))
    codec = Codec(settings)
    suffixes = [t.suffix for t in TOPICS.values() if t.schema]
    ids = {s: codec.client.get_latest_version(f"{topic_name(settings, s)}-value").schema_id
           for s in suffixes}

    def fuzz_avro(fdp: atheris.FuzzedDataProvider) -> None:
        suffix = suffixes[fdp.ConsumeIntInRange(0, len(suffixes) - 1)]
        body = fdp.ConsumeBytes(fdp.remaining_bytes())
        try:
            record = codec.decode(suffix, struct.pack(">bI", 0, ids[suffix]) + body)
        except DecodeError:
            return
        assert isinstance(record, dict)

    return fuzz_avro


TARGETS: list[Callable[[atheris.FuzzedDataProvider], None]] = [
    fuzz_cgroup, fuzz_config, fuzz_redact, fuzz_sock_diag]


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    TARGETS[fdp.ConsumeIntInRange(0, len(TARGETS) - 1)](fdp)


def main() -> None:
    avro = avro_target()
    if avro is None:
        print("fuzz_decoders: PACKETLESS_REGISTRY_URL not set, Avro decoding not fuzzed",
              file=sys.stderr)
    else:
        TARGETS.append(avro)
    chosen = os.environ.get("PACKETLESS_FUZZ_TARGETS")
    if chosen:
        names = chosen.split(",")
        TARGETS[:] = [t for t in TARGETS if t.__name__.removeprefix("fuzz_") in names]
    print(f"fuzz_decoders: targets {', '.join(t.__name__ for t in TARGETS)}", file=sys.stderr)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
