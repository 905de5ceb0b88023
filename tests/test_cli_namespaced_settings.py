"""Settings under a Celery namespace: read under it, and named in errors as the user wrote them.

``app.config_from_object(obj, namespace="CELERY")`` (Django projects do this) makes
the user write ``CELERY_STOKER_LEASE_TTL``; an error saying ``stoker_lease_ttl`` sends
them looking for a name that is nowhere in their settings.  Pure tests: Celery app
objects only, no worker and no Redis.
"""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from celery_stoker.settings import (
    StokerConfigurationError,
    check_limits,
    check_timing,
    load_settings,
    setting_name,
)


@pytest.fixture(autouse=True)
def _no_broker_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CELERY_BROKER_URL", "CELERY_BROKER_WRITE_URL", "CELERY_CONFIG_MODULE"):
        monkeypatch.delenv(name, raising=False)


def namespaced(namespace: str = "CELERY", **settings: Any) -> Celery:
    """An app configured as Django projects do: one object, every key under the namespace."""
    broker_key = f"{namespace}_BROKER_URL"
    broker_key = broker_key.upper() if namespace.isupper() else broker_key.lower()
    config = type("Config", (), {broker_key: "redis://localhost:6379/3"})
    for key, value in settings.items():
        setattr(config, key, value)
    app = Celery("namespaced", set_as_current=False)
    app.config_from_object(config, namespace=namespace)
    return app


def error_of(app: Celery, overrides: dict[str, Any] | None = None) -> str:
    with pytest.raises(StokerConfigurationError) as info:
        load_settings(app.conf, overrides)
    return str(info.value)


def test_values_are_read_under_the_namespace() -> None:
    app = namespaced(
        CELERY_STOKER_URL="redis://other:6379/2",
        CELERY_STOKER_LEASE_TTL=4,
        CELERY_STOKER_RENEW_INTERVAL=1,
        CELERY_STOKER_KEY_PREFIX="acme",
        CELERY_STOKER_STATE_SERIALIZER="pickle",
        CELERY_STOKER_STATE_ALLOW_UNSAFE_SERIALIZER=True,
        CELERY_STOKER_SOFT_TIME_LIMIT=5,
        CELERY_STOKER_TIME_LIMIT=9,
        CELERY_STOKER_STOP_TIMEOUT=3,
    )
    settings = load_settings(app.conf)
    assert settings.url == "redis://other:6379/2"
    assert (settings.lease_ttl, settings.renew_interval) == (4.0, 1.0)
    assert settings.key_prefix == "acme"
    assert settings.state_serializer == "pickle"
    assert (settings.soft_time_limit, settings.time_limit) == (5.0, 9.0)
    assert settings.stop_timeout == 3.0


def test_the_broker_under_the_namespace_is_the_default_stoker_url() -> None:
    assert load_settings(namespaced().conf).url == "redis://localhost:6379/3"


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"CELERY_STOKER_LEASE_TTL": 0}, "CELERY_STOKER_LEASE_TTL=0 is out of range"),
        ({"CELERY_STOKER_LEASE_TTL": "ten"}, "CELERY_STOKER_LEASE_TTL must be a number"),
        ({"CELERY_STOKER_RENEW_INTERVAL": 9}, "CELERY_STOKER_RENEW_INTERVAL=9 is out of range"),
        ({"CELERY_STOKER_KEY_PREFIX": "a b"}, "CELERY_STOKER_KEY_PREFIX='a b' is not a valid"),
        ({"CELERY_STOKER_STATE_SERIALIZER": "nope"}, "CELERY_STOKER_STATE_SERIALIZER='nope'"),
        (
            {"CELERY_STOKER_STATE_SERIALIZER": "pickle"},
            "set CELERY_STOKER_STATE_ALLOW_UNSAFE_SERIALIZER = True",
        ),
        ({"CELERY_STOKER_STOP_TIMEOUT": -1}, "CELERY_STOKER_STOP_TIMEOUT=-1 is out of range"),
        ({"CELERY_STOKER_TIME_LIMIT": 0}, "CELERY_STOKER_TIME_LIMIT=0 is out of range"),
        (
            {"CELERY_STOKER_SOFT_TIME_LIMIT": 9, "CELERY_STOKER_TIME_LIMIT": 5},
            "CELERY_STOKER_SOFT_TIME_LIMIT=9 is greater than CELERY_STOKER_TIME_LIMIT=5",
        ),
        ({"CELERY_STOKER_URL": "http://x"}, "CELERY_STOKER_URL='http://x' is not a Redis URL"),
    ],
)
def test_errors_name_the_setting_as_the_user_wrote_it(settings: dict[str, Any], named: str) -> None:
    assert named in error_of(namespaced(**settings))


def test_a_non_redis_broker_asks_for_the_namespaced_stoker_url() -> None:
    app = namespaced(CELERY_BROKER_URL="amqp://guest@localhost//")
    assert "set CELERY_STOKER_URL = 'redis://" in error_of(app)


def test_a_bad_broker_url_used_as_stoker_url_names_both_as_written() -> None:
    app = namespaced(CELERY_BROKER_URL="redis://localhost:notaport/0")
    assert error_of(app).startswith("CELERY_BROKER_URL (used as CELERY_STOKER_URL): ")


def test_a_lowercase_namespace_is_spelled_lowercase() -> None:
    app = namespaced("celery", celery_stoker_lease_ttl=0)
    assert app.conf.get("broker_url") == "redis://localhost:6379/3"
    assert "celery_stoker_lease_ttl=0 is out of range" in error_of(app)


def test_a_plain_key_written_under_a_namespace_is_named_plainly() -> None:
    # Celery also finds the plain name under a namespace; name what the user wrote.
    app = namespaced(stoker_lease_ttl=0)
    assert error_of(app).startswith("stoker_lease_ttl=0 is out of range")
    assert setting_name(app.conf, "stoker_key_prefix") == "CELERY_STOKER_KEY_PREFIX"


def test_without_a_namespace_the_names_are_the_plain_ones() -> None:
    app = Celery("plain", broker="redis://localhost:6379/3", set_as_current=False)
    app.conf.update(stoker_lease_ttl=0)
    assert error_of(app).startswith("stoker_lease_ttl=0 is out of range")
    assert setting_name({}, "stoker_lease_ttl") == "stoker_lease_ttl"


def test_a_stokers_own_override_keeps_its_own_name() -> None:
    app = namespaced(CELERY_STOKER_LEASE_TTL=4)
    assert error_of(app, {"lease_ttl": 0}).startswith("lease_ttl=0 is out of range")
    assert check_timing(app.conf, {"renew_interval": 1})[:2] == (4.0, 1.0)
    with pytest.raises(StokerConfigurationError, match=r"^CELERY_STOKER_TIME_LIMIT=-2"):
        check_limits(namespaced(CELERY_STOKER_TIME_LIMIT=-2).conf)
