"""The package's version, read from its installed metadata: setup.cfg holds the only literal.

A worker announces it (heartbeats, ``inspect stoker``) so that ``celery stoker
status`` can name each worker's release; one source means a release can never
say two different things about itself.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

#: The distribution's name, as setup.cfg spells it.
DISTRIBUTION = "celery-stoker"
#: What a worker of the one release before workers said their version (0.1.0) is shown
#: as: it announced neither its version nor its app (see ``membership.py``).
UNANNOUNCED = "0.1.0"

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # pragma: no cover - run from a checkout that was never installed
    __version__ = "0+unknown"
