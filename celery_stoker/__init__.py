"""celery-stoker: exactly one of these, somewhere, always, inside a Celery worker fleet.

Public names only; see README.md for the quick start.
"""

from .bootstep import StokerStep
from .control import dump, whereis
from .settings import StokerConfigurationError, StokerSettings
from .stoker import EVENTS, Stoker, StokerContext, StokerRegistrationError, stoker

__all__ = [
    "EVENTS",
    "Stoker",
    "StokerConfigurationError",
    "StokerContext",
    "StokerRegistrationError",
    "StokerSettings",
    "StokerStep",
    "dump",
    "stoker",
    "whereis",
]

__version__ = "0.1.0"
