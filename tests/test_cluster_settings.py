"""``stoker_transport_options = {"cluster": True}``: which URLs it accepts and why it refuses.

Pure tests of the settings check, and one client built against a real cluster.
"""

from __future__ import annotations

import pytest
import redis
from celery import Celery

from celery_stoker.connection import redis_client
from celery_stoker.settings import StokerConfigurationError, load_settings
from celery_stoker.testing.redis_cluster import RedisCluster

SECRET = "hunter2-s3cret"


def settings_error(url: str) -> str:
    app = Celery("cluster-settings", broker="amqp://localhost//", set_as_current=False)
    app.conf.update(stoker_url=url, stoker_transport_options={"cluster": True})
    with pytest.raises(StokerConfigurationError) as info:
        load_settings(app.conf)
    return str(info.value)


def test_cluster_with_a_sentinel_url_is_refused_saying_why() -> None:
    text = settings_error(f"sentinel://:{SECRET}@localhost:26379;sentinel://h2:26379")
    assert "stoker_transport_options" in text and "cluster=True" in text
    assert "Sentinel" in text and "any one node" in text
    assert SECRET not in text


@pytest.mark.parametrize("value", ["false", "0", "no", "yes", 1])
def test_cluster_must_be_a_bool(value: object) -> None:
    """``{"cluster": "false"}`` (a string from the environment) turned cluster mode on."""
    app = Celery("cluster-settings", broker="amqp://localhost//", set_as_current=False)
    app.conf.update(stoker_url="redis://h:7000", stoker_transport_options={"cluster": value})
    with pytest.raises(StokerConfigurationError) as info:
        load_settings(app.conf)
    assert f"cluster={value!r}" in str(info.value) and "True" in str(info.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [("unix:///tmp/redis.sock", "redis:// or rediss://"), ("redis://h:7000/2", "database 0")],
)
def test_cluster_needs_a_node_url_on_database_0(url: str, expected: str) -> None:
    assert expected in settings_error(url)


def test_cluster_settings_accept_rediss_and_build_a_cluster_client(
    stoker_redis_cluster: RedisCluster,
) -> None:
    app = Celery("cluster-settings", broker="amqp://localhost//", set_as_current=False)
    app.conf.update(
        stoker_url="rediss://node:7000/0?ssl_cert_reqs=none",
        stoker_transport_options={"cluster": True},
    )
    assert load_settings(app.conf).url.startswith("rediss://")
    app.conf.update(stoker_url=stoker_redis_cluster.url)
    settings = load_settings(app.conf)
    client = redis_client(
        settings.url, transport_options=settings.transport_options, socket_timeout=1.0
    )
    try:
        assert isinstance(client, redis.RedisCluster)
        for n in range(20):  # keys in many slots: the client routes each to its primary
            client.set(f"k{{{n}}}", n)
        assert [int(client.get(f"k{{{n}}}")) for n in range(20)] == list(range(20))
    finally:
        client.close()
