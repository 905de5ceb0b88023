"""The HEALTH column of ``celery stoker status``: pure logic over dump()'s view."""

from __future__ import annotations

from celery_stoker.cli import health


def test_ok_when_nothing_is_wrong() -> None:
    view = {"workers": {"w1@h": {"health": {"status": "ok", "error": None}}}}
    assert health(view) == "ok"


def test_a_fault_names_the_worker_and_the_short_cause() -> None:
    cause = "ResponseError: NOPERM this user has no permissions to run the 'evalsha' command"
    view = {
        "workers": {
            "w1@h": {"health": {"status": "ok", "error": None}},
            "w2@h": {"health": {"status": "error", "error": cause}},
        }
    }
    cell = health(view)
    assert cell.startswith("error on w2@h: ResponseError: NOPERM") and len(cell) < 90


def test_an_event_running_over_a_minute_shows_with_its_age() -> None:
    view = {"workers": {"w1@h": {"running_event": {"event": "timer", "running_for": 75.2}}}}
    assert health(view) == "timer running 75s on w1@h"
    view["workers"]["w1@h"]["running_event"]["running_for"] = 3.0
    assert health(view) == "ok"


def test_last_callback_error_still_shows() -> None:
    assert health({"last_error": "event() raised KeyError"}) == "error"
