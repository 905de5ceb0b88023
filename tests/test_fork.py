"""A pool process forked while the main process's threads use the per-process resources.

Prefork forks pool processes while the worker's own threads run; the pump warms the
per-process resources up on its thread at the same moment.  A lock held at the fork
stays held for ever in the child: its ``worker_process_init`` never returned, and the
worker's warm shutdown then waited for that child for ever (a real fork here).
"""

from __future__ import annotations

import os
import threading
import time

from celery import Celery

from celery_stoker import Stoker, stoker
from celery_stoker.dispatch import resources, warm_process


def test_a_child_forked_while_the_resources_are_busy_warms_up() -> None:
    app = Celery("forked", set_as_current=False)
    app.conf.stoker_url = "redis://127.0.0.1:9/0"  # nothing listens: warm_process says so

    @stoker(app, name="forked")
    class Forked(Stoker):
        def event(self, state: object, event: str, reason: object) -> object:
            return state

    held, release = threading.Event(), threading.Event()

    def busy() -> None:  # another thread of the parent, inside the resources' lock
        with resources._lock:
            held.set()
            release.wait(10)

    thread = threading.Thread(target=busy, name="test-busy-resources", daemon=True)
    thread.start()
    assert held.wait(5)
    pid = os.fork()
    if pid == 0:  # the child: what worker_process_init runs
        try:
            warm_process(app)
        finally:
            os._exit(0)
    release.set()
    thread.join(5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError("the forked child hung on a lock its parent held at the fork")
