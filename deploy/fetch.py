"""Fetch the Kafka broker and build the schema registry into the cache, with progress lines.

Run by ``deploy/setup.sh``; ``packetless up`` does the same on first use.
"""

from __future__ import annotations

import sys

from deploy import broker, registry
from packetless.config import DEFAULT_CACHE_DIR


def main() -> int:
    def say(line: str) -> None:
        print(f"fetch: {line}", file=sys.stderr, flush=True)

    try:
        broker.ensure_fetched(DEFAULT_CACHE_DIR, say)
        registry.ensure_built(DEFAULT_CACHE_DIR, say)
    except (broker.BrokerError, registry.RegistryError) as exc:
        say(f"failed: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
