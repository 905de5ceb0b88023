"""Celery's views of the configuration mask the URLs of the ``stoker_*`` settings too.

``celery inspect conf``, ``celery report``, ``conf.table()`` and
``conf.humanize()`` mask only the setting names Celery knows:
:func:`install_conf_masking` (run when this module is imported, which
``settings.py`` and so ``import celery_stoker`` do) makes them mask the
passwords in ours too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .connection import mask_url


def _mask_value(value: Any) -> Any:
    """``value`` with every URL's password masked, inside mappings and lists too."""
    if isinstance(value, str):
        return mask_url(value) if "://" in value else value
    if isinstance(value, Mapping):
        return {key: _mask_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_mask_value(item) for item in value)
    return value


def install_conf_masking() -> None:
    """Make Celery's views of the configuration mask the passwords of ``stoker_*`` settings.

    Celery masks what its ``HIDDEN_SETTINGS`` pattern names (``*PASS*``, ``*KEY*``, ...)
    and the broker and backend URLs, and nothing else: ``stoker_url`` would show
    its password in ``celery inspect conf`` and ``celery report`` beside a masked
    ``broker_url``.  So ``celery.app.utils.filter_hidden_settings``, which
    ``Settings.table()`` and ``humanize()`` (and so both commands) look up at each
    call, is wrapped: Celery's own rules run first, unchanged, then every setting
    whose name holds ``stoker_`` (``CELERY_STOKER_URL`` under a namespace too) has
    the URLs in its value masked with :func:`~celery_stoker.connection.mask_url`.
    Passwords under a key of ``stoker_transport_options`` (``password``,
    ``sentinel_kwargs={"password": ...}``) are already masked by Celery's rules.
    Process-wide and idempotent: a second call changes nothing.
    """
    from celery.app import utils

    original: Callable[[Any], Any] = utils.filter_hidden_settings
    if getattr(original, "stoker_masks", False):
        return

    def filter_hidden_settings(conf: Any) -> Any:
        filtered = original(conf)
        return {
            key: _mask_value(value) if isinstance(key, str) and "stoker_" in key.lower() else value
            for key, value in filtered.items()
        }

    filter_hidden_settings.stoker_masks = True  # type: ignore[attr-defined]
    filter_hidden_settings.__wrapped__ = original  # type: ignore[attr-defined]
    filter_hidden_settings.__doc__ = original.__doc__
    utils.filter_hidden_settings = filter_hidden_settings


# Any app that uses the package imports this module (``import celery_stoker`` does,
# and no part of the package can be imported without that): masked from the start.
install_conf_masking()
