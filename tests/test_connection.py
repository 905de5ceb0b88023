"""URLs to Redis clients (including a real Sentinel group) and password masking."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis

from celery_stoker.connection import is_redis_url, mask_url, redis_client, url_scheme
from celery_stoker.testing import RedisSentinel, RedisServer, free_port

SECRET = "hunter2-s3cret"


# --- mask_url ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (f"redis://user:{SECRET}@h:6379/0", "redis://user:***@h:6379/0"),
        (f"redis://:{SECRET}@h:6379/0", "redis://:***@h:6379/0"),
        (f"redis://:{SECRET}@h", "redis://:***@h"),
        (
            f"rediss://default:{SECRET}@h:6380/0?ssl_cert_reqs=none",
            "rediss://default:***@h:6380/0?ssl_cert_reqs=none",
        ),
        (
            f"sentinel://:{SECRET}@h1:26379;sentinel://:{SECRET}@h2:26379/1",
            "sentinel://:***@h1:26379;sentinel://:***@h2:26379/1",
        ),
        (
            f"sentinel://u:{SECRET}@h1;sentinel://h2;sentinel://u:{SECRET}@h3",
            "sentinel://u:***@h1;sentinel://h2;sentinel://u:***@h3",
        ),
        (f"redis://h:6379/0?password={SECRET}&db=1", "redis://h:6379/0?password=***&db=1"),
        (f"redis://h:6379/0?db=1&password={SECRET}", "redis://h:6379/0?db=1&password=***"),
        (f"unix:///tmp/r.sock?db=2&password={SECRET}", "unix:///tmp/r.sock?db=2&password=***"),
        (f"redis://u:{SECRET}@h/0?password={SECRET}", "redis://u:***@h/0?password=***"),
        (f"amqp://guest:{SECRET}@rabbit:5672//", "amqp://guest:***@rabbit:5672//"),
        ("redis://:p%40ss%3Bw@h:6379/0", "redis://:***@h:6379/0"),
    ],
)
def test_mask_url_hides_the_password(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert SECRET not in mask_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:6379/0",
        "redis://user@h:6379/0",
        "unix:///var/run/redis.sock?db=3",
        "sentinel://h1:26379;sentinel://h2:26379",
    ],
)
def test_mask_url_leaves_urls_without_a_password_alone(url: str) -> None:
    assert mask_url(url) == url


@pytest.mark.parametrize("url", [None, ""])
def test_mask_url_of_nothing(url: str | None) -> None:
    assert mask_url(url) == str(url)


@pytest.mark.parametrize(
    ("password", "masked"),
    [
        # Both are accepted as written by redis-py (urllib splits userinfo at the *last* '@'
        # and does not treat ';' specially), so mask_url must hide them whole.
        ("p@ss-word", "redis://:***@h:6379/0"),
        ("pa;ss-word", "redis://:***@h:6379/0"),
    ],
)
def test_mask_url_hides_unencoded_special_characters(password: str, masked: str) -> None:
    url = f"redis://:{password}@h:6379/0"
    assert redis.Redis.from_url(url).connection_pool.connection_kwargs["password"] == password
    assert mask_url(url) == masked


# --- schemes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "scheme", "is_redis"),
    [
        ("redis://h", "redis", True),
        ("REDISS://h", "rediss", True),
        ("unix:///tmp/s.sock", "unix", True),
        ("sentinel://h:26379", "sentinel", True),
        ("amqp://guest@h//", "amqp", False),
        ("localhost:6379", "", False),
    ],
)
def test_scheme_detection(url: str, scheme: str, is_redis: bool) -> None:
    assert url_scheme(url) == scheme
    assert is_redis_url(url) is is_redis


def test_non_redis_url_is_refused_with_a_masked_message() -> None:
    with pytest.raises(ValueError) as info:
        redis_client(f"amqp://guest:{SECRET}@rabbit//")
    assert "not a Redis URL" in str(info.value)
    assert SECRET not in str(info.value)


def test_timeouts_reach_the_connection_pool() -> None:
    client = redis_client("redis://127.0.0.1:1/4", socket_timeout=0.3)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 0.3
    assert kwargs["socket_connect_timeout"] == 0.3
    assert kwargs["db"] == 4
    other = redis_client("redis://127.0.0.1:1/0", socket_timeout=0.3, socket_connect_timeout=2)
    assert other.connection_pool.connection_kwargs["socket_connect_timeout"] == 2


# --- sentinel ---------------------------------------------------------------------------------


def test_sentinel_url_without_master_name_is_a_clear_error() -> None:
    url = f"sentinel://:{SECRET}@10.0.0.1:26379;sentinel://:{SECRET}@10.0.0.2:26379"
    for options in (None, {}, {"master_name": ""}):
        with pytest.raises(ValueError) as info:
            redis_client(url, transport_options=options)
        message = str(info.value)
        assert "master_name" in message
        assert "stoker_transport_options" in message
        assert SECRET not in message


def test_sentinel_url_resolves_the_master(redis_server: RedisServer) -> None:
    with RedisSentinel(redis_server.port) as sentinel:
        url = f"sentinel://127.0.0.1:{sentinel.port};sentinel://127.0.0.1:{sentinel.port}/3"
        client = redis_client(url, transport_options={"master_name": "mymaster"}, socket_timeout=2)
        client.set("stoker-test:via-sentinel", b"yes")
        client.close()
    assert redis_server.client(db=3).get("stoker-test:via-sentinel") == b"yes"
    assert redis_server.client(db=0).get("stoker-test:via-sentinel") is None


def test_a_dead_sentinel_in_the_list_costs_no_more_than_a_timeout(
    redis_server: RedisServer,
) -> None:
    """One sentinel of the group down (refusing connections) must not stall every lookup.

    redis_client promises that ``socket_timeout`` bounds a command; a master lookup that
    first asks a dead sentinel should move on to the next one at once.
    """
    with RedisSentinel(redis_server.port) as sentinel:
        dead = free_port()
        url = f"sentinel://127.0.0.1:{dead};sentinel://127.0.0.1:{sentinel.port}/0"
        client = redis_client(
            url, transport_options={"master_name": "mymaster"}, socket_timeout=0.5
        )
        started = time.monotonic()
        assert client.ping() is True
        took = time.monotonic() - started
        client.close()
    assert took < 1.5, f"resolving the master past one dead sentinel took {took:.2f} s"


def test_sentinel_url_password_is_used_for_the_master(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    server = make_redis_server(password=SECRET)
    with RedisSentinel(server.port, master_password=SECRET) as sentinel:
        options = {"master_name": "mymaster"}
        good = redis_client(
            f"sentinel://:{SECRET}@127.0.0.1:{sentinel.port}/0",
            transport_options=options,
            socket_timeout=2,
        )
        assert good.ping() is True
        bad = redis_client(
            f"sentinel://:wrong@127.0.0.1:{sentinel.port}/0",
            transport_options=options,
            socket_timeout=2,
        )
        with pytest.raises(redis.AuthenticationError):
            bad.ping()
        good.close()
        bad.close()
