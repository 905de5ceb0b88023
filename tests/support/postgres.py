"""A PostgreSQL database of the test's own on the machine's server, and the ORM pointed at it.

The server is the machine's (127.0.0.1:5432, user ``postgres``, trust auth;
``STOKER_TEST_PG_HOST`` / ``_PORT`` / ``_USER`` / ``_PASSWORD`` say otherwise).
Each :class:`PostgresDatabase` has a unique name and is dropped at close, with
any connection still in it.  :func:`postgres_or_skip` skips a test, with the
reason, where Django, django-celery-beat or psycopg is missing or no server
answers.

:func:`use_orm` sets Django up in the test process itself (``settings.configure``,
never ``DJANGO_SETTINGS_MODULE``: worker processes started later by other
tests inherit the environment, and Celery would install its Django fix-up in
them), with the models example_django and django-celery-beat define.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest

from support.workers import ROOT

HOST = os.environ.get("STOKER_TEST_PG_HOST", "127.0.0.1")
PORT = int(os.environ.get("STOKER_TEST_PG_PORT", "5432"))
USER = os.environ.get("STOKER_TEST_PG_USER", "postgres")
PASSWORD = os.environ.get("STOKER_TEST_PG_PASSWORD", "")


def _connect(dbname: str = "postgres") -> Any:
    import psycopg

    return psycopg.connect(
        host=HOST,
        port=PORT,
        user=USER,
        password=PASSWORD,
        dbname=dbname,
        connect_timeout=3,
        autocommit=True,
    )


def postgres_or_skip() -> None:
    """Skip the calling test, saying why, unless Django and a PostgreSQL server are here."""
    for module in ("django", "django_celery_beat", "psycopg"):
        pytest.importorskip(
            module, reason=f"{module} is not installed: pip install -e '.[test]' brings it"
        )
    try:
        _connect().close()
    except Exception as exc:
        pytest.skip(
            f"no PostgreSQL answers at {USER}@{HOST}:{PORT} ({exc.__class__.__name__}: "
            f"{str(exc).strip()[:200]}); start one, or point STOKER_TEST_PG_HOST/_PORT/_USER at "
            "one where this user may create databases"
        )


class PostgresDatabase:
    """One database with a unique name: created empty, migrated on demand, dropped at close."""

    def __init__(self) -> None:
        self.name = f"stoker_test_{uuid.uuid4().hex[:12]}"
        with _connect() as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')

    def env(self) -> dict[str, str]:
        """example_django's settings for this database."""
        return {
            "EXAMPLE_DB_NAME": self.name,
            "EXAMPLE_DB_HOST": HOST,
            "EXAMPLE_DB_PORT": str(PORT),
            "EXAMPLE_DB_USER": USER,
            "EXAMPLE_DB_PASSWORD": PASSWORD,
        }

    def migrate(self) -> None:
        """``manage.py migrate``, as the example's README runs it."""
        out = subprocess.run(
            [sys.executable, "example_django/manage.py", "migrate", "-v", "0"],
            cwd=ROOT,
            env={**os.environ, **self.env(), "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stdout + out.stderr

    def execute(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """One statement on a connection of its own (autocommit); its rows, if any."""
        with _connect(self.name) as conn:
            cursor = conn.execute(sql, params or None)
            return list(cursor.fetchall()) if cursor.description else []

    def connect(self) -> Any:
        """A connection of the test's own (autocommit), e.g. to hold a row lock."""
        return _connect(self.name)

    def refuse_connections(self, refuse: bool = True) -> None:
        """The server refuses (or accepts again) connections to this database, ending those open.

        As a database that went away looks to its clients: every query fails,
        every new connection is refused, and the rest of the server is untouched.
        """
        with _connect() as conn:
            conn.execute(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS {not refuse}')
            if refuse:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (self.name,),
                )

    def close(self) -> None:
        with contextlib.suppress(Exception), _connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def use_orm(db: PostgresDatabase | None = None) -> None:
    """Point this process's Django ORM at ``db`` (set Django up on the first call).

    Without ``db``, Django is set up (models importable) and nothing is connected.
    """
    import django
    from django.conf import settings

    database = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": db.name if db is not None else "not_connected",
        "HOST": HOST,
        "PORT": str(PORT),
        "USER": USER,
        "PASSWORD": PASSWORD,
    }
    if not settings.configured:
        settings.configure(
            DATABASES={"default": database},
            INSTALLED_APPS=[
                "django.contrib.contenttypes",
                "django.contrib.auth",
                "django_celery_beat",
                "example_django.heartbeat",
            ],
            USE_TZ=True,
            TIME_ZONE="UTC",
            DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        )
        django.setup()
        return
    from django.db import connections

    connections.close_all()
    connections["default"].settings_dict.update(database)
    settings.DATABASES["default"].update(database)


def release_orm() -> None:
    """Close this process's ORM connections (before the database is dropped)."""
    if "django.db" in sys.modules:
        from django.db import connections

        connections.close_all()
