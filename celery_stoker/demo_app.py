"""The app the demo's workers run (``celery -A celery_stoker.demo_app worker``).

One small Stoker, ``demo.ticker``, counts timer ticks and records every event
it handles in a Redis list the demo reads (``<prefix>:events``); beat runs on
the leader too (``celery_stoker.beat``), sending ``demo.ping`` every two
seconds.  Everything is namespaced under ``stoker-demo`` (keys, queue, RedBeat
prefix), so ``--broker`` may point at a Redis that also serves a real app.

Configured by environment, because the demo starts the workers as separate
``celery worker`` processes: ``CELERY_STOKER_DEMO_BROKER`` (the Redis URL) and
``CELERY_STOKER_DEMO_TTL`` (the lease TTL in seconds, short so a crash
failover is quick to watch); ``CELERY_STOKER_DEMO_STOKER_URL`` puts the leases
elsewhere (``stoker_url``), on a Redis Cluster when ``CELERY_STOKER_DEMO_CLUSTER``
is set (the demo's records and RedBeat stay on the broker's Redis).
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import redis
from celery import Celery

from . import Stoker, StokerStep, stoker
from .connection import redis_client
from .contrib.beat import install

BROKER = os.environ.get("CELERY_STOKER_DEMO_BROKER", "redis://127.0.0.1:6379/0")
PREFIX = "stoker-demo"
EVENTS_KEY = f"{PREFIX}:events"
#: A hash: how many times ``demo.ping`` ran, by worker.
PINGS_KEY = f"{PREFIX}:pings"
#: How many events the demo keeps (the list is trimmed on every write).
EVENTS_KEPT = 200
TICKER = "demo.ticker"

app = Celery("celery_stoker_demo", broker=BROKER)
app.conf.update(
    stoker_lease_ttl=float(os.environ.get("CELERY_STOKER_DEMO_TTL", "2")),
    stoker_key_prefix=PREFIX,
    task_default_queue=PREFIX,
    redbeat_key_prefix=f"{PREFIX}:redbeat:",
    beat_schedule={"ping": {"task": "demo.ping", "schedule": 2.0}},
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)
if os.environ.get("CELERY_STOKER_DEMO_STOKER_URL"):
    app.conf.stoker_url = os.environ["CELERY_STOKER_DEMO_STOKER_URL"]
    # RedBeat does not speak Cluster: its schedule and lock stay on the broker's Redis.
    app.conf.redbeat_redis_url = BROKER
    if os.environ.get("CELERY_STOKER_DEMO_CLUSTER"):
        app.conf.stoker_transport_options = {"cluster": True}
app.steps["worker"].add(StokerStep)
install(app)

_clients: dict[int, redis.Redis] = {}
_clients_lock = threading.Lock()


def _client() -> redis.Redis:
    """One client per process (a prefork child must not share its parent's sockets)."""
    pid = os.getpid()
    with _clients_lock:
        client = _clients.get(pid)
        if client is None:
            client = _clients[pid] = redis_client(BROKER, socket_timeout=2.0)
        return client


def record(event: str, host: str, token: int | None = None, **fields: Any) -> None:
    """Push one event onto the demo's list (newest first), where the demo's screen reads it."""
    client = _client()
    line = json.dumps({"at": time.time(), "event": event, "host": host, "token": token, **fields})
    with client.pipeline() as pipe:
        pipe.lpush(EVENTS_KEY, line)
        pipe.ltrim(EVENTS_KEY, 0, EVENTS_KEPT - 1)
        pipe.execute()


@stoker(app, name=TICKER)
class Ticker(Stoker):
    """Counts ticks on the leader; the count survives failovers because it is the stored state."""

    def init(self) -> dict[str, int]:
        return {"ticks": 0}

    def event(self, state: dict[str, int], event: str, reason: Any) -> dict[str, int]:
        ticks = state["ticks"] + (1 if event == "timer" else 0)
        record(
            event,
            self.context.hostname,
            self.context.token,
            stoker=TICKER,
            reason=reason,
            ticks=ticks,
        )
        return {"ticks": ticks}

    def next_timer_in(self, state: dict[str, int]) -> float:
        return 1.0


@app.task(name="demo.ping", bind=True)
def ping(self: Any) -> None:
    """The periodic task beat sends from the leader; records which worker ran it."""
    record("ping", str(self.request.hostname), stoker="celery_stoker.beat")
    _client().hincrby(PINGS_KEY, str(self.request.hostname), 1)
