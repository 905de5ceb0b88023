"""Small Celery apps the benchmarks run in real ``celery worker`` / ``celery beat`` processes.

Each is configured by environment variables, so one module serves every
variant a benchmark needs (a plain worker and a Stoker worker, a default and a
tuned RedBeat).
"""
