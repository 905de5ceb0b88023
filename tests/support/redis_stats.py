"""Redis's own command counters (``INFO commandstats``), read the same way by every test.

A test that says "this sends no BLPOP while idle" or "a failover costs two
EVALSHA" counts commands on the server itself, where nothing the client
library does can hide one.
"""

from __future__ import annotations

from typing import Any

#: What reading the counters sends (and a new connection's greeting, and a test's
#: CONFIG RESETSTAT): never counted, so a test sees only what the code under test sent.
OWN = frozenset({"info", "config|resetstat", "hello", "client|setinfo"})


def command_calls(client: Any) -> dict[str, int]:
    """Calls per command (``"evalsha"``, ``"script|load"``, ...) since the server started
    or its last ``CONFIG RESETSTAT``, without :data:`OWN`."""
    calls = {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in client.info("commandstats").items()
    }
    return {name: count for name, count in calls.items() if name not in OWN}
