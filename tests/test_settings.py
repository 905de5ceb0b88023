"""The ``stoker_*`` settings: defaults, accepted brokers, and a clear error for every bad value.

Pure tests: Celery app objects only, no worker and no Redis.
"""

from __future__ import annotations

import math

import pytest
from celery import Celery
from celery.exceptions import ImproperlyConfigured

from celery_stoker import Stoker, StokerRegistrationError, stoker
from celery_stoker.settings import (
    DEFAULT_KEY_PREFIX,
    DEFAULT_LEASE_TTL,
    StokerConfigurationError,
    load_settings,
)

SECRET = "hunter2-s3cret"


@pytest.fixture(autouse=True)
def _no_broker_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Celery reads these; a developer's shell must not change what the tests see.
    for name in ("CELERY_BROKER_URL", "CELERY_BROKER_WRITE_URL", "CELERY_CONFIG_MODULE"):
        monkeypatch.delenv(name, raising=False)


def make_app(broker: object = "redis://localhost:6379/3", **conf: object) -> Celery:
    app = Celery("stoker-settings-test", broker=broker, set_as_current=False)
    app.conf.update(conf)
    return app


def config_error(app: Celery, overrides: dict[str, object] | None = None) -> str:
    with pytest.raises(StokerConfigurationError) as info:
        load_settings(app.conf, overrides)
    return str(info.value)


# --- defaults and accepted URLs -------------------------------------------------------------


def test_defaults_come_from_a_redis_broker() -> None:
    settings = load_settings(make_app("redis://localhost:6379/3").conf)
    assert settings.url == "redis://localhost:6379/3"
    assert settings.lease_ttl == DEFAULT_LEASE_TTL == 10.0
    assert settings.renew_interval == pytest.approx(10.0 / 3)
    assert settings.key_prefix == DEFAULT_KEY_PREFIX == "stoker"
    assert settings.state_serializer == "json"
    assert dict(settings.transport_options) == {}


def test_renew_interval_defaults_to_a_third_of_a_configured_ttl() -> None:
    settings = load_settings(make_app(stoker_lease_ttl=1.5).conf)
    assert settings.lease_ttl == 1.5
    assert settings.renew_interval == pytest.approx(0.5)


@pytest.mark.parametrize(
    "broker",
    [
        "rediss://:pw@redis.example.com:6380/0?ssl_cert_reqs=required",
        "unix:///var/run/redis/redis.sock?db=2",
        "sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26379;sentinel://10.0.0.3:26379",
        "REDIS://localhost:6379/0",
    ],
)
def test_redis_flavoured_brokers_are_accepted(broker: str) -> None:
    # The scheme is lower-cased (redis-py only reads lower case); the rest is kept.
    scheme, rest = broker.split("://", 1)
    assert load_settings(make_app(broker).conf).url == f"{scheme.lower()}://{rest}"


def test_unix_socket_broker_in_kombu_form_is_accepted() -> None:
    # ``redis+socket://`` is how Celery/kombu spell a Redis broker on a unix socket (the
    # only unix-socket form kombu accepts); it is Redis, so the lease must default to it.
    settings = load_settings(make_app("redis+socket:///var/run/redis/redis.sock").conf)
    assert settings.url.startswith("unix:///var/run/redis/redis.sock")


def test_a_list_of_brokers_uses_the_first() -> None:
    app = make_app(["redis://first:6379/0", "redis://second:6379/0"])
    assert load_settings(app.conf).url == "redis://first:6379/0"


def test_broker_write_url_wins_over_broker_url() -> None:
    app = make_app("amqp://guest@rabbit//", broker_write_url="redis://writer:6379/1")
    assert load_settings(app.conf).url == "redis://writer:6379/1"


def test_stoker_url_wins_over_a_redis_broker() -> None:
    app = make_app("redis://broker:6379/0", stoker_url="redis://elections:6379/5")
    assert load_settings(app.conf).url == "redis://elections:6379/5"


def test_stoker_url_with_a_non_redis_broker() -> None:
    app = make_app("amqp://guest@rabbit//", stoker_url="redis://elections:6379/5")
    assert load_settings(app.conf).url == "redis://elections:6379/5"


def test_transport_options_from_broker_and_stoker_merge_with_stoker_winning() -> None:
    app = make_app(
        "sentinel://10.0.0.1:26379",
        broker_transport_options={"master_name": "broker-master", "visibility_timeout": 60},
        stoker_transport_options={"master_name": "stoker-master"},
    )
    assert dict(load_settings(app.conf).transport_options) == {
        "master_name": "stoker-master",
        "visibility_timeout": 60,
    }


def test_broker_transport_options_are_not_used_for_a_separate_stoker_url() -> None:
    app = make_app(
        "sentinel://10.0.0.1:26379",
        broker_transport_options={"master_name": "broker-master"},
        stoker_url="redis://elections:6379/0",
    )
    assert dict(load_settings(app.conf).transport_options) == {}


def test_edges_of_the_allowed_ranges_are_accepted() -> None:
    low = load_settings(make_app(stoker_lease_ttl=0.2, stoker_renew_interval=0.099).conf)
    assert (low.lease_ttl, low.renew_interval) == (0.2, 0.099)
    high = load_settings(make_app(stoker_lease_ttl=3600).conf)
    assert high.lease_ttl == 3600.0
    prefix = load_settings(make_app(stoker_key_prefix="a" * 64).conf)
    assert prefix.key_prefix == "a" * 64
    symbols = load_settings(make_app(stoker_key_prefix="my-app_1.prod:x/y").conf)
    assert symbols.key_prefix == "my-app_1.prod:x/y"


def test_settings_helpers() -> None:
    settings = load_settings(
        make_app(
            f"redis://user:{SECRET}@h:6379/0", stoker_lease_ttl=3, stoker_renew_interval=0.6
        ).conf
    )
    assert settings.masked_url == "redis://user:***@h:6379/0"
    assert settings.socket_timeout == pytest.approx((3 - 0.6) / 5)
    tiny = load_settings(make_app(stoker_lease_ttl=0.2, stoker_renew_interval=0.09).conf)
    assert tiny.socket_timeout == pytest.approx(0.05)  # never below 50 ms


@pytest.mark.parametrize("serializer", ["json", "msgpack", "yaml"])
def test_state_serializer_may_be_any_registered_kombu_serializer(serializer: str) -> None:
    assert load_settings(make_app(stoker_state_serializer=serializer).conf).state_serializer == (
        serializer
    )


def test_pickle_needs_the_opt_in_naming_both_settings_and_why() -> None:
    message = config_error(make_app(stoker_state_serializer="pickle"))
    assert "stoker_state_serializer='pickle' can run code when it decodes" in message
    assert "stoker_state_allow_unsafe_serializer = True" in message
    assert "anyone who can write to the Stoker Redis" in message
    message = config_error(
        make_app(stoker_state_serializer="pickle", stoker_state_allow_unsafe_serializer=False)
    )
    assert "stoker_state_allow_unsafe_serializer" in message
    allowed = make_app(stoker_state_serializer="pickle", stoker_state_allow_unsafe_serializer=True)
    assert load_settings(allowed.conf).state_serializer == "pickle"


def test_a_serializer_registered_with_pickles_content_type_needs_the_opt_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kombu.serialization import registry

    # Registered as kombu's register() would, without its unregister(): that drops the
    # decoder of the content type, pickle's own, for the rest of the process.
    monkeypatch.setitem(registry._encoders, "pickle2", registry._encoders["pickle"])
    message = config_error(make_app(stoker_state_serializer="pickle2"))
    assert "stoker_state_serializer='pickle2' can run code" in message


@pytest.mark.parametrize("value", ["true", "false", 1, 0, "yes"])
def test_the_opt_in_must_be_a_bool(value: object) -> None:
    message = config_error(
        make_app(stoker_state_serializer="json", stoker_state_allow_unsafe_serializer=value)
    )
    assert f"stoker_state_allow_unsafe_serializer={value!r} must be True or False" in message


# --- a broker that is not Redis -------------------------------------------------------------


@pytest.mark.parametrize("broker", ["amqp://guest@localhost//", "sqs://", "memory://"])
def test_non_redis_broker_without_stoker_url_names_stoker_url(broker: str) -> None:
    message = config_error(make_app(broker))
    assert "stoker_url" in message
    assert "not Redis" in message


def test_celery_default_broker_without_stoker_url_names_stoker_url() -> None:
    app = Celery("no-broker", set_as_current=False)
    assert "stoker_url" in config_error(app)


def test_configuration_error_is_celery_improperly_configured() -> None:
    with pytest.raises(ImproperlyConfigured):
        load_settings(make_app("amqp://guest@localhost//").conf)


@pytest.mark.parametrize(
    "stoker_url", ["amqp://guest@rabbit//", "http://redis.example.com", "localhost:6379"]
)
def test_stoker_url_that_is_not_redis_names_stoker_url(stoker_url: str) -> None:
    message = config_error(make_app(stoker_url=stoker_url))
    assert message.startswith("stoker_url=")
    assert "not a Redis URL" in message


# --- every bad value names the setting and the value ----------------------------------------


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0, "0"),
        (-1, "-1"),
        (0.1, "0.1"),
        (10000, "10000"),
        ("ten", "'ten'"),
        ("10", "'10'"),
        (True, "True"),
        (math.nan, "nan"),
        (math.inf, "inf"),
        ([10], "[10]"),
    ],
)
def test_bad_lease_ttl(value: object, shown: str) -> None:
    message = config_error(make_app(stoker_lease_ttl=value))
    assert "stoker_lease_ttl" in message
    assert shown in message
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        assert "between 0.2 and 3600 seconds" in message  # and the allowed range


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (5, "5"),  # exactly ttl / 2
        (6, "6"),
        (10, "10"),
        (0, "0"),
        (-1, "-1"),
        ("3", "'3'"),
        (False, "False"),
        (math.nan, "nan"),
    ],
)
def test_bad_renew_interval(value: object, shown: str) -> None:
    message = config_error(make_app(stoker_lease_ttl=10, stoker_renew_interval=value))
    assert "stoker_renew_interval" in message
    assert shown in message


def test_renew_interval_error_names_the_allowed_range() -> None:
    message = config_error(make_app(stoker_lease_ttl=2, stoker_renew_interval=1))
    assert "stoker_renew_interval=1" in message
    assert "half the lease TTL" in message
    assert "1 s" in message  # 2 s / 2


@pytest.mark.parametrize(
    "value", ["has space", "tab\there", "x" * 65, "brace{x}", "star*", "ünïcode", 123, ["a"]]
)
def test_bad_key_prefix(value: object) -> None:
    message = config_error(make_app(stoker_key_prefix=value))
    assert "stoker_key_prefix" in message
    assert repr(value) in message


def test_empty_key_prefix_is_an_error_not_a_silent_default() -> None:
    # An explicit '' is a bad value like any other; only an unset prefix means the default.
    message = config_error(make_app(stoker_key_prefix=""))
    assert "stoker_key_prefix" in message
    assert "''" in message


def test_unknown_state_serializer() -> None:
    message = config_error(make_app(stoker_state_serializer="no-such-format"))
    assert "stoker_state_serializer" in message
    assert "'no-such-format'" in message


def test_unknown_override_key_is_named() -> None:
    message = config_error(make_app(), {"lease_tll": 5})
    assert "lease_tll" in message
    assert "lease_ttl" in message  # and says what is allowed


# --- a Stoker's overrides -------------------------------------------------------------------


def test_overrides_take_precedence() -> None:
    app = make_app(stoker_lease_ttl=30, stoker_renew_interval=10, stoker_key_prefix="conf")
    settings = load_settings(
        app.conf, {"lease_ttl": 2, "renew_interval": 0.5, "key_prefix": "override"}
    )
    assert (settings.lease_ttl, settings.renew_interval, settings.key_prefix) == (
        2.0,
        0.5,
        "override",
    )


def test_overridden_ttl_gives_a_default_renew_of_a_third() -> None:
    settings = load_settings(make_app().conf, {"lease_ttl": 3})
    assert settings.renew_interval == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("overrides", "name", "shown"),
    [
        ({"lease_ttl": 0}, "lease_ttl", "0"),
        ({"lease_ttl": "fast"}, "lease_ttl", "'fast'"),
        ({"lease_ttl": 2, "renew_interval": 1}, "renew_interval", "1"),
        ({"renew_interval": -3}, "renew_interval", "-3"),
        ({"key_prefix": "two words"}, "key_prefix", "'two words'"),
    ],
)
def test_override_errors_use_the_override_name(
    overrides: dict[str, object], name: str, shown: str
) -> None:
    message = config_error(make_app(), overrides)
    assert message.startswith((f"{name}=", f"{name} "))
    assert f"stoker_{name}" not in message
    assert shown in message


def test_conf_renew_interval_that_an_overridden_ttl_makes_invalid_is_named_as_conf() -> None:
    message = config_error(make_app(stoker_renew_interval=3), {"lease_ttl": 2})
    assert message.startswith("stoker_renew_interval=3")


# --- a password never appears in an error ---------------------------------------------------


@pytest.mark.parametrize(
    ("conf", "overrides"),
    [
        ({"broker_url": f"amqp://user:{SECRET}@rabbit:5672//"}, None),
        ({"broker_url": f"amqp://user:{SECRET}@r1//;amqp://user:{SECRET}@r2//"}, None),
        ({"broker_url": [f"amqp://user:{SECRET}@r1//", "amqp://r2//"]}, None),
        ({"stoker_url": f"http://user:{SECRET}@redis.example.com/"}, None),
        ({"stoker_url": f"memory://:{SECRET}@x/"}, None),
    ],
)
def test_password_is_masked_in_url_errors(
    conf: dict[str, object], overrides: dict[str, object] | None
) -> None:
    app = Celery("pw", set_as_current=False)
    app.conf.update(conf)
    message = config_error(app, overrides)
    assert SECRET not in message
    assert "***" in message


@pytest.mark.parametrize(
    "conf",
    [
        {"stoker_lease_ttl": "ten"},
        {"stoker_lease_ttl": 0},
        {"stoker_renew_interval": 9},
        {"stoker_key_prefix": "bad prefix"},
        {"stoker_state_serializer": "nope"},
    ],
)
def test_password_of_a_redis_broker_never_appears_in_value_errors(conf: dict[str, object]) -> None:
    message = config_error(make_app(f"redis://default:{SECRET}@redis:6379/0", **conf))
    assert SECRET not in message


# --------------------------------------------------------------- time limits


@pytest.mark.parametrize(
    ("value", "shown"),
    [(-1, "-1"), (0, "0"), (math.nan, "nan"), ("30", "'30'"), (True, "True"), (math.inf, "inf")],
)
@pytest.mark.parametrize("key", ["soft_time_limit", "time_limit"])
def test_bad_time_limit_is_named_at_start_and_at_import(
    key: str, value: object, shown: str
) -> None:
    with pytest.raises(StokerConfigurationError, match=f"stoker_{key}"):
        load_settings({"broker_url": "redis://h", f"stoker_{key}": value})
    app = Celery("limits")
    with pytest.raises(StokerRegistrationError, match=rf"@stoker\('bad'\): {key}") as info:

        @stoker(app, name="bad", **{key: value})
        class Bad(Stoker):
            def event(self, state: object, event: str, reason: object) -> object:
                return state

    assert shown in str(info.value)


def test_soft_limit_above_hard_limit_is_refused() -> None:
    with pytest.raises(StokerConfigurationError, match="soft limit must come first"):
        load_settings(
            {"broker_url": "redis://h", "stoker_soft_time_limit": 10, "stoker_time_limit": 5}
        )
    app = Celery("limits")
    with pytest.raises(StokerRegistrationError, match="soft_time_limit=10 is greater than"):

        @stoker(app, name="inverted", soft_time_limit=10, time_limit=5)
        class Inverted(Stoker):
            def event(self, state: object, event: str, reason: object) -> object:
                return state


def test_time_limits_default_to_none_and_overrides_win() -> None:
    conf = {"broker_url": "redis://h", "stoker_soft_time_limit": 5, "stoker_time_limit": 10}
    assert load_settings({"broker_url": "redis://h"}).time_limit is None
    settings = load_settings(conf, {"time_limit": 20})
    assert (settings.soft_time_limit, settings.time_limit) == (5.0, 20.0)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "3", math.nan])
def test_bad_max_failures_is_an_error_at_import(value: object) -> None:
    app = Celery("failures")
    with pytest.raises(StokerRegistrationError, match=r"max_failures=.* whole number >= 1"):

        @stoker(app, name="x", max_failures=value)  # type: ignore[arg-type]
        class X(Stoker):
            def event(self, state: object, event: str, reason: object) -> object:
                return state


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "3", 1001])
def test_a_bad_weight_is_an_error_at_import(value: object) -> None:
    app = Celery("weights")
    with pytest.raises(StokerRegistrationError, match=r"weight=.* whole number from 1 to 1000"):

        @stoker(app, name="x", weight=value)  # type: ignore[arg-type]
        class X(Stoker):
            def event(self, state: object, event: str, reason: object) -> object:
                return state


def test_a_weight_is_kept_on_the_spec() -> None:
    from celery_stoker.registry import registry_of

    app = Celery("weights")

    @stoker(app, name="heavy", weight=3)
    class Heavy(Stoker):
        def event(self, state: object, event: str, reason: object) -> object:
            return state

    @stoker(app, name="light")
    class Light(Stoker):
        def event(self, state: object, event: str, reason: object) -> object:
            return state

    assert (registry_of(app)["heavy"].weight, registry_of(app)["light"].weight) == (3, 1)


@pytest.mark.parametrize("value", ["false", 0, 1, None])
def test_stoker_balance_is_a_bool(value: object) -> None:
    from celery_stoker.settings import check_balance

    if value is None:
        assert check_balance({}) is True  # the default: spread
        assert check_balance({"stoker_balance": False}) is False
        return
    with pytest.raises(StokerConfigurationError, match=r"stoker_balance=.* must be True"):
        check_balance({"stoker_balance": value})


@pytest.mark.parametrize("value", [0, -2, "10", math.nan])
def test_bad_stop_timeout(value: object) -> None:
    with pytest.raises(StokerConfigurationError, match="stoker_stop_timeout"):
        load_settings({"broker_url": "redis://h", "stoker_stop_timeout": value})
