"""celery-stoker: exactly one of these, somewhere, always, inside a Celery worker fleet.

Public names only; see README.md for the quick start.
"""

from ._version import __version__
from .bootstep import StokerStep
from .control import StokerOperationError, drain, dump, handoff, undrain, whereis
from .registry import StokerRegistrationError, WorkerInfo, consuming, stoker
from .settings import StokerConfigurationError, StokerSettings
from .stoker import EVENTS, Stoker, StokerContext

__all__ = [
    "EVENTS",
    "Stoker",
    "StokerConfigurationError",
    "StokerContext",
    "StokerOperationError",
    "StokerRegistrationError",
    "StokerSettings",
    "StokerStep",
    "WorkerInfo",
    "__version__",
    "consuming",
    "drain",
    "dump",
    "handoff",
    "stoker",
    "undrain",
    "whereis",
]
