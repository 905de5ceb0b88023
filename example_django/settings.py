"""Django settings: PostgreSQL, django-celery-beat, and Celery's settings under ``CELERY_``.

Everything that differs between a laptop and a test comes from the environment:

* ``EXAMPLE_DB_NAME`` / ``EXAMPLE_DB_HOST`` / ``EXAMPLE_DB_PORT`` / ``EXAMPLE_DB_USER`` /
  ``EXAMPLE_DB_PASSWORD``: the PostgreSQL database (default ``example_django`` on
  127.0.0.1:5432 as ``postgres``);
* ``EXAMPLE_BROKER_URL``: the Redis broker, which also holds the lease (default
  ``redis://localhost:6379/0``);
* ``EXAMPLE_LEASE_TTL``: seconds a crashed leader keeps beat (default 10).
"""

from __future__ import annotations

import os

SECRET_KEY = os.environ.get("EXAMPLE_SECRET_KEY", "example-django-not-a-secret")
DEBUG = True
ALLOWED_HOSTS = ["localhost", "127.0.0.1"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_beat",
    "example_django.heartbeat",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "example_django.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
STATIC_URL = "static/"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",  # psycopg 3 (celery-stoker[django])
        "NAME": os.environ.get("EXAMPLE_DB_NAME", "example_django"),
        "HOST": os.environ.get("EXAMPLE_DB_HOST", "127.0.0.1"),
        "PORT": os.environ.get("EXAMPLE_DB_PORT", "5432"),
        "USER": os.environ.get("EXAMPLE_DB_USER", "postgres"),
        "PASSWORD": os.environ.get("EXAMPLE_DB_PASSWORD", ""),
        # The beat thread asks the database at every tick: keep its connection
        # (a minute), and test it before use, so a connection the server dropped
        # is replaced instead of failing a tick.
        "CONN_MAX_AGE": 60,
        "CONN_HEALTH_CHECKS": True,
        # A database that stops answering must fail a connect, not hang the beat thread.
        "OPTIONS": {"connect_timeout": 5},
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"

# Celery, read by celery_app.py with namespace="CELERY".
CELERY_BROKER_URL = os.environ.get("EXAMPLE_BROKER_URL", "redis://localhost:6379/0")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TIMEZONE = TIME_ZONE
# The schedule lives in this database, edited in the admin: beat on the leader runs
# django-celery-beat's scheduler instead of RedBeat.
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
# A crashed leader's beat is replaced within this plus a third of it.
CELERY_STOKER_LEASE_TTL = float(os.environ.get("EXAMPLE_LEASE_TTL", "10"))
