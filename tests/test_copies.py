"""The worker's own copy of the last committed state (``copies.py``), without Redis.

A pool process (a real fork) keeps its copy in the worker's private directory,
the main process keeps its own in memory, the newest (by event sequence) wins,
and a new term voids the copies of earlier ones.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

import pytest

from celery_stoker import copies as module
from celery_stoker.copies import StateCopies, StateCopy


@pytest.fixture
def store() -> Iterator[StateCopies]:
    kept = StateCopies()
    kept.claim()
    yield kept
    kept.close()


def copy(seq: int, body: bytes = b"{}") -> StateCopy:
    return StateCopy("application/json", "utf-8", body, version=seq, seq=seq)


def keep_in_child(store: StateCopies, kept: StateCopy) -> None:
    """Keep ``kept`` from a forked process, as a prefork pool process does."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            store.keep("w1@h", "s", kept)
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0


def test_a_pool_process_copy_reaches_the_main_process_through_a_private_file(
    store: StateCopies,
) -> None:
    store.begin_term("w1@h", "s", 1, copy(1, b'{"n": 0}'))
    keep_in_child(store, copy(5, b'{"n": 5}'))
    found = store.last("w1@h", "s")
    assert found is not None and (found.seq, found.body) == (5, b'{"n": 5}')
    folder = module.directory()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in folder.iterdir())
    store.close()
    assert not folder.exists(), "a stopped worker leaves its copies behind"


def test_the_newest_copy_wins_and_a_new_term_voids_older_ones(store: StateCopies) -> None:
    store.begin_term("w1@h", "s", 1, copy(1))
    keep_in_child(store, copy(4))
    store.keep("w1@h", "s", copy(3))  # in memory, older than the file's
    assert store.last("w1@h", "s") == copy(4)
    store.begin_term("w1@h", "s", 10, None)  # nothing stored at the new term's start
    assert store.last("w1@h", "s") is None, "an earlier term's copy was handed on"
    store.keep("w1@h", "s", copy(11))
    assert store.last("w1@h", "s") == copy(11)
    assert store.last("w2@h", "s") is None
