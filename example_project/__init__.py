"""An example Celery project with celery-stoker: ``celery -A example_project worker``.

Celery finds ``app`` here.  The package wires itself: ``app.py`` makes the
app, ``tasks.py`` and ``stokers.py`` register on it, and this file imports
all three.  Python runs it before any module of the package, so workers and
clients (``celery stoker status``) always know the same names, and no module
imports another that imports it back.
"""

from . import stokers, tasks  # register the Stoker and the tasks on the app
from .app import app

__all__ = ["app", "stokers", "tasks"]
