"""example_django: a Django project whose periodic tasks (django-celery-beat) run on the leader.

The Celery app is ``example_django.celery_app`` (``celery -A example_django.celery_app
worker``); this package does not import it, so a process that only uses the ORM
(``manage.py``, a test) sets up Django without creating a Celery app.
"""
