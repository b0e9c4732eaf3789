"""The schema registry client's OAuth import (authlib with the cryptography package, 11 MiB
resident in the sensor) waits until an OAuth client is made (packetless/registry_oauth.py)."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import packetless
from confluent_kafka.schema_registry._sync import schema_registry_client as client
from packetless.serde import Codec
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("cryptography", "joserfc"))
assert not heavy, heavy
oauth = client.OAuth2Client(client_id="id", client_secret="secret", scope="scope")
assert type(oauth).__module__.startswith("authlib.integrations.httpx_client"), type(oauth)
assert "cryptography" in sys.modules
print("ok")
"""


def test_registry_oauth_is_imported_only_when_used() -> None:
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
