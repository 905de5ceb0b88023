"""A test app: Stokers that record every callback to Redis, configured by environment.

Workers under test run ``celery -A tests.apps.recorder worker``; the tests read
what the callbacks recorded under ``rec:*`` keys in the same Redis.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery, current_task
from celery.exceptions import SoftTimeLimitExceeded

from celery_stoker import Stoker, StokerStep, consuming, stoker

BROKER = os.environ.get("STOKER_TEST_BROKER", "redis://127.0.0.1:6379/15")
RECORD_URL = os.environ.get("STOKER_TEST_RECORD_URL", BROKER)

app = Celery("recorder", broker=BROKER)
app.conf.update(
    stoker_url=os.environ.get("STOKER_TEST_URL") or None,
    stoker_lease_ttl=float(os.environ.get("STOKER_TEST_TTL", "1.5")),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    worker_soft_shutdown_timeout=float(os.environ.get("STOKER_TEST_SOFT_SHUTDOWN", "0")),
)
if os.environ.get("STOKER_TEST_BALANCE") == "0":  # first come (tests/test_spread.py)
    app.conf.stoker_balance = False
if os.environ.get("STOKER_TEST_MAX_MEMORY_KB"):  # recycle pool processes (test_recycled_pools)
    app.conf.worker_max_memory_per_child = int(os.environ["STOKER_TEST_MAX_MEMORY_KB"])
if os.environ.get("STOKER_TEST_STOP_TIMEOUT"):
    app.conf.stoker_stop_timeout = float(os.environ["STOKER_TEST_STOP_TIMEOUT"])
if os.environ.get("STOKER_TEST_STATE_SERIALIZER"):  # pickle, yaml (test_settings, test_state)
    app.conf.stoker_state_serializer = os.environ["STOKER_TEST_STATE_SERIALIZER"]
if os.environ.get("STOKER_TEST_ALLOW_UNSAFE_SERIALIZER"):
    app.conf.stoker_state_allow_unsafe_serializer = True
if os.environ.get("STOKER_TEST_MIN_REPLICAS"):  # commits wait for replicas (test_history.py)
    app.conf.stoker_min_replicas = int(os.environ["STOKER_TEST_MIN_REPLICAS"])
if os.environ.get("STOKER_TEST_METRICS_PORT"):  # serve /metrics (tests/test_metrics.py)
    app.conf.stoker_metrics_port = int(os.environ["STOKER_TEST_METRICS_PORT"])
if os.environ.get("STOKER_TEST_METRICS_ADDRESS"):
    app.conf.stoker_metrics_address = os.environ["STOKER_TEST_METRICS_ADDRESS"]
if os.environ.get("STOKER_TEST_MASTER_NAME"):  # stoker_url is a sentinel:// group
    app.conf.stoker_transport_options = {"master_name": os.environ["STOKER_TEST_MASTER_NAME"]}
if os.environ.get("STOKER_TEST_CLUSTER"):  # stoker_url names a node of a Redis Cluster
    app.conf.stoker_transport_options = {"cluster": True}
if os.environ.get("STOKER_TEST_TASK_SERIALIZER"):  # events travel as pickle, yaml, msgpack...
    app.conf.task_serializer = os.environ["STOKER_TEST_TASK_SERIALIZER"]
    app.conf.accept_content = [os.environ["STOKER_TEST_TASK_SERIALIZER"], "json"]
if os.environ.get("STOKER_TEST_LOG_NAMES"):  # each log line names its logger (test_log_levels)
    app.conf.worker_log_format = "[%(asctime)s: %(levelname)s/%(processName)s %(name)s] %(message)s"
if not os.environ.get("STOKER_TEST_NO_STEP"):  # a worker of the app that runs no Stoker
    app.steps["worker"].add(StokerStep)
if os.environ.get("STOKER_TEST_QUEUE_EXPIRES"):  # the event queue's expiry, shorter than 20 s
    import celery_stoker.bootstep

    celery_stoker.bootstep.EVENT_QUEUE_EXPIRES = float(os.environ["STOKER_TEST_QUEUE_EXPIRES"])
if os.environ.get("STOKER_TEST_ACL_RECHECK"):  # re-probe a Redis user's ACL sooner than 30 s
    import celery_stoker.access

    celery_stoker.access.RECHECK_INTERVAL = float(os.environ["STOKER_TEST_ACL_RECHECK"])

_record_client: redis.Redis | None = None
_record_pid = 0


def _client() -> redis.Redis:
    """This process's client of the record Redis."""
    global _record_client, _record_pid
    if _record_client is None or _record_pid != os.getpid():
        _record_client = redis.Redis.from_url(RECORD_URL)
        _record_pid = os.getpid()
    return _record_client


def record(kind: str, **fields: Any) -> None:
    """Append one line to ``rec:<kind>`` (a list the test reads)."""
    fields.setdefault("at", time.time())
    fields.setdefault("pid", os.getpid())
    _client().rpush(f"rec:{kind}", json.dumps(fields, default=str))


def _record_commits() -> None:
    """STOKER_TEST_RECORD_COMMITS: record what each pool event's outcome said of its commit.

    ``rec:commit`` gets, per event run in the pool, whether its state was reported
    stored and, if so, the state's ``events`` count: a test compares it with what
    later events start from (a commit reported stored must never be lost).
    """
    from kombu.serialization import loads

    from celery_stoker import dispatch
    from celery_stoker.copies import StateCopy, copies

    original, original_keep = dispatch.run_event, copies.keep
    kept: list[StateCopy] = []

    def keep(hostname: str, name: str, copy: StateCopy) -> None:
        kept.append(copy)  # the committed state, as the worker keeps it
        original_keep(hostname, name, copy)

    def run_event(*args: Any, **kwargs: Any) -> Any:
        kept.clear()
        outcome = original(*args, **kwargs)
        events = None
        if outcome.committed and kept:
            copy = kept[-1]
            state = loads(copy.body, copy.content_type, copy.encoding, accept={"application/json"})
            events = state["events"]
        record(
            "commit",
            token=outcome.token,
            committed=outcome.committed,
            events=events,
            outcome=outcome.kind,
            error=outcome.error,
        )
        return outcome

    copies.keep = keep  # type: ignore[method-assign]
    dispatch.run_event = run_event


if os.environ.get("STOKER_TEST_RECORD_COMMITS"):
    _record_commits()


def _eligible() -> Any:
    """STOKER_TEST_ELIGIBLE: comma-separated node-name patterns, or queue:<name>."""
    raw = os.environ.get("STOKER_TEST_ELIGIBLE")
    if not raw:
        return None
    if raw.startswith("queue:"):
        return consuming(raw.split(":", 1)[1])
    return raw.split(",")


def _limits() -> dict[str, Any]:
    """STOKER_TEST_SOFT_LIMIT / STOKER_TEST_HARD_LIMIT / STOKER_TEST_MAX_FAILURES."""
    options: dict[str, Any] = {}
    if os.environ.get("STOKER_TEST_SOFT_LIMIT"):
        options["soft_time_limit"] = float(os.environ["STOKER_TEST_SOFT_LIMIT"])
    if os.environ.get("STOKER_TEST_HARD_LIMIT"):
        options["time_limit"] = float(os.environ["STOKER_TEST_HARD_LIMIT"])
    if os.environ.get("STOKER_TEST_MAX_FAILURES"):
        options["max_failures"] = int(os.environ["STOKER_TEST_MAX_FAILURES"])
    return options


def _first_time(what: str) -> bool:
    """True once per Redis (across workers and pool processes): for faults that happen once."""
    return bool(_client().set(f"rec:once:{what}", 1, nx=True))


def _misbehave(event: str, host: str) -> None:
    """The faults a test asks for by environment, on the first timer event (once)."""
    # STOKER_TEST_NOW_LEADER_EXITS=N: the first N now_leader callbacks (across workers and
    # pool processes) kill their pool process, as a crash at start of term would.
    exits = int(os.environ.get("STOKER_TEST_NOW_LEADER_EXITS", "0"))
    if event == "now_leader" and exits and _client().incr("rec:now-leader-exits") <= exits:
        record("fault", fault="exit", event=event, host=host)
        os._exit(9)
    if event != "timer":
        return
    fault = os.environ.get("STOKER_TEST_TIMER_FAULT", "")
    if not fault or not _first_time("timer-fault"):
        return
    record("fault", fault=fault, host=host)
    if fault == "exit":
        os._exit(9)  # a pool process that dies mid-callback (segfault, OOM kill)
    if fault.startswith("sleep:"):  # a hanging callback; it may hear SoftTimeLimitExceeded
        try:
            time.sleep(float(fault.split(":", 1)[1]))
        except SoftTimeLimitExceeded:
            record("soft_limit", host=host)
            raise


class Recorder(Stoker):
    """Counts events and records each one with its context."""

    def init(self) -> dict[str, Any]:
        record("init", host=self.context.hostname, token=self.context.token)
        fails = int(os.environ.get("STOKER_TEST_INIT_FAILS", "0"))
        if fails and _client().llen("rec:init") <= fails:
            raise RuntimeError("init failed on purpose")
        state: dict[str, Any] = {"events": 0, "timers": 0}
        if os.environ.get("STOKER_TEST_STATE_BYTES"):  # a large state (tests/test_state.py)
            state["blob"] = "x" * int(os.environ["STOKER_TEST_STATE_BYTES"])
        return state

    def event(self, state: dict[str, Any], event: str, reason: Any) -> dict[str, Any]:
        ctx = self.context
        started = time.time()
        request = current_task.request if event != "shutdown" else None
        task_id = getattr(request, "id", None)
        if os.environ.get("STOKER_TEST_RECORD_REQUESTS") and request is not None:
            # The dispatch message as it arrived, for tests that send copies of it.
            record("request", id=task_id, args=request.args, event=event, host=ctx.hostname)
        if os.environ.get("STOKER_TEST_RECORD_STARTS") and event != "shutdown":
            record("started", event=event, host=ctx.hostname, token=ctx.token)
        if event == "shutdown" and os.environ.get("STOKER_TEST_SHUTDOWN_HANG") == ctx.hostname:
            record("hanging", host=ctx.hostname)
            time.sleep(3600)
        _misbehave(event, ctx.hostname)
        busy = float(os.environ.get("STOKER_TEST_EVENT_SLEEP", "0"))
        if busy and event != "shutdown":
            record("started", event=event, host=ctx.hostname, token=ctx.token)
            time.sleep(busy)  # a slow callback, to show events never overlap
        record(
            "event",
            event=event,
            name=ctx.name,
            reason=reason,
            host=ctx.hostname,
            token=ctx.token,
            members=sorted(ctx.members),
            events=state["events"],
            started=started,
            stale=getattr(ctx, "stale", None),
            history_lost=getattr(ctx, "history_lost", None),
            task_id=task_id,
        )
        if event == "timer" and os.environ.get("STOKER_TEST_RAISE_ON_TIMER") == ctx.hostname:
            # STOKER_TEST_RAISE_MESSAGE: the error's text (long, several lines: inspect's brief)
            raise RuntimeError(os.environ.get("STOKER_TEST_RAISE_MESSAGE", "boom in timer"))
        # STOKER_TEST_FAIL_FLAG: the test names the worker whose callbacks fail
        # (rec:fail-on), once it knows who leads.
        if (
            event != "shutdown"
            and os.environ.get("STOKER_TEST_FAIL_FLAG")
            and _client().get("rec:fail-on") == ctx.hostname.encode()
        ):
            raise RuntimeError(f"boom in {event} on {ctx.hostname}")
        state = dict(state)
        state["events"] += 1
        if event == "timer":
            state["timers"] += 1
        return state

    def leader_started(self) -> None:
        record("hook", hook="started", host=self.context.hostname, token=self.context.token)

    def leader_stopping(self, reason: str) -> None:
        if self.shutdown_hook_hangs():
            record("hanging", host=self.context.hostname, hook=True)
            time.sleep(3600)
        record(
            "hook",
            hook="stopping",
            reason=reason,
            host=self.context.hostname,
            token=self.context.token,
        )

    def next_timer_in(self, state: dict[str, Any]) -> float | None:
        raw = os.environ.get("STOKER_TEST_TIMER")
        return float(raw) if raw else None

    def shutdown_hook_hangs(self) -> bool:
        return os.environ.get("STOKER_TEST_HOOK_HANG") == self.context.hostname


def _register_recorders() -> None:
    """The recording Stoker, or with STOKER_TEST_STOKERS=N, N of them: ``rec-0`` ... ``rec-<N-1>``.

    STOKER_TEST_WEIGHTS (``rec-0=3,rec-1=2``) gives some a weight; STOKER_TEST_ONLY
    (``rec-0=w1@*,rec-1=w2@*``) lets only matching workers lead that one (eligible=).
    """
    count = int(os.environ.get("STOKER_TEST_STOKERS", "0"))
    names = (
        [f"rec-{n}" for n in range(count)]
        if count
        else [os.environ.get("STOKER_TEST_STOKER_NAME", "recorder")]
    )
    weights = dict(
        (k, int(v)) for k, _, v in (p.partition("=") for p in _env_list("STOKER_TEST_WEIGHTS"))
    )
    only = dict((k, v) for k, _, v in (p.partition("=") for p in _env_list("STOKER_TEST_ONLY")))
    for name in names:
        stoker(
            app,
            name=name,
            eligible=only.get(name, _eligible()),
            min_members=int(os.environ.get("STOKER_TEST_MIN_MEMBERS", "1")),
            weight=weights.get(name, 1),
            **_limits(),
        )(type(f"Recorder_{name.replace('-', '_').replace('.', '_')}", (Recorder,), {}))


def _env_list(key: str) -> list[str]:
    return [part for part in os.environ.get(key, "").split(",") if part]


_register_recorders()


@app.task(name="recorder.sleep")
def sleep(seconds: float) -> None:
    """Keep a pool slot busy, then say so (to show a busy pool never delays renewals)."""
    time.sleep(seconds)
    record("slept", seconds=seconds)


@app.task(name="recorder.block", bind=True)
def block(self: Any, key: str, timeout: float) -> None:
    """Hold a pool slot until the test pushes to ``key`` (or ``timeout`` passes).

    Records ``blocking`` once it runs, so a test knows the slot is taken.
    """
    record("blocking", key=key, host=self.request.hostname)
    _client().blpop([key], timeout=timeout)
    record("unblocked", key=key, host=self.request.hostname)


def _extra_stokers(count: int) -> None:
    """STOKER_TEST_EXTRA_STOKERS=N: N more Stokers that do nothing (a worker with many)."""

    class Idle(Stoker):
        def event(self, state: Any, event: str, reason: Any) -> Any:
            return state

    for n in range(count):
        stoker(app, name=f"idle-{n}")(type(f"Idle{n}", (Idle,), {}))


_extra_stokers(int(os.environ.get("STOKER_TEST_EXTRA_STOKERS", "0")))
