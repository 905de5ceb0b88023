"""celery-stoker benchmarks: failover, dispatch, Redis cost, scale, overhead, beside RedBeat.

Run everything with ``python bench/run_all.py --quick`` (under five minutes) or
``--full`` (the figures BENCHMARKS.md quotes).  Every script starts its own
``redis-server`` on a free port and its own processes, and stops them again.
This is a package only so that worker and beat processes can import the
bench apps as ``bench.apps.<name>``.
"""
