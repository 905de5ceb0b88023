"""``support.redis_server`` is :mod:`celery_stoker.testing.redis_server`, the one launcher.

The module itself stands here, not a copy of its names: a test that monkeypatches
``support.redis_server.free_port`` (tests/test_support.py) patches what ``RedisServer``
really calls.
"""

from __future__ import annotations

import sys

from celery_stoker.testing import redis_server

sys.modules[__name__] = redis_server
