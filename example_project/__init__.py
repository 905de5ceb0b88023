"""An example Celery project with celery-stoker: ``celery -A example_project worker``.

Celery finds ``app`` here; the modules that define tasks and Stokers are
imported by ``app.py`` so that workers and clients (``celery stoker status``)
know the same names.
"""

from .app import app

__all__ = ["app"]
