"""celery-stoker benchmarks: failover, dispatch, Redis cost, scale, overhead, beside RedBeat.

Run everything with ``python -m bench.run_all --quick`` (under five minutes) or
``--full`` (the figures BENCHMARKS.md quotes).  Every script starts its own
``redis-server`` on a free port and its own processes, and stops them again.
It is a package, run as modules from the repository root, so that the scripts,
worker and beat processes import ``bench``, the bench apps (``bench.apps.<name>``),
the test apps and :mod:`celery_stoker.testing` without any ``sys.path`` edits.
"""
