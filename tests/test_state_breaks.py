"""Breaks of issue 23 (state you can trust): the worker's state copies on disk.

Real forked processes and a real TMPDIR; no mocks.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_stoker import copies as module
from celery_stoker.copies import StateCopies


@pytest.fixture
def tmpdir_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A TMPDIR of the test's own, as the worker would see it."""
    base = tmp_path / "tmp"
    base.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    yield base


def test_a_killed_worker_s_copies_are_swept_when_its_pid_comes_back(tmpdir_base: Path) -> None:
    """A container restarted in place (``docker restart``) keeps its /tmp, and its
    worker gets the same pid (1, or 7 under an init) every time.  The copies a
    killed worker left behind (up to one state per Stoker, 10 MB each) carry that
    pid, with another secret: they are of a process that is gone, and must be swept
    like any other, not kept forever because the pid is ours again."""
    leftover = tmpdir_base / f"{module.PREFIX}{os.getpid()}-0123456789abcdef"
    leftover.mkdir(mode=0o700)
    (leftover / "x.state").write_bytes(b"{}\n" + b"x" * 1024)
    kept = StateCopies()
    kept.claim()
    try:
        assert not leftover.exists(), "a dead worker's copies kept because its pid came back"
    finally:
        kept.close()

