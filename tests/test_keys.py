"""The wire protocol: the docs' list of Redis keys is the code's; channel messages round-trip."""

from __future__ import annotations

import re
from pathlib import Path

from celery_stoker import keys

ROOT = Path(__file__).resolve().parents[1]


def _documented_keys() -> set[str]:
    page = (ROOT / "docs" / "redis.md").read_text()
    section = page[page.index("## Redis keys") :]
    section = section.split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([^`]+)` \|", section, re.M))


def _code_keys() -> set[str]:
    name, host, prefix = "{name}", "<hostname>", "stoker"
    found = set()
    for attr in dir(keys):
        fn = getattr(keys, attr)
        if not callable(fn) or not (attr.endswith("_key") or attr.endswith("_channel")):
            continue
        params = fn.__code__.co_varnames[: fn.__code__.co_argcount]
        args = {"prefix": prefix, "name": "name", "hostname": host}
        found.add(fn(*[args[p] for p in params]).replace("{name}", name))
    return found


def test_the_docs_list_exactly_the_keys_the_code_builds() -> None:
    assert _documented_keys() == _code_keys()


def test_every_stoker_key_shares_its_hash_tag() -> None:
    for attr in (
        "lease_key",
        "token_key",
        "state_key",
        "info_key",
        "transitions_key",
        "closing_key",
        "handoff_key",
        "waiters_key",
        "stoker_draining_key",
        "stoker_channel",
    ):
        assert getattr(keys, attr)("p", "a.b").startswith("p:{a.b}:"), attr


def test_a_workers_report_lists_share_one_slot_whatever_the_prefix() -> None:
    from redis.cluster import key_slot

    slots = {key_slot(keys.reports_key(p, "w1@host").encode()) for p in ("a", "stoker", "b.c")}
    assert len(slots) == 1


def test_channel_messages_round_trip() -> None:
    text = keys.message(keys.RELEASED, "poller", 0, "w2@host")
    assert text == "released 0 poller w2@host"
    assert keys.parse_message(text.encode()) == ("released", 0, "poller", "w2@host")
    assert keys.parse_message("renewed 3000 poller") == ("renewed", 3000, "poller", "")
    assert keys.parse_message("acquired 3000 poller w1@h 2") == (
        "acquired",
        3000,
        "poller",
        "w1@h 2",
    )
    assert keys.parse_message("garbage") is None
    assert keys.parse_message("renewed soon poller") is None
