"""Names and broadcast text: control characters refused at ``@stoker``, errors broadcast brief.

A name is shown in terminals and logs, so one holding an escape sequence is an
error where it is written.  What ``inspect stoker`` broadcasts of an error is its
type and first line (at most 200 characters); the traceback stays in the
worker's log.  The escaping of what ``status`` prints from Redis is tested in
test_cli_watch.py, beside the other ``status`` views.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery
from support.workers import Fleet, Records

from celery_stoker import Stoker, StokerRegistrationError, stoker
from celery_stoker.registry import registry_of
from celery_stoker.testing import RedisServer, wait_for
from celery_stoker.text import BRIEF_LIMIT, brief, control_character, printable


class Idle(Stoker):
    def event(self, state: Any, event: str, reason: Any) -> Any:
        return state


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("poll\x1b[2Jer", "U+001B ESCAPE, at position 4"),
        ("\x00", "U+0000 NULL, at position 0"),
        ("tab\there", "U+0009 CHARACTER TABULATION, at position 3"),
        ("del\x7f", "U+007F DELETE, at position 3"),
        ("next\x85line", "U+0085 NEXT LINE, at position 4"),
        ("csi\x9b31m", "U+009B CONTROL SEQUENCE INTRODUCER, at position 3"),
    ],
)
def test_a_control_character_in_a_name_is_refused_at_decoration(name: str, shown: str) -> None:
    app = Celery("names", set_as_current=False)
    with pytest.raises(StokerRegistrationError, match="has a control character") as info:
        stoker(app, name=name)(type("Named", (Idle,), {}))
    assert shown in str(info.value)
    assert repr(name) in str(info.value)  # the name itself, escaped
    assert name not in registry_of(app)


def test_printable_names_beyond_ascii_are_fine() -> None:
    app = Celery("names", set_as_current=False)
    stoker(app, name="café-poller.ü")(type("Cafe", (Idle,), {}))
    assert "café-poller.ü" in registry_of(app)


def test_text_helpers() -> None:
    assert control_character("ok") is None
    assert control_character("a\x1bb") == (1, "U+001B ESCAPE")
    assert printable("w1@host") == "w1@host"
    assert printable("a\x1b[2J\x07\u202eb") == "a\\x1b[2J\\x07\\u202eb"
    assert printable("\x9b") == "\\x9b"
    assert brief(None) is None
    assert brief("event() raised KeyError: 'x'\nTraceback ...") == "event() raised KeyError: 'x'"
    long = brief("x" * 500)
    assert long is not None and len(long) == BRIEF_LIMIT and long.endswith("...")


@pytest.mark.workers
def test_inspect_broadcasts_the_type_and_first_line_of_an_error(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    node = f"w1@{socket.gethostname()}"
    message = "y" * 300 + "\nsecond line, only for the log"
    fleet = fleets(
        "solo",
        STOKER_TEST_TIMER="0.3",
        STOKER_TEST_RAISE_ON_TIMER=node,
        STOKER_TEST_RAISE_MESSAGE=message,
    )
    worker = fleet.start("w1@%h")
    wait_for(lambda: records.of("timer"), 30, what="a timer that raises")
    operator = Celery("operator", broker=redis_server.url_for(0), set_as_current=False)

    def activator() -> dict[str, Any] | None:
        replies = operator.control.inspect(timeout=2)._request("stoker") or {}
        found = ((replies.get(worker.node) or {}).get("activators") or {}).get("recorder")
        return found if found and found.get("last_error") else None

    error = wait_for(activator, 30, interval=0.2, what="inspect shows the error")["last_error"]
    assert error.startswith("event() raised RuntimeError: yyy"), error
    assert len(error) <= BRIEF_LIMIT and error.endswith("..."), error
    assert "\n" not in error and "second line" not in error and "Traceback" not in error
    # The whole error, traceback included, is in the worker's log.
    log = worker.log()
    assert "second line, only for the log" in log and "Traceback" in log
